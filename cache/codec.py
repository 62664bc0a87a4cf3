"""The sealed chunk format, and the sealing of dirty pages in the local store.

A sealed chunk ("blob") is the one format a chunk has outside a read: the server stores
it, the wire carries it, the local cache keeps it. Layout (18-byte header, then the AEAD
output)::

    b"LFT" | version (1) | flags (1) | algorithm (1) | nonce (12) | ciphertext | tag (16)

- version is `FORMAT_VERSION`; flags bit 0 = the plaintext was zstd-compressed before
  encryption (other bits must be clear); algorithm 1 = AES-256-GCM.
- The associated data is the raw 32-byte chunk id followed by the whole header, so a blob
  cannot be replayed under another id and no header bit can be flipped unnoticed.
- The chunk id is the keyed BLAKE3 of the plaintext under the space's id key.

Promises:
- `ChunkCodec.open` returns the exact plaintext whose id was asked for, or raises
  `CorruptChunk` naming the chunk: it verifies the tag, bounds the decompressed size by
  `MAX_CHUNK_PLAINTEXT`, and checks the plaintext's id. It never returns wrong bytes.
- `ChunkCodec.open_range` returns bytes of an uncompressed blob from the blocks that
  hold them, each checked against tags `block_tags` took of that blob right after
  `open` accepted it; a block changed since raises `CorruptChunk`.
- Sealing never leaks plaintext: blobs hold only the header and AEAD output. Data that
  zstd would not shrink by `MIN_SAVING` is stored uncompressed.
- All work runs in C code that releases the GIL (BLAKE3, zstd, AES-GCM), so callers can
  use several cores. From trio, call `seal_async` / `open_async` (or the sync methods
  through `trio.to_thread.run_sync`); never call the sync methods on the trio thread
  with whole chunks. The async variants share one per-run limiter sized to the CPU count.
- Instances are safe to share between threads (zstd contexts are per thread).

Exceptions (third-party errors from zstd and cryptography are translated here)::

    CodecError
     ├── CorruptChunk(chunk_id, reason)      a blob that fails any check in open()
     └── CorruptPage(node_id, page_no, reason)  a sealed dirty page that fails to open

Bad arguments (a key of the wrong length, a plaintext over `MAX_CHUNK_PLAINTEXT`) are
caller bugs and raise ValueError.
"""

from __future__ import annotations

import hmac
import logging
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import blake3
import trio
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from loft.protocol import MAX_CHUNK_PLAINTEXT, ChunkId

log = logging.getLogger(__name__)

MAGIC = b"LFT"
FORMAT_VERSION = 1
FLAG_COMPRESSED = 0x01
ALG_AES_256_GCM = 1
NONCE_BYTES = 12
TAG_BYTES = 16
ID_BYTES = 32
KEY_BYTES = 32
_HEADER = struct.Struct(f">3sBBB{NONCE_BYTES}s")
HEADER_BYTES = _HEADER.size  # 18
#: The most a blob can be larger than its plaintext.
OVERHEAD_BYTES = HEADER_BYTES + TAG_BYTES

# zstd level, measured with scripts/bench_codec.py on 256 MiB alternating random bytes and
# Python source, half each (2 vCPU Xeon; MB/s of plaintext, seal = CDC + id + compress +
# encrypt, open = decrypt + decompress + verify; 1 thread / 2 threads over chunks):
#
#   level   stored/plain   seal 1T / 2T    open 1T / 2T
#     -1        0.640         537 /   895   1,774 / 3,217
#      1        0.620         519 / 1,066   1,675 / 2,959
#      3        0.610         394 /   821   1,649 / 3,052
#
# Alone, zstd compresses source at ~480 MB/s at levels -1 and 1, 346 at level 3, and skips
# random data at > 6 GB/s; BLAKE3 runs at ~5 GB/s and AES-GCM at ~9 GB/s, so compression
# is the whole cost of sealing. Level 1 stores 3% less than -1 for no measurable loss of
# speed on source code; level 3 saves another 1.6% for ~25% less throughput. Opening is
# cheap at every level.
LEVEL = 1
#: Compressed output must save at least this fraction, else the chunk is stored as is:
#: a few percent is not worth a decompression on every read.
MIN_SAVING = 0.03
#: Chunks from this size are probed before zstd sees them whole: `PROBES` slices of
#: `PROBE_BYTES` (start, middle, end) are compressed, and if none saves MIN_SAVING the
#: chunk is stored as is. Video, photos, archives and encrypted files, most of the
#: bytes of a large upload, then cost no compression at all (zstd spends ~0.8 s per GiB
#: finding that random data does not shrink, the largest share of sealing it here) for
#: ~5% of a 1 MiB chunk probed. A chunk compressible only away from the three slices is
#: stored uncompressed: a loss of space, never of data.
PROBE_FROM = 256 * 1024
PROBES = 3
PROBE_BYTES = 16 * 1024

