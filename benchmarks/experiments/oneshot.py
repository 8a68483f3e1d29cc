import torch, sys
torch.set_num_threads(1)
import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
from adacache_lab.reference.data import encode_captions, make_dataset
from adacache_lab.reference.model import load, video_noise
from diffusers import DDPMScheduler
model = load(sys.argv[1])
real, specs = make_dataset(8, seed=4242, grid=True)
tokens, mask = encode_captions(specs)
sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="sample")
g = torch.Generator().manual_seed(0)
rows=[real]
with torch.no_grad():
    text = model.encoder(tokens, mask)
    for t in (999, 900, 800, 600):
        tt = torch.full((8,), t)
        noisy = sched.add_noise(real, video_noise(tuple(real.shape), model.config, g), tt)
        pred = model.transformer(hidden_states=noisy, encoder_hidden_states=text, timestep=tt, enable_temporal_attentions=True, return_dict=False)[0]
        print(t, float(((pred-real)**2).mean()))
        rows.append(pred)
out=[]
for i in range(8):
    out.append(torch.cat([torch.nn.functional.pad(r[i,:,f], (1,1,1,1), value=0.3) for r in rows for f in (0,7)], dim=2))
img = ((torch.cat(out, dim=1)+1)/2).clamp(0,1).permute(1,2,0).repeat_interleave(3,0).repeat_interleave(3,1)
plt.imsave(sys.argv[2], img.numpy())
