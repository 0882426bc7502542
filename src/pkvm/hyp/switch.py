"""The vCPU run path (`hyp-main.c: handle___kvm_vcpu_run`, `nvhe/switch.c`).

flush (host vCPU -> hyp vCPU), world switch (run the guest until an exit EL2 takes), sync
(hyp vCPU -> host vCPU). What is copied in each direction follows `flush_hyp_vcpu` / `sync_hyp_vcpu`:
the whole `arch.ctxt`, HCR (7.2: only TWI/TWE/VSE from the host), MDCR, `iflags`, and the fault
registers on the way out. The guest runs on a CPU emulator core (`pkvm.machine.cpu.Core`), one
per VM, until an exit EL2 takes or the physical timer (`HypState.guest_timeslice`) fires.
Which hyp vCPU a `__kvm_vcpu_run` runs is the kernel's life cycle (`HypState.life`).
"""

from __future__ import annotations

import struct
from typing import Any, Final

from pkvm.abi.host_structs import (
    CTXT_END,
    CTXT_RAW_SIZE,
    CTXT_REGS_SIZE,
    CTXT_START,
    IFLAG_INCREMENT_PC,
    IFLAG_PENDING_EXCEPTION,
    KVM,
    KVM_ARCH_FLAG_MTE_ENABLED,
    KVM_VCPU,
    ctxt_pack_raw,
    ctxt_sys_values,
)
from pkvm.errors import EINVAL
from pkvm.hyp.mm import el2_read, el2_read_u64, el2_write, kern_hyp_va
from pkvm.hyp.pgtable import KVM_PTE_ADDR_MASK, KVM_PTE_VALID, KvmPgtable, pte_table
from pkvm.hyp.pkvm import kvm_field, vcpu_field
from pkvm.hyp.pkvm_structs import HYP_VCPU, PkvmHypVcpu
from pkvm.hyp.pvm_exits import handle_pvm_hvc64, handle_pvm_sysreg
from pkvm.hyp.state import HypState
from pkvm.hyp.sys_regs import (
    KVM_ARM_VCPU_EL1_32BIT,
    KVM_ARM_VCPU_PTRAUTH_ADDRESS,
    KVM_ARM_VCPU_PTRAUTH_GENERIC,
    kvm_has_feat,
    vm_has_feature,
)
from pkvm.machine.cpu import (
    CNTHCTL_EL1PCTEN,
    SCR_EL3_API,
    SCR_EL3_APK,
    SYS_CNTHCTL_EL2,
    SYS_HCR_EL2,
    SYS_SCR_EL3,
    Core,
    CpuState,
    ExitKind,
)
from pkvm.machine.cpu_id import CTR_EL0
from pkvm.machine.memory import PAGE_SIZE, PhysMemory
from pkvm.machine.preempt import run_for

ARM_EXCEPTION_IRQ: Final = 0
ARM_EXCEPTION_EL1_SERROR: Final = 1
ARM_EXCEPTION_TRAP: Final = 2
ARM_EXCEPTION_IL: Final = 3

HCR_TWI: Final = 1 << 13
HCR_TWE: Final = 1 << 14
HCR_VSE: Final = 1 << 8
HCR_VI: Final = 1 << 7  # the host's virtual IRQ line (its emulated GIC's output)
U64: Final = 0xFFFF_FFFF_FFFF_FFFF
_FAULT: Final = struct.Struct("<3Q")  # esr_el2, far_el2, hpfar_el2: contiguous in arch.fault
_XREGS: Final = struct.Struct("<31Q")  # arch.ctxt.regs
_TABLE: Final = struct.Struct(f"<{PAGE_SIZE // 8}Q")  # one page-table page
# offsets in arch.ctxt (`Final`: compiled code reads them as constants, not from the module)
_SP_EL0: Final = 8 * 31
_PC: Final = 8 * 32
_PSTATE: Final = 8 * 33
RUNNING_VCPU_OFF: Final = KVM_VCPU.offset("arch.ctxt.__hyp_running_vcpu") - CTXT_START
# arch.{hcr_el2, hcrx_el2, mdcr_el2, iflags}: contiguous in kvm_vcpu (hcrx_el2 is skipped)
_TRAP_REGS: Final = struct.Struct("<Q8xQQ")
_HCR_OFF: Final = KVM_VCPU.offset("arch.hcr_el2")
_IFLAGS_OFF: Final = KVM_VCPU.offset("arch.iflags")
_FAULT_OFF: Final = KVM_VCPU.offset("arch.fault.esr_el2")
_U64: Final = struct.Struct("<Q")
_NULL_PTR: Final = bytes(8)
assert KVM_VCPU.offset("arch.mdcr_el2") == _HCR_OFF + 16
assert KVM_VCPU.offset("arch.iflags") == _HCR_OFF + 24
_HYP_FAULT_OFF: Final = HYP_VCPU["vcpu.arch.fault.esr_el2"][0]  # arch.fault in the hyp vCPU
assert HYP_VCPU["vcpu.arch.fault.hpfar_el2"][0] == _HYP_FAULT_OFF + 16


