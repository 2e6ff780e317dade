"""How a verified cache blob enters the destination (`--link-mode`): a reflink where
the filesystem can clone (a real XFS, loop-mounted), a kernel copy elsewhere (ext4), a
hardlink only when asked."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

import surefetch as sf
from surefetch.linking import place
from surefetch.testing import FaultServer

from support import payload, run_cli

DATA = payload(200_000, seed=21)


@pytest.fixture(scope="module")
def xfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real XFS (reflink on by default) on a loop device; needs root, like CI."""
    base = tmp_path_factory.mktemp("xfs")
    image, mount = base / "xfs.img", base / "mnt"
    mount.mkdir()
    with open(image, "wb") as f:
        f.truncate(320 << 20)
    subprocess.run(["mkfs.xfs", "-q", "-f", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def _project(root: Path, url: str, executable: bool = False) -> tuple[Path, Path]:
    root.mkdir(parents=True, exist_ok=True)
    manifest = root / "surefetch.toml"
    entry: dict[str, object] = {"name": "tool", "url": url}
    if executable:
        entry["executable"] = True
    manifest.write_text(tomli_w.dumps({"artifact": [entry]}))
    return manifest, root / "surefetch.lock"


def _sync_cli(
    manifest: Path, lock: Path, dest: str, cache: str, link_mode: str, cwd: Path
) -> subprocess.CompletedProcess[str]:
    """`surefetch sync` of `manifest` into `dest` through `cache`, in `link_mode`."""
    options = ["--manifest", str(manifest), "--lock", str(lock), "--dest", dest]
    return run_cli(["sync", *options, "--cache", cache, "--link-mode", link_mode], cwd)


def _blob(cache: Path) -> Path:
    (blob,) = [p for p in (cache / "blobs").rglob("*") if p.is_file()]
    return blob


def test_place_reflinks_on_xfs_and_copies_on_ext4(xfs: Path, tmp_path: Path) -> None:
    for where, expected in ((xfs, "reflink"), (tmp_path, "copy")):
        blob = where / "blob"
        blob.write_bytes(DATA)
        assert place(blob, where / "auto", 0o644, "auto") == expected
        assert place(blob, where / "copy", 0o644, "copy") == "copy"
        for name in ("auto", "copy"):
            assert (where / name).read_bytes() == DATA
            assert os.stat(where / name).st_ino != os.stat(blob).st_ino
    with pytest.raises(OSError):
        place(tmp_path / "blob", tmp_path / "forced", 0o644, "reflink")
    assert not (tmp_path / "forced").exists()  # nothing half-made is left


def test_a_reflinked_install_is_independent_of_the_cache(server: FaultServer, xfs: Path) -> None:
    url = server.add("tool", DATA)
    manifest, lock = _project(xfs / "p1", url)
    sf.sync(manifest, lock, xfs / "p1" / "dest", cache=xfs / "p1" / "cache", link_mode="reflink")
    installed = xfs / "p1" / "dest" / "tool"
    assert installed.read_bytes() == DATA
    with open(installed, "r+b") as f:  # an in-place edit of the install...
        f.write(b"edited")
    assert _blob(xfs / "p1" / "cache").read_bytes() == DATA  # ...leaves the cache alone


def test_forced_reflink_where_it_cannot_be_fails_with_nothing_changed(
    server: FaultServer, tmp_path: Path
) -> None:
    manifest, lock = _project(tmp_path, server.add("tool", DATA))
    done = _sync_cli(manifest, lock, "dest", "cache", "reflink", tmp_path)
    assert done.returncode == 1, done.stderr
    assert "as a reflink: this filesystem cannot clone files; use --link-mode auto or copy" in (
        done.stderr
    )
    assert not lock.exists() and not (tmp_path / "dest" / "tool").exists()


@pytest.mark.parametrize("mode", ["hardlink", "reflink"])
def test_a_link_across_filesystems_says_which_mode_to_use(
    server: FaultServer, xfs: Path, tmp_path: Path, mode: str
) -> None:
    """The cache on one filesystem and the destination on another: neither a hardlink nor
    a reflink can be made, and the one line says so and names the link modes that work."""
    manifest, lock = _project(tmp_path / "p", server.add("tool", DATA))
    done = _sync_cli(manifest, lock, str(xfs / "x"), str(tmp_path / "cache"), mode, tmp_path)
    assert done.returncode == 1, done.stderr
    assert f"as a {mode}: the cache ({tmp_path / 'cache'}" in done.stderr
    assert "is on another filesystem; use --link-mode auto or copy" in done.stderr
    assert not lock.exists() and not (xfs / "x" / "tool").exists()


def test_hardlink_only_when_asked_and_never_for_an_executable(
    server: FaultServer, tmp_path: Path
) -> None:
    url = server.add("tool", DATA)
    manifest, lock = _project(tmp_path / "a", url)
    sf.sync(manifest, lock, tmp_path / "a" / "dest", cache=tmp_path / "cache", link_mode="hardlink")
    installed = tmp_path / "a" / "dest" / "tool"
    assert os.stat(installed).st_ino == os.stat(_blob(tmp_path / "cache")).st_ino
    manifest, lock = _project(tmp_path / "b", url, executable=True)
    sf.sync(manifest, lock, tmp_path / "b" / "dest", cache=tmp_path / "cache", link_mode="hardlink")
    tool = tmp_path / "b" / "dest" / "tool"
    assert os.stat(tool).st_ino != os.stat(_blob(tmp_path / "cache")).st_ino
    assert stat.S_IMODE(os.stat(tool).st_mode) & 0o111
    assert not stat.S_IMODE(os.stat(_blob(tmp_path / "cache")).st_mode) & 0o111
    # The default copies: a separate file.
    manifest, lock = _project(tmp_path / "c", url)
    sf.sync(manifest, lock, tmp_path / "c" / "dest", cache=tmp_path / "cache")
    copied = tmp_path / "c" / "dest" / "tool"
    assert os.stat(copied).st_ino != os.stat(_blob(tmp_path / "cache")).st_ino
    bad: Any = "symlink"
    with pytest.raises(ValueError, match="link_mode"):
        sf.sync(manifest, lock, tmp_path / "c" / "dest", cache=tmp_path / "cache", link_mode=bad)


def test_fetch_installs_at_output_by_link_mode(server: FaultServer, tmp_path: Path) -> None:
    url = server.add("tool.bin", DATA)
    base = ["fetch", url, "--cache", "cache"]
    into_dir = run_cli([*base, "-o", "out/"], tmp_path)
    assert into_dir.returncode == 0, into_dir.stderr
    assert into_dir.stdout.strip() == "out/tool.bin"
    assert (tmp_path / "out" / "tool.bin").read_bytes() == DATA
    linked = run_cli([*base, "-o", "linked.bin", "--link-mode", "hardlink"], tmp_path)
    assert linked.returncode == 0, linked.stderr
    assert os.stat(tmp_path / "linked.bin").st_ino == os.stat(_blob(tmp_path / "cache")).st_ino
    (tmp_path / "kept.bin").write_bytes(b"old")
    refused = run_cli([*base, "-o", "kept.bin", "--link-mode", "reflink"], tmp_path)
    assert refused.returncode == 1 and "reflink" in refused.stderr
    assert (tmp_path / "kept.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "kept.bin", "linked.bin", "out"]
