"""Forecasting reuse (TaylorSeer, FasterCache): reused branches add an extrapolated residual."""

import pytest
import torch
import torch.nn as nn

import adacache_fx as ax
from adacache_fx.policies.base import Capabilities
from adacache_fx.policies.taylorseer import newton_extrapolate, taylor_extrapolate
from policy_driver import Live
from conftest import ProjectionAttention


@pytest.mark.parametrize("order", [1, 2])
def test_newton_extrapolation_is_exact_on_polynomials_of_its_order(order):
    torch.manual_seed(0)
    coefficients = torch.randn(order + 1, 4, 5)

    def residual(step: float) -> torch.Tensor:
        return sum(c * step**i for i, c in enumerate(coefficients))

    steps = [0, 3, 4, 8][: order + 1]  # uneven spacing
    history = [(s, (residual(s),)) for s in steps]
    for target in (9, 10, 12):
        (forecast,) = newton_extrapolate(history, target, order)
        torch.testing.assert_close(forecast, residual(target), rtol=1e-4, atol=1e-4)
    # One degree more is not exact: the test can fail.
    higher = [(s, (residual(s) + s ** (order + 1) * torch.ones(4, 5),)) for s in steps]
    (forecast,) = newton_extrapolate(higher, 12, order)
    assert (forecast - (residual(12) + 12 ** (order + 1))).abs().max() > 1.0


def test_extrapolation_with_fewer_points_lowers_the_degree():
    value = (torch.ones(3),)
    assert torch.equal(newton_extrapolate([(2, value)], 7, 2)[0], value[0])
    line = [(0, (torch.zeros(3),)), (2, (torch.full((3,), 4.0),))]
    torch.testing.assert_close(newton_extrapolate(line, 3, 2)[0], torch.full((3,), 6.0))


class PolynomialBlock(nn.Module):
    """Its branch value is a quadratic in the timestep (times zero of a real attention projection)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attn = ProjectionAttention(dim)
        self.coefficients = nn.Parameter(torch.randn(3, dim))

    def forward(self, hidden_states, t):
        c = self.coefficients
        return hidden_states + (self.attn(hidden_states) * 0.0 + c[0] + c[1] * t + c[2] * t * t)


class PolynomialModel(nn.Module):
    def __init__(self, dim: int = 8, depth: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(PolynomialBlock(dim) for _ in range(depth))

    def forward(self, hidden_states, timestep):
        t = timestep.reshape(-1, 1, 1) / 1000.0
        for block in self.blocks:
            hidden_states = block(hidden_states, t)
        return hidden_states


def _run(model, policy, steps=12):
    reference = PolynomialModel()
    reference.load_state_dict(model.state_dict())
    ax.transform(model, policy)
    x = torch.randn(2, 4, 8)
    errors = []
    with torch.no_grad(), ax.generation(model, num_steps=steps):
        for i in range(steps):
            t = torch.full((2,), 999.0 - 60.0 * i)  # linear in the step index
            errors.append((model(x, t) - reference(x, t)).abs().max().item())
    return errors, ax.report(model)


def test_taylorseer_newton_is_exact_once_it_has_three_points_of_a_quadratic_residual():
    torch.manual_seed(1)
    errors, report = _run(PolynomialModel(), ax.TaylorSeer(ax.Static(interval=3), order=2, series="newton"))
    reused = [s.step for s in report.steps if s.reused]
    assert reused == [1, 2, 4, 5, 7, 8, 10]
    # Steps 7, 8, 10 reuse with three computed points (0, 3, 6 / 3, 6, 9): exact.
    assert max(errors[s] for s in (7, 8, 10)) <= 1e-4, errors
    assert errors[1] > 1e-3  # one point only: plain reuse, not exact

    torch.manual_seed(1)
    plain, _ = _run(PolynomialModel(), ax.Static(interval=3))
    assert plain[7] > 1e-3  # reuse as is misses what the forecast gets right


def test_fastercache_extrapolates_linearly_with_its_ramp():
    policy = Live(ax.FasterCache(interval=2, start=0.0, num_steps=11))
    assert policy.weight(0, 11) == 0.0 and policy.weight(10, 11) == 1.0
    assert policy.weight(5, 11) == pytest.approx(0.5)
    from adacache_fx.policies.base import StepContext

    ctx = StepContext(step=10, num_steps=11, timestep=None, generation=0, branches=())
    history = [(6, (torch.full((2,), 1.0),)), (8, (torch.full((2,), 3.0),))]
    (value,) = policy.forecast(ctx, None, history)
    torch.testing.assert_close(value, torch.full((2,), 5.0))  # w = 1 at the last step: the line
    ctx = StepContext(step=5, num_steps=11, timestep=None, generation=0, branches=())
    (value,) = policy.forecast(ctx, None, [(2, (torch.zeros(2),)), (4, (torch.full((2,), 2.0),))])
    torch.testing.assert_close(value, torch.full((2,), 2.5))  # 2 + 0.5 * 2 * 1/2


@pytest.mark.parametrize("order", [1, 2])
def test_taylor_series_forecast_equals_diffusers_taylorseer_state(order):
    """The default forecast is the authors' recursion, as diffusers' own TaylorSeerState computes it
    (at irregular spacing, where it differs from the interpolating polynomial for order 2)."""
    from diffusers.hooks.taylorseer_cache import TaylorSeerState

    torch.manual_seed(0)
    steps = [0, 2, 3, 7]
    values = [torch.randn(5) for _ in steps]
    theirs = TaylorSeerState(taylor_factors_dtype=torch.float32, max_order=order)
    history = []
    for step, value in zip(steps, values):
        theirs.current_step = step
        theirs.update((value,))
        history.append((step, (value,)))
    for target in (8, 9, 12):
        theirs.current_step = target
        (expected,) = theirs.predict()
        (got,) = taylor_extrapolate(history, target, order)
        torch.testing.assert_close(got, expected)
        if order == 2:  # the test can fail: Newton's polynomial is another forecast here
            assert (newton_extrapolate(history, target, order)[0] - expected).abs().max() > 1e-3
    assert ax.TaylorSeer().series == "taylor"


def test_taylorseer_validates_its_settings():
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        ax.TaylorSeer(order=3)
    with pytest.raises(TypeError, match="must be a policy"):
        ax.TaylorSeer(base="static")
    with pytest.raises(ValueError, match="series"):
        ax.TaylorSeer(series="chebyshev")
    assert Capabilities.of(ax.TaylorSeer(ax.FirstBlockCache())).decides_in_step
