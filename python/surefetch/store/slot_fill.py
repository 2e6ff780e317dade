"""How claimed jobs are spread over a host's worker slots (``w0``, ``w1``...).

:meth:`surefetch.store.jobs.JobQueue.claim` takes the oldest queued jobs and gives each
to the slot with the most room left, the lowest-numbered one on a tie.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["spread"]


def spread(free: Mapping[str, int], count: int) -> list[str]:
    """Spreads ``count`` jobs over the slots, least loaded (most free) first."""
    left = {slot: n for slot, n in free.items() if n > 0}
    order: list[str] = []
    while len(order) < count and left:
        slot = max(left, key=lambda s: (left[s], -_slot_index(s)))
        order.append(slot)
        left[slot] -= 1
        if left[slot] == 0:
            del left[slot]
    return order


def _slot_index(slot: str) -> int:
    digits = slot.lstrip("w")
    return int(digits) if digits.isdigit() else 0
