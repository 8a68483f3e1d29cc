"""End to end: stock diffusers pipelines built from tiny random components, with the transformer
transformed in place (``pipe.transformer = ax.transform(pipe.transformer, policy)``) and batched
classifier-free guidance on (cond + uncond in one transformer call per step).

* PixArt-alpha (text-conditional image, self + cross attention): prompt embeddings passed directly,
  ``tokenizer=None, text_encoder=None``.
* DiT (class-conditional image; the pipeline needs no text encoder at all).
* Latte (text-conditional video; spatial and temporal block lists).

PixArt and Latte import ``T5EncoderModel`` / ``T5Tokenizer`` from ``transformers`` at module level
but never use them when prompt embeddings are given. ``transformers`` is not a dependency of this
project, so when it is not installed the stock pipeline module is imported with a two-name
placeholder ``transformers`` module (only for that import); the pipeline code itself is unchanged.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest
import torch

import adacache_fx as ax
from adacache_lab.zoo import latte as zoo_latte

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    PixArtTransformer2DModel,
)

STEPS = 8
ATOL = 1e-5
TXT_LEN, TXT_DIM = 5, 32


def import_stock_pipeline(module: str, name: str):
    """``diffusers.<module>.<name>``, importable without ``transformers`` (see the module docstring)."""
    if importlib.util.find_spec("transformers") is not None:
        return getattr(importlib.import_module(module), name)
    if module in sys.modules:
        return getattr(sys.modules[module], name)
    # Everything else the pipeline module needs is imported first, against the real environment.
    import diffusers.callbacks  # noqa: F401
    import diffusers.image_processor  # noqa: F401
    import diffusers.pipelines.pipeline_utils  # noqa: F401
    import diffusers.video_processor  # noqa: F401

    placeholder = types.ModuleType("transformers")
    placeholder.T5EncoderModel = type("T5EncoderModel", (), {})
    placeholder.T5Tokenizer = type("T5Tokenizer", (), {})
    sys.modules["transformers"] = placeholder
    try:
        loaded = importlib.import_module(module)
    finally:
        del sys.modules["transformers"]
    return getattr(loaded, name)


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8,),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=8,
    ).eval()


def text_embeddings(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "prompt_embeds": torch.randn(1, TXT_LEN, TXT_DIM, generator=g),
        "negative_prompt_embeds": torch.randn(1, TXT_LEN, TXT_DIM, generator=g),
    }


# ---------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------


def pixart_pipeline():
    pipeline_class = import_stock_pipeline(
        "diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha", "PixArtAlphaPipeline"
    )
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=32,
        sample_size=8,
        patch_size=2,
        caption_channels=TXT_DIM,
        use_additional_conditions=False,
        interpolation_scale=1,
    ).eval()
    pipe = pipeline_class(
        tokenizer=None,
        text_encoder=None,
        vae=tiny_vae(),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pixart(pipe, seed: int = 1) -> torch.Tensor:
    mask = torch.ones(1, TXT_LEN)
    out = pipe(
        prompt=None,
        negative_prompt=None,  # the default "" would clash with negative_prompt_embeds
        **text_embeddings(),
        prompt_attention_mask=mask,
        negative_prompt_attention_mask=mask,
        guidance_scale=4.5,  # > 1: classifier-free guidance, cond + uncond batched
        num_inference_steps=STEPS,
        height=8,
        width=8,
        use_resolution_binning=False,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    )
    return out.images


def dit_pipeline():
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        norm_num_groups=4,
    ).eval()
    pipe = DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_dit(pipe, seed: int = 1) -> torch.Tensor:
    out = pipe(
        class_labels=[3, 7],
        guidance_scale=4.0,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    )
    return out.images


LATTE_FRAMES = 3


def latte_pipeline():
    pipeline_class = import_stock_pipeline("diffusers.pipelines.latte.pipeline_latte", "LattePipeline")
    transformer, _ = zoo_latte(num_layers=2, heads=2, head_dim=16, frames=LATTE_FRAMES, sample_size=8, text_dim=TXT_DIM)
    pipe = pipeline_class(
        tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=transformer, scheduler=DDIMScheduler()
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_latte(pipe, seed: int = 1) -> torch.Tensor:
    out = pipe(
        prompt=None,
        negative_prompt=None,
        **text_embeddings(),
        guidance_scale=4.5,
        num_inference_steps=STEPS,
        video_length=LATTE_FRAMES,
        height=8,
        width=8,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    )
    return out.frames


PIPELINES = {
    # name: (build, run, {block list: leading dim of its blocks' residuals in one CFG call})
    "pixart": (pixart_pipeline, run_pixart, {"transformer_blocks": 2}),  # cond + uncond
    "dit": (dit_pipeline, run_dit, {"transformer_blocks": 4}),  # 2 labels x (cond + uncond)
    "latte": (
        latte_pipeline,
        run_latte,
        # spatial blocks: (cond + uncond) x frames; temporal blocks: (cond + uncond) x 4x4 patches
        {"transformer_blocks": 2 * LATTE_FRAMES, "temporal_transformer_blocks": 2 * 16},
    ),
}


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_pipeline_runs_with_static_caching_and_cfg(name):
    build, run, leading_dims = PIPELINES[name]
    pipe = build()
    with torch.no_grad():
        reference = run(pipe)

    # fold=False: this test reads each branch's cached residual (folding keeps one per span of blocks)
    pipe.transformer = ax.transform(pipe.transformer, ax.Static(2), fold=False)
    assert ax.is_transformed(pipe.transformer)
    runtime = ax.get_runtime(pipe.transformer)
    seen = {}

    def look(module, args, kwargs, output):  # runs after the runtime's own hook, every call
        seen["slot0"] = {k: [t.shape for t in v] for k, v in runtime.cached_residuals(slot=0).items()}
        seen["slot1"] = set(runtime.cached_residuals(slot=1))

    hook = pipe.transformer.register_forward_hook(look, with_kwargs=True)
    out = run(pipe)
    hook.remove()
    assert out.shape == reference.shape
    assert torch.isfinite(out).all()

    report = ax.report(pipe.transformer)
    text = str(report)  # the table renders
    assert report.branches, text
    assert {b.block_list for b in report.branches} == set(leading_dims), text
    assert not report.uncached, text
    # One generation of STEPS steps, each one batched cond+uncond call (CFG).
    assert len(report.steps) == STEPS, text
    assert [s.step for s in report.steps] == list(range(STEPS))
    assert {s.generation for s in report.steps} == {0}
    assert all(s.calls == 1 for s in report.steps), text
    # Step 0 computes every branch; later steps reuse.
    assert report.steps[0].computed == len(report.branches) and report.steps[0].reused == 0, text
    assert sum(s.reused for s in report.steps) > 0, text
    # Static(2) with no known step count: compute on even steps, reuse on odd ones.
    n = len(report.branches)
    assert [(s.computed, s.reused) for s in report.steps] == [
        (n, 0) if step % 2 == 0 else (0, n) for step in range(STEPS)
    ], text
    assert report.compute_fraction == pytest.approx(0.5)
    # The cache holds one residual per branch for the batched cond+uncond call (slot 0 only), as
    # seen after the pipeline's last transformer call ...
    list_of = {b.id: b.block_list for b in report.branches}
    assert set(seen["slot0"]) == {b.id for b in report.branches}
    for branch_id, shapes in seen["slot0"].items():
        assert all(shape[0] == leading_dims[list_of[branch_id]] for shape in shapes), branch_id
    assert seen["slot1"] == set()
    # ... and the pipeline's end of call (maybe_free_model_hooks resets the stateful hooks of
    # diffusers' CacheMixin models, Latte's; DiT's and PixArt's classes have none) frees it.
    if hasattr(pipe.transformer, "_reset_stateful_cache"):
        assert runtime.cached_residuals(slot=0) == {}
        assert ax.report(pipe.transformer).cache_bytes == 0
    # Reuse changed the result (it approximates; it must not be a silent no-op).
    assert not torch.equal(out, reference)

    # A second pipeline call is detected as a new generation (the timestep jumps back up); its
    # caches start empty, so the same seed gives the same output.
    again = run(pipe)
    assert torch.equal(again, out)
    report = ax.report(pipe.transformer)
    assert [(s.generation, s.step) for s in report.steps] == [
        (g, s) for g in (0, 1) for s in range(STEPS)
    ]


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_pipeline_with_nocache_equals_untransformed_pipeline(name):
    build, run, _ = PIPELINES[name]
    pipe = build()
    with torch.no_grad():
        reference = run(pipe, seed=3)
    original = pipe.transformer
    pipe.transformer = ax.transform(pipe.transformer, ax.NoCache())
    assert pipe.transformer is original  # in place
    out = run(pipe, seed=3)
    assert (out - reference).abs().max().item() <= ATOL
    report = ax.report(pipe.transformer)
    assert len(report.steps) == STEPS and report.compute_fraction == 1.0

    ax.restore(pipe.transformer)
    assert torch.equal(run(pipe, seed=3), reference)


def test_pipeline_inside_generation_context_computes_the_last_step():
    """With ax.generation(num_steps=...), Static's cooldown applies: the last step computes."""
    pipe = dit_pipeline()
    pipe.transformer = ax.transform(pipe.transformer, ax.Static(interval=3, warmup=1, cooldown=1))
    with ax.generation(pipe.transformer, num_steps=STEPS):
        out = run_dit(pipe)
    assert torch.isfinite(out).all()
    report = ax.report(pipe.transformer)
    n = len(report.branches)
    computes = [s.reused == 0 for s in report.steps]
    assert computes == [s == 0 or s == STEPS - 1 or s % 3 == 0 for s in range(STEPS)], str(report)
    assert all(s.computed + s.reused == n for s in report.steps)


