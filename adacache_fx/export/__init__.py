"""Deployment: ONNX graphs per plan variant with explicit cache inputs/outputs, their runners on ONNX
Runtime and TensorRT, and a check of the graphs against TensorRT's ONNX operator table.

    exported = ax.export.onnx(model, example_kwargs, "out/")
    runner = ax.export.Runner(exported, policy)
    print(ax.export.check_tensorrt_support(exported))
    engines = ax.export.tensorrt(exported, "out/")          # needs TensorRT and a CUDA GPU
    runner = ax.export.TensorRTRunner(engines, policy)
"""

from .onnx_export import ExportedModel, ExportedVariant, Runner, VariantRunner, onnx
from .tensorrt_export import (
    EngineVariant,
    GraphSupport,
    OpUse,
    TensorRTBuildError,
    TensorRTEngines,
    TensorRTRunner,
    TensorRTSupportReport,
    TensorRTUnavailableError,
    check_tensorrt_support,
    profile_shapes,
    tensorrt,
)

__all__ = [
    "onnx", "Runner", "VariantRunner", "ExportedModel", "ExportedVariant",
    "tensorrt", "TensorRTRunner", "TensorRTEngines", "EngineVariant", "profile_shapes",
    "check_tensorrt_support", "TensorRTSupportReport", "GraphSupport", "OpUse",
    "TensorRTUnavailableError", "TensorRTBuildError",
]
