"""Reach: blocks whose region names are not Python identifiers (SD3's dual attention joins ``attn``
and ``attn2`` into one region, ``attn+attn2``; submodules may be called anything nn.Module allows)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import adacache_fx as ax
from adacache_fx.passes.residuals import identifier
from adacache_lab.zoo import ZOO


def _flops(model, **kwargs) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**kwargs)
    return counter.get_total_flops()


def _sd3_dual():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=32, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16, dual_attention_layers=(0,),
    ).eval()


def test_identifier_makes_any_region_name_a_valid_name():
    for name in ("attn+attn2", "attn-1", "mlp 2", "0ff", "ff.net", "ä+ß"):
        ident = identifier(name)
        assert ident.isidentifier(), (name, ident)
    assert identifier("attn+attn2") != identifier("attn")


def test_sd3_dual_attention_layers_are_cached_exactly():
    entry = ZOO["sd3"]
    reference = _sd3_dual()
    model = ax.transform(_sd3_dual(), ax.NoCache())
    with torch.no_grad():
        assert torch.equal(model(**entry.inputs()).sample, reference(**entry.inputs()).sample)
    ids = {b.id for b in ax.report(model).branches}
    assert "transformer_blocks.0.attn+attn2" in ids  # the two attentions of a dual block: one region

    cached = ax.transform(_sd3_dual(), ax.Static(2))
    with ax.generation(cached, num_steps=4):
        compute = _flops(cached, **entry.inputs(timestep=999.0))
        reuse = _flops(cached, **entry.inputs(timestep=900.0))
    report = ax.report(cached)
    assert report.steps[-1].reused == len(report.branches) and report.steps[-1].computed == 0
    block_flops = sum(f for f in report.block_flops.values() if f)
    assert compute - reuse >= 0.9 * block_flops, (compute, reuse, block_flops)


class _OddNames(nn.Module):
    """A pre-norm block whose branches live under names that are no Python identifiers."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.add_module("attn-1", nn.MultiheadAttention(width, 2, batch_first=True))
        self.add_module("mlp 2", nn.Sequential(nn.Linear(width, 32), nn.GELU(), nn.Linear(32, width)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        x = x + getattr(self, "attn-1")(h, h, h, need_weights=False)[0]
        return x + getattr(self, "mlp 2")(self.norm(x))


class _OddModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_OddNames() for _ in range(3)])

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x + timestep.view(-1, 1, 1) * 1e-3)
        return x


@pytest.mark.parametrize("compiled", [False, True])
def test_blocks_with_odd_submodule_names_capture_and_reuse(compiled):
    torch.manual_seed(0)
    reference = _OddModel().eval()
    model = _OddModel().eval()
    model.load_state_dict(reference.state_dict())
    ax.transform(model, ax.Static(2))
    runner = ax.compile(model, backend="eager") if compiled else model
    x = torch.randn(2, 12, 16)
    with torch.no_grad(), ax.generation(model, num_steps=3):
        first = runner(x, torch.full((2,), 999.0))
        second = runner(x, torch.full((2,), 900.0))
    ids = {b.id for b in ax.report(model).branches}
    assert {"blocks.0.attn-1", "blocks.0.mlp 2"} <= ids, ids
    with torch.no_grad():
        assert (first - reference(x, torch.full((2,), 999.0))).abs().max().item() <= 1e-5
    assert ax.report(model).steps[-1].reused == len(ids)
    assert not torch.equal(second, reference(x, torch.full((2,), 900.0)))  # reuse changed the result


