# python benchmarks/experiments/s5_latent_dit.py v|x0 STEPS /tmp/s5/ae_cmd.pt (one thread; two runs side by side)
import sys, torch
torch.set_num_threads(1)
from adacache_lab.reference.autoencoder import FrameAutoencoder
from adacache_lab.reference.model import ReferenceConfig
from adacache_lab.reference.train import train
name, steps, aepath = sys.argv[1], int(sys.argv[2]), sys.argv[3]
kw = dict(v=dict(prediction_type="v_prediction"), x0=dict(prediction_type="sample"),
          eps=dict(prediction_type="epsilon"))[name]
cfg = ReferenceConfig(**kw)
ae = FrameAutoencoder(cfg.channels, cfg.latent_channels, cfg.autoencoder_width)
ae.load_state_dict(torch.load(aepath))
rec = train(f"/tmp/s5/{name}.safetensors", cfg, steps=steps, minutes=None, progress=True, save_every=500, autoencoder=ae)
print(name, rec["steps"], rec["seconds"], rec["final_loss_mean_100"], flush=True)
