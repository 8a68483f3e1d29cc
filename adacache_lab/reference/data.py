"""Procedural, seeded toy videos with captions, for training and judging a tiny reference video DiT.

Why: the caching policies need a *trained* video DiT to be evaluated on (random weights have no
temporal redundancy worth caching), and a trained model needs data whose content, motion and caption
are known exactly, so a judge can tell whether a generated clip shows what its caption asked for.
Nothing is downloaded; every clip is a pure function of its :class:`ClipSpec`.

Clip format: float32 tensor ``(C=3, T, H, W)`` in ``[-1, 1]``, black background (-1), one to three
anti-aliased shapes (signed-distance rasterisation, vectorised over clips, frames and pixels).

Conventions
-----------
* Coordinates are normalised to the frame: ``x`` grows to the **right**, ``y`` grows **downward**
  (image coordinates); ``(0, 0)`` is the top-left corner, ``(1, 1)`` the bottom-right one.
  ``left`` is ``-x``, ``right`` ``+x``, ``up`` ``-y``, ``down`` ``+y``.
* Speeds are per frame, in frame widths: ``slow`` is 0.018-0.034 (0.6-1.1 px/frame at 32 px),
  ``fast`` 0.05-0.08 (1.6-2.6 px/frame); ``static`` is exactly 0.
* ``bounce``: the shape reverses when its bounding half-extent touches the border; the sampled start
  puts the (first) bounce between 30 % and 70 % of the clip's travel, so it is visible.
  The ``direction`` label is always the *initial* direction of motion.
* ``accelerate``: the per-frame step grows linearly from 0.3x to 1.7x the nominal speed, so the
  mean speed (and the speed class) is unchanged.
* Without ``bounce`` the whole trajectory stays inside the frame whenever it can (always for clips of
  up to 8 frames); for longer fast clips that cannot fit, the trajectory is centred on the frame and
  the shape partly leaves it at both ends.
* **Main shape rule**: the main shape is the first one (``spec.shapes[0]``); it is drawn last (on top,
  never occluded) and every extra shape is at least one size class smaller (sizes ``tiny < small <
  medium < large``; the main shape is never ``tiny``), so the main shape is always the largest object.
  All labels (:func:`labels`) and the recorded ``motion_amount`` refer to the main shape.
* ``motion_amount``: mean displacement per frame of the main shape's centre, in pixels, for the
  ``(frames, size)`` the spec was sampled for (:func:`motion_amount` recomputes it for others).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "SHAPES", "COLOURS", "COLOUR_RGB", "SIZES", "EXTRA_SIZES", "SIZE_RADIUS", "SPEEDS", "SPEED_RANGE",
    "DIRECTIONS", "DIRECTION_LABELS", "MODIFIERS", "ZONES", "VOCAB", "MAX_TOKENS", "PAD_ID", "UNK_ID",
    "ShapeSpec", "ClipSpec", "sample_spec", "trajectory", "motion_amount", "generate_clip",
    "render_clips", "make_dataset", "encode_captions", "decode_tokens", "labels",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "white", "magenta", "cyan")
#: RGB in [0, 1] for each entry of :data:`COLOURS` (blue is lightened a little to stay visible on black).
COLOUR_RGB: tuple[tuple[float, float, float], ...] = (
    (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.15, 0.35, 1.0), (1.0, 1.0, 0.0),
    (1.0, 1.0, 1.0), (1.0, 0.0, 1.0), (0.0, 1.0, 1.0),
)
#: Size classes of the main shape.
SIZES: tuple[str, ...] = ("small", "medium", "large")
#: Size classes of any shape, smallest first (``tiny`` is only used for extra shapes).
EXTRA_SIZES: tuple[str, ...] = ("tiny", "small", "medium", "large")
#: Half-extent of each size class, in frame widths (at 32 px: 2.2, 3.5, 5.0, 6.7 px).
SIZE_RADIUS: Mapping[str, float] = MappingProxyType(
    {"tiny": 0.07, "small": 0.11, "medium": 0.155, "large": 0.21})
SPEEDS: tuple[str, ...] = ("static", "slow", "fast")
#: Per-frame speed range of each speed class, in frame widths.
SPEED_RANGE: Mapping[str, tuple[float, float]] = MappingProxyType(
    {"static": (0.0, 0.0), "slow": (0.018, 0.034), "fast": (0.05, 0.08)})
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
#: Direction label classes: ``none`` (static) first, then :data:`DIRECTIONS`.
DIRECTION_LABELS: tuple[str, ...] = ("none",) + DIRECTIONS
_DIRECTION_VEC: Mapping[str, tuple[float, float]] = MappingProxyType(
    {"none": (0.0, 0.0), "left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)})
MODIFIERS: tuple[str, ...] = ("bounce", "accelerate")
_ACCEL_LO = 0.3  # first step of an accelerating shape, as a fraction of its mean speed

#: Where the main shape starts: the frame cut in thirds each way, rows top to bottom, then columns
#: left to right (one caption token each, so "left" in a zone never reads as a direction).
ZONES: tuple[str, ...] = (
    "top-left", "top-centre", "top-right", "middle-left", "centre", "middle-right",
    "bottom-left", "bottom-centre", "bottom-right",
)
_CAPTION_WORDS: tuple[str, ...] = (
    "a", "and", "with", "moving", "standing", "still", "slowly", "fast", "to", "the",
    "left", "right", "up", "down", "bouncing", "accelerating", "at",
)
PAD_ID = 0
UNK_ID = 1
#: Fixed caption vocabulary: ``<pad>``, ``<unk>``, then every word a caption can contain.
VOCAB: tuple[str, ...] = ("<pad>", "<unk>") + _CAPTION_WORDS + EXTRA_SIZES + COLOURS + SHAPES + ZONES
_WORD_ID: Mapping[str, int] = MappingProxyType({w: i for i, w in enumerate(VOCAB)})
#: Default token length; the longest possible caption has 26 words.
MAX_TOKENS = 28


@dataclass(frozen=True)
class ShapeSpec:
    """One shape and its motion; positions and speeds in frame widths (x right, y down)."""

    shape: str
    colour: str
    size: str
    speed: str = "static"
    direction: str = "none"  # "none" iff speed == "static"
    bounce: bool = False
    accelerate: bool = False
    start: tuple[float, float] = (0.5, 0.5)  # centre at frame 0
    velocity: float = 0.0  # mean per-frame speed

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {COLOURS}")
        if self.size not in EXTRA_SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {EXTRA_SIZES}")
        if self.speed not in SPEEDS:
            raise ValueError(f"unknown speed {self.speed!r}; expected one of {SPEEDS}")
        if self.direction not in DIRECTION_LABELS:
            raise ValueError(f"unknown direction {self.direction!r}; expected one of {DIRECTION_LABELS}")
        if (self.speed == "static") != (self.direction == "none"):
            raise ValueError("direction must be 'none' exactly when speed is 'static'")
        if self.speed == "static" and (self.bounce or self.accelerate or self.velocity != 0.0):
            raise ValueError("a static shape has no velocity and no motion modifiers")

    @property
    def radius(self) -> float:
        """Half-extent in frame widths."""
        return SIZE_RADIUS[self.size]

    @property
    def modifiers(self) -> tuple[str, ...]:
        """Active motion modifiers, in :data:`MODIFIERS` order."""
        return tuple(m for m, on in zip(MODIFIERS, (self.bounce, self.accelerate)) if on)

    def phrase(self) -> str:
        """``"a large red circle"``."""
        return f"a {self.size} {self.colour} {self.shape}"

    @property
    def zone(self) -> str:
        """Which ninth of the frame the shape starts in (:data:`ZONES`)."""
        column, row = (min(2, max(0, int(3.0 * v))) for v in self.start)
        return ZONES[3 * row + column]


@dataclass(frozen=True)
class ClipSpec:
    """Everything that determines a clip: ``shapes[0]`` is the main shape, the rest are extras."""

    shapes: tuple[ShapeSpec, ...]
    motion_amount: float = 0.0  # px/frame of the main shape, for the geometry it was sampled for

    def __post_init__(self) -> None:
        if not 1 <= len(self.shapes) <= 3:
            raise ValueError("a clip has one to three shapes")
        if self.shapes[0].size not in SIZES:
            raise ValueError(f"the main shape's size must be one of {SIZES}")
        main_rank = EXTRA_SIZES.index(self.shapes[0].size)
        if any(EXTRA_SIZES.index(s.size) >= main_rank for s in self.shapes[1:]):
            raise ValueError("extra shapes must be strictly smaller than the main shape")

    @property
    def main(self) -> ShapeSpec:
        return self.shapes[0]

    @property
    def extras(self) -> tuple[ShapeSpec, ...]:
        return self.shapes[1:]

    @property
    def shape(self) -> str:
        """Main shape's class."""
        return self.main.shape

    @property
    def colour(self) -> str:
        """Main shape's colour."""
        return self.main.colour

    @property
    def size(self) -> str:
        """Main shape's size class."""
        return self.main.size

    @property
    def speed(self) -> str:
        """Main shape's speed class."""
        return self.main.speed

    @property
    def direction(self) -> str:
        """Main shape's initial direction (``none`` when static)."""
        return self.main.direction

    @property
    def modifiers(self) -> tuple[str, ...]:
        """Main shape's motion modifiers."""
        return self.main.modifiers

    @property
    def caption(self) -> str:
        """E.g. ``"a large red circle at the top-right moving fast to the left, bouncing, with a small
        blue square"``.

        The main shape's start zone is in the caption: where an object is cannot be learnt from the
        other attributes, and a model this small, left to pick a place from pure noise, draws
        fragments of the shape in several places at once (see the reference model's docs).
        """
        m = self.main
        if m.speed == "static":
            text = f"{m.phrase()} at the {m.zone} standing still"
        else:
            where = {"left": "to the left", "right": "to the right"}.get(m.direction, m.direction)
            text = f"{m.phrase()} at the {m.zone} moving {'slowly' if m.speed == 'slow' else 'fast'} {where}"
        mods = [{"bounce": "bouncing", "accelerate": "accelerating"}[x] for x in m.modifiers]
        if mods:
            text += ", " + " and ".join(mods)
        if self.extras:
            text += ", with " + " and ".join(s.phrase() for s in self.extras)
        return text


