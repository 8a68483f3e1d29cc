import torch, sys
torch.set_num_threads(1)
import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
from adacache_lab.reference.data import encode_captions, make_dataset
from adacache_lab.reference.model import generate, load
model = load(sys.argv[1]); g=float(sys.argv[3]) if len(sys.argv)>3 else 1.0
real, specs = make_dataset(8, seed=4242, grid=model.config.grid_layout)
tokens, mask = encode_captions(specs)
gen = generate(model, tokens, mask, num_steps=30, guidance_scale=g, seed=0)
rows=[]
for i in range(8):
    for v in (real, gen):
        fr = [torch.nn.functional.pad(v[i,:,f], (1,1,1,1), value=0.3) for f in range(8)]
        rows.append(torch.cat(fr, dim=2))
img = ((torch.cat(rows, dim=1)+1)/2).clamp(0,1).permute(1,2,0).repeat_interleave(3,0).repeat_interleave(3,1)
plt.imsave(sys.argv[2], img.numpy())
for s in specs: print(s.caption)
