"""Exceptions of a guest CPU core: the exits to EL2, and what the guest takes at EL1 itself.

An exception EL2 would take stops the run with an `Exit` (ESR_EL2, FAR_EL2, HPFAR_EL2 as the
architecture reports them); everything else the guest raises is delivered to its EL1 vectors
here, as the architecture does (ESR_EL1, FAR_EL1, ELR_EL1, SPSR_EL1, SP banking, PSTATE EL1h
with DAIF masked, PAN per SCTLR_EL1.SPAN, VBAR_EL1 + 0x000/0x200/0x400 by source).

What unicorn 2.1.4 does here (measured; the reasons for the code below):
* It delivers no exception itself. Every one reaches UC_HOOK_INTR as a bare number, without
  the syndrome: 1 UDEF (also WFI trapped by TWI, PC on it), 2 SVC (PC past), 3 prefetch abort
  and 4 data abort (stage-1 faults, alignment, a table walk into unmapped IPA; PC on the
  instruction), 7 BRK (PC on it), 11 HVC (PC past), 12 trap to EL2 (SMC under TSC, PC on it).
  ESR/FAR are rebuilt from the instruction (`pkvm.machine.decode`) and a Python walk of the
  guest's stage-1 tables (`pkvm.machine.stage1`); writing PC inside the hook resumes at the
  vector in the same `emu_start`, so delivered exceptions cost no exit and count against the
  budget.
* UC_HOOK_MEM_*_UNMAPPED / *_PROT report the PHYSICAL address (the IPA) when the guest MMU is
  on (the VA when it is off, which is the same); PC is normally the faulting instruction
  (rarely stale: `_on_mem` checks it against the access, and the run loop puts PC on the
  access it found). HPFAR comes from that address; FAR (the VA) from decoding the
  instruction's address computation; when the instruction cannot be decoded FAR is 0 with FnV
  set. A stage-1 walk that reads unmapped IPA does not reach the memory hooks: QEMU turns it
  into an abort (intno 3/4) that the walk here recognises and reports to EL2 as a stage-2
  fault with S1PTW.
* FP/SIMD and SVE never trap: CPACR_EL1.FPEN/ZEN and CPTR_ELx.TFP are ignored, so EC 0x07 /
  0x19 are never raised (the delivery code is there for a CPU model that traps).
* WFE is a no-op (QEMU 5 ignores HCR_EL2.TWE): architecturally a WFE may complete at once.
"""

from __future__ import annotations

import ctypes
import enum
from dataclasses import dataclass
from typing import Any, Final

from unicorn import arm64_const as A
from unicorn.unicorn_const import (
    UC_HOOK_INTR,
    UC_HOOK_MEM_INVALID,
    UC_MEM_FETCH_PROT,
    UC_MEM_FETCH_UNMAPPED,
    UC_MEM_READ_UNMAPPED,
    UC_MEM_WRITE_PROT,
    UC_MEM_WRITE_UNMAPPED,
)
from unicorn.unicorn_py3.arch.types import uc_hook_h
from unicorn.unicorn_py3.unicorn import HOOK_MEM_INVALID_CFUNC, Uc, UcError, uclib

from pkvm.machine import decode
from pkvm.machine.context import (
    HCR_TID3,
    MASK64,
    PSR_DAIF,
    PSR_IL_BIT,
    PSR_MODE_MASK,
    PSR_NZCV,
    PSR_PAN_BIT,
    PSR_SSBS_BIT,
    REG_PC,
    SCTLR_EL1_DSSBS,
    SCTLR_EL1_SPAN,
    SYS_HCR_EL2,
    SYS_REGS,
    SYS_SPSR_EL1,
    CpuRegisters,
    PSR_MODE_EL1h,
    PSR_MODE_EL1t,
    SCTLR_EL1_nTWI,
    SCTLR_ELx_M,
    pstate_el,
)
from pkvm.machine.esr import (
    EC,
    FSC,
    ESR_ELx_ISV,
    ESR_ELx_SAS_SHIFT,
    ESR_ELx_SRT_SHIFT,
    ESR_ELx_WNR,
    abort_iss,
    esr,
    esr_ec,
    hpfar_from_ipa,
    ipa_from_hpfar,
    sys64_iss,
)
from pkvm.machine.memory import PAGE_SHIFT, PAGE_SIZE
from pkvm.machine.stage1 import OA_MASK, Walk, walk_stage1
from pkvm.machine.stage2_view import Stage2View

