"""Manifest and lockfile formats: reading, validation, canonical writing (no network)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from surefetch.errors import LockfileError, ManifestError, StorageError
from surefetch.lockfile import (
    LockedArtifact,
    Lockfile,
    ManifestArtifact,
    read_lockfile,
    read_manifest,
    render_lockfile,
    write_lockfile,
)

SHA = "ab" * 32
XXH = "cd" * 16


def _manifest(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "surefetch.toml"
    path.write_text(text)
    return path


def _entry(name: str, **extra: object) -> LockedArtifact:
    fields: dict[str, object] = {
        "url": f"https://example.org/{name}",
        "size": 3,
        "sha256": SHA,
        "xxh3_128": XXH,
    }
    fields.update(extra)
    return LockedArtifact(name=name, **fields)  # type: ignore[arg-type]


def test_manifest_is_read_and_normalised(tmp_path: Path) -> None:
    path = _manifest(
        tmp_path,
        f"""
[[artifact]]
name = "tool"
url = "https://example.org/tool"
sha256 = "{SHA.upper()}"
size = 12
path = "./bin//tool"
executable = true

[[artifact]]
name = "data.bin"
url = "http://example.org/data.bin"
""",
    )
    manifest = read_manifest(path)
    assert manifest.artifacts == (
        ManifestArtifact("tool", "https://example.org/tool", SHA, 12, "bin/tool", True),
        ManifestArtifact("data.bin", "http://example.org/data.bin"),
    )
    assert [a.target for a in manifest.artifacts] == ["bin/tool", "data.bin"]


def test_an_empty_manifest_has_no_artifacts(tmp_path: Path) -> None:
    assert read_manifest(_manifest(tmp_path, "")).artifacts == ()


@pytest.mark.parametrize(
    "body, words",
    [
        ('name = "a"\nurl = "https://e/a"\npath = "/etc/passwd"', "is absolute"),
        ('name = "a"\nurl = "https://e/a"\npath = "x/../../a"', "'..'"),
        ('name = "a"\nurl = "https://e/a"\npath = ".."', "'..'"),
        ('name = "a"\nurl = "https://e/a"\npath = "."', "names no file"),
        ('name = "a"\nurl = "https://e/a"\npath = "a\\\\b"', "backslash"),
        ('name = "a"\nurl = "https://e/a"\npath = ".surefetch/x"', "reserves"),
        ('name = "../a"\nurl = "https://e/a"', "set 'path'"),
        ('name = "a"\nurl = "file:///etc/passwd"', "http or https"),
        ('name = "a"\nurl = "https://e/a"\nsha256 = "xyz"', "64 hex digits"),
        ('name = "a"\nurl = "https://e/a"\nsize = -1', "'size'"),
        ('name = "a"\nurl = "https://e/a"\nsize = true', "'size'"),
        ('name = "a"\nurl = "https://e/a"\nexecutable = "yes"', "true or false"),
        ('name = "a"\nurl = "https://e/a"\nsha265 = "00"', "unknown key 'sha265'"),
        ('url = "https://e/a"', "'name'"),
        ('name = "a"', "'url'"),
    ],
)
def test_invalid_or_unsafe_manifest_entries_name_file_and_artifact(
    tmp_path: Path, body: str, words: str
) -> None:
    path = _manifest(tmp_path, f"[[artifact]]\n{body}\n")
    with pytest.raises(ManifestError) as caught:
        read_manifest(path)
    message = str(caught.value)
    assert words in message
    assert str(path) in message
    assert "artifact" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "text, words",
    [
        ("[[artifact]\n", "invalid TOML"),
        ("artifact = 3\n", "array of tables"),
        ("title = 'x'\n", "unknown top-level key 'title'"),
        (
            '[[artifact]]\nname = "a"\nurl = "https://e/a"\n'
            '[[artifact]]\nname = "a"\nurl = "https://e/b"\n',
            "appears twice",
        ),
        (
            '[[artifact]]\nname = "a"\nurl = "https://e/a"\npath = "x"\n'
            '[[artifact]]\nname = "b"\nurl = "https://e/b"\npath = "./x"\n',
            "both installed at 'x'",
        ),
        (
            '[[artifact]]\nname = "a"\nurl = "https://e/a"\npath = "x"\n'
            '[[artifact]]\nname = "b"\nurl = "https://e/b"\npath = "x/y"\n',
            "lies under",
        ),
    ],
)
def test_invalid_manifests(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(ManifestError, match=words):
        read_manifest(_manifest(tmp_path, text))


def test_a_missing_manifest_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"no manifest at .*pass --manifest"):
        read_manifest(tmp_path / "nope.toml")


def test_lockfile_text_is_canonical_and_round_trips(tmp_path: Path) -> None:
    lock = Lockfile(
        (
            _entry("zeta", path="bin/zeta", executable=True),
            _entry("alpha"),
            _entry("mid", executable=False, path=None),
        )
    )
    text = render_lockfile(lock)
    assert text == render_lockfile(Lockfile(tuple(reversed(lock.artifacts))))
    assert text.splitlines()[1:4] == ["version = 1", "", "[[artifact]]"]
    assert [line for line in text.splitlines() if line.startswith("name")] == [
        'name = "alpha"',
        'name = "mid"',
        'name = "zeta"',
    ]
    zeta = text[text.index('name = "zeta"') :].splitlines()
    assert [line.split(" =")[0] for line in zeta] == [
        "name",
        "url",
        "size",
        "sha256",
        "xxh3_128",
        "executable",
        "path",
    ]
    assert "executable = false" not in text
    path = tmp_path / "surefetch.lock"
    assert write_lockfile(path, lock)
    assert read_lockfile(path).artifacts == tuple(sorted(lock.artifacts, key=lambda a: a.name))


def test_an_identical_lockfile_is_not_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "surefetch.lock"
    lock = Lockfile((_entry("a"),))
    assert write_lockfile(path, lock)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    inode = path.stat().st_ino
    assert not write_lockfile(path, lock)
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == (1_000_000_000, inode)
    assert write_lockfile(path, Lockfile((_entry("a", size=4),)))
    assert path.stat().st_ino != inode  # a new file renamed over the old one
    assert sorted(os.listdir(tmp_path)) == ["surefetch.lock"]


def test_lockfile_mode_follows_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        write_lockfile(tmp_path / "l", Lockfile(()))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "l").stat().st_mode) == 0o640


def test_a_failed_write_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "surefetch.lock"
    path.mkdir()  # the rename over a directory fails (EISDIR), as a full disk would
    (path / "keep").write_text("x")
    with pytest.raises(StorageError, match="cannot write the lockfile"):
        write_lockfile(path, Lockfile((_entry("b"),)))
    assert sorted(os.listdir(tmp_path)) == ["surefetch.lock"]
    assert os.listdir(path) == ["keep"]


@pytest.mark.parametrize(
    "text, words",
    [
        ("version = 2\n", "unsupported lockfile version 2"),
        ("", "unsupported lockfile version None"),
        ("version = 1\n[[artifact]]\nname = 'a'\nurl = 'https://e/a'\n", "'sha256' must be"),
        (
            f"version = 1\n[[artifact]]\nname = 'a'\nurl = 'https://e/a'\nsize = 1\n"
            f"sha256 = '{SHA}'\nxxh3_128 = 'zz'\n",
            "32 hex digits",
        ),
        (
            f"version = 1\n[[artifact]]\nname = 'a'\nurl = 'https://e/a'\nsize = 1\n"
            f"sha256 = '{SHA}'\nxxh3_128 = '{XXH}'\npath = '../x'\n",
            "'..'",
        ),
        ("version = 1\n[[artifact]\n", "invalid TOML"),
    ],
)
def test_invalid_lockfiles(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "surefetch.lock"
    path.write_text(text)
    with pytest.raises(LockfileError, match=words):
        read_lockfile(path)


def test_a_missing_lockfile_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_lockfile(tmp_path / "surefetch.lock")
