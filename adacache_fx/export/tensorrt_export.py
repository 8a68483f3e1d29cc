"""TensorRT: one engine per exported plan variant, a runner that switches engines per step, and a
check of the exported graphs against TensorRT's ONNX-parser operator table.

    exported = ax.export.onnx(model, example_kwargs, "out/")
    print(ax.export.check_tensorrt_support(exported))      # no TensorRT needed
    engines = ax.export.tensorrt(exported, "out/")        # needs `tensorrt` and a CUDA GPU
    runner = ax.export.TensorRTRunner(engines, policy)    # same host loop as ax.export.Runner

Why one engine per variant: TensorRT builds static engines and ONNX ``If`` would sync to the host
inside the step anyway; schedule-driven policies know each step's plan before it starts, so the
host picks a whole pre-built engine per step (see DESIGN.md). The engines are built from the same
ONNX files ONNX Runtime runs, with the cache as named inputs/outputs.

This module imports ``tensorrt`` only when an engine is built or run; the operator check needs
only ``onnx``. The file is not named ``tensorrt.py`` so it cannot shadow the ``tensorrt`` package
name inside the package or be confused with the ``ax.export.tensorrt`` function.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Mapping, Sequence, Union

import torch

from ..errors import AdaCacheError
from ..policies.base import Policy
from . import trt_operators as table
from .onnx_export import ExportedModel, ExportedVariant, VariantRunner

logger = logging.getLogger("adacache_fx")

INSTALL_HINT = (
    "install TensorRT's Python package on a Linux or Windows machine with an NVIDIA GPU and CUDA 12: "
    "`pip install --extra-index-url https://pypi.nvidia.com tensorrt` (its libraries come from "
    "NVIDIA's index), then check with `python -c 'import tensorrt; print(tensorrt.__version__)'`"
)

# One input's optimisation-profile shapes: a fixed shape, or (min, opt, max).
ShapeSpec = Union[Sequence[int], tuple[Sequence[int], Sequence[int], Sequence[int]]]
Profile = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


class TensorRTUnavailableError(AdaCacheError, ImportError):
    """The ``tensorrt`` Python package cannot be imported here."""


class TensorRTBuildError(AdaCacheError):
    """TensorRT could not parse, build or load an engine."""


def import_tensorrt() -> ModuleType:
    """The ``tensorrt`` module, or :class:`TensorRTUnavailableError` saying how to install it."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:  # OSError: the wheel is there but libnvinfer cannot load
        raise TensorRTUnavailableError(
            f"TensorRT is not available: `import tensorrt` failed ({exc}). To build or run engines, "
            f"{INSTALL_HINT}. The ONNX export and adacache_fx.export.check_tensorrt_support work without it."
        ) from exc
    return trt


# ---------------------------------------------------------------------------------------------------
# Operator check
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OpUse:
    """One operator type used by a graph (its own nodes and those inside subgraphs and functions)."""

    domain: str  # "ai.onnx" for the default domain
    op_type: str
    opset: int | None  # the graph's opset for that domain
    count: int
    supported: bool  # in the table as supported, in the default domain
    restriction: str | None  # the table's restriction, when it states one


@dataclass
class GraphSupport:
    """What TensorRT's ONNX parser would make of one ONNX file, according to the table."""

    path: str
    opsets: dict[str, int]
    ops: list[OpUse]
    errors: list[str] = field(default_factory=list)  # the parser would refuse these
    warnings: list[str] = field(default_factory=list)  # restrictions that may bite; the parser decides
    notes: list[str] = field(default_factory=list)

    @property
    def supported(self) -> bool:
        return not self.errors


