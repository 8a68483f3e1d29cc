"""Sessions: the per-caller state of a transformed model.

A :class:`Session` is what one caller's generations accumulate: where it is (:class:`StepTracker`),
the policy's state for the current generation, the residual caches, and the statistics of every
step. The runtime keeps one per thread, so two threads calling one model never share steps, caches
or decisions; the captured programs are what they share.

Two other kinds exist for drivers that fix the plan from outside, with no step logic:
:class:`FixedSession` (one plan for a whole call, caches passed in and out explicitly: exporting a
plan variant) and :class:`TracedSession` (every cached branch decides inside the graph on a boolean
tensor: the one-graph form for ``ax.compile(scope="model")`` and ONNX ``If``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..passes.guards import ambient_state
from ..policies.base import LOCAL, Capabilities, MetricGroup, Plan, Policy, StepContext
from .cache import CacheState
from .steps import CallEvent, StepTracker


@dataclass
class StepRecord:
    """What happened in one step (all calls of it together)."""

    generation: int
    step: int
    timestep: float | None
    planned_reuse: int  # branches the plan asked to reuse
    in_step_reuse: int = 0  # calls whose in-step decision reused at least one branch
    computed: int = 0  # branch executions that computed
    reused: int = 0  # branch executions that reused their cache
    partial: int = 0  # branch executions that recomputed a token subset (Plan.partial)
    exact: int = 0  # branch executions skipped because their step-invariant block returned its recorded output
    flops_computed: int = 0
    flops_total: int = 0
    calls: int = 0
    cond_only: int = 0  # calls that ran the cond half of batched guidance only (Plan.skip_uncond)
    session: int = 0  # which session (thread) ran it


@dataclass
class CallState:
    """What one model call carries from block to block."""

    cond_only: bool = False  # this call runs the cond half of a guidance batch only
    rows: int | None = None  # batch of the call as the caller made it
    stream_start: torch.Tensor | None = None  # main stream entering block 0 (First-Block-Cache)
    tokens: dict = field(default_factory=dict)  # token indices of the plan, per device
    graphs: Any = None  # the GraphRunner of this call, when not the executor's own (a torch.compile hand-over)
    fold: bool = False  # spans of whole reused blocks are folded (see passes/fold.py)
    chain: Any = None  # the span being recorded on a computing call
    closed: list = field(default_factory=list)  # spans recorded this call, stored when it ends
    produced: dict = field(default_factory=dict)  # id of a recorded block output -> where it came from
    replay: Any = None  # the folded span being replayed on a reusing call
    lists: dict = field(default_factory=dict)  # block list -> its ListCall (step-invariant lists, invariant.py)
    renumber: set = field(default_factory=set)  # main lists found step-invariant this call
    skip_signal: bool = False  # no in-step signal this call (its block is being renumbered)
    dropped: bool = False  # a block changed this call: the generation's caches were dropped
    block_calls: int = 0  # block wrapper calls so far (a bridge joins two blocks called one after the other)
    adapters_read: bool = False  # the session's adapter norms were read at this call's start


class Session:
    """One caller's generations (see the module docstring). ``live``: tracks steps and asks the policy."""

    live = True

    def __init__(self, policy: Policy, caps: Capabilities, number: int = 0, fold: bool = True) -> None:
        self.policy = policy
        self.caps = caps
        self.number = number
        self.tracker = StepTracker()
        self.policy_state: Any = policy.new_state()
        self.caches = CacheState()
        self.records: list[StepRecord] = []
        self.context: StepContext | None = None
        self.step_plan: Plan = Plan.compute_all()
        self.plan: Plan = Plan.compute_all()  # this call's: the step's, or an in-step decision's
        self.call = CallState()
        self.ambient: tuple = ()  # process state the captures depend on, read once per call
        self.pipeline_context: Any = None  # the diffusers CacheContext of the call, if any
        self.warned: set[str] = set()
        # Reference tensors of in-graph decisions (ax.compile(scope="model")), per call slot.
        self.in_graph: dict[int, torch.Tensor] = {}
        self.rebinds: dict[str, int] = {}  # block path -> times bound anew this generation
        self.fold_allowed = fold  # off while a driver needs per-branch residuals (scope="model")
        self.group: MetricGroup = LOCAL  # the ranks the last call's metrics were summed over
        # (block before, block) -> the model's code between them as a Bridge, or None; proven once a
        # generation (see bridges.py)
        self.bridges: dict[tuple[Any, Any], Any] = {}
        # The blocks' adapter tensors and their norms at the end of the last call (see adapter_weights.py)
        self.adapter_norms: tuple[Any, tuple[torch.Tensor, ...]] | None = None
        # The guard of the model's modules outside its blocks at the end of the last call (runtime.py)
        self.outside_guard: Any = None
        # How many block changes the runtime had found (its re-captures) when this session last looked
        self.changes_seen = 0

    @property
    def slot(self) -> int:
        return self.tracker.slot

    @property
    def record(self) -> StepRecord | None:
        return self.records[-1] if self.records else None

    # -- generations ------------------------------------------------------------------------------
    def start_generation(self, num_steps: int | None = None, explicit: bool = False) -> None:
        self.tracker.start_generation(num_steps, explicit=explicit)
        self._fresh_generation()

    def end_generation(self) -> None:
        """Leave an explicit generation: caches are freed; the next call's rules decide again."""
        self.tracker.explicit = False
        self.tracker.num_steps = None
        self.caches.clear()

    def end_pipeline_call(self) -> None:
        """A pipeline's ``__call__`` ended: free the caches; the next call starts a generation."""
        if not self.tracker.explicit:
            self.tracker.end_pipeline_call()
            self.caches.clear()

    def _fresh_generation(self) -> None:
        self.caches.clear()
        self.bridges.clear()
        self.caches.peak = 0
        self.in_graph.clear()
        self.rebinds.clear()
        self.warned = {w for w in self.warned if not w.startswith("limit:")}
        self.policy_state = self.policy.new_state()

    def reset(self) -> None:
        """Forget caches, step position and statistics."""
        self.tracker = StepTracker()
        self.caches.clear()
        self.bridges.clear()
        self.caches.peak = 0
        self.in_graph.clear()
        self.records.clear()
        self.policy_state = self.policy.new_state()
        self.context = None

    # -- calls ------------------------------------------------------------------------------------
    def begin_call(self, branches: tuple, timestep: float | None, latent: torch.Tensor | None = None,
                   frames: int | None = None, context_step: int | None = None,
                   num_steps: int | None = None, group: MetricGroup = LOCAL) -> CallEvent:
        """Track a model call: a new generation (fresh caches and policy state) and/or a new step
        (the policy plans it); every call starts from its step's plan."""
        if num_steps is not None and not self.tracker.explicit and self.tracker.num_steps is None:
            self.tracker.num_steps = num_steps
        event = self.tracker.on_call(timestep, latent, context_step)
        if event.new_generation:
            self._fresh_generation()
            if num_steps is not None and not self.tracker.explicit:
                self.tracker.num_steps = num_steps
        if event.new_step:
            self.context = StepContext(
                step=self.tracker.step,
                num_steps=self.tracker.num_steps,
                timestep=timestep,
                generation=self.tracker.generation,
                branches=branches,
                frames=frames,
                latent=latent,
                group=group,
            )
            self.step_plan = self.policy.plan(self.context, self.policy_state)
            self.records.append(StepRecord(self.tracker.generation, self.tracker.step, timestep,
                                           len(self.step_plan.reuse), session=self.number))
        self.group = group
        self.plan = self.step_plan
        self.call = CallState(fold=self.caps.folds and self.fold_allowed)
        self.records[-1].calls += 1
        return event

    def end_call(self, output: torch.Tensor | None) -> None:
        if output is not None and self.caps.observes_outputs and self.context is not None:
            self.policy.observe_output(self.context, self.policy_state, self.tracker.slot, output)
        self.tracker.after_call(output)

    def decide(self, signal: torch.Tensor) -> None:
        """An in-step policy plans the rest of this call from its signal."""
        if self.context is None:
            return
        self.plan = self.policy.decide(self.context, self.policy_state, self.tracker.slot, signal)
        if self.plan.reuse and self.records:
            self.records[-1].in_step_reuse += 1