def test_a_deeper_block_list_is_cached_and_numbered_after_the_main_blocks():
    """HunyuanVideo's token refiner (``context_embedder.token_refiner.refiner_blocks``) is a block list
    deeper than the main ones; it depends on the timestep, so it gets regions like them."""
    entry = ZOO["hunyuanvideo"]
    reference = entry.build()
    model = ax.transform(entry.build(), ax.NoCache())
    with torch.no_grad():
        assert torch.equal(entry.output(model(**entry.inputs())), entry.output(reference(**entry.inputs())))
    report = ax.report(model)
    refiner = [b for b in report.branches if b.block_list == "context_embedder.token_refiner.refiner_blocks"]
    main = [b for b in report.branches if not b.auxiliary]
    assert refiner and all(b.auxiliary for b in refiner)
    main_blocks = len({b.block for b in main})
    assert min(b.depth for b in refiner) == main_blocks  # after every main block, though they run first
    assert all(b.blocks == main_blocks for b in report.branches)

    cached = ax.transform(entry.build(), ax.Static(2))
    with ax.generation(cached, num_steps=4):
        _flops(cached, **entry.inputs(timestep=999.0))
        reuse = _flops(cached, **entry.inputs(timestep=900.0))
    with ax.generation(cached, num_steps=4):
        compute = _flops(cached, **entry.inputs(timestep=999.0))
    report = ax.report(cached)
    assert report.steps[1].reused == len(report.branches)
    block_flops = sum(f for f in report.block_flops.values() if f)
    assert compute - reuse >= 0.9 * block_flops, (compute, reuse, block_flops)

    # First-Block-Cache decides on the first *main* block; the refiner, run before that, computes.
    fbc = ax.transform(entry.build(), ax.FirstBlockCache(threshold=10.0))
    with torch.no_grad(), ax.generation(fbc, num_steps=3):
        for t in (999.0, 900.0, 800.0):
            fbc(**entry.inputs(timestep=t))
    state_caches = {b.id: fbc_policy_caches for b in ax.report(fbc).branches
                    for fbc_policy_caches in [ax.FirstBlockCache().caches(b)]}
    assert not any(state_caches[b.id] for b in refiner)
    assert ax.report(fbc).steps[-1].reused > 0


# -- blocks export cannot take whole: cached branch child by branch child --------------------------------
class _LayerCache:
    """A per-layer cache object handed to every block (no pytree: export refuses it)."""

    def __init__(self, context: torch.Tensor) -> None:
        self.key = context
        self.value = context


class _Attention(nn.Module):
    def __init__(self, width: int = 16, flex: bool = False) -> None:
        super().__init__()
        self.qkv, self.kv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, 2 * width), nn.Linear(width, width)
        self.flex = flex

    def forward(self, x: torch.Tensor, cache=None, block_mask=None) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, -1)).permute(2, 0, 3, 1, 4)
        if cache is not None:  # attend to the cached context too
            ck, cv = self.kv(cache.key).unflatten(-1, (2, 2, -1)).permute(2, 0, 3, 1, 4)
            k, v = torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        if block_mask is not None:
            from torch.nn.attention.flex_attention import flex_attention

            o = flex_attention(q, k, v, block_mask=block_mask)
        else:
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).flatten(2))