# --------------------------------------------------------------------------------------- sampling
def _sample_motion(rng: np.random.Generator, radius: float, frames: int, allow_modifiers: bool
                   ) -> dict:
    speed = SPEEDS[int(rng.integers(len(SPEEDS)))]
    if speed == "static":
        start = tuple(float(v) for v in rng.uniform(radius, 1.0 - radius, size=2))
        return dict(speed=speed, direction="none", start=start, velocity=0.0)
    direction = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
    lo, hi = SPEED_RANGE[speed]
    velocity = float(rng.uniform(lo, hi))
    bounce = bool(allow_modifiers and rng.random() < 0.3)
    accelerate = bool(allow_modifiers and rng.random() < 0.3)
    travel = velocity * (frames - 1)
    room = 1.0 - 2.0 * radius
    sign = sum(_DIRECTION_VEC[direction])  # +1 towards larger coordinates, -1 otherwise
    if bounce:  # first wall contact after 30-70 % of the travel
        dist = min(float(rng.uniform(0.3, 0.7)) * travel, room)
        along = (1.0 - radius - dist) if sign > 0 else (radius + dist)
    elif travel <= room:
        offset = float(rng.uniform(0.0, room - travel))
        along = radius + offset if sign > 0 else 1.0 - radius - offset
    else:
        along = 0.5 - sign * travel / 2.0
    across = float(rng.uniform(radius, 1.0 - radius))
    start = (along, across) if direction in ("left", "right") else (across, along)
    return dict(speed=speed, direction=direction, bounce=bounce, accelerate=accelerate,
                start=start, velocity=velocity)


