# The pixel-space zones recipe (the best of 2026-11-22's first runs, "G") trained on two data-parallel
# CPU processes: twice the clips per hour.
import sys, torch
from adacache_lab.reference.model import ReferenceConfig
from adacache_lab.reference.train import train
if __name__ == "__main__":
    steps = int(sys.argv[1])
    cfg = ReferenceConfig(latent_channels=0, patch_size=8, prediction_type="sample")
    rec = train("/tmp/s5/gp2.safetensors", cfg, steps=steps, minutes=None, progress=True, save_every=500, processes=2)
    print("gp2", rec["steps"], rec["seconds"], rec["final_loss_mean_100"], flush=True)
