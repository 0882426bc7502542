"""The checker's readings of runs agree with their one-at-a-time generic readings.

`Inspector.pages_quick` (a run of pages' states read as slices of the 7.2 vmemmap),
`Inspector.guest_leaves` (a run of guest stage-2 leaves read a table page at a time) and
`KvmPgtable.table_pages` (the table pages read a page at a time) against `page_quick`,
`guest_leaf` and the walker's `table_pages_walk`, at ranges Hypothesis draws, in the states a
fuzzer run leaves (guests with pages and blocks shared or donated, torn-down VMs). The
per-call comparisons over whole fuzzer runs are in tests/test_checker_fast.py (`runs`).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pkvm
from pkvm.abi.profiles import ALL_HCALL_NAMES, get_profile
from pkvm.check.ghost import GhostPage, func_id
from pkvm.hyp import pgtable as pt
from pkvm.hyp.memory import HypVmemmap
from pkvm.hyp.page_alloc import HypPool
from pkvm.hyp.spinlock import HypLocks
from pkvm.inspect import RESERVED_ENTRY, PageState, _leaf_run, used_slots
from pkvm.machine.memory import PAGE_SHIFT, PhysMemory
from test_dirty_pages import watched_run

U64 = (1 << 64) - 1
MEM = "64M"
_WORLDS: dict[str, list[Any]] = {}


def _states(abi: str) -> list[Any]:
    """The checker of a 60-step fuzzer run's (seed 6) last world, in the state the run left
    (7.2: three live VMs, two with guest pages mapped)."""
    if abi not in _WORLDS:
        checkers: list[Any] = []
        with pytest.MonkeyPatch.context() as mp:  # (a reboot reuses the memory: the last one)
            watched_run(mp, abi, 6, 60, lambda w: checkers.append(w.m.checker))
        _WORLDS[abi] = [c for c in checkers[-1:] if not c.machine.dead]
        assert _WORLDS[abi]
        if abi == "latest":
            assert sum(1 for _, vm in _WORLDS[abi][0].h.live_vms()
                       if vm.pgt is not None and vm.pgt.leaves(valid_only=True)) >= 2
    return _WORLDS[abi]


@pytest.mark.parametrize("abi", ["latest", "6.12"])
@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(1, 1100))
def test_a_run_of_pages_reads_as_its_pages(abi: str, data: Any, n: int) -> None:
    c = data.draw(st.sampled_from(_states(abi)))
    lo, hi = c._ram_lo, c._ram_hi
    pfn = data.draw(st.one_of(st.integers(lo - 600, hi + 10), st.integers(0, 1 << 52)))
    i = c.machine.inspect
    assert i.pages_quick(pfn, n) == [i.page_quick(pfn + k) for k in range(n)]


@pytest.mark.parametrize("abi", ["latest", "6.12"])
@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(1, 1100))
def test_a_run_of_guest_leaves_reads_as_its_leaves(abi: str, data: Any, n: int) -> None:
    c = data.draw(st.sampled_from(_states(abi)))
    i = c.machine.inspect
    handles = [hd for hd, _ in c.h.live_vms()] + [0x1000]
    handle = data.draw(st.sampled_from(handles))
    gfn = data.draw(st.one_of(st.integers(0, 1 << 20), st.integers(0, U64 >> PAGE_SHIFT),
                              st.sampled_from([0x40000, 0x40000 - 1, (1 << 28) - 1, 1 << 36])))
    ipa = (gfn << PAGE_SHIFT) & U64
    assert i.guest_leaves(handle, ipa, n) == [
        i.guest_leaf(handle, (ipa + (k << PAGE_SHIFT)) & U64) for k in range(n)]


@pytest.mark.parametrize("abi", ["latest", "6.12"])
def test_table_pages_read_at_once_are_the_walks(abi: str) -> None:
    for c in _states(abi):
        tables = c._tables()
        assert len(tables) >= 2
        for _, pgt in tables:
            assert pgt.table_pages() == pgt.table_pages_walk()


class _Table:
    """A stage-2 table of its own in 64M of RAM (tests/test_pgtable.py's set-up)."""

    def __init__(self) -> None:
        self.mem = PhysMemory(64 << 20)
        self.vmm = HypVmemmap.over(self.mem, 0xFF)
        self.pool = HypPool("pt", self.mem, self.vmm, HypLocks(1), False)
        self.pool.init((0x4000_0000 + (8 << 20)) >> 12, 256, 0)
        self.pgt = pt.KvmPgtable(self.mem, self.pool, stage=2, name="t")
        assert self.pgt.init() == 0


_MAPS = st.lists(st.tuples(st.booleans(), st.integers(0, 2047), st.integers(0, 8)), max_size=12)


@settings(max_examples=80, deadline=None)
@given(maps=_MAPS, start=st.integers(0, (4 << 30 >> PAGE_SHIFT) - 1), n=st.integers(2, 1500))
def test_a_leaf_run_is_each_pages_leaf(maps: list[tuple[bool, int, int]], start: int,
                                       n: int) -> None:
    """`_leaf_run` over a stage-2 with pages and 2M blocks mapped (ranges Hypothesis draws)
    against `get_leaf` page by page, and the table pages read at once against the walk."""
    t = _Table()
    for block, slot, k in maps:  # blocks at 2M slots, runs of k pages inside a slot
        size = (1 << 21) if block else (k + 1) << PAGE_SHIFT
        t.pgt.stage2_map(slot << 21, size, 0x4000_0000 + ((slot % 16) << 21),
                         pt.KVM_PGTABLE_PROT_RWX)
    ipa = start << PAGE_SHIFT
    run = _leaf_run(t.pgt, ipa, n)
    if ipa + (n << PAGE_SHIFT) <= 1 << t.pgt.ia_bits:
        assert run is not None
    if run is not None:
        want = [t.pgt.get_leaf(ipa + (k << PAGE_SHIFT)) for k in range(n)]
        assert run == [(r, lv, p) for r, p, lv in want]
    assert t.pgt.table_pages() == t.pgt.table_pages_walk()


@pytest.mark.parametrize("abi", ["latest", "6.12"])
@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_a_kept_function_id_is_the_profiles(abi: str, data: Any) -> None:
    """`ghost.func_id` (a name's ID kept per profile) against `Profile.func_id`."""
    prof = get_profile(abi)
    name = data.draw(st.one_of(st.sampled_from(sorted(ALL_HCALL_NAMES)), st.text(max_size=12)))
    assert func_id(prof, name) == prof.func_id(name)


@settings(max_examples=100, deadline=None)
@given(slots=st.lists(st.sampled_from([None, 0, "x", RESERVED_ENTRY]), max_size=300))
def test_used_slots_of_a_list_is_the_generic_scan(slots: list[Any]) -> None:
    """`used_slots` indexing a list against its loop over any sequence (a tuple)."""
    want = [i for i, s in enumerate(slots) if s is not None]
    assert used_slots(slots) == used_slots(tuple(slots)) == want


_CHECKED: list[Any] = []


@settings(max_examples=40, deadline=None)
@given(stores=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 63), st.integers(0, 4)),
                       max_size=24), noted=st.lists(st.integers(0, 63), max_size=6))
