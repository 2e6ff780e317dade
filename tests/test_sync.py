"""`surefetch.sync` and `verify` in-process, over real HTTP: pins, merge, the transaction."""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomli_w
import xxhash

import surefetch as sf
from surefetch.errors import (
    Cancelled,
    ChecksumMismatch,
    DownloadTimeout,
    HTTPError,
    LockfileOutdated,
    ManifestError,
    SizeMismatch,
)
from surefetch.lockfile import read_lockfile, verify
from surefetch.testing import FaultServer

from support import leftovers, payload


@dataclass
class Project:
    """A manifest, a lockfile, a destination and a private cache, all under tmp_path."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "surefetch.toml"

    @property
    def lock(self) -> Path:
        return self.root / "surefetch.lock"

    @property
    def dest(self) -> Path:
        return self.root / "dest"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def write(self, *entries: Mapping[str, object]) -> None:
        self.manifest.write_text(tomli_w.dumps({"artifact": list(entries)}))

    def sync(self, **options: object) -> sf.lockfile.SyncResult:
        return sf.sync(self.manifest, self.lock, self.dest, cache=self.cache, **options)  # type: ignore[arg-type]

    def lock_entries(self) -> dict[str, sf.lockfile.LockedArtifact]:
        return read_lockfile(self.lock).by_name()


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return Project(tmp_path)


A, B, C = payload(5000, 1), payload(7000, 2), payload(300, 3)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_sync_installs_and_pins_every_artifact(server: FaultServer, project: Project) -> None:
    project.write(
        {"name": "a", "url": server.add("a", A)},
        {"name": "tool", "url": server.add("b", B), "path": "bin/tool", "executable": True},
        {"name": "c", "url": server.add("c", C), "sha256": _sha(C), "size": len(C)},
    )
    result = project.sync()
    assert (result.installed, result.unchanged, result.removed) == (("a", "c", "tool"), (), ())
    assert result.lockfile_changed
    assert result.bytes_transferred == len(A) + len(B) + len(C)
    assert (project.dest / "a").read_bytes() == A
    assert (project.dest / "bin" / "tool").read_bytes() == B
    assert (project.dest / "c").read_bytes() == C
    assert os.access(project.dest / "bin" / "tool", os.X_OK)
    assert not os.access(project.dest / "a", os.X_OK)
    entries = project.lock_entries()
    for name, data in (("a", A), ("tool", B), ("c", C)):
        assert entries[name].size == len(data)
        assert entries[name].sha256 == _sha(data)
        assert entries[name].xxh3_128 == xxhash.xxh3_128_hexdigest(data)
    assert (entries["tool"].executable, entries["tool"].path) == (True, "bin/tool")
    assert leftovers(project.dest) == ["a", "bin/tool", "c"]  # no .surefetch/ left behind
    assert verify(project.lock, project.dest) == []


def test_a_second_sync_transfers_nothing_and_keeps_the_lockfile(
    server: FaultServer, project: Project
) -> None:
    project.write(*({"name": n, "url": server.add(n, d)} for n, d in (("a", A), ("b", B))))
    project.sync()
    os.utime(project.lock, ns=(1_000_000_000, 1_000_000_000))
    before = project.lock.read_bytes()
    sent, requests = server.bytes_sent, len(server.requests)
    result = project.sync()
    assert (result.installed, result.unchanged) == ((), ("a", "b"))
    assert (result.bytes_transferred, result.lockfile_changed) == (0, False)
    assert (server.bytes_sent, len(server.requests)) == (sent, requests)
    assert project.lock.read_bytes() == before
    assert project.lock.stat().st_mtime_ns == 1_000_000_000


def test_a_damaged_installed_file_is_restored_from_the_cache(
    server: FaultServer, project: Project
) -> None:
    project.write(
        {"name": "a", "url": server.add("a", A)}, {"name": "b", "url": server.add("b", B)}
    )
    project.sync()
    (project.dest / "a").write_bytes(b"x" * len(A))
    (project.dest / "b").unlink()
    sent = server.bytes_sent
    result = project.sync()
    assert (result.installed, result.bytes_transferred) == (("a", "b"), 0)
    assert server.bytes_sent == sent
    assert (project.dest / "a").read_bytes() == A
    assert (project.dest / "b").read_bytes() == B


@pytest.mark.parametrize(
    ("pinned", "link_mode"), [(True, "auto"), (False, "auto"), (True, "hardlink")]
)
def test_a_blob_damaged_behind_the_caches_back_is_fetched_again(
    server: FaultServer, project: Project, pinned: bool, link_mode: str
) -> None:
    """What landed does not match (a copy, or a hardlink, which is the damaged blob
    itself): the blob is hashed again, goes to quarantine, and the artifact is fetched
    again within the same sync (not "changed while it was copied", not installed)."""
    entry: dict[str, object] = {"name": "a", "url": server.add("a", A)}
    if pinned:
        entry["sha256"] = _sha(A)
    project.write(entry)
    project.sync()
    blob = project.cache / "blobs" / "sha256" / _sha(A)[:2] / _sha(A)
    blob.write_bytes(bytes(len(A)))  # same size: only re-hashing can tell
    (project.dest / "a").unlink()
    result = project.sync(link_mode=link_mode)
    assert result.installed == ("a",) and result.bytes_transferred == len(A)
    assert (project.dest / "a").read_bytes() == A and blob.read_bytes() == A
    assert [p.read_bytes() for p in (project.cache / "quarantine").iterdir()] == [bytes(len(A))]


def test_a_blob_a_gc_evicts_before_it_is_staged_is_fetched_again(
    server: FaultServer, project: Project
) -> None:
    """A cached artifact needs no lock to be found, so `cache gc` in another process may
    evict it while the rest of the sync downloads: it is fetched again, in the same call,
    instead of failing with "cannot stage"."""
    a = {"name": "a", "url": server.add("a", A), "sha256": _sha(A)}
    project.write(a)
    project.sync()  # a is cached
    slow = {"name": "b", "url": server.add("b", B) + "?throttle=7000"}  # about a second
    project.write(a, slow)
    (project.dest / "a").unlink()
    server.reset_counters()

    def gc_meanwhile() -> None:
        time.sleep(0.4)  # while b downloads: its blob is locked, a's is not
        report = sf.Cache(project.cache).gc(max_size=0)
        assert [p.name for p in report.evicted] == [_sha(A)]

    evicting = threading.Thread(target=gc_meanwhile)
    evicting.start()
    result = project.sync()
    evicting.join()
    assert (project.dest / "a").read_bytes() == A and (project.dest / "b").read_bytes() == B
    assert result.bytes_transferred == len(A) + len(B)  # a once more


@pytest.mark.parametrize(
    ("case", "judged"),
    [
        ("blob evicted, fetched back since by another process", "evicted"),
        ("blob evicted, still gone", "evicted"),
        ("staging directory gone", "cannot stage"),
        ("copy landed different bytes", "changed while it was copied"),
    ],
)
def test_how_a_placing_is_judged(tmp_path: Path, case: str, judged: str) -> None:
    """What the engine reports for one placing (`place_many`) decides what the sync
    does: a blob missing when it was placed was evicted (fetch it again), even if
    another process's fetch has brought it back by the time a batch gets to it; any
    other failure is the destination's; different bytes are a changed copy."""
    from surefetch.linking import place_many
    from surefetch.lockfile import LockedArtifact
    from surefetch.resolve import _check_placed, _Evicted

    blob, staging = tmp_path / "blob", tmp_path / "staging"
    staging.mkdir()
    if case != "blob evicted, still gone" and not case.startswith("blob evicted, fetched"):
        blob.write_bytes(A)
    if case == "staging directory gone":
        staging.rmdir()
    attempt = place_many([(blob, staging / "0", 0o644)], "auto", verify=True)[0]
    if case.startswith("blob evicted, fetched back"):
        blob.write_bytes(A)
    expected = B if case == "copy landed different bytes" else A
    xxh3 = xxhash.xxh3_128_hexdigest(expected)
    entry = LockedArtifact("a", "http://h/a", len(expected), _sha(expected), xxh3)
    if judged == "evicted":
        with pytest.raises(_Evicted):
            _check_placed(attempt, blob, staging / "0", entry, "auto")
    else:
        with pytest.raises(sf.SurefetchError, match=judged):
            _check_placed(attempt, blob, staging / "0", entry, "auto")


