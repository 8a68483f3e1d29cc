"""Deployment: ONNX graphs per plan variant with explicit cache inputs/outputs, and their runner.

    exported = ax.export.onnx(model, example_kwargs, "out/")
    runner = ax.export.Runner(exported, policy)
"""

from .onnx_export import ExportedModel, ExportedVariant, Runner, onnx

__all__ = ["onnx", "Runner", "ExportedModel", "ExportedVariant"]
