"""The key hierarchy of end-to-end encryption, and key material on disk.

It lives in cache/ because its main caller, the replica, lives here; loft's CLI uses it to
sign up and log in.

    password ──scrypt(salt, n, r, p)──▶ master secret ──HKDF──┬─▶ auth key  (to the server,
                                                              │              which keeps a
                                                              │              slow hash)
                                                              └─▶ KEK       (never leaves
                                                                             the device)
    user X25519 key pair: private key wrapped under the KEK (AES-256-GCM), stored on the
        server, so a new device needs only the password
    space key (32 random bytes) ──sealed box to each member's public key──▶ server
        └─HKDF─┬─▶ id key       (keyed BLAKE3 chunk ids)
               └─▶ content key  (AES-256-GCM of chunks)
    device key (32 random bytes, in a 0600 file) ──▶ sealing of dirty pages

Promises:
- Every derived key has its own HKDF label: no key is used for two purposes.
- Secret-holding dataclasses leave their keys out of `repr`, so they cannot end up in logs.
- Unwrapping and opening either return the sealed bytes or raise; a wrong password is
  told apart from a malformed blob.
- `write_secret` leaves either the old file or the complete new one, mode 0600, never a
  partial or world-readable file; `read_secret` refuses a file others may read.

The KDF and file functions block (scrypt takes ~0.2 s here; writing fsyncs): from trio,
call them through `trio.to_thread.run_sync`. `hashlib.scrypt` releases the GIL.

Set `LOFT_TEST_FAST_KDF=1` in the environment to make `new_kdf_params` choose n=2**10
(about 1 ms instead of 0.2 s): for test suites that sign up many users. Parameters are
stored with each account, so accounts made that way keep their cheap parameters; never
set it outside tests.

Exceptions::

    KeyringError                a malformed wrapped key, sealed box or public key
     ├── WrongPassword          the KEK does not open the wrapped private key
     ├── BadKdfParams           KDF parameters this client refuses (too weak or too costly)
     ├── BadSealedBox           a sealed box that does not open with this private key
     └── InsecureSecret         a secret file that group or others may access

OSError from the file functions propagates unchanged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cache.codec import LEVEL, ChunkCodec
from loft.protocol import KdfParams

log = logging.getLogger(__name__)

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
SALT_BYTES = 16

# scrypt cost: n=2**16, r=8 takes 0.19 s and 64 MiB here (2**15: 0.09 s, 2**17: 0.40 s).
# 2**16 keeps a login well under 0.5 s with room for slower laptops, at 2x the cost of
# the 2**15 minimum usually recommended for interactive logins.
SCRYPT_N = 2**16
SCRYPT_R = 8
SCRYPT_P = 1
#: n under LOFT_TEST_FAST_KDF=1 (the lowest KdfParams accepts).
TEST_SCRYPT_N = 2**10
FAST_KDF_ENV = "LOFT_TEST_FAST_KDF"
#: The most memory a server may make this client spend on the KDF.
MAX_KDF_MEMORY = 1024 * 1024 * 1024

_AUTH_INFO = b"loft/account/auth-key/v1"
_KEK_INFO = b"loft/account/kek/v1"
_WRAP_AAD = b"loft/user-private-key/v1"
_WRAP_VERSION = 1
_SEALED_BOX_INFO = b"loft/sealed-box/v1"
_ID_KEY_INFO = b"loft/space/id-key/v1"
_CONTENT_KEY_INFO = b"loft/space/content-key/v1"


class KeyringError(Exception):
    """Base of this module's errors; raised as is for malformed key material."""


class WrongPassword(KeyringError):
    """The key-encryption key derived from the password does not open the private key."""


class BadKdfParams(KeyringError):
    """KDF parameters this client will not use."""


class BadSealedBox(KeyringError):
    """A sealed box that was not sealed to this key, or was altered."""


class InsecureSecret(KeyringError):
    """A file holding key material is accessible to group or others."""


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


# ------------------------------------------------------------------- account keys


@dataclass(frozen=True)
class AccountKeys:
    """What the password yields: the auth key (sent at sign-up and login) and the
    key-encryption key (never leaves the device)."""

    auth_key: bytes = field(repr=False)
    kek: bytes = field(repr=False)


