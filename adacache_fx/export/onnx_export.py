"""ONNX export, one graph per plan variant, and a runner that replays a policy on ONNX Runtime.

A plan variant fixes which branches reuse their cache for a whole model call. Its ONNX graph takes the
model's tensor inputs plus the cached residuals of the reused branches (``cache_in.<branch>.<i>``) and
returns the model output plus the residuals it stored (``cache_out.<branch>.<i>``): the cache state is
explicit, so any engine builder (ONNX Runtime, TensorRT) can run it. :class:`Runner` plays a whole
denoising loop: at each step the policy plans on the host, the runner picks the matching graph and
feeds it the caches, and watched residuals go back to the policy, as the eager runtime does.

Schedule-driven policies only: policies that decide inside a step (TeaCache, First-Block-Cache) need
the decision inside the graph (ONNX ``If``), which is not exported yet.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from ..api import get_runtime, reset
from ..errors import AdaCacheError, PolicyError
from ..passes.rewrite import RegionState
from ..policies.base import BranchInfo, Capabilities, Plan, Policy
from ..runtime.executor import Executor
from ..runtime.session import FixedSession, Session
from ..runtime.whole_model import ConditionalModel, TensorArguments

logger = logging.getLogger("adacache_fx")


@dataclass
class ExportedVariant:
    """One plan variant's ONNX file and its input/output layout."""

    reuse: tuple[str, ...]  # ids of the branches this graph reuses (sorted)
    path: str
    input_names: list[str]
    output_names: list[str]
    cache_in: list[tuple[str, int]]  # (branch id, residual index) per cache input, in order
    cache_out: list[tuple[str, int]]
    # Single-graph form ("if"): the branches with a ``reuse.<branch>`` boolean input (each followed
    # by its cache inputs), and each cache input's shape and dtype (a first step feeds zeros).
    decisions: list[str] = field(default_factory=list)
    cache_shapes: list[list[int]] = field(default_factory=list)
    cache_dtypes: list[str] = field(default_factory=list)


