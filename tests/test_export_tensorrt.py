"""TensorRT deployment, tested up to the build: TensorRT cannot be installed here (its libraries come
only from NVIDIA's index, on CUDA machines), so a stand-in ``tensorrt`` module injected in
``sys.modules`` records every builder/network/parser/profile call, and its "engines" run the ONNX
graph they were built from on ONNX Runtime. Nothing here ran on TensorRT. What is checked: the clear
error when TensorRT is missing, one engine per plan variant with profiles at the exported shapes,
file names and manifest, the runner picking the engine of each step's plan, the operator check on
five zoo models against onnx-tensorrt's operator table, and the ``export`` command."""

from __future__ import annotations

import ctypes
import enum
import json
import sys
import types

import numpy as np
import pytest
import torch

import adacache_fx as ax
from adacache_lab.cli import main
from adacache_fx.errors import AdaCacheError
from adacache_fx.export import trt_operators
from adacache_lab.zoo import ZOO

onnx = pytest.importorskip("onnx", reason="the export extra (onnx) is needed")
ort = pytest.importorskip("onnxruntime", reason="the stand-in engines run on onnxruntime")
pytest.importorskip("onnxscript", reason="torch.onnx's exporter needs onnxscript (the export extra)")

MODELS = ("dit", "latte", "wan", "flux", "cogvideox")
_ORT_TYPES = {"tensor(float)": ("FLOAT", np.float32), "tensor(int64)": ("INT64", np.int64),
              "tensor(int32)": ("INT32", np.int32), "tensor(bool)": ("BOOL", np.bool_),
              "tensor(float16)": ("HALF", np.float16)}


def _host_array(address: int, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """A numpy view of host memory at ``address`` (the stand-in engine's 'device' memory)."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    buffer = (ctypes.c_char * max(nbytes, 1)).from_address(address)
    return np.frombuffer(buffer, dtype=dtype, count=int(np.prod(shape, dtype=np.int64))).reshape(shape)


def fake_tensorrt(parse_errors: tuple[str, ...] = ()) -> types.ModuleType:
    """A stand-in for the ``tensorrt`` package: records calls in ``trt.calls``; its serialized engine
    names the ONNX file, and the deserialized engine runs that file on ONNX Runtime."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.15.0-standin"
    calls: list[tuple] = []
    trt.calls = calls

    class Logger:
        WARNING = "WARNING"

        def __init__(self, severity=None):
            self.severity = severity

    DataType = enum.Enum("DataType", "FLOAT HALF BF16 INT8 INT32 INT64 BOOL UINT8")
    trt.DataType = DataType
    trt.BuilderFlag = enum.Enum("BuilderFlag", "FP16 BF16")
    trt.MemoryPoolType = enum.Enum("MemoryPoolType", "WORKSPACE")
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"EXPLICIT_BATCH": 0})

    class Tensor:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    class Network:
        def __init__(self, flags):
            self.flags, self.inputs, self.onnx_path = flags, [], None

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class OnnxParser:
        def __init__(self, network, logger):
            self.network = network
            self.errors = list(parse_errors)

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

        def parse_from_file(self, path):
            calls.append(("parse", path))
            model = onnx.load(path)
            initializers = {t.name for t in model.graph.initializer}
            self.network.onnx_path = path
            self.network.inputs = [
                Tensor(v.name, tuple(d.dim_value if d.HasField("dim_value") else -1
                                     for d in v.type.tensor_type.shape.dim))
                for v in model.graph.input if v.name not in initializers
            ]
            return not self.errors

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, low, opt, high):
            calls.append(("set_shape", name, tuple(low), tuple(opt), tuple(high)))
            self.shapes[name] = (tuple(low), tuple(opt), tuple(high))

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.pools = set(), [], {}

        def set_flag(self, flag):
            self.flags.add(flag)

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool] = size

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

    class Builder:
        def __init__(self, logger):
            calls.append(("builder",))

        def create_network(self, flags):
            calls.append(("create_network", flags))
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            fp16 = trt.BuilderFlag.FP16 in config.flags
            calls.append(("build", network.onnx_path, fp16, [p.shapes for p in config.profiles]))
            return json.dumps({"onnx": network.onnx_path, "fp16": fp16}).encode()

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses = engine, {}, {}

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            return self.engine.shapes[name]

        def set_tensor_address(self, name, address):
            self.addresses[name] = address
            return True

        def execute_async_v3(self, stream):
            engine = self.engine
            calls.append(("execute", engine.path, stream))
            feeds = {i.name: _host_array(self.addresses[i.name], self.shapes[i.name], engine.numpy[i.name]).copy()
                     for i in engine.session.get_inputs()}
            names = [o.name for o in engine.session.get_outputs()]
            for name, value in zip(names, engine.session.run(names, feeds)):
                _host_array(self.addresses[name], value.shape, engine.numpy[name])[...] = value
            return True

    class Engine:
        def __init__(self, path):
            self.path = path
            self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            io = list(self.session.get_inputs()) + list(self.session.get_outputs())
            self.names = [t.name for t in io]
            self.dtypes = {t.name: DataType[_ORT_TYPES[t.type][0]] for t in io}
            self.numpy = {t.name: _ORT_TYPES[t.type][1] for t in io}
            self.shapes = {t.name: tuple(t.shape) for t in io}

        @property
        def num_io_tensors(self):
            return len(self.names)

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_dtype(self, name):
            return self.dtypes[name]

        def create_execution_context(self):
            return Context(self)

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return Engine(json.loads(bytes(data))["onnx"])

    trt.Logger, trt.Builder, trt.OnnxParser, trt.Runtime = Logger, Builder, OnnxParser, Runtime
    return trt


