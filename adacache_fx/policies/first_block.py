"""First-Block-Cache / DBCache: run the first blocks, and skip the rest while their residual is stable.

Each model call runs blocks at depth ``< blocks`` (``Fn``), then compares the stream's change over
them with the same call slot's change at the last call that computed everything (as ParaAttention
and diffusers do: the reference moves only on computing calls, so slow drift cannot hide behind
small per-step changes). Below ``threshold`` every later block reuses its cached residuals, except
the last ``tail_blocks`` (DBCache's ``Bn``), which always compute to correct the output.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import PolicyError
from .base import LOCAL, BranchInfo, InStepSignal, MetricGroup, Plan, Policy, StepContext
from .teacache import relative_l1, relative_l1_below


@dataclass
class FirstBlockState:
    """One generation of :class:`FirstBlockCache`: the reference residual of each call slot."""

    previous: dict[int, torch.Tensor] = field(default_factory=dict)
    num_depths: int | None = None  # blocks per model call, once the model's branches are known
    reuse_for: tuple[tuple[BranchInfo, ...], Plan] | None = None


@dataclass(frozen=True)
class FirstBlockCache(Policy):
    """Reuse blocks ``blocks .. depths - tail_blocks - 1`` while the first blocks' residual changes
    by less than ``threshold`` (relative L1) since the last computing call.

    The first ``warmup`` steps and the last ``cooldown`` steps (when the step count is known) always
    compute.

    >>> FirstBlockCache(threshold=0.1, tail_blocks=1).in_step_signal()
    InStepSignal(kind='first_blocks_residual', blocks=1)
    """

    threshold: float = 0.08
    blocks: int = 1
    tail_blocks: int = 0
    warmup: int = 0
    cooldown: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise ValueError(f"FirstBlockCache(threshold={self.threshold!r}): must be a number >= 0")
        if not math.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(f"FirstBlockCache(threshold={self.threshold!r}): must be a finite number >= 0")
        for name, low in (("blocks", 1), ("tail_blocks", 0), ("warmup", 0), ("cooldown", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"FirstBlockCache({name}={value!r}): must be an int >= {low}")

    def with_threshold(self, threshold: float) -> "FirstBlockCache":
        """A copy with another threshold (for threshold sweeps during calibration)."""
        return dataclasses.replace(self, threshold=threshold)

    def new_state(self) -> FirstBlockState:
        return FirstBlockState()

    # -- model structure -------------------------------------------------------------------------
    def validate(self, branches: tuple[BranchInfo, ...]) -> None:
        """Check that some block is left to skip once the first and tail blocks always compute."""
        if not branches:
            return
        depths = max((b.depth for b in branches if not b.auxiliary), default=-1) + 1
        if self.blocks + self.tail_blocks >= depths:
            raise PolicyError(
                f"FirstBlockCache(blocks={self.blocks}, tail_blocks={self.tail_blocks}): the model has "
                f"{depths} blocks, so no block is left to reuse; lower blocks or tail_blocks"
            )

    def caches(self, branch: BranchInfo, state: FirstBlockState | None = None) -> bool:
        # The first blocks always compute; the tail too, once the model's depth is known. Deeper
        # lists' blocks (a text refiner) run before the decision: they compute.
        if branch.depth < self.blocks or branch.auxiliary:
            return False
        depths = state.num_depths if state is not None else None
        return depths is None or branch.depth < depths - self.tail_blocks

    def _reuse_plan(self, branches: tuple[BranchInfo, ...], state: FirstBlockState | None) -> Plan:
        memo = state.reuse_for if state is not None else None
        if memo is not None and memo[0] is branches:
            return memo[1]
        depths = max((b.depth for b in branches if not b.auxiliary), default=-1) + 1
        end = depths - self.tail_blocks
        plan = Plan.reuse_only(b.id for b in branches if self.blocks <= b.depth < end)
        if state is not None:
            state.reuse_for = (branches, plan)
            state.num_depths = depths if branches else None
        return plan

    # -- pure decision logic, shared by the live path and simulate() ------------------------
    def forced(self, step: int, num_steps: int | None) -> bool:
        """Warmup and cooldown steps always compute."""
        return step < self.warmup or (num_steps is not None and step >= num_steps - self.cooldown)

    def advance(
        self, previous: torch.Tensor | None, residual: torch.Tensor, step: int, num_steps: int | None,
        group: MetricGroup = LOCAL,
    ) -> tuple[bool, torch.Tensor | None]:
        """One call of the rule: ``(compute, new reference residual)``.

        No reference (or one of another shape) computes; the reference moves only when computing.
        """
        compute = (
            previous is None
            or previous.shape != residual.shape
            or self.forced(step, num_steps)
            or not relative_l1(residual, previous, group) < self.threshold
        )
        if compute:
            return True, residual.detach().clone()
        return False, previous

    def simulate(self, residuals: Sequence[torch.Tensor], num_steps: int) -> list[bool]:
        """Compute flags per step for one call slot's first-blocks residuals (``residuals[i]``: step i).

        Runs the same :meth:`advance` as a live generation, so on the same residuals it gives the
        live flags. Residuals recorded from a run that computed every step only approximate those
        of a cached run (reusing shifts the latent the first blocks see).
        """
        if len(residuals) != num_steps:
            raise ValueError(f"FirstBlockCache.simulate: {len(residuals)} residuals for {num_steps} steps")
        previous, flags = None, []
        for step, residual in enumerate(residuals):
            compute, previous = self.advance(previous, residual, step, num_steps)
            flags.append(compute)
        return flags

    # -- in-graph path (ax.compile(scope="model")) ------------------------------------------------
    def decide_in_graph(self, signal, reference, allow, group: MetricGroup = LOCAL):
        """:meth:`advance` as tensor operations: reuse when allowed and the relative L1 change of
        the first blocks' residual since the ``reference`` is below the threshold."""
        reuse = allow & relative_l1_below(signal, reference, self.threshold, group)
        return reuse, torch.where(reuse, reference, signal)

    def in_graph_branches(self, branches: tuple[BranchInfo, ...]) -> frozenset[str]:
        return self._reuse_plan(branches, None).reuse

    def in_graph_allow(self, ctx: StepContext) -> bool:
        return not self.forced(ctx.step, ctx.num_steps)

    def in_graph_state(self, state: FirstBlockState, slot: int) -> torch.Tensor | None:
        return state.previous.get(slot)

    # -- live path ------------------------------------------------------------------------------
    def folds(self) -> bool:
        return True  # the blocks after the first ones (but the tail) reuse together, every branch

    def in_step_signal(self) -> InStepSignal:
        return InStepSignal("first_blocks_residual", blocks=self.blocks)

    def plan(self, ctx: StepContext, state: FirstBlockState) -> Plan:
        # Every call's decide() replaces this; compute when no signal could be read.
        return Plan.compute_all()

    def decide(self, ctx: StepContext, state: FirstBlockState, slot: int, signal: torch.Tensor) -> Plan:
        compute, reference = self.advance(state.previous.get(slot), signal, ctx.step, ctx.num_steps, ctx.group)
        if reference is not None:
            state.previous[slot] = reference
        plan = self._reuse_plan(ctx.branches, state)
        return Plan.compute_all() if compute else plan
