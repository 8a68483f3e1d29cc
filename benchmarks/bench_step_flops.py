"""FLOPs per step kind of the token-wise and forecasting policies (issue 6), on six diffusers DiTs.

Each zoo model (tiny config, random weights) runs one generation with batched guidance (batch 2:
cond and uncond). Every model call's FLOPs are counted with ``FlopCounterMode`` and divided by an
uncached call's; steps are grouped by what their plan asked for:

* ``full``: every branch computed;   ``reuse``: some branches reused (or forecast) whole;
* ``token-wise``: some branches recomputed for a token subset (``Plan.partial``);
* ``cond-only ...``: the uncond half skipped (FasterCache's CFG-Cache), combined with the above.

    python benchmarks/bench_step_flops.py [--steps 12]

Writes ``benchmarks/results/step_flops_cpu.json`` and prints the table.
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
from adacache_lab.zoo import ZOO

RESULTS = Path(__file__).parent / "results"
ARCHITECTURES = ("pixart", "latte", "wan", "dit", "flux", "cogvideox")


def policies() -> dict[str, callable]:
    return {
        "DuCa(ratio=0.5)": lambda: ax.DuCa(ratio=0.5),
        "ToCa(ratio=0.2)": lambda: ax.ToCa(ratio=0.2),
        "TaylorSeer(Static(3), order=2)": lambda: ax.TaylorSeer(ax.Static(3), order=2),
        # Every zoo entry batches its two rows like diffusers' pipelines would (uncond first). Flux
        # outputs packed tokens (no spatial axes to split frequencies over): its bias is reused whole.
        "FasterCache(cfg_cache=True)": lambda name: ax.FasterCache(
            cfg_cache=True, cfg_interval=3, cfg_start=0.2, alpha=0.0 if name == "flux" else 0.2),
    }


def call_flops(model: torch.nn.Module, inputs: dict) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(**inputs)
    return counter.get_total_flops()


def step_kind(plan: ax.Plan) -> str:
    kind = "token-wise" if plan.partial else "reuse" if plan.reuse else "full"
    return f"cond-only {kind}" if plan.skip_uncond else kind


def measure(name: str, make_policy, steps: int) -> dict[str, float]:
    entry = ZOO[name]
    model = entry.build()
    full = call_flops(model, entry.inputs(timestep=500.0, batch=2))
    policy = make_policy(name) if make_policy.__code__.co_argcount else make_policy()
    planner, kinds = policy.plan, []

    def recording_plan(ctx):
        plan = planner(ctx)
        kinds.append(step_kind(plan))
        return plan

    policy.plan = recording_plan
    ax.transform(model, policy)
    ratios: dict[str, list[float]] = {}
    step_inputs = [entry.inputs(timestep=999.0 - i * 999.0 / steps, batch=2, seed=i) for i in range(steps)]
    with torch.no_grad(), ax.generation(model, num_steps=steps):
        for inputs in step_inputs:  # captures every block at both batch sizes: not counted
            model(**inputs)
    ax.reset(model)
    kinds.clear()
    with torch.no_grad(), ax.generation(model, num_steps=steps):
        for i, inputs in enumerate(step_inputs):
            flops = call_flops(model, inputs)
            ratios.setdefault(kinds[i], []).append(flops / full)
    report = ax.report(model)
    out = {kind: round(sum(v) / len(v), 3) for kind, v in sorted(ratios.items())}
    out["generation (report flops_fraction)"] = round(report.flops_fraction, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    rows = []
    for label, make in policies().items():
        for name in ARCHITECTURES:
            rows.append({"policy": label, "model": name, "flops_per_step_kind": measure(name, make, args.steps)})
            print(f"{label:32s} {name:10s} " + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1]["flops_per_step_kind"].items()),
                  flush=True)
    record = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "command": "python benchmarks/bench_step_flops.py " + " ".join(sys.argv[1:]),
        "what": "model-call FLOPs / an uncached call's (FlopCounterMode), mean per step kind; batch 2 (cond+uncond)",
        "steps": args.steps,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "step_flops_cpu.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
