"""Minimal repro: Inductor compiles a torch.cond branch for its operand's traced strides, but lays
the operand out as it likes when a fused kernel computes it; the branch's assert_size_stride then
fails at run time (torch 2.13, CPU; the whole-model graph of ax.compile(scope="model") hit it).

    python benchmarks/experiments/inductor_cond_strides.py

Prints the failure without a workaround, then the same graph with the operand passed through an
opaque copy of fixed layout (adacache_fx's dense_copy, what pin_cond_operands inserts), which runs.
"""

import torch

import adacache_fx.passes.conditional  # noqa: F401  (registers adacache_fx::dense_copy)


def branch_reuse(cache, y):
    return cache.clone()


def branch_compute(cache, y):
    return torch.nn.functional.layer_norm(y, (y.shape[-1],)) + y


WEIGHT = torch.randn(32, 4, 1, 2, 2)


def operand(x):
    # Wan's patch embedding: conv, flatten, transpose, contiguous. Traced contiguous; Inductor keeps
    # the conv output's order and writes the "contiguous" copy transposed.
    return torch.nn.functional.conv3d(x, WEIGHT, stride=(1, 2, 2)).flatten(2).transpose(1, 2).contiguous()


def plain(flag, cache, x):
    return torch.cond(flag, branch_reuse, branch_compute, (cache, operand(x)))


def pinned(flag, cache, x):
    return torch.cond(flag, branch_reuse, branch_compute, (cache, torch.ops.adacache_fx.dense_copy(operand(x))))


def run(fn, label):
    x, cache = torch.randn(1, 4, 2, 8, 8), torch.randn(1, 32, 32)
    compiled = torch.compile(fn, backend="inductor", fullgraph=True)
    try:
        for flag in (False, True, False):
            out = compiled(torch.tensor(flag), cache, x)
            expected = fn(torch.tensor(flag), cache, x)
            assert torch.allclose(out, expected), "wrong values"
        print(f"{label}: runs, equal to eager")
    except Exception as exc:  # noqa: BLE001 - the point is to show it
        message = str(exc).strip().splitlines()
        print(f"{label}: {type(exc).__name__}: {' | '.join(message[:2])}")


if __name__ == "__main__":
    run(plain, "operand as traced")
    run(pinned, "operand through dense_copy")
