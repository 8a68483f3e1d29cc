"""The pass pipeline: one block call in, a frozen :class:`BlockProgram` out.

``build_program`` runs, once per block structure and call signature::

    capture (torch.export + clean-up passes)  ->  FLOPs per node  ->  residual regions
        ->  token flows (which regions can recompute a token subset)  ->  in-step signal locations

and freezes the result. The runtime's executor then only reads programs: the plan-variant graphs
(:meth:`BlockProgram.variant`), the one-graph conditional form (:meth:`BlockProgram.conditional`)
and TeaCache's probe are derived from the frozen capture on first use and memoised, the same
derivation for every caller (a lock makes concurrent first uses build once).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import _disable_current_modes

from .capture import BoundInputs, CapturedGraph, capture_block
from .conditional import build_conditional
from .flops import count_node_flops
from .fold import fold_map
from .inplace import reinplace_scatters
from .probe import extract_value, modulated_input
from .residuals import BlockAnalysis, Region, analyse_block
from .rewrite import RegionState, build_variant
from .tokens import PartialComputeError, analyse_token_flow

logger = logging.getLogger("adacache_fx")


def with_token_flows(captured: CapturedGraph, analysis: BlockAnalysis) -> tuple[Region, ...]:
    """Pass: each region with how (or why not) it can be recomputed for a subset of tokens."""
    out = []
    for region in analysis.regions:
        try:
            out.append(dataclasses.replace(region, token_flow=analyse_token_flow(captured.graph_module, analysis, region)))
        except PartialComputeError as exc:
            out.append(dataclasses.replace(region, token_error=str(exc)))
        except Exception as exc:  # an analysis bug must cost the saving, never the model call
            reason = (f"region {region.name!r}: partial-recompute analysis failed ({type(exc).__name__}: {exc}); "
                      "it computes fully when a plan asks for a token subset")
            logger.info("adacache_fx: %s", reason)
            out.append(dataclasses.replace(region, token_error=reason))
    return tuple(out)


def main_stream(captured: CapturedGraph, stream_inputs: tuple[str, ...]) -> tuple[int, int] | None:
    """(placeholder index, user-output index) of the largest stream (the image/video tokens), or
    None when no output has its shape."""
    graph = captured.graph_module.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    streams = [p for p in placeholders if p.name in stream_inputs]
    if not streams:
        return None
    source = max(streams, key=lambda p: p.meta["val"].numel())
    output = next(n for n in graph.nodes if n.op == "output")
    outputs = list(output.args[0])[: captured.num_user_outputs]
    shape = source.meta["val"].shape
    index = next(
        (i for i, o in enumerate(outputs) if isinstance(o, fx.Node) and o.meta["val"].shape == shape),
        None,
    )
    return None if index is None else (placeholders.index(source), index)


@dataclass(frozen=True, eq=False)
class BlockProgram:
    """One block structure captured at one call signature and analysed (see the module docstring).

    ``regions``: the cacheable residual regions, in graph order; ``node_flops``: FLOPs per node
    (None when they could not be counted); ``stream``: (input, output) index of the main stream;
    ``probe_node``: the node holding the first branch's modulated input (TeaCache's signal);
    ``fold``: per user output, the call input (flattened leaf index) it carries when every branch
    is reused (see :mod:`.fold`), or None when the block cannot be folded.
    """

    name: str
    captured: CapturedGraph
    regions: tuple[Region, ...]
    stream_inputs: tuple[str, ...]
    notes: tuple[str, ...]
    node_flops: Mapping[str, int] | None
    stream: tuple[int, int] | None
    probe_node: str | None
    fold: tuple[int, ...] | None = None
    _memo: dict = field(default_factory=dict, repr=False)
    _lock: Any = field(default_factory=threading.Lock, repr=False)

    @property
    def total_flops(self) -> int | None:
        return sum(self.node_flops.values()) if self.node_flops is not None else None

    @property
    def num_user_outputs(self) -> int:
        return self.captured.num_user_outputs

    def bind(self, block: nn.Module) -> BoundInputs:
        """How this program reads its parameters and buffers from one live block."""
        return BoundInputs(self.captured, block)

    def _memoised(self, key: Any, build) -> Any:
        value = self._memo.get(key)
        if value is None:
            with self._lock:
                value = self._memo.get(key)
                if value is None:
                    with _disable_current_modes():  # a FlopCounterMode around the call measures the model only
                        value = build()
                    self._memo[key] = value
        return value

    def variant(self, states: tuple[RegionState, ...], counts: tuple[int, ...] | None = None) -> fx.GraphModule:
        """The control-flow-free graph for one combination of region states (see :mod:`.rewrite`);
        ``counts``: token counts of ``PARTIAL`` regions (each count is a variant)."""
        counts = tuple(counts) if counts is not None else (0,) * len(states)
        return self._memoised(("variant", states, counts),
                              lambda: build_variant(self.captured.graph_module, list(self.regions), states, counts))

    def eager_variant(self, states: tuple[RegionState, ...], counts: tuple[int, ...] | None = None) -> fx.GraphModule:
        """:meth:`variant` with its functionalised scatters written in place again (see :mod:`.inplace`):
        the form that runs as it is, uncompiled."""
        counts = tuple(counts) if counts is not None else (0,) * len(states)
        functional = self.variant(states, counts)  # first: the memo's lock is not re-entrant
        return self._memoised(("eager_variant", states, counts), lambda: reinplace_scatters(functional))

    def conditional(self, cached: tuple[bool, ...]) -> fx.GraphModule:
        """The single graph deciding each cached region's reuse at run time (``torch.cond``)."""
        return self._memoised(("conditional", cached),
                              lambda: build_conditional(self.captured.graph_module, list(self.regions), cached))

    def probe(self) -> fx.GraphModule | None:
        """A graph computing the block's modulated input only (TeaCache's signal); None if none."""
        if self.probe_node is None:
            return None
        return self._memoised(("probe",), lambda: extract_value(self.captured.graph_module, self.probe_node))

    def partial_flops(self, index: int, count: int) -> int | None:
        """FLOPs of region ``index`` recomputed for ``count`` tokens (gather/scatter count as zero,
        like every data movement), counted on the partial graph itself; None when unknown."""
        def count_them():
            regions = self.regions
            states = tuple(RegionState.PARTIAL if i == index else RegionState.COMPUTE for i in range(len(regions)))
            counts = tuple(count if i == index else 0 for i in range(len(regions)))
            graph = build_variant(self.captured.graph_module, list(regions), states, counts)
            node_flops = count_node_flops(graph)
            if node_flops is None:
                return ("unknown",)
            region = regions[index]
            return (sum(node_flops.get(n.name, 0) for n in graph.graph.nodes
                        if n.meta.get("adacache_partial") == region.name or n.name in region.nodes),)
        value = self._memoised(("partial_flops", index, count), count_them)[0]
        return None if value == "unknown" else value


