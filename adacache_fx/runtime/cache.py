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
from .invariant import InvariantLists


@dataclass
class CacheEntry:
    """The last computed residuals of one branch in one call slot, and (for forecasts) earlier ones."""

    owner: Any  # what stored it; see the module docstring
    values: tuple[torch.Tensor, ...]
    history: list[tuple[int, tuple[torch.Tensor, ...]]] = field(default_factory=list)


@dataclass
class FoldedSpan:
    """What a span of blocks, each taking the last one's outputs and all reused together, adds to
    each stream: ``stream_out - stream_in`` at the step that computed it (see ``passes/fold.py``).

    ``bindings``: the span's blocks, in order, as bound then; ``residuals``: per stream, keyed by the
    output position at the span's first block; ``layouts``: the strides each block's outputs had,
    which a replay gives them again (the next block was captured for them); ``bridges``: see below."""

    bindings: tuple[Any, ...]
    residuals: dict[int, torch.Tensor]
    layouts: tuple[tuple[tuple[int, ...], ...], ...] = ()  # per block, the strides of its outputs then
    # Per block, the bridge from the block before (``runtime/bridges.py``); empty when none has one.
    # A bridged span's one stream gets its residual, in the last block's layout, from the last block.
    bridges: tuple[Any, ...] = ()

    @property
    def adds_at_last(self) -> bool:
        return bool(self.bridges)


class CacheState:
    """Residual caches of one session: per branch by (call slot, branch id), and folded spans by
    (call slot, first block)."""

    def __init__(self) -> None:
        self._entries: dict[tuple[int, str], CacheEntry] = {}
        self._spans: dict[tuple[int, str], FoldedSpan] = {}
        self.invariant = InvariantLists()  # step-invariant block lists (see invariant.py)
        self.peak = 0  # the most bytes held at once in the last generation (at each call's end)

    def span(self, slot: int, first_block: str) -> FoldedSpan | None:
        return self._spans.get((slot, first_block))

    def drop(self, slot: int, branch_id: str) -> None:
        self._entries.pop((slot, branch_id), None)

    def narrow(self, slot: int, branch_id: str, dtype: torch.dtype) -> None:
        """Hold the entry's floating tensors at ``dtype`` when that is narrower (a watched residual kept
        only for a policy's comparison, beside a folded span of that precision)."""
        entry = self._entries.get((slot, branch_id))
        if entry is None:
            return
        bits = torch.finfo(dtype).bits
        entry.values = tuple(v.to(dtype) if v.is_floating_point() and torch.finfo(v.dtype).bits > bits else v
                             for v in entry.values)

    def keep_span(self, slot: int, span: FoldedSpan) -> None:
        self._spans[(slot, span.bindings[0].path)] = span

    def slots(self) -> list[int]:
        return sorted({s for s, _ in self._entries} | {s for s, _ in self._spans})

    def spans(self, slot: int = 0) -> list[FoldedSpan]:
        return [span for (s, _), span in self._spans.items() if s == slot]

    def note_peak(self) -> None:
        """Fold the bytes held now into :attr:`peak` (once per model call)."""
        self.peak = max(self.peak, self.nbytes())

    def entry(self, slot: int, branch_id: str) -> CacheEntry | None:
        return self._entries.get((slot, branch_id))

    def keep(self, slot: int, branch_id: str, owner: Any, step: int, values: tuple[torch.Tensor, ...],
             history: int, stable: bool = False) -> None:
        """Store a branch's new residuals, and the last ``history`` of them for forecasts.

        ``stable``: ``values`` live in memory their producer reuses (a CUDA graph's output pool), so
        they are copied, into the entry's own tensors where it has them: a branch's cache keeps one
        address for the generation, which CUDA graphs read in place when it is reused (marked static
        inputs) instead of copying it into their own input buffers at every replay."""
        entry = self._entries.get((slot, branch_id))
        if stable:
            if history <= 1 and entry is not None and entry.owner is owner and _same_layout(entry.values, values):
                for held, value in zip(entry.values, values):
                    held.copy_(value)
                return
            values = tuple(_static_copy(value) for value in values)
        if entry is None or entry.owner is not owner:
            entry = self._entries[(slot, branch_id)] = CacheEntry(owner, values)
        entry.values = values
        if history > 1:
            entry.history.append((step, values))
            del entry.history[:-history]

    def holds_any(self) -> bool:
        """Whether anything is cached that a call could read instead of computing."""
        return bool(self._entries or self._spans or self.invariant.holds_any())

    def clear(self) -> None:
        self._entries.clear()
        self._spans.clear()
        self.invariant.clear()

    def values(self, slot: int = 0) -> dict[str, tuple[torch.Tensor, ...]]:
        """The residuals cached for call slot ``slot``, by branch id."""
        return {branch: e.values for (s, branch), e in self._entries.items() if s == slot}

    def nbytes(self, slot: int | None = None) -> int:
        """Bytes of every cached tensor (of call slot ``slot`` only, when given; the outputs of
        step-invariant lists are counted in the total only)."""
        seen: set[int] = set()
        total = self.invariant.nbytes() if slot is None else 0
        groups = [(s, (e.values, *(v for _, v in e.history))) for (s, _), e in self._entries.items()]
        groups += [(s, (tuple(span.residuals.values()),)) for (s, _), span in self._spans.items()]
        for entry_slot, tensor_groups in groups:
            if slot is not None and entry_slot != slot:
                continue
            for tensors in tensor_groups:
                for t in tensors:
                    if id(t) not in seen:
                        seen.add(id(t))
                        total += t.numel() * t.element_size()
        return total


def _same_layout(held: tuple[torch.Tensor, ...], values: tuple[torch.Tensor, ...]) -> bool:
    return len(held) == len(values) and all(
        a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and a.stride() == b.stride()
        for a, b in zip(held, values))


def _static_copy(value: torch.Tensor) -> torch.Tensor:
    """A copy of ``value`` that compiled graphs take as a static input (read where it lies)."""
    copy = value.clone()
    torch._dynamo.mark_static_address(copy, guard=False)  # one address per entry: no guard, no recompile
    return copy


def cond_rows(entry: CacheEntry, layout: str) -> CacheEntry:
    """What a block sees of a full guidance call's entry in a call that runs the cond half only:
    its cond rows (views, no copies)."""
    return CacheEntry(
        entry.owner,
        guidance.rows_view(entry.values, layout),
        [(step, guidance.rows_view(values, layout)) for step, values in entry.history],
    )
