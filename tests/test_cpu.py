"""The guest CPU core (`pkvm.machine.cpu`) and the guest programs, through the public API.

A tiny platform stands in for the hyp and the VMM: one RAM region mapped over an anonymous mmap
(the fake stage-2), a loop that prints UART writes, answers PSCI and pKVM's guest calls. The
instruction words below were produced with `aarch64-linux-gnu-as` (the assembly is alongside).
"""

from __future__ import annotations

import ctypes
import mmap
import random
import struct

import pytest

from pkvm import guests
from pkvm.machine import decode
from pkvm.machine.cpu import (
    ARM_EXCEPTION_IRQ,
    ARM_EXCEPTION_TRAP,
    Core,
    CpuContext,
    Exit,
    ExitKind,
    complete_mmio_read,
)
from pkvm.machine.esr import EC, esr_ec, ipa_from_hpfar

RAM = guests.RAM_BASE
RAM_SIZE = 4 << 20
CODE = RAM + 0x1000
VBAR = RAM + 0x10000
MMIO = 0x0A00_0000
MASK64 = (1 << 64) - 1

HVC0 = 0xD4000002
NOP = 0xD503201F
MOV_X9_SP = 0x910003E9


def hvc(imm: int) -> int:
    return HVC0 | imm << 5


class Platform:
    """RAM at IPA 0x4000_0000 over an mmap, a Core, and helpers to place code and data."""

    def __init__(self, ram_size: int = RAM_SIZE, core: Core | None = None) -> None:
        self.mem = mmap.mmap(-1, ram_size)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))
        self.core = core or Core()
        self.uart = bytearray()
        if core is not None:
            return  # the caller maps RAM
        self.core.map(RAM, len(self.mem), self.addr)
        # Vector table: each 0x80 slot records SP in x9 and reports its index with HVC.
        for slot in range(16):
            self.put(VBAR + slot * 0x80, [MOV_X9_SP, hvc(0x100 + slot)])

    def put(self, ipa: int, words: list[int]) -> None:
        off = ipa - RAM
        self.mem[off : off + 4 * len(words)] = struct.pack(f"<{len(words)}I", *words)
        self.core.flush_code()  # written behind the core's back

    def put64(self, ipa: int, value: int) -> None:
        self.mem[ipa - RAM : ipa - RAM + 8] = struct.pack("<Q", value)

    def start(self, pc: int = CODE, pstate: int = 0x3C5, **regs: int) -> CpuContext:
        ctx = CpuContext.reset(pc=pc)
        ctx.pstate = pstate
        ctx.sys_regs["VBAR_EL1"] = VBAR
        ctx.sp_el1 = RAM + 0x3F000
        ctx.sp_el0 = RAM + 0x3E000
        for name, value in regs.items():
            if name.startswith("x"):
                ctx.x[int(name[1:])] = value
            else:
                ctx.sys_regs[name] = value
        self.core.load_context(ctx)
        return ctx

    def load_image(self, name: str, data: bytes | None = None) -> None:
        data = data if data is not None else guests.image(name)
        self.mem[: len(data)] = data
        self.core.load_context(CpuContext.reset(pc=RAM))

    def vector(self, ex: Exit) -> int:
        """The vector offset a test handler reported, or fail."""
        assert ex.kind is ExitKind.HVC and ex.imm >= 0x100, ex
        return (ex.imm - 0x100) * 0x80

    def serve(self, ex: Exit, core: Core | None = None) -> str | None:
        """Handle one exit as a VMM would; returns "off" on SYSTEM_OFF."""
        core = core or self.core
        if ex.kind is ExitKind.DABT:
            assert ex.isv, ex
            if ex.write:
                if ex.ipa == guests.UART_BASE:
                    self.uart.append(core.x(ex.srt) & 0xFF)
                core.skip()
            else:
                value = guests.UART_FR_VALUE if ex.ipa == guests.UART_FR else 0x1122334455667788
                complete_mmio_read(core, ex.esr, value)
            return None
        assert ex.kind is ExitKind.HVC, ex
        fn = core.x(0)
        if fn == guests.PSCI_SYSTEM_OFF:
            return "off"
        if fn == 0xC6000002:
            core.set_x(0, 4096)
        elif fn == 0xC6000003:
            self.shared = core.x(1)
            core.set_x(0, 0)
        else:
            core.set_x(0, MASK64)
        return None

    def run_guest(self, limit: int = 100_000) -> str:
        for _ in range(limit):
            if self.serve(self.core.run()) == "off":
                return self.uart.decode()
        raise AssertionError("guest did not power off")


# ---- guest programs ------------------------------------------------------------------------
def test_image_accessor() -> None:
    with pytest.raises(ValueError, match="unknown guest"):
        guests.image("nope")
    for name in guests.NAMES:
        assert len(guests.image(name)) % 4 == 0


def test_hello_prints_its_line() -> None:
    p = Platform()
    p.load_image("hello")
    assert p.run_guest() == "Hello from a pKVM guest!\n"


def test_memwalk_ok_and_detects_aliasing() -> None:
    p = Platform(ram_size=8 << 20)
    p.load_image("memwalk", guests.patch(guests.image("memwalk"), 2))
    assert p.run_guest() == "memwalk: OK\n"
    # Alias the walked window's second page onto its first: the read-back sees the wrong word.
    q = Platform(ram_size=8 << 20)
    q.core.map(RAM + 0x101000, 0x1000, q.addr + 0x100000)
    q.load_image("memwalk", guests.patch(guests.image("memwalk"), 1))
    assert q.run_guest() == "memwalk: FAIL at 0x0000000040100000\n"


