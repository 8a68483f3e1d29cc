"""What a shared ``ax.CaptureCache`` saves: the first call of a transformed model, with and without one.

For each model (the peer bench's Wan and Flux sizes, and the zoo's Latte), in one process: a first
model is transformed and called once (it captures every block kind); then, alternating, a fresh model
is transformed with a new policy and called once, without a cache (it captures again) and with the
first model's cache (it binds to the shared programs). Reports the first-call seconds of each (median
over repetitions), the steady-state call seconds for scale, and checks the outputs of the two equal.

    python benchmarks/bench_captures.py [--reps 3] [--models wan flux latte]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import adacache_fx as ax

sys.path.insert(0, str(Path(__file__).parent))
import peer_first_block as peers  # noqa: E402  (benchmarks/ is not a package)

RESULTS = Path(__file__).parent / "results"


def _latte_spec():
    from adacache_lab.zoo import ZOO

    entry = ZOO["latte"]
    return entry.build, lambda: entry.inputs(timestep=500.0)


def _peer_spec(name: str):
    spec = peers.SPECS[name](False)
    return spec.build, lambda: spec.kwargs(spec.noise.clone(), torch.tensor(500.0))


SPECS = {"wan": lambda: _peer_spec("wan"), "flux": lambda: _peer_spec("flux"), "latte": _latte_spec}


def _first_call(build, inputs, captures) -> tuple[float, float, torch.Tensor]:
    model = ax.transform(build(), ax.Static(2), captures=captures)
    kwargs = {**inputs(), "return_dict": False}
    with torch.no_grad():
        start = time.perf_counter()
        out = model(**kwargs)[0]
        first = time.perf_counter() - start
        start = time.perf_counter()
        model(**kwargs)
        steady = time.perf_counter() - start
    return first, steady, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=sorted(SPECS), choices=sorted(SPECS))
    parser.add_argument("--out", type=Path, default=RESULTS / "captures_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    results = {}
    for name in args.models:
        build, inputs = SPECS[name]()
        captures = ax.CaptureCache()
        _first_call(build, inputs, captures)  # fills the cache (and warms torch up)
        runs = {"without": [], "with": []}
        steady = []
        max_diff = 0.0
        for _ in range(args.reps):
            cold, calls, cold_out = _first_call(build, inputs, None)
            warm, _, warm_out = _first_call(build, inputs, captures)
            runs["without"].append(cold)
            runs["with"].append(warm)
            steady.append(calls)
            max_diff = max(max_diff, (cold_out - warm_out).abs().max().item())
        results[name] = {
            "first_call_s_without_cache": round(statistics.median(runs["without"]), 3),
            "first_call_s_with_cache": round(statistics.median(runs["with"]), 3),
            "speedup": round(statistics.median(runs["without"]) / statistics.median(runs["with"]), 2),
            "steady_call_s": round(statistics.median(steady), 3),
            "programs_in_cache": len(captures),
            "max_abs_diff_of_outputs": max_diff,
            "all_s": runs,
        }
        print(f"{name}: first call {results[name]['first_call_s_without_cache']} s without a cache, "
              f"{results[name]['first_call_s_with_cache']} s with one ({len(captures)} programs; a later "
              f"call takes {results[name]['steady_call_s']} s); outputs differ by {max_diff:.1e}", flush=True)
        assert max_diff == 0.0, "a shared program must compute what a fresh capture computes"
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "machine": platform.machine(), "torch_threads": 1},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "command": "python benchmarks/bench_captures.py " + " ".join(sys.argv[1:]),
        "wall_s": round(time.perf_counter() - started, 1),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
