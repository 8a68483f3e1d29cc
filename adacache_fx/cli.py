"""Command line: ``adacache-fx inspect MODEL`` and ``adacache-fx demo``."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from datetime import date
from pathlib import Path

import torch

from . import api
from .policies.base import Policy
from .policies.static import NoCache, Static


def parse_policy(text: str) -> Policy:
    """``nocache`` | ``static`` | ``static:INTERVAL``."""
    name, _, arg = text.partition(":")
    if name == "nocache":
        return NoCache()
    if name == "static":
        return Static(interval=int(arg)) if arg else Static()
    raise SystemExit(f"unknown policy {text!r}: use nocache or static[:INTERVAL]")


def cmd_inspect(args: argparse.Namespace) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    from .zoo import ZOO

    if args.model not in ZOO:
        print(f"unknown model {args.model!r}; choose from: {', '.join(sorted(ZOO))}", file=sys.stderr)
        return 2
    entry = ZOO[args.model]
    model = api.transform(entry.build(), parse_policy(args.policy))
    kwargs = entry.inputs(timestep=500.0, batch=1)
    with torch.no_grad():
        model(**kwargs)  # captures the blocks
        with FlopCounterMode(display=False) as counter:
            model(**kwargs)
    api.get_runtime(model).model_flops = counter.get_total_flops()
    api.reset(model)
    print(f"{args.model}: {type(model).__name__}")
    print(api.report(model))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .sampling import sample
    from .zoo import latte

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(
        "adacache_fx demo: a Latte video DiT built from a config (random weights: this shows the "
        f"mechanism and its speed, not image quality), {args.steps} DDIM steps, batched CFG, CPU.\n"
    )
    policies = [("no cache", NoCache()), ("static:2", Static(interval=2)), ("static:3", Static(interval=3))]
    rows, reference = [], None
    for label, policy in policies:
        model, inputs = latte(num_layers=4, heads=4, head_dim=64, frames=8, sample_size=16)
        api.transform(model, policy)
        sample(model, inputs, num_steps=2, progress=False)  # capture + warm-up at this shape
        api.reset(model)
        result = sample(model, inputs, num_steps=args.steps, desc=label)
        report = api.report(model)
        if reference is None:
            reference = result
        error = (result.latents - reference.latents).norm() / reference.latents.norm()
        rows.append({
            "policy": label,
            "compute_fraction": round(report.compute_fraction, 3),
            "seconds": round(result.seconds, 2),
            "speedup": round(reference.seconds / result.seconds, 2),
            "rel_error_vs_uncached": float(f"{error:.3g}"),
        })
    header = f"{'policy':10s} {'branches computed':>18s} {'wall s':>8s} {'speed-up':>9s} {'rel. err vs uncached':>21s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['policy']:10s} {r['compute_fraction']:>18.3f} {r['seconds']:>8.2f} {r['speedup']:>8.2f}x {r['rel_error_vs_uncached']:>21.3g}")
    record = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__} threads {torch.get_num_threads()}".strip(),
        "command": "adacache-fx demo",
        "steps": args.steps,
        "rows": rows,
    }
    (out_dir / "demo.json").write_text(json.dumps(record, indent=2))
    print(f"\nwrote {out_dir / 'demo.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adacache-fx", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what transform() does")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="show a model's blocks, branches, kinds and FLOP shares")
    p.add_argument("model", help="a model of the built-in zoo (dit, pixart, latte, flux, wan, ...)")
    p.add_argument("--policy", default="nocache", help="nocache | static[:INTERVAL]")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("demo", help="the main job: cached vs uncached generation on a bundled model")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default="outputs")
    p.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
