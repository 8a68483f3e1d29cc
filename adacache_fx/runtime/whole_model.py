"""The whole transformed model as one compiled graph, every cached branch a ``torch.cond``.

``ax.compile(model, scope="model")`` returns a :class:`CompiledModel`: a drop-in module whose calls
plan each step on the host (the calling thread's session: step tracking, the policy, forecasts:
plain Python, outside the graph), then run one ``torch.compile(fullgraph=True)`` graph of the whole
model in which each cached branch reuses or computes as a boolean tensor input says. Plans that
change from step to step change those inputs, not the graph: no recompiles. Caches go in and out
of the graph explicitly and live in the session, as in eager. The first call runs eagerly (it
captures the blocks); every later call at the same shapes runs the one compiled graph. The graph is
a snapshot of the whole model: a guard over every module sends a changed model back through
capture and export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from ..errors import PolicyError
from ..passes.conditional import pin_cond_operands
from ..passes.guards import guard_module
from ..passes.rewrite import RegionState
from ..policies.base import BranchInfo
from .runtime import ModelRuntime
from .session import Session, TracedSession


class TensorArguments:
    """One call's keyword arguments with their tensor leaves as the inputs of a traced function:
    ``kwargs(tensors)`` rebuilds the call from the tensors (first ``count``); the rest stays fixed."""

    def __init__(self, kwargs: dict) -> None:
        self.leaves, self.spec = pytree.tree_flatten(kwargs)
        self.is_tensor = [isinstance(leaf, torch.Tensor) for leaf in self.leaves]
        self.count = sum(self.is_tensor)

    def kwargs(self, tensors: tuple) -> dict:
        given = iter(tensors[: self.count])
        return pytree.tree_unflatten(
            [next(given) if is_tensor else leaf for leaf, is_tensor in zip(self.leaves, self.is_tensor)], self.spec)


class ConditionalModel(nn.Module):
    """A transformed model as a function of tensors only, every cached branch deciding at run time:
    ``(*model tensors, *[reuse_b, *cache_b for b in decisions]) -> (*output tensors, *new cache_b)``.

    ``kwargs``: one call's keyword arguments; its tensor leaves become the leading inputs, the rest is
    fixed. ``residuals``: how many cache tensors each branch of ``decisions`` has. What
    ``torch.export`` traces, for ONNX (``first_output_only``: the output is the first tensor) and for
    the whole-model compile.
    """

    def __init__(self, model: nn.Module, runtime: ModelRuntime, kwargs: dict, decisions: list[str],
                 residuals: dict[str, int], first_output_only: bool = False,
                 in_step_branches: frozenset[str] | None = None, policy_state: Any = None) -> None:
        super().__init__()
        self.model = model
        # An in-step policy deciding inside the graph: two more inputs (its reference, allow) and two
        # more outputs (reuse, new reference); the decision covers these branches.
        self.in_step_branches = in_step_branches
        self.__dict__["runtime"] = runtime
        self.__dict__["policy_state"] = policy_state
        self.decisions = decisions
        self.residuals = residuals
        self.first_output_only = first_output_only
        self.__dict__["arguments"] = TensorArguments(kwargs)
        # The model output's structure, filled when traced (export restores module attributes, so
        # it is a dict mutated in place).
        self.__dict__["output"] = {}

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kwargs = self.arguments.kwargs(tensors)
        rest = iter(tensors[self.arguments.count:])
        reuse, cache_in = {}, {}
        for branch in self.decisions:
            reuse[branch] = next(rest)
            cache_in[branch] = tuple(next(rest) for _ in range(self.residuals[branch]))
        in_step = None
        if self.in_step_branches is not None:
            in_step = {"state": next(rest), "allow": next(rest), "covered": self.in_step_branches}
        runtime = self.runtime
        session = TracedSession(runtime.policy, runtime.caps, reuse, cache_in, self.policy_state, in_step)
        with runtime.using(session):
            output = self.model(**kwargs)
        stored = session.stored
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


@dataclass(frozen=True, eq=False)
class _Graph:
    """One compiled whole-model graph: what it decides, and the cache entries it owns."""

    graph: Any
    traced: ConditionalModel
    conditional: tuple[BranchInfo, ...]
    zeros: dict[str, tuple[torch.Tensor, ...]]
    covered: frozenset[str]
    reference_zeros: torch.Tensor | None


class CompiledModel(nn.Module):
    """A transformed model compiled whole (see the module docstring). Attribute reads fall through
    to the model, so pipelines that read ``transformer.config`` or ``.dtype`` keep working."""

    def __init__(self, model: nn.Module, runtime: ModelRuntime, compile_options: dict) -> None:
        super().__init__()
        caps = runtime.caps
        self.in_step = caps.decides_in_step
        if self.in_step and (caps.signal.kind != "first_blocks_residual" or not caps.in_graph):
            raise PolicyError(
                f"{type(runtime.policy).__name__} decides inside each step and has no in-graph decision "
                "(an InGraphDecider over the first blocks' residual); ax.compile(scope='model') "
                "runs schedule-driven policies and First-Block-Cache. Use ax.compile(model) "
                "(scope='blocks') for it."
            )
        self.model = model
        self.__dict__["runtime"] = runtime
        self.compile_options = compile_options
        self.__dict__["_graphs"] = {}  # call signature -> _Graph
        self.__dict__["_guard"] = None  # ModuleGuard of the whole model when its graphs were made

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    def _holds(self) -> bool:
        """The whole model, blocks included, as when the graphs were made, and every block still bound.
        Checked outside the model's forward, so against a guard recorded there: the blocks' own guards
        were recorded inside it, where a per-call LoRA scale (``attention_kwargs={"scale": s}``) has
        scaled every adapter, so they would fail here at every call."""
        guard = self._guard
        return guard is not None and guard.holds() and all(block.guard is not None for block in self.runtime.blocks)

    def _changes(self) -> list[str]:
        changes = [] if self._guard is None or self._guard.holds() else self._guard.changes(self.model, root="the model")
        return changes[:4] or ["a block was captured again"]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        runtime = self.runtime
        if args:
            raise TypeError("ax.compile(scope='model'): call the model with keyword arguments")
        if self._graphs and not self._holds():
            self._forget_graphs()
        key = _signature(kwargs)
        entry = self._graphs.get(key)
        if entry is None:
            with runtime.per_branch():  # the graph takes every cached branch's residual
                output = self.model(**kwargs)  # eager: captures the blocks at these shapes (and plans)
            self._graphs[key] = self._build(kwargs, runtime.session())
            # After the export (it swaps parameters): the whole model, as it is now.
            self.__dict__["_guard"] = guard_module(self.model)
            return output
        return self._run(entry, kwargs)

    def _forget_graphs(self) -> None:
        """The model changed: drop the graphs and every cache, and unbind the changed blocks now, so the
        eager call that makes the next graph captures them before any block runs (a block found
        changed in the middle of that call would drop what the blocks before it just stored, which the
        new graph starts from)."""
        runtime = self.runtime
        session = runtime.session()
        changes = self._changes()
        for block in runtime.blocks:
            if block.guard is not None and not block.guard.holds():
                block.unbind_changed(session)
        runtime.note_recapture(session, "the whole model", changes)
        session.caches.clear()  # (note_recapture drops them once a call, and this call has not begun)
        self._graphs.clear()

    def _run(self, entry: _Graph, kwargs: dict) -> Any:
        runtime = self.runtime
        session = runtime.session()
        runtime.on_model_call(self.model, (), kwargs)
        plan = session.plan
        if plan.partial or plan.skip_uncond:
            raise PolicyError(
                f"{type(runtime.policy).__name__} plans token subsets or cond-only guidance calls, which "
                "the whole-model graph does not run yet; use ax.compile(model) (scope='blocks')"
            )
        executor, slot = runtime.executor, session.slot
        feeds: list[torch.Tensor] = [leaf for leaf in pytree.tree_leaves(kwargs) if isinstance(leaf, torch.Tensor)]
        entries, reused = {}, set()
        for info in entry.conditional:
            cached = session.caches.entry(slot, info.id)
            cached = cached if cached is not None and cached.owner is entry else None
            entries[info.id] = cached
            do_reuse = info.id in plan.reuse and cached is not None
            if do_reuse:
                reused.add(info.id)
            feeds.append(torch.tensor(do_reuse))
            # A branch that computes ignores its cache input: any tensor of the right shape does.
            feeds.extend(executor.reuse_values(session, info, cached) if do_reuse
                         else cached.values if cached is not None else entry.zeros[info.id])
        if self.in_step:
            reference = session.in_graph.get(slot)
            if reference is None:
                reference = runtime.policy.in_graph_state(session.policy_state, slot)
            allow = reference is not None and runtime.policy.in_graph_allow(session.context)
            feeds += [reference if reference is not None else entry.reference_zeros, torch.tensor(allow)]
        results = list(entry.graph(*feeds))
        if self.in_step:
            in_graph_reuse, session.in_graph[slot] = results[-2:]
            del results[-2:]
            if bool(in_graph_reuse):  # one read after the step, for the host's caches and report
                reused |= {b for b in entry.covered if entries.get(b) is not None}
                session.records[-1].in_step_reuse += 1
        count = len(results) - sum(info.num_residuals for info in entry.conditional)
        output = entry.traced.unflatten_output(results[:count])
        rest = iter(results[count:])
        cache_out = {info.id: tuple(next(rest) for _ in range(info.num_residuals)) for info in entry.conditional}
        conditional = {info.id for info in entry.conditional}
        for info in runtime.branch_tuple:
            if info.id in reused:
                executor.commit(session, info, RegionState.REUSE, (), entry, entries[info.id])
            elif info.id in conditional:
                executor.commit(session, info, RegionState.STORE, cache_out[info.id], entry, entries[info.id])
            else:
                executor.commit(session, info, RegionState.COMPUTE, (), entry, None)
        runtime.after_model_call(self.model, (), kwargs, output)
        return output

    def _compile(self, program: Any, example: list) -> Any:
        """The exported whole-model program compiled with the options of ``ax.compile``."""
        options = dict(self.compile_options)
        backend = options.pop("backend")
        if backend not in ("inductor", "aot_inductor"):
            return torch.compile(program.module(), fullgraph=True, backend=backend, **options)
        pinned = pin_cond_operands(program.module())  # Inductor's cond operand layouts (see there)
        if backend == "inductor":
            return torch.compile(pinned, fullgraph=True, backend=backend, **options)
        with torch.no_grad():
            pinned_program = torch.export.export(pinned, tuple(example), strict=False)
        return _aot_inductor(pinned_program, example, options.get("options") or {})

    def _build(self, kwargs: dict, session: Session) -> _Graph:
        """After an eager call: which branches decide in the graph, their cache shapes; export, compile."""
        runtime = self.runtime
        policy, caps, state = runtime.policy, runtime.caps, session.policy_state
        branches = runtime.branch_tuple
        watched_only = [i.id for i in branches if caps.watches(i, state) and not policy.caches(i, state)]
        if watched_only:
            raise PolicyError(
                f"{type(policy).__name__} watches branches it does not cache ({watched_only[:3]}); "
                "ax.compile(scope='model') needs every watched branch cached"
            )
        conditional = tuple(info for info in branches if policy.caches(info, state))
        stored = session.caches.values(session.slot)
        missing = [info.id for info in conditional if info.id not in stored]
        if missing:
            raise PolicyError(
                f"ax.compile(scope='model'): the first call stored no residual for {missing[:3]}; "
                "the first step of a generation must compute every cached branch"
            )
        zeros = {info.id: tuple(torch.zeros_like(t) for t in stored[info.id]) for info in conditional}
        covered, reference_zeros = frozenset(), None
        if self.in_step:
            covered = policy.in_graph_branches(branches)
            reference = policy.in_graph_state(state, session.slot)
            if reference is None:
                raise PolicyError(f"{type(policy).__name__} kept no state after the first call")
            reference_zeros = torch.zeros_like(reference)
        decisions = [info.id for info in conditional]
        residuals = {info.id: info.num_residuals for info in conditional}
        traced = ConditionalModel(self.model, runtime, kwargs, decisions, residuals,
                                  in_step_branches=covered if self.in_step else None, policy_state=state)
        example = [leaf for leaf in pytree.tree_leaves(kwargs) if isinstance(leaf, torch.Tensor)]
        for info in conditional:
            example.append(torch.tensor(False))
            example.extend(t.clone() for t in zeros[info.id])  # distinct storages: no aliasing
        if self.in_step:
            example += [reference_zeros.clone(), torch.tensor(False)]
        with torch.no_grad(), runtime.tracing():
            traced(*example)  # eagerly once: records the output structure (export keeps no record)
            program = torch.export.export(traced, tuple(example), strict=False)
        graph = self._compile(program, example)
        built = _Graph(graph, traced, conditional, zeros, covered, reference_zeros)
        # The eager call's residuals go on serving the compiled graph's steps.
        for info in conditional:
            session.caches.keep(session.slot, info.id, built, session.tracker.step, stored[info.id],
                                caps.history(info))
        return built


def _aot_inductor(program: Any, example: list, options: dict) -> Any:
    """``program`` compiled ahead of time with AOTInductor into a package, loaded back."""
    import tempfile

    from torch._inductor import aoti_compile_and_package, aoti_load_package

    path = options.get("package_path")
    if path is None:
        path = tempfile.NamedTemporaryFile(suffix=".pt2", prefix="adacache_fx_", delete=False).name
    inductor_options = {k: v for k, v in options.items() if k != "package_path"}
    package = aoti_compile_and_package(program, package_path=path, inductor_configs=inductor_options or None)
    runner = aoti_load_package(package)
    return lambda *feeds: runner(*feeds)


def _signature(kwargs: dict) -> tuple:
    leaves, spec = pytree.tree_flatten(kwargs)
    return (spec, tuple((t.shape, t.dtype, t.device) if isinstance(t, torch.Tensor) else repr(t) for t in leaves))