def new_kdf_params() -> KdfParams:
    """Fresh KDF parameters for a new account: a random salt and this client's cost
    (cheap when LOFT_TEST_FAST_KDF=1)."""
    fast = os.environ.get(FAST_KDF_ENV) == "1"
    return KdfParams(
        alg="scrypt",
        salt=secrets.token_bytes(SALT_BYTES),
        n=TEST_SCRYPT_N if fast else SCRYPT_N,
        r=SCRYPT_R,
        p=SCRYPT_P,
    )


def derive_account_keys(password: str, kdf: KdfParams) -> AccountKeys:
    """The account keys of `password` under `kdf` (from the server at login). The
    password is NFC-normalised first, so the same password typed on another system
    gives the same keys. Blocks for the KDF's duration."""
    if kdf.alg != "scrypt":
        raise BadKdfParams(f"unknown KDF {kdf.alg!r}")
    if len(kdf.salt) < SALT_BYTES:
        raise BadKdfParams(f"salt of {len(kdf.salt)} bytes is shorter than {SALT_BYTES}")
    if kdf.n < 2 or kdf.n & (kdf.n - 1):
        raise BadKdfParams(f"scrypt n={kdf.n} is not a power of two")
    # OpenSSL needs 128·r·(n + p + 2) bytes; refuse a server that asks for more than we
    # are willing to spend rather than let it exhaust the client's memory.
    need = 128 * kdf.r * (kdf.n + kdf.p + 2)
    if need > MAX_KDF_MEMORY:
        raise BadKdfParams(f"scrypt n={kdf.n} r={kdf.r} p={kdf.p} needs {need} bytes")
    secret = unicodedata.normalize("NFC", password).encode("utf-8")
    master = hashlib.scrypt(
        secret,
        salt=kdf.salt,
        n=kdf.n,
        r=kdf.r,
        p=kdf.p,
        maxmem=need + 1024 * 1024,
        dklen=KEY_BYTES,
    )
    return AccountKeys(auth_key=_hkdf(master, _AUTH_INFO), kek=_hkdf(master, _KEK_INFO))


# ------------------------------------------------------------------- user key pair


@dataclass(frozen=True)
class UserKeyPair:
    """A user's X25519 key pair (raw 32-byte keys)."""

    private_bytes: bytes = field(repr=False)
    public_bytes: bytes

    @classmethod
    def generate(cls) -> UserKeyPair:
        return cls.from_private_bytes(
            X25519PrivateKey.generate().private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
        )

    @classmethod
    def from_private_bytes(cls, private_bytes: bytes) -> UserKeyPair:
        """The key pair of a raw private key; KeyringError if it is not 32 bytes."""
        try:
            private = X25519PrivateKey.from_private_bytes(private_bytes)
        except ValueError:
            raise KeyringError("an X25519 private key is 32 bytes") from None
        public = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return cls(private_bytes=bytes(private_bytes), public_bytes=public)


def wrap_private_key(private_bytes: bytes, kek: bytes) -> bytes:
    """`private_bytes` sealed under the key-encryption key: version (1) | nonce (12) |
    ciphertext | tag (16)."""
    if len(private_bytes) != KEY_BYTES:
        raise KeyringError(f"an X25519 private key is {KEY_BYTES} bytes")
    nonce = secrets.token_bytes(NONCE_BYTES)
    return (
        bytes([_WRAP_VERSION]) + nonce + AESGCM(kek).encrypt(nonce, bytes(private_bytes), _WRAP_AAD)
    )


def unwrap_private_key(blob: bytes, kek: bytes) -> bytes:
    """The private key wrapped in `blob`. Raises WrongPassword when `kek` does not open
    it (a wrong password, or an altered blob), KeyringError when it is malformed."""
    if len(blob) != 1 + NONCE_BYTES + KEY_BYTES + TAG_BYTES:
        raise KeyringError(f"wrapped private key of {len(blob)} bytes is malformed")
    if blob[0] != _WRAP_VERSION:
        raise KeyringError(f"wrapped private key has unknown version {blob[0]}")
    try:
        return AESGCM(kek).decrypt(blob[1 : 1 + NONCE_BYTES], blob[1 + NONCE_BYTES :], _WRAP_AAD)
    except InvalidTag:
        raise WrongPassword("wrong password: the private key does not unwrap") from None


# ------------------------------------------------------------------- sealed boxes

