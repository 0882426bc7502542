"""EL2's fast paths against the generic code they replace (issue 17, round 8).

- EL2's TLB marks: the hyp stage-1 tells `h.el2_tlb` the input range of every valid descriptor
  it replaces (`KvmPgtable.changed`), and only those entries are walked again at their next use;
  before, any descriptor store (the table's generation moving) made every entry walk again.
  Hypothesis draws hyp maps (pages, blocks) and unmaps, with and without the TLBI the kernel
  issues (and the seeded bug that skips it), between EL2 accesses: `el2_translate` must give
  the same PA, the same panic and record the same stale uses as the generation-checked TLB
  (`_by_generation`, the code before).
- `el2_read_u64s` against one `el2_read_u64` per element.
- A multi-page stage-2 annotation (`_stage2_annotate_pages`, a page at a time) against the
  generic walk of the range.
"""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

import pkvm
from pkvm.arch.pgtable_stage2 import _stage2_map_walk
from pkvm.hyp.mm import (
    PAGE_OFFSET_MASK,
    _s1_writable,
    _walk,
    el2_read_u64,
    el2_read_u64s,
    el2_translate,
    hyp_va,
)
from pkvm.hyp.panic import HypBug
from pkvm.hyp.pgtable import KVM_PTE_ADDR_MASK, PAGE_HYP, PAGE_HYP_RO, granule_shift, pte_valid
from pkvm.machine.memory import PAGE_SIZE, RAM_BASE
from pkvm.machine.mmu import Tlb
from test_fast_paths import _S1, VA
from test_fast_paths_map import _S2, IPA

WINDOW = (4 << 20) // PAGE_SIZE
pages = st.one_of(st.integers(0, 3), st.integers(0, 3), st.integers(0, WINDOW - 1))
change = st.tuples(st.sampled_from(["map", "map", "unmap"]), pages,
                   st.sampled_from([1, 1, 1, 2, 512]), st.sampled_from([PAGE_HYP, PAGE_HYP_RO]),
                   st.booleans())
access = st.tuples(st.just("access"), pages, st.booleans())


def _by_generation(h, tlb: Tlb, va: int, write: bool) -> int:
    """`el2_translate` as it was: an entry keeps the table generation it last agreed at, and a
    hit at another generation is walked again."""
    pgt = h.pkvm_pgtable
    key = (va >> 12) << 1
    e = tlb.entries.get(key)
    if e is not None and (e[1] or not write):
        if e[2] != pgt.gen:
            ret, pte, level = pgt.get_leaf(va)
            if not ret and pte_valid(pte):
                mask = (1 << granule_shift(level)) - 1
                fresh = (pte & KVM_PTE_ADDR_MASK & ~mask) | (va & mask & ~PAGE_OFFSET_MASK)
                if fresh == e[0] and _s1_writable(pte) == e[1]:
                    tlb.entries[key] = (e[0], e[1], pgt.gen)
                    return e[0] | (va & PAGE_OFFSET_MASK)
                now = f"maps PA {fresh:#x}"
            else:
                now = "is unmapped"
            tlb.record_stale(f"EL2 {'write' if write else 'read'} of hyp VA {va:#x} used the "
                             f"cached PA {e[0]:#x}; the hyp stage-1 {now}")
        return e[0] | (va & PAGE_OFFSET_MASK)
    pa, writable = _walk(h, va, write)  # (a miss: the walk, as both translations take it)
    tlb.entries[key] = (pa & ~PAGE_OFFSET_MASK, writable, pgt.gen)
    return pa


def _outcome(fn, *args):
    try:
        return fn(*args)
    except HypBug as e:
        return str(e)


@settings(max_examples=120, deadline=None)
@given(steps=st.lists(st.one_of(change, access, access), min_size=1, max_size=40),
       tlbi=st.sampled_from(["kernel", "none", "seeded-bug"]))
@example(steps=[("map", 0, 1, PAGE_HYP, False), ("access", 0, False),
                ("unmap", 0, 1, PAGE_HYP, False), ("map", 0, 1, PAGE_HYP, True),
                ("access", 0, False)], tlbi="seeded-bug")  # a remap after an unmap, no TLBI
@example(steps=[("map", 0, 512, PAGE_HYP, False), ("access", 3, True),
                ("unmap", 0, 1, PAGE_HYP, False), ("access", 3, True)], tlbi="none")