PIPELINE_POLICIES = {
    "adacache": lambda: ax.AdaCache(codebook=((1e9, 2),), num_steps=STEPS),
    "pab": lambda: ax.PAB(spatial=2, temporal=2, cross=2, window_steps=(1, STEPS)),
    "teacache": lambda: ax.TeaCache(delta=1e9),
    "first_block_cache": lambda: ax.FirstBlockCache(threshold=1e9),
    "taylorseer": lambda: ax.TaylorSeer(ax.Static(interval=3), order=2),
    "fastercache": lambda: ax.FasterCache(interval=2, start=0.2),
    # CFG-Cache on the pipelines' own batched guidance (diffusers: uncond first).
    "fastercache_cfg": lambda: ax.FasterCache(interval=2, start=0.2, cfg_cache=True, cfg_layout="uncond_first"),
    "duca": lambda: ax.DuCa(interval=2, early_full=1, ratio=0.5),
    "toca": lambda: ax.ToCa(interval=2, early_full=1, ratio=0.2, num_steps=STEPS),
}


@pytest.mark.parametrize("policy_name", sorted(PIPELINE_POLICIES))
@pytest.mark.parametrize("name", ["pixart", "latte"])
def test_pipeline_runs_with_every_policy(name, policy_name):
    build, run, _ = PIPELINES[name]
    pipe = build()
    with torch.no_grad():
        reference = run(pipe)
    policy = PIPELINE_POLICIES[policy_name]()
    pipe.transformer = ax.transform(pipe.transformer, policy)
    with ax.generation(pipe.transformer, num_steps=STEPS):
        out = run(pipe)
    assert out.shape == reference.shape and torch.isfinite(out).all()
    report = ax.report(pipe.transformer)
    text = str(report)
    assert len(report.steps) == STEPS and all(s.calls == 1 for s in report.steps), text
    assert sum(s.reused for s in report.steps) > 0, text
    decides_in_step = isinstance(policy, ax.InStepDecider) and policy.in_step_signal() is not None
    assert report.decides_in_step == decides_in_step
    assert ("inside each step" in text) == decides_in_step
    assert not torch.equal(out, reference)
