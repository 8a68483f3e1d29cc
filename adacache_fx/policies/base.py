"""The policy interface: what a policy sees each step, and the plan it returns.

A policy never touches graphs. It is told which residual branches exist (:class:`BranchInfo`), is
asked at the start of every denoising step for a :class:`Plan` (which branches reuse their cached
residual this step, and which recompute only some of their tokens), and may implement small
capability protocols (:class:`Observer`, :class:`Forecaster`, :class:`InStepDecider`,
:class:`InGraphDecider`, :class:`GuidanceCacher`). Settings (the policy, a frozen dataclass) are
kept apart from what a generation learns (the object :meth:`Policy.new_state` returns).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Protocol, runtime_checkable

import torch

from ..errors import PolicyError
from ..kinds import KINDS


@dataclass(frozen=True)
class BranchInfo:
    """One cacheable residual branch of one block."""

    id: str  # "transformer_blocks.3.attn1": block path + region name
    block: str  # "transformer_blocks.3"
    block_list: str  # "transformer_blocks"
    block_index: int  # index inside its list
    depth: int  # order in which the block first ran in a model call (0 = first block)
    name: str  # region name inside the block ("attn1", "ff", "attn+proj_mlp"...)
    kind: str  # one of KINDS
    tags: frozenset[str]  # every kind the region contains (a Flux single block: joint_attention + mlp)
    flops: int | None  # FLOPs of one call of the branch at the captured shape
    num_residuals: int  # residual tensors the branch adds (2 for a joint branch updating two streams)
    # Token count N of the branch value ``[batch, N, ...]`` when the branch can be recomputed for a
    # subset of its tokens (:attr:`Plan.partial`); None when that is not valid for it (its ops mix
    # tokens, or it updates several streams): such a branch computes fully when a plan asks for it.
    tokens: int | None = None
    # Blocks a model call runs (the transformed block lists' length), known from the first call on,
    # before every branch has been seen: where the middle block is.
    blocks: int | None = None
    # A block of a deeper list outside the main ones (HunyuanVideo's token refiner): its depth comes
    # after every main block's, and ``blocks`` counts the main blocks only.
    auxiliary: bool = False

    @property
    def partial(self) -> bool:
        """Whether :attr:`Plan.partial` can recompute this branch for a subset of its tokens."""
        return self.tokens is not None


class MetricGroup:
    """The processes whose shards of the tokens make up one model call, as a policy's metrics see them.

    Under context parallelism each rank holds a slice of the sequence; a metric taken on one slice is
    not the model's, and ranks that decide differently skip different collectives (a hang). Policies
    therefore sum a metric's numerator and denominator terms over the group *before* the ratio, in
    one small collective per decision: ``num, den = ctx.group.sum(num, den)``. This base class is the
    single process (the default); the runtime passes one for the model's process group.

        >>> a, b = torch.ones(4), torch.zeros(4)
        >>> num, den = LOCAL.sum((a - b).abs().sum(), a.abs().sum())
        >>> float(num / den)
        1.0
    """

    world_size: int = 1
    description: str = "single process"

    def sum(self, *terms: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each 0-d tensor summed over the group (one collective for all of them)."""
        return terms

    def mean(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each tensor's mean over all ranks' elements, as float32 0-d tensors."""
        if self.world_size == 1:
            return tuple(t.float().mean() for t in tensors)
        sums = self.sum(*(t.float().sum() for t in tensors),
                        *(torch.tensor(float(t.numel()), device=t.device) for t in tensors))
        n = len(tensors)
        return tuple(sums[i] / sums[n + i].clamp_min(1.0) for i in range(n))

    def gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """The whole tensor from the ranks' slices along ``dim`` (the token axis), in rank order."""
        return tensor


#: One process: metrics are the shard's own, which is the model's.
LOCAL = MetricGroup()


@dataclass(frozen=True)
class StepContext:
    """What a policy knows when planning one denoising step."""

    step: int  # 0-based step index inside the current generation
    num_steps: int | None  # total steps when known (ax.generation(num_steps=...)), else None
    timestep: float | None  # the model's timestep argument for this step
    generation: int  # 0-based count of generations since transform / reset
    branches: tuple[BranchInfo, ...]  # empty before the first call has captured the blocks
    # Latent frames per sample after patching, for video models (derived from the model's input
    # shape and config; None for image models or when it cannot be derived). MoReg needs it.
    frames: int | None = None
    # The latent this step's first call denoises (the model's ``hidden_states`` or first tensor
    # argument, as the caller passed it), for policies that decide from the input's change
    # (EasyCache); None when the runtime has none (exported runners).
    latent: torch.Tensor | None = field(default=None, compare=False, repr=False)
    # Sums a metric's terms over the ranks of a context-parallel model (see MetricGroup); LOCAL else.
    group: MetricGroup = field(default=LOCAL, compare=False, repr=False)

    def is_last(self, count: int) -> bool:
        """True inside the last ``count`` steps (False when the step count is unknown)."""
        return self.num_steps is not None and self.step >= self.num_steps - count


@dataclass(frozen=True)
class Plan:
    """Which branches reuse their cached residual this step; every other branch computes.

    ``reuse``: branch ids that add their cached residual without running.

    ``partial``: branch id -> token indices (1-D integer tensor, each in ``0..N-1`` for the branch's
    ``BranchInfo.tokens == N``). The branch runs for those tokens only, the same indices for every
    batch row (cond and uncond halves alike), and the result is scattered into its cached residual,
    which then holds fresh values at those tokens and older ones elsewhere. Empty indices: reuse.
    Only for branches with ``BranchInfo.partial``; on any other branch the runtime computes it fully
    (and warns once), which is exact but saves nothing.

    A branch listed in either that has no cache yet (first step, new input shape) computes instead;
    the report counts what actually ran. ``partial`` takes no part in equality or hashing.

    ``skip_uncond``: for a batched classifier-free-guidance call (cond and uncond halves in one batch
    laid out as :meth:`Policy.guidance_layout` says), run the model on the conditional half only and
    let the policy rebuild the unconditional output (:meth:`Policy.rebuild_uncond`; FasterCache's
    CFG-Cache). Blocks then see the conditional rows of their caches, and what they store updates
    those rows only.
    """

    reuse: frozenset[str] = frozenset()
    partial: Mapping[str, torch.Tensor] = field(default_factory=dict, compare=False, hash=False)
    skip_uncond: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.reuse, frozenset):  # a list or set from a policy: the runtime tests subsets
            object.__setattr__(self, "reuse", frozenset(self.reuse))
        if not self.partial:
            return
        both = sorted(set(self.partial) & set(self.reuse))
        if both:
            raise PolicyError(f"Plan: branch(es) {both} are both reused and partially recomputed; pick one")
        for branch_id, tokens in self.partial.items():
            if not isinstance(tokens, torch.Tensor) or tokens.ndim != 1 or tokens.is_floating_point():
                raise PolicyError(
                    f"Plan.partial[{branch_id!r}]: expected a 1-D integer tensor of token indices, "
                    f"got {tokens!r}"
                )
        object.__setattr__(self, "partial", MappingProxyType(dict(self.partial)))

    @classmethod
    def compute_all(cls) -> "Plan":
        return _COMPUTE_ALL

    @classmethod
    def reuse_only(cls, branch_ids: Iterable[str]) -> "Plan":
        return cls(frozenset(branch_ids))


