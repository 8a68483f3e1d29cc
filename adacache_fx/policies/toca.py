"""ToCa, token-wise caching (arXiv 2410.05317): between full steps, each branch recomputes a share
of its tokens and keeps its cached residual for the others.

Schedule: the first ``early_full`` steps and every ``interval``-th step after the last of them
compute fully (defaults: steps 0, 3, 6, ...). On the other steps branch ``b`` recomputes
``k = int(r * N)`` of its ``N`` tokens (:attr:`Plan.partial`) with

    r = clamp(R * f_step * f_layer * f_module, 0, 1)
    f_step   = 1 + step_weight  - 2 * step_weight  * step / num_steps
    f_layer  = 1 + layer_weight - 2 * layer_weight * depth / (layers - 1)
    f_module = 1 - (1 - module_time_weight) * module_weight   for attention branches
               1 + module_time_weight * module_weight          for MLP branches

(ToCa's "linear-layerwise" schedule: with the DiT defaults ``mu = 0.6, w = 2.5`` attention gets
``f = 0``, i.e. it is fully reused, and the MLP ``f = 2.5``). ``depth`` is the block's position in
the model call (0 = first) and ``layers`` the number of blocks. A branch holding attention and
MLP together (Flux's single blocks) counts as an MLP. ``k = 0``: the branch reuses its residual;
``k = N``: it computes fully. A branch for which partial recompute is not valid
(``BranchInfo.partial`` False) and ``0 < r``: it computes fully (exact, no saving).

Token scores (the same indices for every batch row), higher recomputes first:

* ``score="attention"`` (attention each token receives) and ``"cross_entropy"`` (entropy of its
  cross-attention) need the attention map. Scaled-dot-product attention is fused in every captured
  graph and returns none, so these say so (a warning) and use ``fallback_score`` instead.
* ``score="norm"``: per-token L2 norm of the branch's own last computed residual (averaged over
  batch rows), min-max normalised over tokens.
* ``score="random"``: uniformly random (seeded per generation).

Then ``+ age_weight * steps_since_token_computed / interval`` (cache age), and with
``spatial_grid=g``, ``+ spatial_bonus`` for the top-scored token of each ``g x g`` cell of each
frame (where the tokens form square frames; other branches get no bonus). The spatial term is off
by default: its constants are not given in ALGORITHMS.md.

Residuals are cached after the gate, so a kept token carries the gate of the step that computed it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import PolicyError
from ..kinds import MLP
from .base import BranchInfo, Plan, Policy, StepContext
from .duca import TokenCacheState, cycle_kind
from .token_select import grid_layout, normalise, spatial_bonus, token_norms, top_tokens

logger = logging.getLogger("adacache_fx")

SCORES = ("attention", "cross_entropy", "norm", "random")
NEEDS_ATTENTION_MAP = ("attention", "cross_entropy")


@dataclass(frozen=True)
class ToCa(Policy):
    """ToCa's token-wise caching (see the module docstring for the ratio formula and the scores).

    ``interval``: full compute every N steps; ``ratio``: R; ``early_full``: first steps always full
    (>= 1); ``step_weight``, ``layer_weight``, ``module_weight`` (w), ``module_time_weight`` (mu):
    the factors' weights; ``score`` / ``fallback_score``: token scores; ``age_weight``: the
    cache-age term; ``spatial_grid`` / ``spatial_bonus``: the spatial term (None: off);
    ``num_steps``: steps per generation when ``ax.generation(num_steps=...)`` does not say.
    """

    interval: int = 3
    ratio: float = 0.07
    early_full: int = 1
    step_weight: float = 0.4
    layer_weight: float = 0.8
    module_weight: float = 2.5
    module_time_weight: float = 0.6
    score: str = "norm"
    fallback_score: str = "norm"
    age_weight: float = 0.25
    spatial_grid: int | None = None
    spatial_bonus: float = 0.5
    num_steps: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"ToCa(interval={self.interval!r}): an int >= 1")
        if isinstance(self.early_full, bool) or not isinstance(self.early_full, int) or self.early_full < 1:
            raise ValueError(f"ToCa(early_full={self.early_full!r}): an int >= 1 (the first step has no cache)")
        if float(self.ratio) < 0.0:
            raise ValueError(f"ToCa(ratio={self.ratio!r}): must be >= 0")
        if self.score not in SCORES:
            raise ValueError(f"ToCa(score={self.score!r}): one of {', '.join(SCORES)}")
        if self.fallback_score not in ("norm", "random"):
            raise ValueError(f"ToCa(fallback_score={self.fallback_score!r}): 'norm' or 'random'")
        if self.spatial_grid is not None and (not isinstance(self.spatial_grid, int) or self.spatial_grid < 1):
            raise ValueError(f"ToCa(spatial_grid={self.spatial_grid!r}): an int >= 1, or None for no spatial term")

    @property
    def effective_score(self) -> str:
        """The score used: ``score``, or ``fallback_score`` where ``score`` needs an attention map."""
        return self.fallback_score if self.score in NEEDS_ATTENTION_MAP else self.score

    def new_state(self) -> TokenCacheState:
        return TokenCacheState()

    # -- branches ----------------------------------------------------------------------------------
    def watches(self, branch: BranchInfo, state: TokenCacheState) -> bool:
        return self.effective_score == "norm" and branch.partial

    def validate(self, branches: tuple[BranchInfo, ...]) -> None:
        if self.score in NEEDS_ATTENTION_MAP:
            logger.warning(
                "adacache_fx: ToCa(score=%r) needs the attention map, which fused scaled-dot-product "
                "attention does not produce in the captured graphs; using score=%r instead",
                self.score, self.fallback_score,
            )

    def observe(self, ctx, state, branch, new, previous) -> None:
        state.norms[branch.id] = token_norms(new[0])

    # -- ratios ------------------------------------------------------------------------------------
    def module_factor(self, branch: BranchInfo) -> float:
        if MLP in branch.tags or branch.kind == MLP:
            return 1.0 + self.module_time_weight * self.module_weight
        return 1.0 - (1.0 - self.module_time_weight) * self.module_weight

    def ratio_for(self, branch: BranchInfo, step: int, num_steps: int, layers: int = 1) -> float:
        """r for ``branch`` at 0-based ``step`` of ``num_steps``, in a model of ``layers`` blocks."""
        step_factor = 1.0 + self.step_weight - 2.0 * self.step_weight * step / num_steps
        # One block: no layer position, so the neutral middle (factor 1).
        # A deeper list's block (auxiliary: numbered after the main ones) takes the neutral middle too.
        position = branch.depth / (layers - 1) if layers > 1 and not branch.auxiliary else 0.5
        layer_factor = 1.0 + self.layer_weight - 2.0 * self.layer_weight * position
        value = self.ratio * step_factor * layer_factor * self.module_factor(branch)
        return min(1.0, max(0.0, value))

    # -- schedule ----------------------------------------------------------------------------------
    def is_full_step(self, ctx: StepContext) -> bool:
        return cycle_kind(ctx.step, self.interval, self.early_full, descending=True) == "full"

    def plan(self, ctx: StepContext, state: TokenCacheState) -> Plan:
        state.frames = ctx.frames
        ages = state.ages
        if self.is_full_step(ctx) or not ctx.branches:
            for branch in ctx.branches:
                ages.computed_all(branch.id)
            return Plan.compute_all()
        num_steps = ctx.num_steps if ctx.num_steps is not None else self.num_steps
        if num_steps is None:
            raise PolicyError(
                "ToCa's step factor needs the step count: ToCa(num_steps=N) or ax.generation(model, num_steps=N)"
            )
        layers = max((b.depth for b in ctx.branches if not b.auxiliary), default=0) + 1
        reuse: list[str] = []
        partial: dict[str, torch.Tensor] = {}
        for branch in ctx.branches:
            share = self.ratio_for(branch, ctx.step, num_steps, layers)
            count = int(share * branch.tokens) if branch.partial else None
            if share == 0.0 or count == 0:
                reuse.append(branch.id)
                ages.skipped(branch.id)
            elif count is None or count >= branch.tokens:
                ages.computed_all(branch.id)  # computes fully
            else:
                partial[branch.id] = self.choose(branch, count, state)
        return Plan(frozenset(reuse), partial)

    # -- tokens ------------------------------------------------------------------------------------
    def scores(self, branch: BranchInfo, state: TokenCacheState) -> torch.Tensor:
        """The score of each of the branch's tokens this step (higher recomputes first)."""
        norms = state.norms.get(branch.id)
        if norms is not None and norms.numel() != branch.tokens:
            norms = None
        device = norms.device if norms is not None else None
        ages = state.ages.get(branch.id, branch.tokens, device)
        if self.effective_score == "random":
            if state.generator is None:
                state.generator = torch.Generator().manual_seed(self.seed)
            base = torch.rand(branch.tokens, generator=state.generator).to(ages.device)
        else:
            base = normalise(norms) if norms is not None else torch.zeros_like(ages)
        scores = base + self.age_weight * ages / self.interval
        if self.spatial_grid is not None:
            layout = grid_layout(branch.tokens, state.frames, self.spatial_grid)
            if layout is not None:
                scores = spatial_bonus(scores, layout[0], layout[1], self.spatial_grid, self.spatial_bonus)
        return scores

    def choose(self, branch: BranchInfo, count: int, state: TokenCacheState) -> torch.Tensor:
        """The ``count`` tokens of ``branch`` to recompute this step (and age the others)."""
        indices = top_tokens(self.scores(branch, state), count)
        state.ages.computed(branch.id, branch.tokens, indices)
        return indices
