"""`surefetch.Cache`: content-addressed blobs, cross-process locks, trust, maintenance."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash

import surefetch as sf
from surefetch.cache import Cache, CacheEntry, FetchRequest, default_cache_root
from surefetch.cache.locks import lock_place, take_if_free
from surefetch.testing import FaultServer

from cache_support import (
    blob_files,
    blob_path,
    dead_url,
    hold_artifact_lock,
    hold_flock,
    holder_pid,
    part_path,
    start_fetch,
    stop,
    wait_for_download,
    wait_until,
)
from support import leftovers, payload

DATA = payload(300_000, seed=4)
SHA = hashlib.sha256(DATA).hexdigest()
SLOW = 100_000  # bytes per second: DATA takes 3 s, long enough to be caught in the act


@pytest.fixture
def url(server: FaultServer) -> str:
    return server.add("model.bin", DATA)


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    return Cache(tmp_path / "cache")


def test_a_cached_fetch_never_touches_the_network(
    cache: Cache, server: FaultServer, url: str
) -> None:
    first = cache.fetch_entry(url, sha256=SHA)
    assert first.path == blob_path(cache.root, SHA)
    assert first.path.read_bytes() == DATA
    assert (first.size, first.sha256, first.bytes_transferred) == (len(DATA), SHA, len(DATA))
    assert first.xxh3_128 == xxhash.xxh3_128_hexdigest(DATA)
    assert server.request_count("model.bin") == 1

    again = cache.fetch_entry(url, sha256=SHA.upper())
    assert again == sf.CacheEntry(first.path, first.size, SHA, first.xxh3_128, 0)
    assert cache.fetch(dead_url(), sha256=SHA) == first.path
    assert server.request_count("model.bin") == 1
    assert cache.lookup(SHA) == again
    assert leftovers(cache.root / "tmp") == []


def test_without_a_digest_the_blob_lands_under_its_sha256(
    cache: Cache, server: FaultServer, url: str
) -> None:
    entry = cache.fetch_entry(url)
    assert (entry.path, entry.sha256) == (blob_path(cache.root, SHA), SHA)
    assert cache.lookup(SHA) is not None
    # keyed by the URL, whose content may change: fetched again, landing on the same blob
    assert cache.fetch_entry(url).path == entry.path
    assert server.request_count("model.bin") == 2
    assert blob_files(cache.root) == [entry.path]


def test_lookup_of_an_absent_or_invalid_digest(cache: Cache) -> None:
    assert cache.lookup(SHA) is None
    with pytest.raises(ValueError, match="64 hex digits"):
        cache.lookup("abc")
    with pytest.raises(ValueError, match="64 hex digits"):
        cache.fetch("http://127.0.0.1:1/x", sha256="xyz")


def test_a_wrong_digest_leaves_nothing_in_the_cache(cache: Cache, url: str) -> None:
    with pytest.raises(sf.ChecksumMismatch):
        cache.fetch(url, sha256="0" * 64)
    assert blob_files(cache.root) == []
    assert leftovers(cache.root / "tmp") == []


def test_a_cached_blob_of_another_size_is_refused_without_network(cache: Cache, url: str) -> None:
    cache.fetch(url, sha256=SHA)
    with pytest.raises(sf.SizeMismatch, match="check the expected size"):
        cache.fetch(dead_url(), sha256=SHA, size=len(DATA) + 1)


def test_a_killed_holder_releases_its_lock_and_its_part_is_finished(
    cache: Cache, server: FaultServer, url: str
) -> None:
    child = start_fetch(f"{url}?throttle={SLOW}", cache.root, "--sha256", SHA)
    try:
        wait_for_download(child, part_path(cache.root, SHA))
        wait_until(lambda: holder_pid(cache.root, SHA) == child.pid, "the holder")
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        stop([child])
    waits: list[str] = []
    started = time.monotonic()
    entry = cache.fetch_entry(url, sha256=SHA, on_wait=waits.append, timeout=10)
    assert waits == []  # the kernel released the dead holder's lock
    assert time.monotonic() - started < 5
    assert entry.path.read_bytes() == DATA
    assert blob_files(cache.root) == [entry.path]
    # (a sidecar's .json.tmp may remain if the kill hit its write: the engine's to tidy)
    assert [p for p in leftovers(cache.root / "tmp") if not p.endswith(".json.tmp")] == []


@pytest.fixture
def holder(cache: Cache, url: str) -> Iterator[subprocess.Popen[str]]:
    """A child `surefetch fetch` downloading DATA slowly, holding its lock."""
    child = start_fetch(f"{url}?throttle={SLOW}", cache.root, "--sha256", SHA)
    wait_until(lambda: holder_pid(cache.root, SHA) == child.pid, "the holder")
    yield child
    stop([child])


def test_a_lock_wait_times_out_naming_the_holder(
    tmp_path: Path, holder: subprocess.Popen[str], url: str
) -> None:
    cache = Cache(tmp_path / "cache", lock_timeout=0.3)
    waits: list[str] = []
    started = time.monotonic()
    with pytest.raises(sf.LockTimeout) as caught:
        cache.fetch(url, sha256=SHA, on_wait=waits.append)
    assert 0.3 <= time.monotonic() - started < 2
    pid = holder.pid
    assert f"pid {pid} on host" in str(caught.value)
    assert "--lock-timeout" in str(caught.value)
    assert len(waits) == 1 and waits[0].startswith(f"pid {pid} on host ")
    assert f"fetching {url}?throttle={SLOW} since " in waits[0]


@pytest.mark.usefixtures("holder")
def test_the_overall_timeout_covers_the_wait(cache: Cache, url: str) -> None:
    with pytest.raises(sf.DownloadTimeout, match="waiting for pid"):
        cache.fetch(url, sha256=SHA, timeout=0.3)


def test_a_fetch_that_times_out_names_the_timeout_given(cache: Cache, url: str) -> None:
    """The engine gets what is left of the fetch's timeout; the message names the one the
    caller gave (it said "within 0.296 s" for 0.3)."""
    with pytest.raises(sf.DownloadTimeout) as caught:
        cache.fetch(f"{url}?throttle=1000", timeout=0.3)
    assert caught.value.kind == "overall"
    assert "within 0.3 s" in str(caught.value), caught.value


@pytest.mark.usefixtures("holder")
def test_cancel_stops_a_wait_at_once(cache: Cache, url: str) -> None:
    token = sf.CancelToken()
    waiting = threading.Event()
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            cache.fetch(url, sha256=SHA, cancel=token, on_wait=lambda _: waiting.set())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    assert waiting.wait(10)
    sent = time.monotonic()
    token.cancel()
    thread.join(5)
    assert time.monotonic() - sent < 0.5
    assert len(outcome) == 1 and isinstance(outcome[0], sf.Cancelled)


def test_a_waiter_uses_the_blob_of_the_process_it_waited_for(
    cache: Cache, server: FaultServer, url: str
) -> None:
    child = start_fetch(f"{url}?throttle=1000000", cache.root, "--sha256", SHA)
    try:
        wait_until(lambda: holder_pid(cache.root, SHA) == child.pid, "the holder")
        waits: list[str] = []
        entry = cache.fetch_entry(url, sha256=SHA, on_wait=waits.append, timeout=10)
        out, err = child.communicate(timeout=10)
    finally:
        stop([child])
    assert child.returncode == 0, err
    assert out.strip() == str(entry.path)
    assert entry.bytes_transferred == 0
    assert len(waits) == 1
    assert server.bytes_sent_for("model.bin") == len(DATA)


def test_verify_quarantines_a_corrupted_blob_and_fetch_replaces_it(
    cache: Cache, server: FaultServer, url: str
) -> None:
    path = cache.fetch(url, sha256=SHA)
    assert cache.verify() == sf.cache.VerifyReport(1, [])
    path.write_bytes(b"x" + DATA[1:])
    report = cache.verify()
    assert report.checked == 1
    assert [p.parent for p in report.quarantined] == [cache.root / "quarantine"]
    assert report.quarantined[0].read_bytes()[:1] == b"x"
    assert cache.lookup(SHA) is None
    assert cache.fetch(url, sha256=SHA).read_bytes() == DATA
    assert server.request_count("model.bin") == 2


def _three_blobs(cache: Cache, server: FaultServer) -> list[sf.CacheEntry]:
    entries = []
    now = time.time()
    for i in range(3):
        data = payload(100_000, seed=10 + i)
        entry = cache.fetch_entry(
            server.add(f"b{i}", data), sha256=hashlib.sha256(data).hexdigest()
        )
        os.utime(entry.path, (now - 300 + 100 * i, now - 300 + 100 * i))
        entries.append(entry)
    return entries


def test_gc_evicts_the_least_recently_used(cache: Cache, server: FaultServer) -> None:
    oldest, middle, newest = _three_blobs(cache, server)
    assert cache.lookup(oldest.sha256) is not None  # a use makes it the most recent
    assert [b.sha256 for b in cache.ls()] == [middle.sha256, newest.sha256, oldest.sha256]
    report = cache.gc(max_size=250_000)
    assert (report.evicted, report.freed, report.remaining) == ([middle.path], 100_000, 200_000)
    assert sorted(blob_files(cache.root)) == sorted([oldest.path, newest.path])
    assert cache.gc(max_size=0).remaining == 0
    assert blob_files(cache.root) == []


def test_gc_keeps_a_blob_whose_lock_is_held(cache: Cache, server: FaultServer) -> None:
    oldest, middle, newest = _three_blobs(cache, server)
    fd = hold_artifact_lock(cache.root, f"sha256-{oldest.sha256}")
    try:
        report = cache.gc(max_size=200_000)
    finally:
        os.close(fd)
    assert (report.in_use, report.evicted) == (1, [middle.path])
    assert oldest.path.exists() and newest.path.exists()


def _old(*paths: Path, age: float = 7200) -> None:
    then = time.time() - age
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_bytes(b"p" * 1000)
        os.utime(path, (then, then))


@pytest.mark.parametrize("generation", ["table", "flock files (before the table)"])
def test_clean_removes_old_dead_parts_only(cache: Cache, generation: str) -> None:
    tmp = cache.root / "tmp" / ("v2" if generation == "table" else "")
    parts = tmp / ".surefetch"
    dead = [parts / "dead.part", parts / "dead.part.json"]
    live = [parts / "live.part", parts / "live.part.json"]
    batched = parts / f"sha256-{SHA}.part"
    young = parts / "young.part"
    stray = tmp / "sha256-stray"
    _old(*dead, *live, batched, stray)
    young.write_bytes(b"y")
    quarantined = cache.root / "quarantine" / "q"
    _old(quarantined)
    (cache.root / "locks").mkdir()
    holders = [hold_flock(parts / "live.lock")]  # a live download holds its engine lock
    held = None
    # A batch of the cache downloads under the artifact lock alone.
    if generation == "table":
        held = hold_artifact_lock(cache.root, f"sha256-{SHA}")
    else:
        holders.append(hold_flock(cache.root / "locks" / f"sha256-{SHA}.lock"))
    try:
        report = cache.clean(older_than=3600)
    finally:
        stop(holders)
        if held is not None:
            os.close(held)
    assert sorted(report.removed) == sorted([*dead, stray])
    assert (report.freed, report.live) == (3000, 2)
    assert all(p.exists() for p in [*live, batched]) and young.exists() and quarantined.exists()
    assert cache.clean(older_than=3600, quarantine=True).removed == [
        *live,
        batched,
        quarantined,
    ]


def test_clean_removes_the_part_of_a_killed_download(cache: Cache, url: str) -> None:
    child = start_fetch(f"{url}?throttle={SLOW}", cache.root, "--sha256", SHA)
    try:
        wait_for_download(child, part_path(cache.root, SHA))
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        stop([child])
    assert cache.clean(older_than=3600).removed == []  # young: the next fetch resumes it
    report = cache.clean(older_than=0)
    assert part_path(cache.root, SHA) in report.removed
    assert leftovers(cache.root / "tmp") == []


def _plant(cache: Cache, content: bytes) -> Path:
    path = blob_path(cache.root, SHA)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    os.chmod(path, 0o644)
    if os.getuid() == 0:
        os.chown(path, 65534, 65534)  # another user's file
    else:
        os.chmod(path, 0o666)  # a file another user could have written
    return path


def test_a_planted_blob_is_not_trusted(cache: Cache, server: FaultServer, url: str) -> None:
    planted = _plant(cache, b"evil" + DATA[4:])
    entry = cache.fetch_entry(url, sha256=SHA)
    assert entry.path.read_bytes() == DATA
    assert entry.bytes_transferred == len(DATA)
    assert os.stat(planted).st_uid == os.getuid()
    assert [p.read_bytes()[:4] for p in (cache.root / "quarantine").iterdir()] == [b"evil"]


def test_a_group_writable_blob_is_rehashed(cache: Cache, server: FaultServer, url: str) -> None:
    path = cache.fetch(url, sha256=SHA)
    os.chmod(path, 0o664)
    assert cache.lookup(SHA) is not None  # still the right bytes: used, re-hashed
    path.write_bytes(b"evil" + DATA[4:])
    assert cache.fetch(url, sha256=SHA).read_bytes() == DATA
    assert server.request_count("model.bin") == 2


def test_another_users_blob_with_the_right_bytes_is_used(cache: Cache, server: FaultServer) -> None:
    _plant(cache, DATA)
    entry = cache.fetch_entry(dead_url(), sha256=SHA)
    assert (entry.sha256, entry.xxh3_128) == (SHA, xxhash.xxh3_128_hexdigest(DATA))


def test_a_planted_symlink_is_quarantined(cache: Cache, tmp_path: Path, url: str) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(DATA)
    path = blob_path(cache.root, SHA)
    path.parent.mkdir(parents=True)
    path.symlink_to(target)
    assert cache.lookup(SHA) is None
    assert not path.is_symlink() and target.read_bytes() == DATA
    assert not cache.fetch(url, sha256=SHA).is_symlink()


def test_the_default_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SUREFETCH_CACHE", str(tmp_path / "sf"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert Cache().root == default_cache_root() == tmp_path / "sf"
    monkeypatch.delenv("SUREFETCH_CACHE")
    assert Cache().root == tmp_path / "xdg" / "surefetch"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # ignored, as the XDG spec says
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert Cache().root == tmp_path / "home" / ".cache" / "surefetch"


def test_an_unusable_cache_directory_is_a_storage_error(tmp_path: Path, url: str) -> None:
    (tmp_path / "file").write_bytes(b"")
    cache = Cache(tmp_path / "file" / "cache")
    with pytest.raises(sf.StorageError, match=r"cannot use the cache at .*use another directory"):
        cache.fetch(url, sha256=SHA)
    with pytest.raises(sf.StorageError):
        cache.fetch(url)


def test_invalid_arguments(cache: Cache) -> None:
    with pytest.raises(ValueError, match="lock_timeout"):
        Cache(lock_timeout=0)
    with pytest.raises(ValueError, match="max_size"):
        cache.gc(-1)
    with pytest.raises(ValueError, match="older_than"):
        cache.clean(-1)


def test_a_cache_from_before_the_catalog_keeps_its_metadata(
    url: str, cache: Cache, tmp_path: Path
) -> None:
    """Metadata in meta/ and urls/ JSON files (the first format) is still read: the URL
    index answers offline, `ls` names the URL, and the record moves into the catalog."""
    import json

    from surefetch.cache.index import url_key

    entry = cache.fetch_entry(url)
    for name in ("catalog.db", "catalog.db-wal", "catalog.db-shm"):
        (cache.root / name).unlink(missing_ok=True)
    key = url_key(url)
    with_password = url.replace("http://", "http://bob:pw123@")
    meta = {"size": len(DATA), "xxh3_128": entry.xxh3_128, "url": with_password, "sha256": SHA}
    index = {"url": url, "sha256": SHA, "etag": None, "last_modified": None}
    for path, record in (
        (cache.root / "meta" / SHA[:2] / f"{SHA}.json", meta),
        (cache.root / "urls" / key[:2] / f"{key}.json", index),
    ):
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(record))
    old = Cache(cache.root, offline=True)
    assert old.fetch_entry(url) == entry.__class__(entry.path, len(DATA), SHA, entry.xxh3_128, 0)
    assert [b.url for b in old.ls()] == [url.replace("http://", "http://bob:***@")]
    assert b"pw123" not in (cache.root / "catalog.db").read_bytes()
    assert old.gc(0).evicted == [entry.path]
    assert not (cache.root / "meta" / SHA[:2] / f"{SHA}.json").exists()
    assert Cache(cache.root).ls() == []


def test_a_batch_writes_its_records_as_it_goes(tmp_path: Path) -> None:
    """Within `deferred` (a batch), records reach the catalog in groups, not only at the
    end: a batch killed midway loses only its last group."""
    from surefetch.cache.catalog import _FLUSH_RECORDS, Catalog

    path = tmp_path / "catalog.db"
    writer, reader = Catalog(path), Catalog(path)
    count = 2 * _FLUSH_RECORDS + 44
    with writer.deferred():
        for i in range(count):
            writer.put_blob(f"{i:064x}", i, "0" * 32)
        assert reader.blob(f"{2 * _FLUSH_RECORDS - 1:064x}") is not None  # two groups are in
        assert reader.blob(f"{count - 1:064x}") is None  # the last group waits for the end
    assert reader.blob(f"{count - 1:064x}") is not None


def test_a_group_of_records_keeps_the_order_of_its_deletes(tmp_path: Path) -> None:
    """A group's writes are made statement by statement, but a blob forgotten within the
    group takes with it only the records written before it, not those written after."""
    from surefetch.cache.catalog import Catalog, UrlRecord

    path = tmp_path / "catalog.db"
    writer, reader = Catalog(path), Catalog(path)
    digest, other = "a" * 64, "b" * 64
    with writer.deferred():
        writer.put_blob(digest, 1, "0" * 32)
        writer.put_url("before", UrlRecord("http://h/before", digest, None, None))
        writer.put_url("kept", UrlRecord("http://h/kept", other, None, None))
        writer.forget_blob(digest)
        writer.put_url("after", UrlRecord("http://h/after", digest, None, None))
        writer.put_blob(digest, 2, "1" * 32)
    assert reader.url("before") is None
    assert reader.url("kept") is not None
    assert reader.url("after") == UrlRecord("http://h/after", digest, None, None)
    record = reader.blob(digest)
    assert record is not None and record.size == 2


def test_a_batch_installs_each_blob_at_its_digest_once(server: FaultServer, tmp_path: Path) -> None:
    """The engine renames each verified download of a batch straight to its blob path:
    nothing is left in tmp/, two URLs with the same bytes share one blob (neither fails as
    a repeat), and the blob directories are made as their first blobs arrive."""
    same = payload(4_096, seed=300)
    other = payload(4_096, seed=301)
    urls = [server.add("a.bin", same), server.add("b.bin", same), server.add("c.bin", other)]
    cache = Cache(tmp_path / "cache")
    results = cache.fetch_many([FetchRequest(u) for u in urls])
    assert all(isinstance(r, CacheEntry) for r in results), results
    a, b, c = (r for r in results if isinstance(r, CacheEntry))
    assert a.path == b.path == cache.root / "blobs" / "sha256" / a.sha256[:2] / a.sha256
    assert a.path.read_bytes() == same and c.path.read_bytes() == other
    tmp = cache.root / "tmp" / "v2"
    assert not tmp.exists() or [p for p in tmp.rglob("*") if p.is_file()] == []
    shards = sorted(p.name for p in (cache.root / "blobs" / "sha256").iterdir())
    assert shards == sorted({a.sha256[:2], c.sha256[:2]})  # made as their first blobs came
    assert sorted(b.sha256 for b in cache.ls()) == sorted({a.sha256, c.sha256})


@pytest.mark.parametrize(
    ("planted", "refused"),
    [("symlink", True), ("foreign, others may write", True), ("foreign, sticky", False)],
)
def test_a_blob_directory_planted_during_a_batch_is_judged_at_the_rename(
    server: FaultServer, tmp_path: Path, planted: str, refused: bool
) -> None:
    """A blob directory that appears while a batch downloads (in a shared cache another
    user may create one) is judged when the blob is renamed into it, by the cache's rule
    for its directories: a symlink is never written through, another user's directory
    only when it is sticky. The batch's other items are unaffected."""
    fast, slow = payload(4_096, seed=400), payload(4_096, seed=401)
    slow_sha = hashlib.sha256(slow).hexdigest()
    urls = [server.add("fast.bin", fast), server.add("slow.bin", slow) + "?hang_headers=1"]
    cache = Cache(tmp_path / "cache")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shard = cache.root / "blobs" / "sha256" / slow_sha[:2]

    def plant() -> None:
        deadline = time.monotonic() + 5
        while not shard.parent.is_dir() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # the batch has checked the blob directories there are
        if planted == "symlink":
            shard.symlink_to(elsewhere)
        else:
            shard.mkdir(mode=0o777)
            os.chmod(shard, 0o1777 if planted == "foreign, sticky" else 0o777)
            os.chown(shard, 65534, 65534)

    planter = threading.Thread(target=plant)
    planter.start()
    try:
        results = cache.fetch_many(
            [
                FetchRequest(u, sha256=hashlib.sha256(d).hexdigest())
                for u, d in zip(urls, (fast, slow))
            ]
        )
    finally:
        planter.join()
    assert isinstance(results[0], CacheEntry) and results[0].path.read_bytes() == fast
    assert list(elsewhere.iterdir()) == []
    if refused:
        assert isinstance(results[1], sf.SurefetchError), results[1]
        assert "never puts a blob there" in str(results[1])
        assert not (shard / slow_sha).exists()
    else:
        assert isinstance(results[1], CacheEntry), results[1]
        assert results[1].path == shard / slow_sha and results[1].path.read_bytes() == slow


