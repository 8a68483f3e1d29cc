"""DuCa, dual feature caching (arXiv 2412.18911): full, aggressive and conservative steps in a cycle.

* **full**: every branch computes (and refreshes its cache).
* **aggressive**: every branch reuses its cached residual. DuCa skips the whole block stack and
  reuses the last block's output; the closest this runtime comes is reusing every branch's residual
  (every block still adds them to the stream, which costs additions only).
* **conservative**: attention branches reuse their residual; MLP branches recompute ``k =
  int(ratio * N)`` of their ``N`` tokens and scatter them into their cached residual
  (:attr:`Plan.partial`); cross-attention is reused (Open-Sora) or, with
  ``cross_attention="partial"``, recomputed for the same share of query tokens (PixArt). A branch
  holding attention and MLP together (Flux's single blocks) counts as an MLP: its partial form
  recomputes the chosen queries against all keys and values. An MLP branch for which partial
  recompute is not valid (``BranchInfo.partial`` False: CogVideoX's joint feed-forward over text and
  video tokens) computes fully on conservative steps.

Residuals are cached after the gate (DuCa caches attention before its gate and applies the current
step's gate): a reused or partly recomputed residual carries the gate of the step it was computed at.

Cycle: the first ``early_full`` steps are full; after that, a full step every ``interval`` steps
counted from the last early one, and the steps between alternate between the two other kinds,
starting with aggressive when timesteps count down (DiT) and with conservative when they count up.
With ``interval=3, early_full=3`` over 10 steps: counting down ``F F F A C F A C F A``, counting up
``F F F C A F C A F C``. The direction comes from the generation's first two timesteps
(``direction="auto"``) or is given.

Token choice on conservative steps (the same indices for every batch row, cond and uncond halves):

* ``selection="vnorm"``: DuCa's V-caching score is ``normalize(sum_heads(1 - |v|_2))`` over the value
  vectors of the last full attention step, low-norm tokens first. Fused attention gives no value
  vectors, so the score here is the closest quantity the runtime sees: the per-token L2 norm of
  the same block's self-attention residual (``to_out(softmax(QK^T) V)`` times its gate, a mix of
  value vectors) from the last step that attention computed, averaged over batch rows and
  min-max normalised, low norm first: ``s = normalize(-|attn_residual|_2)``. Where the block has
  no such branch with the same tokens (Flux: its attention is joint over text and image), the MLP
  branch's own last residual is used instead. Plus ``age_weight * steps_since_computed / interval``.
* ``selection="random"``: the paper's later version, uniformly random tokens (seeded per generation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import PolicyError
from ..kinds import CROSS_ATTENTION, MLP
from .base import BranchInfo, Plan, Policy, StepContext
from .token_select import TokenAges, normalise, token_norms, top_tokens

FULL, AGGRESSIVE, CONSERVATIVE = "full", "aggressive", "conservative"
STEP_KINDS = (FULL, AGGRESSIVE, CONSERVATIVE)
DIRECTIONS = ("auto", "descending", "ascending")


def cycle_kind(step: int, interval: int, early_full: int, descending: bool) -> str:
    """The kind of 0-based ``step``: full for the first ``early_full`` steps and every ``interval``-th
    step after the last of them; the others alternate, aggressive first when counting down."""
    if step < early_full:
        return FULL
    position = (step - early_full + 1) % interval
    if position == 0:
        return FULL
    first, second = (AGGRESSIVE, CONSERVATIVE) if descending else (CONSERVATIVE, AGGRESSIVE)
    return first if position % 2 == 1 else second


def _is_attention(branch: BranchInfo) -> bool:
    return MLP not in branch.tags and branch.kind != MLP


@dataclass
class TokenCacheState:
    """One generation of a token-wise policy (:class:`DuCa`, :class:`~.toca.ToCa`): the token
    scores' sources, the last residual norms and each token's cache age."""

    branches: tuple[BranchInfo, ...] | None = None  # what ``sources`` was derived from
    sources: dict[str, str] = field(default_factory=dict)
    norms: dict[str, torch.Tensor] = field(default_factory=dict)
    ages: TokenAges = field(default_factory=TokenAges)
    generator: torch.Generator | None = None
    first_timestep: float | None = None
    frames: int | None = None
    layers: int = 1


@dataclass(frozen=True)
class DuCa(Policy):
    """DuCa's full / aggressive / conservative cycle (see the module docstring for each step kind).

    ``interval``: period N (a full step every N steps); ``ratio``: share R of an MLP's tokens
    recomputed on conservative steps (DuCa: 0.1 on Open-Sora, 0.05 on DiT); ``early_full``: first
    steps always full (>= 1); ``direction``: "auto" (from the timesteps), "descending" or
    "ascending"; ``selection``: "vnorm" or "random"; ``age_weight``: weight of the cache-age term;
    ``cross_attention``: "reuse" or "partial" on conservative steps; ``seed``: for "random".
    """

    interval: int = 3
    ratio: float = 0.1
    early_full: int = 3
    direction: str = "auto"
    selection: str = "vnorm"
    age_weight: float = 0.25
    cross_attention: str = "reuse"
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"DuCa(interval={self.interval!r}): the period must be an int >= 1")
        if not 0.0 <= float(self.ratio) <= 1.0:
            raise ValueError(f"DuCa(ratio={self.ratio!r}): a share of tokens in [0, 1]")
        if isinstance(self.early_full, bool) or not isinstance(self.early_full, int) or self.early_full < 1:
            raise ValueError(f"DuCa(early_full={self.early_full!r}): an int >= 1 (the first step has no cache)")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"DuCa(direction={self.direction!r}): one of {', '.join(DIRECTIONS)}")
        if self.selection not in ("vnorm", "random"):
            raise ValueError(f"DuCa(selection={self.selection!r}): 'vnorm' or 'random'")
        if self.cross_attention not in ("reuse", "partial"):
            raise ValueError(f"DuCa(cross_attention={self.cross_attention!r}): 'reuse' or 'partial'")

    def new_state(self) -> TokenCacheState:
        return TokenCacheState()

    # -- branches ----------------------------------------------------------------------------------
    def watches(self, branch: BranchInfo, state: TokenCacheState) -> bool:
        # Token scores come from the residuals of branches with a token axis.
        return self.selection == "vnorm" and branch.partial

    def sources(self, branches: tuple[BranchInfo, ...], state: TokenCacheState) -> dict[str, str]:
        """Each branch's score source: its block's self-attention with the same tokens, or itself."""
        if state.branches is not branches:
            state.sources = {}
            for branch in branches:
                source = next(
                    (
                        b for b in branches
                        if b.block == branch.block and b.partial and b.tokens == branch.tokens
                        and _is_attention(b) and b.kind != CROSS_ATTENTION
                    ),
                    branch,
                )
                state.sources[branch.id] = source.id
            state.branches = branches
        return state.sources

    def observe(self, ctx, state, branch, new, previous) -> None:
        state.norms[branch.id] = token_norms(new[0])

    # -- schedule ----------------------------------------------------------------------------------
    def _descending(self, ctx: StepContext, state: TokenCacheState) -> bool:
        if self.direction != "auto":
            return self.direction == "descending"
        if ctx.timestep is None or state.first_timestep is None or ctx.timestep == state.first_timestep:
            raise PolicyError(
                "DuCa(direction='auto') reads the step direction from the model's timesteps, but this "
                "model's calls carry none (or the same one twice); pass direction='descending' "
                "(timesteps count down, DiT) or direction='ascending'"
            )
        return ctx.timestep < state.first_timestep

    def step_kind(self, ctx: StepContext, state: TokenCacheState) -> str:
        """The kind of this step: "full", "aggressive" or "conservative"."""
        if ctx.step == 0 or state.first_timestep is None:
            state.first_timestep = ctx.timestep
        if ctx.step < self.early_full:
            return FULL
        return cycle_kind(ctx.step, self.interval, self.early_full, self._descending(ctx, state))

    def plan(self, ctx: StepContext, state: TokenCacheState) -> Plan:
        kind = self.step_kind(ctx, state)
        ages = state.ages
        if kind == FULL or not ctx.branches:
            for branch in ctx.branches:
                ages.computed_all(branch.id)
            return Plan.compute_all()
        if kind == AGGRESSIVE:
            for branch in ctx.branches:
                ages.skipped(branch.id)
            return Plan.reuse_only(b.id for b in ctx.branches)
        self.sources(ctx.branches, state)
        reuse: list[str] = []
        partial: dict[str, torch.Tensor] = {}
        for branch in ctx.branches:
            recompute = not _is_attention(branch) or (
                branch.kind == CROSS_ATTENTION and self.cross_attention == "partial"
            )
            if not recompute:
                reuse.append(branch.id)
                ages.skipped(branch.id)
            elif not branch.partial:
                ages.computed_all(branch.id)  # computes fully: no valid partial form
            else:
                count = int(self.ratio * branch.tokens)
                if count == 0:
                    reuse.append(branch.id)
                    ages.skipped(branch.id)
                elif count >= branch.tokens:
                    ages.computed_all(branch.id)
                else:
                    partial[branch.id] = self.choose(branch, count, state)
        return Plan(frozenset(reuse), partial)

    # -- tokens ------------------------------------------------------------------------------------
    def scores(self, branch: BranchInfo, state: TokenCacheState) -> torch.Tensor:
        """The "vnorm" score of each of the branch's tokens (higher recomputes first)."""
        norms = state.norms.get(state.sources.get(branch.id, branch.id))
        if norms is None or norms.numel() != branch.tokens:
            norms = state.norms.get(branch.id)
        device = norms.device if norms is not None else None
        ages = state.ages.get(branch.id, branch.tokens, device)
        base = normalise(-norms) if norms is not None and norms.numel() == branch.tokens else torch.zeros_like(ages)
        return base + self.age_weight * ages / self.interval

    def choose(self, branch: BranchInfo, count: int, state: TokenCacheState) -> torch.Tensor:
        """The ``count`` tokens of ``branch`` to recompute this step (and age the others)."""
        if self.selection == "random":
            if state.generator is None:
                state.generator = torch.Generator().manual_seed(self.seed)
            indices = torch.sort(torch.randperm(branch.tokens, generator=state.generator)[:count]).values
        else:
            indices = top_tokens(self.scores(branch, state), count)
        state.ages.computed(branch.id, branch.tokens, indices)
        return indices
