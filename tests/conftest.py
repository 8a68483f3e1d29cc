import os

import pytest
import torch

from adacache_lab.zoo import ZOO


# Under pytest-xdist (make test: one worker per core) each worker keeps to its share of the cores.
# Inductor compiles kernels in a pool of subprocesses (one per core) that each worker would start
# and import torch in: with every core already taken by a worker, compiling in-process is cheaper.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    import torch._inductor.config

    torch._inductor.config.compile_threads = 1


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


class ProjectionAttention(torch.nn.Module):
    """The smallest module the capture pass takes for an attention branch: a ``to_q`` projection (its
    name and module path make the region's kind). For toy models in tests."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.to_q = torch.nn.Linear(dim, dim)

    def forward(self, x):
        return self.to_q(x)


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


ALL_MODELS = sorted(ZOO)


@pytest.fixture(scope="session")
def captures():
    """One ``CaptureCache`` per test process, for tests about what runs after a capture (policies,
    plans, FLOPs) rather than about capturing: they share each zoo model's block programs."""
    import adacache_fx as ax

    return ax.CaptureCache()


@pytest.fixture(scope="session")
def static_exports(tmp_path_factory):
    """Zoo models transformed with Static(2) and exported per plan variant, once per test run and
    shared by the ONNX and TensorRT tests: ``static_exports(name) -> ExportedModel`` (zoo builders
    are seeded, so a fresh ``ZOO[name].build()`` has the exported weights). Under pytest-xdist the
    first worker to ask exports into the run's shared directory (under a file lock) and the others
    load its manifest, so the two test files need not land on one worker to share the work."""
    import filelock

    import adacache_fx as ax

    base = tmp_path_factory.getbasetemp()
    # Each xdist worker's base is a child of this run's directory; without xdist, the parent is
    # shared by every run, so stay in the run's own base.
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    exports = {}

    def get(name):
        if name not in exports:
            directory = root / f"static_export_{name}"
            with filelock.FileLock(str(root / f"static_export_{name}.lock"), timeout=600):
                if (directory / "manifest.json").exists():
                    exports[name] = ax.export.ExportedModel.load(directory)
                else:
                    entry = ZOO[name]
                    model = ax.transform(entry.build(), ax.Static(2))
                    exports[name] = ax.export.onnx(model, entry.inputs(timestep=500.0), directory)
        return exports[name]

    return get


def held_out_fraction(model, policy, run, seeds, num_steps: int) -> float:
    """Mean compute fraction of ``policy`` on ``model`` over generations ``run(model, seed)`` (held out
    from a calibration's inputs); the model is transformed for them and restored afterwards."""
    import adacache_fx as ax

    ax.transform(model, policy)
    fractions = []
    try:
        for seed in seeds:
            ax.reset(model)
            with ax.generation(model, num_steps=num_steps):
                run(model, seed)
            fractions.append(ax.report(model).compute_fraction)
    finally:
        ax.restore(model)
    return sum(fractions) / len(fractions)