class FixedSession(Session):
    """One given plan for a whole call and caches given as tensors; what the call stores is in
    :attr:`stored`. No steps, no policy calls, no statistics (what export traces)."""

    live = False

    def __init__(self, policy: Policy, caps: Capabilities, plan: Plan, policy_state: Any = None) -> None:
        super().__init__(policy, caps)
        self.policy_state = policy_state
        self.ambient = ambient_state()  # what live calls key their captures by
        self.plan = self.step_plan = plan
        self.stored: dict[str, tuple[torch.Tensor, ...]] = {}

    def begin_call(self, *args: Any, **kwargs: Any) -> CallEvent:  # noqa: D102 - nothing to track
        self.call = CallState()
        return CallEvent(False, False)


class TracedSession(FixedSession):
    """Every cached branch reuses or computes as its boolean tensor in :attr:`reuse` says, inside
    the graph; every cached branch's new cache goes to :attr:`stored` (its input when it reused).

    ``in_step``: for an in-graph decision (First-Block-Cache), its reference and ``allow`` inputs,
    the branches the decision covers, and after the signal's block ``reuse`` and ``new_state``.
    """

    def __init__(self, policy: Policy, caps: Capabilities, reuse: dict[str, torch.Tensor],
                 cache_in: dict[str, tuple[torch.Tensor, ...]], policy_state: Any = None,
                 in_step: dict[str, Any] | None = None) -> None:
        super().__init__(policy, caps, Plan.compute_all(), policy_state)
        self.reuse = reuse
        self.cache_in = cache_in
        self.in_step = in_step
