"""The module that stands in for one transformer block of a transformed model: the eager driver.

It shares the original block's parameter, buffer and submodule dictionaries, so the model's
``state_dict`` keys, ``.to()``, ``.half()``, weight loading and PEFT's adapter injection reach the
block exactly as before. On each call it checks its guard (did the live block change since its
capture?), looks up the binding for the call's input signature (capturing on a miss) and hands it
to the runtime's executor. A failed guard unbinds the block: it is captured again for its new
state, and residuals it cached before are never read again.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch.nn as nn
import torch.utils._pytree as pytree

from ..errors import AdaCacheError
from ..passes.capture import flatten_call, leaf_key
from ..passes.guards import guard_module
from .eager_block import EagerBinding
from .runtime import ModelRuntime, Uncached, foreign_caches, refuse_stacked_cache

# Where a CachedBlock keeps what the runtime changes while it runs (see _RuntimeState); not pickled.
_STATE = "_adacache_fx_state"
# Attributes hook libraries set on a module for themselves (diffusers', accelerate's): the wrapper has
# its own, not the block's, even where the block has some of its own.
_OWN_ATTRIBUTES = frozenset({"_diffusers_hook", "forward", "_hf_hook", "_old_forward"})


class _RuntimeState:
    """What the runtime keeps per wrapper and changes as it runs, held outside the wrapper's
    ``__dict__``: that dictionary's version is part of each block's guard (an instance ``forward`` a
    hook installs on the wrapper, ``training``), so the runtime's own writes must not move it."""

    __slots__ = ("bindings", "guard", "epoch")

    def __init__(self) -> None:
        self.bindings: dict = {}  # input signature -> Binding | Uncached
        self.guard: Any = None  # ModuleGuard of the live block, recorded at its capture
        self.epoch = 0  # moves each time the block is unbound (its old caches are never read again)


