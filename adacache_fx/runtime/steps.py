"""Denoising steps and generations, read from the model's calls with no change to the caller.

A *step* is all model calls at one timestep; the k-th call of a step gets call slot k, so a pipeline
that runs cond and uncond as two calls keeps two caches (a batched cond+uncond call is one call,
slot 0). A *generation* is the run of steps from one starting latent. Caches never outlive it.

Where a generation starts, in order of authority:

1. ``ax.generation(model, num_steps=N)``: explicit; inside it nothing else starts a generation.
2. A diffusers pipeline: at the end of every ``__call__`` it resets its denoiser's stateful hooks
   (``maybe_free_model_hooks``); the runtime listens through a diffusers hook, so the next call
   starts a new generation (and the caches are freed right away). A ``cache_context`` whose
   ``step_index`` is 0 after later steps starts one too.
3. Otherwise, from the calls themselves:

   * a timestep that moves against the direction of the first two (diffusion counts down, some
     flow models count up), or a step past ``num_steps`` when known;
   * the same timestep as the last step, but a latent that differs from the last step's (two calls
     of one step see the same latent; a new 1-step generation at ``t=999`` after another does not);
   * a timestep that moves on, but a latent that is not a continuation of the last step: every
     sampler's next latent is, up to its added noise, a linear combination of the last latent and
     the model outputs of the last step (DDIM, Euler, flow matching, DPM-Solver). A least-squares
     fit of the new latent's rows on the rows of those tensors that leaves more than
     ``CONTINUATION_RESIDUAL`` (0.5) of its norm unexplained means fresh noise or a noised image:
     a new generation (img2img after an interrupted text-to-image run, say).

   Ancestral samplers add noise each step: with few steps that noise can exceed half the latent's
   norm, and each step then counts as a new generation: exact, but nothing is reused. The runtime
   warns when that keeps happening; wrap such loops in ``ax.generation()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import _disable_current_modes

#: Share of a new latent's norm that the last step's latent and outputs may leave unexplained for
#: the call to still continue the same generation (see the module docstring).
CONTINUATION_RESIDUAL = 0.5


@dataclass(frozen=True)
class CallEvent:
    new_generation: bool
    new_step: bool
    reason: str = ""  # why a new generation started, for the log


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().reshape(tensor.shape[0], -1).float() if tensor.ndim > 1 else tensor.detach().reshape(1, -1).float()


def unexplained_share(latent: torch.Tensor, basis: list[torch.Tensor]) -> float:
    """Largest share of a row's norm of ``latent`` that no linear combination of the rows of
    ``basis`` (tensors with as many elements per row, or whole multiples of it) explains.

    >>> x, eps = torch.randn(2, 64), torch.randn(2, 64)
    >>> unexplained_share(0.9 * x - 0.3 * eps, [x, eps]) < 1e-4
    True
    >>> unexplained_share(torch.randn(2, 64), [x, eps]) > 0.5
    True
    """
    target = _rows(latent)
    width = target.shape[1]
    vectors = []
    for tensor in basis:
        rows = _rows(tensor.to(target.device))
        if rows.shape[1] == width:
            vectors.append(rows)
        elif rows.shape[1] % width == 0:  # learned-sigma outputs carry twice the channels
            vectors.extend(rows.split(width, dim=1))
    if not vectors:
        return 1.0
    basis_rows = torch.cat(vectors).double()
    gram = basis_rows @ basis_rows.T
    projections = basis_rows @ target.double().T
    coefficients = torch.linalg.pinv(gram, hermitian=True) @ projections
    explained = (projections * coefficients).sum(0)
    norms = (target.double() ** 2).sum(1)
    share = ((norms - explained).clamp_min(0) / norms.clamp_min(1e-30)).sqrt()
    worst = float(share.max())
    return 0.0 if math.isnan(worst) else worst


@dataclass
class StepTracker:
    """Where one caller is: generation, step and call slot (see the module docstring)."""

    generation: int = -1
    step: int = -1
    slot: int = 0
    timestep: float | None = None
    num_steps: int | None = None
    explicit: bool = False  # inside ax.generation(): only the context starts generations
    _direction: int = 0
    _latent: torch.Tensor | None = None  # slot 0's latent of the current step
    _outputs: list[torch.Tensor] = field(default_factory=list)  # every call's output this step
    _ended: bool = False  # the pipeline said its call is over
    _context_step: int | None = None
    single_step_run: int = 0  # consecutive generations that ended after one step (heuristic only)

    def start_generation(self, num_steps: int | None = None, explicit: bool = False) -> None:
        if self.step == 0 and not explicit and not self.explicit:
            self.single_step_run += 1
        elif self.step > 0 or explicit:
            self.single_step_run = 0
        self.generation += 1
        self.step = -1
        self.slot = 0
        self.timestep = None
        self._direction = 0
        self._latent = None
        self._outputs = []
        self._ended = False
        self._context_step = None
        self.num_steps = num_steps
        self.explicit = explicit

    def end_pipeline_call(self) -> None:
        """A pipeline finished its ``__call__``: the next model call starts a new generation."""
        if not self.explicit:
            self._ended = True

    def _boundary(self, timestep: float | None, latent: torch.Tensor | None,
                  context_step: int | None) -> str:
        """Why this call starts a new generation, or "" when it continues the current one."""
        if self._ended:
            return "the pipeline's last call ended"
        if context_step is not None and context_step == 0 and self._context_step not in (None, 0):
            return "the pipeline's cache_context says step 0"
        if self.num_steps is not None and self.step + 1 >= self.num_steps and timestep != self.timestep:
            return f"{self.num_steps} steps done"
        if timestep is None or self.timestep is None:
            return ""
        if timestep == self.timestep:
            if latent is not None and self._latent is not None and not _same(latent, self._latent):
                return "the same timestep with another latent"
            return ""
        if self._direction != 0 and (timestep - self.timestep) * self._direction < 0:
            return "the timestep moved back"
        if latent is not None and self._latent is not None and self._outputs:
            share = unexplained_share(latent, [self._latent, *self._outputs])
            if share > CONTINUATION_RESIDUAL:
                return f"the latent is not a continuation of the last step ({share:.2f} of it unexplained)"
        return ""

    def on_call(self, timestep: float | None, latent: torch.Tensor | None = None,
                context_step: int | None = None) -> CallEvent:
        """Advance on a model call; say whether it starts a generation and/or a step. The checks
        are bookkeeping, not the model's work: they run outside any dispatch mode of the caller
        (a FlopCounterMode measuring the call does not count them)."""
        with _disable_current_modes():
            return self._on_call(timestep, latent, context_step)

    def _on_call(self, timestep: float | None, latent: torch.Tensor | None,
                 context_step: int | None) -> CallEvent:
        reason = ""
        if self.generation < 0:
            self.start_generation()
            reason = "first call"
        elif not self.explicit and self.step >= 0:
            reason = self._boundary(timestep, latent, context_step)
            if reason:
                self.start_generation()
        if context_step is not None:
            self._context_step = context_step
        new_generation = bool(reason)
        if not new_generation and timestep is not None and timestep == self.timestep:
            self.slot += 1
            return CallEvent(False, False)
        if timestep is not None and self.timestep is not None and self._direction == 0:
            self._direction = 1 if timestep > self.timestep else -1
        self.step += 1
        self.slot = 0
        self.timestep = timestep
        self._latent = None if latent is None or self.explicit else latent.detach().clone()
        self._outputs = []
        return CallEvent(new_generation, True, reason)

    def after_call(self, output: torch.Tensor | None) -> None:
        """Remember a call's output: the next step's latent is checked against it."""
        if output is not None and not self.explicit:
            with _disable_current_modes():
                self._outputs.append(output.detach().clone())


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))
