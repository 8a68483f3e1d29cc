"""LeMiCa (arXiv 2511.00090, NeurIPS 2025): an offline-optimal static schedule from a graph search.

LeMiCa decides offline which steps compute. Its graph has one node per denoising step; an edge
``i -> j`` (``i < j``) means "compute at ``i`` and at ``j``, reuse step ``i``'s cache for the steps in
between", weighted by the error that reuse costs the *final* output, measured once on uncached runs:

    w(i -> j) = 1/N || x_0^{cache(i -> j)} - x_0^{original} ||_1      (N: elements of x_0)

(``w(i -> i+1) = 0``: nothing is reused.) A schedule with ``B`` computed steps is a path from the first
step to the last through ``B`` nodes, and LeMiCa takes the one whose edge weights, sorted in
descending order, are lexicographically smallest: the smallest worst reuse error, then the smallest
second worst, and so on (lexicographic minimax). The result is a static list of computed steps, so the
policy exports like :class:`~adacache_fx.policies.static.Static`.

* :func:`lexicographic_minimax_path`: the exact search on a cost matrix (dynamic programming over
  (step, steps computed so far); exact because the lexicographic order of sorted weight lists is
  preserved when the same edge is appended to two paths);
* :func:`record_costs`: the cost matrix of a model, from its uncached runs and one run per edge;
* :class:`LeMiCa`: the schedule as a policy, with the authors' published schedules
  (:meth:`LeMiCa.published`) and :meth:`LeMiCa.from_costs`.

Details, published numbers and where this differs from the authors: ``docs/algorithms/lemica.md``.
"""

from __future__ import annotations

import bisect
import math
import operator
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from tqdm.auto import tqdm

from ..errors import PolicyError
from .base import Plan, Policy, StepContext

OBJECTIVES = ("lexicographic", "sum")

#: The authors' searched schedules (computed steps, 0-based), by model and budget B = number of
#: computed steps. Source: the inference scripts of github.com/UnicomAI/LeMiCa (stored copy:
#: scruffynerf/LeMiCa, LeMiCa4FLUX/inference_flux1.py, LeMiCa4QwenImage/inference_qwenimage.py,
#: LeMiCa4Wan2.1/inference_wan.py). Searched on those models; on another model they are a start only.
_PUBLISHED: dict[str, tuple[int, dict[int, tuple[int, ...]]]] = {
    # FLUX.1-dev, 50 steps; the script's "slow" / "medium" / "fast" / "ultra" are B = 26 / 20 / 15 / 10.
    "flux1-dev": (50, {
        26: (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 18, 20, 25, 30, 35, 39, 42, 44, 45, 46, 47, 48, 49),
        20: (0, 1, 2, 3, 4, 5, 6, 7, 9, 12, 15, 19, 24, 31, 38, 43, 46, 47, 48, 49),
        15: (0, 1, 2, 3, 4, 5, 7, 10, 15, 20, 27, 34, 41, 47, 49),
        10: (0, 1, 3, 7, 14, 21, 28, 35, 42, 49),
    }),
    # Qwen-Image, 50 steps; "slow" / "medium" / "fast" are B = 25 / 17 / 10.
    "qwen-image": (50, {
        25: (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 26, 33, 36, 42, 49),
        17: (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 22, 29, 36, 42, 49),
        10: (0, 1, 3, 7, 14, 21, 28, 35, 42, 49),
    }),
    # Wan2.1 text-to-video 1.3B, 50 steps.
    "wan2.1-t2v-1.3b": (50, {
        25: (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 18, 21, 24, 29, 35, 40, 44, 47, 48, 49),
        20: (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 13, 16, 20, 26, 33, 40, 45, 48, 49),
        17: (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 13, 18, 25, 32, 39, 46, 49),
        14: (0, 1, 2, 3, 4, 5, 7, 10, 16, 23, 30, 37, 44, 49),
    }),
    # Wan2.1 text-to-video 14B, 50 steps.
    "wan2.1-t2v-14b": (50, {
        25: (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 18, 21, 25, 29, 34, 38, 42, 45, 47, 48, 49),
        20: (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 14, 18, 23, 29, 36, 42, 46, 48, 49),
        17: (0, 1, 2, 3, 4, 5, 6, 7, 9, 12, 16, 22, 29, 36, 43, 47, 49),
        14: (0, 1, 2, 3, 4, 5, 7, 10, 17, 24, 31, 38, 45, 49),
    }),
    # Wan2.1 image-to-video 14B (480p), 40 steps.
    "wan2.1-i2v-14b": (40, {
        25: (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16, 18, 21, 24, 27, 30, 32, 34, 36, 37, 38, 39),
        20: (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 18, 21, 25, 29, 32, 35, 37, 38, 39),
        17: (0, 1, 2, 3, 4, 5, 7, 9, 12, 15, 19, 24, 29, 33, 36, 38, 39),
        14: (0, 1, 2, 3, 4, 6, 8, 11, 15, 22, 29, 34, 37, 39),
    }),
}
PUBLISHED: Mapping[str, Mapping[int, tuple[int, ...]]] = MappingProxyType(
    {name: MappingProxyType(dict(schedules)) for name, (_, schedules) in _PUBLISHED.items()}
)
#: Step count each published schedule was searched for.
PUBLISHED_STEPS: Mapping[str, int] = MappingProxyType({name: steps for name, (steps, _) in _PUBLISHED.items()})