class CachedBlock(nn.Module):
    def __init__(
        self,
        block: nn.Module,
        list_name: str,
        index: int,
        runtime: ModelRuntime,
        on_capture_error: str = "branches",
        block_list: nn.Module | None = None,
    ) -> None:
        super().__init__()
        # Share state with the original block: one set of weights, unchanged state_dict keys.
        self.__dict__["_modules"] = block._modules
        self.__dict__["_parameters"] = block._parameters
        self.__dict__["_buffers"] = block._buffers
        self.__dict__["_non_persistent_buffers_set"] = block._non_persistent_buffers_set
        self.__dict__["original"] = block  # not a submodule: its children are ours already
        self.__dict__["runtime"] = runtime
        # The list this block stands in (not a submodule: its parent): replacing, deleting or inserting a
        # block there changes what every later block receives, so it is part of each block's guard.
        self.__dict__["_adacache_fx_block_list"] = block_list
        self.__dict__["training"] = block.training
        self.__dict__["list_name"] = list_name
        self.__dict__["index"] = index
        self.__dict__["path"] = f"{list_name}.{index}"
        self.__dict__["on_capture_error"] = on_capture_error
        self.__dict__[_STATE] = _RuntimeState()

    @property
    def bindings(self) -> dict:
        """Input signature -> the binding the block runs under it."""
        return self.__dict__[_STATE].bindings

    @property
    def guard(self) -> Any:
        """The :class:`~adacache_fx.passes.guards.ModuleGuard` recorded at the block's capture, or None."""
        return self.__dict__[_STATE].guard

    @property
    def epoch(self) -> int:
        return self.__dict__[_STATE].epoch

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in _OWN_ATTRIBUTES:  # the wrapper's own hook registry, never the block's
                raise
            # Plain attributes of the block (flags models read, e.g. ``block.context_pre_only``).
            return getattr(self.__dict__["original"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        # A flag set on ``model.blocks[i]`` must change what the block computes, as it would untransformed:
        # an attribute the block has, or a new public one, is set on the block, whose forward reads it
        # there. New private names (libraries' bookkeeping) and hook attributes stay on the wrapper.
        # Parameters, buffers and submodules go to the dictionaries both share; ``training`` to both.
        original = self.__dict__.get("original")
        if original is not None and self._belongs_to_the_block(name):
            setattr(original, name, value)
            return
        if name == "training" and original is not None:
            original.training = value
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        original = self.__dict__.get("original")
        if original is not None and self._belongs_to_the_block(name):
            delattr(original, name)
            return
        super().__delattr__(name)

    def _belongs_to_the_block(self, name: str) -> bool:
        if name in _OWN_ATTRIBUTES or name in self.__dict__ or hasattr(type(self), name):
            return False
        if name in self._parameters or name in self._buffers or name in self._modules:
            return False  # shared dictionaries: nn.Module's own handling reaches the block
        original = self.__dict__["original"]
        return not name.startswith("_") or name in original.__dict__ or hasattr(type(original), name)

    def compile(self, *args: Any, **kwargs: Any) -> None:  # noqa: A003 - nn.Module.compile's name
        """``nn.Module.compile`` on a transformed block (diffusers' ``compile_repeated_blocks`` calls it
        on every block): the blocks' captured plan-variant graphs are compiled with these
        ``torch.compile`` options (``fullgraph=True``: they have no breaks), every block's at once (one
        graph runner per model), instead of dynamo tracing this wrapper's Python. The modules outside
        the blocks are left as they are (``ax.compile(model)`` compiles those too)."""
        if args:
            raise TypeError(f"{self.path}.compile() takes torch.compile's keyword arguments only, got {args!r}")
        self.runtime.compile_blocks(kwargs)

    def extra_repr(self) -> str:
        return f"wraps={type(self.original).__name__}, captured_shapes={len(self.bindings)}"

    # -- pickling: the block and its settings, not its captures ------------------------------------
    def __reduce_ex__(self, protocol: Any) -> Any:
        # The class is made per wrapped class (see wrapper_class): rebuilt from that, not looked up.
        return (_new_wrapper, (type(self.original),), self.__getstate__())

    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k != _STATE}
        registry = state.pop("_diffusers_hook", None)
        if registry is not None:
            # diffusers' hooks install a closure as ``forward`` that a copy cannot carry: the runtime
            # attaches its own again; anyone else's would be lost without a word, so say so instead.
            foreign = [name for name, hook in registry.hooks.items()
                       if not type(hook).__module__.startswith("adacache_fx.")]
            if foreign:
                raise AdaCacheError(
                    f"cannot copy or pickle the transformed block {self.path}: the diffusers hooks "
                    f"{', '.join(map(repr, foreign))} registered on it would not come with it (their "
                    "forward is a closure bound to this block). Remove them (its _diffusers_hook registry's "
                    "remove_hook) before copying and register them on the copy, or copy the model first")
            state.pop("forward", None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__[_STATE] = _RuntimeState()

    # -- bindings -------------------------------------------------------------------------------
    def remember(self, signature: Any, binding: Any) -> Any:
        """Keep ``binding`` for ``signature``; the first one records the guard of the live block."""
        state = self.__dict__[_STATE]
        state.bindings[signature] = binding
        if state.guard is None:
            state.guard = self._guard()
        return binding

    def _guard(self) -> Any:
        """The guard of the live block, of this wrapper's own forward hooks and attributes and of its block
        list: a hook added to the wrapper (``model.blocks[i].register_forward_hook``, or a diffusers
        ``ModelHook``, which installs an instance ``forward``), ``training`` or a block replaced, deleted
        or inserted in the list changes what the blocks pass on, so residuals cached before are stale."""
        also = {"forward hooks on the block": self._forward_hooks,
                "forward pre-hooks on the block": self._forward_pre_hooks,
                "the block's forward or attributes set on it": self.__dict__}
        block_list = self.__dict__.get("_adacache_fx_block_list")
        if block_list is not None:
            also[f"the blocks of {self.list_name}"] = block_list._modules
        return guard_module(self.original, also=also)

    def record_guard(self) -> None:
        """Record the guard of the live block anew (after a driver's trace, see ``ModelRuntime.tracing``)."""
        self.__dict__[_STATE].guard = self._guard()
        self.runtime.executor.forget_span_guards()

    def unbind(self, reason: str) -> None:
        """Forget every binding: the next call captures the block for its state then."""
        state = self.__dict__[_STATE]
        state.bindings.clear()
        state.guard = None
        state.epoch += 1
        self.runtime.executor.forget_span_guards()

    def unbind_changed(self, session: Any) -> bool:
        """The live block no longer matches its guard: unbind it and record what changed (the runtime
        drops every cache of ``session``'s generation). False when it changed too often this generation:
        it then runs uncached (see ``ModelRuntime.note_recapture``)."""
        changes = self.guard.changes(self.original)
        self.unbind("; ".join(changes))
        return self.runtime.note_recapture(session, self.path, changes)

    # -- call -----------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        runtime = self.runtime
        if "_diffusers_hook" in self.__dict__ and foreign_caches(self):  # registered on the wrapper
            refuse_stacked_cache(self, name=self.path)
        session = runtime.session()
        session.call.block_calls += 1
        guard = self.guard
        replay = session.call.replay  # a folded span checked this block's guard when its replay began
        checked = replay is not None and self.path in replay["intact"]
        if checked:  # a later block of a folded span being replayed: its inputs pass on
            output = runtime.executor.pass_through(session, self, args, kwargs)
            if output is not None:
                return output
        # Drivers that trace the model (export, the whole-model compile) run the bound programs as
        # they are: tracing swaps parameters for its own tensors, which is not a change of the model.
        if guard is not None and session.live and not checked and not guard.holds():
            if not self.unbind_changed(session):
                runtime.executor.note_inputs(session, pytree.tree_leaves((args, kwargs)))
                return self.original(*args, **kwargs)
        elif guard is None and session.rebinds.get(self.path, 0) > runtime.recapture_limit:
            runtime.executor.note_inputs(session, pytree.tree_leaves((args, kwargs)))
            return self.original(*args, **kwargs)
        leaves, structure = flatten_call(args, kwargs)
        signature = (structure, tuple(map(leaf_key, leaves)), session.ambient)
        binding = self.bindings.get(signature)
        if binding is None:
            binding = runtime.bind(self, args, kwargs, signature, session.call.cond_only)
        invariant = runtime.invariant_list_call(self, binding, signature, leaves, session)
        if invariant is not None:
            output = session.caches.invariant.recall(invariant, session.slot, self.path, binding, signature, leaves)
            if output is not None:
                runtime.executor.replayed_invariant(binding, leaves, session)
                return output
        computes = invariant is not None and runtime.computes_fully(binding, session)
        output = self._run(binding, args, kwargs, leaves, session)
        if computes:  # only what the block itself computed is recorded, never a reused or replayed value
            session.caches.invariant.record(invariant, session.slot, self.path, binding, signature, leaves, output,
                                            copy=runtime.outputs_reused(session))
        return output

    def _run(self, binding: Any, args: tuple, kwargs: dict, leaves: list, session: Any) -> Any:
        runtime = self.runtime
        if isinstance(binding, EagerBinding):
            return runtime.run_eager(self, binding, args, kwargs, session)
        if isinstance(binding, Uncached) or not binding.branches:
            runtime.executor.note_inputs(session, leaves)  # a span's output read here ends the span
            return self.original(*args, **kwargs)
        return runtime.executor.run_block(binding, leaves, session)


def wrapper_class(block_class: type) -> type:
    """A :class:`CachedBlock` subclass whose ``forward`` has ``block_class.forward``'s signature.

    Libraries that map a block's arguments by name from its class (diffusers' context-parallel
    split hooks, installed on ``blocks.0`` by ``enable_parallelism`` after ``transform``) then find
    the block's own parameters on the wrapper.

        >>> wrapper_class(nn.Linear).__name__
        'CachedLinear'
    """
    def forward(self: CachedBlock, *args: Any, **kwargs: Any) -> Any:
        return CachedBlock.forward(self, *args, **kwargs)

    try:
        forward.__signature__ = inspect.signature(block_class.forward)  # type: ignore[attr-defined]
    except (TypeError, ValueError):  # a forward with no readable signature keeps (*args, **kwargs)
        pass
    forward.__doc__ = CachedBlock.forward.__doc__
    name = f"Cached{block_class.__name__}"
    return type(name, (CachedBlock,), {"forward": forward, "__module__": __name__, "__qualname__": name})


def _new_wrapper(block_class: type) -> CachedBlock:
    wrapper = wrapper_class(block_class)
    share_block_metadata(block_class, wrapper)
    return nn.Module.__new__(wrapper)


def share_block_metadata(block_class: type, wrapper: type) -> None:
    """Give ``wrapper`` the entry ``block_class`` has in diffusers' ``TransformerBlockRegistry``.

    diffusers' block hooks look a block's argument and output layout up by class: layer skipping
    (``apply_layer_skip``, which skip-layer guidance applies to the denoiser at each guided call)
    finds the wrapper in the block list and would fail on its class. Blocks diffusers does not
    describe, and diffusers versions without the registry, are left as they are.

        >>> from diffusers.hooks._helpers import TransformerBlockRegistry
        >>> from diffusers.models.transformers.transformer_wan import WanTransformerBlock
        >>> wrapper = wrapper_class(WanTransformerBlock)
        >>> share_block_metadata(WanTransformerBlock, wrapper)
        >>> TransformerBlockRegistry.get(wrapper).return_hidden_states_index
        0
    """
    try:
        from diffusers.hooks._helpers import TransformerBlockRegistry
    except ImportError:  # pragma: no cover - diffusers before its hook registry
        return
    try:
        metadata = TransformerBlockRegistry.get(block_class)
    except ValueError:  # a block class diffusers' hooks do not know
        return
    # A copy: registering sets the entry's class, which reads the forward's parameter names.
    TransformerBlockRegistry.register(wrapper, dataclasses.replace(metadata))


def wrap_block(block: nn.Module, list_name: str, index: int, runtime: ModelRuntime,
               on_capture_error: str = "branches", classes: dict[type, type] | None = None,
               block_list: nn.Module | None = None) -> CachedBlock:
    """The :class:`CachedBlock` standing in for ``block`` (of a class made for ``type(block)``, kept
    in ``classes`` for the model's other blocks of that class when given) in ``block_list``.
    Context-parallel and layer-skip hooks on the block move to the wrapper (see :func:`move_block_hooks`)."""
    classes = {} if classes is None else classes
    wrapper_type = classes.get(type(block))
    if wrapper_type is None:
        wrapper_type = classes[type(block)] = wrapper_class(type(block))
        share_block_metadata(type(block), wrapper_type)
    wrapper = wrapper_type(block, list_name, index, runtime, on_capture_error, block_list)
    move_block_hooks(block, wrapper)
    return wrapper


def _follows_the_block(hook: Any) -> bool:
    """diffusers hooks that move with a block between it and its wrapper: they keep no state and are
    bound to no module object (context-parallel split and gather, a whole-block layer skip)."""
    from diffusers.hooks.context_parallel import ContextParallelGatherHook, ContextParallelSplitHook
    from diffusers.hooks.layer_skip import TransformerBlockSkipHook

    return isinstance(hook, (ContextParallelSplitHook, ContextParallelGatherHook, TransformerBlockSkipHook))


def move_block_hooks(source: nn.Module, target: nn.Module) -> None:
    """Move diffusers' block hooks that follow a block (see :func:`_follows_the_block`) from ``source``
    to ``target``, in order.

    ``enable_parallelism`` before ``transform`` puts the sequence split of ``blocks.0`` on the block
    itself; a capture would bake that split into the block's graph, whose stream then changes shape
    inside the block. On the wrapper the split runs before the cached block, as when parallelism is
    enabled after ``transform``; a layer skip runs instead of it. ``restore`` moves them back. Other
    diffusers hooks stay where they are.
    """
    registry = getattr(source, "_diffusers_hook", None)
    if registry is None:
        return
    from diffusers.hooks import HookRegistry

    moving = [(name, hook) for name, hook in registry.hooks.items() if _follows_the_block(hook)]
    for name, _ in reversed(moving):
        registry.remove_hook(name, recurse=False)
    if moving:
        target_registry = HookRegistry.check_if_exists_or_initialize(target)
        for name, hook in moving:
            target_registry.register_hook(hook, name)


def stranded_hooks(wrapper: CachedBlock) -> list[str]:
    """The diffusers hooks registered on ``wrapper`` that cannot move back to its block (group
    offloading's, bound to the wrapper object): ``restore`` would drop them with the wrapper."""
    registry = wrapper.__dict__.get("_diffusers_hook")
    if registry is None:
        return []
    return [name for name, hook in registry.hooks.items()
            if not _follows_the_block(hook) and not type(hook).__module__.startswith("adacache_fx.")]
