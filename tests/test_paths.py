"""Names and paths: `-o dir/`, names of any legal length, bare names from URLs and
servers (Content-Disposition), the reserved `.surefetch`, and internal directories
and files that are never followed through a symlink nor trusted when not ours."""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

import surefetch as sf
from surefetch import _core
from surefetch.download import name_from_url
from surefetch.errors import redact_url, redact_urls
from surefetch.lockfile import Lockfile, write_lockfile
from surefetch.testing import FaultServer

from support import leftovers, payload, run_cli

DATA = payload(20_000, seed=3)
# Over one block: bodies that fit one are never resumed (they start over).
RESUMABLE = payload((1 << 20) + 20_000, seed=4)
OTHER_UID = 4242

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


@pytest.fixture
def url(server: FaultServer) -> str:
    return server.add("data.bin", DATA)


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)
    yield tmp_path


def _names_under(directory: Path) -> list[bytes]:
    return [os.fsencode(p.name) for p in directory.rglob("*")]


# --- an output ending in / is a directory ---------------------------------------------


@pytest.mark.parametrize("dest", ["models/", "a/b/c/", "./new/"])
def test_a_dest_ending_in_a_slash_is_a_directory(url: str, in_tmp: Path, dest: str) -> None:
    old = os.umask(0o027)
    try:
        result = sf.download(url, dest)
    finally:
        os.umask(old)
    directory = in_tmp / dest
    assert directory.is_dir()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o750  # 0755 minus the umask
    assert result.path == Path(dest) / "data.bin"
    assert result.path.read_bytes() == DATA
    assert leftovers(in_tmp) == [str((directory / "data.bin").relative_to(in_tmp))]


