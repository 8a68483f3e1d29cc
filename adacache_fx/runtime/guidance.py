"""Conditional-half calls of batched classifier-free guidance (:attr:`Plan.skip_uncond`).

A pipeline that batches guidance calls the model on ``2B`` rows: the uncond and cond halves in the
order :meth:`Policy.guidance_layout` names. On a step whose plan skips the uncond half, the runtime
calls the model on the cond rows of every batched input, blocks read and update the cond rows of
their caches, and the policy rebuilds the uncond half of the output. Row slicing works on every
tensor whose first axis is the batch (``2B``) or a batch-major flattening of it (``2B * T`` rows
of a Latte spatial block, ``2B * S`` of a temporal one): the cond samples are one contiguous half.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree

from ..errors import PolicyError


def call_batch(args: tuple, kwargs: dict) -> int | None:
    """The batch size of a model call: the first axis of ``hidden_states`` (or the first tensor argument)."""
    hidden = kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        hidden = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if hidden is None or hidden.ndim == 0:
        return None
    return int(hidden.shape[0])


def cond_half(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """The cond rows of a tensor whose first axis holds the uncond and cond halves."""
    half = tensor.shape[0] // 2
    return tensor[half:] if layout == "uncond_first" else tensor[:half]


def uncond_half(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    half = tensor.shape[0] // 2
    return tensor[:half] if layout == "uncond_first" else tensor[half:]


def join_halves(cond: torch.Tensor, uncond: torch.Tensor, layout: str) -> torch.Tensor:
    return torch.cat([uncond, cond] if layout == "uncond_first" else [cond, uncond])


def halve_call(args: tuple, kwargs: dict, batch: int, layout: str, policy_name: str) -> tuple[tuple, dict]:
    """The call's inputs with every batched tensor (first axis ``batch``) cut to its cond rows."""
    if batch < 2 or batch % 2:
        raise PolicyError(
            f"{policy_name} plans to skip the unconditional half of a guidance call, but this call has "
            f"batch {batch}, which is not a cond+uncond pair: run guidance as one batched call "
            "(cond and uncond concatenated), or turn the policy's CFG-Cache off"
        )

    def cut(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor) and leaf.ndim > 0 and leaf.shape[0] == batch:
            return cond_half(leaf, layout)
        return leaf

    return pytree.tree_map(cut, (args, kwargs))


def rows_view(values: tuple[torch.Tensor, ...], layout: str) -> tuple[torch.Tensor, ...]:
    """Cached residuals of a full guidance call seen through their cond rows (views, no copies)."""
    return tuple(cond_half(v, layout) for v in values)


def merge_rows(full: tuple[torch.Tensor, ...], cond: tuple[torch.Tensor, ...], layout: str) -> tuple[torch.Tensor, ...]:
    """``full`` with its cond rows replaced by ``cond`` (uncond rows kept as they were)."""
    return tuple(join_halves(c, uncond_half(f, layout), layout) for f, c in zip(full, cond))
