"""The core contract: exactness with NoCache, reuse semantics, FLOP savings, restore, on real diffusers DiTs."""

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import adacache_fx as ax
from adacache_lab.zoo import ZOO

from conftest import ALL_MODELS, max_diff

TIMESTEPS = (999.0, 800.0, 600.0, 400.0)


def _run(model, entry, timesteps, **kw):
    with torch.no_grad():
        return [entry.output(model(**entry.inputs(timestep=t, **kw))) for t in timesteps]


@pytest.mark.parametrize("name", ALL_MODELS)
def test_nocache_is_exact_and_restore_gives_back_the_original_blocks(name):
    entry = ZOO[name]
    reference_model = entry.build()
    model = entry.build()
    original_modules = dict(model.named_modules())
    keys_before = list(model.state_dict())
    expected = _run(reference_model, entry, TIMESTEPS, batch=2)

    ax.transform(model, ax.NoCache())
    assert list(model.state_dict()) == keys_before  # the wrapper shares the block's state
    got = _run(model, entry, TIMESTEPS, batch=2)
    for g, e in zip(got, expected):
        assert max_diff(g, e) <= 1e-5
    report = ax.report(model)
    assert report.branches, "no residual branch found"
    assert report.compute_fraction == 1.0

    assert ax.restore(model) is model
    assert not ax.is_transformed(model)
    restored = dict(model.named_modules())
    assert restored.keys() == original_modules.keys()
    assert all(restored[k] is original_modules[k] for k in restored)
    for g, e in zip(_run(model, entry, TIMESTEPS, batch=2), expected):
        assert torch.equal(g, e)


def _stream_of(args, kwargs):
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


@pytest.mark.parametrize("name", ["dit", "pixart", "latte", "wan", "ltxvideo", "allegro"])
def test_reuse_step_equals_stream_plus_cached_residuals(name):
    """Independent reference: the *original* model with every block replaced by x + sum(cached residuals).
    fold=False keeps each branch's residual; tests/test_fold.py checks folded spans against this."""
    entry = ZOO[name]
    model = ax.transform(entry.build(), ax.Static(interval=2, warmup=1, cooldown=0), fold=False)
    with ax.generation(model, num_steps=10):
        _run(model, entry, (999.0,))  # step 0: compute and store
        cached = {k: v for k, v in ax.get_runtime(model).cached_residuals().items()}
        got = _run(model, entry, (900.0,))[0]  # step 1: reuse everything
    assert ax.report(model).steps[-1].computed == 0

    reference_model = entry.build()
    hooks = []
    for list_name in {b.block_list for b in ax.report(model).branches}:
        for index, block in enumerate(reference_model.get_submodule(list_name)):
            residuals = [v[0] for k, v in cached.items() if k.startswith(f"{list_name}.{index}.")]

            def replace(module, args, kwargs, output, residuals=residuals):
                stream = _stream_of(args, kwargs)
                return (stream.float() + sum(r.float() for r in residuals)).to(stream.dtype)

            hooks.append(block.register_forward_hook(replace, with_kwargs=True))
    expected = _run(reference_model, entry, (900.0,))[0]
    assert max_diff(got, expected) <= 1e-5


@pytest.mark.parametrize("name", ["dit", "pixart", "latte", "cogvideox", "wan", "flux", "hunyuanvideo", "sd3", "mochi", "ltxvideo"])
def test_reuse_step_flops_drop_by_the_branches_share(name):
    entry = ZOO[name]
    model = ax.transform(entry.build(), ax.Static(interval=2, warmup=1, cooldown=0))
    kwargs = [entry.inputs(timestep=t) for t in (999.0, 900.0, 800.0)]
    with torch.no_grad(), ax.generation(model, num_steps=10):
        model(**kwargs[0])  # step 0 captures (export must not run under the counter)
        model(**kwargs[1])  # step 1: reuse
        with FlopCounterMode(display=False) as compute_counter:
            model(**kwargs[2])  # step 2: compute
    with torch.no_grad(), ax.generation(model, num_steps=10):
        model(**kwargs[0])
        with FlopCounterMode(display=False) as reuse_counter:
            model(**kwargs[1])
    compute_flops = compute_counter.get_total_flops()
    reuse_flops = reuse_counter.get_total_flops()
    branch_flops = sum(b.flops for b in ax.report(model).branches)
    share = branch_flops / compute_flops
    assert share > 0.5, f"branches cover only {share:.0%} of the model's FLOPs"
    saved = compute_flops - reuse_flops
    assert saved >= 0.9 * branch_flops, (
        f"reuse step saves {saved} FLOPs, less than 90% of the branches' {branch_flops}"
    )


