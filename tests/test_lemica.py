"""LeMiCa (arXiv 2511.00090): the lexicographic minimax schedule search, its cost recording, and the
static schedule as a policy on five real diffusers architectures."""

import doctest
import itertools
import math
import random

import pytest
import torch

import adacache_fx as ax
import adacache_fx.policies.lemica as lemica_module
from adacache_fx.errors import PolicyError
from adacache_fx.policies.base import BranchInfo, Capabilities, Plan, StepContext
from adacache_fx.policies.lemica import (
    PUBLISHED,
    PUBLISHED_STEPS,
    LeMiCa,
    lexicographic_minimax_path,
    path_errors,
    record_costs,
)
from adacache_lab.sampling import sample
from adacache_lab.zoo import ZOO, latte
from policy_driver import Live
from conftest import ProjectionAttention

INF = math.inf


def _matrix(n, edges):
    """An n x n cost matrix with the given {(i, j): cost}; unlisted edges of span >= 2 are forbidden."""
    rows = [[INF] * n for _ in range(n)]
    for (i, j), cost in edges.items():
        rows[i][j] = cost
    return rows


# -- the search on hand-made cost matrices ------------------------------------------------------------
def test_minimax_beats_the_shortest_path_on_a_hand_made_matrix():
    # 5 steps, 3 computed: 0 -> x -> 4 for x in 1, 2, 3.
    #   x = 1: edges (0,1) = 0 and (1,4) = 5  -> sorted (5, 0), sum 5
    #   x = 2: edges (0,2) = 3 and (2,4) = 3  -> sorted (3, 3), sum 6
    #   x = 3: edges (0,3) = 4 and (3,4) = 0  -> sorted (4, 0), sum 4
    costs = _matrix(5, {(1, 4): 5.0, (0, 2): 3.0, (2, 4): 3.0, (0, 3): 4.0})
    assert lexicographic_minimax_path(costs, 3) == (0, 2, 4)  # the smallest worst error, 3
    assert lexicographic_minimax_path(costs, 3, objective="sum") == (0, 3, 4)  # the smallest total, 4
    assert path_errors(costs, (0, 2, 4)) == (3.0, 3.0)


def test_equal_worst_errors_are_decided_by_the_next_one_then_by_the_tie_rule():
    #   x = 1: (3, 0);  x = 2: (3, 1);  x = 3: (3, 0)
    costs = _matrix(5, {(1, 4): 3.0, (0, 2): 3.0, (2, 4): 1.0, (0, 3): 3.0})
    # (3, 1) loses on the second worst error; (0, 1, 4) and (0, 3, 4) tie: read backwards,
    # (4, 1, 0) < (4, 3, 0).
    assert lexicographic_minimax_path(costs, 3) == (0, 1, 4)


def test_lexicographic_order_is_deeper_than_the_maximum():
    # 6 steps, 3 computed; only 0 -> 2 -> 5 and 0 -> 3 -> 5 are allowed. Both have the worst error 5
    # (a plain minimax ties, and the tie rule would take 0 -> 2 -> 5); the second worst decides.
    #   0 -> 2 -> 5: (0,2) = 4, (2,5) = 5  -> (5, 4)
    #   0 -> 3 -> 5: (0,3) = 5, (3,5) = 2  -> (5, 2)
    costs = _matrix(6, {(0, 2): 4.0, (2, 5): 5.0, (0, 3): 5.0, (3, 5): 2.0})
    assert lexicographic_minimax_path(costs, 3) == (0, 3, 5)
    assert path_errors(costs, (0, 3, 5)) == (5.0, 2.0)


def test_budget_extremes_spans_and_forbidden_edges():
    costs = [[float(j - i) ** 2 for j in range(6)] for i in range(6)]
    assert lexicographic_minimax_path(costs, 6) == (0, 1, 2, 3, 4, 5)
    assert lexicographic_minimax_path(costs, 2) == (0, 5)
    # The costliest edge of a 3-step path over 6 steps spans at least 3 steps: 0 -> 2 -> 5 or 0 -> 3 -> 5
    # (worst 9 either way, then 4): the tie rule takes 0 -> 2 -> 5.
    assert lexicographic_minimax_path(costs, 3) == (0, 2, 5)
    assert lexicographic_minimax_path(costs, 4, max_span=2) == (0, 1, 3, 5)
    with pytest.raises(ValueError, match="no schedule"):
        lexicographic_minimax_path(costs, 2, max_span=4)
    costs[0][5] = INF
    with pytest.raises(ValueError, match="no schedule"):
        lexicographic_minimax_path(costs, 2)
    # (i, i+1) entries are never read: consecutive computed steps reuse nothing.
    costs = [[INF] * 4 for _ in range(4)]
    assert lexicographic_minimax_path(costs, 4) == (0, 1, 2, 3)
    assert lexicographic_minimax_path([[0.0]], 1) == (0,)