def test_marked_el2_tlb_agrees_with_rechecking_every_entry(steps, tlbi):
    env = _S1()
    pgt = env.pgt
    m = pkvm.Machine(memory="64M", bugs=("hyp-unmap-no-tlbi",) if tlbi == "seeded-bug" else ())
    h = m._hyp
    h.pkvm_pgtable = pgt
    h.el2_tlb = marked = Tlb("EL2 stage-1")
    every = Tlb("EL2 stage-1")
    pgt.changed = marked.mark_range
    if tlbi != "none":
        from pkvm.hyp.mm import _hyp_stage1_tlbi

        def both(start: int, size: int) -> None:
            _hyp_stage1_tlbi(h, start, size)  # the marked TLB's (mark, with the seeded bug)
            if tlbi == "kernel":
                every.flush_range(start, size)
        pgt.tlbi = both
    for step in steps:
        if step[0] != "access":
            kind, page, n, prot, elsewhere = step
            va = VA + (page & ~(n - 1)) * PAGE_SIZE
            if kind == "map":
                pgt.hyp_map(va, n * PAGE_SIZE, va - VA + RAM_BASE + ((8 << 20) if elsewhere else 0),
                            prot)
            else:
                pgt.hyp_unmap(va, n * PAGE_SIZE)
            touched = [(p, w) for p in (0, 1, 2, 3, step[1]) for w in (False, True)]
        else:
            touched = [step[1:]]
        for page, write in touched:
            va = VA + page * PAGE_SIZE + 0x18
            a = _outcome(el2_translate, h, va, write)
            b = _outcome(_by_generation, h, every, va, write)
            assert a == b
            assert marked.stale_uses == every.stale_uses
    assert set(marked.entries) == set(every.entries)


def test_a_hyp_stage1_change_marks_only_what_it_covers():
    m = pkvm.Machine(memory="64M")
    h = m._hyp
    vm = m.host.create_vm(vcpus=1, protected=False, memory="16M")
    vm.map(0x40000, 1)  # the first run makes the hyp VM
    va = hyp_va(vm.hyp_vm_pa)
    el2_translate(h, va)
    key = (va >> 12) << 1
    assert h.el2_tlb.entries[key][2] == 0
    h.pkvm_pgtable.changed(va + PAGE_SIZE, PAGE_SIZE)  # another page's descriptor replaced
    assert h.el2_tlb.entries[key][2] == 0
    h.pkvm_pgtable.changed(va, PAGE_SIZE)
    assert h.el2_tlb.entries[key][2] == 1
    el2_translate(h, va)  # walked again, agrees: the mark is cleared
    assert h.el2_tlb.entries[key][2] == 0 and not h.el2_tlb.stale_uses


@settings(max_examples=30, deadline=None)
@given(first=st.one_of(st.integers(0, 4095), st.integers(0, 511).map(lambda k: 8 * k + 4)),
       count=st.integers(0, 70), mark=st.booleans())
@example(first=2236, count=56, mark=False)  # `arch.id_regs` of a 7.2 host struct kvm
@example(first=4000, count=56, mark=False)  # across the page's end
@example(first=2236, count=56, mark=True)
def test_el2_read_u64s_agrees_with_one_read_per_element(first, count, mark):
    m = pkvm.Machine(memory="64M")
    h = m._hyp
    vm = m.host.create_vm(vcpus=1, protected=False, memory="16M")
    vm.map(0x40000, 1)  # the first run makes the hyp VM
    base = hyp_va(vm.hyp_vm_pa)
    for i in range(1024):
        h.mem.write_u64(vm.hyp_vm_pa + 8 * i, (i * 0x9E37_79B9_7F4A_7C15) & (2**64 - 1))
    va = base + first
    h.el2_tlb.flush_all()
    if mark:  # an entry left marked: the first read walks again
        el2_translate(h, va)
        h.pkvm_pgtable.changed(va & ~0xFFF, PAGE_SIZE)
    before = (dict(h.el2_tlb.entries), list(h.el2_tlb.stale_uses))
    fast = _outcome(el2_read_u64s, h, va, count)
    after_fast = (dict(h.el2_tlb.entries), list(h.el2_tlb.stale_uses))
    h.el2_tlb.entries.clear()
    h.el2_tlb.entries.update(before[0])
    h.el2_tlb.stale_uses[:] = before[1]
    slow = _outcome(lambda: [el2_read_u64(h, va + 8 * k) for k in range(count)])  # noqa: B023
    assert fast == slow
    assert after_fast == (dict(h.el2_tlb.entries), list(h.el2_tlb.stale_uses))


@settings(max_examples=150, deadline=None)
@given(before=st.lists(st.tuples(st.integers(0, 1023), st.sampled_from([1, 2, 512]),
                                 st.sampled_from(["map", "annotate"])), max_size=6),
       start=st.integers(0, 1023), n=st.integers(2, 600), ann=st.sampled_from([1 << 2, 2 << 60]))