class HostRunner(ax.export.TensorRTRunner):
    """The stand-in engines read host memory, so this runner binds CPU tensors."""

    _host_buffers = True


@pytest.fixture(scope="module")
def zoo_exports(static_exports):
    """Each model transformed with Static(2) and exported (compute-all and reuse-all variants)."""
    return {name: static_exports(name) for name in MODELS}


def _input_shapes(path) -> dict[str, tuple[int, ...]]:
    model = onnx.load(path)
    return {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim) for v in model.graph.input}


def test_missing_tensorrt_names_the_package_and_how_to_install(zoo_exports, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    with pytest.raises(ax.export.TensorRTUnavailableError, match=r"import tensorrt.*pypi\.nvidia\.com") as info:
        ax.export.tensorrt(zoo_exports["dit"], tmp_path)
    assert isinstance(info.value, ImportError) and isinstance(info.value, AdaCacheError)
    assert "pip install" in str(info.value) and "GPU" in str(info.value)
    assert not list(tmp_path.iterdir())  # nothing half-written
    with pytest.raises(ax.export.TensorRTUnavailableError):
        ax.export.TensorRTRunner(ax.export.TensorRTEngines(str(tmp_path), zoo_exports["dit"], []), ax.Static(2))


@pytest.mark.parametrize("fp16", [False, True])
def test_one_engine_per_variant_with_profiles_at_the_exported_shapes(zoo_exports, tmp_path, monkeypatch, fp16):
    exported = zoo_exports["flux"]  # the most inputs: ids, pooled projections, two-stream caches
    trt = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    engines = ax.export.tensorrt(exported, tmp_path, fp16=fp16)

    assert [c for c in trt.calls if c[0] == "create_network"] == [("create_network", 0)] * 2  # TRT 10: no flag
    assert [c[1] for c in trt.calls if c[0] == "parse"] == [v.path for v in exported.variants]
    builds = [c for c in trt.calls if c[0] == "build"]
    assert [b[1] for b in builds] == [v.path for v in exported.variants] and all(b[2] is fp16 for b in builds)
    for variant, build, engine in zip(exported.variants, builds, engines.variants):
        shapes = _input_shapes(variant.path)
        assert set(shapes) == set(variant.input_names)  # model inputs + this variant's caches
        (profile,) = build[3]  # one optimisation profile, min = opt = max = the exported shape
        assert profile == {name: (s, s, s) for name, s in shapes.items()}
        assert engine.profile == profile and engine.reuse == variant.reuse
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines.json", "variant_0.engine", "variant_1.engine"]

    manifest = json.loads((tmp_path / "engines.json").read_text())
    assert manifest["tensorrt_version"] == "10.15.0-standin" and manifest["fp16"] is fp16
    assert [e["engine"] for e in manifest["engines"]] == ["variant_0.engine", "variant_1.engine"]
    assert [len(e["reuse"]) for e in manifest["engines"]] == [0, len(exported.branches)]
    assert manifest["engines"][1]["profile"]["cache_in.transformer_blocks.0.attn.1"] == [[1, 8, 32]] * 3
    loaded = ax.export.TensorRTEngines.load(tmp_path)
    assert loaded.variants == engines.variants and loaded.fp16 is fp16
    assert loaded.exported.variants == exported.variants and loaded.exported.branches == exported.branches


def test_profile_shapes_given_and_refused(zoo_exports, tmp_path, monkeypatch):
    exported = zoo_exports["dit"]
    path = exported.variants[0].path
    same = ax.export.profile_shapes(path, {"hidden_states": [1, 4, 8, 8]})
    assert same["hidden_states"] == ((1, 4, 8, 8),) * 3
    with pytest.raises(AdaCacheError, match="exported with size 1 on axis 0.*Export again"):
        ax.export.profile_shapes(path, {"hidden_states": ([1, 4, 8, 8], [2, 4, 8, 8], [4, 4, 8, 8])})
    with pytest.raises(AdaCacheError, match="rank 4"):
        ax.export.profile_shapes(path, {"hidden_states": [1, 4, 8]})
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    with pytest.raises(AdaCacheError, match="no exported graph takes"):
        ax.export.tensorrt(exported, tmp_path, shapes={"latents": [1, 4, 8, 8]})

    # A graph with a dynamic batch: its range must be given, and is what the profile gets.
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    dynamic = tmp_path / "dynamic.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), dynamic)
    with pytest.raises(AdaCacheError, match="dynamic dimensions"):
        ax.export.profile_shapes(dynamic)
    assert ax.export.profile_shapes(dynamic, {"x": ([1, 4], [2, 4], [8, 4])}) == {"x": ((1, 4), (2, 4), (8, 4))}
    with pytest.raises(AdaCacheError, match="min <= opt <= max"):
        ax.export.profile_shapes(dynamic, {"x": ([4, 4], [2, 4], [8, 4])})


def test_parser_errors_are_reported(zoo_exports, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(parse_errors=("In node 3 (LayerNormalization): "
                                                                              "unsupported",)))
    with pytest.raises(ax.export.TensorRTBuildError, match="could not parse .*variant_0.onnx.*LayerNormalization"):
        ax.export.tensorrt(zoo_exports["dit"], tmp_path)


def test_runner_switches_engines_per_step_like_the_onnx_runner(zoo_exports, tmp_path, monkeypatch):
    exported = zoo_exports["dit"]
    trt = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    engines = ax.export.tensorrt(exported, tmp_path)
    with pytest.raises(AdaCacheError, match="CUDA"):
        ax.export.TensorRTRunner(engines, ax.Static(2), device="cpu")

    steps = 7
    reference = ax.export.Runner(exported, ax.Static(2))
    runner = HostRunner(ax.export.TensorRTEngines.load(tmp_path), ax.Static(2), device="cpu")
    entry = ZOO["dit"]
    for runner_ in (reference, runner):
        runner_.start(steps)
    del trt.calls[:]
    for i in range(steps):
        inputs = entry.inputs(timestep=999.0 - i * 100.0)
        expected, got = reference(**inputs), runner(**inputs)
        assert got.dtype == torch.float32 and torch.allclose(expected, got, atol=1e-6)
    executed = [c[1] for c in trt.calls if c[0] == "execute"]
    engine_of = {v.reuse: v.onnx_path for v in engines.variants}
    assert runner.plans == reference.plans
    assert executed == [engine_of[plan] for plan in runner.plans]  # the engine of each step's plan
    assert [len(p) for p in runner.plans] == [0, 4, 0, 4, 0, 4, 0]  # Static(2): compute, reuse, ...
    assert set(runner.session.caches.values(0)) == {b.id for b in exported.branches}

    runner.start(steps)  # a new generation starts from no cache: the first step computes
    runner(**entry.inputs(timestep=999.0))
    assert runner.plans == [()]


def test_operator_check_on_zoo_models(zoo_exports, capsys):
    """Which ONNX operators the exported DiTs use, and whether TensorRT's parser table takes them."""
    supported = dict(trt_operators.SUPPORTED)
    seen = {}
    for name in MODELS:
        report = ax.export.check_tensorrt_support(zoo_exports[name])
        seen[name] = report.op_types()
        with capsys.disabled():
            print(f"\n{name}: {', '.join(seen[name])} -> "
                  + ("all supported" if report.supported else f"PROBLEMS: {report.unsupported_ops()}"))
        assert report.supported, str(report)
        assert report.unsupported_ops() == []
        assert all(op in supported for op in seen[name])
        assert all(g.opsets == {"ai.onnx": 18} for g in report.graphs)
        assert "If" not in seen[name]  # one graph per plan variant: no control flow in the graphs
        assert "LayerNormalization" in seen[name]  # why TensorRT 8.5 and older would refuse them
        assert len(report.graphs) == 2 and str(report).count("supported") >= 2
    # Restricted operators used, each checked where the table's restriction can be read off the graph.
    used = set().union(*seen.values())
    assert {"Squeeze", "Unsqueeze", "ReduceMean", "ScatterND"} <= used
    assert ax.export.check_tensorrt_support(zoo_exports["wan"]).graphs[0].warnings == []  # axes are constants


def test_operator_check_flags_what_the_table_refuses(tmp_path):
    h = onnx.helper
    f = onnx.TensorProto.FLOAT
    nodes = [
        h.make_node("Shape", ["x"], ["s"]),
        h.make_node("Slice", ["s", "zero", "one"], ["axes"]),  # axes computed at run time
        h.make_node("Unsqueeze", ["x", "axes"], ["u"]),
        h.make_node("Unique", ["x"], ["uq"]),
        h.make_node("Gelu", ["x"], ["g"], domain="com.microsoft"),
        h.make_node("LayerNormalization", ["x", "scale"], ["ln", "mean"]),
        h.make_node("If", ["cond"], ["branch"],
                    then_branch=h.make_graph([h.make_node("Identity", ["x"], ["r"])], "then", [],
                                             [h.make_tensor_value_info("r", f, None)]),
                    else_branch=h.make_graph([h.make_node("Neg", ["x"], ["r"])], "else", [],
                                             [h.make_tensor_value_info("r", f, None)])),
    ]
    graph = h.make_graph(
        nodes, "g",
        [h.make_tensor_value_info("x", f, [2, 4]), h.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []),
         h.make_tensor_value_info("d", onnx.TensorProto.COMPLEX64, [2])],
        [h.make_tensor_value_info(n, f, None) for n in ("u", "uq", "g", "ln", "branch")],
        initializer=[h.make_tensor("zero", onnx.TensorProto.INT64, [1], [0]),
                     h.make_tensor("one", onnx.TensorProto.INT64, [1], [1]),
                     h.make_tensor("scale", f, [4], [1.0] * 4)],
    )
    path = tmp_path / "bad.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 25), h.make_opsetid("com.microsoft", 1)]), path)
    report = ax.export.check_tensorrt_support(path)
    (g,) = report.graphs
    text = str(report)
    assert not report.supported
    assert report.unsupported_ops() == ["Unique", "com.microsoft::Gelu"]
    assert g.opsets == {"ai.onnx": 25, "com.microsoft": 1}
    for needle in ("opset 25 is outside", "Unique (x1) is marked unsupported", "needs a plugin",
                   "only the first output", "named r", "COMPLEX64"):
        assert any(needle in e for e in g.errors), (needle, g.errors)
    assert any("Unsqueeze" in w and "computed at run time" in w for w in g.warnings)
    assert any("syncs" in n for n in g.notes)
    assert "Identity" in report.op_types() and "Neg" in report.op_types()  # ops inside If branches count
    assert "unsupported: Unique, com.microsoft::Gelu" in text


