"""Round 6's fast paths of a protected guest's page life (issue 17) against the generic code.

Each is a model speed-up, not kernel behaviour: a valid entry replaced and invalidated marks no
TLB entry first (`KvmPgtable.set_pte_invalidate` against `set_pte` then `invalidate`), the
memcache refill copies the host's `struct kvm_hyp_memcache` in and back as two words
(`el2_read_u64_pair` / `el2_write_u64_pair` against the 16-byte `el2_read` / `el2_write`), a
lock's release pops the innermost lock (against `list.remove`), and the host's zeroing of a
translated range runs compiled (`zero_runs` against zeroing each span on its own).
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pkvm
from pkvm import guests
from pkvm.arch.pte import KVM_PTE_VALID
from pkvm.hyp.memory import PageState
from pkvm.hyp.mm import (
    el2_read,
    el2_read_u64_pair,
    el2_write,
    el2_write_u64_pair,
    hyp_pa,
    kern_hyp_va,
)
from pkvm.hyp.panic import HypBug
from pkvm.hyp.pgtable import KVM_PGTABLE_PROT_RWX, KVM_PGTABLE_WALK_LEAF, KVM_PGTABLE_WALK_TABLE_PRE
from pkvm.hyp.spinlock import HypLocks, HypSpinLock
from pkvm.machine.memory import PAGE_SIZE, PhysMemory, zero_runs
from pkvm.machine.mmu import Tlb, tlb_s2_translate
from test_fast_paths_map import IPA, S2_PROTS, _s2_mapped, ipa_pages

SETTINGS = settings(max_examples=80, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
WINDOW = (4 << 20) // PAGE_SIZE
_PAIR = struct.Struct("<QQ")


# -- set_pte_invalidate ------------------------------------------------------------------------
def _wired(before, tlbi: bool):
    env = _s2_mapped(before)
    tlb = Tlb("host stage-2")
    env.pgt.changed = tlb.mark_range
    if tlbi:
        env.pgt.tlbi = tlb.flush_range
    return env, tlb


def _fill(env, tlb) -> list[int]:
    """The host's reads and writes of every page of the window (faults skipped)."""
    return [tlb_s2_translate(tlb, env.mem, env.pgt.pgd, IPA + k * PAGE_SIZE + 8, w)
            for k in range(0, WINDOW, 7) for w in (False, True)]


def _entry(env, ipa: int, table: bool):
    """(ptep, old, level) of the leaf covering `ipa`, or of the first table entry above it."""
    found = []

    def visit(ctx, v):
        if not found and (v == KVM_PGTABLE_WALK_TABLE_PRE) == table:
            found.append((ctx.ptep, ctx.old, ctx.level))
        return 0

    env.pgt.walk(ipa, PAGE_SIZE, visit, KVM_PGTABLE_WALK_LEAF | KVM_PGTABLE_WALK_TABLE_PRE)
    return found[0] if found else None


@settings(max_examples=150, deadline=None)
@given(before=st.lists(st.tuples(ipa_pages, st.sampled_from([1, 1, 512]),
                                 st.sampled_from([None, *S2_PROTS])), min_size=1, max_size=8),
       ipa=ipa_pages, table=st.booleans(), new=st.sampled_from(["zero", "annotation", "page"]),
       tlbi=st.booleans())
def test_set_pte_invalidate_is_set_pte_then_invalidate(before, ipa, table, new, tlbi):
    """The same table, TLB entries (marks included), page references and later translations as
    the generic store followed by the TLBI of a valid old entry; without a TLBI, the marks."""
    (a, ta), (b, tb) = _wired(before, tlbi), _wired(before, tlbi)
    assert _fill(a, ta) == _fill(b, tb)
    found = _entry(a, ipa, table)
    if found is None:
        return
    ptep, old, level = found
    assert _entry(b, ipa, table) == found
    g = 1 << (12 + 9 * (3 - level))  # a valid leaf: a page at level 3, else a block
    leaf = (ipa & ~(g - 1)) | (0x4C3 if level == 3 else 0x4C1)
    value = {"zero": 0, "annotation": 3 << 2, "page": leaf}[new]
    a.pgt.set_pte_invalidate(ptep, old, value, ipa, level)
    b.pgt.set_pte(ptep, old, value, ipa, level)
    if old & KVM_PTE_VALID:
        b.pgt.invalidate(ipa, level)
    assert a.state() == b.state() and a.pgt.gen == b.pgt.gen
    assert ta.entries == tb.entries
    assert _fill(a, ta) == _fill(b, tb) and ta.stale_uses == tb.stale_uses


def test_a_broken_block_drops_its_entries_without_marking_them():
    """The case it is for: a host stage-2 block broken into a table (an annotation of one of
    its pages) leaves none of the block's entries, marked or not, and the same as the generic."""
    env, tlb = _wired([(IPA, 512, KVM_PGTABLE_PROT_RWX)], tlbi=True)
    _fill(env, tlb)
    assert any(k >> 1 < (IPA >> 12) + 512 for k in tlb.entries)
    marks = []
    env.pgt.changed = lambda start, size: marks.append((start, size))
    assert env.pgt.stage2_map(IPA + 5 * PAGE_SIZE, PAGE_SIZE, None, 0, annotation=1 << 2) == 0
    assert marks == [] and not [k for k in tlb.entries if k >> 1 < (IPA >> 12) + 512]


