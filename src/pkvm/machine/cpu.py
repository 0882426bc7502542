"""A guest CPU core: AArch64 EL1/EL0 on unicorn, stopping where EL2 would take an exception.

The run path drives it as KVM drives hardware: `load_context()` (flush), `run()` until an
exception to EL2, `save_context()` (sync); `save_raw()` / `load_raw()` move the same context as
bytes in `struct kvm_cpu_context`'s layout, with no per-register objects (the hyp's run path).
The core knows nothing of the hyp or the host: its stage-2 view is a list of IPA ranges, each
backed directly by host memory (`map`), and an exit is reported as the architecture reports it
to EL2 (`Exit.esr`, `.far`, `.hpfar`).

    core = Core()
    core.map(0x4000_0000, size, host_address, writable=True, executable=True)
    core.load_context(CpuContext.reset(pc=0x4000_0000))
    while (ex := core.run()).kind is not ExitKind.HVC: ...
    ctx = core.save_context()

Exits (`ExitKind`), all with `Exit.code == ARM_EXCEPTION_TRAP` except `BUDGET`:

| kind | EC | PC at exit | notes |
|---|---|---|---|
| HVC | 0x16 | past the HVC (as ELR_EL2) | `imm` = imm16 |
| SMC | 0x17 | on the SMC (EL2 advances it) | `imm` = imm16; trapped by HCR_EL2.TSC |
| WFX | 0x01 | on the WFI | ISS bit 0 = 0 (WFI). WFE never exits (see `pkvm.machine.exceptions`) |
| DABT | 0x24 | on the instruction (not executed) | stage-2: FSC 0x07 no mapping, 0x0F not writable; ISV etc. only for single GPR loads/stores without writeback; S1PTW when the guest's table walk hit an unmapped IPA |
| IABT | 0x20 | on the instruction | FSC 0x07 / 0x0F (mapped not executable) |
| SYSREG | 0x18 | on the MRS/MSR/SYS | an EL1 system-register access unicorn does not implement (all ICC_*, ...): ISS Op0/Op2/Op1/CRn/Rt/CRm/Direction; emulate and `skip()`, or `inject_undef()` |
| BUDGET | – | next instruction | `run(max_insns)` used its budget; `code == ARM_EXCEPTION_IRQ` |

A stage-2 data abort with ISV is completed by the caller: for a write the value is register
SRT; for a read call `complete_mmio_read(target, esr, data)` on the `Core` or on the saved
`CpuContext` (writes Xt, sign/zero-extended per SAS/SSE/SF, and advances PC by 4).

Everything else a guest raises is the guest's own business and is delivered to its EL1 vectors
as the architecture does (ESR_EL1, FAR_EL1, ELR_EL1, SPSR_EL1, SP banking, PSTATE EL1h with DAIF
masked, PAN per SCTLR_EL1.SPAN, VBAR_EL1 + 0x000/0x200/0x400 by source): SVC (EC 0x15), BRK
(0x3C), undefined instructions (0x00), illegal execution state (0x0E), PC alignment (0x22),
aborts from the guest's own stage-1 tables (0x20/0x21, 0x24/0x25: translation, access flag,
permission; alignment FSC 0x21), MRS/MSR at EL0 that unicorn refuses (0x00). The platform
injects with `inject_undef()`, `inject_sync(esr, far)`, `inject_irq()` (check `irqs_masked`),
`inject_fiq()`, `inject_serror()`. `translate(va)` walks the guest's stage-1 as the CPU does
(4K/16K/64K granules; checked against the CPU's own AT S1E1R/W in the tests).

EL2 software controls the rest of the CPU through `read_sysreg` / `write_sysreg` (an EL2 or
EL3 register by encoding, e.g. `SYS_HCR_EL2`), `invalidate_sys_shadow()`, `save_cpu_state()` /
`restore_cpu_state()` (one core shared by several vCPUs) and `flush_tlb()`.

The core is built from its parts, each with the notes on what unicorn 2.1.4 does there:
`pkvm.machine.context` (the register file, contexts, EL2 control), `pkvm.machine.exceptions`
(exits to EL2, delivery to EL1, the syndromes rebuilt from the instruction),
`pkvm.machine.stage1` (the guest's stage-1 walk), `pkvm.machine.stage2_view` (the IPA ranges
the CPU reaches), and this module (the run loop). Of the run loop: `emu_start(count=N)` counts
with a per-instruction hook (~4x slower), so `run()` uses it only when given a budget; a
timeout slices at arbitrary points (device accesses replayed) and is not used.
"""

