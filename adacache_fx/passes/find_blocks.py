"""Find the repeated transformer blocks of a model.

A DiT keeps its blocks in one or more ``nn.ModuleList`` s of same-class modules (Flux: double and
single blocks; Latte: spatial and temporal blocks). Lists of that shape also occur inside blocks and
embedders (a text refiner, an attention's output projection), so only the shallowest candidate lists
are taken; deeper ones are reported as left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ..errors import NoBlocksFoundError


@dataclass(frozen=True)
class BlockList:
    """One ModuleList of transformer blocks: its path in the model and its blocks."""

    name: str
    blocks: tuple[nn.Module, ...]

    @property
    def block_class(self) -> str:
        return type(self.blocks[0]).__name__


@dataclass(frozen=True)
class BlockSearch:
    chosen: tuple[BlockList, ...]  # the main block lists (the shallowest)
    left_alone: tuple[tuple[str, str], ...]  # (path, reason)
    # Deeper block lists outside the main ones (text refiners, fusers): cached like them, numbered
    # after them so that policies' notions of "first", "middle" and "last" block stay the main lists'.
    auxiliary: tuple[BlockList, ...] = ()


def _has_attention(module: nn.Module) -> bool:
    for sub in module.modules():
        name = type(sub).__name__
        if "Attention" in name or "Attn" in name or isinstance(sub, nn.MultiheadAttention):
            return True
    return False


def _is_block_list(module: nn.Module) -> bool:
    if not isinstance(module, nn.ModuleList) or len(module) == 0:
        return False
    first = type(module[0])
    if not all(type(m) is first for m in module):
        return False
    if first.forward is nn.Module.forward:  # containers (a list of [attention, MLP] pairs) are not blocks
        return False
    return any(True for _ in module[0].children()) and _has_attention(module[0])


def _refuse_compiled_wrappers(model: nn.Module) -> None:
    """``model.blocks[i] = torch.compile(block)`` puts dynamo's ``OptimizedModule`` wrappers in the list:
    what they run is dynamo's compiled call, not a block a capture could read. Say so, and what works."""
    from torch._dynamo.eval_frame import OptimizedModule

    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and any(isinstance(m, OptimizedModule) for m in module):
            raise NoBlocksFoundError(
                f"{name!r} holds torch.compile'd modules (OptimizedModule wrappers, from "
                f"`{name}[i] = torch.compile({name}[i])`). Transform first and compile after "
                "(ax.compile(model), torch.compile(model)), or compile the blocks in place "
                "(block.compile(), diffusers' model.compile_repeated_blocks()), before or after transform"
            )


def find_block_lists(model: nn.Module, names: list[str] | None = None) -> BlockSearch:
    """Return the ModuleLists holding the model's transformer blocks.

    ``names`` overrides the search with explicit paths (``"transformer_blocks"``, ``"dit.blocks"``).
    """
    _refuse_compiled_wrappers(model)
    if names is not None:
        chosen = []
        for name in names:
            try:
                module = model.get_submodule(name)
            except AttributeError as exc:
                raise NoBlocksFoundError(
                    f"blocks={names!r}: the model has no submodule {name!r}"
                ) from exc
            if not isinstance(module, nn.ModuleList) or len(module) == 0:
                raise NoBlocksFoundError(
                    f"blocks={names!r}: {name!r} is a {type(module).__name__}, "
                    "expected a non-empty nn.ModuleList of transformer blocks"
                )
            containers = sorted({type(m).__name__ for m in module if type(m).forward is nn.Module.forward})
            if containers:
                raise NoBlocksFoundError(
                    f"blocks={names!r}: {name!r} holds {', '.join(containers)} containers, which have no forward "
                    "of their own to cache; name the list of blocks inside them"
                )
            chosen.append(BlockList(name, tuple(module)))
        return BlockSearch(tuple(chosen), ())

    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if name and _is_block_list(module)
    ]
    if not candidates:
        raise NoBlocksFoundError(
            f"{type(model).__name__} has no nn.ModuleList of repeated transformer blocks "
            "(same-class modules containing attention). Pass blocks=['path.to.blocks'] to "
            "adacache_fx.transform to name them."
        )
    # A candidate nested inside another candidate's block is a sub-structure of a block.
    top = [
        (name, module)
        for name, module in candidates
        if not any(name.startswith(other + ".") for other, _ in candidates if other != name)
    ]
    min_depth = min(name.count(".") for name, _ in top)
    chosen = tuple(
        BlockList(name, tuple(module)) for name, module in top if name.count(".") == min_depth
    )
    auxiliary = tuple(
        BlockList(name, tuple(module)) for name, module in top if name.count(".") != min_depth
    )
    left_alone = tuple(
        (name, "nested inside another block list")
        for name, module in candidates
        if (name, module) not in top
    )
    return BlockSearch(chosen, left_alone, auxiliary)
