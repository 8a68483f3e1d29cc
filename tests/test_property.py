"""Property-based tests: randomly generated pre-norm residual networks (hypothesis).

A generator draws a :class:`NetSpec` (widths, heads, tokens, and a random sequence of residual
branches per block) and builds a small DiT-like model from it:

    hidden_states (B, N, C) -> embed Linear -> blocks (nn.ModuleList of identical blocks) -> out Linear

with ``forward(self, hidden_states, timestep)``. Each block is a random pre-norm residual network
over one stream (or two: an optional "text" stream initialised from a learned parameter). Its
building blocks are

* residual branches (each one counted by the generator): self-attention, MLP, cross-attention to the
  text stream, joint attention over both streams (one branch, two residual adds), parallel
  attention + MLP sharing one norm (one branch, one or two adds), text-stream attention / MLP;
  with random variations: gate from the timestep embedding (``x + gate * f(x)``), modulated input
  (``norm(x) * (1 + scale) + shift``, never a residual), modulation from the block's shared
  ``ada`` Linear or the branch's own, LayerNorm or a hand-written RMSNorm, fused or separate QKV,
  ``f(x) + x`` operand order, ``x += f(x)``, ``torch.add(x, f, alpha=...)``, a float64 residual
  add, and a constant residual scale;
* stream-preserving operations between branches (not residuals): bf16 and float64 round trips,
  reshape / transpose round trips.

Properties:

(a) ``NoCache``: the transformed model equals the untransformed one (max abs diff <= 1e-5) at
    several timesteps;
(b) ``Static``: the library finds exactly the branches the generator built (count per block, the
    number of residual adds of each branch, attention vs MLP kind);
(c) ``restore`` puts the original block objects back (identity), removes the hooks, and the model
    computes as before;
(d) ``Static`` reuse is exact against an independent oracle: the *untransformed* model where every
    branch stores its residual(s) on compute steps and returns the stored ones on reuse steps.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adacache_fx as ax

ATOL = 1e-5
ATTENTION_KINDS = {"self_attention", "cross_attention", "temporal_attention", "joint_attention"}
SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,  # reproducible in CI; failures print the drawn spec
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# ---------------------------------------------------------------------------------------------
# The spec: what the generator draws
# ---------------------------------------------------------------------------------------------

# Residual branch kinds: (needs the text stream, has attention, residual adds it makes)
BRANCH_KINDS = {
    "attn": (False, True),
    "mlp": (False, False),
    "parallel": (False, True),  # attention + MLP on one shared norm
    "cross_attn": (True, True),  # x attends to the text stream
    "joint_attn": (True, True),  # attention over cat(x, text), both streams updated
    "text_attn": (True, True),
    "text_mlp": (True, False),
}
STREAM_OPS = ("bf16_roundtrip", "f64_roundtrip", "reshape_roundtrip", "transpose_roundtrip")


@dataclass(frozen=True)
class BranchSpec:
    kind: str
    norm: str  # "layernorm" | "rmsnorm"
    gated: bool  # x + gate(temb) * f(x)
    modulated: bool  # f(norm(x) * (1 + scale) + shift)
    add_style: str  # "plus" | "reversed" | "inplace" | "alpha"
    upcast: bool  # the residual add runs in float64, cast back
    residual_scale: float | None  # x + c * f(x)
    fused_qkv: bool
    two_adds: bool  # parallel branch: x + a + m (two adds) instead of x + (a + m)
    ops_before: tuple[str, ...]  # stream-preserving ops applied to x before this branch


@dataclass(frozen=True)
class NetSpec:
    batch: int
    tokens: int
    text_tokens: int
    channels: int
    heads: int
    head_dim: int
    num_blocks: int
    has_text: bool
    block_returns_text: bool
    shared_ada: bool
    branches: tuple[BranchSpec, ...]
    seed: int

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def has_attention(self) -> bool:
        return any(BRANCH_KINDS[b.kind][1] for b in self.branches)

    def residual_adds(self, branch: BranchSpec) -> int:
        if branch.kind == "joint_attn":
            return 2
        if branch.kind == "parallel" and branch.two_adds:
            return 2
        return 1


@st.composite
def branch_specs(draw, has_text: bool) -> BranchSpec:
    kinds = [k for k, (needs_text, _) in BRANCH_KINDS.items() if has_text or not needs_text]
    kind = draw(st.sampled_from(kinds))
    gated = draw(st.booleans())
    return BranchSpec(
        kind=kind,
        norm=draw(st.sampled_from(["layernorm", "rmsnorm"])),
        gated=gated,
        modulated=draw(st.booleans()),
        # Gated branches compute gate * f(x); keep the other add styles for ungated ones too.
        add_style=draw(st.sampled_from(["plus", "reversed", "inplace", "alpha"])),
        upcast=draw(st.booleans()) if kind != "joint_attn" else False,
        residual_scale=draw(st.sampled_from([None, None, 0.5])),
        fused_qkv=draw(st.booleans()),
        two_adds=draw(st.booleans()),
        ops_before=tuple(draw(st.lists(st.sampled_from(STREAM_OPS), max_size=2))),
    )


@st.composite
def net_specs(draw) -> NetSpec:
    has_text = draw(st.booleans())
    branches = tuple(draw(st.lists(branch_specs(has_text), min_size=1, max_size=4)))
    updates_text = any(b.kind in ("joint_attn", "text_attn", "text_mlp") for b in branches)
    return NetSpec(
        batch=draw(st.integers(1, 2)),
        tokens=draw(st.integers(2, 6)),
        text_tokens=draw(st.integers(1, 4)),
        channels=draw(st.integers(2, 5)),
        heads=draw(st.integers(1, 2)),
        head_dim=draw(st.sampled_from([4, 8])),
        num_blocks=draw(st.integers(1, 4)),
        has_text=has_text,
        # A text context that no branch updates may be passed in without being returned.
        block_returns_text=has_text and (updates_text or draw(st.booleans())),
        shared_ada=draw(st.booleans()),
        branches=branches,
        seed=draw(st.integers(0, 2**16)),
    )


# ---------------------------------------------------------------------------------------------
# The model built from a spec
# ---------------------------------------------------------------------------------------------


class Oracle:
    """Reference caching done by the untransformed model: store residuals, or hand stored ones back."""

    def __init__(self) -> None:
        self.mode = "off"  # "off" | "store" | "reuse"
        self.cache: dict[int, tuple[torch.Tensor, ...]] = {}

    def __call__(self, owner: nn.Module, residuals: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if self.mode == "store":
            self.cache[id(owner)] = residuals
        elif self.mode == "reuse":
            return self.cache[id(owner)]
        return residuals


class RMSNorm(nn.Module):
    """Hand-written RMSNorm (its ``+ eps`` add is inside the branch, not on the stream)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_norm(kind: str, dim: int, affine: bool) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim)
    return nn.LayerNorm(dim, elementwise_affine=affine, eps=1e-6)


