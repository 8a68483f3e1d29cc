"""The kernel-timing harness: what it reports (its numbers are timings, checked in benchmarks)."""

import json

import adacache_fx as ax
from adacache_lab.zoo import ZOO
from benchmarks.bench_kernels import main, measure


def test_measure_reports_every_block_graph_and_branch_kind():
    entry = ZOO["latte"]
    model = ax.transform(entry.build(), ax.AdaCache.fast(20))
    report = measure(model, entry.inputs(timestep=500.0, batch=2), min_run_time=0.01, progress=False)
    branches = ax.report(model).branches
    assert sum(b.count for b in report.blocks) == len({b.block for b in branches})
    assert {kind for b in report.blocks for _, kind, _ in b.branches} == {b.kind for b in branches}
    assert all(b.compute > 0 and b.eager_block > 0 and b.reuse_all > 0 for b in report.blocks)
    assert report.plan is not None and report.metric is not None  # AdaCache plans and watches branches
    assert set(report.by_kind()) == {b.kind for b in branches}
    assert "reuse attn1" in str(report)
    assert ax.report(model).steps == []  # the harness leaves the model reset


def test_cli_writes_the_kernel_record(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    assert main(["--model", "dit", "--policy", "static:2", "--min-run-time", "0.01", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["model"] == "dit" and record["blocks"] and record["date"] and record["command"]
    assert "saved per model call" in capsys.readouterr().out
