"""Smoke tests for the tiny diffusers model zoo in adacache_fx/zoo.py."""

import pytest
import torch

from adacache_lab.zoo import ZOO


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_entry_forward(name):
    entry = ZOO[name]
    assert entry.name == name
    model = entry.build()
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())

    with torch.no_grad():
        for batch in (1, 2):
            kwargs = entry.inputs(timestep=500.0, batch=batch)
            out = entry.output(model(**kwargs))
            assert isinstance(out, torch.Tensor)
            assert out.shape[0] == batch
            assert torch.isfinite(out).all()
            if entry.video:
                assert out.ndim in (3, 5)  # packed (B, S, C) tokens or (B, C|F, F|C, H, W)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_entry_inputs_deterministic(name):
    entry = ZOO[name]
    a = entry.inputs(timestep=500.0, batch=2, seed=0)
    b = entry.inputs(timestep=500.0, batch=2, seed=0)
    c = entry.inputs(timestep=300.0, batch=2, seed=0)
    assert _same(a, b)
    assert not torch.equal(a["timestep"], c["timestep"])
    for key in a:
        if key != "timestep":
            assert _same(a[key], c[key]), key
