"""Quantized weights (torchao tensor subclasses), quantized before or after ``transform``.

A capture reads a tensor-subclass weight through the plain tensors export unwraps it into
(``<param>.parametrizations.weight.original<i>``), taken from the live parameter at every call; a
quantization after ``transform`` replaces the parameters, which the guards see. With ``NoCache`` the
outputs equal the quantized untransformed model's; a ``Static(2)`` reuse step still skips the
branches' work, counted as the quantized matrix products that run.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import adacache_fx as ax
from adacache_lab.zoo import ZOO

torchao = pytest.importorskip("torchao", reason="torchao is a test extra: pip install -e '.[test]'")
from torchao.quantization import (  # noqa: E402
    Float8WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    quantize_,
)

CONFIGS = {"int8_weight_only": Int8WeightOnlyConfig, "float8_weight_only": Float8WeightOnlyConfig,
           "int8_dynamic": Int8DynamicActivationInt8WeightConfig}
PRODUCTS = ("mm", "addmm", "_int_mm", "bmm", "matmul", "_weight_int8pack_mm")


class _CountProducts(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in PRODUCTS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _quantized(name, config):
    model = ZOO[name].build()
    quantize_(model, CONFIGS[config]())
    return model


def _check(name, config, order):
    entry = ZOO[name]
    reference = _quantized(name, config)
    if order == "before":
        model = ax.transform(_quantized(name, config), ax.Static(2))
    else:  # transformed and captured in float32, then quantized in place
        model = ax.transform(entry.build(), ax.Static(2))
        with torch.no_grad():
            model(**entry.inputs(timestep=999.0))
        ax.reset(model)
        quantize_(model, CONFIGS[config]())
    products = []
    with torch.no_grad():
        for step, t in enumerate((900.0, 800.0, 700.0)):
            inputs = entry.inputs(timestep=t)
            with _CountProducts() as counter:
                got = entry.output(model(**inputs))
            products.append(counter.count)
            if step == 0:  # a compute step: exactly the quantized model
                assert torch.equal(got, entry.output(reference(**inputs))), (name, config, order)
    assert [s.reused > 0 for s in ax.report(model).steps] == [False, True, False]
    # Outside the blocks (embeddings, final layer) a few products remain on the reuse step.
    assert products[1] < 0.25 * products[0], products
    assert not ax.report(model).uncached


@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("name", ["dit", "latte", "wan", "flux"])
def test_int8_weight_only_before_and_after_transform(name, order):
    _check(name, "int8_weight_only", order)


@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("config", ["float8_weight_only", "int8_dynamic"])
def test_float8_weight_only_and_int8_dynamic_activation(config, order):
    _check("wan", config, order)
