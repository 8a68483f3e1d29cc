"""Train the reference video DiT on procedural clips, reproducibly, on a CPU in about an hour.

    python -m adacache_fx.reference.train --minutes 60 --out adacache_fx/reference/weights.safetensors

Fresh clips every step (the generator is cheap), epsilon prediction with diffusers' DDPM scheduler
(cosine betas), captions dropped 10% of the time for classifier-free guidance. Writes the weights as
safetensors, and the loss curve as JSON and PNG beside them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import encode_captions, make_dataset
from .model import ReferenceConfig, build, empty_caption, save


def train(
    out: str | Path,
    config: ReferenceConfig = ReferenceConfig(),
    *,
    steps: int | None = None,
    minutes: float | None = 60.0,
    batch: int = 16,
    lr: float = 4e-4,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Train until ``steps`` or ``minutes`` (whichever comes first); returns the loss record."""
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    transformer, encoder = build(config)
    transformer.train()
    encoder.train()
    scheduler = DDPMScheduler(num_train_timesteps=config.train_timesteps, beta_schedule="squaredcos_cap_v2")
    params = list(transformer.parameters()) + list(encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    total = steps if steps is not None else 10**9
    warmup = 200
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(total=steps, desc="training", disable=not progress)
    step = 0
    while step < total and (minutes is None or time.perf_counter() - start < 60 * minutes):
        videos, specs = make_dataset(batch, seed=seed * 1_000_003 + step, frames=config.frames, size=config.size)
        tokens, mask = encode_captions(specs, max_len=config.max_tokens)
        drop = torch.rand(batch) < 0.1
        empty_tokens, empty_mask = empty_caption(tokens, mask)
        tokens = torch.where(drop[:, None], empty_tokens, tokens)
        mask = torch.where(drop[:, None], empty_mask, mask)
        noise = torch.randn_like(videos)
        t = torch.randint(0, config.train_timesteps, (batch,))
        noisy = scheduler.add_noise(videos, noise, t)
        prediction = transformer(
            hidden_states=noisy, encoder_hidden_states=encoder(tokens, mask), timestep=t,
            enable_temporal_attentions=True, return_dict=False,
        )[0]
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss))
        step += 1
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    bar.close()
    seconds = time.perf_counter() - start
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save(out, transformer.eval(), encoder.eval(), config)
    record = {"steps": step, "seconds": round(seconds, 1), "batch": batch, "lr": lr, "seed": seed,
              "final_loss_mean_100": float(np.mean(losses[-100:])) if losses else None, "losses": losses}
    out.with_suffix(".loss.json").write_text(json.dumps(record))
    _plot(losses, out.with_suffix(".loss.png"))
    return record


def _plot(losses: list[float], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    window = max(1, len(losses) // 100)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid") if losses else []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, alpha=0.3, label="loss")
    ax.plot(range(window - 1, window - 1 + len(smooth)), smooth, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("epsilon MSE")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="adacache_fx/reference/weights.safetensors")
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    record = train(args.out, steps=args.steps, minutes=args.minutes, batch=args.batch, seed=args.seed)
    print(f"{record['steps']} steps in {record['seconds']} s; mean loss of the last 100: {record['final_loss_mean_100']}")


if __name__ == "__main__":
    main()