def test_static_schedule_and_report():
    entry = ZOO["pixart"]
    model = ax.transform(entry.build(), ax.Static(interval=2, warmup=1, cooldown=1))
    with ax.generation(model, num_steps=10):
        _run(model, entry, [1000.0 - 100 * i for i in range(10)])
    report = ax.report(model)
    computed_steps = [s.step for s in report.steps if s.reused == 0]
    assert computed_steps == [0, 2, 4, 6, 8, 9]
    assert report.compute_fraction == pytest.approx(6 / 10)
    text = str(report)
    assert "transformer_blocks.0.attn1" in text and "cross_attention" in text
    assert "compute_fraction 0.600" in text
    assert report.cache_bytes == 0  # freed when the generation context closed


def test_static_kinds_restricts_caching():
    entry = ZOO["pixart"]
    model = ax.transform(entry.build(), ax.Static(interval=2, kinds=("mlp",)))
    with ax.generation(model, num_steps=4):
        _run(model, entry, (999.0, 900.0))
    last = ax.report(model).steps[-1]
    mlp_branches = [b for b in ax.report(model).branches if b.kind == "mlp"]
    assert last.reused == len(mlp_branches) and last.computed == len(ax.report(model).branches) - len(mlp_branches)


def test_live_weights_are_shared_not_copied():
    entry = ZOO["dit"]
    model = ax.transform(entry.build(), ax.NoCache())
    before = _run(model, entry, (500.0,))[0]
    with torch.no_grad():
        model.transformer_blocks[0].ff.net[2].weight.mul_(2.0)
    after = _run(model, entry, (400.0, 500.0))[-1]
    reference = entry.build()
    with torch.no_grad():
        reference.transformer_blocks[0].ff.net[2].weight.mul_(2.0)
    assert not torch.equal(before, after)
    assert max_diff(after, _run(reference, entry, (500.0,))[0]) <= 1e-5


def test_dtype_change_recaptures():
    entry = ZOO["pixart"]
    model = ax.transform(entry.build(), ax.NoCache())
    _run(model, entry, (500.0,))
    model.double()
    reference = entry.build().double()
    inputs = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in entry.inputs(timestep=400.0).items()}
    with torch.no_grad():
        got = entry.output(model(**inputs))
        expected = entry.output(reference(**inputs))
    assert got.dtype == torch.float64
    assert max_diff(got, expected) <= 1e-10


def test_separate_cond_uncond_calls_get_separate_caches():
    """A pipeline that calls the transformer twice per step (cond, uncond: the same latent, other
    text) must not mix their caches."""
    entry = ZOO["pixart"]
    both = ax.transform(entry.build(), ax.Static(interval=2))
    cond_only = ax.transform(entry.build(), ax.Static(interval=2))
    uncond_only = ax.transform(entry.build(), ax.Static(interval=2))
    for step, t in enumerate((999.0, 900.0, 800.0, 700.0)):
        cond = entry.inputs(timestep=t, seed=1)
        uncond = {**entry.inputs(timestep=t, seed=2), "hidden_states": cond["hidden_states"]}
        with torch.no_grad():
            a_cond, a_uncond = entry.output(both(**cond)), entry.output(both(**uncond))
            b = entry.output(cond_only(**cond))
            c = entry.output(uncond_only(**uncond))
        assert torch.equal(a_cond, b) and torch.equal(a_uncond, c), f"step {step}"
    steps = ax.report(both).steps
    assert [s.calls for s in steps] == [2, 2, 2, 2]
    assert steps[1].reused == 2 * len(ax.report(both).branches)


