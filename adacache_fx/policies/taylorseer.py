"""TaylorSeer: reuse steps add a *forecast* residual instead of the last computed one.

It keeps another policy's schedule (which steps compute) and changes what a reused branch adds: the
Taylor series ``sum_j d_j * k**j / j!`` at ``k`` steps after the last computed one, whose derivatives
``d_j`` are recursive finite differences of the last ``order + 1`` computed residuals,
``d_{j+1} = (d_j - d_j at the computed step before) / (steps between them)``: the authors' code and
diffusers' ``TaylorSeerCacheConfig`` (the default, ``series="taylor"``). ``series="newton"`` evaluates
Newton's divided-difference polynomial through the same points instead: exact when the residual is a
polynomial of degree <= ``order`` in the step index. Both agree at ``order=1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import BranchInfo, OnBaseSchedule, Policy
from .static import Static


def newton_extrapolate(
    history: list[tuple[int, tuple[torch.Tensor, ...]]], step: int, order: int
) -> tuple[torch.Tensor, ...]:
    """Value at ``step`` of the polynomial of degree ``<= order`` through the last ``order + 1``
    ``(step, values)`` points (fewer points: lower degree; one point: that value)."""
    points = history[-(order + 1):]
    xs = [float(x) for x, _ in points]
    out = []
    for index in range(len(points[-1][1])):
        # Divided-difference table, computed in float32 for accuracy, returned in the value's dtype.
        column = [values[index].float() for _, values in points]
        coefficients = [column[0]]
        for level in range(1, len(points)):
            column = [
                (column[i + 1] - column[i]) / (xs[i + level] - xs[i]) for i in range(len(column) - 1)
            ]
            coefficients.append(column[0])
        result = coefficients[-1]
        for level in range(len(coefficients) - 2, -1, -1):
            result = result * (step - xs[level]) + coefficients[level]
        out.append(result.to(points[-1][1][index].dtype))
    return tuple(out)


def taylor_extrapolate(
    history: list[tuple[int, tuple[torch.Tensor, ...]]], step: int, order: int
) -> tuple[torch.Tensor, ...]:
    """The authors' (and diffusers') forecast at ``step`` from the last ``order + 1`` ``(step, values)``
    points: derivatives as recursive finite differences, then the Taylor sum ``sum_j d_j k**j / j!``."""
    points = history[-(order + 1):]
    out = []
    for index in range(len(points[-1][1])):
        factors: list[torch.Tensor] = []
        last = None
        for x, values in points:  # in float32, returned in the value's dtype
            new = [values[index].float()]
            if last is not None:
                delta = float(x - last)
                for j in range(min(order, len(factors))):
                    new.append((new[j] - factors[j]) / delta)
            factors, last = new, x
        offset = float(step - last)
        result, coefficient = factors[0], 1.0
        for j in range(1, len(factors)):
            coefficient *= offset / j
            result = result + factors[j] * coefficient
        out.append(result.to(points[-1][1][index].dtype))
    return tuple(out)


SERIES = ("taylor", "newton")


@dataclass(frozen=True)
class TaylorSeer(OnBaseSchedule):
    """Forecast reused residuals with an order-``order`` Taylor series, on ``base``'s schedule.

    ``base`` decides which steps (and branches) compute: ``Static(interval=3)`` by default, or any
    policy, ``FirstBlockCache`` included (cache-dit pairs TaylorSeer with DBCache). Its state is the
    base's.

    >>> TaylorSeer(base=Static(interval=2), order=1).history(None)
    2
    """

    base: Policy = field(default_factory=lambda: Static(interval=3))
    order: int = 2
    series: str = "taylor"  # "taylor": the authors' and diffusers' forecast; "newton": the interpolating polynomial

    def __post_init__(self) -> None:
        if self.series not in SERIES:
            raise ValueError(f"TaylorSeer(series={self.series!r}): valid: {', '.join(SERIES)}")
        if self.order not in (1, 2):
            raise ValueError(f"TaylorSeer(order={self.order!r}): order must be 1 or 2")
        self._check_base()

    # What a reused branch adds.
    def history(self, branch: BranchInfo) -> int:
        return self.order + 1

    def forecast(self, ctx, state, branch, history):
        extrapolate = taylor_extrapolate if self.series == "taylor" else newton_extrapolate
        return extrapolate(history, ctx.step, self.order)
