"""AdaCache policy: schedules derived by hand from residuals whose relative change is set exactly.

Residuals are +-1 vectors: one with the first ``cum`` entries flipped to -1. Two such vectors of
length M with ``a`` and ``b`` flips differ by ``2|a - b| / M`` in relative L1, exactly, so every metric
value below is a dyadic number and each schedule can be traced on paper. No model is needed: the tests
drive setup/plan/observe the way the runtime does (observe after a watched branch computes, with the
residual stored at that branch's previous compute step in the same call slot).
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from adacache_fx.errors import PolicyError
from adacache_fx.policies.adacache import (
    FAST_100,
    FAST_30,
    SLOW_30,
    AdaCache,
    MoReg,
    derive_codebook,
    frame_view,
    lookup_rate,
    motion_magnitude,
    relative_distance,
)
from adacache_fx.policies.base import BranchInfo, StepContext
from policy_driver import Live

M = 1024  # length of the flip vectors: relative L1 between cum a and cum b is 2|a-b|/1024
T, F = True, False


def _branch(depth: int, kind: str, name: str = "attn", tags: frozenset[str] | None = None) -> BranchInfo:
    block = f"blocks.{depth}"
    return BranchInfo(
        id=f"{block}.{name}", block=block, block_list="blocks", block_index=depth, depth=depth, name=name,
        kind=kind, tags=frozenset({kind}) if tags is None else tags, flops=100, num_residuals=1,
    )


def _ctx(step: int, branches: tuple[BranchInfo, ...], num_steps: int | None, frames: int | None = None) -> StepContext:
    return StepContext(step=step, num_steps=num_steps, timestep=None, generation=0, branches=branches, frames=frames)


def _flips(cum: int, length: int = M) -> torch.Tensor:
    assert 0 <= cum <= length
    v = torch.ones(length)
    v[:cum] = -1.0
    return v


def _cumulative(increments: dict[int, int], steps: int) -> list[int]:
    """cum[t] = sum of the per-step increments up to t (increments keyed by step, default 0)."""
    out, total = [], 0
    for t in range(steps):
        total += increments.get(t, 0) if t > 0 else 0
        out.append(total)
    return out


Residual = Callable[[int, BranchInfo, int], tuple[torch.Tensor, ...]]


def _drive(
    policy: AdaCache | Live,
    branches: tuple[BranchInfo, ...],
    residual: Residual,
    steps: int,
    num_steps: int | None,
    frames: int | None = None,
    slots: int = 1,
) -> list[frozenset[str]]:
    """Run ``steps`` steps like the runtime; return each step's planned reuse set.

    ``policy``: a settings object (driven with a fresh state) or a :class:`Live` (its state kept)."""
    if not isinstance(policy, Live):
        policy = Live(policy)
    policy.setup(branches)
    store: dict[tuple[int, str], tuple[torch.Tensor, ...]] = {}
    plans = []
    for t in range(steps):
        ctx = _ctx(t, branches, num_steps, frames)
        reuse = policy.plan(ctx).reuse
        plans.append(reuse)
        for slot in range(slots):
            for b in branches:
                if b.id in reuse and (slot, b.id) in store:
                    continue
                new = residual(t, b, slot)
                if policy.watches(b):
                    policy.observe(ctx, b, new, store.get((slot, b.id)))
                if policy.caches(b):
                    store[(slot, b.id)] = new
    return plans


def _computes(plans: list[frozenset[str]], branch_id: str) -> list[bool]:
    return [branch_id not in reuse for reuse in plans]


# -- codebook lookup, division by the rate, forced steps ------------------------------------------------
def test_lookup_takes_the_first_threshold_strictly_above_and_the_last_entry_catches_the_rest():
    codebook = ((0.05, 3), (0.15, 2), (1.0, 1))
    assert lookup_rate(codebook, 0.0) == 3
    assert lookup_rate(codebook, 0.05) == 2  # "below" is strict
    assert lookup_rate(codebook, 0.1499) == 2
    assert lookup_rate(codebook, 0.15) == 1
    assert lookup_rate(codebook, 7.0) == 1  # beyond the last threshold


RAMP = {**{t: 16 for t in range(1, 6)}, **{t: 64 for t in range(6, 10)}, **{t: 128 for t in range(10, 14)}}


def test_schedule_follows_the_codebook_with_the_metric_divided_by_the_rate_in_use():
    temporal, mlp, other = _branch(0, "temporal_attention"), _branch(0, "mlp", "ff"), _branch(1, "self_attention")
    branches = (temporal, mlp, other)
    cum = _cumulative(RAMP, 14)
    policy = AdaCache(codebook=((0.05, 3), (0.15, 2), (1.0, 1)))
    plans = _drive(policy, branches, lambda t, b, s: (_flips(cum[t]),), 14, num_steps=14)
    # step 1: 32/1024 = 0.03125 -> rate 3; step 4: 3*32/1024 / 3 = 0.03125 -> 3 (0.094 undivided -> 2);
    # step 7: 288/1024 / 3 = 0.094 -> 2; step 9: 256/1024 / 2 = 0.125 -> 2; step 11: 0.5 / 2 -> 1.
    expected = [T, T, F, F, T, F, F, T, F, T, F, T, T, T]
    assert _computes(plans, temporal.id) == expected
    # one schedule for the whole DiT: every branch follows it
    assert _computes(plans, mlp.id) == expected
    assert _computes(plans, other.id) == expected


def test_first_two_and_last_two_steps_always_compute():
    branches = (_branch(0, "temporal_attention"),)
    constant = lambda t, b, s: (_flips(0),)  # noqa: E731 - metric 0: the longest rate every time
    codebook = ((0.05, 4), (1.0, 1))
    plans = _drive(AdaCache(codebook=codebook), branches, constant, 10, num_steps=10)
    assert _computes(plans, branches[0].id) == [T, T, F, F, F, T, F, F, T, T]
    # the step count from the policy when the runtime does not know it
    plans = _drive(AdaCache(codebook=codebook, num_steps=10), branches, constant, 10, num_steps=None)
    assert _computes(plans, branches[0].id) == [T, T, F, F, F, T, F, F, T, T]
    # neither knows it: no forced end
    plans = _drive(AdaCache(codebook=codebook), branches, constant, 10, num_steps=None)
    assert _computes(plans, branches[0].id) == [T, T, F, F, F, T, F, F, F, T]
    # step 1 computes even if step 0 saw a stale previous residual (metric 0 -> rate 50)
    policy = Live(AdaCache(codebook=((1.0, 50),)))
    policy.setup(branches)
    policy.plan(_ctx(0, branches, 6))
    policy.observe(_ctx(0, branches, 6), branches[0], (_flips(0),), (_flips(0),))
    assert policy.plan(_ctx(1, branches, 6)).reuse == frozenset()
    # a huge first rate does not skip step 1: the rate starts at 1
    plans = _drive(AdaCache(codebook=((1.0, 50),)), branches, constant, 6, num_steps=6)
    assert _computes(plans, branches[0].id) == [T, T, F, F, T, T]


def test_observation_without_previous_residual_leaves_the_rate_unchanged():
    branch = _branch(0, "temporal_attention")
    policy = Live(AdaCache(codebook=((0.05, 4), (1.0, 1))))
    policy.setup((branch,))
    assert policy.plan(_ctx(0, (branch,), 20)).reuse == frozenset()
    policy.observe(_ctx(0, (branch,), 20), branch, (_flips(0),), None)
    assert policy.plan(_ctx(1, (branch,), 20)).reuse == frozenset()
    policy.observe(_ctx(1, (branch,), 20), branch, (_flips(0),), None)  # no previous: no metric
    assert policy.plan(_ctx(2, (branch,), 20)).reuse == frozenset()  # still rate 1


# -- several metric blocks, per-layer schedules, cond/uncond ------------------------------------------------
def _slopes(per_branch: dict[str, int], steps: int = 10) -> Residual:
    cums = {bid: _cumulative({t: inc for t in range(1, steps)}, steps) for bid, inc in per_branch.items()}
    return lambda t, b, s: (_flips(cums.get(b.id, [0] * steps)[t]),)


CB = ((0.05, 4), (0.15, 2), (1.0, 1))  # 16 flips/step -> 0.03125 -> 4; 64 -> 0.125 -> 2; 96 -> 0.1875 -> 1


def test_several_metric_blocks_are_averaged():
    branches = tuple(_branch(d, "temporal_attention") for d in range(3))
    residual = _slopes({branches[0].id: 8, branches[1].id: 0, branches[2].id: 96})
    policy = Live(AdaCache(codebook=CB, metric_blocks=(0, 2)))
    plans = _drive(policy, branches, residual, 10, num_steps=10)
    assert policy.state.metric_branches == {branches[0].id, branches[2].id}
    assert [policy.watches(b) for b in branches] == [T, F, T]
    # (0.015625 + 0.1875) / 2 = 0.1016 -> rate 2 (block 0 alone: rate 4; block 2 alone: rate 1)
    assert _computes(plans, branches[1].id) == [T, T, F, T, F, T, F, T, T, T]
    alone = _drive(AdaCache(codebook=CB, metric_blocks=0), branches, residual, 10, num_steps=10)
    assert _computes(alone, branches[1].id) == [T, T, F, F, F, T, F, F, T, T]


def test_default_metric_block_is_the_middle_one_of_the_metric_kind():
    # Latte-like: spatial blocks at even depths, temporal blocks at odd depths 1, 3, 5, 7, 9
    branches = tuple(
        _branch(d, "temporal_attention" if d % 2 else "self_attention") for d in range(10)
    ) + (_branch(4, "mlp", "ff"),)
    policy = AdaCache()
    assert policy.layout(branches).global_ids == {"blocks.5.attn"}
    live = Live(policy)
    live.setup(branches)
    live.plan(_ctx(0, branches, None))  # the runtime's first plan derives the layout into the state
    assert live.state.metric_branches == {"blocks.5.attn"}
    assert [b.id for b in branches if live.watches(b)] == ["blocks.5.attn"]
    four = AdaCache()
    assert four.layout(tuple(_branch(d, "temporal_attention") for d in range(4))).global_ids == {
        "blocks.1.attn"
    }  # (4 - 1) // 2, as block 13 of 28
    # fallbacks: self attention, then joint attention (also when only a tag says so)
    image = AdaCache()
    image_branches = (_branch(0, "self_attention"), _branch(0, "cross_attention", "attn2"), _branch(0, "mlp", "ff"))
    assert image.layout(image_branches).global_ids == {"blocks.0.attn"}
    flux = AdaCache()
    flux_branches = (_branch(0, "mlp", "ff"), _branch(1, "mlp", "attn+proj_mlp", frozenset({"joint_attention", "mlp"})))
    assert flux.layout(flux_branches).global_ids == {"blocks.1.attn+proj_mlp"}


def test_per_layer_schedules_and_blocks_without_the_kind_follow_the_global_one():
    t0, s1, t2 = _branch(0, "temporal_attention"), _branch(1, "self_attention"), _branch(2, "temporal_attention")
    t2_mlp = _branch(2, "mlp", "ff")
    branches = (t0, s1, t2, t2_mlp)
    residual = _slopes({t0.id: 16, t2.id: 64, s1.id: 96})
    policy = AdaCache(codebook=CB, per_layer=True)
    plans = _drive(policy, branches, residual, 10, num_steps=10)
    global_schedule = [T, T, F, F, F, T, F, F, T, T]  # t0 (default: middle of depths 0, 2 -> 0), rate 4
    own_t2 = [T, T, F, T, F, T, F, T, T, T]  # rate 2
    assert _computes(plans, t0.id) == global_schedule
    assert _computes(plans, s1.id) == global_schedule  # no temporal branch: global schedule
    assert _computes(plans, t2.id) == own_t2
    assert _computes(plans, t2_mlp.id) == own_t2  # the whole block follows its schedule
    shared = _drive(AdaCache(codebook=CB), branches, residual, 10, num_steps=10)
    assert _computes(shared, t2.id) == global_schedule


def test_cond_and_uncond_calls_of_one_step_are_averaged():
    branch = _branch(0, "temporal_attention")
    cums = {0: _cumulative({t: 8 for t in range(1, 10)}, 10), 1: _cumulative({t: 96 for t in range(1, 10)}, 10)}
    residual = lambda t, b, slot: (_flips(cums[slot][t]),)  # noqa: E731
    plans = _drive(AdaCache(codebook=CB), (branch,), residual, 10, num_steps=10, slots=2)
    assert _computes(plans, branch.id) == [T, T, F, T, F, T, F, T, T, T]  # mean 0.1016 -> rate 2
    cond_only = _drive(AdaCache(codebook=CB), (branch,), residual, 10, num_steps=10, slots=1)
    assert _computes(cond_only, branch.id) == [T, T, F, F, F, T, F, F, T, T]


# -- distances ---------------------------------------------------------------------------------------
def test_distance_options_on_hand_values():
    p = torch.ones(4)
    n = torch.tensor([3.0, 1.0, 1.0, 1.0])
    assert relative_distance((n,), (p,), "l1").item() == pytest.approx(0.5)  # 2 / 4
    assert relative_distance((n,), (p,), "l2").item() == pytest.approx(1.0)  # 2 / 2
    assert relative_distance((-p,), (p,), "cosine").item() == pytest.approx(2.0)
    assert relative_distance((torch.tensor([1.0, -1.0, 1.0, -1.0]),), (p,), "cosine").item() == pytest.approx(1.0)
    # several residuals count as one concatenated vector: (2 + 0) / (4 + 4)
    assert relative_distance((n, p), (p, p), "l1").item() == pytest.approx(0.25)
    # float32 even for half inputs, and a tensor (no sync inside observe)
    out = relative_distance((n.half(),), (p.half(),))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.ndim == 0


def test_l2_distance_changes_the_schedule():
    branch = _branch(0, "temporal_attention")
    cum = _cumulative({t: 16 for t in range(1, 10)}, 10)
    residual = lambda t, b, s: (_flips(cum[t]),)  # noqa: E731
    # per step: l1 = 32/1024 = 0.03125 -> 4; l2 = sqrt(4*16)/sqrt(1024) = 0.25 -> 1
    l1 = _drive(AdaCache(codebook=CB), (branch,), residual, 10, num_steps=10)
    l2 = _drive(AdaCache(codebook=CB, distance="l2"), (branch,), residual, 10, num_steps=10)
    assert _computes(l1, branch.id) == [T, T, F, F, F, T, F, F, T, T]
    assert _computes(l2, branch.id) == [T] * 10


# -- MoReg ------------------------------------------------------------------------------------------------
def _video(cum: int, motion: int) -> torch.Tensor:
    """(B*S, T, C) = (1, 4, 512): channels 0..255 differ by ``motion`` entries between neighbouring
    frames (relative motion motion/512); channels 256..511 carry ``cum`` flips, equal in all frames."""
    frames = []
    for f in range(4):
        a = torch.ones(256)
        if f % 2:
            a[:motion] = -1.0
        frames.append(torch.cat([a, _flips(cum, 256)]))
    return torch.stack(frames)[None]


def test_moreg_factor_code_and_paper_variants():
    code = MoReg()
    m = (0.25 / 0.385) ** 8
    factor, m_prev = code.factor(0.25, None, 3)  # previous factor starts at 1
    assert m_prev == pytest.approx(m)
    assert factor == pytest.approx(m + 10 * abs(m - 1.0) / 3)
    assert code.factor(None, m, 2) == pytest.approx((1.0 + 10 * (1.0 - m) / 2, 1.0))  # outside: m = 1
    paper = MoReg(variant="paper")
    assert paper.factor(0.25, None, 2) == (0.25, 0.25)
    assert paper.factor(0.5, 0.25, 2)[0] == pytest.approx(0.625)
    assert paper.factor(0.0, 0.9, 1)[0] == 0.0  # clamped
    assert paper.factor(None, 0.5, 1) == (1.0, None)


def test_moreg_window_defaults_to_the_code_and_scales():
    assert MoReg().window_steps(100) == (10, 90)
    assert MoReg().window_steps(30) == (4, 26)
    assert MoReg().window_steps(50) == (7, 43)  # fractions of 30 (the nearest), 4/30 and 26/30
    assert MoReg(window=(0.25, 0.75)).window_steps(12) == (3, 9)
    assert MoReg().applies(3, 30) and not MoReg().applies(2, 30)  # 0-based 3 is the 4th step
    assert MoReg().applies(25, 30) and not MoReg().applies(26, 30)
    assert MoReg().applies(0, None)


def test_moreg_code_variant_changes_the_schedule_by_hand():
    branch = _branch(0, "temporal_attention")
    cum = _cumulative({t: 4 for t in range(1, 12)}, 12)
    residual = lambda t, b, s: (_video(cum[t], 128),)  # noqa: E731 - metric 4/256/step, motion 0.25
    assert motion_magnitude(residual(0, branch, 0), 4).item() == pytest.approx(0.25)
    assert relative_distance(residual(1, branch, 0), residual(0, branch, 0)).item() == pytest.approx(4 / 256)
    codebook = ((0.04, 3), (0.2, 2), (1.0, 1))
    plain = _drive(AdaCache(codebook=codebook), (branch,), residual, 12, num_steps=12, frames=4)
    assert _computes(plain, branch.id) == [T, T, F, F, T, F, F, T, F, F, T, T]
    moreg = AdaCache(codebook=codebook, moreg=MoReg(window=(0.25, 0.75)))  # 0-based steps 2..8
    plans = _drive(moreg, (branch,), residual, 12, num_steps=12, frames=4)
    m = (0.25 / 0.385) ** 8  # 0.0316
    # step 1: outside the window, factor 1 -> 0.0156 -> rate 3
    # step 4: factor m + 10 (1 - m) / 3 = 3.26 -> 0.0509 -> rate 2
    assert 0.04 < 4 / 256 * (m + 10 * (1 - m) / 3) < 0.2
    # step 6: factor m + 0 = 0.0316 -> rate 3 -> step 9 (outside again), then the last two
    assert _computes(plans, branch.id) == [T, T, F, F, T, F, T, F, F, T, T, T]
    # MoReg(frames=...) overrides the model's frame count (3 frames would not map this residual)
    override = AdaCache(codebook=codebook, moreg=MoReg(window=(0.25, 0.75), frames=4))
    assert _computes(_drive(override, (branch,), residual, 12, num_steps=12, frames=3), branch.id) == \
        _computes(plans, branch.id)


def test_moreg_without_frames_names_both_ways_to_give_them():
    branch = _branch(0, "temporal_attention")
    policy = AdaCache(moreg=MoReg())
    with pytest.raises(PolicyError, match=r"StepContext\.frames.*MoReg\(frames="):
        _drive(policy, (branch,), lambda t, b, s: (_video(t, 128),), 4, num_steps=30, frames=None)


def _reference_motion(video: torch.Tensor, stride: int) -> float:
    """(B, T, S, C): frame-shifted relative L1 computed directly."""
    a, b = video[:, stride:], video[:, :-stride]
    return ((a - b).abs().sum() / (a.abs().sum() + b.abs().sum())).item()


@pytest.mark.parametrize("stride", [1, 2])
def test_frame_mapping_of_the_three_layouts(stride):
    B, Tn, S, C = 2, 4, 6, 5  # S = 6 is not a multiple of T = 4: the folded layout is unambiguous
    video = torch.randn(B, Tn, S, C)
    expected = _reference_motion(video, stride)
    temporal = video.permute(0, 2, 1, 3).reshape(B * S, Tn, C)  # (B*S, T, C)
    frame_major = video.reshape(B, Tn * S, C)  # (B, T*S, C)
    folded = video.reshape(B * Tn, S, C)  # (B*T, S, C)
    for layout, (axis, unit) in ((temporal, (1, 1)), (frame_major, (1, S)), (folded, (1, 1))):
        _, got_axis, got_unit = frame_view(layout, Tn)
        assert (got_axis, got_unit) == (axis, unit)
        assert motion_magnitude((layout,), Tn, stride).item() == pytest.approx(expected, rel=1e-5)
    assert frame_view(folded, Tn)[0].shape == (B, Tn, S, C)
    # a joint branch: the largest residual (the video stream) is measured
    assert motion_magnitude((torch.randn(B, 3, C), frame_major), Tn, stride).item() == pytest.approx(expected, rel=1e-5)
    # shifting by one token instead of one frame would give another value
    assert motion_magnitude((frame_major,), Tn * S, stride).item() != pytest.approx(expected, rel=1e-3)


def test_frame_mapping_rejects_an_unmappable_shape():
    with pytest.raises(PolicyError, match=r"\(3, 5, 8\).*4 frames"):
        frame_view(torch.zeros(3, 5, 8), 4)
    with pytest.raises(PolicyError, match="frame_stride"):
        motion_magnitude((torch.zeros(1, 4, 8),), 4, stride=4)


# -- validation --------------------------------------------------------------------------------------------
def test_validation_errors():
    with pytest.raises(PolicyError, match="unknown branch kind"):
        AdaCache(metric_kind="spatial_attention")
    with pytest.raises(PolicyError, match="does not have"):
        AdaCache(metric_kind="temporal_attention").validate((_branch(0, "self_attention"),))
    with pytest.raises(PolicyError, match=r"depth\(s\) \[7\].*\[0, 1\]"):
        AdaCache(metric_blocks=(0, 7)).validate((_branch(0, "temporal_attention"), _branch(1, "temporal_attention")))
    with pytest.raises(PolicyError, match="metric_kind"):
        AdaCache().validate((_branch(0, "mlp", "ff"), _branch(0, "cross_attention", "attn2")))
    with pytest.raises(ValueError, match="ascending"):
        AdaCache(codebook=((0.2, 2), (0.1, 3)))
    with pytest.raises(ValueError, match="rate"):
        AdaCache(codebook=((0.1, 0), (1.0, 1)))
    with pytest.raises(ValueError, match="distance"):
        AdaCache(distance="l3")
    with pytest.raises(ValueError, match="variant"):
        MoReg(variant="video")
    with pytest.raises(ValueError, match="window"):
        MoReg(window=(0.8, 0.2))
    assert AdaCache(codebook={0.1: 3, 1.0: 1}).codebook == ((0.1, 3), (1.0, 1))


# -- simulate ----------------------------------------------------------------------------------------------
def test_simulate_matches_the_hand_schedule_and_the_live_path():
    cum = _cumulative(RAMP, 14)
    policy = AdaCache(codebook=((0.05, 3), (0.15, 2), (1.0, 1)))
    assert policy.simulate([(_flips(c),) for c in cum], num_steps=14) == [T, T, F, F, T, F, F, T, F, T, F, T, T, T]


@pytest.mark.parametrize("moreg", [None, MoReg(), MoReg(variant="paper")])
def test_simulate_agrees_with_the_live_policy(moreg):
    generator = torch.Generator().manual_seed(3)
    steps = 30
    increments = torch.randint(0, 10, (steps,), generator=generator).tolist()
    motions = torch.randint(90, 130, (steps,), generator=generator).tolist()
    cum = _cumulative(dict(enumerate(increments)), steps)
    sequence = [(_video(cum[t], motions[t]),) for t in range(steps)]
    temporal, mlp = _branch(3, "temporal_attention"), _branch(3, "mlp", "ff")
    policy = AdaCache.fast(steps, moreg=moreg or False)
    live = _computes(_drive(policy, (temporal, mlp), lambda t, b, s: sequence[t], steps, steps, frames=4), temporal.id)
    simulated = policy.simulate(sequence, num_steps=steps, frames=4)
    assert simulated == live
    computed = [t for t, c in enumerate(live) if c]
    gaps = {later - earlier for earlier, later in zip(computed, computed[1:])}
    assert len(gaps) > 1 and len(computed) < steps  # the sequence exercises several rates


def test_with_threshold_scale_scales_every_threshold_and_fewer_steps_compute():
    policy = AdaCache.fast(30)
    scaled = policy.with_threshold_scale(2.0)
    assert scaled.codebook == tuple((2 * t, r) for t, r in FAST_30)
    assert policy.codebook == FAST_30  # a copy
    assert scaled.num_steps == 30 and scaled.moreg is None
    sequence = [(torch.full((8,), 1.1**t),) for t in range(30)]  # (1.1^k - 1) / k: 0.1 .. 0.13
    assert policy.simulate(sequence, 30) == [t in (0, 1, 6, 11, 16, 21, 26, 28, 29) for t in range(30)]  # rate 5
    assert scaled.simulate(sequence, 30) == [t in (0, 1, 7, 13, 19, 25, 28, 29) for t in range(30)]  # rate 6
    # the default codebook resolves by step count; the scale is carried until then
    default = AdaCache().with_threshold_scale(0.5)
    assert default.codebook is None
    assert default.codebook_for(30) == tuple((0.5 * t, r) for t, r in FAST_30)
    with pytest.raises(ValueError):
        policy.with_threshold_scale(0.0)


# -- presets -----------------------------------------------------------------------------------------------
def test_presets_use_the_published_codebooks():
    assert AdaCache.fast(30).codebook == ((0.08, 6), (0.16, 5), (0.24, 4), (0.32, 3), (0.40, 2), (1.00, 1))
    assert AdaCache.fast(100).codebook == ((0.03, 12), (0.05, 10), (0.07, 8), (0.09, 6), (0.11, 4), (1.00, 3))
    assert AdaCache.slow(30).codebook == ((0.08, 3), (0.16, 2), (0.24, 1), (0.32, 1), (0.40, 1), (1.00, 1))
    presets = (AdaCache.fast(30).codebook, AdaCache.fast(100).codebook, AdaCache.slow(30).codebook)
    assert presets == (FAST_30, FAST_100, SLOW_30)
    assert AdaCache.fast(30).num_steps == 30
    assert AdaCache.fast(30, moreg=True).moreg == MoReg()
    assert AdaCache.slow(30, moreg=MoReg(variant="paper")).moreg == MoReg(variant="paper")
    assert AdaCache.fast(30).moreg is None
    # the default policy: the code's default (100-step fast) when the step count is unknown
    assert AdaCache().codebook_for(None) == FAST_100
    assert AdaCache().codebook_for(30) == FAST_30


def test_presets_derive_other_step_counts():
    # 50 steps from 30: rates * 5/3 rounded down (>= 1), thresholds * 3/5
    assert AdaCache.fast(50).codebook == ((0.048, 10), (0.096, 8), (0.144, 6), (0.192, 5), (0.24, 3), (0.6, 1))
    assert AdaCache.slow(50).codebook == ((0.048, 5), (0.096, 3), (0.144, 1), (0.192, 1), (0.24, 1), (0.6, 1))
    # slow has no published 100-step codebook: from 30, rates * 10/3, thresholds * 0.3
    assert AdaCache.slow(100).codebook == ((0.024, 10), (0.048, 6), (0.072, 3), (0.096, 3), (0.12, 3), (0.3, 3))
    # 150 steps: from 100 (nearest on a log scale)
    assert AdaCache.fast(150).codebook == derive_codebook(FAST_100, 100, 150)
    assert AdaCache.fast(150).codebook[0] == (0.02, 18)
    assert AdaCache.fast(10).codebook == ((0.24, 2), (0.48, 1), (0.72, 1), (0.96, 1), (1.2, 1), (3.0, 1))
    with pytest.raises(ValueError):
        AdaCache.fast(0)


# -- generations -------------------------------------------------------------------------------------------
def test_reset_and_a_new_generation_start_the_schedule_over():
    branch = _branch(0, "temporal_attention")
    cum = _cumulative({t: 16 for t in range(1, 10)}, 10)
    residual = lambda t, b, s: (_flips(cum[t]),)  # noqa: E731
    policy = Live(AdaCache(codebook=CB))
    first = _drive(policy, (branch,), residual, 10, num_steps=10)
    policy.reset()
    assert _drive(policy, (branch,), residual, 10, num_steps=10) == first
    assert _drive(policy, (branch,), residual, 10, num_steps=10) == first  # step 0 again, no reset call
    assert _computes(first, branch.id) == [T, T, F, F, F, T, F, F, T, T]
