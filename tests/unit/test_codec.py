"""The sealed chunk format: roundtrips, ids, and every way a blob can be wrong."""

from __future__ import annotations

import os
import random
import struct

import pytest
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cache import codec as codec_module
from cache.codec import (
    BLOCK_TAG_BYTES,
    FLAG_COMPRESSED,
    HEADER_BYTES,
    MAGIC,
    PROBE_BYTES,
    PROBES,
    RANGE_BLOCK,
    TAG_BYTES,
    ChunkCodec,
    CodecError,
    CorruptChunk,
    CorruptPage,
    DirtySealer,
)
from loft.protocol import MAX_CHUNK_PLAINTEXT

ID_KEY = bytes(range(32))
CONTENT_KEY = bytes(range(32, 64))
MARKER = b"THIS-PLAINTEXT-MUST-NEVER-REACH-A-BLOB"
TEXT = b"def handler(request):\n    return respond(request.path, status=200)\n" * 4000


@pytest.fixture
def codec() -> ChunkCodec:
    return ChunkCodec(ID_KEY, CONTENT_KEY)


def _random(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def _flags(blob: bytes) -> int:
    return blob[4]


def _forge(codec_content_key: bytes, raw_id: bytes, body: bytes, flags: int) -> bytes:
    """A blob a holder of the content key could make: any body under any id."""
    nonce = os.urandom(12)
    header = struct.pack(">3sBBB12s", MAGIC, 1, flags, 1, nonce)
    return header + AESGCM(codec_content_key).encrypt(nonce, body, raw_id + header)


@pytest.mark.parametrize(
    "plaintext",
    [b"", b"x", TEXT, _random(1_000_000), _random(MAX_CHUNK_PLAINTEXT, 1)],
    ids=["empty", "one-byte", "text", "random", "max-size"],
)
def test_codec_roundtrip(codec: ChunkCodec, plaintext: bytes) -> None:
    chunk_id, blob = codec.seal(plaintext)
    assert chunk_id == codec.chunk_id(plaintext)
    assert codec.open(chunk_id, blob) == plaintext


def test_codec_accepts_memoryview_plaintext(codec: ChunkCodec) -> None:
    data = _random(300_000)
    chunk_id, blob = codec.seal(memoryview(data)[1000:200_000])
    assert codec.open(chunk_id, memoryview(blob)) == data[1000:200_000]


def test_codec_id_is_64_hex_and_deterministic(codec: ChunkCodec) -> None:
    chunk_id = codec.chunk_id(TEXT)
    assert len(chunk_id) == 64 and int(chunk_id, 16) >= 0 and chunk_id == chunk_id.lower()
    other = ChunkCodec(ID_KEY, os.urandom(32))  # content key plays no part in ids
    assert other.chunk_id(TEXT) == chunk_id
    assert codec.seal(TEXT)[0] == chunk_id


def test_codec_id_depends_on_id_key(codec: ChunkCodec) -> None:
    other = ChunkCodec(bytes(32), CONTENT_KEY)
    assert other.chunk_id(TEXT) != codec.chunk_id(TEXT)
    assert other.chunk_id(b"") != codec.chunk_id(b"")


def test_codec_seal_twice_gives_distinct_blobs_that_both_open(codec: ChunkCodec) -> None:
    (id1, blob1), (id2, blob2) = codec.seal(TEXT), codec.seal(TEXT)
    assert id1 == id2 and blob1 != blob2
    assert codec.open(id1, blob1) == codec.open(id2, blob2) == TEXT


def test_codec_compressible_data_is_stored_compressed(codec: ChunkCodec) -> None:
    _, blob = codec.seal(TEXT)
    assert _flags(blob) & FLAG_COMPRESSED
    assert len(blob) < len(TEXT) // 4


def test_codec_incompressible_data_is_stored_uncompressed(codec: ChunkCodec) -> None:
    data = _random(500_000)
    _, blob = codec.seal(data)
    assert not _flags(blob) & FLAG_COMPRESSED
    assert len(blob) == HEADER_BYTES + len(data) + TAG_BYTES


def test_codec_large_chunk_compressible_in_its_middle_is_compressed(codec: ChunkCodec) -> None:
    # the start and end probes see random bytes, the middle one sees text
    data = _random(600_000, 4) + TEXT + _random(600_000, 5)
    chunk_id, blob = codec.seal(data)
    assert _flags(blob) & FLAG_COMPRESSED
    assert codec.open(chunk_id, blob) == data


def test_codec_large_incompressible_chunk_skips_compression(
    codec: ChunkCodec, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _random(4 << 20, 6)
    compressed: list[int] = []
    real = codec_module._zstd.compressor(codec.level)

    class Spy:
        def compress(self, data):
            compressed.append(len(data))
            return real.compress(data)

    monkeypatch.setattr(codec_module._zstd, "compressor", lambda level: Spy())
    chunk_id, blob = codec.seal(data)
    assert not _flags(blob) & FLAG_COMPRESSED
    assert codec.open(chunk_id, blob) == data
    assert compressed == [PROBE_BYTES] * PROBES  # the probes only, never the whole chunk


def test_codec_barely_compressible_data_is_stored_uncompressed(codec: ChunkCodec) -> None:
    # ~1% zeros: zstd saves a little, under the threshold worth a decompression per read.
    data = _random(500_000, 3) + bytes(5_000)
    _, blob = codec.seal(data)
    assert not _flags(blob) & FLAG_COMPRESSED


@pytest.mark.parametrize("data", [MARKER * 1000, _random(100_000) + MARKER + _random(100_000, 1)])
def test_codec_plaintext_never_appears_in_blob(codec: ChunkCodec, data: bytes) -> None:
    _, blob = codec.seal(data)
    assert MARKER not in blob
    assert MARKER[:16] not in blob


# Offsets into the blob: magic, version, flags, algorithm, nonce, ciphertext, tag.
@pytest.mark.parametrize(
    "where",
    [0, 3, 4, 5, 6, 17, HEADER_BYTES, HEADER_BYTES + 5, -TAG_BYTES, -1],
    ids=["magic", "version", "flags", "alg", "nonce0", "nonce11", "ct0", "ct5", "tag0", "tag15"],
)
@pytest.mark.parametrize("payload", [TEXT, _random(20_000)], ids=["compressed", "stored"])
def test_codec_tampered_blob_raises_corrupt_chunk_naming_it(
    codec: ChunkCodec, where: int, payload: bytes
) -> None:
    chunk_id, blob = codec.seal(payload)
    bad = bytearray(blob)
    bad[where] ^= 0x01
    with pytest.raises(CorruptChunk) as info:
        codec.open(chunk_id, bytes(bad))
    assert info.value.chunk_id == chunk_id
    assert chunk_id in str(info.value)


@pytest.mark.parametrize("cut", [0, 1, HEADER_BYTES, HEADER_BYTES + TAG_BYTES - 1, -1])
def test_codec_truncated_blob_raises_corrupt_chunk(codec: ChunkCodec, cut: int) -> None:
    chunk_id, blob = codec.seal(TEXT)
    with pytest.raises(CorruptChunk):
        codec.open(chunk_id, blob[:cut])


def test_codec_appended_bytes_raise_corrupt_chunk(codec: ChunkCodec) -> None:
    chunk_id, blob = codec.seal(TEXT)
    with pytest.raises(CorruptChunk):
        codec.open(chunk_id, blob + b"\x00")


def test_codec_wrong_chunk_id_raises_corrupt_chunk(codec: ChunkCodec) -> None:
    id_a, blob_a = codec.seal(b"chunk a" * 100)
    id_b, _ = codec.seal(b"chunk b" * 100)
    with pytest.raises(CorruptChunk) as info:
        codec.open(id_b, blob_a)
    assert id_b in str(info.value)
    assert codec.open(id_a, blob_a) == b"chunk a" * 100


@pytest.mark.parametrize("bad_id", ["", "zz" * 32, "ab" * 31, "ab" * 33])
def test_codec_malformed_chunk_id_raises_corrupt_chunk(codec: ChunkCodec, bad_id: str) -> None:
    _, blob = codec.seal(TEXT)
    with pytest.raises(CorruptChunk):
        codec.open(bad_id, blob)


def test_codec_blob_of_another_space_raises_corrupt_chunk(codec: ChunkCodec) -> None:
    other = ChunkCodec(ID_KEY, os.urandom(32))
    chunk_id, blob = other.seal(TEXT)
    with pytest.raises(CorruptChunk, match="authentication failed"):
        codec.open(chunk_id, blob)


def test_codec_authentic_blob_with_other_content_raises_corrupt_chunk(codec: ChunkCodec) -> None:
    # A member holding the content key seals other bytes under a victim id: the id check
    # after decryption catches it.
    chunk_id = codec.chunk_id(b"what the manifest expects")
    forged = _forge(CONTENT_KEY, bytes.fromhex(chunk_id), b"something else", 0)
    with pytest.raises(CorruptChunk, match="does not match its id"):
        codec.open(chunk_id, forged)


def test_codec_open_without_the_content_check_still_checks_the_seal(codec: ChunkCodec) -> None:
    # For blobs checked once already (the local cache): the hash of the content is
    # skipped, but tampering, another id or another key still fail.
    chunk_id, blob = codec.seal(TEXT)
    assert codec.open(chunk_id, blob, check_content=False) == TEXT
    bad = bytearray(blob)
    bad[-1] ^= 0x01
    with pytest.raises(CorruptChunk, match="authentication failed"):
        codec.open(chunk_id, bytes(bad), check_content=False)
    with pytest.raises(CorruptChunk, match="authentication failed"):
        codec.open(codec.chunk_id(b"another"), blob, check_content=False)
    other = ChunkCodec(ID_KEY, os.urandom(32))
    with pytest.raises(CorruptChunk, match="authentication failed"):
        codec.open(chunk_id, other.seal(TEXT)[1], check_content=False)
    # what it does not catch, and why the cache admits only checked blobs
    forged = _forge(CONTENT_KEY, bytes.fromhex(chunk_id), b"something else", 0)
    assert codec.open(chunk_id, forged, check_content=False) == b"something else"


@pytest.mark.parametrize("content_size", [True, False], ids=["sized-frame", "unsized-frame"])
def test_codec_decompression_bomb_is_rejected(codec: ChunkCodec, content_size: bool) -> None:
    bomb = zstandard.ZstdCompressor(level=1, write_content_size=content_size).compress(
        bytes(MAX_CHUNK_PLAINTEXT + 1)
    )
    assert len(bomb) < 1000
    chunk_id = codec.chunk_id(b"x")
    forged = _forge(CONTENT_KEY, bytes.fromhex(chunk_id), bomb, FLAG_COMPRESSED)
    with pytest.raises(CorruptChunk):
        codec.open(chunk_id, forged)


def test_codec_garbage_zstd_frame_raises_corrupt_chunk(codec: ChunkCodec) -> None:
    chunk_id = codec.chunk_id(b"x")
    forged = _forge(CONTENT_KEY, bytes.fromhex(chunk_id), b"not zstd at all", FLAG_COMPRESSED)
    with pytest.raises(CorruptChunk, match=r"zstd|decompress"):
        codec.open(chunk_id, forged)


def test_codec_oversized_plaintext_is_refused(codec: ChunkCodec) -> None:
    with pytest.raises(ValueError):
        codec.seal(bytes(MAX_CHUNK_PLAINTEXT + 1))


def test_codec_rejects_keys_of_wrong_length() -> None:
    with pytest.raises(ValueError):
        ChunkCodec(bytes(16), CONTENT_KEY)
    with pytest.raises(ValueError):
        ChunkCodec(ID_KEY, bytes(31))


def test_codec_corrupt_chunk_is_a_codec_error() -> None:
    assert issubclass(CorruptChunk, CodecError) and issubclass(CorruptPage, CodecError)


async def test_codec_async_seal_and_open_roundtrip(codec: ChunkCodec) -> None:
    data = TEXT + _random(200_000)
    chunk_id, blob = await codec.seal_async(data)
    assert await codec.open_async(chunk_id, blob) == data
    with pytest.raises(CorruptChunk):
        await codec.open_async(codec.chunk_id(b"other"), blob)


# ---------------------------------------------------------------- dirty pages


TAG_KEY = bytes(range(64, 96))


def test_codec_range_reads_match_the_plaintext_at_every_edge(codec: ChunkCodec) -> None:
    size = 3 * RANGE_BLOCK + 100
    plaintext = _random(size, seed=11)
    chunk_id, blob = codec.seal(plaintext)
    tags = codec.block_tags(blob, TAG_KEY)
    assert tags is not None and len(tags.tags) == 4 * BLOCK_TAG_BYTES
    edges = [0, 1, 15, 16, 17, RANGE_BLOCK - 1, RANGE_BLOCK, RANGE_BLOCK + 1, size - 1, size]
    rng = random.Random(3)
    ranges = [(lo, hi) for lo in edges for hi in edges if lo < hi]
    ranges += [tuple(sorted(rng.sample(range(size + 1), 2))) for _ in range(200)]
    for lo, hi in ranges:
        assert codec.open_range(chunk_id, blob, tags, TAG_KEY, lo, hi) == plaintext[lo:hi]
    with pytest.raises(ValueError):
        codec.open_range(chunk_id, blob, tags, TAG_KEY, 0, size + 1)


def test_codec_compressed_chunks_have_no_block_tags(codec: ChunkCodec) -> None:
    _, blob = codec.seal(TEXT)
    assert blob[4] & FLAG_COMPRESSED
    assert codec.block_tags(blob, TAG_KEY) is None


@pytest.mark.parametrize("where", [HEADER_BYTES, HEADER_BYTES + RANGE_BLOCK + 5])
def test_codec_range_read_of_a_changed_block_raises_corrupt_chunk(
    codec: ChunkCodec, where: int
) -> None:
    plaintext = _random(2 * RANGE_BLOCK, seed=12)
    chunk_id, blob = codec.seal(plaintext)
    tags = codec.block_tags(blob, TAG_KEY)
    bad = bytearray(blob)
    bad[where] ^= 0x01
    block = (where - HEADER_BYTES) // RANGE_BLOCK
    lo = block * RANGE_BLOCK + 7
    with pytest.raises(CorruptChunk, match=chunk_id):
        codec.open_range(chunk_id, bytes(bad), tags, TAG_KEY, lo, lo + 10)
    other = (1 - block) * RANGE_BLOCK  # the other block still reads
    assert codec.open_range(chunk_id, bytes(bad), tags, TAG_KEY, other, other + 10) == (
        plaintext[other : other + 10]
    )
    with pytest.raises(CorruptChunk):  # tags taken under another key do not vouch
        codec.open_range(chunk_id, blob, tags, bytes(32), lo, lo + 10)


def test_codec_range_read_of_a_replaced_blob_declines(codec: ChunkCodec) -> None:
    """The same chunk sealed again (another nonce) is not the blob that was tagged."""
    plaintext = _random(RANGE_BLOCK * 2, seed=13)
    chunk_id, blob = codec.seal(plaintext)
    tags = codec.block_tags(blob, TAG_KEY)
    _, again = codec.seal(plaintext)
    assert codec.open_range(chunk_id, again, tags, TAG_KEY, 0, 10) is None
    assert codec.open_range(chunk_id, blob[:-1], tags, TAG_KEY, 0, 10) is None


def test_dirty_sealer_roundtrip_and_no_plaintext() -> None:
    sealer = DirtySealer(os.urandom(32))
    page = MARKER * 100
    sealed = sealer.seal("node-1", 7, page)
    assert MARKER not in sealed
    assert sealer.open("node-1", 7, sealed) == page
    assert sealer.open("node-1", 0, sealer.seal("node-1", 0, b"")) == b""


@pytest.mark.parametrize(("node", "page_no"), [("node-2", 7), ("node-1", 8), ("node-", 17)])
def test_dirty_sealer_page_moved_to_other_place_raises_corrupt_page(
    node: str, page_no: int
) -> None:
    sealer = DirtySealer(os.urandom(32))
    sealed = sealer.seal("node-1", 7, b"data" * 100)
    with pytest.raises(CorruptPage) as info:
        sealer.open(node, page_no, sealed)
    assert node in str(info.value)


@pytest.mark.parametrize("where", [0, 1, 13, 20, -1])
def test_dirty_sealer_tampered_page_raises_corrupt_page(where: int) -> None:
    sealer = DirtySealer(os.urandom(32))
    sealed = bytearray(sealer.seal("n", 1, b"data" * 100))
    sealed[where] ^= 0x80
    with pytest.raises(CorruptPage):
        sealer.open("n", 1, bytes(sealed))


def test_dirty_sealer_other_device_key_raises_corrupt_page() -> None:
    sealed = DirtySealer(os.urandom(32)).seal("n", 1, b"data")
    with pytest.raises(CorruptPage):
        DirtySealer(os.urandom(32)).open("n", 1, sealed)
    with pytest.raises(CorruptPage):
        DirtySealer(os.urandom(32)).open("n", 1, sealed[:10])
