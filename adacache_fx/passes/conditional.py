"""Rewrite a captured block graph into one graph with a run-time decision per cached region.

Where :func:`~.rewrite.build_variant` makes one control-flow-free graph per plan, this makes a single
graph for every plan: each cached region becomes ``torch.cond(reuse, reuse_fn, compute_fn, operands)``
whose result (the cached residual when ``reuse`` is true, the freshly computed one otherwise) is added
to the stream and returned as the region's new cache. The decision is a graph input (a boolean scalar
tensor), and so is the cache: ``(*inputs, *[reuse_i, *cache_i]) -> (*outputs, *new_cache_i)``, the
explicit-state form that compiles with ``fullgraph=True`` and exports to ONNX as ``If`` nodes.
Regions not cached compute unconditionally.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .capture import copy_graph_module, eliminate_dead_code
from .residuals import Region, identifier
from .rewrite import copy_for_rewrite, set_branch_value


def _region_function(
    graph: fx.Graph, region_nodes: set[fx.Node], outputs: list[fx.Node], num_caches: int
) -> tuple[fx.Graph, fx.Graph, list[fx.Node]]:
    """The compute and reuse branches of one region, both ``(*caches, *externals) -> outputs``,
    and the region's external inputs (values it reads from outside itself), in graph order."""
    # A getitem of a multi-output op outside the region (a split, say) reads a tensor out of a list:
    # the tensor is the operand, since torch.cond takes tensors only.
    region_nodes = {
        n for n in region_nodes
        if not (n.target is operator.getitem and isinstance(n.args[0], fx.Node) and n.args[0] not in region_nodes)
    }
    ordered = [n for n in graph.nodes if n in region_nodes]
    externals: list[fx.Node] = []
    for node in ordered:
        for used in node.all_input_nodes:
            if used not in region_nodes and used not in externals:
                externals.append(used)
    for out in outputs:  # a branch value computed outside the region is passed through
        if out not in region_nodes and out not in externals:
            externals.append(out)

    compute = fx.Graph()
    caches = [compute.placeholder(f"cache_{i}") for i in range(num_caches)]
    env: dict[fx.Node, fx.Node] = {}
    for ext in externals:
        env[ext] = compute.placeholder(f"in_{ext.name}")
        env[ext].meta = dict(ext.meta)
    for node in ordered:
        env[node] = compute.node_copy(node, lambda n: env[n])
    # Branch outputs must not alias branch inputs: a value passed through is cloned.
    results = [
        env[out] if out in region_nodes else compute.call_function(torch.ops.aten.clone.default, (env[out],))
        for out in outputs
    ]
    compute.output(tuple(_unaliased(compute, results)))  # two residuals may be views of one tensor
    del caches

    reuse = fx.Graph()
    cached = [reuse.placeholder(f"cache_{i}") for i in range(num_caches)]
    for ext in externals:
        reuse.placeholder(f"in_{ext.name}")
    reuse.output(tuple(reuse.call_function(torch.ops.aten.clone.default, (c,)) for c in cached))
    return compute, reuse, externals


def _view_source(node: fx.Node) -> fx.Node | None:
    """The tensor ``node`` is a view of (``x`` for ``x.view(...)`` or ``x.chunk(6)[2]``), or None."""
    target, source = node.target, node.args[0] if node.args else None
    if target is operator.getitem and isinstance(source, fx.Node):
        node, target = source, source.target
        source = node.args[0] if node.args else None
    schema = getattr(target, "_schema", None)
    if schema is None or not schema.returns or not isinstance(source, fx.Node):
        return None
    alias = schema.returns[0].alias_info
    return source if alias is not None and not alias.is_write else None


def _unaliased(graph: fx.Graph, operands: list[fx.Node]) -> list[fx.Node]:
    """``operands`` with a copy in place of each one that shares storage with an earlier one: cond
    branches must not see aliased inputs (export's decomposition rejects them), and the modulation
    chunks a DiT block reads (``emb.chunk(6)``) are all views of one tensor."""
    def base(node: fx.Node) -> fx.Node:
        source = _view_source(node)
        return node if source is None else base(source)

    seen: set[fx.Node] = set()
    out = []
    for node in operands:
        root = base(node)
        value = node.meta.get("val")
        if root in seen:
            node = _copy(graph, node, torch.contiguous_format)
        elif isinstance(value, torch.Tensor) and not value.is_contiguous():
            # Inductor may lay a strided view out densely outside a cond and still compile the
            # branch for the view's strides (an assert_size_stride fails at run time): a dense copy
            # gives both sides one layout.
            node = _copy(graph, node, torch.contiguous_format)
        seen.add(root)
        out.append(node)
    return out


def _copy(graph: fx.Graph, node: fx.Node, memory_format: torch.memory_format) -> fx.Node:
    copy = graph.call_function(torch.ops.aten.clone.default, (node,), {"memory_format": memory_format})
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        copy.meta["val"] = value.clone(memory_format=memory_format)
    return copy


