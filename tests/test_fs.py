"""`surefetch._fs.write_json_atomic`: the one atomic write of small JSON files (the cache's
metadata and URL index)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from surefetch._fs import write_json_atomic


@pytest.mark.parametrize("durable", [False, True])
def test_write_json_atomic_replaces_the_file_and_leaves_no_temporary(
    tmp_path: Path, durable: bool
) -> None:
    target = tmp_path / "abc.json"
    target.write_text("old")
    write_json_atomic(target, {"b": 1, "a": [2]}, durable=durable)
    assert target.read_text() == '{"a": [2], "b": 1}'
    assert json.loads(target.read_text()) == {"a": [2], "b": 1}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abc.json"]


def test_a_failed_write_removes_its_temporary_and_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "abc.json"
    target.write_text("old")
    with pytest.raises(TypeError):
        write_json_atomic(target, {"a": object()}, durable=False)
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(IsADirectoryError):
        write_json_atomic(tmp_path / "dir.json", {}, durable=False)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abc.json", "dir.json"]
