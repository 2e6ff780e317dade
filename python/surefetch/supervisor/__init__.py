"""Supervision: ``surefetch supervise`` runs jobs in worker processes and restarts them.

Modules, one concept each:

- :mod:`~surefetch.supervisor.supervisor` — :class:`Supervisor`: jobs, cancels, shutdown;
- :mod:`~surefetch.supervisor.slots` — the worker processes: start, heartbeat, restart;
- :mod:`~surefetch.supervisor.worker` — the worker process itself;
- :mod:`~surefetch.supervisor.control` — the control socket's protocol, and
  :func:`request`, its client;
- :mod:`~surefetch.supervisor.config` — :class:`SupervisorConfig` and :class:`Backoff`.

The names below are imported on first use, so that a worker process (which
imports :mod:`surefetch.supervisor.worker`) does not pay for the supervisor's
imports (asyncio) when it starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from surefetch.supervisor.config import Backoff, SupervisorConfig
    from surefetch.supervisor.control import request
    from surefetch.supervisor.supervisor import Supervisor

__all__ = ["Backoff", "Supervisor", "SupervisorConfig", "request"]

_LAZY = {
    "Backoff": "surefetch.supervisor.config",
    "Supervisor": "surefetch.supervisor.supervisor",
    "SupervisorConfig": "surefetch.supervisor.config",
    "request": "surefetch.supervisor.control",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'surefetch.supervisor' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
