"""Kernel-level timing of a transformed model: where a cached step's time goes.

For each distinct block graph (blocks of one structure at one input shape share it), on the block's
real inputs from one model call, timed with ``torch.utils.benchmark`` (which synchronises CUDA):

* ``eager_block``: the original block module;   ``compute``: its graph with every branch computed;
* ``store``: every cached branch computed and returned as the new cache (``store - compute``: the
  cost of keeping the cache, which holds references, so about zero);
* per branch: ``compute - (that branch reused)``: what reusing it saves, by kind;
* ``reuse_all``: every cached branch reused: what a cached step still pays per block (residual adds,
  modulation, norms outside the branches);
* ``dispatch``: a call of the wrapper block (signature lookup, plan, cache bookkeeping) minus its
  graph alone.

Per model call: ``plan`` (the policy planning one step, on the host) and ``metric`` (the policy
observing one watched branch, e.g. AdaCache's distance), when the policy has them.

    adacache-fx bench --kernels [--model latte]    python benchmarks/bench_kernels.py
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from .api import get_runtime
from .passes.capture import call_signature
from .passes.rewrite import RegionState
from .policies.base import StepContext


@dataclass
class BlockTiming:
    """Seconds per call of one block graph (see the module docstring); ``branches``: (branch name,
    kind, seconds its reuse saves)."""

    block: str  # the first block with this graph
    count: int  # blocks that share it
    eager_block: float
    compute: float
    store: float
    reuse_all: float
    dispatch: float
    branches: list[tuple[str, str, float]] = field(default_factory=list)


@dataclass
class KernelReport:
    device: str
    blocks: list[BlockTiming]
    plan: float | None  # seconds for the policy to plan one step
    metric: float | None  # seconds for the policy to observe one watched branch

    def by_kind(self) -> dict[str, float]:
        """Seconds per model call that reusing each branch kind saves, over all blocks."""
        out: dict[str, float] = {}
        for b in self.blocks:
            for _, kind, seconds in b.branches:
                out[kind] = out.get(kind, 0.0) + seconds * b.count
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device, "plan_s": self.plan, "metric_s": self.metric,
            "saved_per_call_by_kind_s": self.by_kind(),
            "blocks": [b.__dict__ for b in self.blocks],
        }

    def __str__(self) -> str:
        ms = lambda s: f"{1e3 * s:8.3f}"  # noqa: E731
        lines = [f"kernel timings on {self.device} (ms per call of one block)",
                 f"{'block':28s} {'x':>3s} {'eager':>8s} {'compute':>8s} {'store':>8s} {'reuse all':>9s} {'dispatch':>8s}"]
        for b in self.blocks:
            lines.append(f"{b.block:28s} {b.count:3d} {ms(b.eager_block)} {ms(b.compute)} {ms(b.store)} "
                         f"{ms(b.reuse_all):>9s} {ms(b.dispatch)}")
            for name, kind, seconds in b.branches:
                share = seconds / b.compute if b.compute else 0.0
                lines.append(f"    reuse {name:20s} ({kind}) saves {ms(seconds)} ms ({share:.0%} of the block)")
        if self.plan is not None:
            lines.append(f"policy plan per step: {ms(self.plan)} ms")
        if self.metric is not None:
            lines.append(f"decision metric per watched branch: {ms(self.metric)} ms")
        return "\n".join(lines)


def _seconds(fn, min_run_time: float, repeats: int = 3) -> float:
    """Fastest of at least ``repeats`` timed calls (and ``min_run_time`` seconds), after one warm-up.
    The minimum: on a shared machine other load only ever adds time. CUDA is synchronised."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times: list[float] = []
    with torch.no_grad():
        fn()
        while len(times) < repeats or sum(times) < min_run_time:
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
    return min(times)


