"""Folded spans: one residual per stream for each span of blocks reused together.

* every zoo architecture (multi-stream Flux double and single blocks, CogVideoX, SD3, HunyuanVideo
  included): a folded Static(2) generation equals the per-branch one up to float rounding, with
  the same plans, and holds fewer bytes;
* HunyuanDiT's long skips (a block's output read by a later block): the span is cut there;
* First-Block-Cache, TeaCache and AdaCache fold too (the same plans as per-branch);
* a Wan2.1-14B-shaped 720p, 81-frame run on meta tensors (no weights): the cache per call slot,
  from the tensors' shapes, is one stream's hidden states for Static;
* ``cache_budget`` refuses a generation that holds more.
"""

from __future__ import annotations

import pytest
import torch

import adacache_fx as ax
from adacache_lab.zoo import ZOO
from conftest import ProjectionAttention

STEPS = 7


def _generation(name, policy, fold, steps=STEPS, captures=None):
    entry = ZOO[name]
    model = ax.transform(entry.build(), policy, fold=fold, captures=captures)
    outs = []
    with torch.no_grad(), ax.generation(model, num_steps=steps):
        for i in range(steps):
            outs.append(entry.output(model(**entry.inputs(timestep=999.0 - 120.0 * i))))
    return model, outs


@pytest.mark.parametrize("name", sorted(ZOO))
def test_folded_spans_equal_per_branch_reuse_up_to_rounding(name, captures):
    per_branch, expected = _generation(name, ax.Static(2), fold=False, captures=captures)
    folded, got = _generation(name, ax.Static(2), fold=True, captures=captures)
    assert max((a - b).abs().max().item() for a, b in zip(got, expected)) <= 1e-5
    plans = [(s.computed, s.reused) for s in ax.report(folded).steps]
    assert plans == [(s.computed, s.reused) for s in ax.report(per_branch).steps]
    assert any(reused for _, reused in plans)
    report = ax.report(folded)
    assert 0 < report.cache_peak_bytes < ax.report(per_branch).cache_peak_bytes
    assert report.folded_spans == 0  # the generation context freed them on exit


