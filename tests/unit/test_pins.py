"""Pinning admits into the local cache only chunks whose content matches their id."""

from __future__ import annotations

import os

from cache.codec import ChunkCodec
from cache.pins import _checked
from tests.unit.test_codec import CONTENT_KEY, ID_KEY, _forge


def test_pinned_blobs_are_checked_before_the_cache_takes_them() -> None:
    codec = ChunkCodec(ID_KEY, CONTENT_KEY)
    good_id, good = codec.seal(os.urandom(5000))
    forged_id = codec.chunk_id(b"what the manifest expects")
    forged = _forge(CONTENT_KEY, bytes.fromhex(forged_id), b"something else", 0)
    missing_id = codec.chunk_id(b"gone")
    kept = _checked(codec, {good_id: good, forged_id: forged, missing_id: None})
    assert kept == {good_id: good}
