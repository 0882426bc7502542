"""Fast paths of the vCPU run path agree with the generic code they short-cut (issue 17).

The context moves between the CPU and `arch.ctxt` as bytes (`Core.save_raw` / `load_raw`,
`ctxt_pack_raw`); the MMIO exit path translates with the shadow of SCTLR_EL1 while the core
knows it unchanged. Hypothesis draws the states and each fast answer must equal the
per-register or walked one.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pkvm.abi.host_structs import (
    CTXT_END,
    CTXT_RAW_SIZE,
    CTXT_START,
    ctxt_pack,
    ctxt_pack_raw,
    ctxt_sys_values,
    ctxt_unpack,
)
from pkvm.machine.context import SCTLR_EL1_RESET, SYS_REGS
from pkvm.machine.cpu import Core, CpuContext
from pkvm.machine.stage1 import walk_stage1

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
u64 = st.integers(0, 2**64 - 1)
SCTLR = SYS_REGS["SCTLR_EL1"]


@pytest.fixture(scope="module")
def core() -> Core:
    c = Core()
    c.map(0x4000_0000, 1 << 20, _host_pages(), writable=True, executable=True)
    return c


_KEEP: list[object] = []


def _host_pages() -> int:
    import ctypes
    import mmap

    mem = mmap.mmap(-1, 1 << 20)
    _KEEP.append(mem)
    return ctypes.addressof(ctypes.c_char.from_buffer(mem))


@SETTINGS
@given(ctxt=st.binary(min_size=CTXT_END - CTXT_START, max_size=CTXT_END - CTXT_START),
       el1h=st.booleans(), base=st.binary(min_size=CTXT_END - CTXT_START,
                                          max_size=CTXT_END - CTXT_START))
def test_load_raw_then_save_raw_is_the_per_register_round_trip(core, ctxt, el1h, base):
    """Any `arch.ctxt` loaded as bytes and saved as bytes gives what loading and saving it
    register by register gives."""
    ctx = ctxt_unpack(ctxt)
    ctx.pstate = 0x3C5 if el1h else 0x3C4  # EL1h or EL1t: the banked SP differs
    ctx.sys_regs["SCTLR_EL1"] = SCTLR_EL1_RESET  # the MMU off: the CPU stays sane
    fixed = ctxt_pack(ctx, ctxt)
    core.load_context(ctx)
    want = ctxt_pack(core.save_context(), base)
    core.load_context(CpuContext.reset(pc=0))
    core.load_raw(fixed, ctxt_sys_values(fixed, core.sys_names))
    raw, sysvals = core.save_raw()
    assert ctxt_pack_raw(raw, core.sys_names, sysvals, base) == want
    assert ctxt_pack(core.save_context(), base) == want


def _u64(core: Core, ipa: int) -> int | None:
    b = core.read_ipa(ipa, 8)
    return None if b is None else int.from_bytes(b, "little")


@SETTINGS
@given(va=st.one_of(u64, st.integers(0x4000_0000, 0x4010_0000)), mmu=st.booleans(),
       msr_since=st.booleans(), tcr=u64, ttbr0=st.integers(0x4000_0000, 0x400F_F000))
def test_translate_with_the_shadow_sctlr_is_the_walk_of_the_cpu_registers(
        core, va, mmu, msr_since, tcr, ttbr0):
    """`translate` with SCTLR_EL1 from the core's shadow equals the stage-1 walk from the
    registers the CPU holds, the MMU on or off, whether the shadow is trusted or not."""
    ctx = CpuContext.reset(pc=0x4000_0000)
    ctx.sys_regs.update(SCTLR_EL1=SCTLR_EL1_RESET | mmu, TCR_EL1=tcr, TTBR0_EL1=ttbr0 & ~0xFFF)
    core.load_context(ctx)
    if msr_since:  # as after a guest MSR: the shadow is not trusted
        core.write_sysreg(SCTLR, core.read_sysreg(SCTLR))
    else:
        core.save_raw()  # the shadow is current
    want = walk_stage1(va, sctlr=core.read_sysreg(SCTLR), pstate=core.pstate, el=1,
                       read_sysreg=core.sys_reg, read_u64=lambda ipa: _u64(core, ipa))
    assert core.translate(va) == want


@SETTINGS
@given(raw0=st.binary(min_size=CTXT_RAW_SIZE, max_size=CTXT_RAW_SIZE),
       raw=st.binary(min_size=CTXT_RAW_SIZE, max_size=CTXT_RAW_SIZE),
       sysvals=st.lists(u64, min_size=len(SYS_REGS), max_size=len(SYS_REGS)),
       base=st.binary(min_size=CTXT_END - CTXT_START, max_size=CTXT_END - CTXT_START))
def test_repacking_the_same_system_registers_keeps_the_packed_ones(raw0, raw, sysvals, base):
    """What the run path's sync skips when the system registers are those it packed last time
    (`switch._sync_context`): packing them again over that context changes nothing there."""
    names = list(SYS_REGS)
    packed = ctxt_pack_raw(raw0, names, sysvals, base)
    assert ctxt_pack_raw(raw, names, sysvals, packed) == raw + packed[CTXT_RAW_SIZE:]
    assert ctxt_sys_values(packed, names) == sysvals


# -- the first sync of a stage-2 view: every valid leaf, tables read page by page ------------------
TABLES = 6  # table pages at RAM_BASE + k * 4K


def _descriptor(kind: int, k: int, low: int) -> int:
    """A descriptor pointing at table page k (kind 0), outside RAM (1), or a block/page (2)."""
    from pkvm.machine.memory import RAM_BASE

    if kind == 0:
        return RAM_BASE + k * 4096 | 3
    if kind == 1:
        return 0x1000_0000 + k * 4096 | 3
    return (k << 30) | low


@settings(max_examples=80, deadline=None)
@given(entries=st.lists(st.tuples(st.integers(0, TABLES - 1), st.integers(0, 511),
                                  st.integers(0, 2), st.integers(0, TABLES - 1),
                                  st.integers(0, 0xFFF)), max_size=40),
       ia_bits=st.sampled_from([48, 40, 39]))
def test_valid_leaves_is_the_walkers_leaves(entries, ia_bits):
    """`switch._valid_leaves` (the first sync of a core's stage-2 view) finds the leaves
    `KvmPgtable.leaves(valid_only=True)` finds, on any table contents a host could write:
    tables pointing at tables (again), outside RAM, blocks, pages, invalid and odd low bits."""
    from pkvm.hyp.pgtable import KvmPgtable
    from pkvm.hyp.switch import _ReadOnlyTables, _valid_leaves, _WalkedByHardware
    from pkvm.machine.memory import RAM_BASE, PhysMemory

    mem = PhysMemory(TABLES * 4096)
    for table, idx, kind, k, low in entries:
        mem.write_u64(RAM_BASE + table * 4096 + idx * 8, _descriptor(kind, k, low))
    pgt = KvmPgtable(_WalkedByHardware(mem), _ReadOnlyTables(), stage=2, name="t",
                     ia_bits=ia_bits)
    pgt.pgd = RAM_BASE
    want = [(a, 1 << (12 + 9 * (3 - lvl))) for a, lvl, _ in pgt.leaves(valid_only=True)]
    got: list[tuple[int, int]] = []
    _valid_leaves(mem, pgt.pgd, pgt.start_level, 0, 1 << ia_bits, got)
    assert got == want
