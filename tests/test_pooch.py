"""`surefetch.pooch`: the real pooch package fetching through surefetch over loopback."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pooch  # type: ignore[import-untyped]
import pytest
import xxhash

import surefetch.pooch
from surefetch import Cancelled, CancelToken, ChecksumMismatch, HTTPError, NetworkError
from surefetch.pooch import SurefetchDownloader
from surefetch.testing import FaultServer

from support import leftovers, payload

DATA = payload(3 * 1024 * 1024 + 5, seed=14)
SHA = hashlib.sha256(DATA).hexdigest()
MD5 = hashlib.md5(DATA).hexdigest()
XXH3 = xxhash.xxh3_128_hexdigest(DATA)


@pytest.fixture
def url(server: FaultServer) -> str:
    return server.add("data.bin", DATA)


def ranges(server: FaultServer, name: str) -> list[str | None]:
    return [r.range for r in server.requests if r.name == name and r.method == "GET"]


def test_retrieve_with_the_known_hash(server: FaultServer, url: str, tmp_path: Path) -> None:
    path = pooch.retrieve(
        url, known_hash=f"sha256:{SHA}", fname="data.bin", path=tmp_path,
        downloader=surefetch.pooch.downloader,
    )  # fmt: skip
    assert Path(path) == tmp_path / "data.bin"
    assert Path(path).read_bytes() == DATA
    assert leftovers(tmp_path) == ["data.bin"]
    assert server.request_count("data.bin") == 1
    # Fetched again: pooch finds the file and its hash, nothing is downloaded.
    assert pooch.retrieve(url, f"sha256:{SHA}", "data.bin", tmp_path, downloader=None) == path
    assert server.request_count("data.bin") == 1


@pytest.mark.parametrize("known", [f"sha256:{'0' * 64}", "md5:" + "0" * 32])
def test_a_wrong_hash_leaves_nothing(url: str, tmp_path: Path, known: str) -> None:
    with pytest.raises(ValueError, match="does not match"):
        pooch.retrieve(url, known, "data.bin", tmp_path, downloader=surefetch.pooch.downloader)
    assert leftovers(tmp_path) == []


def test_fetch_from_a_registry(server: FaultServer, tmp_path: Path) -> None:
    server.add("files/a.bin", DATA)
    server.add("files/b.bin", DATA[:1000])
    server.add("files/c.bin", DATA[:5000])
    data = pooch.create(
        path=tmp_path,
        base_url=server.url + "/files/",
        registry={
            "a.bin": SHA,  # pooch's default algorithm
            "b.bin": "md5:" + hashlib.md5(DATA[:1000]).hexdigest(),
            "c.bin": "xxh3_128:" + xxhash.xxh3_128_hexdigest(DATA[:5000]),
        },
    )
    for name, body in (("a.bin", DATA), ("b.bin", DATA[:1000]), ("c.bin", DATA[:5000])):
        path = data.fetch(name, downloader=surefetch.pooch.downloader)
        assert Path(path).read_bytes() == body
    assert leftovers(tmp_path) == ["a.bin", "b.bin", "c.bin"]


@pytest.mark.parametrize("algorithm", ["sha256", "xxh3_128"])
def test_a_wrong_registry_hash_is_refused_while_streaming(
    server: FaultServer, url: str, tmp_path: Path, algorithm: str
) -> None:
    """The registry's SHA-256 or XXH3-128 reaches surefetch, which refuses the body
    before pooch sees it; the error is still pooch's ValueError."""
    wrong = "0" * (64 if algorithm == "sha256" else 32)
    registry = {"data.bin": f"{algorithm}:{wrong}"}
    data = pooch.create(path=tmp_path, base_url=server.url + "/", registry=registry)
    with pytest.raises(ValueError, match="pooch registry") as caught:
        data.fetch("data.bin", downloader=surefetch.pooch.downloader)
    assert isinstance(caught.value.__cause__, ChecksumMismatch)
    assert caught.value.__cause__.algorithm == algorithm
    assert leftovers(tmp_path) == []


def test_check_only(server: FaultServer, url: str, tmp_path: Path) -> None:
    data = pooch.create(
        path=tmp_path,
        base_url=server.url + "/",
        registry={"data.bin": SHA, "missing.bin": SHA},
    )
    assert data.is_available("data.bin", downloader=surefetch.pooch.downloader) is True
    assert data.is_available("missing.bin", downloader=surefetch.pooch.downloader) is False
    assert [r.method for r in server.requests] == ["HEAD", "HEAD"]
    assert leftovers(tmp_path) == []


def test_a_cut_body_is_retried_and_resumed(server: FaultServer, url: str, tmp_path: Path) -> None:
    path = pooch.retrieve(
        url + "?cut=1500000&times=1", SHA, "data.bin", tmp_path,
        downloader=SurefetchDownloader(retries=2),
    )  # fmt: skip
    assert Path(path).read_bytes() == DATA
    first, second = ranges(server, "data.bin")
    assert first in (None, "bytes=0-")
    assert second is not None and int(second.split("=")[1].split("-")[0]) > 1_000_000
    assert server.bytes_sent_for("data.bin") < len(DATA) + 1_500_000


