"""The model's code outside its blocks, compiled beside the block graphs.

``ax.compile(model)`` (``scope="blocks"``) compiles every plan-variant block graph, and the model's
own ``forward`` stays eager: its loop over the blocks hands each block to the runtime, and dynamo
cannot resume a graph inside a loop it broke. Embedders, positional encodings and the output head
are most of a reuse step once the blocks are folded, so they are compiled too, module by module:
every module of the model outside its block lists that is more than one ``torch.nn`` layer (a
layer alone has nothing to fuse) gets ``nn.Module.compile`` with the same options, as dynamo
does to the modules a model's forward calls when it falls back on a graph break in its block loop
(what ``torch.compile(model)`` gives the peers' hooked models).

The modules are compiled in place (``nn.Module.compile``; ones the user compiled are left alone),
never as CUDA graphs (see :func:`without_cuda_graphs`), and :meth:`CompiledOutside.undo` takes it
back (``ax.restore``). Dynamo's guards follow changes to
them (an adapter added, weights quantized) as for any compiled module.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch.nn as nn


def outside_modules(model: nn.Module, blocks: Iterable[nn.Module]) -> list[tuple[str, nn.Module]]:
    """The modules of ``model`` to compile beside its ``blocks``: the largest ones holding no block,
    but containers (no forward of their own) and single ``torch.nn`` layers.

    >>> [name for name, _ in outside_modules(wan, wan.blocks)]  # doctest: +SKIP
    ['rope', 'condition_embedder', 'norm_out']
    """
    block_ids = {id(block) for block in blocks}
    holds_block: dict[int, bool] = {}

    def holds(module: nn.Module) -> bool:
        known = holds_block.get(id(module))
        if known is None:
            known = holds_block[id(module)] = id(module) in block_ids or any(
                holds(child) for child in module.children())
        return known

    found: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if id(child) in block_ids:
                continue
            if holds(child) or isinstance(child, (nn.ModuleList, nn.ModuleDict, nn.Sequential)) and not _callable(child):
                visit(f"{path}.", child)
            elif next(child.children(), None) is not None or not type(child).__module__.startswith("torch.nn."):
                found.append((path, child))

    visit("", model)
    return found


def _callable(container: nn.Module) -> bool:
    """Only ``nn.Sequential`` of the containers is called as a whole."""
    return isinstance(container, nn.Sequential)


def without_cuda_graphs(options: dict[str, Any]) -> dict[str, Any]:
    """``torch.compile`` options without CUDA graphs. The modules outside the blocks make what the
    blocks take, and the runtime holds some of that across steps (a step-invariance check compares a
    list's inputs with the last step's); a CUDA graph writes its next run's outputs over its last.

    >>> without_cuda_graphs({"backend": "inductor", "mode": "reduce-overhead"})
    {'backend': 'inductor', 'mode': None}
    """
    out = dict(options)
    if out.get("mode") == "reduce-overhead":
        out["mode"] = None
    elif out.get("mode") == "max-autotune":
        out["mode"] = "max-autotune-no-cudagraphs"
    inductor = out.get("options")
    if inductor and inductor.get("triton.cudagraphs"):
        out["options"] = {**inductor, "triton.cudagraphs": False}
    return out


class CompiledOutside:
    """Modules outside the blocks, each compiled in place (see the module docstring)."""

    def __init__(self, model: nn.Module, blocks: Iterable[nn.Module], options: dict[str, Any]) -> None:
        options = without_cuda_graphs({key: value for key, value in options.items() if key != "fullgraph"})
        self.modules: list[tuple[str, nn.Module, Any]] = []
        for path, module in outside_modules(model, blocks):
            if getattr(module, "_compiled_call_impl", None) is not None:
                continue  # compiled by the user: theirs
            module.compile(**options)
            self.modules.append((path, module, module._compiled_call_impl))

    @property
    def paths(self) -> list[str]:
        return [path for path, _, _ in self.modules]

    def undo(self) -> None:
        for _, module, compiled in self.modules:
            if module._compiled_call_impl is compiled:
                module._compiled_call_impl = None
        self.modules = []