def test_exported_model_loads_from_its_manifest(zoo_exports, tmp_path):
    exported = zoo_exports["cogvideox"]
    loaded = ax.export.ExportedModel.load(exported.directory)
    assert loaded == exported
    with pytest.raises(AdaCacheError, match="no manifest.json"):
        ax.export.ExportedModel.load(tmp_path)


def test_export_command(tmp_path, capsys, monkeypatch):
    # TensorRT missing: exit code 2 before exporting anything, naming the package and the install.
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert main(["export", "dit", "--format", "tensorrt", "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "import tensorrt" in err and "pip install" in err and "--check" in err
    assert not (tmp_path / "none").exists()

    # --check: the operator report, no engines, no TensorRT needed.
    assert main(["export", "dit", "--format", "tensorrt", "--check", "--out", str(tmp_path / "check")]) == 0
    out = capsys.readouterr().out
    assert "operator check against onnx/onnx-tensorrt" in out and "all in the table as supported" in out
    assert not list((tmp_path / "check").glob("*.engine"))

    # With (stand-in) TensorRT: ONNX graphs, then one engine each and the manifest.
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    assert main(["export", "dit", "--format", "tensorrt", "--fp16", "--out", str(tmp_path / "trt")]) == 0
    assert "engines.json" in capsys.readouterr().out
    names = sorted(p.name for p in (tmp_path / "trt").iterdir())
    assert names == ["engines.json", "manifest.json", "variant_0.engine", "variant_0.onnx",
                     "variant_1.engine", "variant_1.onnx"]
    assert json.loads((tmp_path / "trt" / "engines.json").read_text())["fp16"] is True
