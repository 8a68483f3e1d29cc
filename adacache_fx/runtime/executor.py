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

import dataclasses
import functools
import logging
import operator
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from ..errors import AdaCacheError, CacheBudgetError, CaptureError, PolicyError
from ..passes.capture import BoundInputs, flatten_call, leaf_key
from ..passes.guards import GuardSet
from ..passes.program import BlockProgram
from ..passes.rewrite import RegionState
from ..policies.base import LOCAL, BranchInfo, Capabilities
from . import guidance
from .bridges import Bridge, Constants, find_bridge, span_residual
from .cache import CacheEntry, FoldedSpan, cond_rows
from .eager_block import EagerBinding, ProjectionFlops, run_on_view
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
    signature: Any = None  # the call signature the block's bindings hold it under

    @functools.cached_property
    def branch_ids(self) -> frozenset[str]:
        return frozenset(info.id for info in self.branches)

    @functools.cached_property
    def branch_flops(self) -> int:
        return sum(info.flops or 0 for info in self.branches)


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
        stored residuals are copied out, into buffers that keep their address (``CacheState.keep``)."""
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
        if self.options is None:  # run as it is: scatters in place (compilers do that themselves)
            return program.eager_variant(states, counts)
        return self._run(program, ("variant", states, counts), program.variant(states, counts))

    def probe(self, program: BlockProgram) -> Any:
        return self._run(program, ("probe",), program.probe())


class _Chain:
    """A span of blocks being recorded on a computing call, each taking the last one's outputs, or
    (one stream) a rearrangement of them that :func:`~.bridges.find_bridge` proved.

    Streams are keyed by output position at the chain's first block. Outputs are held weakly (a
    replay needs them only where a later block also reads them: a cut), the chain's inputs and
    its current outputs strongly until the call ends."""

    def __init__(self, carried: list[torch.Tensor], call_number: int) -> None:
        self.bindings: list[Binding] = []
        self.start = dict(enumerate(carried))  # key -> the tensor entering the first block
        self.keys: list[list[int]] = []  # per block: the key of each output position
        self.layouts: list[tuple[tuple[int, ...], ...]] = []
        self.keeps_shapes: list[bool] = []  # per block: its outputs have its carried inputs' shapes
        self.bridges: list[Bridge | None] = []  # per block: the bridge from the block before (None: none)
        self.bridged: dict[int, weakref.ref] = {}  # position -> its input, where a bridge made it
        self.last: dict[int, torch.Tensor] = {}
        self.ends: dict[int, int] = {}  # id of a current output -> its key
        self.cuts: dict[int, dict[int, torch.Tensor]] = {}  # position -> key -> that block's output
        self.broken = False
        self.call_number = call_number  # the block call that extended it last (see CallState.block_calls)

    def continued_by(self, carried: list[torch.Tensor]) -> bool:
        return len(carried) == len(self.ends) and all(
            self.ends.get(id(t)) is not None and self.last[self.ends[id(t)]] is t for t in carried)

    def extend(self, binding: Binding, carried: list[torch.Tensor], outputs: list[torch.Tensor],
               produced: dict, call_number: int, bridge: Bridge | None = None) -> None:
        if bridge is not None:  # one stream, rearranged on its way here
            keys = list(self.last)
            self.bridged[len(self.bindings)] = weakref.ref(carried[0])
        else:
            keys = [self.ends[id(t)] for t in carried] if self.bindings else list(range(len(carried)))
        position = len(self.bindings)
        self.bindings.append(binding)
        self.keys.append(keys)
        self.bridges.append(bridge)
        self.layouts.append(tuple(o.stride() for o in outputs))
        self.keeps_shapes.append(all(o.shape == t.shape for o, t in zip(outputs, carried)))
        self.last = dict(zip(keys, outputs))
        self.ends = {id(o): key for o, key in zip(outputs, keys)}
        self.call_number = call_number
        for output, key in zip(outputs, keys):
            produced[id(output)] = (weakref.ref(output), self, position, key)

    def cut(self, position: int, produced: dict) -> None:
        """Block ``position``'s outputs are read elsewhere: a span ends after it."""
        if position in self.cuts:
            return
        if position == len(self.bindings) - 1:  # the chain's current end: its outputs are at hand
            self.cuts[position] = dict(self.last)
            return
        outputs = {key: ref() for ref, chain, p, key in produced.values() if chain is self and p == position}
        if len(outputs) != len(self.start) or any(v is None for v in outputs.values()):
            self.broken = True  # a stream's value there is gone: keep no span of this chain
            return
        self.cuts[position] = outputs

    def _entering(self, begin: int) -> dict[int, torch.Tensor] | None:
        """What entered block ``begin``, by key (None: a bridged input no longer held)."""
        if begin == 0:
            return self.start
        if self.bridges[begin] is None:
            return self.cuts[begin - 1]
        value = self.bridged[begin]()
        return None if value is None else {self.keys[begin][0]: value}

    def spans(self, constants: Constants | None) -> list[FoldedSpan]:
        if self.broken or not self.bindings:
            return []
        out, begin = [], 0
        ends = sorted(p for p in self.cuts if p < len(self.bindings) - 1) + [len(self.bindings) - 1]
        for end in ends:
            before = self._entering(begin)
            after = self.cuts.get(end, self.last) if end < len(self.bindings) - 1 else self.last
            bridges = tuple(None if i == begin else self.bridges[i] for i in range(begin, end + 1))
            residuals = {} if before is not None else None
            for position, key in enumerate(self.keys[begin]) if before is not None else ():
                start, stop = before[key], after[key]
                if any(bridges):  # one stream, in the last block's layout (see bridges.py)
                    if not all(self.keeps_shapes[begin:end + 1]):
                        residuals = None  # the last block would be handed a stream of another shape
                        break
                    residuals[position] = span_residual(start, stop, list(bridges[1:]), constants)
                elif stop.shape != start.shape:
                    residuals = None  # the stream changed shape: it cannot be added back
                    break
                else:
                    residuals[position] = (stop - start.to(stop.dtype)).detach()
            if residuals is not None:  # keyed by the output positions at the piece's first block, as a replay counts
                out.append(FoldedSpan(tuple(self.bindings[begin:end + 1]), residuals,
                                      tuple(self.layouts[begin:end + 1]), bridges if any(bridges) else ()))
            begin = end + 1
        return out


