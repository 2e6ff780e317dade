"""The manifest ``surefetch.toml``, and the checks its tables share with the lockfile's.

Format (DESIGN.md "On disk"): ``[[artifact]]`` tables with ``name``, ``url`` (http or
https) and optional ``sha256``, ``size``, ``path`` and ``executable``. Unknown keys are
errors (in the lockfile too), so that a typo (``sha265``) never silently weakens a pin.
Digests are lowercase hex (upper case is accepted on reading). A ``path`` is relative,
``/``-separated, normalised (``a//./b`` → ``a/b``), has no ``..`` component and does not
start with ``.surefetch``; an artifact without one is installed at ``<dest>/<name>`` (so
the name is checked the same way). No two artifacts may share a destination, nor may one
lie under another. Any of these → `ManifestError` (`LockfileError` for the lockfile),
naming the file and the artifact; the CLI exits 2.
"""

from __future__ import annotations

import os
import re
import sys
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, NoReturn, Protocol, Union

from surefetch.errors import ManifestError, SurefetchError, redact_url

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only
    import tomli as tomllib

__all__ = ["Manifest", "ManifestArtifact", "read_manifest"]

StrPath = Union[str, "os.PathLike[str]"]

STATE_DIR = ".surefetch"
"""Reserved in every destination: part files and sync's staging live there."""
HEX = re.compile(r"[0-9a-fA-F]+")
_CONTROL = re.compile(r"[\x00-\x1f]")
MANIFEST_KEYS = frozenset({"name", "url", "sha256", "size", "path", "executable"})
LOCK_KEYS = frozenset({"name", "url", "size", "sha256", "xxh3_128", "executable", "path"})


class ManifestArtifact(NamedTuple):
    """One ``[[artifact]]`` of the manifest, validated and normalised."""

    name: str
    url: str
    sha256: str | None = None
    size: int | None = None
    path: str | None = None
    executable: bool = False

    @property
    def target(self) -> str:
        """Where it goes, relative to the destination: `path`, else `name`."""
        return self.path if self.path is not None else self.name


class Manifest(NamedTuple):
    """A validated manifest: its artifacts in file order."""

    path: Path
    artifacts: tuple[ManifestArtifact, ...]


class Placed(Protocol):
    """An entry with a name and a place in the destination (manifest or lockfile)."""

    @property
    def name(self) -> str: ...
    @property
    def path(self) -> str | None: ...
    @property
    def target(self) -> str: ...


class TableChecker:
    """Turns one TOML table into checked values, raising `error` that names file and entry."""

    def __init__(self, error: type[SurefetchError], file: Path, table: object, index: int) -> None:
        self.error = error
        self.file = file
        self.where = f"artifact #{index + 1}"
        if not isinstance(table, dict):
            self.fail("must be a table ([[artifact]])")
        self.table: dict[str, Any] = table
        name = table.get("name")
        if isinstance(name, str) and name:
            self.where = f"artifact {name!r}"
        unknown = sorted(set(table) - self.allowed())
        if unknown:
            self.fail(f"unknown key {unknown[0]!r}")

    def allowed(self) -> frozenset[str]:
        return MANIFEST_KEYS if self.error is ManifestError else LOCK_KEYS

    def fail(self, problem: str) -> NoReturn:
        raise self.error(f"{self.file}: {self.where}: {problem}")

    def text(self, key: str, required: bool = True) -> str | None:
        value = self.table.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value:
            self.fail(f"{key!r} must be a non-empty string")
        if _CONTROL.search(value):
            self.fail(f"{key!r} must not contain control characters")
        return value

    def url(self) -> str:
        url = self.text("url")
        assert url is not None
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
            self.fail(f"url {redact_url(url)!r} must be an http or https URL")
        return url

    def digest(self, key: str, digits: int, required: bool) -> str | None:
        value = self.table.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not HEX.fullmatch(value) or len(value) != digits:
            self.fail(f"{key!r} must be {digits} hex digits")
        return value.lower()

    def size(self, required: bool) -> int | None:
        value = self.table.get("size")
        if value is None and not required:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.fail("'size' must be a whole number of bytes, 0 or more")
        return value

    def flag(self, key: str) -> bool:
        value = self.table.get(key, False)
        if not isinstance(value, bool):
            self.fail(f"{key!r} must be true or false")
        return value

    def relative(self, key: str, value: str) -> str:
        problem = path_problem(value)
        if problem:
            self.fail(f"{key} {value!r} {problem}")
        return "/".join(p for p in value.split("/") if p not in ("", "."))