def test_annotating_pages_agrees_with_the_walk(before, start, n, ann):
    from pkvm.hyp.pgtable import KVM_PGTABLE_PROT_RWX

    a, b = _S2(), _S2()
    for env in (a, b):
        for page, k, kind in before:
            base = IPA + (page & ~(k - 1)) * PAGE_SIZE
            if kind == "map":
                env.pgt.stage2_map(base, k * PAGE_SIZE, base, KVM_PGTABLE_PROT_RWX)
            else:
                env.pgt.stage2_map(base, k * PAGE_SIZE, None, 0, annotation=4)
    addr = IPA + start * PAGE_SIZE
    fast = a.pgt.stage2_map(addr, n * PAGE_SIZE, None, 0, annotation=ann)
    slow = _stage2_map_walk(b.pgt, addr, n * PAGE_SIZE, None, ann, 0, 0, 0, True)
    assert fast == slow
    assert a.state() == b.state()


@settings(max_examples=25, deadline=None)
@given(values=st.lists(st.tuples(st.sampled_from(["_HOST_VCPU", "_HCR_EL2", "_VCPU_IDX", "_LOADED"]),
                                 st.one_of(st.integers(0, 2**64 - 1), st.integers(-3, 3),
                                           st.just(2**64))), min_size=1, max_size=6))
def test_struct_set_word_store_agrees_with_packed_store(values):
    """`struct_set` of an aligned u64 field (a word store) against `store_scalar` of its packed
    bytes (the generic store): the same bytes, TLB and store checks, the same refusal."""
    import pkvm.hyp.pkvm_structs as ps

    m = pkvm.Machine(memory="64M")
    h = m._hyp
    vm = m.host.create_vm(vcpus=1, protected=False, memory="16M")
    vm.map(0x40000, 1)
    hyp_vm = next(s for s in h.vm_table if isinstance(s, ps.PkvmHypVm))
    vcpu = next(v for v in hyp_vm.vcpus if v is not None)
    page = vcpu._off + h.mem.base
    for name, value in values:
        f = getattr(ps, name)
        before = (h.mem.read(page, PAGE_SIZE * 2), dict(h.el2_tlb.entries), list(h.bad_stores))
        fast = _outcome2(ps.struct_set, vcpu, f, value)
        after = (h.mem.read(page, PAGE_SIZE * 2), dict(h.el2_tlb.entries), list(h.bad_stores))
        h.mem.write(page, before[0])
        h.el2_tlb.entries.clear()
        h.el2_tlb.entries.update(before[1])
        h.bad_stores[:] = before[2]
        slow = _outcome2(_packed_set, vcpu, f, value)
        assert fast == slow
        assert after == (h.mem.read(page, PAGE_SIZE * 2), dict(h.el2_tlb.entries), list(h.bad_stores))


def _packed_set(vcpu, f, value):
    """`struct_set` as it was: the packed bytes' `store_scalar`."""
    import pkvm.hyp.pkvm_structs as ps

    if ps.struct_get(vcpu, f) != value:
        ps.store_scalar(vcpu, f[0], f[1].pack(int(value)))


def _outcome2(fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - the refusal's type is compared
        return type(e).__name__


@settings(max_examples=300, deadline=None)
@given(x=st.one_of(st.integers(-(2**66), 2**66), st.integers(0, 2**50),
                   st.integers(2**62 - 8, 2**62 + 8), st.integers(2**64 - 8, 2**64 + 8)))
def test_masks_without_the_long_operation_agree(x):
    """`hyp_va`, `hyp_pa`, `hyp_pfn_to_phys`, `HostCtxt.ret` skip `& U64` where it changes
    nothing (0..2**62 - 1): the same values as the mask everywhere."""
    from pkvm.hyp.hyp_main import HostCtxt
    from pkvm.hyp.mem_protect import hyp_pfn_to_phys
    from pkvm.hyp.mm import hyp_pa
    from pkvm.hyp.state import HYP_LINEAR_OFFSET

    u64 = 2**64 - 1
    assert hyp_va(x) == (x + HYP_LINEAR_OFFSET) & u64
    assert hyp_pa(x) == (x - HYP_LINEAR_OFFSET) & u64
    if x >= 0:
        assert hyp_pfn_to_phys(x) == (x << 12) & u64
    if not _H:
        _H.append(pkvm.Machine(memory="64M")._hyp)
    regs = [0] * 31
    HostCtxt(_H[0], regs).ret(x)
    assert regs[1] == x & u64


_H: list = []