_SPAN_CHECKS_KEPT = 16  # joint span checks an executor keeps (spans by first block and bindings)


@dataclass(frozen=True, eq=False)
class _SpanCheck:
    """A folded span's bindings, the branches they hold, and the joint check of its later blocks' guards."""

    bindings: tuple[Binding, ...]
    branch_ids: frozenset[str]
    guards: GuardSet


_IMMUTABLE_LEAVES = (torch.Tensor, type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)


def _immutable(value: Any, depth: int = 0) -> bool:
    """A tensor, a scalar, or a plain tuple of them (a few levels deep): nothing a caller can change in
    place between two block calls that would change what a block call reads from it."""
    if type(value) is tuple:
        return depth < 4 and all(_immutable(item, depth + 1) for item in value)
    return isinstance(value, _IMMUTABLE_LEAVES)


@dataclass(eq=False)
class _PassedCall:
    """The last passed-through block's call in a replay, kept when every argument is immutable (tensors,
    scalars, plain tuples of them): a next block called with the same objects has the same leaves, and
    the same result when its outputs are the same tensors and the result is immutable too (a list
    handed to two callers could be changed by the first)."""

    args: tuple
    kwarg_names: tuple[str, ...]
    kwarg_values: tuple
    leaves: list[Any]
    signature: tuple
    spec: Any
    user: tuple
    result: Any
    shareable: bool  # the result is immutable (so is every result of ``spec``)

    def same_call(self, args: tuple, kwargs: dict) -> bool:
        return (len(args) == len(self.args) and all(map(operator.is_, args, self.args))
                and len(kwargs) == len(self.kwarg_names) and tuple(kwargs) == self.kwarg_names
                and all(map(operator.is_, kwargs.values(), self.kwarg_values)))

    def same_outputs(self, user: tuple) -> bool:
        return len(user) == len(self.user) and all(map(operator.is_, user, self.user))

    @staticmethod
    def immutable(args: tuple, kwargs: dict) -> bool:
        return all(map(_immutable, args)) and all(map(_immutable, kwargs.values()))


