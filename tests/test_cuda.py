"""What needs a CUDA GPU (skipped elsewhere): CUDA graphs (ax.compile(mode="reduce-overhead")) with
cached steps, whose outputs equal eager and whose cached residuals are never overwritten by a later
replay; and the reference model's training and sampling on the device."""

import pytest
import torch

import adacache_fx as ax
from adacache_lab.zoo import ZOO

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: CUDA graphs, training and sampling run on the device"
)

STEPS = 20


def _to_cuda(inputs: dict) -> dict:
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _sample(out):
    return out[0] if isinstance(out, tuple) else out.sample


@pytest.mark.parametrize("fold", [False, True], ids=["per_branch", "folded"])
def test_cuda_graph_replay_keeps_cached_residuals_and_matches_eager(fold):
    """Per branch: every cached residual equals eager's after every step (a replay that overwrote one
    would show) and keeps one address over the generation (a static input when reused). Folded:
    the span's residual is added outside the graphs; outputs and plans equal eager's."""
    entry = ZOO["latte"]
    eager = entry.build().cuda()
    graphed = entry.build().cuda()
    graphed.load_state_dict(eager.state_dict())
    ax.transform(eager, ax.Static(2), fold=fold)
    ax.compile(ax.transform(graphed, ax.Static(2), fold=fold), mode="reduce-overhead")
    diffs, residual_diffs, addresses = [], [], []
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
            addresses.append({b: [t.data_ptr() for t in have[b]] for b in have})
    assert max(diffs) <= 1e-3, diffs
    if not fold:
        assert max(residual_diffs) <= 1e-3
        assert all(a == addresses[0] for a in addresses[1:]), "a cached branch moved: CUDA graphs would copy it"
    plans = [(s.computed, s.reused) for s in ax.report(eager).steps]
    assert plans == [(s.computed, s.reused) for s in ax.report(graphed).steps]
    assert any(reused for _, reused in plans)


def test_reference_model_trains_and_samples_on_cuda(tmp_path):
    # The bundled weights were trained with device="cuda" and loader workers; sampling on the GPU
    # must start from the same (CPU-drawn) noise as on the CPU and give the same clips.
    from adacache_lab.reference.data import encode_captions, make_dataset
    from adacache_lab.reference.model import ReferenceConfig, generate, load
    from adacache_lab.reference.train import train

    config = ReferenceConfig(num_layers=1, heads=2, head_dim=16, text_dim=32, frames=4, size=16, patch_size=8,
                             latent_channels=0, prediction_type="sample")
    record = train(tmp_path / "w.safetensors", config, steps=3, minutes=None, batch=4, progress=False,
                   device="cuda", loader_workers=2)
    assert len(record["losses"]) == 3 and all(torch.isfinite(torch.tensor(record["losses"])))
    model = load(tmp_path / "w.safetensors")
    _, specs = make_dataset(2, seed=5, frames=4, size=16, grid=True)
    tokens, mask = encode_captions(specs, max_len=config.max_tokens)
    on_cpu = generate(model, tokens, mask, num_steps=3, guidance_scale=2.0, seed=1)
    for module in model.modules().values():
        module.cuda()
    on_gpu = generate(model, tokens, mask, num_steps=3, guidance_scale=2.0, seed=1)
    assert on_gpu.device.type == "cuda"
    # cuDNN convolutions (the patch embedding) use TF32 by default: close, not equal.
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=2e-2, rtol=0)
