"""Public entry points: transform, restore, generation, reset, report."""

from __future__ import annotations

import contextlib
import logging
import types
from typing import Iterator

import torch.nn as nn

from .errors import AdaCacheError, AlreadyTransformedError, NotTransformedError
from .passes.find_blocks import find_block_lists
from .policies.base import Policy
from .runtime.cached_block import move_block_hooks, stranded_hooks, wrap_block
from .runtime.captures import CaptureCache
from .runtime.dynamo import HandOffForward
from .runtime.executor import GraphRunner
from .runtime.report import Report, build_report
from .runtime.runtime import RECAPTURE_LIMIT, ModelRuntime, refuse_stacked_cache
from .runtime.session import Session

logger = logging.getLogger("adacache_fx")

_RUNTIME_ATTR = "_adacache_fx_runtime"


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model itself behind ``torch.compile``'s wrapper or ``ax.compile(scope="model")``'s."""
    from .runtime.whole_model import CompiledModel

    modules = model.__dict__.get("_modules", {})
    if isinstance(model, CompiledModel):
        return modules["model"]
    inner = modules.get("_orig_mod")
    return inner if inner is not None and type(model).__name__ == "OptimizedModule" else model


def get_runtime(model: nn.Module) -> ModelRuntime:
    """The runtime state of a transformed model (caches, steps, statistics)."""
    runtime = _unwrapped(model).__dict__.get(_RUNTIME_ATTR)
    if runtime is None:
        raise NotTransformedError(
            f"{type(model).__name__} is not transformed; call adacache_fx.transform(model, policy) first"
        )
    return runtime


def is_transformed(model: nn.Module) -> bool:
    return _RUNTIME_ATTR in _unwrapped(model).__dict__


def transform(
    model: nn.Module,
    policy: Policy,
    *,
    blocks: list[str] | None = None,
    on_capture_error: str = "branches",
    recapture_limit: int = RECAPTURE_LIMIT,
    fold: bool = True,
    cache_budget: int | None = None,
    captures: CaptureCache | None = None,
) -> nn.Module:
    """Rewrite every residual branch of the model's transformer blocks into a cached region.

    In place; returns ``model``. Blocks are captured on the first call at each input shape, and
    again whenever the live model changes under them (adapters added, switched or fused, weights
    replaced or quantized, attention processors or backends switched, hooks added): the transformed
    model always computes what the untransformed one would.

    >>> import adacache_fx as ax  # doctest: +SKIP
    >>> pipe.transformer = ax.transform(pipe.transformer, ax.Static(interval=2))  # doctest: +SKIP

    Args:
        model: any DiT, e.g. a diffusers transformer (``pipe.transformer``).
        policy: decides per step which branches reuse their cached residual (``NoCache()``,
            ``Static(interval=2)``, ...).
        blocks: paths of the ModuleLists holding the transformer blocks; found automatically if None.
        on_capture_error: what happens to a block ``torch.export`` cannot capture whole (a non-tensor
            object among its inputs, ``.numpy()`` or data-dependent control flow inside it).
            ``"branches"`` (default): its forward runs eagerly and its attention and MLP child modules
            are the cached branches (their outputs are reused; the rest of the block runs every step),
            or :class:`~adacache_fx.CaptureError` when it has none; ``"raise"``: the error at once;
            ``"skip"``: the block runs uncached. :func:`report` lists such blocks and why.
        recapture_limit: captures one block may go through because the model keeps changing under
            it (a LoRA scale changed every step, say); beyond it the block runs uncached, with a
            warning, as dynamo falls back after its recompile limit.
        fold: for policies that reuse whole blocks together (Static, AdaCache, First-Block-Cache,
            TeaCache), keep one residual per stream for each span of consecutive blocks instead of
            one per branch (``stream_out - stream_in``; equal to per-branch reuse up to float
            rounding), and on a reuse step pass the span's blocks through and add it once. A span
            runs across the model's code between blocks where that code is a reshape, a token-axis
            swap or a model constant added (Latte's spatial/temporal interleave; see
            ``runtime/bridges.py``).
        cache_budget: bytes of cached residuals one thread may hold; a call that leaves more
            raises :class:`~adacache_fx.CacheBudgetError` naming what holds them (None: no limit).
            ``ax.report(model).cache_peak_bytes`` says what a generation needed.
        captures: a :class:`~adacache_fx.CaptureCache` shared with other models of the same
            architecture: a block whose structure and input signature were captured for one of them
            is bound to that program instead of being captured again (seconds per block kind).
    """
    compiled = model
    model = _unwrapped(model)  # torch.compile(model) first, then transform: the model inside
    if is_transformed(model):
        raise AlreadyTransformedError(
            f"{type(model).__name__} is already transformed by adacache_fx; call "
            "adacache_fx.restore(model) first to change the policy"
        )
    refuse_stacked_cache(model, model.named_modules())
    if not isinstance(policy, Policy):
        raise TypeError(
            f"policy must be an adacache_fx policy (e.g. adacache_fx.Static(interval=2)), got {policy!r}"
        )
    if on_capture_error not in ("branches", "raise", "skip"):
        raise ValueError(f"on_capture_error must be 'branches', 'raise' or 'skip', got {on_capture_error!r}")
    if isinstance(recapture_limit, bool) or not isinstance(recapture_limit, int) or recapture_limit < 1:
        raise ValueError(f"recapture_limit must be an int >= 1, got {recapture_limit!r}")
    search = find_block_lists(model, blocks)
    if cache_budget is not None and (isinstance(cache_budget, bool) or not isinstance(cache_budget, int)
                                     or cache_budget < 0):
        raise ValueError(f"cache_budget must be a number of bytes (int >= 0) or None, got {cache_budget!r}")
    if captures is not None and not isinstance(captures, CaptureCache):
        raise TypeError(f"captures must be an adacache_fx.CaptureCache (or None), got {type(captures).__name__}")
    runtime = ModelRuntime(model, policy, recapture_limit, fold=fold, captures=captures)
    runtime.executor.cache_budget = cache_budget
    runtime.left_alone = list(search.left_alone)
    runtime.auxiliary_lists = frozenset(block_list.name for block_list in search.auxiliary)
    wrapper_classes: dict[type, type] = {}  # one per block class
    for block_list in search.chosen + search.auxiliary:
        module_list = model.get_submodule(block_list.name)
        for index, block in enumerate(block_list.blocks):
            wrapper = wrap_block(block, block_list.name, index, runtime, on_capture_error, wrapper_classes, module_list)
            module_list[index] = wrapper
            runtime.blocks.append(wrapper)
            runtime.executor.blocks[wrapper.path] = wrapper
        logger.info(
            "adacache_fx: transformed %s (%d x %s%s)",
            block_list.name, len(block_list.blocks), block_list.block_class,
            ", a deeper list: numbered after the main blocks" if block_list in search.auxiliary else "",
        )
    for path, reason in search.left_alone:
        logger.info("adacache_fx: left alone %s (%s)", path, reason)
    _extend_repeated_blocks(model, runtime)
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
    # torch.compile meets a forward that hands the call over (see runtime/dynamo.py).
    model.__dict__["forward"] = HandOffForward(runtime, model.forward)
    model.__dict__[_RUNTIME_ATTR] = runtime
    runtime.attach_pipeline_signals(model)
    return compiled


def _extend_repeated_blocks(model: nn.Module, runtime: ModelRuntime) -> None:
    """diffusers' ``compile_repeated_blocks`` finds blocks by class name: after ``transform``, the
    wrappers too. (Blocks compiled in place before it: see ``ModelRuntime.bind``.)"""
    repeated = getattr(model, "_repeated_blocks", None)
    if repeated:
        wrappers = sorted({type(b).__name__ for b in runtime.blocks if type(b.original).__name__ in repeated})
        own = "_repeated_blocks" in model.__dict__  # an instance's own list, or the class's
        runtime.repeated_blocks_before = (own, model.__dict__.get("_repeated_blocks"))
        model.__dict__["_repeated_blocks"] = type(repeated)([*repeated, *wrappers])


def restore(model: nn.Module) -> nn.Module:
    """Undo :func:`transform`: the original block objects go back in place. Returns ``model``."""
    compiled = model
    model = _unwrapped(model)
    runtime = get_runtime(model)
    stranded = [f"{name} on {wrapper.path}" for wrapper in runtime.blocks for name in stranded_hooks(wrapper)]
    if stranded:  # checked before anything is undone: the model stays transformed
        raise AdaCacheError(
            f"restore would drop diffusers hooks registered on the cached blocks after transform "
            f"({', '.join(stranded[:3])}{', ...' if len(stranded) > 3 else ''}): they are bound to the "
            "wrappers and cannot follow the blocks back. Remove them first, or keep the model transformed "
            "(adacache_fx.NoCache() computes every step)"
        )
    runtime.uncompile_outside()
    runtime.detach_pipeline_signals(model)
    forward = model.__dict__.get("forward")
    if isinstance(forward, HandOffForward):
        if isinstance(forward.forward, types.MethodType) and forward.forward.__self__ is model \
                and forward.forward.__func__ is type(model).forward:
            del model.__dict__["forward"]  # the class's own forward again
        else:
            model.__dict__["forward"] = forward.forward  # what was installed before transform
    for wrapper in runtime.blocks:
        move_block_hooks(wrapper, wrapper.original)
        model.get_submodule(wrapper.list_name)[wrapper.index] = wrapper.original
        wrapper.original.training = wrapper.training
    for hook in runtime.hooks:
        hook.remove()
    if runtime.repeated_blocks_before is not None:  # see _extend_repeated_blocks
        own, before = runtime.repeated_blocks_before
        if own:
            model.__dict__["_repeated_blocks"] = before
        else:
            model.__dict__.pop("_repeated_blocks", None)
    del model.__dict__[_RUNTIME_ATTR]
    return compiled


@contextlib.contextmanager
def generation(model: nn.Module, num_steps: int | None = None) -> Iterator[Session]:
    """Mark one generation explicitly: caches start empty, and policies know ``num_steps``.

    Optional: without it, generations are found from the calls (see :mod:`adacache_fx.runtime.steps`:
    diffusers pipelines' end of call, the timestep, whether a latent continues the last step).
    Inside it, only the context starts and ends the generation; caches are freed on exit. It applies
    to the calling thread.

    >>> with ax.generation(model, num_steps=20):  # doctest: +SKIP
    ...     for t in timesteps:
    ...         latents = scheduler.step(model(latents, t, context).sample, t, latents).prev_sample
    """
    if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1):
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    session = get_runtime(model).session()
    session.start_generation(num_steps, explicit=True)
    try:
        yield session
    finally:
        session.end_generation()


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
    every policy, in-step ones included. The model's modules outside the blocks (embedders,
    positional encodings, output head) are compiled in place with the same options, module by
    module (``nn.Module.compile``; undone by :func:`restore`); the model's own ``forward`` around
    them stays eager.

    ``scope="model"`` (returns a new :class:`~adacache_fx.runtime.whole_model.CompiledModel` that
    stands in for ``model``): the whole model is one compiled graph in which each cached branch is a
    ``torch.cond`` on a boolean input; the host plans each step and feeds the decisions and caches in
    (explicit state). One graph for every plan: no recompiles when plans change, embedders and final
    layer compiled too. Schedule-driven policies and First-Block-Cache (its decision inside the
    graph); the first call at each input signature runs eagerly to capture the blocks.

    ``backend``: default ``"inductor"``. Under ``scope="model"`` also ``"aot_inductor"``: the graph is
    compiled ahead of time into a package (``torch._inductor.aoti_compile_and_package``;
    ``options={"package_path": "model.pt2"}``, default a temporary file) and loaded for the loop.

    Regional compilation, ``model.compile_repeated_blocks(**options)`` or ``block.compile(**options)``
    (before or after ``transform``), compiles the block graphs the same way and leaves the modules
    outside the blocks eager (see :meth:`~adacache_fx.runtime.runtime.ModelRuntime.compile_blocks`).

    ``torch.compile(model)`` on a transformed model (before or after its first call) hands each
    call over to this runtime at the model's entry (one graph break): the blocks run their
    plan-variant graphs compiled with these options (Inductor, ``fullgraph=True`` when this function
    was not called). ``fullgraph=True`` there raises, naming ``scope="model"``.
    """
    runtime = get_runtime(model)
    if scope not in ("blocks", "model"):
        raise ValueError(f"ax.compile(scope={scope!r}): 'blocks' (each plan-variant block graph) or 'model' (one graph)")
    if backend is None:
        backend = "inductor"
    if backend == "aot_inductor" and scope != "model":
        raise ValueError("ax.compile(backend='aot_inductor') compiles the whole model ahead of time: pass scope='model'")
    options_ = {"backend": backend, "mode": mode, "dynamic": dynamic, **({"options": options} if options else {})}
    if scope == "model":
        from .runtime.whole_model import CompiledModel

        return CompiledModel(model, runtime, options_)
    runtime.use_graphs(GraphRunner({**options_, "fullgraph": True}), _unwrapped(model))
    return model


def reset(model: nn.Module, *, captures: bool = False) -> None:
    """Drop caches, step positions and statistics of a transformed model (every thread's).

    ``captures=True`` also drops every captured block graph, so each block is captured again on
    its next call: for changes the guards cannot see (a global a block's forward reads).
    """
    runtime = get_runtime(model)
    runtime.reset()
    if captures:
        runtime.forget_captures()


def policy_state(model: nn.Module):
    """The policy's state for the calling thread's current generation (e.g. AdaCache's ``trace``)."""
    return get_runtime(model).session().policy_state


def report(model: nn.Module) -> Report:
    """Branches found, per-step plans, compute fraction and cache size of a transformed model."""
    return build_report(get_runtime(model))
