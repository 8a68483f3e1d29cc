# python benchmarks/experiments/s5_canonical_layout.py cv|pc STEPS AUTOENCODER.pt
# Experiment: the main shape's clip is fixed by its motion alone (path centred on the frame, middle speed).
import sys, torch, numpy as np
torch.set_num_threads(1)
import adacache_lab.reference.data as data
from adacache_lab.reference.data import ShapeSpec, SPEED_RANGE, _DIRECTION_VEC

def canonical(shape, frames):
    if shape.speed == "static":
        return ShapeSpec(**{**shape.__dict__, "start": (0.5, 0.5)})
    lo, hi = SPEED_RANGE[shape.speed]
    velocity = (lo + hi) / 2.0
    r, travel = shape.radius, velocity * (frames - 1)
    sign = sum(_DIRECTION_VEC[shape.direction])
    axis = 0 if shape.direction in ("left", "right") else 1
    if shape.bounce:
        dist = min(0.5 * travel, 1.0 - 2.0 * r)
        along = (1.0 - r - dist) if sign > 0 else (r + dist)
    else:
        along = 0.5 - sign * travel / 2.0
    start = (along, 0.5) if axis == 0 else (0.5, along)
    return ShapeSpec(**{**shape.__dict__, "start": start, "velocity": velocity})
data._on_grid = canonical

from adacache_lab.reference.autoencoder import FrameAutoencoder
from adacache_lab.reference.model import ReferenceConfig
from adacache_lab.reference.train import train
if __name__ == "__main__":
    name, steps, aepath = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    kw = dict(cv=dict(prediction_type="v_prediction"), cx0=dict(prediction_type="sample"),
              pc=dict(latent_channels=0, patch_size=8, prediction_type="sample"))[name]
    cfg = ReferenceConfig(**kw)
    ae = None
    if cfg.latent_channels:
        ae = FrameAutoencoder(cfg.channels, cfg.latent_channels, cfg.autoencoder_width)
        ae.load_state_dict(torch.load(aepath))
    rec = train(f"/tmp/s5/{name}.safetensors", cfg, steps=steps, minutes=None, progress=True, save_every=500, autoencoder=ae)
    print(name, rec["steps"], rec["seconds"], rec["final_loss_mean_100"], flush=True)
