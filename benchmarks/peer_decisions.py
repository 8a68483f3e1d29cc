"""Per-step decisions of adacache_fx's policies against diffusers' own cache hooks, at equal settings.

Pairs: diffusers' ``FirstBlockCacheConfig`` / ``PyramidAttentionBroadcastConfig`` / ``FasterCacheConfig``
/ ``TaylorSeerCacheConfig`` (``model.enable_cache(config)``) against ``ax.FirstBlockCache`` / ``ax.PAB`` /
``ax.FasterCache`` / ``ax.TaylorSeer`` (``ax.transform(model, policy)``), on tiny zoo models (random
weights, float32, CPU) and one flow-matching Euler loop of ``--steps`` steps (diffusers'
FlowMatchEulerDiscreteScheduler, shift 3, one model call per step; FasterCache: classifier-free
guidance batched as one call, uncond rows first, guidance scale 5). Each side starts from a fresh
model of the same zoo builder (same seeded weights) and the same inputs.

Per step and setting:

* diffusers: which hooked modules actually ran (each cache hook's ``fn_ref.original_forward`` is
  wrapped with a counter; FasterCache's denoiser hook also records the batch it passed on, i.e.
  whether the uncond half was skipped), translated into adacache_fx's branches (a branch computes
  when its block (First-Block-Cache) or its module (the attention hooks) ran, or when diffusers
  hooks nothing there, e.g. MLPs): reused branches, the computed share of a full call's branch FLOPs
  (weighting each branch by ``BranchInfo.flops``, so it tells which branches, not only how many), and
  whether the call was cond-only;
* ours: ``ax.report(model).steps`` (reused, flops_computed / flops_total, cond_only).

Decisions are "equal" when these three agree on every step. Final latents are compared between the two and each against the uncached loop.

Settings are mapped so that both sides describe the same schedule where each library can express
it (timestep windows in diffusers' units are turned into the step indices they select with this
scheduler); rows whose ``expect`` is ``"differs"`` are deliberate: the libraries' own defaults, or
semantics one of them cannot express, and their ``cause`` says why.

    python benchmarks/peer_decisions.py [--steps 20] [--pairs fbc pab fastercache taylorseer]

Writes benchmarks/results/peer_decisions.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import sys
import time
from collections import Counter
from datetime import date
from pathlib import Path

import torch

import adacache_fx as ax
from adacache_lab.zoo import ZOO

RESULTS = Path(__file__).parent / "results"
SHIFT = 3.0
SEED = 1
GUIDANCE = 5.0
# Per model: none of diffusers' default 0.05 reuses on these random-weight models (recorded: every
# step computes on both sides), so thresholds where they start to.
FBC_THRESHOLDS = {"wan": (0.05, 0.08, 0.12, 0.2), "flux": (0.3, 0.4, 0.6)}
# What the denoising loop is at: diffusers' hooks read it through ``current_timestep_callback``.
NOW: dict = {"t": None, "step": None}


def _now() -> float:
    return NOW["t"]


# -- the loop ---------------------------------------------------------------------------------------
def timesteps(steps: int) -> list[float]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)
    scheduler.set_timesteps(steps)
    return [float(t) for t in scheduler.timesteps]


def denoise(model, entry, steps: int, *, cfg: bool = False, context: str | None = None,
            after_call=None) -> torch.Tensor:
    """Flow-matching Euler loop; ``cfg``: one batched call per step (uncond rows, then cond rows)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)
    scheduler.set_timesteps(steps)
    latents = entry.inputs(timestep=0.0, seed=SEED)["hidden_states"].clone()
    batch = 2 if cfg else 1
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            NOW.update(t=float(t), step=i)
            kwargs = entry.inputs(timestep=float(t), batch=batch, seed=SEED)
            kwargs["hidden_states"] = torch.cat([latents] * batch) if cfg else latents
            scope = model.cache_context(context) if context else contextlib.nullcontext()
            with scope:
                out = entry.output(model(**kwargs))
            if after_call is not None:
                after_call(i)
            if out.shape[1] != latents.shape[1]:  # learned sigma (Latte): the first channels are the prediction
                out = out[:, : latents.shape[1]]
            if cfg:
                uncond, cond = out.chunk(2)
                out = uncond + GUIDANCE * (cond - uncond)
            latents = scheduler.step(out, t, latents).prev_sample
    NOW.update(t=None, step=None)
    return latents


