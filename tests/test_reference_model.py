"""The reference video DiT: build, save/load offline, a 2-step training smoke run, sampling."""

import json

import pytest
import torch

import adacache_fx as ax
from adacache_lab.reference.data import encode_captions, make_dataset
from adacache_lab.reference.model import ReferenceConfig, build, generate, load, save
from adacache_lab.reference.train import train

SMALL = ReferenceConfig(num_layers=1, heads=2, head_dim=16, text_dim=32, frames=4, size=16, patch_size=2,
                        latent_channels=4, autoencoder_width=8)


def test_save_load_round_trip_is_exact(tmp_path):
    model = build(SMALL)
    save(tmp_path / "w.safetensors", model)
    loaded = load(tmp_path / "w.safetensors")
    assert loaded.config == SMALL
    for name, module in model.modules().items():
        for a, b in zip(module.state_dict().values(), loaded.modules()[name].state_dict().values()):
            assert torch.equal(a, b)


def test_load_names_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="adacache_lab.reference.train"):
        load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an adacache_fx reference model"):
        load(tmp_path / "other.safetensors")


def test_two_step_training_smoke_run(tmp_path):
    record = train(tmp_path / "w.safetensors", SMALL, steps=2, minutes=None, batch=2, save_every=1,
                   progress=False, autoencoder_steps=2)
    assert record["autoencoder"]["steps"] == 2
    assert record["steps"] == 2 and all(torch.isfinite(torch.tensor(record["losses"])))
    assert (tmp_path / "w.safetensors").stat().st_size > 0
    assert (tmp_path / "w.step1.safetensors").stat().st_size > 0  # EMA snapshot
    assert json.loads((tmp_path / "w.step1.loss.json").read_text())["steps"] == 1
    assert json.loads((tmp_path / "w.loss.json").read_text())["steps"] == 2
    load(tmp_path / "w.safetensors")


def test_generate_and_nocache_transform_equal_the_plain_model():
    config = SMALL
    model = build(config).eval()
    _, specs = make_dataset(2, seed=3, frames=config.frames, size=config.size)
    tokens, mask = encode_captions(specs, max_len=config.max_tokens)
    plain = generate(model, tokens, mask, num_steps=4)
    assert plain.shape == (2, 3, config.frames, config.size, config.size)
    assert plain.abs().max() <= 1.0
    ax.transform(model.transformer, ax.NoCache())
    cached = generate(model, tokens, mask, num_steps=4)
    assert (cached - plain).abs().max() <= 1e-5
    assert ax.report(model.transformer).branches


def test_video_noise_shares_the_configured_part_across_frames():
    from adacache_lab.reference.model import video_noise

    config = ReferenceConfig(frame_noise_correlation=0.5)
    noise = video_noise((64, 3, 8, 16, 16), config, torch.Generator().manual_seed(0))
    assert abs(float(noise.std()) - 1.0) < 0.02
    frames = noise.permute(2, 0, 1, 3, 4).reshape(8, -1)
    correlation = torch.corrcoef(frames)
    off_diagonal = correlation[~torch.eye(8, dtype=torch.bool)]
    assert abs(float(off_diagonal.mean()) - 0.5) < 0.02
    independent = video_noise((64, 3, 8, 16, 16), ReferenceConfig(frame_noise_correlation=0.0),
                              torch.Generator().manual_seed(0))
    frames = independent.permute(2, 0, 1, 3, 4).reshape(8, -1)
    assert float(torch.corrcoef(frames)[~torch.eye(8, dtype=torch.bool)].abs().max()) < 0.02
    with pytest.raises(ValueError, match="frame_noise_correlation"):
        video_noise((1, 3, 2, 4, 4), ReferenceConfig(frame_noise_correlation=1.0))


def test_autoencoder_shapes_range_and_learning():
    from adacache_lab.reference.autoencoder import FrameAutoencoder, train_autoencoder

    torch.manual_seed(0)
    autoencoder = FrameAutoencoder(latent_channels=4, width=8)
    videos, _ = make_dataset(4, seed=1, frames=4, size=16)
    with torch.no_grad():
        latents = autoencoder.encode(videos)
        assert latents.shape == (4, 4, 4, 4, 4)  # (B, latent channels, T, H/4, W/4)
        assert latents.abs().max() <= 1.0  # tanh: the range DDIM's clip_sample keeps
        assert autoencoder.decode(latents).shape == videos.shape
        before = float(((autoencoder.decode(latents) - videos) ** 2).mean())
    record = train_autoencoder(autoencoder, steps=60, clips=4, frames=4, size=16, progress=False)
    assert record["held_out_mse"] < 0.5 * before
    with pytest.raises(ValueError, match="divisible by 4"):
        autoencoder.encode(torch.zeros(1, 3, 2, 18, 18))
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        autoencoder.encode(torch.zeros(3, 2, 16, 16))


