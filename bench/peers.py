"""The Python peers that `bench/run.py` measures, one per sub-mode, each in its own process.

    python bench/peers.py MODE URL OUT [--sha256 HEX] [--max-files N] [--chunk-size BYTES]

Modes:
  requests         requests, stream=True, iter_content(1 MiB), written to OUT
  requests-sha256  the same, hashing every chunk with hashlib.sha256 and checking the digest
  urllib3          urllib3 PoolManager, preload_content=False, stream(1 MiB)
  pycurl           pycurl writing into OUT (1 MiB receive buffer)
  hf_transfer      hf_transfer.download(URL, OUT, max_files=N, chunk_size=BYTES)

Exit codes: 0 done · 1 error · 3 the digest did not match (requests-sha256 only).
Each mode imports only what it needs, so that start-up costs what a user's script would.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import sys

CHUNK = 1 << 20


def _requests(url: str, out: str, sha256: str | None) -> int:
    import requests

    digest = hashlib.sha256() if sha256 is not None else None
    with requests.get(url, stream=True, timeout=60) as resp, open(out, "wb") as f:
        resp.raise_for_status()
        for chunk in resp.iter_content(CHUNK):
            if digest is not None:
                digest.update(chunk)
            f.write(chunk)
    if digest is not None and digest.hexdigest() != sha256:
        print(f"sha256 mismatch: got {digest.hexdigest()}, expected {sha256}", file=sys.stderr)
        return 3
    return 0


def _urllib3(url: str, out: str) -> int:
    import urllib3

    http = urllib3.PoolManager()
    resp = http.request("GET", url, preload_content=False, timeout=60.0)
    try:
        if resp.status != 200:
            print(f"HTTP {resp.status}", file=sys.stderr)
            return 1
        with open(out, "wb") as f:
            for chunk in resp.stream(CHUNK):
                f.write(chunk)
    finally:
        resp.release_conn()
    return 0


def _pycurl(url: str, out: str) -> int:
    # No type stubs for pycurl: everything it returns is Any.
    pycurl = importlib.import_module("pycurl")
    curl = pycurl.Curl()
    try:
        with open(out, "wb") as f:
            curl.setopt(pycurl.URL, url)
            curl.setopt(pycurl.WRITEDATA, f)
            curl.setopt(pycurl.BUFFERSIZE, CHUNK)
            curl.setopt(pycurl.FAILONERROR, True)
            curl.perform()
    finally:
        curl.close()
    return 0


def _hf_transfer(url: str, out: str, max_files: int, chunk_size: int) -> int:
    # No type stubs for hf_transfer either.
    hf_transfer = importlib.import_module("hf_transfer")
    hf_transfer.download(url, out, max_files=max_files, chunk_size=chunk_size)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "mode", choices=["requests", "requests-sha256", "urllib3", "pycurl", "hf_transfer"]
    )
    parser.add_argument("url")
    parser.add_argument("out")
    parser.add_argument("--sha256", help="expected digest (requests-sha256)")
    parser.add_argument("--max-files", type=int, default=8)
    parser.add_argument("--chunk-size", type=int, default=16 << 20)
    args = parser.parse_args(argv)
    mode: str = args.mode
    url: str = args.url
    out: str = args.out
    if mode == "requests":
        return _requests(url, out, None)
    if mode == "requests-sha256":
        if args.sha256 is None:
            parser.error("requests-sha256 needs --sha256")
        return _requests(url, out, str(args.sha256))
    if mode == "urllib3":
        return _urllib3(url, out)
    if mode == "pycurl":
        return _pycurl(url, out)
    return _hf_transfer(url, out, int(args.max_files), int(args.chunk_size))


if __name__ == "__main__":
    sys.exit(main())