# -- diffusers' side --------------------------------------------------------------------------------
class Probe:
    """Counts, per step, which modules under one of diffusers' cache hooks ran their own forward."""

    def __init__(self, model: torch.nn.Module, hook_names: tuple[str, ...], denoiser_hook: str | None = None):
        self.hooked: set[str] = set()
        self.ran: Counter = Counter()
        self.batches: list[int] = []
        self.steps: list[dict] = []
        self.denoiser = False
        for name, module in model.named_modules():
            registry = getattr(module, "_diffusers_hook", None)
            if registry is None:
                continue
            for hook_name in hook_names:
                hook = registry.get_hook(hook_name)
                if hook is not None and name:
                    self._wrap(hook, name)
            if denoiser_hook is not None and name == "":
                hook = registry.get_hook(denoiser_hook)
                if hook is not None:
                    original = hook.fn_ref.original_forward

                    def forward(*args, _original=original, **kwargs):
                        self.batches.append(int(kwargs["hidden_states"].shape[0]))
                        return _original(*args, **kwargs)

                    hook.fn_ref.original_forward = forward
                    self.denoiser = True
        if not self.hooked and not self.denoiser:
            raise RuntimeError(f"no diffusers hook {hook_names} found on {type(model).__name__}")

    def _wrap(self, hook, name: str) -> None:
        original = hook.fn_ref.original_forward

        def forward(*args, _original=original, _name=name, **kwargs):
            self.ran[_name] += 1
            return _original(*args, **kwargs)

        hook.fn_ref.original_forward = forward
        self.hooked.add(name)

    def step_done(self, step: int) -> None:
        self.steps.append({"ran": set(self.ran), "batch": self.batches[-1] if self.batches else None})
        self.ran.clear()


def block_of(branch_id: str) -> str:
    return branch_id.rsplit(".", 1)[0]


def translate(probe: Probe, branches, level: str, full_batch: int) -> list[tuple[int, float, bool]]:
    """diffusers' per-step record in our branches: (reused branches, computed share of the branch FLOPs
    of a full call, cond-only call)."""
    out = []
    total = sum(b.flops or 0 for b in branches)
    for record in probe.steps:
        cond_only = record["batch"] is not None and record["batch"] < full_batch
        reused, flops = 0, 0
        for b in branches:
            key = block_of(b.id) if level == "block" else b.id
            computed = key not in probe.hooked or key in record["ran"]
            if computed:
                flops += b.flops or 0
            else:
                reused += 1
        share = flops / total / (2 if cond_only else 1)
        out.append((reused, round(share, 6), cond_only))
    return out


def run_diffusers(entry, steps: int, config, hook_names, level: str, *, cfg: bool, context: str | None,
                  denoiser_hook: str | None = None):
    model = entry.build()
    model.enable_cache(config)
    probe = Probe(model, hook_names, denoiser_hook)
    latents = denoise(model, entry, steps, cfg=cfg, context=context, after_call=probe.step_done)
    return probe, latents


# -- ours -------------------------------------------------------------------------------------------
def run_ours(entry, steps: int, policy, *, cfg: bool):
    model = ax.transform(entry.build(), policy)
    with ax.generation(model, num_steps=steps):
        latents = denoise(model, entry, steps, cfg=cfg)
    report = ax.report(model)
    assert len(report.steps) == steps, f"{len(report.steps)} step records for {steps} steps"
    # The computed share of the step's branch FLOPs; a cond-only call's share is counted against a
    # full (uncond + cond) call, as ours reports it (flops_computed / flops_total, both at the shape the
    # cond-only call was captured at, the computed part halved).
    profile = [(r.reused, round(r.flops_computed / r.flops_total, 6), r.cond_only > 0) for r in report.steps]
    assert all(r.partial == 0 for r in report.steps)
    return report, profile, latents


