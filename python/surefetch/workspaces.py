"""Per-session staging directories with idempotent, race-free cleanup.

Layout under ``root``::

    <root>/<session id>/            the workspace (Workspace.path)
    <root>/.meta/<session id>.json  how it was created (strategy, preserve_on_failure)
    <root>/.trash/                  workspaces being deleted

Cleanup is one atomic ``rename`` of the workspace into ``.trash``: among any
number of concurrent callers, threads or processes, exactly one rename
succeeds. That caller deletes the directory, fires ``on_cleaned`` and gets
True; every other call gets False and never raises.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from surefetch._fs import write_json_atomic
from surefetch.errors import UnsafeDestination

if TYPE_CHECKING:
    from surefetch.store import SessionStore

__all__ = ["STRATEGIES", "Workspace", "WorkspaceManager"]

STRATEGIES = ("directory", "none")
_SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
_META = ".meta"
_TRASH = ".trash"


@dataclass(frozen=True)
class Workspace:
    """A session's staging area.

    Attributes:
        session_id: the session it belongs to.
        path: the directory to stage files in; None with strategy ``"none"``.
        strategy: ``"directory"`` or ``"none"``.
        preserve_on_failure: keep it when the session failed, until a forced cleanup.
    """

    session_id: str
    path: Path | None
    strategy: str
    preserve_on_failure: bool


class WorkspaceManager:
    """Creates and removes per-session workspaces under one root directory.

    Args:
        root: the directory holding every workspace (created if missing).
        on_cleaned: called as ``on_cleaned(session_id, path)`` exactly once for each
            workspace this manager's processes remove; an exception it raises is
            propagated to the one ``cleanup`` call that removed the workspace.
        store: the session store, consulted by :meth:`cleanup` for workspaces created
            with ``preserve_on_failure`` (is the session failed?). Optional:
            :meth:`mark_failed` records the same thing without a store.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        on_cleaned: Callable[[str, Path], object] | None = None,
        *,
        store: SessionStore | None = None,
    ) -> None:
        self.root = Path(root).absolute()
        self.on_cleaned = on_cleaned
        self.store = store

    def _check_id(self, session_id: str) -> str:
        if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
            raise UnsafeDestination(
                f"invalid session id {session_id!r} for a workspace: use letters, digits, "
                "'-' and '_' only (at most 128), so that the workspace stays inside "
                f"{self.root}"
            )
        return session_id

    def _dir(self, session_id: str) -> Path:
        return self.root / session_id

    def _meta(self, session_id: str) -> Path:
        return self.root / _META / f"{session_id}.json"

    def _read_meta(self, session_id: str) -> dict[str, object]:
        try:
            data = json.loads(self._meta(session_id).read_text("utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write_meta(self, session_id: str, data: dict[str, object]) -> None:
        meta = self._meta(session_id)
        meta.parent.mkdir(parents=True, exist_ok=True)
        # Durable: the file and its directory are synced (a crash keeps the old or the new).
        write_json_atomic(meta, data, durable=True)

    def create(
        self, session_id: str, strategy: str = "directory", preserve_on_failure: bool = False
    ) -> Workspace:
        """Creates the session's workspace, or returns it if it exists.

        Args:
            session_id: the session's id (letters, digits, ``-``, ``_``).
            strategy: ``"directory"`` (a fresh directory under root) or ``"none"``
                (no directory: the session works in place; cleanup removes nothing).
            preserve_on_failure: keep the workspace of a failed session for
                inspection; ``cleanup(id)`` then returns False until ``force=True``.

        Raises:
            UnsafeDestination: a session id that could leave the root.
            ValueError: an unknown strategy.
            OSError: the directory cannot be created.
        """
        self._check_id(session_id)
        if strategy not in STRATEGIES:
            raise ValueError(
                f"unknown workspace strategy {strategy!r}; use {' or '.join(STRATEGIES)}"
            )
        if strategy == "none":
            return Workspace(session_id, None, strategy, preserve_on_failure)
        path = self._dir(session_id)
        path.mkdir(parents=True, exist_ok=True)
        meta = self._read_meta(session_id)
        if not meta:
            meta = {"strategy": strategy, "preserve_on_failure": bool(preserve_on_failure)}
            self._write_meta(session_id, meta)
        return Workspace(session_id, path, strategy, bool(meta.get("preserve_on_failure")))

    def get(self, session_id: str) -> Workspace | None:
        """The session's workspace if it exists (strategy ``directory``), else None.

        Raises:
            UnsafeDestination: a session id that could leave the root.
        """
        self._check_id(session_id)
        path = self._dir(session_id)
        if not path.is_dir():
            return None
        meta = self._read_meta(session_id)
        return Workspace(session_id, path, "directory", bool(meta.get("preserve_on_failure")))

    def mark_failed(self, session_id: str) -> None:
        """Records that the session failed, so a preserved workspace is kept by cleanup.

        Raises:
            UnsafeDestination: a session id that could leave the root.
        """
        self._check_id(session_id)
        meta = self._read_meta(session_id)
        if meta and self._dir(session_id).is_dir():
            meta["failed"] = True
            self._write_meta(session_id, meta)

    def _preserved(self, session_id: str, meta: dict[str, object]) -> bool:
        if not meta.get("preserve_on_failure"):
            return False
        if meta.get("failed"):
            return True
        if self.store is not None:
            session = self.store.lookup(session_id)
            return session is not None and session.status == "failed"
        return False

    def cleanup(self, session_id: str, force: bool = False) -> bool:
        """Removes the session's workspace, once, whoever else is removing it at the same time.

        Safe to call any number of times, concurrently, from threads and processes;
        never raises for an unknown, already removed or invalid session id.

        Args:
            session_id: the session's id.
            force: remove it even if it is preserved because its session failed.

        Returns:
            True only for the one call that removed it.
        """
        if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
            return False
        path = self._dir(session_id)
        if not path.is_dir():
            return False
        meta = self._read_meta(session_id)
        if not force and self._preserved(session_id, meta):
            return False
        trash = self.root / _TRASH
        with contextlib.suppress(FileExistsError):
            trash.mkdir()
        doomed = trash / f"{session_id}.{uuid.uuid4().hex}"
        try:
            os.rename(path, doomed)
        except (FileNotFoundError, NotADirectoryError):
            return False  # another caller won the race
        with contextlib.suppress(FileNotFoundError):
            self._meta(session_id).unlink()
        shutil.rmtree(doomed, ignore_errors=True)
        if self.on_cleaned is not None:
            self.on_cleaned(session_id, path)
        return True

    def session_ids(self) -> list[str]:
        """The session ids that have a workspace directory under root."""
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        return sorted(
            e.name
            for e in entries
            if e.is_dir(follow_symlinks=False) and _SESSION_ID.fullmatch(e.name)
        )

    def cleanup_orphans(self, store: SessionStore) -> int:
        """Removes the workspaces whose session is finished or missing from ``store``.

        Preserved workspaces of failed sessions are kept. Leftovers of interrupted
        cleanups (in ``.trash``) and metadata of vanished workspaces are purged too.

        Args:
            store: the session store to check each workspace against.

        Returns:
            How many workspaces this call removed.
        """
        removed = 0
        for session_id in self.session_ids():
            session = store.lookup(session_id)
            if session is not None and not session.finished:
                continue
            meta = self._read_meta(session_id)
            preserved = bool(meta.get("preserve_on_failure")) and (
                session is not None and (session.status == "failed" or bool(meta.get("failed")))
            )
            if preserved:
                continue
            if self.cleanup(session_id, force=True):
                removed += 1
        trash = self.root / _TRASH
        if trash.is_dir():
            for entry in os.scandir(trash):
                shutil.rmtree(entry.path, ignore_errors=True)
        meta_dir = self.root / _META
        if meta_dir.is_dir():
            for entry in os.scandir(meta_dir):
                name = entry.name
                if (
                    name.endswith(".json")
                    and not self._dir(name[: -len(".json")]).is_dir()
                    and time.time() - entry.stat().st_mtime > 60  # not a create() in flight
                ):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
        return removed
