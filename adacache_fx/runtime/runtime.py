"""The runtime of one transformed model: its programs, its branches, and one session per thread.

The model's forward pre-hook starts each call in the calling thread's :class:`~.session.Session`
(step tracking, the policy's plan, guidance halving); every wrapped block then asks
:meth:`ModelRuntime.binding` for the program that fits its live state and input signature and hands
it to the :class:`~.executor.Executor`. Programs are built by the pass pipeline under a lock (one
capture at a time, shared by structurally identical blocks) and never change afterwards; a block
whose guard fails is bound anew, at a new epoch, so it never reads residuals of its old self.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from ..errors import AdaCacheError, CaptureError
from ..passes.guards import GuardSet, ambient_state, guard_module, is_portable, structural_key
from ..passes.program import BlockProgram, build_program
from ..policies.base import BranchInfo, Capabilities, Policy
from . import guidance
from .adapter_weights import AdapterWeights
from .eager_block import EagerBinding, EagerRegion, branch_children, kind_of, why_not_viewable
from .captures import CaptureCache
from .executor import Binding, Executor, GraphRunner
from .outside import CompiledOutside
from .parallel import context_parallel_group
from .session import Session

logger = logging.getLogger("adacache_fx")

TIMESTEP_ARG_NAMES = ("timestep", "timesteps", "t", "sigma", "sigmas")
#: Times one block may be bound anew within one generation because the model keeps changing under
#: it (a LoRA scale set every step, a forward that rewrites its own attributes); beyond it the block
#: runs uncached for the rest of that generation, with a warning (dynamo's recompile limit plays the
#: same part). Changes between generations (switching adapters per request) are not limited.
RECAPTURE_LIMIT = 8


@dataclass(frozen=True)
class Uncached:
    """A block (at one signature) that runs as the original module: why."""

    reason: str


def _forward_parameters(model: nn.Module) -> list[str]:
    forward = inspect.unwrap(type(model).forward)
    try:
        return list(inspect.signature(forward).parameters)[1:]  # drop self
    except (TypeError, ValueError):
        return []


@dataclass(frozen=True)
class TimestepReader:
    """Reads the model's timestep argument (``name``, positional index ``position``) as a float."""

    name: str
    position: int

    def __call__(self, args: tuple, kwargs: dict) -> float | None:
        name, position = self.name, self.position
        value = kwargs.get(name) if name in kwargs else (args[position] if position < len(args) else None)
        if value is None:
            return None
        if isinstance(value, torch.Tensor):
            if value.numel() == 0 or value.device.type == "meta":
                return None  # a shapes-only run (meta tensors) has no timestep to read
            return float(value.detach().reshape(-1)[0].item())
        return float(value)


def _timestep_reader(model: nn.Module) -> tuple[TimestepReader | None, str | None]:
    params = _forward_parameters(model)
    name = next((n for n in TIMESTEP_ARG_NAMES if n in params), None)
    if name is None:
        return None, None
    return TimestepReader(name, params.index(name)), name


def main_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The latent a model call denoises: ``hidden_states`` (diffusers' name) or the first tensor."""
    hidden = kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor):
        return hidden
    return next((a for a in args if isinstance(a, torch.Tensor)), None)


