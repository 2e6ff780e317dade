"""Sessions and their cancellation: the import path of DESIGN.md.

The code lives in :mod:`surefetch.store` (the store, its tables, the enforcer);
this module keeps exporting its public names.
"""

from __future__ import annotations

from surefetch._procs import host_id
from surefetch.store import SCHEMA_VERSION
from surefetch.store.db import default_db_url
from surefetch.store.enforcer import CancellationEnforcer
from surefetch.store.session_table import (
    CANCELLATION_STATUSES,
    FINISHED_STATUSES,
    NOTIFY_CHANNEL,
    STATUSES,
    UI_STATUSES,
    Session,
)
from surefetch.store.sessions import SessionStore

__all__ = [
    "CANCELLATION_STATUSES",
    "FINISHED_STATUSES",
    "NOTIFY_CHANNEL",
    "SCHEMA_VERSION",
    "STATUSES",
    "UI_STATUSES",
    "CancellationEnforcer",
    "Session",
    "SessionStore",
    "default_db_url",
    "host_id",
]
