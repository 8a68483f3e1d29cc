"""Denoising-step tracking from the model's ``timestep`` argument, with no change to the caller.

Calls with the same timestep belong to one step; the k-th such call gets call slot k, so a pipeline
that runs cond and uncond as two calls keeps two separate caches (a batched cond+uncond call is one
call, slot 0). The first two distinct timesteps give the direction (diffusion counts down, some flow
models count up); a timestep that moves against it, or a step past ``num_steps``, starts a new
generation. Without a timestep argument every call is a step of its own.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CallEvent:
    new_generation: bool
    new_step: bool


class StepTracker:
    def __init__(self) -> None:
        self.generation = -1
        self.step = -1
        self.slot = 0
        self.timestep: float | None = None
        self.num_steps: int | None = None
        self.explicit = False  # inside ax.generation(): only the context starts generations
        self._direction = 0

    def start_generation(self, num_steps: int | None = None, explicit: bool = False) -> None:
        self.generation += 1
        self.step = -1
        self.slot = 0
        self.timestep = None
        self._direction = 0
        self.num_steps = num_steps
        self.explicit = explicit

    def on_call(self, timestep: float | None) -> CallEvent:
        """Advance on a model call; say whether it starts a generation and/or a step."""
        new_generation = False
        if self.generation < 0:
            self.start_generation()
            new_generation = True
        elif timestep is not None and timestep == self.timestep:
            self.slot += 1
            return CallEvent(False, False)
        elif not self.explicit and self.step >= 0:
            went_back = (
                timestep is not None
                and self.timestep is not None
                and self._direction != 0
                and (timestep - self.timestep) * self._direction < 0
            )
            past_end = self.num_steps is not None and self.step + 1 >= self.num_steps
            if went_back or past_end:
                self.start_generation()
                new_generation = True
        if timestep is not None and self.timestep is not None and self._direction == 0:
            self._direction = 1 if timestep > self.timestep else -1
        self.step += 1
        self.slot = 0
        self.timestep = timestep
        return CallEvent(new_generation, True)
