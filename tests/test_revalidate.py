"""The cache revalidates what it fetched by URL (If-None-Match, else
If-Modified-Since; a 304 reuses the blob), and answers --offline without any network."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import surefetch as sf
from surefetch.testing import FaultServer

from support import payload, run_cli

V1, V2 = payload(300_000, seed=31), payload(300_000, seed=32)


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
