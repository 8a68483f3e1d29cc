"""The module that stands in for one transformer block of a transformed model: the eager driver.

It shares the original block's parameter, buffer and submodule dictionaries, so the model's
``state_dict`` keys, ``.to()``, ``.half()``, weight loading and PEFT's adapter injection reach the
block exactly as before. On each call it checks its guard (did the live block change since its
capture?), looks up the binding for the call's input signature (capturing on a miss) and hands it
to the runtime's executor. A failed guard unbinds the block: it is captured again for its new
state, and residuals it cached before are never read again.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
import torch.utils._pytree as pytree

from ..passes.capture import leaf_key
from ..passes.guards import guard_module
from .runtime import ModelRuntime, Uncached

# What a CachedBlock keeps beside nn.Module's own state; none of it survives pickling.
_RUNTIME_STATE = ("bindings", "guard")


class CachedBlock(nn.Module):
    def __init__(
        self,
        block: nn.Module,
        list_name: str,
        index: int,
        runtime: ModelRuntime,
        on_capture_error: str = "raise",
    ) -> None:
        super().__init__()
        # Share state with the original block: one set of weights, unchanged state_dict keys.
        self.__dict__["_modules"] = block._modules
        self.__dict__["_parameters"] = block._parameters
        self.__dict__["_buffers"] = block._buffers
        self.__dict__["_non_persistent_buffers_set"] = block._non_persistent_buffers_set
        self.__dict__["original"] = block  # not a submodule: its children are ours already
        self.__dict__["runtime"] = runtime
        self.training = block.training
        self.list_name = list_name
        self.index = index
        self.path = f"{list_name}.{index}"
        self.on_capture_error = on_capture_error
        self.epoch = 0
        self._fresh_runtime_state()

    def _fresh_runtime_state(self) -> None:
        self.__dict__["bindings"] = {}  # input signature -> Binding | Uncached
        self.__dict__["guard"] = None  # ModuleGuard of the live block, recorded at its capture

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Plain attributes of the block (flags models read, e.g. ``block.context_pre_only``).
            return getattr(self.__dict__["original"], name)

    def extra_repr(self) -> str:
        return f"wraps={type(self.original).__name__}, captured_shapes={len(self.bindings)}"

    # -- pickling: the block and its settings, not its captures ------------------------------------
    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k not in _RUNTIME_STATE}
        # A diffusers hook installs a closure as ``forward``: the runtime installs it again.
        state.pop("forward", None)
        state.pop("_diffusers_hook", None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._fresh_runtime_state()

    # -- bindings -------------------------------------------------------------------------------
    def remember(self, signature: Any, binding: Any) -> Any:
        """Keep ``binding`` for ``signature``; the first one records the guard of the live block."""
        self.bindings[signature] = binding
        if self.guard is None:
            self.__dict__["guard"] = guard_module(self.original)
        return binding

    def record_guard(self) -> None:
        """Record the guard of the live block anew (after a driver's trace, see ``ModelRuntime.tracing``)."""
        self.__dict__["guard"] = guard_module(self.original)

    def unbind(self, reason: str) -> None:
        """Forget every binding: the next call captures the block for its state then."""
        self.bindings.clear()
        self.__dict__["guard"] = None
        self.epoch += 1

    # -- call -----------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        runtime = self.runtime
        session = runtime.session()
        guard = self.guard
        # Drivers that trace the model (export, the whole-model compile) run the bound programs as
        # they are: tracing swaps parameters for its own tensors, which is not a change of the model.
        if guard is not None and session.live and not guard.holds():
            changes = guard.changes(self.original)
            self.unbind("; ".join(changes))
            if not runtime.note_recapture(session, self.path, changes):
                runtime.executor.note_inputs(session, pytree.tree_leaves((args, kwargs)))
                return self.original(*args, **kwargs)
        elif guard is None and session.rebinds.get(self.path, 0) > runtime.recapture_limit:
            runtime.executor.note_inputs(session, pytree.tree_leaves((args, kwargs)))
            return self.original(*args, **kwargs)
        leaves, tree = pytree.tree_flatten((args, kwargs))
        signature = (tree, tuple(map(leaf_key, leaves)), session.ambient)
        binding = self.bindings.get(signature)
        if binding is None:
            binding = runtime.bind(self, args, kwargs, signature, session.call.cond_only)
        if isinstance(binding, Uncached) or not binding.branches:
            runtime.executor.note_inputs(session, leaves)  # a span's output read here ends the span
            return self.original(*args, **kwargs)
        return runtime.executor.run_block(binding, leaves, session)