# -- the search ---------------------------------------------------------------------------------------
def _cost_rows(costs: Any) -> list[list[float]]:
    """The cost matrix as rows of floats, checked: square, non-negative or inf above the diagonal."""
    try:
        matrix = torch.as_tensor(costs, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"costs must be a square matrix of numbers (steps x steps), got {costs!r}") from error
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 1:
        raise ValueError(f"costs must be a square matrix (steps x steps), got shape {tuple(matrix.shape)}")
    upper = torch.triu(torch.ones_like(matrix, dtype=torch.bool), diagonal=2)
    values = matrix[upper]
    if torch.isnan(values).any():
        raise ValueError("costs has NaN above the diagonal; use inf for an edge that must not be taken")
    if (values < 0).any():
        raise ValueError("costs must be >= 0 (an edge's reuse error); found a negative entry above the diagonal")
    return matrix.tolist()


def _weight(rows: list[list[float]], i: int, j: int) -> float:
    """Edge weight: ``costs[i][j]``; 0 for ``j == i + 1`` (no step reuses; the entry is not read)."""
    return 0.0 if j == i + 1 else rows[i][j]


def _check_budget(budget: int, steps: int) -> None:
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise ValueError(f"budget must be an int (the number of computed steps), got {budget!r}")
    low = 1 if steps == 1 else 2
    if not low <= budget <= steps:
        raise ValueError(
            f"budget={budget}: a schedule of {steps} steps computes the first and the last step, so the "
            f"budget must be in [{low}, {steps}]"
        )


def _check_span(max_span: int | None) -> None:
    if max_span is not None and (isinstance(max_span, bool) or not isinstance(max_span, int) or max_span < 1):
        raise ValueError(f"max_span={max_span!r}: must be None or an int >= 1 (the longest edge j - i)")


