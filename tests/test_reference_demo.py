"""The demo and the bench on the bundled reference model, and the claim checks on known rows."""

import json

import pytest
import torch

from adacache_lab.cli import main
from adacache_lab.reference.bench import Point, bench_prompts, claims, default_points, run_bench
from adacache_lab.reference.demo import DEFAULT_JUDGE, DEFAULT_WEIGHTS, demo_prompts, quality
from adacache_lab.reference.model import load


def test_bundled_files_load_offline():
    model = load(DEFAULT_WEIGHTS)
    assert DEFAULT_WEIGHTS.stat().st_size <= 20 * 2**20  # the limit for shipped weights
    assert model.config.frames == 8 and model.config.size == 32
    assert DEFAULT_JUDGE.exists()


def test_demo_command_writes_table_gif_and_plot(tmp_path, capsys):
    assert main(["demo", "--clips", "2", "--steps", "8", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "AdaCache-fast+MoReg" in printed and "PSNR" in printed
    record = json.loads((tmp_path / "demo.json").read_text())
    assert [r["policy"] for r in record["rows"]] == ["no cache", "AdaCache-fast+MoReg"]
    uncached = record["rows"][0]
    assert uncached["compute_fraction"] == 1.0 and uncached["computed_steps"] == [8, 8]
    assert (tmp_path / "demo.gif").stat().st_size > 0
    assert (tmp_path / "demo_decisions.png").stat().st_size > 0


def test_prompt_sets_span_motion():
    specs = demo_prompts(4)
    assert {s.speed for s in specs} == {"static", "slow", "fast"}
    assert [s.motion_amount for s in specs] == sorted(s.motion_amount for s in specs)
    bench = bench_prompts(6)
    assert [s.speed for s in bench] == ["static", "slow", "fast"] * 2


def test_quality_metrics():
    a = torch.rand(3, 8, 32, 32) * 2 - 1
    assert quality(a, a) == (100.0, pytest.approx(1.0))
    psnr, ssim = quality(a, (a + 0.1).clamp(-1, 1))
    assert 20 < psnr < 30 and ssim < 1.0


def test_bench_runs_a_small_sweep(tmp_path):
    points = [p for p in default_points() if p.label in ("no cache", "Static(2)", "AdaCache x1")]
    record = run_bench(tmp_path / "b", clips=3, num_steps=8, points=points, progress=False)
    assert [r["label"] for r in record["rows"]] == ["no cache", "Static(2)", "AdaCache x1"]
    static = record["rows"][1]
    assert static["compute_fraction"] == pytest.approx(5 / 8)  # steps 0, 2, 4, 6 and the last one
    assert static["psnr"] < 100.0 and len(static["per_clip_psnr"]) == 3
    assert json.loads((tmp_path / "b.json").read_text())["claims"]["a"]
    assert (tmp_path / "b.png").stat().st_size > 0


def test_bench_records_a_magcache_curve_and_sweeps_the_new_methods(tmp_path):
    from adacache_lab.reference.bench import magcache_points, record_magcache_curve
    from adacache_lab.reference.demo import DEFAULT_WEIGHTS

    from adacache_lab.reference.bench import lemica_points, record_lemica_costs

    costs = record_lemica_costs(DEFAULT_WEIGHTS, num_steps=8, guidance_scale=1.0, max_span=3)
    lemica = lemica_points(costs, max_span=3)
    assert lemica and all(len(p.make(8).compute_steps) == int(p.label.split("=")[1]) for p in lemica)
    curve = record_magcache_curve(DEFAULT_WEIGHTS, num_steps=8, guidance_scale=1.0, runs=1)
    assert len(curve) == 8 and all(r > 0 for r in curve)
    points = [p for p in default_points() if p.label in ("no cache", "EasyCache 0.2", "FoCa(Static(2))")]
    points += [p for p in magcache_points(curve) if p.label == "MagCache 0.4"] + lemica[-1:]
    record = run_bench(tmp_path / "b", clips=2, num_steps=8, points=points, progress=False)
    rows = {r["family"]: r for r in record["rows"]}
    assert set(rows) == {"no cache", "EasyCache", "FoCa", "MagCache", "LeMiCa"}
    assert rows["FoCa"]["compute_fraction"] < 1.0 and rows["MagCache"]["compute_fraction"] <= 1.0


def _row(family, label, fraction, psnr, steps=(1, 1), per_fraction=None, per_psnr=None):
    return {"family": family, "label": label, "compute_fraction": fraction, "psnr": psnr,
            "computed_steps": list(steps), "per_clip_fraction": per_fraction or [fraction] * len(steps),
            "per_clip_psnr": per_psnr or [psnr] * len(steps)}


def test_claims_read_the_curves_both_ways():
    static = [_row("Static", "Static(2)", 0.5, 30.0), _row("Static", "Static(3)", 0.36, 25.0)]
    better = [_row("AdaCache", "a1", 0.3, 27.0, steps=(8, 12)), _row("AdaCache", "a2", 0.6, 35.0, steps=(10, 14))]
    worse = [_row("AdaCache", "a1", 0.3, 20.0), _row("AdaCache", "a2", 0.6, 28.0)]
    motions = [0.0, 2.0]
    up = claims(static + better, motions)
    assert [c["holds"] for c in up["a"]] == [True, True]
    assert up["a"][0]["adacache_psnr"] == pytest.approx(27.0 + (0.5 - 0.3) / 0.3 * 8.0)
    assert up["b"]["holds"] and up["b"]["spearman_motion_vs_steps"] == pytest.approx(1.0, abs=1e-4)
    down = claims(static + worse, motions)
    assert [c["holds"] for c in down["a"]] == [False, False]
    assert not down["b"]["holds"]  # every clip computed the same number of steps
    out_of_range = claims([_row("Static", "Static(2)", 0.5, 30.0), _row("AdaCache", "a", 0.7, 40.0)], motions)
    assert out_of_range["a"][0]["adacache_psnr"] is None and out_of_range["a"][0]["holds"] is None


def test_claim_c_compares_moreg_on_high_motion_clips():
    motions = [0.0, 3.0]
    ada = [_row("AdaCache", "a1", 0.3, 0, per_fraction=[0.3, 0.3], per_psnr=[40.0, 20.0]),
           _row("AdaCache", "a2", 0.6, 0, per_fraction=[0.6, 0.6], per_psnr=[45.0, 30.0])]
    moreg = [_row("AdaCache+MoReg", "m1", 0.3, 0, per_fraction=[0.3, 0.3], per_psnr=[38.0, 24.0]),
             _row("AdaCache+MoReg", "m2", 0.6, 0, per_fraction=[0.6, 0.6], per_psnr=[44.0, 33.0])]
    result = claims(ada + moreg, motions)["c"]
    assert result[0]["compute_fraction"] == 0.5
    assert result[0]["adacache_psnr_high_motion"] == pytest.approx(20.0 + (0.2 / 0.3) * 10.0)
    assert result[0]["moreg_psnr_high_motion"] == pytest.approx(24.0 + (0.2 / 0.3) * 9.0)
    assert all(c["holds"] for c in result)