PAGE_OFFSET_MASK: Final = PAGE_SIZE - 1
_U32_AT: Final = ctypes.c_uint32.from_address  # the u32 at a host address
CPACR_EL1_ZEN_SHIFT: Final = 16  # 0b01: EL0 traps, 0b11: nothing traps
CPACR_EL1_FPEN_SHIFT: Final = 20
_DECODE_CACHE_MAX: Final = 65536  # decoded instruction words kept before the cache starts afresh
_BLOCK_SCAN_INSNS: Final = 64  # how far a stale PC is searched for the faulting access
SCTLR: Final = SYS_REGS["SCTLR_EL1"]

# __kvm_vcpu_run exit codes (asm/kvm_asm.h).
ARM_EXCEPTION_IRQ: Final = 0
ARM_EXCEPTION_TRAP: Final = 2

# ISS CV = 1, COND = 0b1110 (always): what a trapped AArch64 WFx / FP access reports.
ISS_CV_COND_AL: Final = 1 << 24 | 0xE << 20

# Vector offsets from VBAR_EL1.
VECTOR_CUR_SP0: Final = 0x000
VECTOR_CUR_SPX: Final = 0x200
VECTOR_LOWER_A64: Final = 0x400
VECTOR_SYNC: Final = 0x000
VECTOR_IRQ: Final = 0x080
VECTOR_FIQ: Final = 0x100
VECTOR_SERROR: Final = 0x180

# unicorn interrupt numbers (QEMU's EXCP_*).
EXCP_UDEF: Final = 1
EXCP_SWI: Final = 2
EXCP_PREFETCH_ABORT: Final = 3
EXCP_DATA_ABORT: Final = 4
EXCP_BKPT: Final = 7
EXCP_HVC: Final = 11
EXCP_HYP_TRAP: Final = 12


class ExitKind(enum.Enum):
    HVC = "hvc"
    SMC = "smc"
    WFX = "wfx"
    DABT = "dabt"
    IABT = "iabt"
    SYSREG = "sysreg"
    BUDGET = "budget"


@dataclass(slots=True)
class Exit:
    """An exception to EL2 as hardware reports it (ESR_EL2, FAR_EL2, HPFAR_EL2)."""

    kind: ExitKind
    esr: int = 0
    far: int = 0
    hpfar: int = 0
    imm: int = 0  # HVC/SMC imm16

    @property
    def code(self) -> int:
        """`__kvm_vcpu_run`'s exit code: ARM_EXCEPTION_IRQ for a budget exit, else TRAP."""
        return ARM_EXCEPTION_IRQ if self.kind is ExitKind.BUDGET else ARM_EXCEPTION_TRAP

    @property
    def ec(self) -> int:
        return esr_ec(self.esr)

    @property
    def ipa(self) -> int:
        """Faulting IPA (HPFAR page + FAR page offset) of a stage-2 abort."""
        return ipa_from_hpfar(self.hpfar) | (self.far & PAGE_OFFSET_MASK)

    @property
    def isv(self) -> bool:
        return bool(self.esr & ESR_ELx_ISV)

    @property
    def write(self) -> bool:
        return bool(self.esr & ESR_ELx_WNR)

    @property
    def srt(self) -> int:
        return (self.esr >> ESR_ELx_SRT_SHIFT) & 31

    @property
    def access_size(self) -> int:
        return 1 << ((self.esr >> ESR_ELx_SAS_SHIFT) & 3)

    def __repr__(self) -> str:
        return (
            f"Exit({self.kind.value}, esr={self.esr:#x}, far={self.far:#x}, "
            f"hpfar={self.hpfar:#x}, imm={self.imm:#x})"
        )


_WRITES: Final = frozenset({UC_MEM_WRITE_UNMAPPED, UC_MEM_WRITE_PROT})
_FETCH_FAULTS: Final = (UC_MEM_FETCH_UNMAPPED, UC_MEM_FETCH_PROT)
_UNMAPPED: Final = frozenset({UC_MEM_READ_UNMAPPED, UC_MEM_WRITE_UNMAPPED, UC_MEM_FETCH_UNMAPPED})


def _abort_fsc(access: int) -> int:
    """The level-3 FSC of a stage-2 fault unicorn reports as `access`."""
    return (FSC.FAULT if access in _UNMAPPED else FSC.PERM) + 3


def _far(va: int, ipa: int) -> int:
    """The faulting VA of an access starting at `va` that faulted at `ipa`: the page offset
    is the IPA's, in the page of `va` or the next one (an access crossing a page)."""
    far = (va & ~PAGE_OFFSET_MASK) | (ipa & PAGE_OFFSET_MASK)
    return far + PAGE_SIZE if far < va else far


