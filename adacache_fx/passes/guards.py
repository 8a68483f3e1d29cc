"""What a captured block graph baked in, and a check of it cheap enough to run before every call.

``torch.export`` runs a block's Python ``forward`` once and keeps only the tensor operations. So a
capture fixes, besides the input shapes:

* the module tree: which submodules exist (PEFT's LoRA layers, a fused ``to_qkv``) and which ran;
* which parameter and buffer objects feed the graph, with their dtype, device and shape
  (torchao swaps weights for tensor subclasses; ``model.half()`` changes ``.data`` in place);
* every Python value the forward read from those modules: PEFT's active adapters, scales, merged
  and disabled flags; the attention processor and its ``_attention_backend``; an instance
  ``forward`` that diffusers' hooks install; ``training``;
* the forward hooks of its submodules.

:func:`guard_module` records all of that for one live block as a :class:`ModuleGuard`. Its
:meth:`~ModuleGuard.holds` compares, in microseconds, the version tags of every dictionary that
holds such state (the same tags dynamo's guards read: any assignment bumps them), the contents of
small lists (``merged_adapters``), the dtype, device and shape of every tensor, and the version
counter of every parameter. Values are read live by the graphs, so in-place weight edits and
``load_state_dict`` need no new capture; but residuals cached before them are stale, so they fail
the guard too (the block is bound again to its program and computes). Edits through ``.data`` do
not move the counter and are not seen.
:meth:`~ModuleGuard.changes` says what changed, for the log and the report.

Outside the block the runtime adds the ambient state a forward reads (:func:`ambient_state`):
autocast, and diffusers' globally active attention backend.
"""

from __future__ import annotations

import dataclasses
import enum
import operator
import sys
import types
from array import array
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn

try:  # the dictionary version tags dynamo's guards use; a content comparison where they are missing
    from torch._C._dynamo.guards import dict_version as _dict_version
except ImportError:  # pragma: no cover - every supported torch has it
    _dict_version = None
try:  # dynamo's C++ check of many tensors' type, dtype, device and sizes in one call
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # pragma: no cover - every supported torch has it
    _TensorGuards = None

# nn.Module bookkeeping no forward reads (state-dict and backward hooks).
_IGNORED = frozenset({
    "_non_persistent_buffers_set", "_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
    "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
    "_compiled_call_impl",  # nn.Module.compile's compiled call: a capture exports the forward itself
})
# Attributes no captured forward reads: our own runtime's, and diffusers' hook registry (hooks it
# registers install an instance ``forward``, which is checked).
_FOREIGN = ("_adacache_fx", "_diffusers_hook")
# Dictionaries of a module whose versions are checked besides its __dict__.
_MODULE_DICTS = ("_modules", "_parameters", "_buffers", "_forward_hooks", "_forward_pre_hooks")
# torch's own leaf layers (exactly these classes, not subclasses) read neither children nor buffers in
# forward: a child or buffer added to one changes nothing a capture computes, so their ``_modules``
# and ``_buffers`` are not checked (a third of a block's dictionaries, most of its modules are these).
_LEAF_LAYERS = frozenset({
    nn.Linear, nn.LayerNorm, nn.GroupNorm, nn.Dropout, nn.Identity, nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh,
    nn.Sigmoid, nn.Mish, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, *([nn.RMSNorm] if hasattr(nn, "RMSNorm") else []),
})
_LEAF_DICTS = ("_parameters", "_forward_hooks", "_forward_pre_hooks")
# torch's containers (exactly these classes) are never called, so their hooks never run, and hold
# nothing a forward reads but their items: only the dictionary of those is checked (PEFT puts six in
# every LoRA layer, two thirds of a LoRA block's dictionaries otherwise).
_CONTAINERS = {nn.ModuleDict: "_modules", nn.ModuleList: "_modules",
               nn.ParameterDict: "_parameters", nn.ParameterList: "_parameters"}
_SCALARS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, enum.Enum)
_OPAQUE = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type, types.ModuleType)
_DEPTH = 2  # objects held by modules (processors) and what they hold (their configs), no deeper


def _version(mapping: dict) -> Any:
    if _dict_version is not None:
        return _dict_version(mapping)
    return (tuple(mapping), tuple(map(id, mapping.values())))


