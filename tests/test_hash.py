"""`_core.hash_file`: the digests the cache and `verify` rely on."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import xxhash

from surefetch import Cancelled, CancelToken
from surefetch._core import hash_file

from support import payload


@pytest.mark.parametrize("size", [0, 1, 4096, (1 << 20) + 17, 3 << 20])
def test_digests_match_hashlib_and_xxhsum(tmp_path: Path, size: int) -> None:
    data = payload(size, seed=size)
    path = tmp_path / "f"
    path.write_bytes(data)
    assert hash_file(path) == (
        size,
        xxhash.xxh3_128_hexdigest(data),
        hashlib.sha256(data).hexdigest(),
    )
    assert hash_file(path, sha256=False) == (size, xxhash.xxh3_128_hexdigest(data), None)


def test_missing_file_is_a_plain_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        hash_file(tmp_path / "absent")
    assert info.value.filename == tmp_path / "absent"


def test_a_cancelled_token_stops_hashing(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(payload(1 << 20))
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        hash_file(path, cancel=token)
