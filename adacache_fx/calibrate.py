"""Fit a policy's thresholds to a requested compute fraction on the user's own model and inputs.

Every peer tool leaves AdaCache codebooks, TeaCache coefficients and First-Block-Cache thresholds to
hand tuning. :func:`calibrate` runs a few uncached generations of *your* model, records the signal the
policy decides from (the metric branch's residuals, the modulated input, the first blocks' residual,
the model's input latent and output) and fits the policy's one threshold knob so that its decisions,
replayed on those recordings, reach the requested fraction of branch executions computed. TeaCache's
rescaling polynomial is fitted too, from the recorded pairs (modulated-input change, model-output
change), as the TeaCache authors do offline; MagCache's magnitude-ratio curve is recorded from the
whole model's residual (output minus input latent), as its authors calibrate it from one run.

The replay assumes the trajectory does not change when steps are reused; it does a little, which is why
the fitted knob sits in the middle of the range of values that give the closest fraction.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from tqdm.auto import tqdm

from .api import generation, get_runtime, is_transformed, report, restore, transform
from .errors import PolicyError
from .policies.adacache import AdaCache
from .policies.base import BranchInfo, InStepDecider, InStepSignal, Observer, Plan, Policy, StepContext
from .policies.easycache import EasyCache
from .policies.first_block import FirstBlockCache
from .policies.magcache import MagCache, magnitude_ratios, model_residual, nearest_interp
from .policies.teacache import TeaCache, relative_l1
from .runtime.captures import CaptureCache

logger = logging.getLogger("adacache_fx")

CALIBRATABLE = (AdaCache, TeaCache, FirstBlockCache, MagCache, EasyCache)
#: Policies that decide from the model's input latent and output (recorded per step).
_LATENT_POLICIES = (MagCache, EasyCache)


@dataclass
class Calibration:
    """The fitted policy and how it was fitted."""

    policy: Policy
    target: float
    predicted_compute_fraction: float  # on the recorded runs, by replay
    knob: str
    value: float
    runs: int
    steps_per_run: list[int]
    coefficients: tuple[float, ...] | None = None  # TeaCache's fitted rescaling polynomial
    mag_ratios: tuple[float, ...] | None = None  # MagCache's recorded magnitude-ratio curve
    curve: list[tuple[float, float]] = field(default_factory=list, repr=False)  # (knob, replayed fraction)
    # (knob, compute fraction measured by running the model with it) for each refinement round
    measured: list[tuple[float, float]] = field(default_factory=list)

    @property
    def measured_compute_fraction(self) -> float | None:
        """Measured on the calibration inputs with the returned policy (None without refinement)."""
        return next((f for v, f in self.measured if v == self.value), None)

    def __str__(self) -> str:
        lines = [
            f"calibrated {type(self.policy).__name__}: {self.knob} = {self.value:.6g}",
            f"  target compute fraction {self.target:.3f}, predicted {self.predicted_compute_fraction:.3f}"
            f" (replay of {self.runs} recorded run(s), steps {self.steps_per_run})",
        ]
        if self.measured:
            rounds = ", ".join(f"{v:.4g} -> {f:.3f}" for v, f in self.measured)
            lines.append(f"  measured by running the model ({self.knob} -> compute fraction): {rounds}")
        if self.coefficients is not None:
            lines.append("  fitted rescale coefficients: [" + ", ".join(f"{c:.6g}" for c in self.coefficients) + "]")
        if self.mag_ratios is not None:
            lines.append("  recorded magnitude ratios: [" + ", ".join(f"{r:.5f}" for r in self.mag_ratios) + "]")
        return "\n".join(lines)


@dataclass
class _Recording:
    """What the calibration runs recorded: generation -> step -> value (slot 0's call only)."""

    frames: int | None = None  # the model's latent frames, for MoReg in the replay
    residuals: dict[int, dict[int, tuple[torch.Tensor, ...]]] = field(default_factory=dict)
    signals: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)
    # The input latent of each step's first call (MagCache, EasyCache); outputs come from a hook.
    latents: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)


@dataclass
class _RecorderState:
    target: Any  # the target policy's state (its layout tells which branches it watches)
    ready: bool = False  # the model's branches are known


