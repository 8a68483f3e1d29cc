"""A minimal denoising loop (diffusers scheduler, batched classifier-free guidance) for demos and benchmarks."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm


@dataclass
class SampleResult:
    latents: torch.Tensor
    seconds: float  # wall time of the transformer calls and scheduler steps
    step_seconds: list[float]


def sample(
    model: nn.Module,
    inputs: Callable[..., dict],
    num_steps: int = 20,
    guidance_scale: float = 4.0,
    seed: int = 0,
    progress: bool = True,
    desc: str = "sampling",
) -> SampleResult:
    """Run a DDIM loop of ``model`` (a diffusers DiT whose ``inputs(timestep, batch, seed)`` builds kwargs).

    Cond and uncond go as one batch of 2 (the uncond text is zeros), like diffusers pipelines do.
    """
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(num_steps)
    base = inputs(timestep=0.0, batch=1, seed=seed)
    latents = base["hidden_states"]
    text = base["encoder_hidden_states"]
    extra = {k: v for k, v in base.items() if k not in ("hidden_states", "encoder_hidden_states", "timestep")}
    text_pair = torch.cat([text, torch.zeros_like(text)])
    channels = latents.shape[1]
    step_seconds = []
    with torch.no_grad():
        for t in tqdm(scheduler.timesteps, desc=desc, disable=not progress, leave=False):
            start = time.perf_counter()
            out = model(
                hidden_states=torch.cat([latents, latents]),
                encoder_hidden_states=text_pair,
                timestep=t.to(torch.float32).expand(2),
                **extra,
            )
            prediction = (out.sample if hasattr(out, "sample") else out[0])[:, :channels]
            cond, uncond = prediction.chunk(2)
            guided = uncond + guidance_scale * (cond - uncond)
            latents = scheduler.step(guided, t, latents).prev_sample
            step_seconds.append(time.perf_counter() - start)
    return SampleResult(latents, sum(step_seconds), step_seconds)
