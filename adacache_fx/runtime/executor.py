"""The executor: runs a block program for a session's plan against the session's caches.

It is the one place that turns a plan into region states, feeds reused residuals (or a policy's
forecast) into a graph, stores what a graph computed, slices cached residuals to a guidance call's
cond rows, hands watched residuals to the policy and counts what ran. Every driver goes through it:
the eager block wrapper (:meth:`Executor.run_block`), the one-graph form traced for
``ax.compile(scope="model")`` and ONNX ``If`` (a :class:`~.session.TracedSession`), plan-variant
export (a :class:`~.session.FixedSession`), and the drivers that run whole-model graphs or exported
engines (:meth:`Executor.reuse_values` and :meth:`Executor.commit` per branch).

How graphs run, as they are or compiled, is the :class:`GraphRunner`'s business.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from ..errors import CaptureError, PolicyError
from ..passes.capture import BoundInputs
from ..passes.program import BlockProgram
from ..passes.rewrite import RegionState
from ..policies.base import BranchInfo, Capabilities
from . import guidance
from .cache import CacheEntry, cond_rows
from .session import Session, TracedSession

logger = logging.getLogger("adacache_fx")

COMPUTE, STORE, REUSE, PARTIAL = RegionState.COMPUTE, RegionState.STORE, RegionState.REUSE, RegionState.PARTIAL


@dataclass(frozen=True, eq=False)
class Binding:
    """One block bound to one program at one input signature, at one epoch of the live model
    (the epoch moves when the block's guard fails). Cache entries belong to a binding."""

    path: str
    epoch: int
    depth: int
    program: BlockProgram
    inputs: BoundInputs
    branches: tuple[BranchInfo, ...]


class GraphRunner:
    """How block graphs run: as they are, or each compiled once with ``torch.compile`` options.

    >>> GraphRunner().compiling, GraphRunner({"backend": "inductor", "fullgraph": True}).compiling
    (False, True)
    """

    def __init__(self, compile_options: dict | None = None) -> None:
        self.options = compile_options
        self._compiled: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    @property
    def compiling(self) -> bool:
        return self.options is not None

    @property
    def copies_outputs(self) -> bool:
        """CUDA graphs (``mode="reduce-overhead"``) reuse their output buffers at the next replay, so
        stored residuals are copied out."""
        options = self.options or {}
        return options.get("mode") in ("reduce-overhead", "max-autotune") or bool(
            (options.get("options") or {}).get("triton.cudagraphs"))

    def on_model_call(self) -> None:
        if self.copies_outputs:
            torch.compiler.cudagraph_mark_step_begin()  # a new model call: earlier outputs are done with

    def _run(self, program: BlockProgram, key: tuple, graph: Any) -> Any:
        if self.options is None or graph is None:
            return graph
        compiled = self._compiled.get((program, key))
        if compiled is None:
            with self._lock:
                compiled = self._compiled.get((program, key))
                if compiled is None:
                    compiled = self._compiled[(program, key)] = torch.compile(graph, **self.options)
        return compiled

    def variant(self, program: BlockProgram, states: tuple, counts: tuple) -> Any:
        return self._run(program, ("variant", states, counts), program.variant(states, counts))

    def probe(self, program: BlockProgram) -> Any:
        return self._run(program, ("probe",), program.probe())


class Executor:
    """See the module docstring. One per transformed model (or exported runner)."""

    def __init__(self, caps: Capabilities, graphs: GraphRunner | None = None) -> None:
        self.caps = caps
        self.policy = caps.policy
        self.graphs = graphs or GraphRunner()

    # -- cache entries ----------------------------------------------------------------------------
    def entry(self, session: Session, binding: Binding | None, info: BranchInfo) -> CacheEntry | None:
        """The entry a call of ``binding`` may read for ``info`` (cond rows in a cond-only call),
        or None: nothing stored, or stored by another binding (other shapes, an earlier model)."""
        entry = session.caches.entry(session.slot, info.id)
        if entry is None:
            return None
        owner = entry.owner
        same_block = isinstance(owner, Binding) and binding is not None and (
            owner.path == binding.path and owner.epoch == binding.epoch)
        if session.call.cond_only:
            if owner is None or binding is None or same_block:
                return cond_rows(entry, self.caps.guidance_layout)
            return None
        if owner is None or owner is binding or binding is None:
            return entry
        if same_block and f"shape:{binding.path}" not in session.warned:
            session.warned.add(f"shape:{binding.path}")
            logger.warning(
                "adacache_fx: %s was called with new input shapes at step %d of a generation; it was "
                "captured for them and its cache starts empty (it computes until its next compute step "
                "has stored a residual of the new shape).", binding.path, session.tracker.step,
            )
        return None

    def region_states(self, session: Session, binding: Binding,
                      entries: list[CacheEntry | None]) -> tuple[tuple[RegionState, ...], tuple]:
        """Region states for this call's plan, and the token indices of ``PARTIAL`` regions."""
        plan, state = session.plan, session.policy_state
        reuse, partial = plan.reuse, plan.partial
        states: list[RegionState] = []
        tokens: list[torch.Tensor | None] = []
        for region, info, entry in zip(binding.program.regions, binding.branches, entries):
            subset = partial.get(info.id) if partial else None
            if subset is not None and entry is not None:
                flow = region.token_flow
                if flow is None:
                    self._warn_partial(session, info, region.token_error)
                elif subset.numel() == 0:
                    states.append(REUSE)
                    tokens.append(None)
                    continue
                else:
                    states.append(PARTIAL)
                    tokens.append(self._tokens(session, info, subset, flow.tokens, entry.values[0]))
                    continue
            if info.id in reuse and entry is not None:
                states.append(REUSE)
            elif self.caps.keeps(info, state):
                states.append(STORE)
            else:
                states.append(COMPUTE)
            tokens.append(None)
        return tuple(states), tuple(tokens)

    # -- running a block --------------------------------------------------------------------------
    def run_block(self, binding: Binding, leaves: list[Any], session: Session) -> Any:
        """One call of a bound block: plan its regions, run the matching graph, commit the results."""
        program = binding.program
        inputs = binding.inputs(leaves)
        if isinstance(session, TracedSession):
            outputs = self._run_traced(binding, inputs, session)
        else:
            outputs = self._run_variant(binding, inputs, session)
        return pytree.tree_unflatten(list(outputs[: program.num_user_outputs]), program.captured.out_spec)

    def _run_variant(self, binding: Binding, inputs: list[Any], session: Session) -> Any:
        program = binding.program
        signal = self.caps.signal if session.live else None
        if signal is not None and binding.depth == 0:
            self._signal_before(binding, inputs, session)
        entries = [self.entry(session, binding, info) for info in binding.branches]
        states, tokens = self.region_states(session, binding, entries)
        counts = tuple(0 if t is None else int(t.shape[0]) for t in tokens)
        partial_flops: dict[int, int | None] = {}
        for i, (info, state) in enumerate(zip(binding.branches, states)):
            if state == REUSE:
                inputs.extend(self.reuse_values(session, info, entries[i]))
            elif state == PARTIAL:
                inputs.append(tokens[i])
                inputs.extend(entries[i].values)
                partial_flops[i] = program.partial_flops(i, counts[i])
        graphs = session.call.graphs or self.graphs
        outputs = graphs.variant(program, states, counts)(*inputs)
        offset = program.num_user_outputs
        for i, (info, state) in enumerate(zip(binding.branches, states)):
            values: tuple = ()
            if state in (STORE, PARTIAL):
                values = tuple(outputs[offset:offset + info.num_residuals])
                offset += info.num_residuals
            self.commit(session, info, state, values, binding, entries[i], partial_flops.get(i))
        if (signal is not None and signal.kind == "first_blocks_residual" and binding.depth == signal.blocks - 1
                and session.call.stream_start is not None):
            session.decide(outputs[self._stream(binding)[1]] - session.call.stream_start)
        return outputs

    def _run_traced(self, binding: Binding, inputs: list[Any], session: TracedSession) -> Any:
        """Every cached region decides on its boolean input inside the graph (``torch.cond``)."""
        policy, state = self.policy, session.policy_state
        cached = tuple(policy.caches(info, state) for info in binding.branches)
        # torch.cond rejects operands that share storage, and models pass views of one tensor as
        # separate block inputs (CogVideoX slices text and video tokens out of one embedding).
        seen: list[torch.Tensor] = []
        for i, value in enumerate(inputs):
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                if any(torch._C._is_alias_of(value, other) for other in seen):
                    inputs[i] = value = value.clone()
                seen.append(value)
        for info, is_cached in zip(binding.branches, cached):
            if is_cached:
                inputs.append(session.reuse[info.id])
                inputs.extend(session.cache_in[info.id])
        in_step = session.in_step
        if in_step is not None and binding.depth == 0:
            in_step["start"] = inputs[self._stream(binding)[0]]
        outputs = binding.program.conditional(cached)(*inputs)
        signal = self.caps.signal
        if in_step is not None and binding.depth == signal.blocks - 1:
            residual = outputs[self._stream(binding)[1]] - in_step["start"]
            reuse, new_state = policy.decide_in_graph(residual, in_step["state"], in_step["allow"])
            in_step.update(reuse=reuse, new_state=new_state)
            for branch in in_step["covered"]:  # the later blocks decide on the graph's own value
                session.reuse[branch] = reuse
        offset = binding.program.num_user_outputs
        for info, is_cached in zip(binding.branches, cached):
            if is_cached:
                session.stored[info.id] = tuple(outputs[offset:offset + info.num_residuals])
                offset += info.num_residuals
        return outputs

    def _stream(self, binding: Binding) -> tuple[int, int]:
        if binding.program.stream is None:
            raise CaptureError(
                f"{binding.path}: no block output has the shape of its main input stream, so "
                f"{type(self.policy).__name__}'s first-blocks residual cannot be read there"
            )
        return binding.program.stream

    def _signal_before(self, binding: Binding, inputs: list[Any], session: Session) -> None:
        """Read the in-step signal that must exist before the first block runs."""
        signal = self.caps.signal
        if signal.kind == "modulated_input":
            probe = (session.call.graphs or self.graphs).probe(binding.program)
            if probe is None:
                raise PolicyError(
                    f"{type(self.policy).__name__} needs the {signal.kind!r} signal, but the first block "
                    f"{binding.path} has no branch with a projection to read it from"
                )
            session.decide(probe(*inputs)[0])
        elif signal.kind == "first_blocks_residual":
            session.call.stream_start = inputs[self._stream(binding)[0]]

    # -- values in, values out --------------------------------------------------------------------
    def reuse_values(self, session: Session, info: BranchInfo, entry: CacheEntry) -> tuple[torch.Tensor, ...]:
        """What a reused branch adds: the policy's forecast (live sessions), or its last residuals."""
        if session.live and self.caps.forecasts and session.context is not None:
            history = entry.history or [(-1, entry.values)]
            forecast = self.policy.forecast(session.context, session.policy_state, info, history)
            if forecast is not None:
                return tuple(forecast)
        return entry.values

    def commit(self, session: Session, info: BranchInfo, state: RegionState, values: tuple,
               owner: Any, entry: CacheEntry | None, partial_flops: int | None = None) -> None:
        """Count a branch execution and keep what it stored (``values``, for STORE and PARTIAL).

        ``owner``: what the entry will belong to; ``entry``: the one this call read (the previous
        residuals a watcher compares against). ``partial_flops``: FLOPs of a PARTIAL execution
        (unknown: counted as a full compute, never as a saving).
        """
        if not session.live:
            if state in (STORE, PARTIAL):
                session.stored[info.id] = values
            return
        record, call = session.record, session.call
        flops = info.flops or 0
        if record is not None:
            record.flops_total += flops
            if state == REUSE:
                record.reused += 1
            elif state == PARTIAL:
                record.partial += 1
                record.flops_computed += flops if partial_flops is None else partial_flops
            else:
                record.computed += 1
                # A cond-only guidance call computes half the rows the branch's FLOPs were counted for.
                record.flops_computed += flops // 2 if call.cond_only else flops
        if state not in (STORE, PARTIAL):
            return
        new = tuple(t.detach() for t in values)
        if (call.graphs or self.graphs).copies_outputs:  # the next replay reuses its output buffers
            new = tuple(t.clone() for t in new)
        policy_state = session.policy_state
        if self.caps.watches(info, policy_state) and session.context is not None:
            self.policy.observe(session.context, policy_state, info, new, entry.values if entry else None)
        if not self.policy.caches(info, policy_state):
            return
        if call.cond_only:
            # Cond rows only: merged into the full-batch entry, whose uncond rows stay as they were.
            full = session.caches.entry(session.slot, info.id)
            if full is None:
                return
            new = guidance.merge_rows(full.values, new, self.caps.guidance_layout)
            owner = full.owner
        session.caches.keep(session.slot, info.id, owner, session.tracker.step, new, self.caps.history(info))

    # -- helpers ----------------------------------------------------------------------------------
    def _warn_partial(self, session: Session, info: BranchInfo, reason: str | None) -> None:
        if f"partial:{info.id}" not in session.warned:
            session.warned.add(f"partial:{info.id}")
            logger.warning(
                "adacache_fx: %s asks to recompute %s for a token subset, which is not valid for it "
                "(%s); it computes fully instead", type(self.policy).__name__, info.id, reason,
            )

    def _tokens(self, session: Session, info: BranchInfo, subset: torch.Tensor, count: int,
                like: torch.Tensor) -> torch.Tensor:
        """Validated int64 token indices on the cache's device (moved once per call)."""
        key = (id(subset), like.device)
        moved = session.call.tokens.get(key)
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
        session.call.tokens[key] = moved
        return moved
