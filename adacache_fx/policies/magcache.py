"""MagCache (arXiv 2506.09045): skip the block stack while the predicted magnitude error stays small.

The residual a DiT's block stack adds to its input changes across denoising steps mostly in magnitude,
and the ratio of successive magnitudes follows one curve per model (``gamma_t``, "the unified
magnitude law"), calibrated once from an uncached run. After a step that computes, each later step
multiplies the ratios since that step, ``R = prod gamma``; skipping it would err by about
``|1 - R|``; the errors of the skipped run are summed, and the step reuses the cached residual
(every branch of every block reuses) while that sum stays within ``threshold`` and at most
``max_skip_steps`` (K) steps in a row have been skipped. The first ``retention_ratio`` of the steps
always compute. Decisions depend on the step index and the curve only, never on the run's data, so
a generation's schedule is known before it starts (:meth:`MagCache.simulate`).

By default the rule is diffusers' ``MagCacheConfig`` hook (diffusers 0.42, ``hooks/mag_cache.py``):
its defaults (threshold 0.06, K 3, retention 0.2), ``<=`` against the threshold, retention
``int(retention_ratio * num_steps + 0.5)``, the curve stretched to the step count by nearest-index
interpolation, ratio 1.0 past the curve's end. docs/algorithms/magcache.md lists where the authors'
per-model scripts differ.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import torch

from ..errors import PolicyError
from .base import BranchInfo, Plan, Policy, StepContext, whole_step_reuse

# --------------------------------------------------------------------------------------------------
# Published curves
# --------------------------------------------------------------------------------------------------

# Wan2.1 curves as the authors publish them: one list with the conditional and the unconditional
# call of each step interleaved (cond, uncond, cond, uncond, ...), the first step padded with 1.0.
# Source: Zehong-Ma/MagCache, MagCache4Wan2.1/magcache_generate.py (commit 1a66b6d2), calibrated
# with SDPA attention ("may differ ... in the last two decimal digits" with flash attention).
_WAN_INTERLEAVED: Mapping[str, tuple[float, ...]] = MappingProxyType({
    # Wan2.1-T2V-1.3B, 50 steps
    "wan2.1-t2v-1.3b": (1.0, 1.0, 1.0124, 1.02213, 1.00166, 1.0041, 0.99791, 1.00061, 0.99682, 0.99762,
                        0.99634, 0.99685, 0.99567, 0.99586, 0.99416, 0.99422, 0.99578, 0.99575, 0.9957,
                        0.99563, 0.99511, 0.99506, 0.99535, 0.99531, 0.99552, 0.99549, 0.99541, 0.99539,
                        0.9954, 0.99536, 0.99489, 0.99485, 0.99518, 0.99514, 0.99484, 0.99478, 0.99481,
                        0.99479, 0.99415, 0.99413, 0.99419, 0.99416, 0.99396, 0.99393, 0.99388, 0.99386,
                        0.99349, 0.99349, 0.99309, 0.99304, 0.9927, 0.9927, 0.99228, 0.99226, 0.99171,
                        0.9917, 0.99137, 0.99135, 0.99068, 0.99063, 0.99005, 0.99003, 0.98944, 0.98942,
                        0.98849, 0.98849, 0.98758, 0.98757, 0.98644, 0.98643, 0.98504, 0.98503, 0.9836,
                        0.98359, 0.98202, 0.98201, 0.97977, 0.97978, 0.97717, 0.97718, 0.9741, 0.97411,
                        0.97003, 0.97002, 0.96538, 0.96541, 0.9593, 0.95933, 0.95086, 0.95089, 0.94013,
                        0.94019, 0.92402, 0.92414, 0.90241, 0.9026, 0.86821, 0.86868, 0.81838, 0.81939),
    # Wan2.1-T2V-14B, 50 steps
    "wan2.1-t2v-14b": (1.0, 1.0, 1.02504, 1.03017, 1.00025, 1.00251, 0.9985, 0.99962, 0.99779, 0.99771,
                       0.9966, 0.99658, 0.99482, 0.99476, 0.99467, 0.99451, 0.99664, 0.99656, 0.99434,
                       0.99431, 0.99533, 0.99545, 0.99468, 0.99465, 0.99438, 0.99434, 0.99516, 0.99517,
                       0.99384, 0.9938, 0.99404, 0.99401, 0.99517, 0.99516, 0.99409, 0.99408, 0.99428,
                       0.99426, 0.99347, 0.99343, 0.99418, 0.99416, 0.99271, 0.99269, 0.99313, 0.99311,
                       0.99215, 0.99215, 0.99218, 0.99215, 0.99216, 0.99217, 0.99163, 0.99161, 0.99138,
                       0.99135, 0.98982, 0.9898, 0.98996, 0.98995, 0.9887, 0.98866, 0.98772, 0.9877,
                       0.98767, 0.98765, 0.98573, 0.9857, 0.98501, 0.98498, 0.9838, 0.98376, 0.98177,
                       0.98173, 0.98037, 0.98035, 0.97678, 0.97677, 0.97546, 0.97543, 0.97184, 0.97183,
                       0.96711, 0.96708, 0.96349, 0.96345, 0.95629, 0.95625, 0.94926, 0.94929, 0.93964,
                       0.93961, 0.92511, 0.92504, 0.90693, 0.90678, 0.8796, 0.87945, 0.86111, 0.86189),
    # Wan2.1-I2V-14B-480P, 40 steps
    "wan2.1-i2v-14b-480p": (1.0, 1.0, 0.98783, 0.98993, 0.97559, 0.97593, 0.98311, 0.98319, 0.98202,
                            0.98225, 0.9888, 0.98878, 0.98762, 0.98759, 0.98957, 0.98971, 0.99052, 0.99043,
                            0.99383, 0.99384, 0.98857, 0.9886, 0.99065, 0.99068, 0.98845, 0.98847, 0.99057,
                            0.99057, 0.98957, 0.98961, 0.98601, 0.9861, 0.98823, 0.98823, 0.98756, 0.98759,
                            0.98808, 0.98814, 0.98721, 0.98724, 0.98571, 0.98572, 0.98543, 0.98544, 0.98157,
                            0.98165, 0.98411, 0.98413, 0.97952, 0.97953, 0.98149, 0.9815, 0.9774, 0.97742,
                            0.97825, 0.97826, 0.97355, 0.97361, 0.97085, 0.97087, 0.97056, 0.97055, 0.96588,
                            0.96587, 0.96113, 0.96124, 0.9567, 0.95681, 0.94961, 0.94969, 0.93973, 0.93988,
                            0.93217, 0.93224, 0.91878, 0.91896, 0.90955, 0.90954, 0.92617, 0.92616),
    # Wan2.1-I2V-14B-720P, 40 steps
    "wan2.1-i2v-14b-720p": (1.0, 1.0, 0.99428, 0.99498, 0.98588, 0.98621, 0.98273, 0.98281, 0.99018,
                            0.99023, 0.98911, 0.98917, 0.98646, 0.98652, 0.99454, 0.99456, 0.9891, 0.98909,
                            0.99124, 0.99127, 0.99102, 0.99103, 0.99215, 0.99212, 0.99515, 0.99515, 0.99576,
                            0.99572, 0.99068, 0.99072, 0.99097, 0.99097, 0.99166, 0.99169, 0.99041, 0.99042,
                            0.99201, 0.99198, 0.99101, 0.99101, 0.98599, 0.98603, 0.98845, 0.98844, 0.98848,
                            0.98851, 0.98862, 0.98857, 0.98718, 0.98719, 0.98497, 0.98497, 0.98264, 0.98263,
                            0.98389, 0.98393, 0.97938, 0.9794, 0.97535, 0.97536, 0.97498, 0.97499, 0.973,
                            0.97301, 0.96827, 0.96828, 0.96261, 0.96263, 0.95335, 0.9534, 0.94649, 0.94655,
                            0.93397, 0.93414, 0.91636, 0.9165, 0.89088, 0.89109, 0.8679, 0.86768),
})

#: Published magnitude-ratio curves (one ratio per step, the first 1.0), by normalised name. A curve
#: fits the checkpoint (and sampler, resolution) it was calibrated on; for another model fit one with
#: ``ax.calibrate``. Wan2.1's curves are the conditional entries of the authors' interleaved lists
#: (the unconditional ones differ by less than 0.01 and are in :data:`WAN_UNCOND_RATIOS`).
MAG_RATIOS: Mapping[str, tuple[float, ...]] = MappingProxyType({
    # FLUX.1-dev, 28 steps: diffusers.hooks.mag_cache.FLUX_MAG_RATIOS, the same list as the authors'
    # Zehong-Ma/MagCache MagCache4FLUX/magcache_flux.py (commit 1a66b6d2).
    "flux": (1.0, 1.21094, 1.11719, 1.07812, 1.0625, 1.03906, 1.03125, 1.03906, 1.02344, 1.03125,
             1.02344, 0.98047, 1.01562, 1.00781, 1.0, 1.00781, 1.0, 1.00781, 1.0, 1.0, 0.99609,
             0.99609, 0.98047, 0.98828, 0.96484, 0.95703, 0.93359, 0.89062),
    # HunyuanVideo T2V, 50 steps, 720p and 544p: Zehong-Ma/MagCache
    # MagCache4HunyuanVideo/magcache_sample_video.py (commit 8715292d).
    "hunyuanvideo-720p": (1.0, 1.0754, 1.27807, 1.11596, 1.09504, 1.05188, 1.00844, 1.05779, 1.00657,
                          1.04142, 1.03101, 1.00679, 1.02556, 1.00908, 1.06949, 1.05438, 1.02214,
                          1.02321, 1.03019, 1.00779, 1.03381, 1.01886, 1.01161, 1.02968, 1.00544,
                          1.02822, 1.00689, 1.02119, 1.0105, 1.01044, 1.01572, 1.02972, 1.0094,
                          1.02368, 1.0226, 0.98965, 1.01588, 1.02146, 1.0018, 1.01687, 0.99436,
                          1.00283, 1.01139, 0.97122, 0.98251, 0.94513, 0.97656, 0.90943, 0.85703,
                          0.75456),
    "hunyuanvideo-544p": (1.0, 1.06971, 1.29073, 1.11245, 1.09596, 1.05233, 1.01415, 1.05672, 1.00848,
                          1.03632, 1.02974, 1.00984, 1.03028, 1.00681, 1.06614, 1.05022, 1.02592,
                          1.01776, 1.02985, 1.00726, 1.03727, 1.01502, 1.00992, 1.03371, 0.9976,
                          1.02742, 1.0093, 1.01869, 1.00815, 1.01461, 1.01152, 1.03082, 1.0061,
                          1.02162, 1.01999, 0.99063, 1.01186, 1.0217, 0.99947, 1.01711, 0.9904,
                          1.00258, 1.00878, 0.97039, 0.97686, 0.94315, 0.97728, 0.91154, 0.86139,
                          0.76592),
    **{name: values[0::2] for name, values in _WAN_INTERLEAVED.items()},
})

#: The unconditional-call curves of Wan2.1 (odd entries of the authors' lists), for reference.
WAN_UNCOND_RATIOS: Mapping[str, tuple[float, ...]] = MappingProxyType(
    {name: values[1::2] for name, values in _WAN_INTERLEAVED.items()}
)

#: The authors' published settings per model: ``variant -> {threshold, max_skip_steps,
#: retention_ratio[, num_steps, always_compute]}``. "slow" favours quality, "fast" speed.
PRESETS: Mapping[str, Mapping[str, Mapping[str, Any]]] = MappingProxyType({
    # MagCache4FLUX/magcache_flux.py: K 5, threshold 0.24, retention 0.1 at 28 steps, and step 11
    # (of 28) always computes; README: "MagCache (E024K5R01)", ~5.05 s vs 14.26 s on an A800.
    "flux": {"fast": dict(threshold=0.24, max_skip_steps=5, retention_ratio=0.1, num_steps=28,
                          always_compute=(11,))},
    # MagCache4Wan2.1/README.md: T2V-1.3B "E012K2R02" (~87 s) and "E012K4R02" (~68 s) vs ~189 s.
    "wan2.1-t2v-1.3b": {"slow": dict(threshold=0.12, max_skip_steps=2, retention_ratio=0.2),
                        "fast": dict(threshold=0.12, max_skip_steps=4, retention_ratio=0.2)},
    # README: T2V-14B 720p "E024K6R02", ~21 min 40 s vs ~60 min 04 s; the script's defaults
    # (threshold 0.12, K 2, retention 0.2) as the slow setting.
    "wan2.1-t2v-14b": {"slow": dict(threshold=0.12, max_skip_steps=2, retention_ratio=0.2),
                       "fast": dict(threshold=0.24, max_skip_steps=6, retention_ratio=0.2)},
    # README: I2V-14B 480P "E012K4R02" (4 min 43 s) and "E024K6R02" (~4 min 23 s) vs ~13 min 20 s.
    "wan2.1-i2v-14b-480p": {"slow": dict(threshold=0.12, max_skip_steps=4, retention_ratio=0.2),
                            "fast": dict(threshold=0.24, max_skip_steps=6, retention_ratio=0.2)},
    # README: I2V-14B 720P "E012K4R02" (~11 min 35 s) and "E024K6R02" (~10 min 03 s) vs ~30 min 40 s.
    "wan2.1-i2v-14b-720p": {"slow": dict(threshold=0.12, max_skip_steps=4, retention_ratio=0.2),
                            "fast": dict(threshold=0.24, max_skip_steps=6, retention_ratio=0.2)},
    # MagCache4HunyuanVideo/magcache_sample_video.py: threshold 0.24, K 6 (commented: 0.12, 4).
    "hunyuanvideo-720p": {"slow": dict(threshold=0.12, max_skip_steps=4, retention_ratio=0.2),
                          "fast": dict(threshold=0.24, max_skip_steps=6, retention_ratio=0.2)},
    "hunyuanvideo-544p": {"slow": dict(threshold=0.12, max_skip_steps=4, retention_ratio=0.2),
                          "fast": dict(threshold=0.24, max_skip_steps=6, retention_ratio=0.2)},
})


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_CURVES_BY_KEY = {_key(k): k for k in MAG_RATIOS}
_PRESETS_BY_KEY = {_key(k): k for k in PRESETS}


def _curve_name(name: str, owner: str) -> str:
    found = _CURVES_BY_KEY.get(_key(name))
    if found is None:
        raise PolicyError(
            f"{owner}: no published magnitude-ratio curve named {name!r}; known: "
            f"{', '.join(sorted(MAG_RATIOS))}. For another model, record one with ax.calibrate."
        )
    return found


def resolve_ratios(mag_ratios: Sequence[float] | str | None) -> tuple[float, ...] | None:
    """A curve name or a sequence of ratios as a validated tuple (None: not calibrated yet)."""
    if mag_ratios is None:
        return None
    if isinstance(mag_ratios, str):
        return MAG_RATIOS[_curve_name(mag_ratios, "MagCache(mag_ratios=...)")]
    if isinstance(mag_ratios, torch.Tensor):
        mag_ratios = mag_ratios.detach().flatten().tolist()
    try:
        values = tuple(float(v) for v in mag_ratios)
    except (TypeError, ValueError):
        raise ValueError(
            f"MagCache(mag_ratios={mag_ratios!r}): expected a curve name, a sequence of positive "
            "numbers (one per step) or None"
        ) from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(
            f"MagCache(mag_ratios={mag_ratios!r}): need at least one ratio, every one finite and > 0"
        )
    return values


def nearest_interp(values: Sequence[float], length: int) -> tuple[float, ...]:
    """``values`` stretched to ``length`` entries by nearest index, as diffusers and the authors do:
    entry ``i`` is ``values[round(i * (len - 1) / (length - 1))]`` (round half to even), and a length
    of 1 keeps the last value.

    >>> nearest_interp((1.0, 2.0, 3.0), 5)  # indices round(0, 0.5, 1, 1.5, 2) = 0, 0, 1, 2, 2
    (1.0, 1.0, 2.0, 3.0, 3.0)
    """
    if length < 1:
        raise ValueError(f"nearest_interp: length must be >= 1, got {length}")
    if length == 1:
        return (float(values[-1]),)
    scale = (len(values) - 1) / (length - 1)
    return tuple(float(values[round(i * scale)]) for i in range(length))


def curve_index(step: int, curve_length: int, num_steps: int) -> int:
    """Index into a curve of ``curve_length`` that step ``step`` of ``num_steps`` maps to."""
    if num_steps <= 1:
        return curve_length - 1
    return round(step * (curve_length - 1) / (num_steps - 1))


# --------------------------------------------------------------------------------------------------
# The whole model's residual and its magnitude ratios (calibration)
# --------------------------------------------------------------------------------------------------

def model_residual(latent: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """The whole model's residual ``output - latent`` in float32 (the model's input and output).

    An output with more channels than the latent (a learned variance: DiT, PixArt, Latte) is cut to
    the latent's size along the one axis where they differ. An output of an unrelated shape is
    returned as it is (its own magnitudes are then what the ratios measure).
    """
    out = output.detach().float()
    lat = latent.detach().float().to(out.device)
    if out.shape != lat.shape and out.ndim == lat.ndim:
        differ = [d for d in range(out.ndim) if out.shape[d] != lat.shape[d]]
        if len(differ) == 1 and out.shape[differ[0]] > lat.shape[differ[0]]:
            out = out.narrow(differ[0], 0, lat.shape[differ[0]])
    if out.shape != lat.shape:
        return out
    return out - lat


def magnitude_ratio(current: torch.Tensor, previous: torch.Tensor) -> float:
    """``mean(||current|| / (||previous|| + 1e-8))``, norms over the last axis (per token for
    ``[batch, tokens, channels]``): diffusers' calibration formula (the authors' has no 1e-8)."""
    cur = torch.linalg.vector_norm(current.float(), dim=-1)
    prev = torch.linalg.vector_norm(previous.float().to(cur.device), dim=-1)
    return float((cur / (prev + 1e-8)).mean())


def magnitude_ratios(residuals: Sequence[torch.Tensor]) -> tuple[float, ...]:
    """The curve of one uncached run: 1.0 for the first step, then each step's residual against the
    previous step's (:func:`magnitude_ratio`)."""
    if not residuals:
        raise ValueError("magnitude_ratios: no residuals")
    return (1.0,) + tuple(magnitude_ratio(residuals[i], residuals[i - 1]) for i in range(1, len(residuals)))


