"""What a transformed model found and did, as data and as a readable table."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..policies.base import BranchInfo
from .runtime import ModelRuntime
from .session import StepRecord


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def _fmt_flops(flops: int | None) -> str:
    if flops is None:
        return "n/a"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.2f}{unit}"
    return str(flops)


def _fmt_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


@dataclass
class Report:
    policy: str
    decides_in_step: bool
    branches: tuple[BranchInfo, ...]
    block_flops: dict[str, int | None]
    model_flops: int | None
    steps: list[StepRecord]
    left_alone: list[tuple[str, str]]
    uncached: dict[str, str]
    cache_bytes: int
    notes: list[str] = field(default_factory=list)
    recaptures: list[tuple[str, str]] = field(default_factory=list)  # (block, what changed)
    # (where, what changed) where no block's guard looks (adapter tensors rewritten in place, the modules
    # outside the blocks): the caches were dropped, nothing captured again
    cache_drops: list[tuple[str, str]] = field(default_factory=list)
    sessions: int = 1  # callers (threads) with a session of their own
    cache_bytes_per_slot: dict[int, int] = field(default_factory=dict)  # held now, by call slot
    cache_peak_bytes: int = 0  # the most held at once in the last generation (largest session)
    folded_spans: int = 0  # spans held as one residual per stream (transform(fold=True))
    # Context parallelism: the group the policy's metrics were summed over (None: one process), and
    # how many collectives those decisions took (cache bytes are then this rank's shard).
    parallel: str | None = None
    reduced_decisions: int = 0
    # Blocks export could not take whole, cached branch child by branch child: path -> what and why.
    eager: dict[str, str] = field(default_factory=dict)
    # Blocks of step-invariant lists (inputs equal at every step) that returned their recorded outputs.
    invariant: list[str] = field(default_factory=list)

    @property
    def compute_fraction(self) -> float | None:
        """Fraction of branch executions that computed fully (since transform or the last reset);
        token-subset recomputes (:attr:`StepRecord.partial`) count as not computed here, branches
        of cond-only guidance calls (:attr:`Plan.skip_uncond`) as computed, and :attr:`flops_fraction`
        says what both cost."""
        computed = sum(s.computed for s in self.steps)
        total = computed + sum(s.reused + s.partial for s in self.steps)
        return computed / total if total else None

    @property
    def flops_fraction(self) -> float | None:
        """Fraction of branch FLOPs that ran (since transform or the last reset)."""
        total = sum(s.flops_total for s in self.steps)
        return sum(s.flops_computed for s in self.steps) / total if total else None

    def branch_share(self, branch: BranchInfo) -> float | None:
        """The branch's share of the model's FLOPs per call (of all blocks' if the model total is unknown)."""
        denominator = self.model_flops or sum(f for f in self.block_flops.values() if f) or None
        if branch.flops is None or denominator is None:
            return None
        return branch.flops / denominator

    def plans(self) -> list[tuple[int, int, str]]:
        """(generation, step, 'C'/'R' string per step: computed vs reused branch executions;
        '/nP' is added for steps with token-subset recomputes, '/cond-only' for steps that ran the
        cond half of batched guidance only)."""
        return [
            (s.generation, s.step, f"{s.computed}C/{s.reused}R" + (f"/{s.partial}P" if s.partial else "")
             + (f"/{s.exact}E" if s.exact else "")
             + ("/cond-only" if s.cond_only else ""))
            for s in self.steps
        ]

    def __str__(self) -> str:
        share_of = "model" if self.model_flops else "blocks"
        lines = [f"adacache_fx report — policy {self.policy}"]
        lines.append(
            "decisions: " + ("inside each step (data-dependent)" if self.decides_in_step
                             else "schedule-driven (known before each step)")
        )
        if not self.branches:
            lines.append("no branches captured yet: run the model once")
        else:
            rows = []
            for b in self.branches:
                share = self.branch_share(b)
                rows.append([
                    b.id, b.kind, ",".join(sorted(b.tags - {b.kind})) or "-", str(b.num_residuals),
                    _fmt_flops(b.flops), f"{100 * share:.1f}%" if share is not None else "n/a",
                ])
            lines.append(_table(["branch", "kind", "also", "residuals", "FLOPs/call", f"share of {share_of}"], rows))
            shares = [self.branch_share(b) for b in self.branches]
            if all(s is not None for s in shares):
                lines.append(f"branches cover {100 * sum(shares):.1f}% of the {'model' if self.model_flops else 'blocks'} FLOPs")
        for path, reason in self.left_alone:
            lines.append(f"left alone: {path} ({reason})")
        for path, reason in self.uncached.items():
            lines.append(f"UNCACHED: {path}: {reason}")
        for path, reason in self.eager.items():
            lines.append(f"BRANCHES ONLY: {path}: {reason}")
        if self.invariant:
            lines.append(f"step-invariant (same inputs every step, outputs reused exactly from step 2 on): "
                         f"{', '.join(self.invariant)}")
        if self.steps:
            with_partial = any(s.partial for s in self.steps)  # the column only when it says something
            many = self.sessions > 1
            rows = [
                ([str(s.session)] if many else [])
                + [str(s.generation), str(s.step), "-" if s.timestep is None else f"{s.timestep:g}",
                   str(s.calls), str(s.computed), str(s.reused)]
                + ([str(s.partial)] if with_partial else [])
                + [f"{s.flops_computed / s.flops_total:.2f}" if s.flops_total else "-"]
                for s in self.steps[-40:]
            ]
            if len(self.steps) > 40:
                lines.append(f"(last 40 of {len(self.steps)} steps)")
            headers = (["session"] if many else []) + ["gen", "step", "timestep", "calls", "computed", "reused"]
            headers += (["partial"] if with_partial else []) + ["FLOP frac"]
            lines.append(_table(headers, rows))
        cf, ff = self.compute_fraction, self.flops_fraction
        lines.append(
            f"compute_fraction {cf:.3f}, branch FLOP fraction {ff:.3f}" if cf is not None and ff is not None
            else "compute_fraction n/a (no branch executed yet)"
        )
        lines.append(f"cache held: {_fmt_bytes(self.cache_bytes)}"
                     + (f" over {self.sessions} sessions (threads)" if self.sessions > 1 else "")
                     + (f", {self.folded_spans} folded span(s)" if self.folded_spans else "")
                     + f"; peak in the last generation {_fmt_bytes(self.cache_peak_bytes)}")
        if self.parallel is not None:
            lines.append(f"{self.parallel}: policy metrics summed over the group before each decision "
                         f"({self.reduced_decisions} reduction(s)); caches hold this rank's shard")
        if self.recaptures:
            lines.append(f"re-captured after the model changed: {len(self.recaptures)} time(s)")
            for path, what in self.recaptures[-5:]:
                lines.append(f"  {path}: {what}")
        if self.cache_drops:
            lines.append(f"caches dropped after the model changed where no capture looks: {len(self.cache_drops)} time(s)")
            for where, what in self.cache_drops[-5:]:
                lines.append(f"  {where}: {what}")
        lines.extend(self.notes)
        return "\n".join(lines)


def build_report(runtime: ModelRuntime) -> Report:
    notes = []
    for program in runtime.programs.values():
        notes.extend(n for n in program.notes if n not in notes)
    sessions = runtime.sessions
    steps = [record for session in sessions for record in session.records]
    return Report(
        policy=repr(runtime.policy),
        decides_in_step=runtime.caps.decides_in_step,
        branches=runtime.branch_tuple,
        block_flops=dict(runtime.block_flops),
        model_flops=runtime.model_flops,
        steps=steps,
        left_alone=list(runtime.left_alone),
        uncached=dict(runtime.uncached_blocks),
        eager=dict(runtime.eager_blocks),
        invariant=sorted({path for session in sessions for path in session.caches.invariant.replayed}),
        cache_bytes=runtime.cache_bytes(),
        notes=[f"note: {n}" for n in notes],
        recaptures=list(runtime.recaptures),
        cache_drops=list(runtime.cache_drops),
        sessions=max(1, len(sessions)),
        cache_bytes_per_slot=runtime.cache_bytes_per_slot(),
        cache_peak_bytes=max((session.caches.peak for session in sessions), default=0),
        folded_spans=sum(len(session.caches.spans(slot)) for session in sessions
                         for slot in session.caches.slots()),
        parallel=next((s.group.description for s in sessions if s.group.world_size > 1), None),
        reduced_decisions=sum(getattr(g, "reductions", 0) for g in {id(s.group): s.group for s in sessions}.values()),
    )
