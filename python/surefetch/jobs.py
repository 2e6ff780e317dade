"""Supervised jobs: the import path of the job queue.

The code lives in :mod:`surefetch.store.jobs`; this module keeps exporting its
public names.
"""

from __future__ import annotations

from surefetch.store.jobs import JOB_KINDS, JOB_STATES, Job, JobQueue, job_spec

__all__ = ["JOB_KINDS", "JOB_STATES", "Job", "JobQueue", "job_spec"]
