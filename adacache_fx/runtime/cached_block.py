"""The module that stands in for one transformer block of a transformed model.

It shares the original block's parameter, buffer and submodule dictionaries, so the model's
``state_dict`` keys, ``.to()``, ``.half()`` and weight loading are exactly as before. On each call it
looks up (or captures) the graph specialised to the call's input signature, asks the runtime which
of its regions compute, store or reuse, and runs the matching plan-variant graph.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import _disable_current_modes

from ..errors import CaptureError
from ..passes.conditional import build_conditional
from ..passes.capture import BoundInputs, CapturedGraph, _leaf_key, capture_block, structural_key
from ..passes.flops import count_node_flops
from ..passes.probe import extract_value, modulated_input
from ..passes.residuals import BlockAnalysis, analyse_block
from ..passes.rewrite import RegionState, build_variant
from ..passes.tokens import PartialComputeError, analyse_token_flow
from ..policies.base import BranchInfo
from .engine import CacheRuntime, TensorPlan

logger = logging.getLogger("adacache_fx")


@dataclass
class SharedCapture:
    """A captured and analysed graph, shared by structurally identical blocks at one signature."""

    captured: CapturedGraph
    analysis: BlockAnalysis
    node_flops: dict[str, int] | None
    variants: dict[tuple[tuple[RegionState, ...], tuple[int, ...]], Any] = field(default_factory=dict)
    conditionals: dict[tuple[bool, ...], Any] = field(default_factory=dict)
    _probe: fx.GraphModule | None = None
    compiled_probe: Any = None
    # (region index, token count) -> FLOPs of the region recomputed for that many tokens.
    _partial_flops: dict[tuple[int, int], int | None] = field(default_factory=dict)

    def probe(self) -> fx.GraphModule | None:
        """Graph computing the block's modulated input only (TeaCache's signal); None if none."""
        if self._probe is None:
            name = modulated_input(self.captured, self.analysis)
            if name is None:
                return None
            self._probe = extract_value(self.captured.graph_module, name)
        return self._probe

    def main_stream(self) -> tuple[int, int]:
        """(placeholder index, user-output index) of the largest stream: the image/video tokens."""
        graph = self.captured.graph_module.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        streams = [p for p in placeholders if p.name in self.analysis.stream_inputs]
        source = max(streams, key=lambda p: p.meta["val"].numel())
        output = next(n for n in graph.nodes if n.op == "output")
        outputs = list(output.args[0])[: self.captured.num_user_outputs]
        shape = source.meta["val"].shape
        index = next(
            (i for i, o in enumerate(outputs) if isinstance(o, fx.Node) and o.meta["val"].shape == shape),
            None,
        )
        if index is None:
            raise CaptureError(f"no block output has the stream's shape {tuple(shape)}")
        return placeholders.index(source), index

    def variant(
        self, states: tuple[RegionState, ...], compiled: Any = None, counts: tuple[int, ...] | None = None
    ) -> Any:
        """The graph for one combination of region states (``compiled``: wraps new graphs).

        ``counts``: token counts of ``PARTIAL`` regions (0 elsewhere); each count is a variant.
        """
        counts = tuple(counts) if counts is not None else (0,) * len(states)
        key = (states, counts)
        graph = self.variants.get(key)
        if graph is None:
            graph = build_variant(self.captured.graph_module, self.analysis.regions, states, counts)
            if compiled is not None:
                graph = compiled(graph)
            self.variants[key] = graph
        return graph

    def conditional(self, cached: tuple[bool, ...]) -> Any:
        """The single graph deciding each cached region's reuse at run time (``torch.cond``)."""
        graph = self.conditionals.get(cached)
        if graph is None:
            graph = build_conditional(self.captured.graph_module, self.analysis.regions, cached)
            self.conditionals[cached] = graph
        return graph

    def partial_flops(self, index: int, count: int) -> int | None:
        """FLOPs of region ``index`` recomputed for ``count`` tokens (gather/scatter included, which
        count as zero, like every data movement), counted on the partial graph itself."""
        key = (index, count)
        if key not in self._partial_flops:
            regions = self.analysis.regions
            states = tuple(
                RegionState.PARTIAL if i == index else RegionState.COMPUTE for i in range(len(regions))
            )
            counts = tuple(count if i == index else 0 for i in range(len(regions)))
            # Outside any dispatch mode of the caller (a FlopCounterMode measuring this very call
            # would otherwise count this bookkeeping run as work of the model).
            with _disable_current_modes():
                graph = build_variant(self.captured.graph_module, regions, states, counts)
                node_flops = count_node_flops(graph)
            if node_flops is None:
                self._partial_flops[key] = None
            else:
                region = regions[index]
                self._partial_flops[key] = sum(
                    node_flops.get(n.name, 0)
                    for n in graph.graph.nodes
                    if n.meta.get("adacache_partial") == region.name or n.name in region.nodes
                )
        return self._partial_flops[key]

    @property
    def total_flops(self) -> int | None:
        return sum(self.node_flops.values()) if self.node_flops is not None else None