_COMPUTE_ALL = Plan()


#: Signals a policy can read inside a step (see :class:`InStepSignal`).
SIGNAL_KINDS = ("modulated_input", "first_blocks_residual")
#: Orders of the two halves of a batched classifier-free-guidance call (:meth:`Policy.guidance_layout`).
GUIDANCE_LAYOUTS = ("uncond_first", "cond_first")


@dataclass(frozen=True)
class InStepSignal:
    """A value read inside each model call, after which :meth:`Policy.decide` plans the rest of it.

    * ``"modulated_input"``: the first block's normalised, timestep-modulated input to its first
      branch (TeaCache's indicator), computed before that block runs; the decision covers every
      block, the first included.
    * ``"first_blocks_residual"``: the main stream's change over the first ``blocks`` blocks
      (output of block ``blocks - 1`` minus input of block 0; First-Block-Cache). Those blocks
      compute; the decision covers the blocks after them.
    """

    kind: str
    blocks: int = 1

    def __post_init__(self) -> None:
        if self.kind not in SIGNAL_KINDS:
            raise PolicyError(f"unknown in-step signal {self.kind!r}; valid: {', '.join(SIGNAL_KINDS)}")
        if self.blocks < 1:
            raise PolicyError(f"InStepSignal(blocks={self.blocks}): must be >= 1")


