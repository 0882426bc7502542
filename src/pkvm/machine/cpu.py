"""A guest CPU core: AArch64 EL1/EL0 on unicorn, stopping where EL2 would take an exception.

The run path drives it as KVM drives hardware: `load_context()` (flush), `run()` until an
exception to EL2, `save_context()` (sync). The core knows nothing of the hyp or the host: its
stage-2 view is a list of IPA ranges, each backed directly by host memory (`map`), and an exit
is reported as the architecture reports it to EL2 (`Exit.esr`, `.far`, `.hpfar`).

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
| WFX | 0x01 | on the WFI | ISS bit 0 = 0 (WFI). WFE never exits (see below) |
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

What unicorn 2.1.4 does (measured; the reasons for the code below):
* It resets to EL1 with SCR_EL3/HCR_EL2 zero. `__init__` sets what firmware would leave
  (SCR_EL3 NS|RW|HCE, HCR_EL2 RW|TSC|TWI, CPTR_EL3.EZ, CNTHCTL_EL2) and rewrites SCTLR_EL1:
  a system-register write is what makes QEMU rebuild its cached mode flags, a PSTATE write
  alone does not (an EL0 context would still run with EL1 rights).
* FP/SIMD and SVE never trap: CPACR_EL1.FPEN/ZEN and CPTR_ELx.TFP are ignored, so EC 0x07 /
  0x19 are never raised (the delivery code is there for a CPU model that traps) and
  `save_context` always reads the vector registers (no lazy FP switch is possible).
* It delivers no exception itself. Every one reaches UC_HOOK_INTR as a bare number, without
  the syndrome: 1 UDEF (also WFI trapped by TWI, PC on it), 2 SVC (PC past), 3 prefetch abort
  and 4 data abort (stage-1 faults, alignment, a table walk into unmapped IPA; PC on the
  instruction), 7 BRK (PC on it), 11 HVC (PC past), 12 trap to EL2 (SMC under TSC, PC on it).
  ESR/FAR are rebuilt from the instruction (`pkvm.machine.decode`) and a Python walk of the
  guest's stage-1 tables; writing PC inside the hook resumes at the vector in the same
  `emu_start`, so delivered exceptions cost no exit and count against the budget.
* UC_HOOK_MEM_*_UNMAPPED / *_PROT report the PHYSICAL address (the IPA) when the guest MMU is
  on (the VA when it is off, which is the same); PC is normally the faulting instruction
  (rarely stale: `run()` and `_on_mem` check it against the access). HPFAR comes
  from that address; FAR (the VA) from decoding the instruction's address computation; when
  the instruction cannot be decoded FAR is 0 with FnV set. A stage-1 walk that reads unmapped
  IPA does not reach the memory hooks: QEMU turns it into an abort (intno 3/4) that the walk
  here recognises and reports to EL2 as a stage-2 fault with S1PTW.
* WFE is a no-op (QEMU 5 ignores HCR_EL2.TWE): architecturally a WFE may complete at once.
* `emu_start(count=N)` counts with a per-instruction hook (~4x slower); `run()` uses it only
  when given a budget. A timeout slices at arbitrary points (device accesses replayed): unused.
* EL1 system registers change only by MSR (a UC_HOOK_INSN MSR hook marks them dirty), by
  exception entry done here, and PAR_EL1 by AT: `save_context` rereads them only then.
* Register access through the Python binding costs ~2 us each; contexts move through
  preallocated `uc_reg_read_batch` / `uc_reg_write_batch` arrays instead.
* The live stack pointer is unicorn's SP; its SP_EL0/SP_EL1 register of the bank PSTATE selects
  is stale (QEMU banks only on its own mode changes, ERET included, not on register writes):
  contexts and exception entry bank SP by hand.
* Mapping is costly: `mem_unmap` flushes the TLB page by page (O(size)) and every map or
  unmap rebuilds QEMU's flat view (O(regions): ~10 ms per call at 2000 regions). `map` keeps
  regions few and each page remapped O(1) times amortised: adjacent ranges merge only with
  their binary buddy (same power-of-two size, aligned), leftovers of a cut region are split
  into aligned blocks, and over shared host memory the pages are first aliased into a per-core
  window at their IPA offset (`mremap`), so scattered host pages still merge. Page by page:
  ~50-70 us per map or unmap, whatever the order (vs ~4 ms growing one region, ~2.4 ms with
  one region per page at 4096 pages).
* Code translated from guest memory is cached by address: memory written from outside the guest
  (loading an image into a page that ran) needs `flush_code()`; `map` over an existing mapping
  flushes by itself.
"""

from __future__ import annotations

import bisect
import ctypes
import enum
import weakref
from dataclasses import dataclass, field
from typing import Any

from unicorn import (
    UC_ARCH_ARM64,
    UC_HOOK_INSN,
    UC_HOOK_INTR,
    UC_HOOK_MEM_INVALID,
    UC_MEM_FETCH_PROT,
    UC_MEM_FETCH_UNMAPPED,
    UC_MEM_READ_UNMAPPED,
    UC_MEM_WRITE_PROT,
    UC_MEM_WRITE_UNMAPPED,
    UC_MODE_ARM,
    UC_PROT_EXEC,
    UC_PROT_READ,
    UC_PROT_WRITE,
    Uc,
    UcError,
)
from unicorn import arm64_const as A
from unicorn.unicorn_const import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH
from unicorn.unicorn_py3.unicorn import UcContext, uclib

