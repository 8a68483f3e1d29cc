"""Procedural reference clips (adacache_lab.reference.data) and the judge that scores them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adacache_lab.reference import data as D
from adacache_lab.reference.judge import Judge, JudgeConfig, load_judge, save_judge, train_judge


@pytest.fixture(scope="module")
def dataset():
    return D.make_dataset(300, seed=123)


def _single(shape="square", colour="white", size="medium", **motion) -> D.ClipSpec:
    spec = D.ClipSpec((D.ShapeSpec(shape, colour, size, **motion),))
    return D.ClipSpec(spec.shapes, motion_amount=D.motion_amount(spec))


def _specs(n: int, seed: int, grid: bool = False) -> list[D.ClipSpec]:
    rng = np.random.default_rng(seed)
    return [D.sample_spec(rng, grid=grid) for _ in range(n)]


# ------------------------------------------------------------------------------------------ data
def test_deterministic_under_seed():
    v1, s1 = D.make_dataset(40, seed=7)
    v2, s2 = D.make_dataset(40, seed=7)
    assert torch.equal(v1, v2) and s1 == s2
    v3, s3 = D.make_dataset(40, seed=8)
    assert s3 != s1 and not torch.equal(v1, v3)
    v4, s4 = D.make_dataset(10, seed=7)
    assert s4 == s1[:10] and torch.equal(v4, v1[:10])
    # one clip at a time renders the same pixels as the batched path
    for i in (0, 5, 39):
        torch.testing.assert_close(D.generate_clip(s1[i]), v1[i], atol=1e-6, rtol=0)


def test_shapes_and_ranges(dataset):
    videos, specs = dataset
    assert videos.shape == (300, 3, 8, 32, 32) and videos.dtype == torch.float32
    assert videos.min() >= -1.0 and videos.max() <= 1.0
    assert (videos == -1.0).float().mean() > 0.6  # mostly black background
    assert videos.max() == 1.0  # full-intensity colours are reached
    # the main shape is visible in every frame of every clip
    assert (videos > -0.5).any(dim=(1, 3, 4)).all()
    assert 1 <= min(len(s.shapes) for s in specs) and max(len(s.shapes) for s in specs) == 3
    clip = D.generate_clip(specs[0], frames=16, size=48)
    assert clip.shape == (3, 16, 48, 48)
    v, _ = D.make_dataset(4, seed=0, frames=12)
    assert v.shape == (4, 3, 12, 32, 32)


def test_main_shape_is_largest_and_on_top(dataset):
    _, specs = dataset
    for s in specs:
        assert all(e.radius < s.main.radius for e in s.extras)
    with pytest.raises(ValueError):
        D.ClipSpec((D.ShapeSpec("circle", "red", "small"), D.ShapeSpec("cross", "blue", "small")))
    # drawn last: a static main shape covering a static extra shows only the main colour there
    main = D.ShapeSpec("square", "red", "large", start=(0.5, 0.5))
    extra = D.ShapeSpec("circle", "blue", "tiny", start=(0.5, 0.5))
    clip = D.generate_clip(D.ClipSpec((main, extra)))
    assert torch.equal(clip[:, :, 16, 16], torch.tensor([1.0, -1.0, -1.0]).view(3, 1).expand(3, 8))


def test_captions_contain_attributes(dataset):
    _, specs = dataset
    where = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
    for s in specs:
        c = s.caption
        assert c.startswith(f"a {s.size} {s.colour} {s.shape} at the {s.main.zone} ")
        if s.speed == "static":
            assert "standing still" in c and "moving" not in c
        else:
            assert f"moving {'slowly' if s.speed == 'slow' else 'fast'} {where[s.direction]}" in c
        assert ("bouncing" in c) == s.main.bounce
        assert ("accelerating" in c) == s.main.accelerate
        for e in s.extras:
            assert f"a {e.size} {e.colour} {e.shape}" in c.split("with", 1)[1]
    spec = D.ClipSpec((D.ShapeSpec("circle", "red", "large", "fast", "left", bounce=True, velocity=0.06),
                       D.ShapeSpec("square", "blue", "small")))
    assert spec.caption == ("a large red circle at the centre moving fast to the left, bouncing, "
                            "with a small blue square")


def test_zone_is_the_start_ninth_of_the_frame():
    def zone(x: float, y: float) -> str:
        return D.ShapeSpec("circle", "red", "small", start=(x, y)).zone

    assert [zone(0.1, 0.1), zone(0.5, 0.1), zone(0.9, 0.1)] == ["top-left", "top-centre", "top-right"]
    assert [zone(0.1, 0.5), zone(0.5, 0.5), zone(0.9, 0.5)] == ["middle-left", "centre", "middle-right"]
    assert [zone(0.1, 0.9), zone(0.5, 0.9), zone(0.9, 0.9)] == ["bottom-left", "bottom-centre", "bottom-right"]
    assert zone(0.34, 0.32) == "top-centre"  # x is the column, y the row
    assert zone(0.0, 1.0) == "bottom-left"  # the borders belong to the outer ninths
    # a zone is one caption token, not "left" as a direction word
    tokens, mask = D.encode_captions(["a small red circle at the top-left standing still"])
    assert D.VOCAB[int(tokens[0, 6])] == "top-left" and int(mask.sum()) == 9


def test_motion_amount_static_zero_and_fast_above_slow(dataset):
    videos, specs = dataset
    by_speed = {k: [s.motion_amount for s in specs if s.speed == k] for k in D.SPEEDS}
    assert all(by_speed[k] for k in D.SPEEDS)
    assert all(m == 0.0 for m in by_speed["static"])
    assert max(by_speed["slow"]) < min(by_speed["fast"])
    assert min(by_speed["slow"]) > 0.3 and max(by_speed["fast"]) > 2.0  # varies widely, in pixels
    for s in specs[:50]:
        assert s.motion_amount == pytest.approx(D.motion_amount(s))
    # a clip whose shapes are all static has identical frames
    still = [i for i, s in enumerate(specs) if all(x.speed == "static" for x in s.shapes)]
    assert still
    for i in still:
        assert torch.equal(videos[i], videos[i, :, :1].expand_as(videos[i]))


@pytest.mark.parametrize("direction,axis,sign", [("right", 0, 1), ("left", 0, -1), ("down", 1, 1), ("up", 1, -1)])
def test_direction_conventions_x_right_y_down(direction, axis, sign):
    start = {"right": (0.25, 0.5), "left": (0.75, 0.5), "down": (0.5, 0.25), "up": (0.5, 0.75)}[direction]
    spec = _single("circle", "white", "small", speed="fast", direction=direction, velocity=0.06, start=start)
    clip = D.generate_clip(spec)
    mass = (clip[0] + 1) / 2  # (T, H, W) coverage
    grid = torch.arange(32, dtype=torch.float32) + 0.5
    cx = (mass.sum(1) * grid).sum(1) / mass.sum((1, 2))
    cy = (mass.sum(2) * grid).sum(1) / mass.sum((1, 2))
    along, across = (cx, cy) if axis == 0 else (cy, cx)
    torch.testing.assert_close(along.diff(), torch.full((7,), sign * 0.06 * 32), atol=0.05, rtol=0)
    torch.testing.assert_close(across.diff(), torch.zeros(7), atol=0.05, rtol=0)
    assert spec.motion_amount == pytest.approx(0.06 * 32)


def test_bounce_stays_in_frame_and_reverses():
    bouncing = [s for s in _specs(400, seed=3) if s.main.bounce]
    assert len(bouncing) >= 30
    for s in bouncing:
        m = s.main
        pos = D.trajectory(m, 8)
        assert pos.min() >= m.radius - 1e-9 and pos.max() <= 1 - m.radius + 1e-9
        axis = 0 if m.direction in ("left", "right") else 1
        steps = np.diff(pos[:, axis])
        assert (steps > 1e-9).any() and (steps < -1e-9).any(), "no visible bounce"
        first = steps[np.abs(steps) > 1e-9][0]
        assert np.sign(first) == sum(D._DIRECTION_VEC[m.direction])  # label = initial direction
        # rendered alone, the shape is never cut by the border: its area is the same in every frame
        clip = D.generate_clip(D.ClipSpec((m,)))
        area = ((clip[:, :, :, :].amax(0) + 1) / 2).sum((1, 2))
        torch.testing.assert_close(area, area.mean().expand(8), rtol=0.03, atol=0)
    for s in _specs(200, seed=4):  # 8-frame trajectories without bounce fit the frame too
        for shape in s.shapes:
            pos = D.trajectory(shape, 8)
            assert pos.min() >= shape.radius - 1e-9 and pos.max() <= 1 - shape.radius + 1e-9


def test_accelerate_keeps_mean_speed_and_grows():
    base = dict(speed="fast", direction="right", velocity=0.06, start=(0.25, 0.5))
    plain, accel = _single(**base), _single(**base, accelerate=True)
    assert accel.motion_amount == pytest.approx(plain.motion_amount)
    steps = np.diff(D.trajectory(accel.main, 8)[:, 0])
    assert (np.diff(steps) > 0).all() and steps[-1] > 3 * steps[0]


def test_tokenizer_round_trip_and_padding(dataset):
    _, specs = dataset
    captions = [s.caption for s in specs]
    tokens, mask = D.encode_captions(specs)
    assert tokens.shape == mask.shape == (300, D.MAX_TOKENS) and tokens.dtype == torch.long
    assert D.decode_tokens(tokens, mask) == [c.replace(",", "") for c in captions]
    assert D.decode_tokens(tokens) == D.decode_tokens(tokens, mask)
    assert torch.equal(mask.sum(1), torch.tensor([len(c.split()) for c in captions]))
    assert (tokens[~mask] == D.PAD_ID).all() and (tokens[mask] > D.UNK_ID).all()
    assert (mask[:, 1:] <= mask[:, :-1]).all()  # right padding: real tokens form a prefix
    t2, m2 = D.encode_captions(captions)
    assert torch.equal(tokens, t2) and torch.equal(mask, m2)
    assert max(len(s.caption.split()) for s in _specs(2000, seed=5)) <= D.MAX_TOKENS
    t, m = D.encode_captions(["a purple circle"], max_len=4)
    assert t.tolist() == [[D.VOCAB.index("a"), D.UNK_ID, D.VOCAB.index("circle"), D.PAD_ID]]
    assert m.tolist() == [[True, True, True, False]]
    with pytest.raises(ValueError):
        D.encode_captions([captions[0]], max_len=3)
    t, m = D.encode_captions([captions[0]], max_len=3, strict=False)
    assert m.all() and D.decode_tokens(t, m)[0] == " ".join(captions[0].split()[:3])


def test_labels_agree_with_specs(dataset):
    _, specs = dataset
    lab = D.labels(specs)
    for key in ("shape", "colour", "size", "speed", "direction"):
        assert lab[key].dtype == torch.long and lab[key].shape == (300,)
    for i, s in enumerate(specs):
        assert D.SHAPES[lab["shape"][i]] == s.shape
        assert D.COLOURS[lab["colour"][i]] == s.colour
        assert D.SIZES[lab["size"][i]] == s.size
        assert D.SPEEDS[lab["speed"][i]] == s.speed
        assert D.DIRECTION_LABELS[lab["direction"][i]] == s.direction
        assert (lab["direction"][i] == 0) == (s.speed == "static")
        assert lab["count"][i] == len(s.shapes) - 1
    assert set(lab["direction"].tolist()) == set(range(len(D.DIRECTION_LABELS)))


# ------------------------------------------------------------------------------------------ judge
def _easy(n: int, seed: int) -> tuple[torch.Tensor, list[D.ClipSpec]]:
    """Main shape only (no distractors): enough to see shape learning in a few seconds."""
    specs = [D.ClipSpec((s.main,), s.motion_amount) for s in _specs(n, seed)]
    return D.render_clips(specs), specs


def test_judge_smoke_training_beats_chance_and_round_trips(tmp_path):
    cfg = JudgeConfig(width=8, hidden=64)
    judge = train_judge(seed=0, epochs=3, batch_size=32, config=cfg, progress=False, data=_easy(1600, 0))
    assert not judge.training and judge.train_seconds > 0
    videos, specs = _easy(300, 1)
    acc = judge.accuracy(videos, specs)
    assert set(acc) == {"shape", "colour", "direction", "speed"}
    assert acc["shape"] > 0.45, acc  # chance is 0.25
    pred = judge.predict(videos)
    assert all(p.dtype == torch.long and p.shape == (300,) for p in pred.values())

    path = tmp_path / "judge.safetensors"
    save_judge(judge, path)
    loaded = load_judge(path)
    assert loaded.config == cfg and not loaded.training
    a, b = judge.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        la, lb = judge(videos[:50]), loaded(videos[:50])
    assert all(torch.equal(la[k], lb[k]) for k in la)
    assert all(torch.equal(pred[k], v) for k, v in loaded.predict(videos).items())

    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError):
        load_judge(tmp_path / "other.safetensors")


def test_judge_rejects_wrong_geometry():
    judge = Judge(JudgeConfig(width=8))
    with pytest.raises(ValueError):
        judge.predict(torch.zeros(2, 3, 12, 32, 32))
    with pytest.raises(ValueError):
        judge.accuracy(torch.zeros(2, 3, 8, 32, 32), [])


def test_grid_layout_makes_the_main_shapes_clip_a_function_of_its_caption():
    def starts_per_caption(grid: bool) -> list[int]:
        specs = _specs(1500, seed=3, grid=grid)
        groups: dict[str, set] = {}
        for s in specs:
            main_caption = s.caption.split(", with")[0]
            groups.setdefault(main_caption, set()).add((s.main.start, s.main.velocity))
        return [len(v) for v in groups.values()]

    grid = starts_per_caption(True)
    assert sum(n == 1 for n in grid) / len(grid) > 0.95  # a few zones clamp two ways to one label
    assert max(starts_per_caption(False)) > 3  # the free layout leaves place and speed to chance
    for s in _specs(500, seed=4, grid=True):
        path = D.trajectory(s.main, 8)
        r = s.main.radius
        assert (path >= r - 1e-9).all() and (path <= 1 - r + 1e-9).all()
        lo, hi = D.SPEED_RANGE[s.speed]
        assert s.main.velocity == pytest.approx((lo + hi) / 2)
