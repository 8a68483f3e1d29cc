"""Fidelity of adacache_fx's MagCache against diffusers' own MagCache hook.

On tiny zoo models (Wan, Flux; random weights, float32, CPU) and one flow-matching Euler loop of
``--steps`` steps (one model call per step, no guidance):

1. diffusers' calibration (``MagCacheConfig(calibrate=True)``) records the model's magnitude-ratio
   curve on seed 0 (its printout is parsed);
2. for each setting (threshold, K, retention), diffusers' hook (``model.enable_cache(MagCacheConfig(
   ..., mag_ratios=curve))``) and ``ax.transform(model, MagCache(..., mag_ratios=curve))`` each run the
   same loop on seed 1 from the same weights; the per-step compute/skip decisions (diffusers: the
   head hook's ``should_compute``; ours: the report's per-step reuse) and the final latents are
   compared, and both are measured against the uncached loop. Ours runs twice: with the default
   ``fold=True`` (one residual per span of blocks, what diffusers keeps) and with ``fold=False``
   (one residual per branch, re-added branch by branch);
3. for reference, the curve ``ax.calibrate`` records for MagCache on the same model (the whole
   model's residual, output minus input latent) is stored beside diffusers' (hidden-state residual).

    python benchmarks/peer_magcache.py [--steps 20] [--models wan flux]

Writes benchmarks/results/peer_magcache.json.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import platform
import sys
from datetime import date
from pathlib import Path

import torch

import adacache_fx as ax
from adacache_fx.policies.magcache import MagCache
from adacache_lab.zoo import ZOO

RESULTS = Path(__file__).parent / "results"
SHIFT = 3.0
CALIBRATION_SEED, EVAL_SEED = 0, 1
# (threshold, max_skip_steps, retention_ratio): diffusers' defaults, the authors' FLUX setting, a
# setting between, and an aggressive one.
SETTINGS = [(0.06, 3, 0.2), (0.12, 2, 0.2), (0.24, 5, 0.1), (0.5, 4, 0.1)]


def denoise(model, entry, steps: int, seed: int, after_call=None) -> torch.Tensor:
    """A flow-matching Euler loop (diffusers' FlowMatchEulerDiscreteScheduler, shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)
    scheduler.set_timesteps(steps)
    latents = entry.inputs(timestep=0.0, seed=seed)["hidden_states"].clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            kwargs = entry.inputs(timestep=float(t), seed=seed)
            kwargs["hidden_states"] = latents
            out = entry.output(model(**kwargs))
            if after_call is not None:
                after_call()
            latents = scheduler.step(out, t, latents).prev_sample
    return latents


def head_hook(model):
    """diffusers' MagCache leader hook (on the first transformer block)."""
    from diffusers.hooks import HookRegistry

    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and registry.get_hook("mag_cache_leader_block_hook") is not None:
            return HookRegistry.check_if_exists_or_initialize(module).get_hook("mag_cache_leader_block_hook")
    raise RuntimeError("no MagCache head hook found")


def diffusers_curve(entry, steps: int) -> list[float]:
    from diffusers import MagCacheConfig

    model = entry.build()
    model.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        denoise(model, entry, steps, CALIBRATION_SEED)
    model.disable_cache()
    lines = [line for line in printed.getvalue().splitlines() if line.startswith("[")]
    return [float(v) for v in ast.literal_eval(lines[-1])]


def run_diffusers(entry, steps: int, setting, curve) -> tuple[list[bool], torch.Tensor]:
    from diffusers import MagCacheConfig

    threshold, max_skip, retention = setting
    model = entry.build()
    model.enable_cache(MagCacheConfig(threshold=threshold, max_skip_steps=max_skip, retention_ratio=retention,
                                      num_inference_steps=steps, mag_ratios=list(curve)))
    hook = head_hook(model)
    decisions: list[bool] = []
    latents = denoise(model, entry, steps, EVAL_SEED,
                      after_call=lambda: decisions.append(bool(hook.state_manager.get_state().should_compute)))
    model.disable_cache()
    return decisions, latents


def run_ours(entry, steps: int, setting, curve, fold: bool) -> tuple[list[bool], torch.Tensor]:
    threshold, max_skip, retention = setting
    policy = MagCache(threshold=threshold, max_skip_steps=max_skip, retention_ratio=retention, mag_ratios=curve)
    model = ax.transform(entry.build(), policy, fold=fold)
    with ax.generation(model, num_steps=steps):
        latents = denoise(model, entry, steps, EVAL_SEED)
    report = ax.report(model)
    decisions = [r.reused == 0 for r in report.steps]
    assert all(r.computed == 0 for r in report.steps if r.reused), "a skipped step computed a branch"
    return decisions, latents


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def ours_curve(entry, steps: int) -> list[float]:
    model = entry.build()

    def run(m, i):
        denoise(m, entry, steps, CALIBRATION_SEED + i)

    calibration = ax.calibrate(model, MagCache(), run, target=0.5, runs=1, refine=0, progress=False)
    return [round(r, 5) for r in calibration.mag_ratios]


def compare(name: str, steps: int) -> dict:
    entry = ZOO[name]
    uncached = denoise(entry.build(), entry, steps, EVAL_SEED)
    curve = diffusers_curve(entry, steps)
    rows = []
    for setting in SETTINGS:
        d_decisions, d_latents = run_diffusers(entry, steps, setting, curve)
        o_decisions, o_latents = run_ours(entry, steps, setting, curve, fold=True)
        b_decisions, b_latents = run_ours(entry, steps, setting, curve, fold=False)
        assert b_decisions == o_decisions
        rows.append({
            "threshold": setting[0], "max_skip_steps": setting[1], "retention_ratio": setting[2],
            "diffusers_computes": d_decisions,
            "ours_computes": o_decisions,
            "decisions_equal": d_decisions == o_decisions,
            "computed_steps": [sum(d_decisions), sum(o_decisions)],
            "final_latents_max_abs_diff_ours_vs_diffusers": float((o_latents - d_latents).abs().max()),
            "final_latents_rel_l2_ours_vs_diffusers": rel_l2(o_latents, d_latents),
            # fold=False: every branch's residual cached and re-added (summed in another order)
            "per_branch_final_latents_max_abs_diff_vs_diffusers": float((b_latents - d_latents).abs().max()),
            "per_branch_final_latents_rel_l2_vs_diffusers": rel_l2(b_latents, d_latents),
            "rel_l2_vs_uncached": {"diffusers": rel_l2(d_latents, uncached), "ours": rel_l2(o_latents, uncached)},
        })
        print(f"{name} {setting}: decisions equal {rows[-1]['decisions_equal']}, computed "
              f"{rows[-1]['computed_steps']}, ours vs diffusers rel L2 "
              f"{rows[-1]['final_latents_rel_l2_ours_vs_diffusers']:.2e}", flush=True)
    return {
        "model": f"{type(entry.build()).__name__} (zoo '{name}', random weights, float32)",
        "steps": steps,
        "scheduler": f"FlowMatchEulerDiscreteScheduler(shift={SHIFT}), one call per step, no guidance",
        "calibration_seed": CALIBRATION_SEED,
        "eval_seed": EVAL_SEED,
        "curve_diffusers_calibrate": [round(r, 5) for r in curve],
        "curve_ax_calibrate_output_minus_input": ours_curve(entry, steps),
        "settings": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--models", nargs="+", default=["wan", "flux"])
    args = parser.parse_args()
    import diffusers

    torch.manual_seed(0)
    models = {name: compare(name, args.steps) for name in args.models}
    rows = [row for m in models.values() for row in m["settings"]]
    record = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "command": "python benchmarks/peer_magcache.py " + " ".join(sys.argv[1:]),
        "diffusers": diffusers.__version__,
        "ours": "ax.transform(model, MagCache(...)) with fold=True (the default: one stream_out - stream_in "
                "residual per span of reused blocks, as diffusers' hook keeps); per_branch_*: fold=False",
        "summary": {
            "all_decisions_equal": all(r["decisions_equal"] for r in rows),
            "settings_compared": len(rows),
            "max_final_latents_rel_l2_ours_vs_diffusers": max(
                r["final_latents_rel_l2_ours_vs_diffusers"] for r in rows),
            "max_final_latents_abs_diff_ours_vs_diffusers": max(
                r["final_latents_max_abs_diff_ours_vs_diffusers"] for r in rows),
            "max_final_latents_rel_l2_per_branch_vs_diffusers": max(
                r["per_branch_final_latents_rel_l2_vs_diffusers"] for r in rows),
        },
        "models": models,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "peer_magcache.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["summary"], indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
