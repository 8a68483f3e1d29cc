"""Quality/speed benchmark on the bundled reference model: every policy over a grid of its knob.

    adacache-fx bench [--clips 24] [--steps 30]

For a fixed prompt set (balanced over static, slow and fast motion) each point generates every clip
from the same noise as the uncached run, then records the compute fraction, wall-time speed-up,
PSNR/SSIM against the uncached clip and the judge's attribute accuracy. It then tests AdaCache's
three central claims on this model (see :func:`claims`) and writes JSON plus a Pareto plot.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from adacache_fx.policies.base import Policy
from .data import ClipSpec, make_dataset
from .demo import (DEFAULT_JUDGE, DEFAULT_WEIGHTS, PSNR_IDENTICAL, REFERENCE_MOREG_SCALE, ClipRun,
                   generate_clips, quality)
from .model import load


@dataclass(frozen=True)
class Point:
    """One policy setting of the sweep."""

    family: str
    label: str
    make: Callable[[int], Policy]  # num_steps -> policy


def default_points(guidance_scale: float = 1.0) -> list[Point]:
    """The sweep: each family over its knob. The ranges were chosen on the bundled model (they span
    compute fractions from about 0.27, AdaCache's largest rate, to 1); other models may need others.
    FasterCache's CFG-Cache points need classifier-free guidance (any ``guidance_scale`` but 1): at 1
    the sampler runs no unconditional half for them to cache."""
    from adacache_fx.policies.adacache import AdaCache, MoReg
    from adacache_fx.policies.duca import DuCa
    from adacache_fx.policies.fastercache import FasterCache
    from adacache_fx.policies.first_block import FirstBlockCache
    from adacache_fx.policies.pab import PAB
    from adacache_fx.policies.static import NoCache, Static
    from adacache_fx.policies.taylorseer import TaylorSeer
    from adacache_fx.policies.teacache import TeaCache
    from adacache_fx.policies.toca import ToCa

    points = [Point("no cache", "no cache", lambda n: NoCache())]
    points += [Point("Static", f"Static({k})", lambda n, k=k: Static(interval=k)) for k in (2, 3, 4, 6)]
    scales = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
    points += [Point("AdaCache", f"AdaCache x{s:g}", lambda n, s=s: AdaCache.fast(n).with_threshold_scale(s))
               for s in scales]
    moreg = MoReg(scale=REFERENCE_MOREG_SCALE)
    # MoReg multiplies the metric by ~0 on static clips and by hundreds to thousands on fast ones
    # (demo trace), so its thresholds need a much wider range of scales to reach the same compute
    # fractions.
    points += [Point("AdaCache+MoReg", f"AdaCache+MoReg x{s:g}",
                     lambda n, s=s: AdaCache.fast(n, moreg=moreg).with_threshold_scale(s))
               for s in (0.5, 1.0, 2.0, 4.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)]
    points += [Point("TeaCache", f"TeaCache {d:g}", lambda n, d=d: TeaCache(delta=d)) for d in (0.07, 0.1, 0.15, 0.2, 0.3, 0.4)]
    points += [Point("FirstBlockCache", f"FBCache {t:g}", lambda n, t=t: FirstBlockCache(threshold=t))
               for t in (0.1, 0.15, 0.2, 0.3, 0.4)]
    points += [Point("PAB", "PAB", lambda n: PAB())]
    points += [Point("TaylorSeer", f"TaylorSeer(Static({k}))", lambda n, k=k: TaylorSeer(Static(interval=k), order=2))
               for k in (2, 3, 4)]
    points += [Point("FasterCache", "FasterCache", lambda n: FasterCache(num_steps=n))]
    # CFG-Cache on the reference sampler's batched guidance, which puts the cond half first.
    points += [] if guidance_scale == 1.0 else [Point("FasterCache", f"FasterCache+CFG-Cache /{k}",
                     lambda n, k=k: FasterCache(num_steps=n, cfg_cache=True, cfg_layout="cond_first", cfg_interval=k))
               for k in (3, 5)]
    points += [Point("DuCa", f"DuCa({k})", lambda n, k=k: DuCa(interval=k)) for k in (2, 3, 4)]
    points += [Point("ToCa", f"ToCa({k})", lambda n, k=k: ToCa(interval=k, num_steps=n)) for k in (2, 3, 4)]
    from adacache_fx.policies.easycache import EasyCache
    from adacache_fx.policies.foca import FoCa

    points += [Point("EasyCache", f"EasyCache {t:g}", lambda n, t=t: EasyCache(threshold=t, warmup=3))
               for t in (0.02, 0.05, 0.1, 0.2, 0.4)]
    points += [Point("FoCa", f"FoCa(Static({k}))", lambda n, k=k: FoCa(Static(interval=k))) for k in (2, 3, 4)]
    return points


def magcache_points(curve: Sequence[float]) -> list[Point]:
    """MagCache over its threshold, with the magnitude-ratio curve recorded on this model."""
    from adacache_fx.policies.magcache import MagCache

    return [Point("MagCache", f"MagCache {t:g}", lambda n, t=t: MagCache(threshold=t, mag_ratios=tuple(curve), num_steps=n))
            for t in (0.02, 0.05, 0.1, 0.2, 0.4)]


def lemica_points(costs: torch.Tensor, max_span: int) -> list[Point]:
    """LeMiCa's searched schedules on this model's recorded costs, over its budget of computed steps."""
    from adacache_fx.policies.lemica import LeMiCa

    steps = costs.shape[0]
    fewest = -(-(steps - 1) // max_span) + 1  # computes every max_span steps, the first and last included
    budgets = sorted({b for b in (steps // 4, steps // 3, steps // 2, (2 * steps) // 3) if b >= fewest}, reverse=True)
    policies = [(b, LeMiCa.from_costs(costs, b, max_span=max_span)) for b in budgets]
    return [Point("LeMiCa", f"LeMiCa B={b}", lambda n, p=p: p) for b, p in policies]


def record_lemica_costs(weights: str | Path, num_steps: int, guidance_scale: float, max_span: int = 6) -> torch.Tensor:
    """LeMiCa's cost matrix of the model (``record_costs``), on a prompt held out from the bench's."""
    from adacache_fx.policies.lemica import record_costs

    from .data import encode_captions
    from .model import generate

    model = load(weights)
    config = model.config
    specs = bench_prompts(1, config.frames, config.size, seed=2025, grid=config.grid_layout)
    tokens, mask = encode_captions(specs, max_len=config.max_tokens)

    def run(transformer: torch.nn.Module, i: int) -> torch.Tensor:
        return generate(model, tokens[i:i + 1], mask[i:i + 1], num_steps=num_steps, guidance_scale=guidance_scale,
                        seed=700 + i)

    return record_costs(model.transformer, run, num_steps, runs=1, max_span=max_span)


def record_magcache_curve(weights: str | Path, num_steps: int, guidance_scale: float, runs: int = 2) -> tuple[float, ...]:
    """The model's magnitude-ratio curve, recorded by ``ax.calibrate`` on prompts held out from the
    bench's (another seed)."""
    from adacache_fx.calibrate import calibrate
    from adacache_fx.policies.magcache import MagCache

    from .data import encode_captions
    from .model import generate

    model = load(weights)
    config = model.config
    specs = bench_prompts(runs, config.frames, config.size, seed=2024, grid=config.grid_layout)
    tokens, mask = encode_captions(specs, max_len=config.max_tokens)

    def run(transformer: torch.nn.Module, i: int) -> None:
        generate(model, tokens[i:i + 1], mask[i:i + 1], num_steps=num_steps, guidance_scale=guidance_scale, seed=500 + i)

    calibration = calibrate(model.transformer, MagCache(num_steps=num_steps), run, target=0.5, runs=runs,
                            refine=0, progress=False)
    return tuple(calibration.mag_ratios)


def bench_prompts(count: int, frames: int = 8, size: int = 32, seed: int = 31337, grid: bool = False
                  ) -> list[ClipSpec]:
    """``count`` clip specs, a third each static, slow and fast (held out from training's seeds);
    ``grid`` as the model was trained (``ReferenceConfig.grid_layout``)."""
    _, pool = make_dataset(max(300, 10 * count), seed=seed, frames=frames, size=size, grid=grid)
    by_speed = {s: [c for c in pool if c.speed == s] for s in ("static", "slow", "fast")}
    return [by_speed[("static", "slow", "fast")[i % 3]][i // 3] for i in range(count)]


def _spearman(x: Sequence[float], y: Sequence[float]) -> float:
    from torchmetrics.functional import spearman_corrcoef

    return float(spearman_corrcoef(torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)))


def _interp(fractions: Sequence[float], values: Sequence[float], at: float) -> float | None:
    """Linear interpolation of a curve (sorted by fraction); None outside its range."""
    order = np.argsort(fractions)
    xs, ys = np.asarray(fractions)[order], np.asarray(values)[order]
    if not xs[0] <= at <= xs[-1]:
        return None
    return float(np.interp(at, xs, ys))


def claims(rows: list[dict], motions: list[float]) -> dict:
    """AdaCache's claims, tested on the sweep's rows.

    (a) AdaCache's PSNR above Static's at Static's compute fractions (AdaCache interpolated between
        its two bracketing threshold points); (b) computed steps differ across clips and grow with
        motion (Spearman correlation over clips at the AdaCache point nearest fraction 0.5);
        (c) MoReg's PSNR on the high-motion half of the clips above plain AdaCache's at equal compute
        (both curves over that half, interpolated at common fractions).
    """
    family = lambda name: [r for r in rows if r["family"] == name]  # noqa: E731
    ada, moreg, static = family("AdaCache"), family("AdaCache+MoReg"), family("Static")
    result: dict = {"a": [], "b": {}, "c": []}
    for s in static:
        if s["label"] not in ("Static(2)", "Static(3)"):
            continue
        at = s["compute_fraction"]
        ada_psnr = _interp([r["compute_fraction"] for r in ada], [r["psnr"] for r in ada], at)
        result["a"].append({"static": s["label"], "compute_fraction": at, "static_psnr": s["psnr"],
                            "adacache_psnr": ada_psnr,
                            "holds": None if ada_psnr is None else ada_psnr > s["psnr"]})
    if ada:
        mid = min(ada, key=lambda r: abs(r["compute_fraction"] - 0.5))
        steps = mid["computed_steps"]
        result["b"] = {"point": mid["label"], "compute_fraction": mid["compute_fraction"],
                       "distinct_step_counts": len(set(steps)), "min_steps": min(steps), "max_steps": max(steps),
                       "spearman_motion_vs_steps": _spearman(motions, steps)}
        result["b"]["holds"] = result["b"]["distinct_step_counts"] > 1 and result["b"]["spearman_motion_vs_steps"] > 0
    high = [i for i, m in enumerate(motions) if m >= float(np.median(motions))]

    def high_curve(rs: list[dict]) -> tuple[list[float], list[float]]:
        return ([float(np.mean([r["per_clip_fraction"][i] for i in high])) for r in rs],
                [float(np.mean([r["per_clip_psnr"][i] for i in high])) for r in rs])

    if ada and moreg:
        (fa, pa), (fm, pm) = high_curve(ada), high_curve(moreg)
        for at in (0.5, 0.33):
            a, m = _interp(fa, pa, at), _interp(fm, pm, at)
            result["c"].append({"compute_fraction": at, "adacache_psnr_high_motion": a,
                                "moreg_psnr_high_motion": m,
                                "holds": None if a is None or m is None else m > a})
    return result


def run_bench(
    out: str | Path = "benchmarks/results/reference_bench",
    weights: str | Path | None = None,
    judge_path: str | Path = DEFAULT_JUDGE,
    clips: int = 24,
    num_steps: int = 30,
    points: Sequence[Point] | None = None,
    progress: bool = True,
    command: str = "adacache-fx bench",
    guidance_scale: float = 1.0,
) -> dict:
    """Run the sweep; write ``out``.json and ``out``.png; return the record."""
    from tqdm.auto import tqdm

    from .judge import load_judge

    weights = weights or DEFAULT_WEIGHTS
    if points is None:
        curve = record_magcache_curve(weights or DEFAULT_WEIGHTS, num_steps, guidance_scale)
        costs = record_lemica_costs(weights or DEFAULT_WEIGHTS, num_steps, guidance_scale)
        points = default_points(guidance_scale) + magcache_points(curve) + lemica_points(costs, max_span=6)
    points = list(points)
    judge = load_judge(judge_path)
    config = load(weights).config
    specs = bench_prompts(clips, config.frames, config.size, grid=config.grid_layout)
    motions = [s.motion_amount for s in specs]
    bar = tqdm(total=len(points) * clips, desc="bench", disable=not progress)
    rows: list[dict] = []
    reference: list[ClipRun] | None = None
    for point in points:
        bar.set_postfix_str(point.label)
        runs = generate_clips(load(weights), point.make(num_steps), specs, num_steps, guidance_scale,
                              progress=lambda: bar.update(1))
        if reference is None:
            reference = runs
        scores = [quality(ref.video, r.video) for ref, r in zip(reference, runs)]
        accuracy = judge.accuracy(torch.stack([r.video for r in runs]), specs)
        seconds = sum(r.seconds for r in runs)
        rows.append({
            "family": point.family, "label": point.label,
            "compute_fraction": float(np.mean([r.compute_fraction for r in runs])),
            "flops_fraction": float(np.mean([r.flops_fraction for r in runs])),
            "seconds": seconds,
            "speedup": sum(r.seconds for r in reference) / seconds,
            "psnr": float(np.mean([s[0] for s in scores])),
            "ssim": float(np.mean([s[1] for s in scores])),
            "accuracy": accuracy,
            "attribute_accuracy": float(np.mean([accuracy["shape"], accuracy["colour"], accuracy["direction"]])),
            "computed_steps": [sum(r.computed_steps) for r in runs],
            "per_clip_fraction": [r.compute_fraction for r in runs],
            "per_clip_psnr": [s[0] for s in scores],
        })
    bar.close()
    record = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "command": command,
        "weights": str(weights),
        "clips": clips, "steps": num_steps, "guidance_scale": guidance_scale,
        "prompts": [s.caption for s in specs],
        "motion_px_per_frame": motions,
        "note": f"psnr is {PSNR_IDENTICAL:g} dB for identical clips (the uncached reference itself)",
        "rows": rows,
        "claims": claims(rows, motions),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    plot_pareto(rows, out.with_suffix(".png"), f"reference model, {clips} clips, {num_steps} DDIM steps")
    return record


def plot_pareto(rows: list[dict], path: Path, title: str) -> None:
    """2x2: branch-FLOP fraction and speed-up (x) against PSNR and attribute accuracy (y), per family.

    The FLOP fraction rather than the count of branch executions: token-wise policies (DuCa, ToCa)
    run branches on part of the tokens, which a count of executions cannot show."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    families = list(dict.fromkeys(r["family"] for r in rows))
    colours = plt.get_cmap("tab20" if len(families) > 10 else "tab10")
    markers = "osD^v<>p"  # colours repeat past 20 families; the marker tells them apart then
    for i, name in enumerate(families):
        rs = sorted((r for r in rows if r["family"] == name), key=lambda r: r["flops_fraction"])
        style = dict(color=colours(i % colours.N), marker=markers[i % len(markers)] if len(rs) > 1 else "*",
                     markersize=5 if len(rs) > 1 else 10, label=name)
        for ax, x_key, y_key in [(axes[0][0], "flops_fraction", "psnr"), (axes[0][1], "speedup", "psnr"),
                                 (axes[1][0], "flops_fraction", "attribute_accuracy"),
                                 (axes[1][1], "speedup", "attribute_accuracy")]:
            ys = [min(r[y_key], 60.0) if y_key == "psnr" else r[y_key] for r in rs]
            ax.plot([r[x_key] for r in rs], ys, linestyle="-" if len(rs) > 1 else "none", **style)
    for ax, (x, y) in zip(axes.flat, [("fraction of branch FLOPs computed", "PSNR vs uncached (dB, capped at 60)"),
                                      ("wall-time speed-up", "PSNR vs uncached (dB, capped at 60)"),
                                      ("fraction of branch FLOPs computed", "judge accuracy (shape, colour, direction)"),
                                      ("wall-time speed-up", "judge accuracy (shape, colour, direction)")]):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
