"""MagCache: hand-derived schedules, diffusers' hook decisions on a real model, five architectures,
and calibration to a compute fraction on held-out inputs."""

from __future__ import annotations

import doctest
import warnings

import pytest
import torch

import adacache_fx as ax
from adacache_fx.errors import PolicyError
from adacache_fx.policies import magcache as magcache_module
from adacache_fx.policies.base import BranchInfo, Capabilities, StepContext
from adacache_fx.policies.magcache import (
    MAG_RATIOS,
    PRESETS,
    WAN_UNCOND_RATIOS,
    MagCache,
    magnitude_ratio,
    magnitude_ratios,
    model_residual,
    nearest_interp,
)
from adacache_lab.sampling import sample
from adacache_lab.zoo import ZOO, latte
from tests.conftest import held_out_fraction
from conftest import max_diff
from policy_driver import Live


def branch(block: int, name: str, kind: str) -> BranchInfo:
    return BranchInfo(id=f"blocks.{block}.{name}", block=f"blocks.{block}", block_list="blocks",
                      block_index=block, depth=block, name=name, kind=kind, tags=frozenset((kind,)),
                      flops=None, num_residuals=1)


BRANCHES = (branch(0, "attn1", "self_attention"), branch(0, "ff", "mlp"),
            branch(1, "attn1", "self_attention"), branch(1, "ff", "mlp"))
ALL_IDS = frozenset(b.id for b in BRANCHES)


def ctx(step: int, num_steps: int | None, generation: int = 0) -> StepContext:
    return StepContext(step=step, num_steps=num_steps, timestep=None, generation=generation,
                       branches=BRANCHES)


def live_flags(policy: MagCache, steps: int, num_steps: int | None) -> tuple[list[bool], Live]:
    live = Live(policy)
    flags = []
    for s in range(steps):
        plan = live.plan(ctx(s, num_steps))
        assert plan.reuse in (frozenset(), ALL_IDS)  # all or nothing: the whole stack's residual
        flags.append(not plan.reuse)
    return flags, live


# -- the rule on synthetic curves --------------------------------------------------------------------

def test_hand_derived_schedule_and_errors():
    # Defaults: threshold 0.06, K 3, retention int(0.2 * 6 + 0.5) = 1 step.
    # step 1: R = 1.0, E = 0 -> skip; step 2: R = 0.99, E = 0.01 -> skip;
    # step 3: R = 0.99 * 0.98 = 0.9702, E = 0.01 + 0.0298 = 0.0398 -> skip (3 <= K);
    # step 4: 4 steps > K -> compute, reset; step 5: R = 0.8, E = 0.2 > 0.06 -> compute.
    policy = MagCache(mag_ratios=(1.0, 1.0, 0.99, 0.98, 0.9, 0.8))
    flags, live = live_flags(policy, 6, 6)
    assert flags == [True, False, False, False, True, True]
    assert policy.simulate(6) == flags
    errors = [round(e, 6) for _, _, e in live.state.trace]
    assert errors == [0.0, 0.0, 0.01, 0.0398, 0.0, 0.0]


def test_threshold_is_inclusive_and_the_first_step_always_computes():
    # diffusers compares with <=; retention 0 still computes step 0 (nothing cached yet).
    # step 1: R = 0.5, E = 0.5 <= 0.5 -> skip; step 2: E = 0.5 + 0.5 -> compute; step 3: E = 0 -> skip.
    policy = MagCache(mag_ratios=(1.0, 0.5, 1.0, 1.0), threshold=0.5, retention_ratio=0.0)
    assert policy.simulate(4) == [True, False, True, False]
    assert live_flags(policy, 4, 4)[0] == [True, False, True, False]


def test_max_skip_steps_bounds_a_skipped_run():
    flat = MagCache(mag_ratios=(1.0,) * 12, threshold=1.0)  # retention int(2.4 + 0.5) = 2
    assert flat.simulate(12) == [True, True, False, False, False, True, False, False, False, True, False, False]
    assert MagCache(mag_ratios=(1.0,) * 12, threshold=1.0, max_skip_steps=0).simulate(12) == [True] * 12
    assert MagCache(mag_ratios=(1.0,) * 12, threshold=1.0, retention_ratio=1.0).simulate(12) == [True] * 12


