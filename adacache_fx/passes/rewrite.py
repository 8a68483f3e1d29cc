"""Rewrite a captured block graph for one *plan variant*.

Each region of a block is, for one call, in one of three states:

* ``COMPUTE``: the branch runs, nothing is stored (the policy never reuses it);
* ``STORE``: the branch runs and its branch values become extra graph outputs (the new cache);
* ``REUSE``: the branch values become extra graph inputs (the cache) and every operation of the
  region is removed from the graph, so none of it runs;
* ``PARTIAL``: the region runs for a subset of its tokens only. Two extra graph inputs, the token
  indices (``int64 [k]``, the same for every batch row) and the cached branch value; the region's
  inputs are gathered at those tokens, its operations run on ``k`` tokens (attention: queries only,
  keys and values still see every token), and the result is scattered into the cached value, which
  is both added to the stream and returned as the new cache. Valid only for regions the token pass
  has proven token-local (``Region.token_flow``, see :mod:`.tokens`).

A variant is a plain graph with no control flow: host-side dispatch between variants costs nothing
at run time, compiles to one full graph per variant, and exports as one graph per variant.
"""

from __future__ import annotations

import enum

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from .capture import eliminate_dead_code
from .residuals import Region, Residual, identifier
from .tokens import PartialComputeError, insert_partial


class RegionState(enum.IntEnum):
    COMPUTE = 0
    STORE = 1
    REUSE = 2
    PARTIAL = 3


def set_branch_value(add: fx.Node, residual: Residual, value: fx.Node) -> None:
    """Make the residual ``add`` take ``value`` as its branch operand (the stream operand stays)."""
    args = list(add.args)
    args[residual.branch_index] = value
    add.args = tuple(args)


def copy_for_rewrite(graph_module: fx.GraphModule) -> tuple[fx.Graph, dict[str, fx.Node], object, fx.Node | None]:
    """A copy of ``graph_module``'s graph to rewrite: ``(graph, new node by old name, the output
    value, the last placeholder)``; the caller adds the output."""
    graph = fx.Graph()
    value_map: dict[fx.Node, fx.Node] = {}
    output_value = graph.graph_copy(graph_module.graph, value_map)
    by_name = {old.name: new for old, new in value_map.items()}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    return graph, by_name, output_value, placeholders[-1] if placeholders else None


def build_variant(
    graph_module: fx.GraphModule,
    regions: list[Region],
    states: tuple[RegionState, ...],
    counts: tuple[int, ...] | None = None,
) -> fx.GraphModule:
    """Return a new graph module ``(*inputs, *reused caches) -> (*outputs, *stored caches)``.

    Extra inputs and outputs come in region order, and within a region in residual order: a
    ``REUSE`` region takes its cached values, a ``PARTIAL`` one its token indices then its cached
    value; ``STORE`` and ``PARTIAL`` regions return their (new) cached values. ``counts[i]`` is the
    number of tokens of ``PARTIAL`` region ``i`` (the graph is specialised to it, like to shapes).
    Nodes of a partial region's subset computation carry ``meta["adacache_partial"]``.
    """
    if len(states) != len(regions):
        raise ValueError(f"{len(states)} states for {len(regions)} regions")
    counts = tuple(counts) if counts is not None else (0,) * len(regions)
    if len(counts) != len(regions):
        raise ValueError(f"{len(counts)} token counts for {len(regions)} regions")
    for region, state, count in zip(regions, states, counts):
        if state == RegionState.PARTIAL:
            if region.token_flow is None:
                raise PartialComputeError(
                    region.token_error
                    or f"region {region.name!r} was not analysed for partial recompute (run the token pass)"
                )
            if not 1 <= count <= region.token_flow.tokens:
                raise ValueError(
                    f"region {region.name!r}: {count} tokens to recompute, expected 1..{region.token_flow.tokens}"
                )
    graph, by_name, output_value, last_placeholder = copy_for_rewrite(graph_module)

    new_inputs: list[fx.Node] = []
    new_outputs: list[fx.Node] = []
    for region, state, count in zip(regions, states, counts):
        for i, res in enumerate(region.residuals):
            add = by_name[res.add_node]
            branch = by_name[res.branch_node]
            if state == RegionState.REUSE:
                anchor = new_inputs[-1] if new_inputs else last_placeholder
                with graph.inserting_after(anchor) if anchor is not None else graph.inserting_before(None):
                    cache = graph.placeholder(f"cache_{identifier(region.name)}_{i}")
                cache.meta = dict(branch.meta)
                new_inputs.append(cache)
                set_branch_value(add, res, cache)
            elif state == RegionState.STORE:
                new_outputs.append(branch)
            elif state == RegionState.PARTIAL:
                anchor = new_inputs[-1] if new_inputs else last_placeholder
                with graph.inserting_after(anchor) if anchor is not None else graph.inserting_before(None):
                    tokens = graph.placeholder(f"tokens_{identifier(region.name)}")
                with graph.inserting_after(tokens):
                    cache = graph.placeholder(f"cache_{identifier(region.name)}_{i}")
                fake_mode = detect_fake_mode([branch.meta.get("val")])
                if fake_mode is not None:  # fake inputs let FLOP counting and shape checks run the graph
                    with fake_mode:
                        tokens.meta["val"] = torch.empty(count, dtype=torch.long)
                cache.meta = dict(branch.meta)
                new_inputs.extend([tokens, cache])
                add = by_name[res.add_node]
                scattered = insert_partial(
                    graph, by_name, region.token_flow, count, tokens, cache, add, region.name
                )
                set_branch_value(add, res, scattered)
                new_outputs.append(scattered)

    outputs = list(output_value) if isinstance(output_value, (list, tuple)) else [output_value]
    graph.output(tuple(outputs + new_outputs))
    eliminate_dead_code(graph)
    graph.lint()

    alive_new = set(graph.nodes)
    remaining = {name for name, new in by_name.items() if new in alive_new}
    for region, state in zip(regions, states):
        if state == RegionState.REUSE:
            alive = region.nodes & remaining
            if alive:  # the region analysis promised these would become dead
                raise AssertionError(
                    f"reused region {region.name!r} still runs {sorted(alive)[:5]}: analysis bug"
                )
    return fx.GraphModule(graph_module, graph, class_name="CachedBlockVariant")
