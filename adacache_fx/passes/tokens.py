"""Partial recompute: run a cached region for a subset of its tokens, keep the cache elsewhere.

A region's branch value is ``[batch, tokens, ...]``. For ``k`` chosen token indices, the partial
form of the region *gathers* those tokens from its inputs (``index_select`` on the token axis, the
same indices for every batch row), runs the region's operations on ``k`` tokens instead of ``N``,
and *scatters* the result into the cached branch value (``index_copy``). This is exact when every
output token depends only on the same token of the inputs (an MLP, a norm, a modulation), and for
attention on the *query* side: queries are gathered, keys and values still see all ``N`` tokens.

:func:`analyse_token_flow` proves that for one region, op by op, and records how to build the
partial form for any ``k`` (:class:`TokenFlow`); :func:`insert_partial` builds it into a graph.
Anything the analysis does not know to be token-local raises :class:`PartialComputeError` naming
the operation, so an unsupported branch is never recomputed partially (it computes fully instead).

How the analysis works:

* Demand, walking back from the branch value: a node needed on the token subset needs its
  stream-dependent inputs on the subset too, except attention's keys and values and a matmul's
  second operand, which stay whole. Inputs from outside the region are gathered.
* Shapes, walking forward in a fake-tensor run with a probe count ``k0 != N``: each subset value's
  token axis is the one axis whose size changed. Views are mapped by strides (a token axis may be
  merged with its neighbours, ``[B, N, D] -> [B*N, D]``, but never split); a tensor without the
  token axis that meets a subset value at a full-size ``N`` axis (a RoPE table) is gathered too.
* Only a whitelist of ops may touch the subset: pointwise ops, layout ops, reductions and norms
  over other axes, matmuls with the tokens as rows, and scaled-dot-product attention's queries.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from ..errors import AdaCacheError
from .residuals import BlockAnalysis, Region, op_name

#: Axis of the tokens in branch values and region inputs: ``[batch, tokens, ...]``.
TOKEN_AXIS = 1

# Ops whose size list argument must be rewritten for the subset (the token entry scales N -> k).
_VIEW = {"view", "_unsafe_view", "reshape", "view_copy"}
_EXPAND = {"expand", "expand_copy"}
# Ops that only move, copy or retype data: the token axis moves with them.
_LAYOUT = {
    "permute", "transpose", "t", "unsqueeze", "squeeze", "flatten", "clone", "contiguous", "alias", "detach",
    "_to_copy", "to", "type_as", "empty_like", "zeros_like", "ones_like", "full_like",
    "view_as_complex", "view_as_real", "lift_fresh_copy", "getitem",
}
# Ops with a dim argument: fine along any axis but the tokens' (argument name in the schema).
_DIM_OPS = {
    "split": "dim", "split_with_sizes": "dim", "chunk": "dim", "unbind": "dim", "slice": "dim",
    "narrow": "dim", "select": "dim", "cat": "dim", "concat": "dim", "stack": "dim",
    "slice_scatter": "dim", "select_scatter": "dim", "unflatten": "dim", "flip": "dims",
    "roll": "dims", "softmax": "dim", "_softmax": "dim", "log_softmax": "dim",
    "_log_softmax": "dim", "mean": "dim", "sum": "dim", "amax": "dim", "amin": "dim",
    "var": "dim", "std": "dim", "var_mean": "dim", "logsumexp": "dim", "linalg_vector_norm": "dim",
    "norm": "dim", "prod": "dim",
}
# Reductions whose empty / missing dim means "all dims" (so it includes the tokens).
_REDUCE_ALL_IF_EMPTY = {"mean", "sum", "amax", "amin", "var", "std", "var_mean", "logsumexp",
                        "linalg_vector_norm", "norm", "prod"}
_NORMS = {"layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm"}
# Element-wise ops without the pointwise tag; broadcast like pointwise ops.
_ELEMENTWISE = {"copy", "where", "masked_fill", "lerp", "addcmul", "addcdiv"}
_SDPA = {
    "scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_cudnn_attention",
}
# Operands kept whole: attention's keys/values/mask and a matmul's second operand.
_WHOLE_OPERANDS = {
    **{name: ("key", "value", "attn_mask", "attn_bias") for name in _SDPA},
    "mm": ("mat2",), "bmm": ("mat2",), "matmul": ("other",), "linear": ("weight", "bias"),
    "addmm": ("self", "mat2"), "type_as": ("other",),
}


class PartialComputeError(AdaCacheError):
    """A region cannot be recomputed for a subset of its tokens (its ops mix tokens)."""


@dataclass(frozen=True)
class TokenAxis:
    """Where the tokens sit in a value: axis ``axis`` of size ``outer * N * inner`` (row-major)."""

    axis: int
    outer: int = 1
    inner: int = 1

    @property
    def plain(self) -> bool:
        return self.outer == 1 and self.inner == 1


@dataclass
class NodeRecipe:
    """How to build the subset copy of one node for a token count ``k``."""

    # Argument path -> ("subset",) for a subset input, ("gather", axis) for a gathered whole input.
    modes: dict[tuple, tuple] = field(default_factory=dict)
    # (path of a size list, position, outer, inner): entry becomes outer * k * inner.
    size_rewrite: tuple[tuple, int, int, int] | None = None


@dataclass
class TokenFlow:
    """The proof that a region is token-local, and how to build its partial form."""

    region: str
    tokens: int  # N: size of the token axis of the branch value
    order: list[str]  # subset nodes in graph order
    recipes: dict[str, NodeRecipe]
    branch_node: str


# -- argument helpers ----------------------------------------------------------------------------
def _schema_names(node: fx.Node) -> list[str]:
    schema = getattr(node.target, "_schema", None)
    return [a.name for a in schema.arguments] if schema is not None else []


def _arg(node: fx.Node, name: str, default: Any = None) -> Any:
    """Argument ``name`` of an ATen call, positional or keyword."""
    if name in node.kwargs:
        return node.kwargs[name]
    names = _schema_names(node)
    if name in names and names.index(name) < len(node.args):
        return node.args[names.index(name)]
    return default


def _arg_name(node: fx.Node, path: tuple) -> str:
    if path[0] == "k":
        return path[1]
    names = _schema_names(node)
    return names[path[1]] if path[1] < len(names) else ""


def _node_args(node: fx.Node) -> Iterator[tuple[tuple, fx.Node]]:
    """Every node argument with its path: ("a", i) / ("a", i, j) / ("k", name) / ("k", name, j)."""
    for i, arg in enumerate(node.args):
        if isinstance(arg, fx.Node):
            yield ("a", i), arg
        elif isinstance(arg, (list, tuple)):
            for j, a in enumerate(arg):
                if isinstance(a, fx.Node):
                    yield ("a", i, j), a
    for key, arg in node.kwargs.items():
        if isinstance(arg, fx.Node):
            yield ("k", key), arg
        elif isinstance(arg, (list, tuple)):
            for j, a in enumerate(arg):
                if isinstance(a, fx.Node):
                    yield ("k", key, j), a


def _map_args(node: fx.Node, fn) -> tuple[tuple, dict]:
    """``node``'s args and kwargs with every node argument replaced by ``fn(path, node)``."""
    args = []
    for i, arg in enumerate(node.args):
        if isinstance(arg, fx.Node):
            args.append(fn(("a", i), arg))
        elif isinstance(arg, (list, tuple)):
            args.append(type(arg)(fn(("a", i, j), a) if isinstance(a, fx.Node) else a for j, a in enumerate(arg)))
        else:
            args.append(arg)
    kwargs = {}
    for key, arg in node.kwargs.items():
        if isinstance(arg, fx.Node):
            kwargs[key] = fn(("k", key), arg)
        elif isinstance(arg, (list, tuple)):
            kwargs[key] = type(arg)(fn(("k", key, j), a) if isinstance(a, fx.Node) else a for j, a in enumerate(arg))
        else:
            kwargs[key] = arg
    return tuple(args), kwargs


