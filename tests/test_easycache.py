"""EasyCache: hand-derived schedules from synthetic inputs and outputs, the live path (plan +
observe_output) against the pure replay, five architectures, and calibration on held-out inputs."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

import adacache_fx as ax
from adacache_fx.errors import PolicyError
from adacache_fx.policies import easycache as easycache_module
from adacache_fx.policies.base import BranchInfo, Capabilities, StepContext
from adacache_fx.policies.easycache import PRESETS, EasyCache
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


def filled(*values: float) -> list[torch.Tensor]:
    return [torch.full((2, 3), float(v)) for v in values]


def run_live(policy: EasyCache, latents, outputs, num_steps: int | None, slots: int = 1,
             generation: int = 0, live: Live | None = None):
    """Drive plan() and observe_output() as the runtime does; returns (compute flags, driver)."""
    live = live or Live(policy)
    flags = []
    for step, (latent, output) in enumerate(zip(latents, outputs)):
        context = StepContext(step=step, num_steps=num_steps, timestep=None, generation=generation,
                              branches=BRANCHES, latent=latent)
        plan = live.plan(context)
        assert plan.reuse in (frozenset(), ALL_IDS)
        computed = not plan.reuse
        flags.append(computed)
        for slot in range(slots):
            # A reused step's output is what the cached residuals gave: make it absurd to show it is
            # never read; a second call (uncond) returns something else entirely.
            seen = output if computed else output * 1e6
            policy.observe_output(context, live.state, slot, seen if slot == 0 else -seen * 7)
    return flags, live


# -- the rule on synthetic signals ---------------------------------------------------------------

def test_docstring_example_live_and_replay_agree():
    policy = EasyCache(threshold=0.1, warmup=2, cooldown=0)
    xs, os = filled(10, 9, 8, 7, 6), filled(10, 11, 12, 13, 14)
    # k = |11 - 10| / |9 - 10| = 1; step 2: 1 * 1/11 = 0.0909 < 0.1 skips; step 3: 0.1818 computes,
    # k = |13 - 11| / |7 - 9| = 1; step 4: 1/13 skips.
    assert policy.simulate(xs, os) == [True, True, False, True, False]
    flags, live = run_live(policy, xs, os, num_steps=5)
    assert flags == [True, True, False, True, False]
    assert [round(a, 6) for _, _, a, _ in live.state.trace] == [0.0, 0.0, round(1 / 11, 6), 0.0, round(1 / 13, 6)]


def test_the_rate_spans_the_two_latest_computed_steps():
    policy = EasyCache(threshold=0.15, warmup=2, cooldown=0)
    xs = filled(10, 9, 8, 7, 6, 5)
    os = filled(10, 11, 99, 15, 99, 20)  # outputs of skipped steps (99) are never read
    # step 1: k = 1; step 2: 1/11 skips; step 3: 2/11 >= 0.15 computes, k = |15 - 11| / |7 - 9| = 2;
    # step 4: 2 * 1/15 = 0.133 skips; step 5: 0.267 computes, k = |20 - 15| / |5 - 7| = 2.5.
    flags, live = run_live(policy, xs, os, num_steps=6, slots=2)
    assert flags == [True, True, False, True, False, True]
    assert [r for _, _, _, r in live.state.trace] == [None, None, 1.0, 1.0, 2.0, 2.0]
    assert live.state.rate == pytest.approx(2.5)
    assert policy.simulate(xs, os) == flags


def test_warmup_and_cooldown():
    xs = [torch.full((4,), 1.0 - 0.1 * i) for i in range(8)]
    os = [torch.full((4,), 1.0 + 0.1 * i) for i in range(8)]
    policy = EasyCache(threshold=1e9, warmup=3, cooldown=2)
    assert run_live(policy, xs, os, num_steps=8)[0] == [True] * 3 + [False] * 3 + [True] * 2
    # Unknown step count: no cooldown.
    assert run_live(policy, xs, os, num_steps=None)[0] == [True] * 3 + [False] * 5
    assert policy.simulate(xs, os) == [True] * 3 + [False] * 3 + [True] * 2
    assert EasyCache(threshold=0.0, warmup=0).simulate(xs, os) == [True] * 8  # threshold 0: never


def test_a_step_without_a_rate_or_a_comparable_input_computes():
    xs = [torch.full((4,), 1.0 - 0.1 * i) for i in range(6)]
    os = [torch.full((4,), 1.0 + 0.1 * i) for i in range(6)]
    policy = EasyCache(threshold=1e9, warmup=0, cooldown=0)
    # step 0: no previous input; step 1: no rate yet (one computed step); then skips.
    assert policy.simulate(xs, os) == [True, True, False, False, False, False]
    # No latent (an exported runner): every step computes.
    assert run_live(policy, [None] * 4, os[:4], num_steps=4)[0] == [True] * 4
    # A latent of another shape computes (and becomes the comparison input).
    shaped = xs[:3] + [torch.zeros(5)] + xs[4:]
    flags, _ = run_live(policy, shaped, os, num_steps=6)
    assert flags[3] and not flags[2]


def test_degenerate_estimates_compute():
    # The same latent every step: k = |o1 - o0| / 0 = inf, and inf * 0 is NaN, which never passes
    # the threshold test (as in the authors' code): every step computes.
    xs = filled(1, 1, 1, 1)
    os = filled(1, 2, 3, 4)
    flags, live = run_live(EasyCache(threshold=1e9, warmup=2, cooldown=0), xs, os, num_steps=4)
    assert flags == [True] * 4
    assert math.isinf(live.state.rate)


def test_fresh_state_per_generation():
    policy = EasyCache(threshold=0.1, warmup=2, cooldown=0)
    xs, os = filled(10, 9, 8, 7, 6), filled(10, 11, 12, 13, 14)
    first, live = run_live(policy, xs, os, num_steps=5, generation=0)
    second, _ = run_live(policy, xs, os, num_steps=5, generation=1, live=live)
    assert first == second == [True, True, False, True, False]


def test_presets_and_validation():
    assert EasyCache() == EasyCache.preset("hunyuanvideo")  # defaults: the HunyuanVideo script's
    assert EasyCache.preset("wan2.2-t2v-a14b") == EasyCache(threshold=0.06, warmup=7)
    assert EasyCache.preset("Wan2.2_TI2V-5B").threshold == 0.05
    assert set(PRESETS) == {"hunyuanvideo", "wan2.2-t2v-a14b", "wan2.2-ti2v-5b"}
    assert EasyCache.preset("hunyuanvideo", warmup=2).warmup == 2
    with pytest.raises(PolicyError, match="no published setting"):
        EasyCache.preset("flux")
    for kwargs, match in [(dict(threshold=-1.0), "threshold"), (dict(threshold=math.inf), "threshold"),
                          (dict(threshold="0.1"), "threshold"), (dict(warmup=-1), "warmup"),
                          (dict(warmup=1.5), "warmup"), (dict(cooldown=True), "cooldown")]:
        with pytest.raises(ValueError, match=match):
            EasyCache(**kwargs)
    with pytest.raises(ValueError, match="latents"):
        EasyCache().simulate(filled(1, 2), filled(1))


def test_easycache_observes_outputs_and_decides_before_the_step():
    caps = Capabilities.of(EasyCache())
    assert caps.observes_outputs and not caps.decides_in_step and not caps.observes
    assert EasyCache().folds()  # all-or-nothing plans: one residual per block span


def test_docstring_examples():
    results = doctest.testmod(easycache_module, verbose=False)
    assert results.attempted >= 2 and results.failed == 0


# -- five architectures ------------------------------------------------------------------------------

STEPS = 8


@pytest.mark.parametrize("name", ["dit", "pixart", "latte", "wan", "flux"])
def test_runs_reuses_and_never_reusing_is_exact(name):
    entry = ZOO[name]
    reference = entry.build()
    timesteps = [999.0 - i * 999.0 / STEPS for i in range(STEPS)]
    base = entry.inputs(timestep=0.0)["hidden_states"]

    def inputs(i):  # a latent that moves from step to step, as a sampler's does
        kwargs = entry.inputs(timestep=timesteps[i])
        kwargs["hidden_states"] = base * (1.0 - 0.05 * i)
        return kwargs

    with torch.no_grad():
        expected = [entry.output(reference(**inputs(i))) for i in range(STEPS)]
    for policy, reuses in ((EasyCache(threshold=1e9, warmup=2), True), (EasyCache(threshold=0.0), False)):
        model = entry.build()
        model.load_state_dict(reference.state_dict())
        ax.transform(model, policy)
        with torch.no_grad(), ax.generation(model, num_steps=STEPS):
            got = [entry.output(model(**inputs(i))) for i in range(STEPS)]
        report = ax.report(model)
        computed = [r.reused == 0 for r in report.steps]
        state = ax.policy_state(model)
        assert [c for _, c, _, _ in state.trace] == computed
        if reuses:
            # warm-up 2, then every step skips but the last (cooldown 1)
            assert computed == [True, True] + [False] * 5 + [True]
            assert report.compute_fraction == pytest.approx(3 / 8)
            assert state.rate is not None and math.isfinite(state.rate) and state.rate > 0
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




@pytest.mark.parametrize("target", [0.5, 0.4])
def test_calibration_reaches_the_target_on_held_out_inputs(video_model, target):
    model, run = video_model
    calibration = ax.calibrate(model, EasyCache(), run, target=target, runs=2, progress=False)
    assert not ax.is_transformed(model)
    assert type(calibration.policy) is EasyCache and calibration.knob == "threshold"
    assert (calibration.policy.warmup, calibration.policy.cooldown) == (5, 1)  # other settings kept
    assert calibration.predicted_compute_fraction == pytest.approx(target, rel=0.1)
    held_out = held_out_fraction(model, calibration.policy, run, seeds=(100, 101, 102), num_steps=CAL_STEPS)
    assert held_out == pytest.approx(target, rel=0.1), (str(calibration), held_out)
