"""Does compiling per block cost a compiled compute step anything? (issue 19, compiled side by side)

``ax.compile`` compiles each block's captured graph on its own; ``torch.compile(model)`` traces the
whole forward, so a peer's compiled compute step can fuse across blocks. This measures, on the peer
bench's models (``peer_first_block.py``, one CPU thread), interleaved and fastest-of-N:

* one block call: ``torch.compile(block)``, the same block in ``ax.compile(ax.transform(m, NoCache()))``
  (the captured graph, compiled, with the runtime's per-call work), and eager;
* one model call: ``torch.compile(model)``, every block and outer module compiled on its own, each
  block list compiled as one graph (the blocks chained: what a graph per span of computing blocks
  would give), and ours NoCache compiled.

    python benchmarks/compile_granularity.py --models flux wan --reps 24

Writes ``benchmarks/results/compile_granularity_cpu.json``.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import adacache_fx as ax  # noqa: E402
import peer_first_block as pfb  # noqa: E402

BLOCK_LISTS = {"transformer_blocks": "pair", "single_transformer_blocks": "pair", "blocks": "first"}


class ChainedList(torch.nn.Module):
    """A block list run as one compiled function, the blocks chained as the model's loop chains them:
    Flux's blocks take and return ``(encoder_hidden_states, hidden_states)`` by keyword, Wan's take the
    stream as the first argument and return it."""

    def __init__(self, blocks: list[torch.nn.Module], convention: str) -> None:
        super().__init__()
        self.inner = torch.nn.ModuleList(blocks)
        self.convention = convention
        self.chained = torch.compile(self._chain)

    def _chain(self, *args, **kwargs):
        out = None
        for block in self.inner:
            out = block(*args, **kwargs)
            if self.convention == "pair":
                kwargs = {**kwargs, "encoder_hidden_states": out[0], "hidden_states": out[1]}
            else:
                args = (out,) + args[1:]
        return out

    def forward(self, *args, **kwargs):
        return self.chained(*args, **kwargs)


def _interleaved(fns: dict, reps: int) -> dict:
    times = {name: [] for name in fns}
    for i in range(reps):
        for name in (list(fns) if i % 2 == 0 else list(fns)[::-1]):
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: {"min_ms": min(v) * 1e3, "median_ms": statistics.median(v) * 1e3} for name, v in times.items()}


def _first(output):
    return output if isinstance(output, torch.Tensor) else output[-1]


def measure(which: str, reps: int) -> dict:
    spec = pfb.SPECS[which](False)
    timesteps = itertools.count()

    def kwargs():
        return spec.kwargs(spec.noise, torch.tensor(999.0 - next(timesteps) * 37.0 % 990))

    # One block: the middle one, with the inputs the model gives it.
    seen: dict = {}
    probe = spec.build()
    index = len(spec.blocks(probe)) // 2
    spec.blocks(probe)[index].register_forward_pre_hook(
        lambda m, a, kw: seen.setdefault("call", (a, kw)), with_kwargs=True)
    ours_model = ax.compile(ax.transform(spec.build(), ax.NoCache()))
    with torch.no_grad():
        probe(**kwargs())
        args, kw = seen["call"]
        compiled_block = torch.compile(spec.blocks(spec.build())[index])
        ours_block = spec.blocks(ours_model)[index]
        eager_block = spec.blocks(spec.build())[index]
        block_fns = {"torch.compile(block)": lambda: compiled_block(*args, **kw),
                     "ours NoCache block (ax.compile)": lambda: ours_block(*args, **kw),
                     "eager block": lambda: eager_block(*args, **kw)}
        with ax.generation(ours_model, num_steps=10**6):
            ours_model(**kwargs())  # captured and compiled
            reference = _first(block_fns["eager block"]())
            block_error = {name: (_first(fn()) - reference).abs().max().item() for name, fn in block_fns.items()}
            for fn in block_fns.values():
                fn()
            block = _interleaved(block_fns, reps * 4)

        whole = torch.compile(spec.build())
        per_module = spec.build()
        chained = spec.build()
        for name, child in list(per_module.named_children()):
            if name in BLOCK_LISTS:
                for b in child:
                    b.compile()
            else:
                child.compile()
        for name, child in list(chained.named_children()):
            if name in BLOCK_LISTS:
                setattr(chained, name, torch.nn.ModuleList([ChainedList(list(child), BLOCK_LISTS[name])]))
            else:
                child.compile()
        models = {"torch.compile(model)": whole, "each block and outer module compiled": per_module,
                  "each block list one compiled graph": chained, "ours NoCache (ax.compile)": ours_model,
                  "eager": spec.build()}
        with ax.generation(ours_model, num_steps=10**6):
            fixed = kwargs()
            reference = models["eager"](**fixed)[0]
            model_error = {name: (m(**fixed)[0] - reference).abs().max().item() for name, m in models.items()}
            for m in models.values():
                for _ in range(2):
                    m(**kwargs())
            model = _interleaved({name: (lambda m=m: m(**kwargs())) for name, m in models.items()}, reps)
    return {"block_index": index, "block": block, "block_max_abs_diff_to_eager": block_error,
            "model": model, "model_max_abs_diff_to_eager": model_error, "inputs": spec.tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["flux", "wan"], choices=sorted(pfb.SPECS))
    parser.add_argument("--reps", type=int, default=24, help="model calls per variant (block calls: 4x)")
    parser.add_argument("--out", type=Path, default=pfb.RESULTS / "compile_granularity_cpu.json")
    options = parser.parse_args()
    torch.set_num_threads(1)
    started = datetime.datetime.now(datetime.timezone.utc)
    results = {}
    for which in options.models:
        results[which] = measure(which, options.reps)
        for part in ("block", "model"):
            for name, t in results[which][part].items():
                print(f"{which:5s} {part:5s} {name:40s} min {t['min_ms']:8.2f}  median {t['median_ms']:8.2f} ms")
    record = {"date": started.isoformat(timespec="seconds"), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "threads": 1, "reps": options.reps,
              "command": "python benchmarks/compile_granularity.py " + " ".join(sys.argv[1:]), "results": results}
    options.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {options.out}")


if __name__ == "__main__":
    main()
