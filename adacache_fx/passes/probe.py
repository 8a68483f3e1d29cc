"""Read intermediate values of a block graph without running the block: in-step signals.

TeaCache decides whether a whole step can reuse its caches from the first block's *modulated input*
(the normalised, timestep-modulated stream that enters its first branch), before that block runs.
:func:`modulated_input` finds that value in a captured graph; :func:`extract_value` cuts out the
few operations that produce it (a norm and a multiply-add), so it costs a tiny fraction of a block.
"""

from __future__ import annotations

import torch.fx as fx

from .capture import CapturedGraph, eliminate_dead_code
from .residuals import BlockAnalysis, op_name

# Projections whose activation input is the branch input; argument index of the activation.
_ACTIVATION_ARG = {"linear": 0, "mm": 0, "matmul": 0, "bmm": 0, "addmm": 1}
# Layout-only ops between the modulated input and the projection that reads it.
_LAYOUT = {"view", "reshape", "_unsafe_view", "expand", "permute", "transpose", "t", "contiguous", "clone"}
_PREFERRED_KINDS = ("self_attention", "joint_attention", "temporal_attention")


def modulated_input(captured: CapturedGraph, analysis: BlockAnalysis) -> str | None:
    """Name of the node feeding the first projection of the block's first attention branch.

    Falls back to the first region of any kind. None when no region has a projection.
    """
    nodes = list(captured.graph_module.graph.nodes)
    order = {node.name: i for i, node in enumerate(nodes)}
    by_name = {node.name: node for node in nodes}
    # Only a projection of the stream counts (not the modulation's projection of the time embedding).
    on_stream = {n for n in nodes if n.op == "placeholder" and n.name in analysis.stream_inputs}
    for node in nodes:
        if node.op == "call_function" and any(a in on_stream for a in node.all_input_nodes):
            on_stream.add(node)
    regions = sorted(
        analysis.regions,
        key=lambda r: (r.kind not in _PREFERRED_KINDS, min(order[n] for n in r.nodes)),
    )
    for region in regions:
        for name in sorted(region.nodes, key=order.__getitem__):
            node = by_name[name]
            index = _ACTIVATION_ARG.get(op_name(node))
            if index is None or len(node.args) <= index or not isinstance(node.args[index], fx.Node):
                continue
            value = node.args[index]
            if value not in on_stream:
                continue
            while op_name(value) in _LAYOUT and isinstance(value.args[0], fx.Node):
                value = value.args[0]
            return value.name
    return None


def extract_value(graph_module: fx.GraphModule, node_name: str) -> fx.GraphModule:
    """A graph with the same inputs that computes only ``node_name`` (returned as a 1-tuple)."""
    graph = fx.Graph()
    value_map: dict[fx.Node, fx.Node] = {}
    graph.graph_copy(graph_module.graph, value_map)
    target = next(new for old, new in value_map.items() if old.name == node_name)
    graph.output((target,))
    eliminate_dead_code(graph)
    graph.lint()
    return fx.GraphModule(graph_module, graph, class_name="CachedBlockProbe")
