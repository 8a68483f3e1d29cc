"""ax.compile: every plan variant compiled with fullgraph=True; no graph breaks, no recompiles over
generations, decisions and outputs equal to the eager transformed model."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import adacache_fx as ax
from adacache_lab.zoo import ZOO

STEPS = 20
POLICIES = {
    "static": lambda: ax.Static(2),
    "adacache": lambda: ax.AdaCache(codebook=((0.5, 3), (1e9, 1)), num_steps=STEPS),
    "first_block_cache": lambda: ax.FirstBlockCache(threshold=0.3),
    "teacache": lambda: ax.TeaCache(delta=0.5),
}


def _sample(out):
    return out[0] if isinstance(out, tuple) else out.sample


def _run_pair(name, make_policy, backend=None, compile_model=None):
    """Two 20-step generations, eager transformed vs compiled; returns (eager, transformed model
    that was compiled, per-step output differences, dynamo's graph count after the first one)."""
    entry = ZOO[name]
    eager = entry.build()
    compiled = entry.build()
    compiled.load_state_dict(eager.state_dict())
    ax.transform(eager, make_policy())
    ax.transform(compiled, make_policy())
    model = compiled
    compiled = compile_model(compiled) if compile_model else ax.compile(compiled, backend=backend)
    torch._dynamo.reset()
    counters.clear()
    diffs, graphs_after_warmup = [], None
    try:
        for gen in range(2):
            if gen == 1:  # warm: every variant this loop uses has compiled once
                graphs_after_warmup = counters["stats"]["unique_graphs"]
                torch._dynamo.config.error_on_recompile = True
            with torch.no_grad(), ax.generation(eager, num_steps=STEPS), ax.generation(model, num_steps=STEPS):
                for i in range(STEPS):
                    inputs = entry.inputs(timestep=999.0 - i * (999.0 / STEPS))
                    diffs.append(max_abs(_sample(eager(**inputs)), _sample(compiled(**inputs))))
    finally:
        torch._dynamo.config.error_on_recompile = False
    return eager, model, diffs, graphs_after_warmup


def max_abs(a, b):
    return (a - b).abs().max().item()


# Each model with two policies, each policy on two models; the plain torch.compile test below takes
# the other half of the model x policy square, so every pair runs compiled once.
AX_COMPILE_PAIRS = [("dit", "static"), ("dit", "teacache"), ("latte", "adacache"), ("latte", "first_block_cache"),
                    ("wan", "static"), ("wan", "adacache"), ("flux", "first_block_cache"), ("flux", "teacache")]
PLAIN_COMPILE_PAIRS = [(n, p) for n in ("dit", "latte", "wan", "flux") for p in sorted(POLICIES)
                       if (n, p) not in AX_COMPILE_PAIRS]


@pytest.mark.parametrize("name, policy_name", AX_COMPILE_PAIRS)
def test_compiled_variants_have_no_graph_breaks_or_recompiles(name, policy_name):
    eager, compiled, diffs, graphs_after_warmup = _run_pair(name, POLICIES[policy_name], "aot_eager")
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == graphs_after_warmup > 0  # nothing new in generation 2
    assert max(diffs) <= 1e-4
    plans = [(s.computed, s.reused) for s in ax.report(eager).steps]
    assert plans == [(s.computed, s.reused) for s in ax.report(compiled).steps]
    assert any(reused for _, reused in plans), "the policy never reused: the test would show nothing"


def test_inductor_compiled_latte_matches_eager():
    """The default backend, generating code on this CPU (slow to compile: one case)."""
    eager, compiled, diffs, graphs_after_warmup = _run_pair("latte", POLICIES["static"], "inductor")
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == graphs_after_warmup
    assert max(diffs) <= 1e-4


def test_compile_needs_a_transformed_model():
    with pytest.raises(ax.NotTransformedError):
        ax.compile(ZOO["dit"].build())


# -- scope="model": the whole model as one graph, each cached branch a torch.cond -------------------
def _run_whole(name, make_policy, backend="aot_eager"):
    return _run_pair(name, make_policy, compile_model=lambda model: ax.compile(model, scope="model", backend=backend))


@pytest.mark.parametrize(
    "name, policy_name, backend",
    # (DiT with Inductor: test_whole_model_follows_a_batch_change_with_inductor.)
    [("latte", "static", "aot_eager"), ("wan", "static", "aot_eager"),
     ("latte", "adacache", "aot_eager"),
     # In-step: First-Block-Cache decides inside the graph (torch.cond on a computed flag, its
     # reference residual as explicit state); on Flux its decisions change from step to step.
     ("flux", "first_block_cache", "inductor")],
)
def test_whole_model_compiles_to_one_graph_with_decisions_inside(name, policy_name, backend):
    """Inductor (the default) as well: its cond operands are pinned to the traced layouts."""
    eager, model, diffs, graphs_after_warmup = _run_whole(name, POLICIES[policy_name], backend)
    assert dict(counters["graph_break"]) == {}
    # One graph for every plan of both generations: plans change the reuse inputs, not the graph.
    assert counters["stats"]["unique_graphs"] == graphs_after_warmup == 1
    assert max(diffs) <= 1e-4
    plans = [(s.computed, s.reused) for s in ax.report(eager).steps]
    assert plans == [(s.computed, s.reused) for s in ax.report(model).steps]
    assert any(reused for _, reused in plans) and not all(reused for _, reused in plans)


def test_whole_model_scope_refuses_in_step_policies_without_an_in_graph_decision():
    entry = ZOO["dit"]
    with pytest.raises(ax.PolicyError, match="scope='blocks'"):
        ax.compile(ax.transform(entry.build(), ax.TeaCache()), scope="model")
    with pytest.raises(ValueError, match="scope="):
        ax.compile(ax.transform(entry.build(), ax.Static(2)), scope="graph")


# -- plain torch.compile, as users call it ----------------------------------------------------------
def _plain_compile_pair(name, make_policy, warm=False, compile_first=False, steps=8):
    """Eager transformed vs ``torch.compile(transformed)`` over two generations: per-step output
    differences, dynamo's graph breaks, and its graph count after the first generation."""
    entry = ZOO[name]
    eager = ax.transform(entry.build(), make_policy())
    if compile_first:  # torch.compile first, transform the compiled module
        model = ax.transform(torch.compile(entry.build()), make_policy())
    else:
        model = ax.transform(entry.build(), make_policy())
    # The block graphs compile with ax.compile's options: aot_eager keeps this test fast.
    ax.compile(model, backend="aot_eager")
    if warm:
        with torch.no_grad():
            for i in range(steps):
                model(**entry.inputs(timestep=999.0 - i * 100.0))
    compiled = model if compile_first else torch.compile(model)
    torch._dynamo.reset()
    counters.clear()
    diffs, graphs_after_warmup = [], None
    try:
        for gen in range(2):
            if gen == 1:
                graphs_after_warmup = counters["stats"]["unique_graphs"]
                torch._dynamo.config.error_on_recompile = True
            with torch.no_grad():
                for i in range(steps):
                    inputs = entry.inputs(timestep=999.0 - i * 100.0)
                    diffs.append(max_abs(_sample(eager(**inputs)), _sample(compiled(**inputs))))
    finally:
        torch._dynamo.config.error_on_recompile = False
    return eager, model, diffs, graphs_after_warmup


@pytest.mark.parametrize("name, policy_name", PLAIN_COMPILE_PAIRS)
def test_plain_torch_compile_cold_breaks_once_at_the_entry_and_never_recompiles(name, policy_name):
    """Compiled before its first call: the capture runs outside dynamo's trace (it used to fail)."""
    eager, model, diffs, graphs_after_warmup = _plain_compile_pair(name, POLICIES[policy_name])
    breaks = dict(counters["graph_break"])
    assert sum(breaks.values()) == 1 and "adacache_fx.compile(model, scope='model')" in next(iter(breaks))
    assert counters["stats"]["unique_graphs"] == graphs_after_warmup  # nothing new in generation 2
    assert max(diffs) <= 1e-4
    plans = [(s.computed, s.reused) for s in ax.report(eager).steps]
    assert plans == [(s.computed, s.reused) for s in ax.report(model).steps]
    assert any(reused for _, reused in plans)


# The orders of compiling, on a one-list model and a two-list one (every model compiles cold above).
@pytest.mark.parametrize("name", ["dit", "flux"])
def test_plain_torch_compile_after_an_eager_generation_and_on_a_compiled_module(name):
    for kwargs in ({"warm": True}, {"compile_first": True}):
        eager, model, diffs, graphs_after_warmup = _plain_compile_pair(name, POLICIES["static"], **kwargs)
        assert sum(counters["graph_break"].values()) == 1, kwargs
        assert counters["stats"]["unique_graphs"] == graphs_after_warmup, kwargs
        assert max(diffs) <= 1e-4, kwargs


def test_plain_torch_compile_with_inductor():
    """No ax.compile beforehand: the block graphs compile with Inductor (fullgraph=True)."""
    entry = ZOO["latte"]
    eager = ax.transform(entry.build(), ax.Static(2))
    compiled = torch.compile(ax.transform(entry.build(), ax.Static(2)))
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        for i in range(6):
            inputs = entry.inputs(timestep=999.0 - i * 100.0)
            assert max_abs(_sample(eager(**inputs)), _sample(compiled(**inputs))) <= 1e-4
    assert sum(counters["graph_break"].values()) == 1
    assert [s.reused > 0 for s in ax.report(compiled).steps] == [False, True] * 3


def test_fullgraph_torch_compile_says_why_and_names_the_one_graph_form():
    entry = ZOO["dit"]
    compiled = torch.compile(ax.transform(entry.build(), ax.Static(2)), fullgraph=True)
    with pytest.raises(Exception, match=r"adacache_fx\.compile\(model, scope='model'\)"):
        with torch.no_grad():
            compiled(**entry.inputs(timestep=500.0))


def test_whole_model_follows_a_batch_change_with_inductor():
    """Shapes re-specialise as in eager: batch 1 then 2 gets a graph each, caches per shape (DiT:
    the smallest zoo graph; Wan and Flux compile whole with Inductor above)."""
    entry = ZOO["dit"]
    eager = ax.transform(entry.build(), ax.Static(2))
    compiled = ax.compile(ax.transform(entry.build(), ax.Static(2)), scope="model")
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        for batch in (1, 2, 1):
            for i in range(4):
                inputs = entry.inputs(timestep=999.0 - i * 100.0, batch=batch)
                assert max_abs(_sample(eager(**inputs)), _sample(compiled(**inputs))) <= 1e-4, (batch, i)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 2  # one per batch size, whatever the plan
    plans = [(s.computed, s.reused) for s in ax.report(eager).steps]
    assert plans == [(s.computed, s.reused) for s in ax.report(compiled).steps]


def test_whole_model_made_again_after_a_block_edit_inside_a_generation_computes_that_step():
    """A block's weight edited in place at a reuse step: the whole-model graph is made again from an
    eager call that must store every branch (a block found changed in the middle of that call used to
    drop what the blocks before it had just stored: "the first call stored no residual"). That step and
    the next equal the untransformed model edited the same way; the one after reuses again."""
    entry = ZOO["dit"]
    reference, model = entry.build(), ax.transform(entry.build(), ax.Static(2))
    compiled = ax.compile(model, scope="model", backend="aot_eager")

    def edit(m):
        linear = next(sub for name, sub in m.named_modules() if ".1." in name and isinstance(sub, torch.nn.Linear))
        with torch.no_grad():
            linear.weight.mul_(0.9)

    with torch.no_grad():
        for step, t in enumerate((999.0, 899.0, 799.0, 699.0)):
            if step == 1:
                edit(reference)
                edit(model)
            got = _sample(compiled(**entry.inputs(timestep=t)))
            if step in (1, 2):
                assert max_abs(got, _sample(reference(**entry.inputs(timestep=t)))) <= 1e-5, step
    assert [s.reused > 0 for s in ax.report(model).steps] == [False, False, False, True]
    assert any(path == "the whole model" and "edited in place" in what for path, what in ax.report(model).recaptures)


def test_whole_model_keeps_its_graph_under_a_lora_scale_passed_with_each_call():
    """diffusers scales every LoRA layer inside the model's forward (``attention_kwargs={"scale": s}``)
    and back after it; the whole-model graph is checked outside the forward, against a guard recorded
    there (the blocks' guards, recorded inside, failed at every call: each call made the graph again and
    nothing was reused). Static(2) reuses at odd steps, equal to the eager model called alike."""
    from peft import LoraConfig

    entry = ZOO["wan"]
    eager, model = entry.build(), entry.build()
    for m in (eager, model):
        torch.manual_seed(1)
        m.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
        ax.transform(m, ax.Static(2))
    compiled = ax.compile(model, scope="model", backend="aot_eager")
    with torch.no_grad():
        for step in range(4):
            inputs = {**entry.inputs(timestep=999.0 - step * 100.0), "attention_kwargs": {"scale": 0.5}}
            assert max_abs(_sample(eager(**inputs)), _sample(compiled(**inputs))) <= 1e-5, step
    report = ax.report(model)
    assert [s.reused > 0 for s in report.steps] == [False, True, False, True] and not report.recaptures


def test_aot_inductor_package_runs_a_20_step_loop_like_eager(tmp_path):
    """torch._inductor.aoti_compile_and_package of the transformed model's one graph, loaded back."""
    entry = ZOO["dit"]
    eager = ax.transform(entry.build(), ax.Static(2))
    package = tmp_path / "dit.pt2"
    compiled = ax.compile(ax.transform(entry.build(), ax.Static(2)), scope="model", backend="aot_inductor",
                          options={"package_path": str(package)})
    diffs = []
    with torch.no_grad(), ax.generation(eager, num_steps=STEPS), ax.generation(compiled, num_steps=STEPS):
        for i in range(STEPS):
            inputs = entry.inputs(timestep=999.0 - i * (999.0 / STEPS))
            diffs.append(max_abs(_sample(eager(**inputs)), _sample(compiled(**inputs))))
    assert package.exists() and max(diffs) <= 1e-4
    plans = [(s.computed, s.reused) for s in ax.report(eager).steps]
    assert plans == [(s.computed, s.reused) for s in ax.report(compiled).steps]
    assert any(reused for _, reused in plans)


# -- the modules outside the blocks are compiled beside them -------------------------------------
def test_compile_compiles_the_modules_outside_the_blocks_and_follows_an_adapter_added_to_them():
    """Embedders and head compiled in place (what a reuse step mostly runs); an adapter PEFT adds
    to one of them afterwards is followed (dynamo's guards); restore takes the compile back."""
    from peft import LoraConfig, inject_adapter_in_model

    entry = ZOO["wan"]
    plain = entry.build()
    model = ax.compile(ax.transform(entry.build(), ax.Static(2)), backend="aot_eager")
    model.load_state_dict(plain.state_dict())
    paths = ax.get_runtime(model).outside.paths
    assert "condition_embedder" in paths and not any(p.startswith("blocks") for p in paths), paths
    compiled = [model.get_submodule(p) for p in paths]
    assert all(m._compiled_call_impl is not None for m in compiled)
    steps = 5
    with torch.no_grad(), ax.generation(model, num_steps=steps):
        for i in range(steps):
            inputs = entry.inputs(timestep=999.0 - 200.0 * i)
            if i == 2:  # mid-generation, into a compiled module outside the blocks
                config = LoraConfig(r=4, lora_alpha=4, target_modules=["linear_1"], init_lora_weights=False)
                for target in (plain, model):
                    torch.manual_seed(5)
                    inject_adapter_in_model(config, target.condition_embedder)
            out = _sample(model(**inputs))
            if i % 2 == 0:  # computing steps (Static(2)): what the plain model computes
                assert max_abs(out, _sample(plain(**inputs))) <= 1e-4, i
    assert [s.reused > 0 for s in ax.report(model).steps] == [False, True, False, True, False]
    ax.restore(model)
    assert all(m._compiled_call_impl is None for m in compiled)


@pytest.mark.parametrize("order", ["before", "after"])
def test_regional_compilation_compiles_the_captured_block_graphs(order):
    """diffusers' ``compile_repeated_blocks`` (``nn.Module.compile`` on each block) before or after
    transform: the blocks' captured graphs are compiled (before: with torch.compile's defaults, the
    options given then cannot be read back; after: with the options given), the wrapper's Python never
    traced, the modules outside the blocks left eager; outputs equal the untransformed model's.
    Before the change, after-transform raised (no block of the class names) and before-transform ran
    the graphs uncompiled, silently. Restore gives the model its own ``_repeated_blocks`` back."""
    entry = ZOO["wan"]
    reference, model = entry.build(), entry.build()
    graphs = []

    def counting(gm, example_inputs):  # a backend that records each graph it is given
        graphs.append(gm)
        return gm.forward

    if order == "before":
        model.compile_repeated_blocks(backend=counting)
        ax.transform(model, ax.NoCache())
        with torch.no_grad():  # the blocks are bound at their first call: their graphs compile then
            model(**entry.inputs(timestep=999.0))
        assert ax.get_runtime(model).executor.graphs.options["backend"] == "inductor"
    else:
        ax.transform(model, ax.NoCache())
    model.compile_repeated_blocks(backend=counting)
    runner = ax.get_runtime(model).executor.graphs
    assert runner.options["backend"] is counting and runner.options["fullgraph"]
    model.compile_repeated_blocks(backend=counting)  # the same options again: the runner is kept
    assert ax.get_runtime(model).executor.graphs is runner
    torch._dynamo.reset()
    with torch.no_grad():
        for t in (999.0, 500.0):
            assert max_abs(_sample(model(**entry.inputs(timestep=t))), _sample(reference(**entry.inputs(timestep=t)))) <= 1e-5
    # One plan variant of one block structure (both blocks share the capture): one graph, no breaks.
    assert len(graphs) == 1, [g.code[:200] for g in graphs]
    assert model.condition_embedder._compiled_call_impl is None  # regional: only the blocks
    with pytest.raises(TypeError, match="keyword arguments only"):
        model.blocks[0].compile(counting)
    ax.restore(model)
    assert "_repeated_blocks" not in model.__dict__ and type(model.blocks[0]).__name__ == "WanTransformerBlock"


def test_modules_compiled_inside_blocks_are_followed_and_compiled_wrappers_refused():
    """``nn.Module.compile`` on a module inside a block: the block's captured graph stands in for that
    compiled call, so the blocks' graphs are compiled (they ran uncompiled, silently). A list of
    ``torch.compile(block)`` wrappers is refused, naming what works."""
    entry = ZOO["dit"]
    reference, model = entry.build(), entry.build()
    for module in model.modules():
        if type(module).__name__ == "FeedForward":
            module.compile(backend="eager")
    ax.transform(model, ax.NoCache())
    assert not ax.get_runtime(model).executor.graphs.compiling
    with torch.no_grad():
        assert max_abs(_sample(model(**entry.inputs())), _sample(reference(**entry.inputs()))) <= 1e-5
    assert ax.get_runtime(model).executor.graphs.compiling

    wrapped = entry.build()
    wrapped.transformer_blocks[0] = torch.compile(wrapped.transformer_blocks[0])
    with pytest.raises(ax.NoBlocksFoundError, match=r"torch\.compile'd modules .*compile_repeated_blocks"):
        ax.transform(wrapped, ax.NoCache())


def test_cuda_graph_mode_keeps_each_cached_branch_at_one_address():
    """mode="reduce-overhead": stored residuals are copied out of the graphs' output pool into
    buffers that keep their address over the generation (static inputs when reused). On this CPU
    Inductor runs no CUDA graph; the buffers and the results are what is checked."""
    entry = ZOO["wan"]
    eager = ax.transform(entry.build(), ax.Static(2, kinds=("mlp",)))
    model = ax.transform(entry.build(), ax.Static(2, kinds=("mlp",)))
    model.load_state_dict(eager.state_dict())
    ax.compile(model, mode="reduce-overhead")
    addresses = []
    with torch.no_grad(), ax.generation(eager, num_steps=6), ax.generation(model, num_steps=6):
        for i in range(6):
            inputs = entry.inputs(timestep=999.0 - 150.0 * i)
            assert max_abs(_sample(eager(**inputs)), _sample(model(**inputs))) <= 1e-4
            cached = ax.get_runtime(model).cached_residuals()
            assert cached, "Static(kinds=('mlp',)) keeps each MLP's residual"
            addresses.append({branch: [t.data_ptr() for t in values] for branch, values in cached.items()})
    assert all(a == addresses[0] for a in addresses[1:])
    assert [s.reused > 0 for s in ax.report(model).steps] == [False, True, False, True, False, False]
