"""The register file of a guest CPU core: EL1 contexts in and out, system registers, EL2 control.

A vCPU's registers move between a `CpuContext` (what `struct kvm_cpu_context` holds) and the
emulated CPU as KVM moves them on the run path: `load_context()` (flush), `save_context()` /
`save_raw()` (sync). EL2 software reaches the rest of the CPU through `read_sysreg` /
`write_sysreg` by encoding, and keeps a vCPU's whole emulated state across a switch with
`save_cpu_state` / `restore_cpu_state`.

What unicorn 2.1.4 does here (measured; the reasons for the code below):
* It resets to EL1 with SCR_EL3/HCR_EL2 zero. `CpuRegisters.__init__` sets what firmware would
  leave (SCR_EL3 NS|RW|HCE, HCR_EL2 RW|TSC|TWI, CPTR_EL3.EZ, CNTHCTL_EL2) and rewrites
  SCTLR_EL1: a system-register write is what makes QEMU rebuild its cached mode flags, a
  PSTATE write alone does not (an EL0 context would still run with EL1 rights).
* FP/SIMD and SVE never trap: CPACR_EL1.FPEN/ZEN and CPTR_ELx.TFP are ignored, so
  `save_context` always reads the vector registers (no lazy FP switch is possible).
* EL1 system registers change only by MSR (a UC_HOOK_INSN MSR hook marks them dirty), by
  exception entry done by the core, and PAR_EL1 by AT: `save_context` rereads them only then.
* Register access through the Python binding costs ~2 us each; contexts move through
  preallocated `uc_reg_read_batch` / `uc_reg_write_batch` arrays instead.
* PSTATE, FPCR and FPSR read as 32-bit values: a read fills only the low half of its u64
  slot, so the slot is cleared first.
* The live stack pointer is unicorn's SP; its SP_EL0/SP_EL1 register of the bank PSTATE selects
  is stale (QEMU banks only on its own mode changes, ERET included, not on register writes):
  contexts and exception entry bank SP by hand.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

from unicorn import arm64_const as A
from unicorn.unicorn_const import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH, UC_HOOK_INSN
from unicorn.unicorn_py3.arch.types import uc_hook_h
from unicorn.unicorn_py3.unicorn import UcContext, UcError, uclib

from pkvm.machine.uc_cp import CpReg

# unicorn's entry points of the run path, called without the binding's argument conversion:
# `uclib`'s functions carry `argtypes`, which ctypes checks and converts on every call (~0.7 us
# for `uc_reg_read`); these are the same functions of the same loaded library (one `dlopen`
# handle) with none, so each argument must already be what C takes: a ctypes object, a
# pointer (`byref`, an array) or an int that fits a C int (a register ID, a count); 64-bit
# values go in as `ctypes.c_uint64` (~0.25 us a call). Each returns the `uc_err` (C int).
# The names of this module the run path reads are `Final`: compiled code reads such a name
# from a C variable (or as a constant), any other by a lookup in the module's dictionary.
_uc_direct: Final = ctypes.CDLL(uclib._name)
uc_reg_read_direct: Final = _uc_direct.uc_reg_read
uc_reg_write_direct: Final = _uc_direct.uc_reg_write
uc_reg_read_batch_direct: Final = _uc_direct.uc_reg_read_batch
uc_reg_write_batch_direct: Final = _uc_direct.uc_reg_write_batch
uc_emu_start_direct: Final = _uc_direct.uc_emu_start

# uc_cb_insn_sys_t: (uc, reg, const uc_arm64_cp_reg *, user_data) -> skip the instruction
_HOOK_INSN_SYS_CFUNC: Final = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_void_p, ctypes.c_int,
                                        ctypes.c_void_p, ctypes.c_void_p)

MASK64: Final = 0xFFFF_FFFF_FFFF_FFFF

# PSTATE bits.
PSR_MODE_EL0t: Final = 0x0
PSR_MODE_EL1t: Final = 0x4
PSR_MODE_EL1h: Final = 0x5
PSR_MODE_MASK: Final = 0xF
PSR_F_BIT: Final = 1 << 6
PSR_I_BIT: Final = 1 << 7
PSR_A_BIT: Final = 1 << 8
PSR_D_BIT: Final = 1 << 9
PSR_DAIF: Final = PSR_D_BIT | PSR_A_BIT | PSR_I_BIT | PSR_F_BIT
PSR_SSBS_BIT: Final = 1 << 12
PSR_IL_BIT: Final = 1 << 20
PSR_PAN_BIT: Final = 1 << 22
PSR_NZCV: Final = 0xF << 28
PSTATE_RESET: Final = PSR_DAIF | PSR_MODE_EL1h  # 0x3C5, as kvm_reset_vcpu
PSR_EL_SHIFT: Final = 2  # PSTATE.EL, bits [3:2]
MPIDR_RES1: Final = 1 << 31


def pstate_el(pstate: int) -> int:
    """The exception level PSTATE says the CPU is at."""
    return (pstate >> PSR_EL_SHIFT) & 3

# SCTLR_EL1 bits used here.
SCTLR_ELx_M: Final = 1 << 0
SCTLR_ELx_A: Final = 1 << 1
SCTLR_EL1_SPAN: Final = 1 << 23
SCTLR_EL1_nTWI: Final = 1 << 16
SCTLR_ELx_WXN: Final = 1 << 19
SCTLR_EL1_DSSBS: Final = 1 << 44
SCTLR_EL1_RESET: Final = 0x00C50078  # KVM's reset value (MMU, caches off; RES1 bits)

SysRegEnc = tuple[int, int, int, int, int]  # (op0, op1, CRn, CRm, op2)
CpuState: TypeAlias = UcContext  # the emulated CPU's whole state, opaque (`save_cpu_state`)

# EL1 system registers of a vCPU context: name -> encoding. MPIDR_EL1 is the virtual one
# (VMPIDR_EL2), which EL1 reads as MPIDR_EL1.
SYS_REGS: Final[dict[str, SysRegEnc]] = {
    "SCTLR_EL1": (3, 0, 1, 0, 0),
    "ACTLR_EL1": (3, 0, 1, 0, 1),
    "CPACR_EL1": (3, 0, 1, 0, 2),
    "ZCR_EL1": (3, 0, 1, 2, 0),
    "TTBR0_EL1": (3, 0, 2, 0, 0),
    "TTBR1_EL1": (3, 0, 2, 0, 1),
    "TCR_EL1": (3, 0, 2, 0, 2),
    "AFSR0_EL1": (3, 0, 5, 1, 0),
    "AFSR1_EL1": (3, 0, 5, 1, 1),
    "ESR_EL1": (3, 0, 5, 2, 0),
    "FAR_EL1": (3, 0, 6, 0, 0),
    "PAR_EL1": (3, 0, 7, 4, 0),
    "MAIR_EL1": (3, 0, 10, 2, 0),
    "AMAIR_EL1": (3, 0, 10, 3, 0),
    "VBAR_EL1": (3, 0, 12, 0, 0),
    "CONTEXTIDR_EL1": (3, 0, 13, 0, 1),
    "TPIDR_EL1": (3, 0, 13, 0, 4),
    "CNTKCTL_EL1": (3, 0, 14, 1, 0),
    "CSSELR_EL1": (3, 2, 0, 0, 0),
    "TPIDR_EL0": (3, 3, 13, 0, 2),
    "TPIDRRO_EL0": (3, 3, 13, 0, 3),
    "MDSCR_EL1": (2, 0, 0, 2, 2),
    "MPIDR_EL1": (3, 4, 0, 0, 5),  # VMPIDR_EL2
}
SYS_SPSR_EL1: Final = (3, 0, 4, 0, 0)
_EL1_ENCS: Final = frozenset([*SYS_REGS.values(), SYS_SPSR_EL1])

# EL2 and EL3 registers the guest never sees, by encoding (`asm/sysreg.h` names), and the bits
# of them the model sets: what firmware leaves for EL2 software, and what EL2 configures.
SYS_SCR_EL3: Final = (3, 6, 1, 1, 0)
SYS_CPTR_EL3: Final = (3, 6, 1, 1, 2)
SYS_HCR_EL2: Final = (3, 4, 1, 1, 0)
SYS_CPTR_EL2: Final = (3, 4, 1, 1, 2)
SYS_CNTHCTL_EL2: Final = (3, 4, 14, 1, 0)
SCR_EL3_NS: Final = 1 << 0
SCR_EL3_RES1: Final = 0b11 << 4
SCR_EL3_HCE: Final = 1 << 8
SCR_EL3_RW: Final = 1 << 10
SCR_EL3_APK: Final = 1 << 16
SCR_EL3_API: Final = 1 << 17
CPTR_EL3_EZ: Final = 1 << 8
HCR_FMO: Final = 1 << 3
HCR_IMO: Final = 1 << 4
HCR_VI: Final = 1 << 7
HCR_TID3: Final = 1 << 18
HCR_TWI: Final = 1 << 13
HCR_TWE: Final = 1 << 14
HCR_TSC: Final = 1 << 19
HCR_RW: Final = 1 << 31
HCR_APK: Final = 1 << 40
HCR_API: Final = 1 << 41
CPTR_EL2_RES1: Final = 0x32FF  # nVHE layout, RES1 bits, TZ = TFP = 0
CNTHCTL_EL1PCTEN: Final = 1 << 0
CNTHCTL_EL1PCEN: Final = 1 << 1

# Context registers moved in one batch, in this order.
GPR_IDS: Final = [A.UC_ARM64_REG_X0 + i for i in range(29)] + [A.UC_ARM64_REG_X29, A.UC_ARM64_REG_X30]
_CORE_IDS: Final = GPR_IDS + [
    A.UC_ARM64_REG_SP,
    A.UC_ARM64_REG_SP_EL0,
    A.UC_ARM64_REG_SP_EL1,
    A.UC_ARM64_REG_PC,
    A.UC_ARM64_REG_PSTATE,
    A.UC_ARM64_REG_ELR_EL1,
    A.UC_ARM64_REG_FPCR,
    A.UC_ARM64_REG_FPSR,
]
_I_SP: Final = 31
_I_SP_EL0: Final = 32
_I_SP_EL1: Final = 33
_I_PC: Final = 34
_I_PSTATE: Final = 35
_I_ELR: Final = 36
_I_FPCR: Final = 37
_I_FPSR: Final = 38
_Q_IDS = [A.UC_ARM64_REG_Q0 + i for i in range(32)]
# unicorn's IDs of the registers the run path moves one by one
REG_PC: Final = A.UC_ARM64_REG_PC
REG_SP: Final = A.UC_ARM64_REG_SP
REG_PSTATE: Final = A.UC_ARM64_REG_PSTATE
REG_CP_REG: Final = A.UC_ARM64_REG_CP_REG

# The context as bytes (`save_raw` / `load_raw`): `struct kvm_cpu_context` from `regs` on, u64
# words x0..x30, sp_el0, pc, pstate, sp_el1, elr_el1, spsr_el1, fpsr, fpcr, then V0..V31 as 16
# little-endian bytes each (low half first). Each register moves straight to or from its slot
# of one buffer in one batch; three scratch slots after the context take the live SP and the
# two banked ones, which the slots sp_el0/sp_el1 get from by PSTATE.
RAW_WORDS: Final = 31 + 8 + 64
RAW_SIZE: Final = 8 * RAW_WORDS
_W_SP_EL0: Final = 31
_W_PC: Final = 32
_W_PSTATE: Final = 33
_W_SP_EL1: Final = 34
_W_ELR: Final = 35
_W_SPSR: Final = 36
_W_FPSR: Final = 37
_W_FPCR: Final = 38
_W_V: Final = 39
_W_LIVE_SP: Final = RAW_WORDS
_W_BANK_SP_EL0: Final = RAW_WORDS + 1
_W_BANK_SP_EL1: Final = RAW_WORDS + 2
# Register -> word slot, in the order `load_context` writes them (SP before its banks, PSTATE
# after them, as the per-register path does).
_RAW_SLOTS = [*zip(GPR_IDS, range(31)), (A.UC_ARM64_REG_SP, _W_LIVE_SP),
              (A.UC_ARM64_REG_SP_EL0, _W_BANK_SP_EL0), (A.UC_ARM64_REG_SP_EL1, _W_BANK_SP_EL1),
              (A.UC_ARM64_REG_PC, _W_PC), (A.UC_ARM64_REG_PSTATE, _W_PSTATE),
              (A.UC_ARM64_REG_ELR_EL1, _W_ELR), (A.UC_ARM64_REG_FPCR, _W_FPCR),
              (A.UC_ARM64_REG_FPSR, _W_FPSR), *((q, _W_V + 2 * i) for i, q in enumerate(_Q_IDS))]


@dataclass
class CpuContext:
    """A vCPU's EL1 register state, as `struct kvm_cpu_context` holds it."""

    x: list[int] = field(default_factory=lambda: [0] * 31)
    sp_el0: int = 0
    sp_el1: int = 0
    pc: int = 0
    pstate: int = PSTATE_RESET
    elr_el1: int = 0
    spsr_el1: int = 0
    v: list[int] = field(default_factory=lambda: [0] * 32)  # 128-bit Q registers
    fpcr: int = 0
    fpsr: int = 0
    sys_regs: dict[str, int] = field(default_factory=dict)  # names of SYS_REGS; missing = 0

    @classmethod
    def reset(cls, pc: int, x0: int = 0, mpidr: int = 0) -> CpuContext:
        """The state `kvm_reset_vcpu` gives: GPRs zero, PSTATE 0x3C5, MMU off, PC, x0."""
        ctx = cls(pc=pc)
        ctx.x[0] = x0
        ctx.sys_regs["SCTLR_EL1"] = SCTLR_EL1_RESET
        ctx.sys_regs["MPIDR_EL1"] = MPIDR_RES1 | mpidr
        return ctx

    def copy(self) -> CpuContext:
        return CpuContext(
            x=list(self.x),
            sp_el0=self.sp_el0,
            sp_el1=self.sp_el1,
            pc=self.pc,
            pstate=self.pstate,
            elr_el1=self.elr_el1,
            spsr_el1=self.spsr_el1,
            v=list(self.v),
            fpcr=self.fpcr,
            fpsr=self.fpsr,
            sys_regs=dict(self.sys_regs),
        )