def test_a_fresh_download_mends_a_damaged_blob(server: FaultServer, project: Project) -> None:
    url = server.add("a", A) + "?no_validators=1"
    cache = sf.Cache(project.cache)
    blob = cache.fetch_entry(url).path
    blob.write_bytes(bytes(len(A)))
    again = cache.fetch_entry(url)  # nothing to revalidate with: a full 200
    assert again.path == blob and blob.read_bytes() == A


def test_offline_sync_installs_from_the_cache_or_fails(
    server: FaultServer, project: Project
) -> None:
    project.write({"name": "a", "url": server.add("a", A)})
    project.sync()
    server.reset_counters()
    other = Project(project.root / "other")
    other.root.mkdir()
    other.manifest.write_text(project.manifest.read_text())
    offline = sf.Cache(project.cache, offline=True)
    sf.sync(other.manifest, other.lock, other.dest, cache=offline)
    assert (other.dest / "a").read_bytes() == A and server.requests == []
    other.write({"name": "a", "url": server.add("new", B)})
    with pytest.raises(sf.NetworkError, match="never fetched"):
        sf.sync(other.manifest, other.lock, other.dest, cache=offline)
    assert server.requests == [] and (other.dest / "a").read_bytes() == A


def test_merge_keeps_unchanged_entries_drops_removed_and_resolves_new(
    server: FaultServer, project: Project
) -> None:
    url_a, url_b, url_c = server.add("a", A), server.add("b", B), server.add("c", C)
    project.write({"name": "a", "url": url_a}, {"name": "b", "url": url_b})
    project.sync()
    old = project.lock.read_text()
    block_a = old[old.index('name = "a"') : old.index("[[artifact]]", old.index('name = "a"'))]
    server.replace("a", payload(5000, 9))  # changed upstream: the pin keeps the old bytes
    project.write({"name": "a", "url": url_a}, {"name": "c", "url": url_c})
    result = project.sync()
    assert (result.installed, result.unchanged, result.removed) == (("c",), ("a",), ("b",))
    new = project.lock.read_text()
    assert block_a in new
    assert 'name = "b"' not in new
    assert set(project.lock_entries()) == {"a", "c"}
    assert (project.dest / "a").read_bytes() == A
    assert (project.dest / "b").read_bytes() == B  # sync never deletes files
    assert project.lock_entries()["c"].sha256 == _sha(C)


