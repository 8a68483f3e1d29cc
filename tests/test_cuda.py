"""CUDA graphs (ax.compile(mode="reduce-overhead")) with cached steps: outputs equal to eager and
cached residuals never overwritten by a later replay. Needs a CUDA GPU; skipped elsewhere."""

import pytest
import torch

import adacache_fx as ax
from adacache_fx.zoo import ZOO

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: CUDA graphs are captured and replayed on the device"
)

STEPS = 20


def _to_cuda(inputs: dict) -> dict:
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _sample(out):
    return out[0] if isinstance(out, tuple) else out.sample


def test_cuda_graph_replay_keeps_cached_residuals_and_matches_eager():
    entry = ZOO["latte"]
    eager = entry.build().cuda()
    graphed = entry.build().cuda()
    graphed.load_state_dict(eager.state_dict())
    ax.transform(eager, ax.Static(2))
    ax.compile(ax.transform(graphed, ax.Static(2)), mode="reduce-overhead")
    diffs, residual_diffs = [], []
    with torch.no_grad(), ax.generation(eager, num_steps=STEPS), ax.generation(graphed, num_steps=STEPS):
        for i in range(STEPS):
            inputs = _to_cuda(entry.inputs(timestep=999.0 - i * (999.0 / STEPS)))
            expected = _sample(eager(**inputs))
            got = _sample(graphed(**inputs)).clone()
            scale = max(1.0, expected.abs().max().item())
            diffs.append((expected - got).abs().max().item() / scale)
            # The caches after this step: a replay that overwrote a stored residual would show here.
            want = ax.get_runtime(eager).cached_residuals()
            have = ax.get_runtime(graphed).cached_residuals()
            assert want.keys() == have.keys()
            residual_diffs += [(w - h).abs().max().item() for b in want for w, h in zip(want[b], have[b])]
    assert max(diffs) <= 1e-3, diffs
    assert max(residual_diffs) <= 1e-3
    plans = [(s.computed, s.reused) for s in ax.report(eager).steps]
    assert plans == [(s.computed, s.reused) for s in ax.report(graphed).steps]
    assert any(reused for _, reused in plans)
