"""Compiled cached vs compiled uncached vs eager: mid-size Latte on a CPU, Latte-1's size on a GPU.

Models from one config and weights, run as interleaved 10-step loops (fastest of ``--loops`` at
each step position):

* the untransformed model, eager and ``torch.compile``'d (Inductor): the baselines;
* eager, ``NoCache``;
* ``ax.compile`` (Inductor, every plan variant ``fullgraph=True``), ``NoCache``;
* ``ax.compile``, ``Static(2)``;
* plain ``torch.compile`` of a ``Static(2)``-transformed model (the call handed over at the entry);
* ``ax.compile(scope="model")`` (Inductor, one graph, every cached branch a ``torch.cond``), ``Static(2)``.

Ideal speed-up of the compiled cached loop over the compiled uncached one: each reuse step takes the
uncached step's time scaled by the FLOPs that still run (``FlopCounterMode`` on one uncached call and
the report's FLOPs of the reused branches). Compiled time tracks FLOPs closely at this size, so this is
the bar the target (measured / ideal >= 0.95) sets.

    python benchmarks/bench_compile.py [--steps 10] [--loops 2] [--size small|mid|full]
        [--device cuda] [--fp16] [--mode reduce-overhead] [--also-mode reduce-overhead]

``--mode reduce-overhead`` runs the compiled plan variants as CUDA graphs; ``--also-mode`` times a second
mode's NoCache and Static(2) beside the first in the same run (CUDA graphs against none). Results go to
``benchmarks/results/compile_<device>[_<size>][_<mode>].json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import adacache_fx as ax
from adacache_lab.traffic import copy_bandwidth, reuse_step_memory_ideal, stream_bytes
from adacache_lab.zoo import LATTE_SIZES, latte

RESULTS = Path(__file__).parent / "results"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_loop(model, inputs, timesteps, num_steps: int | None) -> list[float]:
    seconds = []
    with torch.no_grad():
        context = ax.generation(model, num_steps=num_steps) if ax.is_transformed(model) else None
        if context is not None:
            context.__enter__()
        try:
            for t in timesteps:
                kwargs = inputs(timestep=t)
                _sync()
                start = time.perf_counter()
                model(**kwargs)
                _sync()
                seconds.append(time.perf_counter() - start)
        finally:
            if context is not None:
                context.__exit__(None, None, None)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--loops", type=int, default=2)
    parser.add_argument("--small", action="store_true", help="same as --size small")
    parser.add_argument("--size", choices=sorted(LATTE_SIZES), default="mid")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    parser.add_argument("--also-mode", default=None,
                        help="a second mode timed in the same run (e.g. reduce-overhead: CUDA graphs beside none)")
    args = parser.parse_args()
    size = "small" if args.small else args.size
    config = LATTE_SIZES[size]
    dtype = torch.float16 if args.fp16 else torch.float32
    eager, make_inputs = latte(**config)
    names = ["original", "original_compiled", "compiled_nocache", "compiled_static", "torch_compile_static",
             "model_scope_static"]
    if args.also_mode:
        names += ["compiled_nocache_also", "compiled_static_also"]
    others = {name: latte(**config)[0] for name in names}
    for m in others.values():
        m.load_state_dict(eager.state_dict())
    for m in (eager, *others.values()):
        m.to(device=args.device, dtype=dtype)
    compiled_nocache, compiled_static = others["compiled_nocache"], others["compiled_static"]

    def inputs(**kwargs):
        return {k: (v.to(device=args.device, dtype=dtype if v.is_floating_point() else v.dtype)
                    if isinstance(v, torch.Tensor) else v) for k, v in make_inputs(**kwargs).items()}

    static = lambda: ax.Static(interval=2, warmup=1, cooldown=1)  # noqa: E731
    ax.transform(eager, ax.NoCache())
    ax.compile(ax.transform(compiled_nocache, ax.NoCache()), mode=args.mode)
    ax.compile(ax.transform(compiled_static, static()), mode=args.mode)
    torch_compiled = torch.compile(ax.transform(others["torch_compile_static"], static()))
    model_scope = ax.compile(ax.transform(others["model_scope_static"], static()), scope="model")
    timesteps = [999.0 - i * (999.0 / args.steps) for i in range(args.steps)]
    models = {"original_eager": others["original"], "original_compiled": torch.compile(others["original_compiled"]),
              "eager": eager, "compiled_nocache": compiled_nocache, "compiled_static2": compiled_static,
              "torch_compile_static2": torch_compiled, "model_scope_static2": model_scope}
    if args.also_mode:
        also = args.also_mode
        models[f"compiled_nocache_{also}"] = ax.compile(ax.transform(others["compiled_nocache_also"], ax.NoCache()),
                                                        mode=also)
        models[f"compiled_static2_{also}"] = ax.compile(ax.transform(others["compiled_static_also"], static()), mode=also)

    counters.clear()
    start = time.perf_counter()
    for model in models.values():  # capture + compile every variant the loop uses
        run_loop(model, inputs, timesteps, args.steps)
    warmup_seconds = time.perf_counter() - start
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.config.error_on_recompile = True

    loops: dict[str, list[list[float]]] = {name: [] for name in models}
    for _ in tqdm(range(args.loops), desc="interleaved loops"):
        for name, model in models.items():
            if ax.is_transformed(model):
                ax.reset(model)
            loops[name].append(run_loop(model, inputs, timesteps, args.steps))
    steps = {name: [min(ts) for ts in zip(*runs)] for name, runs in loops.items()}

    kwargs = inputs(timestep=500.0)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        eager(**kwargs)  # same weights and operations; FlopCounterMode does not run under compile
    call_flops = counter.get_total_flops()
    report = ax.report(compiled_static)
    last = [s for s in report.steps if s.generation == report.steps[-1].generation]
    ideal_loop = sum(
        t * (1 - (s.flops_total - s.flops_computed) / call_flops)
        for t, s in zip(steps["compiled_nocache"], last)
    )
    total = {name: sum(ts) for name, ts in steps.items()}
    # A reuse step's cost beside a compute step's, and the memory-traffic ideal the FLOP ideal leaves
    # out: a reuse step has at least to read what the cache holds and read and write the stream once.
    static_steps = list(zip(steps["compiled_static2"], last))
    reuse_times = sorted(t for t, s in static_steps if s.computed == 0 and s.reused > 0)
    compute_times = sorted(t for t, s in static_steps if s.reused == 0)
    cache_bytes = report.cache_peak_bytes
    bandwidth = copy_bandwidth(args.device)
    reuse_ideal = reuse_step_memory_ideal(cache_bytes, stream_bytes(eager, kwargs), bandwidth)
    measured = total["compiled_nocache"] / total["compiled_static2"]
    ideal = total["compiled_nocache"] / ideal_loop
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
                   + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""),
        "command": "python benchmarks/bench_compile.py " + " ".join(sys.argv[1:]),
        "model": f"LatteTransformer3DModel {config or '8 spatial + 8 temporal blocks, hidden 384, 4096 tokens'}",
        "dtype": str(dtype),
        "backend": f"inductor, fullgraph=True per plan variant (ax.compile), mode={args.mode}",
        "warmup_seconds_all_models": round(warmup_seconds, 1),
        "compiled_graphs": graphs,
        "graph_breaks": sum(counters["graph_break"].values()),  # the torch.compile hand-over: 1
        "recompiles_after_warmup": 0,  # error_on_recompile was on for every timed loop
        "loop_s": {name: round(v, 3) for name, v in total.items()},
        "step_s": {name: [round(t, 3) for t in ts] for name, ts in steps.items()},
        "compiled_over_eager_uncached": round(total["eager"] / total["compiled_nocache"], 3),
        "static2_compute_fraction": report.compute_fraction,
        "static2_speedup_measured": round(measured, 3),
        "static2_speedup_ideal_flops": round(ideal, 3),
        "static2_measured_over_ideal": round(measured / ideal, 3),
        "reuse_step_s_median": round(reuse_times[len(reuse_times) // 2], 4) if reuse_times else None,
        "compute_step_s_median": round(compute_times[len(compute_times) // 2], 4) if compute_times else None,
        "reuse_step_over_compute_step": (round(reuse_times[len(reuse_times) // 2] / compute_times[len(compute_times) // 2], 4)
                                         if reuse_times and compute_times else None),
        "cache_peak_bytes": cache_bytes,
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1),
        "reuse_step_memory_ideal_s": round(reuse_ideal, 5),
        "reuse_step_over_memory_ideal": round(reuse_times[len(reuse_times) // 2] / reuse_ideal, 2) if reuse_times else None,
        "static2_speedup_ideal_flops_and_memory": round(
            total["compiled_nocache"] / (ideal_loop + reuse_ideal * len(reuse_times)), 3),
        "speedup_compiled_static2_over_eager_uncached": round(total["eager"] / total["compiled_static2"], 3),
        "torch_compile_static2_over_ax_compile_static2": round(total["torch_compile_static2"] / total["compiled_static2"], 3),
        "model_scope_static2_over_ax_compile_static2": round(total["model_scope_static2"] / total["compiled_static2"], 3),
        "compiled_nocache_over_original_compiled": round(total["compiled_nocache"] / total["original_compiled"], 3),
    }
    if args.also_mode:  # the same loops under the second mode, timed in this run
        also = args.also_mode
        also_report = ax.report(models[f"compiled_static2_{also}"])
        also_last = [s for s in also_report.steps if s.generation == also_report.steps[-1].generation]
        also_steps = list(zip(steps[f"compiled_static2_{also}"], also_last))
        also_reuse = sorted(t for t, s in also_steps if s.computed == 0 and s.reused > 0)
        result.update({
            f"static2_{also}_speedup_measured": round(total[f"compiled_nocache_{also}"] / total[f"compiled_static2_{also}"], 3),
            f"static2_{also}_measured_over_ideal": round(
                total[f"compiled_nocache_{also}"] / total[f"compiled_static2_{also}"] / ideal, 3),
            f"compiled_static2_{also}_over_compiled_static2": round(
                total[f"compiled_static2_{also}"] / total["compiled_static2"], 3),
            f"reuse_step_s_median_{also}": round(also_reuse[len(also_reuse) // 2], 4) if also_reuse else None,
        })
    RESULTS.mkdir(exist_ok=True)
    device = args.device.split(":")[0]
    name = (f"compile_{device}" + ("" if size == "mid" else f"_{size}") + (f"_{args.mode}" if args.mode else "")
            + (f"_and_{args.also_mode}" if args.also_mode else "") + ".json")
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "step_s"}, indent=2))


if __name__ == "__main__":
    main()
