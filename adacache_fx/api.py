"""Public entry points: transform, restore, generation, reset, report."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch.nn as nn

from .errors import AlreadyTransformedError, NotTransformedError
from .passes.find_blocks import find_block_lists
from .policies.base import Policy
from .runtime.cached_block import CachedBlock
from .runtime.engine import CacheRuntime
from .runtime.report import Report, build_report

logger = logging.getLogger("adacache_fx")

_RUNTIME_ATTR = "_adacache_fx_runtime"


def get_runtime(model: nn.Module) -> CacheRuntime:
    """The runtime state of a transformed model (caches, steps, statistics)."""
    runtime = model.__dict__.get(_RUNTIME_ATTR)
    if runtime is None:
        raise NotTransformedError(
            f"{type(model).__name__} is not transformed; call adacache_fx.transform(model, policy) first"
        )
    return runtime


def is_transformed(model: nn.Module) -> bool:
    return _RUNTIME_ATTR in model.__dict__


def transform(
    model: nn.Module,
    policy: Policy,
    *,
    blocks: list[str] | None = None,
    on_capture_error: str = "raise",
) -> nn.Module:
    """Rewrite every residual branch of the model's transformer blocks into a cached region.

    In place; returns ``model``. Blocks are captured on the first call at each input shape.

    Args:
        model: any DiT, e.g. a diffusers transformer (``pipe.transformer``).
        policy: decides per step which branches reuse their cached residual (``NoCache()``,
            ``Static(interval=2)``, ...).
        blocks: paths of the ModuleLists holding the transformer blocks; found automatically if None.
        on_capture_error: ``"raise"`` (default) or ``"skip"`` to run blocks that cannot be captured
            uncached (listed in :func:`report`).
    """
    if is_transformed(model):
        raise AlreadyTransformedError(
            f"{type(model).__name__} is already transformed by adacache_fx; call "
            "adacache_fx.restore(model) first to change the policy"
        )
    if not isinstance(policy, Policy):
        raise TypeError(
            f"policy must be an adacache_fx policy (e.g. adacache_fx.Static(interval=2)), got {policy!r}"
        )
    if on_capture_error not in ("raise", "skip"):
        raise ValueError(f"on_capture_error must be 'raise' or 'skip', got {on_capture_error!r}")
    search = find_block_lists(model, blocks)
    runtime = CacheRuntime(model, policy)
    runtime.left_alone = list(search.left_alone)
    for block_list in search.chosen:
        module_list = model.get_submodule(block_list.name)
        for index, block in enumerate(block_list.blocks):
            wrapper = CachedBlock(block, block_list.name, index, runtime, on_capture_error)
            module_list[index] = wrapper
            runtime.blocks.append(wrapper)
        logger.info(
            "adacache_fx: transformed %s (%d x %s)",
            block_list.name, len(block_list.blocks), block_list.block_class,
        )
    for path, reason in search.left_alone:
        logger.info("adacache_fx: left alone %s (%s)", path, reason)
    if runtime.read_timestep is None:
        logger.warning(
            "adacache_fx: %s.forward has no timestep argument; every call counts as one step. "
            "Use adacache_fx.generation(model, num_steps=...) to mark generations.",
            type(model).__name__,
        )
    runtime.hooks = [
        model.register_forward_pre_hook(runtime.on_model_call, with_kwargs=True),
        model.register_forward_hook(runtime.after_model_call, with_kwargs=True),
    ]
    model.__dict__[_RUNTIME_ATTR] = runtime
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undo :func:`transform`: the original block objects go back in place. Returns ``model``."""
    runtime = get_runtime(model)
    for wrapper in runtime.blocks:
        model.get_submodule(wrapper.list_name)[wrapper.index] = wrapper.original
        wrapper.original.training = wrapper.training
    for hook in runtime.hooks:
        hook.remove()
    del model.__dict__[_RUNTIME_ATTR]
    return model


@contextlib.contextmanager
def generation(model: nn.Module, num_steps: int | None = None) -> Iterator[CacheRuntime]:
    """Mark one generation explicitly: caches start empty, and policies know ``num_steps``.

    Optional: without it, generations are detected from the timestep. Inside it, only the context
    starts and ends the generation; caches are freed on exit.
    """
    if num_steps is not None and (not isinstance(num_steps, int) or num_steps < 1):
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    runtime = get_runtime(model)
    runtime.begin_generation(num_steps)
    try:
        yield runtime
    finally:
        runtime.end_generation()


def compile(  # noqa: A001 - mirrors torch.compile, which it applies
    model: nn.Module,
    *,
    scope: str = "blocks",
    backend: str | None = None,
    mode: str | None = None,
    dynamic: bool = False,
    options: dict | None = None,
) -> nn.Module:
    """Compile a transformed model with ``torch.compile(fullgraph=True)``.

    ``scope="blocks"`` (default; in place, returns ``model``): every plan-variant block graph is
    compiled on first use. Each variant (a block graph with some regions computed, stored or reused)
    is one control-flow-free graph: no graph breaks inside it, and the host picks the variant each
    step, so a generation triggers no recompilation once every variant it uses has run. Works for
    every policy, in-step ones included; the model's code around the blocks stays eager.

    ``scope="model"`` (returns a new :class:`~adacache_fx.runtime.whole_model.CompiledModel` that
    stands in for ``model``): the whole model is one compiled graph in which each cached branch is a
    ``torch.cond`` on a boolean input; the host plans each step and feeds the decisions and caches in
    (explicit state). One graph for every plan: no recompiles when plans change, embedders and final
    layer compiled too. Schedule-driven policies only (Static, AdaCache, PAB, TaylorSeer, FasterCache
    without CFG-Cache); the first call runs eagerly to capture the blocks.

    ``backend``: default ``"inductor"`` for ``scope="blocks"`` and ``"aot_eager"`` for
    ``scope="model"``: on torch 2.13 Inductor fails on the whole-model graph (a stride assertion
    inside a compiled ``torch.cond`` branch whose operand Inductor laid out differently outside it).

    Calling ``torch.compile(model, fullgraph=True)`` yourself on a transformed model is not
    supported: the runtime's host-side step tracking breaks the graph. Use one of the two scopes.
    """
    runtime = get_runtime(model)
    if backend is None:
        backend = "aot_eager" if scope == "model" else "inductor"
    options_ = {"backend": backend, "mode": mode, "dynamic": dynamic, **({"options": options} if options else {})}
    if scope == "model":
        from .runtime.whole_model import CompiledModel

        return CompiledModel(model, runtime, options_)
    if scope != "blocks":
        raise ValueError(f"ax.compile(scope={scope!r}): 'blocks' (each plan-variant block graph) or 'model' (one graph)")
    runtime.compile_options = {**options_, "fullgraph": True}
    for shared in runtime.shared_captures.values():
        shared.variants.clear()  # built eagerly before; rebuilt compiled on next use
        shared.compiled_probe = None
    return model


def reset(model: nn.Module) -> None:
    """Drop caches, step position and statistics of a transformed model (captures are kept)."""
    get_runtime(model).reset()


def report(model: nn.Module) -> Report:
    """Branches found, per-step plans, compute fraction and cache size of a transformed model."""
    return build_report(get_runtime(model))