def test_cli_output_ending_in_a_slash_is_a_directory(url: str, tmp_path: Path) -> None:
    done = run_cli(["get", url, "-o", "newdir/", "--json"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "newdir").is_dir()
    assert (tmp_path / "newdir" / "data.bin").read_bytes() == DATA
    assert json.loads(done.stdout)["path"] == "newdir/data.bin"
    # Again, into the directory that now exists.
    done = run_cli(["get", url + "?_again", "-o", "newdir/"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert leftovers(tmp_path) == ["newdir/data.bin"]


@pytest.mark.parametrize(
    ("args", "keywords"),
    [
        (["--sha256", "abc"], {"sha256": "abc"}),
        (["--xxh3", "zz"], {"xxh3_128": "zz"}),
        (["-c", "0"], {"connections": 0}),
    ],
)
def test_a_refused_download_creates_no_directory(
    url: str, tmp_path: Path, args: list[str], keywords: dict[str, object]
) -> None:
    """The directory a `dest` ending in / names is made only once the arguments are
    known good: a refused call leaves nothing behind."""
    with pytest.raises(ValueError):
        sf.download(url, f"{tmp_path}/new/sub/", **keywords)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        sf.download("ftp://example.org/a.bin", f"{tmp_path}/new/sub/")
    done = run_cli(["get", url, "-o", "new/sub/", *args], cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert not (tmp_path / "new").exists()


def test_an_existing_directory_without_slash_is_still_a_directory(url: str, tmp_path: Path) -> None:
    assert sf.download(url, tmp_path).path == tmp_path / "data.bin"


def test_a_file_where_the_directory_should_be(url: str, tmp_path: Path) -> None:
    (tmp_path / "taken").write_bytes(b"mine")
    with pytest.raises(sf.StorageError, match="not a directory") as info:
        sf.download(url, f"{tmp_path}/taken/")
    assert info.value.errno == errno.ENOTDIR
    assert (tmp_path / "taken").read_bytes() == b"mine"
    done = run_cli(["get", url, "-o", "taken/"], cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "drop the /" in done.stderr, done.stderr
    assert leftovers(tmp_path) == ["taken"]


def test_a_file_where_the_directory_of_a_batch_should_be(url: str, tmp_path: Path) -> None:
    (tmp_path / "taken").write_bytes(b"mine")
    items = [sf.DownloadItem(url, out="a.bin"), sf.DownloadItem(url + "?x=1", out="b.bin")]
    with pytest.raises(sf.StorageError, match="the files of a batch go into a directory"):
        sf.download_many(items, tmp_path / "taken")
    done = run_cli(["get", url, url + "?x=1", "-o", "taken"], cwd=tmp_path)
    assert done.returncode == 2  # a usage error, said before anything is fetched
    assert "-o taken is a file: with several URLs -o names a directory" in done.stderr
    assert "drop the /" not in done.stderr
    assert (tmp_path / "taken").read_bytes() == b"mine" and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("below", ["taken/out", "taken/sub/out"])
def test_a_file_where_a_parent_directory_should_be(url: str, tmp_path: Path, below: str) -> None:
    """The error names the file in the way and says it is not a directory (not the
    "File exists" that creating the directories reports)."""
    (tmp_path / "taken").write_bytes(b"mine")
    with pytest.raises(sf.StorageError, match=r"directory .*taken failed: Not a directory"):
        sf.download(url, tmp_path / below)
    done = run_cli(["get", url, "-o", below], cwd=tmp_path)
    assert done.returncode == 1
    assert "the directory taken failed: Not a directory" in done.stderr, done.stderr
    assert (tmp_path / "taken").read_bytes() == b"mine"
    assert leftovers(tmp_path) == ["taken"]


# --- any legal name works ---------------------------------------------------------------

LEGAL_NAMES = {
    "1 byte": "x",
    "200 bytes": "n" * 200,
    "241 bytes": "n" * 241,
    "250 bytes": "n" * 250,
    "255 bytes": "n" * 251 + ".bin",
    "250 bytes, 2 per character": "é" * 125,
    "255 bytes, 3 per character": "日" * 85,
    "254 bytes, 4 per character": "ab" + "😀" * 63,
}


@pytest.mark.parametrize("name", LEGAL_NAMES.values(), ids=LEGAL_NAMES.keys())
def test_any_legal_name_from_dest(server: FaultServer, tmp_path: Path, name: str) -> None:
    url = server.add("f", RESUMABLE)
    # Cut once with no retry: the part, its sidecar and the lock must all fit.
    with pytest.raises(sf.NetworkError):
        sf.download(url + "?cut=5000&times=1", tmp_path / name, retries=0)
    internal = _names_under(tmp_path / ".surefetch")
    assert len(internal) == 2, internal  # the part and its sidecar
    assert all(len(n) <= 255 for n in internal)
    result = sf.download(url + "?cut=5000&times=1", tmp_path / name)
    assert result.resumed_from == 4096  # what was kept, cut to a 4 KiB boundary
    assert (tmp_path / name).read_bytes() == RESUMABLE
    assert leftovers(tmp_path) == [name]


@pytest.mark.parametrize("name", LEGAL_NAMES.values(), ids=LEGAL_NAMES.keys())
def test_any_legal_name_from_the_url(server: FaultServer, tmp_path: Path, name: str) -> None:
    url = server.add(name, DATA)
    done = run_cli(["get", url, "-o", "out/", "--json"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / name).read_bytes() == DATA
    assert json.loads(done.stdout)["path"] == f"out/{name}"


def test_two_long_names_that_differ_at_the_end_do_not_share_a_part(
    server: FaultServer, tmp_path: Path
) -> None:
    a, b = "n" * 250 + "a", "n" * 250 + "b"
    url_a, url_b = server.add("a", RESUMABLE), server.add("b", RESUMABLE[::-1])
    for url, name in ((url_a, a), (url_b, b)):
        with pytest.raises(sf.NetworkError):
            sf.download(url + "?cut=5000&times=1", tmp_path / name, retries=0)
    assert len(_names_under(tmp_path / ".surefetch")) == 4
    assert sf.download(url_a + "?cut=5000&times=1", tmp_path / a).resumed_from == 4096
    assert sf.download(url_b + "?cut=5000&times=1", tmp_path / b).resumed_from == 4096
    assert (tmp_path / b).read_bytes() == RESUMABLE[::-1]


def test_a_long_lockfile_name(tmp_path: Path) -> None:
    lock = tmp_path / ("l" * 250)
    assert write_lockfile(lock, Lockfile(()))
    assert lock.read_text().startswith("#")
    assert leftovers(tmp_path) == [lock.name]


# --- names from URLs are bare -------------------------------------------------------------

URL_NAMES = [
    ("/dir/model.bin", "model.bin"),
    ("/dir/caf%C3%A9%20menu.txt", "café menu.txt"),
    ("/a%2F..%2F..%2Fetc%2Fpasswd", "passwd"),
    ("/a%5C..%5Cevil.exe", "evil.exe"),
    ("/%2E%2E", "index"),
    ("/..%2F", "index"),
    ("/", "index"),
    ("", "index"),
    ("/dir/", "index"),
    ("/-rf", "rf"),
    ("/--output", "output"),
    ("/line%0Abreak%00.txt", "linebreak.txt"),
    ("/esc%1B%7Fape", "escape"),
    ("/.hidden", ".hidden"),
]


@pytest.mark.parametrize(("path", "expected"), URL_NAMES)
def test_name_from_url(path: str, expected: str) -> None:
    assert name_from_url(f"http://h{path}?q=/x#/y") == expected


def test_a_name_from_a_url_is_cut_to_255_bytes() -> None:
    name = name_from_url("http://h/" + urllib.parse.quote("é" * 200))
    assert len(name.encode()) == 254
    assert len(name_from_url("http://h/" + "x" * 300).encode()) == 255


def test_bare_name_is_one_rule_for_python_and_rust() -> None:
    assert _core.bare_name("../../etc/passwd") == "passwd"
    assert _core.bare_name("..") == ""
    assert _core.bare_name("-\x01-") == ""


@pytest.mark.parametrize(
    ("path", "expected"),
    [(p, e) for p, e in URL_NAMES if p.startswith("/") and p not in ("/", "/dir/")],
)
def test_names_from_urls_stay_in_the_directory(
    server: FaultServer, tmp_path: Path, path: str, expected: str
) -> None:
    # echo_headers answers any path, so the URL's path is exactly what we send.
    dest = tmp_path / "out"
    result = sf.download(f"{server.url}{path}?echo_headers=1", f"{dest}/")
    assert result.path == dest / expected
    assert leftovers(tmp_path) == [f"out/{expected}"]


# --- .surefetch is ours ----------------------------------------------------------------------


def test_a_url_ending_in_surefetch(server: FaultServer, tmp_path: Path) -> None:
    url = server.add(".surefetch", DATA)
    with pytest.raises(sf.UnsafeDestination, match="choose another file name"):
        sf.download(url, tmp_path)
    done = run_cli(["get", url], cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "-o NAME" in done.stderr, done.stderr
    assert leftovers(tmp_path) == []
    # In a batch the name is an item's: the hint says how to give one.
    with pytest.raises(sf.UnsafeDestination, match=r"choose another file name \(out=NAME\)"):
        sf.download_many([sf.DownloadItem(url, out="x"), url], tmp_path)
    # With a name of the user's choice it works.
    assert run_cli(["get", url, "-o", "x"], cwd=tmp_path).returncode == 0
    assert (tmp_path / "x").read_bytes() == DATA


def test_dest_named_surefetch(url: str, tmp_path: Path) -> None:
    with pytest.raises(sf.UnsafeDestination):
        sf.download(url, tmp_path / ".surefetch")
    assert not (tmp_path / ".surefetch").exists()


def test_a_file_of_the_users_named_surefetch(url: str, tmp_path: Path) -> None:
    (tmp_path / ".surefetch").write_bytes(b"mine")
    with pytest.raises(sf.StorageError, match="not a directory") as info:
        sf.download(url, tmp_path / "f")
    message = str(info.value)
    assert "File exists" not in message and "move it away" in message, message
    done = run_cli(["get", url, "-o", "f"], cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "File exists" not in done.stderr
    assert (tmp_path / ".surefetch").read_bytes() == b"mine"
    assert leftovers(tmp_path) == [".surefetch"]


def test_a_directory_of_the_users_named_surefetch(url: str, tmp_path: Path) -> None:
    (tmp_path / ".surefetch").mkdir()
    (tmp_path / ".surefetch" / "notes").write_bytes(b"mine")
    sf.download(url, tmp_path / "f")
    assert leftovers(tmp_path) == [".surefetch/notes", "f"]


# --- internal directories and files are never followed ---------------------------------------


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    target = tmp_path / "elsewhere"
    target.mkdir()
    return target


def test_a_symlinked_part_dir_is_refused(url: str, tmp_path: Path, elsewhere: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / ".surefetch").symlink_to(elsewhere)
    with pytest.raises(sf.StorageError, match="symbolic link") as info:
        sf.download(url, dest / "f")
    assert str(dest / ".surefetch") in str(info.value)
    assert list(elsewhere.iterdir()) == []
    assert not (dest / "f").exists()
    done = run_cli(["get", url, "-o", str(dest / "f")])
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert list(elsewhere.iterdir()) == []


def test_a_symlinked_lock_is_never_followed(url: str, tmp_path: Path, elsewhere: Path) -> None:
    (tmp_path / ".surefetch").mkdir()
    (tmp_path / ".surefetch" / "f.lock").symlink_to(elsewhere / "victim")
    with pytest.raises(sf.StorageError, match="symbolic link"):
        sf.download(url, tmp_path / "f")
    assert not (elsewhere / "victim").exists()
    assert not (tmp_path / "f").exists()


def test_symlinked_sidecar_and_part_are_never_written_through(
    url: str, tmp_path: Path, elsewhere: Path
) -> None:
    parts = tmp_path / ".surefetch"
    parts.mkdir()
    for name in ("f.part", "f.part.json", "f.part.json.tmp"):
        (elsewhere / name).write_bytes(b"victim")
        (parts / name).symlink_to(elsewhere / name)
    result = sf.download(url + "?cut=5000&times=1", tmp_path / "f")
    assert result.path.read_bytes() == DATA
    for name in ("f.part", "f.part.json", "f.part.json.tmp"):
        assert (elsewhere / name).read_bytes() == b"victim"


@needs_root
def test_a_part_dir_of_another_user_is_refused(url: str, tmp_path: Path) -> None:
    (tmp_path / ".surefetch").mkdir()
    os.chown(tmp_path / ".surefetch", OTHER_UID, OTHER_UID)
    with pytest.raises(sf.StorageError, match=f"another user \\(uid {OTHER_UID}\\)"):
        sf.download(url, tmp_path / "f")
    assert list((tmp_path / ".surefetch").iterdir()) == []


def test_sync_refuses_a_symlinked_state_dir(
    server: FaultServer, tmp_path: Path, elsewhere: Path
) -> None:
    url = server.add("a.bin", DATA)
    (tmp_path / "surefetch.toml").write_text(f'[[artifact]]\nname = "a.bin"\nurl = "{url}"\n')
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / ".surefetch").symlink_to(elsewhere)
    with pytest.raises(sf.StorageError, match="symbolic link"):
        sf.sync(
            tmp_path / "surefetch.toml", tmp_path / "surefetch.lock", dest, cache=tmp_path / "c"
        )
    assert list(elsewhere.iterdir()) == []
    assert not (tmp_path / "surefetch.lock").exists()
    (dest / ".surefetch").unlink()
    (dest / ".surefetch").mkdir()
    (dest / ".surefetch" / "sync.lock").symlink_to(elsewhere / "victim")
    with pytest.raises(sf.StorageError, match="symbolic link"):
        sf.sync(
            tmp_path / "surefetch.toml", tmp_path / "surefetch.lock", dest, cache=tmp_path / "c"
        )
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("internal", ["tmp", "locks", "blobs"])
def test_a_symlinked_cache_directory_is_refused(
    url: str, tmp_path: Path, elsewhere: Path, internal: str
) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    (root / internal).symlink_to(elsewhere)
    with pytest.raises(sf.StorageError, match="symbolic link") as info:
        sf.Cache(root).fetch(url)
    assert str(root / internal) in str(info.value)
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("name", ["catalog.db", "catalog.db-wal", "catalog.db-shm"])
def test_a_symlinked_catalog_is_never_followed(
    url: str, tmp_path: Path, elsewhere: Path, name: str
) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    victim = elsewhere / "victim"
    victim.write_bytes(b"keep")
    (root / name).symlink_to(victim)
    first = sf.Cache(root).fetch_entry(url)
    again = sf.Cache(root).fetch_entry(url)  # without a catalog: downloaded again
    assert first.path.read_bytes() == DATA and again.bytes_transferred == len(DATA)
    assert victim.read_bytes() == b"keep" and list(elsewhere.iterdir()) == [victim]


@pytest.mark.parametrize("damage", ["garbage", "directory", "truncated-wal"])
def test_a_damaged_catalog_costs_only_downloads(url: str, tmp_path: Path, damage: str) -> None:
    """The catalog is best effort: damaged, the cache works without it (and a fetch by
    digest still comes from the cache)."""
    root = tmp_path / "cache"
    entry = sf.Cache(root).fetch_entry(url)
    catalog = root / "catalog.db"
    for name in ("catalog.db-wal", "catalog.db-shm"):
        (root / name).unlink(missing_ok=True)
    if damage == "garbage":
        catalog.write_bytes(os.urandom(8192))
    elif damage == "directory":
        catalog.unlink()
        catalog.mkdir()
    else:
        (root / "catalog.db-wal").write_bytes(b"\0" * 100)
    cache = sf.Cache(root)
    assert cache.fetch_entry(url, sha256=entry.sha256) == entry._replace(bytes_transferred=0)
    again = cache.fetch_entry(url)
    assert again.path.read_bytes() == DATA and again.sha256 == entry.sha256
    assert [b.sha256 for b in cache.ls()] == [entry.sha256]
    assert cache.verify().quarantined == []


def test_a_catalog_others_could_write_is_not_used(url: str, tmp_path: Path) -> None:
    cache = sf.Cache(tmp_path / "cache")
    entry = cache.fetch_entry(url)
    assert cache.fetch_entry(url).bytes_transferred == 0  # revalidated through the catalog
    os.chmod(cache.root / "catalog.db", 0o666)
    later = sf.Cache(cache.root)  # the catalog is checked when a process opens it
    assert later.fetch_entry(url).bytes_transferred == len(DATA)
    assert later.lookup(entry.sha256) == entry._replace(bytes_transferred=0)


def test_a_symlinked_cache_blob_level_is_refused(url: str, tmp_path: Path, elsewhere: Path) -> None:
    cache = sf.Cache(tmp_path / "cache")
    entry = cache.fetch_entry(url)
    level = entry.path.parent
    level.rename(elsewhere / "moved")
    level.symlink_to(elsewhere / "moved")
    with pytest.raises(sf.StorageError, match="symbolic link"):
        cache.lookup(entry.sha256)
    done = run_cli(["cache", "ls", "--cache", str(tmp_path / "cache")])
    assert done.returncode == 1 and "symbolic link" in done.stderr, done.stderr


def test_the_cache_root_may_be_a_symlink(url: str, tmp_path: Path, elsewhere: Path) -> None:
    (tmp_path / "link").symlink_to(elsewhere)
    path = sf.Cache(tmp_path / "link").fetch(url)
    assert path.read_bytes() == DATA
    assert (elsewhere / "blobs").is_dir()


@needs_root
@pytest.mark.parametrize("which", ["root", "tmp", "locks"])
def test_a_cache_directory_others_can_write_is_refused(
    url: str, tmp_path: Path, which: str
) -> None:
    root = tmp_path / "cache"
    directory = root if which == "root" else root / which
    directory.mkdir(parents=True)
    os.chown(directory, OTHER_UID, OTHER_UID)
    os.chmod(directory, 0o777)
    with pytest.raises(sf.StorageError, match=f"another user \\(uid {OTHER_UID}\\)") as info:
        sf.Cache(root).fetch(url)
    assert info.value.errno == errno.EPERM
    assert "chmod +t" in str(info.value)
    # The sticky bit (a shared cache, as surefetch.cache documents it) is trusted.
    os.chmod(directory, 0o1777)
    assert sf.Cache(root).fetch(url).read_bytes() == DATA
    # So is another user's directory that others cannot write.
    os.chmod(directory, 0o755)
    assert sf.Cache(root).fetch(url).read_bytes() == DATA


# --- Content-Disposition -----------------------------------------------------------------------


def _cd_url(server: FaultServer, filename: str) -> str:
    """A URL named "disposed" whose server sends ``Content-Disposition: attachment;
    filename="<filename>"``."""
    server.add("disposed", DATA)
    return server.url_for("disposed", filename=filename)


CD_CASES = [
    ("report.pdf", "report.pdf"),
    ("../../evil.sh", "evil.sh"),
    ("/etc/passwd", "passwd"),
    ("..\\\\..\\\\win.ini", "win.ini"),
    ("-rf", "rf"),
    ("..", "disposed"),
    ("", "disposed"),
    (".surefetch", "disposed"),
    # filename* (RFC 5987) wins over filename; the rest of the value is injected
    # through the fault server's filename="..."
    ("plain.txt\"; filename*=UTF-8''caf%C3%A9%20%E2%82%AC.txt; x=\"", "café €.txt"),
    ("plain.txt\"; filename*=ISO-8859-1''caf%E9.txt; x=\"", "café.txt"),
    ("plain.txt\"; filename*=KOI8-R''%C1.txt; x=\"", "plain.txt"),
    ("plain.txt\"; filename*=UTF-8''..%2F..%2Fup.txt; x=\"", "up.txt"),
    # raw UTF-8 in the quoted filename (sent as ISO-8859-1 characters)
    ("caf\u00c3\u00a9.txt", "café.txt"),
]


@pytest.mark.parametrize(("filename", "expected"), CD_CASES)
def test_content_disposition_names_the_file(
    server: FaultServer, tmp_path: Path, filename: str, expected: str
) -> None:
    dest = tmp_path / "dest"
    result = sf.download(_cd_url(server, filename), f"{dest}/", content_disposition=True)
    assert result.path == dest / expected
    assert result.path.read_bytes() == DATA
    assert leftovers(tmp_path) == [f"dest/{expected}"]


def test_cli_content_disposition(server: FaultServer, tmp_path: Path) -> None:
    url = _cd_url(server, "report.pdf")
    done = run_cli(["get", url, "--content-disposition", "--json"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["path"] == str(tmp_path / "report.pdf")
    assert (tmp_path / "report.pdf").read_bytes() == DATA
    # Into a directory, after a cut and a resume.
    done = run_cli(
        ["get", url + "&cut=5000&times=1", "--content-disposition", "-o", "d/"], cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "d" / "report.pdf").read_bytes() == DATA
    # Without the option, the URL names the file; with -o naming a file, -o does.
    assert run_cli(["get", url], cwd=tmp_path).returncode == 0
    done = run_cli(["get", url, "--content-disposition", "-o", "mine"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert leftovers(tmp_path) == ["d/report.pdf", "disposed", "mine", "report.pdf"]


def test_content_disposition_without_the_header(url: str, tmp_path: Path) -> None:
    result = sf.download(url, tmp_path, content_disposition=True)
    assert result.path == tmp_path / "data.bin"


# --- secrets -----------------------------------------------------------------------------------


def _with_password(url: str) -> str:
    return url.replace("http://", "http://user:sekret@", 1)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://user:pw@h/x", "http://user:***@h/x"),
        ("https://user:p%40ss@h:8443/x?q=1#f", "https://user:***@h:8443/x?q=1#f"),
        ("http://u:a@b@h/", "http://u:***@h/"),
        ("http://:pw@h/", "http://:***@h/"),
        ("http://user@h/x", "http://user@h/x"),
        ("http://h/x?next=a:b@c", "http://h/x?next=a:b@c"),
        ("not a url", "not a url"),
        # Credentials in the query, as presigned URLs and token links carry them.
        ("http://h/x?token=abc&a=1", "http://h/x?token=***&a=1"),
        (
            "https://b.s3/x?X-Amz-Signature=zz&X-Amz-Credential=cc#f",
            "https://b.s3/x?X-Amz-Signature=***&X-Amz-Credential=***#f",
        ),
        ("http://h/x?Api%5FKey=s", "http://h/x?Api%5FKey=***"),
        ("http://h/x?throttle=1&cut=2", "http://h/x?throttle=1&cut=2"),
        ("http://h/x?key=", "http://h/x?key="),
        ("http://u:p@h/x?sig=1", "http://u:***@h/x?sig=***"),
        # A URL as a query value has its own secrets, encoded or not.
        ("http://h/x?to=http://v:pw@h2/n&a=1", "http://h/x?to=http://v:***@h2/n&a=1"),
        ("http://h/x?to=http%3A%2F%2Fv%3Apw%40h2%2Fn", "http://h/x?to=http://v:***@h2/n"),
        ("http://h/x?to=http%3A%2F%2Fh2%2Fn", "http://h/x?to=http%3A%2F%2Fh2%2Fn"),
        ("http://h/x?to=http://h2/n?token=t", "http://h/x?to=http://h2/n?token=***"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected
    assert redact_urls(f"got ({url}): x") == f"got ({expected}): x"


def test_the_engine_and_python_hide_the_same_query_parameters() -> None:
    from surefetch import _core
    from surefetch.errors import CREDENTIAL_PARAMETERS

    assert set(_core.CREDENTIAL_PARAMETERS) == CREDENTIAL_PARAMETERS


def test_query_credentials_are_never_shown_nor_stored(server: FaultServer, tmp_path: Path) -> None:
    url = server.add("t.bin", b"x" * 1000) + "?token=sekret"
    missing = server.url_for("missing") + "?X-Amz-Signature=sekret"
    done = run_cli(["get", missing, "--retries", "0"], cwd=tmp_path)
    assert done.returncode == 4 and "X-Amz-Signature=***" in done.stderr, done.stderr
    assert "sekret" not in done.stderr + done.stdout
    fetched = run_cli(["fetch", url, "--cache", "cache", "-v"], cwd=tmp_path)
    assert fetched.returncode == 0, fetched.stderr
    listed = run_cli(["cache", "ls", "--cache", "cache"], cwd=tmp_path)
    assert "token=***" in listed.stdout and "sekret" not in fetched.stderr + listed.stdout
    assert b"sekret" not in (tmp_path / "cache" / "catalog.db").read_bytes()


def test_cli_errors_never_show_the_password(server: FaultServer, tmp_path: Path) -> None:
    missing = _with_password(server.url_for("missing"))
    refused = "http://user:sekret@127.0.0.1:9/x"
    for url in (missing, refused):
        done = run_cli(["get", url, "--retries", "0", "--json"], cwd=tmp_path)
        assert done.returncode == 4, done.stderr
        assert done.stderr.count("\n") == 1, done.stderr
        assert "sekret" not in done.stderr + done.stdout, done.stderr
    assert "user:***@" in done.stderr or "127.0.0.1:9" not in done.stderr, done.stderr


def test_the_sidecar_and_lock_are_private(server: FaultServer, tmp_path: Path) -> None:
    url = _with_password(server.add("f", DATA))
    lock = tmp_path / ".surefetch" / "g.lock"
    modes: list[int] = []

    def watch() -> None:
        deadline = time.monotonic() + 10
        while not modes and time.monotonic() < deadline:
            try:
                modes.append(stat.S_IMODE(lock.stat().st_mode))
            except FileNotFoundError:
                time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    sf.download(url + "?throttle=40000", tmp_path / "g")  # half a second
    watcher.join()
    assert modes == [0o600]
    resumable = _with_password(server.add("r", RESUMABLE))
    with pytest.raises(sf.NetworkError):
        sf.download(resumable + "?cut=5000", tmp_path / "f", retries=0)
    sidecar = tmp_path / ".surefetch" / "f.part.json"
    assert stat.S_IMODE(sidecar.stat().st_mode) == 0o600


def test_the_cache_keeps_no_password(server: FaultServer, tmp_path: Path) -> None:
    url = _with_password(server.add("f", DATA))
    cache = sf.Cache(tmp_path / "cache")
    cache.fetch(url)
    for path in (tmp_path / "cache").rglob("*"):
        if path.is_file() and path.stat().st_size < 65536:
            assert b"sekret" not in path.read_bytes(), path
    done = run_cli(["cache", "ls", "--cache", str(tmp_path / "cache")])
    assert "sekret" not in done.stdout and "user:***@" in done.stdout, done.stdout


def test_a_lockfile_with_a_password_is_private(server: FaultServer, tmp_path: Path) -> None:
    url = _with_password(server.add("a.bin", DATA))
    manifest = tmp_path / "surefetch.toml"
    lock = tmp_path / "surefetch.lock"
    manifest.write_text(f'[[artifact]]\nname = "a.bin"\nurl = "{url}"\n')
    sf.sync(manifest, lock, tmp_path / "dest", cache=tmp_path / "c")
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600
    # A mismatch names the artifact and the URL, not the password.
    manifest.write_text(f'[[artifact]]\nname = "b.bin"\nurl = "{url}?_b"\nsha256 = "{"0" * 64}"\n')
    with pytest.raises(sf.ChecksumMismatch) as info:
        sf.sync(manifest, lock, tmp_path / "dest", cache=tmp_path / "c")
    assert "sekret" not in str(info.value) and "user:***@" in str(info.value)


def test_a_lockfile_keeps_its_mode(server: FaultServer, tmp_path: Path) -> None:
    manifest = tmp_path / "surefetch.toml"
    lock = tmp_path / "surefetch.lock"
    manifest.write_text(f'[[artifact]]\nname = "a.bin"\nurl = "{server.add("a.bin", DATA)}"\n')
    sf.sync(manifest, lock, tmp_path / "dest", cache=tmp_path / "c")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(lock.stat().st_mode) == 0o644 & ~umask
    lock.chmod(0o640)
    manifest.write_text(
        manifest.read_text() + f'[[artifact]]\nname = "b.bin"\nurl = "{server.add("b", DATA)}"\n'
    )
    sf.sync(manifest, lock, tmp_path / "dest", cache=tmp_path / "c")
    assert "b.bin" in lock.read_text()
    assert stat.S_IMODE(lock.stat().st_mode) == 0o640


def test_sessions_are_shown_without_the_password(tmp_path: Path) -> None:
    from surefetch.sessions import SessionStore

    db = f"sqlite:///{tmp_path}/s.db"
    store = SessionStore(db)
    url = "http://user:sekret@h/x"
    session = store.create("alice", f"get {url}", {"job": "get", "url": url})
    store.close()
    show = ["show", session.id]
    for args in (["list"], ["list", "--json"], show, [*show, "--json"]):
        done = run_cli(["sessions", *args, "--db", db, "--user", "alice"])
        assert done.returncode == 0, done.stderr
        assert "sekret" not in done.stdout and "user:***@h/x" in done.stdout, done.stdout