def build_program(block: nn.Module, args: tuple, kwargs: dict, *, name: str, temporal: bool = False) -> BlockProgram:
    """Run the pass pipeline on one call of ``block`` (see the module docstring).

    >>> import adacache_fx.passes.program as program  # doctest: +SKIP
    >>> program.build_program(block, (hidden,), {"temb": temb}, name="blocks.0").regions  # doctest: +SKIP
    (Region(name='attn1', kind='self_attention', ...), Region(name='ff', kind='mlp', ...))

    Raises :class:`~adacache_fx.errors.CaptureError` when the block cannot be captured.
    """
    captured = capture_block(block, args, kwargs, name)
    leaves = pytree.tree_leaves((args, kwargs))
    node_flops = count_node_flops(captured.graph_module, BoundInputs(captured, block)(leaves))
    analysis = analyse_block(captured, node_flops, temporal=temporal)
    regions = with_token_flows(captured, analysis)
    probe = modulated_input(captured, analysis) if regions else None
    stream = main_stream(captured, analysis.stream_inputs) if regions else None
    fold = None
    if regions:
        reused = build_variant(captured.graph_module, list(regions), (RegionState.REUSE,) * len(regions))
        placeholders = captured.placeholders()
        users = {node.name: binding.target for node, binding in zip(placeholders, captured.bindings)
                 if binding.kind == "user"}
        fold = fold_map(reused, users, captured.num_user_outputs)
    return BlockProgram(
        name=name,
        captured=captured,
        regions=regions,
        stream_inputs=analysis.stream_inputs,
        notes=analysis.notes,
        node_flops=node_flops,
        stream=stream,
        probe_node=probe,
        fold=fold,
    )