def _on_grid(shape: ShapeSpec, frames: int) -> ShapeSpec:
    """``shape`` with its speed at its class's middle and its start at the centre of its zone, clamped
    so the path stays in the frame: the main shape's clip is then a function of its caption."""
    if shape.speed == "static":
        start = tuple(_zone_centre(v, shape.radius) for v in shape.start)
        return ShapeSpec(**{**shape.__dict__, "start": start})
    lo, hi = SPEED_RANGE[shape.speed]
    velocity = (lo + hi) / 2.0
    r, travel = shape.radius, velocity * (frames - 1)
    sign = sum(_DIRECTION_VEC[shape.direction])
    axis = 0 if shape.direction in ("left", "right") else 1
    if shape.bounce:  # first wall contact half-way through the travel
        dist = min(0.5 * travel, 1.0 - 2.0 * r)
        along = (1.0 - r - dist) if sign > 0 else (r + dist)
    else:
        first, last = (r, 1.0 - r - travel) if sign > 0 else (r + travel, 1.0 - r)
        along = float(np.clip(_zone_centre(shape.start[axis], r), min(first, last), max(first, last)))
    across = _zone_centre(shape.start[1 - axis], r)
    start = (along, across) if axis == 0 else (across, along)
    return ShapeSpec(**{**shape.__dict__, "start": start, "velocity": velocity})