def test_a_batch_locks_each_artifact_in_the_lock_table(server: FaultServer, tmp_path: Path) -> None:
    """A batch takes one lock per artifact without creating a file per artifact; one
    whose lock another holder has waits for it (here: gives up, alone), and what the
    batch said of its locks in the catalog is withdrawn when it ends."""
    datas = [payload(4_096, seed=200 + i) for i in range(12)]
    shas = [hashlib.sha256(d).hexdigest() for d in datas]
    urls = [server.add(f"t{i}.bin", d) for i, d in enumerate(datas)]
    cache = Cache(tmp_path / "cache", lock_timeout=0.3)
    held = hold_artifact_lock(cache.root, f"sha256-{shas[3]}")
    try:
        results = cache.fetch_many([FetchRequest(u, sha256=s) for u, s in zip(urls, shas)])
    finally:
        os.close(held)
    assert isinstance(results[3], sf.LockTimeout), results[3]
    assert "another process" in str(results[3])
    fetched = [r for i, r in enumerate(results) if i != 3]
    assert all(isinstance(r, CacheEntry) for r in fetched), fetched
    assert [r.path.read_bytes() for r in fetched if isinstance(r, CacheEntry)] == [
        *datas[:3],
        *datas[4:],
    ]
    tables = {f"artifacts.{n:02d}" for n in range(32)}
    assert set(os.listdir(cache.root / "locks")) <= tables  # no file of its own per artifact
    assert holder_pid(cache.root, shas[0]) is None


