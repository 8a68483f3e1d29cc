"""A small per-frame convolutional autoencoder: the reference DiT works on its latents, not on pixels.

Why: in pixel space with 8x8-pixel patches, the DiT's last linear layer has to draw every patch's 192
pixels, including a shape's edge at any sub-pixel offset. After an hour of CPU training the shipped
pixel model drew blobs broken along the patch grid (judge shape accuracy 0.28). Here a convolutional
decoder draws the edges, and the DiT only predicts a 4x-downsampled latent.

Design: 32x32x3 frames -> 8x8 x ``latent_channels``. ``tanh`` bounds the latents to [-1, 1], the range
DDIM's ``clip_sample`` clips to. During training the decoder also sees latents with added Gaussian
noise, so the small errors a diffusion model leaves in its latents decode to clean shapes.
Frames are coded independently; motion is the DiT's job.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = ["FrameAutoencoder", "train_autoencoder", "warmup_cosine"]


class FrameAutoencoder(nn.Module):
    """Videos ``(B, 3, T, H, W)`` in [-1, 1] <-> latents ``(B, latent_channels, T, H/4, W/4)`` in [-1, 1]."""

    downsample = 4

    def __init__(self, channels: int = 3, latent_channels: int = 8, width: int = 32) -> None:
        super().__init__()
        w = width
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, latent_channels, 1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_channels, 2 * w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.ConvTranspose2d(2 * w, w, 4, stride=2, padding=1), nn.SiLU(),
            nn.ConvTranspose2d(w, w, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(w, channels, 3, padding=1),
        )

    @staticmethod
    def _frames(videos: torch.Tensor) -> tuple[torch.Tensor, int]:
        if videos.dim() != 5:
            raise ValueError(f"expected videos (B, C, T, H, W), got shape {tuple(videos.shape)}")
        b, c, t, h, w = videos.shape
        return videos.transpose(1, 2).reshape(b * t, c, h, w), t

    @staticmethod
    def _videos(frames: torch.Tensor, t: int) -> torch.Tensor:
        n, c, h, w = frames.shape
        return frames.reshape(n // t, t, c, h, w).transpose(1, 2)

    def encode(self, videos: torch.Tensor) -> torch.Tensor:
        frames, t = self._frames(videos)
        if frames.shape[-1] % self.downsample or frames.shape[-2] % self.downsample:
            raise ValueError(f"frame size {tuple(frames.shape[-2:])} is not divisible by {self.downsample}")
        return self._videos(torch.tanh(self.encoder(frames)), t)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        frames, t = self._frames(latents)
        return self._videos(self.decoder(frames), t).clamp(-1, 1)

    def forward(self, videos: torch.Tensor, latent_noise: float = 0.0) -> torch.Tensor:
        z = self.encode(videos)
        if latent_noise > 0:
            z = z + latent_noise * torch.rand(z.shape[0], 1, 1, 1, 1, device=z.device) * torch.randn_like(z)
        frames, t = self._frames(z)
        return self._videos(self.decoder(frames), t)


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int, warmup: int
                  ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then a cosine decay to a tenth of the rate at ``steps``:
    the last steps of a short run refine at a small rate."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(
        (s + 1) / warmup, 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps - 1))))))


def train_autoencoder(
    autoencoder: FrameAutoencoder,
    *,
    steps: int = 2000,
    clips: int = 16,
    frames: int = 8,
    size: int = 32,
    grid: bool = False,
    lr: float = 2e-3,
    latent_noise: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Train ``autoencoder`` in place on fresh procedural clips (``clips`` per step); returns the loss record.

    The loss is the squared error of the reconstruction, with latents perturbed by up to
    ``latent_noise`` (see the module doc). (An absolute-error loss with noise up to 0.2 collapsed to the
    black background in 600 steps: the median pixel is background.)
    """
    from .data import make_dataset

    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(autoencoder.parameters(), lr=lr, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, steps, warmup=max(1, steps // 20))
    autoencoder.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step in tqdm(range(steps), desc="autoencoder", disable=not progress):
        videos, _ = make_dataset(clips, seed=10_000_019 * (seed + 1) + step, frames=frames, size=size, grid=grid)
        recon = autoencoder(videos, latent_noise=latent_noise)
        loss = F.mse_loss(recon, videos)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    autoencoder.eval()
    with torch.no_grad():
        held_out, _ = make_dataset(64, seed=7_000_003, frames=frames, size=size, grid=grid)
        z = autoencoder.encode(held_out)
        mse = F.mse_loss(autoencoder.decode(z), held_out).item()
    return {"steps": steps, "seconds": round(time.perf_counter() - start, 1), "losses": losses,
            "final_loss_mean_100": float(np.mean(losses[-100:])), "held_out_mse": mse,
            "latent_std": float(z.std())}
