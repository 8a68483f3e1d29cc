"""Train the reference video DiT on procedural clips, reproducibly.

The bundled weights (6.5 minutes on one H100, sharing it with a second run; 4900 steps of 256 clips):

    python -m adacache_lab.reference.train --device cuda --steps 4900 --batch 256 \
        --out adacache_fx/reference/weights.safetensors

On a 2-core CPU the same run would take an estimated 11 hours (a 32-clip step takes about 1 s there).
The best CPU run within an hour (``--device cpu --processes 2 --batch 32 --steps 2600``: 49 minutes,
166k clips) gave clips whose shape the judge reads 44% and direction 35% of the time
(benchmarks/experiments/README.md), against 91% and 98% for the bundled weights
(``benchmarks/results/reference_eval.json``).

First the per-frame autoencoder (:mod:`.autoencoder`; skipped when ``latent_channels=0``, the
default), then the DiT on its latents (or pixels). Fresh clips every step (rendered ahead by
``--loader-workers`` processes), ``ReferenceConfig.prediction_type`` with diffusers' DDPM scheduler
(cosine betas), the learning rate decayed along a cosine to a tenth over a fixed step count, captions
dropped 10% of the time for classifier-free guidance, and an exponential moving average of the
weights (diffusers' ``EMAModel``), which is what is saved. ``--processes 2`` trains the DiT on two
data-parallel CPU processes. A fixed step count makes a run reproducible (on a GPU up to its
floating-point nondeterminism); ``--minutes`` only caps it. Writes the weights as safetensors, and
the loss curve as JSON and PNG beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import encode_captions, make_dataset
from .autoencoder import FrameAutoencoder, train_autoencoder, warmup_cosine
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
    autoencoder_steps: int = 2000,
    autoencoder: FrameAutoencoder | None = None,
    processes: int = 1,
    loader_workers: int = 0,
) -> dict:
    """Train until ``steps`` or ``minutes`` (whichever comes first); returns the loss record.

    ``device``: where to train ("cuda" trains the same recipe in minutes). Clips are rendered on the
    CPU from the same seeds everywhere; the noise and caption dropout are drawn on ``device``, so runs
    on different devices are each reproducible but not equal to one another.
    ``autoencoder``: a trained one to reuse (its state is copied in); otherwise one is trained first for
    ``autoencoder_steps`` steps on the CPU.
    ``processes``: data-parallel CPU processes for the DiT phase (gradients averaged over gloo every
    step; each draws its own ``batch`` clips). This model does not train faster with more torch
    threads, but two processes on two cores take about as long per step as one, so two process twice
    the clips per hour. ``processes=1`` is the single-process run, unchanged.
    ``loader_workers``: processes that render the clips ahead of the training step (a DataLoader over
    :class:`ClipStream`). On a GPU, rendering on the main process is the bottleneck; the clips, and
    so the run, are the same for any number of workers.
    """
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    if processes > 1 and torch.device(device).type != "cpu":
        raise ValueError("processes > 1 is for CPU training; on a GPU use processes=1")
    if loader_workers < 0:
        raise ValueError(f"loader_workers must be >= 0, got {loader_workers}")
    torch.manual_seed(seed)
    model = build(config)
    autoencoder_record = None
    if model.autoencoder is None:  # pixel space
        if autoencoder is not None:
            raise ValueError("config.latent_channels=0 trains on pixels; do not pass an autoencoder")
    elif autoencoder is not None:
        model.autoencoder.load_state_dict(autoencoder.state_dict())
    else:
        autoencoder_record = train_autoencoder(model.autoencoder, steps=autoencoder_steps, frames=config.frames,
                                               size=config.size, seed=seed, progress=progress)
    settings = dict(batch=batch, processes=processes, lr=lr, ema_decay=ema_decay, seed=seed,
                    autoencoder={k: v for k, v in (autoencoder_record or {}).items() if k != "losses"} or None)
    autoencoder_state = None if model.autoencoder is None else model.autoencoder.state_dict()
    job = dict(out=str(out), config=config, autoencoder_state=autoencoder_state, steps=steps,
               minutes=minutes, batch=batch, lr=lr, ema_decay=ema_decay, seed=seed, save_every=save_every,
               progress=progress, device=str(device), settings=settings, loader_workers=loader_workers)
    if processes == 1:
        return _train_dit(0, 1, job)
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:  # a free local port for the process group
        probe.bind(("127.0.0.1", 0))
        job["port"] = probe.getsockname()[1]
    job["threads"] = max(1, torch.get_num_threads() // processes)
    mp.spawn(_train_dit, args=(processes, job), nprocs=processes, join=True)
    return json.loads(Path(out).with_suffix(".loss.json").read_text())


def _train_dit(rank: int, world: int, job: dict) -> dict:
    """The DiT phase on one process (``rank`` of ``world``); rank 0 writes the files."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    if world > 1:
        import torch.distributed as dist

        torch.set_num_threads(job["threads"])
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{job['port']}", rank=rank, world_size=world)
    config, seed, batch, steps, minutes = job["config"], job["seed"], job["batch"], job["steps"], job["minutes"]
    device = torch.device(job["device"])
    torch.manual_seed(seed)
    model = build(config)  # the same initial weights on every rank
    if model.autoencoder is not None:
        model.autoencoder.load_state_dict(job["autoencoder_state"])
        model.autoencoder.eval().requires_grad_(False).to(device)
    # The DiT phase draws from a fresh seed (its own per rank), so it is the same whether the
    # autoencoder was trained here or passed in.
    torch.manual_seed(seed + 1 + 7919 * rank)
    transformer, encoder = model.transformer.to(device), model.encoder.to(device)
    transformer.train()
    encoder.train()
    scheduler = DDPMScheduler(num_train_timesteps=config.train_timesteps, beta_schedule="squaredcos_cap_v2",
                              prediction_type=config.prediction_type)
    params = list(transformer.parameters()) + list(encoder.parameters())
    ema = EMAModel(params, decay=job["ema_decay"], use_ema_warmup=True, power=0.75)
    optimizer = torch.optim.AdamW(params, lr=job["lr"], weight_decay=0.0)
    total = steps if steps is not None else 10**9
    warmup = 200
    if steps is None:
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    else:
        schedule = warmup_cosine(optimizer, steps, warmup)
    out, settings, save_every = Path(job["out"]), job["settings"], job["save_every"]
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(total=steps, desc="training", disable=not job["progress"] or rank > 0)
    step = 0
    clips = ClipStream(config, batch, seed, rank, world, total)
    workers = job["loader_workers"]
    if workers:
        # Its own generator: the workers' base seed must not be drawn from the global RNG, which
        # draws the training noise (the clips themselves are seeded by step).
        clips = torch.utils.data.DataLoader(clips, batch_size=None, num_workers=workers, prefetch_factor=4,
                                            pin_memory=device.type == "cuda", generator=torch.Generator())
    for videos, tokens, mask in clips:  # ClipStream ends after `total` steps
        videos = videos.to(device, non_blocking=True)
        tokens, mask = tokens.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        if model.autoencoder is not None:
            with torch.no_grad():
                videos = model.autoencoder.encode(videos)  # the DiT's data: latents in [-1, 1]
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
        stop = minutes is not None and time.perf_counter() - start >= 60 * minutes
        if world > 1:
            loss, stop = _average_gradients(params, loss.detach(), stop, world)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        ema.step(params)
        losses.append(loss.item())
        step += 1
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        if rank == 0 and save_every and step % save_every == 0 and step < total:
            # A snapshot of the EMA weights with its loss curve, mid-run (the learning rate has not
            # decayed yet, so it is not what `steps=step` would give).
            ema.store(params)
            ema.copy_to(params)
            _write(out.with_suffix(f".step{step}.safetensors"), model, losses, time.perf_counter() - start, settings)
            ema.restore(params)
        if stop:
            break
    bar.close()
    ema.copy_to(params)
    for module in model.modules().values():
        module.cpu()
    model.eval()
    record = _write(out, model, losses, time.perf_counter() - start, settings) if rank == 0 else {}
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return record


