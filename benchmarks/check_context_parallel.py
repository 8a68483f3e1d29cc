"""Context parallelism, on more models and policies than tests/test_context_parallel.py names.

Launches N gloo ranks on this CPU (diffusers' Ulysses via ``enable_parallelism``) for every case and
compares each rank's per-step plans and outputs with one process's, and records per-rank cache memory.

    python benchmarks/check_context_parallel.py [--world 2] [--steps 8]

Writes benchmarks/results/context_parallel_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import test_context_parallel as cp  # noqa: E402
from tests.cp_worker import run_cases  # noqa: E402

CASES = (
    [("wan", p, order) for p in ("nocache", "static", "adacache", "adacache_moreg", "adacache_l2", "first_block",
                                  "teacache", "pab", "taylorseer", "easycache", "magcache", "toca")
     for order in ("before", "after")]
    + [("flux", p, "before") for p in ("nocache", "static", "adacache", "adacache_l2", "first_block", "teacache",
                                       "taylorseer", "easycache", "toca")]
)
# LTX-Video has a context-parallel plan too, but the untransformed tiny zoo config fails under it in
# diffusers 0.42.1 (a broadcast error in its attention): not a case for us.


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    cp.STEPS = args.steps
    cp.TIMEOUT_S = 1800  # many cases in one launch
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ranks = cp._launch(args.world, CASES, Path(tmp))
    single = run_cases(sorted({(n, p, "single") for n, p, _ in CASES}), args.steps)
    for case in CASES:
        expected = single[(case[0], case[1], "single")]
        got = [r[case] for r in ranks]
        rows.append({
            "model": case[0], "policy": case[1], "parallelism_enabled": case[2] + " transform",
            "plans_equal_over_ranks": all(g["plans"] == got[0]["plans"] for g in got),
            "plans_equal_single_process": all(g["plans"] == expected["plans"] for g in got),
            "max_output_diff_vs_single": max(
                (a - b).abs().max().item() for g in got for a, b in zip(g["outputs"], expected["outputs"])),
            "reused_or_partial_steps": sum(1 for _, r, p in expected["plans"] if r or p),
            "reductions_rank0": got[0]["reductions"],
            "cache_peak_bytes_rank0": got[0]["cache_peak_bytes"],
            "cache_peak_bytes_single": expected["cache_peak_bytes"],
        })
        print(json.dumps(rows[-1]))
    out = {
        "date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
        "command": f"python benchmarks/check_context_parallel.py --world {args.world} --steps {args.steps}",
        "world": args.world, "steps": args.steps, "cases": rows,
    }
    path = ROOT / "benchmarks" / "results" / "context_parallel_cpu.json"
    path.write_text(json.dumps(out, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