def test_a_changed_url_or_manifest_digest_is_re_resolved(
    server: FaultServer, project: Project
) -> None:
    server.add("a", A)
    server.add("a2", C)
    project.write({"name": "a", "url": server.url_for("a")})
    project.sync()
    project.write({"name": "a", "url": server.url_for("a2")})
    assert project.sync().installed == ("a",)
    assert project.lock_entries()["a"].sha256 == _sha(C)
    assert (project.dest / "a").read_bytes() == C
    project.write({"name": "a", "url": server.url_for("a2"), "sha256": _sha(C), "size": len(C)})
    assert project.sync().unchanged == ("a",)  # the manifest agrees with the pin: kept


def test_a_pin_mismatch_fails_and_changes_nothing_until_upgrade(
    server: FaultServer, project: Project, tmp_path: Path
) -> None:
    project.write(
        {"name": "a", "url": server.add("a", A)}, {"name": "b", "url": server.add("b", B)}
    )
    project.sync()
    lock_before = project.lock.read_bytes()
    new_a = payload(len(A), 7)
    server.replace("a", new_a)
    (project.dest / "a").unlink()
    fresh = tmp_path / "fresh-cache"  # the old cache still holds the pinned bytes
    with pytest.raises(ChecksumMismatch) as caught:
        sf.sync(project.manifest, project.lock, project.dest, cache=fresh)
    message = str(caught.value)
    assert "a: sha256 mismatch" in message
    assert _sha(A) in message and _sha(new_a) in message
    assert "--upgrade" in message
    assert (caught.value.expected, caught.value.actual) == (_sha(A), _sha(new_a))
    assert project.lock.read_bytes() == lock_before
    assert leftovers(project.dest) == ["b"]
    result = sf.sync(project.manifest, project.lock, project.dest, cache=fresh, upgrade=True)
    assert result.installed == ("a",)
    assert project.lock_entries()["a"].sha256 == _sha(new_a)
    assert (project.dest / "a").read_bytes() == new_a


def test_the_manifest_digest_and_size_are_enforced(server: FaultServer, project: Project) -> None:
    url = server.add("a", A)
    project.write({"name": "a", "url": url, "sha256": _sha(B)})
    with pytest.raises(ChecksumMismatch, match="given in the manifest"):
        project.sync()
    project.write({"name": "a", "url": url, "size": len(A) + 1})
    with pytest.raises(SizeMismatch, match="a: size mismatch"):
        project.sync()
    assert not project.lock.exists()
    assert leftovers(project.dest) == []