def test_share_calls_meminfo_then_share() -> None:
    p = Platform()
    p.load_image("share")
    out = p.run_guest()
    assert p.shared == RAM + guests.SHARE_PAGE_OFFSET
    assert out == "share: hello through a shared page at 0x0000000040001000\n"
    page = p.mem[guests.SHARE_PAGE_OFFSET : guests.SHARE_PAGE_OFFSET + 64]
    assert page.startswith(b"share: hello through a shared page\0")


def test_oob_read_is_an_mmio_exit() -> None:
    p = Platform()
    p.load_image("oob")
    ex = p.core.run()
    assert ex.kind is ExitKind.DABT and ex.ipa == guests.OOB_IPA and ex.far == guests.OOB_IPA
    assert ex.isv and not ex.write and ex.access_size == 8 and ex.srt == 6
    p.serve(ex)
    assert p.run_guest() == "oob: read 0x1122334455667788\n"


def test_smp_two_vcpus() -> None:
    p = Platform()
    p.load_image("smp")
    cores = [p.core, Core()]
    cores[1].map(RAM, RAM_SIZE, p.addr)
    running = [True, False]
    for _ in range(10_000):
        for i, core in enumerate(cores):
            if not running[i]:
                continue
            ex = core.run(max_insns=2000)
            if ex.kind is ExitKind.BUDGET:
                continue
            fn = core.x(0) if ex.kind is ExitKind.HVC else None
            if fn == 0xC4000003:  # CPU_ON
                assert core.x(1) == 1
                cores[1].load_context(CpuContext.reset(pc=core.x(2), x0=core.x(3), mpidr=1))
                running[1] = True
                core.set_x(0, 0)
            elif fn == 0x84000002:  # CPU_OFF
                running[i] = False
            elif p.serve(ex, core) == "off":
                assert i == 0
                assert p.uart.decode() == (
                    "smp: vCPU 1 up, context 0x0000000000005ec0\nsmp: vCPU 0 saw vCPU 1 report\n"
                )
                return
    raise AssertionError("smp guest did not finish")


def test_loop_budget_exits() -> None:
    p = Platform()
    p.load_image("loop", guests.patch(guests.image("loop"), 10_000))
    budgets = 0
    while (ex := p.core.run(max_insns=1000)).kind is ExitKind.BUDGET:
        assert ex.code == ARM_EXCEPTION_IRQ
        budgets += 1
    assert ex.kind is ExitKind.HVC and ex.code == ARM_EXCEPTION_TRAP
    assert budgets == 40  # 40_005 instructions before the HVC
    q = Platform()
    q.load_image("loop", guests.patch(guests.image("loop"), 10_000))
    assert q.core.run().kind is ExitKind.HVC
    assert q.core.x(2) == p.core.x(2) == sum(range(1, 10_001))


# ---- exits to EL2 --------------------------------------------------------------------------
def test_hvc_smc_wfi_exits() -> None:
    p = Platform()
    p.put(CODE, [hvc(0x1234), 0xD40000A3, 0xD503207F])  # hvc #0x1234; smc #5; wfi
    p.start()
    ex = p.core.run()
    assert (ex.kind, ex.esr, ex.imm, p.core.pc) == (ExitKind.HVC, 0x5A001234, 0x1234, CODE + 4)
    ex = p.core.run()
    assert (ex.kind, ex.esr, ex.imm, p.core.pc) == (ExitKind.SMC, 0x5E000005, 5, CODE + 4)
    p.core.skip()
    ex = p.core.run()
    assert (ex.kind, ex.esr, p.core.pc) == (ExitKind.WFX, 0x07E00000, CODE + 8)