from pkvm.machine import decode
from pkvm.machine.esr import (
    EC,
    FSC,
    abort_iss,
    esr,
    esr_ec,
    hpfar_from_ipa,
    sys64_iss,
)

PAGE_SIZE = 4096
MASK64 = (1 << 64) - 1
_UNTIL = MASK64  # an odd address: PC never reaches it

# __kvm_vcpu_run exit codes (asm/kvm_asm.h).
ARM_EXCEPTION_IRQ = 0
ARM_EXCEPTION_TRAP = 2

# PSTATE bits.
PSR_MODE_EL0t = 0x0
PSR_MODE_EL1t = 0x4
PSR_MODE_EL1h = 0x5
PSR_MODE_MASK = 0xF
PSR_F_BIT = 1 << 6
PSR_I_BIT = 1 << 7
PSR_A_BIT = 1 << 8
PSR_D_BIT = 1 << 9
PSR_DAIF = PSR_D_BIT | PSR_A_BIT | PSR_I_BIT | PSR_F_BIT
PSR_SSBS_BIT = 1 << 12
PSR_IL_BIT = 1 << 20
PSR_PAN_BIT = 1 << 22
PSR_NZCV = 0xF << 28
PSTATE_RESET = PSR_DAIF | PSR_MODE_EL1h  # 0x3C5, as kvm_reset_vcpu

# SCTLR_EL1 bits used here.
SCTLR_ELx_M = 1 << 0
SCTLR_ELx_A = 1 << 1
SCTLR_EL1_SPAN = 1 << 23
SCTLR_EL1_nTWI = 1 << 16

# ISS CV = 1, COND = 0b1110 (always): what a trapped AArch64 WFx / FP access reports.
ISS_CV_COND_AL = 1 << 24 | 0xE << 20
SCTLR_ELx_WXN = 1 << 19
SCTLR_EL1_DSSBS = 1 << 44
SCTLR_EL1_RESET = 0x00C50078  # KVM's reset value (MMU, caches off; RES1 bits)

# Vector offsets from VBAR_EL1.
VECTOR_CUR_SP0 = 0x000
VECTOR_CUR_SPX = 0x200
VECTOR_LOWER_A64 = 0x400
VECTOR_SYNC, VECTOR_IRQ, VECTOR_FIQ, VECTOR_SERROR = 0x000, 0x080, 0x100, 0x180

