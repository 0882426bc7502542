"""The checker's kept readings are invalidated by every write that could make them stale.

`guest_leaves` re-parses only the table pages whose bytes changed since its last answer: over
random page-table trees (a DAG of table pages, as a hostile or buggy hyp may build) and random
stores to any of their words, the kept answer equals a walk from nothing and the generic
`_valid_leaves`. `HypView.vm_slots` keeps its used slots while each holds the same object and
the table counts the same free slots: over random stores of None, the reserved marker, a VM or
a foreign object into any slot, it equals a scan of every slot. `HypView.nothing_dirty` (the
checker's test before it drains the vmemmap's noted stores) is true exactly when a drain would
answer nothing and change nothing.
"""

from __future__ import annotations

from array import array
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

import pkvm
from pkvm.arch.pgtable import KVM_PTE_ADDR_MASK
from pkvm.check.page_invariants import _valid_leaves, guest_leaves
from pkvm.inspect import RESERVED_ENTRY, guest_state_of_pte
from pkvm.inspect_hyp import same_objects
from pkvm.machine.memory import PAGE_SHIFT

BASE, PAGES = 0x4000_0000, 6


class _Mem:
    """RAM as `guest_leaves` reads it: `u64` words from `base`."""

    def __init__(self) -> None:
        self.base = BASE
        self.words = array("Q", bytes(8 * 512 * PAGES))
        self.u64 = memoryview(self.words)


def _entry(draw: Any, page: int) -> int:
    """A descriptor as a table page `page` may hold: zero, invalid, a leaf (page or block, any
    attributes) or a pointer to a later table page (so the tables form no cycle)."""
    kind = draw(st.sampled_from(["zero", "invalid", "leaf", "table"]))
    if kind == "zero" or (kind == "table" and page + 1 >= PAGES):
        return 0
    attrs = draw(st.integers(0, (1 << 12) - 1)) | draw(st.sampled_from([0, 0x3 << 2, 1 << 55]))
    if kind == "invalid":
        return draw(st.integers(1, 2**62)) << 1
    if kind == "leaf":
        pa = draw(st.integers(0x4000_0, 0x4400_0)) << PAGE_SHIFT
        return (pa & KVM_PTE_ADDR_MASK) | (attrs & ~2) | 1
    target = draw(st.integers(page + 1, PAGES - 1))
    return (BASE + (target << PAGE_SHIFT)) | 3


def _generic(mem: _Mem, level: int) -> list[Any]:
    out = []
    for lvl, pte in _valid_leaves(mem, BASE, level):
        pfn = (pte & KVM_PTE_ADDR_MASK) >> PAGE_SHIFT
        out += [(pfn + k, guest_state_of_pte(pte)) for k in range(1 << (9 * (3 - lvl)))]
    return out


@settings(max_examples=150, deadline=None)
@given(data=st.data(), level=st.integers(1, 3), rounds=st.integers(1, 4))
def test_kept_guest_leaves_are_a_fresh_walk_after_any_store(data: Any, level: int,
                                                            rounds: int) -> None:
    mem = _Mem()
    for _ in range(data.draw(st.integers(0, 12))):  # a random tree
        page, slot = data.draw(st.integers(0, PAGES - 1)), data.draw(st.integers(0, 511))
        mem.words[page * 512 + slot] = _entry(data.draw, page)
    last = guest_leaves(mem, BASE, level, 1, None)
    assert last[1] == _generic(mem, level)
    for _ in range(rounds):  # stores to any word of any page, then the kept reading
        for _ in range(data.draw(st.integers(0, 3))):
            page, slot = data.draw(st.integers(0, PAGES - 1)), data.draw(st.integers(0, 511))
            mem.words[page * 512 + slot] = _entry(data.draw, page)
        got = guest_leaves(mem, BASE, level, 1, last)
        assert got[1] == guest_leaves(mem, BASE, level, 1, None)[1] == _generic(mem, level)
        assert [t[:3] for t in got[0]] == [t[:3] for t in guest_leaves(mem, BASE, level, 1,
                                                                       None)[0]]
        last = got


