"""Rewrite a captured block graph for one *plan variant*.

Each region of a block is, for one call, in one of three states:

* ``COMPUTE``: the branch runs, nothing is stored (the policy never reuses it);
* ``STORE``: the branch runs and its branch values become extra graph outputs (the new cache);
* ``REUSE``: the branch values become extra graph inputs (the cache) and every operation of the
  region is removed from the graph, so none of it runs.

A variant is a plain graph with no control flow: host-side dispatch between variants costs nothing
at run time, compiles to one full graph per variant, and exports as one graph per variant.
"""

from __future__ import annotations

import enum

import torch.fx as fx

from .capture import eliminate_dead_code
from .residuals import Region


class RegionState(enum.IntEnum):
    COMPUTE = 0
    STORE = 1
    REUSE = 2


def build_variant(
    graph_module: fx.GraphModule, regions: list[Region], states: tuple[RegionState, ...]
) -> fx.GraphModule:
    """Return a new graph module ``(*inputs, *reused caches) -> (*outputs, *stored caches)``.

    Cache inputs and outputs come in region order, and within a region in residual order.
    """
    if len(states) != len(regions):
        raise ValueError(f"{len(states)} states for {len(regions)} regions")
    graph = fx.Graph()
    value_map: dict[fx.Node, fx.Node] = {}
    output_value = graph.graph_copy(graph_module.graph, value_map)
    by_name = {old.name: new for old, new in value_map.items()}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    last_placeholder = placeholders[-1] if placeholders else None

    new_inputs: list[fx.Node] = []
    new_outputs: list[fx.Node] = []
    for region, state in zip(regions, states):
        for i, res in enumerate(region.residuals):
            add = by_name[res.add_node]
            branch = by_name[res.branch_node]
            if state == RegionState.REUSE:
                anchor = new_inputs[-1] if new_inputs else last_placeholder
                with graph.inserting_after(anchor) if anchor is not None else graph.inserting_before(None):
                    cache = graph.placeholder(f"cache_{region.name}_{i}")
                cache.meta = dict(branch.meta)
                new_inputs.append(cache)
                args = list(add.args)
                args[res.branch_index] = cache
                add.args = tuple(args)
            elif state == RegionState.STORE:
                new_outputs.append(branch)

    outputs = list(output_value) if isinstance(output_value, (list, tuple)) else [output_value]
    graph.output(tuple(outputs + new_outputs))
    eliminate_dead_code(graph)
    graph.lint()

    alive_new = set(graph.nodes)
    remaining = {old.name for old, new in value_map.items() if new in alive_new}
    for region, state in zip(regions, states):
        if state == RegionState.REUSE:
            alive = region.nodes & remaining
            if alive:  # the region analysis promised these would become dead
                raise AssertionError(
                    f"reused region {region.name!r} still runs {sorted(alive)[:5]}: analysis bug"
                )
    return fx.GraphModule(graph_module, graph, class_name="CachedBlockVariant")
