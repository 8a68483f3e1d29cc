"""Exact reuse of step-invariant block lists: a list whose inputs do not change from step to step.

A text refiner (Lumina2's ``context_refiner``, fusers and adapters that see only the prompt) gets the
same inputs at every step of a generation, so it returns the same outputs: they can be reused
exactly, whatever the policy decided, instead of being recomputed or approximated. Per call slot:

* step 0: the list's first block called keeps references to its inputs (nothing else is held);
* step 1: its inputs are compared with those by value. Different (the list sees the latent or the
  timestep): the list is *varying* for the rest of the generation and nothing more is checked or
  held. Equal: every block of the list that takes only the list's inputs and earlier blocks' outputs
  (its *provenance*) records its outputs;
* step 2 on: when the first block's inputs still equal the recorded ones, each recorded block whose
  inputs have the same provenance returns its recorded outputs without running. Inputs that changed
  (a new prompt mid-generation) record again. Tensors the model wrote in place since (their
  ``_version`` moved) are never trusted.

What is held for a varying list is one set of input references between steps 0 and 1.

    >>> key = ListCall("context_refiner")
    >>> key.sources, key.mode
    ({}, None)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

VARYING = "varying"


def _tensor_leaves(leaves: list[Any]) -> list[torch.Tensor]:
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


@dataclass
class Snapshot:
    """Tensors as they were: references and their in-place version counters."""

    tensors: tuple[torch.Tensor, ...]
    versions: tuple[int, ...]

    @classmethod
    def of(cls, tensors: list[torch.Tensor], copy: bool = False) -> "Snapshot":
        """``copy``: the tensors live in memory their producer reuses at its next run (a CUDA graph's
        output pool), so the snapshot holds copies."""
        held = tuple(t.detach().clone() if copy else t.detach() for t in tensors)
        return cls(held, tuple(t._version for t in held))

    def intact(self) -> bool:
        return all(t._version == v for t, v in zip(self.tensors, self.versions))

    def equals(self, tensors: list[torch.Tensor]) -> bool:
        """Same shapes, dtypes, devices and values (exactly), and nothing written in place since."""
        return (len(tensors) == len(self.tensors) and self.intact() and all(
            a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and (a is b or torch.equal(a, b))
            for a, b in zip(tensors, self.tensors)))


@dataclass
class BlockRecord:
    """One block's recorded call: its binding, where each input came from, and what it returned."""

    owner: Any
    signature: Any
    provenance: tuple
    output: Any
    snapshot: Snapshot


@dataclass
class ListMemo:
    """One block list in one call slot (see the module docstring)."""

    inputs: Snapshot
    signature: Any
    recording: bool = False  # the inputs matched once: blocks record their outputs
    blocks: dict[str, BlockRecord] = field(default_factory=dict)


@dataclass
class ListCall:
    """What one model call knows of one list: where its tensors came from, and its mode."""

    name: str
    sources: dict[int, tuple] = field(default_factory=dict)  # id(tensor) -> ("in", i) | ("out", path, j)
    mode: str | None = None  # "replay", "record" or None (runs as usual)


class InvariantLists:
    """The step-invariance state of one session: one :class:`ListMemo` per (call slot, list)."""

    def __init__(self) -> None:
        self.memos: dict[tuple[int, str], ListMemo | str] = {}
        self.replayed: set[str] = set()  # blocks replayed at least once (for the report)

    def clear(self) -> None:
        self.memos.clear()

    def holds_any(self) -> bool:
        """Whether some list holds recorded block outputs a call could replay."""
        return any(isinstance(memo, ListMemo) and memo.blocks for memo in self.memos.values())

    def nbytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for memo in self.memos.values():
            if isinstance(memo, ListMemo):
                for record in memo.blocks.values():
                    for t in record.snapshot.tensors:
                        if id(t) not in seen:
                            seen.add(id(t))
                            total += t.numel() * t.element_size()
        return total

    def enter(self, calls: dict[str, ListCall], slot: int, step: int, list_name: str, signature: Any,
              leaves: list[Any], copy: bool = False) -> ListCall:
        """The list's first block of this call: compare its inputs and set the call's mode.
        ``copy``: what is held is copied (see :meth:`Snapshot.of`)."""
        call = calls[list_name] = ListCall(list_name)
        tensors = _tensor_leaves(leaves)
        call.sources = {id(t): ("in", i) for i, t in enumerate(tensors)}
        key = (slot, list_name)
        memo = self.memos.get(key)
        if memo == VARYING:
            return call
        if memo is None or step == 0:
            self.memos[key] = ListMemo(Snapshot.of(tensors, copy), signature)
            return call
        same = memo.signature == signature and memo.inputs.equals(tensors)
        if not memo.recording:  # step 1: the one comparison that decides
            if same:
                memo.recording = True
                call.mode = "record"
            else:
                self.memos[key] = VARYING
            return call
        if same:
            call.mode = "replay"
        else:  # the list's inputs changed (a new prompt): record anew
            self.memos[key] = ListMemo(Snapshot.of(tensors, copy), signature, recording=True)
            call.mode = "record"
        return call

    def recall(self, call: ListCall, slot: int, path: str, owner: Any, signature: Any, leaves: list[Any]) -> Any:
        """The block's recorded output when this call replays the list and its inputs have the
        recorded provenance; None otherwise."""
        if call.mode != "replay":
            return None
        memo = self.memos.get((slot, call.name))
        record = memo.blocks.get(path) if isinstance(memo, ListMemo) else None
        if (record is None or record.owner is not owner or record.signature != signature
                or record.provenance != self._provenance(call, leaves) or not record.snapshot.intact()):
            call.mode = "record"  # from here on this call's blocks compute and record
            return None
        self._note_outputs(call, path, record.output)
        self.replayed.add(path)
        return record.output

    def record(self, call: ListCall, slot: int, path: str, owner: Any, signature: Any, leaves: list[Any],
               output: Any, copy: bool = False) -> None:
        """Keep a computed block's output when the list records and its inputs came from the list
        (``copy``: a copy of it, see :meth:`Snapshot.of`)."""
        if call.mode not in ("record", "replay"):
            return
        memo = self.memos.get((slot, call.name))
        provenance = self._provenance(call, leaves)
        if isinstance(memo, ListMemo) and None not in provenance:
            kept = pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), output) if copy else output
            outputs = _tensor_leaves(pytree.tree_leaves(kept))
            memo.blocks[path] = BlockRecord(owner, signature, provenance, kept, Snapshot.of(outputs))
            self._note_outputs(call, path, output)

    @staticmethod
    def _provenance(call: ListCall, leaves: list[Any]) -> tuple:
        return tuple(call.sources.get(id(t)) for t in _tensor_leaves(leaves))

    @staticmethod
    def _note_outputs(call: ListCall, path: str, output: Any) -> None:
        for j, t in enumerate(_tensor_leaves(pytree.tree_leaves(output))):
            call.sources[id(t)] = ("out", path, j)
