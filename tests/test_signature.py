"""A block call's signature: the fast flatten of plain containers agrees with pytree exactly.

Bindings are keyed by :func:`flatten_call`'s structure key and leaves; a key that merged two
structures pytree tells apart would hand a call a program captured for other inputs.
"""

from __future__ import annotations

from collections import OrderedDict, namedtuple

import torch
import torch.utils._pytree as pytree
from hypothesis import given, settings
from hypothesis import strategies as st

from adacache_fx.passes.capture import call_signature, flatten_call, leaf_key

Pair = namedtuple("Pair", "a b")
TENSORS = [torch.zeros(2), torch.ones(3, 2), torch.zeros(2, dtype=torch.float16)]

leaves = st.one_of(st.none(), st.integers(-2, 2), st.sampled_from([0.0, 1.0, True, False, "x"]),
                   st.sampled_from(TENSORS))
trees = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(st.sampled_from(["a", "b", "c"]), children, max_size=3),
        st.tuples(children, children).map(lambda t: Pair(*t)),
        st.dictionaries(st.sampled_from(["a", "b"]), children, max_size=2).map(OrderedDict),
    ),
    max_leaves=8,
)
calls = st.tuples(st.lists(trees, max_size=3).map(tuple), st.dictionaries(st.sampled_from(["x", "y"]), trees))


@settings(max_examples=300, deadline=None)
@given(calls)
def test_flatten_call_gives_pytrees_leaves_in_its_order(call):
    args, kwargs = call
    fast, _ = flatten_call(args, kwargs)
    expected = pytree.tree_leaves((args, kwargs))
    assert len(fast) == len(expected) and all(a is b for a, b in zip(fast, expected))


@settings(max_examples=300, deadline=None)
@given(calls, calls)
def test_signatures_are_equal_exactly_when_pytree_specs_and_leaf_keys_are(first, second):
    def reference(args, kwargs):
        flat, spec = pytree.tree_flatten((args, kwargs))
        return spec, tuple(leaf_key(leaf) for leaf in flat)

    same = reference(*first) == reference(*second)
    assert (call_signature(*first) == call_signature(*second)) == same
    if same:
        assert hash(call_signature(*first)) == hash(call_signature(*second))


def test_scalars_of_equal_value_and_other_type_are_other_signatures():
    # 1 == 1.0 == True in Python; a graph specialised to one of them may compute another dtype.
    keys = {call_signature((value,), {}) for value in (1, 1.0, True)}
    assert len(keys) == 3
    assert call_signature((torch.zeros(2),), {"rope": (None, 2)}) == call_signature((torch.ones(2),), {"rope": (None, 2)})
    # A tuple and a list with the same leaves are other structures to pytree, and here.
    assert call_signature(((1, 2),), {}) != call_signature(([1, 2],), {})