@dataclass(frozen=True)
class FramesReader:
    """``reader(args, kwargs) -> int | None``: latent frames per sample after temporal patching.

    Video DiTs take 5-D latents, (B, C, T, H, W) or CogVideoX's (B, T, C, H, W): the channel axis is
    the one equal to ``config.in_channels``. LTX-Video takes tokens plus a ``num_frames`` argument.
    """

    in_channels: int | None
    patch_t: int

    @classmethod
    def of(cls, model: nn.Module) -> "FramesReader":
        config = getattr(model, "config", None)
        patch_t = getattr(config, "patch_size_t", None)
        patch = getattr(config, "patch_size", None)
        if patch_t is None and isinstance(patch, (tuple, list)) and len(patch) == 3:
            patch_t = patch[0]
        return cls(getattr(config, "in_channels", None), int(patch_t or 1))

    def __call__(self, args: tuple, kwargs: dict) -> int | None:
        frames = kwargs.get("num_frames")
        if isinstance(frames, int):
            return frames
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if not isinstance(hidden, torch.Tensor) or hidden.ndim != 5:
            return None
        axis = 1 if hidden.shape[2] == self.in_channels and hidden.shape[1] != self.in_channels else 2
        return max(1, int(hidden.shape[axis]) // self.patch_t)


class ModelRuntime:
    """State of one transformed model (see the module docstring)."""

    def __init__(self, model: nn.Module, policy: Policy, recapture_limit: int = RECAPTURE_LIMIT,
                 fold: bool = True, captures: CaptureCache | None = None) -> None:
        self.policy = policy
        self.shared_captures = captures  # programs shared with other models (see .captures)
        self.fold = fold
        self.caps = Capabilities.of(policy)
        self.executor = Executor(self.caps)
        self.recapture_limit = recapture_limit
        self.read_timestep, self.timestep_arg = _timestep_reader(model)
        self.read_frames = FramesReader.of(model)
        self.blocks: list[nn.Module] = []  # the CachedBlock wrappers, set by transform()
        self.auxiliary_lists: frozenset[str] = frozenset()  # deeper lists (see find_blocks), set by transform()
        self.left_alone: list[tuple[str, str]] = []
        self.hooks: list[Any] = []
        self.signals: Any = None  # the diffusers hook that hears pipeline calls end (if any)
        # (whether the model had its own ``_repeated_blocks``, that list): transform extends it, restore undoes
        self.repeated_blocks_before: tuple[bool, Any] | None = None
        self._handoff_graphs: GraphRunner | None = None  # block graphs of calls torch.compile hands over
        self._model = weakref.ref(model)  # refreshed by every call (a pickled runtime comes back without it)
        self.outside: CompiledOutside | None = None  # modules outside the blocks compiled beside them
        self._init_state()

    def _init_state(self) -> None:
        self._lock = threading.RLock()  # captures, branch registration and session creation
        self.programs: dict[Any, BlockProgram] = {}  # (structure, signature) -> program
        # The same key -> the error its capture raised: blocks of that structure are not exported again.
        self.capture_failures: dict[Any, CaptureError] = {}
        self.branches: dict[str, BranchInfo] = {}
        self._branch_tuple: tuple[BranchInfo, ...] = ()
        self.block_order: list[str] = []
        self.auxiliary_order: list[str] = []
        self.block_flops: dict[str, int | None] = {}
        self.uncached_blocks: dict[str, str] = {}
        # Blocks export could not take, run eagerly with cached branch children: path -> why (eager_block.py)
        self.eager_blocks: dict[str, str] = {}
        # Main block lists found step-invariant (see invariant.py): numbered after the latent path's blocks.
        self.invariant_lists: set[str] = set()
        # (block, what changed), in order, by any thread's call; its length is how many block changes were
        # found (see _check_changes_found_elsewhere)
        self.recaptures: list[tuple[str, str]] = []
        # (where, what changed) where no block's guard looks, each dropping a session's caches, in order
        self.cache_drops: list[tuple[str, str]] = []
        self._adapters: tuple[tuple[int, ...], AdapterWeights] | None = None  # (block epochs, found then)
        self._all_guards: tuple | None = None  # (ids of the blocks' guards, their GuardSet)
        self.model_flops: int | None = None
        self._validated_for: tuple[BranchInfo, ...] | None = None
        self._sessions: list[Session] = []
        self._local = threading.local()
        self._threads: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._metric_groups: dict = {}  # context-parallel config -> its metric group (see .parallel)
        self.executor.constants = ModelConstants(self)

    # -- pickling: captures, caches and sessions are not kept ------------------------------------
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for key in ("_lock", "programs", "capture_failures", "branches", "_branch_tuple", "block_order", "auxiliary_order", "block_flops",
                    "uncached_blocks", "eager_blocks", "invariant_lists", "recaptures", "cache_drops", "_adapters", "_all_guards", "model_flops", "_validated_for", "_sessions", "_local",
                    "_threads", "executor", "signals", "_handoff_graphs", "_metric_groups", "_model", "outside",
                    "shared_captures"):
            state.pop(key, None)
        state["graph_options"] = self.executor.graphs.options
        return state

    def __setstate__(self, state: dict) -> None:
        options = state.pop("graph_options", None)
        self.__dict__.update(state)
        self.executor = Executor(self.caps, GraphRunner(options))
        self.executor.blocks = {block.path: block for block in self.blocks}
        self.signals = None
        self._handoff_graphs = None
        self._metric_groups = {}
        self._model = None
        self.shared_captures = None
        self.outside = None
        self._init_state()

    # -- sessions -----------------------------------------------------------------------------------
    def session(self) -> Session:
        """The calling thread's session (created on its first call)."""
        session = getattr(self._local, "session", None)
        if session is None:
            with self._lock:
                self._drop_dead_sessions()
                session = Session(self.policy, self.caps, number=len(self._sessions), fold=self.fold)
                self._sessions.append(session)
                self._threads[threading.current_thread()] = session
                self._local.session = session
        return session

    @contextlib.contextmanager
    def using(self, session: Session) -> Iterator[Session]:
        """Run the calling thread's model calls in ``session`` for a while (a driver's own session:
        a :class:`~.session.FixedSession` or :class:`~.session.TracedSession` while exporting)."""
        previous = getattr(self._local, "session", None)
        self._local.session = session
        try:
            yield session
        finally:
            self._local.session = previous

    @contextlib.contextmanager
    def per_branch(self) -> Iterator[None]:
        """The calling thread's calls keep every branch's residual on its own for a while (a driver
        that feeds them to one graph, ``scope="model"``), instead of folding spans."""
        session = self.session()
        previous, session.fold_allowed = session.fold_allowed, False
        try:
            yield
        finally:
            session.fold_allowed = previous

    @contextlib.contextmanager
    def tracing(self) -> Iterator[None]:
        """Around a driver's ``torch.export`` (or ONNX export) of the model: tracing swaps the
        model's parameters for its own tensors and back, which bumps the dictionaries the guards
        watch without changing the model. Guards that held before are recorded again after."""
        held = [block for block in self.blocks if block.guard is not None and block.guard.holds()]
        outside = [s for s in self._sessions if s.outside_guard is not None and s.outside_guard.holds()]
        try:
            yield
        finally:
            for block in held:
                block.record_guard()
            model = self._live_model()
            if outside and model is not None:
                guard = self._guard_outside(model)
                for session in outside:
                    session.outside_guard = guard

    def _drop_dead_sessions(self) -> None:
        alive = set(map(id, self._threads.values()))
        for session in self._sessions:
            if id(session) not in alive:
                session.caches.clear()  # its thread is gone; its statistics stay for the report

    @property
    def sessions(self) -> list[Session]:
        return list(self._sessions)

    def reset(self) -> None:
        """Forget caches, step positions and statistics of every session (captures are kept)."""
        for session in self._sessions:
            session.reset()

    def forget_captures(self) -> None:
        """Drop every program and binding: the next call of each block captures it again."""
        with self._lock:
            if self.shared_captures is not None:  # what changed unseen may have made them stale too
                self.shared_captures.discard([*self.programs, *self.capture_failures])
            self.programs.clear()
            self.capture_failures.clear()
            self.uncached_blocks.clear()
            self.eager_blocks.clear()
            for block in self.blocks:
                block.unbind("captures dropped by ax.reset(model, captures=True)")

    def use_graphs(self, graphs: GraphRunner, model: nn.Module | None = None) -> None:
        """Run block graphs through ``graphs`` (``ax.compile``): the captures stay, their compiled
        forms are made on first use. With ``model``, its modules outside the blocks are compiled
        with the same options (see :mod:`.outside`)."""
        self.executor.graphs = graphs
        if model is not None and graphs.compiling:
            self.compile_outside(model, graphs.options)

    def compile_blocks(self, options: dict) -> None:
        """Compile the blocks' graphs with ``torch.compile`` keyword ``options`` (a block's
        ``nn.Module.compile``; diffusers' regional compilation), leaving the modules outside them as
        they are. Options equal to those in use change nothing (compiled graphs are kept)."""
        known = {"fullgraph", "dynamic", "backend", "mode", "options", "disable"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"torch.compile options {unknown} are not known; it takes {sorted(known)}")
        if options.get("disable"):
            return
        wanted = {"backend": options.get("backend") or "inductor", "mode": options.get("mode"),
                  "dynamic": options.get("dynamic"), "fullgraph": True}  # variant graphs have no breaks
        if options.get("options"):
            wanted["options"] = options["options"]
        if self.executor.graphs.options != wanted:
            self.use_graphs(GraphRunner(wanted))
            logger.info("adacache_fx: block graphs compiled with %s", wanted)

    def compile_outside(self, model: nn.Module, options: dict) -> None:
        """Compile ``model``'s modules outside its blocks (again, with ``options``)."""
        self.uncompile_outside()
        self.outside = CompiledOutside(model, self.blocks, options)
        logger.info("adacache_fx: compiled beside the blocks: %s", ", ".join(self.outside.paths) or "nothing")

    def uncompile_outside(self) -> None:
        if self.outside is not None:
            self.outside.undo()
            self.outside = None

    # -- branches -----------------------------------------------------------------------------------
    @property
    def main_block_count(self) -> int:
        return sum(1 for block in self.blocks if not self._after_main(block.list_name))

    def _after_main(self, list_name: str) -> bool:
        """Lists numbered after the main blocks: deeper lists, and lists found step-invariant."""
        return list_name in self.auxiliary_lists or list_name in self.invariant_lists

    @property
    def branch_tuple(self) -> tuple[BranchInfo, ...]:
        return self._branch_tuple

    def _depth(self, path: str, list_name: str) -> int:
        """The block's depth: its place among the main blocks, or after them for a deeper list's."""
        auxiliary = self._after_main(list_name)
        order = self.auxiliary_order if auxiliary else self.block_order
        if path not in order:
            order.append(path)
        return order.index(path) + (self.main_block_count if auxiliary else 0)

    def _register(self, path: str, list_name: str, index: int, regions: tuple,
                  cond_only: bool = False) -> tuple[int, tuple[BranchInfo, ...]]:
        """Depth and branch infos of a bound block's regions. A cond-only guidance call's capture runs
        half the rows: its branches' FLOPs are counted for the whole batch, as every other call's are."""
        auxiliary = self._after_main(list_name)
        depth = self._depth(path, list_name)
        main_blocks = self.main_block_count
        infos = []
        changed = False
        for region in regions:
            info = BranchInfo(
                id=f"{path}.{region.name}", block=path, block_list=list_name, block_index=index, depth=depth,
                name=region.name, kind=region.kind, tags=region.tags,
                flops=region.flops * 2 if cond_only and region.flops is not None else region.flops,
                num_residuals=region.num_residuals, blocks=main_blocks, auxiliary=auxiliary,
                tokens=region.token_flow.tokens if region.token_flow is not None else None,
            )
            known = self.branches.get(info.id)
            if known != info:
                self.branches[info.id] = info
                changed = True
            infos.append(self.branches[info.id])
        if changed:
            self._branch_tuple = tuple(self.branches.values())
        return depth, tuple(infos)

    # -- bindings -----------------------------------------------------------------------------------
    def bind(self, block: nn.Module, args: tuple, kwargs: dict, signature: Any, cond_only: bool) -> Binding | Uncached:
        """The binding of ``block`` at ``signature``: a program found by structure or captured now."""
        with self._lock:
            known = block.bindings.get(signature)
            if known is not None:
                return known
            original = block.original
            original.training = block.training
            # Hooks inside the block: a capture would bake their cached state in.
            refuse_stacked_cache(block, ((f"{block.path}.{n}".rstrip("."), sub) for n, sub in original.named_modules()),
                                 name=block.path)
            refuse_sequential_offload(block.path, original)
            temporal = _is_temporal(block.list_name)
            key = (structural_key(original), signature, temporal)
            program = self.programs.get(key)
            shared = self.shared_captures if self.shared_captures is not None and is_portable(key[0]) else None
            if program is None and shared is not None:
                program = shared.get(key)
                if program is not None:
                    self.programs[key] = program
            if program is None:
                try:
                    self._raise_known_failure(key, shared, block.path)
                    with torch.no_grad():
                        program = build_program(original, args, kwargs, name=block.path, temporal=temporal)
                except CaptureError as exc:
                    # The first failure is kept (a known one is already there): its message names the
                    # block export failed on, and what later blocks raise quotes it once.
                    first = self.capture_failures.setdefault(key, exc)
                    if shared is not None:
                        shared.put_failure(key, first)
                    if block.on_capture_error == "branches":
                        return block.remember(signature, self._eager_binding(block, exc))
                    if block.on_capture_error != "skip":
                        raise
                    logger.warning("adacache_fx: %s runs uncached: %s", block.path, exc)
                    self.uncached_blocks[block.path] = str(exc)
                    return block.remember(signature, Uncached(str(exc)))
                self.programs[key] = program
                if shared is not None:
                    shared.put(key, program)
                if block.guard is not None:  # export swapped the block's parameters and back
                    block.record_guard()
                for note in program.notes:
                    logger.info("adacache_fx: %s: %s", block.path, note)
            if not self.executor.graphs.compiling and _compiled_inside(original):
                # nn.Module.compile on the block or a module in it: the captured graph stands in for
                # their compiled calls, so it is compiled (torch.compile's defaults; their options
                # cannot be read back). block.compile(**options) after transform sets others.
                self.compile_blocks({})
                logger.info("adacache_fx: %s (or a module in it) was compiled in place: the blocks' graphs are "
                            "compiled with torch.compile's defaults", block.path)
            if program.regions:
                self.uncached_blocks.pop(block.path, None)
            else:
                reason = (f"no residual branch found in {type(original).__name__}: nothing in it adds to a stream "
                          "it passes on (a model that adds the block's output itself, an adapter); it runs every step")
                if self.uncached_blocks.get(block.path) != reason:
                    logger.warning("adacache_fx: %s: %s", block.path, reason)
                self.uncached_blocks[block.path] = reason
            self.eager_blocks.pop(block.path, None)
            depth, infos = self._register(block.path, block.list_name, block.index, program.regions, cond_only)
            if not cond_only:  # a cond-only guidance call's capture counts half the rows
                self.block_flops[block.path] = program.total_flops
            binding = Binding(block.path, block.epoch, depth, program, program.bind(original), infos, signature)
            return block.remember(signature, binding)

    def _raise_known_failure(self, key: Any, shared: CaptureCache | None, path: str) -> None:
        """Raise, without exporting again, the error a block of the same structure and input signature
        (this model's or, through ``shared``, another's) raised: export would fail the same way."""
        failure = self.capture_failures.get(key)
        if failure is None and shared is not None:
            failure = shared.failure(key)
            if failure is not None:
                self.capture_failures[key] = failure
        if failure is not None:
            raise CaptureError(f"block {path!r} has the structure and input signature of a block whose "
                               f"capture failed (not tried again): {failure}") from failure.__cause__

    def _eager_binding(self, block: nn.Module, error: CaptureError) -> EagerBinding:
        """A block export could not take, bound to run eagerly with its branch children cached (see
        :mod:`.eager_block`); ``error`` again, saying why, when it has no such children or cannot run
        on a view."""
        original = block.original
        cause = error.__cause__
        reason = (f"torch.export: {type(cause).__name__}: {str(cause).strip().splitlines()[0].split('. ')[0]}"
                  if cause is not None and str(cause).strip() else str(error).split(". Pass blocks=")[0])
        children = branch_children(original)
        obstacle = why_not_viewable(original) if children else "it has no attention or MLP child module"
        if obstacle is not None:
            raise CaptureError(f"{error} It cannot be cached branch by branch either: {obstacle}.") from error
        first = not any(path.startswith(f"{block.list_name}.") for path in self.eager_blocks)
        (logger.warning if first else logger.info)(
            "adacache_fx: %s could not be captured whole (%s); its branch children (%s) are cached, the rest of "
            "the block runs every step%s", block.path, reason, ", ".join(children),
            " (the same may follow for the list's other blocks: see ax.report)" if first else "")
        self.uncached_blocks.pop(block.path, None)
        self.eager_blocks[block.path] = (f"runs eagerly; cached branches: {', '.join(children)}; the rest of the "
                                         f"block runs every step, because {reason}")
        return EagerBinding(block.path, block.epoch, self._depth(block.path, block.list_name), children, reason)

    def run_eager(self, block: nn.Module, binding: EagerBinding, args: tuple, kwargs: dict, session: Session) -> Any:
        """One call of an eagerly run block; its first call measures its branches and registers them."""
        def measured(calls: list[tuple], total_flops: int | None, output: Any) -> EagerBinding:
            regions = []
            returned = {id(t) for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)}
            for name, occurrence, child, a, kw, out, flops in calls:
                leaves, spec = pytree.tree_flatten(out)
                tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
                if not tensors:
                    continue  # a child that returns no tensor is no branch
                if any(id(t) in returned for t in tensors):
                    # What the block returns as it is: the stream itself, not a branch beside it; reusing
                    # it would drop what earlier blocks did this step.
                    logger.info("adacache_fx: %s.%s returns the block's output (the stream): not cached",
                                block.path, name)
                    continue
                regions.append(EagerRegion(
                    name=name if occurrence == 0 else f"{name}_{occurrence}", child=name,
                    kind=kind_of(name, child, a, kw, _is_temporal(block.list_name)),
                    flops=flops * 2 if session.call.cond_only and flops is not None else flops, num_residuals=len(tensors), spec=spec,
                    constants=tuple(None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves)))
            with self._lock:
                _, infos = self._register(block.path, block.list_name, block.index, tuple(regions))
                if not session.call.cond_only:
                    self.block_flops[block.path] = total_flops
            done = dataclasses.replace(binding, regions=tuple(regions), branches=infos, measured=True)
            for signature, known in list(block.bindings.items()):
                if known is binding:
                    block.bindings[signature] = done
            return done

        if binding.measured:
            return self.executor.run_eager(binding, block.original, args, kwargs, session)
        output = self.executor.run_eager(binding, block.original, args, kwargs, session, measured)
        block.record_guard()  # counting FLOPs added forward hooks to its layers and removed them
        return output

    def invariant_list_call(self, block: nn.Module, binding: Any, signature: Any, leaves: list[Any],
                            session: Session) -> Any:
        """The :class:`~.invariant.ListCall` of the block's list when the block may be replayed or
        recorded as part of a step-invariant list this call, else None. Blocks a policy reads its
        in-step signal from or watches always run, and a folded span being replayed is left alone.

        A main list found step-invariant here (a text refiner called first) is numbered after the
        latent path's blocks from the next call on: a policy's first block (First-Block-Cache's
        signal) must be one whose residual can change. This call then reads no in-step signal."""
        if not session.live or session.context is None or session.call.replay is not None:
            return None
        calls = session.call.lists
        call = calls.get(block.list_name)
        if call is None:
            call = session.caches.invariant.enter(calls, session.slot, session.tracker.step, block.list_name,
                                                  signature, leaves, copy=self.outputs_reused(session))
            if call.mode == "record" and not self._after_main(block.list_name) and len(self.block_order) > len(
                    [b for b in self.blocks if b.list_name == block.list_name]):
                session.call.renumber.add(block.list_name)
        if session.call.renumber and self.caps.signal is not None:
            session.call.skip_signal = True
        depth = getattr(binding, "depth", None)
        signal = self.caps.signal
        if signal is not None and depth is not None and depth < max(1, signal.blocks):
            return None
        state = session.policy_state
        if any(self.caps.watches(info, state) for info in getattr(binding, "branches", ())):
            return None
        return call

    def _renumber(self, lists: set[str], session: Session) -> None:
        """Number ``lists`` (found step-invariant) after the main blocks: every block is bound again
        at its new depth (programs are kept; caches of the old bindings are not read again) and the
        calling session's policy state starts afresh (what it compared was the invariant list's)."""
        with self._lock:
            self.invariant_lists |= lists
            logger.info("adacache_fx: %s see the same inputs at every step; numbered after the other blocks",
                        ", ".join(sorted(lists)))
            moved = [path for path in self.block_order if path.rsplit(".", 1)[0] in lists]
            self.block_order[:] = [path for path in self.block_order if path not in moved]
            self.auxiliary_order.extend(moved)
            main = self.main_block_count
            renumbered = {}
            for info in self.branches.values():  # what the blocks register again when next bound
                depth = self._depth(info.block, info.block_list)
                renumbered[info.id] = dataclasses.replace(
                    info, depth=depth, blocks=main, auxiliary=self._after_main(info.block_list))
            self.branches = renumbered
            self._branch_tuple = tuple(renumbered.values())
            for block in self.blocks:
                block.unbind(f"step-invariant list(s) {', '.join(sorted(lists))} numbered after the main blocks")
        session.policy_state = self.policy.new_state()

    def outputs_reused(self, session: Session) -> bool:
        """Whether this call's graphs reuse their output memory at their next run (CUDA graphs): what
        is held across steps must then be a copy."""
        return (session.call.graphs or self.executor.graphs).copies_outputs

    @staticmethod
    def computes_fully(binding: Any, session: Session) -> bool:
        """Whether this call's plan computes every branch of ``binding`` (no reuse, no forecast, no
        token subset, no cond-only half)."""
        plan = session.plan
        return not session.call.cond_only and not any(
            info.id in plan.reuse or (plan.partial and info.id in plan.partial)
            for info in getattr(binding, "branches", ()))

    def note_recapture(self, session: Session, path: str, changes: list[str]) -> bool:
        """Record that ``path`` changed; False when it changed too often this generation (see
        :data:`RECAPTURE_LIMIT`): it then runs uncached until the generation ends."""
        logger.info("adacache_fx: %s changed (%s); it is captured again, and every cache of this generation "
                    "is dropped", path, "; ".join(changes))
        # Not only the block's own: every block after it was cached from what the old one passed on (an
        # adapter re-weighted in some blocks only, Flux2's double blocks, leaves the single blocks' guards
        # holding, but their cached residuals belong to the old model).
        _drop_caches(session)
        self.recaptures.append((path, "; ".join(changes)))
        session.changes_seen = len(self.recaptures)
        count = session.rebinds[path] = session.rebinds.get(path, 0) + 1
        if count <= self.recapture_limit:
            return True
        if f"limit:{path}" not in session.warned:
            session.warned.add(f"limit:{path}")
            reason = (f"changed {count} times in one generation (last: {'; '.join(changes)}); it runs uncached "
                      "until the generation ends. Raise transform(..., recapture_limit=N) if those changes "
                      "are deliberate")
            logger.warning("adacache_fx: %s %s", path, reason)
            self.uncached_blocks[path] = reason
        return False

    # -- model call boundaries ----------------------------------------------------------------------
    def on_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
            return None  # the handed-over call runs it (see .dynamo)
        refuse_stacked_cache(module)
        session = self.session()
        if not session.live:
            return None
        if module is not None and (self._model is None or self._model() is not module):
            self._model = weakref.ref(module)
        self.executor.graphs.on_model_call()
        context = session.pipeline_context
        latent = main_input(args, kwargs)
        event = session.begin_call(
            self._branch_tuple,
            self.read_timestep(args, kwargs) if self.read_timestep else None,
            latent=latent,
            frames=self.read_frames(args, kwargs),
            context_step=getattr(context, "step_index", None),
            num_steps=getattr(context, "num_inference_steps", None),
            group=context_parallel_group(module, self._metric_groups),
        )
        if event.new_generation and event.reason and session.tracker.generation > 0:
            logger.debug("adacache_fx: new generation: %s", event.reason)
        if session.tracker.single_step_run == 5 and "single-step" not in session.warned:
            session.warned.add("single-step")
            logger.warning(
                "adacache_fx: the last 5 generations each ended after one step (each new latent was not a "
                "continuation of the last step: a stochastic sampler adding much noise per step?), so "
                "nothing was reused. Mark generations explicitly: with ax.generation(model, num_steps=N): ..."
            )
        session.ambient = ambient_state()
        self._check_adapter_weights(session)
        self._check_outside(session)
        self._check_changes_found_elsewhere(session)
        layout = self.caps.guidance_layout
        if layout is None:
            return None
        call = session.call
        call.rows = guidance.call_batch(args, kwargs)
        if not session.plan.skip_uncond or call.rows is None:
            return None
        if call.dropped or not self._blocks_unchanged():
            # The model changed since the last call: the uncond half would be rebuilt from what the old
            # model made, so this call runs in full (its blocks see the change and drop their caches).
            return None
        call.cond_only = True
        session.records[-1].cond_only += 1
        return guidance.halve_call(args, kwargs, call.rows, layout, type(self.policy).__name__)

    def after_model_call(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
            return None
        session = self.session()
        if not session.live:
            return None
        branches = self._branch_tuple
        if branches and self._validated_for is not branches:
            self._validated_for = branches
            self.policy.validate(branches)
        self.executor.finish_call(session)
        self._record_adapter_weights(session)
        self._record_outside(session)
        if session.call.renumber:
            self._renumber(session.call.renumber, session)
        result = None
        if self.caps.guidance_layout is not None and session.context is not None and session.call.rows is not None:
            result = self._guidance_output(session, output)
        leaves = pytree.tree_leaves(result if result is not None else output)
        session.end_call(next((t for t in leaves if isinstance(t, torch.Tensor)), None))
        return result

    def _blocks_unchanged(self) -> bool:
        """Whether every bound block's guard holds (one joint check, kept while the guards are the same)."""
        guards = tuple(block.guard for block in self.blocks if block.guard is not None)
        key = tuple(map(id, guards))
        known = self._all_guards
        if known is None or known[0] != key:
            known = self._all_guards = (key, GuardSet(guards))  # the set holds the guards: their ids stay theirs
        return known[1].holds()

    # -- the modules outside the blocks ----------------------------------------------------------------
    def _check_outside(self, session: Session) -> None:
        """Before a call that could read caches: drop them if the model's modules outside its blocks
        (embedders, the output head, their adapters and hooks) changed since the session's last call.
        No capture holds them (they run every call), but residuals cached before were computed from
        what the old ones passed to the blocks."""
        guard = session.outside_guard
        if guard is None or not session.caches.holds_any() or guard.holds():
            return
        model = self._live_model()
        changes = guard.changes(model, root="the model") if model is not None else ["state outside the blocks changed"]
        session.outside_guard = None
        self._note_cache_drop(session, "outside the blocks", "; ".join(changes))

    def _check_changes_found_elsewhere(self, session: Session) -> None:
        """Before a call: drop the session's caches if another thread's call found a block changed since
        this session's last call. That call re-recorded the block's (shared) guard, so this session's
        calls would find it holding; the block's own residuals are never read again (a new binding owns
        its cache), but those of the blocks after it were computed from what the old one passed on."""
        found = len(self.recaptures)
        if session.changes_seen == found:
            return
        session.changes_seen = found
        if session.caches.holds_any():
            self._note_cache_drop(session, "another thread's call", "it found a block changed (see the re-captures)")

    def _record_outside(self, session: Session) -> None:
        """Recorded again when it no longer holds at a call's end: what a forward writes itself (a module
        keeping its rope tables) is not a change between calls, and must not drop the next call's caches."""
        model = self._live_model()
        if model is None or (session.outside_guard is not None and session.outside_guard.holds()):
            return
        session.outside_guard = self._guard_outside(model)

    def _guard_outside(self, model: nn.Module) -> Any:
        """The guard of ``model`` but its blocks (each guarded on its own)."""
        return guard_module(model, skip=tuple(self.blocks))

    # -- adapter weights rewritten in place (see .adapter_weights) -----------------------------------
    def _adapter_weights(self) -> AdapterWeights:
        """The cached blocks' adapter tensors, found again when a block was bound anew (adapters added,
        deleted, fused or resized all fail its guard)."""
        epochs = tuple(block.epoch for block in self.blocks)
        known = self._adapters
        if known is None or known[0] != epochs:
            known = self._adapters = (epochs, AdapterWeights.of((block.path, block.original) for block in self.blocks))
        return known[1]

    def _check_adapter_weights(self, session: Session) -> None:
        """Before a call that could read caches: drop them if adapter tensors were rewritten in place
        since the last call (a LoRA hot swap)."""
        last = session.adapter_norms
        if last is None or not session.caches.holds_any():
            return
        weights, norms = last
        now = weights.norms()
        session.adapter_norms, session.call.adapters_read = (weights, now), True  # this call's: see below
        changed = weights.changed(norms, now)
        if not changed:
            return
        blocks = list(dict.fromkeys(owner for owner, _ in changed))
        names = [name for _, name in changed]
        what = f"{len(names)} adapter tensor(s) rewritten in place ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
        self._note_cache_drop(session, ", ".join(blocks[:4]) + (", ..." if len(blocks) > 4 else ""), what)

    def _note_cache_drop(self, session: Session, where: str, what: str) -> None:
        """A change no block's guard sees, found before a call: its caches go, and the report says why."""
        logger.info("adacache_fx: %s: %s; every cache of this generation is dropped: this call computes", where, what)
        _drop_caches(session)
        self.cache_drops.append((where, what))

    def _live_model(self) -> nn.Module | None:
        """The transformed model, as its last call passed it (None before any, or after unpickling)."""
        return self._model() if self._model is not None else None

    def _record_adapter_weights(self, session: Session) -> None:
        """The adapter tensors' norms as this call ran (read at its start when it checked them, and the
        blocks were not bound anew since: nothing rewrites weights inside a call)."""
        weights = self._adapter_weights()
        last = session.adapter_norms
        if session.call.adapters_read and last is not None and last[0] is weights:
            return
        session.adapter_norms = (weights, weights.norms()) if weights else None

    def _guidance_output(self, session: Session, output: Any) -> Any:
        """Show a full guidance call's output halves to the policy, or rebuild a cond-only call's."""
        layout, rows, call = self.caps.guidance_layout, session.call.rows, session.call
        leaves, spec = pytree.tree_flatten(output)
        if not call.cond_only:
            if rows % 2 == 0:
                for index, leaf in enumerate(leaves):
                    if isinstance(leaf, torch.Tensor) and leaf.ndim > 0 and leaf.shape[0] == rows:
                        self.policy.observe_guidance(session.context, session.policy_state, index,
                                                     guidance.cond_half(leaf, layout), guidance.uncond_half(leaf, layout))
            return None
        call.cond_only = False
        rebuilt = [
            guidance.join_halves(leaf, self.policy.rebuild_uncond(session.context, session.policy_state, index, leaf),
                                 layout)
            if isinstance(leaf, torch.Tensor) and leaf.ndim > 0 and leaf.shape[0] == rows // 2 else leaf
            for index, leaf in enumerate(leaves)
        ]
        return pytree.tree_unflatten(rebuilt, spec)

    def call_handed_over(self, forward: Any, args: tuple, kwargs: dict) -> Any:
        """One model call that ``torch.compile`` handed over (see :mod:`.dynamo`): the hooks' work
        and the forward, eagerly, the blocks on fullgraph-compiled variant graphs."""
        model = getattr(forward, "__self__", None)  # the model, where its own forward was handed over
        changed = self.on_model_call(model, args, kwargs)
        if changed is not None:
            args, kwargs = changed
        session = self.session()
        graphs = self.executor.graphs
        if not graphs.compiling:
            if self._handoff_graphs is None:
                self._handoff_graphs = GraphRunner({"backend": "inductor", "fullgraph": True})
                if model is not None and self.outside is None:
                    self.compile_outside(model, self._handoff_graphs.options)
            graphs = self._handoff_graphs
        session.call.graphs = graphs
        output = forward(*args, **kwargs)
        result = self.after_model_call(None, args, kwargs, output)
        return output if result is None else result

    # -- what a diffusers pipeline says -------------------------------------------------------------
    def on_pipeline_end(self) -> None:
        self.session().end_pipeline_call()

    def on_pipeline_context(self, context: Any) -> None:
        self.session().pipeline_context = context

    def attach_pipeline_signals(self, model: nn.Module) -> None:
        """Hear diffusers pipelines' end of call and cache contexts (see :mod:`.steps`), when the
        model is a diffusers model whose pipelines reset its hooks."""
        if self.signals is not None or not self.blocks or not hasattr(model, "_reset_stateful_cache"):
            return
        try:
            from .diffusers_signals import attach
        except ImportError:
            return
        self.signals = attach(model, self.blocks[0], self)

    def detach_pipeline_signals(self, model: nn.Module) -> None:
        if self.signals is not None:
            from .diffusers_signals import detach

            detach(model, self.blocks[0], self.signals)
            self.signals = None

    # -- inspection ---------------------------------------------------------------------------------
    def cached_residuals(self, slot: int = 0) -> dict[str, tuple[torch.Tensor, ...]]:
        """The residuals the calling thread's session holds for call slot ``slot``, by branch id.
        Branches reused as part of a folded span are not listed: see ``folded_residuals``."""
        return self.session().caches.values(slot)

    def folded_residuals(self, slot: int = 0) -> dict[str, tuple[torch.Tensor, ...]]:
        """The folded spans the calling thread's session holds for ``slot``: one residual per stream
        (stream out minus stream in), keyed ``"first block .. last block"``, by stream index."""
        return {f"{span.bindings[0].path} .. {span.bindings[-1].path}": tuple(span.residuals.values())
                for span in self.session().caches.spans(slot)}

    def cache_bytes_per_slot(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for session in self._sessions:
            for slot in session.caches.slots():
                out[slot] = out.get(slot, 0) + session.caches.nbytes(slot)
        return out

    def cache_bytes(self) -> int:
        return sum(session.caches.nbytes() for session in self._sessions)


def _drop_caches(session: Session) -> None:
    """Drop every cache of the session's generation, once a call: what later blocks store in the same
    call is the changed model's."""
    if not session.call.dropped:
        session.call.dropped = True
        session.caches.clear()


def foreign_caches(module: nn.Module) -> list[str]:
    """The diffusers caching hooks registered on ``module`` itself: its stateful hooks (First-Block-Cache,
    PAB, FasterCache, MagCache, TaylorSeer, ... keep outputs between calls; layer skip, offloading and
    context-parallel hooks keep none).

        >>> foreign_caches(nn.Linear(2, 2))
        []
    """
    registry = module.__dict__.get("_diffusers_hook")
    if registry is None:
        return []
    return [name for name, hook in registry.hooks.items()
            if getattr(hook, "_is_stateful", False) and type(hook).__module__.startswith("diffusers.")]


def refuse_stacked_cache(model: nn.Module, modules: Any = (), name: str | None = None) -> None:
    """Raise when diffusers' own cache is enabled on ``model`` (``model.enable_cache(...)``) or its
    caching hooks are registered on ``model`` or on any of ``modules``, ``(path, module)`` pairs
    (``apply_first_block_cache``, ``apply_pyramid_attention_broadcast``, ...): they would cache what
    adacache_fx caches, each cache deciding without the other, and a capture would bake in a hook's
    cached state. ``name``: what the message calls ``model`` (its class name by default).

        >>> refuse_stacked_cache(nn.Linear(2, 2))  # no diffusers cache: nothing to say
    """
    config = getattr(model, "_cache_config", None)  # diffusers' CacheMixin: set by enable_cache
    found = f"{type(config).__name__} (model.enable_cache)" if config is not None else None
    name = name or type(model).__name__
    if found is None:
        for path, module in ((name, model), *modules):
            hooks = foreign_caches(module)
            if hooks:
                found = f"hooks {', '.join(hooks)} on {path}"
                break
    if found is not None:
        raise AdaCacheError(
            f"diffusers' cache is enabled on {name}: {found}. It would cache what adacache_fx "
            "caches, two caches deciding apart. Call model.disable_cache() (or remove those hooks) and use "
            "adacache_fx's policy of that method (e.g. adacache_fx.FirstBlockCache, adacache_fx.PAB, "
            "adacache_fx.FasterCache, adacache_fx.MagCache, adacache_fx.TaylorSeer), or adacache_fx.restore(model) "
            "to use diffusers' cache alone"
        )


def _offloads_weights(hook: Any) -> bool:
    """Whether an accelerate hook (``module._hf_hook``) keeps its module's weights elsewhere and loads
    them in its ``pre_forward`` (``AlignDevicesHook(offload=True)``, alone or in a ``SequentialHook``)."""
    return bool(getattr(hook, "offload", False)) or any(map(_offloads_weights, getattr(hook, "hooks", ())))


def refuse_sequential_offload(block_path: str, original: nn.Module) -> None:
    """Raise when accelerate's sequential CPU offload (``pipe.enable_sequential_cpu_offload()``,
    ``accelerate.cpu_offload``) hooks a module of a block: its weights sit on the meta device between
    calls and are loaded by hooks around each layer's forward, which a captured graph reading the
    block's parameters does not run (before ``transform`` export cannot trace it; after, every call
    would capture again and nothing be cached).

        >>> refuse_sequential_offload("blocks.0", nn.Linear(2, 2))  # no accelerate hook: nothing to say
    """
    for name, module in original.named_modules():
        if _offloads_weights(module.__dict__.get("_hf_hook")):
            where = f"{block_path}.{name}".rstrip(".")
            raise AdaCacheError(
                f"accelerate's sequential CPU offload hooks {where} (enable_sequential_cpu_offload() or "
                "accelerate.cpu_offload): its weights are loaded layer by layer inside hooks that a cached "
                "block's graph does not run. Use diffusers' group offloading instead, enabled after "
                "adacache_fx.transform (model.enable_group_offload(onload_device, offload_type='leaf_level') "
                "offloads as finely; 'block_level' keeps whole blocks cached), or enable_model_cpu_offload()"
            )


def _compiled_inside(block: nn.Module) -> bool:
    """Whether ``nn.Module.compile`` was called on ``block`` or a module inside it."""
    return any(module.__dict__.get("_compiled_call_impl") is not None for module in block.modules())


def _is_temporal(list_name: str) -> bool:
    lowered = list_name.lower()
    return "temporal" in lowered or "temp_" in lowered


class ModelConstants:
    """The transformed model's parameters and buffers outside its block lists, read live (what the
    model's code between blocks may add to the stream: see :mod:`.bridges`)."""

    def __init__(self, runtime: ModelRuntime) -> None:
        self._runtime = weakref.ref(runtime)

    def _model(self) -> tuple[nn.Module | None, frozenset[str]]:
        runtime = self._runtime()
        model = runtime._model() if runtime is not None and runtime._model is not None else None
        lists = frozenset(block.list_name for block in runtime.blocks) if runtime is not None else frozenset()
        return model, lists

    def items(self) -> list[tuple[str, torch.Tensor]]:
        model, lists = self._model()
        if model is None:
            return []
        out: list[tuple[str, torch.Tensor]] = []
        seen: set[int] = set()
        stack = [("", model)]
        while stack:  # depth first, never into the block lists (their weights are no constants between blocks)
            prefix, module = stack.pop()
            for name, tensor in (*module._parameters.items(), *module._buffers.items()):
                if tensor is not None and id(tensor) not in seen:
                    seen.add(id(tensor))
                    out.append((prefix + name, tensor))
            children = [(prefix + name, child) for name, child in module._modules.items()
                        if child is not None and prefix + name not in lists]
            stack.extend((path + ".", child) for path, child in reversed(children))
        return out

    def get(self, name: str) -> torch.Tensor | None:
        model, _ = self._model()
        if model is None:
            return None
        owner_path, _, attribute = name.rpartition(".")
        try:
            owner = model.get_submodule(owner_path) if owner_path else model
        except AttributeError:
            return None
        value = owner._parameters.get(attribute)
        return value if value is not None else owner._buffers.get(attribute)