def test_new_generation_when_timestep_goes_back_up():
    entry = ZOO["dit"]
    model = ax.transform(entry.build(), ax.Static(interval=2))
    _run(model, entry, (999.0, 900.0, 800.0, 999.0, 900.0))
    steps = ax.report(model).steps
    assert [(s.generation, s.step) for s in steps] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    assert steps[3].reused == 0  # a new generation starts with empty caches


def test_new_shape_mid_generation_recaptures_and_never_reuses_a_stale_cache(caplog):
    entry = ZOO["pixart"]
    model = ax.transform(entry.build(), ax.Static(interval=2, warmup=1))
    reference = entry.build()
    small = entry.inputs(timestep=999.0)
    big = {**entry.inputs(timestep=900.0), "hidden_states": torch.randn(1, 4, 12, 12)}
    with torch.no_grad(), ax.generation(model, num_steps=10):
        model(**small)
        with caplog.at_level("WARNING", logger="adacache_fx"):
            got = entry.output(model(**big))  # a reuse step, but nothing cached at this shape
        expected = entry.output(reference(**big))
    assert max_diff(got, expected) <= 1e-5
    assert ax.report(model).steps[-1].reused == 0
    assert "new input shapes" in caplog.text


def test_structurally_identical_blocks_share_one_capture():
    entry = ZOO["flux"]
    model = ax.transform(entry.build(), ax.NoCache())
    _run(model, entry, (500.0,))
    runtime = ax.get_runtime(model)
    shared = {b.path: id(next(iter(b.bindings.values())).program) for b in runtime.blocks}
    # The double blocks see identical inputs: one capture. Single block 1 gets strided slices of
    # block 0's output (other strides), so it is captured for its own layout: three in all.
    assert shared["transformer_blocks.0"] == shared["transformer_blocks.1"]
    assert shared["single_transformer_blocks.0"] != shared["single_transformer_blocks.1"]
    assert len(runtime.programs) == 3


class _DropoutBlock(torch.nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim)
        self.dropout = torch.nn.Dropout(0.1)

    def forward(self, x):
        inner = self.dropout(self.proj(x)).contiguous()
        return x + inner, self.dropout(x)


def test_capture_drops_free_copies_but_keeps_an_output_from_aliasing_the_input():
    """Eval dropout and .contiguous() cost nothing in eager; export makes them clones. Inner clones are
    dropped (they cost ~6% of a Latte call); a clone that keeps an output apart from the input stays."""
    from adacache_fx.passes.capture import capture_block

    block = _DropoutBlock().eval()
    x = torch.randn(2, 4, 8)
    captured = capture_block(block, (x,), {}, "block")
    clones = [n for n in captured.graph_module.graph.nodes if n.target is torch.ops.aten.clone.default]
    output = next(n for n in captured.graph_module.graph.nodes if n.op == "output")
    assert len(clones) == 1 and clones[0] in output.args[0], captured.graph_module.code
    out = captured.graph_module(*[p for p in block.parameters()], x)
    torch.testing.assert_close(out[0], block(x)[0], rtol=0, atol=0)
    assert out[1].data_ptr() != x.data_ptr()


def test_a_capture_at_new_shapes_is_not_taken_for_a_change_of_the_model():
    """Export swaps a block's parameters and back while it captures: the guards must not read
    that as the user changing the model (which would drop the block's caches at every new shape)."""
    entry = ZOO["wan"]
    model = ax.transform(entry.build(), ax.Static(2))
    with torch.no_grad():
        for batch in (1, 2, 1, 2):
            for step in range(2):
                model(**entry.inputs(timestep=999.0 - 100.0 * step, batch=batch))
    report = ax.report(model)
    assert report.recaptures == []
    assert [s.reused > 0 for s in report.steps] == [False, True] * 4
