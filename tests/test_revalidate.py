"""The cache revalidates what it fetched by URL (If-None-Match, else
If-Modified-Since; a 304 reuses the blob), and answers --offline without any network."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import surefetch as sf
from surefetch.cache import CacheEntry, FetchRequest
from surefetch.testing import FaultServer

from support import WITHOUT_ROOT_POWERS, payload, run_cli

V1, V2 = payload(300_000, seed=31), payload(300_000, seed=32)
# Root, but bound by file permissions (as another user would be).


def test_a_304_reuses_the_blob_with_no_body(server: FaultServer, tmp_path: Path) -> None:
    url = server.add("m.bin", V1)
    cache = sf.Cache(tmp_path / "cache")
    first = cache.fetch_entry(url)
    assert first.bytes_transferred == len(V1)
    server.reset_counters()
    again = cache.fetch_entry(url)
    assert again.path == first.path and again.bytes_transferred == 0
    assert server.bytes_sent == 0
    (request,) = server.requests
    assert request.headers["if-none-match"].strip('"')
    server.replace("m.bin", V2)
    changed = cache.fetch_entry(url)
    assert changed.sha256 == hashlib.sha256(V2).hexdigest()
    assert changed.path.read_bytes() == V2


def test_without_an_etag_last_modified_revalidates(server: FaultServer, tmp_path: Path) -> None:
    url = server.add("m.bin", V1, etag=None)
    cache = sf.Cache(tmp_path / "cache")
    cache.fetch_entry(url)
    server.reset_counters()
    assert cache.fetch_entry(url).bytes_transferred == 0
    (request,) = server.requests
    assert "if-modified-since" in request.headers and "if-none-match" not in request.headers


def test_nothing_to_revalidate_with_downloads_again(server: FaultServer, tmp_path: Path) -> None:
    url = server.add("m.bin", V1) + "?no_validators=1"
    cache = sf.Cache(tmp_path / "cache")
    cache.fetch_entry(url)
    assert cache.fetch_entry(url).bytes_transferred == len(V1)


def test_offline_answers_from_the_cache_or_fails_naming_the_url(
    server: FaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = server.add("m.bin", V1)
    fetched = run_cli(["fetch", url, "--cache", "cache", "--json"], tmp_path)
    assert fetched.returncode == 0, fetched.stderr
    server.reset_counters()
    offline = run_cli(["fetch", url, "--cache", "cache", "--json", "--offline"], tmp_path)
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout)["path"] == json.loads(fetched.stdout)["path"]
    never = server.add("never.bin", V2)
    missing = run_cli(["fetch", never, "--cache", "cache", "--offline"], tmp_path)
    assert missing.returncode == 4
    assert never in missing.stderr and "never fetched" in missing.stderr
    monkeypatch.setenv("SUREFETCH_OFFLINE", "1")
    by_env = run_cli(["fetch", never, "--cache", "cache", "--sha256", "0" * 64], tmp_path)
    assert by_env.returncode == 4 and "offline" in by_env.stderr
    assert server.requests == []  # not one request while offline


def test_offline_says_why_it_has_nothing_for_a_url(server: FaultServer, tmp_path: Path) -> None:
    """Fetched by digest, the URL is known offline too; evicted, or with the catalog
    unusable, the error says that rather than "never fetched"."""
    url = server.add("m.bin", V1)
    root = tmp_path / "cache"
    pinned = sf.Cache(root).fetch_entry(url, sha256=hashlib.sha256(V1).hexdigest())
    offline = sf.Cache(root, offline=True)
    assert offline.fetch_entry(url).path == pinned.path
    catalog = root / "catalog.db"
    catalog.chmod(0o664)  # others could write it: not used
    with pytest.raises(sf.NetworkError, match=r"catalog.*cannot be used.*cache verify"):
        sf.Cache(root, offline=True).fetch_entry(url)
    catalog.chmod(0o644)
    assert sf.Cache(root).gc(0).evicted == [pinned.path]
    with pytest.raises(sf.NetworkError, match="never fetched"):  # gc forgot the URL too
        sf.Cache(root, offline=True).fetch_entry(url)
    again = sf.Cache(root).fetch_entry(url)
    again.path.unlink()  # removed behind the cache's back
    with pytest.raises(sf.NetworkError, match="no longer in the cache"):
        sf.Cache(root, offline=True).fetch_entry(url)


def test_a_read_only_cache_still_answers_from_its_catalog(
    server: FaultServer, tmp_path: Path
) -> None:
    """A cache a trusted account fills and others may only read: its catalog is read
    (revalidation, --offline), even where SQLite cannot create its WAL index."""
    url = server.add("m.bin", V1)
    root = tmp_path / "cache"
    fetched = run_cli(["fetch", url, "--cache", str(root), "--json"])  # and closes the catalog
    assert fetched.returncode == 0, fetched.stderr
    assert not (root / "catalog.db-shm").exists()
    script = (
        "import sys, surefetch as sf\n"
        "root, url = sys.argv[1:]\n"
        "print(sf.Cache(root, offline=True).fetch_entry(url).path)\n"
        "print(sf.Cache(root).fetch_entry(url).bytes_transferred)\n"
    )
    os.chmod(root, 0o555)
    try:
        done = subprocess.run(
            [*WITHOUT_ROOT_POWERS, sys.executable, "-c", script, str(root), url],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        os.chmod(root, 0o755)
    assert done.returncode == 0, done.stderr
    # From the catalog offline, then a 304.
    assert done.stdout.split() == [json.loads(fetched.stdout)["path"], "0"], done.stderr


def test_a_batch_revalidates_what_it_fetched_by_url(server: FaultServer, tmp_path: Path) -> None:
    """`fetch_many` (and so `sync --upgrade` of unpinned artifacts) asks with the validators
    of the blobs it holds: 304s reuse them, a changed file comes whole."""
    datas = [payload(5_000 + i, seed=60 + i) for i in range(6)]
    urls = [server.add(f"b{i}.bin", d) for i, d in enumerate(datas)]
    cache = sf.Cache(tmp_path / "cache")
    first = _entries(cache.fetch_many([FetchRequest(u) for u in urls]))
    server.reset_counters()
    changed = payload(7_000, seed=99)
    server.replace("b5.bin", changed)
    again = _entries(cache.fetch_many([FetchRequest(u) for u in urls]))
    assert [e.path for e in again[:5]] == [e.path for e in first[:5]]
    assert [e.bytes_transferred for e in again] == [0] * 5 + [len(changed)]
    assert again[5].path.read_bytes() == changed
    assert server.bytes_sent == len(changed)
    assert all("if-none-match" in r.headers for r in server.requests)


def _entries(results: list[CacheEntry | Exception]) -> list[CacheEntry]:
    assert not [r for r in results if isinstance(r, Exception)], results
    return [r for r in results if isinstance(r, CacheEntry)]


def test_sync_upgrade_revalidates_unpinned_artifacts(server: FaultServer, tmp_path: Path) -> None:
    names = [f"u{i}.bin" for i in range(4)]
    urls = [server.add(n, payload(3_000 + i, seed=70 + i)) for i, n in enumerate(names)]
    manifest = "".join(f'[[artifact]]\nname = "{n}"\nurl = "{u}"\n\n' for n, u in zip(names, urls))
    (tmp_path / "surefetch.toml").write_text(manifest)
    args = ["sync", "--dest", "dest", "--cache", "cache", "-q"]
    assert run_cli(args, tmp_path).returncode == 0
    lock = (tmp_path / "surefetch.lock").read_bytes()
    server.reset_counters()
    upgraded = run_cli([*args, "--upgrade"], tmp_path)
    assert upgraded.returncode == 0, upgraded.stderr
    assert server.bytes_sent == 0 and len(server.requests) == len(names)
    assert (tmp_path / "surefetch.lock").read_bytes() == lock


@pytest.mark.parametrize("how", ["fetch", "batch"])
def test_a_304_for_a_blob_evicted_meanwhile_downloads_it_again(
    server: FaultServer, tmp_path: Path, how: str
) -> None:
    """`cache gc` in another process evicts by the blob's lock, not the URL's that a
    revalidation holds: when the blob left while the server answered 304, the fetch
    downloads it again in the same call instead of returning a path that is gone."""
    data = payload(30_000, seed=77)
    url = server.add("evicted.bin", data) + "?hang_headers=0.6"
    root = tmp_path / "cache"
    cache = sf.Cache(root)
    first = cache.fetch_entry(url)
    server.reset_counters()

    def gc_meanwhile() -> None:
        time.sleep(0.3)  # while the server holds back its 304
        out = run_cli(["cache", "gc", "--cache", str(root), "--max-size", "0"])
        assert out.returncode == 0, out.stderr

    evicting = threading.Thread(target=gc_meanwhile)
    evicting.start()
    if how == "fetch":
        again = cache.fetch_entry(url)
    else:
        (result,) = cache.fetch_many([FetchRequest(url)])
        assert isinstance(result, CacheEntry), result
        again = result
    evicting.join()
    assert again.path == first.path and again.path.read_bytes() == data
    conditional = ["if-none-match" in r.headers for r in server.requests]
    assert conditional == [True, False]  # the 304, then the download again


def test_a_batch_revalidates_from_the_catalog_and_the_old_index_files(
    server: FaultServer, tmp_path: Path
) -> None:
    """A batch reads the URL index for all its URLs at once (more than one query's worth
    of keys): those the catalog knows, and one that only an index file from before the
    catalog knows, are revalidated (304, no body); those never fetched are downloaded."""
    import sqlite3

    from surefetch.cache.catalog import _KEYS_PER_QUERY
    from surefetch.cache.index import url_key

    count = _KEYS_PER_QUERY + 20
    urls = [server.add(f"r{i}.bin", payload(64, seed=1000 + i)) for i in range(count)]
    root = tmp_path / "cache"
    first = sf.Cache(root)
    assert all(
        isinstance(r, CacheEntry) for r in first.fetch_many([FetchRequest(u) for u in urls[::2]])
    )
    first.close()
    # The last URL fetched moves from the catalog into an index file of the first format.
    key = url_key(urls[-2])
    with sqlite3.connect(root / "catalog.db") as db:
        (url, sha, etag, modified) = db.execute(
            "SELECT url, sha256, etag, last_modified FROM urls WHERE key = ?", (key,)
        ).fetchone()
        db.execute("DELETE FROM urls WHERE key = ?", (key,))
    db.close()
    index = root / "urls" / key[:2] / f"{key}.json"
    index.parent.mkdir(parents=True)
    index.write_text(
        json.dumps({"url": url, "sha256": sha, "etag": etag, "last_modified": modified})
    )
    server.reset_counters()
    again = sf.Cache(root).fetch_many([FetchRequest(u) for u in urls])
    assert all(isinstance(r, CacheEntry) for r in again)
    downloaded = {
        i for i, r in enumerate(again) if isinstance(r, CacheEntry) and r.bytes_transferred
    }
    assert downloaded == set(range(1, count, 2))
    conditional = {r.name for r in server.requests if "if-none-match" in r.headers}
    assert len(conditional) == len(range(0, count, 2))
