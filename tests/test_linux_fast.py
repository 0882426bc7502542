"""Fast paths of the Linux board agree with the generic code they short-cut (issue 17).

Model speed-ups, not kernel behaviour: the GIC's cached highest-priority pending interrupt
(`Gic._best`, dropped by every change through `version`) against a fresh search
(`Gic._find_best`) after any sequence of device, MMIO and CPU-interface operations.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pkvm.host.platform.gic import (
    GICD_BASE,
    GICD_ICENABLER,
    GICD_ICFGR,
    GICD_ICPENDR,
    GICD_IPRIORITYR,
    GICD_IROUTER,
    GICD_ISACTIVER,
    GICD_ISENABLER,
    GICD_ISPENDR,
    GICR_BASE,
    GICR_STRIDE,
    ICC_CTLR_EL1,
    ICC_DIR_EL1,
    ICC_EOIR1_EL1,
    ICC_HPPIR1_EL1,
    ICC_IAR1_EL1,
    ICC_IGRPEN1_EL1,
    ICC_PMR_EL1,
    ICC_SGI1R_EL1,
    SGI_FRAME,
    Gic,
)

NR_CPUS, NR_IRQS = 2, 64
intids = st.sampled_from([0, 1, 5, 14, 27, 29, 30, 31, 32, 33, 34, 40, 63])
cpus = st.integers(0, NR_CPUS - 1)
u32 = st.integers(0, 2**32 - 1)
BANK_REGS = [GICD_ISENABLER, GICD_ICENABLER, GICD_ISPENDR, GICD_ICPENDR, GICD_ISACTIVER,
             GICD_IPRIORITYR, GICD_ICFGR]
ops = st.one_of(
    st.tuples(st.just("level"), intids, st.booleans(), cpus),
    st.tuples(st.just("dist"), st.sampled_from(BANK_REGS + [0]), st.integers(0, 3), u32),
    st.tuples(st.just("sgi_frame"), st.sampled_from(BANK_REGS), cpus, u32),
    st.tuples(st.just("route"), st.integers(32, NR_IRQS - 1), cpus, st.just(0)),
    st.tuples(st.just("icc_w"), st.sampled_from([ICC_PMR_EL1, ICC_IGRPEN1_EL1, ICC_EOIR1_EL1,
                                                 ICC_DIR_EL1, ICC_CTLR_EL1, ICC_SGI1R_EL1]),
              cpus, st.one_of(intids, u32)),
    st.tuples(st.just("icc_r"), st.sampled_from([ICC_IAR1_EL1, ICC_HPPIR1_EL1]), cpus,
              st.just(0)),
    st.tuples(st.just("ask"), cpus, st.just(0), st.just(0)),
)


def _apply(g: Gic, op: tuple) -> None:
    kind, a, b, c = op
    if kind == "level":
        g.set_level(a, b, cpu=c)
    elif kind == "dist":  # the distributor's SPI banks (word b of the register), or GICD_CTLR
        g.mmio_write(GICD_BASE + (a + 4 + 4 * b if a else 0), 4, c if a else c & 0x12)
    elif kind == "sgi_frame":
        g.mmio_write(GICR_BASE + b * GICR_STRIDE + SGI_FRAME + a, 4, c)
    elif kind == "route":
        g.mmio_write(GICD_BASE + GICD_IROUTER + 8 * a, 8, b)
    elif kind == "icc_w":
        g.sysreg_write(b, a, c)
    elif kind == "icc_r":
        g.sysreg_read(b, a)
    else:
        g.irq_pending(a)  # fills the cache at this point of the sequence


@settings(max_examples=300, deadline=None)
@given(st.lists(ops, max_size=60))
def test_gic_cached_best_agrees_with_a_fresh_search(seq):
    g = Gic(NR_CPUS, NR_IRQS)
    g.mmio_write(GICD_BASE, 4, 0x12)  # ARE, EnableGrp1
    for cpu in range(NR_CPUS):
        g.sysreg_write(cpu, ICC_IGRPEN1_EL1, 1)
        g.sysreg_write(cpu, ICC_PMR_EL1, 0xF0)
    for op in seq:
        _apply(g, op)
        for cpu in range(NR_CPUS):
            assert g._best(cpu) is g._find_best(cpu)
            hppir = g.sysreg_read(cpu, ICC_HPPIR1_EL1)
            best = g._find_best(cpu)
            assert hppir == (1023 if best is None else best.intid)


# -- the stage-2 view's last-region lookup ----------------------------------------------------
PAGES = 16
IPA0 = 0x4000_0000
view_ops = st.one_of(
    st.tuples(st.just("map"), st.integers(0, PAGES - 1), st.integers(1, 4),
              st.integers(0, PAGES - 1), st.booleans()),
    st.tuples(st.just("unmap"), st.integers(0, PAGES - 1), st.integers(1, 4), st.just(0),
              st.just(False)),
    st.tuples(st.just("protect"), st.integers(0, PAGES - 1), st.integers(1, 4), st.just(0),
              st.booleans()),
    st.tuples(st.just("ask"), st.integers(0, PAGES * 4096 // 8 - 1), st.just(0), st.just(0),
              st.just(False)),
)


def _fresh_host_of(view, ipa: int) -> int | None:
    for m in view.mappings():
        if m.start <= ipa < m.end:
            return m.host + ipa - m.start
    return None


@settings(max_examples=150, deadline=None)
@given(st.lists(view_ops, max_size=40), st.booleans())
def test_stage2_view_lookups_agree_with_a_search_of_its_mappings(seq, window):
    import ctypes
    import mmap
    import struct

    from unicorn import UC_ARCH_ARM64, UC_MODE_ARM, Uc

    from pkvm.machine.stage2_view import Stage2View

    mem = mmap.mmap(-1, 2 * PAGES * 4096)  # shared: the alias window takes it
    for i in range(len(mem) // 8):
        struct.pack_into("<Q", mem, 8 * i, i)
    host = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    view = Stage2View(Uc(UC_ARCH_ARM64, UC_MODE_ARM), alias_window=window)
    model: dict[int, tuple[int, bool]] = {}  # page -> (offset of its backing page, writable)
    for kind, page, n, at, flag in seq:
        n = min(n, PAGES - page)
        if kind == "map":
            view.map(IPA0 + page * 4096, n * 4096, host + at * 4096, writable=flag)
            model.update({page + k: ((at + k) * 4096, flag) for k in range(n)})
        elif kind == "unmap":
            view.unmap(IPA0 + page * 4096, n * 4096)
            for k in range(n):
                model.pop(page + k, None)
        elif kind == "protect":
            view.protect(IPA0 + page * 4096, n * 4096, writable=flag, executable=True)
            model.update({p: (model[p][0], flag) for p in range(page, page + n) if p in model})
        regions = view.mappings()
        for m in regions:  # every region an aligned power-of-two block: it can merge
            size = m.end - m.start
            assert size & (size - 1) == 0 and m.start % size == 0
        pages = {(m.start - IPA0) // 4096 + k: m for m in regions
                 for k in range((m.end - m.start) // 4096)}
        assert set(pages) == set(model)  # the same pages mapped, to the same bytes
        for p, m in pages.items():
            got = ctypes.c_uint64.from_address(view.host_of(IPA0 + p * 4096)).value
            assert (got, m.writable) == (model[p][0] // 8, model[p][1])
        for ipa in (IPA0 + 8 * page, IPA0 + (page + n) * 4096 - 8, IPA0 + 8 * at):
            want = _fresh_host_of(view, ipa)
            assert view.host_of(ipa) == want
            got = view.read_u64(ipa)
            assert got == (None if want is None else ctypes.c_uint64.from_address(want).value)
    del view


# -- a merge of stage-2 regions drops only the merged regions' translated code ----------------
MOVZ_X0 = 0xD2800000  # movz x0, #imm16 (imm at bit 5)
HVC_0, STR_W2_X3, LDR_W1_X3 = 0xD4000002, 0xB9000062, 0xB9400061


@pytest.mark.parametrize("mmu", [True, False])
def test_code_patched_after_a_merge_runs_patched(mmu):
    """Code runs from a region, a map merges that region with its buddy, the guest rewrites
    the code (as Linux patches alternatives and ftrace sites) and runs it again: the new
    instruction runs. With the MMU on (VA != IPA), unicorn looks a removed region up as a
    virtual address; the view turns stage 1 off while it unmaps."""
    import ctypes
    import mmap
    import struct

    from pkvm.machine.cpu import Core, CpuContext, ExitKind

    mem = mmap.mmap(-1, 8 * 4096)
    host = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    va0 = 0 if mmu else IPA0  # stage 1: one 1 GiB block, VA 0 -> IPA 0x4000_0000
    struct.pack_into("<II", mem, 0, MOVZ_X0 | 1 << 5, HVC_0)  # page 0: x0 = 1
    struct.pack_into("<II", mem, 0x2000, STR_W2_X3, HVC_0)  # page 2: the patcher
    struct.pack_into("<Q", mem, 0x4000, IPA0 | 0b01 | 1 << 10)  # page 4: the L1 table
    core = Core()
    # No two of them buddies: three regions. Page 0's is made last, so the region that
    # replaces it reuses its place in QEMU's RAM (and its translated code, if not dropped).
    for page in (2, 4, 0):
        core.map(IPA0 + page * 4096, 4096, host + page * 4096)
    ctx = CpuContext.reset(pc=va0)
    if mmu:
        ctx.sys_regs.update(TTBR0_EL1=IPA0 + 0x4000, TCR_EL1=25 | 1 << 23 | 0b101 << 32,
                            MAIR_EL1=0xFF, SCTLR_EL1=0x00C50078 | 1)
    core.load_context(ctx)
    assert core.run().kind is ExitKind.HVC and core.x(0) == 1  # page 0 translated
    core.map(IPA0 + 4096, 4096, host + 4096)  # its buddy: pages 0-1 become one region
    assert len(core.mappings()) == 3
    ctx = core.save_context()
    ctx.pc, ctx.x[2], ctx.x[3] = va0 + 0x2000, MOVZ_X0 | 2 << 5, va0
    core.load_context(ctx)
    assert core.run().kind is ExitKind.HVC  # the guest wrote x0 = 2 over page 0's code
    ctx = core.save_context()
    ctx.pc = va0
    core.load_context(ctx)
    assert core.run().kind is ExitKind.HVC and core.x(0) == 2


@pytest.mark.parametrize("mmu", [True, False])
def test_code_of_an_unmapped_region_never_runs_again(mmu):
    """A region that ran code is unmapped while the guest is stopped at EL1 (a stage-2 fault,
    as every Linux exit but HVC); other pages, written from outside the guest, are mapped at
    the same IPA (QEMU gives the new region the old one's place in its RAM): the new code
    runs, not what was translated from the old."""
    import ctypes
    import mmap
    import struct

    from pkvm.machine.cpu import Core, CpuContext, ExitKind

    mem = mmap.mmap(-1, 8 * 4096)
    host = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    va0 = 0 if mmu else IPA0
    struct.pack_into("<II", mem, 0, MOVZ_X0 | 1 << 5, LDR_W1_X3)  # x0 = 1, then a fault
    struct.pack_into("<Q", mem, 0x4000, IPA0 | 0b01 | 1 << 10)
    core = Core()
    core.map(IPA0 + 0x4000, 4096, host + 0x4000)
    core.map(IPA0 + 0x6000, 4096, host + 0x6000)  # once a region was removed, QEMU places
    core.unmap(IPA0 + 0x6000, 4096)  # new ones in the first gap: the next two take one place
    core.map(IPA0, 4096, host)
    ctx = CpuContext.reset(pc=va0)
    ctx.x[3] = va0 + 0x3000  # IPA 0x4000_3000: not mapped at stage 2
    if mmu:
        ctx.sys_regs.update(TTBR0_EL1=IPA0 + 0x4000, TCR_EL1=25 | 1 << 23 | 0b101 << 32,
                            MAIR_EL1=0xFF, SCTLR_EL1=0x00C50078 | 1)
    core.load_context(ctx)
    assert core.run().kind is ExitKind.DABT and core.x(0) == 1
    core.unmap(IPA0, 4096)
    struct.pack_into("<II", mem, 0x2000, MOVZ_X0 | 3 << 5, LDR_W1_X3)  # new code elsewhere
    core.map(IPA0, 4096, host + 0x2000)
    ctx = core.save_context()
    ctx.pc = va0
    core.load_context(ctx)
    assert core.run().kind is ExitKind.DABT and core.x(0) == 3
