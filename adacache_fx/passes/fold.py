"""Which block input each output of a fully reused block carries on: what folding needs.

When every branch of a block is reused, its graph (the all-``REUSE`` variant) is, for nearly every
DiT, just ``output_j = stream_input + cached residuals``, through casts, views and, for blocks that
join two streams (Flux's single blocks), a ``cat`` of the streams sliced back apart. A span of such
blocks, each taking the last one's outputs, then adds to each stream exactly what the stream gained
over the span at the step that computed it: ``stream_out - stream_in``. The runtime stores that one
tensor per stream instead of three per block, and on a reuse step the span's blocks pass their
inputs through and the last adds it once (see ``runtime/executor.py``).

:func:`fold_map` proves the form from the graph and returns, per user output, the call input it
carries; None when any output takes any other operation (a norm on the stream, HunyuanDiT's long
skip ``linear(cat(x, skip))``): such a block is never folded.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from .residuals import op_name

# Operations that carry a value unchanged (up to dtype and shape) on a stream.
_CARRY = {"to", "_to_copy", "type_as", "view", "reshape", "_unsafe_view", "clone", "alias", "contiguous",
          "detach", "squeeze", "unsqueeze", "flatten", "unflatten"}
_INT_MAX = 2**62


def _is_cache(node: fx.Node, caches: set[fx.Node]) -> bool:
    """Whether ``node`` is a cache input, or carried from one."""
    while True:
        if node in caches:
            return True
        if op_name(node) not in _CARRY or not node.args or not isinstance(node.args[0], fx.Node):
            return False
        node = node.args[0]


def _carried_input(node: fx.Node, users: dict[fx.Node, int], caches: set[fx.Node]) -> int | None:
    """The call input (user leaf index) the value ``node`` carries, plus cached residuals; None if
    anything else shapes it."""
    window: tuple[int, int, int] | None = None  # (dim, start, end) of a slice waiting for its cat
    while True:
        if node in users:
            return users[node] if window is None else None
        name = op_name(node)
        if name == "add" and len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args):
            left, right = node.args
            if _is_cache(right, caches) and not _is_cache(left, caches):
                node = left
            elif _is_cache(left, caches) and not _is_cache(right, caches):
                node = right
            else:
                return None
        elif name in _CARRY and node.args and isinstance(node.args[0], fx.Node):
            node = node.args[0]
        elif name == "slice" and window is None and isinstance(node.args[0], fx.Node):
            args = list(node.args) + [0, None, None][len(node.args) - 1:]
            dim, start, end = args[1], args[2] or 0, args[3]
            window = (dim, start, _INT_MAX if end is None else end)
            node = node.args[0]
        elif name in ("cat", "concat") and window is not None:
            parts = node.args[0]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            ndim = len(parts[0].meta["val"].shape)
            if dim % ndim != window[0] % ndim:
                return None
            offset, chosen = 0, None
            for part in parts:
                size = int(part.meta["val"].shape[dim])
                if window[1] == offset and window[2] >= offset + size and (
                        window[2] == offset + size or part is parts[-1]):
                    chosen = part
                offset += size
            if chosen is None:
                return None
            node, window = chosen, None
        elif node.target is operator.getitem:
            return None
        else:
            return None


def fold_map(reused: fx.GraphModule, user_placeholders: dict[str, int], num_user_outputs: int) -> tuple[int, ...] | None:
    """Per user output of the all-``REUSE`` graph ``reused``, the user leaf index it carries, or
    None (see the module docstring). ``user_placeholders``: placeholder name -> user leaf index;
    every other placeholder whose name starts with ``cache_`` is a cached residual."""
    graph = reused.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    users = {n: user_placeholders[n.name] for n in placeholders if n.name in user_placeholders}
    caches = {n for n in placeholders if n.name.startswith("cache_") and n not in users}
    output = next(n for n in graph.nodes if n.op == "output")
    values = list(output.args[0])[:num_user_outputs]
    carried = []
    for value in values:
        if not isinstance(value, fx.Node):
            return None
        leaf = _carried_input(value, users, caches)
        if leaf is None:
            return None
        carried.append(leaf)
    if len(set(carried)) != len(carried):
        return None  # two outputs from one input: not a stream each
    return tuple(carried)
