"""Reach: does adacache_fx take every diffusers transformer of the zoo (``ZOO`` + ``MORE_ZOO``)?

For each model (tiny config, random weights, CPU, float32):

* ``nocache_exact``: ``ax.transform(build(), ax.NoCache())`` gives exactly (``torch.equal``) the
  untransformed model's output for ``entry.inputs()``.
* ``static_removed``: with ``ax.Static(2)``, after one warm-up generation (captures done), a fresh
  generation's compute call (timestep 999) and the following reuse call (timestep 900) are counted
  with ``FlopCounterMode``; removed = (compute - reuse) / sum of the report's block FLOPs.
* ``pass``: ``nocache_exact`` and removed >= 0.9.

Every exception is caught per model and recorded (stage, type, first line, innermost frame), so one
failing model never stops the run.

    python benchmarks/check_reach.py [--only name,...] [--out PATH]

Writes ``benchmarks/results/reach.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from datetime import date
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import adacache_fx as ax
from adacache_lab.zoo import ZOO, ZooEntry
from adacache_lab.zoo_more import MORE_ZOO

RESULTS = Path(__file__).parent / "results"
THRESHOLD = 0.9
# Models whose attention is flex_attention outside torch.compile: FlopCounterMode cannot run it (on the
# plain model either), and a failed attempt leaves the process unable to run eager flex_attention at all.
# Their reuse step is judged by the report instead: every branch reused, none computed.
NO_FLOP_COUNT = {"kandinsky6_sr", "wan_animate2", "anyflow_far"}


def _flops(model: torch.nn.Module, kwargs: dict) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**kwargs)
    return counter.get_total_flops()


def _failure(stage: str, exc: BaseException) -> dict:
    text = str(exc).strip()
    frames = traceback.extract_tb(exc.__traceback__)
    where = None
    for fr in reversed(frames):  # innermost frame in library code (diffusers / adacache_fx / torch)
        if any(k in fr.filename for k in ("diffusers", "adacache_fx", "torch")):
            where = f"{fr.filename.split('site-packages/')[-1].split('/main/')[-1]}:{fr.lineno} ({fr.name})"
            break
    return {
        "stage": stage,
        "type": type(exc).__name__,
        "message": text.splitlines()[0][:300] if text else "",
        "where": where,
    }


def check(name: str, entry: ZooEntry) -> dict:
    row: dict = {"name": name, "source": "zoo" if name in ZOO else "zoo_more", "nocache_exact": None,
                 "static_removed": None, "pass": False, "error": None}
    stage = "build"
    try:
        reference = entry.build()
        row["class"] = type(reference).__name__
        row["params"] = sum(p.numel() for p in reference.parameters())

        stage = "reference"
        with torch.no_grad():
            expected = entry.output(reference(**entry.inputs()))

        stage = "transform(NoCache)"
        model = ax.transform(entry.build(), ax.NoCache())
        stage = "nocache call"
        with torch.no_grad():
            got = entry.output(model(**entry.inputs()))
        row["nocache_exact"] = bool(torch.equal(got, expected))
        if not row["nocache_exact"]:
            row["nocache_max_abs_diff"] = float((got - expected).abs().max()) if got.shape == expected.shape else None
        rep = ax.report(model)
        row["branches"] = len(rep.branches)
        row["blocks"] = len({b.block for b in rep.branches})
        row["block_lists"] = sorted({b.block_list for b in rep.branches})
        row["left_alone"] = [list(x) for x in rep.left_alone]
        row["uncached"] = dict(rep.uncached)
        del model, reference

        stage = "transform(Static)"
        cached = ax.transform(entry.build(), ax.Static(2))
        stage = "static warm-up"
        with torch.no_grad(), ax.generation(cached, num_steps=4):
            cached(**entry.inputs(timestep=999.0))
            cached(**entry.inputs(timestep=900.0))
        stage = "static measure"
        if name in NO_FLOP_COUNT:
            last = ax.report(cached).steps[-1]
            row["last_step"] = {"computed": last.computed, "reused": last.reused}
            row["flops"] = "not counted: eager flex_attention cannot run under FlopCounterMode"
            row["pass"] = bool(row["nocache_exact"] and last.computed == 0
                               and last.reused == len(ax.report(cached).branches) > 0)
            return row
        with ax.generation(cached, num_steps=4):
            compute = _flops(cached, entry.inputs(timestep=999.0))
            reuse = _flops(cached, entry.inputs(timestep=900.0))
        report = ax.report(cached)
        block_flops = sum(f for f in report.block_flops.values() if f)
        row.update(compute_flops=compute, reuse_flops=reuse, block_flops=block_flops)
        last = report.steps[-1] if report.steps else None
        if last is not None:
            row["last_step"] = {"computed": last.computed, "reused": last.reused}
        row["static_removed"] = (compute - reuse) / block_flops if block_flops else None
        row["pass"] = bool(row["nocache_exact"] and row["static_removed"] is not None
                           and row["static_removed"] >= THRESHOLD)
    except Exception as exc:  # noqa: BLE001 -- one model's failure must not stop the run
        row["error"] = _failure(stage, exc)
        if stage == "static measure":
            # Is it the measurement itself? Count the untransformed model's FLOPs the same way.
            try:
                _flops(entry.build(), entry.inputs())
                row["error"]["plain_model_flop_count"] = "ok"
            except Exception as plain:  # noqa: BLE001
                row["error"]["plain_model_flop_count"] = f"fails too: {type(plain).__name__}"
    return row


def _reason(row: dict) -> str:
    if row["error"]:
        e = row["error"]
        extra = f" (plain model: {e['plain_model_flop_count']})" if "plain_model_flop_count" in e else ""
        return f"[{e['stage']}] {e['type']}: {e['message']}"[:110] + extra
    bits = []
    if not row["nocache_exact"]:
        bits.append(f"NoCache not exact (max diff {row.get('nocache_max_abs_diff')})")
    if "flops" in row:
        bits.append(f"{row['flops']}; reuse step: {row['last_step']}")
    elif row["static_removed"] is None:
        bits.append("no block FLOPs")
    elif row["static_removed"] < THRESHOLD:
        bits.append(f"removed {row['static_removed']:.2f} < {THRESHOLD}")
    if row.get("left_alone"):
        bits.append(f"left alone: {len(row['left_alone'])}")
    return "; ".join(bits)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated entry names")
    parser.add_argument("--out", default=str(RESULTS / "reach.json"))
    args = parser.parse_args(argv)

    entries = {**ZOO, **MORE_ZOO}
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(entries)
    unknown = [n for n in names if n not in entries]
    if unknown:
        parser.error(f"unknown entries: {', '.join(unknown)}")

    import diffusers

    rows = []
    for name in names:
        t0 = time.perf_counter()
        row = check(name, entries[name])
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        removed = "-" if row["static_removed"] is None else f"{row['static_removed']:.3f}"
        exact = {True: "yes", False: "NO", None: "-"}[row["nocache_exact"]]
        print(f"{name:16s} {('PASS' if row['pass'] else 'FAIL'):4s}  exact={exact:3s}  removed={removed:6s}  "
              f"{_reason(row)}", flush=True)

    result = {
        "date": date.today().isoformat(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                    "python": sys.version.split()[0]},
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "threshold": THRESHOLD,
        "summary": {"models": len(rows), "passed": sum(r["pass"] for r in rows),
                    "failed": [r["name"] for r in rows if not r["pass"]]},
        "models": rows,
    }
    out = Path(args.out)
    if args.only and out.exists() and out == RESULTS / "reach.json":
        # A partial run updates the rows it measured and keeps the others.
        old = json.loads(out.read_text())
        merged = {r["name"]: r for r in old.get("models", [])}
        merged.update({r["name"]: r for r in rows})
        order = [n for n in entries if n in merged]
        result["models"] = [merged[n] for n in order]
        result["summary"] = {"models": len(order), "passed": sum(merged[n]["pass"] for n in order),
                             "failed": [n for n in order if not merged[n]["pass"]]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")

    s = result["summary"]
    print(f"\n{s['passed']}/{s['models']} pass; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
