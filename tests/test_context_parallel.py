"""Caching on diffusers' own context parallelism (Ulysses), in real ``torch.distributed`` processes.

Each test spawns its ranks (gloo, CPU) once for many cases, bounded by a timeout so a hang fails
instead of blocking the suite, and compares every rank's per-step plans and outputs with the same
cases run in this process without parallelism: the group-reduced decisions must be the
single-process decisions, and reused regions must skip their collectives on every rank alike.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
import torch.distributed as dist  # noqa: E402

if not dist.is_available():
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)
if not hasattr(os, "fork"):
    pytest.skip("the ranks are forked from one launcher (cp_worker.launch): needs os.fork", allow_module_level=True)

from tests.cp_worker import run_cases  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
TIMEOUT_S = 240  # all ranks of one launch; a hang (ranks deciding differently) ends here


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, cases: list[tuple[str, str, str]], tmp_path: Path) -> list[dict]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    # One launcher forks the ranks (see cp_worker.launch); its own session, so a hang kills them all.
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "cp_worker.py"), str(world), str(port),
                             str(tmp_path), str(STEPS), *[":".join(c) for c in cases]],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"context-parallel ranks did not finish within {TIMEOUT_S} s (a hang: ranks disagree?)")
    assert proc.returncode == 0, f"a rank failed:\n{log[-6000:]}"
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


# Token-wise policies pick tokens per shard (each rank its own share of every shard's tokens), and a
# region with a collective inside (Ulysses attention) is not recomputed by token: their plans agree
# over the ranks, not with one process's.
PER_SHARD = ("toca", "duca")


def _compare(ranks: list[dict], cases: list[tuple[str, str, str]]) -> None:
    single = run_cases([(name, policy, "single") for name, policy, _ in cases if policy not in PER_SHARD], STEPS)
    for case in cases:
        if case[1] in PER_SHARD:
            first = ranks[0][case]
            for rank, results in enumerate(ranks[1:], 1):
                assert results[case]["plans"] == first["plans"], (case, rank)
                assert all(torch.equal(a, b) for a, b in zip(results[case]["outputs"], first["outputs"])), case
            assert any(partial for _, _, partial in first["plans"]), first["plans"]
            continue
        expected = single[(case[0], case[1], "single")]
        for rank, results in enumerate(ranks):
            got = results[case]
            assert got["plans"] == expected["plans"], (case, rank, got["plans"], expected["plans"])
            diff = max((a - b).abs().max().item() for a, b in zip(got["outputs"], expected["outputs"]))
            assert diff <= 1e-4, (case, rank, diff)
            assert got["parallel"] is not None and "context parallel" in got["parallel"], got["text"]
        # The test can fail: the policy reused something (plans can differ) unless it never reuses.
        if case[1] != "nocache":
            assert any(reused or partial for _, reused, partial in expected["plans"]), (case, expected["plans"])


# Every policy under Ulysses on one of two models. Wan's context-parallel plan hooks its blocks (so no
# capture is shared between cases: each Wan case captures its blocks again, ~2.5 s a rank); Flux's
# splits at the model's entry, so its cases share their captures. Wan keeps the cases that need video
# (MoReg), token-wise recompute (per shard), the orders of enabling, and one of each decision class;
# the other schedule-driven and forecasting policies run on Flux.
WAN_CASES = [("wan", p, "before") for p in (
    "nocache", "static", "adacache", "adacache_moreg", "first_block", "toca", "duca")] + [
    ("wan", p, "after") for p in ("adacache", "first_block")] + [
    ("wan", p, "after_call") for p in ("static", "first_block")]  # parallelism after blocks were captured
FLUX_CASES = [("flux", p, "before") for p in (
    "nocache", "static", "adacache_l2", "first_block", "dbcache", "teacache", "pab", "magcache", "fastercache",
    "taylorseer", "easycache", "foca", "lemica")]


def test_every_policy_on_two_ulysses_ranks_decides_as_one_process(tmp_path):
    cases = WAN_CASES + FLUX_CASES
    ranks = _launch(2, cases, tmp_path)
    _compare(ranks, cases)
    # Metric-reading policies reduced their decisions over the group; schedule-driven ones need none.
    for case in cases:
        reductions = ranks[0][case]["reductions"]
        if case[1] in ("adacache", "adacache_moreg", "adacache_l2", "first_block", "dbcache", "teacache"):
            assert reductions > 0, case
        elif case[1] in ("nocache", "static", "pab", "magcache", "lemica", "fastercache"):
            assert reductions == 0, case


def test_four_ranks_and_per_rank_cache_memory(tmp_path):
    # Ulysses over 4 ranks splits the heads: a Wan with 4 heads. Enabled after transform (before the
    # first call): decisions reduced over four ranks, and each rank caches its quarter of the sequence.
    case = ("wan4", "adacache", "after")
    ranks = _launch(4, [case], tmp_path)
    _compare(ranks, [case])
    single = run_cases([("wan4", "adacache", "single")], STEPS)[("wan4", "adacache", "single")]
    assert single["cache_peak_bytes"] > 0
    for results in ranks:
        assert results[case]["reductions"] > 0, case
        assert results[case]["cache_peak_bytes"] * 4 == pytest.approx(single["cache_peak_bytes"], rel=0.02)