# -- comparison -------------------------------------------------------------------------------------
def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


_UNCACHED: dict = {}


def uncached(entry, steps: int, cfg: bool) -> torch.Tensor:
    key = (entry.name, steps, cfg)
    if key not in _UNCACHED:
        _UNCACHED[key] = denoise(entry.build(), entry, steps, cfg=cfg)
    return _UNCACHED[key]


def compare(pair: str, row: dict, steps: int) -> dict:
    entry = ZOO[row["model"]]
    cfg = row.get("cfg", False)
    started = time.perf_counter()
    probe, d_latents = run_diffusers(entry, steps, row["diffusers"], row["hooks"], row["level"], cfg=cfg,
                                     context=row.get("context"), denoiser_hook=row.get("denoiser_hook"))
    report, ours, o_latents = run_ours(entry, steps, row["ours"], cfg=cfg)
    theirs = translate(probe, report.branches, row["level"], full_batch=2 if cfg else 1)
    base = uncached(entry, steps, cfg)
    equal = theirs == ours
    first_diff = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), None)
    result = {
        "model": row["model"],
        "setting": row["name"],
        "diffusers_config": row["diffusers_kwargs"],
        "ours_policy": repr(row["ours"]),
        "expect": row.get("expect", "equal"),
        "mapping": row.get("mapping", ""),
        "cause_of_difference": row.get("cause", ""),
        "diffusers_hooked_modules": sorted(probe.hooked),
        "diffusers_reused_branches": [r for r, _, _ in theirs],
        "ours_reused_branches": [r for r, _, _ in ours],
        "diffusers_computed_flop_share": [f for _, f, _ in theirs],
        "ours_computed_flop_share": [f for _, f, _ in ours],
        "decisions_equal": equal,
        "first_differing_step": first_diff,
        "steps_with_reuse": [sum(1 for r, _, _ in theirs if r), sum(1 for r, _, _ in ours if r)],
        "final_latents_max_abs_diff_ours_vs_diffusers": max_abs(o_latents, d_latents),
        "final_latents_rel_l2_ours_vs_diffusers": rel_l2(o_latents, d_latents),
        "vs_uncached": {
            "diffusers": {"max_abs": max_abs(d_latents, base), "rel_l2": rel_l2(d_latents, base)},
            "ours": {"max_abs": max_abs(o_latents, base), "rel_l2": rel_l2(o_latents, base)},
        },
        "branch_flop_fraction": {
            "diffusers": sum(f for _, f, _ in theirs) / steps,
            "ours_report_flops_fraction": report.flops_fraction,
        },
    }
    if cfg:
        result["diffusers_cond_only_steps"] = [i for i, (_, _, c) in enumerate(theirs) if c]
        result["ours_cond_only_steps"] = [i for i, (_, _, c) in enumerate(ours) if c]
        # What ours reports a call costs: a cond-only call runs half the rows of a full one, so with no
        # branch reused its computed FLOPs should be half a full call's.
        result["ours_step_flops_computed_and_total"] = [[r.flops_computed, r.flops_total] for r in report.steps]
        full = [r.flops_computed for r in report.steps if not r.cond_only and not r.reused]
        half = [r.flops_computed for r in report.steps if r.cond_only and not r.reused]
        if full and half:
            result["ours_cond_only_call_flops_vs_full_call"] = half[0] / full[0]
    status = "EQUAL" if equal else f"differ from step {first_diff}"
    print(f"[{pair}] {row['model']:6s} {row['name']}: decisions {status} (expected {result['expect']}); "
          f"ours vs diffusers max|d| {result['final_latents_max_abs_diff_ours_vs_diffusers']:.2e}, "
          f"rel L2 vs uncached d={result['vs_uncached']['diffusers']['rel_l2']:.2e} "
          f"o={result['vs_uncached']['ours']['rel_l2']:.2e} ({time.perf_counter() - started:.1f}s)", flush=True)
    return result