# -- the per-vCPU trap configuration (7.2 `nvhe/pkvm.c: pkvm_vcpu_init_traps`) ----------------
HCR_VM, HCR_SWIO, HCR_PTW, HCR_FMO, HCR_IMO, HCR_AMO = 1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5
HCR_FB, HCR_BSU_IS, HCR_TID1, HCR_TID2, HCR_TID3 = 1 << 9, 1 << 10, 1 << 16, 1 << 17, 1 << 18
HCR_TSC, HCR_TIDCP, HCR_TACR, HCR_TSW, HCR_RW = 1 << 19, 1 << 20, 1 << 21, 1 << 22, 1 << 31
HCR_E2H, HCR_TLOR, HCR_TERR, HCR_TEA, HCR_APK, HCR_API = 1 << 34, 1 << 35, 1 << 36, 1 << 37, 1 << 40, 1 << 41
HCR_FWB, HCR_FIEN, HCR_TID4, HCR_AMVOFFEN = 1 << 46, 1 << 47, 1 << 49, 1 << 51
HCR_ATA, HCR_DCT, HCR_TID5 = 1 << 56, 1 << 57, 1 << 58
HCR_GUEST_FLAGS: Final = (HCR_TSC | HCR_TSW | HCR_TWE | HCR_TWI | HCR_VM | HCR_BSU_IS | HCR_FB | HCR_TACR
                   | HCR_AMO | HCR_SWIO | HCR_TIDCP | HCR_RW | HCR_TLOR | HCR_FMO | HCR_IMO
                   | HCR_PTW | HCR_TID3 | HCR_TID1)
MDCR_HPMN_MASK, MDCR_TPMCR, MDCR_TPM, MDCR_HPME = 0x1F, 1 << 5, 1 << 6, 1 << 7
MDCR_TDA, MDCR_TDOSA, MDCR_TDRA, MDCR_E2PB_MASK = 1 << 9, 1 << 10, 1 << 11, 3 << 12
MDCR_TPMS, MDCR_TTRF, MDCR_E2TB_MASK, MDCR_TDCC, MDCR_MTPME = 1 << 14, 1 << 19, 3 << 24, 1 << 27, 1 << 28


def _sysf(h: HypState, reg: str, shift: int) -> int:
    """A field of the host's sanitised ID registers (what `cpus_have_final_cap` tests)."""
    return (h.sys_vals[reg] >> shift) & 0xF


def pkvm_vcpu_reset_hcr(h: HypState, vcpu: PkvmHypVcpu) -> int:
    """`pkvm_vcpu_reset_hcr`: KVM's guest flags and the bits the CPU's features ask for."""
    vm = vcpu.vm
    hcr = HCR_GUEST_FLAGS
    if _sysf(h, "ID_AA64MMFR1_EL1", 8):  # VHE hardware in protected mode: hVHE
        hcr |= HCR_E2H
    if _sysf(h, "ID_AA64PFR0_EL1", 28):  # ARM64_HAS_RAS_EXTN
        hcr |= HCR_TEA | HCR_TERR
    if _sysf(h, "ID_AA64MMFR2_EL1", 40):  # ARM64_HAS_STAGE2_FWB
        hcr |= HCR_FWB
    # ARM64_HAS_EVT and the VM's CTR_EL0 equal to the CPU's: TID4, else TID2.
    if _sysf(h, "ID_AA64MMFR2_EL1", 56) and kvm_field(h, vm.host_kvm, "arch.ctr_el0") == CTR_EL0:
        hcr |= HCR_TID4
    else:
        hcr |= HCR_TID2
    if vm_has_feature(vm, KVM_ARM_VCPU_EL1_32BIT) and _sysf(h, "ID_AA64PFR0_EL1", 4) == 2:
        hcr &= ~HCR_RW
    isar1 = h.sys_vals["ID_AA64ISAR1_EL1"]
    if isar1 & (0xFF << 4 | 0xFF << 24) and (
            vm_has_feature(vm, KVM_ARM_VCPU_PTRAUTH_ADDRESS | KVM_ARM_VCPU_PTRAUTH_GENERIC)):
        hcr |= HCR_API | HCR_APK
    if _sysf(h, "ID_AA64PFR1_EL1", 8) >= 2 and vm.flags & KVM_ARCH_FLAG_MTE_ENABLED:
        hcr |= HCR_ATA
    return hcr


