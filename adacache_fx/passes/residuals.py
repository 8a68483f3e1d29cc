"""Find the residual branches of a captured block graph and group them into cacheable regions.

A block updates one or more *streams* (``hidden_states``; the text stream of joint blocks) with
residual adds ``x = x + branch``. Walking back from the block's outputs along each stream, every
``add`` with one operand on the stream (it reaches a block input through casts, views, slices, cats
and earlier adds) and one that does not is a residual add; the other operand is the *branch value*,
the whole residual including the gate. Modulation (``x * (1 + scale) + shift``) is never on that
path, so it is never taken for a residual.

A *region* is the set of operations that exist only to produce some branch values: everything
upstream of them that depends on the stream, plus what only they use (a cross-attention's key/value
projections of the text). Residuals whose stream-dependent operations overlap (one joint attention
feeding two streams) form one region and are computed or reused together. Operations whose values are
needed outside their region are left out of it, so that dropping a reused region is always exact.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .capture import CapturedGraph

# Ops that carry the stream unchanged in value (up to dtype, layout, or a slice of it).
_PASSTHROUGH = {
    "_to_copy", "to", "type_as", "clone", "contiguous", "view", "reshape", "_unsafe_view", "alias",
    "detach", "clamp", "clip", "clamp_min", "clamp_max", "squeeze", "unsqueeze", "slice", "narrow",
    "flatten", "unflatten", "permute", "transpose", "t", "expand", "split", "split_with_sizes",
    "chunk", "unbind", "select", "dropout", "identity",
}
_CAT = {"cat", "concat", "concatenate"}
_ADD = {"add"}
_SCALE = {"mul", "div"}  # on the stream by a factor independent of it: carries the stream (see scaled_stream)
# Ops that make a branch worth caching.
_COMPUTE = {
    "linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "einsum", "conv1d", "conv2d", "conv3d",
    "convolution", "scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_cudnn_attention",
}
_SDPA = {n for n in _COMPUTE if "attention" in n}
_LINEAR = {"linear", "addmm", "mm", "matmul", "conv1d", "conv2d", "conv3d", "convolution"}



def op_name(node: fx.Node) -> str:
    if node.op != "call_function":
        return ""
    if node.target is operator.getitem:
        return "getitem"
    packet = getattr(node.target, "overloadpacket", None)
    if packet is not None:
        return packet.__name__
    return getattr(node.target, "__name__", str(node.target))


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    out = []
    for arg in node.args:
        if isinstance(arg, fx.Node):
            out.append(arg)
        elif isinstance(arg, (list, tuple)):
            out.extend(a for a in arg if isinstance(a, fx.Node))
    return out


@dataclass(frozen=True)
class Residual:
    add_node: str  # name of the residual add
    branch_index: int  # which operand of the add is the branch value (0 or 1)
    branch_node: str  # name of the branch value


@dataclass(frozen=True)
class Region:
    """A cacheable residual region of one block graph (frozen: passes derive new ones)."""

    name: str
    kind: str
    residuals: tuple[Residual, ...]
    nodes: frozenset[str]
    modules: tuple[str, ...]  # top-level child modules of the block that the region runs
    tags: frozenset[str] = field(default_factory=frozenset)
    flops: int | None = None
    # Set by the token pass (passes/tokens.py): how to recompute the region for a token subset,
    # or why that is not valid for it.
    token_flow: Any = None
    token_error: str | None = None

    @property
    def num_residuals(self) -> int:
        return len(self.residuals)


@dataclass(frozen=True)
class BlockAnalysis:
    regions: tuple[Region, ...]
    stream_inputs: tuple[str, ...]
    notes: tuple[str, ...]


class _Graph:
    """Cached reachability queries over one FX graph."""

    def __init__(self, captured: CapturedGraph) -> None:
        self.graph = captured.graph_module.graph
        self.nodes = list(self.graph.nodes)
        self.user_inputs = captured.stream_candidates()
        self._reaches: dict[fx.Node, bool] = {}
        self._index: dict[fx.Node, int] | None = None
        self._scaled: dict[fx.Node, fx.Node | None] = {}

    def reaches_input(self, node: fx.Node) -> bool:
        """Does ``node`` carry a block input through stream-preserving ops only?"""
        stack = [node]
        order = []
        while stack:  # iterative DFS: graphs can be thousands of nodes deep
            n = stack.pop()
            if n in self._reaches or n in order:
                continue
            order.append(n)
            stack.extend(self._stream_parents(n))
        for n in reversed(order):
            self._reaches[n] = self._reaches_one(n)
        return self._reaches[node]

    def scaled_stream(self, node: fx.Node) -> fx.Node | None:
        """For ``stream * s`` (or ``/ s``) where ``s`` is a number or a tensor that does not depend on the
        stream (a FiLM scale from the time embedding, a constant): the stream operand. Such an op
        carries the stream on; its branches upstream are still branches."""
        if node not in self._scaled:
            self._scaled[node] = self._find_scaled_stream(node)
        return self._scaled[node]

    def _find_scaled_stream(self, node: fx.Node) -> fx.Node | None:
        if op_name(node) not in _SCALE or len(node.args) < 2:
            return None
        a, b = node.args[0], node.args[1]
        if isinstance(a, fx.Node) and not isinstance(b, fx.Node):
            return a
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            return None
        candidates = [(a, b)] + ([(b, a)] if op_name(node) == "mul" else [])
        shape = _shape(node)
        for stream, scale in candidates:
            # The stream has the result's shape; its factor is broadcast over the tokens (a per-sample
            # scale, a constant): never two full-size tensors, where which is the stream is unclear.
            if shape is None or _shape(stream) != shape or _numel(scale) is None or _numel(scale) >= _numel(node):
                continue
            # The factor may not depend on the stream, nor on the inputs the stream comes from: in
            # ``x + attn_out * gate`` the gate (from the time embedding) is no stream scaled by attn_out.
            if (self.reaches_input(stream) and not self.reaches_input(scale)
                    and not any(self.depends_on(scale, root) for root in (stream, *self.roots(stream)))):
                return stream
        return None

    def roots(self, node: fx.Node) -> set[fx.Node]:
        """The block inputs ``node`` carries through stream-preserving ops."""
        out, stack, seen = set(), [node], set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.op == "placeholder":
                if n in self.user_inputs:
                    out.add(n)
                continue
            stack.extend(p for p in self._stream_parents(n) if self.reaches_input(p))
        return out

    def depends_on(self, node: fx.Node, ancestor: fx.Node) -> bool:
        if self._index is None:
            self._index = {n: i for i, n in enumerate(self.nodes)}
        return _depends_on(node, ancestor, self._index)

    def _stream_parents(self, node: fx.Node) -> list[fx.Node]:
        name = op_name(node)
        if name in _SCALE:
            scaled = self.scaled_stream(node)
            return [scaled] if scaled is not None else []
        if name == "getitem" or name in _PASSTHROUGH:
            return [node.args[0]] if isinstance(node.args[0], fx.Node) else []
        if name in _CAT or name in _ADD:
            return _tensor_args(node)
        return []

    def _reaches_one(self, node: fx.Node) -> bool:
        if node.op == "placeholder":
            return node in self.user_inputs
        parents = self._stream_parents(node)
        return any(self._reaches.get(p, False) for p in parents)


def _shape(node: fx.Node) -> tuple | None:
    value = node.meta.get("val")
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _numel(node: fx.Node) -> int | None:
    shape = _shape(node)
    return None if shape is None else math.prod(shape)


def _depends_on(node: fx.Node, ancestor: fx.Node, index: dict[fx.Node, int]) -> bool:
    """Is ``ancestor`` upstream of ``node``? (DFS pruned by topological position.)"""
    limit = index[ancestor]
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n is ancestor:
            return True
        if n in seen or index[n] < limit:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def _walk_streams(g: _Graph) -> tuple[list[Residual], set[fx.Node], set[fx.Node]]:
    """Walk back from the outputs along the streams; return residual adds, stream nodes, inputs.

    At ``add(a, b)`` the stream operand is the one that carries a block input through
    stream-preserving ops; failing that (a stream that starts after a projection, e.g. a long-skip
    fusion), the operand the other one is computed from: ``y = s + f(s)``.
    """
    output = next(n for n in reversed(g.nodes) if n.op == "output")
    residuals: list[Residual] = []
    stream_nodes: set[fx.Node] = set()
    stream_inputs: set[fx.Node] = set()
    stack = list(_tensor_args(output))
    while stack:
        node = stack.pop()
        if node in stream_nodes:
            continue
        stream_nodes.add(node)
        if node.op == "placeholder":
            if node in g.user_inputs:
                stream_inputs.add(node)
            continue
        name = op_name(node)
        if name in _ADD and len(node.args) >= 2 and all(isinstance(a, fx.Node) for a in node.args[:2]):
            a, b = node.args[0], node.args[1]
            ra, rb = g.reaches_input(a), g.reaches_input(b)
            if ra and not rb:
                residuals.append(Residual(node.name, 1, b.name))
                stack.append(a)
            elif rb and not ra:
                residuals.append(Residual(node.name, 0, a.name))
                stack.append(b)
            elif ra and rb:  # two streams merging, not a residual
                stack.extend([a, b])
            elif g.depends_on(b, a):
                residuals.append(Residual(node.name, 1, b.name))
                stack.append(a)
            elif g.depends_on(a, b):
                residuals.append(Residual(node.name, 0, a.name))
                stack.append(b)
            continue
        if name == "getitem" or name in _PASSTHROUGH or name in _CAT or (
                name in _SCALE and g.scaled_stream(node) is not None):
            stack.extend(g._stream_parents(node))
        elif not g.reaches_input(node):
            # The stream starts here (a projection or norm of the inputs): a stream origin.
            stream_inputs.add(node)
    return residuals, stream_nodes, stream_inputs


def _stream_sources(g: _Graph, stream_inputs: set[fx.Node]) -> dict[fx.Node, frozenset[fx.Node]]:
    """For each node, the stream inputs it depends on."""
    sources: dict[fx.Node, frozenset[fx.Node]] = {}
    empty: frozenset[fx.Node] = frozenset()
    for node in g.nodes:
        if node in stream_inputs:
            sources[node] = frozenset([node])
            continue
        acc = empty
        for parent in node.all_input_nodes:
            acc = acc | sources.get(parent, empty)
        sources[node] = acc
    return sources


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path, _cls = list(stack.values())[-1]
    return path


def _module_classes(node: fx.Node) -> list[tuple[str, str]]:
    stack = node.meta.get("nn_module_stack") or {}
    return [(path, cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls)))
            for path, cls in stack.values()]


def _top_child(path: str) -> str:
    # Export paths may carry the block-level prefix; keep the first component below the block.
    return path.split(".")[0] if path else ""


def _is_attention_class(cls: str) -> bool:
    short = cls.rsplit(".", 1)[-1]
    return "Attention" in short or "Attn" in short


def analyse_block(
    captured: CapturedGraph,
    node_flops: dict[str, int] | None = None,
    temporal: bool = False,
) -> BlockAnalysis:
    """Find and label the residual regions of one captured block graph."""
    g = _Graph(captured)
    notes: list[str] = []
    residuals, stream_nodes, stream_inputs = _walk_streams(g)
    by_name = {n.name: n for n in g.nodes}
    if not residuals:
        return BlockAnalysis((), tuple(sorted(n.name for n in stream_inputs)), ("no residual adds found",))

    sources = _stream_sources(g, stream_inputs)
    stream_dependent = {n for n, s in sources.items() if s}

    # Stream-dependent cone of each branch value, stopping at stream nodes.
    cones: list[set[fx.Node]] = []
    for res in residuals:
        cone: set[fx.Node] = set()
        stack = [by_name[res.branch_node]]
        while stack:
            node = stack.pop()
            if node in cone or node in stream_nodes or node not in stream_dependent:
                continue
            cone.add(node)
            stack.extend(node.all_input_nodes)
        cones.append(cone)

    # Residuals whose cones overlap share computation: one region.
    parent = list(range(len(residuals)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[fx.Node, int] = {}
    for i, cone in enumerate(cones):
        for node in cone:
            if node in owner:
                parent[find(i)] = find(owner[node])
            else:
                owner[node] = i
    groups: dict[int, list[int]] = {}
    for i in range(len(residuals)):
        groups.setdefault(find(i), []).append(i)

    regions: list[Region] = []
    for members in sorted(groups.values(), key=lambda m: min(g.nodes.index(by_name[residuals[i].add_node]) for i in m)):
        region_residuals = [residuals[i] for i in members]
        nodes: set[fx.Node] = set().union(*(cones[i] for i in members))
        own_adds = {by_name[r.add_node] for r in region_residuals}
        # Grow by operations that only this region uses (text K/V projections, ...).
        for node in reversed(g.nodes):
            if node in nodes or node.op != "call_function" or not node.users:
                continue
            if all(u in nodes for u in node.users):
                nodes.add(node)
        # Drop operations whose values escape the region (and what feeds them).
        escaping = [
            n for n in nodes
            if any(u not in nodes and u not in own_adds for u in n.users)
        ]
        if escaping:
            keep_out: set[fx.Node] = set()
            stack = list(escaping)
            while stack:
                node = stack.pop()
                if node in keep_out or node not in nodes:
                    continue
                keep_out.add(node)
                stack.extend(node.all_input_nodes)
            nodes -= keep_out
            notes.append(
                f"{len(keep_out)} operations feeding {', '.join(sorted(n.name for n in escaping))} "
                "are also used outside their branch and always run"
            )
        branch_values = [by_name[r.branch_node] for r in region_residuals]
        if any(b not in nodes for b in branch_values):
            notes.append(f"branch {[r.branch_node for r in region_residuals]} is used elsewhere; left uncached")
            continue
        if not any(op_name(n) in _COMPUTE for n in nodes):
            notes.append(f"residual add(s) {[r.add_node for r in region_residuals]} carry no matmul; left uncached")
            continue
        regions.append(
            _label_region(region_residuals, nodes, sources, by_name, node_flops, temporal)
        )

    return BlockAnalysis(_unique_names(regions), tuple(sorted(n.name for n in stream_inputs)), tuple(notes))


def _label_region(
    region_residuals: list[Residual],
    nodes: set[fx.Node],
    sources: dict[fx.Node, frozenset[fx.Node]],
    by_name: dict[str, fx.Node],
    node_flops: dict[str, int] | None,
    temporal: bool,
) -> Region:
    """Name and classify a region from its modules and from which streams feed its attention."""
    children_flops: dict[str, int] = {}
    attention_children: dict[str, list[fx.Node]] = {}
    for node in nodes:
        child = _top_child(_module_path(node))
        children_flops[child] = children_flops.get(child, 0) + (node_flops or {}).get(node.name, 0)
        for path, cls in _module_classes(node)[1:]:
            if _is_attention_class(cls):
                attention_children.setdefault(_top_child(path), []).append(node)
                break

    # Streams the region writes to: a joint branch updates two (or one concatenated from two).
    updated: set[fx.Node] = set()
    for res in region_residuals:
        add = by_name[res.add_node]
        updated |= sources.get(add.args[1 - res.branch_index], frozenset())

    kinds: list[str] = []
    for child in sorted(attention_children):
        streams: set[fx.Node] = set()
        reads_external = False
        key_sources: list[frozenset[fx.Node]] = []
        for node in attention_children[child]:
            if op_name(node) in _LINEAR and node.args and isinstance(node.args[0], fx.Node):
                src = sources.get(node.args[0], frozenset())
                streams |= src
                reads_external |= not src
            elif op_name(node) in _SDPA and len(node.args) > 1 and isinstance(node.args[1], fx.Node):
                key_sources.append(sources.get(node.args[1], frozenset()))
        # Keys from outside the streams only: cross-attention. Keys mixing the stream with an
        # external sequence (a context_pre_only joint block): joint.
        keys_external_only = bool(key_sources) and not any(key_sources)
        if len(streams) >= 2 or len(updated) >= 2:
            kinds.append("joint_attention")
        elif reads_external and streams and key_sources and not keys_external_only:
            kinds.append("joint_attention")
        elif reads_external and streams:
            kinds.append("cross_attention")
        elif temporal:
            kinds.append("temporal_attention")
        else:
            kinds.append("self_attention")

    tags = set(kinds)
    # An MLP is a projection of the stream outside the attention modules (the modulation's
    # projection of the time embedding, absorbed as an exclusive input, is not one).
    if any(
        op_name(n) in _COMPUTE and sources.get(n) and _top_child(_module_path(n)) not in attention_children
        for n in nodes
    ):
        tags.add("mlp")
    if kinds:
        kind, name = kinds[0], "+".join(sorted(attention_children))
    else:
        kind = "mlp"
        ranked = [c for c, _ in sorted(children_flops.items(), key=lambda kv: -kv[1]) if c]
        name = ranked[0] if ranked else "mlp"
    return Region(
        name=name or kind,
        kind=kind,
        residuals=tuple(region_residuals),
        nodes=frozenset(n.name for n in nodes),
        modules=tuple(sorted(c for c in children_flops if c)),
        tags=frozenset(tags),
        flops=sum(node_flops.get(n.name, 0) for n in nodes) if node_flops is not None else None,
    )


def _unique_names(regions: list[Region]) -> tuple[Region, ...]:
    """The regions with repeated names numbered (``ff``, ``ff_1``); names stay descriptive (they
    may hold ``+``), and code that makes identifiers of them sanitises them (:func:`identifier`)."""
    seen: dict[str, int] = {}
    out = []
    for region in regions:
        count = seen.get(region.name, 0)
        seen[region.name] = count + 1
        out.append(dataclasses.replace(region, name=f"{region.name}_{count}") if count else region)
    return tuple(out)


def identifier(name: str) -> str:
    """A valid Python identifier (and ONNX name) made from a region or branch name:
    ``identifier("attn+attn2") == "attn_attn2"``."""
    text = re.sub(r"\W", "_", name)
    return text if text and not text[0].isdigit() else f"_{text}"