# (word, asm, write, isv, sas, sse, srt, sf, ar, far offset from x1)
ACCESSES = [
    (0x39000022, "strb w2, [x1]", True, True, 0, False, 2, False, False, 0),
    (0x79000022, "strh w2, [x1]", True, True, 1, False, 2, False, False, 0),
    (0xB9000022, "str w2, [x1]", True, True, 2, False, 2, False, False, 0),
    (0xF9000022, "str x2, [x1]", True, True, 3, False, 2, True, False, 0),
    (0x39400023, "ldrb w3, [x1]", False, True, 0, False, 3, False, False, 0),
    (0x79400023, "ldrh w3, [x1]", False, True, 1, False, 3, False, False, 0),
    (0xB9400023, "ldr w3, [x1]", False, True, 2, False, 3, False, False, 0),
    (0xF9400023, "ldr x3, [x1]", False, True, 3, False, 3, True, False, 0),
    (0x39C00024, "ldrsb w4, [x1]", False, True, 0, True, 4, False, False, 0),
    (0x39800024, "ldrsb x4, [x1]", False, True, 0, True, 4, True, False, 0),
    (0x79C00024, "ldrsh w4, [x1]", False, True, 1, True, 4, False, False, 0),
    (0x79800024, "ldrsh x4, [x1]", False, True, 1, True, 4, True, False, 0),
    (0xB9800024, "ldrsw x4, [x1]", False, True, 2, True, 4, True, False, 0),
    (0xF8667825, "ldr x5, [x1, x6, lsl #3]", False, True, 3, False, 5, True, False, 16),
    (0xB866D82A, "ldr w10, [x1, w6, sxtw #2]", False, True, 2, False, 10, False, False, 8),
    (0xB867D82A, "ldr w10, [x1, w7, sxtw #2]", False, True, 2, False, 10, False, False, -8),
    (0xF85F8027, "ldur x7, [x1, #-8]", False, True, 3, False, 7, True, False, -8),
    (0xF9400828, "ldr x8, [x1, #16]", False, True, 3, False, 8, True, False, 16),
    (0xF8400822, "ldtr x2, [x1]", False, True, 3, False, 2, True, False, 0),
    (0x889FFC22, "stlr w2, [x1]", True, True, 2, False, 2, False, True, 0),
    (0xC8DFFC29, "ldar x9, [x1]", False, True, 3, False, 9, True, True, 0),
    (0xF8BFC022, "ldapr x2, [x1]", False, True, 3, False, 2, True, True, 0),
    (0x99004022, "stlur w2, [x1, #4]", True, True, 2, False, 2, False, True, 4),
    (0xF900003F, "str xzr, [x1]", True, True, 3, False, 31, True, False, 0),
    (0xA9400C22, "ldp x2, x3, [x1]", False, False, 0, False, 0, False, False, 0),
    (0x293F0C22, "stp w2, w3, [x1, #-8]", True, False, 0, False, 0, False, False, -8),
    (0xF8408422, "ldr x2, [x1], #8", False, False, 0, False, 0, False, False, 0),
    (0xF8008C22, "str x2, [x1, #8]!", True, False, 0, False, 0, False, False, 8),
    (0x3DC00020, "ldr q0, [x1]", False, False, 0, False, 0, False, False, 0),
    (0xC85F7C22, "ldxr x2, [x1]", False, False, 0, False, 0, False, False, 0),
    (0x4C40A020, "ld1 {v0.16b, v1.16b}, [x1]", False, False, 0, False, 0, False, False, 0),
]


@pytest.mark.parametrize("access", ACCESSES, ids=[a[1] for a in ACCESSES])
def test_stage2_data_abort_syndrome(access: tuple) -> None:
    word, _asm, write, isv, sas, sse, srt, sf, ar, off = access
    p = Platform()
    p.put(CODE, [word, hvc(0)])
    base = MMIO + 0x100
    p.start(x1=base, x2=0x1234, x6=2, x7=(1 << 64) - 2, CPACR_EL1=3 << 20)
    ex = p.core.run()
    assert ex.kind is ExitKind.DABT and ex.ec == EC.DABT_LOW
    assert p.core.pc == CODE  # not executed
    assert ex.esr & 0x3F == 0x07  # translation fault, level 3
    assert ex.write is write
    assert ex.isv is isv
    assert ex.far == base + off
    assert ex.hpfar == ((base + off) >> 12) << 4 and ex.ipa == base + off
    assert ipa_from_hpfar(ex.hpfar) == (base + off) & ~0xFFF
    if isv:
        assert (ex.esr >> 22) & 3 == sas
        assert bool(ex.esr & 1 << 21) is sse
        assert ex.srt == srt
        assert bool(ex.esr & 1 << 15) is sf
        assert bool(ex.esr & 1 << 14) is ar
    else:
        assert ex.esr & 0x01FFFFC0 & ~(1 << 6) == 0  # no ISS besides WnR and FSC


@pytest.mark.parametrize(
    ("word", "data", "expected"),
    [
        (0x39400023, 0x180, 0x80),  # ldrb w3
        (0x39C00024, 0x80, 0xFFFF_FF80),  # ldrsb w4
        (0x39800024, 0x80, 0xFFFF_FFFF_FFFF_FF80),  # ldrsb x4
        (0x79C00024, 0x8001, 0xFFFF_8001),  # ldrsh w4
        (0xB9800024, 0x8000_0000, 0xFFFF_FFFF_8000_0000),  # ldrsw x4
        (0xB9400023, 0x1_2345_6789, 0x2345_6789),  # ldr w3
        (0xF9400023, MASK64, MASK64),  # ldr x3
    ],
)
def test_complete_mmio_read_extends(word: int, data: int, expected: int) -> None:
    for on_context in (False, True):
        p = Platform()
        p.put(CODE, [word, hvc(0)])
        p.start(x1=MMIO)
        ex = p.core.run()
        if on_context:
            ctx = p.core.save_context()
            complete_mmio_read(ctx, ex.esr, data)
            p.core.load_context(ctx)
        else:
            complete_mmio_read(p.core, ex.esr, data)
        assert p.core.pc == CODE + 4
        assert p.core.x(ex.srt) == expected
        assert p.core.run().kind is ExitKind.HVC


def test_complete_mmio_read_needs_isv() -> None:
    with pytest.raises(ValueError, match="ISV"):
        complete_mmio_read(CpuContext(), 0x92000007, 0)


