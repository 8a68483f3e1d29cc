"""Blocks export cannot take, cached branch by branch: their attention and MLP children.

Some blocks cannot be captured as one graph: a non-tensor object among their inputs (a per-layer
KV-cache object), ``.numpy()`` inside them (MoE routing), code export rejects. Such a block keeps its
own eager forward, run on a :class:`BlockView` of the block in which each *branch child* (a direct
child module holding weights that is not a norm, an activation or an embedding: attention and MLP
modules) answers through the executor: on a compute step the child runs and its output is stored;
on a reuse step the stored output comes back without running it. Everything else the block does
(norms, modulation, gates, residual adds, and the offending op itself when it sits outside those
children) runs every step. What is reused is the child's output rather than a residual of the
stream, as in PAB and diffusers' hooks; with a policy that never reuses the block computes exactly
as the original.

The block's forward is called on the view, not through the block's ``__call__``, so a block with
hooks of its own (or a forward that needs ``super()``) cannot be run this way:
:func:`eager_plan` says why, and the block runs uncached.

    >>> import torch.nn as nn
    >>> block = nn.Module(); block.norm = nn.LayerNorm(8); block.attn = nn.Linear(8, 8)
    >>> branch_children(block)
    ('attn',)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import inspect
import math

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from ..kinds import CROSS_ATTENTION, MLP, SELF_ATTENTION, TEMPORAL_ATTENTION

# Children that are not branches: what they compute is cheap, or (modulation, also inside diffusers'
# norm classes) must follow the timestep every step.
_NOT_BRANCH_WORDS = ("Norm", "Dropout", "Embedding", "Identity", "Activation", "GELU", "SiLU", "ReLU",
                     "Rotary", "RoPE", "PosEmbed")


def _is_attention(module: nn.Module) -> bool:
    name = type(module).__name__
    return "Attention" in name or "Attn" in name or isinstance(module, nn.MultiheadAttention)


def _carries_stream(child: nn.Module) -> bool:
    """A child that is itself a block (a wrapper's inner block: HiDream's ``HiDreamBlock.block``): not
    an attention, but with an attention among its own children. Its output is the stream, not a
    branch; its own children are the branches."""
    return not _is_attention(child) and any(_is_attention(c) for c in child.children())


def branch_children(block: nn.Module, prefix: str = "") -> tuple[str, ...]:
    """Dotted names of ``block``'s branch children (see the module docstring), descending into
    children that carry the stream (:func:`_carries_stream`)."""
    names: list[str] = []
    for name, child in block.named_children():
        cls = type(child).__name__
        if any(word in cls for word in _NOT_BRANCH_WORDS) or isinstance(child, nn.ModuleList):
            continue
        if next(child.parameters(), None) is None or "modulation" in name.lower() or "adaln" in name.lower():
            continue  # (a modulation's projection of the time embedding must follow the timestep)
        if _carries_stream(child) and why_not_viewable(child) is None:
            names.extend(branch_children(child, f"{prefix}{name}."))
        else:
            names.append(prefix + name)
    return tuple(names)


def why_not_viewable(block: nn.Module) -> str | None:
    """Why ``block``'s forward cannot run on a :class:`BlockView`, or None when it can."""
    registry = getattr(block, "_diffusers_hook", None)
    if registry is not None and getattr(registry, "hooks", None):  # (they install an instance forward)
        hint = ("; enable group offloading after transform, where its hooks wrap the cached block"
                if "group_offloading" in registry.hooks else "")
        return f"diffusers hooks are registered on it ({', '.join(registry.hooks)}){hint}"
    if block._forward_hooks or block._forward_pre_hooks or "forward" in block.__dict__:
        return "it has forward hooks (or an instance forward) that a view of it would not run"
    forward = inspect.unwrap(type(block).forward)  # (decorated forwards: the function inside)
    code = getattr(forward, "__code__", None)
    if code is None:
        return "its forward is not a Python function"
    if "__class__" in code.co_freevars:
        return "its forward calls super(), which needs the block itself"
    return None


@dataclass(frozen=True)
class EagerRegion:
    """One branch child call of an eager block, as its first call measured it.

    ``spec`` and ``constants`` rebuild the child's output from its stored tensors on reuse
    (non-tensor leaves, such as ``None`` beside an attention output, are kept as they were)."""

    name: str  # the child's name, numbered when the forward calls it more than once (``attn_1``)
    child: str
    kind: str
    flops: int | None
    num_residuals: int
    spec: pytree.TreeSpec
    constants: tuple  # the output's leaves, with None where a tensor goes
    tags: frozenset[str] = field(default_factory=frozenset)
    token_flow: Any = None  # no graph to recompute a token subset with
    token_error: str = "its block could not be captured, so there is no graph to recompute a token subset with"
    residuals: tuple = ()

    def rebuild(self, tensors: tuple) -> Any:
        it = iter(tensors)
        leaves = [next(it) if c is None else c for c in self.constants]
        return pytree.tree_unflatten(leaves, self.spec)


