# python benchmarks/experiments/s5_judge_canonical.py WEIGHTS GUIDANCES ETAS [CLIPS]: judge accuracy on canonical-layout prompts.
import sys, torch
sys.path.insert(0, __import__("os").path.dirname(__file__))
torch.set_num_threads(1)
import s5_canonical_layout  # patches the grid layout to the canonical one
from adacache_lab.reference.data import encode_captions, make_dataset
from adacache_lab.reference.model import load, generate
from adacache_lab.reference.judge import load_judge
model = load(sys.argv[1])
judge = load_judge("adacache_fx/reference/judge.safetensors")
n = int(sys.argv[4]) if len(sys.argv) > 4 else 48
real, specs = make_dataset(n, seed=4242, grid=True)
print("real", {k: round(v,2) for k,v in judge.accuracy(real, specs).items()})
tokens, mask = encode_captions(specs)
for eta in [float(x) for x in sys.argv[3].split(",")]:
  for g in [float(x) for x in sys.argv[2].split(",")]:
    x = generate(model, tokens, mask, num_steps=30, guidance_scale=g, seed=0, eta=eta)
    print(sys.argv[1].split("/")[-1], "eta", eta, "g", g, {k: round(v,2) for k,v in judge.accuracy(x, specs).items()}, flush=True)
