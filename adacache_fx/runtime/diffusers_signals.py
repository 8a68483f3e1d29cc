"""Hearing diffusers pipelines: the end of each ``__call__`` and its ``cache_context`` calls.

diffusers pipelines end every ``__call__`` with ``maybe_free_model_hooks()``, which resets the
stateful hooks of their denoiser, and wrap denoiser calls in ``transformer.cache_context(name,
...)``, which hands a ``CacheContext`` to each stateful hook's ``StateManager``. A small stateful
hook registered through diffusers' own ``HookRegistry`` on the model's first block hears both, for
the calling thread's session: the next call then starts a new generation, and the caches are freed
as soon as the pipeline is done. Importing this module needs diffusers.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

HOOK_NAME = "adacache_fx_pipeline_signals"


class _NoState(BaseState):
    def reset(self, *args: Any, **kwargs: Any) -> None:
        pass


class _ContextListener(StateManager):
    """Passes every cache context the pipeline sets to the calling thread's session."""

    def __init__(self, runtime: Any) -> None:
        super().__init__(_NoState)
        self.runtime = runtime

    def set_context(self, context: Any) -> None:
        super().set_context(context)
        self.runtime.on_pipeline_context(context)


class PipelineSignals(ModelHook):
    """A stateful diffusers hook whose state reset is the end of a pipeline call."""

    _is_stateful = True

    def __init__(self, runtime: Any) -> None:
        super().__init__()
        self.runtime = runtime
        self.contexts = _ContextListener(runtime)

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.runtime.on_pipeline_end()
        return module


def _refresh(model: nn.Module) -> None:
    registry = getattr(model, "_diffusers_hook", None)
    if registry is not None:  # its list of child registries was built without (or with) ours
        registry.invalidate_child_registries_cache()


def attach(model: nn.Module, block: nn.Module, runtime: Any) -> PipelineSignals:
    hook = PipelineSignals(runtime)
    HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, HOOK_NAME)
    _refresh(model)
    return hook


def detach(model: nn.Module, block: nn.Module, hook: PipelineSignals) -> None:
    registry = getattr(block, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(HOOK_NAME) is hook:
        registry.remove_hook(HOOK_NAME, recurse=False)
    _refresh(model)