def test_training_with_a_passed_autoencoder_equals_training_it_inline(tmp_path):
    # The shipped weights were trained with the autoencoder phase run separately and passed in; the
    # one-command path must give the same weights.
    from adacache_lab.reference.autoencoder import train_autoencoder

    inline = train(tmp_path / "a.safetensors", SMALL, steps=2, minutes=None, batch=2, progress=False,
                   autoencoder_steps=3)
    torch.manual_seed(0)
    separate = build(SMALL)
    train_autoencoder(separate.autoencoder, steps=3, frames=SMALL.frames, size=SMALL.size, seed=0, progress=False)
    passed = train(tmp_path / "b.safetensors", SMALL, steps=2, minutes=None, batch=2, progress=False,
                   autoencoder=separate.autoencoder)
    assert inline["losses"] == passed["losses"]
    a, b = load(tmp_path / "a.safetensors"), load(tmp_path / "b.safetensors")
    for name, module in a.modules().items():
        for (key, x), y in zip(module.state_dict().items(), b.modules()[name].state_dict().values()):
            assert torch.equal(x, y), f"{name}.{key}"


def test_two_process_data_parallel_smoke_run(tmp_path):
    record = train(tmp_path / "w.safetensors", SMALL, steps=2, minutes=None, batch=2, progress=False,
                   autoencoder_steps=2, processes=2)
    assert record["steps"] == 2 and record["processes"] == 2
    assert all(torch.isfinite(torch.tensor(record["losses"])))
    single = train(tmp_path / "one.safetensors", SMALL, steps=2, minutes=None, batch=2, progress=False,
                   autoencoder_steps=2)
    # Rank 0 sees the single-process run's clips; the averaged loss includes rank 1's as well.
    assert record["losses"] != single["losses"]
    load(tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="processes"):
        train(tmp_path / "x.safetensors", SMALL, steps=1, processes=0)


def test_pixel_space_config_has_no_autoencoder(tmp_path):
    pixels = ReferenceConfig(num_layers=1, heads=2, head_dim=16, text_dim=32, frames=4, size=16, patch_size=8,
                             latent_channels=0, prediction_type="sample")
    record = train(tmp_path / "p.safetensors", pixels, steps=2, minutes=None, batch=2, progress=False)
    assert record["autoencoder"] is None
    model = load(tmp_path / "p.safetensors")
    assert model.autoencoder is None and set(model.modules()) == {"transformer", "encoder"}
    _, specs = make_dataset(1, seed=3, frames=4, size=16)
    tokens, mask = encode_captions(specs, max_len=pixels.max_tokens)
    assert generate(model, tokens, mask, num_steps=2).shape == (1, 3, 4, 16, 16)


def test_loader_workers_render_the_same_clips_and_train_the_same_weights(tmp_path):
    from adacache_lab.reference.train import ClipStream

    stream = ClipStream(SMALL, batch=2, seed=0, steps=5)
    serial = list(stream)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    parallel = list(loader)
    assert len(parallel) == len(serial) == 5
    for (v, t, m), (pv, pt, pm) in zip(serial, parallel):
        assert torch.equal(v, pv) and torch.equal(t, pt) and torch.equal(m, pm)
    assert not torch.equal(serial[0][0], serial[1][0])  # a fresh batch every step

    pixels = ReferenceConfig(num_layers=1, heads=2, head_dim=16, text_dim=32, frames=4, size=16, patch_size=8,
                             latent_channels=0, prediction_type="sample")
    inline = train(tmp_path / "a.safetensors", pixels, steps=3, minutes=None, batch=2, progress=False)
    workers = train(tmp_path / "b.safetensors", pixels, steps=3, minutes=None, batch=2, progress=False,
                    loader_workers=2)
    assert inline["losses"] == workers["losses"] and len(inline["losses"]) == 3
    with pytest.raises(ValueError, match="loader_workers"):
        train(tmp_path / "x.safetensors", pixels, steps=1, loader_workers=-1)
