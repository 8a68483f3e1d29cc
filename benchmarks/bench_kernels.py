"""Kernel-level timing of a transformed model: where a cached step's time goes.

For each distinct block graph (blocks of one structure at one input shape share it), on the block's
real inputs from one model call, timed with ``torch.utils.benchmark``-style repeated calls (CUDA is
synchronised):

* ``eager_block``: the original block module;   ``compute``: its graph with every branch computed;
* ``store``: every cached branch computed and returned as the new cache (``store - compute``: the
  cost of keeping the cache, which holds references, so about zero);
* per branch: ``compute - (that branch reused)``: what reusing it saves, by kind;
* ``reuse_all``: every cached branch reused: what a cached step still pays per block (residual adds,
  modulation, norms outside the branches);
* ``dispatch``: a call of the wrapper block (guard, signature, plan, cache bookkeeping) whose graph
  returns precomputed outputs.

Per model call: ``plan`` (the policy planning one step, on the host) and ``metric`` (the policy
observing one watched branch, e.g. AdaCache's distance), when the policy has them.

    python benchmarks/bench_kernels.py [--model latte] [--size mid|full] [--device cuda] [--fp16] [--policy adacache]

writes ``benchmarks/results/kernels_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

import adacache_fx as ax
from adacache_fx.passes.rewrite import RegionState
from adacache_fx.policies.base import StepContext
from adacache_fx.runtime.executor import GraphRunner


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
    policy. ``min_run_time``: seconds of repeated calls behind each timing."""
    from tqdm.auto import tqdm

    runtime = ax.get_runtime(model)
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
        binding = next((b for b in block.bindings.values() if getattr(b, "branches", None)), None)
        if binding is None:
            continue
        groups.setdefault(id(binding.program), []).append((block, args, kw, binding))

    timings = []
    for members in tqdm(groups.values(), desc="timing block graphs", disable=not progress, leave=False):
        block, args, kw, binding = members[0]
        program = binding.program
        inputs = binding.inputs(pytree.tree_leaves((args, kw)))
        regions = program.regions
        n = len(regions)
        compute_graph = program.variant((RegionState.COMPUTE,) * n)
        store_graph = program.variant((RegionState.STORE,) * n)
        with torch.no_grad():
            stored = list(store_graph(*inputs)[program.num_user_outputs:])
        residuals, offset = [], 0
        for region in regions:
            residuals.append(stored[offset:offset + len(region.residuals)])
            offset += len(region.residuals)
        compute = _seconds(lambda: compute_graph(*inputs), min_run_time)
        branches = []
        for i, (region, info) in enumerate(zip(regions, binding.branches)):
            states = tuple(RegionState.REUSE if j == i else RegionState.COMPUTE for j in range(n))
            graph = program.variant(states)
            reused = _seconds(lambda g=graph, r=residuals[i]: g(*inputs, *r), min_run_time)
            branches.append((region.name, info.kind, compute - reused))
        reuse_graph = program.variant((RegionState.REUSE,) * n)
        all_residuals = [t for r in residuals for t in r]
        timings.append(BlockTiming(
            block=block.path,
            count=len(members),
            eager_block=_seconds(lambda: block.original(*args, **kw), min_run_time),
            compute=compute,
            store=_seconds(lambda: store_graph(*inputs), min_run_time),
            reuse_all=_seconds(lambda: reuse_graph(*inputs, *all_residuals), min_run_time),
            dispatch=_dispatch(runtime, block, args, kw, min_run_time),
            branches=branches,
        ))
    report = KernelReport(
        device=str(next((t.device for t in pytree.tree_leaves(kwargs) if isinstance(t, torch.Tensor)), "cpu")),
        blocks=timings, plan=_plan_seconds(runtime, min_run_time), metric=_metric_seconds(runtime, min_run_time),
    )
    ax.reset(model)  # the timing calls stored caches and fed the policy: start clean
    return report


class _Precomputed(GraphRunner):
    """Graphs that return what the real graph returned once: the wrapper's own cost remains."""

    def __init__(self, real: GraphRunner) -> None:
        super().__init__(real.options)
        self.real = real
        self.outputs: dict[tuple, Any] = {}

    def variant(self, program, states, counts):
        key = (id(program), states, counts)
        graph = self.real.variant(program, states, counts)

        def run(*inputs):
            if key not in self.outputs:
                self.outputs[key] = graph(*inputs)
            return self.outputs[key]

        return run


