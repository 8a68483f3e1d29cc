"""The whole transformed model as one compiled graph, every cached branch a ``torch.cond``.

``ax.compile(model, scope="model")`` returns a :class:`CompiledModel`: a drop-in module whose calls
plan each step on the host (step tracking, the policy, forecasts: plain Python, outside the graph),
then run one ``torch.compile(fullgraph=True)`` graph of the whole model in which each cached branch
reuses or computes as a boolean tensor input says. Plans that change from step to step change those
inputs, not the graph: no recompiles. Caches go in and out of the graph explicitly and are kept here
on the host side, as the eager runtime keeps them. The first call runs eagerly (it captures the
blocks); every later call at the same shapes runs the one compiled graph.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from ..errors import PolicyError
from ..passes.capture import call_signature
from ..policies.base import Policy
from .engine import BlockCache, CacheRuntime, TensorPlan


class ConditionalModel(nn.Module):
    """A transformed model as a function of tensors only, every cached branch deciding at run time:
    ``(*model tensors, *[reuse_b, *cache_b for b in decisions]) -> (*output tensors, *new cache_b)``.

    ``kwargs``: one call's keyword arguments; its tensor leaves become the leading inputs, the rest is
    fixed. ``residuals``: how many cache tensors each branch of ``decisions`` has. What
    ``torch.export`` traces, for ONNX (``first_output_only``: the output is the first tensor) and for
    the whole-model compile.
    """

    def __init__(self, model: nn.Module, runtime: CacheRuntime, kwargs: dict, decisions: list[str],
                 residuals: dict[str, int], first_output_only: bool = False,
                 in_step_branches: frozenset[str] | None = None) -> None:
        super().__init__()
        self.model = model
        # An in-step policy deciding inside the graph: two more inputs (its state, allow) and two more
        # outputs (reuse, new state); the decision covers these branches.
        self.in_step_branches = in_step_branches
        self.__dict__["runtime"] = runtime
        self.decisions = decisions
        self.residuals = residuals
        self.first_output_only = first_output_only
        self._leaves, self._spec = pytree.tree_flatten(kwargs)
        self._is_tensor = [isinstance(leaf, torch.Tensor) for leaf in self._leaves]
        # The model output's structure, filled when traced (export restores module attributes, so
        # it is a dict mutated in place).
        self.__dict__["output"] = {}

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        count = sum(self._is_tensor)
        given = iter(tensors[:count])
        leaves = [next(given) if is_tensor else leaf for leaf, is_tensor in zip(self._leaves, self._is_tensor)]
        kwargs = pytree.tree_unflatten(leaves, self._spec)
        rest = iter(tensors[count:])
        reuse, cache_in = {}, {}
        for branch in self.decisions:
            reuse[branch] = next(rest)
            cache_in[branch] = tuple(next(rest) for _ in range(self.residuals[branch]))
        in_step = None
        if self.in_step_branches is not None:
            in_step = {"state": next(rest), "allow": next(rest), "covered": self.in_step_branches}
        runtime = self.runtime
        runtime.fixed = TensorPlan(reuse, cache_in, in_step=in_step)
        try:
            output = self.model(**kwargs)
            stored = runtime.fixed.cache_out
        finally:
            runtime.fixed = None
        if in_step is not None and "reuse" not in in_step:
            raise PolicyError("the in-step signal's block did not run in the conditional graph: a capture bug")
        missing = [b for b in self.decisions if b not in stored]
        if missing:
            raise PolicyError(f"branches {missing[:3]} did not run in the conditional graph: a capture bug")
        out_leaves, spec = pytree.tree_flatten(output)
        tensors_out = [t for t in out_leaves if isinstance(t, torch.Tensor)]
        self.output.update(
            spec=spec,
            constants=[t for t in out_leaves if not isinstance(t, torch.Tensor)],
            is_tensor=[isinstance(t, torch.Tensor) for t in out_leaves],
        )
        if self.first_output_only:
            tensors_out = tensors_out[:1]
        extra = (in_step["reuse"], in_step["new_state"]) if in_step is not None else ()
        return (*tensors_out, *[v for branch in self.decisions for v in stored[branch]], *extra)

    def unflatten_output(self, tensors: list[torch.Tensor]) -> Any:
        """The model's output structure around the graph's output tensors."""
        given, constants = iter(tensors), iter(self.output["constants"])
        leaves = [next(given) if is_tensor else next(constants) for is_tensor in self.output["is_tensor"]]
        return pytree.tree_unflatten(leaves, self.output["spec"])


class CompiledModel(nn.Module):
    """A transformed model compiled whole (see the module docstring). Attribute reads fall through
    to the model, so pipelines that read ``transformer.config`` or ``.dtype`` keep working."""

    def __init__(self, model: nn.Module, runtime: CacheRuntime, compile_options: dict) -> None:
        super().__init__()
        policy = runtime.policy
        self.in_step = policy.decides_in_step
        if self.in_step and (runtime.signal is None or runtime.signal.kind != "first_blocks_residual"
                             or type(policy).decide_in_graph is Policy.decide_in_graph):
            raise PolicyError(
                f"{type(policy).__name__} decides inside each step and has no in-graph decision "
                "(Policy.decide_in_graph over the first blocks' residual); ax.compile(scope='model') "
                "runs schedule-driven policies and First-Block-Cache. Use ax.compile(model) "
                "(scope='blocks') for it."
            )
        self.model = model
        self.__dict__["runtime"] = runtime
        self.compile_options = compile_options
        self._conditional: list = []  # BranchInfos of the cached branches (known after the first call)
        self._zeros: dict[str, tuple[torch.Tensor, ...]] = {}
        self._caches: dict[tuple[int, str], BlockCache] = {}
        self._generation = -1
        self._graphs: dict[Any, tuple[Any, ConditionalModel]] = {}  # call signature -> compiled graph
        self._covered: frozenset[str] = frozenset()  # branches the in-graph decision covers
        self._state: dict[int, torch.Tensor] = {}  # in-step policy state per call slot
        self._state_zeros: torch.Tensor | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        runtime = self.runtime
        if args:
            raise TypeError("ax.compile(scope='model'): call the model with keyword arguments")
        if not runtime.branches:
            output = self.model(**kwargs)  # first call: eager, captures the blocks at these shapes
            self._start(runtime)
            return output
        runtime.on_model_call(self.model, (), kwargs)
        if runtime.tracker.generation != self._generation:
            self._caches.clear()  # a new generation starts from empty caches, as in eager
            self._state.clear()
            self._generation = runtime.tracker.generation
        plan = runtime.plan
        if plan.partial or plan.skip_uncond:
            raise PolicyError(
                f"{type(runtime.policy).__name__} plans token subsets or cond-only guidance calls, which "
                "the whole-model graph does not run yet; use ax.compile(model) (scope='blocks')"
            )
        slot = runtime.tracker.slot
        feeds: list[torch.Tensor] = [leaf for leaf in pytree.tree_leaves(kwargs) if isinstance(leaf, torch.Tensor)]
        reused: set[str] = set()
        for info in self._conditional:
            cache = self._caches.setdefault((slot, info.block), BlockCache(None))
            do_reuse = info.id in plan.reuse and info.id in cache.values
            if do_reuse:
                reused.add(info.id)
            feeds.append(torch.tensor(do_reuse))
            # A branch that computes ignores its cache input: any tensor of the right shape does.
            feeds.extend(runtime.reuse_values(info, cache) if do_reuse
                         else cache.values.get(info.id, self._zeros[info.id]))
        if self.in_step:
            state = self._state.get(slot)
            allow = state is not None and runtime.policy.in_graph_allow(runtime.context)
            feeds += [state if state is not None else self._state_zeros, torch.tensor(allow)]
        graph, traced = self._graph_for(kwargs)
        results = list(graph(*feeds))
        if self.in_step:
            in_graph_reuse, self._state[slot] = results[-2:]
            del results[-2:]
            if bool(in_graph_reuse):  # one read after the step, for the host's caches and report
                reused |= {b for b in self._covered if b in self._caches.get((slot, runtime.branches[b].block),
                                                                              BlockCache(None)).values}
                runtime.records[-1].in_step_reuse += 1
        count = len(results) - sum(info.num_residuals for info in self._conditional)
        output = traced.unflatten_output(results[:count])
        rest = iter(results[count:])
        cache_out = {info.id: tuple(next(rest) for _ in range(info.num_residuals)) for info in self._conditional}
        self._account(reused, cache_out, slot)
        runtime.after_model_call(self.model, (), kwargs, output)
        return output

    def _graph_for(self, kwargs: dict) -> tuple[Any, ConditionalModel]:
        """The compiled whole-model graph for this call's signature (exported once, then compiled)."""
        key = call_signature((), kwargs)
        entry = self._graphs.get(key)
        if entry is None:
            decisions = [info.id for info in self._conditional]
            residuals = {info.id: info.num_residuals for info in self._conditional}
            traced = ConditionalModel(self.model, self.runtime, kwargs, decisions, residuals,
                                      in_step_branches=self._covered if self.in_step else None)
            example = [leaf for leaf in pytree.tree_leaves(kwargs) if isinstance(leaf, torch.Tensor)]
            for info in self._conditional:
                example.append(torch.tensor(False))
                example.extend(t.clone() for t in self._zeros[info.id])  # distinct storages: no aliasing
            if self.in_step:
                example += [self._state_zeros.clone(), torch.tensor(False)]
            with torch.no_grad():
                traced(*example)  # eagerly once: records the output structure (export keeps no record)
                program = torch.export.export(traced, tuple(example), strict=False)
            graph = torch.compile(program.module(), fullgraph=True, **self.compile_options)
            entry = self._graphs[key] = (graph, traced)
        return entry

    def _start(self, runtime: CacheRuntime) -> None:
        """After the eager first call: which branches decide in the graph, and their cache shapes."""
        policy = runtime.policy
        watched_only = [i.id for i in runtime.branches.values() if policy.watches(i) and not policy.caches(i)]
        if watched_only:
            raise PolicyError(
                f"{type(policy).__name__} watches branches it does not cache ({watched_only[:3]}); "
                "ax.compile(scope='model') needs every watched branch cached"
            )
        self._conditional = [info for info in runtime.branches.values() if policy.caches(info)]
        stored = {k: v for cache in runtime.caches.values() for k, v in cache.values.items()}
        missing = [info.id for info in self._conditional if info.id not in stored]
        if missing:
            raise PolicyError(
                f"ax.compile(scope='model'): the first call stored no residual for {missing[:3]}; "
                "the first step of a generation must compute every cached branch"
            )
        self._zeros = {info.id: tuple(torch.zeros_like(t) for t in stored[info.id]) for info in self._conditional}
        self._caches = dict(runtime.caches)
        self._generation = runtime.tracker.generation
        if self.in_step:
            self._covered = policy.in_graph_branches(tuple(runtime.branches.values()))
            state = policy.in_graph_state(runtime.tracker.slot)
            if state is None:
                raise PolicyError(f"{type(policy).__name__} kept no state after the first call")
            self._state = {runtime.tracker.slot: state}
            self._state_zeros = torch.zeros_like(state)

    def _account(self, reused: set[str], cache_out: dict, slot: int) -> None:
        """What the eager runtime does after each block: count, let watchers observe, store."""
        runtime = self.runtime
        record = runtime.records[-1]
        conditional_ids = {info.id for info in self._conditional}
        for info in runtime.branches.values():
            flops = info.flops or 0
            record.flops_total += flops
            if info.id in reused:
                record.reused += 1
                continue
            record.computed += 1
            record.flops_computed += flops
            if info.id not in conditional_ids:
                continue
            cache = self._caches.setdefault((slot, info.block), BlockCache(None))
            new = tuple(t.detach() for t in cache_out[info.id])
            if runtime.policy.watches(info) and runtime.context is not None:
                runtime.policy.observe(runtime.context, info, new, cache.values.get(info.id))
            cache.keep(info.id, runtime.tracker.step, new, runtime.policy.history(info))
