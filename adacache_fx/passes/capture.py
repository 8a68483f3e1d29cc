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

import dataclasses
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


# Functional collectives (context parallelism's all-to-alls inside attention) return new tensors; their
# only effect is the exchange itself. A reused region must not run them, and dropping them is safe
# because every rank runs the same graph under the same, group-reduced decision.
COLLECTIVE_NAMESPACES = frozenset({"_c10d_functional", "_c10d_functional_autograd", "c10d_functional"})


def is_collective(node: fx.Node) -> bool:
    """Whether ``node`` calls a functional collective (or waits on one)."""
    target = node.target
    return node.op == "call_function" and isinstance(target, torch._ops.OpOverload) and (
        target.namespace in COLLECTIVE_NAMESPACES)


def eliminate_dead_code(graph: fx.Graph) -> None:
    """Dead-code elimination that treats random ops (eval dropout) and functional collectives as pure:
    their values are unused."""
    graph.eliminate_dead_code(
        is_impure_node=lambda node: not is_collective(node) and node.is_impure(impure_random=False))


def copy_graph_module(graph_module: fx.GraphModule, class_name: str = "CapturedBlock") -> fx.GraphModule:
    """A new graph module with a copy of ``graph_module``'s graph (node metadata included): what a
    pass edits, so that the graph it was given stays as it was."""
    graph = fx.Graph()
    graph._codegen = graph_module.graph._codegen  # how inputs and outputs are (un)flattened
    output = graph.graph_copy(graph_module.graph, {})
    graph.output(output)
    return fx.GraphModule(graph_module, graph, class_name=class_name)


def drop_runtime_checks(graph_module: fx.GraphModule) -> fx.GraphModule:
    """Pass: remove the shape and metadata checks export inserts. FX's dead-code elimination takes
    them for side effects and would keep a reused region's operations alive; the runtime's
    signature-keyed captures guarantee what they check."""
    out = copy_graph_module(graph_module)
    for node in list(out.graph.nodes):
        if node.op == "call_function" and node.target in _CHECK_OPS:
            out.graph.erase_node(node)
    out.recompile()
    return out


def drop_eval_dropout(graph_module: fx.GraphModule) -> fx.GraphModule:
    """Pass: replace eval-mode (or zero-probability) dropouts, identities, by copies of their input
    (what export's inference IR makes of them); :func:`drop_redundant_clones` then removes every copy
    that does not keep an output apart from an input."""
    out = copy_graph_module(graph_module)
    graph = out.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.dropout.default and (
            node.args[2] is False or node.args[1] == 0.0
        ):
            with graph.inserting_before(node):
                copy = graph.call_function(torch.ops.aten.clone.default, (node.args[0],))
            copy.meta = dict(node.meta)
            node.replace_all_uses_with(copy)
            graph.erase_node(node)
    out.recompile()
    return out


