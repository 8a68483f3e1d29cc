"""The runtime side of in-step decisions: signals read inside a call, plans applied to the rest of it."""

import pytest
import torch

import adacache_fx as ax
from adacache_fx.errors import PolicyError
from adacache_fx.policies.base import InStepSignal, Plan, Policy
from adacache_lab.zoo import ZOO


class _Probe(Policy):
    """Records every signal; reuses the blocks after the first on odd steps.

    ``seen`` is the test's record across calls (an instrument, not generation state: the probe
    learns nothing, so it keeps no state object)."""

    def __init__(self, kind: str, blocks: int = 1) -> None:
        self.signal = InStepSignal(kind, blocks)
        self.seen: list[tuple[int, int, torch.Tensor]] = []

    def in_step_signal(self) -> InStepSignal:
        return self.signal

    def plan(self, ctx, state):
        return Plan.compute_all()

    def decide(self, ctx, state, slot, signal):
        self.seen.append((ctx.step, slot, signal.clone()))
        if ctx.step % 2:
            return Plan.reuse_only(b.id for b in ctx.branches if b.depth >= self.signal.blocks)
        return Plan.compute_all()


def _first_block(model):
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) and "Block" in type(m[0]).__name__]
    return lists[0][0]


@pytest.mark.parametrize("name", ["pixart", "latte", "wan", "flux"])
def test_modulated_input_is_what_the_first_attention_projects(name):
    entry = ZOO[name]
    reference = entry.build()
    model = entry.build()
    model.load_state_dict(reference.state_dict())
    seen = []
    block = _first_block(reference)
    attention = next(m for n, m in block.named_modules() if n.startswith(("attn", "attn1")) and hasattr(m, "to_q"))
    hook = attention.to_q.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    inputs = entry.inputs(timestep=700.0)
    with torch.no_grad():
        reference(**inputs)
    hook.remove()
    policy = _Probe("modulated_input")
    ax.transform(model, policy)
    with torch.no_grad():
        model(**inputs)
    signal = policy.seen[0][2]
    expected = seen[0]
    assert signal.numel() == expected.numel()
    torch.testing.assert_close(signal.reshape(expected.shape), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["pixart", "latte", "cogvideox", "flux"])
def test_first_blocks_residual_is_the_stream_change_and_the_decision_applies(name):
    entry = ZOO[name]
    reference = entry.build()
    model = entry.build()
    model.load_state_dict(reference.state_dict())
    block = _first_block(reference)
    seen = {}
    block.register_forward_pre_hook(lambda mod, args, kwargs: seen.setdefault("in", (args, kwargs)), with_kwargs=True)
    block.register_forward_hook(lambda mod, args, kwargs, out: seen.setdefault("out", out), with_kwargs=True)
    with torch.no_grad():
        reference(**entry.inputs(timestep=900.0))
    args, kwargs = seen["in"]
    stream_in = kwargs.get("hidden_states", args[0] if args else None)
    out = seen["out"]
    outs = out if isinstance(out, tuple) else (out,)
    stream_out = next(o for o in outs if o.shape == stream_in.shape)

    policy = _Probe("first_blocks_residual")
    ax.transform(model, policy)
    with torch.no_grad():
        for t in (900.0, 700.0, 500.0):
            model(**entry.inputs(timestep=t))
    torch.testing.assert_close(policy.seen[0][2], stream_out - stream_in, rtol=1e-5, atol=1e-5)
    report = ax.report(model)
    first = {b.id for b in report.branches if b.depth == 0}
    assert [s.in_step_reuse for s in report.steps] == [0, 1, 0]
    # Step 1 reused every branch but the first block's.
    assert report.steps[1].computed == len(first)
    assert report.steps[1].reused == len(report.branches) - len(first)


def test_in_step_decisions_are_per_call_slot():
    entry = ZOO["pixart"]
    model = entry.build()
    policy = _Probe("first_blocks_residual")
    ax.transform(model, policy)
    with torch.no_grad():
        for t in (900.0, 700.0):
            cond = entry.inputs(timestep=t, seed=0)
            # The two calls of one step see the same latent (another latent at the same timestep
            # starts a new generation), as in test_core's separate cond/uncond calls.
            model(**cond)
            model(**{**entry.inputs(timestep=t, seed=1), "hidden_states": cond["hidden_states"]})
    assert [(step, slot) for step, slot, _ in policy.seen] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert ax.report(model).steps[1].in_step_reuse == 2


def test_nocache_exact_with_an_in_step_policy_that_never_reuses():
    class Never(_Probe):
        def decide(self, ctx, state, slot, signal):
            return Plan.compute_all()

    entry = ZOO["latte"]
    reference = entry.build()
    model = entry.build()
    model.load_state_dict(reference.state_dict())
    ax.transform(model, Never("modulated_input"))
    with torch.no_grad():
        for t in (900.0, 700.0):
            inputs = entry.inputs(timestep=t)
            torch.testing.assert_close(model(**inputs).sample, reference(**inputs).sample, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "name, frames", [("latte", "hidden"), ("cogvideox", "hidden_cog"), ("wan", "hidden"), ("ltxvideo", "num_frames"), ("pixart", None)]
)
def test_frames_are_derived_from_the_latent_shape(name, frames):
    entry = ZOO[name]
    model = entry.build()
    inputs = entry.inputs(timestep=500.0)
    contexts = []

    class Recording(ax.Static):  # policies are frozen: record the contexts in a subclass's plan
        def plan(self, ctx, state):
            contexts.append(ctx)
            return super().plan(ctx, state)

    policy = Recording(2)
    ax.transform(model, policy)
    with torch.no_grad():
        model(**inputs)
    hidden = inputs["hidden_states"]
    patch_t = getattr(model.config, "patch_size_t", None) or 1
    expected = {
        "hidden": hidden.shape[2] if hidden.ndim == 5 else None,
        "hidden_cog": hidden.shape[1] // patch_t if hidden.ndim == 5 else None,
        "num_frames": inputs.get("num_frames"),
        None: None,
    }[frames]
    if name == "wan":
        expected = hidden.shape[2] // model.config.patch_size[0]
    assert contexts[0].frames == expected
    if frames is not None:
        assert expected is not None and expected >= 1


def test_in_step_signal_validation():
    with pytest.raises(PolicyError, match="unknown in-step signal"):
        InStepSignal("attention_map")
    with pytest.raises(PolicyError, match="must be >= 1"):
        InStepSignal("first_blocks_residual", blocks=0)
