"""Host time of a skipping call at real depth: adacache_fx against diffusers' First-Block-Cache hook.

A skipping call runs the first block and the model's embedders and head; every later block is
passed over. On a GPU at real sizes the first block takes a few milliseconds and the rest of such a
call is host work: what each tool does per skipped block (diffusers: a hook returning its cached
output; adacache_fx: the folded span's guard check, so that a block changed since the residual was
stored is recomputed rather than reused stale, and a pass-through per block). This measures that
host work on the CPU with the real block counts (Flux: 19 double + 38 single blocks; Wan 14B: 40)
at a tiny width and token count, where the blocks' arithmetic is negligible.

Each call has a new timestep and the threshold is effectively infinite, so every call after the
first skips; calls of the two tools alternate (A B, B A, ...); reported: fastest and median call.

    python benchmarks/peer_skip_host.py [--calls 80] [--device cuda] [--lora 16]

Writes benchmarks/results/peer_skip_host_<cpu|cuda>[_lora<rank>].json. ``--lora``: with a LoRA
adapter on every model, where adacache_fx also keeps a norm per adapter tensor each call (a hot swap
copies new weights in place, which only their content shows; see ``runtime/adapter_weights.py``). On a GPU each call is timed with its
device work (synchronised before and after), so a skipping call shows what the device waits for.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
import peer_first_block as peers  # noqa: E402  (the same model specs and inputs)

RESULTS = Path(__file__).parent / "results"
DEPTH = {"flux": dict(num_layers=19, num_single_layers=38), "wan": dict(num_layers=40)}


def measure(name: str, calls: int, device: torch.device, lora: int = 0) -> dict:
    import adacache_fx as ax
    from diffusers import FirstBlockCacheConfig

    spec = peers.SPECS[name](True)  # the quick (tiny) sizes, at the real depth below
    config = {**spec.config, **DEPTH[name]}
    model_class = type(spec.build())

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        model = model_class(**config).eval().to(device)
        if lora:  # the same adapter in all three (the models then pay for it alike but for our fingerprint)
            from peft import LoraConfig

            model.add_adapter(LoraConfig(r=lora, lora_alpha=lora, init_lora_weights=False,
                                         target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        return model

    ours = ax.transform(build(), ax.FirstBlockCache(threshold=1e9))
    theirs = build()
    theirs.enable_cache(FirstBlockCacheConfig(threshold=1e9))
    original = build()
    step = itertools.count()

    held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # the inputs a pipeline keeps on the device

    def kwargs():
        out = {}
        for key, value in spec.kwargs(spec.noise, torch.tensor(999.0 - next(step) * 0.01)).items():
            if isinstance(value, torch.Tensor):
                if value.numel() == 1:  # the timestep: new each call
                    value = value.to(device)
                else:
                    if id(value) not in held:  # the pair keeps the host tensor, so its id stays its own
                        held[id(value)] = (value, value.to(device))
                    value = held[id(value)][1]
            out[key] = value
        return out

    def call_theirs(**kw):
        with theirs.cache_context("cond"):
            return theirs(**kw)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(fn, kw) -> float:
        sync()
        start = time.perf_counter()
        fn(**kw)
        sync()  # the call's device work included: a skipping call's host walk is what the device waits for
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"adacache_fx": [], "diffusers": [], "original (uncached)": []}
    fns = {"adacache_fx": ours, "diffusers": call_theirs, "original (uncached)": original}
    with torch.no_grad(), ax.generation(ours, num_steps=10**6):
        for _ in range(4):  # capture, the first (computing) call, warm-up
            for fn in fns.values():
                timed(fn, kwargs())
        for i in tqdm(range(calls), desc=f"{name}: alternating calls"):
            order = list(fns) if i % 2 == 0 else list(fns)[::-1]
            for key in order:
                times[key].append(timed(fns[key], kwargs()))
        skipped = ax.report(ours).steps[-1]
    blocks = len(spec.blocks(original))
    row = {key: {"fastest_ms": round(min(v) * 1e3, 3), "median_ms": round(statistics.median(v) * 1e3, 3)}
           for key, v in times.items()}
    extra = min(times["adacache_fx"]) - min(times["diffusers"])
    return {
        "model": f"{model_class.__name__}({', '.join(f'{k}={v}' for k, v in config.items())})",
        "lora_rank": lora,
        "blocks": blocks,
        "inputs": spec.tokens,
        "ours_last_call_reused_branches": skipped.reused,
        "ours_last_call_computed_branches": skipped.computed,
        "calls": row,
        "ours_over_diffusers_fastest": round(min(times["adacache_fx"]) / min(times["diffusers"]), 3),
        "ours_minus_diffusers_per_skipped_block_us": round(extra / (blocks - 1) * 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=80)
    parser.add_argument("--models", nargs="+", default=["flux", "wan"], choices=sorted(DEPTH))
    parser.add_argument("--device", default="cpu",
                        help="cpu, or cuda: each call timed with its device work (synchronised)")
    parser.add_argument("--lora", type=int, default=0, metavar="RANK",
                        help="a PEFT LoRA adapter of this rank on every attention projection of all three "
                             "models (adacache_fx then also fingerprints the adapter tensors every call)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    torch.set_num_threads(1)
    start = time.perf_counter()
    results = {name: measure(name, args.calls, device, args.lora) for name in args.models}
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": 1,
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "load_average_at_end": list(__import__("os").getloadavg())},
        "versions": {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__},
        "command": "python benchmarks/peer_skip_host.py " + " ".join(sys.argv[1:]),
        "wall_s": round(time.perf_counter() - start, 1),
        "models": results,
    }
    RESULTS.mkdir(exist_ok=True)
    suffix = f"_lora{args.lora}" if args.lora else ""
    (RESULTS / f"peer_skip_host_{device.type}{suffix}.json").write_text(json.dumps(record, indent=2) + "\n")
    for name, r in results.items():
        print(f"{name} ({r['blocks']} blocks): " + "; ".join(
            f"{k} {v['fastest_ms']} ms (median {v['median_ms']})" for k, v in r["calls"].items())
            + f"; ours - diffusers per skipped block {r['ours_minus_diffusers_per_skipped_block_us']} us")


if __name__ == "__main__":
    main()