class GenAttention(nn.Module):
    """Multi-head attention with q/k/v projections and F.scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int, fused_qkv: bool) -> None:
        super().__init__()
        self.heads = heads
        self.fused = fused_qkv
        if fused_qkv:
            self.to_qkv = nn.Linear(dim, 3 * dim)
        else:
            self.to_q = nn.Linear(dim, dim)
            self.to_k = nn.Linear(dim, dim)
            self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is None and self.fused:
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        elif self.fused:  # fused weights, separate sources: slice the projection
            w_q, w_kv = self.to_qkv.weight.split([x.shape[-1], 2 * x.shape[-1]])
            b_q, b_kv = self.to_qkv.bias.split([x.shape[-1], 2 * x.shape[-1]])
            q = F.linear(x, w_q, b_q)
            k, v = F.linear(context, w_kv, b_kv).chunk(2, dim=-1)
        else:
            context = x if context is None else context
            q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b, n, d = q.shape
        q, k, v = (t.reshape(b, t.shape[1], self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))


class GenMLP(nn.Module):
    def __init__(self, dim: int, mult: int = 2) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, mult * dim)
        self.fc2 = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def stream_op(op: str, x: torch.Tensor) -> torch.Tensor:
    """A stream-preserving operation (not a residual)."""
    if op == "bf16_roundtrip":
        return x.to(torch.bfloat16).to(x.dtype)
    if op == "f64_roundtrip":
        return x.double().float()
    if op == "reshape_roundtrip":
        return x.reshape(x.shape[0], -1).reshape(x.shape)
    if op == "transpose_roundtrip":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    raise ValueError(op)


class Branch(nn.Module):
    """One residual branch; ``forward(x, text, mods) -> (x, text)`` with the residual adds inside."""

    def __init__(self, spec: BranchSpec, dim: int, heads: int, own_ada: bool) -> None:
        super().__init__()
        self.spec = spec
        kind = spec.kind
        affine = not spec.modulated
        if kind in ("attn", "cross_attn", "joint_attn", "text_attn", "parallel"):
            self.attn = GenAttention(dim, heads, spec.fused_qkv)
        if kind in ("mlp", "text_mlp", "parallel"):
            self.mlp = GenMLP(dim)
        self.norm = make_norm(spec.norm, dim, affine)
        if kind in ("cross_attn", "joint_attn"):
            self.norm_context = make_norm(spec.norm, dim, affine)
        # Modulation: shift, scale, gate (3 * dim) from the timestep embedding.
        self.ada = nn.Linear(dim, 3 * dim) if own_ada and (spec.gated or spec.modulated) else None
        self.oracle: Oracle | None = None

    def _modulate(self, h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if self.spec.modulated:
            return h * (1 + scale[:, None]) + shift[:, None]
        return h

    def _residuals(self, x, text, shift, scale) -> tuple[torch.Tensor, ...]:
        """The branch values (before gate and scale)."""
        kind = self.spec.kind
        if kind == "attn":
            return (self.attn(self._modulate(self.norm(x), shift, scale)),)
        if kind == "mlp":
            return (self.mlp(self._modulate(self.norm(x), shift, scale)),)
        if kind == "text_attn":
            return (self.attn(self._modulate(self.norm(text), shift, scale)),)
        if kind == "text_mlp":
            return (self.mlp(self._modulate(self.norm(text), shift, scale)),)
        if kind == "cross_attn":
            return (self.attn(self._modulate(self.norm(x), shift, scale), self.norm_context(text)),)
        if kind == "joint_attn":
            h = torch.cat([self._modulate(self.norm(x), shift, scale), self.norm_context(text)], dim=1)
            out = self.attn(h)
            return (out[:, : x.shape[1]], out[:, x.shape[1]:])
        if kind == "parallel":
            h = self._modulate(self.norm(x), shift, scale)
            a, m = self.attn(h), self.mlp(h)
            return (a, m) if self.spec.two_adds else (a + m,)
        raise ValueError(kind)

    def _add(self, stream: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        dtype = stream.dtype
        if spec.upcast:
            stream, r = stream.double(), r.double()
        if spec.add_style == "plus":
            out = stream + r
        elif spec.add_style == "reversed":
            out = r + stream
        elif spec.add_style == "inplace":
            out = stream.clone()  # never write into the block's input
            out += r
        else:  # "alpha": the constant residual scale, if any, is the add's alpha
            out = torch.add(stream, r, alpha=spec.residual_scale or 1.0)
        return out.to(dtype) if spec.upcast else out

    def forward(self, x, text, temb, mods):
        spec = self.spec
        for op in spec.ops_before:
            x = stream_op(op, x)
        if self.ada is not None:
            mods = self.ada(F.silu(temb)).chunk(3, dim=-1)
        shift, scale, gate = mods if mods is not None else (None, None, None)
        # The branch values: gate and constant scale included (that is what a cache holds).
        values = []
        for r in self._residuals(x, text, shift, scale):
            if spec.gated:
                r = gate[:, None] * r
            if spec.residual_scale is not None and spec.add_style != "alpha":
                r = spec.residual_scale * r
            values.append(r)
        values = tuple(values)
        if self.oracle is not None:
            values = self.oracle(self, values)
        if spec.kind in ("text_attn", "text_mlp"):
            text = self._add(text, values[0])
        elif spec.kind == "joint_attn":
            x = self._add(x, values[0])
            text = self._add(text, values[1])
        else:
            for v in values:
                x = self._add(x, v)
        return x, text


class GenBlock(nn.Module):
    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        dim = spec.dim
        self.returns_text = spec.block_returns_text
        needs_mods = [b.gated or b.modulated for b in spec.branches]
        self.ada = nn.Linear(dim, 3 * dim * len(spec.branches)) if spec.shared_ada and any(needs_mods) else None
        self.branches = nn.ModuleList(
            Branch(b, dim, spec.heads, own_ada=self.ada is None) for b in spec.branches
        )

    def forward(self, x, text, temb):
        mods = self.ada(F.silu(temb)).chunk(3 * len(self.branches), dim=-1) if self.ada is not None else None
        for i, branch in enumerate(self.branches):
            x, text = branch(x, text, temb, mods[3 * i: 3 * i + 3] if mods is not None else None)
        return (x, text) if self.returns_text else x


def timestep_features(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-torch.arange(half, dtype=torch.float32) * (9.2 / half))
    args = timestep.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class GenNet(nn.Module):
    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        self.spec = spec
        dim = spec.dim
        self.embed = nn.Linear(spec.channels, dim)
        self.time_embed = nn.Linear(2 * (dim // 2), dim)
        if spec.has_text:
            self.text = nn.Parameter(torch.randn(spec.text_tokens, dim))
        self.blocks = nn.ModuleList(GenBlock(spec) for _ in range(spec.num_blocks))
        self.norm_out = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, spec.channels)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        x = self.embed(hidden_states)
        temb = F.silu(self.time_embed(timestep_features(timestep, x.shape[-1])))
        text = self.text.expand(x.shape[0], -1, -1) if self.spec.has_text else None
        for block in self.blocks:
            out = block(x, text, temb)
            x, text = out if isinstance(out, tuple) else (out, text)
        return self.proj_out(self.norm_out(x))


def build(spec: NetSpec) -> GenNet:
    torch.manual_seed(spec.seed)
    return GenNet(spec).eval()


def inputs(spec: NetSpec, timestep: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(spec.batch, spec.tokens, spec.channels, generator=g)
    return x, torch.full((spec.batch,), float(timestep))


def transform(model: GenNet, policy: ax.Policy) -> GenNet:
    # With no attention in the blocks, automatic discovery has nothing to go on: name the list.
    blocks = None if model.spec.has_attention else ["blocks"]
    return ax.transform(model, policy, blocks=blocks)


def set_oracle(model: GenNet, oracle: Oracle | None) -> None:
    for module in model.modules():
        if isinstance(module, Branch):
            module.oracle = oracle


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


TIMESTEPS = (999.0, 750.0, 500.0, 250.0, 0.0)