# -- settings ---------------------------------------------------------------------------------------
def fbc_rows(steps: int, ts: list[float]) -> list[dict]:
    from diffusers import FirstBlockCacheConfig

    rows = []
    for model, thresholds in FBC_THRESHOLDS.items():
        for threshold in thresholds:
            rows.append({
                "model": model, "name": f"threshold={threshold}",
                "diffusers": FirstBlockCacheConfig(threshold=threshold),
                "diffusers_kwargs": {"threshold": threshold},
                "ours": ax.FirstBlockCache(threshold=threshold, blocks=1, tail_blocks=0),
                "hooks": ("fbc_leader_block_hook", "fbc_block_hook"), "level": "block", "context": "cond",
                "mapping": "diffusers: head block = first block of the first block list, always runs; every "
                           "other block (its 'tail' included) skips when mean|r - r_ref| / mean|r_ref| <= "
                           "threshold, r = head block's hidden-state residual, r_ref moving only on computing "
                           "calls; ours: blocks=1, tail_blocks=0 (the same rule; computes when not < threshold)",
            })
    return rows


def aligned_window(ts: list[float], multiple: int) -> tuple[float, float]:
    """A (low, high) timestep window, exclusive, whose first step is a multiple of ``multiple``."""
    steps = len(ts)
    first = multiple * int(0.6 * steps // multiple)
    high = 1001.0 if first == 0 else round((ts[first - 1] + ts[first]) / 2, 3)
    return (100.0, high)


def pab_rows(steps: int, ts: list[float]) -> list[dict]:
    from diffusers import PyramidAttentionBroadcastConfig

    def config(spatial=None, temporal=None, cross=None, window=(100.0, 800.0), identifiers=None):
        kwargs = {
            "spatial_attention_block_skip_range": spatial, "temporal_attention_block_skip_range": temporal,
            "cross_attention_block_skip_range": cross, "spatial_attention_timestep_skip_range": window,
            "temporal_attention_timestep_skip_range": window, "cross_attention_timestep_skip_range": window,
        }
        if identifiers:
            kwargs.update(identifiers)
        shown = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}
        return PyramidAttentionBroadcastConfig(current_timestep_callback=_now, **kwargs), shown

    def first_in(window):
        return next(i for i, t in enumerate(ts) if window[0] < t < window[1])

    default_window = (100.0, 800.0)
    w12 = aligned_window(ts, 12)
    anchored = {
        "spatial_attention_block_identifiers": ("^transformer_blocks",),
        "temporal_attention_block_identifiers": ("^temporal_transformer_blocks",),
        "cross_attention_block_identifiers": ("^transformer_blocks",),
    }
    hooks = ("pyramid_attention_broadcast",)
    rows = []

    def add(model, name, d_kwargs, ours, expect="equal", cause="", mapping=""):
        cfg, shown = config(**d_kwargs)
        rows.append({"model": model, "name": name, "diffusers": cfg, "diffusers_kwargs": shown, "ours": ours,
                     "hooks": hooks, "level": "module", "expect": expect, "cause": cause,
                     "mapping": mapping or "ranges and window as given on both sides; MLPs always compute"})

    e = first_in(default_window)
    add("wan", "spatial=2 cross=6, window (100, 800) (diffusers' default window)",
        dict(spatial=2, cross=6, window=default_window),
        ax.PAB(spatial=2, temporal=None, cross=6, window=default_window),
        mapping=f"the window opens at step {e}; both count the broadcast period from the generation's first "
                "step (diffusers: calls since the start; ours: the step index, PAB's default since "
                "2026-12-02; restart_in_window=True restarts it where the window opens)")
    add("wan", f"spatial=2 cross=6, window {w12} (opens on step {first_in(w12)})",
        dict(spatial=2, cross=6, window=w12), ax.PAB(spatial=2, temporal=None, cross=6, window=w12))
    add("wan", f"cross=3 only, window {w12}: cross attention has no gate in Wan, so both cache the same tensor",
        dict(cross=3, window=w12), ax.PAB(spatial=None, temporal=None, cross=3, window=w12))
    add("latte", f"spatial=2 temporal=4 cross=6, window {w12}, diffusers' default block identifiers",
        dict(spatial=2, temporal=4, cross=6, window=w12), ax.PAB(spatial=2, temporal=4, cross=6, window=w12),
        expect="differs",
        cause="diffusers matches its default identifiers with re.search, so the spatial identifier "
              "'transformer_blocks' also matches 'temporal_transformer_blocks.N.attn1' and, spatial being "
              "tested first, Latte's temporal attention gets the spatial range (2) and never the temporal "
              "one (4): a diffusers bug; anchored identifiers (next row) give the intended split")
    add("latte", f"spatial=2 temporal=4 cross=6, window {w12}, anchored identifiers",
        dict(spatial=2, temporal=4, cross=6, window=w12, identifiers=anchored),
        ax.PAB(spatial=2, temporal=4, cross=6, window=w12))
    add("flux", f"spatial=2, window {w12}, double-stream blocks only ('^transformer_blocks')",
        dict(spatial=2, window=w12, identifiers={"spatial_attention_block_identifiers": ("^transformer_blocks",)}),
        ax.PAB(spatial=2, temporal=None, cross=None, window=w12),
        mapping="Flux's timestep argument is t/1000; ours detects it and compares t*1000 with the window")
    add("flux", f"spatial=2, window {w12}, diffusers' default identifiers",
        dict(spatial=2, window=w12), ax.PAB(spatial=2, temporal=None, cross=None, window=w12),
        expect="differs",
        cause="diffusers also broadcasts the attention inside Flux's single-stream blocks and recomputes "
              "their MLP; in ours a single block is one region (attention and MLP share proj_out and the "
              "gate), and PAB recomputes MLP-containing regions, so those blocks always compute")
    return rows