from __future__ import annotations

import ctypes
from typing import Any, Final

from unicorn import arm64_const as A
from unicorn.unicorn_const import UC_ARCH_ARM64, UC_MODE_ARM
from unicorn.unicorn_py3.unicorn import Uc, UcError

from pkvm.machine.context import (
    CNTHCTL_EL1PCEN,
    CNTHCTL_EL1PCTEN,
    HCR_API,
    HCR_APK,
    HCR_FMO,
    HCR_IMO,
    HCR_VI,
    MASK64,
    PSTATE_RESET,
    REG_PC,
    SCR_EL3_API,
    SCR_EL3_APK,
    SCTLR_EL1_RESET,
    SYS_CNTHCTL_EL2,
    SYS_HCR_EL2,
    SYS_REGS,
    SYS_SCR_EL3,
    CpuContext,
    CpuState,
    SysRegEnc,
    uc_emu_start_direct,
)
from pkvm.machine.esr import (
    ESR_ELx_ISV,
    ESR_ELx_SAS_SHIFT,
    ESR_ELx_SF,
    ESR_ELx_SRT_SHIFT,
    ESR_ELx_SSE,
)
from pkvm.machine.exceptions import (
    ARM_EXCEPTION_IRQ,
    ARM_EXCEPTION_TRAP,
    CpuExceptions,
    Exit,
    ExitKind,
)
from pkvm.machine.memory import PAGE_SIZE, emulator_enter, emulator_leave
from pkvm.machine.stage1 import Walk
from pkvm.machine.stage2_view import Mapping, Stage2View

__all__ = [
    "ARM_EXCEPTION_IRQ",
    "ARM_EXCEPTION_TRAP",
    "CNTHCTL_EL1PCEN",
    "CNTHCTL_EL1PCTEN",
    "HCR_API",
    "HCR_APK",
    "HCR_FMO",
    "HCR_IMO",
    "HCR_VI",
    "PAGE_SIZE",
    "PSTATE_RESET",
    "SCR_EL3_API",
    "SCR_EL3_APK",
    "SCTLR_EL1_RESET",
    "SYS_CNTHCTL_EL2",
    "SYS_HCR_EL2",
    "SYS_REGS",
    "SYS_SCR_EL3",
    "Core",
    "CpuContext",
    "CpuState",
    "Exit",
    "ExitKind",
    "Mapping",
    "SysRegEnc",
    "Walk",
    "complete_mmio_read",
    "mmio_read_value",
]

_UNTIL: Final = MASK64  # an odd address: PC never reaches it
# uc_emu_start's 64-bit arguments as C values (`uc_emu_start_direct` converts nothing)
_UNTIL_C: Final = ctypes.c_uint64(_UNTIL)
_ZERO_C: Final = ctypes.c_uint64(0)
_U64: Final = ctypes.c_uint64
XZR: Final = 31
INSN_SIZE: Final = 4