class Policy:
    """Base class of caching policies: settings only.

    Every subclass is a frozen dataclass of its settings, safe to share between models, threads and
    generations. What a policy learns while a generation runs lives in a state object it creates
    (:meth:`new_state`); the runtime makes a fresh one at the start of every generation (per thread)
    and hands it back to every call, as diffusers' hooks get theirs from a ``StateManager``::

        @dataclasses.dataclass(frozen=True)
        class EveryOther(Policy):
            def plan(self, ctx, state):
                return Plan.compute_all() if ctx.step % 2 == 0 else Plan.reuse_only(b.id for b in ctx.branches)

    A policy never touches graphs. Optional capabilities are small protocols, each a few methods a
    policy defines when it needs them: :class:`Observer` (read computed residuals),
    :class:`Forecaster` (extrapolate reused ones), :class:`InStepDecider` (decide inside a step from
    a signal of that step), :class:`InGraphDecider` (that decision as tensor operations, for
    one-graph compiles) and :class:`GuidanceCacher` (rebuild the unconditional half of guidance).
    """

    def new_state(self) -> Any:
        """A fresh per-generation state (None: the policy keeps none)."""
        return None

    def validate(self, branches: tuple[BranchInfo, ...]) -> None:
        """Raise :class:`PolicyError` when the model's branches cannot serve these settings (called
        once the branches are known, so a typo fails at the first call, not silently later)."""

    def caches(self, branch: BranchInfo, state: Any = None) -> bool:
        """Whether this branch's residual is stored when it computes (``state``: this generation's)."""
        return True

    def plan(self, ctx: StepContext, state: Any) -> Plan:
        """Which branches reuse this step, decided before the step runs."""
        raise NotImplementedError(f"{type(self).__name__} has no plan()")

    def folds(self) -> bool:
        """True when every plan reuses all cached branches of a block together, adds them as they
        were stored (no forecast, no token subset) and caches every branch of the blocks it reuses:
        the runtime may then keep one residual per stream for a span of such blocks instead of one
        per branch (``transform(..., fold=True)``, see ``passes/fold.py``)."""
        return False


class OnBaseSchedule(Policy):
    """A forecasting policy on another policy's schedule (TaylorSeer, FoCa): which steps and branches
    compute, the state, the observations and in-step decisions are all ``self.base``'s; a subclass
    only says what a reused branch adds (``history`` and ``forecast``)."""

    base: Policy

    def _check_base(self) -> None:
        if not isinstance(self.base, Policy):
            raise TypeError(f"{type(self).__name__}(base=...) must be a policy, got {self.base!r}")

    def new_state(self) -> Any:
        return self.base.new_state()

    def validate(self, branches: tuple[BranchInfo, ...]) -> None:
        self.base.validate(branches)

    def caches(self, branch: BranchInfo, state: Any = None) -> bool:
        return self.base.caches(branch, state)

    def watches(self, branch: BranchInfo, state: Any) -> bool:
        return isinstance(self.base, Observer) and self.base.watches(branch, state)

    def observe(self, ctx: StepContext, state: Any, branch: BranchInfo, new: tuple[torch.Tensor, ...],
                previous: tuple[torch.Tensor, ...] | None) -> None:
        if isinstance(self.base, Observer):
            self.base.observe(ctx, state, branch, new, previous)

    def plan(self, ctx: StepContext, state: Any) -> Plan:
        return self.base.plan(ctx, state)

    def in_step_signal(self) -> "InStepSignal | None":
        return self.base.in_step_signal() if isinstance(self.base, InStepDecider) else None

    def decide(self, ctx: StepContext, state: Any, slot: int, signal: torch.Tensor) -> Plan:
        return self.base.decide(ctx, state, slot, signal)


