"""The per-model runtime: step tracking, policy plans, cache state and statistics.

Cache state is held here, outside the executed graphs: each block call passes the reused residuals
in and gets the stored ones out (``(inputs, cache) -> (outputs, new cache)``), so the graphs stay
pure functions that compile and export.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from ..passes.rewrite import RegionState
from ..errors import PolicyError
from ..policies.base import GUIDANCE_LAYOUTS, BranchInfo, InStepSignal, Plan, Policy, StepContext
from . import guidance
from .steps import StepTracker

logger = logging.getLogger("adacache_fx")

TIMESTEP_ARG_NAMES = ("timestep", "timesteps", "t", "sigma", "sigmas")


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
    flops_computed: int = 0
    flops_total: int = 0
    calls: int = 0
    cond_only: int = 0  # calls that ran the cond half of batched guidance only (Plan.skip_uncond)


@dataclass
class FixedPlan:
    """Export mode: one plan for the whole call, caches passed in and out explicitly, no step logic."""

    reuse: frozenset[str]
    cache_in: dict[str, tuple[torch.Tensor, ...]]
    cache_out: dict[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)


@dataclass
class TensorPlan:
    """Conditional mode (single-graph export): each cached branch has a boolean scalar tensor that
    decides inside the graph whether it reuses ``cache_in`` (``torch.cond``); every cached branch
    returns its new cache in ``cache_out`` (the input cache when it reused)."""

    reuse: dict[str, torch.Tensor]
    cache_in: dict[str, tuple[torch.Tensor, ...]]
    cache_out: dict[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    # In-graph decision of an in-step policy (First-Block-Cache): its state and allow inputs, and,
    # once the signal's block has run, "reuse" and "new_state" (see Policy.decide_in_graph).
    in_step: dict[str, Any] | None = None


@dataclass
class BlockCache:
    signature: Any
    values: dict[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    # Earlier computed residuals, for policies that forecast from more than the last one.
    history: dict[str, list[tuple[int, tuple[torch.Tensor, ...]]]] = field(default_factory=dict)
    # Set on the cond-rows view a block gets in a cond-only guidance call: the full-batch cache that
    # what it stores is merged into (None: there is none yet, and nothing is stored).
    parent: "BlockCache | None" = None
    view: bool = False

    def keep(self, branch_id: str, step: int, values: tuple[torch.Tensor, ...], history: int) -> None:
        """Store a branch's new residuals, and the last ``history`` of them for forecasts."""
        self.values[branch_id] = values
        if history > 1:
            past = self.history.setdefault(branch_id, [])
            past.append((step, values))
            del past[:-history]


def _timestep_reader(model: nn.Module):
    """Return ``f(args, kwargs) -> float | None`` reading the model's timestep argument."""
    forward = inspect.unwrap(type(model).forward)
    try:
        params = list(inspect.signature(forward).parameters)[1:]  # drop self
    except (TypeError, ValueError):
        params = []
    name = next((n for n in TIMESTEP_ARG_NAMES if n in params), None)
    if name is None:
        return None, None
    position = params.index(name)

    def read(args: tuple, kwargs: dict) -> float | None:
        value = kwargs.get(name) if name in kwargs else (args[position] if position < len(args) else None)
        if value is None:
            return None
        if isinstance(value, torch.Tensor):
            if value.numel() == 0:
                return None
            return float(value.detach().reshape(-1)[0].item())
        return float(value)

    return read, name


