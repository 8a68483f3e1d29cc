"""Capture one call of a transformer block into an FX graph of ATen ops.

``torch.fx.symbolic_trace`` fails on diffusers blocks (they branch on ``.ndim``, ``.dtype``,
``len(...)``), so blocks are captured with ``torch.export.export(strict=False)`` from a real call.
The graph is specialised to that call's shapes, dtypes and non-tensor arguments; the caller keys
captures by :func:`call_signature` and captures again when it changes.

Parameters and buffers stay *lifted*: they are graph inputs, read from the live block on every
call. So the graph shares the block's weights (``.to()``, ``.half()``, weight loading all apply) and
one graph can serve every structurally identical block of a ModuleList.
"""

from __future__ import annotations

import enum
import operator
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.export.graph_signature import InputKind, OutputKind

from ..errors import CaptureError

# Checks that export inserts; they are side-effectful to FX's dead-code elimination and would keep a
# reused region's operations alive. The signature-keyed specialisation already guarantees them.
_CHECK_OPS = {
    torch.ops.aten._assert_tensor_metadata.default,
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten.sym_constrain_range.default,
    torch.ops.aten.sym_constrain_range_for_size.default,
}


def eliminate_dead_code(graph: fx.Graph) -> None:
    """Dead-code elimination that treats random ops (eval dropout) as pure: their values are unused."""
    graph.eliminate_dead_code(is_impure_node=lambda node: node.is_impure(impure_random=False))


def _drop_inference_noops(graph: fx.Graph) -> None:
    """Remove export's runtime checks and eval-mode dropouts (identities)."""
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _CHECK_OPS:
            graph.erase_node(node)
        elif node.target is torch.ops.aten.dropout.default and (
            node.args[2] is False or node.args[1] == 0.0
        ):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)


def _returns_alias(node: fx.Node) -> bool:
    """True when the node's result may share memory with an input (a view op, or getitem of one)."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return _returns_alias(node.args[0])
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(r.alias_info is not None for r in schema.returns)


def _drop_redundant_clones(graph: fx.Graph) -> None:
    """Remove ``clone`` of an already contiguous value inside the (functional) graph.

    Export turns eval-mode dropout and ``.contiguous()`` on a contiguous tensor, both free in eager,
    into full copies. In a functional graph an inner copy is a pure identity; a clone is kept only
    where an output could otherwise alias another value (reached from an output through views).
    """
    output = next(n for n in graph.nodes if n.op == "output")
    may_alias_output: set[fx.Node] = set()
    stack = [n for n in pytree.tree_leaves(output.args) if isinstance(n, fx.Node)]
    while stack:
        node = stack.pop()
        if node in may_alias_output:
            continue
        may_alias_output.add(node)
        if _returns_alias(node):
            stack.extend(a for a in node.args[:1] if isinstance(a, fx.Node))
    for node in list(graph.nodes):
        if node.target is not torch.ops.aten.clone.default or node in may_alias_output:
            continue
        source = node.args[0]
        value = source.meta.get("val") if isinstance(source, fx.Node) else None
        memory_format = node.kwargs.get("memory_format")
        if (
            isinstance(value, torch.Tensor)
            and memory_format in (None, torch.preserve_format, torch.contiguous_format)
            and value.is_contiguous()
        ):
            node.replace_all_uses_with(source)
            graph.erase_node(node)


def _leaf_key(leaf: Any) -> Any:
    if isinstance(leaf, torch.Tensor):
        # Strides too: export may specialise reshape to view for a contiguous input.
        return (leaf.shape, leaf.stride(), leaf.dtype, leaf.device)
    if leaf is None or isinstance(leaf, (bool, int, float, str)):
        return leaf
    return (type(leaf), repr(leaf))


def call_signature(args: tuple, kwargs: dict) -> tuple:
    """A hashable key of everything a captured graph is specialised to."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    return (spec, tuple(_leaf_key(leaf) for leaf in leaves))


@dataclass
class InputBinding:
    """Where each graph placeholder's value comes from on a call."""

    kind: str  # "parameter" | "buffer" | "constant" | "user"
    target: str | int | torch.Tensor  # attribute path in the block, user leaf index, or the constant


@dataclass
class CapturedGraph:
    """One block call captured as a flat graph: ``(*bound_inputs) -> (*user_outputs)``."""

    graph_module: fx.GraphModule
    bindings: list[InputBinding]
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    num_user_outputs: int

    def placeholders(self) -> list[fx.Node]:
        return [n for n in self.graph_module.graph.nodes if n.op == "placeholder"]

    def stream_candidates(self) -> set[fx.Node]:
        """Placeholders fed by user tensors (not parameters, buffers or constants)."""
        return {
            node
            for node, binding in zip(self.placeholders(), self.bindings)
            if binding.kind == "user"
        }