def test_changed_pages_read_once_are_the_generic(stores: list[tuple[int, int, int]],
                                                 noted: list[int]) -> None:
    """7.2: `Checker._changed_of` (each entry read once) against `_changed_generic` (compare,
    then `_note`) over stores Hypothesis draws into the vmemmap and the pages noted: the same
    pages, the same transitions counted, the same copy after; the state restored after."""
    if not _CHECKED:
        _CHECKED.append(pkvm.Machine(memory=MEM, cpus=2, abi="latest", check=True).checker)
    c = _CHECKED[0]
    hv = c.h._h.vmemmap  # the hyp's own (writable) arrays
    arrays = [hv.host_state, hv.hyp_state, hv.refcount, hv.host_share_guest_count]
    first = 0x100  # (pages past the hyp's first ones)
    kept = [a[first:first + 64].tobytes() for a in arrays]
    prev = [p.tobytes() for p in c._prev]
    trans = Counter(c.transitions)
    for which, k, v in stores:
        arrays[which][first + k] = v
    dirty = {c._ram_lo + first + k for _, k, _ in stores} | {c._ram_lo + first + k
                                                             for k in noted}
    got = []
    for fn in (c._changed_of, c._changed_generic):
        for p, b in zip(c._prev, prev):
            memoryview(p).cast("B")[:] = b
        c.transitions = Counter(trans)
        got.append((fn(set(dirty)), [p.tobytes() for p in c._prev], c.transitions))
    assert got[0] == got[1]
    for a, b in zip(arrays, kept):  # the machine and the copy as they were
        memoryview(a).cast("B")[first * a.itemsize:(first + 64) * a.itemsize] = b
    for p, b in zip(c._prev, prev):
        memoryview(p).cast("B")[:] = b
    c.transitions = trans


_STATES = st.sampled_from(sorted(PageState))


@given(a=st.tuples(_STATES, _STATES, st.integers(0, 3)), b=st.tuples(_STATES, _STATES,
                                                                      st.integers(0, 3)))
def test_a_ghost_page_compares_as_its_fields(a: tuple[Any, Any, int],
                                             b: tuple[Any, Any, int]) -> None:
    """`GhostPage`'s own `__eq__` against its fields compared as a tuple (as a dataclass's)."""
    assert (GhostPage(*a) == GhostPage(*b)) is (a == b)
    assert (GhostPage(*a) != GhostPage(*b)) is (a != b)
    assert GhostPage(*a) != None and None != GhostPage(*a)  # noqa: E711
    assert repr(GhostPage(*a)) == f"GhostPage(host={a[0]!r}, hyp={a[1]!r}, pins={a[2]!r})"