def test_stage2_permission_and_instruction_aborts() -> None:
    p = Platform()
    page = RAM + 0x5000
    p.core.protect(page, 0x1000, writable=False, executable=True)
    p.put(CODE, [0xF9400020, 0xF9000022, hvc(0)])  # ldr x0, [x1]; str x2, [x1]
    p.start(x1=page + 8)
    ex = p.core.run()
    assert ex.kind is ExitKind.DABT and p.core.pc == CODE + 4
    assert ex.esr == 0x93000000 | 3 << 22 | 2 << 16 | 1 << 15 | 1 << 6 | 0x0F
    assert ex.far == page + 8 and ex.hpfar == (page >> 12) << 4
    # a page that is mapped but not executable, then an IPA that is not mapped at all
    nx = RAM + 0x6000
    p.core.protect(nx, 0x1000, writable=True, executable=False)
    for target, fsc in ((nx, 0x0F), (0x0C00_0000, 0x07)):
        p.put(CODE, [0xD61F0020])  # br x1
        p.start(x1=target)
        ex = p.core.run()
        assert ex.kind is ExitKind.IABT and ex.esr == 0x82000000 | fsc
        assert ex.far == target and p.core.pc == target and ex.hpfar == (target >> 12) << 4


def test_sysreg_exit_emulate_and_undef() -> None:
    p = Platform()
    # mrs x3, icc_pmr_el1; msr icc_sgi1r_el1, x1; hvc #0
    p.put(CODE, [0xD5384603, 0xD518CBA1, hvc(0)])
    p.start(x1=0x55)
    ex = p.core.run()
    assert ex.kind is ExitKind.SYSREG and ex.esr == 0x6230106D and p.core.pc == CODE
    p.core.set_x(3, 0xF0)
    p.core.skip()
    ex = p.core.run()
    assert ex.kind is ExitKind.SYSREG and ex.esr == 0x623A3036 and p.core.pc == CODE + 4
    p.core.inject_undef()
    ex = p.core.run()
    assert p.vector(ex) == 0x200
    ctx = p.core.save_context()
    assert ctx.x[3] == 0xF0
    assert ctx.sys_regs["ESR_EL1"] == 0x02000000
    assert ctx.elr_el1 == CODE + 4 and ctx.spsr_el1 == 0x3C5


# ---- exceptions delivered to the guest's EL1 ----------------------------------------------
@pytest.mark.parametrize(
    ("word", "esr", "elr_off"),
    [
        (0xD4000841, 0x56000042, 4),  # svc #0x42: ELR past it
        (0xD42000E0, 0xF2000007, 0),  # brk #7
        (0x00000000, 0x02000000, 0),  # udf #0
    ],
)
@pytest.mark.parametrize(("pstate", "vector"), [(0x3C5, 0x200), (0x3C4, 0x000), (0x000, 0x400)])
def test_sync_exception_entry(word: int, esr: int, elr_off: int, pstate: int, vector: int) -> None:
    p = Platform()
    p.put(CODE, [word])
    p.start(pstate=pstate | 0x6000_0000)  # NZCV bits kept across entry
    before = p.core.save_context()
    ex = p.core.run()
    assert p.vector(ex) == vector
    ctx = p.core.save_context()
    assert ctx.sys_regs["ESR_EL1"] == esr
    assert ctx.elr_el1 == CODE + elr_off
    assert ctx.spsr_el1 == pstate | 0x6000_0000
    assert ctx.pstate == 0x6000_03C5  # EL1h, DAIF masked, NZCV unchanged
    assert ctx.x[9] == before.sp_el1  # the handler runs on SP_EL1
    assert (ctx.sp_el0, ctx.sp_el1) == (before.sp_el0, before.sp_el1)


def test_el0_cannot_read_el1_registers() -> None:
    p = Platform()
    p.put(CODE, [0xD5381000])  # mrs x0, sctlr_el1
    p.start(pstate=0)
    assert p.vector(p.core.run()) == 0x400
    assert p.core.sys_reg("ESR_EL1") == 0x02000000
    # the same at EL1 is fine
    p.put(CODE, [0xD5381000, hvc(0)])
    p.start()
    assert p.core.run().imm == 0 and p.core.x(0) == p.core.sys_reg("SCTLR_EL1")


def test_eret_returns_from_a_delivered_exception() -> None:
    p = Platform()
    # svc #1 at CODE; handler at VBAR+0x200: add x2, x2, #1; eret; after the svc: hvc #0
    p.put(CODE, [0xD4000021, hvc(7)])
    p.put(VBAR + 0x200, [0x91000442, decode.ERET])
    p.start(x2=41)
    ex = p.core.run()
    assert ex.imm == 7 and p.core.x(2) == 42 and p.core.pstate == 0x3C5


def test_alignment_fault_on_exclusive() -> None:
    p = Platform()
    p.put(CODE, [0xC85F7C22])  # ldxr x2, [x1]
    p.start(x1=RAM + 0x5001)
    assert p.vector(p.core.run()) == 0x200
    assert p.core.sys_reg("ESR_EL1") == 0x96000021
    assert p.core.sys_reg("FAR_EL1") == RAM + 0x5001


def test_irq_injection_and_mask() -> None:
    p = Platform()
    p.put(CODE, [NOP, hvc(0)])
    p.start()
    assert p.core.irqs_masked
    p.start(pstate=0x345)
    assert not p.core.irqs_masked
    p.core.inject_irq()
    assert p.vector(p.core.run()) == 0x280
    ctx = p.core.save_context()
    assert ctx.elr_el1 == CODE and ctx.spsr_el1 == 0x345 and ctx.pstate == 0x3C5
    assert p.core.irqs_masked


# ---- the guest's own stage-1 ---------------------------------------------------------------
L1, L2, L3 = RAM + 0x20000, RAM + 0x21000, RAM + 0x22000
TABLE, BLOCK, PAGE, AF = 0b11, 0b01, 0b11, 1 << 10
RO, PXN, UXN, DEVICE = 0b10 << 6, 1 << 53, 1 << 54, 1 << 2
S1_OFF_TABLE = 0x0B00_0000  # an L3 table at an IPA stage-2 does not map