def pvm_init_traps_hcr(vcpu: PkvmHypVcpu, hcr: int) -> int:
    vm = vcpu.vm
    hcr |= HCR_RW | HCR_TACR | HCR_TIDCP | HCR_TID3 | HCR_TID1
    if not kvm_has_feat(vm, "ID_AA64PFR0_EL1", 28, 1):  # RAS
        hcr = (hcr | HCR_TERR | HCR_TEA) & ~HCR_FIEN
    if not kvm_has_feat(vm, "ID_AA64PFR0_EL1", 44, 1):  # AMU
        hcr &= ~HCR_AMVOFFEN
    if not vm.flags & KVM_ARCH_FLAG_MTE_ENABLED:  # kvm_has_mte
        hcr = (hcr | HCR_TID5) & ~(HCR_DCT | HCR_ATA)
    if not kvm_has_feat(vm, "ID_AA64MMFR1_EL1", 16, 1):  # LO
        hcr |= HCR_TLOR
    return hcr


def pvm_init_traps_mdcr(vcpu: PkvmHypVcpu, mdcr: int) -> int:
    vm = vcpu.vm
    if not kvm_has_feat(vm, "ID_AA64DFR0_EL1", 8, 1):  # PMUVer
        mdcr = (mdcr | MDCR_TPM | MDCR_TPMCR) & ~(MDCR_HPME | MDCR_MTPME | MDCR_HPMN_MASK)
    if not kvm_has_feat(vm, "ID_AA64DFR0_EL1", 0, 6):  # DebugVer (IMP = 6)
        mdcr |= MDCR_TDRA | MDCR_TDA
    if not kvm_has_feat(vm, "ID_AA64DFR0_EL1", 36, 0, signed=True):  # DoubleLock
        mdcr |= MDCR_TDOSA
    if not kvm_has_feat(vm, "ID_AA64DFR0_EL1", 32, 1):  # PMSVer
        mdcr = (mdcr | MDCR_TPMS) & ~MDCR_E2PB_MASK
    if not kvm_has_feat(vm, "ID_AA64DFR0_EL1", 40, 1):  # TraceFilt
        mdcr |= MDCR_TTRF
    if not kvm_has_feat(vm, "ID_AA64DFR0_EL1", 44, 1):  # TraceBuffer
        mdcr &= ~MDCR_E2TB_MASK
    if not kvm_has_feat(vm, "ID_AA64MMFR0_EL1", 56, 1):  # FGT
        mdcr |= MDCR_TDCC
    return mdcr


def pkvm_check_pvm_cpu_features(vcpu: PkvmHypVcpu) -> int:
    vm = vcpu.vm
    if kvm_has_feat(vm, "ID_AA64PFR0_EL1", 0, 2) or kvm_has_feat(vm, "ID_AA64PFR0_EL1", 4, 2):
        return -EINVAL  # AArch32 at EL0 or EL1
    if not kvm_has_feat(vm, "ID_AA64PFR0_EL1", 16, 0, signed=True) or not kvm_has_feat(
            vm, "ID_AA64PFR0_EL1", 20, 0, signed=True):
        return -EINVAL  # FP and AdvSIMD
    if kvm_has_feat(vm, "ID_AA64PFR1_EL1", 24, 1):
        return -EINVAL  # SME
    return 0


