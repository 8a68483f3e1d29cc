"""The command line: policy spellings, inspect, calibrate."""

import json

import pytest

import adacache_fx as ax
from adacache_lab.cli import main, parse_policy


def test_parse_policy_spellings():
    assert parse_policy("nocache") == ax.NoCache()
    assert parse_policy("static:3") == ax.Static(interval=3)
    assert parse_policy("adacache:slow", num_steps=30) == ax.AdaCache.slow(30)
    assert parse_policy("adacache", num_steps=30) == ax.AdaCache.fast(30)
    assert parse_policy("teacache:0.2") == ax.TeaCache(delta=0.2)
    assert parse_policy("fbcache:0.1") == ax.FirstBlockCache(threshold=0.1)
    assert parse_policy("pab") == ax.PAB()
    with pytest.raises(SystemExit, match="unknown policy"):
        parse_policy("fastcache")
    with pytest.raises(SystemExit, match="bad policy"):
        parse_policy("teacache:-1")


def test_inspect_prints_the_policy_and_its_decision_mode(capsys):
    assert main(["inspect", "pixart", "--policy", "fbcache"]) == 0
    out = capsys.readouterr().out
    assert "FirstBlockCache" in out and "inside each step" in out


def test_calibrate_command_writes_its_record(tmp_path, capsys):
    code = main([
        "calibrate", "--policy", "teacache", "--target", "0.5", "--steps", "10", "--runs", "1",
        "--held-out", "1", "--out", str(tmp_path),
    ])
    assert code == 0
    record = json.loads((tmp_path / "calibration.json").read_text())
    assert record["target"] == 0.5 and len(record["held_out"]) == 1
    assert 0.0 < record["held_out"][0] <= 1.0
    assert "calibrated TeaCache" in capsys.readouterr().out


def test_export_command_writes_variants_and_manifest(tmp_path, capsys):
    pytest.importorskip("onnxscript", reason="torch.onnx's exporter needs onnxscript (the export extra)")
    assert main(["export", "dit", "--policy", "static:2", "--out", str(tmp_path)]) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert len(manifest["variants"]) == 2
    assert (tmp_path / "variant_1.onnx").stat().st_size > 0
    assert "reuses" in capsys.readouterr().out
    assert main(["export", "dit", "--policy", "static:2", "--form", "if", "--out", str(tmp_path / "if")]) == 0
    assert json.loads((tmp_path / "if" / "manifest.json").read_text())["form"] == "if"
    assert "an If per cached branch (4)" in capsys.readouterr().out
