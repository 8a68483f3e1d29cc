"""ax.calibrate fits a policy to a requested compute fraction, checked on held-out inputs."""

import pytest
import torch

import adacache_fx as ax
from adacache_lab.sampling import sample
from adacache_lab.zoo import latte
from tests.conftest import held_out_fraction

STEPS = 24


@pytest.fixture(scope="module")
def video_model():
    torch.manual_seed(0)
    model, inputs = latte(num_layers=4, heads=4, head_dim=32, frames=4, sample_size=16)

    def run(m, i):
        sample(m, inputs, num_steps=STEPS, seed=i, progress=False)

    return model, run




@pytest.mark.parametrize(
    "policy, target",
    [
        (ax.AdaCache.fast(STEPS), 0.5),
        (ax.AdaCache.fast(STEPS, moreg=True), 0.4),
        (ax.TeaCache(), 0.5),
        (ax.TeaCache(), 0.3),
        (ax.FirstBlockCache(), 0.5),
    ],
    ids=["adacache", "adacache_moreg", "teacache_0.5", "teacache_0.3", "first_block_cache"],
)
def test_calibration_reaches_the_target_on_held_out_inputs(video_model, policy, target):
    model, run = video_model
    calibration = ax.calibrate(model, policy, run, target=target, runs=3, progress=False)
    assert not ax.is_transformed(model)  # restored after calibrating
    assert type(calibration.policy) is type(policy)
    assert calibration.predicted_compute_fraction == pytest.approx(target, rel=0.1)
    assert "calibrated" in str(calibration)
    held_out = held_out_fraction(model, calibration.policy, run, seeds=(100, 101, 102), num_steps=STEPS)
    assert held_out == pytest.approx(target, rel=0.1), (str(calibration), held_out)


def test_calibrated_teacache_fits_its_polynomial(video_model):
    model, run = video_model
    calibration = ax.calibrate(model, ax.TeaCache(), run, target=0.5, runs=2, refine=0, progress=False)
    assert calibration.coefficients is not None and len(calibration.coefficients) == 5
    assert tuple(calibration.policy.coefficients) == calibration.coefficients
    assert calibration.measured == []  # refine=0: replay only
    # Given coefficients are kept unless asked to fit.
    fixed = ax.calibrate(model, ax.TeaCache(coefficients="latte"), run, target=0.5, runs=2, refine=0, progress=False)
    assert fixed.coefficients is None and fixed.policy.coefficients == ax.TeaCache(coefficients="latte").coefficients


def test_calibrate_rejects_bad_input(video_model):
    model, run = video_model
    with pytest.raises(ax.PolicyError, match="fits AdaCache, TeaCache and FirstBlockCache"):
        ax.calibrate(model, ax.Static(2), run, target=0.5)
    with pytest.raises(ValueError, match="target compute fraction"):
        ax.calibrate(model, ax.TeaCache(), run, target=1.5)
    ax.transform(model, ax.NoCache())
    try:
        with pytest.raises(ax.PolicyError, match="untransformed"):
            ax.calibrate(model, ax.TeaCache(), run, target=0.5)
    finally:
        ax.restore(model)
