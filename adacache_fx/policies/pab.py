"""Pyramid Attention Broadcast (PAB): reuse attention outputs inside a middle window of the schedule.

Attention outputs change little in the middle of sampling, and the less the more global the
attention: cross attention (to fixed text) least, then temporal, then spatial. Inside the window a
branch of a kind with broadcast range ``g`` computes on steps whose index is a multiple of ``g``
(counted from the generation's first step, as the authors' code and diffusers' hook count; see
``restart_in_window``) and reuses its cached residual in between; outside the window everything computes. MLPs always compute,
and so does any region that contains an MLP (Flux's single blocks fuse attention and MLP into one
region): PAB recomputes MLPs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

from ..errors import PolicyError
from ..kinds import CROSS_ATTENTION, JOINT_ATTENTION, MLP, SELF_ATTENTION, TEMPORAL_ATTENTION
from .base import BranchInfo, Plan, Policy, StepContext

#: Which PAB range governs each attention kind (joint text+image attention counts as spatial).
KIND_GROUPS: Mapping[str, str] = MappingProxyType(
    {
        SELF_ATTENTION: "spatial",
        JOINT_ATTENTION: "spatial",
        TEMPORAL_ATTENTION: "temporal",
        CROSS_ATTENTION: "cross",
    }
)


@dataclass
class PABState:
    """One generation of :class:`PAB`: where the window began and the model's timestep scale."""

    entered: int | None = None
    timestep_scale: float | None = None


@dataclass(frozen=True)
class PAB(Policy):
    """Broadcast attention residuals for ``spatial``/``temporal``/``cross`` steps inside a window.

    ``spatial``, ``temporal``, ``cross``: broadcast ranges (steps between recomputes) for self or
    joint, temporal and cross attention; ``None`` always computes that kind.

    ``window``: the timestep range, exclusive at both ends and in the scheduler's 0..1000 units, in
    which attention is broadcast (diffusers' default ``(100, 800)``); outside it everything
    computes. Models whose timestep argument is normalised to [0, 1] (Flux and SD3 take t / 1000)
    are detected from the generation's first timestep (``|t| <= 1``) and compared as ``t * 1000``.
    ``window_steps=(start, stop)``, when given, replaces ``window`` with step indices
    ``start <= step < stop``: use it for models without a meaningful timestep.

    The broadcast count is the step index, as in the authors' code and diffusers' hook (which count
    calls: the same with one call per step): a branch may reuse on the window's first step the residual
    its last step outside the window computed. ``restart_in_window=True`` restarts the count at the
    window's first step instead, so every branch computes there.
    """

    spatial: int | None = 2
    temporal: int | None = 4
    cross: int | None = 6
    window: tuple[float, float] = (100.0, 800.0)
    window_steps: tuple[int, int] | None = None
    # The broadcast period counts steps from the generation's first step, as the authors' code and
    # diffusers' hook count calls; True: from the window's first step (a window opening on an odd
    # step then computes there).
    restart_in_window: bool = False

    def __post_init__(self) -> None:
        for name in ("spatial", "temporal", "cross"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(
                    f"PAB({name}={value!r}): a broadcast range must be an int >= 1 (steps between "
                    f"recomputes), or None to always compute {name} attention"
                )
        if self.spatial is None and self.temporal is None and self.cross is None:
            raise ValueError(
                "PAB: spatial, temporal and cross are all None, so nothing is ever reused; use NoCache()"
            )
        try:
            low, high = (float(v) for v in self.window)
        except (TypeError, ValueError):
            raise ValueError(f"PAB(window={self.window!r}): expected two timesteps (low, high)") from None
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"PAB(window={self.window!r}): expected finite timesteps with low < high")
        object.__setattr__(self, "window", (low, high))
        if self.window_steps is not None:
            steps = tuple(self.window_steps)
            if (
                len(steps) != 2
                or any(isinstance(s, bool) or not isinstance(s, int) for s in steps)
                or not 0 <= steps[0] < steps[1]
            ):
                raise ValueError(
                    f"PAB(window_steps={self.window_steps!r}): expected two step indices "
                    "(start, stop) with 0 <= start < stop"
                )
            object.__setattr__(self, "window_steps", (steps[0], steps[1]))

    # -- branches ----------------------------------------------------------------------------------
    def broadcast_ranges(self, branch: BranchInfo) -> tuple[int, ...] | None:
        """The ranges governing a branch, or None when it always computes.

        A region reuses only when every kind it contains would: an MLP inside, a kind PAB does not
        broadcast, or a kind whose range is None or 1 makes it compute every step.
        """
        kinds = set(branch.tags) | {branch.kind}
        if MLP in kinds:
            return None
        ranges = set()
        for kind in kinds:
            group = KIND_GROUPS.get(kind)
            value = getattr(self, group) if group is not None else None
            if value is None or value == 1:
                return None
            ranges.add(value)
        return tuple(sorted(ranges))

    def caches(self, branch: BranchInfo, state: Any = None) -> bool:
        return self.broadcast_ranges(branch) is not None

    def new_state(self) -> PABState:
        return PABState()

    def validate(self, branches: tuple[BranchInfo, ...]) -> None:
        """Fail when no branch can ever be broadcast (PAB would silently do nothing)."""
        if branches and not any(self.caches(b) for b in branches):
            present = sorted({tag for b in branches for tag in b.tags} | {b.kind for b in branches})
            raise PolicyError(
                f"PAB(spatial={self.spatial}, temporal={self.temporal}, cross={self.cross}) has no "
                f"attention branch to broadcast in this model; its branches are of kinds: "
                f"{', '.join(present)} (regions containing an MLP always compute)"
            )

    # -- schedule ----------------------------------------------------------------------------------
    def window_index(self, ctx: StepContext, state: PABState) -> int | None:
        """The step's count for the broadcast period (the step index, or with ``restart_in_window``
        the steps since the window began), or None outside the window."""
        if self.window_steps is not None:
            start, stop = self.window_steps
            if not start <= ctx.step < stop:
                return None
            return ctx.step - start if self.restart_in_window else ctx.step
        if ctx.timestep is None:
            raise PolicyError(
                f"PAB(window={self.window}) needs the model's timestep, but this model's call has no "
                "timestep argument; pass window_steps=(start, stop) to give the window in steps"
            )
        if state.timestep_scale is None:
            state.timestep_scale = 1000.0 if abs(ctx.timestep) <= 1.0 else 1.0
        t = ctx.timestep * state.timestep_scale
        low, high = self.window
        if not low < t < high:
            state.entered = None
            return None
        if state.entered is None:
            state.entered = ctx.step
        return ctx.step - state.entered if self.restart_in_window else ctx.step

    def plan(self, ctx: StepContext, state: PABState) -> Plan:
        index = self.window_index(ctx, state)
        if index is None:
            return Plan.compute_all()
        reuse = []
        for branch in ctx.branches:
            ranges = self.broadcast_ranges(branch)
            if ranges is not None and all(index % g != 0 for g in ranges):
                reuse.append(branch.id)
        return Plan.reuse_only(reuse)