def _size_list(node: fx.Node) -> tuple[tuple, list]:
    """(path, list) of the size argument of a view/expand."""
    for i, arg in enumerate(node.args[1:], start=1):
        if isinstance(arg, (list, tuple)):
            return ("a", i), list(arg)
    for key in ("size", "shape"):
        if isinstance(node.kwargs.get(key), (list, tuple)):
            return ("k", key), list(node.kwargs[key])
    raise PartialComputeError(f"{node.name} ({op_name(node)}): no size list argument found")


def _set_path(args: tuple, kwargs: dict, path: tuple, position: int, value: int) -> tuple[tuple, dict]:
    args = list(args)
    if path[0] == "a":
        seq = list(args[path[1]])
        seq[position] = value
        args[path[1]] = seq
    else:
        seq = list(kwargs[path[1]])
        seq[position] = value
        kwargs = {**kwargs, path[1]: seq}
    return tuple(args), kwargs


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def _is_pointwise(node: fx.Node) -> bool:
    tags = getattr(node.target, "tags", ())
    return torch.Tag.pointwise in tags or op_name(node) in _ELEMENTWISE


def _tensors(value: Any) -> list[Any]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    return []


# -- the analysis --------------------------------------------------------------------------------
class _Analysis:
    def __init__(self, graph_module: fx.GraphModule, analysis: BlockAnalysis, region: Region) -> None:
        self.graph = graph_module.graph
        self.nodes = list(self.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.by_name = {n.name: n for n in self.nodes}
        self.region = region
        self.region_nodes = {self.by_name[n] for n in region.nodes}
        self.stream_dependent = self._stream_dependent(analysis.stream_inputs)

    def _stream_dependent(self, stream_inputs: tuple[str, ...]) -> set[fx.Node]:
        dependent = {self.by_name[n] for n in stream_inputs if n in self.by_name}
        for node in self.nodes:
            if node not in dependent and any(p in dependent for p in node.all_input_nodes):
                dependent.add(node)
        return dependent

    def fail(self, node: fx.Node, why: str) -> PartialComputeError:
        return PartialComputeError(
            f"region {self.region.name!r} cannot be recomputed for a subset of tokens: {node.name} "
            f"({op_name(node) or node.op}) {why}"
        )

    def run(self) -> TokenFlow:
        region = self.region
        if len(region.residuals) != 1:
            raise PartialComputeError(
                f"region {region.name!r} adds {len(region.residuals)} residuals (a joint branch updating "
                "several streams); partial recompute needs one branch value with one token axis"
            )
        branch = self.by_name[region.residuals[0].branch_node]
        value = branch.meta.get("val")
        if not isinstance(value, torch.Tensor) or value.ndim < 2:
            raise PartialComputeError(
                f"region {region.name!r}: branch value is not a [batch, tokens, ...] tensor"
            )
        self.batch, self.tokens = int(value.shape[0]), int(value.shape[TOKEN_AXIS])
        self.fake_mode = detect_fake_mode(
            [n.meta.get("val") for n in self.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
        )
        if self.fake_mode is None:
            raise PartialComputeError(f"region {region.name!r}: the graph carries no fake tensors to analyse")
        subset = self._demand(branch)
        order = sorted(subset, key=self.index.__getitem__)
        self.probe = self.tokens + 1  # any count != N: the token axis is the one whose size changes
        with self.fake_mode:
            self.probe_index = torch.zeros(self.probe, dtype=torch.long)
        self.values: dict[fx.Node, Any] = {}
        self.axes: dict[fx.Node, Any] = {}
        recipes = {}
        for node in order:
            recipe = self._forward(node, subset)
            if recipe is not None:
                recipes[node.name] = recipe
        final = self.axes[branch]
        if final != TokenAxis(TOKEN_AXIS):
            raise self.fail(branch, f"ends with its tokens at {final}, not on axis {TOKEN_AXIS}")
        copied = [n.name for n in order if n.name in recipes]
        return TokenFlow(region.name, self.tokens, copied, recipes, branch.name)

    # Which nodes run on the token subset: walk back from the branch value.
    def _demand(self, branch: fx.Node) -> set[fx.Node]:
        subset: set[fx.Node] = set()
        stack = [branch]
        while stack:
            node = stack.pop()
            if node in subset:
                continue
            subset.add(node)
            whole = _WHOLE_OPERANDS.get(op_name(node), ())
            for path, parent in _node_args(node):
                if parent not in self.stream_dependent or _arg_name(node, path) in whole:
                    continue
                if parent in self.region_nodes:
                    stack.append(parent)
        return subset

    def _input(self, node: fx.Node, path: tuple, parent: fx.Node, subset: set[fx.Node], recipe: NodeRecipe):
        """Fake value and token axis of one argument on the subset (None axis: whole, as is)."""
        whole = _arg_name(node, path) in _WHOLE_OPERANDS.get(op_name(node), ())
        if whole:  # keys, values, weights: the original, all tokens (even if also needed on the subset)
            return parent.meta.get("val"), None
        if parent in subset:
            if self.axes[parent] is None:  # carries no tokens after all: the original, as is
                return parent.meta.get("val"), None
            recipe.modes[path] = ("subset",)
            return self.values[parent], self.axes[parent]
        if parent in self.stream_dependent and parent not in self.region_nodes:
            # A stream value from outside the region: gather its tokens.
            value = parent.meta.get("val")
            if (
                not isinstance(value, torch.Tensor) or value.ndim < 2
                or (int(value.shape[0]), int(value.shape[TOKEN_AXIS])) != (self.batch, self.tokens)
            ):
                raise self.fail(node, f"reads {parent.name}, which has no [batch={self.batch}, tokens={self.tokens}] layout")
            recipe.modes[path] = ("gather", TOKEN_AXIS)
            return torch.index_select(value, TOKEN_AXIS, self.probe_index), TokenAxis(TOKEN_AXIS)
        return parent.meta.get("val"), None

    def _forward(self, node: fx.Node, subset: set[fx.Node]) -> NodeRecipe | None:
        """Check one subset node and work out its subset copy; None: it reads no tokens, use it as is."""
        recipe = NodeRecipe()
        name = op_name(node)
        if node.op != "call_function":
            raise self.fail(node, "is not an operator call")
        inputs: dict[tuple, tuple[Any, TokenAxis | None]] = {}
        for path, parent in _node_args(node):
            inputs[path] = self._input(node, path, parent, subset, recipe)
        carried = [(p, v, a) for p, (v, a) in inputs.items() if a is not None]
        if not carried:
            # Stream-dependent only through operands kept whole (``type_as(x, other=stream)``).
            self.values[node], self.axes[node] = node.meta.get("val"), None
            return None
        primary_path, primary, axis = carried[0]
        original = node.meta.get("val")

        if name == "getitem":
            self.values[node] = operator.getitem(primary, node.args[1])
            element_axes = axis
            if not isinstance(element_axes, tuple) or element_axes[node.args[1]] is None:
                raise self.fail(node, "takes an element of a tuple that carries no tokens")
            self.axes[node] = element_axes[node.args[1]]
            return recipe

        if name in _DIM_OPS:
            self._check_dims(node, name, primary, axis)
        if name in _NORMS:
            normalized = _arg(node, "normalized_shape", [])
            if axis.axis >= primary.ndim - len(normalized):
                raise self.fail(node, "normalises over the token axis")
        elif name in ("linear", "addmm", "mm"):
            if axis.axis >= primary.ndim - 1:
                raise self.fail(node, "contracts over the token axis")
        elif name in ("matmul", "bmm"):
            if _arg_name(node, primary_path) not in ("self", "input") or len(carried) != 1:
                raise self.fail(node, "has tokens on its second operand (attention written without SDPA "
                                "would need its keys kept whole)")
            if axis.axis >= primary.ndim - 1:
                raise self.fail(node, "contracts over the token axis")
        elif name in _SDPA:
            if _arg_name(node, primary_path) != "query" or len(carried) != 1:
                raise self.fail(node, "would need the token subset on keys or values")
            if axis.axis != primary.ndim - 2 or not axis.plain:
                raise self.fail(node, f"has its query tokens at {axis}, not on the sequence axis")
            if _arg(node, "is_causal", False):
                raise self.fail(node, "is causal: its mask depends on each query's position")
        elif name in _VIEW or name in _EXPAND:
            pass
        elif not (name in _LAYOUT or name in _DIM_OPS or _is_pointwise(node)):
            raise self.fail(node, "is not known to act on each token separately")

        # Whole tensors meeting the subset at a full-size token axis are gathered too.
        gather_rule = _is_pointwise(node) or name in ("cat", "concat", "stack", "slice_scatter", "select_scatter") \
            or name in _SDPA or name in ("matmul", "bmm")
        args_values: dict[tuple, Any] = {p: v for p, (v, _a) in inputs.items()}
        if gather_rule:
            self._gather_whole(node, name, inputs, primary, axis, recipe, args_values)
        for _path, value, other in carried[1:]:
            # Several subset inputs must hold their tokens at the same (right-aligned) place.
            if value.ndim - other.axis != primary.ndim - axis.axis or (other.outer, other.inner) != (axis.outer, axis.inner):
                raise self.fail(node, f"combines token values with tokens on different axes ({other} vs {axis})")

        new_args, new_kwargs = _map_args(node, lambda path, parent: args_values[path])
        out_axis: TokenAxis | None = None
        if name in _VIEW:
            size_path, sizes = _size_list(node)
            in_shape = tuple(int(s) for s in node.args[0].meta["val"].shape)
            out_shape = tuple(int(s) for s in original.shape)
            out_axis = self._map_view(node, in_shape, axis, out_shape)
            recipe.size_rewrite = (size_path, out_axis.axis, out_axis.outer, out_axis.inner)
            if sizes[out_axis.axis] != -1:
                new_args, new_kwargs = _set_path(new_args, new_kwargs, size_path, out_axis.axis,
                                                 out_axis.outer * self.probe * out_axis.inner)
        elif name in _EXPAND:
            size_path, sizes = _size_list(node)
            position = axis.axis + len(sizes) - primary.ndim
            out_axis = TokenAxis(position, axis.outer, axis.inner)
            recipe.size_rewrite = (size_path, position, axis.outer, axis.inner)
            if sizes[position] != -1:
                new_args, new_kwargs = _set_path(new_args, new_kwargs, size_path, position,
                                                 axis.outer * self.probe * axis.inner)
        try:
            with self.fake_mode:
                value = node.target(*new_args, **new_kwargs)
        except Exception as exc:  # a shape error means the op does not act token by token
            raise self.fail(node, f"fails on a token subset ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from exc
        self.values[node] = value
        self.axes[node] = self._output_axes(node, original, value, axis, out_axis)
        return recipe

    def _check_dims(self, node: fx.Node, name: str, primary: Any, axis: TokenAxis) -> None:
        key = _DIM_OPS[name]
        dims = _arg(node, key, None)
        if dims is None or (isinstance(dims, (list, tuple)) and not dims):
            if name in _REDUCE_ALL_IF_EMPTY or name == "roll":
                raise self.fail(node, "works over every axis, the tokens' included")
            dims = 0  # the schema default of split, cat, slice, ...
        dims = [dims] if isinstance(dims, int) else list(dims)
        ndim = primary.ndim + (1 if name == "stack" else 0)
        normalised = {d % ndim for d in dims}
        if name == "stack":
            return  # stacking adds an axis; it never merges tokens
        if axis.axis in normalised:
            raise self.fail(node, f"works along the token axis (dim {sorted(normalised)})")

    def _gather_whole(self, node, name, inputs, primary, axis, recipe, args_values) -> None:
        """Gather the tokens of whole (non-subset) tensors that meet the subset at a token axis."""
        if name in _SDPA:
            # Only an attention mask with a per-query axis needs it; keys and values stay whole.
            for path, (value, a) in inputs.items():
                if _arg_name(node, path) in ("attn_mask", "attn_bias") and isinstance(value, torch.Tensor):
                    if value.ndim >= 2 and value.shape[-2] == self.tokens and self.tokens != 1:
                        recipe.modes[path] = ("gather", value.ndim - 2)
                        args_values[path] = torch.index_select(value, value.ndim - 2, self.probe_index)
            return
        from_end = primary.ndim - axis.axis  # position of the token axis counted from the end
        if name in ("matmul", "bmm") and from_end <= 2:
            return  # tokens are the rows: the other operand has no query-token axis
        full = axis.outer * self.tokens * axis.inner
        for path, (value, a) in inputs.items():
            if a is not None or not isinstance(value, torch.Tensor) or value.ndim == 0:
                continue
            position = value.ndim - from_end  # right-aligned, like broadcasting (and matmul batch dims)
            if position < 0 or value.shape[position] == 1:
                continue
            if value.shape[position] != full:
                raise self.fail(node, f"meets a value of size {value.shape[position]} on the token axis (expected {full} or 1)")
            if not axis.plain:
                raise self.fail(node, "meets a whole tensor on a token axis merged with other axes")
            recipe.modes[path] = ("gather", position)
            args_values[path] = torch.index_select(value, position, self.probe_index)

    def _map_view(self, node: fx.Node, in_shape: tuple, axis: TokenAxis, out_shape: tuple) -> TokenAxis:
        """The output axis holding the token factor of a row-major reshape, or fail if it is split."""
        n = self.tokens
        post = axis.inner * _prod(in_shape[axis.axis + 1:])  # elements after one token step
        stride = 1
        for j in range(len(out_shape) - 1, -1, -1):
            low, high = stride, stride * out_shape[j]
            if low <= post and post * n <= high and post % low == 0 and high % (post * n) == 0:
                inner = post // low
                return TokenAxis(j, out_shape[j] // (n * inner), inner)
            stride = high
        raise self.fail(node, f"splits the token axis across several axes ({in_shape} -> {out_shape})")

    def _output_axes(self, node, original, value, in_axis: TokenAxis, known: TokenAxis | None):
        """Token axis of each output, from the one axis whose size changed from N to the probe."""
        if isinstance(original, torch.Tensor):
            return self._one_axis(node, original, value, in_axis, known)
        if isinstance(original, (list, tuple)):
            return tuple(
                self._one_axis(node, o, v, in_axis, None, allow_none=True)
                if isinstance(o, torch.Tensor) else None
                for o, v in zip(original, _tensors(value))
            )
        raise self.fail(node, "returns a non-tensor value")

    def _one_axis(self, node, original, value, in_axis, known, allow_none=False):
        if value.ndim != original.ndim:
            raise self.fail(node, "changes rank on the token subset")
        changed = [i for i in range(value.ndim) if value.shape[i] != original.shape[i]]
        if len(changed) != 1:
            if allow_none and not changed:
                return None  # e.g. a statistic without the token axis
            what = "loses the token axis (it reduces over tokens)" if not changed else "changes several axes"
            raise self.fail(node, what)
        position = changed[0]
        outer, inner = (known.outer, known.inner) if known is not None else (in_axis.outer, in_axis.inner)
        if known is not None and known.axis != position:
            raise self.fail(node, f"moved the tokens to axis {position}, expected {known.axis}")
        if (
            int(original.shape[position]) != outer * self.tokens * inner
            or int(value.shape[position]) != outer * self.probe * inner
        ):
            raise self.fail(node, "changes the size of the token axis in a way that is not token by token")
        return TokenAxis(position, outer, inner)


def analyse_token_flow(graph_module: fx.GraphModule, analysis: BlockAnalysis, region: Region) -> TokenFlow:
    """Prove that ``region`` can run on a token subset; raise :class:`PartialComputeError` if not."""
    return _Analysis(graph_module, analysis, region).run()


# -- building ------------------------------------------------------------------------------------
def insert_partial(
    graph: fx.Graph,
    by_name: dict[str, fx.Node],
    flow: TokenFlow,
    count: int,
    tokens: fx.Node,
    cache: fx.Node,
    before: fx.Node,
    tag: str,
) -> fx.Node:
    """Insert the partial form of a region before ``before``; return the scattered branch value.

    ``by_name`` maps the region's original node names to their nodes in ``graph``; ``tokens`` is the
    ``[count]`` index input and ``cache`` the cached branch value. New nodes carry
    ``meta["adacache_partial"] = tag``.
    """
    copies: dict[str, fx.Node] = {}
    gathered: dict[tuple[fx.Node, int], fx.Node] = {}

    def mark(node: fx.Node, source: fx.Node | None = None) -> fx.Node:
        if source is not None:
            node.meta.update({k: v for k, v in source.meta.items() if k not in ("val", "tensor_meta")})
        node.meta["adacache_partial"] = tag
        return node

    with graph.inserting_before(before):
        for name in flow.order:
            original = by_name[name]
            recipe = flow.recipes[name]

            def replace(path: tuple, parent: fx.Node) -> fx.Node:
                mode = recipe.modes.get(path)
                if mode is None:
                    return parent
                if mode[0] == "subset":
                    return copies[parent.name]
                key = (parent, mode[1])
                if key not in gathered:
                    gathered[key] = mark(graph.call_function(
                        torch.ops.aten.index_select.default, (parent, mode[1], tokens)
                    ))
                return gathered[key]

            args, kwargs = _map_args(original, replace)
            if recipe.size_rewrite is not None:
                path, position, outer, inner = recipe.size_rewrite
                current = args[path[1]][position] if path[0] == "a" else kwargs[path[1]][position]
                if current != -1:
                    args, kwargs = _set_path(args, kwargs, path, position, outer * count * inner)
            copies[name] = mark(graph.call_function(original.target, args, kwargs), original)
        scattered = mark(graph.call_function(
            torch.ops.aten.index_copy.default, (cache, TOKEN_AXIS, tokens, copies[flow.branch_node])
        ))
    return scattered
