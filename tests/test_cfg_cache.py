"""FasterCache's CFG-Cache: the frequency split on known signals, its schedule, and the runtime's
cond-only guidance calls checked against the untransformed model step by step."""

import math

import pytest
import torch

import adacache_fx as ax
from adacache_fx.policies.fastercache import from_spectrum, low_frequency_mask, split_frequencies
from adacache_lab.zoo import ZOO
from policy_driver import Live

STEPS = 12


def _wave(cycles_y: int, cycles_x: int, size: int = 32) -> torch.Tensor:
    y = torch.arange(size).view(-1, 1) / size
    x = torch.arange(size).view(1, -1) / size
    return torch.cos(2 * math.pi * (cycles_y * y + cycles_x * x))


def test_frequency_split_separates_a_known_low_and_high_wave():
    low_wave, high_wave = _wave(1, 1), _wave(0, 9)  # |f| = 1.4 inside the radius-6 disc, 9 outside
    signal = (2.0 * low_wave + 0.5 * high_wave).expand(2, 3, 32, 32)
    low, high = split_frequencies(signal)
    assert torch.allclose(from_spectrum(low), 2.0 * low_wave.expand_as(signal), atol=1e-5)
    assert torch.allclose(from_spectrum(high), 0.5 * high_wave.expand_as(signal), atol=1e-5)
    mask = low_frequency_mask(32, 32)
    assert mask[16, 16] and mask[16, 22] and not mask[16, 23]  # radius min(H, W) // 5 = 6


def test_rebuild_weights_each_band_by_stage():
    cond = torch.randn(1, 4, 2, 32, 32, generator=torch.Generator().manual_seed(0))
    low_bias, high_bias = 0.3 * _wave(1, 0), -0.2 * _wave(7, 5)
    uncond = cond + low_bias + high_bias
    ctx = lambda step: ax.StepContext(step=step, num_steps=10, timestep=None, generation=0, branches=())
    # compound_weights=False: the paper's rebuild, each band weighted once.
    policy = Live(ax.FasterCache(cfg_cache=True, alpha=0.2, cfg_split=0.5, num_steps=10, compound_weights=False))
    policy.observe_guidance(None, 0, cond, uncond)
    early = policy.rebuild_uncond(ctx(2), 0, cond)
    late = policy.rebuild_uncond(ctx(8), 0, cond)
    assert torch.allclose(early, cond + 1.2 * low_bias + high_bias, atol=1e-5)
    assert torch.allclose(late, cond + low_bias + 1.2 * high_bias, atol=1e-5)
    # The default, the authors' code and diffusers' hook: the weighted bands are kept, so the weights
    # compound over consecutive skipped steps.
    policy = Live(ax.FasterCache(cfg_cache=True, alpha=0.2, cfg_split=0.5, num_steps=10))
    policy.observe_guidance(None, 0, cond, uncond)
    first, second = policy.rebuild_uncond(ctx(2), 0, cond), policy.rebuild_uncond(ctx(3), 0, cond)
    assert torch.allclose(first, cond + 1.2 * low_bias + high_bias, atol=1e-5)
    assert torch.allclose(second, cond + 1.44 * low_bias + high_bias, atol=1e-5)
    policy.observe_guidance(None, 0, cond, uncond)  # a full guidance step stores the bias anew
    assert torch.allclose(policy.rebuild_uncond(ctx(8), 0, cond), cond + low_bias + 1.2 * high_bias, atol=1e-5)
    plain = Live(ax.FasterCache(cfg_cache=True, alpha=0.0, num_steps=10))
    plain.observe_guidance(None, 0, cond, uncond)
    assert torch.allclose(plain.rebuild_uncond(ctx(8), 0, cond), uncond, atol=1e-6)


def test_cfg_schedule_skips_all_but_every_interval_step_from_start():
    policy = ax.FasterCache(cfg_cache=True, cfg_start=0.3, cfg_interval=5)
    skips = [s for s in range(20) if policy.skips_uncond(s, 20)]
    assert skips == [7, 8, 9, 10, 12, 13, 14, 15, 17, 18]  # full at 6, 11, 16 and the last step
    assert not any(ax.FasterCache().skips_uncond(s, 20) for s in range(20))  # off by default


def test_bad_settings_say_what_is_wrong():
    with pytest.raises(ValueError, match="cfg_layout"):
        ax.FasterCache(cfg_cache=True, cfg_layout="cond_last")
    with pytest.raises(ValueError, match="cfg_interval"):
        ax.FasterCache(cfg_cache=True, cfg_interval=1)
    policy = Live(ax.FasterCache(cfg_cache=True, alpha=0.2))
    with pytest.raises(ax.PolicyError, match="alpha=0"):
        policy.observe_guidance(None, 0, torch.zeros(2, 16, 8), torch.ones(2, 16, 8))


def _step_inputs(entry, step):
    return entry.inputs(timestep=999.0 - step * 999.0 / STEPS, batch=2, seed=step)