def test_retention_rounds_half_up_as_diffusers():
    assert MagCache().retention_steps(28) == 6  # diffusers' docstring: 28 steps, 0.2 -> first 6
    assert MagCache(retention_ratio=0.25).retention_steps(10) == 3  # int(2.5 + 0.5), not round(2.5) == 2
    assert MagCache(retention_ratio=0.1).retention_steps(28) == 3


def test_curve_is_stretched_like_diffusers():
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS, nearest_interp as diffusers_interp

    assert MAG_RATIOS["flux"] == pytest.approx(FLUX_MAG_RATIOS.tolist(), abs=1e-6)
    for n in (1, 2, 7, 10, 20, 28, 50):
        assert nearest_interp(MAG_RATIOS["flux"], n) == pytest.approx(
            diffusers_interp(FLUX_MAG_RATIOS, n).tolist(), abs=1e-6)
    assert nearest_interp((1.0, 2.0, 3.0), 5) == (1.0, 1.0, 2.0, 3.0, 3.0)  # round half to even


def test_a_step_past_the_curve_has_ratio_one():
    # num_steps fixed at 2: steps 2 and 3 have no ratio (1.0): R = 1, E = 0 -> skip.
    policy = MagCache(mag_ratios=(1.0, 0.5), num_steps=2, retention_ratio=0.0, threshold=0.1)
    assert live_flags(policy, 4, None)[0] == [True, True, False, False]


def test_always_compute_forces_a_curve_index_and_resets():
    policy = MagCache(mag_ratios=(1.0,) * 6, threshold=1.0, max_skip_steps=10, retention_ratio=0.0,
                      always_compute=(3,))
    assert policy.simulate(6) == [True, False, False, True, False, False]
    # The same index on a stretched curve: 12 steps over 6 entries, round(s * 5 / 11) == 3 at s 6 and 7.
    assert policy.simulate(12) == [True] + [False] * 5 + [True, True] + [False] * 4
    flux = MagCache.preset("flux")
    flags = flux.simulate(28)
    assert flags[11] and flags[:3] == [True] * 3  # retention int(0.1 * 28 + 0.5) = 3


def test_fresh_state_per_generation():
    policy = MagCache(mag_ratios=(1.0,) * 8, threshold=1.0)
    live = Live(policy)
    first = [not live.plan(ctx(s, 8, generation=0)).reuse for s in range(5)]
    second = [not live.plan(ctx(s, 8, generation=1)).reuse for s in range(5)]
    assert first == second == [True, True, False, False, False]


