"""A transformed model under the user's own ``torch.compile``.

``torch.compile(ax.transform(model, policy))`` is how users call it, cold (compiled before the first
call) or warm. Dynamo cannot trace what a transformed call does on the host: reading the timestep,
the policy's plan, guards of the live model, captures (``torch.export`` inside dynamo's trace
fails). So the model's ``forward`` is handed over: when dynamo traces a call, it meets one
function it does not trace (``torch.compiler.disable``, one graph break at the model's entry), and
that function runs the call as ``ax.compile(model)`` would: the host logic eagerly, every block
through its plan-variant graphs compiled with ``fullgraph=True`` (Inductor unless ``ax.compile``
chose otherwise). Dynamo compiles nothing else, so nothing recompiles when plans change, and the
speed is ``ax.compile(scope="blocks")``'s. With ``fullgraph=True`` dynamo refuses the hand-off and
says why: one graph of the whole model is ``ax.compile(model, scope="model")``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

HANDOFF_REASON = (
    "adacache_fx runs a transformed model's call on the host (step tracking, the policy's plan, "
    "guards, captures) and its blocks through fullgraph-compiled plan-variant graphs; torch.compile "
    "hands the call over at the model's entry (one graph break). For the whole model as one graph, "
    "with every cached branch a torch.cond, use adacache_fx.compile(model, scope='model')"
)


class HandOffForward:
    """The ``forward`` of a transformed model (see the module docstring); outside ``torch.compile``
    it is the model's own forward, with its signature (pipelines inspect it)."""

    def __init__(self, runtime: Any, forward: Callable) -> None:
        self.runtime = runtime
        self.forward = forward
        functools.update_wrapper(self, forward)
        self._outside = torch.compiler.disable(self._run_outside, reason=HANDOFF_REASON)

    def __getstate__(self) -> dict:
        return {"runtime": self.runtime, "forward": self.forward}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["runtime"], state["forward"])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
            return self._outside(*args, **kwargs)  # export (ours or the user's) traces the forward itself
        return self.forward(*args, **kwargs)

    def _run_outside(self, *args: Any, **kwargs: Any) -> Any:
        return self.runtime.call_handed_over(self.forward, args, kwargs)
