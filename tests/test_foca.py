"""FoCa (arXiv 2508.16211): BDF2 forecast + Heun calibration of reused residuals, on a base schedule.

Synthetic residuals first (values derived by hand from the paper's eqs. 6-8), then a model whose
branches are polynomials of the timestep, then five real diffusers architectures.
"""

import doctest

import pytest
import torch
import torch.nn as nn

import adacache_fx as ax
import adacache_fx.policies.foca as foca_module
from adacache_fx.policies.base import BranchInfo, Capabilities, Plan, StepContext
from adacache_fx.policies.foca import FoCa, foca_forecast
from adacache_fx.policies.static import NoCache, Static
from adacache_fx.policies.taylorseer import newton_extrapolate
from adacache_lab.zoo import ZOO
from policy_driver import Live
from conftest import ProjectionAttention


def _history(fn, steps):
    return [(s, (fn(s),)) for s in steps]


# -- the forecast on synthetic residuals -------------------------------------------------------------
@pytest.mark.parametrize("steps", [(0, 3), (0, 3, 6), (1, 2, 7), (0, 4, 5)])
@pytest.mark.parametrize("corrector", [True, False])
def test_exact_for_residuals_linear_in_the_step(steps, corrector):
    torch.manual_seed(0)
    c0, c1 = torch.randn(2, 3, 4)

    def residual(t):
        return c0 + c1 * t

    history = _history(residual, steps)
    for target in (steps[-1] + 1, steps[-1] + 2, steps[-1] + 5):
        (value,) = foca_forecast(history, target, corrector)
        torch.testing.assert_close(value, residual(target), rtol=1e-5, atol=1e-5)


def test_hand_derived_values_on_a_parabola():
    # F(t) = t^2 computed at steps 0, 1, 2; forecast for step 3 (h = 1):
    #   eq. 6 at the anchor: D = (3*4 - 4*1 + 0) / 2 = 4;  F(a - h) = F(1) = 1
    #   eq. 7: F^ = 4/3*4 - 1/3*1 + 2/3*4 = 23/3
    #   eq. 8: F_c = 4 + 1/2 * (4 + (23/3 - 4)) = 47/6   (the truth is 9)
    history = _history(lambda t: torch.tensor([float(t * t)]), (0, 1, 2))
    assert foca_forecast(history, 3, corrector=False)[0].item() == pytest.approx(23 / 3, rel=1e-6)
    assert foca_forecast(history, 3)[0].item() == pytest.approx(47 / 6, rel=1e-6)


