"""TeaCache (arXiv 2411.19108): skip the whole block stack while the modulated input barely moves.

Each model call reads block 0's timestep-modulated input ``F_t`` before any block runs and measures
its relative L1 change against the same call slot's input of the previous step. The change is
rescaled by a polynomial fitted per model and accumulated; while the sum stays below ``delta`` every
branch reuses its cached residual (the whole stack is skipped), otherwise everything computes and the
sum restarts from zero. The first step and the last step (when the step count is known) always
compute. As in the authors' code, the previous input is replaced on every step, computed or not.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Sequence

import torch

from ..errors import PolicyError
from .base import LOCAL, InStepSignal, MetricGroup, Plan, Policy, StepContext

#: Published rescaling polynomials, highest degree first (np.polyval order), by normalised model
#: name. Each was fitted by the TeaCache authors on the modulated input of the model's block 0.
#: Tables the authors fitted on another indicator (the timestep embedding: Wan2.1, CogVideoX) are
#: left out: they do not apply to the signal this policy reads.
COEFFICIENT_TABLES: Mapping[str, tuple[float, ...]] = MappingProxyType(
    {
        # Open-Sora 1.2 (STDiT-v3): /work/shared/ALGORITHMS.md (TeaCache section), from the paper's
        # evaluation code; also in ali-vilab/TeaCache eval/teacache/experiments/opensora.py.
        "opensora": (217.546007, -118.329252, 26.8662585, -0.0459364272, 0.048442624),
        # Latte: /work/shared/ALGORITHMS.md (TeaCache section), from the paper's evaluation code.
        "latte": (-2464.34137, 308.044764, 80.7447667, -4.11385132, 0.111001402),
        # FLUX.1-dev: ali-vilab/TeaCache TeaCache4FLUX/teacache_flux.py
        # (read in zhajingjing/cse585, a copy of that repository, same path).
        "flux": (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01),
        # HunyuanVideo: ali-vilab/TeaCache TeaCache4HunyuanVideo/teacache_sample_video.py
        # (read in the fork wallkop/TeaCache, same path).
        "hunyuanvideo": (7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02),
        # LTX-Video 0.9.1: ali-vilab/TeaCache TeaCache4LTX-Video/teacache_ltx.py
        # (read in zhajingjing/cse585, same path).
        "ltxvideo": (2.14700694e01, -1.28016453e01, 2.31279151e00, 7.92487521e-01, 9.69274326e-03),
        # Mochi 1 preview: ali-vilab/TeaCache TeaCache4Mochi/teacache_mochi.py
        # (read in zhajingjing/cse585, same path).
        "mochi": (-3.51241319e03, 8.11675948e02, -6.09400215e01, 2.42429681e00, 3.05291719e-03),
    }
)


def _table_key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def l1_change(current: torch.Tensor, previous: torch.Tensor,
              group: MetricGroup = LOCAL) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean|current - previous|, mean|previous|)`` as float32 tensors: :func:`relative_l1`'s two
    terms, kept as tensors where the comparison must stay in a traced graph; means over every rank's
    elements of ``group`` (a context-parallel model's shards)."""
    prev = previous.float()
    return group.mean((current.float() - prev).abs(), prev.abs())


def relative_l1_below(current: torch.Tensor, previous: torch.Tensor, threshold: float,
                      group: MetricGroup = LOCAL) -> torch.Tensor:
    """``relative_l1(current, previous) < threshold`` as a bool tensor, for traced graphs: compared
    without dividing, with :func:`relative_l1`'s conventions (0/0 is 0, x/0 is inf)."""
    num, den = l1_change(current, previous, group)
    below = num < threshold * den
    if threshold > 0:
        below = below | ((num == 0) & (den == 0))
    return below


