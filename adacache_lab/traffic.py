"""The memory-traffic ideal of a reuse step, for the benchmarks.

A FLOP ideal says a step that reuses every branch costs nothing; it still has to read what the cache
holds and read and write the stream once. :func:`reuse_step_memory_ideal` turns those bytes into
seconds at the copy bandwidth :func:`copy_bandwidth` measures on the device.

    >>> from adacache_lab.traffic import copy_bandwidth, reuse_step_memory_ideal
    >>> bandwidth = copy_bandwidth("cpu")  # bytes per second, read + write
    >>> reuse_step_memory_ideal(cache_bytes=2**20, stream_bytes=2**20, bandwidth=bandwidth) > 0
    True
"""

from __future__ import annotations

import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: str | torch.device = "cpu", mebibytes: int = 64, repeats: int = 10) -> float:
    """Bytes per second a ``clone`` of a ``mebibytes`` MiB tensor moves (read plus write), best of
    ``repeats`` after three warm-up copies."""
    device = torch.device(device)
    probe = torch.empty(mebibytes * 2**20 // 4, device=device)
    for _ in range(3):
        probe.clone()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        probe.clone()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * probe.numel() * probe.element_size() / best


def reuse_step_memory_ideal(cache_bytes: int, stream_bytes: int, bandwidth: float) -> float:
    """Seconds a reuse step needs at least: read ``cache_bytes`` and read and write the stream once."""
    return (cache_bytes + 2 * stream_bytes) / bandwidth


def stream_bytes(model: torch.nn.Module, kwargs: dict) -> int:
    """Bytes of the hidden states entering a transformed model's first block in one call of
    ``model(**kwargs)`` (one stream; the latent input is smaller: the patch embedding widens it)."""
    from adacache_fx.runtime.cached_block import CachedBlock

    seen: list[torch.Tensor] = []
    first = next(m for m in model.modules() if isinstance(m, CachedBlock))
    hook = first.register_forward_pre_hook(lambda module, args, kw: seen.append((*args, *kw.values())[0]),
                                           with_kwargs=True)
    try:
        with torch.no_grad():
            model(**kwargs)
    finally:
        hook.remove()
    return seen[0].numel() * seen[0].element_size()