@dataclass(frozen=True)
class _Recorder(Policy):
    """Computes everything and records, into ``recording``, the signals ``target`` decides from."""

    target: Policy
    recording: _Recording = field(default_factory=_Recording, compare=False)

    def new_state(self) -> _RecorderState:
        return _RecorderState(self.target.new_state())

    def validate(self, branches: tuple[BranchInfo, ...]) -> None:
        self.target.validate(branches)

    def caches(self, branch: BranchInfo, state: _RecorderState | None = None) -> bool:
        # Keep residuals so that step 1 sees step 0's as ``previous`` (the target can say which
        # branches it watches only once the branches are known). Nothing is ever reused.
        return state is None or not state.ready or self.watches(branch, state)

    def watches(self, branch: BranchInfo, state: _RecorderState) -> bool:
        return (state is not None and state.ready and isinstance(self.target, Observer)
                and self.target.watches(branch, state.target))

    def in_step_signal(self) -> InStepSignal | None:
        return self.target.in_step_signal() if isinstance(self.target, InStepDecider) else None

    def plan(self, ctx: StepContext, state: _RecorderState) -> Plan:
        if isinstance(self.target, _LATENT_POLICIES):
            # They decide from the input latent (and the output, which calibrate's hook records);
            # their plan() needs what is being recorded (MagCache's curve), so it is not run here.
            if ctx.latent is not None:
                self.recording.latents.setdefault(ctx.generation, {})[ctx.step] = ctx.latent.detach().float().cpu()
            state.ready = bool(ctx.branches)
            return Plan.compute_all()
        if ctx.branches:
            self.target.plan(ctx, state.target)  # for what it derives from the branches (AdaCache's layout)
            state.ready = True
        return Plan.compute_all()

    def observe(self, ctx, state, branch, new, previous) -> None:
        # Per-layer AdaCache watches more branches; the replay models the global schedule only.
        if branch.id not in getattr(state.target, "metric_branches", frozenset((branch.id,))):
            return
        self.recording.frames = ctx.frames
        steps = self.recording.residuals.setdefault(ctx.generation, {})
        if previous is not None and ctx.step - 1 not in steps:
            steps[ctx.step - 1] = tuple(t.float().cpu() for t in previous)
        steps.setdefault(ctx.step, tuple(t.float().cpu() for t in new))

    def decide(self, ctx: StepContext, state: _RecorderState, slot: int, signal: torch.Tensor) -> Plan:
        if slot == 0:
            self.recording.signals.setdefault(ctx.generation, {})[ctx.step] = signal.detach().float().cpu()
        return Plan.compute_all()


def _first_tensor(output: Any) -> torch.Tensor | None:
    return next((t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)), None)


def _fraction_curve(
    flags_for: Callable[[float], list[list[bool]]],
    reuse_share: float,
    lo: float,
    hi: float,
    points: int,
) -> list[tuple[float, float]]:
    """(knob, compute fraction) on a log grid; a reuse step skips ``reuse_share`` of executions."""
    curve = []
    for value in np.geomspace(lo, hi, points):
        runs = flags_for(float(value))
        steps = sum(len(f) for f in runs)
        reused = sum(1 for f in runs for computed in f if not computed)
        curve.append((float(value), 1.0 - reuse_share * reused / steps))
    return curve


def _pick(curve: list[tuple[float, float]], target: float) -> tuple[float, float]:
    """The knob in the middle (log scale) of the values whose fraction is closest to the target.

    A range that runs to the end of the searched grid is open-ended (e.g. the fraction floor set by
    the largest rate of a codebook): then stay within a factor 4 of its inner end.
    """
    best = min(abs(f - target) for _, f in curve)
    close = [(v, f) for v, f in curve if abs(f - target) <= best + 1e-9]
    low, high = close[0][0], close[-1][0]
    middle = math.exp((math.log(low) + math.log(high)) / 2)
    if high >= curve[-1][0] and low > curve[0][0]:
        middle = min(middle, low * 4)
    elif low <= curve[0][0] and high < curve[-1][0]:
        middle = max(middle, high / 4)
    nearest = min(close, key=lambda vf: abs(math.log(vf[0]) - math.log(middle)))
    if best > 0.05:
        logger.warning(
            "adacache_fx: calibrate: the closest compute fraction this policy reaches is %.3f "
            "(target %.3f); its fixed settings (codebook rates, first blocks) limit it", nearest[1], target,
        )
    return middle, nearest[1]


