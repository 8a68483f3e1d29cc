"""Command line: ``adacache-fx inspect MODEL``, ``adacache-fx calibrate`` and ``adacache-fx demo``."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from datetime import date
from pathlib import Path

import torch

from adacache_fx import api
from adacache_fx.policies.base import Policy
from adacache_fx.policies.static import NoCache, Static


GUIDANCE_HELP = ("classifier-free guidance scale (1: none, the bundled model's best: it predicts the clean "
                 "clip, and guidance over-saturates it)")
POLICY_HELP = (
    "nocache | static[:INTERVAL] | adacache[:fast|slow] | teacache[:DELTA] | fbcache[:THRESHOLD] | pab"
)


def parse_policy(text: str, num_steps: int = 20) -> Policy:
    """A policy from its command-line spelling (see ``POLICY_HELP``)."""
    from adacache_fx.policies.adacache import AdaCache
    from adacache_fx.policies.first_block import FirstBlockCache
    from adacache_fx.policies.pab import PAB
    from adacache_fx.policies.teacache import TeaCache

    name, _, arg = text.partition(":")
    try:
        if name == "nocache":
            return NoCache()
        if name == "static":
            return Static(interval=int(arg)) if arg else Static()
        if name == "adacache":
            return AdaCache.slow(num_steps) if arg == "slow" else AdaCache.fast(num_steps)
        if name == "teacache":
            return TeaCache(delta=float(arg)) if arg else TeaCache()
        if name == "fbcache":
            return FirstBlockCache(threshold=float(arg)) if arg else FirstBlockCache()
        if name == "pab":
            return PAB()
    except ValueError as exc:
        raise SystemExit(f"bad policy {text!r}: {exc}") from exc
    raise SystemExit(f"unknown policy {text!r}: use {POLICY_HELP}")


def cmd_export(args: argparse.Namespace) -> int:
    from adacache_fx import export
    from .zoo import ZOO

    if args.model not in ZOO:
        print(f"unknown model {args.model!r}; choose from: {', '.join(sorted(ZOO))}", file=sys.stderr)
        return 2
    building = args.format == "tensorrt" and not args.check
    if building:  # fail before the (slow) ONNX export when the engines cannot be built here
        try:
            export.tensorrt_export.import_tensorrt()
        except export.TensorRTUnavailableError as exc:
            print(f"error: {exc}\nRun with --check to see whether TensorRT would take the graphs.", file=sys.stderr)
            return 2
    out = Path(args.out or f"outputs/{args.format}")
    entry = ZOO[args.model]
    policy = parse_policy(args.policy, args.steps)
    model = api.transform(entry.build(), policy)
    exported = export.onnx(model, entry.inputs(timestep=500.0), out, form=args.form)
    for variant in exported.variants:
        what = (f"an If per cached branch ({len(variant.decisions)})" if variant.decisions
                else f"reuses {len(variant.reuse)} of {len(exported.branches)} branches")
        print(f"{variant.path}: {what}, {len(variant.cache_in)} cache inputs, {len(variant.cache_out)} cache outputs")
    print(f"wrote {out / 'manifest.json'}")
    if args.check:
        report = export.check_tensorrt_support(exported)
        print(report)
        return 0 if report.supported else 1
    if building:
        engines = export.tensorrt(exported, out, fp16=args.fp16)
        for engine in engines.variants:
            print(f"{engine.path}: TensorRT {engines.tensorrt_version} engine, reuses {len(engine.reuse)} branches")
        print(f"wrote {out / 'engines.json'}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from adacache_fx.calibrate import calibrate
    from .sampling import sample
    from .zoo import latte

    if args.model != "latte":
        print("calibrate runs the built-in sampler, which drives the Latte model; for your own model "
              "call adacache_fx.calibrate(model, policy, run, target=...) from Python", file=sys.stderr)
        return 2
    model, inputs = latte(num_layers=4, heads=4, head_dim=64, frames=8, sample_size=16)
    policy = parse_policy(args.policy, args.steps)

    def run(m: torch.nn.Module, i: int) -> None:
        sample(m, inputs, num_steps=args.steps, seed=i, progress=False)

    calibration = calibrate(model, policy, run, target=args.target, runs=args.runs)
    print(calibration)
    held_out = []
    api.transform(model, calibration.policy)
    for seed in range(1000, 1000 + args.held_out):
        api.reset(model)
        with api.generation(model, num_steps=args.steps):
            run(model, seed)
        held_out.append(api.report(model).compute_fraction)
    api.restore(model)
    if held_out:
        print(f"  held-out inputs ({len(held_out)} seeds): compute fraction "
              + ", ".join(f"{f:.3f}" for f in held_out))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "date": date.today().isoformat(),
        "command": "adacache-fx calibrate " + " ".join(sys.argv[2:]),
        "policy": repr(calibration.policy),
        "target": args.target,
        "knob": calibration.knob,
        "value": calibration.value,
        "predicted": calibration.predicted_compute_fraction,
        "measured": calibration.measured,
        "held_out": held_out,
        "coefficients": calibration.coefficients,
    }
    (out_dir / "calibration.json").write_text(json.dumps(record, indent=2))
    _plot_calibration(calibration, held_out, out_dir / "calibration.png")
    print(f"wrote {out_dir / 'calibration.json'}")
    return 0


def _plot_calibration(calibration, held_out: list[float], path: Path) -> None:
    """Knob against replayed compute fraction, with the target and what running the model gave."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the demo extra is not installed: JSON only
        return
    values, fractions = zip(*calibration.curve)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogx(values, fractions, label="replayed on recorded runs")
    ax.axhline(calibration.target, color="grey", linestyle="--", label="target")
    if calibration.measured:
        mv, mf = zip(*calibration.measured)
        ax.scatter(mv, mf, color="C1", zorder=3, label="measured (calibration inputs)")
    for f in held_out:
        ax.scatter([calibration.value], [f], color="C2", marker="x", zorder=3)
    if held_out:
        ax.scatter([], [], color="C2", marker="x", label="held-out inputs")
    ax.set_xlabel(calibration.knob)
    ax.set_ylabel("compute fraction")
    ax.set_title(f"calibrating {type(calibration.policy).__name__}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


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
    from .reference.demo import run_demo

    guidance = f" with guidance {args.guidance:g}" if args.guidance != 1.0 else " (no guidance)"
    print(f"adacache_fx demo: the bundled reference video DiT (diffusers LatteTransformer3DModel, trained on "
          f"procedural clips), {args.clips} prompts, {args.steps} DDIM steps{guidance}, each clip uncached and "
          f"with AdaCache (fast preset + MoReg), {torch.get_num_threads()} CPU threads.\n")
    run_demo(args.out, weights=args.weights, num_steps=args.steps, clips=args.clips, guidance_scale=args.guidance)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .reference.bench import run_bench

    args.out = args.out or "benchmarks/results/reference_bench"
    record = run_bench(args.out, weights=args.weights, clips=args.clips, num_steps=args.steps,
                       command="adacache-fx bench " + " ".join(sys.argv[2:]), guidance_scale=args.guidance)
    rows = sorted(record["rows"], key=lambda r: (r["family"], -r["compute_fraction"]))
    print(f"{'policy':28s} {'computed':>8s} {'FLOPs':>6s} {'speed-up':>8s} {'PSNR':>7s} {'SSIM':>6s} {'judge':>6s}")
    for r in rows:
        print(f"{r['label']:28s} {r['compute_fraction']:8.3f} {r['flops_fraction']:6.3f} {r['speedup']:7.2f}x "
              f"{min(r['psnr'], 99.99):7.2f} {r['ssim']:6.3f} {r['attribute_accuracy']:6.3f}")
    print("\nclaims:", json.dumps(record["claims"], indent=1))
    print(f"wrote {Path(args.out).with_suffix('.json')} and {Path(args.out).with_suffix('.png')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adacache-fx", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what transform() does")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="show a model's blocks, branches, kinds and FLOP shares")
    p.add_argument("model", help="a model of the built-in zoo (dit, pixart, latte, flux, wan, ...)")
    p.add_argument("--policy", default="nocache", help=POLICY_HELP)
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("export", help="ONNX graphs (and TensorRT engines) per plan variant for deployment")
    p.add_argument("model", help="a model of the built-in zoo")
    p.add_argument("--format", choices=("onnx", "tensorrt"), default="onnx",
                   help="onnx: graphs with explicit caches; tensorrt: those graphs plus one engine each "
                        "(needs TensorRT and a CUDA GPU)")
    p.add_argument("--policy", default="static:2", help="a schedule-driven policy: static[:N] | adacache | pab")
    p.add_argument("--steps", type=int, default=20, help="step count the policy is built for")
    p.add_argument("--check", action="store_true",
                   help="print the graphs' operators against TensorRT's ONNX operator table and build nothing "
                        "(exit 1 if the table flags a problem); works without TensorRT")
    p.add_argument("--fp16", action="store_true", help="tensorrt: allow FP16 kernels")
    p.add_argument("--form", choices=("variants", "if"), default="variants",
                   help="variants: one graph per plan variant (for engine builders); if: one graph whose "
                        "cached branches are ONNX If nodes on reuse.<branch> inputs")
    p.add_argument("--out", default=None, help="output directory (default: outputs/<format>)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("calibrate", help="fit a policy's threshold to a target compute fraction")
    p.add_argument("model", nargs="?", default="latte", help="latte (the built-in sampler's model)")
    p.add_argument("--policy", default="teacache", help="adacache[:fast|slow] | teacache | fbcache")
    p.add_argument("--target", type=float, default=0.5, help="fraction of branch executions computed")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--runs", type=int, default=2, help="generations to record")
    p.add_argument("--held-out", type=int, default=2, help="generations on other seeds to check the fit")
    p.add_argument("--out", default="outputs")
    p.set_defaults(func=cmd_calibrate)
    p = sub.add_parser("demo", help="the main job: cached vs uncached generation on the bundled model")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--clips", type=int, default=6)
    p.add_argument("--weights", default=None, help="a reference model file (default: the bundled one)")
    p.add_argument("--out", default="outputs")
    p.add_argument("--guidance", type=float, default=1.0, help=GUIDANCE_HELP)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("bench", help="sweep policies and thresholds on the bundled model: JSON + Pareto plot "
                                     "(kernel-level timings: python benchmarks/bench_kernels.py)")
    p.add_argument("--clips", type=int, default=24)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--weights", default=None, help="a reference model file (default: the bundled one)")
    p.add_argument("--out", default=None, help="path stem of the JSON and PNG (default: "
                   "benchmarks/results/reference_bench)")
    p.add_argument("--guidance", type=float, default=1.0, help=GUIDANCE_HELP)
    p.set_defaults(func=cmd_bench)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.verbose:  # torchao (a test extra) reports its optional CUDA kernels on every import
        logging.getLogger("torchao").setLevel(logging.ERROR)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
