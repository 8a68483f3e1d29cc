"""Judge the reference model: attribute accuracy of its generated clips (no caching), beside the
judge's accuracy on held-out real clips.

    python benchmarks/eval_reference.py --weights adacache_fx/reference/weights.safetensors \
        --judge adacache_fx/reference/judge.safetensors [--clips 64] [--steps 20]

Trains the judge first (and saves it) when ``--judge`` does not exist.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

from adacache_lab.reference.data import encode_captions, make_dataset
from adacache_lab.reference.judge import load_judge, save_judge, train_judge
from adacache_lab.reference.model import generate, load

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", default="adacache_fx/reference/weights.safetensors")
    parser.add_argument("--judge", default="adacache_fx/reference/judge.safetensors")
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=1.0, help="1: no classifier-free guidance (the bundled "
                        "model's best; it predicts the clean clip, and guidance over-saturates it)")
    args = parser.parse_args()
    judge_path = Path(args.judge)
    if judge_path.exists():
        judge = load_judge(judge_path)
    else:
        judge = train_judge(num_clips=8000, epochs=5, seed=0)  # as `python -m adacache_lab.reference.judge`
        save_judge(judge, judge_path)
    real, real_specs = make_dataset(2000, seed=7_777_777)
    model = load(args.weights)
    config = model.config
    # Training draws its clips from seeds 0 .. steps x processes (seed 0): these prompts are held out.
    _, specs = make_dataset(args.clips, seed=9_004_242, frames=config.frames, size=config.size, grid=config.grid_layout)
    tokens, mask = encode_captions(specs, max_len=config.max_tokens)
    start = time.perf_counter()
    videos = torch.cat([
        generate(model, tokens[i:i + 16], mask[i:i + 16], num_steps=args.steps, guidance_scale=args.guidance, seed=i)
        for i in range(0, args.clips, 16)
    ])
    seconds = time.perf_counter() - start
    record = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "command": "python benchmarks/eval_reference.py " + " ".join(sys.argv[1:]),
        "weights": args.weights,
        "generated_clips": args.clips,
        "ddim_steps": args.steps,
        "guidance_scale": args.guidance,
        "generation_seconds": round(seconds, 1),
        "judge_accuracy_generated": judge.accuracy(videos, specs),
        "judge_accuracy_real_held_out": judge.accuracy(real, real_specs),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "reference_eval.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