def fastercache_rows(steps: int, ts: list[float]) -> list[dict]:
    from diffusers import FasterCacheConfig

    hooks = ("faster_cache_block",)
    last = steps - 1

    def window_from(first: int) -> tuple[float, float]:
        """Exclusive timestep range selecting steps first .. steps - 2."""
        return (round(ts[last], 3), round((ts[first - 1] + ts[first]) / 2, 3))

    def row(name, d_kwargs, ours, expect="equal", cause="", mapping=""):
        kwargs = dict(tensor_format="BCFHW", current_timestep_callback=_now, **d_kwargs)
        shown = {k: (list(v) if isinstance(v, tuple) else v) for k, v in d_kwargs.items()}
        return {"model": "wan", "name": name, "cfg": True, "diffusers": FasterCacheConfig(**kwargs),
                "diffusers_kwargs": shown, "ours": ours, "hooks": hooks, "level": "module",
                "denoiser_hook": "faster_cache_denoiser", "expect": expect, "cause": cause, "mapping": mapping}

    n = 5
    first = max(n, n * round(0.25 * steps / n))  # CFG-Cache starts on a multiple of n: both count alike
    window = window_from(first)
    start = (first + 0.5) / steps  # int(start * steps) == first
    split = math.ceil(0.5 * steps)
    cfg_only = dict(spatial_attention_block_skip_range=None, temporal_attention_block_skip_range=None,
                    unconditional_batch_skip_range=n, unconditional_batch_timestep_skip_range=window)
    rows = [
        row(f"CFG-Cache only, every {n}th step full from step {first}, bias added as stored",
            dict(cfg_only, alpha_low_frequency=1.0, alpha_high_frequency=1.0),
            ax.FasterCache(interval=1, cfg_cache=True, cfg_interval=n, cfg_start=start, alpha=0.0),
            mapping=f"diffusers: uncond skipped when iteration % {n} != 0 inside the timestep range "
                    f"{window} (= steps {first}..{last - 1}), weights 1.0; ours: cfg_start={start:.4f} "
                    f"(step {first}), alpha=0, interval=1 (no attention reuse); diffusers' block hooks off "
                    "(skip ranges None)"),
        row(f"CFG-Cache only, band weights 1.2 (low before step {split}, high from it)",
            dict(cfg_only, alpha_low_frequency=1.2, alpha_high_frequency=1.2,
                 low_frequency_weight_update_timestep_range=(round((ts[split - 1] + ts[split]) / 2, 3), 1001.0),
                 high_frequency_weight_update_timestep_range=(-1.0, round((ts[split - 1] + ts[split]) / 2, 3))),
            ax.FasterCache(interval=1, cfg_cache=True, cfg_interval=n, cfg_start=start, alpha=0.2, cfg_split=0.5),
            mapping="both keep the weighted bands on every cond-only step, so k skips after a full step "
                    "weigh the bias 1.2**k (diffusers: state.delta = state.delta * w; the authors' Mochi "
                    "script; ours: FasterCache's default compound_weights=True since 2026-12-02)"),
    ]
    # Attention reuse on odd steps and CFG-Cache on the same steps: the only way diffusers' attention
    # skip (which needs a cond-only call, the cache holding cond rows only) lines up with ours.
    first2 = 2 * max(1, round(0.25 * steps / 2))
    window2 = window_from(first2)
    start2 = (first2 + 0.5) / steps
    rows.append(row(
        f"attention every 2nd step + CFG-Cache every 2nd step, from step {first2}",
        dict(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=window2,
             unconditional_batch_skip_range=2, unconditional_batch_timestep_skip_range=window2,
             alpha_low_frequency=1.0, alpha_high_frequency=1.0),
        ax.FasterCache(interval=2, start=start2, kinds=("self_attention",), cfg_cache=True, cfg_interval=2,
                       cfg_start=start2, alpha=0.0),
        expect="equal decisions, different latents",
        mapping=f"self-attention (attn1) reused on odd steps {first2 + 1}..{last - 1} by both; uncond skipped "
                "on the same steps",
        cause="what a reused attention adds: diffusers caches the attention module's output (the gate "
              "multiplies it afterwards) and extrapolates t + (t - t2) * 0.5 from its last two *calls*, so "
              "t2 is the approximation it made two steps ago; ours extrapolates the gated residual from "
              "the last two *computed* steps, F1 + w (F1 - F2) k / gap with w ramping 0 -> 1 (the authors' "
              "Mochi script: cache[1] + (cache[1] - cache[0]) * 0.5 over computed outputs only)"))
    rows.append(row(
        "both libraries' defaults",
        {}, ax.FasterCache(cfg_cache=True),
        expect="differs",
        cause="different schedules at the defaults: diffusers skips attention only on cond-only steps "
              "(an uncond+cond call can not be served from its cond-only cache), inside timesteps < 681, "
              "and the uncond half on iteration % 5 != 0 inside timesteps < 641 (the last step included), "
              "with band weights 1.1 compounding; ours reuses attention (cross attention included) every "
              "2nd step from 30% of the steps whether or not the uncond half runs, counts CFG-Cache's "
              "period from cfg_start (step 6 here) and never skips the uncond half on the last step"))
    return rows