class _NumpyRoutedMoE(nn.Module):
    """Top-1 routing through ``.numpy()`` (export cannot trace it)."""

    def __init__(self, width: int = 16, experts: int = 3) -> None:
        super().__init__()
        self.router = nn.Linear(width, experts)
        self.experts = nn.ModuleList(
            [nn.Sequential(nn.Linear(width, 32), nn.GELU(), nn.Linear(32, width)) for _ in range(experts)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        choice = self.router(x).argmax(-1).cpu().numpy()
        out = torch.zeros_like(x)
        for index, expert in enumerate(self.experts):
            rows = torch.from_numpy(choice == index)
            if rows.any():
                out[rows] = expert(x[rows])
        return out


class _PatternBlock(nn.Module):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(16), nn.LayerNorm(16)
        self.attn = _Attention()
        self.ff = _NumpyRoutedMoE() if pattern == "numpy" else nn.Sequential(
            nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))

    def forward(self, x, temb, cache=None, block_mask=None):
        x = x + self.attn(self.norm1(x) * (1 + temb[:, None]), cache=cache, block_mask=block_mask)
        return x + self.ff(self.norm2(x))


class _PatternModel(nn.Module):
    """A DiT whose blocks export cannot take: ``pattern`` is "object" (a cache object passed to every
    block), "flex" (a flex_attention BlockMask passed to every block) or "numpy" (MoE routing)."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = pattern
        self.time = nn.Linear(1, 16)
        self.blocks = nn.ModuleList([_PatternBlock(pattern) for _ in range(3)])

    def forward(self, hidden_states, timestep, context):
        temb = self.time(timestep[:, None] * 1e-3)
        extra = {}
        if self.pattern == "object":
            extra["cache"] = _LayerCache(context)
        elif self.pattern == "flex":
            from torch.nn.attention.flex_attention import create_block_mask

            n = hidden_states.shape[1]
            extra["block_mask"] = create_block_mask(lambda b, h, q, k: q >= k, None, None, n, n, device="cpu")
        for block in self.blocks:
            hidden_states = block(hidden_states, temb, **extra)
        return hidden_states


def _pattern_pair(pattern: str, policy):
    torch.manual_seed(0)
    reference = _PatternModel(pattern).eval()
    model = _PatternModel(pattern).eval()
    model.load_state_dict(reference.state_dict())
    return reference, ax.transform(model, policy)


def _pattern_inputs(timestep: float, tokens: int = 12) -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(2, tokens, 16, generator=g), timestep=torch.full((2,), timestep),
                context=torch.randn(2, 5, 16, generator=g))


_WHY = {"object": "Unsupported input type", "flex": "BlockMask", "numpy": ".numpy()"}


@pytest.mark.parametrize("pattern", ["object", "flex", "numpy"])
def test_blocks_export_cannot_take_are_cached_branch_by_branch(pattern):
    tokens = 128 if pattern == "flex" else 12  # a BlockMask covers 128-token tiles
    reference, exact = _pattern_pair(pattern, ax.NoCache())
    with torch.no_grad():
        assert torch.equal(exact(**_pattern_inputs(999.0, tokens)), reference(**_pattern_inputs(999.0, tokens)))
    report = ax.report(exact)
    assert set(report.eager) == {"blocks.0", "blocks.1", "blocks.2"} and not report.uncached
    assert _WHY[pattern] in report.eager["blocks.0"] and "attn, ff" in report.eager["blocks.0"]
    assert {b.id for b in report.branches} == {f"blocks.{i}.{n}" for i in range(3) for n in ("attn", "ff")}

    _, cached = _pattern_pair(pattern, ax.Static(2))
    runs = []  # the branch children's own forwards, counted
    for block in cached.blocks:
        for child in (block.attn, block.ff):
            child.register_forward_hook(lambda *_: runs.append(1))
    with torch.no_grad(), ax.generation(cached, num_steps=4):
        computed = cached(**_pattern_inputs(999.0, tokens))
        before = len(runs)  # (export's failed attempts may have run some children, fake-tensor, too)
        if pattern == "flex":  # FLOP counting cannot run flex_attention eagerly: count child runs
            reused = cached(**_pattern_inputs(900.0, tokens))
        else:
            with FlopCounterMode(display=False) as counter:
                reused = cached(**_pattern_inputs(900.0, tokens))
    assert before >= 6 and len(runs) == before  # the reuse step ran no attention or MLP
    report = ax.report(cached)
    assert report.steps[-1].reused == 6 and report.steps[-1].computed == 0
    if pattern != "flex":
        block_flops = sum(f for f in report.block_flops.values() if f)
        assert counter.get_total_flops() <= 0.1 * block_flops, (counter.get_total_flops(), block_flops)
    with torch.no_grad():
        assert torch.equal(computed, reference(**_pattern_inputs(999.0, tokens)))
        assert not torch.equal(reused, reference(**_pattern_inputs(900.0, tokens)))


@pytest.mark.parametrize("policy", [
    lambda: ax.FirstBlockCache(threshold=0.5), lambda: ax.AdaCache(codebook=((0.2, 3), (100.0, 1)), num_steps=6),
    lambda: ax.TaylorSeer(ax.Static(3)), lambda: ax.PAB(window_steps=(1, 5)), lambda: ax.ToCa(),
], ids=["first_block", "adacache", "taylorseer", "pab", "toca"])
def test_policies_run_on_blocks_cached_branch_by_branch(policy):
    """Decisions on residual signals (First-Block-Cache reads the eager first block's stream), watched
    outputs (AdaCache), forecasts (TaylorSeer), per-kind reuse (PAB) and token-wise recompute (ToCa
    computes fully: there is no graph to recompute a subset with) on the "object" pattern."""
    _, model = _pattern_pair("object", policy())
    x = _pattern_inputs(999.0)["hidden_states"]
    with torch.no_grad(), ax.generation(model, num_steps=6):
        for step in range(6):
            x = x - 0.1 * model(**{**_pattern_inputs(1000.0 - 150 * step), "hidden_states": x})
    assert torch.isfinite(x).all()
    assert sum(s.reused for s in ax.report(model).steps) > 0


def test_teacache_says_an_eager_first_block_has_no_signal_to_read():
    _, model = _pattern_pair("object", ax.TeaCache(delta=0.3))
    with pytest.raises(ax.PolicyError, match="blocks.0 could not be captured"):
        with torch.no_grad():
            model(**_pattern_inputs(999.0))


def test_traced_drivers_refuse_blocks_cached_branch_by_branch():
    _, model = _pattern_pair("object", ax.Static(2))
    with torch.no_grad():
        model(**_pattern_inputs(999.0))
    with pytest.raises(ax.CaptureError, match="scope='blocks'"):
        with torch.no_grad():
            ax.compile(model, scope="model", backend="eager")(**_pattern_inputs(999.0))


def test_lora_added_to_a_branch_child_is_followed():
    """The live model rule on an eager block: a PEFT adapter injected into an attention child between
    steps is seen (the block is bound anew, its cache dropped) and NoCache stays exact."""
    from peft import LoraConfig, inject_adapter_in_model

    reference, model = _pattern_pair("object", ax.NoCache())
    with torch.no_grad():
        model(**_pattern_inputs(999.0))
    config = LoraConfig(r=2, target_modules=["qkv"], init_lora_weights=False)
    for m in (reference, model):
        torch.manual_seed(1)
        inject_adapter_in_model(config, m)
    with torch.no_grad():
        assert torch.equal(model(**_pattern_inputs(900.0)), reference(**_pattern_inputs(900.0)))

    _, cached = _pattern_pair("object", ax.Static(2))
    with torch.no_grad(), ax.generation(cached, num_steps=4):
        cached(**_pattern_inputs(999.0))
        torch.manual_seed(1)
        inject_adapter_in_model(config, cached)
        cached(**_pattern_inputs(900.0))  # a reuse step, but attn changed: its blocks compute anew
    step = ax.report(cached).steps[-1]
    assert step.computed == 6 and step.reused == 0


# -- step-invariant block lists: reused exactly from step 2 on -----------------------------------------
def _lumina2_steps(model, entry, steps, prompt_change_at=None, in_place_at=None):
    """Outputs of ``steps`` calls of one generation; the prompt embeddings change at one step, or are
    written in place (the same tensor object) at another."""
    outputs, flops = [], []
    context = entry.inputs()["encoder_hidden_states"].clone()
    generation = ax.generation(model, num_steps=steps) if ax.is_transformed(model) else contextlib.nullcontext()
    with torch.no_grad(), generation:
        for step in range(steps):
            if step == prompt_change_at:
                context = context.flip(1).clone()
            if step == in_place_at:
                context.mul_(1.5)
            kwargs = {**entry.inputs(timestep=999.0 - 150 * step), "encoder_hidden_states": context}
            with FlopCounterMode(display=False) as counter:
                outputs.append(entry.output(model(**kwargs)))
            flops.append(counter.get_total_flops())
    return outputs, flops


def test_a_step_invariant_block_list_is_reused_exactly_from_step_two():
    """Lumina2's context_refiner sees only the prompt. The first generation finds it at step 1 and
    numbers it after the latent path (its blocks are bound anew, so it records at step 2 and replays
    from step 3); from then on it returns its recorded outputs from step 2 on (no FLOPs), bit-exactly
    what it computes. The noise refiner and the main layers see the latent."""
    entry = ZOO["lumina2"]
    reference = entry.build()
    model = ax.transform(entry.build(), ax.NoCache())
    expected, reference_flops = _lumina2_steps(reference, entry, 5)
    for generation, first_replay in ((0, 3), (1, 2)):
        outputs, flops = _lumina2_steps(model, entry, 5)
        assert all(torch.equal(a, b) for a, b in zip(outputs, expected))
        report = ax.report(model)
        steps = [s for s in report.steps if s.generation == generation]
        assert [s.exact for s in steps] == [0] * first_replay + [4] * (5 - first_replay)
        refiner = sum(f for path, f in report.block_flops.items() if path.startswith("context_refiner"))
        counted = range(1 if generation == 0 else 0, 5)  # (the first call's captures run under the counter too)
        assert all(reference_flops[s] - flops[s] == (refiner if s >= first_replay else 0) for s in counted), (
            flops, reference_flops, refiner)
    assert report.invariant == ["context_refiner.0", "context_refiner.1"] and report.compute_fraction == 1.0
    depths = {b.block: b.depth for b in report.branches}
    assert depths["noise_refiner.0"] == 0 and depths["context_refiner.0"] == 4  # after the latent path
    runtime = model.__dict__["_adacache_fx_runtime"]
    assert runtime.sessions[0].caches.invariant.memos == {}  # the generation ended: nothing is held


def test_under_cuda_graphs_what_a_step_invariant_list_holds_across_steps_is_a_copy():
    """A CUDA graph writes its next run's outputs over its last: the inputs compared at step 1 and
    the outputs replayed from step 2 are copies then, and the decisions are the same."""
    from adacache_fx.runtime.invariant import InvariantLists

    for copy in (False, True):
        lists = InvariantLists()
        x, y = torch.randn(3), torch.randn(3)
        for step in range(3):
            calls = {}
            call = lists.enter(calls, 0, step, "refiner", "sig", [x], copy=copy)
            if step == 2:
                assert call.mode == "replay"
                assert torch.equal(lists.recall(call, 0, "refiner.0", "owner", "sig", [x]), y)
            else:
                lists.record(call, 0, "refiner.0", "owner", "sig", [x], y, copy=copy)
        memo = lists.memos[(0, "refiner")]
        held_input, held_output = memo.inputs.tensors[0], memo.blocks["refiner.0"].output
        assert (held_input is not x and held_output is not y) == copy
        assert held_input.data_ptr() != x.data_ptr() if copy else held_input.data_ptr() == x.data_ptr()


def test_first_block_cache_reads_the_latent_path_not_an_invariant_text_refiner():
    """Regression: First-Block-Cache once read Lumina2's context_refiner.0 (called first, its residual
    never changes) and reused every step whatever its threshold."""
    entry = ZOO["lumina2"]
    plans = {}
    for threshold in (1e-4, 10.0):
        model = ax.transform(entry.build(), ax.FirstBlockCache(threshold=threshold))
        x = entry.inputs()["hidden_states"]
        with torch.no_grad(), ax.generation(model, num_steps=6):
            for step in range(6):
                x = x - 0.1 * entry.output(model(**{**entry.inputs(timestep=999.0 - 150 * step), "hidden_states": x}))
        plans[threshold] = [s.reused for s in ax.report(model).steps]
    assert sum(plans[1e-4]) == 0, plans  # a tiny threshold never reuses
    assert sum(plans[10.0]) > 0, plans


@pytest.mark.parametrize("change", ["new_prompt", "written_in_place"])
def test_a_step_invariant_list_whose_inputs_change_computes_again(change):
    entry = ZOO["lumina2"]
    reference = entry.build()
    model = ax.transform(entry.build(), ax.NoCache())
    kwargs = {"prompt_change_at": 3} if change == "new_prompt" else {"in_place_at": 3}
    _lumina2_steps(model, entry, 3)  # the first generation numbers the refiner after the latent path
    outputs, flops = _lumina2_steps(model, entry, 6, **kwargs)
    expected, reference_flops = _lumina2_steps(reference, entry, 6, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(outputs, expected))
    assert flops[3] == reference_flops[3]  # recomputed (and recorded anew) ...
    assert flops[4] < reference_flops[4]  # ... and replayed again at the next step
    assert [s.exact for s in ax.report(model).steps if s.generation == 1] == [0, 0, 4, 0, 4, 4]


def test_a_list_that_sees_the_timestep_is_never_replayed_and_holds_nothing():
    """HunyuanVideo's token refiner takes the timestep embedding: one comparison at step 1, then
    nothing more is compared or held for it."""
    from adacache_fx.runtime.invariant import VARYING

    entry = ZOO["hunyuanvideo"]
    model = ax.transform(entry.build(), ax.NoCache())
    runtime = model.__dict__["_adacache_fx_runtime"]
    with torch.no_grad(), ax.generation(model, num_steps=4):
        for step in range(3):
            model(**entry.inputs(timestep=999.0 - 200 * step))
        memos = dict(runtime.sessions[0].caches.invariant.memos)
    assert memos and all(memo == VARYING for memo in memos.values()), memos
    assert ax.report(model).invariant == []


class _TextFuser(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.attn = nn.LayerNorm(16), nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, text):
        h = self.norm(text)
        return text + self.attn(h, h, h, need_weights=False)[0]


class _FusedModel(nn.Module):
    """A text fuser list (prompt only) before latent blocks that cross-attend to its output."""

    def __init__(self) -> None:
        super().__init__()
        self.fuser = nn.ModuleList([_TextFuser() for _ in range(2)])
        self.time = nn.Linear(1, 16)
        self.blocks = nn.ModuleList([_OddNames() for _ in range(2)])

    def forward(self, hidden_states, timestep, text):
        for layer in self.fuser:
            text = layer(text)
        x = hidden_states + self.time(timestep[:, None] * 1e-3)[:, None] + text.mean(1, keepdim=True)
        for block in self.blocks:
            x = block(x)
        return x


def test_compute_steps_of_a_caching_policy_replay_the_invariant_list():
    """Static(2) reuses at steps 1 and 3: step 1 confirms the fuser's inputs unchanged, step 2 (a compute
    step) records its outputs, and from step 3 on it replays them exactly, on reuse and compute steps."""
    torch.manual_seed(0)
    reference = _FusedModel().eval()
    model = _FusedModel().eval()
    model.load_state_dict(reference.state_dict())
    ax.transform(model, ax.Static(2), blocks=["fuser", "blocks"])
    x, text = torch.randn(2, 6, 16), torch.randn(2, 4, 16)
    with torch.no_grad(), ax.generation(model, num_steps=6):
        outs = [model(x, torch.full((2,), 999.0 - 150 * s), text) for s in range(6)]
    plans = [p[2] for p in ax.report(model).plans()]
    assert plans[:5] == ["6C/0R", "0C/6R", "6C/0R", "0C/4R/2E", "4C/0R/2E"], plans  # the fuser's 2 branches, exactly
    with torch.no_grad():
        # a compute step: what the model computes (captured graphs round like eager to ~1e-7 here)
        assert (outs[4] - reference(x, torch.full((2,), 999.0 - 600), text)).abs().max() <= 1e-5
    assert ax.report(model).invariant == ["fuser.0", "fuser.1"]


def test_hidream_numpy_routed_moe_blocks_are_cached_branch_by_branch():
    """The diffusers class that shows the pattern: HiDream's MoE feed-forward routes through
    ``.cpu().numpy()``; its wrapper blocks (``HiDreamBlock.block``) are descended into."""
    from adacache_lab.zoo_more import MORE_ZOO

    entry = MORE_ZOO["hidream"]
    with torch.no_grad():
        expected = entry.output(entry.build()(**entry.inputs()))
        model = ax.transform(entry.build(), ax.NoCache())
        assert torch.equal(entry.output(model(**entry.inputs())), expected)
    report = ax.report(model)
    assert report.eager and all(".numpy()" in why for why in report.eager.values())
    ids = {b.id for b in report.branches}
    assert "double_stream_blocks.0.block.attn1" in ids and not any("adaLN" in i for i in ids), sorted(ids)


def test_an_adapter_added_to_a_replaying_invariant_list_is_followed():
    """The model is alive: a LoRA added to Lumina2's context_refiner while it replays (step 3) and
    re-weighted at step 4: each of those steps computes it anew, bit-exactly the plain model's."""
    from peft import LoraConfig

    entry = ZOO["lumina2"]
    reference, model = entry.build(), ax.transform(entry.build(), ax.NoCache())
    _lumina2_steps(model, entry, 3)  # numbered after the latent path
    config = LoraConfig(r=2, target_modules=["context_refiner.0.attn.to_q", "context_refiner.1.feed_forward.linear_1"],
                        init_lora_weights=False)

    def change(m, step):
        if step == 3:
            torch.manual_seed(1)
            m.add_adapter(config)
        elif step == 4:
            m.set_adapters(["default"], weights=[0.5])

    outputs, expected = [], []
    for m, out in ((model, outputs), (reference, expected)):
        generation = ax.generation(m, num_steps=6) if ax.is_transformed(m) else contextlib.nullcontext()
        with torch.no_grad(), generation:
            for step in range(6):
                change(m, step)
                out.append(entry.output(m(**entry.inputs(timestep=999.0 - 150 * step))))
    assert all(torch.equal(a, b) for a, b in zip(outputs, expected))
    exact = [s.exact for s in ax.report(model).steps if s.generation == 1]
    assert exact[2] == 4 and exact[3] == 0 and exact[4] == 0, exact  # replaying, then recomputed at each change