def _brute_force(costs, budget, max_span, objective):
    n = len(costs)
    best = None
    for middle in itertools.combinations(range(1, n - 1), budget - 2):
        path = (0, *middle, n - 1)
        if max_span is not None and any(j - i > max_span for i, j in zip(path, path[1:])):
            continue
        errors = tuple(sorted((0.0 if j == i + 1 else float(costs[i][j]) for i, j in zip(path, path[1:])),
                              reverse=True))
        if any(math.isinf(e) for e in errors):
            continue
        key = errors if objective == "lexicographic" else sum(errors)
        if best is None or key < best[0] or (key == best[0] and path[::-1] < best[1][::-1]):
            best = (key, path)
    return best


@pytest.mark.parametrize("objective", ["lexicographic", "sum"])
def test_the_search_is_exact_against_brute_force(objective):
    rng = random.Random(0)
    for trial in range(20):
        n = rng.randint(3, 8)
        # Few distinct values, so that ties are frequent; some edges forbidden.
        costs = [[rng.choice([0.0, 1.0, 2.0, 3.0, INF]) if j - i >= 2 else 0.0 for j in range(n)] for i in range(n)]
        for budget in range(2, n + 1):
            for max_span in (None, 2, 3):
                expected = _brute_force(costs, budget, max_span, objective)
                if expected is None:
                    with pytest.raises(ValueError):
                        lexicographic_minimax_path(costs, budget, max_span=max_span, objective=objective)
                    continue
                path = lexicographic_minimax_path(costs, budget, max_span=max_span, objective=objective)
                assert path == expected[1], (trial, costs, budget, max_span)


