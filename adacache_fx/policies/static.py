"""Schedule-free baselines: never cache, and FORA's fixed-interval reuse."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import BranchInfo, Plan, Policy, StepContext, require_kinds_present, validate_kinds


@dataclass(frozen=True)
class NoCache(Policy):
    """Compute every branch every step. Outputs equal the untransformed model's.

    >>> NoCache().plan(None, None).reuse
    frozenset()
    """

    def caches(self, branch: BranchInfo, state: Any = None) -> bool:
        return False

    def plan(self, ctx: StepContext, state: Any) -> Plan:
        return Plan.compute_all()


@dataclass(frozen=True)
class Static(Policy):
    """FORA: compute on steps ``0, interval, 2*interval, ...`` and reuse the residuals in between.

    The first ``warmup`` steps and the last ``cooldown`` steps (when the step count is known) always
    compute. ``kinds`` restricts caching to branches of those kinds (e.g. ``("mlp",)``).

    >>> Static(interval=3, kinds=("mlp",))
    Static(interval=3, warmup=1, cooldown=1, kinds=('mlp',))
    """

    interval: int = 2
    warmup: int = 1
    cooldown: int = 1
    kinds: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"Static(interval={self.interval!r}): interval must be an int >= 1")
        if self.warmup < 0 or self.cooldown < 0:
            raise ValueError("Static: warmup and cooldown must be >= 0")
        object.__setattr__(self, "kinds", validate_kinds(self.kinds, "Static"))

    def caches(self, branch: BranchInfo, state: Any = None) -> bool:
        return self.kinds is None or branch.kind in self.kinds or bool(branch.tags & set(self.kinds))

    def validate(self, branches: tuple[BranchInfo, ...]) -> None:
        require_kinds_present(self.kinds, branches, f"Static(kinds={self.kinds})")

    def is_compute_step(self, ctx: StepContext) -> bool:
        if ctx.step < self.warmup or ctx.is_last(self.cooldown):
            return True
        return ctx.step % self.interval == 0

    def folds(self) -> bool:
        return self.kinds is None  # a step reuses every branch of every block, or none

    def plan(self, ctx: StepContext, state: Any) -> Plan:
        if self.is_compute_step(ctx):
            return Plan.compute_all()
        return Plan.reuse_only(b.id for b in ctx.branches if self.caches(b))
