"""Train the reference video DiT on procedural clips, reproducibly, on a CPU in about an hour.

    python -m adacache_fx.reference.train --out adacache_fx/reference/weights.safetensors

Fresh clips every step (the generator is cheap), clean-clip prediction (``ReferenceConfig.prediction_type``)
with diffusers' DDPM scheduler (cosine betas), captions dropped 10% of the time for classifier-free
guidance, and an exponential moving average of the weights (diffusers' ``EMAModel``), which is what is
saved. A fixed step count makes a run reproducible; ``--minutes`` only caps it. Writes the weights as
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
from .model import ReferenceConfig, build, empty_caption, save, video_noise


def train(
    out: str | Path,
    config: ReferenceConfig = ReferenceConfig(),
    *,
    steps: int | None = None,
    minutes: float | None = 60.0,
    batch: int = 32,
    lr: float = 1e-3,
    ema_decay: float = 0.999,
    seed: int = 0,
    save_every: int | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> dict:
    """Train until ``steps`` or ``minutes`` (whichever comes first); returns the loss record.

    ``device``: where to train ("cuda" trains the same recipe in minutes). Clips are rendered on the
    CPU from the same seeds everywhere; the noise and caption dropout are drawn on ``device``, so runs
    on different devices are each reproducible but not equal to one another.
    """
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    device = torch.device(device)
    model = build(config)
    transformer, encoder = model.transformer.to(device), model.encoder.to(device)
    transformer.train()
    encoder.train()
    scheduler = DDPMScheduler(num_train_timesteps=config.train_timesteps, beta_schedule="squaredcos_cap_v2",
                              prediction_type=config.prediction_type)
    params = list(transformer.parameters()) + list(encoder.parameters())
    ema = EMAModel(params, decay=ema_decay, use_ema_warmup=True, power=0.75)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    total = steps if steps is not None else 10**9
    warmup = 200
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(total=steps, desc="training", disable=not progress)
    step = 0
    while step < total and (minutes is None or time.perf_counter() - start < 60 * minutes):
        videos, specs = make_dataset(batch, seed=seed * 1_000_003 + step, frames=config.frames, size=config.size,
                                     grid=config.grid_layout)
        tokens, mask = encode_captions(specs, max_len=config.max_tokens)
        videos, tokens, mask = videos.to(device), tokens.to(device), mask.to(device)
        drop = torch.rand(batch, device=device) < 0.1
        empty_tokens, empty_mask = empty_caption(tokens, mask)
        tokens = torch.where(drop[:, None], empty_tokens, tokens)
        mask = torch.where(drop[:, None], empty_mask, mask)
        noise = video_noise(tuple(videos.shape), config, device=device)
        t = torch.randint(0, config.train_timesteps, (batch,), device=device)
        noisy = scheduler.add_noise(videos, noise, t)
        prediction = transformer(
            hidden_states=noisy, encoder_hidden_states=encoder(tokens, mask), timestep=t,
            enable_temporal_attentions=True, return_dict=False,
        )[0]
        target = {"epsilon": noise, "sample": videos}.get(config.prediction_type)
        if target is None:
            target = scheduler.get_velocity(videos, noise, t)
        loss = F.mse_loss(prediction, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        ema.step(params)
        losses.append(loss.item())
        step += 1
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        if save_every and step % save_every == 0 and step < total:
            # A snapshot of the EMA weights with its loss curve; equal to what `steps=step` would
            # give: the data, the noise and the learning-rate schedule do not depend on `steps`.
            ema.store(params)
            ema.copy_to(params)
            _write(Path(out).with_suffix(f".step{step}.safetensors"), model, losses, time.perf_counter() - start,
                   dict(batch=batch, lr=lr, ema_decay=ema_decay, seed=seed))
            ema.restore(params)
    bar.close()
    ema.copy_to(params)
    model.transformer.cpu()
    model.encoder.cpu()
    model.eval()
    return _write(Path(out), model, losses, time.perf_counter() - start,
                  dict(batch=batch, lr=lr, ema_decay=ema_decay, seed=seed))


def _write(path: Path, model, losses: list[float], seconds: float, settings: dict) -> dict:
    """Save the weights, and the loss record (JSON) and curve (PNG) beside them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save(path, model)
    record = {"steps": len(losses), "seconds": round(seconds, 1), **settings,
              "prediction_type": model.config.prediction_type,
              "final_loss_mean_100": float(np.mean(losses[-100:])) if losses else None, "losses": losses}
    path.with_suffix(".loss.json").write_text(json.dumps(record))
    _plot(losses, path.with_suffix(".loss.png"))
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
    ax.set_ylabel("MSE of the prediction target")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="adacache_fx/reference/weights.safetensors")
    parser.add_argument("--steps", type=int, default=4500, help="the shipped weights: 4500")
    parser.add_argument("--save-every", type=int, default=None, help="also save EMA snapshots every N steps")
    parser.add_argument("--minutes", type=float, default=None, help="stop early after this many minutes")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu (the shipped weights) or cuda")
    args = parser.parse_args()
    record = train(args.out, steps=args.steps, minutes=args.minutes, batch=args.batch, lr=args.lr, seed=args.seed,
                   save_every=args.save_every, device=args.device)
    print(f"{record['steps']} steps in {record['seconds']} s; mean loss of the last 100: {record['final_loss_mean_100']}")


if __name__ == "__main__":
    main()