@dataclass(frozen=True, eq=False)
class EagerBinding:
    """A block bound, at one input signature and epoch, to run eagerly with cached branch children."""

    path: str
    epoch: int
    depth: int
    children: tuple[str, ...]
    reason: str  # why the block was not captured whole
    regions: tuple[EagerRegion, ...] = ()
    branches: tuple = ()  # BranchInfo per region, once measured
    measured: bool = False

    def region_for(self, child: str, occurrence: int) -> int | None:
        name = child if occurrence == 0 else f"{child}_{occurrence}"
        return next((i for i, r in enumerate(self.regions) if r.name == name), None)


def kind_of(child_name: str, child: nn.Module, args: tuple, kwargs: dict, temporal: bool) -> str:
    """The branch kind of a child call: attention classes are self-, cross- or temporal attention (a
    second sequence among the call's tensors with another length: cross), everything else MLP."""
    cls = type(child).__name__
    if "Attention" not in cls and "Attn" not in cls and "attn" not in child_name.lower():
        return MLP
    tensors = [leaf for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor) and leaf.ndim == 3]
    lowered = child_name.lower()
    if "cross" in lowered or "attn2" in lowered or (
            len(tensors) >= 2 and tensors[1].shape[1] != tensors[0].shape[1]):
        return CROSS_ATTENTION
    return TEMPORAL_ATTENTION if temporal else SELF_ATTENTION


class ChildCall:
    """A branch child as a :class:`BlockView` hands it to the block's forward: calling it goes
    through ``run(name, child, args, kwargs)``; its attributes are the child's."""

    def __init__(self, run: Callable[[str, nn.Module, tuple, dict], Any], name: str, child: nn.Module) -> None:
        self.__dict__.update(_run=run, _name=name, _child=child)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(self._name, self._child, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_child"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.__dict__["_child"], name, value)


class BlockView:
    """``block`` as its forward sees it on an eager call: every attribute is the block's, but the
    branch children listed in ``calls``; attributes the forward sets land on the block."""

    def __init__(self, block: nn.Module, calls: dict[str, ChildCall]) -> None:
        object.__setattr__(self, "_block", block)
        object.__setattr__(self, "_calls", calls)

    def __getattr__(self, name: str) -> Any:
        calls = object.__getattribute__(self, "_calls")
        if name in calls:
            return calls[name]
        return getattr(object.__getattribute__(self, "_block"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(object.__getattribute__(self, "_block"), name, value)


class CarrierCall(ChildCall):
    """A child that carries the stream: calling it runs its own forward on a view of it, whose
    branch children go through ``run`` in turn."""

    def __init__(self, run: Callable, child: nn.Module, children: dict) -> None:
        super().__init__(run, "", child)
        self.__dict__["_children"] = children

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return type(self._child).forward(_view(self._child, self._children, self._run), *args, **kwargs)


def _view(module: nn.Module, children: dict, run: Callable) -> BlockView:
    """``children``: name -> full dotted name (a branch) or a dict of its own (a carrier)."""
    calls = {}
    for name, inner in children.items():
        child = getattr(module, name)
        calls[name] = CarrierCall(run, child, inner) if isinstance(inner, dict) else ChildCall(run, inner, child)
    return BlockView(module, calls)


def run_on_view(block: nn.Module, children: tuple[str, ...], run: Callable, args: tuple, kwargs: dict) -> Any:
    """``block``'s forward on a view whose branch ``children`` (dotted names) call
    ``run(name, child, args, kwargs)``."""
    tree: dict = {}
    for dotted in children:
        *parents, leaf = dotted.split(".")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = dotted
    return type(block).forward(_view(block, tree, run), *args, **kwargs)


class ProjectionFlops:
    """FLOPs of the linear and convolution layers a block runs while the context is open, in total and
    by branch child (``flops[child]``), counted with forward hooks removed on exit.

    Attention's score and value products are not counted (projections only). No dispatch mode is
    used: an eager ``flex_attention`` fails under one (and leaves the process unable to run it).

        >>> block = nn.Sequential(nn.Linear(4, 8))
        >>> with ProjectionFlops(block, ("0",)) as counter:
        ...     _ = block(torch.zeros(3, 4))
        >>> counter.total, counter.flops
        (192, {'0': 192})
    """

    def __init__(self, block: nn.Module, children: tuple[str, ...]) -> None:
        self.block, self.children = block, children
        self.total = 0
        self.flops: dict[str, int] = {}
        self._handles: list = []

    def __enter__(self) -> "ProjectionFlops":
        owner = {}
        for name in self.children:
            for module in self.block.get_submodule(name).modules():
                owner[id(module)] = name
        for module in self.block.modules():
            if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
                self._handles.append(module.register_forward_hook(self._hook(owner.get(id(module)))))
        return self

    def _hook(self, child: str | None) -> Callable:
        def count(module: nn.Module, args: tuple, output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                return
            if isinstance(module, nn.Linear):
                flops = 2 * (output.numel() // module.out_features) * module.in_features * module.out_features
            else:
                flops = 2 * output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
            self.total += flops
            if child is not None:
                self.flops[child] = self.flops.get(child, 0) + flops
        return count

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
