"""Token-wise caching: partial recompute (gather -> branch -> scatter) as a pass feature, and the
DuCa and ToCa policies built on it, on real diffusers architectures.

FLOP tolerances: ``FlopCounterMode`` counts matmul-class ops only (linear, mm, bmm, attention);
each of them in an MLP scales exactly with the number of token rows, and gathers, scatters and
element-wise ops count zero. So a partly recomputed MLP costs exactly ``k / N`` of its FLOPs, and
these tests compare integers for equality. Steps that reuse whole branches may save a little more
than the branches' own FLOPs (a modulation projection feeding only reused branches dies with
them), so there the measured saving must lie in ``[1, 1.1]`` times the branches' FLOPs.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import adacache_fx as ax
from adacache_fx.errors import PolicyError
from adacache_fx.kinds import MLP
from adacache_fx.passes.rewrite import RegionState, build_variant
from adacache_fx.passes.tokens import PartialComputeError
from adacache_fx.policies.base import BranchInfo, Plan, Policy, StepContext
from adacache_fx.policies.duca import cycle_kind
from adacache_fx.policies.token_select import grid_layout, spatial_bonus, top_tokens
from adacache_lab.zoo import ZOO
from policy_driver import Live

STEPS = 10
BATCH = 2  # cond + uncond halves in one call: they must share the token indices


class SubsetOnce(Policy):
    """Step 0 computes everything; step 1 recomputes ``target`` at ``indices`` only."""

    def __init__(self, target: str, indices: torch.Tensor) -> None:
        self.target, self.indices = target, indices

    def plan(self, ctx: StepContext, state) -> Plan:
        if ctx.step == 0:
            return Plan.compute_all()
        return Plan(partial={self.target: self.indices})


class Subsets(Policy):
    """Step 0 computes everything; step ``i`` recomputes ``target`` at ``subsets[i - 1]`` only."""

    def __init__(self, target: str, subsets: list[torch.Tensor]) -> None:
        self.target, self.subsets = target, subsets

    def plan(self, ctx: StepContext, state) -> Plan:
        if ctx.step == 0:
            return Plan.compute_all()
        return Plan(partial={self.target: self.subsets[ctx.step - 1]})


def _call_flops(model, inputs) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs)
    return counter.get_total_flops()


def _step_inputs(entry, step: int) -> dict:
    # Different latents and timesteps each step, so fresh and cached values differ.
    return entry.inputs(timestep=999.0 - 250.0 * step, batch=BATCH, seed=step)


def _run_steps(entry, state_dict, policy, steps: int):
    """Outputs and cached residuals after each step (fold=False: every branch's own residual)."""
    model = entry.build()
    model.load_state_dict(state_dict)
    ax.transform(model, policy, fold=False)
    outputs, residuals = [], []
    with torch.no_grad(), ax.generation(model, num_steps=steps):
        for step in range(steps):
            outputs.append(entry.output(model(**_step_inputs(entry, step))))
            residuals.append(dict(ax.get_runtime(model).cached_residuals()))
    return model, outputs, residuals


def _two_steps(entry, state_dict, policy):
    """Steps 0 and 1 with step 1's FLOPs measured; returns (model, FLOPs of step 1)."""
    model = entry.build()
    model.load_state_dict(state_dict)
    ax.transform(model, policy)
    with torch.no_grad(), ax.generation(model, num_steps=2):
        model(**_step_inputs(entry, 0))
        with FlopCounterMode(display=False) as counter:
            model(**_step_inputs(entry, 1))
    return model, counter.get_total_flops()


# Branches covering: MLP, self-attention, cross-attention with a text mask, RoPE attention (Wan),
# a fused attention+MLP region over concatenated text+image tokens with RoPE (Flux single block),
# a temporal block (Latte: the tokens are frames), and the text stream's MLP of a joint block.
PARTIAL_CASES = [
    ("pixart", "transformer_blocks.0.ff"),
    ("pixart", "transformer_blocks.0.attn1"),
    ("pixart", "transformer_blocks.1.attn2"),
    ("wan", "blocks.0.attn1"),
    ("wan", "blocks.1.ffn"),
    ("flux", "single_transformer_blocks.0.attn"),
    ("flux", "transformer_blocks.0.ff_context"),
    ("latte", "temporal_transformer_blocks.0.ff"),
]


@pytest.fixture(scope="module")
def full_runs():
    """Per model: weights, and every step's outputs and residuals when everything computes."""
    out = {}
    for name in sorted({n for n, _ in PARTIAL_CASES}):
        entry = ZOO[name]
        reference = entry.build()
        model, outputs, residuals = _run_steps(entry, reference.state_dict(), ax.Static(interval=1), 3)
        branches = {b.id: b for b in ax.report(model).branches}
        out[name] = (reference.state_dict(), outputs, residuals, branches)
    return out


@pytest.mark.parametrize("name,branch_id", PARTIAL_CASES)
def test_partial_recompute_is_exact_for_all_tokens_and_for_a_subset(name, branch_id, full_runs):
    state_dict, full_outputs, full_residuals, branches = full_runs[name]
    info = branches[branch_id]
    assert info.partial, f"{branch_id} should support partial recompute"
    n = info.tokens
    # Step 1: every token, in a shuffled order (the scatter must put each one back in its place).
    everything = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    # Step 2: first, middle and last token (first and last of Latte's 3-token temporal blocks).
    subset = torch.tensor(sorted({0, n // 2, n - 1} if n > 4 else {0, n - 1}))
    model, outputs, residuals = _run_steps(ZOO[name], state_dict, Subsets(branch_id, [everything, subset]), 3)
    assert [(s.partial, s.reused) for s in ax.report(model).steps[1:]] == [(1, 0), (1, 0)]

    # All tokens through the partial path: the full compute, output and residual.
    assert (outputs[1] - full_outputs[1]).abs().max().item() <= 1e-5
    assert (residuals[1][branch_id][0] - full_residuals[1][branch_id][0]).abs().max().item() <= 1e-5

    # A subset: fresh at the chosen tokens for every batch row (cond and uncond share the indices),
    # the previous cache, untouched, everywhere else.
    got, fresh, cached = residuals[2][branch_id][0], full_residuals[2][branch_id][0], residuals[1][branch_id][0]
    assert got.shape == cached.shape  # batch rows: BATCH (x spatial positions in a temporal block)
    assert (got[:, subset] - fresh[:, subset]).abs().max().item() <= 1e-5
    others = torch.tensor([i for i in range(n) if i not in set(subset.tolist())])
    assert torch.equal(got[:, others], cached[:, others])
    # The test can fail: fresh and cached values differ at the chosen tokens.
    assert (fresh[:, subset] - cached[:, subset]).abs().max().item() > 1e-3


@pytest.mark.parametrize("name,branch_id", [("pixart", "transformer_blocks.0.ff"), ("wan", "blocks.1.ffn")])
def test_a_partial_mlp_costs_exactly_its_share_of_tokens(name, branch_id, full_runs):
    state_dict, _outputs, _residuals, branches = full_runs[name]
    info = branches[branch_id]
    entry = ZOO[name]
    reference = entry.build()
    reference.load_state_dict(state_dict)
    full = _call_flops(reference, _step_inputs(entry, 1))
    for count in (1, info.tokens // 4, info.tokens // 2):
        indices = torch.arange(count)
        model, measured = _two_steps(entry, state_dict, SubsetOnce(branch_id, indices))
        saved = full - measured
        assert saved * info.tokens == (info.tokens - count) * info.flops, (count, saved, info.flops)
        record = ax.report(model).steps[1]
        assert record.flops_total - record.flops_computed == saved


def test_a_partial_attention_keeps_keys_and_values_whole(full_runs):
    """Query-side only: the key/value projections still run on every token; the rest scales with k."""
    name, branch_id = "pixart", "transformer_blocks.0.attn1"
    state_dict, _outputs, _residuals, branches = full_runs[name]
    info = branches[branch_id]
    entry = ZOO[name]
    reference = entry.build()
    reference.load_state_dict(state_dict)
    full = _call_flops(reference, _step_inputs(entry, 1))
    attn = reference.transformer_blocks[0].attn1
    x = torch.zeros(BATCH, info.tokens, attn.to_k.in_features)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        attn.to_k(x), attn.to_v(x)
    key_value = counter.get_total_flops()
    count = info.tokens // 4
    _model, measured = _two_steps(entry, state_dict, SubsetOnce(branch_id, torch.arange(count)))
    assert (full - measured) * info.tokens == (info.tokens - count) * (info.flops - key_value)


# -- where partial recompute is not valid -----------------------------------------------------------
class _MixingMLP(nn.Module):
    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.fc1, self.fc2, self.mode = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim), mode
        self.conv = nn.Conv1d(2 * dim, 2 * dim, 3, padding=1, groups=2 * dim)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.fc1(x))
        if self.mode == "mean":  # every token sees the mean of all tokens
            h = h + h.mean(dim=1, keepdim=True)
        elif self.mode == "conv":  # a depthwise conv over neighbouring tokens
            h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        elif self.mode == "softmax":  # a softmax across tokens
            h = h.softmax(dim=1)
        elif self.mode == "cumsum":
            h = h.cumsum(dim=1)
        return self.fc2(h)


class _ManualAttention(nn.Module):
    """Attention written as matmuls and softmax (no SDPA): still query-local."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        weights = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(dim=-1)
        return self.to_out(weights @ v)


class _Block(nn.Module):
    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = _ManualAttention(dim)
        self.ff = _MixingMLP(dim, mode)

    def forward(self, hidden_states):
        hidden_states = hidden_states + self.attn1(self.norm1(hidden_states))
        return hidden_states + self.ff(self.norm2(hidden_states))


class _Toy(nn.Module):
    def __init__(self, mode: str, dim: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.transformer_blocks = nn.ModuleList(_Block(dim, mode) for _ in range(depth))

    def forward(self, hidden_states, timestep):
        for block in self.transformer_blocks:
            hidden_states = block(hidden_states)
        return hidden_states


def _toy_run(mode: str, policy: Policy, tokens: int = 12):
    torch.manual_seed(0)
    reference = _Toy(mode).eval()
    model = _Toy(mode).eval()
    model.load_state_dict(reference.state_dict())
    ax.transform(model, policy)
    xs = [torch.randn(BATCH, tokens, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    outs = []
    with torch.no_grad(), ax.generation(model, num_steps=2):
        for i, x in enumerate(xs):
            outs.append((model(x, torch.full((BATCH,), 999.0 - i)), reference(x, None)))
        residuals = dict(ax.get_runtime(model).cached_residuals())
    return model, outs, residuals


@pytest.mark.parametrize("mode", ["mean", "conv", "softmax", "cumsum"])
def test_a_token_mixing_branch_is_never_recomputed_partially(mode, caplog):
    target = "transformer_blocks.0.ff"
    with caplog.at_level(logging.WARNING, logger="adacache_fx"):
        model, outs, _ = _toy_run(mode, SubsetOnce(target, torch.tensor([0, 5])))
    info = {b.id: b for b in ax.report(model).branches}[target]
    assert not info.partial and info.tokens is None
    region = next(
        r for s in ax.get_runtime(model).programs.values() for r in s.regions if r.name == "ff"
    )
    assert region.token_error and "cannot be recomputed for a subset of tokens" in region.token_error
    # The plan's request falls back to a full compute: exact, and said once.
    record = ax.report(model).steps[1]
    assert record.partial == 0 and record.reused == 0
    for got, expected in outs:
        assert torch.equal(got, expected)
    assert any("not valid for it" in r.getMessage() for r in caplog.records)
    # Building the partial graph directly names the problem.
    shared = next(iter(ax.get_runtime(model).programs.values()))
    states = tuple(RegionState.PARTIAL if r.name == "ff" else RegionState.COMPUTE for r in shared.regions)
    counts = tuple(2 if r.name == "ff" else 0 for r in shared.regions)
    with pytest.raises(PartialComputeError, match="cannot be recomputed"):
        build_variant(shared.captured.graph_module, shared.regions, states, counts)


def test_attention_written_with_matmuls_is_query_local_and_exact():
    target = "transformer_blocks.1.attn1"
    torch.manual_seed(0)  # the same weights as _toy_run's models
    reference = ax.transform(_Toy("none").eval(), ax.Static(interval=1), fold=False)
    xs = [torch.randn(BATCH, 12, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.no_grad(), ax.generation(reference, num_steps=2):
        reference(xs[0], torch.full((BATCH,), 999.0))
        full_first = ax.get_runtime(reference).cached_residuals()[target][0]
        reference(xs[1], torch.full((BATCH,), 998.0))
        full_second = ax.get_runtime(reference).cached_residuals()[target][0]
    indices = torch.tensor([1, 4, 11])
    model, _, residuals = _toy_run("none", SubsetOnce(target, indices))
    assert {b.id: b for b in ax.report(model).branches}[target].partial
    got = residuals[target][0]
    assert (got[:, indices] - full_second[:, indices]).abs().max().item() <= 1e-5
    rest = torch.tensor([i for i in range(12) if i not in (1, 4, 11)])
    assert torch.equal(got[:, rest], full_first[:, rest])


def test_joint_branches_over_two_streams_fall_back_to_a_full_compute():
    entry = ZOO["cogvideox"]
    reference = entry.build()
    model = entry.build()
    model.load_state_dict(reference.state_dict())
    ax.transform(model, SubsetOnce("transformer_blocks.0.ff", torch.tensor([0, 1])))
    with torch.no_grad(), ax.generation(model, num_steps=2):
        for i, t in enumerate((999.0, 500.0)):
            inputs = entry.inputs(timestep=t, batch=BATCH, seed=i)
            assert torch.equal(entry.output(model(**inputs)), entry.output(reference(**inputs)))
    branches = ax.report(model).branches
    assert all(not b.partial for b in branches), "CogVideoX's regions update text and video streams together"
    assert ax.report(model).steps[1].partial == 0


def test_plans_with_bad_token_requests_are_refused():
    with pytest.raises(PolicyError, match="both reused and partially recomputed"):
        Plan(frozenset({"a"}), {"a": torch.tensor([0])})
    with pytest.raises(PolicyError, match="1-D integer tensor"):
        Plan(partial={"a": torch.tensor([0.5])})
    with pytest.raises(PolicyError, match="out of range"):
        _toy_run("none", SubsetOnce("transformer_blocks.0.ff", torch.tensor([0, 12])))
    # No tokens: plain reuse.
    model, _, _ = _toy_run("none", SubsetOnce("transformer_blocks.0.ff", torch.tensor([], dtype=torch.long)))
    assert ax.report(model).steps[1].reused == 1


# -- DuCa ----------------------------------------------------------------------------------------------
def test_duca_cycle_hand_derived():
    def sequence(interval, early, descending, steps=10):
        letters = {"full": "F", "aggressive": "A", "conservative": "C"}
        return "".join(letters[cycle_kind(s, interval, early, descending)] for s in range(steps))

    # First 3 full; then a full step every 3 counted from the last early one (steps 5, 8).
    assert sequence(3, 3, descending=True) == "FFFACFACFA"
    assert sequence(3, 3, descending=False) == "FFFCAFCAFC"
    # Period 5: full, then the two kinds alternate.
    assert sequence(5, 3, descending=True, steps=12) == "FFFACACFACAC"
    assert sequence(5, 1, descending=False, steps=11) == "FCACAFCACAF"
    assert sequence(1, 1, descending=True) == "F" * 10


def _kind_of(record) -> str:
    if record.partial:
        return "C"
    if record.computed == 0 and record.reused:
        return "A"
    assert record.reused == 0, record
    return "F"


@pytest.mark.parametrize(
    "timesteps,expected",
    [
        ([999.0 - 99.0 * i for i in range(STEPS)], "FFFACFACFA"),  # counting down (DiT, PixArt)
        ([1.0 + 99.0 * i for i in range(STEPS)], "FFFCAFCAFC"),  # counting up
    ],
)
def test_duca_runs_its_cycle_in_both_step_directions(timesteps, expected):
    entry = ZOO["pixart"]
    policy = ax.DuCa(ratio=0.5)
    model = ax.transform(entry.build(), policy)
    with torch.no_grad(), ax.generation(model, num_steps=STEPS):
        for t in timesteps:
            model(**entry.inputs(timestep=t, batch=BATCH))
    report = ax.report(model)
    assert "".join(_kind_of(s) for s in report.steps) == expected
    for record, kind in zip(report.steps, expected):
        if kind == "C":  # attention (self and cross) reused, each block's MLP recomputed for half its tokens
            assert (record.computed, record.reused, record.partial) == (0, 4, 2)


def test_duca_direction_must_be_known():
    policy = Live(ax.DuCa())
    branch = _branch("b.0.ff", MLP, depth=0)
    for step in range(3):
        policy.plan(StepContext(step=step, num_steps=10, timestep=None, generation=0, branches=(branch,)))
    with pytest.raises(PolicyError, match="direction='descending'"):
        policy.plan(StepContext(step=3, num_steps=10, timestep=None, generation=0, branches=(branch,)))
    explicit = Live(ax.DuCa(direction="ascending"))
    kinds = [explicit.step_kind(StepContext(step=s, num_steps=10, timestep=None, generation=0, branches=()),
                                explicit.state)
             for s in range(5)]
    assert kinds == ["full", "full", "full", "conservative", "aggressive"]
    with pytest.raises(ValueError, match="direction"):
        ax.DuCa(direction="up")


def test_duca_picks_low_norm_attention_tokens_and_ages_the_rest():
    policy = Live(ax.DuCa(ratio=0.25, age_weight=0.25, direction="descending"))
    attn = _branch("b.0.attn1", "self_attention", depth=0, tokens=8)
    ff = _branch("b.0.ff", MLP, depth=0, tokens=8)
    policy.setup((attn, ff))
    ctx = StepContext(step=0, num_steps=10, timestep=None, generation=0, branches=(attn, ff))
    policy.plan(ctx)
    # The attention residual's token norms: tokens 2 and 6 have the lowest.
    residual = torch.ones(2, 8, 4)
    residual[:, 2] *= 0.1
    residual[:, 6] *= 0.2
    residual[:, 0] *= 5.0
    policy.observe(ctx, attn, (residual,), None)
    kinds = {}
    for step in range(1, 8):
        ctx = StepContext(step=step, num_steps=10, timestep=None, generation=0, branches=(attn, ff))
        kinds[step] = (policy.step_kind(ctx, policy.state), policy.plan(ctx))
    # Step 4 is the first conservative step: k = int(0.25 * 8) = 2 tokens, the two lowest norms.
    kind, plan = kinds[4]
    assert kind == "conservative" and plan.reuse == frozenset({"b.0.attn1"})
    assert plan.partial["b.0.ff"].tolist() == [2, 6]
    # Step 7 (conservative again, after the full step 5): ages are 2 for all but the chosen tokens,
    # which is the same for all, so the norms still decide.
    kind, plan = kinds[7]
    assert kind == "conservative" and plan.partial["b.0.ff"].tolist() == [2, 6]
    random_policy = Live(ax.DuCa(ratio=0.5, selection="random", direction="descending", seed=3))
    chosen = random_policy.choose(ff, 4, random_policy.state)
    assert chosen.tolist() == sorted(chosen.tolist()) and len(set(chosen.tolist())) == 4


# -- ToCa ------------------------------------------------------------------------------------------------
def _branch(branch_id: str, kind: str, depth: int, tokens: int | None = 16) -> BranchInfo:
    block, _, name = branch_id.rpartition(".")
    return BranchInfo(
        id=branch_id, block=block, block_list=block.rpartition(".")[0], block_index=depth, depth=depth,
        name=name, kind=kind, tags=frozenset({kind}), flops=100, num_residuals=1, tokens=tokens,
    )


def test_toca_ratios_hand_computed():
    policy = ax.ToCa(ratio=0.1)  # step weight 0.4, layer weight 0.8, w = 2.5, mu = 0.6
    mlp = lambda depth: _branch(f"b.{depth}.ff", MLP, depth)  # noqa: E731
    attn = _branch("b.1.attn1", "self_attention", 1)
    # f_step = 1 + 0.4 - 0.8 * 5/10 = 1.0; f_layer = 1 + 0.8 - 1.6 * 1/3; f_mlp = 1 + 0.6 * 2.5 = 2.5
    assert policy.ratio_for(mlp(1), 5, 10, layers=4) == pytest.approx(0.1 * 1.0 * (1.8 - 1.6 / 3) * 2.5)
    assert policy.ratio_for(mlp(1), 5, 10, layers=4) == pytest.approx(0.3166667, abs=1e-6)
    assert policy.ratio_for(mlp(0), 0, 10, layers=4) == pytest.approx(0.63)  # 0.1 * 1.4 * 1.8 * 2.5
    assert policy.ratio_for(mlp(3), 9, 10, layers=4) == pytest.approx(0.034)  # 0.1 * 0.68 * 0.2 * 2.5
    assert policy.ratio_for(attn, 5, 10, layers=4) == 0.0  # f_attn = 1 - 0.4 * 2.5 = 0: fully reused
    custom = ax.ToCa(ratio=0.1, module_weight=1.0)  # f_attn = 1 - 0.4 = 0.6
    assert custom.ratio_for(_branch("b.2.attn1", "self_attention", 2), 2, 10, layers=4) == pytest.approx(
        0.1 * 1.24 * (1.8 - 1.6 * 2 / 3) * 0.6
    )
    assert ax.ToCa(ratio=1.0).ratio_for(mlp(0), 0, 10, layers=4) == 1.0  # 6.3 clamped


def test_toca_plan_turns_ratios_into_token_counts():
    policy = Live(ax.ToCa(ratio=0.1))
    branches = tuple(_branch(f"b.{d}.ff", MLP, d) for d in range(4)) + (
        _branch("b.0.attn1", "self_attention", 0),
        _branch("b.3.ff_joint", MLP, 3, tokens=None),  # no valid partial form
    )
    policy.setup(branches)
    for step in range(3):
        plan = policy.plan(StepContext(step=step, num_steps=10, timestep=None, generation=0, branches=branches))
    # Step 2 is token-wise (full steps: 0, 3, 6, 9). f_step = 1.4 - 0.8 * 0.2 = 1.24.
    counts = {b: len(t) for b, t in plan.partial.items()}
    # depth 0: 0.1 * 1.24 * 1.8 * 2.5 = 0.558 -> int(8.93) = 8; depth 1: 0.392 -> 6;
    # depth 2: 0.1 * 1.24 * (1.8 - 3.2/3) * 2.5 = 0.227 -> 3; depth 3: 0.062 -> 0: reused.
    assert counts == {"b.0.ff": 8, "b.1.ff": 6, "b.2.ff": 3}
    assert plan.reuse == frozenset({"b.3.ff", "b.0.attn1"})
    assert "b.3.ff_joint" not in plan.partial and "b.3.ff_joint" not in plan.reuse  # computes fully
    full = policy.plan(StepContext(step=3, num_steps=10, timestep=None, generation=0, branches=branches))
    assert full == Plan.compute_all() and not full.partial
    with pytest.raises(PolicyError, match="num_steps"):
        Live(ax.ToCa()).plan(StepContext(step=1, num_steps=None, timestep=None, generation=0, branches=branches))


def test_toca_scores_cache_age_and_spatial_bonus(caplog):
    policy = Live(ax.ToCa(ratio=0.1, age_weight=0.25, interval=3, spatial_grid=2, spatial_bonus=0.5))
    ff = _branch("b.0.ff", MLP, 0, tokens=16)
    ctx = StepContext(step=0, num_steps=10, timestep=None, generation=0, branches=(ff,), frames=1)
    policy.plan(ctx)
    residual = torch.ones(2, 16, 4)
    residual[:, 5] *= 3.0  # the largest norm: score 1 after min-max normalisation
    residual[:, 0] *= 2.0  # 0.5
    policy.observe(ctx, ff, (residual,), None)
    scores = policy.scores(ff, policy.state)
    # Norm term: token 5 -> 1, token 0 -> 0.5, others 0. Ages all 0. Spatial bonus +0.5 to the top of
    # each 2x2 cell of the 4x4 grid: cells {0,1,4,5} -> 5, {2,3,6,7} -> 2 (ties: first), {8,9,12,13} -> 8,
    # {10,11,14,15} -> 10.
    expected = torch.zeros(16)
    expected[5], expected[0] = 1.5, 0.5
    expected[2] = expected[8] = expected[10] = 0.5
    torch.testing.assert_close(scores, expected)
    # Two tokens chosen: 5 and then the lowest index among the 0.5 ties (0). Their age resets.
    assert policy.choose(ff, 2, policy.state).tolist() == [0, 5]
    aged = policy.scores(ff, policy.state) - scores  # everyone else is one step older: + 0.25 * 1 / 3
    assert aged[0].item() == pytest.approx(0.0) and aged[5].item() == pytest.approx(0.0)
    assert aged[1].item() == pytest.approx(0.25 / 3)
    # The grid layout: square frames only.
    assert grid_layout(32, 2, 2) == (2, 4) and grid_layout(24, 1, 2) is None and grid_layout(3, 3, 2) is None
    assert spatial_bonus(torch.arange(4.0), 1, 2, 2, 1.0).tolist() == [0.0, 1.0, 2.0, 4.0]
    assert top_tokens(torch.tensor([0.1, 0.9, 0.5, 0.9]), 2).tolist() == [1, 3]
    # Scores that need an attention map say so and fall back.
    with caplog.at_level(logging.WARNING, logger="adacache_fx"):
        mapped = ax.ToCa(score="attention")
        mapped.validate((ff,))
    assert mapped.effective_score == "norm"
    assert any("needs the attention map" in r.getMessage() for r in caplog.records)


# -- both policies on real architectures ----------------------------------------------------------------
ARCHITECTURES = ["pixart", "latte", "wan", "flux", "dit", "cogvideox"]
POLICIES = {
    "duca": lambda: ax.DuCa(ratio=0.5),
    "toca": lambda: ax.ToCa(ratio=0.2),
}
FLOPS_TABLE: dict = {}


def _mlp_only(branch: BranchInfo) -> bool:
    return branch.tags == frozenset({MLP})


@pytest.mark.parametrize("policy_name", sorted(POLICIES))
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_token_wise_policies_on_real_architectures_save_flops_per_step_kind(name, policy_name):
    entry = ZOO[name]
    reference = entry.build()
    model = entry.build()
    model.load_state_dict(reference.state_dict())
    settings = POLICIES[policy_name]()
    plans: list[tuple[str, Plan]] = []

    class Recording(type(settings)):  # policies are frozen: record each step's kind and plan in a subclass
        def plan(self, ctx: StepContext, state) -> Plan:
            if policy_name == "duca":
                kind = self.step_kind(ctx, state)
            else:
                kind = "full" if self.is_full_step(ctx) else "token-wise"
            plans.append((kind, super().plan(ctx, state)))
            return plans[-1][1]

    policy = Recording(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(settings) if f.init})
    ax.transform(model, policy)
    full = _call_flops(reference, entry.inputs(timestep=500.0, batch=BATCH))
    measured = []
    with torch.no_grad(), ax.generation(model, num_steps=STEPS):
        for i in range(STEPS):
            inputs = entry.inputs(timestep=999.0 - 99.0 * i, batch=BATCH)
            if i == 0:
                model(**inputs)  # captures; its FLOPs include capture work
                measured.append(None)
            else:
                measured.append(_call_flops(model, inputs))
    report = ax.report(model)
    branches = {b.id: b for b in report.branches}
    kinds: dict[str, list[float]] = {}
    shares: list[tuple[float, float]] = []
    checked_partial = 0
    for record, (kind, plan), flops in zip(report.steps, plans, measured):
        if flops is None:
            continue
        kinds.setdefault(kind, []).append(flops / full)
        saved, claimed = full - flops, record.flops_total - record.flops_computed
        if kind == "full":
            assert saved == 0 and claimed == 0
            continue
        # What the report says was skipped is what FlopCounterMode sees skipped.
        if record.reused:
            assert claimed <= saved <= 1.1 * claimed, (record, saved, claimed)
        else:
            assert saved == claimed
        # Partly recomputed pure MLPs cost exactly k/N of their FLOPs: the rest of the computed FLOPs
        # are branches computed fully and partial regions holding attention (query side only).
        mlp_partial = sum(
            branches[b].flops * len(t) // branches[b].tokens for b, t in plan.partial.items() if _mlp_only(branches[b])
        )
        computed_fully = sum(
            b.flops for b in branches.values() if b.id not in plan.reuse and b.id not in plan.partial
        )
        other_partial = [b for b in plan.partial if not _mlp_only(branches[b])]
        if plan.partial:  # cost of the partial branches vs their share of tokens, for the table
            partial_total = sum(branches[b].flops for b in plan.partial)
            shares.append(((record.flops_computed - computed_fully) / partial_total,
                           sum(branches[b].flops * len(t) / branches[b].tokens for b, t in plan.partial.items())
                           / partial_total))
        if not other_partial:
            assert record.flops_computed == mlp_partial + computed_fully, (record, mlp_partial, computed_fully)
        else:  # Flux single blocks: between k/N of the branch and all of it (keys/values stay whole)
            low = mlp_partial + computed_fully + sum(
                branches[b].flops * len(plan.partial[b]) // branches[b].tokens for b in other_partial)
            high = mlp_partial + computed_fully + sum(branches[b].flops for b in other_partial)
            assert low < record.flops_computed < high
        checked_partial += bool(plan.partial)
    if name != "cogvideox":
        assert checked_partial > 0, report.plans()
        assert min(kinds.get("conservative", kinds.get("token-wise"))) < 1.0
    else:  # no branch of CogVideoX has a valid partial form: its MLPs compute fully, attention reuses
        assert checked_partial == 0 and all(s.partial == 0 for s in report.steps)
    FLOPS_TABLE[(name, policy_name)] = {k: sum(v) / len(v) for k, v in kinds.items()}
    print(f"\n{name:10s} {policy_name}: measured FLOPs / full model, mean per step kind: "
          + ", ".join(f"{k} {v:.3f}" for k, v in sorted(FLOPS_TABLE[(name, policy_name)].items()))
          + (f"; partial branches cost {sum(m for m, _ in shares) / len(shares):.3f} of their FLOPs for "
             f"{sum(e for _, e in shares) / len(shares):.3f} of their tokens" if shares else ""))


@pytest.mark.parametrize("name", ["pixart", "wan", "flux"])
@pytest.mark.parametrize("policy", [lambda: ax.DuCa(interval=1), lambda: ax.ToCa(interval=1)], ids=["duca", "toca"])
def test_a_policy_that_never_reuses_gives_the_original_outputs_exactly(name, policy):
    entry = ZOO[name]
    reference = entry.build()
    model = entry.build()
    model.load_state_dict(reference.state_dict())
    ax.transform(model, policy())
    with torch.no_grad(), ax.generation(model, num_steps=5):
        for i in range(5):
            inputs = entry.inputs(timestep=999.0 - 200.0 * i, batch=BATCH)
            assert torch.equal(entry.output(model(**inputs)), entry.output(reference(**inputs)))
    assert ax.report(model).compute_fraction == 1.0