def taylorseer_rows(steps: int, ts: list[float]) -> list[dict]:
    from diffusers import TaylorSeerCacheConfig

    hooks = ("taylorseer_cache",)
    cross = [r"blocks\.\d+\.attn2"]
    attention = [r"blocks\.\d+\.attn\d"]

    def row(model, name, interval, before, order, identifiers, kinds, expect="equal", cause="", ours_warmup=None):
        kwargs = dict(cache_interval=interval, disable_cache_before_step=before, max_order=order,
                      taylor_factors_dtype=torch.float32)
        if identifiers is not None:
            kwargs["cache_identifiers"] = identifiers
        shown = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in kwargs.items()}
        warmup = before if ours_warmup is None else ours_warmup
        base = ax.Static(interval=interval, warmup=warmup, cooldown=0, kinds=kinds)
        return {"model": model, "name": name, "diffusers": TaylorSeerCacheConfig(**kwargs),
                "diffusers_kwargs": shown, "ours": ax.TaylorSeer(base=base, order=order), "hooks": hooks,
                "level": "module", "context": "cond", "expect": expect, "cause": cause,
                "mapping": "diffusers computes on steps < before and on (step - before - 1) % interval == 0, so "
                           "ours is Static(interval, warmup=before, cooldown=0) when (before + 1) % interval "
                           "== 0; taylor_factors_dtype float32"}

    return [
        row("wan", "cross attention, interval 2, warmup 3, order 1", 2, 3, 1, cross, ("cross_attention",)),
        row("wan", "cross attention, interval 5, warmup 4, order 1", 5, 4, 1, cross, ("cross_attention",)),
        row("wan", "cross attention, interval 3, warmup 2, order 2", 3, 2, 2, cross, ("cross_attention",)),
        row("wan", "self + cross attention, interval 3, warmup 2, order 1", 3, 2, 1, attention,
            ("self_attention", "cross_attention"),
            expect="equal decisions, different latents",
            cause="diffusers forecasts the attention module's output and multiplies it by the current "
                  "step's gate (Wan's self-attention is gated by the timestep modulation); ours forecasts "
                  "the gated residual as a whole"),
        row("flux", "diffusers' default identifiers (attention of every block), interval 3, warmup 2, order 1",
            3, 2, 1, None, ("joint_attention",),
            expect="equal decisions, different latents",
            cause="diffusers forecasts the attention modules' outputs; ours the gated residuals, and in the "
                  "single-stream blocks the whole fused attention+MLP region (diffusers recomputes the "
                  "MLP there)"),
        row("wan", "diffusers' default schedule (interval 5, warmup 3), cross attention, order 1",
            5, 3, 1, cross, ("cross_attention",), expect="differs",
            cause="diffusers computes on (step - before - 1) % interval == 0, so with before=3, interval=5 "
                  "it forecasts step 3 straight after the warmup and computes steps 4, 9, 14, 19; Static "
                  "computes on step % interval == 0 (5, 10, 15): no setting of ours has that phase"),
    ]