@dataclass
class TensorRTSupportReport:
    """The operator check of every graph of an export."""

    graphs: list[GraphSupport]
    source: str = table.SOURCE

    @property
    def supported(self) -> bool:
        return all(g.supported for g in self.graphs)

    def op_types(self) -> list[str]:
        """Every operator type any graph uses (``domain::Op`` outside the default domain)."""
        return sorted({_op_name(u) for g in self.graphs for u in g.ops})

    def unsupported_ops(self) -> list[str]:
        return sorted({_op_name(u) for g in self.graphs for u in g.ops if not u.supported})

    def __str__(self) -> str:
        low, high = table.OPSET_RANGE
        lines = [f"TensorRT ONNX-parser operator check against {self.source} (opsets {low}-{high})"]
        for g in self.graphs:
            opsets = ", ".join(f"{d} {v}" for d, v in sorted(g.opsets.items()))
            status = "supported" if g.supported else f"{len(g.errors)} problem(s)"
            lines.append(f"{g.path}  [{opsets}]  {status}")
            lines.append("  " + ", ".join(f"{_op_name(u)} x{u.count}" for u in g.ops))
            lines += [f"  ERROR {e}" for e in g.errors]
            lines += [f"  warning {w}" for w in g.warnings]
            lines += [f"  note {n}" for n in g.notes]
        unsupported = self.unsupported_ops()
        lines.append(
            f"{len(self.op_types())} operator types in {len(self.graphs)} graph(s): "
            + ("all in the table as supported" if not unsupported else f"unsupported: {', '.join(unsupported)}")
            + ("" if self.supported or unsupported else "; see the errors above")
        )
        restricted = sorted({u.op_type for g in self.graphs for u in g.ops if u.restriction})
        if restricted:
            lines.append("restrictions stated by the table for ops used: " + "; ".join(
                f"{op}: {dict(table.SUPPORTED)[op]}" for op in restricted))
        return "\n".join(lines)


def _op_name(use: OpUse) -> str:
    return use.op_type if use.domain == "ai.onnx" else f"{use.domain}::{use.op_type}"


def check_tensorrt_support(
    graphs: ExportedModel | str | Path | Iterable[str | Path],
) -> TensorRTSupportReport:
    """List the operators (and opsets) of exported ONNX graphs and flag what TensorRT's ONNX parser
    does not take, according to onnx-tensorrt's operator table (:mod:`.trt_operators`).

    ``graphs``: an :class:`ExportedModel` (every variant), one ``.onnx`` path, or several. Errors are
    what the table marks unsupported (operators, opsets, data types, violated restrictions);
    warnings are restrictions the graph may violate (an input the table wants constant is computed).
    Needs ``onnx`` but not TensorRT; the installed TensorRT's parser remains the final word.
    """
    if isinstance(graphs, ExportedModel):
        paths = [v.path for v in graphs.variants]
    elif isinstance(graphs, (str, Path)):
        paths = [graphs]
    else:
        paths = list(graphs)
    return TensorRTSupportReport([_check_graph(Path(p)) for p in paths])