def mmu_platform() -> Platform:
    """4K granule, 39-bit VA; VA 0x4000_0000+2M identity (code, data, tables), then:
    0x4020_0000 RO page; +0x1000 AF clear; +0x2000 invalid; +0x3000 -> IPA 0x0A00_0000 (not
    in stage-2); +0x4000 XN page; VA 0x4040_0000 via a table at an unmapped IPA; 0x4060_0000
    invalid at level 2; 0x8000_0000 invalid at level 1."""
    p = Platform()
    p.put64(L1 + 8, L2 | TABLE)
    p.put64(L2, RAM | BLOCK | AF)
    p.put64(L2 + 8, L3 | TABLE)
    p.put64(L2 + 16, S1_OFF_TABLE | TABLE)
    p.put64(L3, (RAM + 0x30000) | PAGE | AF | RO)
    p.put64(L3 + 8, (RAM + 0x31000) | PAGE)
    p.put64(L3 + 24, MMIO | PAGE | AF | DEVICE)
    p.put64(L3 + 32, (RAM + 0x32000) | PAGE | AF | PXN | UXN)
    return p


def mmu_start(p: Platform, **regs: int) -> None:
    p.start(
        TTBR0_EL1=L1,
        TCR_EL1=25 | 1 << 23 | 0b101 << 32,
        MAIR_EL1=0x00FF,
        SCTLR_EL1=0x00C50078 | 1,
        **regs,
    )


@pytest.mark.parametrize(
    ("word", "va", "esr"),
    [
        (0xF9400020, 0x4020_0008, 0),  # ldr from the read-only page: no fault
        (0xF9000022, 0x4020_0008, 0x9600004F),  # str to a read-only page: permission L3
        (0xF9400020, 0x4020_1000, 0x9600000B),  # access flag L3
        (0xF9400020, 0x4020_2010, 0x96000007),  # translation L3
        (0xF9400020, 0x4060_0000, 0x96000006),  # translation L2
        (0xF9400020, 0x8000_0000, 0x96000005),  # translation L1
    ],
)
def test_stage1_data_aborts_go_to_the_guest(word: int, va: int, esr: int) -> None:
    p = mmu_platform()
    p.put(CODE, [word, hvc(0)])
    mmu_start(p, x1=va)
    ex = p.core.run()
    if va == 0x4020_0008 and word == 0xF9400020:
        assert ex.imm == 0  # the read-only page reads fine
        assert p.core.translate(va).ipa == RAM + 0x30008
        return
    assert p.vector(ex) == 0x200
    ctx = p.core.save_context()
    assert ctx.sys_regs["ESR_EL1"] == esr
    assert ctx.sys_regs["FAR_EL1"] == va
    assert ctx.elr_el1 == CODE
    assert p.core.translate(va, write=word == 0xF9000022).fsc == esr & 0x3F


def test_stage1_instruction_abort_goes_to_the_guest() -> None:
    p = mmu_platform()
    p.put(CODE, [0xD61F0020])  # br x1
    mmu_start(p, x1=0x4020_4000)
    assert p.vector(p.core.run()) == 0x200
    assert p.core.sys_reg("ESR_EL1") == 0x8600000F
    assert p.core.sys_reg("FAR_EL1") == 0x4020_4000
    assert p.core.save_context().elr_el1 == 0x4020_4000


def test_stage2_abort_with_mmu_on_reports_va_and_ipa() -> None:
    p = mmu_platform()
    p.put(CODE, [0xF9400020, hvc(0)])  # ldr x0, [x1]
    mmu_start(p, x1=0x4020_3008)
    ex = p.core.run()
    assert ex.kind is ExitKind.DABT and ex.far == 0x4020_3008
    assert ex.hpfar == (MMIO >> 12) << 4 and ex.ipa == MMIO + 8
    assert ex.isv and ex.srt == 0 and ex.access_size == 8
    complete_mmio_read(p.core, ex.esr, 77)
    assert p.core.run().kind is ExitKind.HVC and p.core.x(0) == 77


def test_stage1_walk_into_unmapped_ipa_is_s1ptw() -> None:
    p = mmu_platform()
    p.put(CODE, [0xF9400020, hvc(0)])
    mmu_start(p, x1=0x4040_0010)
    ex = p.core.run()
    assert ex.kind is ExitKind.DABT and ex.esr & 1 << 7  # S1PTW
    assert ex.esr & 0x3F == 0x07 and not ex.isv
    assert ex.far == 0x4040_0010 and ex.hpfar == (S1_OFF_TABLE >> 12) << 4
    # the host maps the table's page (an empty table): now a stage-1 fault for the guest
    table = RAM + 0x40000
    p.core.map(S1_OFF_TABLE, 0x1000, p.addr + table - RAM)
    assert p.vector(p.core.run()) == 0x200
    assert p.core.sys_reg("ESR_EL1") == 0x96000007