@pytest.mark.parametrize("steps", [(0, 3, 6), (0, 2, 6), (1, 5, 6)])
def test_quadratic_error_is_seven_sixths_of_the_curvature_times_h_squared(steps):
    # With three computed points the parabola is exact, so D = F'(a) and F(a - h) are exact and
    # F_c - F(a + h) = -7/6 c h^2 (the BDF2 forecast alone: -4/3 c h^2), whatever the spacing.
    torch.manual_seed(1)
    c0, c1, c2 = torch.randn(3, 5)

    def residual(t):
        return c0 + c1 * t + c2 * t * t

    history = _history(residual, steps)
    a = steps[-1]
    for h in (1, 2, 3):
        (corrected,) = foca_forecast(history, a + h)
        (predicted,) = foca_forecast(history, a + h, corrector=False)
        torch.testing.assert_close(corrected - residual(a + h), -7 / 6 * c2 * h * h, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(predicted - residual(a + h), -4 / 3 * c2 * h * h, rtol=1e-4, atol=1e-4)


def test_one_point_reuses_two_points_are_taylorseer_order_one():
    value = torch.randn(2, 3)
    assert foca_forecast([(4, (value,))], 6) is None  # the runtime then adds the last residual
    assert foca_forecast([(-1, (value,))], 0) is None  # the runtime's placeholder for "no history"
    history = [(2, (torch.randn(2, 3),)), (5, (torch.randn(2, 3),))]
    for corrector in (True, False):
        (value,) = foca_forecast(history, 7, corrector)
        torch.testing.assert_close(value, newton_extrapolate(history, 7, 1)[0])
    # Only the last three points count.
    longer = [(0, (torch.full((2, 3), 100.0),))] + _history(lambda t: torch.full((2, 3), 2.0 * t), (1, 2, 3))
    torch.testing.assert_close(foca_forecast(longer, 4)[0], torch.full((2, 3), 8.0))


def test_every_residual_of_a_branch_is_forecast_and_keeps_its_dtype():
    history = [(s, (torch.full((2,), float(s), dtype=torch.bfloat16), torch.full((3,), 2.0 * s)))
               for s in (0, 1, 2)]
    first, second = foca_forecast(history, 4)
    assert first.dtype == torch.bfloat16 and second.dtype == torch.float32
    torch.testing.assert_close(first.float(), torch.full((2,), 4.0))
    torch.testing.assert_close(second, torch.full((3,), 8.0))


# -- the policy -------------------------------------------------------------------------------------
BRANCH = BranchInfo(id="blocks.0.attn1", block="blocks.0", block_list="blocks", block_index=0, depth=0,
                    name="attn1", kind="self_attention", tags=frozenset({"self_attention"}), flops=None,
                    num_residuals=1)


def _ctx(step, num_steps=10):
    return StepContext(step=step, num_steps=num_steps, timestep=None, generation=0, branches=(BRANCH,))


def test_schedule_and_state_are_the_bases():
    base = Static(interval=3)
    live = Live(FoCa(base=base))
    for step in range(10):
        assert live.plan(_ctx(step)) == base.plan(_ctx(step), None)
    assert live.plan(_ctx(4)) == Plan.reuse_only({BRANCH.id})
    assert live.history(BRANCH) == 3
    history = _history(lambda t: torch.tensor([2.0 * t + 1.0]), (0, 3))
    assert live.forecast(_ctx(4), BRANCH, history)[0].item() == pytest.approx(9.0)
    caps = Capabilities.of(FoCa())
    assert caps.forecasts and not caps.decides_in_step
    assert Capabilities.of(FoCa(ax.FirstBlockCache())).decides_in_step
    assert FoCa().base == Static(interval=5) and FoCa().corrector


def test_validates_its_settings():
    with pytest.raises(TypeError, match="must be a policy"):
        FoCa(base="static")
    with pytest.raises(ValueError, match="corrector must be True or False"):
        FoCa(corrector=1)


def test_docstring_examples():
    results = doctest.testmod(foca_module, verbose=False)
    assert results.attempted >= 3 and results.failed == 0


# -- a model whose branches are polynomials of the timestep ---------------------------------------
class _PolynomialBlock(nn.Module):
    def __init__(self, dim, degree):
        super().__init__()
        self.attn = ProjectionAttention(dim)
        self.coefficients = nn.Parameter(torch.randn(degree + 1, dim))

    def forward(self, hidden_states, t):
        value = self.attn(hidden_states) * 0.0
        for power, c in enumerate(self.coefficients):
            value = value + c * t**power
        return hidden_states + value


class _PolynomialModel(nn.Module):
    def __init__(self, degree, dim=8, depth=2):
        super().__init__()
        self.blocks = nn.ModuleList(_PolynomialBlock(dim, degree) for _ in range(depth))

    def forward(self, hidden_states, timestep):
        t = timestep.reshape(-1, 1, 1) / 1000.0
        for block in self.blocks:
            hidden_states = block(hidden_states, t)
        return hidden_states


DT = -0.06  # t = (999 - 60 * step) / 1000: linear in the step


def _run_polynomial(degree, policy, steps=12):
    torch.manual_seed(3)
    model = _PolynomialModel(degree)
    reference = _PolynomialModel(degree)
    reference.load_state_dict(model.state_dict())
    ax.transform(model, policy)
    x = torch.randn(2, 4, 8)
    errors = []
    with torch.no_grad(), ax.generation(model, num_steps=steps):
        for i in range(steps):
            t = torch.full((2,), 999.0 - 60.0 * i)
            errors.append(model(x, t) - reference(x, t))
    curvature = sum(block.coefficients[2] for block in reference.blocks) if degree >= 2 else None
    return errors, ax.report(model), curvature


def test_on_a_model_exact_for_linear_branches_and_hand_derived_on_quadratic_ones():
    errors, report, _ = _run_polynomial(1, FoCa(Static(interval=4)))
    assert [s.step for s in report.steps if s.reused] == [1, 2, 3, 5, 6, 7, 9, 10]
    assert errors[1].abs().max() > 1e-3  # one computed point: plain reuse
    assert max(errors[s].abs().max().item() for s in (5, 6, 7, 9, 10)) <= 1e-4

    # Quadratic branches: at steps 9, 10 (computed 0, 4, 8) every block misses by -7/6 c h^2 with
    # c the curvature per step (coefficient * DT^2); the output misses by the sum over blocks.
    errors, _, curvature = _run_polynomial(2, FoCa(Static(interval=4)))
    for h in (1, 2):
        expected = (-7 / 6 * curvature * DT**2 * h * h).expand_as(errors[8 + h])
        torch.testing.assert_close(errors[8 + h], expected, rtol=1e-3, atol=1e-5)


# -- real diffusers architectures --------------------------------------------------------------------
ARCHITECTURES = ["dit", "pixart", "latte", "wan", "flux"]
STEPS = 7


def _timesteps():
    return [999.0 - i * (999.0 / STEPS) for i in range(STEPS)]


def _outputs(model, entry):
    outs = []
    with torch.no_grad(), ax.generation(model, num_steps=STEPS):
        for t in _timesteps():
            outs.append(entry.output(model(**entry.inputs(timestep=t))).clone())
    return outs


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_on_real_architectures(name):
    entry = ZOO[name]
    reference = entry.build()
    with torch.no_grad():
        expected = [entry.output(reference(**entry.inputs(timestep=t))) for t in _timesteps()]

    # A schedule that never reuses: the transformed model is the model.
    exact = ax.transform(entry.build(), FoCa(base=NoCache()))
    for got, want in zip(_outputs(exact, entry), expected):
        assert torch.equal(got, want)
    assert ax.report(exact).compute_fraction == 1.0

    # Static(2) computes 0, 2, 4, 6; FoCa reuses (and forecasts) in between.
    model = ax.transform(entry.build(), FoCa(base=Static(interval=2)))
    got = _outputs(model, entry)
    report = ax.report(model)
    assert [s.step for s in report.steps if s.reused] == [1, 3, 5]
    assert all(s.computed == 0 for s in report.steps if s.reused)  # every branch is reused
    for step in (0, 2, 4, 6):  # computed steps see the model's own inputs: exact
        torch.testing.assert_close(got[step], expected[step], rtol=0, atol=1e-5)
    # Step 5 forecasts from three computed points (0, 2, 4): finite, and not the model's output.
    assert torch.isfinite(got[5]).all() and (got[5] - expected[5]).abs().max() > 0
