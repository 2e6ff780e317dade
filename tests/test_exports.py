"""The public API, frozen: what each module exports, and the import paths DESIGN.md promises.

Changing a frozen list is a decision about the API (DESIGN.md: change only by adding);
make it here on purpose, never to get a test green. The layers between modules are
checked by `lint-imports` (pyproject.toml); the rules that import-linter cannot see
(private names, the native module) are checked at the end of this file.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
import re
from pathlib import Path

import pytest

import surefetch
from surefetch.errors import Cancelled, SessionCancelled

PACKAGE_DIR = Path(surefetch.__file__).parent

# The top-level names, frozen.
TOP_LEVEL = [
    "Cache",
    "CacheEntry",
    "CancelToken",
    "Cancelled",
    "ChecksumMismatch",
    "DownloadItem",
    "DownloadResult",
    "DownloadTimeout",
    "HTTPError",
    "IntegrityError",
    "LockTimeout",
    "LockfileError",
    "LockfileOutdated",
    "ManifestError",
    "NetworkError",
    "NotOwner",
    "SessionCancelled",
    "SessionNotFound",
    "SizeMismatch",
    "StorageError",
    "SurefetchError",
    "TransferOptions",
    "UnsafeDestination",
    "__version__",
    "adownload",
    "download",
    "download_many",
    "sync",
]

# What the modules named in DESIGN.md export whatever file their code lives in
# ("Import paths stay"), and what the command line, the tests and the bench import.
PROMISED = {
    "surefetch.sessions": {
        "SCHEMA_VERSION",
        "CancellationEnforcer",
        "Session",
        "SessionStore",
        "default_db_url",
        "host_id",
    },
    "surefetch.workspaces": {"Workspace", "WorkspaceManager"},
    "surefetch.jobs": {"Job", "JobQueue", "job_spec"},
    "surefetch.supervisor": {"Backoff", "Supervisor", "SupervisorConfig", "request"},
    "surefetch.worker": {"EXIT_CONFIG", "main"},
    "surefetch.store": {
        "SCHEMA_VERSION",
        "CancellationEnforcer",
        "Database",
        "Job",
        "JobQueue",
        "Session",
        "SessionStore",
        "default_db_url",
        "job_spec",
    },
    "surefetch.errors": {"SessionCancelled", "SessionNotFound", "NotOwner", "Cancelled"},
    "surefetch.lockfile": {"sync", "verify"},
    "surefetch.cache": {"Cache"},
    "surefetch.download": {"DownloadResult", "download", "adownload"},
    "surefetch.server": {"create_app", "serve"},
}


def _public_modules() -> list[str]:
    """Every public module of the package (no ``_`` component), but ``__main__``."""
    names = ["surefetch"]
    for info in pkgutil.walk_packages([str(PACKAGE_DIR)], prefix="surefetch."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)


def _isort_key(name: str) -> tuple[int, list[object]]:
    """The order ruff's RUF022 keeps ``__all__`` in: SCREAMING_CASE, CamelCase, the rest;
    each group in natural order."""
    if name.upper() == name and any(c.isalpha() for c in name):
        group = 0
    elif name[:1].isupper():
        group = 1
    else:
        group = 2
    natural: list[object] = [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
    return group, natural


def test_the_top_level_names_are_frozen() -> None:
    assert surefetch.__all__ == TOP_LEVEL


def test_session_cancelled_is_exported() -> None:
    assert surefetch.SessionCancelled is SessionCancelled
    assert issubclass(SessionCancelled, Cancelled)
    assert importlib.import_module("surefetch.sessions").SessionStore  # its home


@pytest.mark.parametrize("name", _public_modules())
def test_all_is_sorted_and_every_name_imports(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    if exported is None:
        assert name in ("surefetch.cli",), f"{name} has no __all__"
        return
    assert list(exported) == sorted(exported, key=_isort_key), f"{name}.__all__ is not sorted"
    assert len(set(exported)) == len(exported), f"{name}.__all__ has duplicates"
    for attr in exported:
        assert getattr(module, attr, None) is not None, f"{name}.{attr} does not import"


@pytest.mark.parametrize("name", sorted(PROMISED))
def test_promised_import_paths_keep_their_names(name: str) -> None:
    module = importlib.import_module(name)
    assert PROMISED[name] <= set(module.__all__)
    for attr in PROMISED[name]:
        getattr(module, attr)


def test_old_paths_export_the_very_objects_of_their_new_homes() -> None:
    from surefetch import jobs, sessions, store, supervisor, worker
    from surefetch.store import enforcer
    from surefetch.supervisor import control
    from surefetch.supervisor import worker as supervised_worker

    assert sessions.SessionStore is store.SessionStore
    assert sessions.CancellationEnforcer is enforcer.CancellationEnforcer
    assert jobs.JobQueue is store.JobQueue
    assert supervisor.request is control.request
    assert worker.main is supervised_worker.main


# --- what import-linter cannot see ---------------------------------------------------------


def _package_sources() -> list[tuple[str, ast.Module]]:
    found = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found.append((name, ast.parse(path.read_text(), str(path))))
    return found


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _may_import(importer: str, module: str) -> bool:
    """A private module (a component starting with ``_``) is its parent package's own."""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if _is_private(part):
            parent = ".".join(parts[:i])
            return importer == parent or importer.startswith(parent + ".")
    return True


def test_no_module_uses_another_modules_private_names() -> None:
    """``from surefetch.x import _name`` and ``x._name`` are for x itself; a private module
    (``_core``, ``_procs``) is for the modules of its parent package. (Private attributes of
    objects, ``store._conn()``, are beyond a static check: reviews catch those.)"""
    bad: list[str] = []
    for importer, tree in _package_sources():
        modules: dict[str, str] = {}  # local name -> the surefetch module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("surefetch"):
                        local = alias.asname or alias.name.split(".")[0]
                        modules[local] = alias.name if alias.asname else local
                        if not _may_import(importer, alias.name):
                            bad.append(f"{importer}: imports private module {alias.name}")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("surefetch"):
                source = node.module or ""
                if not _may_import(importer, source):
                    bad.append(f"{importer}: imports from private module {source}")
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    if _is_module(full):
                        modules[alias.asname or alias.name] = full
                        if not _may_import(importer, full):
                            bad.append(f"{importer}: imports private module {full}")
                    elif _is_private(alias.name) and source != importer:
                        bad.append(f"{importer}: imports {alias.name} from {source}")
        for node in ast.walk(tree):
            if not (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in modules
                and _is_private(node.attr)
            ):
                continue
            full = f"{modules[node.value.id]}.{node.attr}"
            if not (_is_module(full) and _may_import(importer, full)):
                bad.append(f"{importer}: uses {node.value.id}.{node.attr}")
    assert bad == []


# Modules that still import the native module directly. DESIGN.md wants only `download`
# (and the package itself) to: remove a name from here when its module stops; never add one.
_CORE_IMPORTERS_LEFT: set[str] = set()


def test_only_download_imports_the_native_module() -> None:
    importers = set()
    for importer, tree in _package_sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names = {f"{node.module}.{a.name}" for a in node.names} | {node.module or ""}
            elif isinstance(node, ast.Import):
                names = {a.name for a in node.names}
            else:
                continue
            if "surefetch._core" in names:
                importers.add(importer)
    allowed = {"surefetch", "surefetch.download"} | _CORE_IMPORTERS_LEFT
    assert importers <= allowed, f"new importers of _core: {sorted(importers - allowed)}"