def _dispatch(runtime, block: nn.Module, args: tuple, kw: dict, min_run_time: float) -> float:
    """The wrapper's own cost per call (guard, signature lookup, plan, cache bookkeeping, output
    tree): wrapper calls on a compute step whose graphs return precomputed outputs."""
    real = runtime.executor.graphs
    stub = _Precomputed(real)
    runtime.use_graphs(stub)
    try:
        with torch.no_grad():
            block(*args, **kw)  # records the outputs once
        return _seconds(lambda: block(*args, **kw), min_run_time, repeats=20)
    finally:
        runtime.use_graphs(real)


def _context(runtime) -> StepContext:
    return StepContext(step=1, num_steps=20, timestep=500.0, generation=0, branches=runtime.branch_tuple, frames=None)


def _plan_seconds(runtime, min_run_time: float) -> float | None:
    if runtime.caps.decides_in_step:
        return None
    ctx = _context(runtime)
    state = runtime.policy.new_state()
    try:
        runtime.policy.plan(ctx, state)
    except Exception:  # a policy that needs state it only has inside a generation
        return None
    return _seconds(lambda: runtime.policy.plan(ctx, state), min_run_time)


def _metric_seconds(runtime, min_run_time: float) -> float | None:
    policy, caps = runtime.policy, runtime.caps
    ctx = _context(runtime)
    state = policy.new_state()
    try:
        policy.plan(ctx, state)  # what a policy derives from the branches (AdaCache's metric layout)
    except Exception:
        pass
    values = runtime.cached_residuals()
    watched = [info for info in runtime.branch_tuple if caps.watches(info, state) and info.id in values]
    if not watched:
        return None
    info = watched[0]
    new = values[info.id]
    previous = tuple(t * 0.9 for t in new)
    try:
        policy.observe(ctx, state, info, new, previous)
    except Exception:
        return None
    return _seconds(lambda: policy.observe(ctx, state, info, new, previous), min_run_time)


def parse_policy(text: str):
    from adacache_lab.cli import parse_policy as parse

    return parse(text)


def main(argv: list[str] | None = None) -> int:
    from adacache_lab.zoo import LATTE_SIZES, ZOO, latte

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="latte", help="latte (see --size) or a zoo model at its tiny config")
    parser.add_argument("--size", default="mid", choices=sorted(LATTE_SIZES), help="the latte config (full: Latte-1's size)")
    parser.add_argument("--policy", default="adacache", help="the policy whose plan and metric are timed")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--fp16", action="store_true", help="half precision")
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds of calls behind each timing")
    parser.add_argument("--out", default=None, help="the JSON path")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.model == "latte":
        model, make_inputs = latte(**LATTE_SIZES[args.size])
        inputs = make_inputs(timestep=500.0, batch=2)
        label = f"latte ({args.size}: {LATTE_SIZES[args.size] or 'zoo.latte defaults'})"
    elif args.model in ZOO:
        model, inputs, label = ZOO[args.model].build(), ZOO[args.model].inputs(timestep=500.0, batch=2), args.model
    else:
        raise SystemExit(f"unknown model {args.model!r}: latte or one of {', '.join(sorted(ZOO))}")
    dtype = torch.float16 if args.fp16 else torch.float32
    model = model.to(device=device, dtype=dtype).eval()
    inputs = {k: (v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
                  if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    ax.transform(model, parse_policy(args.policy))
    report = measure(model, inputs, min_run_time=args.min_run_time)
    print(report)
    by_kind = report.by_kind()
    print("\nsaved per model call by reusing each kind (ms):",
          ", ".join(f"{k} {1e3 * v:.3f}" for k, v in sorted(by_kind.items())))
    record = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
                   + (f", {torch.cuda.get_device_name()}" if device.startswith("cuda") else ""),
        "command": "python benchmarks/bench_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": label, "dtype": str(dtype), "policy": args.policy, **report.to_dict(),
    }
    out = Path(args.out or f"benchmarks/results/kernels_{device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