def relative_l1(current: torch.Tensor, previous: torch.Tensor, group: MetricGroup = LOCAL) -> float:
    """``mean|current - previous| / mean|previous|`` over the whole tensor, in float32.

    The indicator of TeaCache and First-Block-Cache; 0 when both are zero, inf when only
    ``previous`` is (so a policy computes rather than trusting a zero reference).
    """
    num, den = l1_change(current.detach(), previous.detach(), group)
    num_f, den_f = torch.stack((num, den)).tolist()  # one device sync for both
    if den_f == 0.0:
        return 0.0 if num_f == 0.0 else math.inf
    return num_f / den_f


def resolve_coefficients(coefficients: Sequence[float] | str | None) -> tuple[float, ...] | None:
    """Turn a table name or a coefficient sequence into a validated tuple (None: identity)."""
    if coefficients is None:
        return None
    if isinstance(coefficients, str):
        table = COEFFICIENT_TABLES.get(_table_key(coefficients))
        if table is None:
            raise PolicyError(
                f"TeaCache(coefficients={coefficients!r}): no published table by that name; known: "
                f"{', '.join(sorted(COEFFICIENT_TABLES))}. For another model, fit coefficients with "
                "ax.calibrate, or pass coefficients=None (no rescaling)."
            )
        return table
    try:
        values = tuple(float(c) for c in coefficients)
    except (TypeError, ValueError):
        raise ValueError(
            f"TeaCache(coefficients={coefficients!r}): expected a table name, a sequence of numbers "
            "(highest degree first) or None"
        ) from None
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(
            f"TeaCache(coefficients={coefficients!r}): need at least one finite coefficient "
            "(highest degree first, usually 5 for a 4th-order polynomial)"
        )
    return values


@dataclass
class _SlotState:
    previous: torch.Tensor | None = None
    accumulated: float = 0.0


@dataclass
class TeaCacheState:
    """One generation of :class:`TeaCache`: the last modulated input and the sum, per call slot."""

    slots: dict[int, _SlotState] = field(default_factory=dict)

    def accumulated(self, slot: int = 0) -> float:
        """The accumulated rescaled change of call slot ``slot`` (for inspection and tests)."""
        state = self.slots.get(slot)
        return state.accumulated if state is not None else 0.0