def _zone_centre(v: float, radius: float) -> float:
    """The centre of the third of [radius, 1 - radius] that ``v`` lies in."""
    room = 1.0 - 2.0 * radius
    third = min(2, max(0, int(3.0 * (v - radius) / room))) if room > 0 else 1
    return radius + room * (2 * third + 1) / 6.0


def sample_spec(rng: np.random.Generator, frames: int = 8, size: int = 32, grid: bool = False) -> ClipSpec:
    """Draw a random clip spec; ``frames`` shapes the start positions so trajectories fit the frame.

    Deterministic given the generator's state.  One to three shapes; modifiers only on the main shape.
    ``grid``: the main shape starts at the centre of a zone and moves at its speed class's middle
    speed, so nothing about it is left to chance beyond what its caption says.
    """
    _check_geometry(frames, size)
    main_size = SIZES[int(rng.integers(len(SIZES)))]
    main_radius = SIZE_RADIUS[main_size]
    main = ShapeSpec(shape=SHAPES[int(rng.integers(len(SHAPES)))],
                     colour=COLOURS[int(rng.integers(len(COLOURS)))], size=main_size,
                     **_sample_motion(rng, main_radius, frames, allow_modifiers=True))
    shapes = [main]
    for _ in range(int(rng.integers(0, 3))):
        extra_size = EXTRA_SIZES[int(rng.integers(EXTRA_SIZES.index(main_size)))]
        shapes.append(ShapeSpec(shape=SHAPES[int(rng.integers(len(SHAPES)))],
                                colour=COLOURS[int(rng.integers(len(COLOURS)))], size=extra_size,
                                **_sample_motion(rng, SIZE_RADIUS[extra_size], frames,
                                                 allow_modifiers=False)))
    if grid:
        shapes[0] = _on_grid(shapes[0], frames)
    spec = ClipSpec(tuple(shapes))
    return ClipSpec(spec.shapes, motion_amount=motion_amount(spec, frames, size))


# ------------------------------------------------------------------------------------- trajectories
def trajectory(shape: ShapeSpec, frames: int) -> np.ndarray:
    """Centre of ``shape`` at each frame, ``(frames, 2)`` as ``(x, y)`` in frame widths."""
    if shape.velocity == 0.0 or frames == 1:
        steps = np.zeros(max(frames - 1, 0))
    elif shape.accelerate:
        ramp = np.linspace(_ACCEL_LO, 2.0 - _ACCEL_LO, frames - 1) if frames > 2 else np.ones(1)
        steps = shape.velocity * ramp
    else:
        steps = np.full(frames - 1, shape.velocity)
    travel = np.concatenate([[0.0], np.cumsum(steps)])
    dx, dy = _DIRECTION_VEC[shape.direction]
    pos = np.stack([shape.start[0] + dx * travel, shape.start[1] + dy * travel], axis=1)
    if shape.bounce:  # fold the straight path back into [r, 1 - r] (a triangle wave)
        r = shape.radius
        room = 1.0 - 2.0 * r
        q = np.mod(pos - r, 2.0 * room)
        pos = r + np.where(q > room, 2.0 * room - q, q)
    return pos


def motion_amount(spec: ClipSpec, frames: int = 8, size: int = 32) -> float:
    """Mean per-frame displacement of the main shape's centre, in pixels (0 for static clips)."""
    pos = trajectory(spec.main, frames) * size
    if frames < 2:
        return 0.0
    return float(np.linalg.norm(np.diff(pos, axis=0), axis=1).mean())


