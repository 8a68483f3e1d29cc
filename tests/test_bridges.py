"""Folded spans across the model's code between blocks (runtime/bridges.py).

* unit: :func:`find_bridge` proves ``x = P(y) + c`` for a reshape, a swap of the token axes and a
  model constant added, and refuses a norm, a scaling and a stream-dependent shift;
* a toy model with each kind of code between its blocks: a folded Static(2) generation equals the
  per-branch one up to float rounding; affine code keeps one span, anything else ends it;
* Latte (spatial/temporal token swaps, its temporal position embedding added once): one span over
  every block, a cache of one stream's hidden states per call slot, and a position embedding
  changed mid-generation is added as the model adds it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import adacache_fx as ax
from adacache_fx.runtime.bridges import find_bridge, span_residual
from adacache_lab.zoo import ZOO
from conftest import ProjectionAttention


class _Named(dict):
    """The Constants protocol over a plain dict."""

    def items(self):
        return list(super().items())


def _swap(y, frames):
    rows, tokens, dim = y.shape
    batch = rows // frames
    return y.reshape(batch, frames, tokens, dim).permute(0, 2, 1, 3).reshape(batch * tokens, frames, dim)


def test_find_bridge_proves_rearrangements_and_constants():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2 * 3, 5, 4, generator=g)  # (B*F, S, D)
    x = _swap(y, 3)  # (B*S, F, D)
    bridge = find_bridge(y, x, None)
    assert bridge is not None and bridge.rows is not None and bridge.constant is None
    pos = torch.randn(1, 3, 4, generator=g)
    bridge = find_bridge(y, x + pos, _Named(pos=pos, other=torch.randn(1, 3, 4, generator=g)))
    assert bridge is not None and bridge.constant == "pos"
    same_order = find_bridge(y, y.reshape(2, 15, 4).clone(), None)
    assert same_order is not None and same_order.rows is None
    for not_affine in (torch.nn.functional.layer_norm(x, (4,)), 2 * x, x + x.mean(), x.flip(0)):
        assert find_bridge(y, not_affine, _Named(pos=pos)) is None


def test_span_residual_is_the_sum_of_the_blocks_residuals_in_the_last_layout():
    g = torch.Generator().manual_seed(1)
    frames, pos = 3, torch.randn(1, 3, 4, generator=g)
    x0 = torch.randn(6, 5, 4, generator=g)
    r0, r1, r2 = (torch.randn(6, 5, 4, generator=g), torch.randn(10, 3, 4, generator=g),
                  torch.randn(6, 5, 4, generator=g))
    y0 = x0 + r0
    x1 = _swap(y0, frames) + pos
    y1 = x1 + r1
    x2 = _swap(y1, 5)  # back: (B*S, F, D) -> (B*F, S, D)
    y2 = x2 + r2
    bridges = [find_bridge(y0, x1, _Named(pos=pos)), find_bridge(y1, x2, None)]
    assert all(b is not None for b in bridges)
    residual = span_residual(x0, y2, bridges, _Named(pos=pos))
    expected = _swap(_swap(r0, frames) + r1, 5) + r2  # each block's residual carried to the last layout
    torch.testing.assert_close(residual, expected, rtol=0, atol=1e-5)


class _Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.attn = ProjectionAttention(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, hidden_states, t):
        hidden_states = hidden_states + torch.tanh(self.attn(hidden_states)) * t
        return hidden_states + self.ff(hidden_states) * t


class _BridgedModel(nn.Module):
    """Spatial and temporal blocks taking turns, with ``between`` run on the stream after each."""

    def __init__(self, between: str, dim=8, frames=3, depth=3):
        super().__init__()
        self.between, self.frames = between, frames
        self.spatial = nn.ModuleList(_Block(dim) for _ in range(depth))
        self.temporal = nn.ModuleList(_Block(dim) for _ in range(depth))
        self.register_buffer("pos", torch.randn(1, frames, dim))
        self.norm = nn.LayerNorm(dim)

    def _to_temporal(self, h, i):
        tokens = h.shape[1]
        h = _swap(h, self.frames)
        if self.between == "swap+constant" and i == 0:
            h = h + self.pos
        if self.between == "swap+norm":
            h = self.norm(h)
        if self.between == "swap+shift":
            h = h + h.mean()
        return h, tokens

    def forward(self, hidden_states, timestep):
        t = timestep.reshape(-1, 1, 1) / 1000.0
        for i, (spatial, temporal) in enumerate(zip(self.spatial, self.temporal)):
            hidden_states = spatial(hidden_states, t)
            hidden_states, tokens = self._to_temporal(hidden_states, i)
            hidden_states = temporal(hidden_states, t)
            hidden_states = _swap(hidden_states, tokens)
        return hidden_states


def _toy_generation(between, fold, steps=6, change=None):
    torch.manual_seed(0)
    model = _BridgedModel(between).eval()
    ax.transform(model, ax.Static(2), fold=fold)
    x = torch.randn(2 * 3, 5, 8, generator=torch.Generator().manual_seed(3))
    outs, spans = [], []
    with torch.no_grad(), ax.generation(model, num_steps=steps):
        for i in range(steps):
            if change is not None and i == 3:
                change(model)
            out = model(x, torch.full((1,), 999.0 - 150.0 * i))
            outs.append(out)
            spans.append(len(ax.get_runtime(model).folded_residuals()))
            x = x - 0.2 * out
    return model, outs, spans


@pytest.mark.parametrize("between,one_span", [("swap", True), ("swap+constant", True), ("swap+norm", False),
                                              ("swap+shift", False)])
def test_a_span_folds_across_affine_code_between_blocks_only(between, one_span):
    per_branch, expected, _ = _toy_generation(between, fold=False)
    folded, got, spans = _toy_generation(between, fold=True)
    assert max((a - b).abs().max().item() for a, b in zip(got, expected)) <= 1e-5
    plans = [(s.computed, s.reused) for s in ax.report(folded).steps]
    assert plans == [(s.computed, s.reused) for s in ax.report(per_branch).steps]
    assert any(reused for _, reused in plans)
    assert (max(spans) == 1) == one_span, spans
    stream = 2 * 3 * 5 * 8 * 4
    peak = ax.report(folded).cache_peak_bytes
    assert (peak == stream) == one_span, (peak, stream)


def test_a_constant_changed_mid_generation_is_added_as_the_model_adds_it():
    def change(model):
        model.pos.mul_(-3.0)

    _, expected, _ = _toy_generation("swap+constant", fold=False, change=change)
    _, got, spans = _toy_generation("swap+constant", fold=True, change=change)
    assert max(spans) == 1
    assert max((a - b).abs().max().item() for a, b in zip(got, expected)) <= 1e-5


def test_latte_folds_every_block_into_one_span_of_one_stream():
    entry = ZOO["latte"]
    model = ax.transform(entry.build(), ax.Static(2))
    inputs = entry.inputs(timestep=999.0)
    with torch.no_grad(), ax.generation(model, num_steps=4):
        model(**inputs)
        folded = ax.get_runtime(model).folded_residuals()
        per_slot = ax.get_runtime(model).cache_bytes_per_slot()
    blocks = len(model.transformer_blocks) + len(model.temporal_transformer_blocks)
    assert list(folded) == [f"transformer_blocks.0 .. temporal_transformer_blocks.{blocks // 2 - 1}"]
    latent = inputs["hidden_states"]  # (B, C, F, H, W) -> B * F * (H / p) * (W / p) tokens of the inner width
    patch = model.config.patch_size
    tokens = latent.shape[0] * latent.shape[2] * (latent.shape[3] // patch) * (latent.shape[4] // patch)
    stream = tokens * model.config.num_attention_heads * model.config.attention_head_dim * 4
    assert per_slot == {0: stream}


def test_latte_in_bfloat16_still_proves_its_position_embedding_bridge():
    """The constant is matched to the add's rounding, element by element, at the stream's precision."""
    entry = ZOO["latte"]
    model = ax.transform(entry.build().to(torch.bfloat16), ax.Static(2))
    inputs = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for k, v in entry.inputs(timestep=999.0).items()}
    with torch.no_grad(), ax.generation(model, num_steps=4):
        model(**inputs)
        folded = ax.get_runtime(model).folded_residuals()
    assert len(folded) == 1 and next(iter(folded.values()))[0].dtype == torch.bfloat16, list(folded)