# EL1 system registers of a vCPU context: name -> (op0, op1, CRn, CRm, op2). MPIDR_EL1 is the
# virtual one (VMPIDR_EL2), which EL1 reads as MPIDR_EL1.
SysRegEnc = tuple[int, int, int, int, int]  # (op0, op1, CRn, CRm, op2)
CpuState = UcContext  # the emulated CPU's whole state, opaque (`Core.save_cpu_state`)
SYS_REGS: dict[str, SysRegEnc] = {
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
_SPSR_EL1 = (3, 0, 4, 0, 0)
_EL1_ENCS = frozenset([*SYS_REGS.values(), _SPSR_EL1])

# EL2 and EL3 registers the guest never sees, by encoding (`asm/sysreg.h` names), and the bits
# of them the model sets: what firmware leaves for EL2 software, and what EL2 configures.
SYS_SCR_EL3 = (3, 6, 1, 1, 0)
SYS_CPTR_EL3 = (3, 6, 1, 1, 2)
SYS_HCR_EL2 = (3, 4, 1, 1, 0)
SYS_CPTR_EL2 = (3, 4, 1, 1, 2)
SYS_CNTHCTL_EL2 = (3, 4, 14, 1, 0)
SCR_EL3_NS, SCR_EL3_RES1, SCR_EL3_HCE, SCR_EL3_RW = 1 << 0, 0b11 << 4, 1 << 8, 1 << 10
SCR_EL3_APK, SCR_EL3_API = 1 << 16, 1 << 17
CPTR_EL3_EZ = 1 << 8
HCR_FMO, HCR_IMO, HCR_VI = 1 << 3, 1 << 4, 1 << 7
HCR_TWI, HCR_TWE, HCR_TSC, HCR_RW = 1 << 13, 1 << 14, 1 << 19, 1 << 31
HCR_APK, HCR_API = 1 << 40, 1 << 41
CPTR_EL2_RES1 = 0x32FF  # nVHE layout, RES1 bits, TZ = TFP = 0
CNTHCTL_EL1PCTEN, CNTHCTL_EL1PCEN = 1 << 0, 1 << 1

# unicorn interrupt numbers (QEMU's EXCP_*).
EXCP_UDEF, EXCP_SWI, EXCP_PREFETCH_ABORT, EXCP_DATA_ABORT = 1, 2, 3, 4
EXCP_BKPT, EXCP_HVC, EXCP_HYP_TRAP = 7, 11, 12

# Context registers moved in one batch, in this order.
_GPR_IDS = [A.UC_ARM64_REG_X0 + i for i in range(29)] + [A.UC_ARM64_REG_X29, A.UC_ARM64_REG_X30]
_CORE_IDS = _GPR_IDS + [
    A.UC_ARM64_REG_SP,
    A.UC_ARM64_REG_SP_EL0,
    A.UC_ARM64_REG_SP_EL1,
    A.UC_ARM64_REG_PC,
    A.UC_ARM64_REG_PSTATE,
    A.UC_ARM64_REG_ELR_EL1,
    A.UC_ARM64_REG_FPCR,
    A.UC_ARM64_REG_FPSR,
]
_I_SP, _I_SP_EL0, _I_SP_EL1, _I_PC, _I_PSTATE, _I_ELR, _I_FPCR, _I_FPSR = range(31, 39)
_Q_IDS = [A.UC_ARM64_REG_Q0 + i for i in range(32)]


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
        return ((self.hpfar >> 4) << 12) | (self.far & 0xFFF)

    @property
    def isv(self) -> bool:
        return bool(self.esr & (1 << 24))

    @property
    def write(self) -> bool:
        return bool(self.esr & (1 << 6))

    @property
    def srt(self) -> int:
        return (self.esr >> 16) & 31

    @property
    def access_size(self) -> int:
        return 1 << ((self.esr >> 22) & 3)

    def __repr__(self) -> str:
        return (
            f"Exit({self.kind.value}, esr={self.esr:#x}, far={self.far:#x}, "
            f"hpfar={self.hpfar:#x}, imm={self.imm:#x})"
        )


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
        ctx.sys_regs["MPIDR_EL1"] = (1 << 31) | mpidr
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


class _CpReg(ctypes.Structure):
    _fields_ = [
        ("crn", ctypes.c_uint32),
        ("crm", ctypes.c_uint32),
        ("op0", ctypes.c_uint32),
        ("op1", ctypes.c_uint32),
        ("op2", ctypes.c_uint32),
        ("val", ctypes.c_uint64),
    ]


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
        if cp is not None:
            self.cps = (_CpReg * n)()
            for i, (op0, op1, crn, crm, op2) in enumerate(cp):
                c = self.cps[i]
                c.op0, c.op1, c.crn, c.crm, c.op2 = op0, op1, crn, crm, op2
            self.ptrs = (ctypes.c_void_p * n)(*[ctypes.addressof(c) for c in self.cps])
        else:
            self.vals = (ctypes.c_uint64 * (n * width // 8))()
            base = ctypes.addressof(self.vals)
            self.ptrs = (ctypes.c_void_p * n)(*[base + width * i for i in range(n)])
        self.width = width

    def read(self) -> list[int]:
        _check(uclib.uc_reg_read_batch(self.uch, self.ids, self.ptrs, self.n))
        if hasattr(self, "cps"):
            return [c.val for c in self.cps]
        raw = list(self.vals)
        if self.width == 16:
            return [raw[2 * i] | raw[2 * i + 1] << 64 for i in range(self.n)]
        return raw

    def read_u64s(self) -> list[int]:
        """The registers as u64 words (a 128-bit register as its low then high half)."""
        _check(uclib.uc_reg_read_batch(self.uch, self.ids, self.ptrs, self.n))
        return list(self.vals)

    def write(self, values: list[int]) -> None:
        if hasattr(self, "cps"):
            for c, v in zip(self.cps, values):
                c.val = v & MASK64
        elif self.width == 16:
            flat: list[Any] = []
            for v in values:
                flat += (v & MASK64, (v >> 64) & MASK64)
            self.vals[:] = flat
        else:
            self.vals[:] = [v & MASK64 for v in values]
        _check(uclib.uc_reg_write_batch(self.uch, self.ids, self.ptrs, self.n))


def _check(status: int) -> None:
    if status:
        raise UcError(status)


_libc = ctypes.CDLL(None, use_errno=True)
_mremap = _libc.mremap
_mremap.restype = ctypes.c_void_p
_mremap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_void_p,
]
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_munmap = _libc.munmap
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
MAP_PRIVATE, MAP_ANONYMOUS, MAP_NORESERVE, PROT_NONE = 0x02, 0x20, 0x4000, 0


def _blocks(m: Mapping, start: int, end: int) -> list[Mapping]:
    """[start, end) of mapping `m` as naturally aligned power-of-two blocks."""
    out = []
    while start < end:
        size = start & -start if start else 1 << 63
        while size > end - start:
            size >>= 1
        out.append(Mapping(start, start + size, m.host + start - m.start, m.writable, m.executable))
        start += size
    return out


class _Window:
    """A reserved address range where host pages are aliased at their IPA offset.

    `mremap(old, 0, size, MAYMOVE|FIXED, new)` makes a second mapping of the same pages of a
    shared mapping; IPAs below 2^38 are covered (256 GiB of address space reserved per core,
    nothing committed; higher IPAs are mapped where they are). The first refusal (private
    memory) turns the window off for good.
    """

    BITS = 38

    def __init__(self) -> None:
        self.base: int | None = None
        self.enabled = True

    def alias(self, ipa: int, size: int, host: int) -> int:
        if not self.enabled or ipa + size > 1 << self.BITS:
            return host
        if self.base is None:
            flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE
            base = _mmap(None, 1 << self.BITS, PROT_NONE, flags, -1, 0)
            if base is None or base == MASK64:
                self.enabled = False
                return host
            self.base = base
            weakref.finalize(self, _munmap, base, 1 << self.BITS)
        target = self.base + ipa
        if _mremap(host, 0, size, MREMAP_MAYMOVE | MREMAP_FIXED, target) != target:
            self.enabled = False  # not a shared mapping: map the pages where they are
            return host
        return target


@dataclass(slots=True)
class Mapping:
    """One stage-2 range: IPA [start, end) backed by host memory at `host`."""

    start: int
    end: int
    host: int
    writable: bool
    executable: bool

    @property
    def perms(self) -> int:
        return (
            UC_PROT_READ
            | (UC_PROT_WRITE if self.writable else 0)
            | (UC_PROT_EXEC if self.executable else 0)
        )


@dataclass(frozen=True, slots=True)
class Walk:
    """Result of a stage-1 translation: `ipa`, or a fault at `level`.

    `fsc` is None on success; `s2_ipa` is set when the walk itself read an IPA that stage-2
    does not map (a stage-2 fault on a stage-1 walk, S1PTW).
    """

    ipa: int | None
    fsc: int | None = None
    s2_ipa: int | None = None


class Core:
    """One guest CPU: a unicorn ARM64 `max` CPU running EL1/EL0 under a model stage-2."""

    def __init__(self, *, tcg_buffer_size: int = 64 << 20, alias_window: bool = True) -> None:
        uc: Any = Uc(UC_ARCH_ARM64, UC_MODE_ARM)  # unicorn's typing lacks the ctl_* methods
        uc.ctl_set_cpu_model(A.UC_CPU_ARM64_MAX)
        uc.ctl_set_tcg_buffer_size(tcg_buffer_size)
        self.uc: Any = uc
        self._uch = uc._uch
        self._r64 = ctypes.c_uint64()
        self._r64p = ctypes.byref(self._r64)
        self._cp = _CpReg()
        self._cpp = ctypes.byref(self._cp)
        self._decoded: dict[int, decode.MemAccess | None] = {}
        self._window = _Window() if alias_window else None
        self._maps: list[Mapping] = []
        self._starts: list[int] = []
        self._exit: Exit | None = None
        self._core = _Batch(self._uch, _CORE_IDS)
        self._q = _Batch(self._uch, _Q_IDS, width=16)
        names = list(SYS_REGS)
        self._sys_names = names
        self._sys = _Batch(
            self._uch,
            [A.UC_ARM64_REG_CP_REG] * (len(names) + 1),
            cp=[SYS_REGS[n] for n in names] + [_SPSR_EL1],
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
        uc.hook_add(UC_HOOK_INTR, self._on_intr)
        uc.hook_add(UC_HOOK_MEM_INVALID, self._on_mem)
        uc.hook_add(UC_HOOK_INSN, self._on_msr, None, 1, 0, A.UC_ARM64_INS_MSR)

    # ---- system registers -------------------------------------------------------------
    # Registers move through preallocated ctypes buffers: the binding's reg_read costs ~2 us.
    def _rd(self, regid: int) -> int:
        _check(uclib.uc_reg_read(self._uch, regid, self._r64p))
        return self._r64.value

    def _wr(self, regid: int, value: int) -> None:
        self._r64.value = value & MASK64
        _check(uclib.uc_reg_write(self._uch, regid, self._r64p))

    def _cpw(self, enc: tuple[int, int, int, int, int], value: int) -> None:
        c = self._cp
        c.op0, c.op1, c.crn, c.crm, c.op2 = enc
        c.val = value & MASK64
        _check(uclib.uc_reg_write(self._uch, A.UC_ARM64_REG_CP_REG, self._cpp))

    def _cpr(self, enc: tuple[int, int, int, int, int]) -> int:
        c = self._cp
        c.op0, c.op1, c.crn, c.crm, c.op2 = enc
        _check(uclib.uc_reg_read(self._uch, A.UC_ARM64_REG_CP_REG, self._cpp))
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
        return self.uc.context_save()

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
        return self._cpr(_SPSR_EL1 if name == "SPSR_EL1" else SYS_REGS[name])

    def set_sys_reg(self, name: str, value: int) -> None:
        self._cpw(_SPSR_EL1 if name == "SPSR_EL1" else SYS_REGS[name], value)
        self._sys_dirty = True
        self._rebuild_flags()

    def _rebuild_flags(self) -> None:
        # A system-register write makes QEMU recompute its cached EL/MMU flags.
        sctlr = SYS_REGS["SCTLR_EL1"]
        self._cpw(sctlr, self._cpr(sctlr))

    # ---- general registers ------------------------------------------------------------
    @property
    def pc(self) -> int:
        return self._rd(A.UC_ARM64_REG_PC)

    @pc.setter
    def pc(self, value: int) -> None:
        self._wr(A.UC_ARM64_REG_PC, value)

    @property
    def pstate(self) -> int:
        return self._rd(A.UC_ARM64_REG_PSTATE)

    @property
    def irqs_masked(self) -> bool:
        """PSTATE.I: an IRQ would not be taken now."""
        return bool(self.pstate & PSR_I_BIT)

    def x(self, n: int) -> int:
        """Xn (n = 31 reads as zero, XZR)."""
        if n == 31:
            return 0
        return self._rd(_GPR_IDS[n])

    def set_x(self, n: int, value: int) -> None:
        if n != 31:
            self._wr(_GPR_IDS[n], value)

    def _x_or_sp(self, n: int) -> int:
        return self._rd(A.UC_ARM64_REG_SP if n == 31 else _GPR_IDS[n])

    def skip(self) -> None:
        """Advance PC past the current instruction (EL2 emulated it)."""
        self._wr(A.UC_ARM64_REG_PC, self._rd(A.UC_ARM64_REG_PC) + 4)

    def _decode_mem(self, insn: int) -> decode.MemAccess | None:
        try:
            return self._decoded[insn]
        except KeyError:
            acc = self._decoded[insn] = decode.decode_mem(insn)
            if len(self._decoded) > 65536:
                self._decoded.clear()
            return acc

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
        sysvals = [regs.get(n, 0) for n in self._sys_names] + [ctx.spsr_el1]
        if self._sys_dirty or sysvals != self._shadow_sys:
            self._sys.write(sysvals)
            self._shadow_sys = sysvals
            self._sys_dirty = False
        elif self._ran:  # an AT since the last sync may have changed PAR_EL1
            self._cpw(SYS_REGS["PAR_EL1"], sysvals[self._par_index])
        self._ran = False
        self._rebuild_flags()

    def save_context(self) -> CpuContext:
        """The CPU's state (sync)."""
        w, vhalves, sysvals = self.save_words()
        return CpuContext(
            x=w[:31],
            sp_el0=w[31],
            pc=w[32],
            pstate=w[33],
            sp_el1=w[34],
            elr_el1=w[35],
            spsr_el1=w[36],
            fpsr=w[37],
            fpcr=w[38],
            v=[vhalves[2 * i] | vhalves[2 * i + 1] << 64 for i in range(32)],
            sys_regs=dict(zip(self._sys_names, sysvals)),
        )

    def save_words(self) -> tuple[list[int], list[int], list[int]]:
        """The CPU's state (sync) as u64 words, with no per-register objects: x0..x30, sp_el0,
        pc, pstate, sp_el1, elr_el1, spsr_el1, fpsr, fpcr (`struct kvm_cpu_context` order);
        V0..V31 as 64 halves (low first); the values of `sys_names` in that order."""
        r = self._core.read()
        pstate = r[_I_PSTATE]
        el1h = pstate & PSR_MODE_MASK == PSR_MODE_EL1h
        sp_el1 = r[_I_SP] if el1h else r[_I_SP_EL1]
        sp_el0 = r[_I_SP_EL0] if el1h else r[_I_SP]
        if self._sys_dirty:
            self._shadow_sys = self._sys.read()
            self._sys_dirty = False
        elif self._ran:  # only AT (a SYS instruction, not hooked) changes PAR_EL1 silently
            self._shadow_sys[self._par_index] = self._cpr(SYS_REGS["PAR_EL1"])
        self._ran = False
        sysvals = self._shadow_sys
        words = r[:31]
        words += (sp_el0, r[_I_PC], pstate, sp_el1, r[_I_ELR], sysvals[-1], r[_I_FPSR], r[_I_FPCR])
        return words, self._q.read_u64s(), sysvals[:-1]

    @property
    def sys_names(self) -> list[str]:
        """The system registers `save_words` returns, in its order."""
        return self._sys_names

    def _on_msr(self, uc: Uc, reg: int, cp_reg: object, _data: object) -> int:
        self._sys_dirty = True  # the guest wrote a system register: re-read at save
        return 0  # let unicorn perform (or refuse) the write

    def trap_id_regs(self) -> None:
        """HCR_EL2.TID3: EL1 reads of the ID registers (op0 3, op1 0, CRn 0, CRm 1-7) exit
        with EC 0x18 (SYSREG, PC on the MRS) instead of reading the CPU's values. Off by
        default: unicorn calls back on every MRS once this is on."""
        if getattr(self, "_id_trap_on", False):
            return
        self._id_trap_on = True
        self._gpr_of = {rid: n for n, rid in enumerate(_GPR_IDS)}
        self.uc.hook_add(UC_HOOK_INSN, self._on_mrs, None, 1, 0, A.UC_ARM64_INS_MRS)

    def _on_mrs(self, uc: Uc, reg: int, cp: Any, _data: object) -> int:
        if cp.op0 != 3 or cp.op1 or cp.crn or not 1 <= cp.crm <= 7:
            return 0
        if (self._rd(A.UC_ARM64_REG_PSTATE) >> 2) & 3 != 1:
            return 0  # EL0 reads are the guest kernel's business (it traps or emulates them)
        rt = self._gpr_of.get(reg, 31)
        iss = sys64_iss(cp.op0, cp.op1, cp.crn, cp.crm, cp.op2, rt, True)
        self._sys_trap_pc = self._rd(A.UC_ARM64_REG_PC)
        self._stop(Exit(ExitKind.SYSREG, esr(EC.SYS64, iss)))
        return 1

    # ---- stage-2 view -----------------------------------------------------------------
    def mappings(self) -> list[Mapping]:
        """The stage-2 ranges as mapped in unicorn (merged), sorted by IPA."""
        return [Mapping(m.start, m.end, m.host, m.writable, m.executable) for m in self._maps]

    def map(
        self, ipa: int, size: int, host_address: int, writable: bool = True, executable: bool = True
    ) -> None:
        """Map IPA [ipa, ipa+size) to host memory at `host_address` (page-aligned), replacing
        whatever was there. Adjacent ranges contiguous in host memory with the same
        permissions become one unicorn region.

        When the host memory is a shared mapping (MAP_SHARED), the pages are first aliased
        into a per-core window at their IPA offset (`mremap`), so that IPA-contiguous guest
        memory is host-contiguous whatever pages back it and merges into few regions; over
        private memory `mremap` refuses and the pages are mapped where they are."""
        self._check_range(ipa, size)
        if host_address % PAGE_SIZE:
            raise ValueError(f"host address {host_address:#x} is not page-aligned")
        if self._window is not None:
            host_address = self._window.alias(ipa, size, host_address)
        self._update(ipa, ipa + size, Mapping(ipa, ipa + size, host_address, writable, executable))

    def unmap(self, ipa: int, size: int) -> None:
        self._check_range(ipa, size)
        self._update(ipa, ipa + size, None)

    def protect(self, ipa: int, size: int, writable: bool, executable: bool) -> None:
        """Change permissions of the mapped parts of [ipa, ipa+size)."""
        self._check_range(ipa, size)
        start, end = ipa, ipa + size
        pieces = []
        for m in self._overlapping(start, end):
            lo, hi = max(m.start, start), min(m.end, end)
            pieces.append(Mapping(lo, hi, m.host + lo - m.start, writable, executable))
        for p in pieces:
            self._update(p.start, p.end, p)

    @staticmethod
    def _check_range(ipa: int, size: int) -> None:
        if ipa % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
            raise ValueError(f"range {ipa:#x}+{size:#x} is not a non-empty page-aligned range")

    def _overlapping(self, start: int, end: int) -> list[Mapping]:
        i = bisect.bisect_right(self._starts, start) - 1
        out = []
        for m in self._maps[max(i, 0) :]:
            if m.start >= end:
                break
            if m.end > start:
                out.append(m)
        return out

    def _update(self, start: int, end: int, new: Mapping | None) -> None:
        # Regions overlapping or adjacent to [start, end) leave unicorn and come back rebuilt.
        inside = self._overlapping(start, end)
        if new is None and not inside:
            return  # nothing mapped there
        if new is not None and len(inside) == 1:
            m = inside[0]
            if (
                m.start <= start
                and end <= m.end
                and m.host + (start - m.start) == new.host
                and (m.writable, m.executable) == (new.writable, new.executable)
            ):
                return  # already mapped exactly so
        touched = list(inside)
        merged: list[Mapping] = []
        for m in inside:  # what is left of the regions the new range cuts through, in aligned
            # power-of-two blocks (so that unmapping page after page stays O(n log n))
            if m.start < start:
                merged += _blocks(m, m.start, start)
            if m.end > end:
                merged += _blocks(m, end, m.end)
        if new is not None:
            cur = new
            while (buddy := self._buddy(cur)) is not None:
                touched.append(buddy)
                lo, hi = (cur, buddy) if cur.start < buddy.start else (buddy, cur)
                cur = Mapping(lo.start, hi.end, lo.host, lo.writable, lo.executable)
            merged.append(cur)
        # issue 9: any region that leaves unicorn and comes back (merged) is a new RAM block;
        # QEMU's tracking of which pages hold translated code does not follow it, so guest
        # writes to code (Linux's ftrace/alternatives patching) would miss stale TBs: flush.
        replaced = bool(touched)
        for m in touched:
            self.uc.mem_unmap(m.start, m.end - m.start)
            i = self._maps.index(m)
            del self._maps[i]
            del self._starts[i]
        for m in merged:
            self.uc.mem_map_ptr(m.start, m.end - m.start, m.perms, m.host)
            i = bisect.bisect_left(self._starts, m.start)
            self._maps.insert(i, m)
            self._starts.insert(i, m.start)
        if replaced:  # code translated from the old contents must not run again
            self.flush_code()

    def flush_code(self) -> None:
        """Forget all translated code (as IC IALLU): call after writing guest memory that
        may already have run (loading a new image, reusing a page) from outside the guest."""
        self.uc.ctl_flush_tb()

    def _buddy(self, m: Mapping) -> Mapping | None:
        """The mapped region `m` may merge with: its binary buddy (same power-of-two size,
        aligned pair), contiguous in host memory, same permissions. Merging only buddies keeps
        a range mapped page by page at O(log n) regions while each page is remapped O(1) times
        amortised (unicorn's unmap costs a TLB flush per page, and every map or unmap is
        linear in the number of regions)."""
        size = m.end - m.start
        if size & (size - 1) or m.start % size:
            return None
        lo = m.start + size if (m.start // size) % 2 == 0 else m.start - size
        i = bisect.bisect_left(self._starts, lo)
        if i == len(self._maps) or self._starts[i] != lo:
            return None
        b = self._maps[i]
        if b.end - b.start != size or (b.writable, b.executable) != (m.writable, m.executable):
            return None
        if b.host - m.host != b.start - m.start:
            return None
        return b

    def _host_of(self, ipa: int) -> int | None:
        i = bisect.bisect_right(self._starts, ipa) - 1
        if i >= 0:
            m = self._maps[i]
            if ipa < m.end:
                return m.host + ipa - m.start
        return None

    # ---- guest memory (model-side reads, no stage-2 permission checks) -----------------
    def read_ipa(self, ipa: int, size: int) -> bytes | None:
        host = self._host_of(ipa)
        if host is None or self._host_of(ipa + size - 1) is None:
            return None
        return ctypes.string_at(host, size)

    def _read_u64(self, ipa: int) -> int | None:
        host = self._host_of(ipa)
        return None if host is None else ctypes.c_uint64.from_address(host).value

    def _fetch(self, va: int) -> int | None:
        """The instruction word at VA (through the guest's stage-1), None if unreachable."""
        w = self.translate(va, fetch=True)
        if w.ipa is None:
            return None
        host = self._host_of(w.ipa)
        return None if host is None else ctypes.c_uint32.from_address(host).value

    # ---- stage-1 walk -----------------------------------------------------------------
    def translate(
        self, va: int, *, write: bool = False, fetch: bool = False, el: int | None = None
    ) -> Walk:
        """Translate VA with the guest's stage-1 (EL1&0 regime) as the MMU would."""
        sctlr = self._cpr(SYS_REGS["SCTLR_EL1"])
        pstate = self.pstate
        if el is None:
            el = (pstate >> 2) & 3
        if not sctlr & SCTLR_ELx_M:
            return Walk(ipa=va & ((1 << 48) - 1)) if va < 1 << 48 else Walk(None, FSC.ADDRSZ)
        tcr = self._cpr(SYS_REGS["TCR_EL1"])
        upper = bool(va >> 55 & 1)
        if upper:
            tsz, epd, tg, tbi, hpd = (
                (tcr >> 16) & 63,
                tcr >> 23 & 1,
                (tcr >> 30) & 3,
                tcr >> 38 & 1,
                tcr >> 42 & 1,
            )
            granule = {1: 14, 2: 12, 3: 16}.get(tg, 12)
            ttbr = self._cpr(SYS_REGS["TTBR1_EL1"])
        else:
            tsz, epd, tg, tbi, hpd = (
                tcr & 63,
                tcr >> 7 & 1,
                (tcr >> 14) & 3,
                tcr >> 37 & 1,
                tcr >> 41 & 1,
            )
            granule = {0: 12, 1: 16, 2: 14}.get(tg, 12)
            ttbr = self._cpr(SYS_REGS["TTBR0_EL1"])
        if fetch:
            tbi = 0
        insize = 64 - max(tsz, 16)
        top = 56 if tbi else 64
        hi = (va & ((1 << top) - 1)) >> insize
        if hi != ((1 << (top - insize)) - 1 if upper else 0) or epd:
            return Walk(None, FSC.FAULT + 0)
        stride = granule - 3
        level = 4 - -(-(insize - granule) // stride)
        table = ttbr & 0x0000_FFFF_FFFF_FFFE
        table &= ~((1 << granule) - 1) if level > 0 else ~0
        ap_table, pxn_table, uxn_table = 0, 0, 0
        oa_mask = ((1 << 48) - 1) & ~((1 << granule) - 1)
        while True:
            shift = granule + (3 - level) * stride
            bits = min(stride, insize - shift)
            idx = (va >> shift) & ((1 << bits) - 1)
            desc_ipa = table + idx * 8
            desc = self._read_u64(desc_ipa)
            if desc is None:
                return Walk(None, FSC.SEA_TTW + max(level, 0), s2_ipa=desc_ipa)
            if not desc & 1:
                return Walk(None, FSC.FAULT + level)
            if level < 3 and desc & 2:  # table
                if not hpd:
                    ap_table |= (desc >> 61) & 3
                    pxn_table |= (desc >> 59) & 1
                    uxn_table |= (desc >> 60) & 1
                table = desc & oa_mask
                level += 1
                continue
            if level == 3 and not desc & 2:
                return Walk(None, FSC.FAULT + level)
            # (a block at level 0, or level 1 with 16K/64K granules, is architecturally a
            # translation fault; QEMU 5 takes it as a block, and the walk follows the CPU)
            block = 1 << shift
            out = (desc & ((1 << 48) - 1) & ~(block - 1)) | (va & (block - 1))
            if not desc & (1 << 10):
                return Walk(None, FSC.ACCESS + level)
            ap = (desc >> 6) & 3
            el0_ok = bool(ap & 1) and not ap_table & 1
            ro = bool(ap & 2) or bool(ap_table & 2)
            if fetch:
                xn = (desc >> 54 & 1) | uxn_table if el == 0 else (desc >> 53 & 1) | pxn_table
                writable_el0 = el0_ok and not ro
                if xn or (el == 1 and writable_el0) or (sctlr & SCTLR_ELx_WXN and not ro):
                    return Walk(None, FSC.PERM + level)
                if el == 0 and not el0_ok:
                    return Walk(None, FSC.PERM + level)
            else:
                if el == 0 and not el0_ok:
                    return Walk(None, FSC.PERM + level)
                if write and ro:
                    return Walk(None, FSC.PERM + level)
                if el == 1 and el0_ok and pstate & PSR_PAN_BIT:
                    return Walk(None, FSC.PERM + level)
            return Walk(ipa=out)

    # ---- running ------------------------------------------------------------------------
    def run(self, max_insns: int | None = None) -> Exit:
        """Run from the current PC until an exception EL2 would take (or the budget ends)."""
        self._exit = None
        self._mem_fault: int | None = None  # issue 9: the faulting access's PC
        self._ran = True
        pc = self._rd(A.UC_ARM64_REG_PC)
        try:
            self.uc.emu_start(pc, _UNTIL, 0, max_insns or 0)
        except UcError:
            if self._exit is None:
                raise
        ex = self._exit
        if ex is None:
            return Exit(ExitKind.BUDGET)
        self._exit = None
        trap_pc = getattr(self, "_sys_trap_pc", None)
        if trap_pc is not None:  # a trapped MRS: unicorn skipped it, the exit is on it
            self._sys_trap_pc = None
            self._wr(A.UC_ARM64_REG_PC, trap_pc)
        real_pc = self._mem_fault
        if real_pc is not None:
            # issue 9: unicorn's PC inside the memory hook (and after emu_start) is sometimes
            # stale, the start of the translation block rather than the access (seen with
            # Linux); `_on_mem` found the access itself: make PC point at it.
            self._mem_fault = None
            if real_pc != self._rd(A.UC_ARM64_REG_PC):
                self._wr(A.UC_ARM64_REG_PC, real_pc)
        return ex

    def _stop(self, ex: Exit) -> None:
        self._exit = ex
        self.uc.emu_stop()

    def _on_mem(
        self, uc: Uc, access: int, address: int, size: int, value: int, _data: object
    ) -> bool:
        """A stage-2 fault: `address` is the IPA (unicorn's physical address)."""
        pc = self._rd(A.UC_ARM64_REG_PC)
        unmapped = access in (UC_MEM_READ_UNMAPPED, UC_MEM_WRITE_UNMAPPED, UC_MEM_FETCH_UNMAPPED)
        fsc = (FSC.FAULT if unmapped else FSC.PERM) + 3
        if access in (UC_MEM_FETCH_UNMAPPED, UC_MEM_FETCH_PROT):
            self._exit = Exit(ExitKind.IABT, esr(EC.IABT_LOW, fsc), pc, hpfar_from_ipa(address))
            return False
        write = access in (UC_MEM_WRITE_UNMAPPED, UC_MEM_WRITE_PROT)
        insn = self._fetch(pc)
        acc = self._decode_mem(insn) if insn is not None else None
        if acc is None or not self._targets(acc, pc, address):  # issue 9: a stale PC
            found = self._access_pc(pc, address)
            if found is not None:
                pc = found
                insn = self._fetch(pc)
                acc = self._decode_mem(insn) if insn is not None else None
        if acc is not None:
            self._mem_fault = pc  # issue 9: the access's PC, restored after emu_start
        if acc is None:
            iss = abort_iss(fsc, write=write, fnv=True)
            self._exit = Exit(ExitKind.DABT, esr(EC.DABT_LOW, iss), 0, hpfar_from_ipa(address))
            return False
        va = acc.address(pc, self._x_or_sp)
        far = (va & ~0xFFF) | (address & 0xFFF)
        if far < va:
            far += PAGE_SIZE
        if acc.iss_valid:
            iss = abort_iss(
                fsc,
                write=write,
                size=acc.size,
                srt=acc.rt,
                sign=acc.sign,
                sf=acc.sf,
                acqrel=acc.acqrel,
            )
        else:
            iss = abort_iss(fsc, write=write)
        self._exit = Exit(
            ExitKind.DABT, esr(EC.DABT_LOW, iss), far & MASK64, hpfar_from_ipa(address)
        )
        return False

    def _targets(self, acc: decode.MemAccess, pc: int, address: int) -> bool:
        """Whether the access decoded at `pc` can have touched IPA `address` (page offset)."""
        va = acc.address(pc, self._x_or_sp) & MASK64
        far = (va & ~0xFFF) | (address & 0xFFF)
        if far < va:
            far += PAGE_SIZE
        if far >= va + max(acc.total, 1):
            return False
        w = self.translate(far, write=acc.store)
        ipa = w.ipa if w.ipa is not None else w.s2_ipa
        return ipa is not None and ipa >> 12 == address >> 12

    def _access_pc(self, pc: int, address: int) -> int | None:
        """issue 9: the load/store at or after `pc` (same translation block, straight line)
        that touches `address`, for when unicorn reports the block's start as PC."""
        for k in range(1, 64):
            p = pc + 4 * k
            insn = self._fetch(p)
            if insn is None:
                return None
            acc = self._decode_mem(insn)
            if acc is not None and self._targets(acc, p, address):
                return p
        return None

    def _on_intr(self, uc: Uc, intno: int, _data: object) -> None:
        pc = self._rd(A.UC_ARM64_REG_PC)
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
        el = (pstate >> 2) & 3
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
        fpen = (cpacr >> 20) & 3
        fp_trapped = fpen in (0, 2) or (fpen == 1 and el == 0)
        # (unicorn 2.1.4 never raises FP/SVE access traps: kept for a CPU model that does)
        if decode.is_fp_simd(insn) and fp_trapped:
            self._enter_el1(VECTOR_SYNC, pc, esr(EC.FP_ASIMD, ISS_CV_COND_AL))
            return
        if decode.is_sve(insn):
            zen = (cpacr >> 16) & 3
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
        el = (self.pstate >> 2) & 3
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
        self._cpw(_SPSR_EL1, pstate)
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


def mmio_read_value(esr_value: int, data: int) -> int:
    """The register value a load reporting `esr_value` (ISV = 1) gets from MMIO `data`."""
    sas = (esr_value >> 22) & 3
    bits = 8 << sas
    data &= (1 << bits) - 1
    if esr_value & (1 << 21) and data >> (bits - 1):  # SSE
        data -= 1 << bits
    data &= MASK64 if esr_value & (1 << 15) else 0xFFFF_FFFF  # SF
    return data


def complete_mmio_read(target: Core | CpuContext, esr_value: int, data: int) -> None:
    """Finish an emulated MMIO load on a `Core` or a saved `CpuContext`: Xt := data
    (extended per SAS/SSE/SF), PC += 4. `esr_value` must have ISV set."""
    if not esr_value & (1 << 24):
        raise ValueError(f"ESR {esr_value:#x} has no valid ISS (ISV = 0)")
    value = mmio_read_value(esr_value, data)
    srt = (esr_value >> 16) & 31
    if isinstance(target, Core):
        target.set_x(srt, value)
        target.skip()
    else:
        if srt != 31:
            target.x[srt] = value
        target.pc = (target.pc + 4) & MASK64
