"""Derive MoReg's motion normaliser (``REFERENCE_MOREG_SCALE``) for the bundled model.

MoReg's factor is ``(m_raw / scale) ** 8``: the authors set ``scale`` (0.385) for Open-Sora's latents.
This measures ``m_raw`` inside MoReg's window on calibration prompts (seed 9000007, held out from training; a third each static,
slow and fast; not the demo's or the bench's prompts) and prints its quantiles; the median is the
scale at which half the measurements raise the metric and half lower it.

    python benchmarks/experiments/moreg_scale.py [clips]
"""
import sys

import numpy as np

from adacache_fx.policies.adacache import AdaCache, MoReg
from adacache_lab.reference.bench import bench_prompts
from adacache_lab.reference.demo import DEFAULT_WEIGHTS, generate_clips
from adacache_lab.reference.model import load

clips = int(sys.argv[1]) if len(sys.argv) > 1 else 12
model = load(DEFAULT_WEIGHTS)
specs = bench_prompts(clips, model.config.frames, model.config.size, seed=9_000_007, grid=model.config.grid_layout)
runs = generate_clips(model, AdaCache.fast(30, moreg=MoReg(scale=1.0)), specs, 30)
by_speed: dict[str, list[float]] = {}
for spec, run in zip(specs, runs):
    raw = [e["motion"] for e in run.trace if e["motion"] is not None]
    by_speed.setdefault(spec.speed, []).extend(raw)
every = np.concatenate([np.asarray(v) for v in by_speed.values()])
for speed, values in by_speed.items():
    print(f"{speed:7s} n={len(values):3d} median {np.median(values):.4f}  range {min(values):.4f}-{max(values):.4f}")
print("all     quantiles 10/25/50/75/90:", np.round(np.quantile(every, [0.1, 0.25, 0.5, 0.75, 0.9]), 4))