@dataclass
class ExportedModel:
    """Every exported variant of one model at one input shape, plus what a runner needs."""

    directory: str
    input_names: list[str]  # the model's tensor inputs, flattened from the example kwargs
    branches: list[BranchInfo]
    variants: list[ExportedVariant] = field(default_factory=list)
    frames: int | None = None
    #: "variants": one graph per plan variant; "if": one graph whose cached regions are ONNX ``If``s.
    form: str = "variants"

    def variant(self, reuse: Iterable[str]) -> ExportedVariant:
        if self.form == "if":
            return self.variants[0]
        key = tuple(sorted(reuse))
        for variant in self.variants:
            if variant.reuse == key:
                return variant
        raise AdaCacheError(
            f"no exported graph reuses exactly {len(key)} branch(es) {list(key)[:4]}...; export it: "
            "adacache_fx.export.onnx(..., reuse_sets=[...]) with this set"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (what ``manifest.json`` holds)."""
        data = asdict(self)
        for branch in data["branches"]:
            branch["tags"] = sorted(branch["tags"])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], directory: str | Path | None = None) -> ExportedModel:
        """Inverse of :meth:`to_dict`. ``directory``: where the ``.onnx`` files are now (default: as
        recorded), so an export copied to another machine still finds its graphs."""
        directory = Path(directory if directory is not None else data["directory"])
        branches = [BranchInfo(**{**b, "tags": frozenset(b["tags"])}) for b in data["branches"]]
        variants = [
            ExportedVariant(
                reuse=tuple(v["reuse"]), path=str(directory / Path(v["path"]).name),
                input_names=list(v["input_names"]), output_names=list(v["output_names"]),
                cache_in=[(b, int(i)) for b, i in v["cache_in"]], cache_out=[(b, int(i)) for b, i in v["cache_out"]],
                decisions=list(v.get("decisions", [])), cache_shapes=[list(x) for x in v.get("cache_shapes", [])],
                cache_dtypes=list(v.get("cache_dtypes", [])),
            )
            for v in data["variants"]
        ]
        return cls(str(directory), list(data["input_names"]), branches, variants, frames=data.get("frames"),
                   form=data.get("form", "variants"))

    def save_manifest(self) -> Path:
        path = Path(self.directory) / "manifest.json"
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> ExportedModel:
        """The export whose ``manifest.json`` is in ``directory`` (e.g. copied to a GPU machine to
        build TensorRT engines there without the PyTorch model)."""
        path = Path(directory) / "manifest.json"
        if not path.exists():
            raise AdaCacheError(f"no manifest.json in {directory}: export there first with adacache_fx.export.onnx")
        return cls.from_dict(json.loads(path.read_text()), directory)


def _tensor_inputs(kwargs: dict) -> tuple[list[str], list[torch.Tensor], Any]:
    """Names and values of the tensor leaves of ``kwargs``; the rest stays constant in the graph."""
    with_paths, spec = pytree.tree_flatten_with_path(kwargs)
    names, tensors = [], []
    for path, leaf in with_paths:
        if isinstance(leaf, torch.Tensor):
            # ['image_rotary_emb'][0] -> image_rotary_emb.0
            names.append(re.sub(r"[\[\]'\"]+", ".", pytree.keystr(path)).strip("."))
            tensors.append(leaf)
    return names, tensors, (with_paths, spec)


class _PlanModule(nn.Module):
    """``model`` under one fixed plan, as a function of tensors only (what ONNX export traces)."""

    def __init__(self, model: nn.Module, kwargs: dict, reuse: frozenset[str],
                 cache_in: list[tuple[str, int]], cache_out: list[tuple[str, int]] | None,
                 policy_state: Any = None) -> None:
        super().__init__()
        self.model = model
        self.__dict__["policy_state"] = policy_state
        self.reuse = reuse
        self.cache_in = cache_in
        self.cache_out = cache_out
        self.__dict__["arguments"] = TensorArguments(kwargs)
        self.stored: dict[str, tuple[torch.Tensor, ...]] = {}

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kwargs = self.arguments.kwargs(tensors)
        caches: dict[str, list[torch.Tensor]] = {}
        for (branch, _index), value in zip(self.cache_in, tensors[self.arguments.count:]):
            caches.setdefault(branch, []).append(value)
        runtime = get_runtime(self.model)
        session = FixedSession(runtime.policy, runtime.caps, Plan.reuse_only(self.reuse), self.policy_state)
        for branch, values in caches.items():
            session.caches.keep(0, branch, None, 0, tuple(values), 1)  # owner None: any block may read it
        with runtime.using(session):
            output = self.model(**kwargs)
        stored = session.stored
        self.stored = stored
        first = next(t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor))
        layout = self.cache_out if self.cache_out is not None else [
            (branch, i) for branch in sorted(stored) for i in range(len(stored[branch]))
        ]
        return (first, *[stored[branch][i] for branch, i in layout])


def _export_conditional(model, example_kwargs, directory: Path, names, tensors, stored, exported, opset_version):
    """Form (a): one graph, every cached branch an ONNX ``If`` on its ``reuse.<branch>`` input."""
    decisions = sorted(stored)
    residuals = {b: len(stored[b]) for b in decisions}
    runtime = get_runtime(model)
    module = ConditionalModel(model, runtime, example_kwargs, decisions, residuals, first_output_only=True,
                              policy_state=runtime.session().policy_state)
    inputs, input_names, cache_in = list(tensors), list(names), []
    for branch in decisions:
        inputs.append(torch.tensor(False))
        input_names.append(f"reuse.{branch}")
        for i, value in enumerate(stored[branch]):
            inputs.append(value.clone())  # a region's residuals may be views of one tensor: inputs must not alias
            input_names.append(f"cache_in.{branch}.{i}")
            cache_in.append((branch, i))
    output_names = ["output"] + [f"cache_out.{b}.{i}" for b, i in cache_in]
    path = directory / "model_if.onnx"
    with torch.no_grad(), runtime.tracing():
        torch.onnx.export(
            module, tuple(inputs), str(path), dynamo=True, input_names=input_names, output_names=output_names,
            opset_version=opset_version, external_data=False, optimize=True,
        )
    values = [stored[b][i] for b, i in cache_in]
    exported.variants.append(ExportedVariant(
        (), str(path), input_names, output_names, cache_in, list(cache_in), decisions=decisions,
        cache_shapes=[list(v.shape) for v in values], cache_dtypes=[str(v.dtype).removeprefix("torch.") for v in values],
    ))
    logger.info("adacache_fx: exported %s (%d branches decide at run time)", path, len(decisions))


def onnx(
    model: nn.Module,
    example_kwargs: dict,
    directory: str | Path,
    *,
    reuse_sets: Sequence[Iterable[str]] | None = None,
    form: str = "variants",
    opset_version: int = 18,
) -> ExportedModel:
    """Export a transformed ``model`` at the example's shapes, in one of two forms.

    ``form="variants"`` (default): one ONNX graph per plan variant, for engine builders (TensorRT).
    ``form="if"``: one graph in which every cached branch is an ONNX ``If`` on a boolean input
    ``reuse.<branch>``, with its cache as inputs ``cache_in.<branch>.<i>`` and outputs
    ``cache_out.<branch>.<i>`` (the input cache when it reused): any plan, one file.

    Args:
        model: transformed with a schedule-driven policy (``Static``, ``AdaCache``, ``PAB``...).
        example_kwargs: one model call's keyword arguments (the shapes the graphs are built for).
        directory: where the ``.onnx`` files and ``manifest.json`` go.
        reuse_sets: the sets of branch ids to export a graph for. Default: none reused (every step
            that computes) and every cached branch reused (every step that reuses), which covers
            ``Static`` and ``AdaCache``; pass more for per-kind plans (``PAB``). Not used by ``"if"``.
    """
    if form not in ("variants", "if"):
        raise ValueError(f"form={form!r}: 'variants' (one graph per plan variant) or 'if' (one graph with If nodes)")
    runtime = get_runtime(model)
    policy = runtime.policy
    if runtime.caps.decides_in_step:
        raise PolicyError(
            f"{type(policy).__name__} decides inside each step; one-graph-per-variant export needs a "
            "schedule-driven policy (Static, AdaCache, PAB)"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        model(**example_kwargs)  # capture the blocks at these shapes
    reset(model)
    branches = list(runtime.branch_tuple)
    names, tensors, _ = _tensor_inputs(example_kwargs)
    state = runtime.session().policy_state

    # A compute-everything call gives the layout and shapes of every stored residual.
    probe = _PlanModule(model, example_kwargs, frozenset(), [], None, state)
    with torch.no_grad():
        probe(*tensors)
    stored = probe.stored
    if reuse_sets is None:
        reuse_sets = [(), sorted(stored)]
    frames = runtime.read_frames((), example_kwargs)

    exported = ExportedModel(str(directory), names, branches, frames=frames, form=form)
    if form == "if":
        _export_conditional(model, example_kwargs, directory, names, tensors, stored, exported, opset_version)
        exported.save_manifest()
        return exported
    for index, reuse in enumerate(reuse_sets):
        reuse = frozenset(reuse)
        unknown = reuse - set(stored)
        if unknown:
            raise PolicyError(f"cannot reuse {sorted(unknown)[:3]}: the policy does not cache them")
        cache_in = [(b, i) for b in sorted(reuse) for i in range(len(stored[b]))]
        dry = _PlanModule(model, example_kwargs, reuse, cache_in, None, state)
        cache_values = [stored[b][i] for b, i in cache_in]
        with torch.no_grad():
            dry(*tensors, *cache_values)
        cache_out = [(b, i) for b in sorted(dry.stored) for i in range(len(dry.stored[b]))]
        module = _PlanModule(model, example_kwargs, reuse, cache_in, cache_out, state)
        input_names = names + [f"cache_in.{b}.{i}" for b, i in cache_in]
        output_names = ["output"] + [f"cache_out.{b}.{i}" for b, i in cache_out]
        path = directory / f"variant_{index}.onnx"
        with torch.no_grad(), runtime.tracing():
            torch.onnx.export(
                module, tuple(tensors) + tuple(cache_values), str(path), dynamo=True,
                input_names=input_names, output_names=output_names, opset_version=opset_version,
                external_data=False, optimize=True,
            )
        exported.variants.append(
            ExportedVariant(tuple(sorted(reuse)), str(path), input_names, output_names, cache_in, cache_out)
        )
        logger.info("adacache_fx: exported %s (reuses %d branches)", path, len(reuse))
    exported.save_manifest()
    return exported


class VariantRunner:
    """The host side of a deployed denoising loop, shared by every engine that runs the variants.

    Each call is one model call: the session tracks the step and the policy plans it, the plan
    picks the exported variant, the variant is fed the model inputs and the caches of the branches
    it reuses (or the policy's forecast), and what it stores goes back through the same executor as
    in eager (watched branches to the policy, residuals to the caches). Reuse of a branch with no
    cache yet computes instead. Subclasses only say how one variant runs (:meth:`_execute`), so
    ONNX Runtime and TensorRT replay exactly the same plans.
    """

    def __init__(self, exported: ExportedModel, policy: Policy) -> None:
        self.exported = exported
        self.policy = policy
        self.branches = tuple(exported.branches)
        self._info = {b.id: b for b in self.branches}
        policy.validate(self.branches)
        self.executor = Executor(Capabilities.of(policy))
        self.session = Session(policy, self.executor.caps)
        self.plans: list[tuple[str, ...]] = []  # the reuse set actually run at each call
        self._warned: set[str] = set()

    @property
    def step(self) -> int:
        return self.session.tracker.step

    def start(self, num_steps: int | None = None) -> None:
        """Begin a generation: fresh caches and policy state."""
        self.session.start_generation(num_steps, explicit=True)
        self.plans = []

    def _execute(self, variant: ExportedVariant, feeds: dict[str, torch.Tensor]) -> Sequence[torch.Tensor]:
        """Run ``variant`` on ``feeds`` (every name of ``variant.input_names``) and return its outputs
        in ``variant.output_names`` order, as tensors."""
        raise NotImplementedError

    def __call__(self, **kwargs: Any) -> torch.Tensor:
        session, executor = self.session, self.executor
        if session.tracker.generation < 0:
            self.start()
        timestep = kwargs.get("timestep")
        session.begin_call(
            self.branches,
            float(torch.as_tensor(timestep).reshape(-1)[0]) if timestep is not None else None,
            frames=self.exported.frames,
        )
        plan = session.plan
        self._warn_unsupported(plan)
        entries = {b.id: executor.entry(session, None, b) for b in self.branches}
        reuse = tuple(sorted(b for b in plan.reuse if entries.get(b) is not None))
        variant = self.exported.variant(reuse)
        _, tensors, _ = _tensor_inputs(kwargs)
        feeds = dict(zip(self.exported.input_names, tensors))
        added = {branch: executor.reuse_values(session, self._info[branch], entries[branch]) for branch in reuse}
        if variant.decisions:  # one graph: a decision input per cached branch, every cache fed
            for branch in variant.decisions:
                feeds[f"reuse.{branch}"] = torch.tensor(branch in added)
            for (branch, i), shape, dtype in zip(variant.cache_in, variant.cache_shapes, variant.cache_dtypes):
                feeds[f"cache_in.{branch}.{i}"] = (
                    added[branch][i] if branch in added else torch.zeros(shape, dtype=getattr(torch, dtype))
                )
        else:
            for (branch, i), name in zip(variant.cache_in, variant.input_names[len(tensors):]):
                feeds[name] = added[branch][i]
        results = self._execute(variant, feeds)
        stored: dict[str, list[torch.Tensor]] = {}
        for (branch, _), value in zip(variant.cache_out, results[1:]):
            if branch not in added:  # a reused branch returns its input cache: nothing new
                stored.setdefault(branch, []).append(value)
        for info in self.branches:
            if info.id in added:
                executor.commit(session, info, RegionState.REUSE, (), None, entries[info.id])
            elif info.id in stored:
                executor.commit(session, info, RegionState.STORE, tuple(stored[info.id]), None, entries[info.id])
            else:
                executor.commit(session, info, RegionState.COMPUTE, (), None, None)
        self.plans.append(reuse)
        return results[0]

    def _warn_unsupported(self, plan: Plan) -> None:
        """Plan parts the exported variants cannot run yet: computed in full (exact, no saving)."""
        for name, asked in (("partial", bool(plan.partial)), ("skip_uncond", plan.skip_uncond)):
            if asked and name not in self._warned:
                self._warned.add(name)
                logger.warning(
                    "adacache_fx: %s plans Plan.%s, which exported runners do not run yet; those "
                    "branches / the uncond half compute in full (exact, without that saving)",
                    type(self.policy).__name__, name,
                )


class Runner(VariantRunner):
    """Runs a denoising loop on ONNX Runtime with the policy deciding on the host, step by step.

    ``runner.start(num_steps)`` begins a generation; each ``runner(**kwargs)`` is one model call (one
    step, cond and uncond batched). Reuse of a branch with no cache yet computes instead, as in eager.
    """

    def __init__(self, exported: ExportedModel, policy: Policy, providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        import onnxruntime as ort

        self.sessions = {v.reuse: ort.InferenceSession(v.path, providers=list(providers)) for v in exported.variants}
        super().__init__(exported, policy)

    def _execute(self, variant: ExportedVariant, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        arrays = {name: t.detach().cpu().numpy() for name, t in feeds.items()}
        results = self.sessions[variant.reuse].run(variant.output_names, arrays)
        return [torch.from_numpy(np.asarray(r)) for r in results]