def _versions(dicts: Sequence[dict]) -> Any:
    """The dictionaries' version tags, in a form :func:`_unchanged` compares fast: an unsigned 64-bit
    array (one block of memory: a check before a reusing step touches each dictionary and nothing
    else, where a list of Python ints costs a cache miss per tag on a deep model, ~1 ms on Flux)."""
    if _dict_version is not None:
        return array("Q", map(_dict_version, dicts))
    return [_version(d) for d in dicts]


_VERSION = operator.attrgetter("_version")


def _counts_edits(parameter: torch.Tensor | None) -> bool:
    """Whether in-place edits of ``parameter`` are seen: inference tensors have no version counter."""
    return parameter is not None and not parameter.is_inference()


def _weight_versions(weights: Sequence[torch.Tensor]) -> array:
    """The parameters' and buffers' version counters: an in-place edit (``torch.no_grad()`` arithmetic,
    ``copy_``, ``load_state_dict``; a positional table rescaled) moves them. Edits through ``.data``
    do not, and stay unseen. A block that writes its own buffers is refused at capture, so only edits
    from outside move a block's."""
    return array("Q", map(_VERSION, weights))


def _frozen(value: Any) -> Any:
    """Contents of a small sequence or set, for comparison (objects by identity)."""
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, (list, tuple)):
        return (type(value), tuple(_frozen(v) for v in value))
    if isinstance(value, (set, frozenset)):
        return (type(value), frozenset(v if isinstance(v, _SCALARS) else id(v) for v in value))
    return ("id", id(value))


class _Recorder:
    """Walks a block once, collecting what :class:`ModuleGuard` checks."""

    def __init__(self) -> None:
        self.dicts: list[dict] = []
        self.sequences: list[tuple[Any, Any]] = []
        self.tensors: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] = []  # parameters and buffers whose in-place edits are tracked
        self._seen: set[int] = set()

    def module(self, module: nn.Module) -> None:
        state = module.__dict__
        items = _CONTAINERS.get(type(module))
        if items is not None:
            self.dicts.append(state[items])
            self.tensors.extend(t for t in state["_parameters"].values() if t is not None)
            self.weights.extend(filter(_counts_edits, state["_parameters"].values()))
            return
        self.dicts.append(state)
        for name in _LEAF_DICTS if type(module) in _LEAF_LAYERS else _MODULE_DICTS:
            self.dicts.append(state[name])
        for tensor in (*state["_parameters"].values(), *state["_buffers"].values()):
            if tensor is not None:
                self.tensors.append(tensor)
        self.weights.extend(filter(_counts_edits, (*state["_parameters"].values(), *state["_buffers"].values())))
        for key, value in state.items():
            if key not in _IGNORED and key not in _MODULE_DICTS and not key.startswith(_FOREIGN):
                self.value(value, 1)

    def value(self, value: Any, depth: int) -> None:
        if isinstance(value, _SCALARS) or isinstance(value, (nn.Module, _OPAQUE)):
            return  # scalars live in a checked dict; modules are walked on their own
        if id(value) in self._seen:
            return
        self._seen.add(id(value))
        if isinstance(value, torch.Tensor):
            self.tensors.append(value)
        elif isinstance(value, dict):
            self.dicts.append(value)
            if depth < _DEPTH:
                for item in value.values():
                    self.value(item, depth + 1)
        elif isinstance(value, (list, set)):  # mutable in place, no version tag: compare contents
            self.sequences.append((value, _frozen(value)))
        elif isinstance(value, (tuple, frozenset)):
            if depth < _DEPTH:
                for item in value:
                    self.value(item, depth + 1)
        elif isinstance(getattr(value, "__dict__", None), dict) and depth < _DEPTH:
            self.dicts.append(value.__dict__)  # a processor, a config object
            for item in value.__dict__.values():
                self.value(item, depth + 1)


def _tensor_state(tensor: torch.Tensor) -> tuple:
    return (tensor.dtype, tensor.device, tensor.shape, type(tensor))


def _tensor_check(tensors: tuple[torch.Tensor, ...]) -> Any:
    """A C++ check that ``tensors`` keep their Python type, dtype, device and sizes (strides free),
    or None where this torch cannot build one. It also compares requires_grad and the dispatch keys
    of the thread state (autocast) it was built under: a failed check is confirmed in Python."""
    if _TensorGuards is None or not tensors:
        return None
    try:
        return _TensorGuards(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                             dynamic_dims_strides=[[None] * t.dim() for t in tensors])
    except Exception:  # a tensor it cannot describe: the Python comparison alone
        return None