# ------------------------------------------------------------------------------------- rendering
def _check_geometry(frames: int, size: int) -> None:
    if not (isinstance(frames, int) and 1 <= frames <= 64):
        raise ValueError(f"frames must be an int in [1, 64] (8-16 intended), got {frames!r}")
    if not (isinstance(size, int) and 8 <= size <= 512):
        raise ValueError(f"size must be an int in [8, 512], got {size!r}")


def _sd_box(px: torch.Tensor, py: torch.Tensor, hx: torch.Tensor, hy: torch.Tensor) -> torch.Tensor:
    qx, qy = px.abs() - hx, py.abs() - hy
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    return outside + torch.maximum(qx, qy).clamp(max=0)


def _sd_triangle(px: torch.Tensor, py: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    # Equilateral triangle with side 2r, centroid at the origin, apex up (Inigo Quilez's formula,
    # written for y up, hence the flip).
    k = math.sqrt(3.0)
    x = px.abs() - r
    y = -py + r / k
    fold = (x + k * y) > 0
    x, y = torch.where(fold, (x - k * y) / 2, x), torch.where(fold, (-k * x - y) / 2, y)
    x = x - torch.maximum(torch.minimum(x, torch.zeros_like(x)), -2 * r)
    return -torch.sqrt(x * x + y * y) * torch.sign(y)


def _coverage(shape_id: torch.Tensor, centre: torch.Tensor, radius: torch.Tensor, size: int
              ) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1], ``(N, T, H, W)``; all quantities in pixels."""
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    px = grid.view(1, 1, 1, size) - centre[..., 0, None, None]  # (N, T, 1, W)
    py = grid.view(1, 1, size, 1) - centre[..., 1, None, None]  # (N, T, H, 1)
    px, py = torch.broadcast_tensors(px, py)
    r = radius.view(-1, 1, 1, 1).expand_as(px)
    sid = shape_id.view(-1, 1, 1, 1)
    # Shapes are scaled to comparable areas (circle pi r^2, square 2.9 r^2, triangle 2.5 r^2).
    dist = torch.sqrt(px * px + py * py) - r  # circle
    dist = torch.where(sid == SHAPES.index("square"), _sd_box(px, py, 0.85 * r, 0.85 * r), dist)
    dist = torch.where(sid == SHAPES.index("triangle"), _sd_triangle(px, py, 1.2 * r), dist)
    arm = 0.36 * r
    cross = torch.minimum(_sd_box(px, py, 1.05 * r, arm), _sd_box(px, py, arm, 1.05 * r))
    dist = torch.where(sid == SHAPES.index("cross"), cross, dist)
    return (0.5 - dist).clamp(0.0, 1.0)


def render_clips(specs: Sequence[ClipSpec], frames: int = 8, size: int = 32, chunk: int = 64
                 ) -> torch.Tensor:
    """Render many clips at once, ``(N, 3, T, H, W)`` float32 in [-1, 1] (vectorised in chunks)."""
    _check_geometry(frames, size)
    out = torch.empty(len(specs), 3, frames, size, size, dtype=torch.float32)
    for lo in range(0, len(specs), chunk):
        batch = specs[lo:lo + chunk]
        n = len(batch)
        canvas = torch.zeros(n, 3, frames, size, size)
        # Draw order: extras (in order), then the main shape on top.
        slots = max(len(s.shapes) for s in batch)
        for slot in list(range(1, slots)) + [0]:
            present = np.array([slot < len(s.shapes) for s in batch])
            idx = np.nonzero(present)[0]
            shapes = [batch[i].shapes[slot] for i in idx]
            centre = torch.from_numpy(np.stack([trajectory(s, frames) for s in shapes]) * size).float()
            radius = torch.tensor([s.radius * size for s in shapes], dtype=torch.float32)
            sid = torch.tensor([SHAPES.index(s.shape) for s in shapes])
            rgb = torch.tensor([COLOUR_RGB[COLOURS.index(s.colour)] for s in shapes])
            alpha = _coverage(sid, centre, radius, size).unsqueeze(1)  # (n', 1, T, H, W)
            sel = torch.from_numpy(idx)
            sub = canvas[sel]
            canvas[sel] = sub + (rgb.view(-1, 3, 1, 1, 1) - sub) * alpha
        out[lo:lo + n] = canvas * 2.0 - 1.0
    return out


def generate_clip(spec: ClipSpec, frames: int = 8, size: int = 32) -> torch.Tensor:
    """Render one clip, ``(3, frames, size, size)`` float32 in [-1, 1]."""
    return render_clips([spec], frames, size)[0]


def make_dataset(n: int, seed: int, frames: int = 8, size: int = 32, grid: bool = False
                 ) -> tuple[torch.Tensor, list[ClipSpec]]:
    """``n`` random clips and their specs; a pure function of ``(n, seed, frames, size)``.

    The specs are drawn sequentially from ``numpy.random.default_rng(seed)``, so the first ``k``
    clips of ``make_dataset(n, seed)`` equal ``make_dataset(k, seed)``.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    rng = np.random.default_rng(seed)
    specs = [sample_spec(rng, frames, size, grid) for _ in range(n)]
    return render_clips(specs, frames, size), specs


