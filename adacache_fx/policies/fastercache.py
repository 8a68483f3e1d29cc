"""FasterCache's attention reuse: reused attention residuals are extrapolated, not repeated.

``F_last + w * (F_last - F_prev) * k / gap``: ``k`` steps since the last compute, ``gap`` between the
last two computes, ``w`` ramping from 0 to 1 over the generation; attention computes every
``interval`` steps from ``start`` on. Its CFG-Cache (rebuilding the unconditional output from a
frequency-split difference) is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import BranchInfo, Plan, Policy, StepContext, validate_kinds
from .static import Static

ATTENTION_KINDS = ("self_attention", "cross_attention", "temporal_attention", "joint_attention")


@dataclass
class FasterCache(Policy):
    """FasterCache's attention reuse: compute every ``interval`` steps from ``start`` (a fraction of
    the generation) on, and extrapolate reused attention residuals linearly with a weight that ramps
    from 0 at ``start`` to 1 at the last step. MLP branches always compute (``kinds``: the reused ones).
    """

    interval: int = 2
    start: float = 0.3
    kinds: tuple[str, ...] = ATTENTION_KINDS
    num_steps: int | None = None
    _static: Static = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.start < 1.0:
            raise ValueError(f"FasterCache(start={self.start!r}): a fraction of the steps in [0, 1)")
        self.kinds = validate_kinds(self.kinds, "FasterCache")
        self._static = Static(interval=self.interval, warmup=1, cooldown=1, kinds=self.kinds)

    def caches(self, branch: BranchInfo) -> bool:
        return self._static.caches(branch) and "mlp" not in branch.tags

    def _steps(self, ctx: StepContext) -> int | None:
        return ctx.num_steps if ctx.num_steps is not None else self.num_steps

    def plan(self, ctx: StepContext) -> Plan:
        steps = self._steps(ctx)
        if steps is None:
            raise ValueError("FasterCache needs the step count: FasterCache(num_steps=N) or ax.generation(model, num_steps=N)")
        if ctx.step < int(self.start * steps) or self._static.is_compute_step(ctx):
            return Plan.compute_all()
        return Plan.reuse_only(b.id for b in ctx.branches if self.caches(b))

    def history(self, branch: BranchInfo) -> int:
        return 2

    def weight(self, step: int, num_steps: int) -> float:
        """The ramp: 0 at the first reusable step, 1 at the last step."""
        first = int(self.start * num_steps)
        return min(1.0, max(0.0, (step - first) / max(1, num_steps - 1 - first)))

    def forecast(self, ctx, branch, history):
        if len(history) < 2:
            return None
        (prev_step, prev), (last_step, last) = history[-2], history[-1]
        scale = self.weight(ctx.step, self._steps(ctx)) * (ctx.step - last_step) / (last_step - prev_step)
        return tuple(l + scale * (l - p) for l, p in zip(last, prev))