def _check_graph(path: Path) -> GraphSupport:
    try:
        import onnx
    except ImportError as exc:
        raise AdaCacheError("the operator check reads ONNX files with `onnx`: pip install onnx") from exc
    if not path.exists():
        raise AdaCacheError(f"no ONNX file at {path}: export it first with adacache_fx.export.onnx")
    model = onnx.load(str(path), load_external_data=False)  # structure only; weights are not needed
    opsets = {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import}
    result = GraphSupport(str(path), opsets, [])
    supported = dict(table.SUPPORTED)
    unsupported = set(table.UNSUPPORTED)
    constant_inputs = dict(table.CONSTANT_INPUTS)
    functions = {(f.domain, f.name): f for f in model.functions}
    dtype_name = onnx.TensorProto.DataType.Name
    counts: Counter[tuple[str, str]] = Counter()

    low, high = table.OPSET_RANGE
    default = opsets.get("ai.onnx")
    if default is not None and not low <= default <= high:
        result.errors.append(f"default-domain opset {default} is outside the parser's range {low}-{high}: "
                             f"re-export with opset_version in that range")

    def check_type(what: str, elem_type: int) -> None:
        if elem_type == 0:
            return  # unknown type: nothing to say
        name = dtype_name(elem_type)
        if name not in table.DATA_TYPES:
            result.errors.append(f"{what} has data type {name}, which TensorRT does not take")
        elif name == "DOUBLE":
            result.warnings.append(f"{what} is DOUBLE: TensorRT casts it down to FLOAT")

    def walk(graph: Any, outer_constants: frozenset[str], where: str) -> None:
        constants = set(outer_constants) | {t.name for t in getattr(graph, "initializer", ())}  # none in functions
        for node in graph.node:
            label = f"{node.op_type} node {node.name or '?'}{where}"
            key = (node.domain, node.op_type)
            if key in functions:  # a model-local function: the parser expands it, so check its body
                walk(functions[key], frozenset(constants), f" (in function {node.op_type})")
                continue
            domain = node.domain or "ai.onnx"
            counts[(domain, node.op_type)] += 1
            if node.op_type == "Constant":
                constants.update(node.output)
            if domain == "ai.onnx":
                index = constant_inputs.get(node.op_type)
                if index is not None and len(node.input) > index and node.input[index] \
                        and node.input[index] not in constants:
                    result.warnings.append(f"{label}: input {index} ({node.input[index]}) is computed at run "
                                           f"time; the table says: {supported[node.op_type]}")
                _check_node(node, label, result, dtype_name)
                if node.op_type == "Cast":
                    for attr in node.attribute:
                        if attr.name == "to":
                            check_type(f"{label} (cast target)", attr.i)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g, frozenset(constants), f" (in {node.op_type} {node.name}.{attr.name})")
                for sub in attr.graphs:
                    walk(sub, frozenset(constants), f" (in {node.op_type} {node.name}.{attr.name})")

    walk(model.graph, frozenset(), "")
    initializers = {t.name for t in model.graph.initializer}
    dynamic = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        check_type(f"input {value.name}", value.type.tensor_type.elem_type)
        dims = value.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            dynamic.append(value.name)
    for value in model.graph.output:
        check_type(f"output {value.name}", value.type.tensor_type.elem_type)
    if dynamic:
        result.notes.append(f"inputs with dynamic dimensions need min/opt/max shapes when building: {dynamic}")

    for (domain, op_type), count in sorted(counts.items(), key=lambda kv: (kv[0][0] != "ai.onnx", kv[0])):
        in_table = domain == "ai.onnx" and op_type in supported
        result.ops.append(OpUse(domain, op_type, opsets.get(domain), count, in_table,
                                supported.get(op_type) if domain == "ai.onnx" else None))
        if domain != "ai.onnx":
            result.errors.append(f"{domain}::{op_type} (x{count}) is outside the default ONNX domain: "
                                 "TensorRT needs a plugin for it")
        elif op_type in unsupported:
            result.errors.append(f"{op_type} (x{count}) is marked unsupported by the table")
        elif not in_table:
            result.errors.append(f"{op_type} (x{count}) is not in the table")
    if counts.get(("ai.onnx", "If")):
        result.notes.append("If runs its condition on the host: on GPU it syncs every call")
    return result


def _check_node(node: Any, label: str, result: GraphSupport, dtype_name: Any) -> None:
    """The restrictions of the table that can be read off one node."""
    attrs = {a.name: a for a in node.attribute}
    if node.op_type == "LayerNormalization" and any(name for name in node.output[1:]):
        result.errors.append(f"{label}: uses the Mean/InvStdDev outputs; only the first output is supported")
    elif node.op_type == "ScatterND" and "reduction" in attrs and attrs["reduction"].s not in (b"", b"none"):
        result.errors.append(f"{label}: reduction {attrs['reduction'].s.decode()} is unsupported (only none)")
    elif node.op_type == "TopK" and "sorted" in attrs and attrs["sorted"].i == 0:
        result.errors.append(f"{label}: sorted=0 is unsupported")
    elif node.op_type == "If":
        branches = [attrs[name].g for name in ("then_branch", "else_branch") if name in attrs]
        if len(branches) == 2:
            then_out, else_out = ([o for o in b.output] for b in branches)
            for a, b in zip(then_out, else_out):
                if a.name == b.name:
                    result.errors.append(f"{label}: both branches output a tensor named {a.name}; "
                                         "TensorRT needs different names")
                ranks = [len(o.type.tensor_type.shape.dim) if o.type.tensor_type.HasField("shape") else None
                         for o in (a, b)]
                if None not in ranks and ranks[0] != ranks[1]:
                    result.errors.append(f"{label}: branch outputs {a.name}/{b.name} differ in rank {ranks}")


