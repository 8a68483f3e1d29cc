"""EasyCache (arXiv 2507.02860): skip the block stack while a run-time error estimate stays small.

No offline profiling: every generation estimates, from its own computed steps, how fast the model's
output moves against its input, the *transformation rate*

    k = mean|o_c - o_p| / mean|x_c - x_p|

between the two latest steps that computed (``p`` then ``c``; ``x`` the model's input latent,
``o`` its output). A later step ``t`` would change the output by about ``k * mean|x_t - x_{t-1}|``,
relative to the last computed output ``mean|o_c|``; these relative changes are summed over the steps
skipped since ``c``, and the step reuses every branch while the sum stays below ``threshold``
(otherwise it computes and the sum restarts at 0). The first ``warmup`` steps and the last
``cooldown`` steps (when the step count is known) always compute; with no rate yet (fewer than two
computed steps) a step computes.

The rule, its defaults (threshold 0.025, 5 warm-up steps, the last step computes) and the order of
its updates are the authors' (H-EmbodVis/EasyCache, ``EasyCache4HunyuanVideo/
easycache_sample_video.py``); with several calls per step (separate cond and uncond calls, as their
Wan scripts) the first call's input and output decide for the whole step. docs/algorithms/
easycache.md says how reusing differs from the paper's.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import torch

from ..errors import PolicyError
from .base import BranchInfo, Plan, Policy, StepContext, whole_step_reuse

#: The authors' published settings per model (threshold, warm-up steps). A setting fits the model and
#: step count it was tuned for; ``ax.calibrate`` fits the threshold on yours.
PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    # H-EmbodVis/EasyCache EasyCache4HunyuanVideo/easycache_sample_video.py (commit 313ae5f7):
    # thresh 0.025, ret_steps 5, 50 steps; README: 2.21x, PSNR 32.66 on VBench prompts (A800).
    "hunyuanvideo": dict(threshold=0.025, warmup=5),
    # EasyCache4Wan2.2/easycache_generate.py (commit 3149a412): --thresh_t2v 0.06, --ret_steps 7
    # (counted per cond/uncond pair there).
    "wan2.2-t2v-a14b": dict(threshold=0.06, warmup=7),
    # Same script: --thresh 0.05 for the TI2V-5B model, --ret_steps 7.
    "wan2.2-ti2v-5b": dict(threshold=0.05, warmup=7),
})


def mean_abs(tensor: torch.Tensor) -> torch.Tensor:
    """``mean|tensor|`` in float32, as a 0-d tensor."""
    return tensor.detach().float().abs().mean()


def mean_abs_change(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """``mean|current - previous|`` in float32, as a 0-d tensor."""
    return (current.detach().float() - previous.detach().float().to(current.device)).abs().mean()


def _ratio(num: float, den: float) -> float:
    """``num / den`` as the authors' tensor division gives it: 0/0 is NaN, x/0 is inf."""
    if den == 0.0:
        return math.nan if num == 0.0 else math.inf
    return num / den


@dataclass
class EasyCacheState:
    """One generation of :class:`EasyCache`: what the estimate needs from earlier steps."""

    previous_input: torch.Tensor | None = None  # x_{t-1}: the latest step's input, any step
    reference_input: torch.Tensor | None = None  # x_c: input of the latest computed step
    reference_output: torch.Tensor | None = None  # o_c: output of the latest computed step
    rate: float | None = None  # k, from the two latest computed steps
    accumulated: float = 0.0  # summed relative output change since the latest computed step
    step: int = -1  # the step the current decision is for
    computing: bool = True  # whether that step computes
    pending_input: torch.Tensor | None = None  # that step's input, until its output is seen
    #: ``(step, computed, accumulated, rate)`` per step (for inspection and tests)
    trace: list[tuple[int, bool, float, float | None]] = field(default_factory=list)
    reuse_for: tuple[tuple[BranchInfo, ...], Plan] | None = None