def whole_step_reuse(policy: Policy, branches: tuple[BranchInfo, ...], state: Any) -> Plan:
    """The plan reusing every branch ``policy`` caches, memoised on ``state.reuse_for`` per branch tuple
    (whole-step policies: EasyCache, MagCache)."""
    memo = state.reuse_for
    if memo is not None and memo[0] is branches:
        return memo[1]
    plan = Plan.reuse_only(b.id for b in branches if policy.caches(b, state))
    state.reuse_for = (branches, plan)
    return plan


@runtime_checkable
class Observer(Protocol):
    """Reads the residuals of chosen branches each time they compute (AdaCache's metric, token scores)."""

    def watches(self, branch: BranchInfo, state: Any) -> bool:
        """Whether :meth:`observe` is called when this branch computes."""

    def observe(self, ctx: StepContext, state: Any, branch: BranchInfo,
                new: tuple[torch.Tensor, ...], previous: tuple[torch.Tensor, ...] | None) -> None:
        """A watched branch computed: ``new`` residuals, and the ones it replaces (None at first)."""


@runtime_checkable
class OutputObserver(Protocol):
    """Sees each model call's output (the first tensor of it), e.g. to estimate how fast the model's
    output moves against its input (EasyCache), or the whole model's residual (MagCache)."""

    def observe_output(self, ctx: StepContext, state: Any, slot: int, output: torch.Tensor) -> None:
        """A model call of step ``ctx.step`` (call slot ``slot``) returned ``output``."""


@runtime_checkable
class Forecaster(Protocol):
    """Adds an extrapolation instead of the last residual when a branch is reused (TaylorSeer)."""

    def history(self, branch: BranchInfo) -> int:
        """How many computed residuals of ``branch`` :meth:`forecast` needs (1: the last only)."""

    def forecast(self, ctx: StepContext, state: Any, branch: BranchInfo,
                 history: list[tuple[int, tuple[torch.Tensor, ...]]]) -> tuple[torch.Tensor, ...] | None:
        """What a reused branch adds, from its computed ``(step, residuals)`` history (oldest first);
        None: the last computed residuals as they are."""


@runtime_checkable
class InStepDecider(Protocol):
    """Decides inside each model call from a value read during it (TeaCache, First-Block-Cache)."""

    def in_step_signal(self) -> "InStepSignal | None":
        """The signal :meth:`decide` needs (None: this policy decides before the step after all)."""

    def decide(self, ctx: StepContext, state: Any, slot: int, signal: torch.Tensor) -> Plan:
        """Plan the rest of one model call from this call's signal. ``slot`` numbers the calls of one
        step (0 for a batched cond+uncond call; 0 and 1 when cond and uncond are separate calls)."""


@runtime_checkable
class InGraphDecider(Protocol):
    """:meth:`InStepDecider.decide` as tensor operations, for ``ax.compile(scope="model")``."""

    def decide_in_graph(self, signal: torch.Tensor, reference: torch.Tensor, allow: torch.Tensor,
                        group: MetricGroup = LOCAL) -> tuple[torch.Tensor, torch.Tensor]:
        """``(reuse, new_reference)`` from this call's signal, the reference it compares against and
        ``allow`` (a boolean scalar: False on steps that must compute). Only tensor operations;
        metric terms summed over ``group``."""

    def in_graph_branches(self, branches: tuple[BranchInfo, ...]) -> frozenset[str]:
        """The branches an in-graph ``reuse`` decision covers."""

    def in_graph_allow(self, ctx: StepContext) -> bool:
        """Whether the in-graph decision may reuse at this step."""

    def in_graph_state(self, state: Any, slot: int) -> torch.Tensor | None:
        """The reference tensor :meth:`InStepDecider.decide` left for call slot ``slot``."""


