"""The host stage-2 TLB's per-entry marks against a recheck of every entry (issue 17).

A stage-2 table tells its TLB the input range of every valid descriptor it replaces
(`KvmPgtable.changed`), and only the entries under it are walked again at their next use; before,
any descriptor store (the table's generation moving) made every entry walk again. Hypothesis
draws maps (pages, blocks, annotations, remaps), unmaps and permission changes of a stage-2,
with and without the TLBI the kernel issues, between host accesses: the marked TLB must give
the same output and record the same stale uses as the generation-checked one (`_by_generation`,
the code before), and an entry left unmarked must agree with a fresh walk.
"""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from pkvm.hyp.pgtable import KVM_PGTABLE_PROT_R, KVM_PGTABLE_PROT_RWX, KVM_PTE_LEAF_ATTR_S2_PERMS
from pkvm.machine.memory import PAGE_SIZE, PhysMemory
from pkvm.machine.mmu import S2_WALK_FAULT, Tlb, s2_translate, tlb_s2_translate
from test_fast_paths_map import _S2, IPA

WINDOW = (4 << 20) // PAGE_SIZE
# Often the same few pages (each change is followed by accesses to pages 0..3).
pages = st.one_of(st.integers(0, 3), st.integers(0, 3), st.integers(0, WINDOW - 1))
change = st.tuples(st.sampled_from(["map", "annotate", "unmap", "perms"]), pages,
                   st.sampled_from([1, 1, 1, 2, 512]), st.sampled_from([KVM_PGTABLE_PROT_RWX,
                                                                      KVM_PGTABLE_PROT_R]),
                   st.booleans())
access = st.tuples(st.just("access"), pages, st.booleans())


def _apply(env: _S2, op: tuple) -> None:
    kind, page, n, prot, elsewhere = op
    base = IPA + (page & ~(n - 1)) * PAGE_SIZE
    size = n * PAGE_SIZE
    pgt = env.pgt
    if kind == "map":  # `elsewhere`: an output other than the identity (a remap)
        pgt.stage2_map(base, size, base + (8 << 20 if elsewhere else 0), prot)
    elif kind == "annotate":
        pgt.stage2_map(base, size, None, 0, annotation=1 << 2)
    elif kind == "unmap":
        pgt.stage2_unmap(base, size)
    else:
        perms = KVM_PTE_LEAF_ATTR_S2_PERMS  # `elsewhere`: take them away, else give them
        pgt.stage2_update_leaf(base, size, 0 if elsewhere else perms, perms if elsewhere else 0)


def _by_generation(tlb: Tlb, mem: PhysMemory, root: int, ipa: int, write: bool, gen: int) -> int:
    """The TLB as it was: an entry keeps the table generation it last agreed at, and a hit at
    another generation is walked again."""
    key = (ipa >> 12) << 1 | write
    hit = tlb.entries.get(key)
    if hit is None:
        out, fault = s2_translate(mem, root, ipa, write)
        if fault is not None:
            return S2_WALK_FAULT
        page = (out & ~0xFFF) if mem.is_ram(out) else -1
        tlb.entries[key] = [page, write, gen]
        return out if page >= 0 else -1
    if hit[2] != gen:
        out, fault = s2_translate(mem, root, ipa, write)
        fresh = -1 if fault is not None else ((out & ~0xFFF) if mem.is_ram(out) else -1)
        if fault is None and fresh == hit[0]:
            hit[2] = gen
        else:
            now = f"a {fault.kind} fault" if fault is not None else f"PA {fresh:#x}"
            tlb.record_stale(f"host {'write' if write else 'read'} of IPA {ipa:#x} used the "
                             f"cached PA {hit[0]:#x}; the host stage-2 gives {now}")
    return hit[0] + (ipa & 0xFFF) if hit[0] >= 0 else -1


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.one_of(change, access, access), min_size=1, max_size=40),
       tlbi=st.booleans())
@example(steps=[("map", 0, 1, KVM_PGTABLE_PROT_RWX, False), ("access", 0, False),
                ("map", 0, 1, KVM_PGTABLE_PROT_RWX, True), ("access", 0, False)],
         tlbi=False)  # a page remapped without its TLBI: the cached PA is stale
@example(steps=[("map", 0, 512, KVM_PGTABLE_PROT_RWX, False), ("access", 3, True),
                ("perms", 0, 1, KVM_PGTABLE_PROT_RWX, True), ("access", 3, True)],
         tlbi=False)  # a block's permissions taken away without the TLBI
def test_marked_tlb_agrees_with_rechecking_every_entry(steps, tlbi):
    marked, every = _S2(), _S2()
    t_marked, t_every = Tlb("host stage-2"), Tlb("host stage-2")
    marked.pgt.changed = t_marked.mark_range
    if tlbi:  # the kernel's invalidations; without them stale entries stay and are used
        marked.pgt.tlbi = t_marked.flush_range
        every.pgt.tlbi = t_every.flush_range
    for step in steps:
        if step[0] != "access":
            _apply(marked, step)
            _apply(every, step)
            assert marked.state()[:2] == every.state()[:2]
            touched = [(p, w) for p in (0, 1, 2, 3, step[1]) for w in (False, True)]
        else:
            touched = [step[1:]]
        for page, write in touched:  # the host's accesses: reads and writes of the pages
            ipa = IPA + page * PAGE_SIZE + 0x18
            a = tlb_s2_translate(t_marked, marked.mem, marked.pgt.pgd, ipa, write)
            b = _by_generation(t_every, every.mem, every.pgt.pgd, ipa, write, every.pgt.gen)
            assert a == b
            assert t_marked.stale_uses == t_every.stale_uses
        # An unmarked entry is one whose walk nothing changed: a fresh walk gives its output.
        for key, (page_out, _w, mark) in t_marked.entries.items():
            if mark:
                continue
            out, fault = s2_translate(marked.mem, marked.pgt.pgd, (key >> 1) << 12, bool(key & 1))
            assert fault is None and out & ~0xFFF == page_out
    assert set(t_marked.entries) == set(t_every.entries)


def test_a_change_marks_only_the_entries_it_covers():
    env = _S2()
    tlb = Tlb("t")
    env.pgt.changed = tlb.mark_range
    env.pgt.stage2_map(IPA, 4 * PAGE_SIZE, IPA, KVM_PGTABLE_PROT_RWX)
    for k in range(4):
        assert tlb_s2_translate(tlb, env.mem, env.pgt.pgd, IPA + k * PAGE_SIZE, False) != S2_WALK_FAULT
    env.pgt.stage2_map(IPA + PAGE_SIZE, PAGE_SIZE, None, 0, annotation=1 << 2)
    assert [tlb.entries[(IPA >> 12) + k << 1][2] for k in range(4)] == [0, 1, 0, 0]