def _flat(recorded: tuple[Any, Any]) -> bool:
    """Whether a recorded list or set (exactly those types) held scalars only."""
    sequence, frozen = recorded
    return type(sequence) in (list, set) and all(isinstance(v, _SCALARS) for v in frozen[1])


class _SequenceCheck:
    """Recorded lists and sets compared with their contents now: those of scalars only (PEFT's
    ``merged_adapters``, a few hundred on a LoRA model) in two passes at C speed, the rest one by one."""

    __slots__ = ("lists", "list_items", "sets", "set_items", "others")

    def __init__(self, sequences: Sequence[tuple[Any, Any]]) -> None:
        flat = [s for s in sequences if _flat(s)]
        self.lists = tuple(seq for seq, _ in flat if type(seq) is list)
        self.list_items = tuple(frozen[1] for seq, frozen in flat if type(seq) is list)
        self.sets = tuple(seq for seq, _ in flat if type(seq) is set)
        self.set_items = tuple(frozen[1] for seq, frozen in flat if type(seq) is set)
        self.others = tuple(s for s in sequences if not _flat(s))

    def holds(self) -> bool:
        try:  # an element put in since may not compare with a scalar (a tensor): a change
            if tuple(map(tuple, self.lists)) != self.list_items or tuple(map(frozenset, self.sets)) != self.set_items:
                return False
        except Exception:
            return False
        return all(_frozen(sequence) == frozen for sequence, frozen in self.others)


def _contents(mapping: dict) -> tuple | None:
    """A dictionary's contents when it holds scalars only (PEFT's per-adapter ``scaling``, ``r``,
    ``lora_alpha``), types included; None for any other dictionary."""
    items = tuple(mapping.items())
    if all(isinstance(k, _SCALARS) and isinstance(v, _SCALARS) for k, v in items):
        return tuple((k, type(v), v) for k, v in items)
    return None


def _rewritten_alike(guard: ModuleGuard | GuardSet, now: Any) -> bool:
    """Whether every dictionary whose version moved holds scalars only and the same ones as recorded
    (diffusers' per-call LoRA scale, ``attention_kwargs={"scale": s}``, scales every LoRA layer's
    ``scaling`` at a call's start and back at its end: each call writes them, to the same values). The
    recorded versions then take the new ones, so the next check is the fast one again."""
    contents = guard.contents
    for index, (tag, recorded) in enumerate(zip(now, guard.versions)):
        if tag != recorded and (contents[index] is None or _contents(guard.dicts[index]) != contents[index]):
            return False
    guard.versions[:] = now
    return True


def _unchanged(guard: ModuleGuard | GuardSet) -> bool:
    """The guard's dictionaries still have their recorded versions (or, those of scalars only, their
    recorded contents), its lists and sets their recorded contents and its parameters their recorded
    version counters (tensors: checked apart)."""
    now = _versions(guard.dicts)
    if now != guard.versions and not _rewritten_alike(guard, now):
        return False
    if _weight_versions(guard.weights) != guard.weight_versions:
        return False
    return guard.sequence_check.holds()


def _joined(parts: Sequence[Any], empty: Any) -> Any:
    """``empty`` extended by every part in turn (guards' recorded version arrays or lists, joined)."""
    for part in parts:
        empty.extend(part)
    return empty