@runtime_checkable
class GuidanceCacher(Protocol):
    """Rebuilds the unconditional half of batched guidance on steps that skip it (CFG-Cache)."""

    def guidance_layout(self) -> str | None:
        """How a batched guidance call orders its halves (``"uncond_first"``, ``"cond_first"``), or
        None when the policy never plans :attr:`Plan.skip_uncond`."""

    def observe_guidance(self, ctx: StepContext, state: Any, output: int,
                         cond: torch.Tensor, uncond: torch.Tensor) -> None:
        """A full guidance call ran: its ``output``-th output tensor, split into its halves."""

    def rebuild_uncond(self, ctx: StepContext, state: Any, output: int, cond: torch.Tensor) -> torch.Tensor:
        """The unconditional half of the ``output``-th output of a call that ran the cond half only."""


@dataclass(frozen=True)
class Capabilities:
    """What one policy can do, resolved once from its protocols; how the runtime calls it.

    >>> from adacache_fx import Static
    >>> Capabilities.of(Static(2)).signal is None
    True
    """

    policy: Policy
    signal: "InStepSignal | None"
    observes: bool
    observes_outputs: bool
    forecasts: bool
    in_graph: bool
    guidance_layout: str | None
    folds: bool = False

    @classmethod
    def of(cls, policy: Policy) -> "Capabilities":
        signal = policy.in_step_signal() if isinstance(policy, InStepDecider) else None
        layout = policy.guidance_layout() if isinstance(policy, GuidanceCacher) else None
        if layout is not None and layout not in GUIDANCE_LAYOUTS:
            raise PolicyError(
                f"{type(policy).__name__}.guidance_layout() returned {layout!r}; valid: {', '.join(GUIDANCE_LAYOUTS)}"
            )
        return cls(
            policy=policy,
            signal=signal,
            observes=isinstance(policy, Observer),
            observes_outputs=isinstance(policy, OutputObserver),
            forecasts=isinstance(policy, Forecaster),
            in_graph=signal is not None and isinstance(policy, InGraphDecider),
            guidance_layout=layout,
            folds=policy.folds() and layout is None and not (isinstance(policy, Forecaster)),
        )

    @property
    def decides_in_step(self) -> bool:
        return self.signal is not None

    def watches(self, branch: BranchInfo, state: Any) -> bool:
        return self.observes and self.policy.watches(branch, state)

    def history(self, branch: BranchInfo) -> int:
        return self.policy.history(branch) if self.forecasts else 1

    def keeps(self, branch: BranchInfo, state: Any) -> bool:
        """Whether a computed residual of ``branch`` is returned by its graph (cached or watched)."""
        return self.policy.caches(branch, state) or self.watches(branch, state)


def validate_kinds(kinds: Iterable[str] | None, owner: str) -> tuple[str, ...] | None:
    """Check kind names at construction, so typos fail before any model runs."""
    if kinds is None:
        return None
    kinds = tuple(kinds) if not isinstance(kinds, str) else (kinds,)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise PolicyError(
            f"{owner}: unknown branch kind(s) {unknown}; valid kinds are {', '.join(KINDS)}"
        )
    return kinds


def require_kinds_present(
    kinds: tuple[str, ...] | None, branches: tuple[BranchInfo, ...], owner: str
) -> None:
    """Raise when a policy names kinds the model does not have (it would silently cache nothing)."""
    if kinds is None or not branches:
        return
    present = {tag for b in branches for tag in b.tags} | {b.kind for b in branches}
    missing = [k for k in kinds if k not in present]
    if missing:
        raise PolicyError(
            f"{owner} names branch kind(s) {missing} that this model does not have; "
            f"its branches are of kinds: {', '.join(sorted(present))}"
        )