_MACHINE: list[Any] = []


def _view_machine() -> Any:
    if not _MACHINE:
        m = pkvm.Machine(memory="64M", cpus=2, abi="latest")
        m.host.create_vm(vcpus=1, protected=True, memory="256K").map(0x40000, 1)
        _MACHINE.append(m)
    return _MACHINE[0]


def _view() -> Any:
    return _view_machine().inspect.hyp_view()


@settings(max_examples=100, deadline=None)
@given(stores=st.lists(st.lists(st.tuples(st.integers(0, 254), st.sampled_from(
    ["none", "reserved", "vm", "foreign"])), max_size=4), min_size=1, max_size=6))
def test_kept_vm_slots_are_a_scan_after_any_slot_store(stores: list[Any]) -> None:
    h = _view()
    table = h._h.vm_table
    saved = list(table)
    vm = next(s for s in saved if s is not None and s is not RESERVED_ENTRY)
    try:
        h.vm_slots()
        for batch in stores:  # each batch of stores, then a reading (outside any hold)
            for idx, what in batch:
                table[idx] = {"none": None, "reserved": RESERVED_ENTRY, "vm": vm,
                              "foreign": object()}[what]
            got = h.vm_slots()
            assert [(i, id(s)) for i, s in got] == [
                (i, id(s)) for i, s in enumerate(table) if s is not None]
    finally:
        table[:] = saved
        h.vm_slots()


_POOL = [None, RESERVED_ENTRY, object(), object(), object()]  # equality by identity, as in the table


@settings(max_examples=200, deadline=None)
@given(a=st.lists(st.integers(0, len(_POOL) - 1), max_size=8),
       edits=st.lists(st.tuples(st.integers(0, 7), st.integers(-1, len(_POOL) - 1)), max_size=3),
       resize=st.sampled_from([0, -1, 1]))
def test_same_objects_is_an_identity_scan(a: list[int], edits: list[Any], resize: int) -> None:
    """`same_objects` (vm_slots' test of its kept copy) = identity slot by slot, for slots of
    the kinds the VM table holds (None, the reserved marker, objects equal only to
    themselves); a fresh object in a slot (-1) is a change."""
    x = [_POOL[k] for k in a]
    y = list(x)
    for i, k in edits:
        if i < len(y):
            y[i] = object() if k < 0 else _POOL[k]
    if resize < 0 and y:
        y.pop()
    elif resize > 0:
        y.append(None)
    want = len(x) == len(y) and all(p is q for p, q in zip(x, y))
    assert same_objects(x, y) == want == same_objects(y, x)


@settings(max_examples=100, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["touch", "drain", "drain2", "none"]),
                              st.integers(0, 63)), max_size=20))
def test_nothing_dirty_is_an_empty_drain(ops: list[Any]) -> None:
    """`HypView.nothing_dirty` (the checker's test before a drain) is true exactly when a drain
    would answer nothing and change nothing, with two recorders of one vmemmap handing noted
    entries to each other and the hyp's set dropped (None) at times."""
    m = _view_machine()
    a, b = m.inspect.hyp_view(), m.inspect.hyp_view()
    a.vmemmap.record_dirty()
    b.vmemmap.record_dirty()
    v = a._h.vmemmap
    a.vmemmap.drain_dirty()
    b.vmemmap.drain_dirty()
    for op, i in ops:
        if op == "touch":
            v.touch(i)
        elif op == "none":
            v.dirty = None  # (as a restore of an unrecorded state leaves it)
        else:
            view = a if op == "drain" else b
            before = v.dirty
            quiet = view.nothing_dirty()
            got = view.vmemmap.drain_dirty()
            assert quiet == (before is not None and not got)
    a.vmemmap.drain_dirty()
    b.vmemmap.drain_dirty()