@dataclass(frozen=True, eq=False)
class ModuleGuard:
    """The state of one block that its capture depends on (see the module docstring)."""

    dicts: tuple[dict, ...]
    versions: Any  # :func:`_versions` of ``dicts``
    sequences: tuple[tuple[Any, Any], ...]
    tensors: tuple[torch.Tensor, ...]
    tensor_states: list
    description: dict[str, Any]  # a readable snapshot, for :meth:`changes`
    skip: tuple[nn.Module, ...] = ()
    # The fast check of ``tensors``, rebuilt when only what it checks beyond ``tensor_states`` moved.
    tensor_check: list = dataclasses.field(default_factory=lambda: [None])
    # Parameters and their version counters: an in-place edit does not change what a capture computes
    # (graphs read weights live), but residuals cached before it are stale, so it fails the guard too.
    weights: tuple[torch.Tensor, ...] = ()
    weight_versions: array = dataclasses.field(default_factory=lambda: array("Q"))
    # What :func:`guard_module`'s ``also`` dictionaries are, in order (the last entries of ``dicts``).
    also: tuple[str, ...] = ()
    # Per dictionary, its :func:`_contents` when recorded (None: not of scalars only).
    contents: tuple[tuple | None, ...] = ()

    @property
    def sequence_check(self) -> _SequenceCheck:
        check = self.__dict__.get("_sequence_check")
        if check is None:  # made once (a frozen dataclass: set past its __setattr__)
            check = self.__dict__["_sequence_check"] = _SequenceCheck(self.sequences)
        return check

    def holds(self, module: nn.Module | None = None) -> bool:
        """True when nothing the capture baked in, or a cached residual was computed with, changed
        (``module``: unused, for symmetry)."""
        if not _unchanged(self):
            return False
        check = self.tensor_check[0]
        if check is not None and check.check(*self.tensors):
            return True
        if list(map(_tensor_state, self.tensors)) != self.tensor_states:
            return False
        # Same states, other grad flags or autocast keys: check in C++ under those from now on.
        self.tensor_check[0] = _tensor_check(self.tensors)
        return True

    def changes(self, module: nn.Module, limit: int = 4, root: str = "the block") -> list[str]:
        """What differs between the recorded state and ``module`` now, in words (at most ``limit``;
        ``root``: what to call ``module`` itself)."""
        now = describe(module, self.skip)
        found: list[str] = []
        for path in sorted(set(self.description) | set(now)):
            before, after = self.description.get(path), now.get(path)
            where = path or root
            if before is None:
                found.append(f"{where} added ({after['type']})")
            elif after is None:
                found.append(f"{where} removed ({before['type']})")
            elif before["id"] != after["id"] or before["type"] != after["type"]:
                found.append(f"{where} replaced ({before['type']} -> {after['type']})")
            else:
                for part in ("parameters", "hooks", "attributes", "edits"):
                    keys = sorted(set(before[part]) | set(after[part]))
                    changed = [k for k in keys if before[part].get(k) != after[part].get(k)]
                    if part == "edits":  # the same parameter object, another version count
                        edited = [key[0] for key in changed if key in before[part] and key in after[part]]
                        if edited:
                            found.append(f"{where}: {', '.join(edited[:4])} edited in place")
                    elif changed:
                        found.append(f"{where}: {part[:-1] if len(changed) == 1 else part} "
                                     f"{', '.join(changed[:4])} changed")
            if len(found) >= limit:
                break
        tail = len(self.also)
        if not found and tail:  # not in the description: the extra dictionaries, by version
            recorded = list(self.versions)[-tail:]
            found = [f"{what} changed" for what, d, version in zip(self.also, self.dicts[-tail:], recorded)
                     if _versions((d,))[0] != version]
        return found or ["state the capture read changed (no difference found in its description)"]


class GuardSet:
    """Several blocks' guards checked as one: a single pass over all their dictionaries' versions and
    one C++ check of all their tensors, instead of a Python call per block (the blocks of a folded
    span, checked before it is replayed: a reusing step of a deep model checks every block's).

        >>> blocks = [nn.Linear(2, 2) for _ in range(3)]
        >>> guards = GuardSet([guard_module(b) for b in blocks])
        >>> guards.holds()
        True
        >>> blocks[1].weight = nn.Parameter(torch.zeros(3, 2))
        >>> guards.holds()
        False

    Holds exactly when every guard's :meth:`ModuleGuard.holds` would: where the joint tensor check
    fails (another grad mode or autocast state than it was built under, or a real change), each
    guard decides, and the joint check is rebuilt when they all hold.
    """

    def __init__(self, guards: Sequence[ModuleGuard]) -> None:
        self.guards = tuple(guards)
        self.dicts = tuple(d for g in self.guards for d in g.dicts)
        # The recorded tags and counters, joined (not read now: a change since must show).
        self.versions = _joined([g.versions for g in self.guards], _versions(()))
        self.contents = tuple(c for g in self.guards for c in g.contents)
        self.sequences = tuple(s for g in self.guards for s in g.sequences)
        self.sequence_check = _SequenceCheck(self.sequences)
        self.tensors = tuple(t for g in self.guards for t in g.tensors)
        self.weights = tuple(t for g in self.guards for t in g.weights)
        self.weight_versions = _joined([g.weight_versions for g in self.guards], array("Q"))
        # Built at the first holds(), once each guard confirmed its recorded state: built now, it would
        # take the tensors as they are, and a change since the guards were recorded would pass.
        self.tensor_check: list = [None]

    def holds(self) -> bool:
        if not _unchanged(self):
            return False
        check = self.tensor_check[0]
        if check is not None and check.check(*self.tensors):
            return True
        if not all(guard.holds() for guard in self.guards):
            return False
        self.tensor_check[0] = _tensor_check(self.tensors)
        return True


