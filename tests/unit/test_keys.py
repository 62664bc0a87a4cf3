"""The key hierarchy: password keys, wrapped private keys, sealed boxes, space keys and
secret files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cache.keys import (
    SCRYPT_N,
    TEST_SCRYPT_N,
    AccountKeys,
    BadKdfParams,
    BadSealedBox,
    InsecureSecret,
    KeyringError,
    SpaceKeys,
    UserKeyPair,
    WrongPassword,
    derive_account_keys,
    new_device_key,
    new_kdf_params,
    new_space_key,
    open_sealed,
    read_secret,
    seal_to,
    unwrap_private_key,
    wrap_private_key,
    write_secret,
)
from loft.protocol import KdfParams


@pytest.fixture
def fast_kdf(monkeypatch: pytest.MonkeyPatch) -> KdfParams:
    monkeypatch.setenv("LOFT_TEST_FAST_KDF", "1")
    return new_kdf_params()


def test_keys_new_kdf_params_default_cost_and_random_salt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOFT_TEST_FAST_KDF", raising=False)
    a, b = new_kdf_params(), new_kdf_params()
    assert (a.alg, a.n, a.r, a.p) == ("scrypt", SCRYPT_N, 8, 1)
    assert len(a.salt) == 16 and a.salt != b.salt


def test_keys_fast_kdf_env_lowers_cost(fast_kdf: KdfParams) -> None:
    assert fast_kdf.n == TEST_SCRYPT_N


def test_keys_derive_with_default_cost_works() -> None:
    params = KdfParams(salt=b"s" * 16, n=SCRYPT_N, r=8, p=1)
    keys = derive_account_keys("correct horse", params)
    assert len(keys.auth_key) == 32 and len(keys.kek) == 32


def test_keys_derive_is_deterministic_and_separates_keys(fast_kdf: KdfParams) -> None:
    a = derive_account_keys("correct horse", fast_kdf)
    assert a == derive_account_keys("correct horse", fast_kdf)
    assert a.auth_key != a.kek
    assert derive_account_keys("correct horsf", fast_kdf).kek != a.kek
    other_salt = fast_kdf.model_copy(update={"salt": os.urandom(16)})
    assert derive_account_keys("correct horse", other_salt).kek != a.kek


def test_keys_derive_normalises_password_to_nfc(fast_kdf: KdfParams) -> None:
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    assert derive_account_keys(composed, fast_kdf) == derive_account_keys(decomposed, fast_kdf)


def test_keys_account_keys_repr_hides_secrets(fast_kdf: KdfParams) -> None:
    keys = derive_account_keys("pw", fast_kdf)
    assert keys.kek.hex() not in repr(keys) and repr(keys.kek) not in repr(keys)
    assert isinstance(keys, AccountKeys)


@pytest.mark.parametrize(
    "params",
    [
        KdfParams(salt=b"s" * 16, n=3000, r=8, p=1),  # not a power of two
        KdfParams(salt=b"s" * 8, n=2**10, r=8, p=1),  # short salt
        KdfParams(salt=b"s" * 16, n=2**22, r=32, p=1),  # 16 GiB
    ],
    ids=["n-not-power-of-two", "short-salt", "too-costly"],
)
def test_keys_derive_refuses_bad_kdf_params(params: KdfParams) -> None:
    with pytest.raises(BadKdfParams):
        derive_account_keys("pw", params)


def test_keys_wrap_unwrap_private_key_roundtrip(fast_kdf: KdfParams) -> None:
    pair = UserKeyPair.generate()
    kek = derive_account_keys("pw", fast_kdf).kek
    blob = wrap_private_key(pair.private_bytes, kek)
    assert pair.private_bytes not in blob
    unwrapped = unwrap_private_key(blob, kek)
    assert UserKeyPair.from_private_bytes(unwrapped) == pair


def test_keys_wrong_password_raises_wrong_password(fast_kdf: KdfParams) -> None:
    pair = UserKeyPair.generate()
    blob = wrap_private_key(pair.private_bytes, derive_account_keys("right", fast_kdf).kek)
    with pytest.raises(WrongPassword):
        unwrap_private_key(blob, derive_account_keys("wrong", fast_kdf).kek)


def test_keys_tampered_wrapped_key_raises_wrong_password() -> None:
    kek = os.urandom(32)
    blob = bytearray(wrap_private_key(UserKeyPair.generate().private_bytes, kek))
    blob[20] ^= 1
    with pytest.raises(WrongPassword):
        unwrap_private_key(bytes(blob), kek)


@pytest.mark.parametrize(
    "blob", [b"", b"\x01" * 10, b"\x02" + bytes(60)], ids=["empty", "short", "version"]
)
def test_keys_malformed_wrapped_key_is_not_a_wrong_password(blob: bytes) -> None:
    with pytest.raises(KeyringError) as info:
        unwrap_private_key(blob, os.urandom(32))
    assert not isinstance(info.value, WrongPassword)


def test_keys_user_key_pair_generate_and_rebuild() -> None:
    pair = UserKeyPair.generate()
    assert len(pair.private_bytes) == 32 and len(pair.public_bytes) == 32
    assert UserKeyPair.from_private_bytes(pair.private_bytes).public_bytes == pair.public_bytes
    assert UserKeyPair.generate().public_bytes != pair.public_bytes
    assert pair.private_bytes.hex() not in repr(pair)
    with pytest.raises(KeyringError):
        UserKeyPair.from_private_bytes(b"short")


def test_keys_sealed_box_roundtrip() -> None:
    pair = UserKeyPair.generate()
    space_key = new_space_key()
    box1, box2 = seal_to(pair.public_bytes, space_key), seal_to(pair.public_bytes, space_key)
    assert box1 != box2  # a fresh ephemeral key each time
    assert space_key not in box1
    assert len(box1) == 32 + 12 + 32 + 16
    assert (
        open_sealed(pair.private_bytes, box1) == open_sealed(pair.private_bytes, box2) == space_key
    )


def test_keys_sealed_box_for_someone_else_raises_bad_sealed_box() -> None:
    box = seal_to(UserKeyPair.generate().public_bytes, b"secret")
    with pytest.raises(BadSealedBox):
        open_sealed(UserKeyPair.generate().private_bytes, box)


@pytest.mark.parametrize(
    "where", [0, 31, 32, 43, 44, -1], ids=["eph0", "eph31", "nonce0", "nonce11", "ct", "tag"]
)
def test_keys_tampered_sealed_box_raises_bad_sealed_box(where: int) -> None:
    pair = UserKeyPair.generate()
    box = bytearray(seal_to(pair.public_bytes, b"space key material, 32 bytes...."))
    box[where] ^= 0x04
    with pytest.raises(BadSealedBox):
        open_sealed(pair.private_bytes, bytes(box))


def test_keys_short_or_low_order_sealed_box_raises_bad_sealed_box() -> None:
    pair = UserKeyPair.generate()
    with pytest.raises(BadSealedBox):
        open_sealed(pair.private_bytes, b"short")
    with pytest.raises(BadSealedBox):
        open_sealed(pair.private_bytes, bytes(32 + 12 + 16))  # all-zero ephemeral key
    with pytest.raises(KeyringError):
        seal_to(bytes(32), b"x")  # low-order public key
    with pytest.raises(KeyringError):
        seal_to(b"short", b"x")


def test_keys_space_keys_are_distinct_and_deterministic() -> None:
    space_key = new_space_key()
    keys = SpaceKeys.from_space_key(space_key)
    assert keys == SpaceKeys.from_space_key(space_key)
    assert len({keys.id_key, keys.content_key, space_key}) == 3
    other = SpaceKeys.from_space_key(new_space_key())
    assert other.id_key != keys.id_key and other.content_key != keys.content_key
    assert space_key.hex() not in repr(keys) and keys.id_key.hex() not in repr(keys)
    with pytest.raises(KeyringError):
        SpaceKeys.from_space_key(b"short")


def test_keys_space_codec_roundtrip_across_devices() -> None:
    space_key = new_space_key()
    chunk_id, blob = SpaceKeys.from_space_key(space_key).codec().seal(b"hello" * 100)
    other_device = SpaceKeys.from_space_key(space_key).codec(level=3)
    assert other_device.chunk_id(b"hello" * 100) == chunk_id
    assert other_device.open(chunk_id, blob) == b"hello" * 100


def test_keys_new_random_keys_are_32_bytes_and_fresh() -> None:
    assert len(new_space_key()) == 32 and new_space_key() != new_space_key()
    assert len(new_device_key()) == 32 and new_device_key() != new_device_key()


def test_keys_write_secret_has_mode_0600_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    old = os.umask(0)
    try:
        write_secret(path, b"first")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        write_secret(path, b"second")  # replacing keeps the mode
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.umask(old)
    assert read_secret(path) == b"second"
    assert os.listdir(tmp_path) == ["device.key"]  # no temporary left behind


def test_keys_write_secret_replaces_a_readable_file_with_a_private_one(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_bytes(b"old")
    path.chmod(0o644)
    write_secret(path, b"new")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_secret(path) == b"new"


def test_keys_read_secret_refuses_a_file_others_can_read(tmp_path: Path) -> None:
    path = tmp_path / "k"
    write_secret(path, b"key")
    path.chmod(0o640)
    with pytest.raises(InsecureSecret):
        read_secret(path)


def test_keys_read_secret_missing_file_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_secret(tmp_path / "absent")
