"""Bad input gets a clear error naming the problem and what to do."""

import pytest
import torch
import torch.nn as nn

import adacache_fx as ax
from adacache_lab.zoo import ZOO


class TinyAttention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.out(torch.nn.functional.scaled_dot_product_attention(q, k, v))


class DataDependentBlock(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.attn = TinyAttention(dim)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: cannot be captured as one graph
            return x + self.attn(x)
        return x - self.attn(x)


class Net(nn.Module):
    def __init__(self, block=DataDependentBlock, n=2):
        super().__init__()
        self.blocks = nn.ModuleList([block() for _ in range(n)])

    def forward(self, hidden_states, timestep):
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return hidden_states


def test_model_without_blocks():
    with pytest.raises(ax.NoBlocksFoundError, match="blocks="):
        ax.transform(nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4)), ax.NoCache())


def test_explicit_block_path_that_does_not_exist():
    with pytest.raises(ax.NoBlocksFoundError, match="no submodule 'layers'"):
        ax.transform(Net(), ax.NoCache(), blocks=["layers"])


def test_transform_twice():
    model = ax.transform(ZOO["dit"].build(), ax.NoCache())
    with pytest.raises(ax.AlreadyTransformedError, match="restore"):
        ax.transform(model, ax.Static())


def test_not_a_policy():
    with pytest.raises(TypeError, match="adacache_fx policy"):
        ax.transform(ZOO["dit"].build(), "static")


def test_unknown_kind_fails_at_construction():
    with pytest.raises(ax.PolicyError, match="valid kinds"):
        ax.Static(kinds=("temporal",))


def test_kind_absent_from_model_fails_on_first_call():
    entry = ZOO["dit"]
    model = ax.transform(entry.build(), ax.Static(kinds=("temporal_attention",)))
    with pytest.raises(ax.PolicyError, match="temporal_attention.*self_attention"):
        with torch.no_grad():
            model(**entry.inputs())


def test_block_that_cannot_be_captured_is_named():
    model = ax.transform(Net(), ax.NoCache(), on_capture_error="raise")
    with pytest.raises(ax.CaptureError, match=r"'blocks\.0' \(DataDependentBlock\)"):
        model(torch.randn(1, 4, 8), torch.tensor([1.0]))


class WeightlessDataDependentBlock(nn.Module):
    """Data-dependent control flow and no child module to cache on its own."""

    def __init__(self, dim=8):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, dim))

    def forward(self, x):
        return x + x @ self.weight if x.sum() > 0 else x - x @ self.weight


def test_block_with_no_branch_children_to_fall_back_on_says_so():
    model = ax.transform(Net(WeightlessDataDependentBlock), ax.NoCache(), blocks=["blocks"])
    with pytest.raises(ax.CaptureError, match=r"'blocks\.0'.*branch by branch either: it has no attention or MLP"):
        model(torch.randn(1, 4, 8), torch.tensor([1.0]))


def test_data_dependent_block_is_cached_branch_by_branch():
    """The default falls back to the block's eager forward with its children cached: either side of
    the data-dependent branch gets the cached attention output."""
    reference = Net()
    model = ax.transform(Net(), ax.Static(2))
    model.load_state_dict(reference.state_dict())
    x = torch.randn(1, 4, 8)
    with torch.no_grad(), ax.generation(model, num_steps=3):
        first = model(x, torch.tensor([999.0]))
        second = model(-x, torch.tensor([900.0]))
    with torch.no_grad():
        assert torch.equal(first, reference(x, torch.tensor([999.0])))
    report = ax.report(model)
    assert set(report.eager) == {"blocks.0", "blocks.1"} and "data-dependent" in report.eager["blocks.0"]
    assert report.steps[-1].reused == 2 and report.steps[-1].computed == 0
    assert "BRANCHES ONLY: blocks.0" in str(report)
    assert not torch.equal(second, reference(-x, torch.tensor([900.0])))  # the attention outputs were reused


def test_skip_runs_uncapturable_blocks_uncached_and_reports_them():
    model = ax.transform(Net(), ax.NoCache(), on_capture_error="skip")
    reference = Net()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(1, 4, 8)
    assert torch.equal(model(x, torch.tensor([1.0])), reference(x, torch.tensor([1.0])))
    text = str(ax.report(model))
    assert "UNCACHED: blocks.0" in text and "UNCACHED: blocks.1" in text


def test_functions_need_a_transformed_model():
    with pytest.raises(ax.NotTransformedError, match="transform"):
        ax.report(ZOO["dit"].build())


def test_bad_arguments():
    with pytest.raises(ValueError, match="interval"):
        ax.Static(interval=0)
    with pytest.raises(ValueError, match="on_capture_error"):
        ax.transform(ZOO["dit"].build(), ax.NoCache(), on_capture_error="ignore")
    model = ax.transform(ZOO["dit"].build(), ax.NoCache())
    with pytest.raises(ValueError, match="num_steps"):
        with ax.generation(model, num_steps=0):
            pass


def test_a_failed_capture_is_not_tried_again_for_blocks_or_models_of_the_same_structure(monkeypatch):
    """Export of an uncapturable structure fails once: the model's other blocks of that structure and
    a second model sharing a CaptureCache fall back with the same reason without exporting again."""
    exports = []
    real_export = torch.export.export

    def counting_export(module, *args, **kwargs):
        exports.append(type(module).__name__)
        return real_export(module, *args, **kwargs)

    monkeypatch.setattr(torch.export, "export", counting_export)
    captures = ax.CaptureCache()
    x = torch.randn(1, 4, 8)
    models = [ax.transform(Net(n=3), ax.NoCache(), captures=captures) for _ in range(2)]
    for model in models:
        with torch.no_grad():
            model(x, torch.tensor([1.0]))
        report = ax.report(model)
        assert set(report.eager) == {"blocks.0", "blocks.1", "blocks.2"}
        assert all("data-dependent" in why for why in report.eager.values()), report.eager
    assert exports.count("DataDependentBlock") == 1, exports
    # Dropping a model's captures drops what it knew failed, too: the next call exports again.
    ax.reset(models[1], captures=True)
    with torch.no_grad():
        models[1](x, torch.tensor([1.0]))
    assert exports.count("DataDependentBlock") == 2, exports
    # 'raise' still names the block that raised.
    strict = ax.transform(Net(n=2), ax.NoCache(), on_capture_error="raise", captures=captures)
    with pytest.raises(ax.CaptureError, match=r"'blocks\.0'.*capture failed \(not tried again\)"):
        strict(x, torch.tensor([1.0]))