class BoundInputs:
    """Resolves a captured graph's parameter/buffer inputs against one live block, cheaply per call."""

    def __init__(self, captured: CapturedGraph, block: nn.Module) -> None:
        self._sources: list[tuple[str, Any, Any]] = []
        for binding in captured.bindings:
            if binding.kind in ("parameter", "buffer"):
                owner_path, _, name = str(binding.target).rpartition(".")
                owner = block.get_submodule(owner_path) if owner_path else block
                store = owner._parameters if binding.kind == "parameter" else owner._buffers
                self._sources.append(("state", store, name))
            elif binding.kind == "constant":
                self._sources.append(("constant", binding.target, None))
            else:
                self._sources.append(("user", binding.target, None))

    def __call__(self, leaves: list[Any]) -> list[Any]:
        out = []
        for kind, a, b in self._sources:
            if kind == "state":
                out.append(a[b])
            elif kind == "user":
                out.append(leaves[a])
            else:
                out.append(a)
        return out


def capture_block(block: nn.Module, args: tuple, kwargs: dict, name: str) -> CapturedGraph:
    """Export ``block(*args, **kwargs)`` into a :class:`CapturedGraph`.

    Raises :class:`CaptureError` naming the block and the reason when export fails or the block
    mutates its own state (which a cached region could not replay).
    """
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # torch's own pytree internals warn about a deprecated LeafSpec check here.
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            program = torch.export.export(block, args, kwargs, strict=False)
            # Functionalise (in-place writes such as RoPE's ``out[..., 0::2] = ...`` become pure
            # ops that dead-code elimination can drop) without decomposing linear/attention/norms.
            program = program.run_decompositions({})
    except Exception as exc:  # export raises many types; all mean "cannot capture"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptureError(
            f"cannot capture block {name!r} ({type(block).__name__}) with torch.export: "
            f"{type(exc).__name__}: {first_line}. Pass blocks=[...] to transform() to leave its "
            "list out, or on_capture_error='skip' to run it uncached."
        ) from exc

    signature = program.graph_signature
    mutations = [s for s in signature.output_specs if s.kind != OutputKind.USER_OUTPUT]
    if mutations:
        raise CaptureError(
            f"block {name!r} ({type(block).__name__}) mutates state during forward "
            f"({', '.join(str(s.target) for s in mutations)}); a cached region cannot replay that."
        )

    leaves, in_spec = pytree.tree_flatten((args, kwargs))
    bindings: list[InputBinding] = []
    user_index = 0
    for spec in signature.input_specs:
        if spec.kind == InputKind.PARAMETER:
            bindings.append(InputBinding("parameter", spec.target))
        elif spec.kind == InputKind.BUFFER:
            bindings.append(InputBinding("buffer", spec.target))
        elif spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
            bindings.append(InputBinding("constant", program.constants[spec.target]))
        elif spec.kind == InputKind.USER_INPUT:
            bindings.append(InputBinding("user", user_index))
            user_index += 1
        else:
            raise CaptureError(f"block {name!r}: unsupported graph input kind {spec.kind}")
    if user_index != len(leaves):
        raise CaptureError(
            f"block {name!r}: export flattened {user_index} inputs but the call has {len(leaves)}"
        )

    graph_module = program.graph_module
    graph = graph_module.graph
    _drop_inference_noops(graph)
    _drop_redundant_clones(graph)
    eliminate_dead_code(graph)
    graph.lint()
    graph_module.recompile()
    num_outputs = len(signature.output_specs)
    return CapturedGraph(
        graph_module=graph_module,
        bindings=bindings,
        in_spec=in_spec,
        out_spec=program.call_spec.out_spec,
        num_user_outputs=num_outputs,
    )


def _plain(value: Any, depth: int = 0) -> Any:
    """A hashable, comparable form of an attribute value that may steer forward's control flow."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device, enum.Enum)):
        return value
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_plain(v, depth + 1) for v in value))
    if isinstance(value, (set, frozenset)):
        return ("set", tuple(sorted(repr(_plain(v, depth + 1)) for v in value)))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((repr(k), repr(_plain(v, depth + 1))) for k, v in value.items())))
    if isinstance(value, torch.Tensor):  # plain tensor attributes (not buffers): compare by identity
        return ("tensor", id(value))
    if callable(value) and not hasattr(value, "__dict__"):
        return ("callable", getattr(value, "__qualname__", repr(value)))
    state = getattr(value, "__dict__", None)
    if state is not None and depth < 3:
        return (type(value).__qualname__, _plain(dict(state), depth + 1))
    return (type(value).__qualname__, repr(value))


def structural_key(block: nn.Module) -> tuple:
    """Blocks with equal keys compute the same function of (parameters, inputs).

    Compares classes, parameter/buffer shapes and every non-module attribute (flags such as
    ``context_pre_only`` or a window offset tuple steer Python control flow inside forward).
    Anything not plain data is compared by type and contents, so doubt means "capture separately".
    """
    parts = []
    for path, module in block.named_modules():
        attrs = tuple(
            sorted(
                (k, repr(_plain(v)))
                for k, v in vars(module).items()
                if not k.startswith("_") and k != "training"
            )
        )
        parts.append(
            (
                path,
                type(module).__qualname__,
                attrs,
                tuple((n, tuple(p.shape), p.dtype) for n, p in module._parameters.items() if p is not None),
                tuple((n, tuple(b.shape), b.dtype) for n, b in module._buffers.items() if b is not None),
            )
        )
    return tuple(parts)