def returns_alias(node: fx.Node) -> bool:
    """True when the node's result may share memory with an input (a view op, or getitem of one)."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return returns_alias(node.args[0])
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(r.alias_info is not None for r in schema.returns)


def drop_redundant_clones(graph_module: fx.GraphModule) -> fx.GraphModule:
    """Pass: remove ``clone`` of an already contiguous value inside the (functional) graph.

    Export turns eval-mode dropout and ``.contiguous()`` on a contiguous tensor, both free in eager,
    into full copies. In a functional graph an inner copy is a pure identity; a clone is kept only
    where an output could otherwise alias another value (reached from an output through views).
    """
    out = copy_graph_module(graph_module)
    graph = out.graph
    output = next(n for n in graph.nodes if n.op == "output")
    may_alias_output: set[fx.Node] = set()
    stack = [n for n in pytree.tree_leaves(output.args) if isinstance(n, fx.Node)]
    while stack:
        node = stack.pop()
        if node in may_alias_output:
            continue
        may_alias_output.add(node)
        if returns_alias(node):
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
    out.recompile()
    return out


def drop_dead_code(graph_module: fx.GraphModule) -> fx.GraphModule:
    """Pass: :func:`eliminate_dead_code` on a copy."""
    out = copy_graph_module(graph_module)
    eliminate_dead_code(out.graph)
    out.graph.lint()
    out.recompile()
    return out


#: What :func:`capture_block` runs on the exported graph, in order: each pass graph -> new graph.
CLEANUP_PASSES = (drop_runtime_checks, drop_eval_dropout, drop_redundant_clones, drop_dead_code)


def leaf_key(leaf: Any) -> Any:
    """What a capture is specialised to, for one flattened call input."""
    if isinstance(leaf, torch.Tensor):
        # Strides too: export may specialise reshape to view for a contiguous input.
        return (leaf.shape, leaf.stride(), leaf.dtype, leaf.device)
    if leaf is None:
        return None
    if isinstance(leaf, (bool, int, float, str)):
        # With its type: True, 1 and 1.0 are equal keys but specialise a graph differently.
        return (type(leaf), leaf)
    if type(leaf).__repr__ is object.__repr__:
        # A plain object (a per-layer cache a model passes to every block) has a new address each call;
        # what a call depends on is its type and the kind of what it holds.
        held = getattr(leaf, "__dict__", {})
        return (type(leaf), tuple((name, leaf_key(value)) for name, value in held.items()
                                  if value is None or isinstance(value, (torch.Tensor, bool, int, float, str))))
    return (type(leaf), repr(leaf))


def call_signature(args: tuple, kwargs: dict) -> tuple:
    """A hashable key of everything a captured graph is specialised to."""
    leaves, structure = flatten_call(args, kwargs)
    return (structure, tuple(leaf_key(leaf) for leaf in leaves))


class _RegisteredNode(Exception):
    """A container pytree flattens by a registered rule (namedtuple, OrderedDict, a model's class)."""


def _flatten_builtin(tree: Any, leaves: list[Any]) -> Any:
    kind = type(tree)
    if kind is tuple or kind is list:
        return (kind, tuple([_flatten_builtin(child, leaves) for child in tree]))
    if kind is dict:
        return (dict, tuple(tree), tuple([_flatten_builtin(child, leaves) for child in tree.values()]))
    if kind in pytree.SUPPORTED_NODES or isinstance(tree, tuple):  # tuple subclasses: namedtuple, structseq
        raise _RegisteredNode
    leaves.append(tree)
    return None


def flatten_call(args: tuple, kwargs: dict) -> tuple[list[Any], Any]:
    """The leaves of a call's ``(args, kwargs)`` in ``pytree.tree_flatten``'s order, and a hashable
    key of its structure: the same leaves and equal keys exactly when pytree's specs are equal.

    Plain tuples, lists and dicts are walked here (a block is called with them on every call of
    every step, and a ``TreeSpec`` costs more to build and hash than the block's bookkeeping);
    any other container pytree knows is flattened by pytree.

        >>> leaves, key = flatten_call((torch.ones(2),), {"scale": 2.0, "rope": (None, None)})
        >>> len(leaves)
        4
    """
    leaves: list[Any] = []
    try:
        return leaves, _flatten_builtin((args, kwargs), leaves)
    except _RegisteredNode:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        return leaves, spec


@dataclass(frozen=True)
class InputBinding:
    """Where each graph placeholder's value comes from on a call."""

    kind: str  # "parameter" | "buffer" | "constant" | "user"
    target: str | int | torch.Tensor  # attribute path in the block, user leaf index, or the constant


@dataclass(frozen=True)
class CapturedGraph:
    """One block call captured as a flat graph: ``(*bound_inputs) -> (*user_outputs)``."""

    graph_module: fx.GraphModule
    bindings: tuple[InputBinding, ...]
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


def subclass_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors inside a tensor subclass (torchao's quantized weights), in the order export
    names them when it unwraps a subclass parameter (``<name>.parametrizations.<param>.original<i>``):
    depth first through ``__tensor_flatten__``'s attributes."""
    if type(tensor) is torch.Tensor or isinstance(tensor, nn.Parameter) and type(tensor.data) is torch.Tensor:
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    out: list[torch.Tensor] = []
    for name in names:
        out.extend(subclass_tensors(getattr(tensor, name)))
    return out


def _holds_state(block: nn.Module, target: str) -> bool:
    """Whether ``target`` (a dotted path) names a parameter or buffer the live ``block`` has."""
    owner_path, _, name = target.rpartition(".")
    try:
        owner = block.get_submodule(owner_path) if owner_path else block
    except AttributeError:
        return False
    return name in owner._parameters or name in owner._buffers


class BoundInputs:
    """Resolves a captured graph's parameter/buffer inputs against one live block, cheaply per call.

    A tensor-subclass parameter that export unwrapped (``to_q.parametrizations.weight.original0``)
    is read as the live parameter's inner tensor."""

    def __init__(self, captured: CapturedGraph, block: nn.Module) -> None:
        self._sources: list[tuple[str, Any, Any]] = []
        for binding in captured.bindings:
            if binding.kind in ("parameter", "buffer"):
                target = str(binding.target)
                # torch's own parametrizations (``register_parametrization``) have real parameters at
                # ``<module>.parametrizations.<name>.original``; export's unwrapped tensor subclasses
                # only look like them.
                unwrapped = ".parametrizations." in f".{target}" and not _holds_state(block, target)
                if unwrapped:
                    owner_path, _, rest = f".{target}".partition(".parametrizations.")
                    owner_path = owner_path.lstrip(".")
                    name, _, original = rest.partition(".")
                    index = int(original.removeprefix("original"))
                else:
                    owner_path, _, name = target.rpartition(".")
                owner = block.get_submodule(owner_path) if owner_path else block
                store = owner._parameters if binding.kind == "parameter" or unwrapped else owner._buffers
                if unwrapped and name not in store:
                    store = owner._buffers
                if unwrapped:
                    self._sources.append(("inner", (store, name), index))
                else:
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
            elif kind == "inner":
                store, name = a
                out.append(subclass_tensors(store[name])[b])
            elif kind == "user":
                out.append(leaves[a])
            else:
                out.append(a)
        return out


def _is_functional(graph_module: fx.GraphModule, block: nn.Module) -> bool:
    """No in-place op and no higher-order op (autocast or grad-mode regions) in export's graph, and
    no tensor-subclass weight (quantized: decomposing unwraps it into plain tensors)."""
    if any(type(t) is not torch.Tensor and type(getattr(t, "data", t)) is not torch.Tensor
           for t in (*block.parameters(), *block.buffers())):
        return False
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        if isinstance(node.target, torch._ops.HigherOrderOperator):
            return False
        schema = getattr(node.target, "_schema", None)
        if schema is not None and schema.is_mutable:
            return False
    return True


def capture_block(block: nn.Module, args: tuple, kwargs: dict, name: str) -> CapturedGraph:
    """Export ``block(*args, **kwargs)`` and run :data:`CLEANUP_PASSES` on the graph.

    Raises :class:`CaptureError` naming the block and the reason when export fails or the block
    mutates its own state (which a cached region could not replay).
    """
    captured = export_block(block, args, kwargs, name)
    graph_module = captured.graph_module
    for graph_pass in CLEANUP_PASSES:
        graph_module = graph_pass(graph_module)
    return dataclasses.replace(captured, graph_module=graph_module)


def export_block(block: nn.Module, args: tuple, kwargs: dict, name: str) -> CapturedGraph:
    """``block(*args, **kwargs)`` exported (functionalised, not decomposed) as a :class:`CapturedGraph`."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # torch's own pytree internals warn about a deprecated LeafSpec check here.
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            program = torch.export.export(block, args, kwargs, strict=False)
            if not _is_functional(program.graph_module, block):
                # Functionalise (in-place writes such as RoPE's ``out[..., 0::2] = ...`` become pure
                # ops that dead-code elimination can drop) without decomposing linear/attention/norms.
                # Two thirds of a capture's time, so only where the graph needs it.
                program = program.run_decompositions({})
    except Exception as exc:  # export raises many types; all mean "cannot capture"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptureError(
            f"cannot capture block {name!r} ({type(block).__name__}) with torch.export: "
            f"{type(exc).__name__}: {first_line}. Pass blocks=[...] to transform() to leave its "
            "list out, or transform(..., on_capture_error='skip') to run it uncached."
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

    num_outputs = len(signature.output_specs)
    return CapturedGraph(
        graph_module=program.graph_module,
        bindings=tuple(bindings),
        in_spec=in_spec,
        out_spec=program.call_spec.out_spec,
        num_user_outputs=num_outputs,
    )