def test_the_search_checks_its_inputs():
    good = [[0.0] * 4 for _ in range(4)]
    with pytest.raises(ValueError, match="square"):
        lexicographic_minimax_path([[0.0, 1.0]], 1)
    with pytest.raises(ValueError, match="budget"):
        lexicographic_minimax_path(good, 1)
    with pytest.raises(ValueError, match="budget"):
        lexicographic_minimax_path(good, 5)
    with pytest.raises(ValueError, match="budget"):
        lexicographic_minimax_path(good, 2.0)
    with pytest.raises(ValueError, match="objective"):
        lexicographic_minimax_path(good, 2, objective="max")
    with pytest.raises(ValueError, match="max_span"):
        lexicographic_minimax_path(good, 2, max_span=0)
    bad = [row[:] for row in good]
    bad[0][2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        lexicographic_minimax_path(bad, 2)
    bad[0][2] = -1.0
    with pytest.raises(ValueError, match=">= 0"):
        lexicographic_minimax_path(bad, 2)
    # Torch tensors and numpy arrays work as well as lists.
    assert lexicographic_minimax_path(torch.zeros(4, 4), 2) == (0, 3)


# -- the policy -----------------------------------------------------------------------------------------
BRANCHES = tuple(
    BranchInfo(id=f"blocks.{b}.{name}", block=f"blocks.{b}", block_list="blocks", block_index=b, depth=b,
               name=name, kind=kind, tags=frozenset({kind}), flops=None, num_residuals=1)
    for b in range(2) for name, kind in (("attn1", "self_attention"), ("ff", "mlp"))
)
ALL_IDS = frozenset(b.id for b in BRANCHES)


def _ctx(step, num_steps=8):
    return StepContext(step=step, num_steps=num_steps, timestep=None, generation=0, branches=BRANCHES)


def test_policy_computes_on_its_steps_and_reuses_every_branch_elsewhere():
    live = Live(LeMiCa(compute_steps=(6, 0, 1, 3, 3), num_steps=8))
    assert live.compute_steps == (0, 1, 3, 6) and live.budget == 4
    assert LeMiCa(compute_steps=torch.tensor([5, 0, 2])).compute_steps == (0, 2, 5)  # tensors, numpy ints
    plans = [live.plan(_ctx(step)) for step in range(8)]
    assert [p == Plan.compute_all() for p in plans] == [True, True, False, True, False, False, True, False]
    assert all(p.reuse == ALL_IDS for p in plans if p != Plan.compute_all())
    # Without num_steps the schedule ends after its last computed step; later steps compute.
    open_ended = LeMiCa(compute_steps=(0, 2))
    assert [open_ended.plan(_ctx(s, None), None) == Plan.compute_all() for s in range(5)] == [
        True, False, True, True, True]
    caps = Capabilities.of(live.policy)
    assert not caps.decides_in_step and not caps.forecasts and not caps.observes


def test_policy_refuses_another_step_count_and_bad_settings():
    policy = LeMiCa(compute_steps=(0, 3, 7), num_steps=8)
    with pytest.raises(PolicyError, match="for 8 steps but this generation has 10"):
        policy.plan(_ctx(0, num_steps=10), None)
    assert policy.plan(_ctx(0, num_steps=None), None) == Plan.compute_all()  # unknown: trusted
    with pytest.raises(ValueError, match="step 0 must compute"):
        LeMiCa(compute_steps=(1, 3))
    with pytest.raises(ValueError, match="step 0 must compute"):
        LeMiCa(compute_steps=())
    with pytest.raises(ValueError, match="ints >= 0"):
        LeMiCa(compute_steps=(0, -1))
    with pytest.raises(ValueError, match="ints >= 0"):
        LeMiCa(compute_steps=(0, True))
    with pytest.raises(ValueError, match="sequence of ints"):
        LeMiCa(compute_steps=5)
    with pytest.raises(ValueError, match="not a step of a 8-step"):
        LeMiCa(compute_steps=(0, 8), num_steps=8)
    with pytest.raises(ValueError, match="num_steps"):
        LeMiCa(compute_steps=(0,), num_steps=0)


def test_published_schedules():
    assert set(PUBLISHED) == {"flux1-dev", "qwen-image", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-i2v-14b"}
    for model, schedules in PUBLISHED.items():
        steps = PUBLISHED_STEPS[model]
        for budget, computed in schedules.items():
            policy = LeMiCa.published(model, budget)
            assert policy.budget == budget == len(computed)
            assert policy.compute_steps == computed and policy.num_steps == steps
            assert computed[0] == 0 and computed[-1] == steps - 1
            # Every published schedule's longest reuse span is at most 7 steps (docs/algorithms/lemica.md).
            assert max(j - i for i, j in zip(computed, computed[1:])) <= 7
    assert LeMiCa.published("qwen-image", 10).compute_steps == (0, 1, 3, 7, 14, 21, 28, 35, 42, 49)
    with pytest.raises(ValueError, match="published schedules are for"):
        LeMiCa.published("sd3", 10)
    with pytest.raises(ValueError, match="published budgets are"):
        LeMiCa.published("flux1-dev", 11)


def test_from_costs_and_docstring_examples():
    costs = _matrix(5, {(1, 4): 5.0, (0, 2): 3.0, (2, 4): 3.0, (0, 3): 4.0})
    assert LeMiCa.from_costs(costs, 3) == LeMiCa(compute_steps=(0, 2, 4), num_steps=5)
    results = doctest.testmod(lemica_module, verbose=False)
    assert results.attempted >= 4 and results.failed == 0


# -- real diffusers architectures --------------------------------------------------------------------
ARCHITECTURES = ["dit", "pixart", "latte", "wan", "flux"]
STEPS = 6


def _timesteps():
    return [999.0 - i * (999.0 / STEPS) for i in range(STEPS)]


def _outputs(model, entry):
    outs = []
    with torch.no_grad(), ax.generation(model, num_steps=STEPS):
        for t in _timesteps():
            outs.append(entry.output(model(**entry.inputs(timestep=t))).clone())
    return outs


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_on_real_architectures(name):
    entry = ZOO[name]
    reference = entry.build()
    with torch.no_grad():
        expected = [entry.output(reference(**entry.inputs(timestep=t))) for t in _timesteps()]

    # Every step in the schedule: the transformed model is the model.
    exact = ax.transform(entry.build(), LeMiCa(compute_steps=range(STEPS), num_steps=STEPS))
    for got, want in zip(_outputs(exact, entry), expected):
        assert torch.equal(got, want)
    assert ax.report(exact).compute_fraction == 1.0

    model = ax.transform(entry.build(), LeMiCa(compute_steps=(0, 1, 3, 5), num_steps=STEPS))
    got = _outputs(model, entry)
    report = ax.report(model)
    assert [s.step for s in report.steps if s.reused] == [2, 4]
    assert all(s.computed == 0 for s in report.steps if s.reused)  # every branch is reused
    for step in (0, 1, 3, 5):  # computed steps see the model's own inputs: exact
        torch.testing.assert_close(got[step], expected[step], rtol=0, atol=1e-5)
    for step in (2, 4):
        assert (got[step] - expected[step]).abs().max() > 0


# -- recording the costs -------------------------------------------------------------------------------
COST_STEPS = 4


def test_recorded_costs_are_the_final_output_errors_of_each_reuse_edge():
    torch.manual_seed(0)
    model, inputs = latte(num_layers=2, heads=2, head_dim=16, frames=2, sample_size=8, text_len=4, text_dim=16)

    def run(m, i):
        return sample(m, inputs, num_steps=COST_STEPS, seed=i, progress=False).latents

    costs = record_costs(model, run, COST_STEPS, runs=1)
    assert costs.shape == (COST_STEPS, COST_STEPS) and costs.dtype == torch.float64
    for i in range(COST_STEPS):
        for j in range(COST_STEPS):
            if j <= i:
                assert math.isinf(costs[i, j])
            elif j == i + 1:
                assert costs[i, j] == 0.0
            else:
                assert 0.0 < costs[i, j] < INF, (i, j)
    assert not ax.is_transformed(model)

    # An edge's cost is what the schedule with that one reuse span does to the final output.
    with torch.no_grad():
        reference = run(model, 0)
        ax.transform(model, LeMiCa(compute_steps=(0, 3), num_steps=COST_STEPS))
        with ax.generation(model, num_steps=COST_STEPS):
            cached = run(model, 0)
        ax.restore(model)
    assert (cached - reference).abs().mean().item() == pytest.approx(costs[0, 3].item(), rel=1e-5)

    # The search on the recorded costs returns the brute-force optimum.
    best = _brute_force(costs.tolist(), 3, None, "lexicographic")
    assert LeMiCa.from_costs(costs, 3).compute_steps == best[1]

    # A wrong step count or a transformed model fails (the first before running a single edge).
    with pytest.raises(ValueError, match="made 4 denoising step"):
        record_costs(model, run, 5)
    assert not ax.is_transformed(model)
    ax.transform(model, ax.Static(2))
    with pytest.raises(PolicyError, match="untransformed"):
        record_costs(model, run, COST_STEPS)


class _Block(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.attn = ProjectionAttention(dim)

    def forward(self, hidden_states, t):
        return hidden_states + torch.tanh(self.attn(hidden_states)) * t


class _ToyModel(torch.nn.Module):
    def __init__(self, dim=8, depth=2):
        super().__init__()
        self.blocks = torch.nn.ModuleList(_Block(dim) for _ in range(depth))

    def forward(self, hidden_states, timestep):
        t = timestep.reshape(-1, 1, 1) / 1000.0
        for block in self.blocks:
            hidden_states = block(hidden_states, t)
        return hidden_states


def _toy_run(steps):
    def run(model, r):
        x = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(r))
        for i in range(steps):
            x = x - 0.3 * model(x, torch.full((1,), 999.0 - 150.0 * i))  # a sampler: reuse moves x
        return x

    return run


def test_recorded_costs_average_over_inputs_and_respect_max_span():
    torch.manual_seed(0)
    model, steps = _ToyModel(), 6
    run = _toy_run(steps)
    both = record_costs(model, run, steps, runs=2, max_span=3)
    first = record_costs(model, run, steps, runs=1, max_span=3)
    second = record_costs(model, lambda m, r: run(m, r + 1), steps, runs=1, max_span=3)
    finite = torch.isfinite(both)
    assert torch.equal(finite, torch.isfinite(first))
    torch.testing.assert_close(both[finite], (first[finite] + second[finite]) / 2, rtol=1e-9, atol=1e-12)
    for i in range(steps):
        for j in range(i + 1, steps):
            assert math.isfinite(both[i, j]) == (j - i <= 3), (i, j)
            if 2 <= j - i <= 3:
                assert both[i, j] > 0
    assert LeMiCa.from_costs(both, 3, max_span=3).compute_steps == _brute_force(both.tolist(), 3, 3, "lexicographic")[1]