def test_locked_fails_before_any_download_when_the_lockfile_would_change(
    server: FaultServer, project: Project
) -> None:
    project.write({"name": "a", "url": server.add("a", A)})
    with pytest.raises(LockfileOutdated, match="no lockfile"):
        project.sync(locked=True)
    project.sync()
    assert project.sync(locked=True).unchanged == ("a",)
    before, requests = project.lock.read_bytes(), len(server.requests)
    project.write(
        {"name": "a", "url": server.url_for("a")}, {"name": "b", "url": server.add("b", B)}
    )
    with pytest.raises(LockfileOutdated, match=r"b \(new or changed\).*--locked"):
        project.sync(locked=True)
    project.write()
    with pytest.raises(LockfileOutdated, match=r"a \(removed\)"):
        project.sync(locked=True)
    assert project.lock.read_bytes() == before
    assert len(server.requests) == requests
    assert not (project.dest / "b").exists()


def test_frozen_installs_the_lockfile_and_never_reads_the_manifest(
    server: FaultServer, project: Project
) -> None:
    with pytest.raises(LockfileOutdated, match="--frozen"):
        project.sync(frozen=True)
    project.write({"name": "a", "url": server.add("a", A), "path": "x/a"})
    project.sync()
    before = project.lock.read_bytes()
    (project.dest / "x" / "a").unlink()
    (project.dest / "stray").write_text("not mine")
    project.manifest.write_text("this is [not toml")
    result = project.sync(frozen=True)
    assert (result.installed, result.removed, result.lockfile_changed) == (("a",), (), False)
    assert (project.dest / "x" / "a").read_bytes() == A
    assert (project.dest / "stray").read_text() == "not mine"
    assert project.lock.read_bytes() == before


def test_executable_files_follow_the_umask(server: FaultServer, project: Project) -> None:
    project.write(
        {"name": "tool", "url": server.add("t", A), "executable": True},
        {"name": "data", "url": server.add("d", B)},
    )
    old = os.umask(0o027)
    try:
        project.sync()
    finally:
        os.umask(old)
    assert stat.S_IMODE((project.dest / "tool").stat().st_mode) == 0o750
    assert stat.S_IMODE((project.dest / "data").stat().st_mode) == 0o640


def test_the_first_failure_cancels_the_others_at_once(
    server: FaultServer, project: Project
) -> None:
    slow = [
        {"name": f"slow{i}", "url": server.add(f"s{i}", payload(1 << 20, i)) + "?throttle=100000"}
        for i in range(7)
    ]
    project.write(*slow, {"name": "broken", "url": server.url_for("gone")})
    started = time.monotonic()
    with pytest.raises(HTTPError, match=r"broken: .*404"):
        project.sync(jobs=8)
    assert time.monotonic() - started < 3.0  # the throttled ones would need 10 s each
    assert not project.lock.exists()
    assert leftovers(project.dest) == []


def test_a_per_item_timeout_fails_cleanly(server: FaultServer, project: Project) -> None:
    project.write(
        {"name": "a", "url": server.add("a", A)},
        {"name": "slow", "url": server.add("s", payload(1 << 20)) + "?throttle=200000"},
    )
    with pytest.raises(DownloadTimeout, match="slow: "):
        project.sync(timeout_per_item=0.3)
    assert not project.lock.exists()
    assert leftovers(project.dest) == []
    with pytest.raises(DownloadTimeout, match="timeout-per-item"):
        project.sync(timeout_per_item=1e-9)
    assert not project.lock.exists()


def test_cancelling_the_token_stops_the_sync(server: FaultServer, project: Project) -> None:
    project.write({"name": "slow", "url": server.add("s", payload(1 << 20)) + "?throttle=100000"})
    token = sf.CancelToken()
    timer = threading.Timer(0.3, token.cancel)
    timer.start()
    started = time.monotonic()
    with pytest.raises(Cancelled):
        project.sync(cancel=token)
    assert time.monotonic() - started < 2.0
    timer.join()
    assert not project.lock.exists()
    assert leftovers(project.dest) == []


