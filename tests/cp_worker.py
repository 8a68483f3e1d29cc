"""One rank of a context-parallel run (diffusers' Ulysses over gloo), for tests/test_context_parallel.py.

``run_cases(cases, steps)`` runs each (model, policy, order) case for ``steps`` steps, in this
process, with or without diffusers' context parallelism, and returns per case the per-step plans,
the outputs and what the report says. ``main`` is one rank: it joins the group, runs the cases and
saves the results for the parent to compare with a single-process run. ``launch`` starts the ranks:
it imports torch, diffusers and the models' modules once, then forks one process per rank (four
ranks each importing them on two cores spent ~25 s before running anything).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import traceback
from datetime import timedelta
from unittest import mock

import torch

import adacache_fx as ax
from adacache_lab.zoo import ZOO

# name -> policy factory; each is a decision class the group reduction must cover.
POLICIES = {
    "nocache": lambda: ax.NoCache(),
    "static": lambda: ax.Static(2),
    # A codebook for 8 steps whose rates the measured changes (about 0.2-0.35 here) do move.
    "adacache": lambda: ax.AdaCache(codebook=CODEBOOK, num_steps=STEPS_DEFAULT),
    "adacache_moreg": lambda: ax.AdaCache(codebook=CODEBOOK, num_steps=STEPS_DEFAULT, moreg=True),
    "adacache_l2": lambda: ax.AdaCache(codebook=CODEBOOK, num_steps=STEPS_DEFAULT, distance="l2"),
    "first_block": lambda: ax.FirstBlockCache(threshold=0.3),
    "teacache": lambda: ax.TeaCache(delta=0.3),
    "pab": lambda: ax.PAB(window_steps=(1, STEPS_DEFAULT - 1)),
    "magcache": lambda: ax.MagCache(threshold=0.1, mag_ratios="wan2.1-t2v-1.3b", num_steps=STEPS_DEFAULT),
    "taylorseer": lambda: ax.TaylorSeer(ax.Static(3)),
    "easycache": lambda: ax.EasyCache(threshold=0.3, warmup=1),
    "toca": lambda: ax.ToCa(),
    "duca": lambda: ax.DuCa(early_full=1),
    "foca": lambda: ax.FoCa(ax.Static(3)),
    "lemica": lambda: ax.LeMiCa(compute_steps=(0, 1, 3, 5, 7), num_steps=STEPS_DEFAULT),
    "fastercache": lambda: ax.FasterCache(start=0.2, num_steps=STEPS_DEFAULT),
    "dbcache": lambda: ax.FirstBlockCache(threshold=0.6, tail_blocks=1),
}
STEPS_DEFAULT = 8
CODEBOOK = ((0.2, 3), (0.25, 2), (100.0, 1))


def _build_wan_4_heads() -> torch.nn.Module:
    """The zoo's Wan with 4 heads of 8: Ulysses over 4 ranks splits the heads."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()


MODELS = {**ZOO, "wan4": dataclasses.replace(ZOO["wan"], name="wan4", build=_build_wan_4_heads)}


def _timesteps(steps: int) -> list[float]:
    return [999.0 - i * (999.0 / steps) for i in range(steps)]


def _enable(model: torch.nn.Module, world: int) -> None:
    from diffusers import ContextParallelConfig

    # diffusers picks the rank's device as rank % torch.accelerator.device_count(), which is 0 on a
    # CPU build of torch: give it one device (the process's CPU).
    with mock.patch("torch.accelerator.device_count", return_value=1):
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))


def run_case(name: str, policy_name: str, order: str, steps: int, world: int,
             captures: ax.CaptureCache | None = None) -> dict:
    """``order``: ``"before"`` (parallelism, then transform), ``"after"`` (before the first call),
    ``"after_call"`` (after a first call captured the blocks), or ``"single"`` (none)."""
    entry = MODELS[name]
    model = entry.build()
    policy = POLICIES[policy_name]()
    if order == "before":
        _enable(model, world)
    ax.transform(model, policy, captures=captures)
    if order == "after_call":  # captured and cached for one process first
        with torch.no_grad():
            model(**entry.inputs(timestep=999.0, seed=0), return_dict=False)
    if order in ("after", "after_call"):
        _enable(model, world)
    outputs = []
    inputs = entry.inputs(timestep=999.0, seed=0)
    latent = inputs["hidden_states"]
    with torch.no_grad(), ax.generation(model, num_steps=steps):
        for t in _timesteps(steps):  # an Euler loop: each step's latent continues the last
            out = model(**{**inputs, "hidden_states": latent, "timestep": torch.tensor([t])}, return_dict=False)[0]
            latent = latent - out / steps
            outputs.append(out)
    report = ax.report(model)
    return {
        # The generation's steps (after_call's first call is a generation of its own before it).
        "plans": [(s.computed, s.reused, s.partial) for s in report.steps
                  if s.generation == report.steps[-1].generation],
        "outputs": outputs,
        "parallel": report.parallel,
        "reductions": report.reduced_decisions,
        "cache_peak_bytes": report.cache_peak_bytes,
        "text": str(report),
    }


def run_cases(cases: list[tuple[str, str, str]], steps: int, world: int = 1) -> dict:
    # One capture per block structure and input signature for all the cases (captures dominate).
    captures = ax.CaptureCache()
    return {case: run_case(*case, steps=steps, world=world, captures=captures) for case in cases}


def main(rank: int, world: int, port: int, cases: list, steps: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        results = {}
        captures = ax.CaptureCache()
        for case in cases:
            try:
                results[case] = run_case(*case, steps=steps, world=world, captures=captures)
            except Exception as exc:  # reported to the parent, which fails the test with it
                results[case] = {"error": f"{type(exc).__name__}: {exc}"}
                raise
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def launch(world: int, port: int, cases: list, steps: int, out_dir: str) -> int:
    """Fork ``world`` ranks from this process (nothing run in it yet, so no thread pool is copied) and
    wait for them all; the exit status is 1 when a rank failed (its traceback is in the output)."""
    from diffusers import ContextParallelConfig  # noqa: F401 - imported once, before the fork

    for name in {name for name, _, _ in cases}:
        MODELS[name].build()  # imports the model's modules (diffusers loads them lazily)
    pids = {}
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                main(rank, world, port, cases, steps, out_dir)
                status = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        pids[pid] = rank
    failed = []
    for _ in range(world):
        pid, status = os.wait()
        if os.waitstatus_to_exitcode(status) != 0:
            failed.append(pids[pid])
    if failed:
        print(f"rank(s) {sorted(failed)} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":  # python tests/cp_worker.py WORLD PORT OUT_DIR STEPS CASE...
    world, port, out_dir, steps = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    sys.exit(launch(world, port, [tuple(c.split(":")) for c in sys.argv[5:]], steps, out_dir))
