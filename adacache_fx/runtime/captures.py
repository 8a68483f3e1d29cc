"""Captured block programs shared by several transformed models.

A capture (``torch.export`` of one block call, then the passes) takes seconds per block structure;
the program it gives is a function of the block's structure and input signature only: parameters
are graph inputs read from the live block on every call, and no program knows a policy. So models
of one architecture, transformed with different policies one after another (a calibration sweep,
a server that rebuilds a model per request type, a benchmark), can share programs: pass one
:class:`CaptureCache` to each :func:`~adacache_fx.transform`.

Each model still keeps its own bindings, guards, caches and statistics: a shared program is looked
up by the same key a model uses for its own blocks, so a block whose live state differs (another
adapter, quantized weights, other shapes) finds no shared program and is captured for itself. A block
whose structure names an object by identity (a plain tensor attribute its capture bakes in, a forward
hook) or holds a Python function (an instance ``forward`` a diffusers hook installs, whose closure is
not compared) is never shared: ids of dead objects are reused by new ones, and closures differ.
"""

from __future__ import annotations

import threading
from typing import Any, Iterable


class CaptureCache:
    """Captured block programs, shared by the models transformed with it.

        >>> import adacache_fx as ax  # doctest: +SKIP
        >>> captures = ax.CaptureCache()  # doctest: +SKIP
        >>> for policy in (ax.Static(2), ax.AdaCache()):  # doctest: +SKIP
        ...     model = ax.transform(build_model(), policy, captures=captures)
        ...     run(model)  # the second model's blocks are not captured again
        >>> captures.hits  # doctest: +SKIP
        1

    ``len(captures)``: programs held; ``hits``: programs a model took from it instead of capturing
    (once per model and program: its blocks of one structure share it);
    :meth:`clear` drops every program (models keep the bindings they made). A structure whose capture
    failed is remembered too: the models sharing the cache fall back (``on_capture_error``) without
    exporting it again.
    """

    def __init__(self) -> None:
        self._programs: dict[Any, Any] = {}
        self._failures: dict[Any, Exception] = {}  # keys whose capture failed -> the error it raised
        self._lock = threading.Lock()
        self.hits = 0

    def get(self, key: Any) -> Any:
        """The program stored under ``key`` (a block's structure, input signature and list kind), or None."""
        with self._lock:
            program = self._programs.get(key)
            if program is not None:
                self.hits += 1
            return program

    def put(self, key: Any, program: Any) -> None:
        with self._lock:
            self._programs.setdefault(key, program)

    def failure(self, key: Any) -> Exception | None:
        """The error a capture under ``key`` raised (models sharing the cache do not export it again)."""
        with self._lock:
            return self._failures.get(key)

    def put_failure(self, key: Any, error: Exception) -> None:
        with self._lock:
            self._failures.setdefault(key, error)

    def discard(self, keys: Iterable[Any]) -> None:
        """Drop the programs and failures under ``keys`` (a model whose captures were dropped: they
        may be stale)."""
        with self._lock:
            for key in keys:
                self._programs.pop(key, None)
                self._failures.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._programs.clear()
            self._failures.clear()

    def __len__(self) -> int:
        return len(self._programs)

    def __repr__(self) -> str:
        return f"CaptureCache(programs={len(self._programs)}, hits={self.hits})"