PAIRS = {"fbc": fbc_rows, "pab": pab_rows, "fastercache": fastercache_rows, "taylorseer": taylorseer_rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    args = parser.parse_args()
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # FasterCache's "experimental" warning, once per model
    torch.manual_seed(0)
    started = time.perf_counter()
    ts = timesteps(args.steps)
    pairs = {}
    for pair in args.pairs:
        pairs[pair] = [compare(pair, row, args.steps) for row in PAIRS[pair](args.steps, ts)]

    def expected(r):
        return r["decisions_equal"] == (r["expect"] != "differs")

    rows = [r for rs in pairs.values() for r in rs]
    record = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "command": "python benchmarks/peer_decisions.py " + " ".join(sys.argv[1:]),
        "diffusers": diffusers.__version__,
        "steps": args.steps,
        "timesteps": [round(t, 2) for t in ts],
        "loop": f"FlowMatchEulerDiscreteScheduler(shift={SHIFT}), one model call per step, seed {SEED}; "
                f"FasterCache rows: CFG batched (uncond rows first), guidance {GUIDANCE}",
        "decision_profile": "per step: reused branches, computed share of a full call's branch FLOPs, cond-only "
                            "call (diffusers' record translated into adacache_fx's branches)",
        "wall_s": None,
        "summary": {
            pair: {
                "settings": len(rs),
                "decisions_equal": sum(r["decisions_equal"] for r in rs),
                "as_expected": all(expected(r) for r in rs),
                "max_latent_abs_diff_where_equal": max(
                    (r["final_latents_max_abs_diff_ours_vs_diffusers"] for r in rs if r["decisions_equal"]),
                    default=None),
            }
            for pair, rs in pairs.items()
        },
        "all_as_expected": all(expected(r) for r in rows),
        # ax.report's FLOPs of a cond-only guidance call (nothing reused), as a fraction of a full call's:
        # it runs half the rows, so 0.5 is right.
        "ours_cond_only_call_flops_vs_full_call": sorted({
            r["ours_cond_only_call_flops_vs_full_call"] for r in rows if "ours_cond_only_call_flops_vs_full_call" in r}),
        "pairs": pairs,
    }
    record["wall_s"] = round(time.perf_counter() - started, 1)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "peer_decisions.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["summary"], indent=2))
    print(f"all as expected: {record['all_as_expected']}; {record['wall_s']}s; wrote {path}")


if __name__ == "__main__":
    main()
