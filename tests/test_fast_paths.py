"""Single-page fast paths of the hyp agree with the generic code they short-cut (issue 17).

Each fast path is a model speed-up, not kernel behaviour: Hypothesis draws addresses (aligned or
not, inside RAM, on its edges, in gaps, beyond it), page states and memblock maps, and the fast
answer must equal the generic one, errno for errno.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pkvm
from pkvm.errors import EPERM
from pkvm.hyp import mem_protect as mp
from pkvm.hyp import mem_protect_6_12 as mp612
from pkvm.hyp.memory import PageState
from pkvm.hyp.state import MemblockRegion
from pkvm.machine.memory import PAGE_SIZE, RAM_BASE

MEM = 64 << 20
SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def m72():
    return pkvm.Machine(memory=MEM, cpus=2, abi="latest", trace=False)


def addresses() -> st.SearchStrategy[int]:
    edge = st.sampled_from([0, RAM_BASE - PAGE_SIZE, RAM_BASE, RAM_BASE + MEM - PAGE_SIZE,
                            RAM_BASE + MEM, 2**64 - PAGE_SIZE, 2**64 - 1])
    inside = st.integers(RAM_BASE, RAM_BASE + MEM - 1)
    anywhere = st.integers(0, 2**64 - 1)
    wiggle = st.sampled_from([0, 0, 0, 1, 0x800, PAGE_SIZE - 1])
    return st.tuples(st.one_of(edge, inside, anywhere), wiggle).map(
        lambda t: (t[0] + t[1]) & (2**64 - 1))


def memblocks() -> st.SearchStrategy[list[MemblockRegion]]:
    """The board's one region, or RAM cut into sorted regions (some nomap) with gaps."""
    cuts = st.lists(st.integers(1, MEM // PAGE_SIZE - 1), max_size=6, unique=True).map(sorted)

    def regions(c: list[int], nomap: list[bool], gaps: list[bool]) -> list[MemblockRegion]:
        bounds = [0] + c + [MEM // PAGE_SIZE]
        out = []
        for k in range(len(bounds) - 1):
            if gaps[k % len(gaps)]:
                continue
            lo, hi = bounds[k], bounds[k + 1]
            out.append(MemblockRegion(RAM_BASE + lo * PAGE_SIZE, (hi - lo) * PAGE_SIZE,
                                      nomap[k % len(nomap)]))
        return out or [MemblockRegion(RAM_BASE, MEM)]

    split = st.builds(regions, cuts, st.lists(st.booleans(), min_size=1, max_size=7),
                      st.lists(st.booleans(), min_size=1, max_size=7))
    return st.one_of(st.just([MemblockRegion(RAM_BASE, MEM)]), split)


@SETTINGS
@given(addr=addresses(), want=st.sampled_from(list(PageState)), state=st.sampled_from(list(PageState)),
       regions=memblocks())
def test_host_check_one_page_agrees_with_range_check(m72, addr, want, state, regions):
    h = m72._hyp
    vm = h.vmemmap
    i = (addr >> 12) - vm.base_pfn
    saved_regions, saved = h.hyp_memory, (vm.host_state[i] if 0 <= i < vm.nr else None)
    h.hyp_memory = regions
    h.locks.cpu = 0
    try:
        if saved is not None:
            vm.host_state[i] = state
        with h.host_mmu.lock:
            fast = mp.host_check_page_state_range(h, addr, PAGE_SIZE, want)
            generic = mp.host_check_vmemmap_range(h, addr, PAGE_SIZE, want)
    finally:
        h.hyp_memory = saved_regions
        if saved is not None:
            vm.host_state[i] = saved
    assert fast == generic


def _hyp_check_reference(h, addr: int, size: int, want: int) -> int:
    """The per-address loop the fast version replaced."""
    vm = h.vmemmap
    for pa in range(addr, addr + size, PAGE_SIZE):
        state = vm.hyp_state[vm.idx(pa)] if vm.covers(pa) else PageState.NOPAGE
        if state != want:
            return -1
    return 0


@SETTINGS
@given(addr=addresses(), pages=st.integers(0, 4), extra=st.sampled_from([0, 1, PAGE_SIZE - 1]),
       want=st.sampled_from(list(PageState)), states=st.lists(st.sampled_from(list(PageState)),
                                                              min_size=5, max_size=5))
def test_hyp_check_range_agrees_with_per_address_loop(m72, addr, pages, extra, want, states):
    h = m72._hyp
    vm = h.vmemmap
    size = pages * PAGE_SIZE + extra if pages or extra else 0
    first = (addr >> 12) - vm.base_pfn
    idx = [first + k for k in range(5) if 0 <= first + k < vm.nr]
    saved = {i: vm.hyp_state[i] for i in idx}
    h.locks.cpu = 0
    try:
        for i in idx:
            vm.hyp_state[i] = states[i - first]
        with h.pkvm_pgd_lock:
            fast = mp.hyp_check_page_state_range(h, addr, size, want)
        assert (fast == 0) == (_hyp_check_reference(h, addr, size, want) == 0)
        assert fast in (0, -EPERM)
    finally:
        for i, v in saved.items():
            vm.hyp_state[i] = v


# -- hyp_unmap of one page vs the generic walker ----------------------------------------------
class _S1:
    """A hyp stage-1 table in its own RAM, fed by a pool (as tests/test_pgtable.py builds it)."""

    POOL_BASE, POOL_PAGES = RAM_BASE + (8 << 20), 256

    def __init__(self):
        from pkvm.hyp import pgtable as pt
        from pkvm.hyp.memory import HypVmemmap
        from pkvm.hyp.page_alloc import HypPool
        from pkvm.hyp.spinlock import HypLocks
        from pkvm.machine.memory import PhysMemory

        self.mem = PhysMemory(MEM)
        self.vmm = HypVmemmap.over(self.mem, 0xFF)
        self.pool = HypPool("pt", self.mem, self.vmm, HypLocks(1), False)
        self.pool.init(self.POOL_BASE >> 12, self.POOL_PAGES, 0)
        self.pgt = pt.KvmPgtable(self.mem, self.pool, stage=1, name="t")
        assert self.pgt.init() == 0

    def state(self) -> tuple[bytes, bytes, int]:
        return (self.mem.read(self.POOL_BASE, self.POOL_PAGES * PAGE_SIZE),
                self.vmm.refcount.tobytes(), self.pgt.gen)


VA = 0x8000_4000_0000  # a 2 GiB window: blocks, tables and pages all occur
va_pages = st.integers(0, (4 << 20) // PAGE_SIZE - 1).map(lambda k: VA + k * PAGE_SIZE)
maps = st.lists(st.tuples(va_pages, st.sampled_from([1, 1, 1, 2, 512])), max_size=12)


@settings(max_examples=150, deadline=None)
@given(ops=maps, unmaps=st.lists(st.one_of(va_pages, st.sampled_from([VA - PAGE_SIZE, 2**48 - PAGE_SIZE,
                                                                     2**48, VA + 0x800])),
                                 min_size=1, max_size=6))
def test_hyp_unmap_one_page_agrees_with_walker(ops, unmaps):
    from pkvm.hyp.pgtable import PAGE_HYP

    a, b = _S1(), _S1()
    for env in (a, b):
        for va, n in ops:
            base = va & ~(n * PAGE_SIZE - 1) if n == 512 else va
            env.pgt.hyp_map(base, n * PAGE_SIZE, base - VA + RAM_BASE, PAGE_HYP)
    assert a.state() == b.state()
    for va in unmaps:
        assert a.pgt.hyp_unmap(va, PAGE_SIZE) == b.pgt.hyp_unmap_walk(va, PAGE_SIZE)
        assert a.state() == b.state()


# -- 6.12 page-state checks of one page vs the LEAF walk ----------------------------------------
@pytest.fixture(scope="module")
def m612():
    m = pkvm.Machine(memory=MEM, cpus=2, abi="6.12", trace=False)
    for k in range(4):  # some shared pages: SW bits in both tables, tables split around them
        m.hvc(0, "__pkvm_host_share_hyp", (m.host.alloc_pages(1) >> 12) + k)
    return m


@SETTINGS
@given(addr=st.one_of(addresses(), st.integers(0, 2**48).map(lambda a: a & ~(PAGE_SIZE - 1))),
       want=st.sampled_from(list(PageState)[:4]), hyp=st.booleans())
def test_612_state_check_of_one_page_agrees_with_walk(m612, addr, want, hyp):
    from pkvm.hyp.mm import hyp_va

    h = m612._hyp
    if hyp:
        pgt, a, state_of = h.pkvm_pgtable, hyp_va(addr) & (2**64 - 1), (
            lambda pte, _a: mp.hyp_state_of_pte(pte))
    else:
        pgt, a, state_of = h.host_mmu.pgt, addr, (lambda pte, x: mp.host_state_of_pte(h, pte, x))
    fast = mp612.check_page_state_range(pgt, a, PAGE_SIZE, state_of, want)
    assert fast == mp612.check_walk_generic(pgt, a, PAGE_SIZE, state_of, want)


# -- the host's u64 accesses vs its byte accesses -----------------------------------------------
@SETTINGS
@given(off=st.integers(0, 2 * PAGE_SIZE - 1), value=st.integers(0, 2**64 - 1))
def test_host_u64_access_agrees_with_bytes(m72, off, value):
    host = m72.host
    pa = host.alloc_pages(2) + off
    try:
        host.write_u64(pa, value)
        assert host.read(pa, 8) == value.to_bytes(8, "little")
        assert host.read_u64(pa) == int.from_bytes(host.read(pa, 8), "little") == value
    finally:
        host.free_pages(pa - off, 2)


# -- the vCPU context marshalled as words vs through CpuContext ---------------------------------
@pytest.fixture(scope="module")
def core():
    from pkvm.machine.cpu import Core

    return Core()


u64 = st.integers(0, 2**64 - 1)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(x=st.lists(u64, min_size=31, max_size=31), v=st.lists(st.integers(0, 2**128 - 1),
                                                               min_size=32, max_size=32),
       scalars=st.tuples(u64, u64, u64, u64, u64), el1h=st.booleans(),
       sysvals=st.dictionaries(st.sampled_from(["TTBR0_EL1", "TPIDR_EL1", "VBAR_EL1", "FAR_EL1",
                                                "CONTEXTIDR_EL1", "PAR_EL1"]), u64),
       base=st.binary(min_size=2000, max_size=2000))
def test_ctxt_pack_raw_is_ctxt_pack_of_save_context(core, x, v, scalars, el1h, sysvals, base):
    from pkvm.abi.host_structs import ctxt_pack, ctxt_pack_raw, ctxt_sys_values
    from pkvm.machine.cpu import CpuContext

    pc, sp0, sp1, elr, spsr = scalars
    ctx = CpuContext.reset(pc=pc & ~3)
    ctx.x, ctx.v, ctx.sp_el0, ctx.sp_el1, ctx.elr_el1, ctx.spsr_el1 = x, v, sp0, sp1, elr, spsr
    ctx.pstate = 0x3C5 if el1h else 0x3C4
    ctx.sys_regs.update(sysvals)
    core.load_context(ctx)
    want = ctxt_pack(core.save_context(), base)
    raw, sv = core.save_raw()
    assert ctxt_pack_raw(raw, core.sys_names, sv, base) == want
    # and back: the bytes loaded as a whole give the CPU the context the per-register load gave
    core.load_context(CpuContext.reset(pc=0))
    core.load_raw(want, ctxt_sys_values(want, core.sys_names))
    assert ctxt_pack(core.save_context(), base) == want