# -- the refill's pair of words ----------------------------------------------------------------
@pytest.fixture(scope="module")
def machine_vcpu():
    m = pkvm.Machine(memory="64M", cpus=2, trace=False)
    vm = m.host.create_vm(vcpus=1, protected=True, memory=1 << 20)
    vm.map(guests.RAM_BASE >> 12, 1)  # the hyp VM and its vCPU exist
    return m, vm


def _outcome(h, va, access):
    """What an access at `va` did: its value or fault, the 32 bytes around it after it and the
    bad-store records it added; memory and the records are put back afterwards."""
    pos = hyp_pa(va) - h.mem.base - 8
    inside = 0 <= pos <= len(h.mem.bytes) - 32
    before = bytes(h.mem.bytes[pos : pos + 32]) if inside else b""
    n_bad = len(h.bad_stores)
    try:
        out: object = access()
    except HypBug as bug:
        out = ("fault", str(bug))
    after = bytes(h.mem.bytes[pos : pos + 32]) if inside else b""
    records = h.bad_stores[n_bad:]
    del h.bad_stores[n_bad:]
    if inside:
        h.mem.write(h.mem.base + pos, before)
    return out, after, records


@SETTINGS
@given(page=st.sampled_from([-2, -1, 0, 1, 2, 64]), off=st.integers(0, 4095),
       lo=st.integers(0, 2**64 - 1), hi=st.integers(-1, 2**64 - 1), mine=st.booleans(),
       disown=st.booleans(), same=st.booleans())
def test_the_pair_access_is_the_generic_16_byte_el2_access(machine_vcpu, page, off, lo, hi, mine,
                                                           disown, same):
    """Around the host vCPU's page (shared with EL2; some pages around it not mapped at EL2)
    and in the hyp vCPU's own page, at every offset (unaligned, across a page): the same
    words or fault as `el2_read` of 16 bytes, and the same bytes, fault and ownership records
    as `el2_write` of them (`disown`: the hyp's state of the pages made NOPAGE meanwhile, so a
    store is recorded as a bad one; `same`: the words there already, an elided store)."""
    m, vm = machine_vcpu
    h = m._hyp
    if mine:
        va = (h.vm_table[0].vcpus[0].va & ~0xFFF) + page * PAGE_SIZE + off
    else:
        va = kern_hyp_va(h, (vm.vcpus[0].pa & ~0xFFF) + page * PAGE_SIZE) + off
    if same:
        pos = hyp_pa(va) - h.mem.base
        if 0 <= pos <= len(h.mem.bytes) - 16:
            lo, hi = _PAIR.unpack(h.mem.bytes[pos : pos + 16])
    data = _PAIR.pack(lo, hi & (2**64 - 1))
    states = h.vmemmap.hyp_state
    first = (hyp_pa(va) >> 12) - h.vmemmap.base_pfn
    kept = [(i, states[i]) for i in (first, first + 1) if 0 <= i < len(states)]
    if disown:
        for i, _ in kept:
            states[i] = PageState.NOPAGE
    try:
        assert _outcome(h, va, lambda: el2_read_u64_pair(h, va)) == \
            _outcome(h, va, lambda: _PAIR.unpack(el2_read(h, va, 16)))
        assert _outcome(h, va, lambda: el2_write_u64_pair(h, va, lo, hi)) == \
            _outcome(h, va, lambda: el2_write(h, va, data))
    finally:
        for i, state in kept:
            states[i] = state


# -- HypSpinLock.release -------------------------------------------------------------------------
@given(order=st.permutations([0, 1, 2]))
def test_release_in_any_order_leaves_the_others_held(order):
    """Releasing the innermost lock pops it; any other is removed where it is (as before)."""
    locks = HypLocks(1)
    held = [HypSpinLock(locks, f"l{r}", r) for r in (10, 20, 30)]
    for lock in held:
        lock.acquire()
    left = list(held)
    for i in order:
        held[i].release()
        left.remove(held[i])
        assert locks.held[0] == left and held[i].owner is None


# -- the host's zeroing of a translated range ----------------------------------------------------
def _zero_each(mem: PhysMemory, spans) -> None:
    """The generic zeroing: every span of RAM on its own, no runs gathered."""
    for out, k in spans:
        if out is not None:
            mem.zero(out, k)


@settings(max_examples=100, deadline=None)
@given(pages=st.lists(st.one_of(st.none(), st.integers(0, 15)), min_size=1, max_size=12),
       filled=st.sets(st.integers(0, 15)))
def test_zero_runs_is_zeroing_each_span(pages, filled):
    """Spans of pages in any order (adjacent runs, repeats, MMIO between them) over RAM holding
    data in some pages: the same bytes after as zeroing each span of RAM on its own."""
    a, b = PhysMemory(16 * PAGE_SIZE), PhysMemory(16 * PAGE_SIZE)
    for mem in (a, b):
        for k in filled:
            mem.write(mem.base + k * PAGE_SIZE + 8 * k, b"\xa5" * 8)
    spans = [(None if p is None else a.base + p * PAGE_SIZE, PAGE_SIZE) for p in pages]
    zero_runs(a, spans)
    _zero_each(b, spans)
    assert bytes(a.bytes) == bytes(b.bytes)
