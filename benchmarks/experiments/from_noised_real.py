import torch, sys
from adacache_lab.reference.data import encode_captions, make_dataset
from adacache_lab.reference.model import load, scheduler, empty_caption
from adacache_lab.reference.judge import load_judge
model = load(sys.argv[1] if len(sys.argv)>1 else "adacache_fx/reference/weights.safetensors")
judge = load_judge("adacache_fx/reference/judge.safetensors")
real, specs = make_dataset(48, seed=4242)
tokens, mask = encode_captions(specs)
for start_t in (960, 900, 800, 700):
  for g in (1.0, 4.0):
    sched = scheduler(model.config, 30)
    ts = [t for t in sched.timesteps if t <= start_t]
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(real.shape, generator=gen)
    x = sched.add_noise(real, noise, torch.full((48,), int(ts[0])))
    with torch.no_grad():
        e, em = empty_caption(tokens, mask)
        text = model.encoder(torch.cat([tokens, e]), torch.cat([mask, em]))
        for t in ts:
            out = model.transformer(hidden_states=torch.cat([x, x]), encoder_hidden_states=text, timestep=t.expand(96), enable_temporal_attentions=True, return_dict=False)[0]
            c, u = out.chunk(2)
            x = sched.step(u + g*(c-u), t, x).prev_sample
    print(start_t, g, {k: round(v,2) for k,v in judge.accuracy(x.clamp(-1,1), specs).items()}, flush=True)
