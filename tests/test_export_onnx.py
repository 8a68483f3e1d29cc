"""ONNX export, one graph per plan variant with explicit caches, replayed by the Runner on ONNX
Runtime: the same per-step plans as the eager transformed model, outputs within 1e-4."""

import json
from pathlib import Path

import pytest
import torch

import adacache_fx as ax
from adacache_fx.errors import AdaCacheError
from adacache_lab.zoo import ZOO

pytest.importorskip("onnxruntime", reason="onnxruntime is needed to run the exported graphs")

STEPS = 20
POLICIES = {
    "static": lambda: ax.Static(2),
    "adacache": lambda: ax.AdaCache(codebook=((0.5, 3), (1e9, 1)), num_steps=STEPS),
    # Forecasting reuse: the runner adds the policy's extrapolated residuals, as eager does.
    "taylorseer": lambda: ax.TaylorSeer(ax.Static(3), order=2),
}


def _sample(out):
    return out[0] if isinstance(out, tuple) else out.sample


@pytest.mark.parametrize(
    "name, policy_name",
    [("dit", "static"), ("latte", "static"), ("wan", "static"), ("flux", "static"), ("cogvideox", "static"),
     ("latte", "adacache"), ("dit", "taylorseer")],
)
def test_runner_reproduces_eager_plans_and_outputs(name, policy_name, tmp_path, static_exports):
    entry = ZOO[name]
    eager = entry.build()
    ax.transform(eager, POLICIES[policy_name]())
    if policy_name == "static":  # the session's shared export (the TensorRT tests use it too)
        exported = static_exports(name)
    else:
        deployed = entry.build()
        deployed.load_state_dict(eager.state_dict())
        ax.transform(deployed, POLICIES[policy_name]())
        exported = ax.export.onnx(deployed, entry.inputs(timestep=500.0), tmp_path)
    directory = Path(exported.directory)
    assert [len(v.reuse) for v in exported.variants] == [0, len(exported.branches)]
    manifest = json.loads((directory / "manifest.json").read_text())
    assert len(manifest["variants"]) == 2 and all((directory / f"variant_{i}.onnx").exists() for i in range(2))

    _replay_matches_eager(entry, eager, ax.export.Runner(exported, POLICIES[policy_name]()))


def _replay_matches_eager(entry, eager, runner):
    """A 20-step loop on the runner and the eager model: same per-step plans, outputs within 1e-4."""
    runner.start(STEPS)
    diffs = []
    with torch.no_grad(), ax.generation(eager, num_steps=STEPS):
        for i in range(STEPS):
            inputs = entry.inputs(timestep=999.0 - i * (999.0 / STEPS))
            diffs.append((_sample(eager(**inputs)) - runner(**inputs)).abs().max().item())
    assert max(diffs) <= 1e-4
    eager_plans = [s.reused for s in ax.report(eager).steps]
    assert [len(p) for p in runner.plans] == eager_plans
    assert any(eager_plans) and not all(eager_plans)


@pytest.mark.parametrize(
    "name, policy_name",
    # DiT and Wan run the variant form above; the If form's graph logic is the same on every model
    # (Latte: under AdaCache; Static on Flux and CogVideoX).
    [("flux", "static"), ("cogvideox", "static"), ("latte", "adacache")],
)
def test_single_graph_with_if_nodes_reproduces_eager(name, policy_name, tmp_path):
    """Form (a): one graph, each cached branch an ONNX If on a boolean input, caches in and out."""
    import onnx

    entry = ZOO[name]
    eager = entry.build()
    deployed = entry.build()
    deployed.load_state_dict(eager.state_dict())
    ax.transform(eager, POLICIES[policy_name]())
    ax.transform(deployed, POLICIES[policy_name]())
    exported = ax.export.onnx(deployed, entry.inputs(timestep=500.0), tmp_path, form="if")
    assert exported.form == "if" and len(exported.variants) == 1
    graph = onnx.load(exported.variants[0].path).graph
    decisions = exported.variants[0].decisions
    assert sum(node.op_type == "If" for node in graph.node) == len(decisions) == len(exported.branches)
    assert [i.name for i in graph.input if i.name.startswith("reuse.")] == [f"reuse.{b}" for b in decisions]
    trt = ax.export.check_tensorrt_support(exported)  # If forms and operators TensorRT's parser takes
    assert not [e for g in trt.graphs for e in g.errors], str(trt)

    # The runner works from the manifest alone, as on a deployment machine.
    _replay_matches_eager(entry, eager, ax.export.Runner(ax.export.ExportedModel.load(tmp_path), POLICIES[policy_name]()))


def test_export_refuses_in_step_policies_and_unexported_plans(tmp_path):
    entry = ZOO["dit"]
    with pytest.raises(ValueError, match="form="):
        ax.export.onnx(ax.transform(entry.build(), ax.Static(2)), entry.inputs(timestep=500.0), tmp_path, form="cond")
    model = ax.transform(entry.build(), ax.FirstBlockCache())
    with pytest.raises(ax.PolicyError, match="decides inside each step"):
        ax.export.onnx(model, entry.inputs(timestep=500.0), tmp_path)

    model = ax.transform(entry.build(), ax.Static(2))
    exported = ax.export.onnx(model, entry.inputs(timestep=500.0), tmp_path, reuse_sets=[()])
    runner = ax.export.Runner(exported, ax.Static(2))
    runner.start(4)
    runner(**entry.inputs(timestep=900.0))
    with pytest.raises(AdaCacheError, match="no exported graph reuses"):
        runner(**entry.inputs(timestep=800.0))