# ---------------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------------

def _normalise_spec(name: str, spec: ShapeSpec) -> Profile:
    items = list(spec)
    if all(isinstance(d, int) for d in items):
        fixed = tuple(int(d) for d in items)
        return fixed, fixed, fixed
    if len(items) == 3 and all(isinstance(s, Sequence) and all(isinstance(d, int) for d in s) for s in items):
        low, opt, high = (tuple(int(d) for d in s) for s in items)
        return low, opt, high
    raise AdaCacheError(f"shapes[{name!r}] = {spec!r}: give one shape (a list of ints) or (min, opt, max)")


def profile_shapes(onnx_path: str | Path, shapes: Mapping[str, ShapeSpec] | None = None) -> dict[str, Profile]:
    """(min, opt, max) per input of one ONNX graph: the shape it was exported at, or ``shapes[name]``.

    Static dimensions cannot change (the graphs are specialised to the export's shapes: re-export at
    a new shape); a dynamic dimension needs its range from ``shapes``.
    """
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    shapes = dict(shapes or {})
    profiles: dict[str, Profile] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
        if value.name not in shapes:
            if None in dims:
                raise AdaCacheError(f"input {value.name} of {onnx_path} has dynamic dimensions {dims}: give its "
                                    f"range as shapes={{'{value.name}': (min, opt, max)}}")
            fixed = tuple(int(d) for d in dims)
            profiles[value.name] = (fixed, fixed, fixed)
            continue
        low, opt, high = _normalise_spec(value.name, shapes[value.name])
        if not len(low) == len(opt) == len(high) == len(dims):
            raise AdaCacheError(f"shapes[{value.name!r}] must have rank {len(dims)} like the graph input, "
                                f"got {low}, {opt}, {high}")
        for axis, dim in enumerate(dims):
            if not low[axis] <= opt[axis] <= high[axis]:
                raise AdaCacheError(f"shapes[{value.name!r}]: need min <= opt <= max on axis {axis}, "
                                    f"got {low[axis]}, {opt[axis]}, {high[axis]}")
            if dim is not None and not low[axis] == opt[axis] == high[axis] == dim:
                raise AdaCacheError(
                    f"input {value.name} of {onnx_path} was exported with size {dim} on axis {axis} and the "
                    f"graph is fixed to it; shapes asks for {low[axis]}..{high[axis]}. Export again with "
                    "example inputs of the shape you need (one export per shape)"
                )
        profiles[value.name] = (low, opt, high)
    return profiles


@dataclass
class EngineVariant:
    """One plan variant's serialized TensorRT engine."""

    reuse: tuple[str, ...]
    path: str  # the .engine file
    onnx_path: str  # the graph it was built from
    profile: dict[str, Profile]  # input name -> (min, opt, max) of its optimisation profile


@dataclass
class TensorRTEngines:
    """Every engine built from one export, and the export's layout the runner needs."""

    directory: str
    exported: ExportedModel
    variants: list[EngineVariant]
    fp16: bool = False
    tensorrt_version: str | None = None

    def engine(self, reuse: Iterable[str]) -> EngineVariant:
        key = tuple(sorted(reuse))
        for variant in self.variants:
            if variant.reuse == key:
                return variant
        raise AdaCacheError(f"no engine reuses exactly {list(key)[:4]}...; export that variant "
                            "(adacache_fx.export.onnx(..., reuse_sets=[...])) and build again")

    def save_manifest(self) -> Path:
        """``engines.json`` beside the engines: self-contained, so a runner can load it alone."""
        data = {
            "format": "adacache_fx.tensorrt/1",
            "tensorrt_version": self.tensorrt_version,
            "fp16": self.fp16,
            "engines": [
                {"reuse": list(v.reuse), "engine": Path(v.path).name, "onnx": v.onnx_path,
                 "profile": {name: [list(s) for s in p] for name, p in v.profile.items()}}
                for v in self.variants
            ],
            "model": self.exported.to_dict(),
        }
        path = Path(self.directory) / "engines.json"
        path.write_text(json.dumps(data, indent=2))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> TensorRTEngines:
        """The engines whose ``engines.json`` is in ``directory``."""
        directory = Path(directory)
        path = directory / "engines.json"
        if not path.exists():
            raise AdaCacheError(f"no engines.json in {directory}: build engines with adacache_fx.export.tensorrt")
        data = json.loads(path.read_text())
        variants = [
            EngineVariant(tuple(e["reuse"]), str(directory / e["engine"]), e["onnx"],
                          {name: tuple(tuple(s) for s in p) for name, p in e["profile"].items()})  # type: ignore[misc]
            for e in data["engines"]
        ]
        return cls(str(directory), ExportedModel.from_dict(data["model"]), variants,
                   fp16=data["fp16"], tensorrt_version=data["tensorrt_version"])