def _frames_reader(model: nn.Module):
    """Return ``f(args, kwargs) -> int | None``: latent frames per sample after temporal patching.

    Video DiTs take 5-D latents, (B, C, T, H, W) or CogVideoX's (B, T, C, H, W): the channel axis is
    the one equal to ``config.in_channels``. LTX-Video takes tokens plus a ``num_frames`` argument.
    """
    config = getattr(model, "config", None)
    in_channels = getattr(config, "in_channels", None)
    patch_t = getattr(config, "patch_size_t", None)
    patch = getattr(config, "patch_size", None)
    if patch_t is None and isinstance(patch, (tuple, list)) and len(patch) == 3:
        patch_t = patch[0]
    patch_t = int(patch_t or 1)

    def read(args: tuple, kwargs: dict) -> int | None:
        frames = kwargs.get("num_frames")
        if isinstance(frames, int):
            return frames
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if not isinstance(hidden, torch.Tensor) or hidden.ndim != 5:
            return None
        axis = 1 if hidden.shape[2] == in_channels and hidden.shape[1] != in_channels else 2
        return max(1, int(hidden.shape[axis]) // patch_t)

    return read


class CacheRuntime:
    """State of one transformed model."""

    def __init__(self, model: nn.Module, policy: Policy) -> None:
        self.policy = policy
        self.tracker = StepTracker()
        self.read_timestep, self.timestep_arg = _timestep_reader(model)
        self.read_frames = _frames_reader(model)
        self.signal: InStepSignal | None = policy.in_step_signal()
        self.guidance_layout: str | None = policy.guidance_layout()
        if self.guidance_layout is not None and self.guidance_layout not in GUIDANCE_LAYOUTS:
            raise PolicyError(
                f"{type(policy).__name__}.guidance_layout() returned {self.guidance_layout!r}; "
                f"valid: {', '.join(GUIDANCE_LAYOUTS)}"
            )
        self.cond_only = False  # this call runs the cond half of a guidance batch only
        self.call_rows: int | None = None  # batch of this call as the pipeline made it
        self.step_plan: Plan = Plan.compute_all()
        self.stream_start: torch.Tensor | None = None  # main stream entering block 0, this call
        self.branches: dict[str, BranchInfo] = {}
        self.block_order: list[str] = []
        self.caches: dict[tuple[int, str], BlockCache] = {}
        self.records: list[StepRecord] = []
        self.plan: Plan = Plan.compute_all()
        self.context: StepContext | None = None
        self._policy_ready = False
        self._warned_respecialise: set[str] = set()
        self.shared_captures: dict[Any, Any] = {}  # (structure, signature) -> SharedCapture
        self.uncached_blocks: dict[str, str] = {}  # block path -> why it runs uncached
        self.block_flops: dict[str, int | None] = {}  # block path -> FLOPs of one call
        self.model_flops: int | None = None  # whole-model FLOPs of one call, when measured (inspect)
        self.blocks: list[nn.Module] = []  # the CachedBlock wrappers, set by transform()
        self.left_alone: list[tuple[str, str]] = []
        self.hooks: list[Any] = []
        self.compile_options: dict | None = None  # set by ax.compile: variants are torch.compile'd
        # Set while exporting: one plan variant (FixedPlan) or the single conditional graph (TensorPlan).
        self.fixed: FixedPlan | TensorPlan | None = None
        self._warned_partial: set[str] = set()
        # Token indices of this step's plan, moved to each device once per step.
        self._tokens_on_device: dict[tuple[int, Any], torch.Tensor] = {}

    @property
    def cuda_graphs(self) -> bool:
        """Whether block graphs run as CUDA graphs (``ax.compile(mode="reduce-overhead")``): their
        outputs live in buffers that the next replay overwrites, so stored residuals are copied."""
        options = self.compile_options or {}
        return options.get("mode") in ("reduce-overhead", "max-autotune") or bool(
            (options.get("options") or {}).get("triton.cudagraphs"))

    def compiled(self, graph: Any) -> Any:
        """``graph`` compiled with the options of :func:`adacache_fx.compile`, or as is."""
        if self.compile_options is None:
            return graph
        return torch.compile(graph, **self.compile_options)

    # -- model call boundaries -------------------------------------------------------------
    def on_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self.cond_only = False
        if self.fixed is not None:
            return None
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # a new model call: earlier outputs are done with
        timestep = self.read_timestep(args, kwargs) if self.read_timestep else None
        event = self.tracker.on_call(timestep)
        if event.new_generation:
            self.caches.clear()
            self.policy.reset()
        if event.new_step:
            self.context = StepContext(
                step=self.tracker.step,
                num_steps=self.tracker.num_steps,
                timestep=timestep,
                generation=self.tracker.generation,
                branches=tuple(self.branches.values()),
                frames=self.read_frames(args, kwargs),
            )
            self.step_plan = self.policy.plan(self.context)
            self._tokens_on_device.clear()
            self.records.append(
                StepRecord(self.tracker.generation, self.tracker.step, timestep, len(self.step_plan.reuse))
            )
        # Every call starts from the step's plan; an in-step decision may replace it for this call.
        self.plan = self.step_plan
        self.stream_start = None
        self.records[-1].calls += 1
        if self.guidance_layout is None:
            return None
        self.call_rows = guidance.call_batch(args, kwargs)
        if not self.plan.skip_uncond or self.call_rows is None:
            return None
        self.cond_only = True
        self.records[-1].cond_only += 1
        return guidance.halve_call(args, kwargs, self.call_rows, self.guidance_layout, type(self.policy).__name__)

    def after_model_call(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self.fixed is not None:
            return None
        if not self._policy_ready and self.branches:
            self._policy_ready = True
            self.policy.setup(tuple(self.branches.values()))
        if self.guidance_layout is None or self.context is None or self.call_rows is None:
            return None
        return self._guidance_output(output)

    def _guidance_output(self, output: Any) -> Any:
        """Show a full guidance call's output halves to the policy, or rebuild a cond-only call's."""
        layout, rows = self.guidance_layout, self.call_rows
        leaves, spec = pytree.tree_flatten(output)
        if not self.cond_only:
            if rows % 2 == 0:
                for index, leaf in enumerate(leaves):
                    if isinstance(leaf, torch.Tensor) and leaf.ndim > 0 and leaf.shape[0] == rows:
                        self.policy.observe_guidance(
                            self.context, index, guidance.cond_half(leaf, layout), guidance.uncond_half(leaf, layout)
                        )
            return None
        self.cond_only = False
        rebuilt = [
            guidance.join_halves(leaf, self.policy.rebuild_uncond(self.context, index, leaf), layout)
            if isinstance(leaf, torch.Tensor) and leaf.ndim > 0 and leaf.shape[0] == rows // 2 else leaf
            for index, leaf in enumerate(leaves)
        ]
        return pytree.tree_unflatten(rebuilt, spec)

    def begin_generation(self, num_steps: int | None) -> None:
        self.tracker.start_generation(num_steps, explicit=True)
        self.caches.clear()
        self.policy.reset()

    def end_generation(self) -> None:
        self.tracker.explicit = False
        self.tracker.num_steps = None
        self.caches.clear()

    def reset(self) -> None:
        """Forget caches, step position and statistics (branches and captures are kept)."""
        self.tracker = StepTracker()
        self.caches.clear()
        self.records.clear()
        self.policy.reset()

    # -- branches ----------------------------------------------------------------------------
    def register_block(self, block_path: str, list_name: str, index: int, regions: list) -> list[BranchInfo]:
        if block_path not in self.block_order:
            self.block_order.append(block_path)
        depth = self.block_order.index(block_path)
        infos = []
        for region in regions:
            branch_id = f"{block_path}.{region.name}"
            info = self.branches.get(branch_id)
            if info is None:
                info = BranchInfo(
                    id=branch_id,
                    block=block_path,
                    block_list=list_name,
                    block_index=index,
                    depth=depth,
                    name=region.name,
                    kind=region.kind,
                    tags=region.tags,
                    flops=region.flops,
                    num_residuals=len(region.residuals),
                    tokens=region.token_flow.tokens if region.token_flow is not None else None,
                )
                self.branches[branch_id] = info
            infos.append(info)
        return infos

    # -- in-step decisions ----------------------------------------------------------------------
    def decide(self, signal: torch.Tensor) -> None:
        """Let an in-step policy plan the rest of this call from its signal.

        On the first call the policy is not set up yet (the blocks are still being captured) and
        ``context.branches`` is empty: policies compute then, and record their first signal.
        """
        if self.context is None:
            return
        self.plan = self.policy.decide(self.context, self.tracker.slot, signal)
        if self.plan.reuse and self.records:
            self.records[-1].in_step_reuse += 1

    def missing_signal(self, block_path: str) -> None:
        raise PolicyError(
            f"{type(self.policy).__name__} needs the {self.signal.kind!r} signal, but the first block "
            f"{block_path} has no branch with a projection to read it from"
        )

    # -- per block call ------------------------------------------------------------------------
    def block_cache(self, block_path: str, signature: Any) -> BlockCache:
        key = (self.tracker.slot, block_path)
        cache = self.caches.get(key)
        if self.cond_only:
            return self._cond_rows_view(cache, signature)
        if cache is None or cache.signature != signature:
            if cache is not None and block_path not in self._warned_respecialise:
                self._warned_respecialise.add(block_path)
                logger.warning(
                    "adacache_fx: %s was called with new input shapes at step %d of a generation; "
                    "it was re-captured for them and its cache starts empty (it computes until "
                    "its next compute step has stored a residual of the new shape).",
                    block_path, self.tracker.step,
                )
            cache = BlockCache(signature)
            self.caches[key] = cache
        return cache

    def _cond_rows_view(self, full: BlockCache | None, signature: Any) -> BlockCache:
        """What a block sees in a cond-only guidance call: the cond rows of its full-batch cache."""
        view = BlockCache(signature, parent=full, view=True)
        if full is not None:
            layout = self.guidance_layout
            view.values = {k: guidance.rows_view(v, layout) for k, v in full.values.items()}
            view.history = {k: [(s, guidance.rows_view(v, layout)) for s, v in past]
                            for k, past in full.history.items()}
        return view

    def fixed_states(self, infos: list[BranchInfo]) -> tuple[RegionState, ...]:
        """Region states under a :class:`FixedPlan` (export): reuse what it names, store the rest."""
        return tuple(
            RegionState.REUSE if info.id in self.fixed.reuse
            else RegionState.STORE if self.policy.caches(info) or self.policy.watches(info)
            else RegionState.COMPUTE
            for info in infos
        )

    def region_states(self, infos: list[BranchInfo], cache: BlockCache) -> tuple[RegionState, ...]:
        """Region states for this call's plan, without partial recompute (see :meth:`region_plan`)."""
        return self.region_plan(infos, cache)[0]

    def region_plan(
        self, infos: list[BranchInfo], cache: BlockCache, regions: list | None = None
    ) -> tuple[tuple[RegionState, ...], tuple[torch.Tensor | None, ...]]:
        """Region states for this call's plan, and the token indices of ``PARTIAL`` regions.

        ``regions`` (the block's :class:`~adacache_fx.passes.residuals.Region` list at this call's
        shape) says which can be recomputed for a token subset; without it nothing is partial.
        """
        reuse, partial = self.plan.reuse, self.plan.partial
        states: list[RegionState] = []
        tokens: list[torch.Tensor | None] = []
        for i, info in enumerate(infos):
            cached = info.id in cache.values
            subset = partial.get(info.id) if partial and regions is not None else None
            if subset is not None and cached:
                flow = regions[i].token_flow
                if flow is None:
                    self._warn_partial(info, regions[i].token_error)
                elif subset.numel() == 0:
                    states.append(RegionState.REUSE)
                    tokens.append(None)
                    continue
                else:
                    states.append(RegionState.PARTIAL)
                    tokens.append(self._tokens_for(info, subset, flow.tokens, cache.values[info.id][0]))
                    continue
            if info.id in reuse and cached:
                states.append(RegionState.REUSE)
            elif self.policy.caches(info) or self.policy.watches(info):
                states.append(RegionState.STORE)
            else:
                states.append(RegionState.COMPUTE)
            tokens.append(None)
        return tuple(states), tuple(tokens)

    def _warn_partial(self, info: BranchInfo, reason: str | None) -> None:
        if info.id not in self._warned_partial:
            self._warned_partial.add(info.id)
            logger.warning(
                "adacache_fx: %s asks to recompute %s for a token subset, which is not valid for it "
                "(%s); it computes fully instead", type(self.policy).__name__, info.id, reason,
            )

    def _tokens_for(self, info: BranchInfo, subset: torch.Tensor, count: int, like: torch.Tensor) -> torch.Tensor:
        """Validated int64 token indices on the cache's device (moved once per step)."""
        key = (id(subset), like.device)
        moved = self._tokens_on_device.get(key)
        if moved is not None:
            return moved
        if subset.numel() > count:
            raise PolicyError(
                f"{type(self.policy).__name__} asks to recompute {subset.numel()} tokens of {info.id}, "
                f"which has {count}"
            )
        if subset.device.type == "cpu":  # checked where it costs no device sync
            low, high = int(subset.min()), int(subset.max())
            if low < 0 or high >= count:
                raise PolicyError(
                    f"{type(self.policy).__name__}: token index {low if low < 0 else high} out of range "
                    f"for {info.id}, which has {count} tokens (0..{count - 1})"
                )
        moved = subset.to(device=like.device, dtype=torch.long)
        self._tokens_on_device[key] = moved
        return moved

    def after_block(
        self,
        infos: list[BranchInfo],
        states: tuple[RegionState, ...],
        cache: BlockCache,
        stored: list[torch.Tensor],
        partial_flops: dict[str, int | None] | None = None,
    ) -> None:
        """Count what ran and keep what was stored. ``partial_flops``: FLOPs of each ``PARTIAL``
        branch at its token count (unknown: counted as a full compute, never as a saving)."""
        record = self.records[-1] if self.records else None
        offset = 0
        for info, state in zip(infos, states):
            flops = info.flops or 0
            if record is not None:
                record.flops_total += flops
            if state == RegionState.REUSE:
                if record is not None:
                    record.reused += 1
                continue
            if record is not None:
                if state == RegionState.PARTIAL:
                    record.partial += 1
                    spent = (partial_flops or {}).get(info.id)
                    record.flops_computed += flops if spent is None else spent
                else:
                    record.computed += 1
                    # A cond-only guidance call computes half the rows the branch's FLOPs were counted for.
                    record.flops_computed += flops // 2 if cache.view else flops
            if state in (RegionState.STORE, RegionState.PARTIAL):
                new = tuple(t.detach() for t in stored[offset:offset + info.num_residuals])
                if self.cuda_graphs:  # the next replay of this graph reuses its output buffers
                    new = tuple(t.clone() for t in new)
                offset += info.num_residuals
                previous = cache.values.get(info.id)
                if self.policy.watches(info) and self.context is not None:
                    self.policy.observe(self.context, info, new, previous)
                target = cache
                if cache.view:
                    # Cond rows only: merged into the full-batch cache, whose uncond rows stay as they were.
                    target = cache.parent
                    if target is None or info.id not in target.values or not self.policy.caches(info):
                        continue
                    new = guidance.merge_rows(target.values[info.id], new, self.guidance_layout)
                if self.policy.caches(info):
                    target.keep(info.id, self.tracker.step, new, self.policy.history(info))

    def reuse_values(self, info: BranchInfo, cache: BlockCache) -> tuple[torch.Tensor, ...]:
        """What a reused branch adds: the policy's forecast, or the last computed residuals."""
        if self.context is not None:
            history = cache.history.get(info.id) or [(-1, cache.values[info.id])]
            forecast = self.policy.forecast(self.context, info, history)
            if forecast is not None:
                return forecast
        return cache.values[info.id]

    # -- inspection ----------------------------------------------------------------------------
    def cached_residuals(self, slot: int = 0) -> dict[str, tuple[torch.Tensor, ...]]:
        """The residuals currently cached for call slot ``slot``, by branch id."""
        out: dict[str, tuple[torch.Tensor, ...]] = {}
        for (cache_slot, _block), cache in self.caches.items():
            if cache_slot == slot:
                out.update(cache.values)
        return out

    def cache_bytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for cache in self.caches.values()
            for values in cache.values.values()
            for t in values
        )
