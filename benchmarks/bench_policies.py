"""Every policy on one video DiT: compute fraction, measured FLOPs, wall time, deviation.

A Latte model (4 spatial + 4 temporal blocks, hidden 256, 8 frames x 8x8 patches) from a config with
random weights, a 20-step DDIM loop with batched classifier-free guidance. For each policy:

* ``compute_fraction``: branch executions computed / all (the report);
* ``model_flops_fraction``: the whole model's FLOPs over the generation, counted with
  ``FlopCounterMode`` (embedders and final layer included), over the uncached model's;
* ``cached_step_flops_saved``: on the cheapest cached step, the FLOPs saved over the FLOPs of the
  branches the report says were reused (1.0: exactly the branches' cost disappeared);
* wall time and speed-up against no caching (rounds over all policies, fastest of ``--repeats``);
* ``rel_error``: relative L2 distance of the final latents from the uncached ones. Random weights:
  this says the mechanism runs, not what quality a trained model keeps (see issue 4's reference model).

Calibrated rows fit the policy to compute fraction 0.5 with ``ax.calibrate`` on seeds 0-1 and run
on seed 7.

    python benchmarks/bench_policies.py [--steps 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import date
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import adacache_fx as ax
from adacache_lab.sampling import sample
from adacache_lab.zoo import latte

RESULTS = Path(__file__).parent / "results"
CONFIG = dict(num_layers=4, heads=4, head_dim=64, frames=8, sample_size=16)
SEED = 7


def policies(steps: int, model, inputs) -> list[tuple[str, ax.Policy]]:
    def run(m, i):
        sample(m, inputs, num_steps=steps, seed=i, progress=False)

    rows: list[tuple[str, ax.Policy]] = [
        ("NoCache", ax.NoCache()),
        ("Static(2)", ax.Static(interval=2)),
        ("Static(3)", ax.Static(interval=3)),
        ("PAB()", ax.PAB()),
        (f"AdaCache.fast({steps})", ax.AdaCache.fast(steps)),
        (f"AdaCache.slow({steps})", ax.AdaCache.slow(steps)),
        ("FirstBlockCache(0.08)", ax.FirstBlockCache()),
        ("TeaCache(0.1, Latte table)", ax.TeaCache(coefficients="latte")),
    ]
    for label, policy in [
        ("AdaCache", ax.AdaCache.fast(steps)),
        ("AdaCache+MoReg", ax.AdaCache.fast(steps, moreg=True)),
        ("TeaCache", ax.TeaCache()),
        ("FirstBlockCache", ax.FirstBlockCache()),
    ]:
        calibration = ax.calibrate(model, policy, run, target=0.5, runs=2, progress=False)
        rows.append((f"{label} calibrated to 0.5 ({calibration.knob} {calibration.value:.3g})", calibration.policy))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, inputs = latte(**CONFIG)
    rows = policies(args.steps, model, inputs)

    results, reference = [], None
    uncached_flops = None
    for label, policy in rows:
        ax.transform(model, policy)
        sample(model, inputs, num_steps=2, seed=SEED, progress=False)  # capture at this shape
        # FLOPs: one generation under FlopCounterMode, per step.
        step_flops: list[int] = []
        counter = FlopCounterMode(display=False)

        def start(module, args, kwargs):
            counter.__enter__()

        def stop(module, args, kwargs, output):
            counter.__exit__(None, None, None)
            step_flops.append(counter.get_total_flops())

        hooks = [model.register_forward_pre_hook(start, with_kwargs=True, prepend=True),
                 model.register_forward_hook(stop, with_kwargs=True)]
        ax.reset(model)
        with ax.generation(model, num_steps=args.steps):
            sample(model, inputs, num_steps=args.steps, seed=SEED, progress=False)
        for hook in hooks:
            hook.remove()
        report = ax.report(model)
        total = sum(step_flops)
        if uncached_flops is None:
            uncached_flops = total, max(step_flops)
        saved = [
            (uncached_flops[1] - f) / (s.flops_total - s.flops_computed)
            for s, f in zip(report.steps, step_flops) if s.reused
        ]
        ax.reset(model)
        with ax.generation(model, num_steps=args.steps):
            result = sample(model, inputs, num_steps=args.steps, seed=SEED, progress=False)
        if reference is None:
            reference = result
        error = float((result.latents - reference.latents).norm() / reference.latents.norm())
        results.append({
            "policy": label,
            "decides_in_step": ax.get_runtime(model).caps.decides_in_step,
            "compute_fraction": round(report.compute_fraction, 3),
            "model_flops_fraction": round(total / uncached_flops[0], 3),
            "cached_step_flops_saved_over_branch_flops": round(min(saved), 3) if saved else None,
            "rel_error": float(f"{error:.3g}"),
        })
        ax.restore(model)
        print(results[-1], flush=True)

    # Wall time: rounds over all policies, so that machine drift hits every policy alike; fastest round.
    times: dict[str, list[float]] = {label: [] for label, _ in rows}
    for _ in range(args.repeats):
        for label, policy in rows:
            ax.transform(model, policy)
            sample(model, inputs, num_steps=2, seed=SEED, progress=False)  # capture at this shape
            ax.reset(model)
            with ax.generation(model, num_steps=args.steps):
                times[label].append(sample(model, inputs, num_steps=args.steps, seed=SEED, progress=False).seconds)
            ax.restore(model)
    for r in results:
        r["seconds"] = round(min(times[r["policy"]]), 3)
    base = results[0]["seconds"]
    for r in results:
        r["speedup"] = round(base / r["seconds"], 2)

    record = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "command": "python benchmarks/bench_policies.py " + " ".join(sys.argv[1:]),
        "model": f"LatteTransformer3DModel {CONFIG}, random weights",
        "steps": args.steps,
        "rows": results,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "policies_cpu.json").write_text(json.dumps(record, indent=2) + "\n")
    header = f"{'policy':58s} {'computed':>8s} {'FLOPs':>6s} {'saved/br':>8s} {'wall s':>7s} {'speed-up':>8s} {'rel err':>8s}"
    print(header)
    for r in results:
        saved = r["cached_step_flops_saved_over_branch_flops"]
        print(f"{r['policy']:58s} {r['compute_fraction']:>8.3f} {r['model_flops_fraction']:>6.3f} "
              f"{saved if saved is not None else '-':>8} {r['seconds']:>7.2f} {r['speedup']:>7.2f}x {r['rel_error']:>8.3g}")


if __name__ == "__main__":
    main()