class _Batch:
    """Preallocated arrays for one `uc_reg_{read,write}_batch` call."""

    def __init__(
        self,
        uch: Any,
        ids: list[int],
        width: int = 8,
        cp: list[tuple[int, int, int, int, int]] | None = None,
    ) -> None:
        n = len(ids)
        self.uch, self.n = uch, n
        self.ids = (ctypes.c_int * n)(*ids)
        self.width = width
        # System registers (`cp` given) move as {encoding, value} structures, others as words.
        self.cps: ctypes.Array[CpReg] | None = None
        self.vals = (ctypes.c_uint64 * (n * width // 8))()
        if cp is not None:
            cps = self.cps = (CpReg * n)()
            for i, (op0, op1, crn, crm, op2) in enumerate(cp):
                c = cps[i]
                c.op0, c.op1, c.crn, c.crm, c.op2 = op0, op1, crn, crm, op2
            self.ptrs = (ctypes.c_void_p * n)(*[ctypes.addressof(c) for c in cps])
        else:
            base = ctypes.addressof(self.vals)
            self.ptrs = (ctypes.c_void_p * n)(*[base + width * i for i in range(n)])

    def read(self) -> list[int]:
        _check(uc_reg_read_batch_direct(self.uch, self.ids, self.ptrs, self.n))
        if self.cps is not None:
            return [c.val for c in self.cps]
        raw = list(self.vals)
        if self.width == 16:
            return [raw[2 * i] | raw[2 * i + 1] << 64 for i in range(self.n)]
        return raw

    def write(self, values: list[int]) -> None:
        if self.cps is not None:
            for c, v in zip(self.cps, values):
                c.val = v & MASK64
        elif self.width == 16:
            flat: list[Any] = []
            for v in values:
                flat += (v & MASK64, (v >> 64) & MASK64)
            self.vals[:] = flat
        else:
            self.vals[:] = [v & MASK64 for v in values]
        _check(uc_reg_write_batch_direct(self.uch, self.ids, self.ptrs, self.n))


def _check(status: int) -> None:
    if status:
        raise UcError(status)


class _RawBatch:
    """One buffer holding the context as bytes (`RAW_SIZE`) and the scratch slots, with the
    preallocated arrays of a batch that moves every context register to or from its slot; a
    read also reads PAR_EL1 (which AT changes without an MSR) into `par`."""

    def __init__(self, uch: Any) -> None:
        self.uch = uch
        self.buf = (ctypes.c_uint64 * (RAW_WORDS + 3))()
        self.addr = ctypes.addressof(self.buf)
        # the context's bytes of the buffer, as a view (`bytes(view)` copies them out without
        # a foreign call, which `ctypes.string_at` makes)
        self.view = memoryview(self.buf).cast("B")[:RAW_SIZE]
        self.par = CpReg()
        p = SYS_REGS["PAR_EL1"]
        self.par.op0, self.par.op1, self.par.crn, self.par.crm, self.par.op2 = p
        ids = [rid for rid, _ in _RAW_SLOTS]
        ptrs = [self.addr + 8 * slot for _, slot in _RAW_SLOTS]
        n = len(ids)
        self.n_write = n
        self.ids = (ctypes.c_int * (n + 1))(*ids, A.UC_ARM64_REG_CP_REG)
        self.ptrs = (ctypes.c_void_p * (n + 1))(*ptrs, ctypes.addressof(self.par))

    # (its read, the registers and PAR_EL1 in one batch, is written out in `save_raw`)
    def write(self) -> None:
        if status := uc_reg_write_batch_direct(self.uch, self.ids, self.ptrs, self.n_write):
            raise UcError(status)


class CpuRegisters:
    """The registers of one emulated CPU (`uc`): general, vector, EL1 system registers (with
    a shadow of the last values moved, so that an unchanged context moves cheaply) and the
    EL2/EL3 registers EL2 software controls."""

    def __init__(self, uc: Any) -> None:
        self.uc: Any = uc  # unicorn's typing lacks the ctl_* methods
        self._uch = uc._uch
        self._r64 = ctypes.c_uint64()
        self._r64p = ctypes.byref(self._r64)
        self._cp = CpReg()
        self._cpp = ctypes.byref(self._cp)
        self._core = _Batch(self._uch, _CORE_IDS)
        self._q = _Batch(self._uch, _Q_IDS, width=16)
        self._raw = _RawBatch(self._uch)
        names = list(SYS_REGS)
        self._sys_names = names
        self._sys = _Batch(
            self._uch,
            [A.UC_ARM64_REG_CP_REG] * (len(names) + 1),
            cp=[SYS_REGS[n] for n in names] + [SYS_SPSR_EL1],
        )
        self._cpw(SYS_SCR_EL3, SCR_EL3_NS | SCR_EL3_RES1 | SCR_EL3_HCE | SCR_EL3_RW)
        self._cpw(SYS_CPTR_EL3, CPTR_EL3_EZ)
        self._cpw(SYS_HCR_EL2, HCR_RW | HCR_TSC | HCR_TWI | HCR_TWE)
        self._cpw(SYS_CPTR_EL2, CPTR_EL2_RES1)
        self._cpw(SYS_CNTHCTL_EL2, CNTHCTL_EL1PCTEN | CNTHCTL_EL1PCEN)
        uc.reg_write(A.UC_ARM64_REG_PSTATE, PSTATE_RESET)
        self._cpw(SYS_REGS["SCTLR_EL1"], SCTLR_EL1_RESET)  # rebuilds the mode flags
        self._sys_dirty = True  # the system registers may differ from _shadow_sys
        self._ran = False  # the guest ran since the last load/save
        self._shadow_sys: list[int] = []
        self._par_index = names.index("PAR_EL1")
        # unicorn's C callback straight into `_on_msr`, without the binding's wrappers (which
        # build a tuple of the register on each call): ~0.5 us per MSR instead of ~1.8, and
        # Linux runs ~165,000 of them while it boots (DAIF, mostly). Kept alive here.
        self._msr_cb = _HOOK_INSN_SYS_CFUNC(self._on_msr)
        status = uclib.uc_hook_add(self._uch, ctypes.byref(uc_hook_h()), UC_HOOK_INSN,
                                   self._msr_cb, ctypes.c_void_p(0), ctypes.c_uint64(1),
                                   ctypes.c_uint64(0), ctypes.c_int(A.UC_ARM64_INS_MSR))
        if status:
            raise UcError(status)

    # ---- system registers -------------------------------------------------------------
    # Registers move through preallocated ctypes buffers: the binding's reg_read costs ~2 us.
    def _rd(self, regid: int) -> int:
        if status := uc_reg_read_direct(self._uch, regid, self._r64p):
            raise UcError(status)
        return self._r64.value

    def _wr(self, regid: int, value: int) -> None:
        self._r64.value = value & MASK64
        if status := uc_reg_write_direct(self._uch, regid, self._r64p):
            raise UcError(status)

    def _cpw(self, enc: tuple[int, int, int, int, int], value: int) -> None:
        c = self._cp
        c.op0, c.op1, c.crn, c.crm, c.op2 = enc
        c.val = value & MASK64
        if status := uc_reg_write_direct(self._uch, REG_CP_REG, self._cpp):
            raise UcError(status)

    def _cpr(self, enc: tuple[int, int, int, int, int]) -> int:
        c = self._cp
        c.op0, c.op1, c.crn, c.crm, c.op2 = enc
        if status := uc_reg_read_direct(self._uch, REG_CP_REG, self._cpp):
            raise UcError(status)
        return int(c.val)

    # ---- EL2 control: what EL2 software does to the CPU it runs a guest on ------------------
    def read_sysreg(self, enc: SysRegEnc) -> int:
        """Any system register of the CPU by encoding (op0, op1, CRn, CRm, op2), as EL2 reads
        its own (`read_sysreg_s`): HCR_EL2, CNTHCTL_EL2, or what firmware left in SCR_EL3."""
        return self._cpr(enc)

    def write_sysreg(self, enc: SysRegEnc, value: int) -> None:
        """Write a system register by encoding (`write_sysreg_s`). A write to one of the
        guest's EL1 registers makes the next context save read them all again."""
        self._cpw(enc, value)
        if enc in _EL1_ENCS:
            self._sys_dirty = True

    def invalidate_sys_shadow(self) -> None:
        """Forget what the core believes the guest's EL1 system registers hold: the next load
        writes them all and the next save reads them all. For when they changed in a way the
        core does not see (an interrupt the CPU took wrote SPSR_EL1, ESR_EL1 and ELR_EL1)."""
        self._sys_dirty = True

    def save_cpu_state(self) -> CpuState:
        """The emulated CPU's whole state (registers, exclusive monitor, mode flags), for one
        core shared by several vCPUs: a vCPU leaving it keeps this and comes back with it."""
        state: CpuState = self.uc.context_save()
        return state

    def update_cpu_state(self, state: CpuState) -> None:
        """Refresh a state `save_cpu_state` returned with the CPU's current one."""
        self.uc.context_update(state)

    def restore_cpu_state(self, state: CpuState) -> None:
        """Make `state` the CPU's state again (after another vCPU ran on this core)."""
        self.uc.context_restore(state)
        # QEMU keeps "a virtual IRQ is asserted" outside the saved state (the CPU's interrupt
        # request): rewriting HCR_EL2 makes it follow the restored HCR_EL2.VI again.
        self._cpw(SYS_HCR_EL2, self._cpr(SYS_HCR_EL2))
        self._sys_dirty = True  # the shadow of the system registers is the other vCPU's

    def flush_tlb(self) -> None:
        """Invalidate every cached translation (the emulator's TLB knows no VMID or vCPU)."""
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)

    def sys_reg(self, name: str) -> int:
        """Read an EL1 system register of `SYS_REGS` (or SPSR_EL1)."""
        return self._cpr(SYS_SPSR_EL1 if name == "SPSR_EL1" else SYS_REGS[name])

    def _rebuild_flags(self) -> None:
        # A system-register write makes QEMU recompute its cached EL/MMU flags.
        sctlr = SYS_REGS["SCTLR_EL1"]
        self._cpw(sctlr, self._cpr(sctlr))

    # ---- general registers ------------------------------------------------------------
    @property
    def pc(self) -> int:
        return self._rd(REG_PC)

    @pc.setter
    def pc(self, value: int) -> None:
        self._wr(REG_PC, value)

    @property
    def pstate(self) -> int:
        return self._rd(REG_PSTATE)

    @property
    def irqs_masked(self) -> bool:
        """PSTATE.I: an IRQ would not be taken now."""
        return bool(self.pstate & PSR_I_BIT)

    def x(self, n: int) -> int:
        """Xn (n = 31 reads as zero, XZR)."""
        if n == 31:
            return 0
        return self._rd(GPR_IDS[n])

    def set_x(self, n: int, value: int) -> None:
        if n != 31:
            self._wr(GPR_IDS[n], value)

    def _x_or_sp(self, n: int) -> int:
        return self._rd(REG_SP if n == 31 else GPR_IDS[n])

    def skip(self) -> None:
        """Advance PC past the current instruction (EL2 emulated it)."""
        self._wr(REG_PC, self._rd(REG_PC) + 4)

    # ---- context ----------------------------------------------------------------------
    def load_context(self, ctx: CpuContext) -> None:
        """Make `ctx` the CPU's state (flush).

        System registers equal to what the core already holds are not rewritten: the core
        knows when the guest changed one (an MSR hook, exception entry, AT via PAR_EL1).
        """
        el1h = ctx.pstate & PSR_MODE_MASK == PSR_MODE_EL1h
        sp = ctx.sp_el1 if el1h else ctx.sp_el0
        self._core.write(
            list(ctx.x)
            + [sp, ctx.sp_el0, ctx.sp_el1, ctx.pc, ctx.pstate, ctx.elr_el1, ctx.fpcr, ctx.fpsr]
        )
        self._q.write(list(ctx.v))
        regs = ctx.sys_regs
        self._load_sys([regs.get(n, 0) for n in self._sys_names] + [ctx.spsr_el1])

    def _load_sys(self, sysvals: list[int]) -> None:
        """The EL1 system registers (`sys_names`, then SPSR_EL1) of a context being loaded."""
        if self._sys_dirty or sysvals != self._shadow_sys:
            self._sys.write(sysvals)
            self._shadow_sys = sysvals
            self._sys_dirty = False
        elif self._ran:  # an AT since the last sync may have changed PAR_EL1
            self._cpw(SYS_REGS["PAR_EL1"], sysvals[self._par_index])
        self._ran = False
        self._rebuild_flags()

    def save_context(self) -> CpuContext:
        """The CPU's state (sync), register by register."""
        vals = self._core.vals  # 32-bit registers fill only the low half of their word
        vals[_I_PSTATE] = vals[_I_FPCR] = vals[_I_FPSR] = 0
        r = self._core.read()
        pstate = r[_I_PSTATE]
        el1h = pstate & PSR_MODE_MASK == PSR_MODE_EL1h
        sysvals = self._saved_sys(None)
        return CpuContext(
            x=r[:31],
            sp_el0=r[_I_SP_EL0] if el1h else r[_I_SP],
            pc=r[_I_PC],
            pstate=pstate,
            sp_el1=r[_I_SP] if el1h else r[_I_SP_EL1],
            elr_el1=r[_I_ELR],
            spsr_el1=sysvals[-1],
            fpsr=r[_I_FPSR],
            fpcr=r[_I_FPCR],
            v=self._q.read(),
            sys_regs=dict(zip(self._sys_names, sysvals)),
        )

    def save_raw(self) -> tuple[bytes, list[int]]:
        """The CPU's state (sync) as bytes, with no per-register objects: the context in the
        `struct kvm_cpu_context` layout of `RAW_SIZE` bytes (see `RAW_WORDS`), and the values
        of `sys_names` in that order. The same state `save_context` gives (tested)."""
        raw = self._raw
        buf = raw.buf
        buf[_W_PSTATE] = buf[_W_FPSR] = buf[_W_FPCR] = 0  # unicorn writes their low half only
        if status := uc_reg_read_batch_direct(raw.uch, raw.ids, raw.ptrs, raw.n_write + 1):
            raise UcError(status)  # the raw batch's read: every register and PAR_EL1
        if buf[_W_PSTATE] & PSR_MODE_MASK == PSR_MODE_EL1h:
            buf[_W_SP_EL0], buf[_W_SP_EL1] = buf[_W_BANK_SP_EL0], buf[_W_LIVE_SP]
        else:
            buf[_W_SP_EL0], buf[_W_SP_EL1] = buf[_W_LIVE_SP], buf[_W_BANK_SP_EL1]
        sysvals = self._saved_sys(raw.par.val)
        buf[_W_SPSR] = sysvals[-1]
        return bytes(raw.view), sysvals[:-1]

    def _saved_sys(self, par: int | None) -> list[int]:
        """The EL1 system registers at a save (`sys_names`, then SPSR_EL1): read again when an
        MSR ran since the last move, else the shadow, with PAR_EL1 updated when the CPU ran
        (only AT, a SYS instruction that is not hooked, changes it silently): `par` if the
        caller read it already, else read now."""
        if self._sys_dirty:
            self._shadow_sys = self._sys.read()
            self._sys_dirty = False
        elif self._ran:
            self._shadow_sys[self._par_index] = (
                self._cpr(SYS_REGS["PAR_EL1"]) if par is None else par)
        self._ran = False
        return self._shadow_sys

    def load_raw(self, data: bytes, sysvals: list[int]) -> None:
        """Make the context `save_raw` returns the CPU's state (flush): `data` in its layout,
        `sysvals` the values of `sys_names`. The same as `load_context` (tested)."""
        raw = self._raw
        buf = raw.buf
        raw.view[:] = data[:RAW_SIZE]
        el1h = buf[_W_PSTATE] & PSR_MODE_MASK == PSR_MODE_EL1h
        buf[_W_LIVE_SP] = buf[_W_SP_EL1] if el1h else buf[_W_SP_EL0]
        buf[_W_BANK_SP_EL0], buf[_W_BANK_SP_EL1] = buf[_W_SP_EL0], buf[_W_SP_EL1]
        raw.write()
        self._load_sys([*sysvals, buf[_W_SPSR]])

    @property
    def sys_names(self) -> list[str]:
        """The system registers `save_raw` returns, in its order."""
        return self._sys_names

    def _on_msr(self, _uch: object, reg: int, cp_reg: object, _data: object) -> int:
        self._sys_dirty = True  # the guest wrote a system register: re-read at save
        return 0  # let unicorn perform (or refuse) the write