class Executor:
    """See the module docstring. One per transformed model (or exported runner)."""

    def __init__(self, caps: Capabilities, graphs: GraphRunner | None = None) -> None:
        self.caps = caps
        self.policy = caps.policy
        self.graphs = graphs or GraphRunner()
        self.blocks: dict[str, Any] = {}  # block path -> the wrapper block (a span checks them live)
        # (A folded span's first block path, its bindings' ids) -> its other blocks' guards checked as one
        # (dropped when a block's guard is dropped or recorded anew: a set holds the tensors its guards
        # checked).
        self._span_guards: dict[tuple, _SpanCheck] = {}
        self.cache_budget: int | None = None  # bytes one session may hold (transform(cache_budget=))
        self.constants: Constants | None = None  # the model's tensors outside its blocks (bridges.py)

    # -- cache entries ----------------------------------------------------------------------------
    def entry(self, session: Session, binding: Binding | None, info: BranchInfo) -> CacheEntry | None:
        """The entry a call of ``binding`` may read for ``info`` (cond rows in a cond-only call),
        or None: nothing stored, or stored by another binding (other shapes, an earlier model)."""
        entry = session.caches.entry(session.slot, info.id)
        if entry is None:
            return None
        owner = entry.owner
        same_block = isinstance(owner, (Binding, EagerBinding)) and binding is not None and (
            owner.path == binding.path and owner.epoch == binding.epoch)
        if session.call.cond_only:
            if owner is None or binding is None or same_block:
                return cond_rows(entry, self.caps.guidance_layout)
            return None
        if owner is None or owner is binding or binding is None:
            return entry
        if same_block:
            self._warn_new_shapes(session, binding)
        return None

    @staticmethod
    def _warn_new_shapes(session: Session, binding: Binding) -> None:
        if f"shape:{binding.path}" in session.warned:
            return
        session.warned.add(f"shape:{binding.path}")
        logger.warning(
            "adacache_fx: %s was called with new input shapes or dtypes, or under another autocast or "
            "attention backend, at step %d of a generation; it was captured for them and its cache starts "
            "empty (it computes until its next compute step has stored a residual for them).",
            binding.path, session.tracker.step,
        )

    def region_states(self, session: Session, binding: Binding,
                      entries: list[CacheEntry | None]) -> tuple[tuple[RegionState, ...], tuple]:
        """Region states for this call's plan, and the token indices of ``PARTIAL`` regions."""
        folds = self._folds(session, binding)  # a folded span keeps them, not each branch
        decided = [self.branch_state(session, region, info, entry, folds)
                   for region, info, entry in zip(binding.program.regions, binding.branches, entries)]
        return tuple(state for state, _ in decided), tuple(tokens for _, tokens in decided)

    def branch_state(self, session: Session, region: Any, info: BranchInfo, entry: CacheEntry | None,
                     folds: bool = False) -> tuple[RegionState, torch.Tensor | None]:
        """One branch's state for this call's plan (and its token indices when ``PARTIAL``). A token
        subset asked of a region with no token flow computes fully, with a warning saying why."""
        plan, state = session.plan, session.policy_state
        subset = plan.partial.get(info.id) if plan.partial else None
        if subset is not None and entry is not None:
            flow = region.token_flow
            if flow is None:
                self._warn_partial(session, info, region.token_error)
            elif subset.numel() == 0:
                return REUSE, None
            else:
                return PARTIAL, self._tokens(session, info, subset, flow.tokens, entry.values[0])
        if info.id in plan.reuse and entry is not None:
            return REUSE, None
        if self.caps.watches(info, state) or (self.policy.caches(info, state) and not folds):
            return STORE, None
        return COMPUTE, None

    # -- running a block --------------------------------------------------------------------------
    def run_block(self, binding: Binding, leaves: list[Any], session: Session) -> Any:
        """One call of a bound block: plan its regions, run the matching graph, commit the results."""
        program = binding.program
        if isinstance(session, TracedSession):
            outputs = self._run_traced(binding, binding.inputs(leaves), session)
        else:
            signal = self.caps.signal if session.live and not session.call.skip_signal else None
            inputs = None
            if signal is not None and binding.depth == 0:
                inputs = binding.inputs(leaves)
                self._signal_before(binding, inputs, session)
            outputs = self._replay(session, binding, leaves) if session.call.fold else None
            if outputs is None:  # (a replayed block reads none of its parameters)
                outputs = self._run_variant(binding, inputs or binding.inputs(leaves), session, leaves)
        return pytree.tree_unflatten(list(outputs[: program.num_user_outputs]), program.captured.out_spec)

    def _run_variant(self, binding: Binding, inputs: list[Any], session: Session, leaves: list[Any]) -> Any:
        program = binding.program
        signal = self.caps.signal if session.live and not session.call.skip_signal else None
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
        if session.call.fold:
            self._record_span(session, binding, leaves, states, outputs)
        if (signal is not None and signal.kind == "first_blocks_residual" and binding.depth == signal.blocks - 1
                and session.call.stream_start is not None):
            session.decide(outputs[self._stream(binding)[1]] - session.call.stream_start)
        return outputs

    # -- folded spans (see passes/fold.py) ---------------------------------------------------------
    def _folds(self, session: Session, binding: Binding) -> bool:
        """Whether this block's branches are kept as part of a folded span instead of one by one."""
        state = session.policy_state
        return (session.call.fold and binding.program.fold is not None
                and all(self.policy.caches(info, state) for info in binding.branches))

    def _record_span(self, session: Session, binding: Binding, leaves: list[Any], states: tuple,
                     outputs: Any) -> None:
        """On a computing call: extend the span the block's inputs end, or start one."""
        call = session.call
        if not self._folds(session, binding) or any(s in (REUSE, PARTIAL) for s in states):
            self.note_inputs(session, leaves)
            self._end_chain(session)
            return
        carried = [leaves[i] for i in binding.program.fold]
        chain = call.chain
        continues = chain is not None and chain.continued_by(carried)
        bridge = None if continues or chain is None else self._bridge(session, chain, binding, carried)
        continues = continues or bridge is not None
        self.note_inputs(session, leaves, carried if continues else ())
        if not continues:
            self._end_chain(session)
            chain = call.chain = _Chain(carried, call.block_calls)
        chain.extend(binding, carried, list(outputs[:len(carried)]), call.produced, call.block_calls, bridge)

    def _bridge(self, session: Session, chain: _Chain, binding: Binding, carried: list[Any]) -> Bridge | None:
        """The bridge from the chain's last block to this one (the model's code between them, proven
        once per generation: see bridges.py), or None. One stream only, and only when no other block
        ran between them."""
        if len(carried) != 1 or len(chain.last) != 1 or chain.call_number != session.call.block_calls - 1:
            return None
        key = (chain.bindings[-1], binding)
        if key not in session.bridges:
            bridge = find_bridge(next(iter(chain.last.values())), carried[0], self.constants)
            if bridge is not None and bridge.rows is not None:  # one row map per rearrangement, not per gap
                known = next((b.rows for b in session.bridges.values() if b is not None and b.rows is not None
                              and b.rows.shape == bridge.rows.shape and torch.equal(b.rows, bridge.rows)), None)
                bridge = bridge if known is None else dataclasses.replace(bridge, rows=known)
            session.bridges[key] = bridge
        bridge = session.bridges[key]
        return bridge if bridge is not None and bridge.shape == carried[0].shape else None

    def note_inputs(self, session: Session, leaves: list[Any], carried: Any = ()) -> None:
        """Inputs of a block call that are outputs of a recorded span's block, other than the stream
        the next block of the span carries on (HunyuanDiT's long skips): the span must end there,
        since a replay gives its inner blocks' outputs other values."""
        produced = session.call.produced
        if not produced:
            return
        carried_ids = {id(t) for t in carried}
        for leaf in leaves:
            entry = produced.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None
            if entry is None or entry[0]() is not leaf or id(leaf) in carried_ids:
                continue
            entry[1].cut(entry[2], produced)

    def _end_chain(self, session: Session) -> None:
        call = session.call
        if call.chain is not None:
            call.closed.append(call.chain)
            call.chain = None

    def _store_spans(self, session: Session) -> None:
        """At the end of a computing call, every recorded chain, cut where its blocks' outputs were
        used elsewhere, becomes one folded span per piece."""
        self._end_chain(session)
        state = session.policy_state
        for chain in session.call.closed:
            for span in chain.spans(self.constants):
                session.caches.keep_span(session.slot, span)
                narrow = min((r.dtype for r in span.residuals.values()), key=lambda d: torch.finfo(d).bits,
                             default=None) if span.residuals else None
                for binding in span.bindings:  # the span replaces them, but those the policy watches
                    for info in binding.branches:
                        if not self.caps.watches(info, state):
                            session.caches.drop(session.slot, info.id)
                        elif narrow is not None:
                            # Kept only for the policy's next comparison: at the stream's precision (Wan
                            # computes its residuals in float32 beside a bf16 stream; that doubled them).
                            session.caches.narrow(session.slot, info.id, narrow)
        session.call.closed = []
        session.call.produced = {}

    def _reused_whole(self, session: Session, binding: Binding) -> bool:
        plan = session.plan
        return not plan.partial and not session.call.cond_only and binding.branch_ids <= plan.reuse

    def _span_intact(self, session: Session, span: FoldedSpan, first: Binding) -> bool:
        """Every block of ``span`` is reused whole by this call's plan and bound as when the span was
        recorded, and none but ``first`` (whose call checked its guard just now) changed since: their
        guards are checked as one :class:`GuardSet`."""
        plan = session.plan
        if plan.partial or session.call.cond_only:
            return False
        # Keyed by the bindings' identities (a check holds its bindings, so their ids stay theirs): the
        # spans of two call slots bound at different signatures each keep theirs.
        key = (first.path, tuple(map(id, span.bindings)))
        checked = self._span_guards.get(key)
        if checked is None:
            for binding in span.bindings:
                block = self.blocks.get(binding.path)
                if block is None or block.epoch != binding.epoch or block.guard is None:
                    return False
            # Kept until a block's guard is dropped or recorded anew (forget_span_guards): till then
            # each block is at its binding's epoch, with the guard collected here.
            if len(self._span_guards) >= _SPAN_CHECKS_KEPT:  # spans of signatures seen long ago
                self._span_guards.clear()
            checked = self._span_guards[key] = _SpanCheck(
                span.bindings, frozenset().union(*(b.branch_ids for b in span.bindings)),
                GuardSet([self.blocks[b.path].guard for b in span.bindings if b is not first]))
        return checked.branch_ids <= plan.reuse and checked.guards.holds()

    def forget_span_guards(self) -> None:
        """Drop every joint span check (a block's guard was dropped or recorded anew): what the old
        guards held, weights replaced since (quantized, fused), is not kept alive by them."""
        self._span_guards.clear()

    def pass_through(self, session: Session, block: Any, args: tuple, kwargs: dict) -> Any:
        """A later block of the folded span being replayed, called as the span recorded it (the binding
        at this position, that binding's input signature): the block's outputs, its stream inputs passed
        on. Its leaves' signature keys are computed once per replayed call and object, not per block (the
        model passes the same embeddings to every block); a block called with the very objects the block
        before it was (its passed-on streams, the same embeddings), all immutable, has that call's leaves
        and, under an equal signature, its outputs. None sends the call down the general path, which
        decides, or refuses, as before."""
        replay = session.call.replay
        position = replay["position"]
        binding = replay["span"].bindings[position]
        signature = binding.signature
        if position == 0 or signature is None or binding.path != block.path or binding.epoch != block.epoch:
            return None
        last: _PassedCall | None = replay.get("last")
        if last is not None and last.same_call(args, kwargs) and (
                signature is last.signature or signature == last.signature):
            leaves = last.leaves
        else:
            last = None
            leaves, structure = flatten_call(args, kwargs)
            if structure != signature[0] or session.ambient != signature[2] or len(leaves) != len(signature[1]):
                return None
            known = replay["leaf_keys"]  # id -> (leaf, its key): the leaf is held, so its id stays its own
            for leaf, recorded in zip(leaves, signature[1]):
                seen = known.get(id(leaf))
                if seen is None or seen[0] is not leaf:
                    seen = known[id(leaf)] = (leaf, leaf_key(leaf))
                if seen[1] != recorded:
                    return None
        outputs = self._replay(session, binding, leaves)
        program = binding.program
        user = tuple(outputs[: program.num_user_outputs])
        spec = program.captured.out_spec
        if last is not None and last.spec is spec and last.shareable and last.same_outputs(user):
            result = last.result
        else:
            result = pytree.tree_unflatten(list(user), spec)
        if last is not None:
            if last.spec is not spec:  # another program with the same input signature
                last.spec, last.shareable = spec, _immutable(result)
            last.result, last.user = result, user
        elif _PassedCall.immutable(args, kwargs):
            replay["last"] = _PassedCall(args, tuple(kwargs), tuple(kwargs.values()), leaves, signature, spec,
                                         user, result, _immutable(result))
        return result

    def _replay(self, session: Session, binding: Binding, leaves: list[Any]) -> Any:
        """On a reusing call: the span's first block adds each stream's folded residual, the others
        pass their inputs through (what they return is what the computing call gave the next block:
        a sum, so the next block's input layout is the recorded one). None when no recorded span
        starts here: the block runs as usual."""
        call = session.call
        fold = binding.program.fold
        replay = call.replay
        if replay is None:
            if fold is None or not self._reused_whole(session, binding):
                return None
            span = session.caches.span(session.slot, binding.path)
            if span is not None and span.bindings[0] is not binding and span.bindings[0].epoch == binding.epoch:
                self._warn_new_shapes(session, binding)  # recorded for other shapes: never replayed here
            # (The first block's guard was checked by its call just now: its binding is current.)
            if span is None or span.bindings[0] is not binding or not self._span_intact(session, span, binding):
                return None
            # ``intact``: the span's blocks whose guards were checked just now, which their own calls
            # in this replay need not check again (a passed-through block reads none of its state).
            replay = call.replay = {"span": span, "position": 0, "keys": {}, "call": call.block_calls,
                                    "intact": frozenset(b.path for b in span.bindings), "leaf_keys": {}}
            keys = list(range(len(fold)))
        else:
            span = replay["span"]
            carried = [leaves[i] for i in fold] if fold is not None else []
            bridge = span.bridges[replay["position"]] if span.bridges else None
            if bridge is not None:  # the model's code between the blocks made this input (bridges.py)
                keys = [0] if (len(carried) == 1 and carried[0].shape == bridge.shape
                               and replay["call"] == call.block_calls - 1) else [None]
            else:
                keys = [replay["keys"].get(id(t)) for t in carried]
            if (span.bindings[replay["position"]] is not binding or None in keys
                    or not self._reused_whole(session, binding)):
                raise AdaCacheError(
                    f"{binding.path}: the folded span starting at {span.bindings[0].path} was recorded with "
                    f"{span.bindings[replay['position']].path} here, taking its stream from the block before; "
                    "this call does otherwise (the model's code between blocks changed its path). Transform "
                    "with fold=False to cache every branch on its own"
                )
        carried = [leaves[i] for i in fold]
        position = replay["position"]
        first, last = position == 0, position == len(span.bindings) - 1
        adds = last if span.adds_at_last else first
        replay["call"] = call.block_calls
        outputs = []
        for j, key in enumerate(keys):
            value, stride = carried[j], span.layouts[position][j]
            if adds or value.stride() != stride:  # what the next block was captured for: this layout
                out = torch.empty_strided(value.shape, stride, dtype=value.dtype, device=value.device)
                if adds:
                    torch.add(value, span.residuals[key].to(value.dtype), out=out)
                else:
                    out.copy_(value)
                value = out
            outputs.append(value)
        self._count_reused(session, binding)
        if last:
            call.replay = None
        else:
            replay["position"] += 1
            replay["keys"] = {id(out): key for out, key in zip(outputs, keys)}
        return outputs

    def finish_call(self, session: Session) -> None:
        """The model call ended: store the span still open; a replay cut short is an error."""
        if session.call.replay is not None:
            span = session.call.replay["span"]
            session.call.replay = None
            raise AdaCacheError(
                f"the folded span {span.bindings[0].path} .. {span.bindings[-1].path} ended early this call: its "
                "blocks were recorded in one chain that this call left. Transform with fold=False"
            )
        self._store_spans(session)
        session.caches.note_peak()
        budget = self.cache_budget
        if budget is not None and session.caches.peak > budget:
            held = session.caches.nbytes()
            spans = sum(len(session.caches.spans(slot)) for slot in session.caches.slots())
            hint = ("folding is on" if session.call.fold else
                    "transform(..., fold=True) keeps one residual per stream for each span of blocks reused "
                    "together" if self.policy.folds() else
                    f"{type(self.policy).__name__} needs each branch's residual (it does not fold)")
            session.caches.clear()
            raise CacheBudgetError(
                f"the residual caches reached {held / 2**30:.3f} GiB ({held} bytes, {spans} folded span(s)), above "
                f"cache_budget={budget} bytes; {hint}. Cache fewer branches (Static(kinds=...)), run fewer call "
                "slots at once, or raise the budget. The caches were dropped"
            )

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
            group = session.context.group if session.context is not None else LOCAL
            reuse, new_state = policy.decide_in_graph(residual, in_step["state"], in_step["allow"], group)
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

    # -- step-invariant block lists (see invariant.py) ------------------------------------------------
    def replayed_invariant(self, binding: Any, leaves: list[Any], session: Session) -> None:
        """A block of a step-invariant list returned its recorded output: count its branches as exact
        reuses (not the policy's: ``StepRecord.exact``), and end any span being recorded (it did not run)."""
        self.note_inputs(session, leaves)
        self._end_chain(session)
        record = session.record
        if record is not None:
            for info in getattr(binding, "branches", ()):
                record.exact += 1
                record.flops_total += info.flops or 0

    # -- blocks run eagerly, branch child by branch child (see eager_block.py) ----------------------
    def run_eager(self, binding: EagerBinding, block: nn.Module, args: tuple, kwargs: dict, session: Session,
                  on_measured: Any = None) -> Any:
        """One call of a block that runs eagerly with cached branch children. Its first call
        (``binding.measured`` false) computes every child, counting each one's FLOPs, and hands
        ``on_measured(calls, total_flops, output)`` the calls; that returns the measured binding, whose
        branches then store what they computed."""
        if not session.live:
            raise CaptureError(
                f"{binding.path} could not be captured as one graph ({binding.reason}); its branches run "
                "eagerly, which a traced driver (ax.compile(scope='model'), ONNX or TensorRT export) cannot "
                "include. Use ax.compile(scope='blocks') (its other blocks still compile), or leave its block "
                "list out with transform(..., blocks=[...])"
            )
        self.note_inputs(session, pytree.tree_leaves((args, kwargs)))  # a span's output read here ends it
        self._end_chain(session)
        signal = None if session.call.skip_signal else self.caps.signal
        stream = _main_tensor(args, kwargs)
        if signal is not None and binding.depth == 0:
            if signal.kind == "modulated_input":
                raise PolicyError(
                    f"{type(self.policy).__name__} reads its signal from a projection inside the first block, "
                    f"but {binding.path} could not be captured ({binding.reason}): no graph to read it from. "
                    "Use a policy that decides on a residual (FirstBlockCache, AdaCache) or on a schedule"
                )
            if signal.kind == "first_blocks_residual":
                session.call.stream_start = stream
        counts: dict[str, int] = {}
        if binding.measured:
            def run(name: str, child: nn.Module, a: tuple, kw: dict) -> Any:
                occurrence = counts[name] = counts.get(name, -1) + 1
                index = binding.region_for(name, occurrence)
                return child(*a, **kw) if index is None else self._run_child(session, binding, index, child, a, kw)

            output = run_on_view(block, binding.children, run, args, kwargs)
        else:
            calls: list[tuple] = []

            def run(name: str, child: nn.Module, a: tuple, kw: dict) -> Any:
                occurrence = counts[name] = counts.get(name, -1) + 1
                before = counter.flops.get(name, 0)
                out = child(*a, **kw)
                calls.append((name, occurrence, child, a, kw, out, counter.flops.get(name, 0) - before))
                return out

            with ProjectionFlops(block, binding.children) as counter:
                output = run_on_view(block, binding.children, run, args, kwargs)
            total_flops = counter.total
            binding = on_measured(calls, total_flops, output)
            for index, info in enumerate(binding.branches):
                out = next(c[5] for c in calls if binding.region_for(c[0], c[1]) == index)
                entry = self.entry(session, binding, info)
                state = STORE if self.caps.watches(info, session.policy_state) or self.policy.caches(
                    info, session.policy_state) else COMPUTE
                self.commit(session, info, state, _tensors(out) if state == STORE else (), binding, entry)
        if (signal is not None and signal.kind == "first_blocks_residual" and binding.depth == signal.blocks - 1
                and session.call.stream_start is not None):
            start = session.call.stream_start
            end = next((t for t in pytree.tree_leaves(output)
                        if isinstance(t, torch.Tensor) and t.shape == start.shape), None)
            if end is None:
                raise CaptureError(
                    f"{binding.path}: no output of the block has the shape of its main input, so "
                    f"{type(self.policy).__name__}'s first-blocks residual cannot be read there"
                )
            session.decide(end - start)
        return output

    def _run_child(self, session: Session, binding: EagerBinding, index: int, child: nn.Module, args: tuple,
                   kwargs: dict) -> Any:
        region, info = binding.regions[index], binding.branches[index]
        entry = self.entry(session, binding, info)
        state, _ = self.branch_state(session, region, info, entry)  # (no token flow: never PARTIAL)
        if state == REUSE:
            values = self.reuse_values(session, info, entry)
            if len(values) == region.num_residuals:
                self.commit(session, info, REUSE, (), binding, entry)
                return region.rebuild(tuple(values))
            state = STORE
        output = child(*args, **kwargs)
        self.commit(session, info, state, _tensors(output) if state == STORE else (), binding, entry)
        return output

    # -- values in, values out --------------------------------------------------------------------
    def reuse_values(self, session: Session, info: BranchInfo, entry: CacheEntry) -> tuple[torch.Tensor, ...]:
        """What a reused branch adds: the policy's forecast (live sessions), or its last residuals."""
        if session.live and self.caps.forecasts and session.context is not None:
            history = entry.history or [(-1, entry.values)]
            forecast = self.policy.forecast(session.context, session.policy_state, info, history)
            if forecast is not None:
                return tuple(forecast)
        return entry.values

    def _count_reused(self, session: Session, binding: Binding) -> None:
        """What :meth:`commit` does for each of ``binding``'s branches reused (a replayed span's block):
        count them, at once."""
        record = session.record
        if session.live and record is not None:
            record.flops_total += binding.branch_flops
            record.reused += len(binding.branches)

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
        stable = (call.graphs or self.graphs).copies_outputs  # the next replay reuses its output buffers
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
        session.caches.keep(session.slot, info.id, owner, session.tracker.step, new, self.caps.history(info),
                            stable=stable)

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


def _tensors(output: Any) -> tuple[torch.Tensor, ...]:
    return tuple(leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor))


def _main_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    hidden = kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor):
        return hidden
    return next((leaf for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)), None)
