"""Context parallelism: the process group a model's shards belong to, for the policies' metrics.

diffusers' ``model.enable_parallelism(config=ContextParallelConfig(...))`` splits the sequence over
the ranks of a device mesh (Ulysses all-to-alls or ring attention inside attention). Every rank then
runs the same block graphs on its slice of the tokens, and caches only that slice. What must not be
per rank is a decision: a rank that reuses a region skips the collectives inside it, and one that
computes waits for them forever. So the metric terms a policy reads are summed over the group before
the ratio (:class:`ProcessGroupMetrics`, one small all-reduce per decision), which makes every
rank's decision the single-process decision, by construction.

The group is read from the model at every call (``model._parallel_config``, diffusers' record of
its parallel config), so parallelism enabled before or after ``transform`` is followed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..policies.base import LOCAL, MetricGroup


class ProcessGroupMetrics(MetricGroup):
    """:class:`MetricGroup` over a ``torch.distributed`` process group.

        >>> group = ProcessGroupMetrics(dist.group.WORLD, "context parallel")  # doctest: +SKIP
        >>> num, den = group.sum(num, den)  # doctest: +SKIP
    """

    def __init__(self, group: Any, description: str) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.description = description
        self.reductions = 0  # collectives issued for decisions (ax.report shows them)

    def sum(self, *terms: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from torch.distributed import _functional_collectives as funcol

        if not terms:
            return terms
        device = terms[0].device
        stacked = torch.stack([t.detach().float().to(device).reshape(()) for t in terms])
        self.reductions += 1
        summed = funcol.wait_tensor(funcol.all_reduce(stacked, "sum", self.group))
        return tuple(summed.unbind(0))

    def gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        from torch.distributed import _functional_collectives as funcol

        self.reductions += 1
        dim = dim % tensor.ndim
        return funcol.wait_tensor(funcol.all_gather_tensor(tensor.contiguous(), dim, self.group))


def context_parallel_group(model: nn.Module, known: dict[int, tuple[Any, MetricGroup]]) -> MetricGroup:
    """The metric group of ``model``'s context parallelism, or :data:`LOCAL` when it has none.

    ``known`` memoises one group per parallel config (the caller's, per runtime)."""
    config = getattr(model, "_parallel_config", None)
    cp = getattr(config, "context_parallel_config", None)
    if cp is None or not dist.is_available() or not dist.is_initialized():
        return LOCAL
    memo = known.get(id(cp))
    group = memo[1] if memo is not None and memo[0] is cp else None
    if group is None:
        mesh = getattr(cp, "_flattened_mesh", None) or getattr(cp, "_mesh", None)
        if mesh is None:
            return LOCAL  # not set up yet (diffusers sets the mesh in enable_parallelism)
        process_group = mesh.get_group() if mesh.ndim == 1 else mesh._flatten().get_group()
        ulysses = getattr(cp, "ulysses_degree", None) or 1
        ring = getattr(cp, "ring_degree", None) or 1
        group = ProcessGroupMetrics(
            process_group, f"context parallel: {dist.get_world_size(process_group)} ranks "
                           f"(ulysses {ulysses}, ring {ring})")
        known[id(cp)] = (cp, group)
    return group