class CpuExceptions(CpuRegisters):
    """A CPU's exception model: the unicorn hooks that see every exception and fault, the
    syndromes rebuilt for them, the exits to EL2 and the entries to EL1 (also injected)."""

    def __init__(self, uc: Any, view: Stage2View) -> None:
        super().__init__(uc)
        self._view = view
        self._decoded: dict[int, decode.MemAccess | None] = {}
        self._esrs: dict[int, int] = {}  # (insn << 5 | unicorn access kind) -> ESR_EL2
        self._exit: Exit | None = None
        # The PC of the access a stage-2 data abort came from (unicorn's may be stale).
        self._mem_fault: int | None = None
        self._sctlr_index = self._sys_names.index("SCTLR_EL1")
        uc.hook_add(UC_HOOK_INTR, self._on_intr)
        # The stage-2 fault hook is unicorn's C callback straight into `_mem_hook` (no binding
        # wrapper frames: it runs on every MMIO exit); the callback object is kept alive here.
        self._mem_cb = HOOK_MEM_INVALID_CFUNC(self._mem_hook)
        handle = uc_hook_h()
        status = uclib.uc_hook_add(self._uch, ctypes.byref(handle), UC_HOOK_MEM_INVALID,
                                   self._mem_cb, ctypes.c_void_p(0), ctypes.c_uint64(1),
                                   ctypes.c_uint64(0))
        if status:
            raise UcError(status)

    def _decode_mem(self, insn: int) -> decode.MemAccess | None:
        try:
            return self._decoded[insn]
        except KeyError:
            acc = self._decoded[insn] = decode.decode_mem(insn)
            if len(self._decoded) > _DECODE_CACHE_MAX:
                self._decoded.clear()
            return acc

    def translate(
        self, va: int, *, write: bool = False, fetch: bool = False, el: int | None = None
    ) -> Walk:
        """Translate VA with the guest's stage-1 (EL1&0 regime) as the MMU would."""
        # SCTLR_EL1 is the shadow's while the core knows it unchanged (no MSR since the last
        # load or save); with the MMU off the walk needs nothing else, PSTATE included.
        sctlr = self._cpr(SCTLR) if self._sys_dirty else self._shadow_sys[self._sctlr_index]
        if not sctlr & SCTLR_ELx_M:
            return walk_stage1(va, sctlr=sctlr, pstate=0, el=1, read_sysreg=self.sys_reg,
                               read_u64=self._view.read_u64)
        pstate = self.pstate
        return walk_stage1(
            va,
            sctlr=sctlr,
            pstate=pstate,
            el=pstate_el(pstate) if el is None else el,
            read_sysreg=self.sys_reg,
            read_u64=self._view.read_u64,
            write=write,
            fetch=fetch,
        )

    def _mmu_off(self) -> bool:
        """SCTLR_EL1.M is clear, as the shadow knows it (no MSR since the last move): the
        stage-1 is the identity on [0, OA_MASK] and faults above (`walk_stage1`)."""
        return not self._sys_dirty and not self._shadow_sys[self._sctlr_index] & SCTLR_ELx_M

    def _fetch(self, va: int) -> int | None:
        """The instruction word at VA (through the guest's stage-1), None if unreachable or
        misaligned (a misaligned PC takes a PC alignment fault before any fetch, and its four
        bytes could run past the end of the host mapping)."""
        if va & 3:
            return None
        if self._mmu_off():  # the walk's answer with the MMU off, without a `Walk`
            ipa: int | None = va if va <= OA_MASK else None
        else:
            ipa = self.translate(va, fetch=True).ipa
        if ipa is None:
            return None
        host = self._view.host_of(ipa)
        return None if host is None else _U32_AT(host).value

    def trap_id_regs(self) -> None:
        """HCR_EL2.TID3: EL1 reads of the ID registers (op0 3, op1 0, CRn 0, CRm 1-7) exit
        with EC 0x18 (SYSREG, PC on the MRS) instead of reading the CPU's values. The core's
        own HCR_EL2.TID3 does it: unicorn's QEMU checks it on each such read and raises a
        trap to EL2 (intno 1, PC on the MRS) that `_undefined` turns into the exit; no other
        MRS is slowed down."""
        self._cpw(SYS_HCR_EL2, self._cpr(SYS_HCR_EL2) | HCR_TID3)

    def _stop(self, ex: Exit) -> None:
        self._exit = ex
        self.uc.emu_stop()

    def _mem_hook(self, _uch: object, access: int, address: int, size: int, value: int,
                  _key: object) -> bool:
        """unicorn's callback: `_on_mem`, an exception kept as the binding's wrapper keeps it
        (on the `Uc`, for `Core.run` to raise) and the emulation stopped."""
        try:
            return self._on_mem(self.uc, access, address, size, value, None)
        except BaseException as e:  # noqa: BLE001 - raised again by Core.run
            uc = self.uc
            if uc._hook_exception is None:
                uc._hook_exception = e
            uc.emu_stop()
            return False

    def _on_mem(
        self, uc: Uc, access: int, address: int, size: int, value: int, _data: object
    ) -> bool:
        """A stage-2 fault: `address` is the IPA (unicorn's physical address)."""
        pc = self._rd(REG_PC)
        if access in _FETCH_FAULTS:
            self._exit = Exit(ExitKind.IABT, esr(EC.IABT_LOW, _abort_fsc(access)), pc,
                              hpfar_from_ipa(address))
            return False
        insn = self._fetch(pc)
        acc = self._decode_mem(insn) if insn is not None else None
        va = self._target_va(acc, pc, address) if acc is not None else None
        if va is None:  # a stale PC, or no access there
            found = self._access_pc(pc, address)
            if found is not None:
                pc = found
                insn = self._fetch(pc)
                acc = self._decode_mem(insn) if insn is not None else None
        if acc is None or insn is None:
            iss = abort_iss(_abort_fsc(access), write=access in _WRITES, fnv=True)
            self._exit = Exit(ExitKind.DABT, esr(EC.DABT_LOW, iss), 0, hpfar_from_ipa(address))
            return False
        self._mem_fault = pc  # the access's PC, restored after emu_start
        if va is None:
            va = acc.address(pc, self._x_or_sp)
        self._exit = Exit(ExitKind.DABT, self._dabt_esr(insn, acc, access),
                          _far(va, address) & MASK64, hpfar_from_ipa(address))
        return False

    def _dabt_esr(self, insn: int, acc: decode.MemAccess, access: int) -> int:
        """ESR_EL2 of a stage-2 data abort by the access `acc` decoded from `insn` (memoised:
        a function of the instruction word and the kind of fault alone)."""
        key = insn << 5 | access
        try:
            return self._esrs[key]
        except KeyError:
            pass
        write, fsc = access in _WRITES, _abort_fsc(access)
        if acc.iss_valid:
            iss = abort_iss(fsc, write=write, size=acc.size, srt=acc.rt, sign=acc.sign,
                            sf=acc.sf, acqrel=acc.acqrel)
        else:
            iss = abort_iss(fsc, write=write)
        if len(self._esrs) > _DECODE_CACHE_MAX:
            self._esrs.clear()
        value = self._esrs[key] = esr(EC.DABT_LOW, iss)
        return value

    def _target_va(self, acc: decode.MemAccess, pc: int, address: int) -> int | None:
        """The VA of the access decoded at `pc` if it can have touched IPA `address` (page
        offset), else None."""
        va = acc.address(pc, self._x_or_sp) & MASK64
        far = _far(va, address)
        if far >= va + max(acc.total, 1):
            return None
        if self._mmu_off():  # the walk's answer with the MMU off (no S1PTW without tables)
            ipa: int | None = far if far <= OA_MASK else None
        else:
            w = self.translate(far, write=acc.store)
            ipa = w.ipa if w.ipa is not None else w.s2_ipa
        return va if ipa is not None and ipa >> PAGE_SHIFT == address >> PAGE_SHIFT else None

    def _access_pc(self, pc: int, address: int) -> int | None:
        """The load/store at or after `pc` (same translation block, straight line) that
        touches `address`, for when unicorn reports the block's start as PC."""
        for k in range(1, _BLOCK_SCAN_INSNS):
            p = pc + 4 * k
            insn = self._fetch(p)
            if insn is None:
                return None
            acc = self._decode_mem(insn)
            if acc is not None and self._target_va(acc, p, address) is not None:
                return p
        return None

    def _on_intr(self, uc: Uc, intno: int, _data: object) -> None:
        pc = self._rd(REG_PC)
        if intno == EXCP_HVC:
            insn = self._fetch(pc - 4)
            imm = decode.exception_imm16(insn) if insn is not None else 0
            self._stop(Exit(ExitKind.HVC, esr(EC.HVC64, imm), imm=imm))
        elif intno == EXCP_SWI:
            insn = self._fetch(pc - 4)
            imm = decode.exception_imm16(insn) if insn is not None else 0
            self._enter_el1(VECTOR_SYNC, pc, esr(EC.SVC64, imm))
        elif intno == EXCP_BKPT:
            insn = self._fetch(pc)
            imm = decode.exception_imm16(insn) if insn is not None else 0
            self._enter_el1(VECTOR_SYNC, pc, esr(EC.BRK64, imm))
        elif intno in (EXCP_PREFETCH_ABORT, EXCP_DATA_ABORT):
            self._abort(pc, intno == EXCP_PREFETCH_ABORT)
        else:  # UDEF, trap to EL2 and anything else: decide from the instruction
            self._undefined(pc)

    def _undefined(self, pc: int) -> None:
        if pc & 3:
            self._enter_el1(VECTOR_SYNC, pc, esr(EC.PC_ALIGN), far=pc)
            return
        pstate = self.pstate
        if pstate & PSR_IL_BIT:
            self._enter_el1(VECTOR_SYNC, pc, esr(EC.ILL))
            return
        insn = self._fetch(pc)
        if insn is None:  # the fetch itself faults: let the walk explain it
            self._abort(pc, fetch=True)
            return
        el = pstate_el(pstate)
        if insn == decode.WFI:
            wfi = esr(EC.WFx, ISS_CV_COND_AL)  # ISS bit 0 = 0: WFI
            if el == 0 and not self._cpr(SYS_REGS["SCTLR_EL1"]) & SCTLR_EL1_nTWI:
                self._enter_el1(VECTOR_SYNC, pc, wfi)  # EL1 traps it first
            else:
                self._stop(Exit(ExitKind.WFX, wfi))
            return
        if insn & decode.HVC_MASK == decode.SMC_BITS:
            imm = decode.exception_imm16(insn)
            if el == 0:
                self._enter_el1(VECTOR_SYNC, pc, esr(EC.UNKNOWN))
            else:
                self._stop(Exit(ExitKind.SMC, esr(EC.SMC64, imm), imm=imm))
            return
        cpacr = self._cpr(SYS_REGS["CPACR_EL1"])
        fpen = (cpacr >> CPACR_EL1_FPEN_SHIFT) & 3
        fp_trapped = fpen in (0, 2) or (fpen == 1 and el == 0)
        # (unicorn 2.1.4 never raises FP/SVE access traps: kept for a CPU model that does)
        if decode.is_fp_simd(insn) and fp_trapped:
            self._enter_el1(VECTOR_SYNC, pc, esr(EC.FP_ASIMD, ISS_CV_COND_AL))
            return
        if decode.is_sve(insn):
            zen = (cpacr >> CPACR_EL1_ZEN_SHIFT) & 3
            if zen in (0, 2) or (zen == 1 and el == 0):
                self._enter_el1(VECTOR_SYNC, pc, esr(EC.SVE))
            elif fp_trapped:
                self._enter_el1(VECTOR_SYNC, pc, esr(EC.FP_ASIMD, ISS_CV_COND_AL))
            else:
                self._enter_el1(VECTOR_SYNC, pc, esr(EC.UNKNOWN))
            return
        sys = decode.decode_sys(insn)
        if sys is not None and el == 1:
            iss = sys64_iss(sys.op0, sys.op1, sys.crn, sys.crm, sys.op2, sys.rt, sys.read)
            self._stop(Exit(ExitKind.SYSREG, esr(EC.SYS64, iss)))
            return
        self._enter_el1(VECTOR_SYNC, pc, esr(EC.UNKNOWN))

    def _abort(self, pc: int, fetch: bool) -> None:
        """A stage-1 abort (or alignment, or a walk into unmapped IPA) at `pc`."""
        el = pstate_el(self.pstate)
        if fetch:
            w = self.translate(pc, fetch=True)
            if w.s2_ipa is not None:
                iss = abort_iss(FSC.FAULT + 3, s1ptw=True)
                self._stop(Exit(ExitKind.IABT, esr(EC.IABT_LOW, iss), pc, hpfar_from_ipa(w.s2_ipa)))
                return
            fsc = w.fsc if w.fsc is not None else FSC.EXTABT
            ec = EC.IABT_LOW if el == 0 else EC.IABT_CUR
            self._enter_el1(VECTOR_SYNC, pc, esr(ec, fsc), far=pc)
            return
        insn = self._fetch(pc)
        acc = self._decode_mem(insn) if insn is not None else None
        ec = EC.DABT_LOW if el == 0 else EC.DABT_CUR
        if acc is None:
            self._enter_el1(VECTOR_SYNC, pc, esr(ec, abort_iss(FSC.EXTABT, fnv=True)), far=0)
            return
        va = acc.address(pc, self._x_or_sp)
        write = acc.store and not acc.load
        for probe in (va, va + acc.total - 1):
            w = self.translate(probe & MASK64, write=acc.store)
            if w.s2_ipa is not None:
                iss = abort_iss(FSC.FAULT + 3, write=write, s1ptw=True)
                self._stop(
                    Exit(
                        ExitKind.DABT,
                        esr(EC.DABT_LOW, iss),
                        probe & MASK64,
                        hpfar_from_ipa(w.s2_ipa),
                    )
                )
                return
            if w.fsc is not None:
                far = probe if probe == va else (probe & ~0xFFF)
                self._enter_el1(
                    VECTOR_SYNC, pc, esr(ec, abort_iss(w.fsc, write=acc.store)), far=far & MASK64
                )
                return
        # Translations succeed: an alignment fault.
        self._enter_el1(VECTOR_SYNC, pc, esr(ec, abort_iss(FSC.ALIGN, write=acc.store)), far=va)

    # ---- exception entry to EL1 ------------------------------------------------------------
    def _enter_el1(
        self, vector: int, elr: int, esr_value: int | None, far: int | None = None
    ) -> None:
        """Take an exception to EL1 as the architecture does (AArch64 EL1/EL0 source)."""
        pstate = self._rd(A.UC_ARM64_REG_PSTATE)
        mode = pstate & PSR_MODE_MASK
        if mode == PSR_MODE_EL1h:
            base = VECTOR_CUR_SPX
        elif mode == PSR_MODE_EL1t:
            base = VECTOR_CUR_SP0
        else:
            base = VECTOR_LOWER_A64
        sctlr = self._cpr(SYS_REGS["SCTLR_EL1"])
        new = (pstate & PSR_NZCV) | PSR_DAIF | PSR_MODE_EL1h
        if not sctlr & SCTLR_EL1_SPAN:
            new |= PSR_PAN_BIT
        else:
            new |= pstate & PSR_PAN_BIT
        if sctlr & SCTLR_EL1_DSSBS:
            new |= PSR_SSBS_BIT
        self._sys_dirty = True
        self._cpw(SYS_SPSR_EL1, pstate)
        if esr_value is not None:
            self._cpw(SYS_REGS["ESR_EL1"], esr_value)
        if far is not None:
            self._cpw(SYS_REGS["FAR_EL1"], far)
        vbar = self._cpr(SYS_REGS["VBAR_EL1"])
        self._wr(A.UC_ARM64_REG_ELR_EL1, elr)
        if mode != PSR_MODE_EL1h:  # bank: the live SP was SP_EL0, SP_EL1 comes back
            self._wr(A.UC_ARM64_REG_SP_EL0, self._rd(A.UC_ARM64_REG_SP))
            self._wr(A.UC_ARM64_REG_SP, self._rd(A.UC_ARM64_REG_SP_EL1))
        self._wr(A.UC_ARM64_REG_PSTATE, new)
        self._wr(A.UC_ARM64_REG_PC, vbar + base + vector)
        self._cpw(SYS_REGS["SCTLR_EL1"], sctlr)  # rebuild the mode flags

    def inject_undef(self) -> None:
        """Make the current instruction UNDEFINED for the guest (ESR_EL1 0x02000000)."""
        self._enter_el1(VECTOR_SYNC, self.pc, esr(EC.UNKNOWN))

    def inject_sync(self, esr_value: int, far: int | None = None) -> None:
        """Take a synchronous exception to EL1 at the current PC with this ESR (and FAR)."""
        self._enter_el1(VECTOR_SYNC, self.pc, esr_value, far)

    def inject_irq(self) -> None:
        """Take an IRQ to EL1 now (ELR = PC). The caller checks `irqs_masked` first."""
        self._enter_el1(VECTOR_IRQ, self.pc, None)

    def inject_fiq(self) -> None:
        self._enter_el1(VECTOR_FIQ, self.pc, None)

    def inject_serror(self, esr_value: int = 0) -> None:
        self._enter_el1(VECTOR_SERROR, self.pc, esr(EC.SERROR, esr_value))

