"""Core overhead and efficiency benchmark (CPU eager), mid-size Latte.

Measures, in one process with the variants interleaved:
  * NoCache overhead: transformed-with-NoCache call time / original call time (target <= 1.02);
  * Static(2) efficiency: measured loop speed-up / ideal speed-up, where the ideal removes exactly the
    measured cost of every branch's operations on reuse steps (target >= 0.95).

Branch costs are measured by timing every operation of each captured block graph on its real
inputs and summing the operations inside each cached region.

    python benchmarks/bench_core.py [--steps 10] [--repeats 5] [--small]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

import adacache_fx as ax
from adacache_fx.runtime.cached_block import CachedBlock
from adacache_fx.zoo import latte

RESULTS = Path(__file__).parent / "results"


class _NodeTimer(fx.Interpreter):
    def __init__(self, module):
        super().__init__(module)
        self.times: dict[str, float] = {}

    def run_node(self, node):
        start = time.perf_counter()
        out = super().run_node(node)
        self.times[node.name] = time.perf_counter() - start
        return out


def branch_seconds(model, kwargs, repeats=3) -> tuple[float, float]:
    """(seconds of all branch operations, seconds of all block operations) for one model call."""
    calls = {}

    def record(module, args, kw):
        calls[module.path] = (module, args, kw)

    hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in model.modules() if isinstance(m, CachedBlock)]
    with torch.no_grad():
        model(**kwargs)
    for h in hooks:
        h.remove()
    branch_total = block_total = 0.0
    with torch.no_grad():
        for module, args, kw in calls.values():
            leaves, tree = pytree.tree_flatten((args, kw))
            spec = next(s for s in module._specialisations.values())
            inputs = spec.bound(leaves)
            best: dict[str, float] = {}
            for _ in range(repeats):
                timer = _NodeTimer(spec.shared.captured.graph_module)
                timer.run(*inputs)
                for name, t in timer.times.items():
                    best[name] = min(best.get(name, float("inf")), t)
            region_nodes = set().union(*(r.nodes for r in spec.shared.analysis.regions))
            branch_total += sum(t for n, t in best.items() if n in region_nodes)
            block_total += sum(best.values())
    return branch_total, block_total


def time_call(model, kwargs) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        model(**kwargs)
        return time.perf_counter() - start


def run_loop(model, inputs, timesteps) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for t in timesteps:
            model(**inputs(timestep=t))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--small", action="store_true", help="a quick config for smoke runs")
    args = parser.parse_args()
    config = dict(num_layers=2, heads=4, head_dim=32, frames=4, sample_size=16) if args.small else {}

    original, inputs = latte(**config)
    nocache, _ = latte(**config)
    static, _ = latte(**config)
    ax.transform(nocache, ax.NoCache())
    ax.transform(static, ax.Static(interval=2, warmup=1, cooldown=1))
    kwargs = inputs(timestep=500.0)
    tokens = kwargs["hidden_states"].shape[2] * (kwargs["hidden_states"].shape[3] // 2) ** 2
    for model in (original, nocache, static):  # capture + warm-up
        time_call(model, kwargs)
        time_call(model, kwargs)

    # 1. NoCache overhead, interleaved calls
    t_orig, t_nocache = [], []
    for _ in range(args.repeats):
        t_orig.append(time_call(original, kwargs))
        t_nocache.append(time_call(nocache, kwargs))
    overhead = statistics.median(t_nocache) / statistics.median(t_orig)

    # 2. Static(2): measured vs ideal over a loop
    timesteps = [999.0 - i * (999.0 / args.steps) for i in range(args.steps)]
    loops_orig, loops_static = [], []
    for _ in range(2):
        loops_orig.append(run_loop(original, inputs, timesteps))
        ax.reset(static)
        with ax.generation(static, num_steps=args.steps):
            loops_static.append(run_loop(static, inputs, timesteps))
    report = ax.report(static)
    gen_steps = [s for s in report.steps if s.generation == report.steps[-1].generation]
    n_reuse = sum(1 for s in gen_steps if s.computed == 0)
    n_compute = len(gen_steps) - n_reuse
    t_loop_orig, t_loop_static = min(loops_orig), min(loops_static)
    t_step = t_loop_orig / args.steps
    b_seconds, block_seconds = branch_seconds(static, kwargs)
    # The ideal reuse step skips exactly the measured branch operations and nothing else.
    branch_fraction = b_seconds / statistics.median(t_orig)
    ideal_loop = n_compute * t_step + n_reuse * (t_step - b_seconds)
    measured_speedup = t_loop_orig / t_loop_static
    ideal_speedup = t_loop_orig / ideal_loop

    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "command": "python benchmarks/bench_core.py" + (" --small" if args.small else ""),
        "model": f"LatteTransformer3DModel {config or 'num_layers=8 (8 spatial + 8 temporal blocks), hidden 384, 16 frames x 16x16 patches = 4096 tokens'}",
        "tokens": tokens,
        "original_call_s": round(statistics.median(t_orig), 4),
        "nocache_call_s": round(statistics.median(t_nocache), 4),
        "nocache_over_original": round(overhead, 4),
        "static2_steps": {"compute": n_compute, "reuse": n_reuse},
        "branch_ops_s": round(b_seconds, 4),
        "block_ops_s": round(block_seconds, 4),
        "branch_time_fraction_of_call": round(branch_fraction, 4),
        "loop_original_s": round(t_loop_orig, 3),
        "loop_static2_s": round(t_loop_static, 3),
        "static2_speedup_measured": round(measured_speedup, 3),
        "static2_speedup_ideal": round(ideal_speedup, 3),
        "static2_measured_over_ideal": round(measured_speedup / ideal_speedup, 3),
    }
    RESULTS.mkdir(exist_ok=True)
    name = "core_cpu_small.json" if args.small else "core_cpu.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