# ------------------------------------------------------------------------------------- captions
def _words(caption: str) -> list[str]:
    return re.sub(r"[^a-z -]", " ", caption.lower()).split()


def encode_captions(items: Sequence[ClipSpec | str], max_len: int = MAX_TOKENS, strict: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Word-level token ids over the fixed :data:`VOCAB` (no pretrained text model needed).

    Returns ``(tokens, mask)``: ``tokens`` LongTensor ``(N, max_len)`` right-padded with
    :data:`PAD_ID`, ``mask`` bool ``(N, max_len)``, True on real tokens.  Punctuation is dropped,
    unknown words map to :data:`UNK_ID`.  With ``strict`` a caption longer than ``max_len`` words raises
    (silently truncating would drop attributes); otherwise it is truncated.
    """
    tokens = torch.full((len(items), max_len), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(items), max_len), dtype=torch.bool)
    for i, item in enumerate(items):
        words = _words(item.caption if isinstance(item, ClipSpec) else item)
        if len(words) > max_len:
            if strict:
                raise ValueError(f"caption has {len(words)} words > max_len={max_len}: {words}")
            words = words[:max_len]
        ids = [_WORD_ID.get(w, UNK_ID) for w in words]
        tokens[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, :len(ids)] = True
    return tokens, mask


def decode_tokens(tokens: torch.Tensor, mask: torch.Tensor | None = None) -> list[str]:
    """Inverse of :func:`encode_captions` up to punctuation: space-joined words, padding dropped."""
    if mask is None:
        mask = tokens != PAD_ID
    return [" ".join(VOCAB[int(t)] for t, m in zip(row, mrow) if m) for row, mrow in zip(tokens, mask)]


# ------------------------------------------------------------------------------------- labels
def labels(specs: Sequence[ClipSpec]) -> dict[str, torch.Tensor]:
    """Class indices of the main shape's attributes, for training and scoring the judge.

    Keys: ``shape`` (:data:`SHAPES`), ``colour`` (:data:`COLOURS`), ``size`` (:data:`SIZES`),
    ``speed`` (:data:`SPEEDS`), ``direction`` (:data:`DIRECTION_LABELS`, 0 = ``none`` for static),
    ``bounce`` and ``accelerate`` (0/1), ``count`` (number of shapes minus one).
    """
    def col(fn) -> torch.Tensor:
        return torch.tensor([fn(s) for s in specs], dtype=torch.long)

    return {
        "shape": col(lambda s: SHAPES.index(s.shape)),
        "colour": col(lambda s: COLOURS.index(s.colour)),
        "size": col(lambda s: SIZES.index(s.size)),
        "speed": col(lambda s: SPEEDS.index(s.speed)),
        "direction": col(lambda s: DIRECTION_LABELS.index(s.direction)),
        "bounce": col(lambda s: int(s.main.bounce)),
        "accelerate": col(lambda s: int(s.main.accelerate)),
        "count": col(lambda s: len(s.shapes) - 1),
    }