# ---- context, FP, mappings -----------------------------------------------------------------
def test_context_round_trip() -> None:
    rng = random.Random(4)
    p = Platform()
    ctx = CpuContext.reset(pc=CODE, mpidr=3)
    ctx.x = [rng.getrandbits(64) for _ in range(31)]
    ctx.v = [rng.getrandbits(128) for _ in range(32)]
    ctx.sp_el0, ctx.sp_el1 = rng.getrandbits(64) & ~15, rng.getrandbits(64) & ~15
    ctx.elr_el1, ctx.spsr_el1 = rng.getrandbits(64) & ~3, 0x3C5
    ctx.fpcr, ctx.fpsr = 0x0300_0000, 0x8000_0010
    ctx.pstate = 0x2000_03C4
    for name in (
        "TTBR0_EL1",
        "TTBR1_EL1",
        "MAIR_EL1",
        "VBAR_EL1",
        "TPIDR_EL1",
        "TPIDR_EL0",
        "TPIDRRO_EL0",
        "CONTEXTIDR_EL1",
        "FAR_EL1",
        "ESR_EL1",
    ):
        ctx.sys_regs[name] = rng.getrandbits(32) << 12
    ctx.sys_regs["TCR_EL1"] = 25 | 1 << 23
    ctx.sys_regs["CPACR_EL1"] = 3 << 20
    for _ in range(2):  # loaded twice: the second load takes the unchanged-group path
        p.core.load_context(ctx)
        got = p.core.save_context()
        for name, value in ctx.sys_regs.items():
            assert got.sys_regs[name] == value, name
        assert got.sys_regs["MPIDR_EL1"] == 0x8000_0003
        assert (got.x, got.v, got.pc, got.pstate) == (ctx.x, ctx.v, ctx.pc, ctx.pstate)
        assert (got.sp_el0, got.sp_el1, got.elr_el1, got.spsr_el1) == (
            ctx.sp_el0,
            ctx.sp_el1,
            ctx.elr_el1,
            ctx.spsr_el1,
        )
        assert (got.fpcr, got.fpsr) == (ctx.fpcr, ctx.fpsr)


def test_guest_fp_and_sysreg_writes_reach_the_saved_context() -> None:
    p = Platform()
    # add v0.2d, v0.2d, v1.2d; fmov x2, d0; msr tpidr_el1, x5; hvc #0
    p.put(CODE, [0x4EE18400, 0x9E660002, 0xD518D085, hvc(0)])
    ctx = CpuContext.reset(pc=CODE)
    ctx.sys_regs["CPACR_EL1"] = 3 << 20
    ctx.v[0] = 5 << 64 | 7
    ctx.v[1] = 1 << 64 | 2
    ctx.x[5] = 0xABC0
    p.core.load_context(ctx)
    p.core.save_context()  # nothing ran: FP not yet used
    assert p.core.run().kind is ExitKind.HVC
    got = p.core.save_context()
    assert got.v[0] == 6 << 64 | 9 and got.x[2] == 9
    assert got.sys_regs["TPIDR_EL1"] == 0xABC0


def test_mappings_merge_split_and_protect() -> None:
    mem = mmap.mmap(-1, 0x10000)
    host = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    core = Core()
    core.map(0x8000_0000, 0x2000, host)
    core.map(0x8000_2000, 0x2000, host + 0x2000)
    assert [(m.start, m.end) for m in core.mappings()] == [(0x8000_0000, 0x8000_4000)]
    core.unmap(0x8000_1000, 0x1000)
    assert [(m.start, m.end) for m in core.mappings()] == [
        (0x8000_0000, 0x8000_1000),
        (0x8000_2000, 0x8000_4000),
    ]
    core.map(0x8000_1000, 0x1000, host + 0x1000)
    core.protect(0x8000_2000, 0x1000, writable=False, executable=False)
    assert [(m.start, m.writable) for m in core.mappings()] == [
        (0x8000_0000, True),
        (0x8000_2000, False),
        (0x8000_3000, True),
    ]
    core.protect(0x8000_2000, 0x1000, writable=True, executable=True)
    assert len(core.mappings()) == 1
    core.map(0x8000_5000, 0x1000, host + 0x9000)  # not contiguous in host memory
    assert len(core.mappings()) == 2
    assert core.read_ipa(0x8000_5000, 4) == b"\0\0\0\0"
    with pytest.raises(ValueError):
        core.map(0x8000_0800, 0x1000, host)
    with pytest.raises(ValueError):
        core.map(0x8000_8000, 0x1000, host + 8)


# ---- the decoder against capstone ----------------------------------------------------------
def test_decoder_agrees_with_capstone_on_base_and_writeback() -> None:
    capstone = pytest.importorskip("capstone")
    from capstone import arm64_const as C  # type: ignore[import-untyped]

    md = capstone.Cs(capstone.CS_ARCH_ARM64, capstone.CS_MODE_ARM)
    md.detail = True
    rng = random.Random(12)
    checked = 0
    for _ in range(20000):
        word = (rng.getrandbits(32) & ~0x0A000000) | 0x08000000  # the load/store group
        insn = next(md.disasm(struct.pack("<I", word), 0x1000), None)
        if insn is None or insn.mnemonic.startswith(("prfm", "prfum", "cpy", "set")):
            continue  # prefetches never fault; MOPS (CPY*/SET*) are not implemented
        mems = [op for op in insn.operands if op.type == C.ARM64_OP_MEM]
        if not mems:
            continue
        acc = decode.decode_mem(word)
        assert acc is not None, f"{word:#010x} {insn.mnemonic} {insn.op_str}"
        base = insn.reg_name(mems[0].mem.base)
        if base is None or base[0] not in "xw" and base not in ("sp", "wsp"):
            continue  # capstone names no base (or a vector register) for some forms
        expected = 31 if base in ("sp", "wsp") else int(base[1:])
        assert acc.rn == expected, f"{word:#010x} {insn.mnemonic} {insn.op_str}"
        assert acc.writeback == bool(insn.writeback), f"{word:#010x} {insn.mnemonic} {insn.op_str}"
        checked += 1
    assert checked > 3000