def pkvm_vcpu_init_traps(h: HypState, vcpu: PkvmHypVcpu) -> int:
    """7.2's initial HCR_EL2 / MDCR_EL2 / HCRX_EL2 of a hyp vCPU (`init_pkvm_hyp_vcpu`)."""
    vcpu.mdcr_el2 = 0
    vcpu.hcr_el2 = pkvm_vcpu_reset_hcr(h, vcpu)
    if not vcpu.vm.is_protected:
        vcpu.hcrx_el2 = vcpu_field(h, vcpu.host_vcpu, "arch.hcrx_el2")  # trusted for np VMs
        return 0
    ret = pkvm_check_pvm_cpu_features(vcpu)
    if ret:
        return ret
    vcpu.hcr_el2 = pvm_init_traps_hcr(vcpu, vcpu.hcr_el2)
    vcpu.mdcr_el2 = pvm_init_traps_mdcr(vcpu, vcpu.mdcr_el2)
    if _sysf(h, "ID_AA64MMFR1_EL1", 40):  # ARM64_HAS_HCX: vcpu_set_hcrx
        vcpu.hcrx_el2 = HCRX_EL2_SMPME
    return 0


HCRX_EL2_SMPME: Final = 1 << 5


def _host_trap_regs(h: HypState, hv: int) -> tuple[int, int, int]:
    """`hcr_el2`, `mdcr_el2` and `iflags` of the host vCPU at `hv`, read as flush reads them.

    They are three words of one 32-byte span of `kvm_vcpu.arch` (`hcrx_el2` between): with no
    scheduler installed (no preemption point between the reads, so no other CPU can write in
    between) and the span in one page (one translation: the same fault, at the same address,
    as the first of the three reads), one read of the span gives what the three reads give."""
    va = hv + _HCR_OFF
    if h.locks.scheduler is None and (va & 0xFFF) <= PAGE_SIZE - _TRAP_REGS.size:
        hcr, mdcr, iflags = _TRAP_REGS.unpack(el2_read(h, va, _TRAP_REGS.size))
        return hcr, mdcr, iflags
    return (vcpu_field(h, hv, "arch.hcr_el2"), vcpu_field(h, hv, "arch.mdcr_el2"),
            vcpu_field(h, hv, "arch.iflags"))


def flush_hyp_vcpu(h: HypState, vcpu: PkvmHypVcpu) -> None:
    hv = vcpu.host_vcpu
    ctxt = el2_read(h, hv + CTXT_START, CTXT_END - CTXT_START)
    h.locks.preempt("host-read", "arch.ctxt")
    vcpu.ctxt = ctxt[:RUNNING_VCPU_OFF] + _NULL_PTR + ctxt[RUNNING_VCPU_OFF + 8 :]
    if not h.profile.hyp_owned_guest_stage2:
        # 6.12 reads its fields one by one, the stage-2's pgd (`hw_mmu`) among them
        _flush_6_12(h, vcpu, hv)
        return
    host_hcr, mdcr, iflags = _host_trap_regs(h, hv)
    _flush_hcr(h, vcpu, host_hcr)
    vcpu.mdcr_el2 = mdcr
    vcpu.iflags = iflags


def _flush_hcr(h: HypState, vcpu: PkvmHypVcpu, host_hcr: int) -> None:
    if h.profile.hyp_vcpu_init_traps:  # the hyp set the vCPU's traps up itself
        mask = HCR_TWI | HCR_TWE | HCR_VSE | HCR_VI  # VI: the host's emulated GIC
        vcpu.hcr_el2 = (vcpu.hcr_el2 & ~mask) | (host_hcr & mask)
    else:
        vcpu.hcr_el2 = host_hcr


def _flush_6_12(h: HypState, vcpu: PkvmHypVcpu, hv: int) -> None:
    _flush_hcr(h, vcpu, vcpu_field(h, hv, "arch.hcr_el2"))
    # 6.12 runs the guest on the stage-2 the host manages: its `hw_mmu`, read every run.
    mmu = kern_hyp_va(h, vcpu_field(h, hv, "arch.hw_mmu"))
    pgd_off = KVM.offset("arch.mmu.pgd_phys") - KVM.offset("arch.mmu.vmid")
    vcpu.exit_data["s2_pgd"] = el2_read_u64(h, mmu + pgd_off) & ~0xFFF
    vcpu.mdcr_el2 = vcpu_field(h, hv, "arch.mdcr_el2")
    vcpu.iflags = vcpu_field(h, hv, "arch.iflags")


