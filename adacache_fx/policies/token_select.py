"""Token choice for token-wise policies (DuCa, ToCa): scores, cache age, spatial bonus, top-k.

Everything here works on one branch's ``N`` tokens and returns indices shared by every batch row,
which is what :attr:`Plan.partial` takes (cond and uncond halves get the same tokens).
"""

from __future__ import annotations

import math

import torch


def token_norms(residual: torch.Tensor) -> torch.Tensor:
    """Per-token L2 norm of a ``[batch, N, ...]`` residual, averaged over the batch rows: ``[N]``.

    Averaging over rows (cond and uncond together) gives one score per token, so one index set.
    """
    value = residual.detach().float()
    return value.flatten(2).norm(dim=2).mean(dim=0)


def normalise(scores: torch.Tensor) -> torch.Tensor:
    """Min-max normalisation over tokens to [0, 1] (all equal: zeros)."""
    low, high = scores.min(), scores.max()
    span = high - low
    return torch.where(span > 0, (scores - low) / torch.where(span > 0, span, torch.ones_like(span)),
                       torch.zeros_like(scores))


def grid_layout(tokens: int, frames: int | None, grid: int) -> tuple[int, int] | None:
    """(frames, side) when ``tokens`` are ``frames`` square frames of ``side x side`` tokens whose side
    ``grid`` divides; tries the model's frame count, then one frame. None: no such layout (text
    tokens mixed in, temporal blocks whose tokens are frames): the spatial bonus does not apply."""
    for count in dict.fromkeys([frames or 1, 1]):
        if count < 1 or tokens % count:
            continue
        side = math.isqrt(tokens // count)
        if side * side == tokens // count and side % grid == 0:
            return count, side
    return None


def spatial_bonus(scores: torch.Tensor, frames: int, side: int, grid: int, bonus: float) -> torch.Tensor:
    """``scores`` with ``bonus`` added to the top-scored token of each ``grid x grid`` cell of each
    frame (ToCa's spatial term: spread recomputed tokens over the image)."""
    cells = scores.reshape(frames, side // grid, grid, side // grid, grid)
    cells = cells.permute(0, 1, 3, 2, 4).reshape(frames, -1, grid * grid)
    top = cells.argmax(dim=-1, keepdim=True)
    boosted = cells.scatter_add(-1, top, torch.full_like(top, bonus, dtype=cells.dtype))
    boosted = boosted.reshape(frames, side // grid, side // grid, grid, grid).permute(0, 1, 3, 2, 4)
    return boosted.reshape(-1)


def top_tokens(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` highest scores, ascending (gathers read memory in order); ties go to
    the lower index, so the choice is deterministic."""
    order = torch.sort(scores, descending=True, stable=True).indices[:count]
    return torch.sort(order).values


class TokenAges:
    """Steps since each token of each branch last computed (ToCa/DuCa's cache-age term)."""

    def __init__(self) -> None:
        self._ages: dict[str, torch.Tensor] = {}

    def get(self, branch_id: str, tokens: int, device: torch.device | None = None) -> torch.Tensor:
        ages = self._ages.get(branch_id)
        if ages is None or ages.numel() != tokens:
            ages = torch.zeros(tokens, device=device)
            self._ages[branch_id] = ages
        elif device is not None and ages.device != device:
            ages = ages.to(device)
            self._ages[branch_id] = ages
        return ages

    def computed_all(self, branch_id: str) -> None:
        if branch_id in self._ages:
            self._ages[branch_id].zero_()

    def skipped(self, branch_id: str) -> None:
        if branch_id in self._ages:
            self._ages[branch_id] += 1

    def computed(self, branch_id: str, tokens: int, indices: torch.Tensor) -> None:
        ages = self.get(branch_id, tokens, indices.device)
        ages += 1
        ages[indices] = 0

    def clear(self) -> None:
        self._ages.clear()