def test_esr_helpers() -> None:
    assert esr_ec(0x96000007) == EC.DABT_CUR
    assert decode.decode_sys(0xD5384603) == decode.SysInsn(3, 0, 4, 6, 0, 3, True)
    assert decode.decode_sys(NOP) is None
    assert decode.is_fp_simd(0x9E670020) and not decode.is_fp_simd(NOP)


# ---- the stage-1 walk against QEMU's own (AT S1E1R / S1E1W into PAR_EL1) ------------------
AT_S1E1R, AT_S1E1W, ISB, MRS_X0_PAR = 0xD5087801, 0xD5087821, 0xD5033FDF, 0xD5387400


def _at(p: Platform, va: int, write: bool, tcr: int, ttbr0: int) -> int:
    p.put(CODE, [AT_S1E1W if write else AT_S1E1R, ISB, MRS_X0_PAR, hvc(0)])
    p.start(x1=va, TTBR0_EL1=ttbr0, TCR_EL1=tcr, MAIR_EL1=0x00FF, SCTLR_EL1=0x00C50078 | 1)
    # the code and tables are identity-mapped by the first block/page of every layout below
    ex = p.core.run()
    assert ex.kind is ExitKind.HVC, ex
    return p.core.x(0)


@pytest.mark.parametrize(
    ("granule", "tg0", "tsz"),
    [(12, 0b00, 25), (12, 0b00, 16), (16, 0b01, 22), (14, 0b10, 28)],
)
def test_translate_agrees_with_at(granule: int, tg0: int, tsz: int) -> None:
    """Random tables: every VA gets the same answer from `translate` as from the CPU's AT."""
    rng = random.Random(granule * 100 + tsz)
    p = Platform(ram_size=8 << 20)
    gsize = 1 << granule
    stride = granule - 3
    insize = 64 - tsz
    start_level = 4 - -(-(insize - granule) // stride)
    tables = [RAM + 0x200000 + i * gsize for i in range(24)]
    free = list(tables[1:])
    # Identity-map the first 2 MiB of RAM (code, vectors, tables) with a chain of tables and
    # pages/blocks, then fill random entries elsewhere.
    va_code = RAM

    def entry_addr(table: int, level: int, va: int) -> int:
        shift = granule + (3 - level) * stride
        bits = min(stride, insize - shift)
        return table + ((va >> shift) & ((1 << bits) - 1)) * 8

    def write_identity(table: int, level: int) -> None:
        shift = granule + (3 - level) * stride
        block_ok = level == 3 or (level >= 1 if granule == 12 else level >= 2)
        if block_ok and (1 << shift) <= 0x200000 or level == 3:
            for off in range(0, 0x400000, 1 << shift):
                kind = PAGE if level == 3 else BLOCK
                p.put64(entry_addr(table, level, va_code + off), (RAM + off) | kind | AF)
            return
        nxt = free.pop(0)
        p.put64(entry_addr(table, level, va_code), nxt | TABLE)
        write_identity(nxt, level + 1)

    write_identity(tables[0], start_level)
    vas: list[int] = []

    def fill(table: int, level: int, prefix: int) -> None:
        """Random entries in free slots; tables recurse; each leaf or hole yields VAs."""
        shift = granule + (3 - level) * stride
        bits = min(stride, insize - shift)
        for _ in range(5):
            idx = rng.randrange(1 << bits)
            addr = table + idx * 8
            if int.from_bytes(p.mem[addr - RAM : addr - RAM + 8], "little"):
                continue
            va = prefix | idx << shift
            kind = rng.choice([0, TABLE, BLOCK] if level < 3 else [0, PAGE, BLOCK])
            if kind == TABLE and level < 3 and free:
                nxt = free.pop(0)
                p.put64(addr, nxt | TABLE)
                fill(nxt, level + 1, va)
                continue
            out = rng.randrange(1, 1 << (40 - shift)) << shift
            attrs = rng.choice([0, AF, AF, AF]) | rng.choice([0, RO, 0b01 << 6, 0b11 << 6])
            p.put64(addr, out | kind | attrs | rng.choice([0, PXN]))
            vas.extend(va | rng.randrange(0, 1 << shift) & ~7 for _ in range(3))

    fill(tables[0], start_level, 0)
    tcr = tsz | tg0 << 14 | 1 << 23 | 0b101 << 32
    for va in vas:
        for write in (False, True):
            par = _at(p, va, write, tcr, tables[0])
            w = p.core.translate(va, write=write, el=1)
            if par & 1:
                assert w.ipa is None and w.fsc == (par >> 1) & 0x3F, (hex(va), hex(par), w)
            else:
                assert w.ipa is not None, (hex(va), hex(par), w)
                assert w.ipa & ~(gsize - 1) & ((1 << 48) - 1) == par & 0xFFFF_FFFF_F000 & ~(
                    gsize - 1
                ), (hex(va), hex(par), w)


@pytest.mark.parametrize("tsz", [39, 40, 48, 61, 63])
def test_an_out_of_range_t0sz_walks_as_the_cpu_does(tsz: int) -> None:
    """T0SZ above 39 (IMPLEMENTATION DEFINED): the CPU walks as if it held 39, and so does
    `translate` (a hostile guest's TCR_EL1 once made the walk shift by a negative count).
    The code runs at VA 0x1000 through a 2 MiB block to RAM, so the CPU's own fetch
    answers too: with a level-0 fault instead it would not reach its HVC."""
    p = Platform(ram_size=8 << 20)
    l2 = RAM + 0x200000  # T0SZ 39, 4K granule: 25-bit VAs, the walk starts at level 2
    p.put64(l2, RAM | BLOCK | AF)  # VA [0, 2 MiB) -> RAM
    p.put64(l2 + 8 * 3, (RAM + 0x600000) | BLOCK | AF | RO)  # VA [6, 8) MiB, read-only
    p.put(RAM + 0x1000, [AT_S1E1R, ISB, MRS_X0_PAR, hvc(0)])
    tcr = tsz | 1 << 23 | 0b101 << 32
    for va in (0x1238, 0x60_0010, 0x20_0000, 0x1FF_F000, 0x200_0000, 0x4000_0000):
        p.start(pc=0x1000, x1=va, TTBR0_EL1=l2, TCR_EL1=tcr, MAIR_EL1=0x00FF,
                SCTLR_EL1=0x00C50078 | 1, VBAR_EL1=0x10000)  # the vectors, through the block
        ex = p.core.run()
        assert ex.kind is ExitKind.HVC, (tsz, hex(va), ex)
        par = p.core.x(0)
        w = p.core.translate(va, el=1)
        if par & 1:
            assert w.ipa is None and w.fsc == (par >> 1) & 0x3F, (tsz, hex(va), hex(par), w)
        else:
            assert w.ipa is not None and w.ipa & ~0xFFF == par & 0xFFFF_FFFF_F000, (
                tsz, hex(va), hex(par), w)


@pytest.mark.parametrize("shared", [True, False])
def test_scattered_host_pages(shared: bool) -> None:
    """Guest RAM backed by host pages in shuffled order runs the same; over shared memory the
    core aliases them into a window where they merge into few regions."""
    flags = (mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE) | mmap.MAP_ANONYMOUS
    pages = 512 + 16  # memwalk walks IPA pages 0x100..0x1ff
    mem = mmap.mmap(-1, pages * 4096, flags=flags)
    host = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    order = list(range(pages))
    random.Random(7).shuffle(order)
    core = Core()
    for ipa_page, host_page in enumerate(order):
        core.map(RAM + ipa_page * 4096, 4096, host + host_page * 4096)
    if shared:  # 528 pages: 512 + 16, one aligned block each
        assert [m.end - m.start for m in core.mappings()] == [2 << 20, 64 << 10]
    else:
        assert len(core.mappings()) > pages // 2
    image = guests.patch(guests.image("memwalk"), 1)
    first = order[0] * 4096
    mem[first : first + len(image)] = image
    p = Platform(ram_size=4096, core=core)  # (its own RAM is not used here)
    core.load_context(CpuContext.reset(pc=RAM))
    assert p.run_guest() == "memwalk: OK\n"
    # page 0x101 of the IPA range holds the pattern word at its host page
    at = order[0x101] * 4096
    assert int.from_bytes(mem[at : at + 8], "little") == (RAM + 0x101000) ^ 0x9E3779B97F4A7C15


def test_wfi_at_el0_traps_to_el1_first_when_sctlr_says_so() -> None:
    p = Platform()
    p.put(CODE, [0xD503207F])  # wfi
    p.start(pstate=0)  # SCTLR_EL1.nTWI = 1 (reset value): EL2's TWI takes it
    assert p.core.run().kind is ExitKind.WFX
    p.start(pstate=0, SCTLR_EL1=0x00C50078 & ~(1 << 16))
    assert p.vector(p.core.run()) == 0x400
    assert p.core.sys_reg("ESR_EL1") == 0x07E00000


def test_budget_ends_a_guest_that_loops_through_its_own_vectors() -> None:
    p = Platform()
    p.put(CODE, [0xD4000001, 0x17FFFFFF])  # 1: svc #0; b 1b
    p.put(VBAR + 0x200, [decode.ERET])
    p.start()
    assert p.core.run(max_insns=1000).kind is ExitKind.BUDGET
    assert p.core.sys_reg("ESR_EL1") == 0x56000000


def test_access_crossing_into_an_unmapped_page() -> None:
    p = Platform()
    end = RAM + RAM_SIZE
    p.put(CODE, [0xF9400020, hvc(0)])  # ldr x0, [x1]
    p.start(x1=end - 4)
    ex = p.core.run()
    assert ex.kind is ExitKind.DABT and ex.far == end and ex.hpfar == (end >> 12) << 4


def test_inject_sync_sets_esr_and_far() -> None:
    p = Platform()
    p.put(CODE, [NOP, hvc(0)])
    p.start(pstate=0)  # from EL0: the lower-EL vector
    p.core.inject_sync(0x92000010, far=0x1234_5678)  # an external data abort
    assert p.vector(p.core.run()) == 0x400
    ctx = p.core.save_context()
    assert ctx.sys_regs["ESR_EL1"] == 0x92000010 and ctx.sys_regs["FAR_EL1"] == 0x1234_5678
    assert ctx.elr_el1 == CODE and ctx.spsr_el1 == 0