def _describe_value(value: Any, depth: int = 0) -> Any:
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value), *_tensor_state(value))
    if isinstance(value, dict) and depth < _DEPTH:
        return tuple((repr(k), _describe_value(v, depth + 1)) for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)) and depth < _DEPTH:
        return (type(value).__name__, tuple(_describe_value(v, depth + 1) for v in value))
    if isinstance(getattr(value, "__dict__", None), dict) and not isinstance(value, (nn.Module, _OPAQUE)) \
            and depth < _DEPTH:
        return (type(value).__qualname__, id(value),
                tuple((k, _describe_value(v, depth + 1)) for k, v in vars(value).items()))
    return (type(value).__qualname__, id(value))


def describe(module: nn.Module, skip: tuple[nn.Module, ...] = ()) -> dict[str, Any]:
    """A readable snapshot of what :class:`ModuleGuard` checks, by submodule path."""
    out: dict[str, Any] = {}
    skipped = [path for path, sub in module.named_modules() if any(sub is s for s in skip)]
    for path, sub in module.named_modules(remove_duplicate=False):
        if any(path == s or path.startswith(s + ".") for s in skipped):
            continue
        state = sub.__dict__
        out[path] = {
            "id": id(sub),
            "type": f"{type(sub).__module__}.{type(sub).__qualname__}",
            "parameters": {n: _describe_value(p) for n, p in (*state["_parameters"].items(), *state["_buffers"].items())},
            # By parameter object: a parameter replaced is reported as that, not as an edit.
            "edits": {(n, id(p)): p._version for n, p in (*state["_parameters"].items(), *state["_buffers"].items())
                      if _counts_edits(p)},
            "hooks": {"forward": tuple(state["_forward_hooks"]), "forward_pre": tuple(state["_forward_pre_hooks"])},
            "attributes": {k: _describe_value(v) for k, v in state.items()
                           if k not in _IGNORED and k not in _MODULE_DICTS and not k.startswith(_FOREIGN)},
        }
    return out


def _walk(module: nn.Module, skip: frozenset[int]) -> list[nn.Module]:
    out, stack = [], [module]
    seen: set[int] = set()
    while stack:
        sub = stack.pop()
        if id(sub) in seen or id(sub) in skip:
            continue
        seen.add(id(sub))
        out.append(sub)
        stack.extend(reversed([m for m in sub._modules.values() if m is not None]))
    return out


def guard_module(module: nn.Module, skip: tuple[nn.Module, ...] = (), also: dict[str, dict] | None = None) -> ModuleGuard:
    """Record the state of ``module`` (and everything under it) that a capture of it depends on.

    >>> layer = nn.Linear(2, 2)
    >>> guard = guard_module(layer)
    >>> guard.holds()
    True
    >>> layer.weight = nn.Parameter(layer.weight.detach().half())
    >>> guard.holds(), guard.changes(layer)
    (False, ['the block: parameter weight changed'])

    ``skip``: submodules (with everything under them) left out, e.g. blocks guarded on their own.
    ``also``: more dictionaries whose versions are checked, by what :meth:`~ModuleGuard.changes` calls
    them (a wrapper's own forward hooks).
    """
    also = also or {}
    recorder = _Recorder()
    for sub in _walk(module, frozenset(map(id, skip))):
        recorder.module(sub)
    recorder.dicts.extend(also.values())
    return ModuleGuard(
        dicts=tuple(recorder.dicts),
        versions=_versions(recorder.dicts),
        contents=tuple(map(_contents, recorder.dicts)),
        sequences=tuple(recorder.sequences),
        tensors=tuple(recorder.tensors),
        tensor_states=[_tensor_state(t) for t in recorder.tensors],
        description=describe(module, skip),
        skip=tuple(skip),
        tensor_check=[_tensor_check(tuple(recorder.tensors))],
        weights=tuple(recorder.weights),
        weight_versions=_weight_versions(recorder.weights),
        also=tuple(also),
    )


