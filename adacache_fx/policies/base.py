"""The policy interface: what a policy sees each step, and the plan it returns.

A policy never touches graphs. It is told which residual branches exist (:class:`BranchInfo`), is
asked at the start of every denoising step for a :class:`Plan` (which branches reuse their cached
residual this step, and which recompute only some of their tokens), and may watch chosen branches:
after such a branch computes, the runtime hands the policy its new and previous residuals
(:meth:`Policy.observe`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar, Iterable, Mapping

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

    @property
    def partial(self) -> bool:
        """Whether :attr:`Plan.partial` can recompute this branch for a subset of its tokens."""
        return self.tokens is not None


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
    """Base class of caching policies. Subclasses are dataclasses of their settings."""

    #: True for policies that decide inside a step from data of the same step (First-Block-Cache).
    #: They return an :class:`InStepSignal` from :meth:`in_step_signal` and implement :meth:`decide`.
    decides_in_step: ClassVar[bool] = False

    def caches(self, branch: BranchInfo) -> bool:
        """Whether this branch's residual should be stored when it computes."""
        return True

    def watches(self, branch: BranchInfo) -> bool:
        """Whether :meth:`observe` should be called when this branch computes."""
        return False

    def setup(self, branches: tuple[BranchInfo, ...]) -> None:
        """Called once the model's branches are known; validate settings against them here."""

    def reset(self) -> None:
        """Called when a new generation starts: drop per-generation state."""

    def plan(self, ctx: StepContext) -> Plan:
        raise NotImplementedError

    def observe(
        self,
        ctx: StepContext,
        branch: BranchInfo,
        new: tuple[torch.Tensor, ...],
        previous: tuple[torch.Tensor, ...] | None,
    ) -> None:
        """A watched branch computed: ``new`` residuals, and the ones it replaces (None at first)."""

    def history(self, branch: BranchInfo) -> int:
        """How many computed residuals of ``branch`` :meth:`forecast` needs (1: the last only)."""
        return 1

    def forecast(
        self,
        ctx: StepContext,
        branch: BranchInfo,
        history: list[tuple[int, tuple[torch.Tensor, ...]]],
    ) -> tuple[torch.Tensor, ...] | None:
        """The residuals a reused branch adds this step, from its computed ``(step, residuals)``
        history (oldest first). None: add the last computed residuals as they are (plain reuse).
        Forecasting policies (TaylorSeer, FasterCache) extrapolate instead."""
        return None

    def guidance_layout(self) -> str | None:
        """How a batched guidance call orders its halves, for policies that plan
        :attr:`Plan.skip_uncond`: ``"uncond_first"`` (diffusers' pipelines: ``cat([negative,
        positive])``) or ``"cond_first"``. None (default): the policy never skips the uncond half, and
        the runtime leaves model calls whole."""
        return None

    def observe_guidance(self, ctx: StepContext, output: int, cond: torch.Tensor, uncond: torch.Tensor) -> None:
        """A full guidance call ran: its ``output``-th output tensor, split into its halves."""

    def rebuild_uncond(self, ctx: StepContext, output: int, cond: torch.Tensor) -> torch.Tensor:
        """The unconditional half of the ``output``-th output tensor of a call that ran the
        conditional half only (:attr:`Plan.skip_uncond`)."""
        raise NotImplementedError(f"{type(self).__name__} plans skip_uncond but has no rebuild_uncond()")

    def in_step_signal(self) -> InStepSignal | None:
        """The signal :meth:`decide` needs, for policies that decide inside a step."""
        return None

    def decide_in_graph(
        self, signal: torch.Tensor, state: torch.Tensor, allow: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tensor form of :meth:`decide` for whole-model graphs (``ax.compile(scope="model")``):
        from this call's signal, the policy's state tensor (what it compares against) and ``allow``
        (a boolean scalar: False on steps that must compute), return ``(reuse, new_state)``, ``reuse``
        a boolean scalar covering :meth:`in_graph_branches`. Only tensor operations: it is traced."""
        raise NotImplementedError(f"{type(self).__name__} has no in-graph decision")

    def in_graph_branches(self, branches: tuple[BranchInfo, ...]) -> frozenset[str]:
        """The branches an in-graph ``reuse`` decision covers."""
        raise NotImplementedError(f"{type(self).__name__} has no in-graph decision")

    def in_graph_allow(self, ctx: StepContext) -> bool:
        """Whether the in-graph decision may reuse at this step (False: the step must compute)."""
        return True

    def in_graph_state(self, slot: int) -> torch.Tensor | None:
        """The state tensor :meth:`decide` left for call slot ``slot`` (after an eager call)."""
        raise NotImplementedError(f"{type(self).__name__} has no in-graph decision")

    def decide(self, ctx: StepContext, slot: int, signal: torch.Tensor) -> Plan:
        """Plan the rest of one model call from this call's signal.

        ``slot`` numbers the calls of one step (0 for a batched cond+uncond call; 0 and 1 when a
        pipeline calls the model separately for cond and uncond), so per-call state stays apart.
        """
        raise NotImplementedError(f"{type(self).__name__} asks for an in-step signal but has no decide()")


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
