"""The guard of a captured block: every change a capture depends on fails it, nothing else does.

Its tensor check runs in C++ where torch offers one (dynamo's ``TensorGuards``), which also compares
requires_grad and the autocast dispatch keys: those must not fail the guard (a needless recapture),
while dtype, device, shape and object changes must, also after the fast check was rebuilt.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from adacache_fx.passes.guards import GuardSet, guard_module, is_portable, structural_key


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8)
        self.register_buffer("scale", torch.ones(8))
        self.flags = {"fused": False}
        self.merged = []  # a list of scalars, as PEFT's merged_adapters
        self.active = {"default"}
        self.extra = nn.ModuleDict({"default": nn.Linear(8, 8)})  # a container, as PEFT's lora_A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(self.norm(x)) * self.scale


def test_grad_flags_and_autocast_do_not_fail_the_guard():
    block = Block()
    guard = guard_module(block)
    assert guard.holds()
    block.requires_grad_(False)
    assert guard.holds() and guard.holds()  # confirmed in Python once, then checked fast again
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert guard.holds()
    block.requires_grad_(True)
    assert guard.holds()


def test_tensor_changes_fail_the_guard_after_any_rebuild_of_its_fast_check():
    block = Block()
    guard = guard_module(block)
    block.requires_grad_(False)  # the fast check is rebuilt for the new flags
    assert guard.holds()
    weight = block.proj.weight.data
    block.proj.weight.data = weight.half()  # same Parameter object, other dtype (what .half() does)
    assert not guard.holds()
    assert guard.changes(block) == ["proj: parameter weight changed"]
    block.proj.weight.data = weight
    assert guard.holds()
    block.proj.weight.data = torch.zeros(8, 4)  # other shape
    assert not guard.holds()
    block.proj.weight.data = weight
    with torch.autocast("cpu", dtype=torch.bfloat16):
        block.scale.data = torch.ones(8, dtype=torch.float64)
        assert not guard.holds()
    block.scale.data = torch.ones(8)
    assert guard.holds()


def test_objects_hooks_and_attributes_fail_the_guard():
    block = Block()
    guard = guard_module(block)
    block.proj.weight = nn.Parameter(block.proj.weight.detach().clone())  # another object
    assert not guard.holds()
    block = Block()
    guard = guard_module(block)
    handle = block.norm.register_forward_hook(lambda module, args, out: out * 2)
    assert not guard.holds()
    handle.remove()
    block = Block()
    guard = guard_module(block)
    block.flags["fused"] = True
    assert not guard.holds()


def test_structural_keys_know_whether_other_models_may_compare_them():
    """Portable: plain data only. Not: a plain tensor or module attribute (named by id), a forward
    hook, a Python function attribute (its closure is not compared); text that looks like one is data."""
    def block():
        return nn.Sequential(nn.Linear(4, 4), nn.GELU())

    plain = block()
    plain[0].note = "('tensor', 1) ('function', 'f')"
    assert is_portable(structural_key(plain)) and is_portable(structural_key(block()))
    assert structural_key(block()) == structural_key(block())  # equal keys across instances

    with_tensor, with_module, with_function, hooked = block(), block(), block(), block()
    with_tensor[0].table = torch.zeros(2)
    with_module[1].__dict__["owner"] = nn.Linear(2, 2)  # held, not registered as a child
    scale = 2.0
    with_function[1].forward = lambda x: x * scale
    hooked[0].register_forward_hook(lambda *_: None)
    for model in (with_tensor, with_module, with_function, hooked):
        key = structural_key(model)
        assert not is_portable(key), model
        assert key == structural_key(model)  # still equal to itself within the process


def test_a_guard_set_holds_exactly_when_every_guard_does():
    """Each kind of change, made to any one of several blocks, fails the joint check; grad flags and
    autocast do not; after a change is undone it holds again."""
    changes = [
        lambda b: setattr(b.proj, "weight", nn.Parameter(b.proj.weight.detach().clone())),
        lambda b: b.norm.register_forward_hook(lambda module, args, out: out * 2),
        lambda b: b.flags.__setitem__("fused", True),
        lambda b: setattr(b.proj.weight, "data", b.proj.weight.data.half()),
        lambda b: b.merged.append("default"),
        lambda b: b.merged.append(torch.ones(2)),  # an element no scalar compares with
        lambda b: b.active.add("other"),
        lambda b: b.extra.__setitem__("other", nn.Linear(8, 8)),
        lambda b: b.extra["default"].register_forward_hook(lambda module, args, out: out * 2),
    ]
    for change in changes:
        for changed in range(3):
            blocks = [Block() for _ in range(3)]
            guards = [guard_module(b) for b in blocks]
            joint = GuardSet(guards)
            assert joint.holds() and joint.guards == tuple(guards) and joint.guards != tuple(guards[:2])
            change(blocks[changed])
            assert not joint.holds()
            assert [g.holds() for g in guards] == [i != changed for i in range(3)]
            # A set made after the change compares the guards' recorded state, not the state now.
            assert not GuardSet(guards).holds()
    blocks = [Block() for _ in range(3)]
    joint = GuardSet([guard_module(b) for b in blocks])
    blocks[2].requires_grad_(False)  # the joint tensor check fails; each guard confirms; rebuilt
    assert joint.holds() and joint.holds()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert joint.holds()
    weight = blocks[1].proj.weight.data
    blocks[1].proj.weight.data = torch.zeros(8, 4)
    assert not joint.holds()
    blocks[1].proj.weight.data = weight
    assert joint.holds()


def test_children_and_buffers_added_to_torch_leaf_layers_are_not_checked_and_change_nothing():
    """torch's own leaf layers read neither: the guard skips those dictionaries (a third of a block's),
    and the block computes the same. Their hooks, attributes and parameters are still checked, and a
    subclass of a leaf layer is checked whole."""
    block = Block()
    guard = guard_module(block)
    x = torch.randn(2, 8)
    before = block(x)
    block.proj.add_module("extra", nn.Linear(8, 8))
    block.proj.register_buffer("unused", torch.ones(3))
    assert guard.holds() and torch.equal(block(x), before)
    block.proj.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    assert not guard.holds()

    class Scaled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * getattr(self, "gain", torch.ones(())).sum()

    block = Block()
    block.proj = Scaled(8, 8)
    guard = guard_module(block)
    block.proj.register_buffer("gain", torch.full((1,), 3.0))
    assert not guard.holds()


def test_a_dictionary_of_scalars_rewritten_to_the_same_values_holds():
    """PEFT's ``scaling`` scaled and unscaled by a per-call LoRA scale: the version moves, the contents
    do not. Other values, another type (a tensor scale, as compiled hot swap prepares it) or a key
    added fail; a dictionary of other things (a module's own) fails on its version alone."""
    layer = nn.Linear(2, 2)
    layer.scaling = {"default": 1.0}
    guard = guard_module(layer)
    layer.scaling["default"] *= 0.5
    layer.scaling["default"] /= 0.5
    assert guard.holds() and guard.holds()
    set_ = GuardSet([guard, guard_module(nn.Linear(2, 2))])
    layer.scaling["default"] *= 1.0
    assert set_.holds()
    for change in (lambda d: d.update(default=0.5), lambda d: d.update(default=torch.tensor(1.0)),
                   lambda d: d.update(other=1.0)):
        layer.scaling = {"default": 1.0}
        guard = guard_module(layer)
        change(layer.scaling)
        assert not guard.holds(), layer.scaling
    guard = guard_module(layer)
    layer.gain = 2.0  # the module's __dict__: its version decides
    del layer.gain
    assert not guard.holds()


def test_changes_tell_a_parameter_edited_in_place_from_one_replaced():
    layer = nn.Linear(2, 2)
    guard = guard_module(layer)
    with torch.no_grad():
        layer.weight.mul_(2)
    assert not guard.holds() and guard.changes(layer) == ["the block: weight edited in place"]
    layer.register_buffer("table", torch.ones(3))  # a buffer (a rotary table) edited in place, too
    guard = guard_module(layer)
    layer.table.mul_(0.5)
    assert not guard.holds() and guard.changes(layer) == ["the block: table edited in place"]
    guard = guard_module(layer)
    layer.weight = nn.Parameter(layer.weight.detach().half())
    assert not guard.holds() and guard.changes(layer) == ["the block: parameter weight changed"]
