"""The private native core of surefetch (Rust). Use the public names in `surefetch`."""

from collections.abc import Callable, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, final

__all__ = [
    "CREDENTIAL_PARAMETERS",
    "Batch",
    "CancelToken",
    "__version__",
    "bare_name",
    "default_options",
    "download",
    "download_many",
    "fit_name",
    "hash_file",
    "part_dir",
    "place_many",
    "sync_filesystem",
    "warm_up",
]

__version__: str
CREDENTIAL_PARAMETERS: list[str]

@final
class CancelToken:
    def __init__(self) -> None: ...
    def cancel(self) -> None: ...
    @property
    def cancelled(self) -> bool: ...
    def child(self) -> CancelToken: ...

@final
class Batch:
    def __new__(cls, *, jobs: int = 8, durable: bool = True) -> Batch: ...
    def submit(
        self,
        url: str,
        dest: str | PathLike[str],
        options: dict[str, Any],
        cancel: CancelToken | None = None,
    ) -> int: ...
    def results(self, timeout: float) -> list[tuple[int, dict[str, Any] | BaseException]]: ...
    def close(self) -> None: ...

def download(
    url: str,
    dest: str | PathLike[str],
    options: dict[str, Any] | None = None,
    *,
    cancel: CancelToken | None = None,
    progress: Callable[[int, int | None], Any] | None = None,
) -> dict[str, Any]: ...
def default_options() -> dict[str, Any]: ...
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
def warm_up() -> None: ...
def part_dir(directory: str | PathLike[str]) -> Path: ...
def place_many(
    items: Sequence[tuple[str | PathLike[str], str | PathLike[str], int]],
    link_mode: str,
    *,
    verify: bool,
) -> list[tuple[str, tuple[int, str] | None] | OSError]: ...