class ClipStream(torch.utils.data.IterableDataset):
    """The training clips of one process, step by step: step ``s`` of ``rank`` renders
    ``make_dataset(batch, seed * 1_000_003 + s * world + rank)`` with its encoded captions.

    Under a DataLoader with ``W`` workers, worker ``w`` renders steps ``w, w + W, ...``; the loader
    hands them back in step order, so the stream is the same for any ``W``.
    """

    def __init__(self, config: ReferenceConfig, batch: int, seed: int, rank: int = 0, world: int = 1,
                 steps: int = 10**9) -> None:
        self.config, self.batch, self.seed, self.rank, self.world, self.steps = config, batch, seed, rank, world, steps

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        first, stride = (0, 1) if info is None else (info.id, info.num_workers)
        for step in range(first, self.steps, stride):
            yield self.clips(step)

    def clips(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        config = self.config
        videos, specs = make_dataset(self.batch, seed=self.seed * 1_000_003 + step * self.world + self.rank,
                                     frames=config.frames, size=config.size, grid=config.grid_layout)
        tokens, mask = encode_captions(specs, max_len=config.max_tokens)
        return videos, tokens, mask


def _average_gradients(params: list[torch.Tensor], loss: torch.Tensor, stop: bool, world: int
                       ) -> tuple[torch.Tensor, bool]:
    """One all-reduce for every gradient, the loss and the stop votes: gradients and loss averaged
    over the processes; stop when any process's time is up (so all leave the loop together)."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [loss.reshape(1), torch.tensor([float(stop)])])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = (flat[offset:offset + g.numel()] / world).view_as(g)
        offset += g.numel()
    return flat[offset] / world, bool(flat[offset + 1] > 0)


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
    parser.add_argument("--steps", type=int, default=4900, help="the bundled weights: 4900")
    parser.add_argument("--save-every", type=int, default=None, help="also save EMA snapshots every N steps")
    parser.add_argument("--minutes", type=float, default=None, help="stop early after this many minutes")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=256, help="the bundled weights: 256")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda (the bundled weights; the default where there is one) or cpu")
    parser.add_argument("--autoencoder-steps", type=int, default=2000, help="latent configs only (latent_channels > 0)")
    parser.add_argument("--loader-workers", type=int, default=None,
                        help="processes rendering clips ahead of the step (default: on a GPU, one per CPU "
                             "core but one, at most 8; on a CPU none). The clips are the same for any number")
    parser.add_argument("--processes", type=int, default=1,
                        help="data-parallel CPU processes for the DiT (2 on a 2-core CPU: twice the clips per hour)")
    args = parser.parse_args()
    if args.loader_workers is None:
        on_gpu = torch.device(args.device).type == "cuda"
        args.loader_workers = min(8, max(0, (os.cpu_count() or 1) - 1)) if on_gpu else 0
    record = train(args.out, steps=args.steps, minutes=args.minutes, batch=args.batch, lr=args.lr, seed=args.seed,
                   save_every=args.save_every, device=args.device, autoencoder_steps=args.autoencoder_steps,
                   processes=args.processes, loader_workers=args.loader_workers)
    print(f"{record['steps']} steps in {record['seconds']} s; mean loss of the last 100: {record['final_loss_mean_100']}")


if __name__ == "__main__":
    main()