# --------------------------------------------------------------------------------------------------
# The policy
# --------------------------------------------------------------------------------------------------

@dataclass
class MagCacheState:
    """One generation of :class:`MagCache`: the error accumulators of the current skipped run."""

    accumulated_ratio: float = 1.0  # prod of the ratios since the last computing step
    accumulated_steps: int = 0  # steps since the last computing step, this one included
    accumulated_error: float = 0.0  # sum of |1 - accumulated_ratio| over them
    computed: bool = False  # a step has computed (diffusers: a residual is cached)
    #: ``(step, computed, accumulated error)`` per step (for inspection and tests)
    trace: list[tuple[int, bool, float]] = field(default_factory=list)
    warned: bool = False
    curve: tuple[int, tuple[float, ...]] | None = None  # (steps, the curve stretched to them)
    reuse_for: tuple[tuple[BranchInfo, ...], Plan] | None = None


@dataclass(frozen=True)
class MagCache(Policy):
    """Reuse every branch while the accumulated magnitude error since the last full step stays
    within ``threshold`` and at most ``max_skip_steps`` steps in a row are skipped.

    ``mag_ratios``: the model's magnitude-ratio curve (one ratio per step, first 1.0), the name of a
    published one (:data:`MAG_RATIOS`: ``"flux"``, ``"wan2.1-t2v-1.3b"``, ``"wan2.1-t2v-14b"``,
    ``"wan2.1-i2v-14b-480p"``, ``"wan2.1-i2v-14b-720p"``, ``"hunyuanvideo-720p"``,
    ``"hunyuanvideo-544p"``), or None until ``ax.calibrate`` records one (a generation without a
    curve raises). A curve of another length is stretched to the step count by nearest index.
    ``num_steps``: the generation's step count; None takes the runtime's
    (``ax.generation(model, num_steps=N)`` or the pipeline's), else the curve's length (warned).
    ``always_compute``: curve indices whose steps always compute (the authors' FLUX script forces
    index 11 of 28). Defaults are diffusers' ``MagCacheConfig``'s.

    >>> policy = MagCache(mag_ratios=(1.0, 1.0, 0.99, 0.98, 0.9, 0.8))
    >>> policy.simulate(6)  # step 0 retained; 1-3 skip (errors 0, 0.01, 0.0398); 4: K reached; 5: 0.2
    [True, False, False, False, True, True]
    """

    threshold: float = 0.06
    max_skip_steps: int = 3
    retention_ratio: float = 0.2
    mag_ratios: Sequence[float] | str | None = None
    num_steps: int | None = None
    always_compute: tuple[int, ...] = ()
    _curve: tuple[float, ...] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not math.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(f"MagCache(threshold={self.threshold!r}): must be a finite number >= 0")
        if isinstance(self.max_skip_steps, bool) or not isinstance(self.max_skip_steps, int) \
                or self.max_skip_steps < 0:
            raise ValueError(f"MagCache(max_skip_steps={self.max_skip_steps!r}): must be an int >= 0")
        if isinstance(self.retention_ratio, bool) or not isinstance(self.retention_ratio, (int, float)) \
                or not 0.0 <= self.retention_ratio <= 1.0:
            raise ValueError(f"MagCache(retention_ratio={self.retention_ratio!r}): must be in [0, 1]")
        if self.num_steps is not None and (isinstance(self.num_steps, bool)
                                           or not isinstance(self.num_steps, int) or self.num_steps < 1):
            raise ValueError(f"MagCache(num_steps={self.num_steps!r}): must be None or an int >= 1")
        try:
            forced = tuple(self.always_compute)
        except TypeError:
            raise ValueError(f"MagCache(always_compute={self.always_compute!r}): expected a tuple of ints") from None
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in forced):
            raise ValueError(f"MagCache(always_compute={self.always_compute!r}): expected curve indices (ints >= 0)")
        object.__setattr__(self, "always_compute", forced)
        curve = resolve_ratios(self.mag_ratios)
        object.__setattr__(self, "_curve", curve)
        if self.mag_ratios is not None and not isinstance(self.mag_ratios, str):
            object.__setattr__(self, "mag_ratios", curve)  # a tuple: the policy owns no caller's list

    # -- presets and copies -------------------------------------------------------------------
    @classmethod
    def preset(cls, model: str, variant: str = "fast", **overrides: Any) -> "MagCache":
        """The authors' published curve and settings for ``model`` (:data:`PRESETS`), ``variant``
        ``"slow"`` or ``"fast"`` where both are published; ``overrides`` replace any setting."""
        name = _PRESETS_BY_KEY.get(_key(model))
        if name is None:
            raise PolicyError(
                f"MagCache.preset({model!r}): no published settings by that name; known: "
                f"{', '.join(sorted(PRESETS))}"
            )
        variants = PRESETS[name]
        if variant not in variants:
            raise PolicyError(
                f"MagCache.preset({model!r}, variant={variant!r}): the authors publish "
                f"{', '.join(sorted(variants))} for this model"
            )
        settings = {"mag_ratios": name, **variants[variant], **overrides}
        return cls(**settings)

    @classmethod
    def slow(cls, model: str) -> "MagCache":
        """The authors' quality-first setting for a published model (:meth:`preset`)."""
        return cls.preset(model, "slow")

    @classmethod
    def fast(cls, model: str) -> "MagCache":
        """The authors' speed-first setting for a published model (:meth:`preset`)."""
        return cls.preset(model, "fast")

    def with_threshold(self, threshold: float) -> "MagCache":
        """A copy with another threshold (for threshold sweeps during calibration)."""
        return dataclasses.replace(self, threshold=threshold)

    def with_ratios(self, mag_ratios: Sequence[float] | str | None) -> "MagCache":
        """A copy with another magnitude-ratio curve (e.g. one recorded by ax.calibrate)."""
        return dataclasses.replace(self, mag_ratios=mag_ratios)

    @property
    def ratios(self) -> tuple[float, ...] | None:
        """The curve as given (before stretching to a step count); None until calibrated."""
        return self._curve

    def new_state(self) -> MagCacheState:
        return MagCacheState()

    # -- pure decision logic, shared by the live path and simulate() ------------------------
    def retention_steps(self, num_steps: int) -> int:
        """Leading steps that always compute: diffusers' ``int(retention_ratio * num_steps + 0.5)``."""
        return int(self.retention_ratio * num_steps + 0.5)

    def curve_for(self, num_steps: int) -> tuple[float, ...]:
        """The curve stretched to ``num_steps`` (as given when the lengths match)."""
        curve = self._require_curve()
        return curve if len(curve) == num_steps else nearest_interp(curve, num_steps)

    def advance(
        self, state: tuple[float, int, float], step: int, num_steps: int, curve: Sequence[float],
        has_cache: bool = True,
    ) -> tuple[bool, tuple[float, int, float]]:
        """One step of the rule: ``(compute, (ratio, steps, error))`` from the accumulators.

        ``curve``: the curve stretched to ``num_steps`` (:meth:`curve_for`); a step past its end
        has ratio 1.0. ``has_cache``: some step has computed (a first step never skips).
        """
        ratio, steps, error = state
        if step < self.retention_steps(num_steps):
            return True, state
        ratio *= curve[step] if step < len(curve) else 1.0
        steps += 1
        error += abs(1.0 - ratio)
        forced = bool(self.always_compute) and curve_index(
            step, len(self._require_curve()), num_steps) in self.always_compute
        if has_cache and not forced and error <= self.threshold and steps <= self.max_skip_steps:
            return False, (ratio, steps, error)
        return True, (1.0, 0, 0.0)

    def simulate(self, num_steps: int) -> list[bool]:
        """Compute flags of a ``num_steps``-step generation (the schedule is data-independent):
        the same :meth:`advance` a live generation runs."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"MagCache.simulate: num_steps must be an int >= 1, got {num_steps!r}")
        curve = self.curve_for(num_steps)
        state, flags, computed = (1.0, 0, 0.0), [], False
        for step in range(num_steps):
            compute, state = self.advance(state, step, num_steps, curve, has_cache=computed)
            computed = computed or compute
            flags.append(compute)
        return flags

    def _require_curve(self) -> tuple[float, ...]:
        if self._curve is None:
            raise PolicyError(
                "MagCache needs the model's magnitude-ratio curve: pass mag_ratios=<one ratio per "
                f"step> or a published one ({', '.join(sorted(MAG_RATIOS))}), or record one with "
                "ax.calibrate(model, MagCache(), run, target=...)"
            )
        return self._curve

    # -- live path ------------------------------------------------------------------------------
    def folds(self) -> bool:
        return True  # a step reuses every branch of every block, or computes

    def _steps(self, ctx: StepContext, state: MagCacheState) -> int:
        if self.num_steps is not None:
            return self.num_steps
        if ctx.num_steps is not None:
            return ctx.num_steps
        curve = self._require_curve()
        if not state.warned:
            state.warned = True
            warnings.warn(
                f"MagCache: the step count is unknown (no ax.generation(model, num_steps=N), no "
                f"pipeline); assuming the curve's {len(curve)} steps. Pass MagCache(num_steps=N).",
                stacklevel=3,
            )
        return len(curve)

    def plan(self, ctx: StepContext, state: MagCacheState) -> Plan:
        num_steps = self._steps(ctx, state)
        if state.curve is None or state.curve[0] != num_steps:
            state.curve = (num_steps, self.curve_for(num_steps))
        accumulators = (state.accumulated_ratio, state.accumulated_steps, state.accumulated_error)
        compute, accumulators = self.advance(accumulators, ctx.step, num_steps, state.curve[1],
                                             has_cache=state.computed)
        state.accumulated_ratio, state.accumulated_steps, state.accumulated_error = accumulators
        state.computed = state.computed or compute
        state.trace.append((ctx.step, compute, state.accumulated_error))
        if compute or not ctx.branches:
            return Plan.compute_all()
        return whole_step_reuse(self, ctx.branches, state)