def _major(trt: ModuleType) -> int:
    try:
        return int(str(trt.__version__).split(".")[0])
    except (AttributeError, ValueError):
        return 10


def tensorrt(
    exported: ExportedModel,
    out_dir: str | Path,
    shapes: Mapping[str, ShapeSpec] | None = None,
    fp16: bool = False,
    *,
    workspace_bytes: int | None = None,
) -> TensorRTEngines:
    """Build one TensorRT engine per plan variant of ``exported`` and write them, with
    ``engines.json``, to ``out_dir`` (``variant_<i>.engine`` for ``variant_<i>.onnx``).

    Args:
        exported: what :func:`adacache_fx.export.onnx` returned (or ``ExportedModel.load(dir)``).
        out_dir: where the engines and their manifest go (may be the ONNX directory).
        shapes: input name -> shape or (min, opt, max) for each engine's optimisation profile.
            Default: the shapes the graphs were exported at. The exported graphs are static, so
            this only matters for graphs exported with dynamic dimensions.
        fp16: let TensorRT pick FP16 kernels (inputs and outputs stay as exported).
        workspace_bytes: cap on TensorRT's workspace memory pool.

    Needs the ``tensorrt`` package and a CUDA GPU (:class:`TensorRTUnavailableError` otherwise).
    Engines only run with the TensorRT version and GPU model they were built with.
    """
    trt = import_tensorrt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shapes = dict(shapes or {})
    known = {name for v in exported.variants for name in v.input_names}
    unknown = sorted(set(shapes) - known)
    if unknown:
        raise AdaCacheError(f"shapes names {unknown} that no exported graph takes; inputs are {sorted(known)}")
    report = check_tensorrt_support(exported)
    if not report.supported:  # the table may lag the installed TensorRT: warn, let the parser decide
        logger.warning("adacache_fx: the operator table flags problems TensorRT may refuse:\n%s", report)

    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    # TensorRT 10 networks are always explicit-batch (the flag is deprecated); 8.x needs it to parse ONNX
    flags = 0 if _major(trt) >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    variants: list[EngineVariant] = []
    for variant in exported.variants:
        profile_dims = profile_shapes(variant.path, {k: v for k, v in shapes.items() if k in variant.input_names})
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, trt_logger)
        if not parser.parse_from_file(str(variant.path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            hint = f" ({table.OLDER_RELEASE_NOTE})" if _major(trt) < 10 else ""
            raise TensorRTBuildError(
                f"TensorRT {trt.__version__} could not parse {variant.path}: {errors}{hint}. "
                f"adacache_fx.export.check_tensorrt_support lists the graph's operators against its table"
            )
        config = builder.create_builder_config()
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        if workspace_bytes is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            name = network.get_input(i).name
            if name not in profile_dims:
                raise TensorRTBuildError(f"TensorRT's network has an input {name} that {variant.path} does not "
                                         f"declare ({sorted(profile_dims)})")
            profile.set_shape(name, *profile_dims[name])
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise TensorRTBuildError(f"TensorRT could not build an engine from {variant.path}; its log above says "
                                     "why (often memory: try workspace_bytes, or fp16=False)")
        engine_path = out / f"{Path(variant.path).stem}.engine"
        with open(engine_path, "wb") as f:
            f.write(serialized)
        used = {network.get_input(i).name for i in range(network.num_inputs)}
        variants.append(EngineVariant(variant.reuse, str(engine_path), str(variant.path),
                                      {k: v for k, v in profile_dims.items() if k in used}))
        logger.info("adacache_fx: built %s (reuses %d branches)", engine_path, len(variant.reuse))
    engines = TensorRTEngines(str(out), exported, variants, fp16=fp16, tensorrt_version=str(trt.__version__))
    engines.save_manifest()
    return engines


def _torch_dtype(trt_dtype: Any) -> torch.dtype:
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    dtypes = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
              "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8}
    if name not in dtypes:
        raise TensorRTBuildError(f"engine tensor type {name} has no torch equivalent the runner can bind")
    return dtypes[name]


class TensorRTRunner(VariantRunner):
    """Runs a denoising loop on TensorRT engines, one per plan variant, switched on the host per step.

    The interface and the host-side loop are :class:`adacache_fx.export.Runner`'s (shared base
    :class:`VariantRunner`): ``runner.start(num_steps)``, then ``runner(**kwargs)`` once per step.
    Inputs, caches and outputs stay on ``device`` as torch tensors bound by address, and each engine
    runs on torch's current CUDA stream, so no copy or sync happens between steps except the
    policy's own reads.
    """

    # Real engines read and write device memory. The tests' stand-in engine reads host memory and
    # sets this on a subclass; nothing else should.
    _host_buffers = False

    def __init__(self, engines: TensorRTEngines, policy: Policy, device: str | torch.device = "cuda") -> None:
        trt = import_tensorrt()
        self.device = torch.device(device)
        if self.device.type != "cuda" and not self._host_buffers:
            raise AdaCacheError(f"TensorRT engines run on CUDA devices, not {self.device}: pass device='cuda'")
        self.engines = engines
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        self._trt_runtime = trt.Runtime(self._trt_logger)  # kept: engines must not outlive their runtime
        self._contexts: dict[tuple[str, ...], tuple[Any, Any, set[str]]] = {}
        for variant in engines.variants:
            engine = self._trt_runtime.deserialize_cuda_engine(Path(variant.path).read_bytes())
            if engine is None:
                raise TensorRTBuildError(
                    f"TensorRT could not load {variant.path}: an engine only loads with the TensorRT version "
                    f"({engines.tensorrt_version}) and GPU model it was built for; build again here"
                )
            names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
            self._contexts[variant.reuse] = (engine, engine.create_execution_context(), names)
        missing = [v.reuse for v in engines.exported.variants if v.reuse not in self._contexts]
        if missing:
            raise AdaCacheError(f"{len(missing)} exported variant(s) have no engine: build them with "
                                "adacache_fx.export.tensorrt(exported, out_dir)")
        super().__init__(engines.exported, policy)

    def _execute(self, variant: ExportedVariant, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        engine, context, names = self._contexts[variant.reuse]
        stream = torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0
        bound = []  # keeps converted inputs alive until the launch; later reuse of their memory by torch
        # is ordered after the engine because both run on the same stream
        for name in variant.input_names:
            if name not in names:  # TensorRT drops inputs the network does not use
                continue
            tensor = feeds[name].detach().to(self.device, _torch_dtype(engine.get_tensor_dtype(name))).contiguous()
            bound.append(tensor)
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise TensorRTBuildError(f"input {name} has shape {tuple(tensor.shape)}, outside the engine's "
                                         "optimisation profile; call with the exported shapes")
            context.set_tensor_address(name, tensor.data_ptr())
        outputs = []
        for name in variant.output_names:
            out = torch.empty(tuple(context.get_tensor_shape(name)), dtype=_torch_dtype(engine.get_tensor_dtype(name)),
                              device=self.device)
            context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        if not context.execute_async_v3(stream):
            raise TensorRTBuildError(f"TensorRT failed to run the engine for {variant.path}; its log says why")
        return outputs
