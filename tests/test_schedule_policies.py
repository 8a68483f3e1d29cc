"""Schedule policies (PAB, TeaCache, First-Block-Cache) against hand-derived schedules.

No model runs here: branches and step contexts are built by hand and plan()/decide() are called
directly, the way the runtime calls them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from adacache_fx.errors import PolicyError
from adacache_fx.policies.base import BranchInfo, Capabilities, InStepSignal, Plan, StepContext
from adacache_fx.policies.first_block import FirstBlockCache
from adacache_fx.policies.pab import PAB
from adacache_fx.policies.teacache import COEFFICIENT_TABLES, TeaCache, relative_l1
from policy_driver import Live


def branch(block: int, name: str, kind: str, tags: tuple[str, ...] = ()) -> BranchInfo:
    path = f"blocks.{block}"
    return BranchInfo(
        id=f"{path}.{name}",
        block=path,
        block_list="blocks",
        block_index=block,
        depth=block,
        name=name,
        kind=kind,
        tags=frozenset(tags or (kind,)),
        flops=None,
        num_residuals=1,
    )


# A video DiT-like stack: spatial, cross and temporal attention, MLPs, a joint block, and a Flux-like
# single block whose one region fuses joint attention and an MLP.
BRANCHES = (
    branch(0, "attn1", "self_attention"),
    branch(0, "attn2", "cross_attention"),
    branch(0, "ff", "mlp"),
    branch(1, "attn_temporal", "temporal_attention"),
    branch(1, "ff", "mlp"),
    branch(2, "attn", "joint_attention"),
    branch(2, "ff", "mlp"),
    branch(3, "attn+proj_mlp", "joint_attention", ("joint_attention", "mlp")),
    branch(4, "attn1", "self_attention"),
    branch(4, "ff", "mlp"),
)
SPATIAL = {"blocks.0.attn1", "blocks.2.attn", "blocks.4.attn1"}
TEMPORAL = {"blocks.1.attn_temporal"}
CROSS = {"blocks.0.attn2"}
NEVER = {"blocks.0.ff", "blocks.1.ff", "blocks.2.ff", "blocks.3.attn+proj_mlp", "blocks.4.ff"}
ALL_IDS = {b.id for b in BRANCHES}


def ctx(step: int, num_steps: int | None = 12, timestep: float | None = None, generation: int = 0,
        branches: tuple[BranchInfo, ...] = BRANCHES) -> StepContext:
    return StepContext(step=step, num_steps=num_steps, timestep=timestep, generation=generation,
                       branches=branches)


def reuse_per_step(policy: PAB, num_steps: int, timesteps=None) -> list[set[str]]:
    live = Live(policy)
    return [
        set(live.plan(ctx(s, num_steps, None if timesteps is None else timesteps[s])).reuse)
        for s in range(num_steps)
    ]


def expected_pab(index: int | None, spatial=2, temporal=4, cross=6) -> set[str]:
    """Hand rule: inside the window, kind with range g reuses unless index % g == 0."""
    if index is None:
        return set()
    out = set()
    for ids, g in ((SPATIAL, spatial), (TEMPORAL, temporal), (CROSS, cross)):
        if g is not None and index % g != 0:
            out |= ids
    return out


# -- PAB ------------------------------------------------------------------------------------------
def test_pab_window_steps_schedule_per_kind():
    # Counted from the generation's first step (the authors' code and diffusers' hook count calls).
    plans = reuse_per_step(PAB(window_steps=(2, 10)), 12)
    assert plans == [expected_pab(s if 2 <= s < 10 else None) for s in range(12)]
    assert plans[2] == TEMPORAL | CROSS  # the window's first step may reuse the last computed residual
    # restart_in_window: the count restarts where the window opens.
    plans = reuse_per_step(PAB(window_steps=(2, 10), restart_in_window=True), 12)
    # Written out for steps 2..9 (window index 0..7): spatial reuses at odd indices, temporal
    # except 0 and 4, cross except 0 and 6.
    expected = [
        set(), set(),                      # before the window
        set(),                             # index 0: everything computes
        SPATIAL | TEMPORAL | CROSS,        # 1
        TEMPORAL | CROSS,                  # 2
        SPATIAL | TEMPORAL | CROSS,        # 3
        CROSS,                             # 4
        SPATIAL | TEMPORAL | CROSS,        # 5
        TEMPORAL,                          # 6
        SPATIAL | TEMPORAL | CROSS,        # 7
        set(), set(),                      # after the window
    ]
    assert plans == expected
    assert all(not (p & NEVER) for p in plans)


def test_pab_timestep_window_is_exclusive_and_counts_steps():
    timesteps = [950, 850, 790, 700, 600, 500, 400, 300, 200, 100, 50]
    plans = reuse_per_step(PAB(), len(timesteps), timesteps)
    # 790 (step 2) is the first inside (100, 800); 100 (step 9) is outside: the ends are excluded.
    assert plans == [expected_pab(i) for i in [None, None, 2, 3, 4, 5, 6, 7, 8, None, None]]
    plans = reuse_per_step(PAB(restart_in_window=True), len(timesteps), timesteps)
    assert plans == [expected_pab(i) for i in [None, None, 0, 1, 2, 3, 4, 5, 6, None, None]]


def test_pab_normalised_timesteps_use_the_same_window():
    timesteps = [950, 850, 790, 700, 600, 500, 400, 300, 200, 100, 50]
    raw = reuse_per_step(PAB(), len(timesteps), timesteps)
    normalised = reuse_per_step(PAB(), len(timesteps), [t / 1000 for t in timesteps])
    assert normalised == raw
    assert any(raw)


def test_pab_window_count_restarts_each_generation():
    policy = Live(PAB(window_steps=(1, 6)))
    first = [set(policy.plan(ctx(s, 6, generation=0)).reuse) for s in range(6)]
    policy.reset()
    second = [set(policy.plan(ctx(s, 6, generation=1)).reuse) for s in range(6)]
    assert first == second == [expected_pab(i) for i in (None, 1, 2, 3, 4, 5)]
    policy = Live(PAB(window_steps=(1, 6), restart_in_window=True))
    first = [set(policy.plan(ctx(s, 6, generation=0)).reuse) for s in range(6)]
    policy.reset()
    second = [set(policy.plan(ctx(s, 6, generation=1)).reuse) for s in range(6)]
    assert first == second == [expected_pab(i) for i in (None, 0, 1, 2, 3, 4)]


def test_pab_custom_ranges_and_disabled_kind():
    policy = PAB(spatial=3, temporal=None, cross=2, window_steps=(0, 7))
    plans = reuse_per_step(policy, 7)
    assert plans == [expected_pab(i, spatial=3, temporal=None, cross=2) for i in range(7)]
    assert not any(p & TEMPORAL for p in plans)
    assert {b.id for b in BRANCHES if policy.caches(b)} == SPATIAL | CROSS


def test_pab_never_caches_mlps_or_mlp_regions():
    policy = PAB()
    assert {b.id for b in BRANCHES if not policy.caches(b)} == NEVER
    assert policy.broadcast_ranges(BRANCHES[7]) is None  # fused attention+MLP region


def test_pab_region_with_two_attention_kinds_reuses_only_when_both_would():
    fused = branch(0, "attn", "self_attention", ("self_attention", "cross_attention"))
    policy = PAB(spatial=2, cross=3, window_steps=(0, 7))
    assert policy.broadcast_ranges(fused) == (2, 3)
    live = Live(policy)
    reused = [fused.id in live.plan(ctx(s, 7, branches=(fused,))).reuse for s in range(7)]
    assert reused == [False, True, False, False, False, True, False]


def test_pab_errors():
    with pytest.raises(ValueError, match="spatial=0"):
        PAB(spatial=0)
    with pytest.raises(ValueError, match="cross=2.5"):
        PAB(cross=2.5)
    with pytest.raises(ValueError, match="temporal=True"):
        PAB(temporal=True)
    with pytest.raises(ValueError, match="all None"):
        PAB(spatial=None, temporal=None, cross=None)
    with pytest.raises(ValueError, match="low < high"):
        PAB(window=(800, 100))
    with pytest.raises(ValueError, match="window_steps"):
        PAB(window_steps=(5, 5))
    with pytest.raises(ValueError, match="window_steps"):
        PAB(window_steps=(-1, 5))
    with pytest.raises(PolicyError, match="window_steps"):
        Live(PAB()).plan(ctx(0, timestep=None))
    only_mlp = (branch(0, "ff", "mlp"), branch(1, "attn+mlp", "joint_attention", ("joint_attention", "mlp")))
    with pytest.raises(PolicyError, match="no attention branch"):
        PAB().validate(only_mlp)
    with pytest.raises(PolicyError, match="cross_attention, mlp, self_attention"):
        PAB(spatial=None, cross=None).validate(BRANCHES[:3])
    PAB().validate(BRANCHES)  # a model with attention is fine


# -- TeaCache -------------------------------------------------------------------------------------
def drifting_inputs(deltas: list[float], shape=(2, 4, 8)) -> list[torch.Tensor]:
    """Inputs whose relative L1 to the previous one is deltas[i] (up to float32 rounding)."""
    x = torch.full(shape, 0.5)
    out = [x]
    for d in deltas[1:]:
        x = x * (1 + d)
        out.append(x)
    return out


def run_teacache(policy: Live, inputs, num_steps, slot: int = 0, generation: int = 0) -> list[bool]:
    flags = []
    for step, x in enumerate(inputs):
        plan = policy.decide(ctx(step, num_steps, generation=generation), slot, x)
        assert plan.reuse in (frozenset(), frozenset(ALL_IDS))  # all or nothing
        flags.append(not plan.reuse)
    return flags


DELTAS = [0.0, 0.125, 0.0625, 0.125, 0.125, 0.0625, 0.25, 0.0625]


def test_teacache_accumulates_rescaled_indicator_and_resets():
    inputs = drifting_inputs(DELTAS)
    assert [relative_l1(b, a) for a, b in zip(inputs, inputs[1:])] == pytest.approx(DELTAS[1:], abs=1e-6)
    policy = Live(TeaCache(delta=0.5, coefficients=(0, 0, 0, 2, 0)))  # rescale(x) = 2x
    flags, accumulated = [], []
    for step, x in enumerate(inputs):
        flags.append(not policy.decide(ctx(step, 8), 0, x).reuse)
        accumulated.append(policy.state.accumulated(0))
    # step 0 forced; 0.25, 0.375 reuse; 0.625 >= 0.5 computes and resets; 0.25, 0.375 reuse;
    # 0.875 computes; step 7 is the last step: forced.
    assert flags == [True, False, False, True, False, False, True, True]
    assert accumulated == pytest.approx([0.0, 0.25, 0.375, 0.0, 0.25, 0.375, 0.0, 0.0], abs=1e-6)


def test_teacache_previous_input_moves_every_step():
    # Were the reference the last computed input, step 2 would see 1.125 * 1.0625 - 1 = 0.195 and
    # compute; the authors' rule compares with step 1's input (0.0625) and reuses.
    policy = Live(TeaCache(delta=0.5, coefficients=(0, 0, 0, 2, 0)))
    assert run_teacache(policy, drifting_inputs(DELTAS[:3]), None) == [True, False, False]
    assert policy.state.accumulated(0) == pytest.approx(0.375, abs=1e-6)


def test_teacache_last_step_forced_only_when_known():
    inputs = drifting_inputs([0.0, 0.0625, 0.0625, 0.0625])
    assert run_teacache(Live(TeaCache(delta=1.0)), inputs, 4) == [True, False, False, True]
    assert run_teacache(Live(TeaCache(delta=1.0)), inputs, None) == [True, False, False, False]


def test_teacache_polynomial_is_highest_degree_first():
    assert TeaCache(coefficients=(1, 0, 0, 0, 0)).rescale(0.5) == 0.0625
    assert TeaCache(coefficients=(0, 0, 0, 0, 1)).rescale(0.5) == 1.0
    assert TeaCache(coefficients=None).rescale(0.3) == 0.3
    flux = TeaCache(coefficients="flux")
    for x in (0.01, 0.07, 0.2):
        assert flux.rescale(x) == pytest.approx(np.polyval(COEFFICIENT_TABLES["flux"], x), rel=1e-12)


def test_teacache_named_tables():
    # The values in /work/shared/ALGORITHMS.md.
    open_sora = (217.546007, -118.329252, 26.8662585, -0.0459364272, 0.048442624)
    latte = (-2464.34137, 308.044764, 80.7447667, -4.11385132, 0.111001402)
    assert TeaCache(coefficients="Open-Sora")._poly == open_sora
    assert TeaCache(coefficients="latte")._poly == latte
    assert TeaCache(coefficients="open_sora")._poly == TeaCache(coefficients="opensora")._poly
    assert all(len(t) == 5 for t in COEFFICIENT_TABLES.values())
    with pytest.raises(PolicyError, match="calibrate"):
        TeaCache(coefficients="sdxl")
    with pytest.raises(ValueError, match="coefficients"):
        TeaCache(coefficients=[])
    with pytest.raises(ValueError, match="coefficients"):
        TeaCache(coefficients=[1.0, float("nan")])
    with pytest.raises(ValueError, match="delta"):
        TeaCache(delta=-0.1)


def test_teacache_presets_and_with_delta():
    assert (TeaCache.slow("latte").delta, TeaCache.fast("latte").delta) == (0.1, 0.2)
    assert TeaCache.fast("latte")._poly == COEFFICIENT_TABLES["latte"]
    policy = TeaCache(delta=0.5, coefficients=(0, 0, 0, 2, 0))
    run_teacache(Live(policy), drifting_inputs(DELTAS[:3]), None)
    copy = policy.with_delta(0.3)
    assert (copy.delta, policy.delta) == (0.3, 0.5)
    assert copy._poly == policy._poly and Live(copy).state.accumulated(0) == 0.0
    refit = policy.with_coefficients((1, 0))
    assert (refit._poly, refit.delta, policy._poly) == ((1.0, 0.0), 0.5, (0.0, 0.0, 0.0, 2.0, 0.0))
    assert TeaCache().in_step_signal() == InStepSignal("modulated_input")
    assert Capabilities.of(TeaCache()).decides_in_step


def test_teacache_slots_are_independent():
    policy = Live(TeaCache(delta=0.5, coefficients=(0, 0, 0, 2, 0)))
    slow, fast = drifting_inputs([0.0, 0.0625, 0.0625]), drifting_inputs([0.0, 0.5, 0.5])
    flags = {0: [], 1: []}
    for step in range(3):
        for slot, inputs in ((0, slow), (1, fast)):
            flags[slot].append(not policy.decide(ctx(step, None), slot, inputs[step]).reuse)
    assert flags == {0: [True, False, False], 1: [True, True, True]}


def test_teacache_shape_change_computes():
    policy = Live(TeaCache(delta=10.0))
    policy.decide(ctx(0, None), 0, torch.ones(2, 4))
    assert policy.decide(ctx(1, None), 0, torch.ones(2, 4)).reuse  # unchanged input: reuse
    assert policy.decide(ctx(2, None), 0, torch.ones(3, 4)).reuse == frozenset()


def test_teacache_simulate_matches_live():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, generator=g)
    inputs = [x]
    for _ in range(19):
        x = x + 0.05 * torch.rand(()).item() * torch.randn(x.shape, generator=g)
        inputs.append(x)
    indicators = [0.0] + [relative_l1(b, a) for a, b in zip(inputs, inputs[1:])]
    for delta in (0.05, 0.1, 0.2, 0.4):
        policy = TeaCache(delta=delta, coefficients="latte")
        live = run_teacache(Live(policy.with_delta(delta)), inputs, 20)
        assert policy.simulate(indicators, 20) == live
    assert len(set(map(tuple, (TeaCache(delta=d, coefficients="latte").simulate(indicators, 20)
                               for d in (0.05, 0.4))))) == 2  # the sweep is not trivial
    with pytest.raises(ValueError, match="indicators"):
        TeaCache().simulate([0.0, 0.1], 3)


# -- First-Block-Cache -----------------------------------------------------------------------------
FBC_BRANCHES = tuple(
    b for d in range(5) for b in (branch(d, "attn", "self_attention"), branch(d, "ff", "mlp"))
)


def fbc_ctx(step: int, num_steps: int | None = None, generation: int = 0) -> StepContext:
    return ctx(step, num_steps, generation=generation, branches=FBC_BRANCHES)


def ids_at(*depths: int) -> frozenset[str]:
    return frozenset(b.id for b in FBC_BRANCHES if b.depth in depths)


def test_fbc_threshold_and_reference_moves_only_on_compute():
    policy = Live(FirstBlockCache(threshold=0.1, tail_blocks=1))
    ones = torch.ones(2, 8)
    residuals = [ones, ones * 1.05, ones * 1.12, ones * 1.12 * 1.05, ones * 1.12 * 1.2]
    plans = [policy.decide(fbc_ctx(s), 0, r) for s, r in enumerate(residuals)]
    # step 0: no reference -> compute. 1: 0.05 vs step 0 -> reuse. 2: 0.12 vs step 0 (not 0.067
    # vs step 1) -> compute. 3: 0.05 vs step 2 -> reuse. 4: 0.2 -> compute.
    middle = ids_at(1, 2, 3)  # depth 0 is the first block, depth 4 the tail
    assert [p.reuse for p in plans] == [frozenset(), middle, frozenset(), middle, frozenset()]


def test_fbc_blocks_and_tail_select_reused_depths():
    ones = torch.ones(4)
    for blocks, tail, depths in ((1, 0, (1, 2, 3, 4)), (2, 0, (2, 3, 4)), (2, 2, (2,)), (1, 3, (1,))):
        policy = Live(FirstBlockCache(blocks=blocks, tail_blocks=tail))
        policy.setup(FBC_BRANCHES)
        policy.decide(fbc_ctx(0), 0, ones)
        assert policy.decide(fbc_ctx(1), 0, ones).reuse == ids_at(*depths)
        assert {b.id for b in FBC_BRANCHES if policy.caches(b)} == ids_at(*depths)
        assert policy.in_step_signal() == InStepSignal("first_blocks_residual", blocks=blocks)


def test_fbc_slots_are_independent():
    policy = Live(FirstBlockCache(threshold=0.1))
    cond = [torch.ones(4), torch.ones(4) * 1.01, torch.ones(4) * 1.02]
    uncond = [torch.ones(4), torch.ones(4) * 1.5, torch.ones(4) * 1.51]
    flags = {0: [], 1: []}
    for step in range(3):
        for slot, seq in ((0, cond), (1, uncond)):
            flags[slot].append(not policy.decide(fbc_ctx(step), slot, seq[step]).reuse)
    assert flags == {0: [True, False, False], 1: [True, True, False]}
    # A slot's first call computes even when another slot already has a reference.
    fresh = Live(FirstBlockCache(threshold=0.1))
    fresh.decide(fbc_ctx(0), 0, torch.ones(4))
    assert fresh.decide(fbc_ctx(0), 1, torch.ones(4)).reuse == frozenset()


def test_fbc_warmup_and_cooldown_force_compute():
    same = torch.ones(4)
    policy = Live(FirstBlockCache(warmup=2, cooldown=2))
    flags = [not policy.decide(fbc_ctx(s, 7), 0, same).reuse for s in range(7)]
    assert flags == [True, True, False, False, False, True, True]
    no_count = Live(FirstBlockCache(cooldown=2))
    assert [not no_count.decide(fbc_ctx(s), 0, same).reuse for s in range(4)] == [True, False, False, False]


def test_fbc_new_generation_forgets_references():
    policy = Live(FirstBlockCache())
    policy.decide(fbc_ctx(0, generation=0), 0, torch.ones(4))
    assert policy.decide(fbc_ctx(1, generation=0), 0, torch.ones(4)).reuse
    assert policy.decide(fbc_ctx(0, generation=1), 0, torch.ones(4)).reuse == frozenset()
    policy.reset()
    assert policy.decide(fbc_ctx(1, generation=1), 0, torch.ones(4)).reuse == frozenset()


def test_fbc_simulate_matches_live():
    g = torch.Generator().manual_seed(1)
    r = torch.randn(2, 16, generator=g)
    residuals = [r]
    for _ in range(24):
        r = r + 0.04 * torch.randn(r.shape, generator=g)
        residuals.append(r)
    outcomes = set()
    for threshold in (0.03, 0.08, 0.15):
        policy = FirstBlockCache(threshold=threshold, warmup=1, cooldown=2)
        copy = Live(policy.with_threshold(threshold))
        live = [not copy.decide(fbc_ctx(s, 25), 0, x).reuse for s, x in enumerate(residuals)]
        simulated = policy.simulate(residuals, 25)
        assert simulated == live
        outcomes.add(tuple(simulated))
    assert len(outcomes) == 3  # thresholds give different schedules: the comparison is not vacuous
    with pytest.raises(ValueError, match="residuals"):
        FirstBlockCache().simulate(residuals, 3)


def test_fbc_with_threshold_is_a_fresh_copy():
    policy = FirstBlockCache(threshold=0.08, blocks=2, tail_blocks=1)
    Live(policy).decide(fbc_ctx(0), 0, torch.ones(4))
    copy = policy.with_threshold(0.2)
    assert (copy.threshold, copy.blocks, copy.tail_blocks, policy.threshold) == (0.2, 2, 1, 0.08)
    assert Live(copy).decide(fbc_ctx(1), 0, torch.ones(4)).reuse == frozenset()  # no reference carried over
    assert dataclasses.replace(policy) == policy


def test_fbc_errors():
    with pytest.raises(ValueError, match="blocks=0"):
        FirstBlockCache(blocks=0)
    with pytest.raises(ValueError, match="tail_blocks=-1"):
        FirstBlockCache(tail_blocks=-1)
    with pytest.raises(ValueError, match="threshold"):
        FirstBlockCache(threshold=-0.1)
    with pytest.raises(ValueError, match="warmup"):
        FirstBlockCache(warmup=1.5)
    with pytest.raises(PolicyError, match="5 blocks"):
        FirstBlockCache(blocks=3, tail_blocks=2).validate(FBC_BRANCHES)
    with pytest.raises(PolicyError, match="no block is left"):
        FirstBlockCache(blocks=5).validate(FBC_BRANCHES)
    FirstBlockCache(blocks=3, tail_blocks=1).validate(FBC_BRANCHES)


def test_relative_l1_edge_cases():
    assert relative_l1(torch.zeros(3), torch.zeros(3)) == 0.0
    assert relative_l1(torch.ones(3), torch.zeros(3)) == float("inf")
    assert relative_l1(torch.full((4,), 3.0, dtype=torch.bfloat16), torch.full((4,), 2.0)) == 0.5


def test_in_step_policies_plan_compute_all_at_step_start():
    for policy in (TeaCache(), FirstBlockCache()):
        assert Capabilities.of(policy).decides_in_step
        assert Live(policy).plan(ctx(3)) == Plan.compute_all()


@pytest.mark.parametrize("threshold", [0.0, 0.1])
@pytest.mark.parametrize("pair", ["both zero", "zero reference", "equal", "small change", "large change"])
def test_first_block_in_graph_rule_agrees_with_the_eager_rule(pair, threshold):
    # decide_in_graph is the traced form of advance(); they must agree on every input, including
    # the 0/0 case (an all-zero residual against an all-zero reference).
    reference = torch.linspace(-1, 1, 64).reshape(4, 16)
    residual = {"both zero": torch.zeros(4, 16), "zero reference": torch.ones(4, 16),
                "equal": reference.clone(), "small change": reference * 1.01,
                "large change": reference * 2.0}[pair]
    if pair in ("both zero", "zero reference"):
        reference = torch.zeros(4, 16)
    policy = FirstBlockCache(threshold=threshold)
    compute, _ = policy.advance(reference, residual, step=5, num_steps=30)
    reuse, state = policy.decide_in_graph(residual, reference, torch.tensor(True))
    assert bool(reuse) == (not compute)
    assert torch.equal(state, reference if bool(reuse) else residual)
    no_reuse, _ = policy.decide_in_graph(residual, reference, torch.tensor(False))
    assert not bool(no_reuse)