def sync_hyp_vcpu(h: HypState, vcpu: PkvmHypVcpu) -> None:
    hv = vcpu.host_vcpu
    el2_write(h, hv + CTXT_START, vcpu.ctxt)
    el2_write(h, hv + _HCR_OFF, _U64.pack(vcpu.hcr_el2))
    el2_write(h, hv + _IFLAGS_OFF, _U64.pack(vcpu.iflags))
    el2_write(h, hv + _FAULT_OFF, vcpu.load(_HYP_FAULT_OFF, _FAULT.size))


HPFAR_NS: Final = 1 << 63
S2_XN_NONE: Final = 0b10


class _Engine:
    """The CPU emulator a VM's vCPUs run on, and what it holds.

    One per VM: unicorn's translated code and its view of the stage-2 are shared by the VM's
    vCPUs, as QEMU's single-threaded TCG runs all the CPUs of a machine on one translation
    cache. Code one vCPU patches (alternatives, ftrace, a page reused for user code) is then
    seen by the other at once (unicorn tracks writes to translated code within one engine; a
    separate engine per vCPU had to drop all its code whenever another vCPU had run). Each
    vCPU keeps its own CPU: its registers come from its context at entry, and the rest of the
    emulated CPU's state (exclusive monitor, HCR_EL2.VI, mode flags) is saved at the switch
    and restored when it runs again; the emulator's TLB, which knows no VMID or vCPU, is
    emptied then, as each physical CPU has its own."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.view_of: KvmPgtable | None = None  # the stage-2 the view mirrors
        self.view_cursor = 0  # how much of its `touched` log the view has applied
        self.host_s2: KvmPgtable | None = None  # 6.12: the host-managed stage-2, as EL2 walks it
        self.owner: PkvmHypVcpu | None = None  # whose registers the core holds
        self.saved: dict[int, CpuState] = {}  # vcpu_idx -> its emulated CPU's other state
        self.fresh = core.save_cpu_state()  # the state a vCPU's first entry starts from


def configure_guest_core(core: Core) -> None:
    """What EL2 sets on a CPU before it runs guests there."""
    # Trap the EL1 physical timer (CNTHCTL_EL2.EL1PCEN = 0, EL1PCTEN = 1) so the host can
    # emulate it (unicorn's timers are stubs); the counter stays direct.
    core.write_sysreg(SYS_CNTHCTL_EL2, CNTHCTL_EL1PCTEN)
    # Pointer authentication for the guest (HCR_EL2.APK|API), as KVM grants it after the
    # first trapped use; each vCPU's keys are in its context. IMO|FMO: HCR_EL2.VI then raises
    # a virtual IRQ.
    hcr = core.read_sysreg(SYS_HCR_EL2)
    core.write_sysreg(SYS_HCR_EL2, hcr | HCR_APK | HCR_API | HCR_IMO | HCR_FMO)
    # And SCR_EL3.APK|API, as firmware leaves them.
    core.write_sysreg(SYS_SCR_EL3, core.read_sysreg(SYS_SCR_EL3) | SCR_EL3_APK | SCR_EL3_API)


def _engine_for(h: HypState, vcpu: PkvmHypVcpu) -> _Engine:
    vm = vcpu.vm
    eng = vm.engine
    if eng is None:
        core = Core()
        configure_guest_core(core)
        if vm.is_protected and vcpu.hcr_el2 & HCR_TID3:
            core.trap_id_regs()  # the protected guest reads its sanitised ID registers
        eng = vm.engine = _Engine(core)
    vcpu.engine = eng.core
    return eng


def _engine_of(vcpu: PkvmHypVcpu) -> _Engine:
    """The engine of a vCPU's VM (made by `_engine_for` before the first run)."""
    eng = vcpu.vm.engine
    assert eng is not None, "a hyp vCPU ran before its VM had an engine"
    return eng


def _core_for(h: HypState, vcpu: PkvmHypVcpu) -> Core:
    """The CPU this hyp vCPU runs on, its stage-2 view up to date."""
    eng = _engine_for(h, vcpu)
    pgt = _guest_s2(h, vcpu)
    if pgt.touched is None:
        pgt.touched = []
    if eng.view_of is not pgt:
        eng.view_of = pgt
        eng.view_cursor = 0
        for m in eng.core.mappings():
            eng.core.unmap(m.start, m.end - m.start)
        _sync_view(h, vcpu, eng.core, full=True)
    return eng.core