@pytest.mark.parametrize("shared", [True, False], ids=["shared-directory", "own-directory"])
def test_the_lock_table_lets_whoever_shares_the_cache_take_locks(
    request: pytest.FixtureRequest, shared: bool
) -> None:
    """A lock needs its table file open for writing (flock did not): a file one user
    creates in a locks/ directory others may write is made writable by them too, or
    their fetches would fail on each file another user happened to create first."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.fail("this test needs root and setpriv (util-linux) to run as another user")
    # Where the other user can reach it (pytest's own directories are 0700).
    reachable = Path(tempfile.mkdtemp(prefix="surefetch-shared-"))
    request.addfinalizer(lambda: shutil.rmtree(reachable, ignore_errors=True))
    root = reachable / "cache"
    (root / "locks").mkdir(parents=True)
    for directory in (reachable, root, root / "locks"):
        directory.chmod(0o777 if shared else 0o755)
    store = sf.cache.store.BlobStore(root)
    fd = take_if_free(store, "sha256-" + SHA)
    assert fd is not None
    os.close(fd)
    name, offset = lock_place("sha256-" + SHA)
    table = root / "locks" / name
    assert stat.S_IMODE(table.stat().st_mode) == (0o666 if shared else 0o644)
    other_user = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-c",
            TAKE_LOCK,
            str(table),
            str(offset),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert other_user.returncode == (0 if shared else 1), other_user.stderr
    assert other_user.stdout.strip() == ("locked" if shared else "")


TAKE_LOCK = """
import sys
from pathlib import Path
from surefetch._fs import try_range_lock
try:
    fd = try_range_lock(Path(sys.argv[1]), int(sys.argv[2]), create=False)
except PermissionError:
    sys.exit(1)
print("locked" if fd is not None else "busy")
"""


def test_a_symlink_in_the_lock_table_is_named_and_never_followed(
    server: FaultServer, tmp_path: Path
) -> None:
    """A fetch refuses it in one line that names it; gc and clean take its artifacts as
    in use and go on with the rest."""
    root = tmp_path / "cache"
    (root / "locks").mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    name, _ = lock_place("sha256-" + SHA)
    (root / "locks" / name).symlink_to(victim)
    url = server.add("d.bin", DATA)
    with pytest.raises(sf.StorageError) as raised:
        Cache(root).fetch(url, sha256=SHA)
    message = str(raised.value)
    assert "is a symbolic link" in message and name in message and "\n" not in message
    assert victim.read_bytes() == b"untouched"
    # A blob of another key is cached; the symlinked table file hides nothing else.
    other = payload(1000, seed=9)
    Cache(root).fetch(server.add("o.bin", other), sha256=hashlib.sha256(other).hexdigest())
    report = Cache(root).gc(max_size=0)
    assert report.remaining == 0 and victim.read_bytes() == b"untouched"
