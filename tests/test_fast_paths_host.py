"""The host side's short cuts agree with the generic code they replace (issue 17, round 7).

The hardware walker's faults as codes (`mmu._walk`) and the abort path's one walk
(`tlb_s2_translate_fault`), the port's one-page store and zeroing, its store log
(`HostPort.log_stores`) and the fuzzer's op dispatch: each gives what the generic code gives.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

import pkvm
from pkvm.check.fuzz_ops import GUEST_OPS, HANDLE_CALLS, STEP_OPS
from pkvm.errors import HypPanic
from pkvm.machine.memory import PAGE_SIZE, PhysMemory, zero_runs
from pkvm.machine.mmu import (
    _ADDR,
    FAULT_PERMISSION,
    FAULT_TRANSLATION,
    S2_WALK_FAULT,
    S2AP_R,
    S2AP_W,
    S2Fault,
    Tlb,
    s2_translate,
    s2_walk,
    tlb_s2_translate,
    tlb_s2_translate_fault,
)


def _reference_walk(mem: PhysMemory, root: int, ipa: int,
                    write: bool) -> tuple[int, S2Fault | None, int]:
    """The stage-2 walk as it was written before the fault codes: a fault object per fault."""
    table = root
    for level in range(4):
        shift = 39 - 9 * level
        pte = mem.read_u64(table + ((ipa >> shift) & 511) * 8)
        if not pte & 1:
            return 0, S2Fault(FAULT_TRANSLATION, level, ipa, write), 0
        if level < 3 and pte & 2:
            table = pte & _ADDR
            continue
        if level == 3 and not pte & 2:
            return 0, S2Fault(FAULT_TRANSLATION, level, ipa, write), 0
        if not pte & (S2AP_W if write else S2AP_R):
            return 0, S2Fault(FAULT_PERMISSION, level, ipa, write), 0
        mask = (1 << shift) - 1
        return (pte & _ADDR & ~mask) | (ipa & mask), None, shift
    raise AssertionError("unreachable")


_MEM: list[tuple[PhysMemory, int]] = []


def _tables() -> tuple[PhysMemory, int]:
    """A small stage-2 in RAM: table pages at levels 0-2, then entries of every kind at level 3
    and level 2 (invalid, table-at-level-3 bit clear, read-only, write-only, RW, blocks)."""
    if not _MEM:
        mem = PhysMemory(1 << 24)
        base = mem.base
        l0, l1, l2, l3 = (base + k * PAGE_SIZE for k in range(4))
        mem.write_u64(l0, l1 | 3)
        mem.write_u64(l1, l2 | 3)
        mem.write_u64(l2, l3 | 3)
        out = base + 0x10_0000
        for i, attrs in enumerate([0, 1, 3 | S2AP_R, 3 | S2AP_W, 3 | S2AP_R | S2AP_W,
                                   3 | S2AP_R | S2AP_W]):
            mem.write_u64(l3 + 8 * i, (out + i * PAGE_SIZE) | attrs)
        for i, attrs in enumerate([1 | S2AP_R, 1 | S2AP_R | S2AP_W, 1, 0], start=1):
            mem.write_u64(l2 + 8 * i, (base + i * (1 << 21)) | attrs)  # blocks, bad entries
        _MEM.append((mem, l0))
    return _MEM[0]


_IPA = st.tuples(st.integers(0, 5), st.integers(0, 4), st.integers(0, 4095),
                 st.sampled_from([0, 1 << 30, 1 << 39])).map(
    lambda t: (t[0] << 12) + (t[1] << 21) + t[2] + t[3])


@settings(max_examples=150, deadline=None)
@given(ipa=_IPA, write=st.booleans())
def test_the_walks_fault_codes_give_the_fault_objects_of_before(ipa: int, write: bool) -> None:
    mem, root = _tables()
    assert s2_walk(mem, root, ipa, write) == _reference_walk(mem, root, ipa, write)


@settings(max_examples=60, deadline=None)
@given(accesses=st.lists(st.tuples(_IPA, st.booleans(), st.booleans()), min_size=1,
                         max_size=12))
def test_the_abort_paths_one_walk_is_the_tlbs_answer_and_the_walks_fault(accesses) -> None:
    """`tlb_s2_translate_fault` against `tlb_s2_translate` and, where it faults, `s2_translate`
    of the same access: the same answers, the same fault kind, the same TLB (entries, marks)."""
    mem, root = _tables()
    one, two = Tlb("one"), Tlb("two")
    for ipa, write, mark in accesses:
        if mark:  # an entry marked changed: checked again by either
            one.mark_range(ipa & ~0xFFF, PAGE_SIZE)
            two.mark_range(ipa & ~0xFFF, PAGE_SIZE)
        got = tlb_s2_translate_fault(one, mem, root, ipa, write)
        out = tlb_s2_translate(two, mem, root, ipa, write)
        fault = s2_translate(mem, root, ipa, write)[1] if out == S2_WALK_FAULT else None
        assert got == (out, None if fault is None else fault.kind)
        assert one.entries == two.entries


def _machine() -> tuple[pkvm.Machine, list[int]]:
    m = pkvm.Machine(memory="64M", cpus=2, abi="latest", trace=True)
    vm = m.host.create_vm(vcpus=1, protected=True, memory=1 << 20)
    vm.map(0x40000, 2)
    pages = [m.host.alloc_pages(1), m.host.alloc_pages(2), m.carveout[0], vm.mapped[0x40000],
             0x0900_0000, 1 << 48]
    return m, pages


@settings(max_examples=8, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3), st.sampled_from([0, 1, 2, -1]),
                              st.booleans()), min_size=1, max_size=6))
def test_the_ports_one_page_zeroing_and_store_are_the_ranges(ops) -> None:
    """`HostPort.zero` of one page and `write` within one page (the door's hit, then the slow
    path) against the range path (`zero_runs` of `host_translate_range`, the translated
    store) on an identical machine: the same RAM, faults, TLB and host aborts."""
    sides = [_machine() for _ in range(2)]
    for k, page, cpu, zero in ops:
        outs = []
        for i, (m, pages) in enumerate(sides):
            pa = pages[k] + page * PAGE_SIZE
            try:
                if i == 0:
                    if zero:
                        m.host.port.zero(cpu, pa, PAGE_SIZE)
                    else:
                        m.host.port.write(cpu, pa + 8, b"stored!")
                else:
                    spans = m.host_translate_range(cpu, pa + (0 if zero else 8),
                                                   PAGE_SIZE if zero else 7, True)
                    if zero:
                        zero_runs(m.mem, spans)
                    elif spans[0][0] is not None:
                        m.mem.write(spans[0][0], b"stored!")
                outs.append(None)
            except (pkvm.HostDataAbort, HypPanic, ValueError, IndexError) as e:
                outs.append((type(e).__name__, str(e)))
        assert outs[0] == outs[1]
    (a, pages), (b, _) = sides
    for pa in pages[:4]:
        for p in range(pa, pa + 2 * PAGE_SIZE, PAGE_SIZE):
            assert a.mem.read(p, PAGE_SIZE) == b.mem.read(p, PAGE_SIZE)
    assert a._hyp.host_s2_tlb.entries == b._hyp.host_s2_tlb.entries
    assert [(r.cpu, r.addr, r.write, r.verdict, r.ret) for r in a.host_aborts] == \
        [(r.cpu, r.addr, r.write, r.verdict, r.ret) for r in b.host_aborts]


def test_the_store_log_is_what_an_observer_appending_would_log() -> None:
    m = pkvm.Machine(memory="64M", cpus=2, abi="latest", trace=False)
    logged: list[tuple[str, int, int, bytes | int]] = []
    seen: list[tuple[str, int, int, bytes | int]] = []
    m.host_port.log_stores(logged)
    m.host_port.observe_stores(lambda cpu, pa, d: seen.append(
        ("zero" if isinstance(d, int) else "write", cpu, pa, d)))
    assert m.has_observers()
    vm = m.host.create_vm(vcpus=2, protected=True, memory="256K")
    vm.map(0x40000, 3)
    vm.destroy()
    m.host.port.zero(0, m.host.alloc_pages(3), 3 * PAGE_SIZE)
    assert logged == seen and {e[0] for e in logged} == {"write", "zero"}


def test_the_fuzzers_op_tables_are_disjoint() -> None:
    """`run_step` looks an op up in `STEP_OPS` first: no op may also be a handle or guest call."""
    assert not set(STEP_OPS) & set(HANDLE_CALLS)
    assert not set(STEP_OPS) & GUEST_OPS
    assert not set(HANDLE_CALLS) & GUEST_OPS