def path_problem(value: str) -> str | None:
    """Why `value` is not a safe relative path inside the destination (None if it is)."""
    if value.startswith("/"):
        return "is absolute; use a path relative to the destination"
    if "\\" in value:
        return "contains a backslash; separate directories with /"
    parts = [p for p in value.split("/") if p not in ("", ".")]
    if not parts:
        return "names no file"
    if ".." in parts:
        return "contains '..'; it must stay inside the destination"
    if parts[0] == STATE_DIR:
        return f"is inside {STATE_DIR}/, which surefetch reserves"
    return None


def load_toml(path: Path, error: type[SurefetchError], what: str) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise error(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc
    return parse_toml(data, path, error, what)


def parse_toml(data: bytes, path: Path, error: type[SurefetchError], what: str) -> dict[str, Any]:
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise error(f"{path}: invalid TOML in the {what}: {exc}") from exc


def artifact_tables(
    doc: dict[str, Any], path: Path, error: type[SurefetchError], allowed: set[str]
) -> list[Any]:
    unknown = sorted(set(doc) - allowed - {"artifact"})
    if unknown:
        raise error(f"{path}: unknown top-level key {unknown[0]!r}")
    tables = doc.get("artifact", [])
    if not isinstance(tables, list):
        raise error(f"{path}: 'artifact' must be an array of tables ([[artifact]])")
    return tables


def check_targets(file: Path, error: type[SurefetchError], entries: Sequence[Placed]) -> None:
    """No two entries share a name or a target, and none lies under another's file."""
    names: set[str] = set()
    targets: dict[str, str] = {}
    for entry in entries:
        if entry.name in names:
            raise error(f"{file}: artifact {entry.name!r} appears twice; names must be unique")
        names.add(entry.name)
        if entry.path is None:
            problem = path_problem(entry.name)
            if problem:
                raise error(
                    f"{file}: artifact {entry.name!r}: with no 'path', the name is the file "
                    f"name, and it {problem}; set 'path'"
                )
        target = entry.target
        if target in targets:
            raise error(
                f"{file}: artifacts {targets[target]!r} and {entry.name!r} are both installed "
                f"at {target!r}"
            )
        targets[target] = entry.name
    for target, name in targets.items():
        parts = target.split("/")
        for i in range(1, len(parts)):
            above = "/".join(parts[:i])
            if above in targets:
                raise error(
                    f"{file}: artifact {name!r} at {target!r} lies under the file of "
                    f"artifact {targets[above]!r} ({above!r})"
                )


def read_manifest(path: StrPath = "surefetch.toml") -> Manifest:
    """Reads and validates a manifest.

    Args:
        path: the manifest file.

    Returns:
        The `Manifest`, artifacts in file order.

    Raises:
        ManifestError: missing, unreadable, not TOML, or an entry is invalid or unsafe
            (the message names the file and the artifact).
    """
    file = Path(os.fspath(path))
    try:
        doc = load_toml(file, ManifestError, "manifest")
    except FileNotFoundError:
        raise ManifestError(
            f"no manifest at {file}: create it with [[artifact]] entries, or pass --manifest"
        ) from None
    artifacts = []
    for i, table in enumerate(artifact_tables(doc, file, ManifestError, set())):
        c = TableChecker(ManifestError, file, table, i)
        name = c.text("name")
        raw_path = c.text("path", required=False)
        assert name is not None
        artifacts.append(
            ManifestArtifact(
                name=name,
                url=c.url(),
                sha256=c.digest("sha256", 64, required=False),
                size=c.size(required=False),
                path=None if raw_path is None else c.relative("path", raw_path),
                executable=c.flag("executable"),
            )
        )
    check_targets(file, ManifestError, artifacts)
    return Manifest(path=file, artifacts=tuple(artifacts))