# Associated data of sealed dirty pages: label, then node id and page number.
_PAGE_LABEL = b"loft/dirty-page/v1\x00"
_PAGE_KEY_INFO = b"loft/device/dirty-page-key/v1"
_PAGE_VERSION = 1


#: Plaintext bytes per block of a range read of an uncompressed cached chunk (see
#: `ChunkCodec.block_tags`): a random 4 KiB read then decrypts and checks one block of
#: 32 KiB instead of the whole chunk (2.2 MiB on average).
RANGE_BLOCK = 32 * 1024
#: Bytes kept per block: a 128-bit keyed BLAKE3 tag.
BLOCK_TAG_BYTES = 16
_GCM_FIRST_COUNTER = 2  # GCM encrypts the plaintext from counter block nonce || 2


@dataclass(frozen=True)
class BlockTags:
    """Tags of the ciphertext blocks of one uncompressed blob, taken right after the
    whole blob passed `ChunkCodec.open`, under a key that never leaves the process.
    `open_range` checks a block against them before it decrypts it, so a range read
    returns only bytes that the authenticated encryption vouched for.
    """

    nonce: bytes
    blob_size: int
    tags: bytes


class CodecError(Exception):
    """Base of this module's errors."""


class CorruptChunk(CodecError):
    """A blob failed a check: it is not the chunk `chunk_id` sealed under this key."""

    def __init__(self, chunk_id: str, reason: str) -> None:
        super().__init__(f"chunk {chunk_id} is corrupt: {reason}")
        self.chunk_id = chunk_id
        self.reason = reason


class CorruptPage(CodecError):
    """A sealed dirty page failed to open."""

    def __init__(self, node_id: str, page_no: int, reason: str) -> None:
        super().__init__(f"dirty page {page_no} of node {node_id} is corrupt: {reason}")
        self.node_id = node_id
        self.page_no = page_no
        self.reason = reason


class _ThreadZstd(threading.local):
    """One compression and one decompression context per thread and level: contexts
    are not thread-safe, and creating one per chunk costs allocations."""

    def __init__(self) -> None:
        self.compressors: dict[int, zstandard.ZstdCompressor] = {}
        self.decompressor = zstandard.ZstdDecompressor()

    def compressor(self, level: int) -> zstandard.ZstdCompressor:
        c = self.compressors.get(level)
        if c is None:
            c = self.compressors[level] = zstandard.ZstdCompressor(level=level)
        return c


_zstd = _ThreadZstd()

T = TypeVar("T")

_CPU_LIMITER: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("loft_cpu")


def cpu_limiter() -> trio.CapacityLimiter:
    """The limiter for CPU-bound work of this trio run: one token per CPU, so queued
    chunks wait in trio rather than as threads fighting for cores."""
    try:
        return _CPU_LIMITER.get()
    except LookupError:
        limiter = trio.CapacityLimiter(os.cpu_count() or 1)
        _CPU_LIMITER.set(limiter)
        return limiter


async def run_cpu(fn: Callable[..., T], *args: object) -> T:
    """Runs `fn(*args)` in a worker thread under `cpu_limiter()`."""
    return await trio.to_thread.run_sync(fn, *args, limiter=cpu_limiter())


def _check_key(name: str, key: bytes) -> None:
    if len(key) != KEY_BYTES:
        raise ValueError(f"{name} must be {KEY_BYTES} bytes, got {len(key)}")


