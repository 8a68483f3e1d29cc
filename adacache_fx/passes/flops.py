"""Per-operation FLOP counts of a captured graph, from the fake tensors export left in its metadata."""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.utils.flop_counter import FlopCounterMode


class _CountingInterpreter(fx.Interpreter):
    def __init__(self, module: fx.GraphModule, counter: FlopCounterMode) -> None:
        super().__init__(module)
        self.counter = counter
        self.flops: dict[str, int] = {}

    def run_node(self, node: fx.Node):
        before = self.counter.get_total_flops()
        result = super().run_node(node)
        spent = self.counter.get_total_flops() - before
        if spent:
            self.flops[node.name] = spent
        return result


def _run(graph_module: fx.GraphModule, values: list, fake_mode) -> dict[str, int]:
    counter = FlopCounterMode(display=False)
    interpreter = _CountingInterpreter(graph_module, counter)
    with contextlib.ExitStack() as stack:
        if fake_mode is not None:
            stack.enter_context(fake_mode)
        stack.enter_context(counter)
        stack.enter_context(torch.no_grad())
        interpreter.run(*values)
    return interpreter.flops


def count_node_flops(graph_module: fx.GraphModule, real_inputs: list | None = None) -> dict[str, int] | None:
    """FLOPs of each node (absent = 0).

    Runs on the fake tensors export left in the graph's metadata (no compute); where an op cannot
    run on fake tensors, on ``real_inputs`` instead. None when neither works: unknown, never guessed.
    """
    placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
    values = [n.meta.get("val") for n in placeholders]
    fake_mode = detect_fake_mode([v for v in values if isinstance(v, torch.Tensor)])
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    if fake_mode is not None:
        previous = fake_log.level
        fake_log.setLevel(logging.CRITICAL)  # a failed meta kernel is expected here, and handled
        try:
            return _run(graph_module, values, fake_mode)
        except Exception:
            pass
        finally:
            fake_log.setLevel(previous)
    if real_inputs is not None:
        try:
            return _run(graph_module, real_inputs, None)
        except Exception:
            return None
    return None
