"""Train reference-DiT variants on a GPU side by side within a time budget, then judge each (on the GPU when there is one).

    python benchmarks/experiments/s6_gpu_sweep.py OUT MINUTES VARIANT[:BATCH] ...

Each variant trains in its own process (``device="cuda"``, clips rendered by loader workers). A
60-step probe of all variants at once measures seconds per step; each then trains for the step count
that fills the remaining budget (printed, so the run is reproducible as ``train(steps=N)``). Finally
the judge scores each on 48 held-out prompts (30 DDIM steps, guidance 1 and 2).
"""

import json
import os
import subprocess
import sys
import time

VARIANTS = {
    # the pixel zones recipe of gp2 (the best CPU run)
    "pix": dict(latent_channels=0, patch_size=8, prediction_type="sample"),
    # the same with six spatial + six temporal blocks
    "pix6": dict(latent_channels=0, patch_size=8, prediction_type="sample", num_layers=6),
    "pixv": dict(latent_channels=0, patch_size=8, prediction_type="v_prediction"),
}

TRAIN = """
import json, sys, torch
from adacache_lab.reference.model import ReferenceConfig
from adacache_lab.reference.train import train
name, steps, batch, workers, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
cfg = ReferenceConfig(**json.loads(sys.argv[6]))
rec = train(out, cfg, steps=steps, minutes=None, batch=batch, progress=False, device=sys.argv[8],
            loader_workers=workers, lr=float(sys.argv[7]))
print(name, "steps", rec["steps"], "seconds", rec["seconds"], "loss100", rec["final_loss_mean_100"], flush=True)
"""

JUDGE = """
import sys, torch
torch.set_num_threads(int(sys.argv[2]))
from adacache_lab.reference.data import encode_captions, make_dataset
from adacache_lab.reference.model import load, generate
from adacache_lab.reference.judge import load_judge
model = load(sys.argv[1])
if torch.cuda.is_available():
    for module in model.modules().values():
        module.cuda()
judge = load_judge("adacache_fx/reference/judge.safetensors")
real, specs = make_dataset(48, seed=4242, grid=model.config.grid_layout)
tokens, mask = encode_captions(specs)
for g in (1.0, 2.0):
    x = generate(model, tokens, mask, num_steps=30, guidance_scale=g, seed=0)
    print(sys.argv[1].split("/")[-1], "g", g, {k: round(v, 2) for k, v in judge.accuracy(x.cpu(), specs).items()}, flush=True)
"""


def run_all(args_list, env):
    procs = [subprocess.Popen([sys.executable, "-c", *a], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for a in args_list]
    outs = [p.communicate()[0] for p in procs]
    return outs


def main() -> None:
    out, minutes, specs = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
    lr = float(os.environ.get("LR", "1e-3"))
    device = os.environ.get("DEVICE", "cuda")
    start = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cores = os.cpu_count() or 2
    workers = max(1, cores // len(specs) - 1)
    runs = []
    for spec in specs:
        name, _, batch = spec.partition(":")
        runs.append((name, int(batch or 256)))
    # Probe: 20 and 80 steps, so start-up (imports, worker spawn) cancels out.
    per_step = {}
    for probe in (20, 80):
        t0 = time.perf_counter()
        outs = run_all([(TRAIN, n, str(probe), str(b), str(workers), f"/tmp/probe_{n}.safetensors",
                         json.dumps(VARIANTS[n]), str(lr), device) for n, b in runs], env)
        for o in outs:
            print(o.strip().splitlines()[-1] if o.strip() else "(no output)", flush=True)
            if "Traceback" in o:
                print(o, flush=True)
                raise SystemExit(1)
        for o in outs:
            n, s = o.split()[0], float(o.split()[4])
            per_step.setdefault(n, []).append(s)
    rate = {n: (s[1] - s[0]) / 60 for n, s in per_step.items()}
    print("seconds per step (all running at once):", {n: round(r, 4) for n, r in rate.items()}, flush=True)
    left = 60 * minutes - (time.perf_counter() - start) - 60  # leave time for the judge
    steps = {n: int(left / (rate[n] * 1.08)) // 100 * 100 for n in rate}
    print("steps:", steps, flush=True)
    outs = run_all([(TRAIN, n, str(steps[n]), str(b), str(workers), f"{out}/{n}.safetensors",
                     json.dumps(VARIANTS[n]), str(lr), device) for n, b in runs], env)
    for o in outs:
        print(o.strip()[-2000:], flush=True)
    threads = max(1, cores // len(runs))
    outs = run_all([(JUDGE, f"{out}/{n}.safetensors", str(threads)) for n, _ in runs], env)
    for o in outs:
        print(o.strip()[-1500:], flush=True)
    print("total seconds", round(time.perf_counter() - start), flush=True)


if __name__ == "__main__":
    main()