@dataclass
class Specialisation:
    shared: SharedCapture
    bound: BoundInputs
    branches: list[BranchInfo]


def _analyse_tokens(captured: CapturedGraph, analysis: BlockAnalysis) -> None:
    """Record on each region whether (and how) it can be recomputed for a subset of tokens."""
    for region in analysis.regions:
        try:
            region.token_flow = analyse_token_flow(captured.graph_module, analysis, region)
        except PartialComputeError as exc:
            region.token_error = str(exc)
        except Exception as exc:  # an analysis bug must cost the saving, never the model call
            region.token_error = (
                f"region {region.name!r}: partial-recompute analysis failed ({type(exc).__name__}: {exc}); "
                "it computes fully when a plan asks for a token subset"
            )
            logger.info("adacache_fx: %s", region.token_error)


class Uncached:
    """Marker for a block left uncached (capture failed with on_capture_error='skip')."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _is_temporal(list_name: str) -> bool:
    lowered = list_name.lower()
    return "temporal" in lowered or "temp_" in lowered


class CachedBlock(nn.Module):
    def __init__(
        self,
        block: nn.Module,
        list_name: str,
        index: int,
        runtime: CacheRuntime,
        on_capture_error: str = "raise",
    ) -> None:
        super().__init__()
        # Share state with the original block: one set of weights, unchanged state_dict keys.
        self.__dict__["_modules"] = block._modules
        self.__dict__["_parameters"] = block._parameters
        self.__dict__["_buffers"] = block._buffers
        self.__dict__["_non_persistent_buffers_set"] = block._non_persistent_buffers_set
        self.__dict__["original"] = block  # not a submodule: its children are ours already
        self.__dict__["runtime"] = runtime
        self.training = block.training
        self.list_name = list_name
        self.index = index
        self.path = f"{list_name}.{index}"
        self.on_capture_error = on_capture_error
        self._specialisations: dict[Any, Specialisation | Uncached] = {}
        self.depth: int | None = None  # order in which the block runs in a model call

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Plain attributes of the block (flags models read, e.g. ``block.context_pre_only``).
            return getattr(self.__dict__["original"], name)

    def extra_repr(self) -> str:
        return f"wraps={type(self.original).__name__}, captured_shapes={len(self._specialisations)}"

    # -- capture ---------------------------------------------------------------------------------
    def _specialise(self, args: tuple, kwargs: dict, signature: Any) -> Specialisation | Uncached:
        runtime = self.runtime
        block = self.original
        block.training = self.training
        key = (structural_key(block), signature)
        shared = runtime.shared_captures.get(key)
        if shared is None:
            try:
                captured = capture_block(block, args, kwargs, self.path)
            except CaptureError as exc:
                if self.on_capture_error != "skip":
                    raise
                logger.warning("adacache_fx: %s runs uncached: %s", self.path, exc)
                runtime.uncached_blocks[self.path] = str(exc)
                marker = Uncached(str(exc))
                self._specialisations[signature] = marker
                return marker
            leaves = pytree.tree_leaves((args, kwargs))
            node_flops = count_node_flops(captured.graph_module, BoundInputs(captured, block)(leaves))
            analysis = analyse_block(captured, node_flops, temporal=_is_temporal(self.list_name))
            _analyse_tokens(captured, analysis)
            shared = SharedCapture(captured, analysis, node_flops)
            runtime.shared_captures[key] = shared
            for note in analysis.notes:
                logger.info("adacache_fx: %s: %s", self.path, note)
            if not analysis.regions:
                logger.warning(
                    "adacache_fx: %s (%s): no residual branch found; it runs uncached",
                    self.path, type(block).__name__,
                )
        infos = runtime.register_block(self.path, self.list_name, self.index, shared.analysis.regions)
        if not runtime.cond_only:  # a cond-only guidance call's capture counts half the rows
            runtime.block_flops[self.path] = shared.total_flops
        self.depth = runtime.block_order.index(self.path)
        spec = Specialisation(shared, BoundInputs(shared.captured, block), infos)
        self._specialisations[signature] = spec
        return spec

    # -- call ------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        leaves, tree = pytree.tree_flatten((args, kwargs))
        signature = (tree, tuple(_leaf_key(leaf) for leaf in leaves))
        spec = self._specialisations.get(signature)
        if spec is None:
            spec = self._specialise(args, kwargs, signature)
        if isinstance(spec, Uncached) or not spec.branches:
            return self.original(*args, **kwargs)

        runtime = self.runtime
        inputs = spec.bound(leaves)
        if isinstance(runtime.fixed, TensorPlan):
            return self._run_conditional(spec, inputs)
        if runtime.fixed is not None:
            return self._run_fixed(spec, inputs)
        signal = runtime.signal
        if signal is not None:
            self._signal_before(spec, inputs, signal)
        cache = runtime.block_cache(self.path, signature)
        regions = spec.shared.analysis.regions
        states, tokens = runtime.region_plan(spec.branches, cache, regions)
        counts = tuple(0 if t is None else int(t.shape[0]) for t in tokens)
        graph = spec.shared.variant(states, runtime.compiled, counts)
        flops: dict[str, int | None] = {}
        for i, (info, state) in enumerate(zip(spec.branches, states)):
            if state == RegionState.REUSE:
                inputs.extend(runtime.reuse_values(info, cache))
            elif state == RegionState.PARTIAL:
                inputs.append(tokens[i])
                inputs.extend(cache.values[info.id])
                flops[info.id] = spec.shared.partial_flops(i, counts[i])
        outputs = graph(*inputs)
        num_user = spec.shared.captured.num_user_outputs
        runtime.after_block(spec.branches, states, cache, list(outputs[num_user:]), flops)
        if signal is not None and signal.kind == "first_blocks_residual" and self.depth == signal.blocks - 1:
            if runtime.stream_start is not None:
                _, out_index = spec.shared.main_stream()
                runtime.decide(outputs[out_index] - runtime.stream_start)
        return pytree.tree_unflatten(list(outputs[:num_user]), spec.shared.captured.out_spec)

    def _run_fixed(self, spec: Specialisation, inputs: list[Any]) -> Any:
        """Export mode: the plan and the caches come from ``runtime.fixed``; stored values go back there."""
        fixed = self.runtime.fixed
        states = self.runtime.fixed_states(spec.branches)
        for info, state in zip(spec.branches, states):
            if state == RegionState.REUSE:
                inputs.extend(fixed.cache_in[info.id])
        outputs = spec.shared.variant(states)(*inputs)
        num_user = spec.shared.captured.num_user_outputs
        offset = num_user
        for info, state in zip(spec.branches, states):
            if state == RegionState.STORE:
                fixed.cache_out[info.id] = tuple(outputs[offset:offset + info.num_residuals])
                offset += info.num_residuals
        return pytree.tree_unflatten(list(outputs[:num_user]), spec.shared.captured.out_spec)

    def _run_conditional(self, spec: Specialisation, inputs: list[Any]) -> Any:
        """Conditional mode: each cached region reuses or computes as its decision tensor says,
        inside the graph; every cached region's new cache goes back to ``runtime.fixed``."""
        plan = self.runtime.fixed
        policy = self.runtime.policy
        cached = tuple(policy.caches(info) for info in spec.branches)
        # torch.cond rejects operands that share storage, and models pass views of one tensor as
        # separate block inputs (CogVideoX slices text and video tokens out of one embedding).
        seen: list[torch.Tensor] = []
        for i, value in enumerate(inputs):
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                if any(torch._C._is_alias_of(value, other) for other in seen):
                    inputs[i] = value = value.clone()
                seen.append(value)
        for info, is_cached in zip(spec.branches, cached):
            if is_cached:
                inputs.append(plan.reuse[info.id])
                inputs.extend(plan.cache_in[info.id])
        in_step = plan.in_step
        if in_step is not None and self.depth == 0:
            in_index, _ = spec.shared.main_stream()
            in_step["start"] = inputs[in_index]
        outputs = spec.shared.conditional(cached)(*inputs)
        if in_step is not None and self.depth == self.runtime.signal.blocks - 1:
            _, out_index = spec.shared.main_stream()
            reuse, new_state = policy.decide_in_graph(outputs[out_index] - in_step["start"], in_step["state"],
                                                      in_step["allow"])
            in_step.update(reuse=reuse, new_state=new_state)
            for branch in in_step["covered"]:  # the blocks after this one decide on the graph's own value
                plan.reuse[branch] = reuse
        num_user = spec.shared.captured.num_user_outputs
        offset = num_user
        for info, is_cached in zip(spec.branches, cached):
            if is_cached:
                plan.cache_out[info.id] = tuple(outputs[offset:offset + info.num_residuals])
                offset += info.num_residuals
        return pytree.tree_unflatten(list(outputs[:num_user]), spec.shared.captured.out_spec)

    def _signal_before(self, spec: Specialisation, inputs: list[Any], signal: Any) -> None:
        """Read the in-step signal that must exist before this block runs."""
        if self.depth != 0:
            return
        runtime = self.runtime
        if signal.kind == "modulated_input":
            shared = spec.shared
            if shared.compiled_probe is None:
                probe = shared.probe()
                if probe is None:
                    runtime.missing_signal(self.path)
                shared.compiled_probe = runtime.compiled(probe)
            runtime.decide(shared.compiled_probe(*inputs)[0])
        elif signal.kind == "first_blocks_residual":
            in_index, _ = spec.shared.main_stream()
            runtime.stream_start = inputs[in_index]
