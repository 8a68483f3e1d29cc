"""One CaptureCache shared by several transformed models: programs are reused, never wrongly.

A second model of the same architecture binds its blocks to the first one's programs (no export);
its outputs still equal its own untransformed model's (each model's parameters are read live), and
a model whose blocks differ (an adapter, other shapes) captures for itself.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch

import adacache_fx as ax
from adacache_fx.passes import program as program_module
from adacache_lab.zoo import ZOO

from tests.conftest import max_diff


def _run(model, entry, steps: int = 4, seed: int = 0):
    inputs = entry.inputs(timestep=999.0, seed=seed)
    outs = []
    marked = ax.generation(model, num_steps=steps) if ax.is_transformed(model) else contextlib.nullcontext()
    with torch.no_grad(), marked:
        for i in range(steps):
            outs.append(model(**{**inputs, "timestep": torch.tensor([999.0 - 200 * i])}, return_dict=False)[0])
    return outs


def _counting_captures():
    return mock.patch.object(program_module, "capture_block", wraps=program_module.capture_block)


def test_a_second_model_binds_to_shared_programs_and_computes_its_own_outputs():
    entry = ZOO["wan"]
    captures = ax.CaptureCache()
    first = ax.transform(entry.build(), ax.NoCache(), captures=captures)
    with _counting_captures() as capture:
        _run(first, entry)
        captured_first = capture.call_count
    assert captured_first >= 1 and len(captures) == captured_first

    torch.manual_seed(123)  # other weights: a shared program must read the second model's own
    original = entry.build()
    for p in original.parameters():
        p.data.normal_(0, 0.05)
    expected = _run(original, entry)
    second = ax.transform(original, ax.Static(2), captures=captures)
    with _counting_captures() as capture:
        got = _run(second, entry)
        assert capture.call_count == 0  # every block found its program in the cache
    assert captures.hits == captured_first and len(captures) == captured_first  # each program fetched once
    # Static(2) computes steps 0 and 2, reuses 1 and 3: compare the computed ones exactly.
    assert max_diff(got[0], expected[0]) == 0.0 and max_diff(got[2], expected[2]) <= 1e-5
    assert ax.report(second).steps[1].reused > 0


def test_other_structures_and_shapes_capture_for_themselves_and_a_dropped_capture_leaves_the_cache():
    entry = ZOO["wan"]
    captures = ax.CaptureCache()
    _run(ax.transform(entry.build(), ax.NoCache(), captures=captures), entry)
    held = len(captures)

    changed = entry.build()
    changed.blocks[0].attn1.to_q = torch.nn.Sequential(changed.blocks[0].attn1.to_q)  # another structure
    expected = _run(changed, entry)
    model = ax.transform(changed, ax.NoCache(), captures=captures)
    with _counting_captures() as capture:
        got = _run(model, entry)
        assert capture.call_count == 1  # block 0 only; the others share
    assert max(max_diff(a, b) for a, b in zip(got, expected)) == 0.0
    assert len(captures) == held + 1

    ax.reset(model, captures=True)  # unseen changes: its programs may be stale for everyone
    assert len(captures) == 0


def test_captures_must_be_a_capture_cache():
    with pytest.raises(TypeError, match="CaptureCache"):
        ax.transform(ZOO["wan"].build(), ax.NoCache(), captures={})


class _ScaledBlock(torch.nn.Module):
    """A block whose forward reads a plain tensor attribute (not a buffer): a capture bakes it in."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(8)
        self.mlp = torch.nn.Linear(8, 8)
        self.scale = torch.full((8,), scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x)) * self.scale


class _Net(torch.nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList([_ScaledBlock(scale) for _ in range(2)])

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _each_exact_and_none_shared(originals) -> None:
    """Each model, transformed with one shared CaptureCache, computes exactly what it did untransformed,
    and the cache took none of their programs."""
    captures = ax.CaptureCache()
    x = torch.randn(1, 4, 8)
    for original in originals:
        with torch.no_grad():
            expected = original(x, torch.tensor(1.0))
        model = ax.transform(original, ax.NoCache(), captures=captures, blocks=["blocks"])
        with torch.no_grad():
            assert torch.equal(model(x, torch.tensor(1.0)), expected)
    assert len(captures) == 0 and captures.hits == 0


def test_blocks_that_bake_in_a_plain_tensor_are_never_shared():
    # The second model's blocks hold another constant.
    _each_exact_and_none_shared(_Net(scale) for scale in (1.0, 3.0))


def _scaled_forward(module: torch.nn.Module, factor: float):
    """An instance ``forward`` as diffusers' hooks install one: its behaviour lives in a closure."""
    plain = type(module).forward

    def forward(x):
        return plain(module, x) * factor

    return forward


def test_blocks_with_an_installed_forward_are_never_shared():
    def hooked(factor):  # same code, another closure: the capture bakes in the factor
        original = _Net(1.0)
        for block in original.blocks:
            del block.scale  # a buffer, not a plain tensor: only the installed forward differs
            block.register_buffer("scale", torch.ones(8))
            block.mlp.forward = _scaled_forward(block.mlp, factor)
        return original

    _each_exact_and_none_shared(hooked(factor) for factor in (1.0, 3.0))


# Two models sharing captures through every live change, and a third never changed beside them:
# tests/test_live_model.py::test_nocache_follows_every_change[wan].