class StructuralKey(tuple):
    """A :func:`structural_key`: compares and hashes as the tuple it is; ``portable`` says whether it
    may be compared across models (see :func:`is_portable`), known when the key was made."""

    portable: bool


def is_portable(structure: StructuralKey) -> bool:
    """Whether a :func:`structural_key` names no object by identity (a plain tensor or module
    attribute, a forward hook) and holds no Python function (an instance ``forward`` that diffusers'
    hooks install: its closure is not compared). Only such keys may be compared across models:
    another model's objects can get the ids of dead ones, a capture bakes in what a plain tensor
    held, and another model's hook of the same code may be configured otherwise.

        >>> is_portable(structural_key(nn.Linear(2, 2)))
        True
    """
    return structure.portable


def ambient_state() -> tuple:
    """Process state outside the model that a captured forward depends on: autocast (CPU and CUDA)
    and, when diffusers is loaded, its globally active attention backend. Read once per model call.
    """
    state: tuple = (
        torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
        torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
    )
    dispatch = sys.modules.get("diffusers.models.attention_dispatch")
    registry = getattr(dispatch, "_AttentionBackendRegistry", None)
    if registry is not None:
        state += (str(registry.get_active_backend()[0]),)
    return state


def _plain(value: Any, local: list[str], depth: int = 0) -> Any:
    """A hashable, comparable form of an attribute value that may steer forward's control flow.
    Appends to ``local`` what it names that means something in this process only (an object by
    identity, a function whose closure it does not compare)."""
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_plain(v, local, depth + 1) for v in value))
    if isinstance(value, (set, frozenset)):
        return ("set", tuple(sorted(repr(_plain(v, local, depth + 1)) for v in value)))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((repr(k), repr(_plain(v, local, depth + 1))) for k, v in value.items())))
    if isinstance(value, torch.Tensor):  # plain tensor attributes (not buffers): compare by identity
        local.append("tensor")
        return ("tensor", id(value))
    if isinstance(value, nn.Module):
        local.append("module")
        return ("module", id(value))
    if callable(value) and not hasattr(value, "__dict__"):
        return ("callable", getattr(value, "__qualname__", repr(value)))
    if isinstance(value, (types.FunctionType, types.MethodType)):
        # Its code by name; what its closure or bound object holds is not compared (see is_portable).
        # (A bound method may wrap any callable, e.g. a functools.partial: no __qualname__ of its own.)
        local.append("function")
        name = getattr(value, "__qualname__", type(getattr(value, "__func__", value)).__qualname__)
        return ("function", name, _plain(dict(getattr(value, "__dict__", {})), local, depth + 1))
    state = getattr(value, "__dict__", None)
    if state is not None and depth < 3:
        return (type(value).__qualname__, _plain(dict(state), local, depth + 1))
    return (type(value).__qualname__, repr(value))


def structural_key(block: nn.Module) -> StructuralKey:
    """Blocks with equal keys compute the same function of (parameters, inputs): one capture can
    serve them all, each reading its own parameters.

    Compares classes, parameter and buffer shapes, dtypes, devices and tensor types, forward hooks
    (by identity) and every other attribute, private ones included (PEFT's ``_disable_adapters``
    and ``_active_adapter``, the ``processor``, flags such as ``context_pre_only``): anything not
    plain data is compared by type and contents, so doubt means "capture separately".
    """
    parts = []
    local: list[str] = []  # what only this process can compare (see is_portable)
    for path, module in block.named_modules():
        state = module.__dict__
        attrs = tuple(sorted(
            (k, repr(_plain(v, local))) for k, v in state.items()
            if k not in _IGNORED and k not in _MODULE_DICTS and not k.startswith(_FOREIGN)
        ))
        parts.append((
            path,
            type(module).__qualname__,
            attrs,
            tuple((n, tuple(p.shape), p.dtype, p.device, type(p).__qualname__)
                  for n, p in state["_parameters"].items() if p is not None),
            tuple((n, tuple(b.shape), b.dtype, b.device, type(b).__qualname__)
                  for n, b in state["_buffers"].items() if b is not None),
            tuple(map(id, state["_forward_hooks"].values())),
            tuple(map(id, state["_forward_pre_hooks"].values())),
        ))
    key = StructuralKey(parts)
    key.portable = not local and not any(hooks or pre_hooks for *_, hooks, pre_hooks in parts)
    return key
