"""The reference video DiT: build, save/load offline, a 2-step training smoke run, sampling."""

import json

import torch

import adacache_fx as ax
from adacache_fx.reference.data import encode_captions, make_dataset
from adacache_fx.reference.model import ReferenceConfig, build, generate, load, save
from adacache_fx.reference.train import train

SMALL = ReferenceConfig(num_layers=1, heads=2, head_dim=16, text_dim=32, frames=4, size=16)


def test_save_load_round_trip_is_exact(tmp_path):
    transformer, encoder = build(SMALL)
    save(tmp_path / "w.safetensors", transformer, encoder, SMALL)
    loaded, loaded_encoder, config = load(tmp_path / "w.safetensors")
    assert config == SMALL
    for a, b in zip(transformer.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(encoder.state_dict().values(), loaded_encoder.state_dict().values()):
        assert torch.equal(a, b)


def test_two_step_training_smoke_run(tmp_path):
    record = train(tmp_path / "w.safetensors", SMALL, steps=2, minutes=None, batch=2, progress=False)
    assert record["steps"] == 2 and all(torch.isfinite(torch.tensor(record["losses"])))
    assert (tmp_path / "w.safetensors").stat().st_size > 0
    assert json.loads((tmp_path / "w.loss.json").read_text())["steps"] == 2
    load(tmp_path / "w.safetensors")


def test_generate_and_nocache_transform_equal_the_plain_model():
    transformer, encoder = build(SMALL)
    transformer.eval()
    encoder.eval()
    _, specs = make_dataset(2, seed=3, frames=SMALL.frames, size=SMALL.size)
    tokens, mask = encode_captions(specs, max_len=SMALL.max_tokens)
    plain = generate(transformer, encoder, SMALL, tokens, mask, num_steps=4)
    assert plain.shape == (2, 3, SMALL.frames, SMALL.size, SMALL.size)
    assert plain.abs().max() <= 1.0
    ax.transform(transformer, ax.NoCache())
    cached = generate(transformer, encoder, SMALL, tokens, mask, num_steps=4)
    assert (cached - plain).abs().max() <= 1e-5
    assert ax.report(transformer).branches
