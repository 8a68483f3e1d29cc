"""FoCa (arXiv 2508.16211, "Forecast then Calibrate"): reused residuals as the solution of a feature ODE.

FoCa keeps another policy's schedule (which steps compute) and changes what a reused branch adds. It
reads the sequence of a branch's computed residuals as samples of the solution of an ODE in the step,
``dF/dt = g(F, t)``, and integrates it from the last computed step ``a`` to the current step
``t = a + h`` (``h`` in steps) with a predictor-corrector pair, using cached residuals only:

1. the feature derivative at the anchor, by the second-order backward differentiation formula
   (paper eq. 6, applied backwards at ``a`` over the last three computed steps; variable spacing:
   the derivative at ``a`` of the parabola through them; two computed steps: the backward
   difference): ``D = (3 F_a - 4 F_p + F_q) / (2 d)`` at uniform spacing ``d``;
2. *forecast*, the explicit BDF2 predictor (eq. 7) with step ``h``:
   ``F^ = 4/3 F_a - 1/3 F_(a-h) + 2h/3 D``, ``F_(a-h)`` read off the same parabola (the computed
   residual itself when step ``a - h`` computed);
3. *calibrate*, the Heun (trapezoidal) corrector (eq. 8), averaging the anchor's derivative and the
   forecast's ``(F^ - F_a) / h``: ``F_c = F_a + h/2 (D + (F^ - F_a) / h)``.

It is exact when the residual is linear in the step (as TaylorSeer of order 1); on a quadratic
``c t^2 + ...`` the predictor misses by ``-4/3 c h^2`` and the corrected value by ``-7/6 c h^2``
(TaylorSeer order 1, through the last two computed steps ``d`` apart, by ``-c h (h + d)``; order 2
is exact there). With one computed residual it adds that residual; with two it is TaylorSeer
order 1. What the paper leaves open (how ``F'`` is estimated; one jump from the anchor, as here, or
one step at a time through the reused steps) and why we chose so: ``docs/algorithms/foca.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import BranchInfo, OnBaseSchedule, Policy
from .static import Static


def foca_forecast(
    history: list[tuple[int, tuple[torch.Tensor, ...]]], step: int, corrector: bool = True
) -> tuple[torch.Tensor, ...] | None:
    """FoCa's value at ``step`` from the last (up to) three computed ``(step, residuals)`` points.

    ``corrector=False``: the BDF2 forecast alone (eq. 7). None when there is a single point (or
    ``step`` is not after the last one): the caller adds the last residuals as they are. Computed in
    float32, returned in each residual's dtype.

    >>> line = [(0, (torch.tensor([1.0]),)), (2, (torch.tensor([5.0]),))]
    >>> foca_forecast(line, 3)[0].item()  # exact for residuals linear in the step
    7.0
    """
    points = history[-3:]
    if len(points) < 2:
        return None
    a, anchor = points[-1]
    p, previous = points[-2]
    if step <= a or a <= p:
        return None
    h = float(step - a)
    out = []
    for index, value in enumerate(anchor):
        f_a = value.float()
        f_p = previous[index].float()
        slope = (f_a - f_p) / (a - p)  # divided difference F[a, p]
        if len(points) == 3 and points[0][0] < p:
            q, oldest = points[0]
            f_q = oldest[index].float()
            curvature = (slope - (f_p - f_q) / (p - q)) / (a - q)  # F[a, p, q]
            derivative = slope + curvature * (a - p)  # eq. 6 at the anchor (variable step)
            before = f_a - h * slope - h * (a - p - h) * curvature  # parabola at a - h
        else:
            derivative = slope
            before = f_a - h * slope
        forecast = (4.0 * f_a - before) / 3.0 + (2.0 * h / 3.0) * derivative  # eq. 7
        if corrector:
            forecast_derivative = (forecast - f_a) / h
            result = f_a + (h / 2.0) * (derivative + forecast_derivative)  # eq. 8
        else:
            result = forecast
        out.append(result.to(value.dtype))
    return tuple(out)


@dataclass(frozen=True)
class FoCa(OnBaseSchedule):
    """Forecast reused residuals with FoCa's BDF2 predictor and Heun corrector, on ``base``'s schedule.

    ``base`` decides which steps (and branches) compute: ``Static(interval=5)`` by default (the
    paper's FLUX setting ``N=5``), or any policy, ``FirstBlockCache`` and ``LeMiCa`` included. Its
    state is the base's. ``corrector=False`` adds the BDF2 forecast alone (the paper's ablation).
    A base that never reuses (``NoCache()``) leaves the model's outputs exact.

    >>> FoCa(base=Static(interval=3)).history(None)
    3
    """

    base: Policy = field(default_factory=lambda: Static(interval=5))
    corrector: bool = True

    def __post_init__(self) -> None:
        self._check_base()
        if not isinstance(self.corrector, bool):
            raise ValueError(f"FoCa(corrector={self.corrector!r}): corrector must be True or False")

    # What a reused branch adds.
    def history(self, branch: BranchInfo) -> int:
        return 3

    def forecast(self, ctx, state, branch, history):
        return foca_forecast(history, ctx.step, self.corrector)
