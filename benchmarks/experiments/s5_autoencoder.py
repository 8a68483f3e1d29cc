# python benchmarks/experiments/s5_autoencoder.py: writes /tmp/s5/ae_cmd.pt
# Exactly the autoencoder phase of adacache_lab.reference.train.train(seed=0) with the default config.
import torch, json
torch.set_num_threads(1)
from adacache_lab.reference.autoencoder import train_autoencoder
from adacache_lab.reference.model import ReferenceConfig, build
cfg = ReferenceConfig()
torch.manual_seed(0)
model = build(cfg)
rec = train_autoencoder(model.autoencoder, frames=cfg.frames, size=cfg.size, seed=0, progress=False)
print({k: v for k, v in rec.items() if k != "losses"}, flush=True)
torch.save(model.autoencoder.state_dict(), "/tmp/s5/ae_cmd.pt")