def _switch_to(vcpu: PkvmHypVcpu, core: Core) -> None:
    """Put `vcpu` on its VM's engine if another vCPU ran there last."""
    eng = _engine_of(vcpu)
    prev = eng.owner
    if prev is vcpu:
        return
    if prev is not None:
        ctx = eng.saved.get(prev.vcpu_idx)
        if ctx is None:
            eng.saved[prev.vcpu_idx] = core.save_cpu_state()
        else:
            core.update_cpu_state(ctx)
    core.restore_cpu_state(eng.saved.get(vcpu.vcpu_idx, eng.fresh))
    core.flush_tlb()
    vcpu.exit_data.pop("synced", None)  # load the whole context
    eng.owner = vcpu


class _ReadOnlyTables:
    """mm_ops for walking a table EL2 does not own (6.12: the host's guest stage-2)."""

    def zalloc_page(self) -> None:
        return None

    def get_page(self, pa: int) -> None:
        raise AssertionError("EL2 never writes the host-managed stage-2")

    def put_page(self, pa: int) -> None:  # a method of its own: compiled, no alias in a class body
        raise AssertionError("EL2 never writes the host-managed stage-2")

    def page_count(self, pa: int) -> int:
        return 1


class _WalkedByHardware:
    """RAM as the MMU's stage-2 walker reads a table the host manages (6.12): the host may point
    a table descriptor anywhere, and a descriptor fetched from outside RAM is no translation (on
    the hardware the walk takes an external abort; either way the guest access faults to EL2
    and nothing is mapped there)."""

    def __init__(self, mem: PhysMemory):
        self._mem = mem

    def read_u64(self, pa: int) -> int:
        return self._mem.read_u64(pa) if self._mem.range_is_ram(pa, 8) else 0

    def write_u64(self, pa: int, value: int) -> None:
        raise AssertionError("EL2 never writes the host-managed stage-2")


def _guest_s2(h: HypState, vcpu: PkvmHypVcpu) -> KvmPgtable:
    """The stage-2 the guest runs on: 7.2 the hyp VM's own, 6.12 the host's (`hw_mmu`)."""
    if h.profile.hyp_owned_guest_stage2:
        return vcpu.vm.pgt
    pgd = vcpu.exit_data.get("s2_pgd", 0)
    eng = _engine_of(vcpu)
    cached = eng.host_s2
    if cached is None or cached.pgd != pgd:
        cached = KvmPgtable(_WalkedByHardware(h.mem), _ReadOnlyTables(), stage=2,
                            name="host-managed guest stage-2")
        cached.pgd = pgd if h.mem.is_ram(pgd) else 0
        eng.host_s2 = cached
    return cached


def _sync_view(h: HypState, vcpu: PkvmHypVcpu, core: Core, full: bool = False) -> None:
    """Bring the emulator's stage-2 view up to date with the guest stage-2 (what changed)."""
    pgt = _guest_s2(h, vcpu)
    if not pgt.pgd:
        return
    touched = pgt.touched
    assert touched is not None
    if full:
        ranges: list[tuple[int, int]] = []
        _valid_leaves(h.mem, pgt.pgd, pgt.start_level, 0, 1 << pgt.ia_bits, ranges)
    else:
        ranges = touched[_engine_of(vcpu).view_cursor :]
    _engine_of(vcpu).view_cursor = len(touched)
    mem = h.mem
    # Contiguous pieces with the same permissions go to the core as one range (each
    # core.map/unmap rebuilds unicorn regions, ~1 ms): a fault that mapped many pages costs one.
    run: list[Any] = []  # [base, size, host or None, writable, executable]
    out: list[list[Any]] = []
    for addr, size in ranges:
        ipa = addr & ~0xFFF
        end = addr + size
        while ipa < end:
            ret, pte, level = pgt.get_leaf(ipa)
            gsize = 1 << (12 + 9 * (3 - level)) if not ret else 0x1000
            base = ipa & ~(gsize - 1)
            if not ret and pte & 1 and mem.range_is_ram(pte & 0xFFFF_FFFF_F000 & ~(gsize - 1), gsize):
                pa = pte & 0xFFFF_FFFF_F000 & ~(gsize - 1)
                piece: list[Any] = [base, gsize, mem.host_address(pa), bool(pte & (1 << 7)),
                                    ((pte >> 53) & 3) != S2_XN_NONE]
            else:
                piece = [base, gsize, None, False, False]
            if run and run[0] + run[1] == base and (run[2] is None) == (piece[2] is None) and (
                run[2] is None or (run[2] + run[1] == piece[2] and run[3:] == piece[3:])
            ):
                run[1] += gsize
            else:
                if run:
                    out.append(run)
                run = piece
            ipa = base + gsize
    if run:
        out.append(run)
    for base, size, host, writable, executable in out:
        if host is None:
            core.unmap(base, size)
        else:
            core.map(base, size, host, writable=writable, executable=executable)