class ChunkCodec:
    """Names, seals and opens the chunks of one space (one id key, one content key)."""

    def __init__(self, id_key: bytes, content_key: bytes, level: int = LEVEL) -> None:
        _check_key("id_key", id_key)
        _check_key("content_key", content_key)
        self._id_key = bytes(id_key)
        self._aead = AESGCM(content_key)
        self._aes = algorithms.AES(bytes(content_key))
        self.level = level

    def _digest(self, plaintext: bytes | bytearray | memoryview) -> bytes:
        return blake3.blake3(plaintext, key=self._id_key).digest()

    def chunk_id(self, plaintext: bytes | bytearray | memoryview) -> ChunkId:
        """The id of `plaintext` in this space: keyed BLAKE3, 64 lowercase hex digits."""
        return ChunkId(self._digest(plaintext).hex())

    def seal(self, plaintext: bytes | bytearray | memoryview) -> tuple[ChunkId, bytes]:
        """Returns the id of `plaintext` and its blob. Each call draws a fresh nonce, so
        sealing the same chunk twice gives two different blobs that open the same."""
        raw_id = self._digest(plaintext)
        return ChunkId(raw_id.hex()), self.seal_as(raw_id, plaintext)

    def raw_id(self, plaintext: bytes | bytearray | memoryview) -> bytes:
        """The 32-byte id of `plaintext` (`chunk_id` before hex encoding)."""
        return self._digest(plaintext)

    def seal_as(self, raw_id: bytes, plaintext: bytes | bytearray | memoryview) -> bytes:
        """The blob of `plaintext`, whose `raw_id` the caller computed: where chunks are
        cut, one thread names them in order (cheap) while several seal them (dear)."""
        if len(plaintext) > MAX_CHUNK_PLAINTEXT:
            raise ValueError(
                f"chunk of {len(plaintext)} bytes is over the limit of {MAX_CHUNK_PLAINTEXT}"
            )
        flags = 0
        body: bytes | bytearray | memoryview = plaintext
        if plaintext and self._worth_compressing(plaintext):
            packed = _zstd.compressor(self.level).compress(plaintext)
            if len(packed) <= len(plaintext) * (1.0 - MIN_SAVING):
                body, flags = packed, FLAG_COMPRESSED
        header = _HEADER.pack(MAGIC, FORMAT_VERSION, flags, ALG_AES_256_GCM, os.urandom(12))
        return header + self._aead.encrypt(header[-NONCE_BYTES:], body, raw_id + header)

    def _worth_compressing(self, plaintext: bytes | bytearray | memoryview) -> bool:
        """False when a large chunk's probes all fail to shrink (see PROBE_FROM)."""
        size = len(plaintext)
        if size < PROBE_FROM:
            return True
        view = memoryview(plaintext)
        compressor = _zstd.compressor(self.level)
        step = (size - PROBE_BYTES) // (PROBES - 1)
        for start in range(0, step * PROBES, step):
            probe = view[start : start + PROBE_BYTES]
            if len(compressor.compress(probe)) <= PROBE_BYTES * (1.0 - MIN_SAVING):
                return True
        return False

    def open(
        self,
        chunk_id: ChunkId | str,
        blob: bytes | bytearray | memoryview,
        *,
        check_content: bool = True,
    ) -> bytes:
        """Returns the plaintext of chunk `chunk_id` from its blob, after verifying it.

        Raises CorruptChunk (naming the chunk and why) for any blob that is not that
        chunk sealed under this space's keys: truncated, tampered with, sealed under
        another key or id, or holding other content.

        The last check hashes the plaintext (as dear as the decryption). It guards
        against a holder of the space's keys who sealed other content under an id;
        `check_content=False` skips it for blobs that passed it before, which the
        authenticated encryption (over the id, too) then proves unchanged: the local
        chunk cache admits only blobs that passed it, or that this device sealed.
        """
        try:
            raw_id = bytes.fromhex(chunk_id)
        except ValueError:
            raise CorruptChunk(str(chunk_id), "malformed chunk id") from None
        if len(raw_id) != ID_BYTES:
            raise CorruptChunk(chunk_id, "malformed chunk id")
        if len(blob) < OVERHEAD_BYTES:
            raise CorruptChunk(chunk_id, f"blob of {len(blob)} bytes is too short")
        if len(blob) > MAX_CHUNK_PLAINTEXT + OVERHEAD_BYTES:
            raise CorruptChunk(chunk_id, f"blob of {len(blob)} bytes is too long")
        view = memoryview(blob)
        header = bytes(view[:HEADER_BYTES])
        magic, version, flags, alg, nonce = _HEADER.unpack(header)
        if magic != MAGIC:
            raise CorruptChunk(chunk_id, "not a sealed chunk (bad magic)")
        if version != FORMAT_VERSION:
            raise CorruptChunk(chunk_id, f"unknown format version {version}")
        if alg != ALG_AES_256_GCM:
            raise CorruptChunk(chunk_id, f"unknown algorithm {alg}")
        if flags & ~FLAG_COMPRESSED:
            raise CorruptChunk(chunk_id, f"unknown flags {flags:#04x}")
        try:
            body = self._aead.decrypt(nonce, view[HEADER_BYTES:], raw_id + header)
        except InvalidTag:
            raise CorruptChunk(
                chunk_id, "authentication failed (tampered, truncated, or another key or id)"
            ) from None
        plaintext = _decompress(chunk_id, body) if flags & FLAG_COMPRESSED else body
        if check_content and not hmac.compare_digest(self._digest(plaintext), raw_id):
            raise CorruptChunk(chunk_id, "content does not match its id")
        return plaintext

    def block_tags(self, blob: bytes | bytearray | memoryview, tag_key: bytes) -> BlockTags | None:
        """The tags of an uncompressed blob's ciphertext blocks, for `open_range`; None
        for a compressed one (zstd needs the whole chunk). Call it only on a blob that
        `open` accepted, in the same read of it: the tags vouch for what they cover."""
        view = memoryview(blob)
        if view[4] & FLAG_COMPRESSED:
            return None
        nonce = bytes(view[HEADER_BYTES - NONCE_BYTES : HEADER_BYTES])
        body = view[HEADER_BYTES : len(view) - TAG_BYTES]
        tags = b"".join(
            _block_tag(tag_key, nonce, i, body[start : start + RANGE_BLOCK])
            for i, start in enumerate(range(0, len(body), RANGE_BLOCK))
        )
        return BlockTags(nonce, len(view), tags)

    def open_range(
        self,
        chunk_id: str,
        blob: bytes | bytearray | memoryview,
        tags: BlockTags,
        tag_key: bytes,
        lo: int,
        hi: int,
    ) -> bytes | None:
        """Plaintext bytes [lo, hi) of an uncompressed chunk from the blocks that hold
        them: each block's tag is checked, then only those blocks are decrypted (GCM is
        counter mode underneath). None if `blob` is not the blob that was tagged (the
        cache replaced it); raises CorruptChunk if a block changed since."""
        view = memoryview(blob)
        nonce = view[HEADER_BYTES - NONCE_BYTES : HEADER_BYTES]
        if len(view) != tags.blob_size or nonce != tags.nonce:
            return None
        body = view[HEADER_BYTES : len(view) - TAG_BYTES]
        if not 0 <= lo < hi <= len(body):
            raise ValueError(f"range [{lo}, {hi}) is outside a chunk of {len(body)} bytes")
        first, last = lo // RANGE_BLOCK, (hi - 1) // RANGE_BLOCK
        for i in range(first, last + 1):
            got = _block_tag(tag_key, tags.nonce, i, body[i * RANGE_BLOCK : (i + 1) * RANGE_BLOCK])
            want = tags.tags[i * BLOCK_TAG_BYTES : (i + 1) * BLOCK_TAG_BYTES]
            if not hmac.compare_digest(got, want):
                raise CorruptChunk(chunk_id, f"block {i} changed since it was checked")
        start = first * RANGE_BLOCK
        counter = tags.nonce + (_GCM_FIRST_COUNTER + start // 16).to_bytes(4, "big")
        decryptor = Cipher(self._aes, modes.CTR(counter)).decryptor()
        plain = decryptor.update(body[start : min((last + 1) * RANGE_BLOCK, len(body))])
        return plain[lo - start : hi - start]

    async def seal_async(self, plaintext: bytes | bytearray | memoryview) -> tuple[ChunkId, bytes]:
        """`seal` in a worker thread, at most one per CPU at a time."""
        return await run_cpu(self.seal, plaintext)

    async def open_async(
        self, chunk_id: ChunkId | str, blob: bytes | bytearray | memoryview
    ) -> bytes:
        """`open` in a worker thread, at most one per CPU at a time."""
        return await run_cpu(self.open, chunk_id, blob)


def _block_tag(tag_key: bytes, nonce: bytes, index: int, block: memoryview) -> bytes:
    h = blake3.blake3(nonce + index.to_bytes(4, "big"), key=tag_key)
    h.update(block)
    return h.digest(length=BLOCK_TAG_BYTES)


def _decompress(chunk_id: str, body: bytes) -> bytes:
    # The frame states its size; refuse a large one before zstd allocates it (zstd
    # ignores max_output_size when the frame has a content size).
    try:
        size = zstandard.frame_content_size(body)
    except zstandard.ZstdError as exc:
        raise CorruptChunk(chunk_id, f"bad zstd frame: {exc}") from None
    if size > MAX_CHUNK_PLAINTEXT:
        raise CorruptChunk(chunk_id, f"decompressed size {size} is over the limit")
    try:
        plaintext = _zstd.decompressor.decompress(body, max_output_size=MAX_CHUNK_PLAINTEXT)
    except zstandard.ZstdError as exc:
        raise CorruptChunk(chunk_id, f"decompression failed: {exc}") from None
    if len(plaintext) > MAX_CHUNK_PLAINTEXT:  # pragma: no cover - guarded above
        raise CorruptChunk(chunk_id, "decompressed size is over the limit")
    return plaintext


_PAGE_TAMPERED = "authentication failed (tampered, moved, or another key)"


class DirtySealer:
    """Seals pages of modified, not yet uploaded file data for the local store, under a
    key derived from the device key. LMDB reuses freed pages without wiping them, so
    plaintext must never be written there, not even briefly.

    A sealed page is: version (1) | nonce (12) | ciphertext | tag (16), with the node id
    and page number as associated data, so pages cannot be swapped unnoticed. Not
    compressed: dirty data is short-lived, and sealing must keep up with writes.
    """

    OVERHEAD_BYTES = 1 + NONCE_BYTES + TAG_BYTES

    def __init__(self, device_key: bytes) -> None:
        _check_key("device_key", device_key)
        page_key = HKDF(
            algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=_PAGE_KEY_INFO
        ).derive(device_key)
        self._aead = AESGCM(page_key)

    @staticmethod
    def _aad(node_id: str, page_no: int) -> bytes:
        node = node_id.encode("utf-8")
        return _PAGE_LABEL + struct.pack(">H", len(node)) + node + struct.pack(">Q", page_no)

    def seal(self, node_id: str, page_no: int, data: bytes | bytearray | memoryview) -> bytearray:
        """Returns the sealed form of page `page_no` of `node_id` holding `data`, built in
        place (no copy of the page on the way)."""
        nonce = os.urandom(NONCE_BYTES)
        out = bytearray(1 + NONCE_BYTES + len(data) + TAG_BYTES)
        out[0] = _PAGE_VERSION
        out[1 : 1 + NONCE_BYTES] = nonce
        self._aead.encrypt_into(
            nonce, data, self._aad(node_id, page_no), memoryview(out)[1 + NONCE_BYTES :]
        )
        return out

    def open(self, node_id: str, page_no: int, blob: bytes | bytearray | memoryview) -> bytes:
        """Returns the data sealed as page `page_no` of `node_id`, or raises CorruptPage."""
        view = self._checked(node_id, page_no, blob)
        try:
            return self._aead.decrypt(
                bytes(view[1 : 1 + NONCE_BYTES]),
                view[1 + NONCE_BYTES :],
                self._aad(node_id, page_no),
            )
        except InvalidTag:
            raise CorruptPage(node_id, page_no, _PAGE_TAMPERED) from None

    def open_into(
        self, node_id: str, page_no: int, blob: bytes | bytearray | memoryview, out: memoryview
    ) -> None:
        """`open` into `out`, which must be `plain_size(blob)` bytes long. On
        CorruptPage, `out` holds garbage."""
        view = self._checked(node_id, page_no, blob)
        try:
            self._aead.decrypt_into(
                bytes(view[1 : 1 + NONCE_BYTES]),
                view[1 + NONCE_BYTES :],
                self._aad(node_id, page_no),
                out,
            )
        except InvalidTag:
            raise CorruptPage(node_id, page_no, _PAGE_TAMPERED) from None

    def plain_size(self, blob: bytes | bytearray | memoryview) -> int:
        """The length of the data a sealed page holds."""
        return len(blob) - self.OVERHEAD_BYTES

    def _checked(self, node_id: str, page_no: int, blob) -> memoryview:
        if len(blob) < self.OVERHEAD_BYTES:
            raise CorruptPage(node_id, page_no, f"sealed page of {len(blob)} bytes is too short")
        view = memoryview(blob)
        if view[0] != _PAGE_VERSION:
            raise CorruptPage(node_id, page_no, f"unknown format version {view[0]}")
        return view
