"""More single-page fast paths against the generic code they short-cut (issue 17): the hyp
stage-1 and stage-2 maps and the stage-2 unmap of one page against their generic walks, and
`PhysMemory.zero` on pages it remembers as backed against plain byte comparison.

Each fast path is a model speed-up, not kernel behaviour: Hypothesis draws the mappings already
in place (blocks, tables, pages, annotations) and the page mapped, and both sides must make the
same descriptor writes, the same table-page references and return the same errno.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pkvm.arch.pgtable_hyp import hyp_map_walk
from pkvm.arch.pgtable_stage2 import _stage2_map_walk, _stage2_unmap_walk
from pkvm.arch.pte import hyp_set_prot_attr, stage2_set_prot_attr
from pkvm.hyp.pgtable import (
    KVM_PGTABLE_PROT_R,
    KVM_PGTABLE_PROT_RW,
    KVM_PGTABLE_PROT_RWX,
    KVM_PGTABLE_PROT_SW0,
    KVM_PGTABLE_PROT_X,
    KVM_PGTABLE_WALK_IGNORE_EAGAIN,
    PAGE_HYP,
)
from pkvm.machine.memory import PAGE_SIZE, RAM_BASE, PhysMemory
from test_fast_paths import _S1, VA, maps, va_pages

HYP_PROTS = [PAGE_HYP, KVM_PGTABLE_PROT_R, KVM_PGTABLE_PROT_R | KVM_PGTABLE_PROT_X,
             PAGE_HYP | KVM_PGTABLE_PROT_SW0, KVM_PGTABLE_PROT_RWX]  # the last: -EINVAL


def _mapped(env: _S1, ops: list[tuple[int, int]]) -> None:
    for va, n in ops:
        base = va & ~(n * PAGE_SIZE - 1) if n == 512 else va
        env.pgt.hyp_map(base, n * PAGE_SIZE, base - VA + RAM_BASE, PAGE_HYP)


@settings(max_examples=150, deadline=None)
@given(ops=maps, pages=st.lists(st.tuples(st.one_of(va_pages, st.just(VA + 0x800)),
                                          st.sampled_from(HYP_PROTS), st.booleans()),
                                min_size=1, max_size=6))
def test_hyp_map_one_page_agrees_with_walker(ops, pages):
    a, b = _S1(), _S1()
    _mapped(a, ops)
    _mapped(b, ops)
    for va, prot, elsewhere in pages:
        phys = RAM_BASE + (va - VA) + (PAGE_SIZE if elsewhere else 0)
        attr = hyp_set_prot_attr(prot)
        fast = a.pgt.hyp_map(va, PAGE_SIZE, phys, prot)
        slow = -22 if attr is None else hyp_map_walk(b.pgt, va, PAGE_SIZE, phys & ~0xFFF, attr)
        assert fast == slow
        assert a.state() == b.state()


class _S2(_S1):
    """The same pool under a stage-2 table (the host's shape: 48-bit IPA, starting level 0)."""

    def __init__(self):
        super().__init__()
        from pkvm.hyp import pgtable as pt

        self.pgt = pt.KvmPgtable(self.mem, self.pool, stage=2, name="s2")
        assert self.pgt.init() == 0


IPA = 0x4000_0000
ipa_pages = st.integers(0, (4 << 20) // PAGE_SIZE - 1).map(lambda k: IPA + k * PAGE_SIZE)
S2_PROTS = [KVM_PGTABLE_PROT_RWX, KVM_PGTABLE_PROT_RWX | KVM_PGTABLE_PROT_SW0,
            KVM_PGTABLE_PROT_RW, KVM_PGTABLE_PROT_R]


def _s2_mapped(before: list[tuple[int, int, int | None]]) -> _S2:
    """A stage-2 with `before` mapped: (ipa, pages: 1 or a 512-page block, prot or None for
    an annotation, an owner id in bits 9:2)."""
    env = _S2()
    for ipa, n, prot in before:
        base = ipa & ~(n * PAGE_SIZE - 1)
        if prot is None:
            env.pgt.stage2_map(base, n * PAGE_SIZE, None, 0, annotation=1 << 2)
        else:
            env.pgt.stage2_map(base, n * PAGE_SIZE, base, prot)
    return env


@settings(max_examples=150, deadline=None)
@given(before=st.lists(st.tuples(ipa_pages, st.sampled_from([1, 1, 512]),
                                 st.sampled_from([None, *S2_PROTS])), max_size=10),
       pages=st.lists(st.tuples(ipa_pages, st.sampled_from([None, *S2_PROTS]),
                                st.sampled_from([0, KVM_PGTABLE_WALK_IGNORE_EAGAIN])),
                      min_size=1, max_size=6))
def test_stage2_map_one_page_agrees_with_walker(before, pages):
    a, b = _s2_mapped(before), _s2_mapped(before)
    assert a.state() == b.state()
    for ipa, prot, flags in pages:
        if prot is None:
            fast = a.pgt.stage2_map(ipa, PAGE_SIZE, None, 0, annotation=1 << 2, flags=flags)
            slow = _stage2_map_walk(b.pgt, ipa, PAGE_SIZE, None, 1 << 2, flags, 0, 0, True)
        else:
            fast = a.pgt.stage2_map(ipa, PAGE_SIZE, ipa, prot, flags=flags)
            attr = stage2_set_prot_attr(prot, b.pgt.normal_memattr)
            assert attr is not None
            slow = _stage2_map_walk(b.pgt, ipa, PAGE_SIZE, ipa, 0, flags, attr, ipa, False)
        assert fast == slow
        assert a.state() == b.state()


@settings(max_examples=150, deadline=None)
@given(before=st.lists(st.tuples(ipa_pages, st.sampled_from([1, 1, 1, 512]),
                                 st.sampled_from([None, KVM_PGTABLE_PROT_RWX])), max_size=10),
       unmaps=st.lists(st.one_of(ipa_pages, st.sampled_from([IPA + 0x800, 2**48 - PAGE_SIZE, 2**48])),
                       min_size=1, max_size=8))
@example(before=[(IPA, 1, KVM_PGTABLE_PROT_RWX)], unmaps=[IPA])  # the last page: tables freed
@example(before=[(IPA, 1, KVM_PGTABLE_PROT_RWX), (IPA + PAGE_SIZE, 1, None)], unmaps=[IPA])
# The last page of a table: the walk's TABLE_POST visit names the table's range, not the next.
@example(before=[(IPA + 511 * PAGE_SIZE, 1, None)], unmaps=[IPA + 511 * PAGE_SIZE])
def test_stage2_unmap_one_page_agrees_with_walker(before, unmaps):
    """The one-page unmap (`_stage2_unmap_page`: the level-3 entry cleared, then the tables it
    emptied freed bottom up) against the generic walk: the same descriptors, table-page
    references, freed pages, errno, and the same TLB invalidations and change notes."""
    a, b = _s2_mapped(before), _s2_mapped(before)
    told: dict[str, list[tuple[str, int, int]]] = {"a": [], "b": []}
    for key, env in (("a", a), ("b", b)):
        log = told[key]
        env.pgt.tlbi = lambda s, n, log=log: log.append(("tlbi", s, n))
        env.pgt.changed = lambda s, n, log=log: log.append(("changed", s, n))
    assert a.state() == b.state()
    for ipa in unmaps:
        fast = a.pgt.stage2_unmap(ipa, PAGE_SIZE)
        slow = _stage2_unmap_walk(b.pgt, ipa, PAGE_SIZE)
        assert fast == slow
        assert a.state() == b.state()
        assert a.pool.free_blocks() == b.pool.free_blocks()
        assert told["a"] == told["b"]


# -- zero() on pages it knows are backed ------------------------------------------------------
ZMEM = 1 << 20


@settings(max_examples=100, deadline=None)
@given(steps=st.lists(st.tuples(st.sampled_from(["write", "zero"]),
                                st.one_of(st.integers(0, 3), st.integers(0, ZMEM // PAGE_SIZE - 1)),
                                st.sampled_from([1, 1, 3]),
                                st.binary(min_size=1, max_size=16)), max_size=25))
@example(steps=[("write", 0, 1, b"x"), ("zero", 0, 1, b""), ("write", 0, 1, b"y"),
                ("zero", 0, 1, b"")])  # the second zero finds the page known backed
def test_zero_agrees_with_bytes_and_keeps_untouched_pages_unbacked(steps):
    mem = PhysMemory(ZMEM)
    want = bytearray(ZMEM)
    written: set[int] = set()
    for op, page, n, data in steps:
        n = min(n, ZMEM // PAGE_SIZE - page)
        off = page * PAGE_SIZE
        if op == "write":
            at = off + len(data) * 97 % (PAGE_SIZE - 16)
            mem.write(RAM_BASE + at, data)
            want[at : at + len(data)] = data
            written.add(page)
        else:
            mem.zero(RAM_BASE + off, n * PAGE_SIZE)
            want[off : off + n * PAGE_SIZE] = bytes(n * PAGE_SIZE)
    # Nothing but the writes made a page hold data (zero() read no hole) ...
    if mem._file is not None:
        assert {k for k in range(ZMEM // PAGE_SIZE)
                if mem.next_data(k * PAGE_SIZE) == k * PAGE_SIZE} <= written
    # ... and every page written holds what the writes and zeroes left (the rest reads zero).
    for page in written:
        off = page * PAGE_SIZE
        assert mem.read(RAM_BASE + off, PAGE_SIZE) == bytes(want[off : off + PAGE_SIZE])
    zero = bytes(PAGE_SIZE)
    assert all(want[k * PAGE_SIZE : (k + 1) * PAGE_SIZE] == zero
               for k in range(ZMEM // PAGE_SIZE) if k not in written)


def test_next_data_finds_the_pages_written_and_zero_leaves_holes_alone():
    """The RAM file tells holes (never written: they read as zeros) from pages holding data;
    zero() of a hole leaves it a hole, of a written page leaves zeros (and data)."""
    mem = PhysMemory(ZMEM)
    if mem._file is None:
        pytest.skip("no memory files here: every page counts as holding data")
    mem.write(RAM_BASE + 3 * PAGE_SIZE, b"\xaa" * 8)
    assert mem.next_data(0) == 3 * PAGE_SIZE
    assert mem.next_data(4 * PAGE_SIZE) == ZMEM  # the page past RAM holds data
    mem.zero(RAM_BASE, 8 * PAGE_SIZE)
    assert mem.next_data(0) == 3 * PAGE_SIZE  # the holes stayed holes
    assert mem.read(RAM_BASE, 8 * PAGE_SIZE) == bytes(8 * PAGE_SIZE)
    assert mem.nonzero_pages() == []
