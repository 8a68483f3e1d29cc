"""Write functionalised scatters back in place, for graphs that run eagerly.

Export functionalises in-place writes: RoPE's ``out = empty_like(x); out[..., 0::2] = a; out[..., 1::2] = b``
(Wan, and every model written that way) becomes::

    out = empty_like(x)
    s0 = copy(slice(out, -1, 0, None, 2), a); out1 = slice_scatter(out, s0, -1, 0, None, 2)
    s1 = copy(slice(out1, -1, 1, None, 2), b); out2 = slice_scatter(out1, s1, -1, 1, None, 2)

Inductor writes such scatters in place again, but a graph run as it is (the eager plan variants)
pays a full copy of ``out`` for every ``slice_scatter``: ~100 extra copies per Wan step.
:func:`reinplace_scatters` gives the eager form back (``slice(out, ...).copy_(a)``) where that is
safe: the scattered-into tensor was made inside the graph (never an input, a parameter or a view of
one) and nothing reads its old value after the scatter.

Only for graphs that run as they are: the in-place form is impure to dead-code elimination, so the
passes that remove a reused region's operations (:mod:`.rewrite`) run before it, on the functional
graph, and compiled and exported graphs are built from the functional graph.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .capture import copy_graph_module, eliminate_dead_code, returns_alias

aten = torch.ops.aten

# scatter -> the view it writes through (same arguments after ``src``)
_SCATTER_VIEWS = {
    aten.slice_scatter.default: aten.slice.Tensor,
    aten.select_scatter.default: aten.select.int,
    aten.diagonal_scatter.default: aten.diagonal.default,
}


def _fresh(node: fx.Node) -> bool:
    """``node`` holds memory of its own made inside the graph: no input, parameter or view of one."""
    return node.op == "call_function" and not returns_alias(node) and not getattr(
        getattr(node.target, "_schema", None), "is_mutable", False)


def _read_after(base: fx.Node, scatter: fx.Node, order: dict[fx.Node, int]) -> bool:
    """Whether anything reads ``base`` (directly or through a view of it) after ``scatter`` runs."""
    stack = [user for user in base.users if user is not scatter]
    seen: set[fx.Node] = set()
    while stack:
        user = stack.pop()
        if user in seen:
            continue
        seen.add(user)
        if user.op == "output" or order[user] > order[scatter]:
            return True
        if returns_alias(user):
            stack.extend(user.users)
    return False


def reinplace_scatters(graph_module: fx.GraphModule) -> fx.GraphModule:
    """Pass (see the module docstring): a copy of ``graph_module`` whose safe scatters write in place.

    >>> gm = reinplace_scatters(variant)  # doctest: +SKIP
    >>> sum(n.target is torch.ops.aten.slice_scatter.default for n in gm.graph.nodes)  # doctest: +SKIP
    0
    """
    out = copy_graph_module(graph_module)
    graph = out.graph
    changed = False
    for scatter in list(graph.nodes):
        view_op = _SCATTER_VIEWS.get(scatter.target) if scatter.op == "call_function" else None
        if view_op is None:
            continue
        base, src, *view_args = scatter.args
        if not (isinstance(base, fx.Node) and isinstance(src, fx.Node) and _fresh(base)):
            continue
        order = {node: i for i, node in enumerate(graph.nodes)}
        if _read_after(base, scatter, order):
            continue
        # ``copy(view_of_base, value)`` only shapes ``value`` like the view: copy_ does that itself.
        value = src
        if src.target is aten.copy.default and len(src.users) == 1:
            value = src.args[1]
        with graph.inserting_before(scatter):
            view = graph.call_function(view_op, (base, *view_args), dict(scatter.kwargs))
            write = graph.call_function(aten.copy_.default, (view, value))
        view.meta = {key: v for key, v in src.meta.items() if key != "val"}
        write.meta = dict(view.meta)
        scatter.replace_all_uses_with(base)
        graph.erase_node(scatter)
        changed = True
    if not changed:
        return graph_module
    eliminate_dead_code(graph)  # the functional copies (and their views) that fed the scatters
    graph.lint()
    out.recompile()
    return out
