"""Adapter weights rewritten in place, which no guard sees: a fingerprint per model call.

PEFT's hot swap (``hotswap_adapter_from_state_dict``, which diffusers' ``load_lora_adapter(...,
hotswap=True)`` calls) copies an adapter's new weights into its tensors through ``.data``: no version
counter moves, and at an unchanged scale nothing else does either, so residuals cached before the swap
would be added with the old adapter's effect in them. Each session therefore keeps the norm (in
float32) of every adapter tensor of the cached blocks as it was at the end of its last call, and before
a call that holds caches compares them with the norms now: a change drops the session's caches, so
that call computes, with the new weights (the graphs read weights live: nothing is captured again).

Cost: on models with PEFT adapters, one ``torch._foreach_norm`` over the adapter tensors per call (one
fused kernel on a GPU) and, when the call holds caches, one comparison the host waits for. Models
without adapters pay a tuple of block epochs per call. A swap to tensors of exactly the same norms
(element for element a permutation of the old ones) is not seen.

    >>> import torch.nn as nn
    >>> from peft import LoraConfig, inject_adapter_in_model
    >>> block = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"]), nn.Sequential(nn.Linear(4, 4)))
    >>> found = AdapterWeights.of([("blocks.0", block)])
    >>> len(found.names), found.names[0]
    (2, ('blocks.0', 'blocks.0.0.lora_A.default.weight'))
    >>> norms = found.norms()
    >>> found.changed(norms)
    []
    >>> with torch.no_grad():
    ...     block[0].lora_B["default"].weight.data.copy_(torch.ones(4, 2))  # a hot swap's copy
    tensor(...)
    >>> found.changed(norms)
    [('blocks.0', 'blocks.0.0.lora_B.default.weight')]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn


def _adapter_tensors(prefix: str, block: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The tensors of every PEFT tuner layer's adapter containers under ``block`` (``lora_A``,
    ``lora_B``, ``lora_embedding_*``, DoRA's magnitudes: what a layer's ``adapter_layer_names`` lists),
    and its scales where they are tensors (``prepare_model_for_compiled_hotswap`` makes them so, and a
    hot swap then fills them in place)."""
    found: list[tuple[str, torch.Tensor]] = []
    for path, module in block.named_modules(prefix=prefix):
        layer = type(module)
        for container_name in getattr(layer, "adapter_layer_names", ()):
            container = module._modules.get(container_name)
            if container is not None:
                found += container.named_parameters(prefix=f"{path}.{container_name}")
        for other in getattr(layer, "other_param_names", ()):
            values = module.__dict__.get(other)
            if isinstance(values, dict):
                found += [(f"{path}.{other}[{key!r}]", value) for key, value in values.items()
                          if isinstance(value, torch.Tensor) and value.is_floating_point()]
    return found


@dataclass(frozen=True, eq=False)
class AdapterWeights:
    """The adapter tensors of a model's cached blocks, grouped by device (one fused norm per group)."""

    names: tuple[tuple[str, str], ...]  # (block, tensor name), in the order of the groups' tensors, joined
    groups: tuple[tuple[torch.Tensor, ...], ...]

    @classmethod
    def of(cls, blocks: Iterable[tuple[str, nn.Module]]) -> "AdapterWeights":
        """The adapter tensors of ``blocks``: (path, block) pairs."""
        by_device: dict[torch.device, list[tuple[tuple[str, str], torch.Tensor]]] = {}
        for path, block in blocks:
            for name, tensor in _adapter_tensors(path, block):
                by_device.setdefault(tensor.device, []).append(((path, name), tensor))
        groups = list(by_device.values())
        return cls(tuple(name for group in groups for name, _ in group),
                   tuple(tuple(tensor for _, tensor in group) for group in groups))

    def __bool__(self) -> bool:
        return bool(self.names)

    def norms(self) -> tuple[torch.Tensor, ...]:
        """Per device group, the float32 norm of each tensor (computed asynchronously on a GPU)."""
        with torch.no_grad():
            return tuple(torch.stack(torch._foreach_norm(group, 2, dtype=torch.float32)) for group in self.groups)

    def changed(self, before: tuple[torch.Tensor, ...],
                now: tuple[torch.Tensor, ...] | None = None) -> list[tuple[str, str]]:
        """(block, tensor name) of each tensor whose norm differs from ``before`` (a host wait per device)."""
        now = self.norms() if now is None else now
        names, start, out = self.names, 0, []
        for old, new in zip(before, now):
            old, new = old.view(torch.int32), new.view(torch.int32)  # bits: a NaN norm equals itself
            if not torch.equal(old, new):
                out += [names[start + int(i)] for i in torch.nonzero(old != new).flatten().tolist()]
            start += old.numel()
        return out
