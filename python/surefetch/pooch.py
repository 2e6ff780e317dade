"""A downloader for pooch: its fetches get surefetch's verified, resumable, cancellable transfer.

pooch (https://www.fatiando.org/pooch) takes any callable as ``downloader=``::

    import pooch
    import surefetch.pooch

    path = pooch.retrieve(url, known_hash="sha256:…", downloader=surefetch.pooch.downloader)
    data = pooch.create(path=…, base_url=…, registry={…})
    data.fetch("file.nc", downloader=surefetch.pooch.SurefetchDownloader(progressbar=True))

pooch hands the downloader a temporary file beside the final one, checks the
known hash itself once the downloader returns, and only then moves the file
into place; a file whose hash differs raises `ValueError` and leaves nothing
behind. Within that, this downloader:

- streams the body through surefetch's engine: retries with backoff (cut
  bodies resume where they stopped), timeouts, the low-speed limit, parallel
  ranged connections for large files, Ctrl+C within 100 ms;
- keeps the part file of an interrupted transfer under ``<data dir>/.surefetch/``
  keyed by the URL, so that the next fetch of the same URL resumes it (pooch's
  own temporary file has a new name each time);
- passes the registry's hash down when `Pooch.fetch` calls it and the hash is a
  SHA-256 or an XXH3-128 (``pooch.retrieve`` does not tell its downloader the
  hash), so that a wrong body is refused while it streams;
- draws pooch's progress bar (``progressbar=True``: tqdm on stderr, or any
  object with ``total``, ``update``, ``reset`` and ``close``, as pooch's own
  downloaders accept).

Errors: a hash mismatch found by surefetch is raised as a `ValueError` (pooch's
convention, which ``retry_if_failed`` counts on), with the `ChecksumMismatch` as
its cause; every other failure is surefetch's own exception (`HTTPError`,
`NetworkError`, `DownloadTimeout`, `Cancelled`, ...), after surefetch's retries.

This module does not import pooch (``pip install 'surefetch[pooch]'`` installs it).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, Union

from surefetch.download import (
    SHA256_HEX,
    CancelToken,
    DownloadResult,
    ProgressCallback,
    TransferOptions,
    download,
    fit_name,
    name_from_url,
)
from surefetch.errors import ChecksumMismatch, LockTimeout, redact_url

__all__ = ["SurefetchDownloader", "downloader"]

OutputFile = Union[str, "os.PathLike[str]", IO[bytes]]

_HEX = {"sha256": SHA256_HEX, "xxh3_128": re.compile(r"[0-9a-f]{32}")}


class SurefetchDownloader:
    """A pooch ``downloader=`` callable that downloads with surefetch.

    Args:
        progressbar: True for a tqdm bar on stderr (as pooch draws it), or a
            progress bar object of your own (``total``, ``update(n)``, ``reset()``,
            ``close()``, as pooch accepts); False for none.
        options: how each download behaves (`surefetch.TransferOptions`: connections,
            timeouts in seconds, retries (a cut body resumes), the low-speed limit,
            headers, netrc).
        durable: fsync the downloaded file (before pooch moves it into place).
        cancel: a token whose cancellation stops a download within milliseconds.
        changes: fields of `TransferOptions` (``retries=5``, ``headers=...``) that
            override `options`.

    Raises:
        ValueError: an invalid option.
        TypeError: a keyword that is not a `TransferOptions` field.
    """

    def __init__(
        self,
        *,
        progressbar: Any = False,
        options: TransferOptions | None = None,
        durable: bool = True,
        cancel: CancelToken | None = None,
        **changes: Any,
    ) -> None:
        self.progressbar = progressbar
        self.options = TransferOptions.of(options, **changes)
        self.durable = durable
        self.cancel = cancel

    def __repr__(self) -> str:
        return f"surefetch.pooch.SurefetchDownloader(progressbar={self.progressbar!r})"

    def __call__(
        self,
        url: str,
        output_file: OutputFile | None,
        pooch: Any | None,
        check_only: bool | None = False,
    ) -> bool | None:
        """Downloads `url` into `output_file`, or only checks that it is there.

        Args:
            url: an http or https URL.
            output_file: the path of the file to write (pooch's temporary file),
                or a binary file object to write into.
            pooch: the `pooch.Pooch` calling (None from ``pooch.retrieve``); its
                registry gives the known hash of `url`, when there is one.
            check_only: only check that the server has `url` (a HEAD request,
                redirects followed) and download nothing.

        Returns:
            With `check_only`, whether the server answered 200; otherwise None.

        Raises:
            ValueError: the body does not match the registry's hash, or an invalid
                argument (URL scheme, option).
            HTTPError, NetworkError: the download failed (after retries).
            DownloadTimeout: a timeout expired.
            Cancelled: the `cancel` token was cancelled; what was received is kept.
            StorageError: the file could not be written.
            KeyboardInterrupt: Ctrl+C, within 100 ms; what was received is kept.
        """
        if check_only:
            return self._available(url)
        if output_file is None:
            raise ValueError("output_file is required unless check_only=True")
        expected = _known_digests(url, pooch)
        with _Progress(self.progressbar) as progress:
            try:
                if isinstance(output_file, (str, os.PathLike)):
                    result = self._download_to(url, Path(output_file), expected, progress)
                else:
                    result = self._download_into(url, output_file, expected, progress)
            except ChecksumMismatch as exc:
                what = exc.algorithm.upper() or "hash"
                raise ValueError(
                    f"{what} of the file downloaded from {redact_url(url)} does not match the "
                    f"one the pooch registry knows: expected {exc.expected}, got {exc.actual}; "
                    "the file may have changed on the server, or the registry may be outdated"
                ) from exc
            progress.finish(result.size)
        return None

    def _download(
        self, url: str, dest: Path, expected: dict[str, str], progress: _Progress
    ) -> DownloadResult:
        return download(
            url,
            dest,
            sha256=expected.get("sha256"),
            xxh3_128=expected.get("xxh3_128"),
            options=self.options,
            durable=self.durable,
            compute_sha256="sha256" in expected,  # pooch hashes the file itself
            cancel=self.cancel,
            progress=progress.callback,
        )

    def _download_to(
        self, url: str, target: Path, expected: dict[str, str], progress: _Progress
    ) -> DownloadResult:
        """Downloads under a name of the URL's in `target`'s directory, so that a part
        file left by an interrupted fetch is resumed by the next one, then renames
        the file to `target`."""
        staging = target.parent / _staging_name(url)
        try:
            result = self._download(url, staging, expected, progress)
        except LockTimeout:
            # Another process is fetching the same URL into this directory: do what
            # pooch itself does, download into the temporary file it gave us.
            return self._download(url, target, expected, progress)
        try:
            os.replace(staging, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(staging)
            raise
        return result

    def _download_into(
        self, url: str, file: IO[bytes], expected: dict[str, str], progress: _Progress
    ) -> DownloadResult:
        with tempfile.TemporaryDirectory(prefix="surefetch-pooch-") as directory:
            result = self._download(url, Path(directory, "download"), expected, progress)
            with open(result.path, "rb") as data:
                shutil.copyfileobj(data, file)
        return result

    def _available(self, url: str) -> bool:
        import requests  # a dependency of pooch's

        response = requests.head(
            url,
            headers=dict(self.options.headers),
            timeout=(self.options.connect_timeout, self.options.read_timeout),
            allow_redirects=True,
        )
        return response.status_code == 200


downloader = SurefetchDownloader()
"""A ready `SurefetchDownloader` with surefetch's defaults and no progress bar."""


def _staging_name(url: str) -> str:
    """A hidden name for `url`'s download, the same every time: its part file resumes."""
    key = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    return fit_name(f".{name_from_url(url)}", f".{key}.pooch")


def _known_digests(url: str, pooch: Any | None) -> dict[str, str]:
    """``{"sha256": hex}`` or ``{"xxh3_128": hex}`` when `pooch`'s registry holds
    exactly one such hash for `url`; else empty (pooch still checks any hash)."""
    registry = getattr(pooch, "registry", None)
    get_url = getattr(pooch, "get_url", None)
    if not isinstance(registry, Mapping) or get_url is None:
        return {}
    known = {registry[name] for name in registry if get_url(name) == url}
    if len(known) != 1:
        return {}
    value = known.pop()
    if not isinstance(value, str):
        return {}
    parts = value.lower().split(":")
    if len(parts) == 1:
        parts.insert(0, "sha256")  # pooch's default algorithm
    if len(parts) == 2 and parts[0] in _HEX and _HEX[parts[0]].fullmatch(parts[1]):
        return {parts[0]: parts[1]}
    return {}


class _Progress:
    """pooch's progress bar, fed by surefetch's progress callback."""

    def __init__(self, progressbar: Any) -> None:
        self._given = progressbar
        self._bar: Any = None
        self._done = 0

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None and self._given is True:
            self._bar.close()  # a bar of our own; one given to us is closed on success only

    @property
    def callback(self) -> ProgressCallback | None:
        return self._update if self._given else None

    def _start(self, total: int) -> None:
        if self._given is True:
            from tqdm import tqdm

            # As pooch's HTTPDownloader draws it.
            self._bar = tqdm(
                total=total,
                ncols=79,
                ascii=sys.platform == "win32",
                unit="B",
                unit_scale=True,
                leave=True,
                file=sys.stderr,
            )
        else:
            self._bar = self._given
            self._bar.total = total

    def _update(self, done: int, total: int | None) -> None:
        if self._bar is None:
            self._start(total or 0)
        elif total and self._bar.total != total:
            self._bar.total = total
        if done > self._done:
            self._bar.update(done - self._done)
            self._done = done

    def finish(self, size: int) -> None:
        """Fills the bar to `size` and closes it (as pooch does at the end)."""
        if not self._given:
            return
        if self._bar is None:
            self._start(size)
        if self._done != size or self._given is not True:
            self._bar.reset()  # pooch's own order: reset, update by the size, close
            self._bar.update(size)
        self._bar.close()
        self._bar = None
