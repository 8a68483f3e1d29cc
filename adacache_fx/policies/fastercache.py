"""FasterCache: reused attention residuals are extrapolated, and (CFG-Cache) the unconditional half
of batched guidance is rebuilt from the conditional one on most steps.

Attention reuse: ``F_last + w * (F_last - F_prev) * k / gap``: ``k`` steps since the last compute,
``gap`` between the last two computes, ``w`` ramping from 0 to 1 over the generation; attention
computes every ``interval`` steps from ``start`` on.

CFG-Cache (``cfg_cache=True``): every full guidance step stores the output bias ``uncond - cond``,
split in the centred 2-D FFT of the output's last two (spatial) axes into a low-frequency disc of
radius ``min(H, W) // 5`` and the high-frequency rest. From ``cfg_start`` on, only every
``cfg_interval``-th step runs both halves; the others run the cond half and rebuild
``uncond = IFFT(FFT(cond) + w_low * bias_low + w_high * bias_high)``, where the low band is weighted
``1 + alpha`` in the first ``cfg_split`` of the steps and the high band ``1 + alpha`` after it (early
steps settle layout, late steps detail). With ``alpha = 0`` the rebuild adds the stored bias as is.
As in the authors' code and diffusers' hook, each rebuild keeps the weighted bands, so the weights
compound over consecutive skipped steps (``(1 + alpha)**k`` on the k-th); ``compound_weights=False``
weights the stored bias once, as the paper's formula reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import PolicyError
from .base import GUIDANCE_LAYOUTS, BranchInfo, Plan, Policy, StepContext, validate_kinds
from .static import Static

ATTENTION_KINDS = ("self_attention", "cross_attention", "temporal_attention", "joint_attention")


def low_frequency_mask(height: int, width: int, radius: int | None = None, device=None) -> torch.Tensor:
    """Boolean ``(H, W)`` disc around the centre of a shifted 2-D spectrum (``radius`` default
    ``min(H, W) // 5``, FasterCache's)."""
    radius = min(height, width) // 5 if radius is None else radius
    y = torch.arange(height, device=device).view(-1, 1) - height // 2
    x = torch.arange(width, device=device).view(1, -1) - width // 2
    return (y * y + x * x) <= radius * radius


def split_frequencies(x: torch.Tensor, radius: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The centred 2-D spectrum of ``x`` over its last two axes, split into (low band, high band);
    the two sum to the whole spectrum."""
    spectrum = torch.fft.fftshift(torch.fft.fft2(x.float()), dim=(-2, -1))
    mask = low_frequency_mask(x.shape[-2], x.shape[-1], radius, x.device)
    return spectrum * mask, spectrum * ~mask


def from_spectrum(spectrum: torch.Tensor) -> torch.Tensor:
    """Inverse of the centred 2-D FFT (real part)."""
    return torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1))).real


@dataclass
class FasterCacheState:
    """One generation of :class:`FasterCache`: the last guidance bias per output, split in bands."""

    bias: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)


@dataclass(frozen=True)
class FasterCache(Policy):
    """FasterCache: attention computes every ``interval`` steps from ``start`` (a fraction of the
    generation) on, reused attention residuals are extrapolated linearly with a weight ramping from
    0 at ``start`` to 1 at the last step; MLP branches always compute (``kinds``: the reused ones).

    ``cfg_cache=True`` adds CFG-Cache for pipelines that batch cond and uncond in one call, in the
    order ``cfg_layout`` (diffusers' pipelines: ``"uncond_first"``; the reference model:
    ``"cond_first"``): from ``cfg_start`` on, both halves run every ``cfg_interval`` steps and the
    other steps run the cond half only and rebuild the uncond output (see the module docstring).
    """

    interval: int = 2
    start: float = 0.3
    kinds: tuple[str, ...] = ATTENTION_KINDS
    num_steps: int | None = None
    cfg_cache: bool = False
    cfg_layout: str = "uncond_first"
    cfg_interval: int = 5
    cfg_start: float = 0.3
    cfg_split: float = 0.5
    alpha: float = 0.2
    radius: int | None = None
    # Each skipped step multiplies the stored bands by their weights again (so the weighting compounds
    # over consecutive skipped steps), as the authors' code and diffusers' hook do; False: the weights
    # apply once to the stored bias, as the paper writes the rebuild.
    compound_weights: bool = True
    _static: Static = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.start < 1.0:
            raise ValueError(f"FasterCache(start={self.start!r}): a fraction of the steps in [0, 1)")
        if not 0.0 <= self.cfg_start < 1.0 or not 0.0 <= self.cfg_split <= 1.0:
            raise ValueError(f"FasterCache(cfg_start={self.cfg_start!r}, cfg_split={self.cfg_split!r}): "
                             "fractions of the steps, cfg_start in [0, 1) and cfg_split in [0, 1]")
        if self.cfg_interval < 2:
            raise ValueError(f"FasterCache(cfg_interval={self.cfg_interval!r}): >= 2 (1 would never skip)")
        if self.cfg_layout not in GUIDANCE_LAYOUTS:
            raise ValueError(f"FasterCache(cfg_layout={self.cfg_layout!r}): one of {GUIDANCE_LAYOUTS}")
        object.__setattr__(self, "kinds", validate_kinds(self.kinds, "FasterCache"))
        object.__setattr__(self, "_static", Static(interval=self.interval, warmup=1, cooldown=1, kinds=self.kinds))

    def new_state(self) -> FasterCacheState:
        return FasterCacheState()

    def caches(self, branch: BranchInfo, state: Any = None) -> bool:
        return self._static.caches(branch) and "mlp" not in branch.tags

    def _steps(self, ctx: StepContext) -> int | None:
        return ctx.num_steps if ctx.num_steps is not None else self.num_steps

    def plan(self, ctx: StepContext, state: FasterCacheState) -> Plan:
        steps = self._steps(ctx)
        if steps is None:
            raise ValueError("FasterCache needs the step count: FasterCache(num_steps=N) or ax.generation(model, num_steps=N)")
        skip_uncond = self.skips_uncond(ctx.step, steps)
        if ctx.step < int(self.start * steps) or self._static.is_compute_step(ctx):
            return Plan(skip_uncond=skip_uncond)
        return Plan(frozenset(b.id for b in ctx.branches if self.caches(b)), skip_uncond=skip_uncond)

    # -- attention reuse -------------------------------------------------------------------------
    def history(self, branch: BranchInfo) -> int:
        return 2

    def weight(self, step: int, num_steps: int) -> float:
        """The ramp: 0 at the first reusable step, 1 at the last step."""
        first = int(self.start * num_steps)
        return min(1.0, max(0.0, (step - first) / max(1, num_steps - 1 - first)))

    def forecast(self, ctx, state, branch, history):
        if len(history) < 2:
            return None
        (prev_step, prev), (last_step, last) = history[-2], history[-1]
        scale = self.weight(ctx.step, self._steps(ctx)) * (ctx.step - last_step) / (last_step - prev_step)
        return tuple(l + scale * (l - p) for l, p in zip(last, prev))

    # -- CFG-Cache ---------------------------------------------------------------------------------
    def guidance_layout(self) -> str | None:
        return self.cfg_layout if self.cfg_cache else None

    def skips_uncond(self, step: int, num_steps: int) -> bool:
        """Whether step ``step`` runs the cond half only: from ``cfg_start`` on, all but every
        ``cfg_interval``-th step, and never the last step."""
        if not self.cfg_cache:
            return False
        first = int(self.cfg_start * num_steps)
        return step > first and (step - first) % self.cfg_interval != 0 and step < num_steps - 1

    def band_weights(self, step: int, num_steps: int) -> tuple[float, float]:
        """(low, high) band weights of the rebuilt bias at ``step``."""
        early = step < self.cfg_split * num_steps
        return (1.0 + self.alpha, 1.0) if early else (1.0, 1.0 + self.alpha)

    def observe_guidance(self, ctx: StepContext, state: FasterCacheState, output: int, cond: torch.Tensor,
                         uncond: torch.Tensor) -> None:
        bias = uncond - cond
        if bias.ndim < 4 and self.alpha != 0:
            raise PolicyError(
                f"FasterCache's CFG-Cache splits the guidance bias into frequency bands over the output's "
                f"last two (spatial) axes, but output {output} has shape {tuple(bias.shape)} with no such "
                "axes; use FasterCache(alpha=0) to reuse the bias without the split"
            )
        state.bias[output] = split_frequencies(bias, self.radius) if self.alpha != 0 else (bias, None)

    def rebuild_uncond(self, ctx: StepContext, state: FasterCacheState, output: int, cond: torch.Tensor) -> torch.Tensor:
        stored = state.bias.get(output)
        if stored is None:
            raise PolicyError(
                f"FasterCache skipped the unconditional half at step {ctx.step} before any full guidance "
                "step stored its bias; this is a bug in its schedule"
            )
        low, high = stored
        if high is None:  # alpha == 0: the bias as it was, no frequency split
            return cond + low.to(cond.dtype)
        w_low, w_high = self.band_weights(ctx.step, self._steps(ctx))
        low, high = w_low * low, w_high * high
        if self.compound_weights:
            state.bias[output] = (low, high)
        spectrum = torch.fft.fftshift(torch.fft.fft2(cond.float()), dim=(-2, -1))
        return from_spectrum(spectrum + low + high).to(cond.dtype)
