"""Every zoo model, every change a user makes to a loaded model, in several orders: does the
transformed model (NoCache) still equal the untransformed one?

The test module (tests/test_live_model.py) covers Latte, Wan and Flux; this sweeps the rest of the
zoo and more orders of operations, held out from the tests:

* ``after``: transform, call, then each change in turn (the tests' order);
* ``before``: adapters added and fused QKV before transform, then the rest after it;
* ``mid-generation``: Static(2) running a 4-step generation, the adapter re-weighted before the
  reuse step: that step must compute (equal to the untransformed model), never add stale residuals.

    python benchmarks/check_live_changes.py [--models wan,flux] [--out benchmarks/results/live_changes.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import traceback
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: its tests package holds the changes

import adacache_fx as ax  # noqa: E402
from adacache_lab.zoo import ZOO as CORE_ZOO  # noqa: E402
from adacache_lab.zoo_more import MORE_ZOO  # noqa: E402

ZOO = {**CORE_ZOO, **MORE_ZOO}  # --models takes names from both; the default is the core zoo
from tests.test_live_model import (  # noqa: E402
    add_adapter, every_change, fuse_qkv_and_edit, half_weight, out,
)

ATOL = 1e-5


def _supports(model, label: str) -> bool:
    if "adapter" in label or "lora" in label:
        return hasattr(model, "add_adapter")
    if "qkv" in label:
        return hasattr(model, "fuse_qkv_projections")
    return True


def run_after(name: str) -> dict:
    entry = ZOO[name]
    reference, model = entry.build(), ax.transform(entry.build(), ax.NoCache())
    out(model, entry)
    rows = {}
    for label, change in every_change():
        if not _supports(reference, label):
            rows[label] = "n/a"
            continue
        try:
            change(reference)
        except Exception as exc:  # noqa: BLE001 - the change does not apply to this model's code
            rows[label] = f"n/a: the change fails on the untransformed model ({type(exc).__name__})"
            reference, model = entry.build(), ax.transform(entry.build(), ax.NoCache())
            out(model, entry)
            continue
        try:
            expected = [out(reference, entry, t) for t in (500.0, 400.0)]
        except Exception as exc:  # noqa: BLE001
            rows[label] = f"n/a: the untransformed model fails after the change ({type(exc).__name__})"
            reference, model = entry.build(), ax.transform(entry.build(), ax.NoCache())
            out(model, entry)
            continue
        try:
            change(model)
            diff = max((out(model, entry, t) - e).abs().max().item() for t, e in zip((500.0, 400.0), expected))
            rows[label] = diff
        except Exception as exc:  # noqa: BLE001 - recorded
            rows[label] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            reference, model = entry.build(), ax.transform(entry.build(), ax.NoCache())
            out(model, entry)
        ax.reset(model)
    return rows


def run_before(name: str) -> dict:
    entry = ZOO[name]
    reference, model = entry.build(), entry.build()
    rows = {}
    if not hasattr(reference, "add_adapter"):
        return {"adapters and fused qkv before transform": "n/a"}
    try:  # a change that fails on the untransformed model is not ours to follow
        add_adapter(reference)
        if hasattr(reference, "fuse_qkv_projections"):
            fuse_qkv_and_edit(reference)
        out(reference, entry)
    except Exception as exc:  # noqa: BLE001
        return {"adapters and fused qkv before transform": f"n/a: the change fails on the untransformed model "
                                                           f"({type(exc).__name__})"}
    add_adapter(model)
    if hasattr(model, "fuse_qkv_projections"):
        fuse_qkv_and_edit(model)
    ax.transform(model, ax.NoCache())
    rows["adapters and fused qkv before transform"] = (out(model, entry) - out(reference, entry)).abs().max().item()
    for m in (reference, model):
        half_weight(m)
    rows["then re-weighted after"] = (out(model, entry, 400.0) - out(reference, entry, 400.0)).abs().max().item()
    return rows


def run_mid_generation(name: str) -> dict:
    entry = ZOO[name]
    if not hasattr(entry.build(), "add_adapter"):
        return {"re-weighted before a reuse step": "n/a"}
    reference, model = entry.build(), entry.build()
    for m in (reference, model):
        add_adapter(m)
    ax.transform(model, ax.Static(2))
    timesteps = (999.0, 899.0, 799.0, 699.0)
    got = []
    with torch.no_grad():
        for step, t in enumerate(timesteps):
            if step == 1:
                half_weight(model)
                half_weight(reference)
            got.append(entry.output(model(**entry.inputs(timestep=t))))
    diff = (got[1] - out(reference, entry, timesteps[1])).abs().max().item()
    reused = ax.report(model).steps[1].reused
    return {"re-weighted before a reuse step": diff, "branches reused at that step": reused}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(sorted(CORE_ZOO)))
    parser.add_argument("--out", default="benchmarks/results/live_changes.json")
    args = parser.parse_args(argv)
    results, failures = {}, []
    for name in args.models.split(","):
        record = {}
        for order, run in (("after", run_after), ("before", run_before), ("mid-generation", run_mid_generation)):
            try:
                record[order] = run(name)
            except Exception as exc:  # noqa: BLE001 - recorded
                record[order] = {"error": "".join(traceback.format_exception_only(exc)).strip()[:300]}
        results[name] = record
        for order, rows in record.items():
            for label, value in rows.items():
                bad = isinstance(value, str) and not value.startswith("n/a") or (
                    isinstance(value, float) and value > ATOL) or (label.startswith("branches reused") and value)
                if bad:
                    failures.append(f"{name} / {order} / {label}: {value}")
        print(name, json.dumps(record))
    summary = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, torch {torch.__version__}",
        "command": "python benchmarks/check_live_changes.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "tolerance": ATOL,
        "failures": failures,
        "models": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{len(failures)} failure(s); wrote {args.out}")
    for failure in failures:
        print("  ", failure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
