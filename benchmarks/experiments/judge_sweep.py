import torch, sys
torch.set_num_threads(int(sys.argv[4]) if len(sys.argv)>4 else 2)
from adacache_lab.reference.data import encode_captions, make_dataset
from adacache_lab.reference.model import load, generate
from adacache_lab.reference.judge import load_judge
model = load(sys.argv[1])
judge = load_judge("adacache_fx/reference/judge.safetensors")
real, specs = make_dataset(48, seed=4242, grid=model.config.grid_layout)
tokens, mask = encode_captions(specs)
etas = [float(x) for x in sys.argv[3].split(",")] if len(sys.argv)>3 else [0.0]
for eta in etas:
  for g in [float(x) for x in sys.argv[2].split(",")]:
    x = generate(model, tokens, mask, num_steps=int(sys.argv[5]) if len(sys.argv)>5 else 30, guidance_scale=g, seed=0, eta=eta)
    print(sys.argv[1].split("/")[-1], "eta", eta, "g", g, {k: round(v,2) for k,v in judge.accuracy(x, specs).items()}, flush=True)