def test_a_symlink_leading_out_of_dest_is_refused(
    server: FaultServer, project: Project, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    project.dest.mkdir()
    (project.dest / "link").symlink_to(outside)
    project.write({"name": "a", "url": server.add("a", A), "path": "link/a"})
    with pytest.raises(ManifestError, match="leads outside the destination"):
        project.sync()
    assert os.listdir(outside) == []
    assert not project.lock.exists()
    assert server.requests == []


def test_a_symlink_inside_dest_is_fine_and_a_symlinked_target_is_replaced(
    server: FaultServer, project: Project, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("keep")
    (project.dest / "real").mkdir(parents=True)
    (project.dest / "alias").symlink_to("real")
    (project.dest / "real" / "b").symlink_to(secret)
    project.write(
        {"name": "a", "url": server.add("a", A), "path": "alias/a"},
        {"name": "b", "url": server.add("b", B), "path": "real/b"},
    )
    project.sync()
    assert (project.dest / "real" / "a").read_bytes() == A
    assert not (project.dest / "real" / "b").is_symlink()
    assert (project.dest / "real" / "b").read_bytes() == B
    assert secret.read_text() == "keep"


def test_stale_staging_directories_are_removed(server: FaultServer, project: Project) -> None:
    stale = project.dest / ".surefetch" / "sync-0123456789abcdef"
    stale.mkdir(parents=True)
    (stale / "0").write_bytes(b"half")
    project.write({"name": "a", "url": server.add("a", A)})
    project.sync()
    assert leftovers(project.dest) == ["a"]


def test_verify_reports_every_difference(server: FaultServer, project: Project) -> None:
    project.write(
        {"name": "a", "url": server.add("a", A)},
        {"name": "b", "url": server.add("b", B)},
        {"name": "c", "url": server.add("c", C)},
        {"name": "t", "url": server.add("t", A + B), "executable": True},
        {"name": "ok", "url": server.add("ok", b"fine")},
    )
    project.sync()
    (project.dest / "a").unlink()
    damaged = bytearray(B)
    damaged[10] ^= 1
    (project.dest / "b").write_bytes(bytes(damaged))
    (project.dest / "c").write_bytes(C + b"!")
    (project.dest / "t").chmod(0o644)
    found = {(d.name, d.kind) for d in verify(project.lock, project.dest)}
    assert found == {
        ("a", "missing"),
        ("b", "sha256"),
        ("b", "xxh3_128"),
        ("c", "size"),
        ("t", "not executable"),
    }
    sha = next(d for d in verify(project.lock, project.dest) if d.kind == "sha256")
    assert (sha.expected, sha.actual) == (_sha(B), _sha(bytes(damaged)))
    assert sha.integrity and "expected" in str(sha)


def test_sync_leaves_no_file_of_a_cache_it_opened_open(
    server: FaultServer, project: Project
) -> None:
    """A cache given by path is sync's own: its catalog is closed at the end (so that,
    for one, the filesystem under it can be unmounted)."""
    project.write({"name": "a", "url": server.add("a", A)})
    project.sync()
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            held.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:  # the descriptor listdir itself used
            continue
    assert not [path for path in held if path.startswith(str(project.cache))], held


FAILURES: dict[str, Callable[[FaultServer], dict[str, object]]] = {
    "http 404": lambda server: {"url": server.url_for("gone")},
    "refused": lambda server: {"url": "http://127.0.0.1:1/x"},
    "wrong digest": lambda server: {"url": server.add("w", A), "sha256": _sha(B)},
    "bad path": lambda server: {"url": server.add("w", A), "path": "../out"},
}


@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("dest", ["new/deeper", "existing"])
def test_a_failed_sync_leaves_no_directory_it_made(
    server: FaultServer, tmp_path: Path, failure: str, dest: str
) -> None:
    """A sync that fails leaves the filesystem as it found it: a destination it had to
    create (with its missing parents) goes again, and an existing one keeps no
    `.surefetch/` (it left an empty `new/deeper/` behind)."""
    (tmp_path / "existing").mkdir()
    (tmp_path / "m.toml").write_text(
        tomli_w.dumps({"artifact": [{"name": "a", **FAILURES[failure](server)}]})
    )
    with pytest.raises(sf.SurefetchError):
        sf.sync(tmp_path / "m.toml", tmp_path / "l", tmp_path / dest, cache=tmp_path / "c",
                options=sf.TransferOptions(retries=0))  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "c") == ["existing", "m.toml"]
    assert list((tmp_path / "existing").iterdir()) == []


def test_a_broken_netrc_stops_a_sync_before_anything_is_made(
    server: FaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "netrc").write_text("machine 127.0.0.1 login alice password s3cret\nmachine\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    (tmp_path / "m.toml").write_text(
        tomli_w.dumps({"artifact": [{"name": "a", "url": server.add("a", A)}]})
    )
    with pytest.raises(ValueError, match="cannot parse it"):
        sf.sync(tmp_path / "m.toml", tmp_path / "l", tmp_path / "new", cache=tmp_path / "c")
    with pytest.raises(ValueError, match="cannot parse it"):
        sf.Cache(tmp_path / "c2").fetch(server.url_for("a"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.toml", "netrc"]