def _valid_leaves(mem: PhysMemory, table: int, level: int, base: int, end: int,
                  out: list[tuple[int, int]]) -> None:
    """Append (IPA, size) of each valid leaf under `table` (a table of `level` mapping from
    `base`) below `end`, ascending: what `KvmPgtable.leaves(valid_only=True)` finds, with each
    table page read whole rather than entry by entry (the first sync of a view reads a VM's
    whole stage-2). A table outside RAM reads as zeros, as the MMU's walker of a host-managed
    table sees it (`_WalkedByHardware`)."""
    if not mem.range_is_ram(table, PAGE_SIZE):
        return
    shift = 12 + 9 * (3 - level)
    for idx, pte in enumerate(_TABLE.unpack(mem.read(table, PAGE_SIZE))):
        addr = base + (idx << shift)
        if addr >= end:
            break
        if not pte & KVM_PTE_VALID:
            continue
        if pte_table(pte, level):
            _valid_leaves(mem, pte & KVM_PTE_ADDR_MASK, level + 1, addr, end, out)
        else:
            out.append((addr, 1 << shift))


def _refault(h: HypState, vcpu: PkvmHypVcpu, core: Core, ipa: int) -> bool:
    """6.12: the host changes its guest stage-2 without telling EL2, so a fault is checked
    against the table itself (a TLB never holds an invalid entry) before it exits."""
    pgt = _guest_s2(h, vcpu)
    if not pgt.pgd:
        return False
    ret, pte, _level = pgt.get_leaf(ipa)
    if ret or not pte & 1:
        return False
    before = core.mappings()
    pgt.touched = [(ipa & ~0xFFF, 0x1000)]
    _engine_of(vcpu).view_cursor = 0
    _sync_view(h, vcpu, core)
    return bool(core.mappings() != before)


def _load_context(vcpu: PkvmHypVcpu, core: Core, ctxt: bytes) -> int | None:
    """Put the flushed context `ctxt` on the CPU, applying `__kvm_adjust_pc`'s PC increment.

    The core still holds what the last sync copied out; when the host changed only general
    registers or the PC since (an MMIO completion), only those are written. Returns the PC
    the guest resumes at when it is left for the run to write (emu_start writes PC), else
    None (the CPU holds it)."""
    synced = vcpu.exit_data.get("synced")
    pc = int.from_bytes(ctxt[_PC:_PSTATE], "little")
    iflags = vcpu.iflags
    if iflags & IFLAG_INCREMENT_PC:
        pc = (pc + 4) & 0xFFFF_FFFF_FFFF_FFFF
        vcpu.iflags = iflags & ~IFLAG_INCREMENT_PC
    if synced is not None and ctxt[_PSTATE:CTXT_REGS_SIZE] == synced[_PSTATE:CTXT_REGS_SIZE] and (
            ctxt[_SP_EL0:_PC] == synced[_SP_EL0:_PC]):
        _load_changed_xregs(core, ctxt, synced)
        return pc
    core.load_raw(ctxt[:_PC] + pc.to_bytes(8, "little") + ctxt[_PSTATE:],
                  ctxt_sys_values(ctxt, core.sys_names))
    return None


def _load_changed_xregs(core: Core, ctxt: bytes, synced: bytes) -> None:
    """Write to the CPU each of x0..x30 that differs between `ctxt` and `synced`, in
    ascending order. The two register arrays as integers (little-endian: x0 in the low 64 bits)
    XORed give the differing bits; when they all lie in one register (an MMIO completion
    changes one) that register alone is written, else each register is compared."""
    diff = int.from_bytes(ctxt[:_SP_EL0], "little") ^ int.from_bytes(synced[:_SP_EL0], "little")
    if not diff:
        return
    lo = ((diff & -diff).bit_length() - 1) >> 6
    if (diff.bit_length() - 1) >> 6 == lo:
        core.set_x(lo, int.from_bytes(ctxt[8 * lo : 8 * lo + 8], "little"))
        return
    new, old = _XREGS.unpack_from(ctxt), _XREGS.unpack_from(synced)
    for i in range(lo, 31):
        if new[i] != old[i]:
            core.set_x(i, new[i])


