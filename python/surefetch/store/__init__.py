"""The store: sessions, users, jobs and supervisors in one SQLite or PostgreSQL database.

Modules, one concept each:

- :mod:`~surefetch.store.db` — the backends, pooled connections, the migration registry;
- :mod:`~surefetch.store.checks` — checks of the names, titles and metadata stored;
- :mod:`~surefetch.store.session_table` — the sessions table and its row operations;
- :mod:`~surefetch.store.sessions` — :class:`SessionStore`, the sessions API;
- :mod:`~surefetch.store.users` — API users and their bearer tokens;
- :mod:`~surefetch.store.job_spec` — what a job is: :func:`job_spec`, :class:`Job`;
- :mod:`~surefetch.store.job_table` — the jobs table and its row operations;
- :mod:`~surefetch.store.jobs` — :class:`JobQueue`, the supervisors' job queue;
- :mod:`~surefetch.store.slot_fill` — how claimed jobs are spread over worker slots;
- :mod:`~surefetch.store.supervisors` — which supervisor holds each host id;
- :mod:`~surefetch.store.enforcer` — :class:`CancellationEnforcer`.

Each module that owns tables registers their migrations when it is imported;
importing this package imports them all, so a store is always migrated to
:data:`SCHEMA_VERSION`.
"""

from __future__ import annotations

from surefetch.store.db import Database, default_db_url, known_schema_version
from surefetch.store.enforcer import CancellationEnforcer
from surefetch.store.jobs import JOB_KINDS, JOB_STATES, Job, JobQueue, job_spec
from surefetch.store.session_table import Session
from surefetch.store.sessions import SessionStore

__all__ = [
    "JOB_KINDS",
    "JOB_STATES",
    "SCHEMA_VERSION",
    "CancellationEnforcer",
    "Database",
    "Job",
    "JobQueue",
    "Session",
    "SessionStore",
    "default_db_url",
    "job_spec",
]

#: The schema version this surefetch migrates a store to.
SCHEMA_VERSION = known_schema_version()
