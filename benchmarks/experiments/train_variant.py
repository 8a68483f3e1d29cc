import sys, torch
torch.set_num_threads(1)
from adacache_lab.reference.model import ReferenceConfig
from adacache_lab.reference.train import train
name, steps = sys.argv[1], int(sys.argv[2])
kw = dict(A=dict(), B=dict(patch_size=4, heads=3), G=dict(), GB=dict(patch_size=4, heads=3))[name]
rec = train(f"/tmp/s4/{name}.safetensors", ReferenceConfig(**kw), steps=steps, minutes=None, progress=True, save_every=500)
print(name, rec["steps"], rec["seconds"], rec["final_loss_mean_100"], flush=True)