def _sync_context(vcpu: PkvmHypVcpu, core: Core, base: bytes) -> None:
    """Copy the CPU's context out into the hyp vCPU (`__sysreg_save_state` and friends) over
    `base`, the hyp vCPU's context as the run began (only the run path writes it), remembering
    what was copied for the next `_load_context`."""
    raw, sysvals = core.save_raw()
    data = vcpu.exit_data
    synced = data.get("synced")
    if synced is not None and sysvals == data.get("synced_sys") and (
            base[CTXT_RAW_SIZE:CTXT_REGS_SIZE] == synced[CTXT_RAW_SIZE:CTXT_REGS_SIZE]):
        # the system registers as the last sync packed them: only the rest is new
        ctxt = raw + base[CTXT_RAW_SIZE:]
    else:
        ctxt = ctxt_pack_raw(raw, core.sys_names, sysvals, base)
        data["synced_sys"] = sysvals
    vcpu.ctxt = ctxt
    data["synced"] = ctxt


def kvm_vcpu_run(h: HypState, vcpu: PkvmHypVcpu) -> int:
    """`__kvm_vcpu_run`: enter the guest, return the exit code."""
    core = _core_for(h, vcpu)
    _switch_to(vcpu, core)  # the VM's vCPUs share one engine
    ctxt = vcpu.ctxt
    start = _load_context(vcpu, core, ctxt)
    iflags = vcpu.iflags
    if iflags & IFLAG_PENDING_EXCEPTION:
        if start is not None:
            core.pc = start
            start = None
        core.inject_undef()
        vcpu.iflags = iflags & ~IFLAG_PENDING_EXCEPTION
    # HCR_EL2.VI, the virtual IRQ the host's GIC asserts, goes into the CPU's HCR_EL2
    # (IMO is set): the CPU takes it itself, exactly when the guest unmasks PSTATE.I.
    vi = vcpu.hcr_el2 & HCR_VI
    if vi != vcpu.exit_data.get("hcr_vi", 0):
        core.write_sysreg(SYS_HCR_EL2, core.read_sysreg(SYS_HCR_EL2) & ~HCR_VI | vi)
        vcpu.exit_data["hcr_vi"] = vi
    protected = vcpu.vm.is_protected
    budget = h.guest_timeslice
    code = ARM_EXCEPTION_TRAP
    while True:
        _sync_view(h, vcpu, core)
        if isinstance(budget, float):  # a wall-clock slice (seconds)
            if start is not None:
                core.pc = start
            ex = run_for(core, budget)
        else:
            ex = core.run(budget, start)
        start = None
        if ex.kind is ExitKind.BUDGET:
            code = ARM_EXCEPTION_IRQ
            break
        if ex.kind in (ExitKind.DABT, ExitKind.IABT):
            if not h.profile.hyp_owned_guest_stage2 and _refault(h, vcpu, core, ex.ipa):
                vcpu.fault_esr = ex.esr
                continue  # the host mapped it meanwhile: the walk now succeeds
            # arch.fault.{esr,far,hpfar}_el2: three words in a row, stored at once
            hpfar = ex.hpfar | (HPFAR_NS if h.profile.fault_hpfar_ns_valid else 0)
            vcpu.store(_HYP_FAULT_OFF, _FAULT.pack(ex.esr, ex.far & U64, hpfar & U64))
        else:
            vcpu.fault_esr = ex.esr
        if protected and ex.kind is ExitKind.HVC and handle_pvm_hvc64(h, vcpu, core):
            continue
        if protected and ex.kind is ExitKind.SYSREG and handle_pvm_sysreg(h, vcpu, core, ex.esr):
            continue
        break
    if vi:  # an IRQ the CPU took wrote SPSR_EL1 behind the core's back
        core.invalidate_sys_shadow()
    _sync_context(vcpu, core, ctxt)
    return code
