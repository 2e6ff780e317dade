"""Tests of surefetch.testing.FaultServer: real HTTP over loopback."""

from __future__ import annotations

import email.utils
import gzip
import http.client
import json
import selectors
import socket
import socketserver
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import requests

from surefetch.testing import FaultServer, gzipped

DATA = bytes(range(256)) * 400  # 102400 bytes, every offset distinguishable mod 256


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer() as srv:
        srv.add("data.bin", DATA)
        yield srv


class Reply:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


def fetch(
    url: str, headers: dict[str, str] | None = None, method: str = "GET", timeout: float = 5.0
) -> Reply:
    """One request with http.client, which follows nothing and decodes nothing."""
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    conn = http.client.HTTPConnection(parts.netloc, timeout=timeout)
    try:
        conn.request(method, target, headers=headers or {})
        resp = conn.getresponse()
        return Reply(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def raw_exchange(server: FaultServer, request: bytes, timeout: float = 5.0) -> bytes:
    """Send raw request bytes; return everything received until the server closes."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(request)
        received = bytearray()
        while chunk := sock.recv(65536):
            received += chunk
        return bytes(received)


# -- normal behaviour --------------------------------------------------------


def test_get_serves_whole_body_with_validators(server: FaultServer) -> None:
    reply = fetch(server.url + "/data.bin")
    assert reply.status == 200
    assert reply.body == DATA
    assert reply.headers["Content-Length"] == str(len(DATA))
    assert reply.headers["Accept-Ranges"] == "bytes"
    etag = reply.headers["ETag"]
    assert etag.startswith('"') and etag.endswith('"')
    assert email.utils.parsedate_to_datetime(reply.headers["Last-Modified"]) is not None
    assert server.bytes_sent == len(DATA)
    assert server.bytes_sent_for("data.bin") == len(DATA)
    assert server.request_count("data.bin") == 1


def test_add_returns_url_and_url_property(server: FaultServer) -> None:
    assert server.url == f"http://127.0.0.1:{server.port}"
    url = server.add("dir/a file.txt", b"hello")
    assert url == server.url + "/dir/a%20file.txt"
    assert fetch(url).body == b"hello"
    with pytest.raises(ValueError, match="replace"):
        server.add("dir/a file.txt", b"again")
    with pytest.raises(KeyError):
        server.replace("missing", b"x")


def test_head_sends_headers_only(server: FaultServer) -> None:
    reply = fetch(server.url + "/data.bin", method="HEAD")
    assert reply.status == 200
    assert reply.body == b""
    assert reply.headers["Content-Length"] == str(len(DATA))
    assert "ETag" in reply.headers
    assert server.bytes_sent == 0
    assert server.request_count("data.bin", method="HEAD") == 1


def test_unknown_name_is_404_and_not_counted(server: FaultServer) -> None:
    reply = fetch(server.url + "/nope")
    assert reply.status == 404
    assert server.bytes_sent == 0


def test_unknown_parameter_is_400_but_underscore_is_ignored(server: FaultServer) -> None:
    reply = fetch(server.url + "/data.bin?cutt=10")
    assert reply.status == 400
    assert b"cutt" in reply.body
    assert fetch(server.url + "/data.bin?cut=ten").status == 400
    assert fetch(server.url + "/data.bin?_unique=7").body == DATA
    assert fetch(server.url + "/data.bin?filename=a%0D%0AX-Injected:%201").status == 400


@pytest.mark.parametrize(
    "query",
    [
        "trickle=0",
        "trickle=1&trickle_after=-1",
        "trickel=10",
        "range_align=x",
        "range_whole=maybe",
        "ok_with_range=2",
        "max_range_end=-1",
        "max_range_status=600",
        "etag_per_response=yes%20please",
    ],
)
def test_new_parameters_reject_bad_values(server: FaultServer, query: str) -> None:
    assert fetch(server.url + "/data.bin?" + query).status == 400


def test_keep_alive_reuses_one_connection(server: FaultServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        ports = set()
        for _ in range(3):
            conn.request("GET", "/data.bin")
            resp = conn.getresponse()
            assert resp.read() == DATA
            assert conn.sock is not None
            ports.add(conn.sock.getsockname()[1])
        assert len(ports) == 1
    finally:
        conn.close()
    assert server.bytes_sent == 3 * len(DATA)


def test_connections_counts_tcp_connections(server: FaultServer) -> None:
    assert server.connections == 0
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        for _ in range(3):
            conn.request("GET", "/data.bin", headers={"Range": "bytes=0-9"})
            assert conn.getresponse().read() == DATA[:10]
    finally:
        conn.close()
    assert server.connections == 1
    fetch(server.url + "/data.bin")
    fetch(server.url + "/data.bin?_x=1")
    assert server.connections == 3
    assert len(server.requests) == 5
    server.reset_counters()
    assert server.connections == 0
    fetch(server.url + "/data.bin")
    assert server.connections == 1


def test_localhost_names_the_same_server(server: FaultServer) -> None:
    url = server.url_for("data.bin", host="localhost")
    assert url == f"http://localhost:{server.port}/data.bin"
    assert fetch(url).body == DATA


def test_url_for_encodes_parameters(server: FaultServer) -> None:
    url = server.url_for("data.bin", cut=10, gzip=True, redirect_to="http://x/y?a=1&b=2")
    assert url.startswith(server.url + "/data.bin?cut=10&gzip=1&redirect_to=http")
    assert "a%3D1%26b%3D2" in url


def test_requests_are_recorded_with_headers(server: FaultServer) -> None:
    fetch(server.url + "/data.bin?_x=1", headers={"Range": "bytes=0-9", "X-Test": "yes"})
    (record,) = server.requests
    assert record.method == "GET"
    assert record.name == "data.bin"
    assert record.target == "/data.bin?_x=1"
    assert record.query == "_x=1"
    assert record.range == "bytes=0-9"
    assert record.headers["x-test"] == "yes"
    assert record.time <= time.monotonic()


def test_reset_counters(server: FaultServer) -> None:
    url = server.url + "/data.bin?flaky=1"
    assert fetch(url).status == 503
    assert fetch(url).status == 200
    server.reset_counters()
    assert server.bytes_sent == 0
    assert server.requests == []
    assert server.request_count("data.bin") == 0
    assert fetch(url).status == 503


def test_counters_are_exact_under_concurrency(server: FaultServer) -> None:
    def worker() -> None:
        for _ in range(5):
            assert fetch(server.url + "/data.bin", headers={"Range": "bytes=100-"}).status == 206

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert server.bytes_sent == 40 * (len(DATA) - 100)
    assert server.request_count("data.bin") == 40


# -- ranges ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "first", "last"),
    [
        ("bytes=0-9", 0, 9),
        ("bytes=1000-", 1000, len(DATA) - 1),
        ("bytes=-100", len(DATA) - 100, len(DATA) - 1),
        ("bytes=100-999999999", 100, len(DATA) - 1),
        ("bytes=-999999999", 0, len(DATA) - 1),
        ("bytes=0-18446744073709551614", 0, len(DATA) - 1),
        ("bytes=7-" + "9" * 5000, 7, len(DATA) - 1),
        ("bytes=-" + "9" * 5000, 0, len(DATA) - 1),
        ("bytes=00010-00019", 10, 19),
    ],
)
def test_range_gives_206(server: FaultServer, spec: str, first: int, last: int) -> None:
    reply = fetch(server.url + "/data.bin", headers={"Range": spec})
    assert reply.status == 206
    assert reply.body == DATA[first : last + 1]
    assert reply.headers["Content-Range"] == f"bytes {first}-{last}/{len(DATA)}"
    assert reply.headers["Content-Length"] == str(last - first + 1)
    assert server.bytes_sent == last - first + 1


@pytest.mark.parametrize(
    "spec",
    [f"bytes={len(DATA)}-", "bytes=999999999-", "bytes=-0", "bytes=1" + "0" * 5000 + "-"],
)
def test_unsatisfiable_range_is_416(server: FaultServer, spec: str) -> None:
    reply = fetch(server.url + "/data.bin", headers={"Range": spec})
    assert reply.status == 416
    assert reply.headers["Content-Range"] == f"bytes */{len(DATA)}"


@pytest.mark.parametrize(
    "spec",
    ["bytes=0-1,5-6", "bytes=9-3", "items=0-5", "bytes=x-y", "bytes=a-5", "bytes=-", "bytes=²-"],
)
def test_multiple_or_malformed_ranges_are_ignored(server: FaultServer, spec: str) -> None:
    reply = fetch(server.url + "/data.bin", headers={"Range": spec})
    assert reply.status == 200
    assert reply.body == DATA


@pytest.mark.parametrize(
    ("spec", "status"),
    [("bytes=²-", 200), ("bytes=000-", 206), ("bytes=1" + "0" * 5000 + "-", 500)],
)
def test_ranged_only_reads_any_range_header(server: FaultServer, spec: str, status: int) -> None:
    reply = fetch(server.url + "/data.bin?ranged_only=1&status=500", headers={"Range": spec})
    assert reply.status == status


def test_empty_file_range_is_416() -> None:
    with FaultServer() as srv:
        url = srv.add("empty", b"")
        assert fetch(url).body == b""
        assert fetch(url, headers={"Range": "bytes=0-"}).status == 416


def test_if_range_etag(server: FaultServer) -> None:
    url = server.url + "/data.bin"
    etag = fetch(url, method="HEAD").headers["ETag"]
    same = fetch(url, headers={"Range": "bytes=10-", "If-Range": etag})
    assert (same.status, same.body) == (206, DATA[10:])
    other = fetch(url, headers={"Range": "bytes=10-", "If-Range": '"other"'})
    assert (other.status, other.body) == (200, DATA)
    weak = fetch(url, headers={"Range": "bytes=10-", "If-Range": "W/" + etag})
    assert weak.status == 200


def test_if_range_date(server: FaultServer) -> None:
    url = server.url + "/data.bin"
    date = fetch(url, method="HEAD").headers["Last-Modified"]
    assert fetch(url, headers={"Range": "bytes=10-", "If-Range": date}).status == 206
    earlier = email.utils.formatdate(
        email.utils.parsedate_to_datetime(date).timestamp() - 60, usegmt=True
    )
    assert fetch(url, headers={"Range": "bytes=10-", "If-Range": earlier}).status == 200


def test_if_range_does_not_override_416_check_when_mismatched(server: FaultServer) -> None:
    headers = {"Range": "bytes=999999999-", "If-Range": '"other"'}
    assert fetch(server.url + "/data.bin", headers=headers).status == 200


def test_replace_changes_validators(server: FaultServer) -> None:
    url = server.url + "/data.bin"
    before = fetch(url, method="HEAD").headers
    new = b"new content" * 1000
    server.replace("data.bin", new)
    after = fetch(url, method="HEAD").headers
    assert after["ETag"] != before["ETag"]
    assert email.utils.parsedate_to_datetime(
        after["Last-Modified"]
    ) > email.utils.parsedate_to_datetime(before["Last-Modified"])
    for validator in (before["ETag"], before["Last-Modified"]):
        reply = fetch(url, headers={"Range": "bytes=10-", "If-Range": validator})
        assert (reply.status, reply.body) == (200, new)


def test_explicit_and_absent_validators() -> None:
    with FaultServer() as srv:
        tagged = srv.add("tagged", b"x", etag="v1", last_modified=0)
        headers = fetch(tagged).headers
        assert headers["ETag"] == '"v1"'
        assert headers["Last-Modified"] == "Thu, 01 Jan 1970 00:00:00 GMT"
        bare = srv.add("bare", b"x", etag=None, last_modified=None)
        headers = fetch(bare).headers
        assert "ETag" not in headers and "Last-Modified" not in headers


def test_no_validators_and_weak_etag(server: FaultServer) -> None:
    url = server.url + "/data.bin"
    etag = fetch(url, method="HEAD").headers["ETag"]
    bare = fetch(url + "?no_validators=1", headers={"Range": "bytes=5-", "If-Range": etag})
    assert "ETag" not in bare.headers and "Last-Modified" not in bare.headers
    assert bare.status == 200
    weak = fetch(url + "?weak_etag=1")
    assert weak.headers["ETag"] == "W/" + etag
    weak_range = fetch(
        url + "?weak_etag=1", headers={"Range": "bytes=5-", "If-Range": weak.headers["ETag"]}
    )
    assert weak_range.status == 200


def test_no_range_ignores_range(server: FaultServer) -> None:
    reply = fetch(server.url + "/data.bin?no_range=1", headers={"Range": "bytes=10-"})
    assert (reply.status, reply.body) == (200, DATA)
    assert "Accept-Ranges" not in reply.headers


# -- misbehaving ranges ------------------------------------------------------------


def test_ok_with_range_answers_200_with_the_ranged_bytes(server: FaultServer) -> None:
    url = server.url + "/data.bin?ok_with_range=1"
    normal = fetch(server.url + "/data.bin", method="HEAD").headers
    reply = fetch(url, headers={"Range": "bytes=1000-1999"})
    assert reply.status == 200
    assert reply.body == DATA[1000:2000]
    assert reply.headers["Content-Length"] == "1000"
    assert reply.headers["Content-Range"] == f"bytes 1000-1999/{len(DATA)}"
    assert reply.headers["ETag"] == normal["ETag"]
    assert reply.headers["Last-Modified"] == normal["Last-Modified"]
    assert server.bytes_sent == 1000
    whole = fetch(url)
    assert (whole.status, whole.body, whole.headers["Content-Range"]) == (200, DATA, None)
    assert fetch(url, headers={"Range": "bytes=999999999-"}).status == 416
    stale = fetch(url, headers={"Range": "bytes=10-", "If-Range": '"other"'})
    assert (stale.status, stale.body, stale.headers["Content-Range"]) == (200, DATA, None)


def test_ignore_if_range_honours_any_range(server: FaultServer) -> None:
    url = server.url + "/data.bin?ignore_if_range=1"
    date = fetch(url, method="HEAD").headers["Last-Modified"]
    earlier = email.utils.formatdate(
        email.utils.parsedate_to_datetime(date).timestamp() - 60, usegmt=True
    )
    for condition in ('"other"', "W/" + '"other"', earlier, "garbage"):
        reply = fetch(url, headers={"Range": "bytes=10-", "If-Range": condition})
        assert (reply.status, reply.body) == (206, DATA[10:]), condition
    bare = fetch(url + "&no_validators=1", headers={"Range": "bytes=10-19", "If-Range": '"other"'})
    assert (bare.status, bare.body) == (206, DATA[10:20])
    assert fetch(url, headers={"Range": "bytes=999999999-", "If-Range": '"x"'}).status == 416


def test_range_no_validators_strips_them_from_206_only(server: FaultServer) -> None:
    url = server.url + "/data.bin?range_no_validators=1"
    whole = fetch(url)
    assert whole.status == 200
    assert "ETag" in whole.headers and "Last-Modified" in whole.headers
    part = fetch(url, headers={"Range": "bytes=10-", "If-Range": whole.headers["ETag"]})
    assert (part.status, part.body) == (206, DATA[10:])
    assert "ETag" not in part.headers and "Last-Modified" not in part.headers
    ok = fetch(url + "&ok_with_range=1", headers={"Range": "bytes=10-"})
    assert ok.status == 200 and ok.headers["ETag"] == whole.headers["ETag"]


@pytest.mark.parametrize(
    ("spec", "first", "last"),
    [
        ("bytes=70000-", 65536, len(DATA) - 1),
        ("bytes=70000-70009", 65536, 70009),
        ("bytes=65536-65539", 65536, 65539),
        ("bytes=100-199", 0, 199),
        ("bytes=-100", 65536, len(DATA) - 1),
    ],
)
def test_range_align_rounds_the_start_down(
    server: FaultServer, spec: str, first: int, last: int
) -> None:
    reply = fetch(server.url + "/data.bin?range_align=65536", headers={"Range": spec})
    assert reply.status == 206
    assert reply.headers["Content-Range"] == f"bytes {first}-{last}/{len(DATA)}"
    assert reply.headers["Content-Length"] == str(last - first + 1)
    assert reply.body == DATA[first : last + 1]


def test_range_align_must_be_positive(server: FaultServer) -> None:
    assert fetch(server.url + "/data.bin?range_align=0").status == 400
    assert fetch(server.url + "/data.bin?range_align=-1").status == 400
    one = fetch(server.url + "/data.bin?range_align=1", headers={"Range": "bytes=5-"})
    assert one.body == DATA[5:]


@pytest.mark.parametrize("spec", ["bytes=70000-70009", "bytes=-5", "bytes=999999999-", "bytes=x"])
def test_range_whole_sends_everything_as_206(server: FaultServer, spec: str) -> None:
    reply = fetch(server.url + "/data.bin?range_whole=1", headers={"Range": spec})
    assert reply.status == 206
    assert reply.headers["Content-Range"] == f"bytes 0-{len(DATA) - 1}/{len(DATA)}"
    assert reply.headers["Content-Length"] == str(len(DATA))
    assert reply.body == DATA


def test_range_whole_without_a_range_or_with_a_stale_if_range(server: FaultServer) -> None:
    url = server.url + "/data.bin?range_whole=1"
    assert fetch(url).status == 200
    stale = fetch(url, headers={"Range": "bytes=10-", "If-Range": '"other"'})
    assert (stale.status, stale.body, stale.headers["Content-Range"]) == (200, DATA, None)
    empty = server.add("empty", b"")
    assert fetch(empty + "?range_whole=1", headers={"Range": "bytes=0-"}).status == 416


def test_etag_per_response_is_new_every_time(server: FaultServer) -> None:
    url = server.url + "/data.bin?etag_per_response=1"
    plain = fetch(server.url + "/data.bin", method="HEAD").headers
    replies = [fetch(url), fetch(url, method="HEAD"), fetch(url), fetch(url + "&gzip=1")]
    tags = [reply.headers["ETag"] for reply in replies]
    assert len(set(tags)) == len(tags)
    for tag in tags:
        assert tag.startswith(plain["ETag"][:-1] + "-") and tag.endswith('"')
    assert "-gzip-" in tags[-1]
    assert replies[0].body == replies[2].body == DATA
    assert {r.headers["Last-Modified"] for r in replies} == {plain["Last-Modified"]}
    server.reset_counters()
    assert fetch(url).headers["ETag"] not in tags
    weak = fetch(url + "&weak_etag=1").headers["ETag"]
    assert weak.startswith("W/" + plain["ETag"][:-1] + "-")


def test_etag_per_response_never_matches_if_range(server: FaultServer) -> None:
    url = server.url + "/data.bin?etag_per_response=1"
    first = fetch(url).headers
    for condition in (first["ETag"], first["Last-Modified"], '"anything"'):
        reply = fetch(url, headers={"Range": "bytes=10-", "If-Range": condition})
        assert (reply.status, reply.body) == (200, DATA), condition
        assert reply.headers["Content-Range"] is None
    # a Range without If-Range is still honoured
    assert fetch(url, headers={"Range": "bytes=10-"}).body == DATA[10:]


def test_etag_per_response_with_ignore_if_range(server: FaultServer) -> None:
    url = server.url + "/data.bin?etag_per_response=1&ignore_if_range=1"
    tag = fetch(url, method="HEAD").headers["ETag"]
    reply = fetch(url, headers={"Range": "bytes=10-", "If-Range": tag})
    assert (reply.status, reply.body) == (206, DATA[10:])
    assert reply.headers["ETag"] not in (tag, None)


@pytest.mark.parametrize(
    ("spec", "status"),
    [
        ("bytes=0-18446744073709551614", 500),
        ("bytes=0-2147483648", 500),
        ("bytes=100-" + "9" * 5000, 500),
        ("bytes=0-2147483647", 206),
        ("bytes=0-", 206),
        ("bytes=2147483648-", 416),  # past the size: the usual 416, not CODE
        ("bytes=-2147483648", 206),
        ("bytes=9-3", 200),  # invalid, ignored as usual
    ],
)
def test_max_range_end(server: FaultServer, spec: str, status: int) -> None:
    reply = fetch(server.url + "/data.bin?max_range_end=2147483647", headers={"Range": spec})
    assert reply.status == status
    if status == 500:
        assert reply.body.startswith(b"500 Internal Server Error")
        assert reply.headers["Content-Range"] is None
        assert server.bytes_sent == 0


def test_max_range_end_with_416_like_nginx(server: FaultServer) -> None:
    url = server.url + "/data.bin?max_range_end=9223372036854775807&max_range_status=416"
    reply = fetch(url, headers={"Range": "bytes=0-18446744073709551614"})
    assert reply.status == 416
    assert reply.headers["Content-Range"] == f"bytes */{len(DATA)}"
    assert reply.body.startswith(b"416 ")
    head = fetch(url, method="HEAD", headers={"Range": "bytes=0-18446744073709551614"})
    assert (head.status, head.body) == (416, b"")
    assert fetch(url, headers={"Range": "bytes=0-9223372036854775807"}).body == DATA
    assert fetch(url, headers={"Range": "bytes=10-"}).body == DATA[10:]


def test_max_range_end_only_where_the_range_is_honoured(server: FaultServer) -> None:
    url = server.url + "/data.bin?max_range_end=100"
    spec = {"Range": "bytes=0-1000"}
    assert fetch(url, headers=spec).status == 500
    assert fetch(url + "&no_range=1", headers=spec).status == 200
    assert fetch(url, headers={**spec, "If-Range": '"other"'}).status == 200
    assert fetch(url + "&max_range_status=503", headers=spec).status == 503
    assert fetch(url + "&max_range_status=99", headers=spec).status == 400


# -- transient faults -------------------------------------------------------------


def test_cut_truncates_then_closes(server: FaultServer) -> None:
    with pytest.raises(http.client.IncompleteRead) as info:
        fetch(server.url + "/data.bin?cut=1000")
    assert info.value.partial == DATA[:1000]
    assert server.bytes_sent == 1000


def test_cut_counts_from_the_range_start(server: FaultServer) -> None:
    with pytest.raises(http.client.IncompleteRead) as info:
        fetch(server.url + "/data.bin?cut=100", headers={"Range": "bytes=5000-"})
    assert info.value.partial == DATA[5000:5100]


def test_cut_with_times_applies_to_first_requests_only(server: FaultServer) -> None:
    url = server.url + "/data.bin?cut=10&times=2"
    for _ in range(2):
        with pytest.raises(http.client.IncompleteRead):
            fetch(url)
    assert fetch(url).body == DATA
    assert server.bytes_sent == 20 + len(DATA)
    # counted per method and per exact query
    assert fetch(url, method="HEAD").status == 200
    with pytest.raises(http.client.IncompleteRead):
        fetch(url + "&_other=1")


def test_cut_with_reset_sends_rst(server: FaultServer) -> None:
    request = b"GET /data.bin?cut=1000&reset=1 HTTP/1.1\r\nHost: x\r\n\r\n"
    with pytest.raises(ConnectionResetError):
        raw_exchange(server, request)


def test_length_larger_than_body(server: FaultServer) -> None:
    with pytest.raises(http.client.IncompleteRead) as info:
        fetch(server.url + f"/data.bin?length={len(DATA) + 50}")
    assert info.value.partial == DATA
    assert server.bytes_sent == len(DATA)


def test_length_smaller_than_body(server: FaultServer) -> None:
    response = raw_exchange(server, b"GET /data.bin?length=100 HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"Content-Length: 100\r\n" in head
    assert body == DATA  # written past the declared length, then closed
    assert fetch(server.url + "/data.bin?length=100").body == DATA[:100]


def test_status_with_retry_after(server: FaultServer) -> None:
    reply = fetch(server.url + "/data.bin?status=429&retry_after=7")
    assert reply.status == 429
    assert reply.headers["Retry-After"] == "7"
    assert reply.body.startswith(b"429")
    assert server.bytes_sent == 0


def test_status_times(server: FaultServer) -> None:
    url = server.url + "/data.bin?status=500&times=1"
    assert fetch(url).status == 500
    assert fetch(url).status == 200


def test_flaky_fails_first_n_per_url(server: FaultServer) -> None:
    url = server.url + "/data.bin?flaky=2"
    assert [fetch(url).status for _ in range(3)] == [503, 503, 200]
    other = server.url + "/data.bin?flaky=1&flaky_status=502&retry_after=1"
    first = fetch(other)
    assert (first.status, first.headers["Retry-After"]) == (502, "1")
    assert fetch(other).body == DATA


def test_wrong_flips_one_byte(server: FaultServer) -> None:
    body = fetch(server.url + "/data.bin?wrong=1").body
    assert len(body) == len(DATA)
    diffs = [i for i in range(len(DATA)) if body[i] != DATA[i]]
    assert diffs == [len(DATA) // 2]
    assert body[len(DATA) // 2] == DATA[len(DATA) // 2] ^ 0xFF
    ranged = fetch(server.url + "/data.bin?wrong=1", headers={"Range": "bytes=50000-"}).body
    assert ranged != DATA[50000:] and len(ranged) == len(DATA) - 50000
    head = fetch(server.url + "/data.bin?wrong=1", headers={"Range": "bytes=0-99"}).body
    assert head == DATA[:100]


def test_hang_headers_delays_everything(server: FaultServer) -> None:
    url = server.url + "/data.bin?hang_headers=0.3"
    with pytest.raises(TimeoutError):
        fetch(url, timeout=0.1)
    started = time.monotonic()
    assert fetch(url).body == DATA
    assert time.monotonic() - started >= 0.28


def test_hang_sends_headers_then_stalls(server: FaultServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=0.1)
    try:
        conn.request("GET", "/data.bin?hang=0.4")
        resp = conn.getresponse()  # headers arrive at once
        assert resp.status == 200
        with pytest.raises(TimeoutError):
            resp.read(1)
    finally:
        conn.close()
    started = time.monotonic()
    assert fetch(server.url + "/data.bin?hang=0.3").body == DATA
    assert time.monotonic() - started >= 0.28


def test_stall_after_sends_prefix_then_stalls(server: FaultServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=0.15)
    try:
        conn.request("GET", "/data.bin?stall_after=5000&stall=10")
        resp = conn.getresponse()
        assert resp.read(5000) == DATA[:5000]
        with pytest.raises(TimeoutError):
            resp.read(1)
    finally:
        conn.close()
    started = time.monotonic()
    assert fetch(server.url + "/data.bin?stall_after=5000&stall=0.3").body == DATA
    assert time.monotonic() - started >= 0.28


def test_throttle_paces_the_body(server: FaultServer) -> None:
    started = time.monotonic()
    body = fetch(server.url + "/data.bin?throttle=200000").body
    elapsed = time.monotonic() - started
    assert body == DATA
    # 102400 bytes at 200 kB/s: 0.51 s; the first 10 kB slice goes at once.
    assert 0.4 <= elapsed <= 1.0


def read_for(sock: socket.socket, seconds: float) -> bytes:
    """Everything that arrives on ``sock`` within ``seconds`` (or until it closes)."""
    deadline = time.monotonic() + seconds
    received = bytearray()
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        received += chunk
    return bytes(received)


def test_trickle_sends_a_prefix_then_a_trickle(server: FaultServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /data.bin?trickle=100&trickle_after=1000 HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = read_for(sock, 0.05).partition(b"\r\n\r\n")
        assert f"Content-Length: {len(DATA)}\r\n".encode() in head
        assert 1000 <= len(body) <= 1010  # the prefix at once, then 10 bytes a tick
        body += read_for(sock, 0.3)
    assert body == DATA[: len(body)]
    assert 1020 <= len(body) <= 1050, len(body)


@pytest.mark.parametrize("query", ["", "&chunked=1"])
def test_trickle_delivers_the_whole_body(server: FaultServer, query: str) -> None:
    started = time.monotonic()
    body = fetch(server.url + "/data.bin?trickle=100000&trickle_after=80000" + query).body
    elapsed = time.monotonic() - started
    assert body == DATA
    # 22,400 trickled bytes: 10,000 at once, 10,000 a tick later, the rest a tick after.
    assert 0.18 <= elapsed <= 1.0


def test_trickle_ends_when_the_client_goes(server: FaultServer) -> None:
    baseline = threading.active_count()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /data.bin?trickle=1&trickle_after=10 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_for(sock, 0.1).endswith(DATA[:11])  # the prefix and one trickled byte
        assert threading.active_count() > baseline
    deadline = time.monotonic() + 1.0
    while threading.active_count() > baseline and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() <= baseline  # the handler noticed within a tick or so
    assert server.bytes_sent == 11


def test_trickle_with_times_trickles_once(server: FaultServer) -> None:
    url = server.url + "/data.bin?trickle=10&trickle_after=100000&times=1"
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("GET", urlsplit(url).path + "?" + urlsplit(url).query)
        resp = conn.getresponse()
        assert resp.read(100000) == DATA[:100000]
        started = time.monotonic()
        assert resp.read(4) == DATA[100000:100004]
        assert time.monotonic() - started >= 0.25  # one byte a tick
    finally:
        conn.close()
    started = time.monotonic()
    assert fetch(url).body == DATA  # the retry is served normally
    assert time.monotonic() - started < 0.5
    assert fetch(url, headers={"Range": "bytes=100000-"}).body == DATA[100000:]


def test_trickle_ranged_only_with_times(server: FaultServer) -> None:
    url = server.url + "/data.bin?ranged_only=1&trickle=10&trickle_after=1000&times=1"
    ranged = {"Range": "bytes=100-"}
    target = urlsplit(url).path + "?" + urlsplit(url).query
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        # the first request is a range: it trickles
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nRange: bytes=100-\r\n\r\n".encode())
        head, _, body = read_for(sock, 0.25).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 206 ")
    assert body == DATA[100 : 100 + len(body)]
    assert 1001 <= len(body) <= 1004
    started = time.monotonic()
    assert fetch(url, headers=ranged).body == DATA[100:]
    assert fetch(url + "&_a=1", headers={"Range": "bytes=0-"}).body == DATA  # not past 0
    assert fetch(url + "&_b=1").body == DATA  # no Range at all
    # times counts the request ranged_only exempted, so this range is served normally
    assert fetch(url + "&_b=1", headers=ranged).body == DATA[100:]
    assert time.monotonic() - started < 0.5


# -- persistent behaviours -------------------------------------------------------


def test_redirect_chain(server: FaultServer) -> None:
    url = server.url + "/data.bin?redirect=3&_k=v"
    hops = []
    for _ in range(3):
        reply = fetch(url)
        assert reply.status == 302
        url = reply.headers["Location"]
        hops.append(url)
    assert hops == [
        server.url + "/data.bin?redirect=2&_k=v",
        server.url + "/data.bin?redirect=1&_k=v",
        server.url + "/data.bin?_k=v",
    ]
    assert fetch(url).body == DATA
    followed = requests.get(server.url + "/data.bin?redirect=3", timeout=5)
    assert followed.content == DATA
    assert len(followed.history) == 3


def test_redirect_keeps_the_host_name(server: FaultServer) -> None:
    reply = fetch(server.url_for("data.bin", host="localhost", redirect=1))
    assert reply.headers["Location"] == f"http://localhost:{server.port}/data.bin"


def test_redirect_status_and_loop(server: FaultServer) -> None:
    reply = fetch(server.url + "/data.bin?redirect=1&redirect_status=307")
    assert reply.status == 307
    loop = fetch(server.url + "/data.bin?loop=1&redirect_status=301")
    assert loop.status == 301
    assert loop.headers["Location"] == server.url + "/data.bin?loop=1&redirect_status=301"
    with pytest.raises(requests.TooManyRedirects):
        requests.get(server.url + "/data.bin?loop=1", timeout=5)
    assert fetch(server.url + "/data.bin?redirect_status=300").status == 400


def test_redirect_to_another_host_drops_authorization(server: FaultServer) -> None:
    with FaultServer() as other:
        target = other.url + "/anything?echo_headers=1"
        url = server.url_for("data.bin", redirect=1, redirect_to=target)
        first = fetch(url)
        assert first.headers["Location"] == server.url_for("data.bin", redirect_to=target)
        assert fetch(first.headers["Location"]).headers["Location"] == target
        reply = requests.get(url, headers={"Authorization": "Bearer secret"}, timeout=5)
        echoed = reply.json()
        assert "authorization" not in echoed  # requests drops it across hosts
        assert echoed["host"] == f"127.0.0.1:{other.port}"
        assert server.request_count("data.bin") == 4
        assert other.request_count("anything") == 1


def test_redirect_to_any_scheme(server: FaultServer) -> None:
    reply = fetch(server.url_for("data.bin", redirect_to="file:///etc/passwd"))
    assert (reply.status, reply.headers["Location"]) == (302, "file:///etc/passwd")


def test_gzip_sends_compressed_bytes(server: FaultServer) -> None:
    url = server.url + "/data.bin?gzip=1"
    plain_etag = fetch(server.url + "/data.bin", method="HEAD").headers["ETag"]
    reply = fetch(url, headers={"Accept-Encoding": "identity"})
    assert reply.headers["Content-Encoding"] == "gzip"
    assert reply.body == gzipped(DATA)
    assert gzip.decompress(reply.body) == DATA
    assert reply.headers["ETag"] == plain_etag[:-1] + '-gzip"'
    assert server.bytes_sent == len(gzipped(DATA))
    part = fetch(url, headers={"Range": "bytes=10-"})
    assert (part.status, part.body) == (206, gzipped(DATA)[10:])


def test_no_length_is_close_delimited(server: FaultServer) -> None:
    response = raw_exchange(server, b"GET /data.bin?no_length=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"Content-Length" not in head
    assert b"Connection: close" in head
    assert body == DATA
    assert fetch(server.url + "/data.bin?no_length=1").body == DATA


def test_no_length_with_cut_cannot_be_detected_by_the_client(server: FaultServer) -> None:
    assert fetch(server.url + "/data.bin?no_length=1&cut=10").body == DATA[:10]


def test_chunked(server: FaultServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        for _ in range(2):  # keep-alive works across chunked bodies
            conn.request("GET", "/data.bin?chunked=1")
            resp = conn.getresponse()
            assert resp.headers["Transfer-Encoding"] == "chunked"
            assert resp.headers["Content-Length"] is None
            assert resp.read() == DATA
    finally:
        conn.close()
    with pytest.raises(http.client.IncompleteRead):
        fetch(server.url + "/data.bin?chunked=1&cut=10")


def test_echo_headers(server: FaultServer) -> None:
    with urllib.request.urlopen(
        urllib.request.Request(
            server.url + "/whatever?echo_headers=1",
            headers={"Accept-Encoding": "identity", "X-Custom": "1"},
        ),
        timeout=5,
    ) as resp:
        echoed = json.loads(resp.read())
        assert resp.headers["Content-Type"] == "application/json"
    assert echoed["accept-encoding"] == "identity"
    assert echoed["x-custom"] == "1"
    assert echoed["host"] == f"127.0.0.1:{server.port}"
    assert server.requests[0].headers == echoed


def test_filename_adds_content_disposition(server: FaultServer) -> None:
    reply = fetch(server.url + "/data.bin?filename=report.csv")
    assert reply.headers["Content-Disposition"] == 'attachment; filename="report.csv"'


def test_urllib_sees_http_errors(server: FaultServer) -> None:
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(server.url + "/data.bin?status=503", timeout=5)
    assert info.value.code == 503
    info.value.close()


# -- robustness ---------------------------------------------------------------------


def test_client_disconnect_mid_body_is_silent(capfd: pytest.CaptureFixture[str]) -> None:
    with FaultServer() as srv:
        srv.add("big", b"z" * (32 << 20))
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
            sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.recv(1000)
        assert fetch(srv.url + "/big", method="HEAD").status == 200
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize(
    "query",
    [
        "hang_headers=30",
        "hang=30",
        "stall_after=10&stall=30",
        "stall_after=10",
        "trickle=1",
        "trickle=0.01&trickle_after=10",
    ],
)
def test_stop_is_prompt_with_a_stalled_request(query: str) -> None:
    srv = FaultServer().start()
    srv.add("f", DATA)
    errors: list[BaseException] = []

    def client() -> None:
        try:
            fetch(srv.url + "/f?" + query, timeout=30)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=client)
    thread.start()
    deadline = time.monotonic() + 2
    while not srv.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    assert srv.requests
    time.sleep(0.05)
    started = time.monotonic()
    srv.stop()
    assert time.monotonic() - started < 1.0
    thread.join(2)
    assert not thread.is_alive()
    assert errors  # the client saw the connection end
    srv.stop()  # idempotent


def test_stop_closes_idle_keep_alive_connections() -> None:
    srv = FaultServer().start()
    srv.add("f", b"x")
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    conn.request("GET", "/f")
    assert conn.getresponse().read() == b"x"
    started = time.monotonic()
    srv.stop()
    assert time.monotonic() - started < 1.0
    assert conn.sock is not None
    assert conn.sock.recv(1) == b""
    conn.close()
    with pytest.raises(RuntimeError):
        srv.start()


class _AlwaysReadable(selectors.DefaultSelector):
    """Reports every registered socket readable: what select() says of a listening
    socket whose pending connection is reset before accept() takes it."""

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        time.sleep(0.01)
        return [(key, selectors.EVENT_READ) for key in self.get_map().values()]


def test_stop_is_bounded_when_accept_finds_no_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    # socketserver's serving loops wait with this selector class, then accept().
    monkeypatch.setattr(socketserver, "_ServerSelector", _AlwaysReadable)
    srv = FaultServer().start()
    srv.add("f", b"x")
    assert fetch(srv.url_for("f")).body == b"x"  # a real connection is still accepted
    time.sleep(0.1)  # the serving thread is waiting in accept() by now
    stopper = threading.Thread(target=srv.stop, daemon=True)
    started = time.monotonic()
    stopper.start()
    stopper.join(3)
    assert not stopper.is_alive(), "stop() hangs while the serving thread waits in accept()"
    assert time.monotonic() - started < 1.5


def test_a_large_body_arrives_whole() -> None:
    """A 64 MiB body is sent whole (its rate belongs in bench/, not in a unit test)."""
    size = 64 << 20
    with FaultServer() as srv:
        srv.add("big", bytes(size))
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
            sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            buf = bytearray(1 << 20)
            received = 0
            while n := sock.recv_into(buf):
                received += n
        assert srv.bytes_sent == size
    assert received > size