@torch.library.custom_op("adacache_fx::dense_copy", mutates_args=())
def dense_copy(x: torch.Tensor) -> torch.Tensor:
    """A contiguous copy that compilers keep as it is (an opaque op with a fixed output layout)."""
    return x.clone(memory_format=torch.contiguous_format)


@dense_copy.register_fake
def _dense_copy_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def pin_cond_operands(graph_module: fx.GraphModule) -> fx.GraphModule:
    """Pass: every tensor operand of every ``torch.cond`` computed inside the graph goes through
    :func:`dense_copy` first.

    Inductor compiles a cond's branches for the strides its operands had when traced, but lays out
    an operand computed by a fused kernel as it likes (a transposed buffer for a ``cat``, say); the
    branch then fails its ``assert_size_stride`` at run time (torch 2.13). An opaque copy with a
    fixed contiguous layout gives both sides the same strides. Graph inputs keep theirs as given.
    For Inductor only: other backends take the graph as it is.
    """
    out = copy_graph_module(graph_module, class_name=type(graph_module).__name__)
    graph = out.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.higher_order.cond:
            continue
        predicate, true_fn, false_fn, operands = node.args
        pinned = []
        for operand in operands:
            value = operand.meta.get("val") if isinstance(operand, fx.Node) else None
            if isinstance(value, torch.Tensor) and operand.op != "placeholder":
                with graph.inserting_before(node):
                    copy = graph.call_function(torch.ops.adacache_fx.dense_copy.default, (operand,))
                copy.meta["val"] = _dense_copy_fake(value)
                operand = copy
            pinned.append(operand)
        node.args = (predicate, true_fn, false_fn, tuple(pinned))
    graph.lint()
    out.recompile()
    return out


def build_conditional(
    graph_module: fx.GraphModule, regions: list[Region], cached: tuple[bool, ...]
) -> fx.GraphModule:
    """Return ``(*inputs, *[reuse_i, *cache_i]) -> (*outputs, *new_cache_i)`` over the regions with
    ``cached[i]`` true, in region order (``reuse_i``: a boolean scalar tensor; ``cache_i``: one tensor
    per residual of the region, shaped like its branch value)."""
    if len(cached) != len(regions):
        raise ValueError(f"{len(cached)} cached flags for {len(regions)} regions")
    graph, by_name, output_value, anchor = copy_for_rewrite(graph_module)
    order = {node: i for i, node in enumerate(graph.nodes)}

    branches: dict[str, fx.Graph] = {}
    new_outputs: list[fx.Node] = []
    for region, is_cached in zip(regions, cached):
        if not is_cached:
            continue
        # Decision and cache inputs, after the block's own inputs.
        with graph.inserting_after(anchor) if anchor is not None else graph.inserting_before(None):
            flag = graph.placeholder(f"reuse_{identifier(region.name)}")
        anchor = flag
        caches = []
        for i, res in enumerate(region.residuals):
            with graph.inserting_after(anchor):
                cache = graph.placeholder(f"cache_{identifier(region.name)}_{i}")
            cache.meta = dict(by_name[res.branch_node].meta)
            caches.append(cache)
            anchor = cache

        region_nodes = {by_name[name] for name in region.nodes if name in by_name}
        outputs = [by_name[res.branch_node] for res in region.residuals]
        compute, reuse, externals = _region_function(graph, region_nodes, outputs, len(caches))
        compute_name, reuse_name = f"_compute_{identifier(region.name)}", f"_reuse_{identifier(region.name)}"
        branches[compute_name], branches[reuse_name] = compute, reuse
        first_add = min((by_name[res.add_node] for res in region.residuals), key=order.__getitem__)
        with graph.inserting_before(first_add):
            true_fn = graph.get_attr(reuse_name)
            false_fn = graph.get_attr(compute_name)
            decided = graph.call_function(
                torch.ops.higher_order.cond, (flag, true_fn, false_fn, tuple(caches + _unaliased(graph, externals)))
            )
            values = [graph.call_function(operator.getitem, (decided, i)) for i in range(len(outputs))]
        for res, value in zip(region.residuals, values):
            set_branch_value(by_name[res.add_node], res, value)
        new_outputs.extend(values)

    outputs = list(output_value) if isinstance(output_value, (list, tuple)) else [output_value]
    graph.output(tuple(outputs + new_outputs))
    eliminate_dead_code(graph)
    graph.lint()

    # Attributes the graph reads, by qualified name, plus the branch graphs torch.cond calls.
    root = {node.target: operator.attrgetter(node.target)(graph_module)
            for node in graph.nodes if node.op == "get_attr" and node.target not in branches}
    root.update({name: fx.GraphModule(graph_module, branch_graph, class_name="CachedRegionBranch")
                 for name, branch_graph in branches.items()})
    return fx.GraphModule(root, graph, class_name="CachedBlockConditional")
