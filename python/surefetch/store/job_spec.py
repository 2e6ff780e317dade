"""What a job is: its kinds and states, the spec it runs, and its values.

- :func:`job_spec` checks and normalizes what a job runs (a ``get`` or a ``sync``);
- :class:`Job` is one job as the queue (:mod:`surefetch.store.jobs`) stores it;
- :class:`Ending` is how one job ended, as a worker reports it;
- :class:`GroupOutcome` is what one of a worker's group commits did.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from surefetch.errors import SessionCancelled

__all__ = ["JOB_KINDS", "JOB_STATES", "Ending", "GroupOutcome", "Job", "job_spec"]

JOB_KINDS = ("get", "sync")
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")

_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Job:
    """One job as stored."""

    id: str
    kind: str
    spec: dict[str, Any]
    owner: str
    state: str
    cancel_requested: bool
    host: str | None
    worker: str | None
    crashes: int
    error: str | None
    result: dict[str, Any] | None
    created_at: float

    @property
    def finished(self) -> bool:
        return self.state in ("succeeded", "failed", "cancelled")

    def to_dict(self, local_host: str | None = None) -> dict[str, Any]:
        """The job for ``ctl jobs --json``: ``worker`` is the slot on ``local_host``,
        else ``host/slot``."""
        worker = self.worker
        if worker is not None and self.host is not None and self.host != local_host:
            worker = f"{self.host}/{worker}"
        return {
            "id": self.id,
            "kind": self.kind,
            "state": self.state,
            "worker": worker,
            "host": self.host,
            "owner": self.owner,
            "spec": self.spec,
            "cancel_requested": self.cancel_requested,
            "error": self.error,
            "result": self.result,
        }


@dataclass(frozen=True)
class Ending:
    """How one job ended, for `JobQueue.complete_many`."""

    job_id: str
    status: str  # succeeded, failed or cancelled
    error: str | None = None
    result: Mapping[str, Any] | None = None


def _absolute(name: str, value: object, *, directory_slash: bool = False) -> str:
    """`value`, an absolute path, normalized; with `directory_slash` a trailing ``/``
    stays (``get -o DIR/``: a directory, created if missing)."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a path")
    if "\x00" in value:
        raise ValueError(f"{name} contains a NUL character")
    if not os.path.isabs(value):
        raise ValueError(f"{name} {value!r} is relative; send an absolute path")
    normal = os.path.normpath(value)
    if directory_slash and value.endswith("/") and not normal.endswith("/"):
        return normal + "/"
    return normal


def job_spec(kind: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Checks and normalizes what a job runs.

    Args:
        kind: ``"get"`` or ``"sync"``.
        fields: for ``get``: ``url`` (http or https), ``dest`` (absolute path, a file or
            a directory to name the file in) and optional ``sha256``; for ``sync``:
            ``manifest``, ``lock`` and ``dest``, all absolute.

    Returns:
        The spec to store.

    Raises:
        ValueError: an unknown kind, a missing or invalid field, an unknown field.
    """
    allowed = {"get": {"url", "dest", "sha256"}, "sync": {"manifest", "lock", "dest"}}
    if kind not in allowed:
        raise ValueError(f"unknown job kind {kind!r}; use get or sync")
    unknown = sorted(set(fields) - allowed[kind])
    if unknown:
        raise ValueError(f"unknown field(s) for a {kind} job: {', '.join(unknown)}")
    if kind == "sync":
        return {key: _absolute(key, fields.get(key)) for key in ("manifest", "lock", "dest")}
    url = fields.get("url")
    if not isinstance(url, str) or len(url) > 8192:
        raise ValueError("a get job needs a url")
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https") or not urlsplit(url).netloc:
        raise ValueError(f"unsupported URL {url!r}: only http:// and https:// URLs are fetched")
    dest = _absolute("dest", fields.get("dest"), directory_slash=True)
    spec: dict[str, Any] = {"url": url, "dest": dest}
    sha256 = fields.get("sha256")
    if sha256 is not None:
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256.lower()):
            raise ValueError(f"sha256 must be 64 hex digits, not {sha256!r}")
        spec["sha256"] = sha256.lower()
    return spec


@dataclass(frozen=True)
class GroupOutcome:
    """What one worker's group commit (`JobQueue.commit_group`) did.

    Attributes:
        started: for each job asked to start: the job (now running), None when it is no
            longer the worker's or finished, or the `SessionCancelled` to raise (its
            cancellation was requested first; it is now cancelled).
        finished: for each job ending: True if this commit finished it.
        taken: queued jobs claimed for the worker and started in the same commit, when
            the worker takes its own next jobs.
    """

    started: dict[str, Job | SessionCancelled | None]
    finished: dict[str, bool]
    taken: list[Job]