_BOX_OVERHEAD = KEY_BYTES + NONCE_BYTES + TAG_BYTES


def _box_key(shared: bytes, ephemeral_pub: bytes, recipient_pub: bytes) -> bytes:
    # Binding both public keys into the key stops a box being re-targeted.
    return _hkdf(shared, _SEALED_BOX_INFO + ephemeral_pub + recipient_pub)


def _public_key(public_key: bytes) -> X25519PublicKey:
    try:
        return X25519PublicKey.from_public_bytes(public_key)
    except ValueError:
        raise KeyringError("an X25519 public key is 32 bytes") from None


def seal_to(public_key: bytes, plaintext: bytes) -> bytes:
    """`plaintext` sealed so that only the holder of `public_key`'s private key can open
    it, anonymously: ephemeral public key (32) | nonce (12) | ciphertext | tag (16)."""
    recipient = _public_key(public_key)
    ephemeral = X25519PrivateKey.generate()
    ephemeral_pub = ephemeral.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    try:
        shared = ephemeral.exchange(recipient)
    except ValueError:  # a low-order point: no shared secret
        raise KeyringError("unusable X25519 public key") from None
    key = _box_key(shared, ephemeral_pub, bytes(public_key))
    nonce = secrets.token_bytes(NONCE_BYTES)
    return ephemeral_pub + nonce + AESGCM(key).encrypt(nonce, plaintext, None)


def open_sealed(private_key: bytes, blob: bytes) -> bytes:
    """The plaintext of a sealed box made by `seal_to` for this key pair; BadSealedBox if
    it was sealed to another key, or altered, or is malformed."""
    if len(blob) < _BOX_OVERHEAD:
        raise BadSealedBox(f"sealed box of {len(blob)} bytes is too short")
    try:
        private = X25519PrivateKey.from_private_bytes(private_key)
    except ValueError:
        raise KeyringError("an X25519 private key is 32 bytes") from None
    recipient_pub = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    ephemeral_pub = blob[:KEY_BYTES]
    nonce = blob[KEY_BYTES : KEY_BYTES + NONCE_BYTES]
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(ephemeral_pub))
    except ValueError:  # a low-order point
        raise BadSealedBox("sealed box has an unusable ephemeral key") from None
    key = _box_key(shared, ephemeral_pub, recipient_pub)
    try:
        return AESGCM(key).decrypt(nonce, blob[KEY_BYTES + NONCE_BYTES :], None)
    except InvalidTag:
        raise BadSealedBox("sealed box does not open with this key") from None


# ------------------------------------------------------------------- space and device keys


def new_space_key() -> bytes:
    """A fresh random 256-bit space key."""
    return secrets.token_bytes(KEY_BYTES)


def new_device_key() -> bytes:
    """A fresh random 256-bit device key (it seals this device's dirty pages)."""
    return secrets.token_bytes(KEY_BYTES)


@dataclass(frozen=True)
class SpaceKeys:
    """The keys derived from a space key: chunk ids and chunk contents."""

    id_key: bytes = field(repr=False)
    content_key: bytes = field(repr=False)

    @classmethod
    def from_space_key(cls, space_key: bytes) -> SpaceKeys:
        if len(space_key) != KEY_BYTES:
            raise KeyringError(f"a space key is {KEY_BYTES} bytes, got {len(space_key)}")
        return cls(
            id_key=_hkdf(space_key, _ID_KEY_INFO),
            content_key=_hkdf(space_key, _CONTENT_KEY_INFO),
        )

    def codec(self, level: int = LEVEL) -> ChunkCodec:
        """The codec of this space's chunks."""
        return ChunkCodec(self.id_key, self.content_key, level=level)


# ------------------------------------------------------------------- files


def write_secret(path: str | os.PathLike[str], data: bytes) -> None:
    """Replaces the file at `path` with `data`, atomically and durably, mode 0600."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # exactly 0600 whatever the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)  # make the rename durable
    finally:
        os.close(dir_fd)


def read_secret(path: str | os.PathLike[str]) -> bytes:
    """The content of the secret file at `path`. Raises InsecureSecret if group or others
    have any access to it (as ssh does for private keys)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if mode & 0o077:
            raise InsecureSecret(
                f"{os.fspath(path)} has mode {mode & 0o777:04o}; key files must be 0600"
            )
        return f.read()