def measure(model: nn.Module, kwargs: dict, *, min_run_time: float = 0.2, progress: bool = True) -> KernelReport:
    """Time the block graphs of a transformed ``model`` on the inputs of one call with ``kwargs``.

    Leaves the model reset (:func:`adacache_fx.reset`): the timing calls store caches and feed the
    policy. ``min_run_time``: seconds of repeated calls behind each median."""
    from tqdm.auto import tqdm

    runtime = get_runtime(model)
    calls: dict[str, tuple[nn.Module, tuple, dict]] = {}

    def record(module: nn.Module, args: tuple, kw: dict) -> None:
        calls.setdefault(module.path, (module, args, kw))

    hooks = [b.register_forward_pre_hook(record, with_kwargs=True) for b in runtime.blocks]
    try:
        with torch.no_grad():
            model(**kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    groups: dict[int, list[tuple[nn.Module, tuple, dict, Any]]] = {}
    for block, args, kw in calls.values():
        spec = block._specialisations.get(call_signature(args, kw))
        if spec is None or not getattr(spec, "branches", None):
            continue
        groups.setdefault(id(spec.shared), []).append((block, args, kw, spec))

    timings = []
    for members in tqdm(groups.values(), desc="timing block graphs", disable=not progress, leave=False):
        block, args, kw, spec = members[0]
        shared = spec.shared
        inputs = spec.bound(pytree.tree_leaves((args, kw)))
        regions = shared.analysis.regions
        n = len(regions)
        compute_graph = shared.variant((RegionState.COMPUTE,) * n)
        store_graph = shared.variant((RegionState.STORE,) * n)
        with torch.no_grad():
            stored = list(store_graph(*inputs)[shared.captured.num_user_outputs:])
        residuals, offset = [], 0
        for region in regions:
            residuals.append(stored[offset:offset + len(region.residuals)])
            offset += len(region.residuals)
        compute = _seconds(lambda: compute_graph(*inputs), min_run_time)
        branches = []
        for i, (region, info) in enumerate(zip(regions, spec.branches)):
            states = tuple(RegionState.REUSE if j == i else RegionState.COMPUTE for j in range(n))
            graph = shared.variant(states)
            reused = _seconds(lambda g=graph, r=residuals[i]: g(*inputs, *r), min_run_time)
            branches.append((region.name, info.kind, compute - reused))
        reuse_graph = shared.variant((RegionState.REUSE,) * n)
        all_residuals = [t for r in residuals for t in r]
        timings.append(BlockTiming(
            block=block.path,
            count=len(members),
            eager_block=_seconds(lambda: block.original(*args, **kw), min_run_time),
            compute=compute,
            store=_seconds(lambda: store_graph(*inputs), min_run_time),
            reuse_all=_seconds(lambda: reuse_graph(*inputs, *all_residuals), min_run_time),
            dispatch=_dispatch(block, args, kw, spec, min_run_time),
            branches=branches,
        ))
    report = KernelReport(
        device=str(next((t.device for t in pytree.tree_leaves(kwargs) if isinstance(t, torch.Tensor)), "cpu")),
        blocks=timings, plan=_plan_seconds(runtime, min_run_time), metric=_metric_seconds(runtime, min_run_time),
    )
    runtime.reset()  # the timing calls stored caches and fed the policy: start clean
    return report


def _dispatch(block: nn.Module, args: tuple, kw: dict, spec: Any, min_run_time: float) -> float:
    """The wrapper's own cost per call (signature lookup, plan, cache bookkeeping, output tree): a
    wrapper call whose graph is swapped for one returning precomputed outputs."""
    runtime, shared = block.runtime, spec.shared
    leaves = pytree.tree_leaves((args, kw))
    cache = runtime.block_cache(block.path, call_signature(args, kw))
    states, tokens = runtime.region_plan(spec.branches, cache, shared.analysis.regions)
    if any(state in (RegionState.REUSE, RegionState.PARTIAL) for state in states):
        raise RuntimeError("the dispatch timing expects the plan of a compute step")
    counts = tuple(0 if t is None else int(t.shape[0]) for t in tokens)
    graph = shared.variant(states, runtime.compiled, counts)
    with torch.no_grad():
        outputs = graph(*spec.bound(leaves))
    key = (states, counts)
    shared.variants[key] = lambda *inputs: outputs
    try:
        return _seconds(lambda: block(*args, **kw), min_run_time, repeats=20)
    finally:
        shared.variants[key] = graph


def _context(runtime) -> StepContext:
    return StepContext(step=1, num_steps=20, timestep=500.0, generation=0,
                       branches=tuple(runtime.branches.values()), frames=None)


def _plan_seconds(runtime, min_run_time: float) -> float | None:
    if runtime.policy.decides_in_step:
        return None
    ctx = _context(runtime)
    try:
        runtime.policy.plan(ctx)
    except Exception:  # a policy that needs state it only has inside a generation
        return None
    return _seconds(lambda: runtime.policy.plan(ctx), min_run_time)


def _metric_seconds(runtime, min_run_time: float) -> float | None:
    policy = runtime.policy
    watched = [info for info in runtime.branches.values() if policy.watches(info)]
    values = runtime.cached_residuals()
    watched = [info for info in watched if info.id in values]
    if not watched:
        return None
    info = watched[0]
    new = values[info.id]
    previous = tuple(t * 0.9 for t in new)
    ctx = _context(runtime)
    try:
        policy.observe(ctx, info, new, previous)
    except Exception:
        return None
    return _seconds(lambda: policy.observe(ctx, info, new, previous), min_run_time)
