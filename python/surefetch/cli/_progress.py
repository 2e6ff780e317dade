"""Progress bars on stderr: one per file, named after it, and one for a batch."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable


@contextmanager
def batch_progress_bar(
    enabled: bool,
) -> Iterator[Callable[[int, int, int, int], None] | None]:
    """One tqdm bar for a batch: files done/total, bytes, rate, ETA."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=False)

    def update(items_done: int, items: int, done: int, known: int) -> None:
        bar.set_description_str(f"{items_done}/{items} files", refresh=False)
        if bar.total != known:
            bar.total = known
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


def _fit_name(name: str, width: int) -> str:
    """`name` cut in the middle to at most `width` terminal columns, keeping its end
    (the extension): ``a_very_long_model_na…-00001.safetensors``."""
    from tqdm.utils import disp_len

    if disp_len(name) <= width:
        return name
    if width < 1:
        return ""
    dots = "…" if (sys.stderr.encoding or "").lower().replace("-", "") == "utf8" else "..."
    head, tail = list(name[: len(name) // 2]), list(name[len(name) // 2 :])
    while head or tail:
        text = "".join(head) + dots + "".join(tail)
        if disp_len(text) <= width:
            return text
        # Take from the head twice as often as from the tail: the tail holds the extension.
        if tail and (not head or len(tail) * 2 > len(head)):
            tail.pop(0)
        else:
            head.pop()
    return dots[:width]


_MIN_NAME_WIDTH = 12
"""Columns a file name keeps in a narrow terminal, even if the numbers then lose theirs."""


def named_bar(name: str, **kwargs: Any) -> Any:
    """A tqdm bar on stderr (bytes, rate, ETA) that starts with `name`, the file it is
    about, shortened in the middle to leave the numbers whole at the terminal's width
    (followed as it changes). `set_description_str` changes the name."""
    from tqdm import tqdm
    from tqdm.utils import disp_len

    class NamedBar(tqdm):  # type: ignore[type-arg]
        lead = ""  # shown whole before the name, e.g. "3/5 "

        @property
        def format_dict(self) -> dict[str, Any]:
            values = dict(super().format_dict)
            name, ncols = values.get("prefix") or "", values.get("ncols")
            if name and ncols:
                numbers = self.format_meter(**{**values, "prefix": "", "ncols": None})
                # tqdm writes "PREFIX: " before the numbers.
                room = ncols - disp_len(numbers) - 2 - disp_len(self.lead)
                name = _fit_name(name, max(room, _MIN_NAME_WIDTH))
            values["prefix"] = (self.lead + name).rstrip()
            return values

    return NamedBar(
        desc=name,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
        **kwargs,
    )


@contextmanager
def progress_bar(enabled: bool, name: str) -> Iterator[Callable[[int, int | None], None] | None]:
    """A bar on stderr naming the file (bytes, rate, ETA), or None when not wanted."""
    if not enabled:
        yield None
        return
    bar = named_bar(name)

    def update(done: int, total: int | None) -> None:
        if total is not None and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()
