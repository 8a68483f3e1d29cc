# python benchmarks/experiments/s5_autoencoder_judge.py /tmp/s5/ae_cmd.pt: judge accuracy on reconstructions
import sys, torch
torch.set_num_threads(1)
from adacache_lab.reference.autoencoder import FrameAutoencoder
from adacache_lab.reference.judge import load_judge
from adacache_lab.reference.data import make_dataset
ae = FrameAutoencoder(); ae.load_state_dict(torch.load(sys.argv[1])); ae.eval()
judge = load_judge("adacache_fx/reference/judge.safetensors")
for grid in (False, True):
    real, specs = make_dataset(500, seed=4242, grid=grid)
    with torch.no_grad(): r = ae.decode(ae.encode(real))
    print("grid", grid, "mse", round(float(((r-real)**2).mean()),4), "recon", {k: round(v,3) for k,v in judge.accuracy(r, specs).items()}, flush=True)