@dataclass(frozen=True)
class EasyCache(Policy):
    """Reuse every branch while the run-time estimate of the output's relative change since the
    last computed step, summed over the skipped steps, stays below ``threshold``.

    ``warmup``: leading steps that always compute (the authors' ``ret_steps``); ``cooldown``:
    trailing steps that always compute (when the step count is known). ``threshold=0`` never reuses.
    Published settings: :meth:`preset` (:data:`PRESETS`).

    >>> policy = EasyCache(threshold=0.1, warmup=2, cooldown=0)
    >>> xs = [torch.full((4,), v) for v in (10.0, 9.0, 8.0, 7.0, 6.0)]
    >>> os = [torch.full((4,), v) for v in (10.0, 11.0, 12.0, 13.0, 14.0)]
    >>> policy.simulate(xs, os)  # k = 1; step 2: 1/11 < 0.1 skips; step 3: 1/11 + 1/11 computes
    [True, True, False, True, False]
    """

    threshold: float = 0.025
    warmup: int = 5
    cooldown: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not math.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(f"EasyCache(threshold={self.threshold!r}): must be a finite number >= 0")
        for name in ("warmup", "cooldown"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"EasyCache({name}={value!r}): must be an int >= 0")

    # -- presets and copies -------------------------------------------------------------------
    @classmethod
    def preset(cls, model: str, **overrides: Any) -> "EasyCache":
        """The authors' published setting for ``model`` (:data:`PRESETS`); ``overrides`` replace any."""
        key = model.lower().replace("_", "-")
        if key not in PRESETS:
            raise PolicyError(
                f"EasyCache.preset({model!r}): no published setting by that name; known: "
                f"{', '.join(sorted(PRESETS))}"
            )
        return cls(**{**PRESETS[key], **overrides})

    def with_threshold(self, threshold: float) -> "EasyCache":
        """A copy with another threshold (for threshold sweeps during calibration)."""
        return dataclasses.replace(self, threshold=threshold)

    def new_state(self) -> EasyCacheState:
        return EasyCacheState()

    # -- pure decision logic, shared by the live path and simulate() ------------------------
    def forced(self, step: int, num_steps: int | None) -> bool:
        """Warm-up steps, and the last ``cooldown`` steps when the step count is known, compute."""
        return step < self.warmup or (num_steps is not None and step >= num_steps - self.cooldown)

    def decide_step(self, state: EasyCacheState, step: int, num_steps: int | None,
                    latent: torch.Tensor | None) -> bool:
        """Decide step ``step`` from its input ``latent`` and update ``state``: True to compute.

        The authors' order: forced steps reset the sum; without a previous input and output, or
        without a rate, the step computes (the sum is kept); otherwise the estimate is added and the
        step computes (and resets the sum) once it reaches the threshold. The previous input moves
        to this step's in every case.
        """
        if latent is None:
            compute = True
        elif self.forced(step, num_steps):
            compute, state.accumulated = True, 0.0
        elif (state.previous_input is None or state.reference_output is None
              or state.previous_input.shape != latent.shape):
            compute = True
        elif state.rate is None:
            compute = True
        else:
            change, norm = torch.stack((mean_abs_change(latent, state.previous_input),
                                        mean_abs(state.reference_output))).tolist()
            # A degenerate estimate (NaN from 0/0 or inf * 0) fails the test below: the step computes.
            state.accumulated += state.rate * _ratio(change, norm)
            if state.accumulated < self.threshold:
                compute = False
            else:
                compute, state.accumulated = True, 0.0
        state.previous_input = None if latent is None else latent.detach().clone()
        state.step, state.computing = step, compute
        state.pending_input = state.previous_input if compute else None
        state.trace.append((step, compute, state.accumulated, state.rate))
        return compute

    def update_rate(self, state: EasyCacheState, output: torch.Tensor) -> None:
        """A computed step's ``output`` arrived: new rate ``k`` against the previous computed step,
        which this step then replaces as the reference."""
        latent = state.pending_input
        state.pending_input = None
        if latent is None:
            return
        if (state.reference_output is not None and state.reference_input is not None
                and state.reference_output.shape == output.shape
                and state.reference_input.shape == latent.shape):
            out_change, in_change = torch.stack((mean_abs_change(output, state.reference_output),
                                                 mean_abs_change(latent, state.reference_input))).tolist()
            state.rate = _ratio(out_change, in_change)
        state.reference_input = latent
        state.reference_output = output.detach().clone()

    def simulate(self, latents: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor],
                 num_steps: int | None = None) -> list[bool]:
        """Compute flags per step from one generation's inputs and outputs (``latents[i]``,
        ``outputs[i]``: step i's first call), running the same :meth:`decide_step` and
        :meth:`update_rate` as a live generation (only computed steps' outputs are read).

        Recorded from an uncached run, this predicts the schedule of any threshold; a cached run's
        own latents drift a little from those (which is why ``ax.calibrate`` measures afterwards).
        ``num_steps``: for the cooldown (default: the sequences' length).
        """
        if len(latents) != len(outputs):
            raise ValueError(f"EasyCache.simulate: {len(latents)} latents for {len(outputs)} outputs")
        num_steps = len(latents) if num_steps is None else num_steps
        state, flags = self.new_state(), []
        for step, (latent, output) in enumerate(zip(latents, outputs)):
            compute = self.decide_step(state, step, num_steps, latent)
            if compute:
                self.update_rate(state, output)
            flags.append(compute)
        return flags

    # -- live path ------------------------------------------------------------------------------
    def folds(self) -> bool:
        return True  # a step reuses every branch of every block, or computes

    def plan(self, ctx: StepContext, state: EasyCacheState) -> Plan:
        compute = self.decide_step(state, ctx.step, ctx.num_steps, ctx.latent)
        if compute or not ctx.branches:
            return Plan.compute_all()
        return whole_step_reuse(self, ctx.branches, state)

    def observe_output(self, ctx: StepContext, state: EasyCacheState, slot: int, output: torch.Tensor) -> None:
        # The first call of a computed step updates the rate; a reused step's output is the cache's
        # (the authors keep neither), and later calls (uncond) follow the first's decision.
        if slot == 0 and state.computing and state.step == ctx.step:
            self.update_rate(state, output)