class Core(CpuExceptions):
    """One guest CPU: a unicorn ARM64 `max` CPU running EL1/EL0 under a model stage-2."""

    def __init__(self, *, tcg_buffer_size: int = 64 << 20, alias_window: bool = True) -> None:
        uc: Any = Uc(UC_ARCH_ARM64, UC_MODE_ARM)  # unicorn's typing lacks the ctl_* methods
        uc.ctl_set_cpu_model(A.UC_CPU_ARM64_MAX)
        uc.ctl_set_tcg_buffer_size(tcg_buffer_size)
        super().__init__(uc, Stage2View(uc, alias_window))

    # ---- stage-2 view -----------------------------------------------------------------
    def mappings(self) -> list[Mapping]:
        """The stage-2 ranges as mapped in unicorn (merged), sorted by IPA."""
        return self._view.mappings()

    def map(
        self, ipa: int, size: int, host_address: int, writable: bool = True, executable: bool = True
    ) -> None:
        """Map IPA [ipa, ipa+size) to host memory at `host_address` (page-aligned), replacing
        whatever was there (`Stage2View.map`)."""
        self._view.map(ipa, size, host_address, writable, executable)

    def unmap(self, ipa: int, size: int) -> None:
        self._view.unmap(ipa, size)

    def protect(self, ipa: int, size: int, writable: bool, executable: bool) -> None:
        """Change permissions of the mapped parts of [ipa, ipa+size)."""
        self._view.protect(ipa, size, writable, executable)

    def flush_code(self) -> None:
        """Forget all translated code (as IC IALLU): call after writing guest memory that
        may already have run (loading a new image, reusing a page) from outside the guest."""
        self._view.flush_code()

    def read_ipa(self, ipa: int, size: int) -> bytes | None:
        """`size` bytes of guest memory at `ipa` (no permission check), None if unmapped."""
        return self._view.read_ipa(ipa, size)

    # ---- running ------------------------------------------------------------------------
    def _clear_exit(self) -> None:
        self._exit = None
        self._mem_fault = None

    def run(self, max_insns: int | None = None, pc: int | None = None) -> Exit:
        """Run from the current PC until an exception EL2 would take (or the budget ends).
        `pc`, if given, is where to start: emu_start writes it to PC (as `self.pc = pc` would)."""
        self._clear_exit()  # a call, not assignments: the hooks set both during emu_start
        self._ran = True
        if pc is None:
            pc = self._rd(REG_PC)
        # `Uc.emu_start` without its wrapper: a hook's exception is kept on the instance
        uc = self.uc
        uc._hook_exception = None
        count = _U64(max_insns) if max_insns else _ZERO_C  # size_t
        emulator_enter()  # its stores to RAM are unseen by PhysMemory (its known holes)
        try:
            status = uc_emu_start_direct(self._uch, _U64(pc & MASK64), _UNTIL_C, _ZERO_C,
                                         count)
        finally:
            emulator_leave()
        if uc._hook_exception is not None:
            raise uc._hook_exception
        ex = self._exit
        if status and ex is None:  # a stage-2 fault stops with an error, and an exit
            raise UcError(status)
        if ex is None:
            return Exit(ExitKind.BUDGET)
        self._exit = None
        real_pc = self._mem_fault
        if real_pc is not None:
            # unicorn's PC inside the memory hook (and after emu_start) is sometimes stale,
            # the start of the translation block rather than the access (seen with Linux);
            # `_on_mem` found the access itself: make PC point at it.
            self._mem_fault = None
            if real_pc != self._rd(REG_PC):
                self._wr(REG_PC, real_pc)
        return ex


def mmio_read_value(esr_value: int, data: int) -> int:
    """The register value a load reporting `esr_value` (ISV = 1) gets from MMIO `data`."""
    sas = (esr_value >> ESR_ELx_SAS_SHIFT) & 3
    bits = 8 << sas
    data &= (1 << bits) - 1
    if esr_value & ESR_ELx_SSE and data >> (bits - 1):
        data -= 1 << bits
    data &= MASK64 if esr_value & ESR_ELx_SF else 0xFFFF_FFFF
    return data


def complete_mmio_read(target: Core | CpuContext, esr_value: int, data: int) -> None:
    """Finish an emulated MMIO load on a `Core` or a saved `CpuContext`: Xt := data
    (extended per SAS/SSE/SF), PC += 4. `esr_value` must have ISV set."""
    if not esr_value & ESR_ELx_ISV:
        raise ValueError(f"ESR {esr_value:#x} has no valid ISS (ISV = 0)")
    value = mmio_read_value(esr_value, data)
    srt = (esr_value >> ESR_ELx_SRT_SHIFT) & 31
    if isinstance(target, Core):
        target.set_x(srt, value)
        target.skip()
    else:
        if srt != XZR:
            target.x[srt] = value
        target.pc = (target.pc + INSN_SIZE) & MASK64