def calibrate(
    model: nn.Module,
    policy: AdaCache | TeaCache | FirstBlockCache | MagCache | EasyCache,
    run: Callable[[nn.Module, int], Any],
    *,
    target: float,
    runs: int = 2,
    fit_coefficients: bool | None = None,
    refine: int = 2,
    points: int = 160,
    progress: bool = True,
) -> Calibration:
    """Fit ``policy``'s threshold so that it computes ``target`` of its branch executions.

    Args:
        model: the untransformed model (e.g. ``pipe.transformer``); it is transformed with a recording
            policy for the runs and restored afterwards.
        policy: the policy to fit, with every other setting as you want it (``AdaCache.fast(30)``,
            ``TeaCache()``, ``FirstBlockCache(blocks=1)``, ``MagCache()``, ``EasyCache()``); its
            thresholds are the starting point.
        run: ``run(model, i)`` performs one whole generation with your inputs number ``i`` (e.g. calls
            your pipeline with seed ``i``). Use the step count you will use in production.
        target: requested fraction of branch executions computed, in (0, 1].
        runs: how many generations to record.
        fit_coefficients: TeaCache: fit the rescaling polynomial (default: when the policy has no
            coefficients). MagCache: record the magnitude-ratio curve from the runs (default: when the
            policy has none). Ignored by the other policies.
        refine: rounds of checking the fit by running the model with it (``runs`` generations each)
            and correcting the knob by the gap between measured and replayed fraction (reusing
            moves the trajectory, which the replay cannot see). 0: replay only.
        points: grid size of the knob search.

    Returns:
        :class:`Calibration` with the fitted ``policy`` (a copy) and the predicted compute fraction.
    """
    if not isinstance(policy, CALIBRATABLE):
        raise PolicyError(
            f"calibrate() fits AdaCache, TeaCache and FirstBlockCache, and MagCache and EasyCache; "
            f"got {type(policy).__name__}"
        )
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target compute fraction must be in (0, 1], got {target}")
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if refine < 0:
        raise ValueError(f"refine must be >= 0, got {refine}")
    if is_transformed(model):
        raise PolicyError("calibrate() needs the untransformed model: call adacache_fx.restore(model) first")

    recorder = _Recorder(policy)
    outputs: dict[int, dict[int, torch.Tensor]] = {}
    captures = CaptureCache()  # the recording's captures serve the refinement's runs
    transform(model, recorder, captures=captures)
    runtime = get_runtime(model)

    def keep_output(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        record = runtime.session().record
        tensor = _first_tensor(output)
        if record is not None and tensor is not None and record.calls == 1:
            outputs.setdefault(record.generation, {})[record.step] = tensor.detach().float().cpu()

    hook = model.register_forward_hook(keep_output, with_kwargs=True)
    try:
        with torch.no_grad():
            for i in tqdm(range(runs), desc="calibration runs", disable=not progress):
                with generation(model):
                    run(model, i)
        branches = runtime.branch_tuple
    finally:
        hook.remove()
        restore(model)

    if isinstance(policy, AdaCache):
        fitted = _fit_adacache(policy, recorder.recording, branches, target, points)
        with_knob = policy.with_threshold_scale  # scales the thresholds the user gave
    elif isinstance(policy, TeaCache):
        fitted = _fit_teacache(policy, recorder.recording, outputs, target, points, fit_coefficients)
        with_knob = fitted.policy.with_delta  # keeps the fitted coefficients
    elif isinstance(policy, MagCache):
        fitted = _fit_magcache(policy, recorder.recording, outputs, target, points, fit_coefficients)
        with_knob = fitted.policy.with_threshold  # keeps the recorded curve
    elif isinstance(policy, EasyCache):
        fitted = _fit_easycache(policy, recorder.recording, outputs, target, points)
        with_knob = fitted.policy.with_threshold
    else:
        fitted = _fit_first_block(policy, recorder.recording, branches, target, points)
        with_knob = fitted.policy.with_threshold
    if refine:
        _refine(fitted, with_knob, model, run, refine, progress, captures)
    return fitted


def _measure(model: nn.Module, policy: Policy, run, steps_per_run: list[int], progress: bool,
             captures: CaptureCache | None = None) -> float:
    """Compute fraction of ``policy`` over the calibration runs, by running the model with it."""
    transform(model, policy, captures=captures)
    try:
        with torch.no_grad():
            for i in tqdm(range(len(steps_per_run)), desc="calibration check", disable=not progress):
                with generation(model, num_steps=steps_per_run[i]):
                    run(model, i)
        fraction = report(model).compute_fraction
    finally:
        restore(model)
    return 1.0 if fraction is None else fraction


def _refine(fitted: Calibration, with_knob, model, run, rounds: int, progress: bool,
            captures: CaptureCache | None = None) -> None:
    """Correct the knob by the measured-minus-replayed gap; keep the best measured value."""
    replayed = dict(fitted.curve)
    value = fitted.value
    for _ in range(rounds):
        measured = _measure(model, with_knob(value), run, fitted.steps_per_run, progress, captures)
        fitted.measured.append((value, measured))
        if abs(measured - fitted.target) <= 0.02 * fitted.target:
            break
        predicted = replayed.get(value)
        if predicted is None:
            predicted = min(fitted.curve, key=lambda vf: abs(math.log(vf[0]) - math.log(value)))[1]
        corrected_target = min(1.0, max(0.0, fitted.target - (measured - predicted)))
        new_value, _ = _pick(fitted.curve, corrected_target)
        if any(abs(math.log(new_value) - math.log(v)) < 1e-9 for v, _ in fitted.measured):
            break
        value = new_value
    best_value, _ = min(fitted.measured, key=lambda vf: abs(vf[1] - fitted.target))
    fitted.value = best_value
    fitted.policy = with_knob(best_value)


def _steps(record: dict[int, Any]) -> list[Any]:
    return [record[s] for s in sorted(record)]


def _fit_adacache(policy: AdaCache, recorder: _Recording, branches, target: float, points: int) -> Calibration:
    sequences = [_steps(r) for r in recorder.residuals.values() if r]
    if not sequences:
        raise PolicyError("calibrate(): the AdaCache metric branch never computed during the runs")
    frames = getattr(getattr(policy, "moreg", None), "frames", None) or recorder.frames

    def flags_for(scale: float) -> list[list[bool]]:
        candidate = policy.with_threshold_scale(scale)
        return [candidate.simulate(seq, num_steps=len(seq), frames=frames) for seq in sequences]

    curve = _fraction_curve(flags_for, 1.0, 1e-4, 1e4, points)
    scale, predicted = _pick(curve, target)
    return Calibration(
        policy.with_threshold_scale(scale), target, predicted, "codebook threshold scale", scale,
        len(sequences), [len(s) for s in sequences], curve=curve,
    )


def _indicators(signals: Sequence[torch.Tensor]) -> list[float]:
    return [0.0] + [relative_l1(signals[i], signals[i - 1]) for i in range(1, len(signals))]


def _fit_teacache(
    policy: TeaCache,
    recorder: _Recording,
    outputs: dict[int, dict[int, torch.Tensor]],
    target: float,
    points: int,
    fit_coefficients: bool | None,
) -> Calibration:
    runs = [(g, _steps(s)) for g, s in recorder.signals.items() if len(s) > 1]
    if not runs:
        raise PolicyError("calibrate(): TeaCache needs runs of at least 2 steps")
    indicators = [_indicators(signals) for _, signals in runs]
    if fit_coefficients is None:
        fit_coefficients = policy.coefficients is None
    coefficients = None
    if fit_coefficients:
        xs, ys = [], []
        for (gen, _), ind in zip(runs, indicators):
            outs = _steps(outputs.get(gen, {}))
            for i in range(1, min(len(outs), len(ind))):
                xs.append(ind[i])
                ys.append(relative_l1(outs[i], outs[i - 1]))
        if len(xs) < 5:
            raise PolicyError(f"calibrate(): {len(xs)} step pairs are too few to fit TeaCache's 4th-order polynomial")
        coefficients = tuple(float(c) for c in np.polyfit(xs, ys, 4))
        policy = policy.with_coefficients(coefficients)

    def flags_for(delta: float) -> list[list[bool]]:
        candidate = policy.with_delta(delta)
        return [candidate.simulate(ind, num_steps=len(ind)) for ind in indicators]

    curve = _fraction_curve(flags_for, 1.0, 1e-6, 1e3, points)
    delta, predicted = _pick(curve, target)
    return Calibration(
        policy.with_delta(delta), target, predicted, "delta", delta, len(runs),
        [len(i) for i in indicators], coefficients=coefficients, curve=curve,
    )


def _fit_first_block(
    policy: FirstBlockCache, recorder: _Recording, branches, target: float, points: int
) -> Calibration:
    runs = [_steps(s) for s in recorder.signals.values() if s]
    if not runs:
        raise PolicyError("calibrate(): no first-block residual was recorded")
    depths = sorted({b.depth for b in branches})
    last = len(depths) - policy.tail_blocks
    reusable = sum(1 for b in branches if policy.blocks <= b.depth < last)
    share = reusable / len(branches) if branches else 0.0

    def flags_for(threshold: float) -> list[list[bool]]:
        candidate = policy.with_threshold(threshold)
        return [candidate.simulate(seq, num_steps=len(seq)) for seq in runs]

    curve = _fraction_curve(flags_for, share, 1e-6, 1e2, points)
    threshold, predicted = _pick(curve, target)
    if target < 1.0 - share - 1e-9:
        logger.warning(
            "adacache_fx: FirstBlockCache computes its first %d block(s) every step: it cannot go "
            "below a compute fraction of %.3f", policy.blocks, 1.0 - share,
        )
    return Calibration(
        policy.with_threshold(threshold), target, predicted, "threshold", threshold, len(runs),
        [len(r) for r in runs], curve=curve,
    )


def _latent_runs(recorder: _Recording, outputs: dict[int, dict[int, torch.Tensor]], owner: str
                 ) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """(latents, outputs) per recorded generation, over the steps that have both."""
    runs = []
    for gen, latents in recorder.latents.items():
        outs = outputs.get(gen, {})
        steps = sorted(s for s in latents if s in outs)
        if len(steps) > 1 and steps == list(range(len(steps))):
            runs.append(([latents[s] for s in steps], [outs[s] for s in steps]))
    if not runs:
        raise PolicyError(
            f"calibrate(): {owner} needs the model's input latent and output of every step; no run of "
            "at least 2 steps recorded both (does the model take its latent as hidden_states or its "
            "first argument?)"
        )
    return runs


def _fit_magcache(
    policy: MagCache,
    recorder: _Recording,
    outputs: dict[int, dict[int, torch.Tensor]],
    target: float,
    points: int,
    fit_curve: bool | None,
) -> Calibration:
    runs = _latent_runs(recorder, outputs, "MagCache")
    lengths = [len(latents) for latents, _ in runs]
    if fit_curve is None:
        fit_curve = policy.ratios is None
    curve = None
    if fit_curve:
        # One curve per run (the authors calibrate from a single sample); runs of other lengths are
        # stretched to the most common length, then averaged step by step.
        length = max(set(lengths), key=lengths.count)
        curves = []
        for latents, outs in runs:
            ratios = magnitude_ratios([model_residual(x, o) for x, o in zip(latents, outs)])
            curves.append(ratios if len(ratios) == length else nearest_interp(ratios, length))
        curve = tuple(float(np.mean([c[i] for c in curves])) for i in range(length))
        policy = policy.with_ratios(curve)
    elif policy.ratios is None:
        raise PolicyError("calibrate(MagCache, fit_coefficients=False): the policy has no curve to keep")

    def flags_for(threshold: float) -> list[list[bool]]:
        candidate = policy.with_threshold(threshold)
        return [candidate.simulate(policy.num_steps or n) for n in lengths]

    curve_points = _fraction_curve(flags_for, 1.0, 1e-6, 1e2, points)
    threshold, predicted = _pick(curve_points, target)
    return Calibration(
        policy.with_threshold(threshold), target, predicted, "threshold", threshold, len(runs),
        lengths, curve=curve_points, mag_ratios=curve,
    )


def _fit_easycache(
    policy: EasyCache,
    recorder: _Recording,
    outputs: dict[int, dict[int, torch.Tensor]],
    target: float,
    points: int,
) -> Calibration:
    runs = _latent_runs(recorder, outputs, "EasyCache")

    def flags_for(threshold: float) -> list[list[bool]]:
        candidate = policy.with_threshold(threshold)
        return [candidate.simulate(latents, outs) for latents, outs in runs]

    curve_points = _fraction_curve(flags_for, 1.0, 1e-6, 1e2, points)
    threshold, predicted = _pick(curve_points, target)
    return Calibration(
        policy.with_threshold(threshold), target, predicted, "threshold", threshold, len(runs),
        [len(latents) for latents, _ in runs], curve=curve_points,
    )