def test_unknown_step_count_uses_the_curve_length_with_a_warning():
    policy = MagCache(mag_ratios=(1.0,) * 10, threshold=1.0)
    with pytest.warns(UserWarning, match="step count is unknown"):
        flags, _ = live_flags(policy, 10, None)
    assert flags == policy.simulate(10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        live_flags(MagCache(mag_ratios=(1.0,) * 10, num_steps=10), 3, None)  # explicit: no warning


def test_no_curve_says_how_to_get_one():
    policy = MagCache()
    with pytest.raises(PolicyError, match="ax.calibrate"):
        Live(policy).plan(ctx(0, 10))
    with pytest.raises(PolicyError, match="ax.calibrate"):
        policy.simulate(10)


def test_invalid_settings_raise_clear_errors():
    for kwargs, match in [
        (dict(threshold=-0.1), "threshold"),
        (dict(threshold=float("nan")), "threshold"),
        (dict(max_skip_steps=-1), "max_skip_steps"),
        (dict(max_skip_steps=True), "max_skip_steps"),
        (dict(retention_ratio=1.5), "retention_ratio"),
        (dict(num_steps=0), "num_steps"),
        (dict(always_compute=(-1,)), "always_compute"),
        (dict(mag_ratios=(1.0, 0.0)), "mag_ratios"),
        (dict(mag_ratios=(1.0, float("inf"))), "mag_ratios"),
        (dict(mag_ratios=()), "mag_ratios"),
        (dict(mag_ratios=["a"]), "mag_ratios"),
    ]:
        with pytest.raises(ValueError, match=match):
            MagCache(**kwargs)
    with pytest.raises(PolicyError, match="no published magnitude-ratio curve"):
        MagCache(mag_ratios="sdxl")
    with pytest.raises(PolicyError, match="no published settings"):
        MagCache.preset("sdxl")
    with pytest.raises(PolicyError, match="publish fast"):
        MagCache.preset("flux", "slow")


def test_published_curves_and_presets():
    assert len(MAG_RATIOS["wan2.1-t2v-1.3b"]) == len(MAG_RATIOS["wan2.1-t2v-14b"]) == 50
    assert len(MAG_RATIOS["wan2.1-i2v-14b-480p"]) == len(MAG_RATIOS["wan2.1-i2v-14b-720p"]) == 40
    assert len(MAG_RATIOS["hunyuanvideo-720p"]) == len(MAG_RATIOS["hunyuanvideo-544p"]) == 50
    assert len(MAG_RATIOS["flux"]) == 28
    for name, curve in MAG_RATIOS.items():
        assert curve[0] == 1.0, name
    for name, uncond in WAN_UNCOND_RATIOS.items():  # cond and uncond curves nearly agree
        assert max(abs(a - b) for a, b in zip(MAG_RATIOS[name], uncond)) < 0.01
    assert MagCache(mag_ratios="Wan2.1-T2V-1.3B").ratios == MAG_RATIOS["wan2.1-t2v-1.3b"]
    fast = MagCache.fast("wan2.1-t2v-14b")
    assert (fast.threshold, fast.max_skip_steps, fast.retention_ratio) == (0.24, 6, 0.2)
    slow = MagCache.slow("wan2.1-t2v-1.3b")
    assert (slow.threshold, slow.max_skip_steps) == (0.12, 2)
    for name, variants in PRESETS.items():
        for variant in variants:
            policy = MagCache.preset(name, variant)
            flags = policy.simulate(policy.num_steps or len(MAG_RATIOS[name]))
            assert not all(flags), (name, variant)  # every published setting skips some steps
    assert MagCache.preset("flux", threshold=0.1).threshold == 0.1
    assert hash(MagCache(mag_ratios=[1.0, 0.9])) == hash(MagCache(mag_ratios=(1.0, 0.9)))


def test_magnitude_ratios_of_scaled_residuals():
    base = torch.randn(2, 6, 8)
    scales = (1.0, 2.0, 1.5, 1.5)
    ratios = magnitude_ratios([base * s for s in scales])
    assert ratios == pytest.approx((1.0, 2.0, 0.75, 1.0), rel=1e-5)
    assert magnitude_ratio(base * 3, base) == pytest.approx(3.0, rel=1e-5)
    # A learned-variance output (twice the latent's channels) is cut to the latent's channels.
    latent, output = torch.randn(1, 4, 3, 3), torch.randn(1, 8, 3, 3)
    assert torch.equal(model_residual(latent, output), output[:, :4] - latent)
    assert torch.equal(model_residual(latent, output[:, :4]), output[:, :4] - latent)


def test_magcache_decides_before_the_step():
    caps = Capabilities.of(MagCache(mag_ratios="flux"))
    assert not caps.decides_in_step and not caps.observes and not caps.observes_outputs
    assert MagCache(mag_ratios="flux").folds()  # all-or-nothing plans: one residual per block span


def test_docstring_examples():
    results = doctest.testmod(magcache_module, verbose=False)
    assert results.attempted >= 2 and results.failed == 0


# -- diffusers' own hook on a real model ------------------------------------------------------------

def _diffusers_decisions(entry, config, steps: int) -> list[bool]:
    from diffusers.hooks import HookRegistry

    model = entry.build()
    model.enable_cache(config)
    hook = HookRegistry.check_if_exists_or_initialize(model.blocks[0]).get_hook("mag_cache_leader_block_hook")
    decisions = []
    with torch.no_grad():
        for i in range(steps):
            model(**entry.inputs(timestep=999.0 - i * 999.0 / steps))
            decisions.append(bool(hook.state_manager.get_state().should_compute))
    return decisions


@pytest.mark.parametrize("threshold, max_skip, retention, steps", [
    (0.06, 3, 0.2, 12), (0.24, 5, 0.1, 20), (0.5, 2, 0.0, 10), (0.02, 3, 0.2, 28),
])
def test_decisions_equal_diffusers_hook(threshold, max_skip, retention, steps):
    from diffusers import MagCacheConfig
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    entry = ZOO["wan"]
    config = MagCacheConfig(threshold=threshold, max_skip_steps=max_skip, retention_ratio=retention,
                            num_inference_steps=steps, mag_ratios=FLUX_MAG_RATIOS.clone())
    expected = _diffusers_decisions(entry, config, steps)
    policy = MagCache(threshold=threshold, max_skip_steps=max_skip, retention_ratio=retention, mag_ratios="flux")
    assert policy.simulate(steps) == expected
    # And the live runtime: the report's per-step reuse.
    model = ax.transform(entry.build(), policy)
    with torch.no_grad(), ax.generation(model, num_steps=steps):
        for i in range(steps):
            model(**entry.inputs(timestep=999.0 - i * 999.0 / steps))
    assert [r.reused == 0 for r in ax.report(model).steps] == expected
    assert not all(expected)


# -- five architectures ------------------------------------------------------------------------------

STEPS = 8


@pytest.mark.parametrize("name", ["dit", "pixart", "latte", "wan", "flux"])
def test_runs_reuses_and_never_reusing_is_exact(name):
    entry = ZOO[name]
    reference = entry.build()
    timesteps = [999.0 - i * 999.0 / STEPS for i in range(STEPS)]
    with torch.no_grad():
        expected = [entry.output(reference(**entry.inputs(timestep=t))) for t in timesteps]
    for policy, reuses in ((MagCache(mag_ratios=(1.0,) * STEPS, threshold=1.0), True),
                           (MagCache(mag_ratios=(1.0,) * STEPS, threshold=1.0, max_skip_steps=0), False)):
        model = entry.build()
        model.load_state_dict(reference.state_dict())
        ax.transform(model, policy)
        with torch.no_grad(), ax.generation(model, num_steps=STEPS):
            got = [entry.output(model(**entry.inputs(timestep=t))) for t in timesteps]
        report = ax.report(model)
        computed = [r.reused == 0 for r in report.steps]
        assert computed == policy.simulate(STEPS)
        if reuses:
            # retention int(1.6 + 0.5) = 2, then K = 3 skips, a compute, and skips to the end
            assert computed == [True, True, False, False, False, True, False, False]
            assert report.compute_fraction == pytest.approx(3 / 8)
            assert all(r.computed == 0 for r in report.steps if r.reused)  # every branch reused
        else:
            assert report.compute_fraction == 1.0
            for g, e in zip(got, expected):
                assert max_diff(g, e) <= 1e-5


# -- calibration ---------------------------------------------------------------------------------------

CAL_STEPS = 24


@pytest.fixture(scope="module")
def video_model():
    torch.manual_seed(0)
    model, inputs = latte(num_layers=2, heads=2, head_dim=16, frames=4, sample_size=8)

    def run(m, i):
        sample(m, inputs, num_steps=CAL_STEPS, seed=i, progress=False)

    return model, run




def test_calibration_records_the_curve_and_reaches_the_target_on_held_out_inputs(video_model, target=0.5):
    model, run = video_model
    calibration = ax.calibrate(model, MagCache(), run, target=target, runs=2, progress=False)
    assert not ax.is_transformed(model)
    curve = calibration.policy.ratios
    assert curve is not None and len(curve) == CAL_STEPS and curve[0] == 1.0
    assert calibration.mag_ratios == curve and "magnitude ratios" in str(calibration)
    assert all(0.2 < r < 5.0 for r in curve)
    assert calibration.knob == "threshold"
    assert calibration.predicted_compute_fraction == pytest.approx(target, rel=0.1)
    held_out = held_out_fraction(model, calibration.policy, run, seeds=(100, 101, 102), num_steps=CAL_STEPS)
    assert held_out == pytest.approx(target, rel=0.1), (str(calibration), held_out)


def test_calibration_keeps_a_given_curve(video_model):
    model, run = video_model
    given = MagCache(mag_ratios="flux")
    calibration = ax.calibrate(model, given, run, target=0.6, runs=1, refine=0, progress=False)
    assert calibration.mag_ratios is None and calibration.policy.ratios == MAG_RATIOS["flux"]
    assert calibration.measured == []
