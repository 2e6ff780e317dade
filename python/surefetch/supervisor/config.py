"""What ``surefetch supervise`` can be told: the restart backoff and the timings."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Backoff", "SupervisorConfig"]


@dataclass(frozen=True)
class Backoff:
    """Restart delays: ``initial * factor**(n-1)`` capped at ``cap``, times a random
    factor in ``[1 - jitter, 1]``, for the n-th consecutive failure."""

    initial: float = 0.5
    factor: float = 2.0
    cap: float = 30.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        for name in ("initial", "cap"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"backoff {name} must be a non-negative number of seconds")
        if not (math.isfinite(self.factor) and self.factor >= 1):
            raise ValueError("backoff factor must be at least 1")
        if not (0 <= self.jitter < 0.5):
            raise ValueError("backoff jitter must be in [0, 0.5) so that delays still grow")

    def delay(self, failures: int, rng: random.Random) -> float:
        if failures <= 0:
            return 0.0
        exponent = min(failures - 1, 64)
        base = min(self.cap, self.initial * self.factor**exponent)
        return base * (1.0 - self.jitter * rng.random())


@dataclass(frozen=True)
class SupervisorConfig:
    """Everything ``surefetch supervise`` can be told. Times are in seconds."""

    socket: Path
    workers: int = 2
    jobs_per_worker: int = 4
    db: str | None = None
    host: str | None = None
    backoff: Backoff = field(default_factory=Backoff)
    stable_after: float = 10.0
    degraded_after: int = 5
    degraded_window: float = 60.0
    start_timeout: float = 10.0
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 5.0
    cancel_grace: float = 5.0
    stop_grace: float = 5.0
    claim_ttl: float = 10.0
    poll_interval: float = 0.2
    max_job_crashes: int = 3
    worker_command: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.workers < 1 or self.jobs_per_worker < 1:
            raise ValueError("workers and jobs per worker must be at least 1")
        if self.degraded_after < 1 or self.max_job_crashes < 1:
            raise ValueError("degraded-after and max job crashes must be at least 1")
        for name in (
            "stable_after",
            "degraded_window",
            "start_timeout",
            "heartbeat_interval",
            "heartbeat_timeout",
            "cancel_grace",
            "stop_grace",
            "claim_ttl",
            "poll_interval",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name.replace('_', '-')} must be a positive number of seconds")
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ValueError("the heartbeat timeout must be longer than the heartbeat interval")
