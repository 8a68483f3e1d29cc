"""Reach: blocks whose region names are not Python identifiers (SD3's dual attention joins ``attn``
and ``attn2`` into one region, ``attn+attn2``; submodules may be called anything nn.Module allows)."""

from __future__ import annotations

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