def test_an_interrupted_fetch_resumes_on_the_next_call(
    server: FaultServer, url: str, tmp_path: Path
) -> None:
    """pooch's temporary file has a new name each time; the part file does not."""
    cut = url + "?cut=2000000&times=1"
    once = SurefetchDownloader(retries=0)
    with pytest.raises(NetworkError):
        pooch.retrieve(cut, SHA, "data.bin", tmp_path, downloader=once)
    assert not (tmp_path / "data.bin").exists()
    assert [p for p in leftovers(tmp_path) if p.endswith(".part")]  # kept for the next call
    path = pooch.retrieve(cut, SHA, "data.bin", tmp_path, downloader=once)
    assert Path(path).read_bytes() == DATA
    _, resumed = ranges(server, "data.bin")
    assert resumed is not None and int(resumed.split("=")[1].split("-")[0]) > 1_000_000
    assert server.bytes_sent_for("data.bin") < len(DATA) + 2_000_000
    assert leftovers(tmp_path) == ["data.bin"]


def test_http_errors_are_surefetchs(server: FaultServer, tmp_path: Path) -> None:
    with pytest.raises(HTTPError) as caught:
        pooch.retrieve(
            server.url_for("nothing.bin"), None, "nothing.bin", tmp_path,
            downloader=surefetch.pooch.downloader,
        )  # fmt: skip
    assert caught.value.status == 404
    assert leftovers(tmp_path) == []


def test_progressbar_draws_poochs_bar(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pooch.retrieve(url, SHA, "data.bin", tmp_path, downloader=SurefetchDownloader(progressbar=True))
    err = capsys.readouterr().err
    assert "100%|" in err
    assert "3.15M/3.15M" in err  # tqdm's unit_scale, as pooch's bar shows the size


class Recorder:
    """A progress bar object of the kind pooch accepts (total, update, reset, close)."""

    def __init__(self, on_update: Any = None) -> None:
        self.total: int | None = None
        self.n = 0
        self.calls: list[str] = []
        self.on_update = on_update

    def update(self, n: int) -> None:
        self.n += n
        self.calls.append("update")
        if self.on_update is not None:
            self.on_update(self)

    def reset(self) -> None:
        self.n = 0
        self.calls.append("reset")

    def close(self) -> None:
        self.calls.append("close")


def test_progressbar_object(url: str, tmp_path: Path) -> None:
    bar = Recorder()
    pooch.retrieve(url, SHA, "data.bin", tmp_path, downloader=SurefetchDownloader(progressbar=bar))
    assert (bar.total, bar.n) == (len(DATA), len(DATA))
    assert bar.calls[-3:] == ["reset", "update", "close"]
    assert bar.calls.count("update") >= 2  # updates while it streamed, then pooch's last one


def test_cancel_stops_it_and_leaves_nothing(server: FaultServer, tmp_path: Path) -> None:
    url = server.add("slow.bin", DATA)
    token = CancelToken()
    bar = Recorder(on_update=lambda bar: token.cancel())
    slow = SurefetchDownloader(progressbar=bar, cancel=token)
    with pytest.raises(Cancelled):
        pooch.retrieve(url + "?throttle=1000000", SHA, "slow.bin", tmp_path, downloader=slow)
    assert not (tmp_path / "slow.bin").exists()
    assert all(p.endswith((".part", ".part.json")) for p in leftovers(tmp_path))


def test_output_file_object(url: str) -> None:
    out = io.BytesIO()
    assert surefetch.pooch.downloader(url, out, None) is None
    assert out.getvalue() == DATA


def test_two_fetches_of_one_url_at_once(server: FaultServer, url: str, tmp_path: Path) -> None:
    """A second process (here a thread) fetching the same URL into the same directory
    downloads into pooch's temporary file, as pooch's own downloader would."""
    slow = url + "?throttle=4000000"
    started = threading.Event()
    first_error: list[BaseException] = []

    def first() -> None:
        try:
            bar = Recorder(on_update=lambda bar: started.set())
            one = SurefetchDownloader(progressbar=bar)
            pooch.retrieve(slow, SHA, "one.bin", tmp_path, downloader=one)
        except BaseException as exc:
            first_error.append(exc)
            started.set()

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert started.wait(10)
        path = pooch.retrieve(slow, SHA, "two.bin", tmp_path, downloader=surefetch.pooch.downloader)
        assert Path(path).read_bytes() == DATA
    finally:
        thread.join(30)
    assert first_error == []
    assert (tmp_path / "one.bin").read_bytes() == DATA
    assert leftovers(tmp_path) == ["one.bin", "two.bin"]


def test_importing_surefetch_does_not_import_pooch() -> None:
    code = "import sys, surefetch, surefetch.pooch; print('pooch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
