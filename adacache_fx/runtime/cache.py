"""Cache state: what each branch stored, for whom, and since when.

One :class:`CacheState` per session (a caller's run of generations). An entry belongs to the
*owner* that stored it, the block's binding to one program at one epoch of the live model: a block
re-captured because the model changed, or called at new shapes, never reads another owner's
residuals. Graphs take caches as inputs and return new ones as outputs; nothing here lives inside a
graph, so the graphs stay pure functions that compile and export.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from . import guidance


@dataclass
class CacheEntry:
    """The last computed residuals of one branch in one call slot, and (for forecasts) earlier ones."""

    owner: Any  # what stored it; see the module docstring
    values: tuple[torch.Tensor, ...]
    history: list[tuple[int, tuple[torch.Tensor, ...]]] = field(default_factory=list)


class CacheState:
    """Residual caches of one session, by (call slot, branch id)."""

    def __init__(self) -> None:
        self._entries: dict[tuple[int, str], CacheEntry] = {}

    def entry(self, slot: int, branch_id: str) -> CacheEntry | None:
        return self._entries.get((slot, branch_id))

    def keep(self, slot: int, branch_id: str, owner: Any, step: int, values: tuple[torch.Tensor, ...],
             history: int) -> None:
        """Store a branch's new residuals, and the last ``history`` of them for forecasts."""
        entry = self._entries.get((slot, branch_id))
        if entry is None or entry.owner is not owner:
            entry = self._entries[(slot, branch_id)] = CacheEntry(owner, values)
        entry.values = values
        if history > 1:
            entry.history.append((step, values))
            del entry.history[:-history]

    def clear(self) -> None:
        self._entries.clear()

    def values(self, slot: int = 0) -> dict[str, tuple[torch.Tensor, ...]]:
        """The residuals cached for call slot ``slot``, by branch id."""
        return {branch: e.values for (s, branch), e in self._entries.items() if s == slot}

    def nbytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for entry in self._entries.values():
            for tensors in (entry.values, *(v for _, v in entry.history)):
                for t in tensors:
                    if id(t) not in seen:
                        seen.add(id(t))
                        total += t.numel() * t.element_size()
        return total


def cond_rows(entry: CacheEntry, layout: str) -> CacheEntry:
    """What a block sees of a full guidance call's entry in a call that runs the cond half only:
    its cond rows (views, no copies)."""
    return CacheEntry(
        entry.owner,
        guidance.rows_view(entry.values, layout),
        [(step, guidance.rows_view(values, layout)) for step, values in entry.history],
    )
