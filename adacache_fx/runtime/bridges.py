"""Model code between two blocks of a folded span: rearrangements of the stream, and constants added.

A folded span (see ``passes/fold.py``) keeps one residual per stream for blocks that take each
other's outputs. Spatio-temporal DiTs put code between their blocks: Latte swaps the token axes
between each spatial and temporal block, ``(B*F, S, D) -> (B*S, F, D)`` and back, and adds its
temporal position embedding once. That code is affine in the stream, ``x = P(y) + c``: ``P`` moves
token rows, ``c`` is a model constant. On a reuse step the model runs that code again on the stream
the span's blocks pass through, so the span still needs one residual: the sum of its blocks'
residuals in its last block's layout,

    R = y_last - C - P(x_first)

(``P`` the rearrangements of the span composed, ``C`` the constants added in it carried to the
last layout), added by the last block. Equal to per-branch reuse up to float rounding; the
constants are read live, so a changed one is added as the model adds it.

:func:`find_bridge` proves ``x = P(y) + c`` for one pair of tensors (exactly, or to the rounding
of the add for a constant), trying the rearrangements a stream's shapes allow: the same element
order (a reshape), or the swap of its two token axes. Anything else between two blocks (a norm, a
skip connection) is no bridge: the span ends there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol

import torch

from ..errors import AdaCacheError


class Constants(Protocol):
    """The model's parameters and buffers outside its blocks, read live."""

    def items(self) -> Iterable[tuple[str, torch.Tensor]]: ...

    def get(self, name: str) -> torch.Tensor | None: ...


@dataclass(frozen=True, eq=False)
class Bridge:
    """``x = P(y) + c`` between one block's output ``y`` and the next block's input ``x``.

    ``rows``: ``x.rows[i] = y.rows[rows[i]]`` over rows of the last dimension (None: the same order);
    ``constant``: the name of the model constant ``c`` (None: nothing added); ``shape``: ``x``'s."""

    rows: torch.Tensor | None
    constant: str | None
    shape: torch.Size


def _swap_rows(y_shape: torch.Size, x_shape: torch.Size, device: torch.device) -> torch.Tensor | None:
    """Rows of ``y`` in the order of ``x`` when ``x`` is ``y`` with its two token axes swapped:
    ``(B*F, S, D) -> (B*S, F, D)`` (leading axes merged but the last token axis)."""
    if len(y_shape) < 3 or len(x_shape) < 3:
        return None
    n1, m1 = int(y_shape[-2]), int(x_shape[-2])
    n0, m0 = int(y_shape[:-2].numel()), int(x_shape[:-2].numel())
    if m1 <= 1 or n1 <= 1 or n0 % m1 or m0 % n1 or n0 // m1 != m0 // n1:
        return None
    batch = n0 // m1
    return torch.arange(n0 * n1, device=device).view(batch, m1, n1).transpose(1, 2).reshape(-1)


def _apply(rows: torch.Tensor | None, y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if rows is None:
        return y.reshape(shape)
    return y.reshape(-1, y.shape[-1]).index_select(0, rows).reshape(shape)


def find_bridge(y: torch.Tensor, x: torch.Tensor, constants: Constants | None) -> Bridge | None:
    """The bridge from ``y`` (a block's output) to ``x`` (the next block's input), or None."""
    if (x.dtype != y.dtype or x.device != y.device or x.numel() != y.numel() or x.ndim == 0 or y.ndim == 0
            or x.shape[-1] != y.shape[-1] or not x.is_floating_point()):
        return None
    candidates = [None]
    swap = _swap_rows(y.shape, x.shape, x.device)
    if swap is not None:
        candidates.append(swap)
    moved = [(rows, _apply(rows, y, x.shape)) for rows in candidates]
    for rows, image in moved:  # every rearrangement alone first: one comparison each
        if torch.equal(x, image):
            return Bridge(rows, None, x.shape)
    offsets = [(name, value) for name, value in (constants.items() if constants is not None else ())
               if _broadcasts(value, x)]
    for rows, image in moved:
        difference = x - image
        for name, value in offsets:
            value = value.detach().to(x.dtype).expand(x.shape)
            # On the first leading slice first (most candidates fail there), then on everything.
            if _adds(difference[:1], x[:1], value[:1]) and _adds(difference, x, value):
                return Bridge(rows, name, x.shape)
    return None


def _adds(difference: torch.Tensor, x: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether ``difference`` is ``value`` up to what rounding the add ``x = P(y) + value`` leaves:
    half a unit in the last place of each element of ``x`` (and of the subtraction), so 2 eps of
    ``|x| + |value|`` element by element."""
    eps = torch.finfo(x.dtype).eps
    return bool(((difference - value).abs() <= 2 * eps * (x.abs() + value.abs())).all())


def _broadcasts(value: torch.Tensor, x: torch.Tensor) -> bool:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.device != x.device:
        return False
    if value.ndim > x.ndim or value.numel() > x.numel() or value.numel() == 0:
        return False
    return all(v in (1, s) for v, s in zip(value.shape[::-1], x.shape[::-1]))


def span_residual(first_input: torch.Tensor, last_output: torch.Tensor, bridges: list[Bridge | None],
                  constants: Constants | None) -> torch.Tensor:
    """``y_last - C - P(x_first)`` for a span whose gaps are ``bridges`` (None: no code between)."""
    rows: torch.Tensor | None = None  # composed: P(z).rows[i] = z.rows[rows[i]]
    carried: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # constants added so far, with the rows after
    for bridge in reversed(bridges):  # compose from the last gap back
        if bridge is None:
            continue
        if bridge.constant is not None:
            value = constants.get(bridge.constant) if constants is not None else None
            if value is None:
                raise AdaCacheError(
                    f"the model constant {bridge.constant!r} its code adds between two blocks is gone; "
                    "ax.reset(model) after changing the model's structure outside its blocks")
            carried.append((value.detach().to(last_output.dtype).expand(bridge.shape), rows))
        if bridge.rows is not None:
            rows = bridge.rows if rows is None else bridge.rows.index_select(0, rows)
    residual = last_output - _apply(rows, first_input.to(last_output.dtype), last_output.shape)
    for value, after in carried:
        residual = residual - _apply(after, value, last_output.shape)
    return residual.detach()
