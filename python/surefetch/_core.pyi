"""The private native core of surefetch (Rust). Use the public names in `surefetch`."""

from collections.abc import Callable
from os import PathLike
from pathlib import Path
from typing import Any, final

__all__ = [
    "CancelToken",
    "__version__",
    "bare_name",
    "download",
    "download_many",
    "fit_name",
    "hash_file",
    "part_dir",
    "sync_filesystem",
]

__version__: str

@final
class CancelToken:
    def __init__(self) -> None: ...
    def cancel(self) -> None: ...
    @property
    def cancelled(self) -> bool: ...
    def child(self) -> CancelToken: ...

def download(
    url: str,
    dest: str | PathLike[str],
    *,
    sha256: str | None = None,
    xxh3_128: str | None = None,
    size: int | None = None,
    compute_sha256: bool = True,
    durable: bool = True,
    executable: bool = False,
    timeout: float | None = None,
    connect_timeout: float = 30.0,
    read_timeout: float | None = None,
    retries: int = 3,
    backoff_base: float = 0.25,
    backoff_cap: float = 10.0,
    headers: list[tuple[str, str]] | None = None,
    connections: int | None = None,
    resume: bool = True,
    speed_limit: int = 1024,
    speed_time: float = 30.0,
    content_disposition: bool = False,
    if_none_match: str | None = None,
    if_modified_since: str | None = None,
    cancel: CancelToken | None = None,
    progress: Callable[[int, int | None], Any] | None = None,
) -> dict[str, Any]: ...
def download_many(
    items: list[tuple[str, str | PathLike[str], dict[str, Any]]],
    *,
    jobs: int = 8,
    durable: bool = True,
    cancel: CancelToken | None = None,
    on_result: Callable[[int, dict[str, Any] | BaseException], Any],
    progress: Callable[[int, int, int, int], Any] | None = None,
    item_progress: Callable[[int, int, int | None], Any] | None = None,
) -> None: ...
def hash_file(
    path: str | PathLike[str], *, sha256: bool = True, cancel: CancelToken | None = None
) -> tuple[int, str, str | None]: ...
def bare_name(raw: str) -> str: ...
def fit_name(name: str | PathLike[str], suffix: str) -> str: ...
def sync_filesystem(path: str | PathLike[str]) -> None: ...
def part_dir(directory: str | PathLike[str]) -> Path: ...