def lexicographic_minimax_path(
    costs: Any, budget: int, *, max_span: int | None = None, objective: str = "lexicographic"
) -> tuple[int, ...]:
    """The computed steps of the best schedule with ``budget`` computed steps, first and last included.

    ``costs[i][j]`` (``i < j``): the error of computing at ``i`` and ``j`` and reusing in between; ``inf``
    forbids the edge; entries on and below the diagonal and at ``j == i + 1`` are not read (no reuse:
    weight 0). ``max_span``: only edges with ``j - i <= max_span``. ``objective``:

    * ``"lexicographic"`` (LeMiCa): the path whose edge weights, sorted in descending order, compare
      lexicographically smallest (so its largest weight is the smallest possible: minimax);
    * ``"sum"``: the smallest total weight (a plain shortest path, for comparison).

    Exact, O(budget * steps * span) states and transitions. Ties go to the path whose computed steps,
    read from the last one backwards, are smallest. Raises ValueError when no path fits.

    >>> inf = float("inf")
    >>> costs = [[0, 0, 1, 9], [0, 0, 0, 2], [0, 0, 0, 0], [0, 0, 0, 0]]
    >>> lexicographic_minimax_path(costs, 3)  # 0 -> 1 -> 3 costs (2, 0); 0 -> 2 -> 3 costs (1, 0)
    (0, 2, 3)
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}: valid objectives are {', '.join(OBJECTIVES)}")
    _check_span(max_span)
    rows = _cost_rows(costs)
    steps = len(rows)
    _check_budget(budget, steps)
    if steps == 1:
        return (0,)
    span = steps if max_span is None else max_span
    # best[k][j]: (key, predecessor) of the best path from step 0 to step j through k computed steps.
    # key: descending tuple of edge weights ("lexicographic") or the total weight ("sum").
    empty: Any = () if objective == "lexicographic" else 0.0
    best: list[dict[int, tuple[Any, int | None]]] = [{} for _ in range(budget + 1)]
    best[1][0] = (empty, None)
    for k in range(2, budget + 1):
        previous, current = best[k - 1], best[k]
        # Step j needs k - 1 steps before it and budget - k steps after it.
        for j in range(k - 1, steps - (budget - k)):
            found: tuple[Any, int] | None = None
            for i in range(max(0, j - span), j):
                entry = previous.get(i)
                if entry is None:
                    continue
                weight = _weight(rows, i, j)
                if math.isinf(weight):
                    continue
                if objective == "lexicographic":
                    key = _insert_descending(entry[0], weight)
                else:
                    key = entry[0] + weight
                if found is None or key < found[0]:
                    found = (key, i)
            if found is not None:
                current[j] = found
    last = best[budget].get(steps - 1)
    if last is None:
        raise ValueError(
            f"no schedule of {steps} steps computes exactly {budget} steps through allowed edges"
            + (f" (max_span={max_span})" if max_span is not None else "")
            + "; raise the budget or max_span, or give the missing edges a finite cost"
        )
    path = [steps - 1]
    for k in range(budget, 1, -1):
        path.append(best[k][path[-1]][1])
    return tuple(reversed(path))


def _insert_descending(weights: tuple[float, ...], weight: float) -> tuple[float, ...]:
    """``weights`` (descending) with ``weight`` inserted in order."""
    negated = [-w for w in weights]
    position = bisect.bisect_right(negated, -weight)
    return weights[:position] + (weight,) + weights[position:]


def path_errors(costs: Any, compute_steps: Iterable[int]) -> tuple[float, ...]:
    """The edge weights of a schedule (its consecutive computed steps), in descending order: what
    :func:`lexicographic_minimax_path` compares.

    >>> path_errors([[0, 0, 1, 9], [0, 0, 0, 2], [0, 0, 0, 0], [0, 0, 0, 0]], (0, 1, 3))
    (2.0, 0.0)
    """
    rows = _cost_rows(costs)
    steps = sorted(set(compute_steps))
    if not steps or steps[0] < 0 or steps[-1] >= len(rows):
        raise ValueError(f"compute_steps {steps} are not steps of a {len(rows)}-step cost matrix")
    return tuple(sorted((float(_weight(rows, i, j)) for i, j in zip(steps, steps[1:])), reverse=True))


# -- recording the costs ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _SegmentReuse(Policy):
    """Computes every step but those strictly inside ``segment[0] = (i, j)``, which reuse step i's
    residuals; records the steps it planned. A helper of :func:`record_costs`, never used elsewhere."""

    segment: list = field(default_factory=lambda: [None], compare=False)
    planned: set = field(default_factory=set, compare=False)

    def folds(self) -> bool:
        return True  # reuse exactly as LeMiCa's schedules will

    def plan(self, ctx: StepContext, state: Any) -> Plan:
        self.planned.add(ctx.step)
        span = self.segment[0]
        if span is not None and span[0] < ctx.step < span[1]:
            return Plan.reuse_only(b.id for b in ctx.branches)
        return Plan.compute_all()


def _final_tensor(output: Any) -> torch.Tensor:
    if hasattr(output, "sample") and isinstance(output.sample, torch.Tensor):
        return output.sample
    if hasattr(output, "latents") and isinstance(output.latents, torch.Tensor):
        return output.latents
    for leaf in pytree.tree_leaves(output):
        if isinstance(leaf, torch.Tensor):
            return leaf
    raise ValueError(f"record_costs: run() must return the generation's final output (a tensor), got {output!r}")


def record_costs(
    model: nn.Module,
    run: Callable[[nn.Module, int], Any],
    num_steps: int,
    *,
    runs: int = 1,
    max_span: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """LeMiCa's cost matrix of ``model``: the final-output error of every reuse edge ``i -> j``.

    ``run(model, r)`` performs one whole generation of ``num_steps`` steps with inputs number ``r``
    (a sampler loop, so that a reused step changes the trajectory) and returns its final output (a
    tensor, or an object with ``.sample`` / ``.latents``, or a structure whose first tensor it is).
    For each input the model runs once computing every step (the reference ``x_0``) and once per edge
    with ``j - i >= 2`` (and ``<= max_span``), computing every step but ``i+1 .. j-1``, which reuse
    step ``i``'s residuals. ``costs[i, j]`` is ``mean |x_0 - x_0^ref|``, averaged over ``runs`` inputs;
    ``costs[i, i+1] = 0``; entries not measured (``j <= i``, spans beyond ``max_span``) are ``inf``.
    That is ``runs * (1 + edges)`` generations (``edges`` ~ ``num_steps^2 / 2``): meant for small models,
    few steps or a ``max_span``.

    ``model`` must be untransformed; it is transformed for the runs and restored afterwards.
    Returns a float64 ``(num_steps, num_steps)`` tensor for :func:`lexicographic_minimax_path`.
    """
    from ..api import generation, is_transformed, restore, transform  # the runtime imports the policies

    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"record_costs: num_steps must be an int >= 1, got {num_steps!r}")
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ValueError(f"record_costs: runs must be an int >= 1, got {runs!r}")
    _check_span(max_span)
    if is_transformed(model):
        raise PolicyError("record_costs() needs the untransformed model: call adacache_fx.restore(model) first")
    edges = [
        (i, j) for i in range(num_steps) for j in range(i + 2, num_steps)
        if max_span is None or j - i <= max_span
    ]
    costs = torch.full((num_steps, num_steps), math.inf, dtype=torch.float64)
    for i in range(num_steps - 1):
        costs[i, i + 1] = 0.0
    for i, j in edges:
        costs[i, j] = 0.0
    recorder = _SegmentReuse()
    transform(model, recorder)

    def generate(segment: tuple[int, int] | None, r: int) -> torch.Tensor:
        recorder.segment[0] = segment
        recorder.planned.clear()
        with generation(model, num_steps=num_steps):
            output = _final_tensor(run(model, r)).detach().float().clone()
        if recorder.planned != set(range(num_steps)):
            seen = len(recorder.planned)
            raise ValueError(
                f"record_costs: run() made {seen} denoising step(s) (steps {sorted(recorder.planned)[:5]}...), "
                f"but num_steps={num_steps}"
            )
        return output

    try:
        with torch.no_grad(), tqdm(total=runs * (1 + len(edges)), desc="LeMiCa costs", disable=not progress) as bar:
            for r in range(runs):
                reference = generate(None, r)
                bar.update()
                for i, j in edges:
                    costs[i, j] += (generate((i, j), r) - reference).abs().mean().item() / runs
                    bar.update()
    finally:
        restore(model)
    return costs


# -- the policy ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LeMiCa(Policy):
    """A LeMiCa schedule: compute on ``compute_steps`` (0-based), reuse every branch on the others.

    ``num_steps``: the step count the schedule is for. Steps from ``num_steps`` on (or, without it,
    after the last computed step) compute; a generation that declares another step count
    (``ax.generation(num_steps=...)``) raises :class:`PolicyError`, since a schedule searched for 50
    steps says nothing about 30. Step 0 must compute (nothing is cached before it). Static plans only
    (compute everything or reuse every cached branch), so it exports like ``Static``.

    Build one from a cost matrix with :meth:`from_costs` (:func:`record_costs` measures it), or take
    the authors' searched schedules with :meth:`published`.

    >>> LeMiCa.published("flux1-dev", 10).compute_steps
    (0, 1, 3, 7, 14, 21, 28, 35, 42, 49)
    """

    compute_steps: tuple[int, ...]
    num_steps: int | None = None

    def __post_init__(self) -> None:
        steps = self.compute_steps
        if isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable):
            raise ValueError(f"LeMiCa(compute_steps={steps!r}): give the computed steps as a sequence of ints")
        values, bad = [], []
        for step in steps:
            try:
                value = operator.index(step)  # ints, numpy and 0-d torch integers
            except TypeError:
                value = None
            if isinstance(step, bool) or value is None or value < 0:
                bad.append(step)
            else:
                values.append(value)
        if bad:
            raise ValueError(f"LeMiCa(compute_steps=...): steps must be ints >= 0, got {bad}")
        steps = tuple(sorted(set(values)))
        if not steps or steps[0] != 0:
            raise ValueError(
                f"LeMiCa(compute_steps={steps}): step 0 must compute (nothing is cached before it)"
            )
        n = self.num_steps
        if n is not None:
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"LeMiCa(num_steps={n!r}): must be None or an int >= 1")
            if steps[-1] >= n:
                raise ValueError(f"LeMiCa: compute step {steps[-1]} is not a step of a {n}-step generation")
        object.__setattr__(self, "compute_steps", steps)

    @property
    def budget(self) -> int:
        """B: how many steps compute."""
        return len(self.compute_steps)

    @classmethod
    def published(cls, model: str, budget: int) -> "LeMiCa":
        """The authors' schedule for ``model`` (a key of :data:`PUBLISHED`) with ``budget`` computed steps."""
        if model not in PUBLISHED:
            raise ValueError(f"LeMiCa.published({model!r}): published schedules are for {', '.join(PUBLISHED)}")
        schedules = PUBLISHED[model]
        if budget not in schedules:
            raise ValueError(
                f"LeMiCa.published({model!r}, {budget!r}): published budgets are {sorted(schedules)}"
            )
        return cls(compute_steps=schedules[budget], num_steps=PUBLISHED_STEPS[model])

    @classmethod
    def from_costs(cls, costs: Any, budget: int, *, max_span: int | None = None,
                   objective: str = "lexicographic") -> "LeMiCa":
        """The schedule :func:`lexicographic_minimax_path` finds on ``costs`` (steps x steps)."""
        steps = lexicographic_minimax_path(costs, budget, max_span=max_span, objective=objective)
        return cls(compute_steps=steps, num_steps=len(_cost_rows(costs)))

    def is_compute_step(self, step: int) -> bool:
        """Whether 0-based ``step`` computes (every step after the schedule's end does)."""
        horizon = self.num_steps if self.num_steps is not None else self.compute_steps[-1] + 1
        return step >= horizon or step in self.compute_steps

    def folds(self) -> bool:
        return True  # a step reuses every branch of every block, or none, as it was stored

    def plan(self, ctx: StepContext, state: Any) -> Plan:
        if self.num_steps is not None and ctx.num_steps is not None and ctx.num_steps != self.num_steps:
            raise PolicyError(
                f"LeMiCa: the schedule is for {self.num_steps} steps but this generation has {ctx.num_steps}; "
                f"search one for {ctx.num_steps} steps (LeMiCa.from_costs) or run {self.num_steps} steps"
            )
        if self.is_compute_step(ctx.step):
            return Plan.compute_all()
        return Plan.reuse_only(b.id for b in ctx.branches)
