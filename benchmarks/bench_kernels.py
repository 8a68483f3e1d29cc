"""Kernel-level timings: each branch kind, the cached region's own cost, the decision metric and the
host dispatch (``adacache_fx.kernels``), on the mid-size Latte (CPU) or Latte-1's size (GPU).

    python benchmarks/bench_kernels.py [--size mid|full] [--device cuda] [--fp16] [--policy adacache]

Same as ``adacache-fx bench --kernels ...``; writes ``benchmarks/results/kernels_<device>.json``.
"""

import sys

from adacache_fx.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "--kernels", *sys.argv[1:]]))