@dataclass(frozen=True)
class TeaCache(Policy):
    """Skip every block while the accumulated, rescaled change of the modulated input is < ``delta``.

    ``coefficients``: the rescaling polynomial, highest degree first (``np.polyval`` order), or the
    name of a published table (see :data:`COEFFICIENT_TABLES`: ``"open-sora"``, ``"latte"``,
    ``"flux"``, ``"hunyuanvideo"``, ``"ltxvideo"``, ``"mochi"``). ``None`` applies no rescaling
    (the raw relative L1 is accumulated); published tables only fit the checkpoints they were fitted
    on, so for any other model use ``ax.calibrate`` to fit coefficients. The authors' recommended
    ``delta`` differs per model and table (0.1/0.2 for Open-Sora and Latte, 0.25-0.8 for FLUX).

    >>> TeaCache(delta=0.2, coefficients="latte").rescale(0.0)
    0.111001402
    """

    delta: float = 0.1
    coefficients: Sequence[float] | str | None = None
    _poly: tuple[float, ...] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.delta, bool) or not isinstance(self.delta, (int, float)):
            raise ValueError(f"TeaCache(delta={self.delta!r}): delta must be a number >= 0")
        if not math.isfinite(self.delta) or self.delta < 0:
            raise ValueError(f"TeaCache(delta={self.delta!r}): delta must be a finite number >= 0")
        poly = resolve_coefficients(self.coefficients)
        object.__setattr__(self, "_poly", poly)
        if self.coefficients is not None and not isinstance(self.coefficients, str):
            object.__setattr__(self, "coefficients", poly)  # a tuple: the policy owns no caller's list

    # -- presets and copies -------------------------------------------------------------------
    @classmethod
    def slow(cls, model: Sequence[float] | str | None = None) -> "TeaCache":
        """The paper's quality-first setting (delta 0.1); ``model`` names a table or gives coefficients."""
        return cls(delta=0.1, coefficients=model)

    @classmethod
    def fast(cls, model: Sequence[float] | str | None = None) -> "TeaCache":
        """The paper's speed-first setting (delta 0.2); ``model`` names a table or gives coefficients."""
        return cls(delta=0.2, coefficients=model)

    def with_delta(self, delta: float) -> "TeaCache":
        """A copy with another threshold (for threshold sweeps during calibration)."""
        return dataclasses.replace(self, delta=delta)

    def with_coefficients(self, coefficients: Sequence[float] | str | None) -> "TeaCache":
        """A copy with another rescaling polynomial (e.g. one fitted by ax.calibrate)."""
        return dataclasses.replace(self, coefficients=coefficients)

    def new_state(self) -> TeaCacheState:
        return TeaCacheState()

    # -- pure decision logic, shared by the live path and simulate() ------------------------
    def rescale(self, indicator: float) -> float:
        """The fitted polynomial at ``indicator`` (Horner's rule; identity without coefficients)."""
        if self._poly is None:
            return float(indicator)
        value = 0.0
        for c in self._poly:
            value = value * indicator + c
        return value

    def forced(self, step: int, num_steps: int | None) -> bool:
        """First and last steps always compute (the last only when the step count is known)."""
        return step == 0 or (num_steps is not None and step >= num_steps - 1)

    def advance(
        self, accumulated: float, indicator: float | None, step: int, num_steps: int | None
    ) -> tuple[bool, float]:
        """One step of the rule: ``(compute, new accumulator)`` from the raw relative L1 ``indicator``.

        ``indicator`` None (no previous input of a matching shape) forces a compute.
        """
        if indicator is None or self.forced(step, num_steps):
            return True, 0.0
        accumulated += self.rescale(indicator)
        if accumulated < self.delta:
            return False, accumulated
        return True, 0.0

    def simulate(self, indicators: Sequence[float], num_steps: int) -> list[bool]:
        """Compute flags per step for raw indicators (``indicators[i]``: step i vs i-1; [0] unused).

        Runs the same :meth:`advance` as a live generation, so a calibrator can predict the schedule
        of any ``delta`` from one recorded run.
        """
        if len(indicators) != num_steps:
            raise ValueError(f"TeaCache.simulate: {len(indicators)} indicators for {num_steps} steps")
        accumulated, flags = 0.0, []
        for step in range(num_steps):
            indicator = None if step == 0 else float(indicators[step])
            compute, accumulated = self.advance(accumulated, indicator, step, num_steps)
            flags.append(compute)
        return flags

    # -- live path ------------------------------------------------------------------------------
    def folds(self) -> bool:
        return True  # a call reuses every branch of every block, or computes

    def in_step_signal(self) -> InStepSignal:
        return InStepSignal("modulated_input")

    def plan(self, ctx: StepContext, state: TeaCacheState) -> Plan:
        # Every call's decide() replaces this; compute when no signal could be read.
        return Plan.compute_all()

    def decide(self, ctx: StepContext, state: TeaCacheState, slot: int, signal: torch.Tensor) -> Plan:
        slot_state = state.slots.setdefault(slot, _SlotState())
        previous = slot_state.previous
        indicator = None
        if (
            previous is not None
            and previous.shape == signal.shape
            and not self.forced(ctx.step, ctx.num_steps)
        ):
            indicator = relative_l1(signal, previous, ctx.group)
        compute, slot_state.accumulated = self.advance(slot_state.accumulated, indicator, ctx.step, ctx.num_steps)
        slot_state.previous = signal.detach().clone()  # replaced every step, as in the authors' code
        if compute:
            return Plan.compute_all()
        return Plan.reuse_only(b.id for b in ctx.branches if self.caches(b, state))