@pytest.mark.parametrize("layout", ["uncond_first", "cond_first"])
@pytest.mark.parametrize("name", ["latte", "pixart"])
def test_cond_only_steps_match_the_model_on_the_cond_half(name, layout):
    """Attention reuse off (start past the end): every step's output must equal the untransformed
    model's on full steps, and on skipped ones its cond-half output plus the last stored bias."""
    entry = ZOO[name]
    original = entry.build()
    model = entry.build()
    model.load_state_dict(original.state_dict())
    policy = ax.FasterCache(start=0.99, cfg_cache=True, cfg_layout=layout, cfg_start=0.2, cfg_interval=3, alpha=0.0)
    ax.transform(model, policy)
    rows_seen = []
    model.transformer_blocks[0].register_forward_pre_hook(
        lambda module, args, kwargs: rows_seen.append(kwargs.get("hidden_states", args[0] if args else None).shape[0]),
        with_kwargs=True,
    )
    cond_rows = slice(1, 2) if layout == "uncond_first" else slice(0, 1)
    uncond_rows = slice(0, 1) if layout == "uncond_first" else slice(1, 2)
    bias, skipped = None, []
    with torch.no_grad(), ax.generation(model, num_steps=STEPS):
        for step in range(STEPS):
            inputs = _step_inputs(entry, step)
            out = entry.output(model(**inputs))
            full = entry.output(original(**inputs))
            if policy.skips_uncond(step, STEPS):
                skipped.append(step)
                half = {k: (v[cond_rows] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == 2 else v)
                        for k, v in inputs.items()}
                cond = entry.output(original(**half))
                assert torch.allclose(out[cond_rows], cond, atol=1e-5)
                assert torch.allclose(out[uncond_rows], cond + bias, atol=1e-5)
            else:
                assert torch.allclose(out, full, atol=1e-5)
                bias = full[uncond_rows] - full[cond_rows]
    assert skipped == [3, 4, 6, 7, 9, 10]
    first_block_rows = rows_seen[:: len(rows_seen) // STEPS] if len(rows_seen) > STEPS else rows_seen
    assert sorted(set(rows_seen)) == [rows_seen[0] // 2, rows_seen[0]], first_block_rows
    report = ax.report(model)
    assert report.flops_fraction < 1.0, str(report)
    assert [s.cond_only for s in report.steps] == [int(s in skipped) for s in range(STEPS)]
    # FLOPs count whole guidance batches: a cond-only step (nothing reused) runs half of its step's
    # total, and that total is a full step's (the cond-only capture's half-batch FLOPs are doubled).
    full_total = report.steps[0].flops_total
    for s in report.steps:
        assert s.flops_total == full_total, (s, full_total)
        assert s.flops_computed == (full_total // 2 if s.cond_only else full_total), s
    assert report.flops_fraction == pytest.approx((STEPS - len(skipped) / 2) / STEPS, rel=1e-3)


def test_cond_only_steps_update_only_the_cond_rows_of_the_caches():
    """With attention reuse on, a cond-only step that computes attention refreshes the cond rows of
    its cached residual and leaves the uncond rows as the last full step stored them."""
    entry = ZOO["latte"]
    model = ax.transform(entry.build(), ax.FasterCache(interval=2, start=0.0, cfg_cache=True, cfg_start=0.0,
                                                        cfg_interval=4))
    runtime = ax.get_runtime(model)
    policy = runtime.policy
    with torch.no_grad(), ax.generation(model, num_steps=STEPS):
        before = None
        checked = 0
        for step in range(STEPS):
            model(**_step_inputs(entry, step))
            after = {k: v[0].clone() for k, v in runtime.cached_residuals().items()}
            if before is not None and policy.skips_uncond(step, STEPS) and runtime.session().records[-1].computed:
                for branch, value in after.items():
                    if branch in before and runtime.session().records[-1].reused == 0:
                        rows = value.shape[0] // 2
                        assert torch.equal(value[:rows], before[branch][:rows])  # uncond (first) rows kept
                        assert not torch.equal(value[rows:], before[branch][rows:])
                        checked += 1
            before = after
    assert checked > 0, "no cond-only step computed attention: the test showed nothing"


def test_odd_batch_with_cfg_cache_is_a_clear_error():
    entry = ZOO["latte"]
    model = ax.transform(entry.build(), ax.FasterCache(cfg_cache=True, cfg_start=0.0, cfg_interval=2))
    with torch.no_grad(), ax.generation(model, num_steps=4):
        model(**entry.inputs(timestep=999.0, batch=3))
        with pytest.raises(ax.PolicyError, match="batch 3"):
            model(**entry.inputs(timestep=750.0, batch=3))


def _scale_block_weights(model):
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "transformer_blocks" in name and name.endswith("weight") and parameter.dim() == 2:
                parameter.mul_(0.9)


def _reweight_adapter(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in model.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.set_scale("default", 0.5)


@pytest.mark.parametrize("change", [_scale_block_weights, _reweight_adapter], ids=["weights edited", "adapter re-weighted"])
def test_a_cond_only_step_after_a_change_runs_in_full(change):
    """The model changed before a step planned cond-only: its uncond half would be rebuilt from a bias
    the old model made. The step runs both halves instead, equal to the untransformed model changed the
    same way, and the later cond-only steps use the new model's bias."""
    from peft import LoraConfig, inject_adapter_in_model

    entry = ZOO["latte"]
    original, model = entry.build(), entry.build()
    for m in (original, model):
        torch.manual_seed(1)
        inject_adapter_in_model(LoraConfig(r=4, target_modules=["to_q", "to_v"], init_lora_weights=False), m)
    policy = ax.FasterCache(start=0.99, cfg_cache=True, cfg_start=0.2, cfg_interval=3, alpha=0.0)
    ax.transform(model, policy)
    assert policy.skips_uncond(3, STEPS) and policy.skips_uncond(4, STEPS)
    with torch.no_grad(), ax.generation(model, num_steps=STEPS):
        for step in range(5):
            if step == 3:
                change(model)
                change(original)
            inputs = _step_inputs(entry, step)
            out = entry.output(model(**inputs))
            if step == 3:
                assert torch.allclose(out, entry.output(original(**inputs)), atol=1e-5)
    assert [s.cond_only for s in ax.report(model).steps] == [0, 0, 0, 0, 1]
