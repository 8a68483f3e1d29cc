"""AdaCache (arXiv 2411.02397): a content-dependent caching schedule from a codebook.

At every compute step the policy measures how much one branch's residual changed since its previous
compute step, per step (``c = |p_t - p_prev|_1 / |p_prev|_1 / k``, k = steps since that compute), and
looks the value up in a codebook of ascending thresholds: the first threshold ``c`` is below gives the
rate ``r``; the next compute step is ``t + r`` and every residual branch reuses its cached residual in
between. Little change means a long reuse. The authors' code is the default, the paper an option:

* one schedule for the whole DiT, read at the middle block that has a branch of the metric kind
  (temporal attention when the model has it, as in the code's ``cache_loc=[13]`` of 28 Open-Sora
  blocks); several ``metric_blocks`` are averaged;
* the metric is the relative L1 over the whole residual in float32 (``"l2"`` and ``"cosine"`` are the
  paper's ablation options);
* steps 0 and 1 and the last two steps always compute (the code's ``[1, N-1, N]`` plus rate 1 at the
  start);
* MoReg (:class:`MoReg`), motion regularisation for video, in the code's variant by default.

Metric values stay tensors inside :meth:`AdaCache.observe`; :meth:`AdaCache.plan` turns all of the
previous step's values into floats with one device sync. The decision logic is also available without
a model (:meth:`AdaCache.simulate`), replaying it on recorded residuals for calibration.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import torch

from ..errors import PolicyError
from ..kinds import JOINT_ATTENTION, SELF_ATTENTION, TEMPORAL_ATTENTION
from .base import LOCAL, BranchInfo, MetricGroup, Plan, Policy, StepContext, require_kinds_present, validate_kinds

#: ``((threshold, rate), ...)`` with ascending thresholds; the last entry catches every larger value.
Codebook = tuple[tuple[float, int], ...]

#: Published codebooks (Open-Sora, /work/shared/ALGORITHMS.md, AdaCache section).
FAST_100: Codebook = ((0.03, 12), (0.05, 10), (0.07, 8), (0.09, 6), (0.11, 4), (1.00, 3))
FAST_30: Codebook = ((0.08, 6), (0.16, 5), (0.24, 4), (0.32, 3), (0.40, 2), (1.00, 1))
SLOW_30: Codebook = ((0.08, 3), (0.16, 2), (0.24, 1), (0.32, 1), (0.40, 1), (1.00, 1))

DISTANCES = ("l1", "l2", "cosine")
MOREG_VARIANTS = ("code", "paper")

#: MoReg step windows of the authors' code, 1-based inclusive, by step count: (10, 90) of 100 and
#: (4, 26) of 30. Other step counts use the fractions of the nearest one (see :meth:`MoReg.window_steps`).
_PUBLISHED_WINDOWS = ((100, (10, 90)), (30, (4, 26)))

_TINY = torch.finfo(torch.float32).tiny


# -- pure helpers (shared by the live policy and simulate) -------------------------------------------
def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _nearest(num_steps: int, counts: Sequence[int]) -> int:
    """The published step count closest to ``num_steps`` on a log scale (step counts scale by ratio)."""
    return min(counts, key=lambda c: (abs(math.log(num_steps / c)), c))


def normalize_codebook(codebook: Codebook | Mapping[float, int] | Sequence[Sequence[float]], owner: str) -> Codebook:
    """Validate a codebook (pairs or a ``{threshold: rate}`` dict) and return it as a tuple of pairs."""
    items = list(codebook.items()) if isinstance(codebook, Mapping) else list(codebook)
    if not items:
        raise ValueError(f"{owner}: the codebook is empty; give ascending (threshold, rate) pairs")
    pairs = []
    for item in items:
        try:
            threshold, rate = item
        except (TypeError, ValueError):
            raise ValueError(f"{owner}: codebook entry {item!r} is not a (threshold, rate) pair") from None
        if isinstance(rate, bool) or not isinstance(rate, int) or rate < 1:
            raise ValueError(f"{owner}: codebook rate {rate!r} must be an int >= 1 (steps to the next compute)")
        threshold = float(threshold)
        if not math.isfinite(threshold):
            raise ValueError(f"{owner}: codebook threshold {threshold!r} must be finite")
        pairs.append((threshold, rate))
    thresholds = [t for t, _ in pairs]
    if any(b <= a for a, b in zip(thresholds, thresholds[1:])):
        raise ValueError(f"{owner}: codebook thresholds must be strictly ascending, got {thresholds}")
    return tuple(pairs)


def lookup_rate(codebook: Codebook, value: float) -> int:
    """The rate of the first threshold ``value`` is below; the last entry catches the rest."""
    for threshold, rate in codebook:
        if value < threshold:
            return rate
    return codebook[-1][1]


def derive_codebook(codebook: Codebook, from_steps: int, to_steps: int) -> Codebook:
    """Carry a codebook published for ``from_steps`` steps over to ``to_steps`` steps.

    Rates are counted in steps, so they scale with the step count, rounded down (a derived codebook
    never reuses over a longer share of the run than the published one) and at least 1.
    The metric is a change per step, which shrinks roughly as 1 / step count, so thresholds scale by
    ``from_steps / to_steps`` (rounded to 6 decimals). A starting point, not a fit: calibrate for
    your own model.
    """
    factor = to_steps / from_steps
    return tuple(
        (round(threshold / factor, 6), max(1, math.floor(rate * factor + 1e-9))) for threshold, rate in codebook
    )


def fast_codebook(num_steps: int) -> Codebook:
    """The fast codebook for ``num_steps``: published for 30 and 100, else derived from the nearest."""
    published = {30: FAST_30, 100: FAST_100}
    if num_steps in published:
        return published[num_steps]
    source = _nearest(num_steps, tuple(published))
    return derive_codebook(published[source], source, num_steps)


def slow_codebook(num_steps: int) -> Codebook:
    """The slow codebook for ``num_steps``: published for 30, else derived from it."""
    if num_steps == 30:
        return SLOW_30
    return derive_codebook(SLOW_30, 30, num_steps)


def relative_distance(
    new: Sequence[torch.Tensor], previous: Sequence[torch.Tensor], distance: str = "l1",
    group: MetricGroup = LOCAL,
) -> torch.Tensor:
    """The change of a branch's residuals relative to ``previous``, as a 0-d float32 tensor.

    All residual tensors of the branch count as one concatenated vector. ``"l1"``:
    ``|new - prev|_1 / |prev|_1`` (the default, the authors' metric); ``"l2"``: the same with L2
    norms; ``"cosine"``: ``1 - cos(new, prev)``. Returned as a tensor so no device sync happens here.
    Under context parallelism the sums run over every rank's shard (``group``) before the ratio.
    """
    if len(new) != len(previous):
        raise ValueError(f"relative_distance: {len(new)} new residuals but {len(previous)} previous ones")
    if distance not in DISTANCES:
        raise ValueError(f"relative_distance: unknown distance {distance!r}; valid: {', '.join(DISTANCES)}")
    pairs = [(n.detach().float(), p.detach().float()) for n, p in zip(new, previous)]
    if distance == "l1":
        num, den = group.sum(sum((n - p).abs().sum() for n, p in pairs), sum(p.abs().sum() for _, p in pairs))
        return num / den.clamp_min(_TINY)
    if distance == "l2":
        num, den = group.sum(sum((n - p).square().sum() for n, p in pairs), sum(p.square().sum() for _, p in pairs))
        return num.sqrt() / den.sqrt().clamp_min(_TINY)
    dot, new_sq, prev_sq = group.sum(sum((n * p).sum() for n, p in pairs), sum(n.square().sum() for n, _ in pairs),
                                     sum(p.square().sum() for _, p in pairs))
    return 1.0 - dot / (new_sq.sqrt() * prev_sq.sqrt()).clamp_min(_TINY)


def frame_view(residual: torch.Tensor, frames: int) -> tuple[torch.Tensor, int, int]:
    """Locate the frame axis of a residual: ``(view, axis, tokens_per_frame)``.

    Frame ``f`` occupies ``view.narrow(axis, f * tokens_per_frame, tokens_per_frame)``. Decided from the
    shape alone, in this order:

    * token axis (dim -2) of length ``frames``: a temporal-attention layout ``(B*S, T, C)``;
    * token axis a multiple ``T*S`` of ``frames``: frame-major tokens ``(B, T*S, C)``, frame = S tokens;
    * dim 0 a multiple of ``frames``: frames folded into the batch ``(B*T, S, C)``, viewed as
      ``(B, T, S, C)``.

    A spatial layout ``(B*T, S, C)`` whose S happens to be a multiple of T is read as frame-major;
    the default metric branch (temporal attention) is never ambiguous.
    """
    shape = tuple(residual.shape)
    if residual.ndim >= 2 and frames >= 1:
        tokens = shape[-2]
        if tokens % frames == 0 and tokens > 0:
            return residual, residual.ndim - 2, tokens // frames
        if shape[0] % frames == 0 and shape[0] > 0:
            return residual.reshape(shape[0] // frames, frames, *shape[1:]), 1, 1
    raise PolicyError(
        f"MoReg cannot map a residual of shape {shape} to {frames} frames: neither its token axis "
        f"(dim -2) is a multiple of {frames} (temporal (B*S, T, C) or frame-major (B, T*S, C) tokens) "
        f"nor its dim 0 (frames folded into the batch, (B*T, S, C)). Use another metric_kind, or check "
        f"the frame count (MoReg(frames=...) / StepContext.frames)"
    )


def motion_magnitude(residuals: Sequence[torch.Tensor], frames: int, stride: int = 1,
                     group: MetricGroup = LOCAL) -> torch.Tensor:
    """MoReg's normalised motion of a residual, as a 0-d float32 tensor.

    ``m = |r[i:] - r[:-i]|_1 / (|r[i:]|_1 + |r[:-i]|_1)`` with ``r`` shifted by ``stride`` frames
    along its frame axis (:func:`frame_view`). A branch with several residuals (a joint branch's video
    and text streams) is measured on its largest one, the video stream.
    """
    residual = max(residuals, key=lambda t: t.numel())
    # A frame shift pairs tokens across the ranks' slices of the sequence: measured on the whole one.
    residual = group.gather(residual.detach(), dim=-2) if group.world_size > 1 else residual
    view, axis, unit = frame_view(residual.detach().float(), frames)
    shift = stride * unit
    length = view.shape[axis] - shift
    if length <= 0:
        raise PolicyError(f"MoReg(frame_stride={stride}) needs more than {stride} frames; the residual has {frames}")
    later = view.narrow(axis, shift, length)
    earlier = view.narrow(axis, 0, length)
    num = (later - earlier).abs().sum()
    den = later.abs().sum() + earlier.abs().sum()
    return num / den.clamp_min(_TINY)


# -- MoReg --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MoReg:
    """Motion regularisation: compute more often while the video moves a lot.

    The metric is multiplied by a factor from the normalised frame-shifted difference ``m_raw`` of the
    metric residual (:func:`motion_magnitude`), measured only inside a step ``window``:

    * ``variant="code"`` (default, the authors' code): ``m = (m_raw / scale) ** power`` inside the
      window, ``m = 1`` outside; ``mg = gradient_weight * (m - m_prev) / k``; factor ``m + |mg|``;
      ``m_prev`` starts at 1.
    * ``variant="paper"``: factor ``m_raw + mg`` with ``mg = (m_raw - m_prev) / k`` (0 at the first
      measurement), clamped at 0; factor 1 outside the window. ``scale``, ``power`` and
      ``gradient_weight`` are not used. ``m`` is the normalised difference so the factor is scale free.

    ``window``: ``(lo, hi)`` fractions of the step count; 1-based steps ``round(lo*N)..round(hi*N)``
    are inside. Default: the code's windows, steps 10..90 of 100 and 4..26 of 30; other step counts
    use the fractions of the nearest of those two (log scale): 50 steps -> 7..43. With the step count
    unknown, MoReg applies at every step.

    ``frames``: latent frames per sample; overrides ``StepContext.frames`` (read from the model input).
    """

    variant: str = "code"
    frame_stride: int = 1
    window: tuple[float, float] | None = None
    frames: int | None = None
    scale: float = 0.385
    power: float = 8.0
    gradient_weight: float = 10.0

    def __post_init__(self) -> None:
        if self.variant not in MOREG_VARIANTS:
            raise ValueError(f"MoReg(variant={self.variant!r}): valid variants are {', '.join(MOREG_VARIANTS)}")
        if isinstance(self.frame_stride, bool) or not isinstance(self.frame_stride, int) or self.frame_stride < 1:
            raise ValueError(f"MoReg(frame_stride={self.frame_stride!r}): must be an int >= 1")
        if self.window is not None:
            lo, hi = self.window
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"MoReg(window={self.window!r}): need 0 <= lo <= hi <= 1 (fractions of the steps)")
            object.__setattr__(self, "window", (float(lo), float(hi)))
        frames = self.frames
        if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 2):
            raise ValueError(f"MoReg(frames={self.frames!r}): must be an int >= 2 (motion needs two frames)")
        if not self.scale > 0:
            raise ValueError(f"MoReg(scale={self.scale!r}): must be > 0")

    def window_steps(self, num_steps: int) -> tuple[int, int]:
        """The 1-based inclusive step range where motion is measured, for ``num_steps`` steps."""
        if self.window is not None:
            lo, hi = self.window
        else:
            windows = dict(_PUBLISHED_WINDOWS)
            source = _nearest(num_steps, tuple(windows))
            lo, hi = windows[source][0] / source, windows[source][1] / source
        return _round_half_up(lo * num_steps), _round_half_up(hi * num_steps)

    def applies(self, step: int, num_steps: int | None) -> bool:
        """Whether 0-based ``step`` lies inside the window (always, when the step count is unknown)."""
        if num_steps is None:
            return True
        first, last = self.window_steps(num_steps)
        return first <= step + 1 <= last

    def factor(self, m_raw: float | None, m_prev: float | None, k: int) -> tuple[float, float | None]:
        """``(factor, new m_prev)`` from this compute step's motion (None: outside the window)."""
        if self.variant == "code":
            m = 1.0 if m_raw is None else (m_raw / self.scale) ** self.power
            prev = 1.0 if m_prev is None else m_prev
            gradient = self.gradient_weight * (m - prev) / k
            return m + abs(gradient), m
        if m_raw is None:
            return 1.0, None
        gradient = 0.0 if m_prev is None else (m_raw - m_prev) / k
        return max(0.0, m_raw + gradient), m_raw

    def resolve_frames(self, ctx_frames: int | None) -> int:
        """The frame count to use: ``frames`` when set, else the model input's; raise when neither."""
        frames = self.frames if self.frames is not None else ctx_frames
        if frames is None:
            raise PolicyError(
                "MoReg needs the number of latent frames per sample, and neither way gave it: the model "
                "call did not provide it (StepContext.frames is None: an image model, or an input layout "
                "it could not be read from), and MoReg(frames=...) was not set. Pass MoReg(frames=T) "
                "with T latent frames after patching, or turn MoReg off"
            )
        return frames


# -- schedule state -------------------------------------------------------------------------------------
@dataclass
class _Schedule:
    """Per-generation state of one schedule (the global one, or one block's with ``per_layer``)."""

    rate: int = 1
    next_compute: int = 0
    last_compute: int | None = None
    prev_compute: int | None = None
    m_prev: float | None = None
    computing: bool = True
    open: bool = False  # computed at last_compute; its metric is not folded in yet
    distances: list[torch.Tensor] = field(default_factory=list)
    motions: list[torch.Tensor] = field(default_factory=list)


_GLOBAL = ""  # key of the global schedule (block paths are never empty)


@dataclass(frozen=True)
class MetricLayout:
    """Where AdaCache reads its metric in one model: derived from the branches, not learnt."""

    kind: str
    global_ids: frozenset[str]  # the metric branches of the global schedule
    block_schedule: Mapping[str, str]  # block path -> its own schedule's key (per_layer)
    feeds: Mapping[str, tuple[str, ...]]  # watched branch id -> the schedules it feeds


@dataclass
class AdaCacheState:
    """One generation of :class:`AdaCache`: the schedules, and the decisions taken (``trace``)."""

    layout: MetricLayout | None = None
    layout_of: tuple[BranchInfo, ...] | None = None  # the branches ``layout`` was derived from
    schedules: dict[str, _Schedule] = field(default_factory=dict)
    steps_now: int | None = None
    last_planned: tuple[int, int] | None = None
    trace: list[dict] = field(default_factory=list)

    @property
    def metric_branches(self) -> frozenset[str]:
        """Ids of the branches the global schedule reads (empty before the branches are known)."""
        return self.layout.global_ids if self.layout is not None else frozenset()

@dataclass(frozen=True)
class AdaCache(Policy):
    """AdaCache: compute when the metric branch's residual moves, reuse every residual otherwise.

    Args:
        codebook: ascending ``(threshold, rate)`` pairs or a ``{threshold: rate}`` dict. Default (None):
            :func:`fast_codebook` for the generation's step count (the published 100-step fast
            codebook, the code's default, when the step count is unknown).
        metric_kind: branch kind the metric is read from. Default: ``"temporal_attention"`` when the
            model has it, else ``"self_attention"``, else ``"joint_attention"``.
        metric_blocks: depths (order of execution, 0 = first block) of the metric blocks; several are
            averaged. Default: the middle block among those with a branch of the metric kind (index
            ``(n - 1) // 2``: block 13 of 28, as in the code).
        distance: ``"l1"`` (default), ``"l2"`` or ``"cosine"``.
        per_layer: each block with a branch of the metric kind gets its own schedule from that branch
            (the paper's ablation; unstable there). The ``metric_blocks`` and every block without a
            branch of the metric kind follow the global schedule, read from the ``metric_blocks``.
        moreg: :class:`MoReg` settings (``True`` for the defaults), or None for no motion regularisation.
        num_steps: step count used when the runtime does not know it (for the last two steps and the
            default codebook).
        threshold_scale: multiplies every threshold of a default (step-count-resolved) codebook; set by
            :meth:`with_threshold_scale` when ``codebook`` is None.

    Every residual branch is cached. All observations of one step (several metric blocks, separate
    cond and uncond calls) are averaged into one metric, then divided by the steps since the previous
    compute step and multiplied by the MoReg factor.
    """

    codebook: Codebook | None = None
    metric_kind: str | None = None
    metric_blocks: tuple[int, ...] | None = None
    distance: str = "l1"
    per_layer: bool = False
    moreg: MoReg | None = None
    num_steps: int | None = None
    threshold_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.codebook is not None:
            object.__setattr__(self, "codebook", normalize_codebook(self.codebook, "AdaCache(codebook=...)"))
        if self.metric_kind is not None:
            if not isinstance(self.metric_kind, str):
                raise ValueError(f"AdaCache(metric_kind={self.metric_kind!r}): give one kind name")
            validate_kinds(self.metric_kind, "AdaCache(metric_kind=...)")
        if self.metric_blocks is not None:
            blocks = (self.metric_blocks,) if isinstance(self.metric_blocks, int) else tuple(self.metric_blocks)
            if not blocks or any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in blocks):
                raise ValueError(f"AdaCache(metric_blocks={self.metric_blocks!r}): give block depths, ints >= 0")
            object.__setattr__(self, "metric_blocks", blocks)
        if self.distance not in DISTANCES:
            raise ValueError(f"AdaCache(distance={self.distance!r}): valid distances are {', '.join(DISTANCES)}")
        if self.moreg is True:
            object.__setattr__(self, "moreg", MoReg())
        elif self.moreg is False:
            object.__setattr__(self, "moreg", None)
        elif self.moreg is not None and not isinstance(self.moreg, MoReg):
            raise ValueError(f"AdaCache(moreg={self.moreg!r}): give a MoReg, True, or None")
        steps = self.num_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"AdaCache(num_steps={self.num_steps!r}): must be an int >= 1")
        scale = self.threshold_scale
        if not (isinstance(scale, (int, float)) and scale > 0 and math.isfinite(scale)):
            raise ValueError(f"AdaCache(threshold_scale={self.threshold_scale!r}): must be a finite number > 0")

    # -- presets ------------------------------------------------------------------------------------
    @classmethod
    def fast(cls, num_steps: int, moreg: bool | MoReg = False) -> "AdaCache":
        """The fast preset for ``num_steps`` steps (paper: 2.24x on Open-Sora 480p, 30 steps).

        Codebook published for 30 and 100 steps (Open-Sora); any other step count derives it from the
        nearest published one on a log scale (30 for up to 54 steps, 100 from 55) with
        :func:`derive_codebook`: rates times ``num_steps / source``, rounded down, at least 1;
        thresholds times ``source / num_steps``. E.g. 50 steps, from 30:
        ``((0.048, 10), (0.096, 8), (0.144, 6), (0.192, 5), (0.24, 3), (0.6, 1))``.
        ``moreg=True`` adds :class:`MoReg` in the code's variant.
        """
        return cls(codebook=fast_codebook(_preset_steps(num_steps)), moreg=moreg or None, num_steps=num_steps)

    @classmethod
    def slow(cls, num_steps: int, moreg: bool | MoReg = False) -> "AdaCache":
        """The slow (higher quality) preset for ``num_steps`` steps (paper: 1.46x on Open-Sora 480p).

        Codebook published for 30 steps only (Open-Sora); every other step count, 100 included,
        derives it from the 30-step one with :func:`derive_codebook` (rates times ``num_steps / 30``,
        rounded down, at least 1; thresholds times ``30 / num_steps``). E.g. 50 steps:
        ``((0.048, 5), (0.096, 3), (0.144, 1), (0.192, 1), (0.24, 1), (0.6, 1))``.
        ``moreg=True`` adds :class:`MoReg` in the code's variant.
        """
        return cls(codebook=slow_codebook(_preset_steps(num_steps)), moreg=moreg or None, num_steps=num_steps)

    def with_threshold_scale(self, scale: float) -> "AdaCache":
        """A copy with every codebook threshold times ``scale`` (larger: fewer compute steps).

        The calibration knob. With the default (step-count-resolved) codebook the scale is kept in
        ``threshold_scale`` and applied once the step count is known.
        """
        if not (isinstance(scale, (int, float)) and scale > 0 and math.isfinite(scale)):
            raise ValueError(f"with_threshold_scale({scale!r}): scale must be a finite number > 0")
        if self.codebook is None:
            return dataclasses.replace(self, threshold_scale=self.threshold_scale * scale)
        scaled = tuple((threshold * scale, rate) for threshold, rate in self.codebook)
        return dataclasses.replace(self, codebook=scaled)

    def codebook_for(self, num_steps: int | None) -> Codebook:
        """The codebook in use for a generation of ``num_steps`` steps (None: unknown)."""
        codebook = self.codebook
        if codebook is None:
            codebook = fast_codebook(num_steps) if num_steps is not None else FAST_100
        if self.threshold_scale != 1.0:
            codebook = tuple((threshold * self.threshold_scale, rate) for threshold, rate in codebook)
        return codebook

    # -- Policy interface ------------------------------------------------------------------------
    def new_state(self) -> AdaCacheState:
        return AdaCacheState()

    def caches(self, branch: BranchInfo, state: Any = None) -> bool:
        return True

    def watches(self, branch: BranchInfo, state: AdaCacheState) -> bool:
        if state is not None and state.layout is not None:
            return branch.id in state.layout.feeds
        # The first call, before the model's branches are known: the middle block's attention (what
        # the layout picks when every block has a branch of the metric kind), so its residual is
        # kept for the next step to compare with, and no other is.
        if branch.blocks is None:
            return False
        depths = self.metric_blocks if self.metric_blocks is not None else ((branch.blocks - 1) // 2,)
        kinds = (self.metric_kind,) if self.metric_kind is not None else (
            TEMPORAL_ATTENTION, SELF_ATTENTION, JOINT_ATTENTION)
        return branch.depth in depths and (branch.kind in kinds or bool(branch.tags & set(kinds)))

    def folds(self) -> bool:
        return not self.per_layer  # one global schedule: a step reuses every branch, or none

    def validate(self, branches: tuple[BranchInfo, ...]) -> None:
        if branches:
            self.layout(branches)

    def layout(self, branches: tuple[BranchInfo, ...]) -> MetricLayout:
        """Pick the metric kind, blocks and branches; raise when the model lacks what was asked for."""
        owner = f"AdaCache(metric_kind={self.metric_kind!r})"
        present = {tag for b in branches for tag in b.tags} | {b.kind for b in branches}
        if self.metric_kind is not None:
            require_kinds_present((self.metric_kind,), branches, owner)
            kind = self.metric_kind
        else:
            kind = next((k for k in (TEMPORAL_ATTENTION, SELF_ATTENTION, JOINT_ATTENTION) if k in present), None)
            if kind is None:
                raise PolicyError(
                    f"AdaCache: the model has no temporal, self or joint attention branch to read the metric "
                    f"from (its kinds: {', '.join(sorted(present))}); pass metric_kind=..."
                )
        by_depth: dict[int, BranchInfo] = {}
        for branch in sorted(branches, key=lambda b: (b.depth, b.kind != kind)):
            if (branch.kind == kind or kind in branch.tags) and branch.depth not in by_depth:
                by_depth[branch.depth] = branch
        depths = sorted(by_depth)
        if self.metric_blocks is None:
            chosen = (depths[(len(depths) - 1) // 2],)
        else:
            missing = [d for d in self.metric_blocks if d not in by_depth]
            if missing:
                raise PolicyError(
                    f"AdaCache(metric_blocks={self.metric_blocks}): block depth(s) {missing} have no "
                    f"{kind} branch; blocks with one are at depths {depths}"
                )
            chosen = tuple(dict.fromkeys(self.metric_blocks))
        global_ids = frozenset(by_depth[d].id for d in chosen)
        feeds: dict[str, list[str]] = {bid: [_GLOBAL] for bid in global_ids}
        block_schedule: dict[str, str] = {}
        if self.per_layer:
            for depth, branch in by_depth.items():
                if branch.id not in global_ids:
                    block_schedule[branch.block] = branch.block
                    feeds.setdefault(branch.id, []).append(branch.block)
        return MetricLayout(kind, global_ids, MappingProxyType(block_schedule),
                            MappingProxyType({bid: tuple(keys) for bid, keys in feeds.items()}))

    def plan(self, ctx: StepContext, state: AdaCacheState) -> Plan:
        """Fold the previous step's metric into the schedules, then decide this step."""
        if ctx.branches and state.layout_of is not ctx.branches:
            state.layout, state.layout_of = self.layout(ctx.branches), ctx.branches
        if state.last_planned is not None and (
            ctx.generation != state.last_planned[0] or ctx.step <= state.last_planned[1]
        ):
            # A step planned twice or out of order: start the schedules over (the layout stays).
            state.schedules, state.steps_now, state.trace = {}, None, []
        state.last_planned = (ctx.generation, ctx.step)
        state.steps_now = ctx.num_steps if ctx.num_steps is not None else self.num_steps
        self._close_open_steps(state)
        n = state.steps_now
        forced = ctx.step < 2 or (n is not None and ctx.step >= n - 2)
        block_schedule = state.layout.block_schedule if state.layout is not None else {}
        for key in (_GLOBAL, *block_schedule.values()):
            schedule = state.schedules.get(key)
            if schedule is None:
                schedule = state.schedules[key] = _Schedule()
            self._begin_step(schedule, ctx.step, forced)
        if all(s.computing for s in state.schedules.values()):
            return Plan.compute_all()
        schedules = state.schedules
        return Plan.reuse_only(
            b.id
            for b in ctx.branches
            if not schedules[block_schedule.get(b.block, _GLOBAL)].computing
        )

    def observe(
        self,
        ctx: StepContext,
        state: AdaCacheState,
        branch: BranchInfo,
        new: tuple[torch.Tensor, ...],
        previous: tuple[torch.Tensor, ...] | None,
    ) -> None:
        """Record the metric branch's change (and motion) as tensors; plan() reads them next step."""
        keys = state.layout.feeds.get(branch.id) if state.layout is not None else None
        if not keys or previous is None:
            return
        frames = self.moreg.resolve_frames(ctx.frames) if self.moreg is not None else None
        schedules = [s for s in (state.schedules.get(k) for k in keys) if s is not None and s.last_compute == ctx.step]
        if not schedules:
            return
        distance = relative_distance(new, previous, self.distance, ctx.group)
        motion = None
        if self.moreg is not None:
            steps = ctx.num_steps if ctx.num_steps is not None else self.num_steps
            if self.moreg.applies(ctx.step, steps):
                motion = motion_magnitude(new, frames, self.moreg.frame_stride, ctx.group)
        for schedule in schedules:
            schedule.distances.append(distance)
            if motion is not None:
                schedule.motions.append(motion)

    # -- decision logic (also driven by simulate) -----------------------------------------------------
    def _begin_step(self, schedule: _Schedule, step: int, forced: bool) -> None:
        schedule.computing = forced or step >= schedule.next_compute
        if schedule.computing:
            schedule.prev_compute, schedule.last_compute = schedule.last_compute, step
            schedule.open = True
            schedule.distances, schedule.motions = [], []

    def _close_open_steps(self, state: AdaCacheState) -> None:
        """Turn every open schedule's recorded tensors into its next compute step (one device sync)."""
        open_schedules = [s for s in state.schedules.values() if s.open]
        means: list[torch.Tensor] = []
        for schedule in open_schedules:
            for values in (schedule.distances, schedule.motions):
                if values:
                    device = values[0].device
                    means.append(torch.stack([v.to(device) for v in values]).mean())
        if means:
            device = means[0].device
            floats = iter(torch.stack([m.to(device) for m in means]).tolist())
        else:
            floats = iter(())
        codebook = self.codebook_for(state.steps_now)
        for schedule in open_schedules:
            schedule.open = False
            if schedule.distances:
                distance = next(floats)
                motion = next(floats) if schedule.motions else None
                schedule.distances, schedule.motions = [], []
                schedule.rate = self._rate(state, schedule, distance, motion, codebook)
            schedule.next_compute = schedule.last_compute + schedule.rate

    def _rate(self, state: AdaCacheState, schedule: _Schedule, distance: float, motion: float | None,
              codebook: Codebook) -> int:
        k = schedule.last_compute - schedule.prev_compute if schedule.prev_compute is not None else 1
        metric = distance / max(k, 1)
        factor = 1.0
        if self.moreg is not None:
            inside = self.moreg.applies(schedule.last_compute, state.steps_now)
            factor, schedule.m_prev = self.moreg.factor(motion if inside else None, schedule.m_prev, max(k, 1))
            metric *= factor
        rate = lookup_rate(codebook, metric)
        if schedule is state.schedules.get(_GLOBAL):
            state.trace.append({"step": schedule.last_compute, "distance": distance / max(k, 1), "motion": motion,
                                "factor": factor, "metric": metric, "rate": rate})
        return rate

    def simulate(
        self,
        residuals: Sequence[tuple[torch.Tensor, ...]],
        num_steps: int,
        frames: int | None = None,
    ) -> list[bool]:
        """Compute flags per step that the global schedule would produce on an unchanged trajectory.

        ``residuals[t]``: the metric branch's residual(s) at step ``t`` of an uncached run. A copy of
        this policy is driven through :meth:`plan` and :meth:`observe` with one synthetic branch, each
        compute step seeing the residual of the previous compute step, as the runtime would. Models one
        metric branch and one call per step; ``per_layer`` is ignored. ``frames``: for MoReg, when it
        has no ``frames`` of its own.
        """
        if len(residuals) != num_steps:
            raise ValueError(f"simulate: {len(residuals)} residuals for {num_steps} steps; give one per step")
        steps = [(r,) if isinstance(r, torch.Tensor) else tuple(r) for r in residuals]
        if not steps:
            return []
        replay = dataclasses.replace(self, metric_blocks=None, per_layer=False)
        branch = BranchInfo(
            id="metric", block="metric", block_list="blocks", block_index=0, depth=0, name="metric",
            kind=self.metric_kind or TEMPORAL_ATTENTION, tags=frozenset(), flops=None,
            num_residuals=len(steps[0]),
        )
        branches = (branch,)
        state = replay.new_state()
        flags = []
        previous = None
        for step, new in enumerate(steps):
            ctx = StepContext(step=step, num_steps=num_steps, timestep=None, generation=0,
                              branches=branches, frames=frames)
            computes = branch.id not in replay.plan(ctx, state).reuse
            flags.append(computes)
            if computes:
                replay.observe(ctx, state, branch, new, previous)
                previous = new
        return flags


def _preset_steps(num_steps: int) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"AdaCache preset: num_steps must be an int >= 1, got {num_steps!r}")
    return num_steps
