"""Speed of one First-Block-Cache schedule in three tools, side by side on one CPU.

The same rule (run the first block; if the relative L1 change of its hidden-states residual since
the last computing step is below ``--threshold``, skip every later block and add the residual the
last computing step left over them) in:

* adacache_fx: ``ax.transform(model, ax.FirstBlockCache(threshold=T))``, eager and
  ``ax.compile(model)`` (scope="blocks", backend inductor);
* diffusers' own hook: ``model.enable_cache(FirstBlockCacheConfig(threshold=T))``, each call inside
  ``model.cache_context("cond")``, eager and ``torch.compile(model)``;
* cache-dit: ``cache_dit.enable_cache(model, cache_config=DBCacheConfig(Fn_compute_blocks=1,
  Bn_compute_blocks=0, residual_diff_threshold=T, max_warmup_steps=0, ...))``, eager and
  ``torch.compile(model)``;

and the uncached model (eager and ``torch.compile``), on diffusers' WanTransformer3DModel and
FluxTransformer2DModel (random weights, ``torch.manual_seed(0)``, float32, eval, no_grad), each in
a ``--steps`` flow-matching Euler loop (FlowMatchEulerDiscreteScheduler, shift 3) from the same
noise. All variants live in one process and their loops are interleaved (A, B, C, then C, A, B, ...:
each repetition in its own seeded random order) so that machine noise and position effects hit all alike.

Checked and recorded: the per-step compute/skip profile of every tool (adacache_fx: its report;
diffusers: the head hook's ``should_compute`` after each call; cache-dit: its context's cached
steps; plus, for the eager diffusers / cache-dit models, forward pre-hooks on every block's first
attention module counting the blocks that really ran in each step), that all profiles are equal,
and the final latents' max abs differences between tools.

Reported per variant: median loop time and interquartile range over ``--reps`` repetitions, ratios
to diffusers and to cache-dit, the median time of a computing and of a skipping model call, and
the FLOP ideal: the uncached loop (same mode: eager or compiled) times the fraction of block calls
the schedule runs, with measured / ideal.

    python benchmarks/peer_first_block.py [--reps 5] [--steps 20] [--models wan flux]
        [--threshold 0.1] [--no-compile] [--quick]

Writes benchmarks/results/peer_first_block_cpu.json (``--quick``: a tiny smoke run that writes
nothing unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import platform
import random
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

RESULTS = Path(__file__).parent / "results"
SHIFT = 3.0
NOISE_SEED = 1
ORDER_SEED = 2  # the variants' order in each timed repetition
TEXT_LEN, TEXT_DIM = 32, 64

# Model configurations (full run, then --quick). Sizes picked so an uncached step takes about
# 0.2 s on one CPU thread (Wan at 4096 tokens took ~0.8 s a step, too long for the time budget).
WAN = dict(
    full=dict(config=dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16,
                          out_channels=16, text_dim=TEXT_DIM, freq_dim=64, ffn_dim=256, num_layers=8,
                          cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64),
              latent=(1, 16, 8, 32, 32)),  # patch (1, 2, 2): 8 x 16 x 16 = 2048 tokens
    quick=dict(config=dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16,
                           out_channels=16, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64, num_layers=4,
                           cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
               latent=(1, 16, 2, 8, 8)),
)
FLUX = dict(
    full=dict(config=dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=6, attention_head_dim=32,
                          num_attention_heads=4, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
                          guidance_embeds=False, axes_dims_rope=(8, 12, 12)),
              side=32),  # 32 x 32 = 1024 image tokens (packed), + 32 text tokens
    quick=dict(config=dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
                           num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
                           guidance_embeds=False, axes_dims_rope=(4, 6, 6)),
               side=8),
)


# ----------------------------------------------------------------------------------------------
# Models and inputs
# ----------------------------------------------------------------------------------------------
@dataclass
class Spec:
    """One model: how to build it (same weights every time), its inputs, and its blocks."""

    name: str
    cls_name: str
    config: dict
    build: Callable[[], torch.nn.Module]
    noise: torch.Tensor  # the initial latent, shared by every tool
    kwargs: Callable[[torch.Tensor, torch.Tensor], dict]  # (latents, scheduler timestep) -> model kwargs
    blocks: Callable[[torch.nn.Module], list[torch.nn.Module]]  # every transformer block, in call order
    tokens: str


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def wan_spec(quick: bool) -> Spec:
    from diffusers import WanTransformer3DModel

    size = WAN["quick" if quick else "full"]
    config, latent = size["config"], size["latent"]

    def build():
        torch.manual_seed(0)
        return WanTransformer3DModel(**config).eval()

    noise = torch.randn(*latent, generator=_gen(NOISE_SEED))
    text = torch.randn(1, TEXT_LEN, TEXT_DIM, generator=_gen(NOISE_SEED + 1))

    def kwargs(latents, t):
        return {"hidden_states": latents, "encoder_hidden_states": text,
                "timestep": t.reshape(1).float(), "return_dict": False}

    p = config["patch_size"]
    tokens = latent[2] // p[0] * (latent[3] // p[1]) * (latent[4] // p[2])
    return Spec("wan", "WanTransformer3DModel", config, build, noise, kwargs, lambda m: list(m.blocks),
                f"latent {tuple(latent)} -> {tokens} tokens; text {TEXT_LEN} x {TEXT_DIM}")


def flux_spec(quick: bool) -> Spec:
    from diffusers import FluxTransformer2DModel

    size = FLUX["quick" if quick else "full"]
    config, side = size["config"], size["side"]

    def build():
        torch.manual_seed(0)
        return FluxTransformer2DModel(**config).eval()

    noise = torch.randn(1, side * side, config["in_channels"], generator=_gen(NOISE_SEED))
    g = _gen(NOISE_SEED + 1)
    text = torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g)
    pooled = torch.randn(1, TEXT_DIM, generator=g)
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    img_ids = img_ids.reshape(-1, 3)
    txt_ids = torch.zeros(TEXT_LEN, 3)

    def kwargs(latents, t):
        return {"hidden_states": latents, "encoder_hidden_states": text, "pooled_projections": pooled,
                "timestep": (t / 1000).reshape(1).float(),  # the pipeline passes t / 1000
                "img_ids": img_ids, "txt_ids": txt_ids, "return_dict": False}

    return Spec("flux", "FluxTransformer2DModel", config, build, noise, kwargs,
                lambda m: list(m.transformer_blocks) + list(m.single_transformer_blocks),
                f"{side * side} packed image tokens x {config['in_channels']} + {TEXT_LEN} text tokens")


SPECS = {"wan": wan_spec, "flux": flux_spec}
# Default thresholds per model (--threshold sets one for all): with random weights the first
# block's residual changes by ~0.06-0.1 a step on Wan and ~0.3-0.55 on Flux, so these give a mix
# of computing and skipping steps (at 0.1 Flux would compute every step).
THRESHOLDS = {"wan": 0.1, "flux": 0.5}


# ----------------------------------------------------------------------------------------------
# Variants: one model instance per tool and mode
# ----------------------------------------------------------------------------------------------
class Variant:
    """A model under one tool. ``profile()`` after a loop: per step, whether all blocks ran."""

    tool = "original"
    compiled = False
    num_blocks = 0

    def __init__(self, spec: Spec, threshold: float, steps: int, compiled: bool, fn: int = 1, bn: int = 0):
        self.spec, self.threshold, self.steps, self.compiled = spec, threshold, steps, compiled
        self.fn, self.bn = fn, bn  # DBCache's F<n>B<m>: first blocks deciding, tail blocks always computed

    @property
    def name(self) -> str:
        return self.tool + (" +compile" if self.compiled else "")

    def loop_context(self):
        return contextlib.nullcontext()

    def before_loop(self) -> None:
        pass

    def call(self, kwargs: dict) -> torch.Tensor:
        return self.model(**kwargs)[0]

    def after_call(self) -> None:
        pass

    def profile(self) -> list[bool]:
        return [True] * self.steps

    def extra(self) -> dict:
        return {}


class Original(Variant):
    def __init__(self, spec, threshold, steps, compiled, fn=1, bn=0):
        super().__init__(spec, threshold, steps, compiled, fn, bn)
        model = spec.build()
        self.blocks = spec.blocks(model)
        self.num_blocks = len(self.blocks)
        self.model = torch.compile(model) if compiled else model


class Ours(Variant):
    tool = "adacache_fx"

    def __init__(self, spec, threshold, steps, compiled, fn=1, bn=0):
        import adacache_fx as ax

        super().__init__(spec, threshold, steps, compiled, fn, bn)
        self.ax = ax
        model = spec.build()
        self.blocks = spec.blocks(model)
        self.num_blocks = len(self.blocks)
        self.model = ax.transform(model, self.policy())
        if compiled:
            self.model = ax.compile(self.model)  # scope="blocks", backend inductor

    def policy(self):
        return self.ax.FirstBlockCache(threshold=self.threshold, blocks=self.fn, tail_blocks=self.bn)

    def before_loop(self):
        self.ax.reset(self.model)

    def loop_context(self):
        return self.ax.generation(self.model, num_steps=self.steps)

    def _steps(self):
        report = self.ax.report(self.model)
        last = report.steps[-1].generation
        return [s for s in report.steps if s.generation == last]

    def profile(self):
        steps = self._steps()
        if len(steps) != self.steps:
            raise RuntimeError(f"adacache_fx report has {len(steps)} steps for {self.steps} model calls")
        return [s.reused == 0 for s in steps]

    def extra(self):
        steps = self._steps()
        return {"report_computed_branches_per_step": [s.computed for s in steps],
                "report_reused_branches_per_step": [s.reused for s in steps]}


class OursNoCache(Ours):
    """adacache_fx with a policy that never reuses: what the transformed model costs on a computing
    step beside the original (the runtime's guards, plans and captured graphs)."""

    tool = "adacache_fx NoCache"

    def policy(self):
        return self.ax.NoCache()


class Diffusers(Variant):
    tool = "diffusers"

    def __init__(self, spec, threshold, steps, compiled, fn=1, bn=0):
        from diffusers import FirstBlockCacheConfig

        super().__init__(spec, threshold, steps, compiled, fn, bn)
        model = spec.build()
        self.blocks = spec.blocks(model)
        self.num_blocks = len(self.blocks)
        model.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        self.inner = model
        self.head = self.blocks[0]._diffusers_hook.get_hook("fbc_leader_block_hook")
        self.model = torch.compile(model) if compiled else model
        self.flags: list[bool] = []

    def before_loop(self):
        self.inner._reset_stateful_cache()  # what a pipeline does at the end of its call
        self.flags = []

    def call(self, kwargs):
        with self.inner.cache_context("cond"):
            return self.model(**kwargs)[0]

    def after_call(self):
        self.flags.append(bool(self.head.state_manager._state_cache["cond"].should_compute))

    def profile(self):
        return list(self.flags)


class CacheDiT(Variant):
    tool = "cache-dit"

    def __init__(self, spec, threshold, steps, compiled, fn=1, bn=0):
        import cache_dit
        from cache_dit import DBCacheConfig

        super().__init__(spec, threshold, steps, compiled, fn, bn)
        model = spec.build()
        self.blocks = spec.blocks(model)  # before cache-dit regroups them
        self.num_blocks = len(self.blocks)
        # First-Block-Cache in DBCache's terms: F1B0, no warmup, no cap on cached steps; one call
        # per step (no separate CFG); the context refreshes itself after num_inference_steps calls.
        self.config = DBCacheConfig(Fn_compute_blocks=fn, Bn_compute_blocks=bn, residual_diff_threshold=threshold,
                                    max_warmup_steps=0, warmup_interval=1, max_cached_steps=-1,
                                    max_continuous_cached_steps=-1, enable_separate_cfg=False,
                                    num_inference_steps=steps)
        cache_dit.enable_cache(model, cache_config=copy.deepcopy(self.config))
        self.cache_dit = cache_dit
        self.inner = model
        self.model = torch.compile(model) if compiled else model

    def before_loop(self):
        # A fresh context per loop. (Its own refresh after num_inference_steps calls comes one call
        # late: it checks the step counter before advancing it, so loop 2's first call would still
        # see loop 1's context.)
        self.cache_dit.refresh_context(self.inner)

    def _contexts(self):
        manager = self.inner._context_manager
        names = self.inner._context_names
        names = [n for group in names for n in (group if isinstance(group, (list, tuple)) else [group])]
        return [manager.get_context(n) for n in names]

    def profile(self):
        contexts = self._contexts()
        cached = [sorted(set(c.get_cached_steps())) for c in contexts]
        if any(c != cached[0] for c in cached):
            raise RuntimeError(f"cache-dit contexts disagree on cached steps: {cached}")
        executed = contexts[0].get_current_step() + 1
        if executed != self.steps:
            raise RuntimeError(f"cache-dit context counted {executed} steps for {self.steps} calls")
        return [i not in cached[0] for i in range(self.steps)]

    def extra(self):
        return {"cache_dit_config": self.config.strify()}


TOOLS = {"original": Original, "adacache_fx NoCache": OursNoCache, "adacache_fx": Ours, "diffusers": Diffusers,
         "cache-dit": CacheDiT}
UNCACHED = ("original", "adacache_fx NoCache")


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
@dataclass
class Loop:
    seconds: float
    call_seconds: list[float]
    latents: torch.Tensor
    profile: list[bool]
    block_calls: list[int] | None = None


def denoise(variant: Variant, spec: Spec, steps: int, block_counter: list[int] | None = None) -> Loop:
    """One flow-matching Euler loop from the shared noise; times the loop and every model call."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)
    scheduler.set_timesteps(steps)
    latents = spec.noise.clone()
    variant.before_loop()
    call_seconds, block_calls = [], []
    with torch.no_grad(), variant.loop_context():
        start = time.perf_counter()
        for t in scheduler.timesteps:
            kwargs = spec.kwargs(latents, t)
            if block_counter is not None:
                block_counter[0] = 0
            t0 = time.perf_counter()
            out = variant.call(kwargs)
            call_seconds.append(time.perf_counter() - t0)
            if block_counter is not None:
                block_calls.append(block_counter[0])
            variant.after_call()
            latents = scheduler.step(out, t, latents, return_dict=False)[0]
        seconds = time.perf_counter() - start
    return Loop(seconds, call_seconds, latents, variant.profile(), block_calls if block_counter is not None else None)


def count_block_calls(variant: Variant, spec: Spec, steps: int) -> list[int] | None:
    """Blocks that really ran in each step, from forward pre-hooks on each block's first attention
    module (eager diffusers / cache-dit only: they call the original blocks; adacache_fx runs its
    own captured graphs, where module hooks do not fire, so its report is used instead)."""
    if variant.compiled or variant.tool not in ("diffusers", "cache-dit", "original"):
        return None
    counter = [0]
    handles = []
    for block in variant.blocks:
        attn = getattr(block, "attn1", None) or getattr(block, "attn")
        handles.append(attn.register_forward_pre_hook(lambda *_: counter.__setitem__(0, counter[0] + 1)))
    try:
        return denoise(variant, spec, steps, counter).block_calls
    finally:
        for h in handles:
            h.remove()


def dynamo_stats() -> dict:
    from torch._dynamo.utils import counters

    return {"unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


def iqr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[2] - q[0]


def r(x: float | None, nd: int = 4):
    return None if x is None else round(x, nd)


# ----------------------------------------------------------------------------------------------
# One model: build, warm up, check, time
# ----------------------------------------------------------------------------------------------
def bench_model(spec: Spec, args, variant_keys: list[tuple[str, bool]], threshold: float) -> dict:
    variants: list[Variant] = []
    setup: dict[str, dict] = {}
    for tool, compiled in tqdm(variant_keys, desc=f"{spec.name}: build", leave=False):
        t0 = time.perf_counter()
        v = TOOLS[tool](spec, threshold, args.steps, compiled, args.fn, args.bn)
        setup[v.name] = {"build_and_apply_s": round(time.perf_counter() - t0, 3)}
        variants.append(v)

    # Warm-up: captures and compiles (compiled variants twice, so that any recompile a reset
    # state triggers happens here), then one instrumented loop for the eager hook counts.
    warm: dict[str, Loop] = {}
    for v in tqdm(variants, desc=f"{spec.name}: warm-up", leave=False):
        before = dynamo_stats()
        times = []
        for _ in range(2 if v.compiled else 1):
            warm[v.name] = denoise(v, spec, args.steps)
            times.append(round(warm[v.name].seconds, 3))
        setup[v.name]["warmup_loops_s"] = times
        if v.compiled:
            after = dynamo_stats()
            setup[v.name]["dynamo_counters_delta"] = {k: after[k] - before[k] for k in after}
    block_calls = {v.name: count_block_calls(v, spec, args.steps) for v in variants}

    # Timed loops, interleaved.
    loops: dict[str, list[Loop]] = {v.name: [] for v in variants}
    # Each rep runs the variants in its own (seeded) random order, so that no tool always runs in
    # the same place or right after the same other one: on this machine the second of two
    # back-to-back runs of equal work measured a few per cent faster.
    order = random.Random(ORDER_SEED)
    for _ in tqdm(range(args.reps), desc=f"{spec.name}: interleaved reps ({len(variants)} variants)"):
        for v in order.sample(variants, len(variants)):
            loops[v.name].append(denoise(v, spec, args.steps))

    # ---- checks -----------------------------------------------------------------------------
    names = [v.name for v in variants]
    profiles = {n: loops[n][-1].profile for n in names}
    stable = {n: all(lp.profile == profiles[n] for lp in loops[n]) and warm[n].profile == profiles[n] for n in names}
    cached_names = [v.name for v in variants if v.tool not in UNCACHED]
    reference = "diffusers" if "diffusers" in profiles else cached_names[0]
    ref_profile = profiles[reference]
    schedules_equal = all(profiles[n] == ref_profile for n in cached_names)
    n_blocks = variants[0].num_blocks
    hook_ok = {}
    for n, calls in block_calls.items():
        if calls is None:
            continue
        expected = [n_blocks if c else 1 for c in profiles[n]]
        hook_ok[n] = calls == expected
    final = {n: loops[n][-1].latents for n in names}
    deterministic = {n: max(float((lp.latents - final[n]).abs().max()) for lp in loops[n]) for n in names}

    def max_abs(a, b):
        return float((final[a] - final[b]).abs().max())

    def rel_l2(a, b):
        return float((final[a] - final[b]).norm() / final[b].norm().clamp_min(1e-12))

    diffs = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            diffs[f"{a} vs {b}"] = max_abs(a, b)
    vs_uncached = {n: rel_l2(n, "original") for n in cached_names if "original" in names}

    # ---- timing -----------------------------------------------------------------------------
    med = {n: statistics.median(lp.seconds for lp in loops[n]) for n in names}
    # A second estimate, robust to a noisy shared machine (other load only ever adds time): the sum
    # over step positions of each position's fastest call over the repetitions.
    minima = {n: sum(min(ts) for ts in zip(*(lp.call_seconds for lp in loops[n]))) for n in names}
    computed_steps = sum(ref_profile)
    block_fraction = (computed_steps * n_blocks + (args.steps - computed_steps) * 1) / (args.steps * n_blocks)
    rows = {}
    for v in variants:
        n = v.name
        seconds = [lp.seconds for lp in loops[n]]
        prof = profiles[n]
        compute_calls = [t for lp in loops[n] for t, c in zip(lp.call_seconds, prof) if c]
        skip_calls = [t for lp in loops[n] for t, c in zip(lp.call_seconds, prof) if not c]
        mode = " +compile" if v.compiled else ""
        row = {
            "tool": v.tool, "compiled": v.compiled,
            "loop_s_median": r(med[n]), "loop_s_iqr": r(iqr(seconds)),
            "loop_s_all": [r(s) for s in seconds],
            "computed_steps": sum(prof), "skipped_steps": len(prof) - sum(prof),
            "compute_call_s_median": r(statistics.median(compute_calls)) if compute_calls else None,
            "skip_call_s_median": r(statistics.median(skip_calls)) if skip_calls else None,
            "per_step_call_s_median": [r(statistics.median(ts)) for ts in zip(*(lp.call_seconds for lp in loops[n]))],
        }
        row["calls_s_step_minima"] = r(minima[n])
        for other in ("diffusers", "cache-dit"):
            if other in med:
                row[f"over_{other}_eager"] = r(med[n] / med[other], 3)
            if other + mode in med:
                row[f"over_{other}_same_mode"] = r(med[n] / med[other + mode], 3)
                row[f"over_{other}_same_mode_step_minima"] = r(minima[n] / minima[other + mode], 3)
        if v.tool == "adacache_fx NoCache" and "original" + mode in med:
            original = [t for lp in loops["original" + mode] for t in lp.call_seconds]
            row["call_over_original_same_mode"] = r(statistics.median(compute_calls) / statistics.median(original), 3)
            row["calls_over_original_same_mode_step_minima"] = r(minima[n] / minima["original" + mode], 3)
        if v.tool not in UNCACHED and "original" + mode in med:
            uncached = med["original" + mode]
            ideal = uncached * block_fraction
            row.update({"ideal_s": r(ideal), "measured_over_ideal": r(med[n] / ideal, 3),
                        "measured_over_ideal_step_minima": r(minima[n] / (minima["original" + mode] * block_fraction), 3),
                        "speedup_vs_uncached_same_mode": r(uncached / med[n], 3),
                        "ideal_speedup": r(1 / block_fraction, 3)})
        row.update(v.extra())
        rows[n] = row

    return {
        "threshold": threshold,
        "model": f"{spec.cls_name}({', '.join(f'{k}={val}' for k, val in spec.config.items())})",
        "inputs": spec.tokens,
        "blocks": n_blocks,
        "profile_reference": reference,
        "compute_profile": "".join("C" if c else "s" for c in ref_profile),
        "profiles": {n: "".join("C" if c else "s" for c in profiles[n]) for n in names},
        "schedules_equal": schedules_equal,
        "profiles_stable_across_reps": stable,
        "hook_block_calls_per_step": {n: c for n, c in block_calls.items() if c is not None},
        "hook_block_calls_match_profile": hook_ok,
        "computed_steps": computed_steps,
        "block_call_fraction": r(block_fraction),
        "final_latents_max_abs_diff": {k: float(f"{val:.3e}") for k, val in diffs.items()},
        "final_latents_rel_l2_vs_uncached": {k: float(f"{val:.3e}") for k, val in vs_uncached.items()},
        "rep_to_rep_max_abs_diff": {k: float(f"{val:.3e}") for k, val in deterministic.items()},
        "setup": setup,
        "variants": rows,
    }


def table(name: str, result: dict) -> str:
    headers = ["variant", "loop s (median)", "IQR", "x diffusers", "x cache-dit", "compute call s", "skip call s",
               "ideal s", "meas/ideal", "call/original", "minima: x diffusers", "x cache-dit", "meas/ideal",
               "x original"]
    out = []
    for n, row in result["variants"].items():
        out.append([n, f"{row['loop_s_median']:.3f}", f"{row['loop_s_iqr']:.3f}",
                    str(row.get("over_diffusers_same_mode", "-")), str(row.get("over_cache-dit_same_mode", "-")),
                    "-" if row["compute_call_s_median"] is None else f"{row['compute_call_s_median']:.4f}",
                    "-" if row["skip_call_s_median"] is None else f"{row['skip_call_s_median']:.4f}",
                    "-" if row.get("ideal_s") is None else f"{row['ideal_s']:.3f}",
                    str(row.get("measured_over_ideal", "-")), str(row.get("call_over_original_same_mode", "-")),
                    str(row.get("over_diffusers_same_mode_step_minima", "-")),
                    str(row.get("over_cache-dit_same_mode_step_minima", "-")),
                    str(row.get("measured_over_ideal_step_minima", "-")),
                    str(row.get("calls_over_original_same_mode_step_minima", "-"))])
    widths = [max(len(h), *(len(o[i]) for o in out)) for i, h in enumerate(headers)]
    lines = [f"{name}: profile {result['compute_profile']} (C computes all blocks, s skips), "
             f"schedules equal: {result['schedules_equal']}",
             "  ".join(h.ljust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(o, widths)) for o in out]
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="interleaved timed loops per variant")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--models", nargs="+", default=["wan", "flux"], choices=sorted(SPECS))
    parser.add_argument("--threshold", type=float, default=None,
                        help=f"one threshold for every model (default per model: {THRESHOLDS})")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine, 2 OpenMP threads on 2 cores stall "
                             "whenever another process takes a core, calls then vary 20-80x)")
    parser.add_argument("--no-compile", action="store_true", help="eager variants only")
    parser.add_argument("--fn", type=int, default=1, help="DBCache F<n>: first blocks that compute and decide")
    parser.add_argument("--bn", type=int, default=0, help="DBCache B<m>: last blocks that always compute")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 rep: a smoke run")
    parser.add_argument("--out", type=Path, default=None,
                        help="result JSON (default results/peer_first_block_cpu.json; --quick: none)")
    args = parser.parse_args()
    if args.quick:
        args.reps = 1
    torch.set_num_threads(args.threads)
    out = args.out or (None if args.quick else RESULTS / "peer_first_block_cpu.json")

    try:
        import cache_dit
    except ImportError:
        raise SystemExit("peer_first_block.py compares against cache-dit's DBCache: "
                         "pip install cache-dit==1.5.3 (the version the recorded results used)") from None
    import diffusers

    import adacache_fx

    logging.getLogger("cache_dit").setLevel(logging.WARNING)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("cache_dit"):
            logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*deprecated.*")

    # diffusers' FirstBlockCacheConfig has no F<n>B<m>: beyond F1B0 only ours and cache-dit compare.
    tools = [t for t in TOOLS if t != "diffusers" or (args.fn, args.bn) == (1, 0)]
    variant_keys = [(tool, False) for tool in tools]
    if not args.no_compile:
        variant_keys += [(tool, True) for tool in tools]

    started = time.perf_counter()
    models = {}
    for name in args.models:
        spec = SPECS[name](args.quick)
        threshold = args.threshold if args.threshold is not None else THRESHOLDS[name]
        models[name] = bench_model(spec, args, variant_keys, threshold)
        print(table(name, models[name]), flush=True)
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"processor": platform.processor(), "cpu": cpu_name(), "machine": platform.machine(),
                    "os_cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_at_end": list(os.getloadavg())},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "cache_dit": cache_dit.__version__, "adacache_fx": adacache_fx.__version__,
                     "python": platform.python_version()},
        "command": "python benchmarks/peer_first_block.py " + " ".join(sys.argv[1:]),
        "wall_s": round(time.perf_counter() - started, 1),
        "settings": {"threshold": (args.threshold if args.threshold is not None
                                   else {m: THRESHOLDS[m] for m in args.models}), "steps": args.steps, "reps": args.reps, "quick": args.quick,
                     "scheduler": f"FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift={SHIFT}), "
                                  "one model call per step, no guidance",
                     "noise_seed": NOISE_SEED, "weights": "random, torch.manual_seed(0), float32, eval, no_grad",
                     "compile": "none" if args.no_compile else
                     "adacache_fx: ax.compile(model) (scope='blocks', backend inductor); others: torch.compile(model) "
                     "(inductor, defaults). Warm-up loop 1 of a compiled variant includes its compile time, which "
                     "depends on the order: inductor's FX graph cache lets later variants reuse graphs compiled for "
                     "earlier ones (diffusers' and cache-dit's block graphs hit the uncached model's). "
                     "dynamo_counters_delta: torch._dynamo.utils.counters deltas over the warm-up (unique_graphs counts "
                     "newly traced graphs only, not the compiled regions a call runs)",
                     "threads": f"torch.set_num_threads({args.threads})",
                     "timing": "each rep runs every variant's loop once (interleaved), each rep in its own random order (seeded); loop time "
                               "= wall time of the whole Euler loop; call times = each model call (compute/skip "
                               "split by the profile); median and interquartile range over reps; *_step_minima: the "
                               "sum over step positions of the fastest call at that position over the reps (other "
                               "load on a shared machine only adds time)",
                     "ideal": "uncached loop of the same mode (eager or compiled) x fraction of block calls the "
                              "schedule runs ((C x blocks + S x 1) / (steps x blocks)); non-block work counted as if "
                              "it scaled too, so the ideal is a lower bound"},
        "summary": {name: {"schedules_equal": m["schedules_equal"], "profile": m["compute_profile"],
                           "max_final_latents_abs_diff_between_caching_tools": max(
                               (d for pair, d in m["final_latents_max_abs_diff"].items()
                                if "original" not in pair and "NoCache" not in pair),
                               default=0.0),
                           "max_final_latents_abs_diff_between_eager_caching_tools": max(
                               (d for pair, d in m["final_latents_max_abs_diff"].items()
                                if "original" not in pair and "NoCache" not in pair and "compile" not in pair),
                               default=0.0),
                           "nocache_vs_original_final_latents_max_abs_diff": {
                               mode: m["final_latents_max_abs_diff"].get(f"original{mode} vs adacache_fx NoCache{mode}")
                               for mode in ("", " +compile")},
                           **{n: {k: row.get(k) for k in ("loop_s_median", "loop_s_iqr", "over_diffusers_same_mode",
                                                          "over_cache-dit_same_mode", "measured_over_ideal",
                                                          "call_over_original_same_mode", "calls_s_step_minima",
                                                          "over_diffusers_same_mode_step_minima",
                                                          "over_cache-dit_same_mode_step_minima",
                                                          "measured_over_ideal_step_minima",
                                                          "calls_over_original_same_mode_step_minima") if k in row}
                              for n, row in m["variants"].items()}}
                    for name, m in models.items()},
        "models": models,
    }
    if out is not None:
        out.parent.mkdir(exist_ok=True, parents=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {out}")
    print(f"wall {record['wall_s']} s; schedules equal: "
          f"{ {n: m['schedules_equal'] for n, m in models.items()} }")


if __name__ == "__main__":
    main()