def test_a_span_ends_where_a_later_block_reads_a_block_output():
    """HunyuanDiT feeds early blocks' outputs to later blocks (long skips): inside a span a
    replay would hand them other values, so the spans end at those blocks."""
    entry = ZOO["hunyuandit"]
    model = ax.transform(entry.build(), ax.Static(2))
    with torch.no_grad():
        model(**entry.inputs(timestep=999.0))
        spans = ax.get_runtime(model).session().caches.spans(0)
    paths = [[b.path for b in span.bindings] for span in spans]
    layers = model.config.num_layers  # HunyuanDiT keeps block i's output for a later block while i < layers // 2 - 1
    sources = {f"blocks.{i}" for i in range(layers // 2 - 1)}
    assert paths and sources, paths
    assert all(not sources.intersection(p[:-1]) for p in paths), paths  # a skip source ends its span
    assert any(len(p) > 1 for p in paths), paths  # blocks with no skip read elsewhere do fold together
    folded = ax.get_runtime(model).folded_residuals()
    assert list(folded) == [f"{p[0]} .. {p[-1]}" for p in paths]
    assert all(r.shape == (1, *r.shape[1:]) for rs in folded.values() for r in rs)


@pytest.mark.parametrize("name", ["flux", "wan", "latte", "hunyuandit"])
@pytest.mark.parametrize("policy", [
    lambda: ax.FirstBlockCache(threshold=0.3), lambda: ax.TeaCache(delta=0.5),
    lambda: ax.AdaCache(codebook=((0.5, 3), (1e9, 1)), num_steps=10),
], ids=["first_block_cache", "teacache", "adacache"])
def test_in_step_and_adaptive_policies_fold_with_the_same_plans(name, policy, captures):
    per_branch, expected = _generation(name, policy(), fold=False, steps=10, captures=captures)
    folded, got = _generation(name, policy(), fold=True, steps=10, captures=captures)
    assert max((a - b).abs().max().item() for a, b in zip(got, expected)) <= 1e-5
    plans = [(s.computed, s.reused) for s in ax.report(folded).steps]
    assert plans == [(s.computed, s.reused) for s in ax.report(per_branch).steps]
    assert any(reused for _, reused in plans)


def test_policies_that_need_each_branch_do_not_fold():
    for policy in (ax.PAB(), ax.TaylorSeer(ax.Static(2)), ax.FasterCache(), ax.DuCa(), ax.ToCa(),
                   ax.Static(2, kinds=("mlp",)), ax.AdaCache(per_layer=True)):
        assert not ax.get_runtime(ax.transform(ZOO["dit"].build(), policy)).caps.folds, policy


def test_wan_14b_720p_cache_per_call_slot_from_shapes():
    """Wan2.1-14B at 720p, 81 frames (21 x 90 x 160 latents, 75,600 tokens of width 5120) on meta
    tensors: per-branch caching needed ~93 GB per call slot; a folded span holds one stream."""
    from diffusers import WanTransformer3DModel

    config = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
    with torch.device("meta"):
        base = WanTransformer3DModel(**config).to(torch.bfloat16)
    inputs = dict(hidden_states=torch.empty(1, 16, 21, 90, 160, dtype=torch.bfloat16, device="meta"),
                  timestep=torch.empty(1, device="meta"),
                  encoder_hidden_states=torch.empty(1, 512, 4096, dtype=torch.bfloat16, device="meta"),
                  return_dict=False)
    stream = 75_600 * 5120 * 2  # one bf16 stream
    held = {}
    for name, policy in (("static", ax.Static(2)), ("adacache", ax.AdaCache.fast(50))):
        model = ax.transform(base, policy)
        with torch.no_grad(), ax.generation(model, num_steps=50):
            model(**inputs)  # a computing step: what every later step holds
            held[name] = ax.report(model).cache_bytes_per_slot[0]
        ax.restore(model)
    assert held["static"] == stream  # 0.77 GB: one residual over all 40 blocks
    assert held["static"] <= 2e9
    # AdaCache adds its metric branch's residual (float32 inside Wan's blocks), kept at the stream's
    # precision for its next comparison: 1.55 GB.
    assert held["adacache"] == 2 * stream and held["adacache"] <= 2e9


def test_cache_budget_refuses_with_what_holds_the_caches():
    entry = ZOO["wan"]
    small = ax.transform(entry.build(), ax.Static(2), cache_budget=1_000)
    with pytest.raises(ax.CacheBudgetError, match="cache_budget=1000"), torch.no_grad():
        small(**entry.inputs(timestep=999.0))
    roomy = ax.transform(entry.build(), ax.Static(2), cache_budget=10**9)
    with torch.no_grad():
        roomy(**entry.inputs(timestep=999.0))
    with pytest.raises(ValueError, match="cache_budget"):
        ax.transform(entry.build(), ax.Static(2), cache_budget=-1)


def test_adacache_metric_kept_at_the_stream_precision_decides_alike():
    """Folded, AdaCache keeps its metric branch's residual at the stream's precision (bf16 here; Wan's
    blocks compute it in float32): its distances move by ~1e-3 relative and its plans stay the same."""
    entry = ZOO["wan"]

    def run(fold: bool):
        model = ax.transform(entry.build().to(torch.bfloat16),
                             ax.AdaCache(codebook=((0.22, 3), (0.3, 2), (1e9, 1)), num_steps=12), fold=fold)
        x = entry.inputs()["hidden_states"].to(torch.bfloat16)
        with torch.no_grad(), ax.generation(model, num_steps=12):
            for step in range(12):
                kwargs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
                          for k, v in entry.inputs(timestep=999.0 - 80 * step).items()}
                x = x - 0.05 * entry.output(model(**{**kwargs, "hidden_states": x}))
            distances = [t["distance"] for t in ax.policy_state(model).trace]
        report = ax.report(model)
        return [(s.computed, s.reused) for s in report.steps], distances, report.cache_peak_bytes

    plans, distances, peak = run(False)
    folded_plans, folded_distances, folded_peak = run(True)
    assert folded_plans == plans and any(reused for _, reused in plans)
    assert all(abs(a - b) <= 1e-2 * abs(b) for a, b in zip(folded_distances, distances))
    assert folded_peak < peak


class _Block(torch.nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.attn = ProjectionAttention(dim)
        self.gain = torch.nn.Linear(dim, dim)

    def forward(self, x, temb):
        if isinstance(temb, list):
            temb = temb[0]
        return x + self.attn(x) * self.gain(temb)


class _Toy(torch.nn.Module):
    """Three blocks taking the stream and a per-call embedding; ``per_block`` hands each block its
    own embedding object (equal or, from block ``odd_from`` on, of another dtype); ``in_a_list``
    hands every block one list holding it, whose item is replaced from block ``odd_from`` on.
    (``odd_from`` is an argument of the call: an attribute set on the model would be a change of the
    model, which drops the caches before the call.)"""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([_Block() for _ in range(3)])
        self.per_block = False
        self.in_a_list = False

    def forward(self, hidden_states, timestep, odd_from=None):
        temb = timestep.reshape(1, 1, 1).expand(1, 1, 8) / 1000
        embeddings = [temb]
        for i, block in enumerate(self.blocks):
            odd = odd_from is not None and i >= odd_from
            if self.in_a_list:
                if odd:
                    embeddings[0] = temb.to(torch.float64)
                hidden_states = block(hidden_states, embeddings)
                continue
            if self.per_block:
                temb = temb.clone()
                if odd:
                    temb = temb.to(torch.float64)
            hidden_states = block(hidden_states, temb)
        return hidden_states


def test_a_replayed_span_checks_each_later_blocks_call_against_what_it_recorded():
    """A span's later blocks pass their stream on when called as recorded, whether the model hands
    them the same embedding object or an equal new one each; called otherwise (here: another dtype),
    the replay refuses, naming the span, as the general path always did."""
    torch.manual_seed(0)
    reference = _Toy()
    x = torch.randn(1, 4, 8)
    outs = {}
    for per_block in (False, True):
        model = ax.transform(_Toy(), ax.Static(2))
        model.load_state_dict(reference.state_dict())
        model.per_block = per_block
        with torch.no_grad(), ax.generation(model, num_steps=3):
            outs[per_block] = [model(x, torch.tensor([t])) for t in (999.0, 900.0)]
        assert [s.reused for s in ax.report(model).steps] == [0, 3]
    assert all(torch.equal(a, b) for a, b in zip(outs[False], outs[True]))
    model = ax.transform(_Toy(), ax.Static(2))
    model.per_block = True
    with torch.no_grad(), ax.generation(model, num_steps=3):
        model(x, torch.tensor([999.0]))
        with pytest.raises(ax.AdaCacheError, match=r"folded span starting at blocks\.0"):
            model(x, torch.tensor([900.0]), odd_from=2)
    # The same list object handed to every block, its item replaced before the last: a block called
    # with the very objects the one before it was passes on only when those are immutable.
    model = ax.transform(_Toy(), ax.Static(2))
    model.load_state_dict(reference.state_dict())
    model.in_a_list = True
    with torch.no_grad(), ax.generation(model, num_steps=6):
        assert all(torch.equal(model(x, torch.tensor([t])), expected) for t, expected in zip((999.0, 900.0), outs[False]))
        model(x, torch.tensor([800.0]))  # computes; the next call reuses
        with pytest.raises(ax.AdaCacheError, match=r"folded span starting at blocks\.0"):
            model(x, torch.tensor([700.0]), odd_from=2)


def test_a_weight_replaced_between_replays_is_not_kept_alive_by_the_span_check():
    """The joint check of a span's blocks holds the tensors their guards checked; a block whose guard
    fails (its weight replaced, as quantizing does) drops it, so the old weight is freed at once, not
    at the next reusing step."""
    import gc
    import weakref

    entry = ZOO["dit"]
    model = ax.transform(entry.build(), ax.Static(2))
    with torch.no_grad(), ax.generation(model, num_steps=6):
        model(**entry.inputs(timestep=999.0))
        model(**entry.inputs(timestep=900.0))  # a reusing step: the span's joint check is built
        layer = next(m for m in model.transformer_blocks[1].original.modules() if isinstance(m, torch.nn.Linear))
        old = weakref.ref(layer.weight)
        layer.weight = torch.nn.Parameter(layer.weight.detach().clone())
        model(**entry.inputs(timestep=800.0))  # computes: the block's guard fails, it is captured anew
    assert [s.reused > 0 for s in ax.report(model).steps] == [False, True, False]
    gc.collect()
    assert old() is None


@__import__("dataclasses").dataclass(frozen=True)
class _EveryOtherAsList(ax.Policy):
    """Static(2)'s schedule from a user policy that lists the reused branches (a list, not a frozenset)."""

    def plan(self, ctx, state):
        return ax.Plan.compute_all() if ctx.step % 2 == 0 else ax.Plan(reuse=[b.id for b in ctx.branches])

    def folds(self) -> bool:
        return True


def test_a_plan_listing_its_reused_branches_replays_folded_spans_as_a_frozenset_does():
    torch.manual_seed(0)
    reference = _Toy()
    x = torch.randn(1, 4, 8)
    outs = []
    for policy in (ax.Static(2), _EveryOtherAsList()):
        model = ax.transform(_Toy(), policy)
        model.load_state_dict(reference.state_dict())
        with torch.no_grad(), ax.generation(model, num_steps=6):
            outs.append([model(x, torch.tensor([t])) for t in (999.0, 900.0, 800.0, 700.0)])
        assert [s.reused for s in ax.report(model).steps] == [0, 3, 0, 3]
    assert all(torch.equal(a, b) for a, b in zip(*outs))


class _ListBlock(_Block):
    def forward(self, x, temb):
        return [super().forward(x, temb)]


class _ListToy(torch.nn.Module):
    """Blocks return a one-item list, which the model empties (``pop``) before the next block."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([_ListBlock() for _ in range(4)])

    def forward(self, hidden_states, timestep):
        temb = timestep.reshape(1, 1, 1).expand(1, 1, 8) / 1000
        for block in self.blocks:
            hidden_states = block(hidden_states, temb).pop()
        return hidden_states


def test_a_replayed_block_returning_a_list_gives_each_caller_its_own():
    """Later blocks called with the same objects share leaves, but a mutable result is never handed
    to two callers: here the model empties each block's list before calling the next."""
    torch.manual_seed(0)
    reference = _ListToy()
    x = torch.randn(1, 4, 8)
    outs = []
    for fold in (False, True):
        model = ax.transform(_ListToy(), ax.Static(2), fold=fold)
        model.load_state_dict(reference.state_dict())
        with torch.no_grad(), ax.generation(model, num_steps=6):
            outs.append([model(x, torch.tensor([t])) for t in (999.0, 900.0, 800.0, 700.0)])
        assert [s.reused for s in ax.report(model).steps] == [0, 4, 0, 4]
    assert all(torch.allclose(a, b, atol=1e-6, rtol=0) for a, b in zip(*outs))


def test_two_call_slots_at_different_shapes_each_keep_their_span_check(monkeypatch):
    """Each step calls the model twice (two call slots), at two token counts: two bindings per block,
    two spans. The joint guard check of each is built once, not again at every reusing call."""
    from adacache_fx.runtime import executor

    built = []

    class CountedGuardSet(executor.GuardSet):
        def __init__(self, guards):
            built.append(len(guards))
            super().__init__(guards)

    monkeypatch.setattr(executor, "GuardSet", CountedGuardSet)
    torch.manual_seed(0)
    model = ax.transform(_Toy(), ax.Static(2))
    inputs = (torch.randn(1, 4, 8), torch.randn(1, 6, 8))
    with torch.no_grad(), ax.generation(model, num_steps=10):
        for t in (999.0, 900.0, 800.0, 700.0, 600.0, 500.0):
            for x in inputs:
                model(x, torch.tensor([t]))
    assert [s.reused for s in ax.report(model).steps] == [0, 6, 0, 6, 0, 6]  # both slots, each step
    assert built == [2, 2]
