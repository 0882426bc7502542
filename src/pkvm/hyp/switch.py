"""The vCPU run path (`hyp-main.c: handle___kvm_vcpu_run`, `nvhe/switch.c`).

flush (host vCPU -> hyp vCPU), world switch (run the guest until an exit EL2 takes), sync
(hyp vCPU -> host vCPU). What is copied in each direction follows `run-and-check.md` §1.2/§1.4:
the whole `arch.ctxt`, HCR (7.2: only TWI/TWE/VSE from the host), MDCR, `iflags`, and the fault
registers on the way out. The guest itself runs on `HypState.guest_runner` (the CPU emulator,
`pkvm.hyp.guest_run`); without one a run returns `ARM_EXCEPTION_IRQ` at once, as a CPU that took
an interrupt before the first guest instruction would.
"""

from __future__ import annotations

from pkvm.abi.host_structs import CTXT_END, CTXT_START, KVM_VCPU
from pkvm.errors import EINVAL
from pkvm.hyp.mm import el2_read, el2_write, el2_write_u64
from pkvm.hyp.pkvm import (
    PkvmHypVcpu,
    kvm_field,
    pkvm_get_loaded_hyp_vcpu,
    pkvm_load_hyp_vcpu,
    pkvm_put_hyp_vcpu,
    vcpu_field,
)
from pkvm.hyp.state import HypState

ARM_EXCEPTION_IRQ = 0
ARM_EXCEPTION_EL1_SERROR = 1
ARM_EXCEPTION_TRAP = 2
ARM_EXCEPTION_IL = 3

HCR_TWI = 1 << 13
HCR_TWE = 1 << 14
HCR_VSE = 1 << 8
RUNNING_VCPU_OFF = KVM_VCPU.offset("arch.ctxt.__hyp_running_vcpu") - CTXT_START


def flush_hyp_vcpu(h: HypState, vcpu: PkvmHypVcpu) -> None:
    hv = vcpu.host_vcpu
    ctxt = bytearray(el2_read(h, hv + CTXT_START, CTXT_END - CTXT_START))
    h.locks.preempt("host-read", "arch.ctxt")
    ctxt[RUNNING_VCPU_OFF : RUNNING_VCPU_OFF + 8] = bytes(8)
    vcpu.ctxt = bytes(ctxt)
    host_hcr = vcpu_field(h, hv, "arch.hcr_el2")
    if h.profile.hyp_owned_guest_stage2:
        mask = HCR_TWI | HCR_TWE | HCR_VSE
        vcpu.hcr_el2 = (vcpu.hcr_el2 & ~mask) | (host_hcr & mask)
    else:
        vcpu.hcr_el2 = host_hcr
    vcpu.mdcr_el2 = vcpu_field(h, hv, "arch.mdcr_el2")
    vcpu.iflags = vcpu_field(h, hv, "arch.iflags")


def sync_hyp_vcpu(h: HypState, vcpu: PkvmHypVcpu) -> None:
    hv = vcpu.host_vcpu
    el2_write(h, hv + CTXT_START, vcpu.ctxt)
    el2_write_u64(h, hv + KVM_VCPU.offset("arch.hcr_el2"), vcpu.hcr_el2)
    el2_write_u64(h, hv + KVM_VCPU.offset("arch.iflags"), vcpu.iflags)
    el2_write_u64(h, hv + KVM_VCPU.offset("arch.fault.esr_el2"), vcpu.fault_esr)
    el2_write_u64(h, hv + KVM_VCPU.offset("arch.fault.far_el2"), vcpu.fault_far)
    el2_write_u64(h, hv + KVM_VCPU.offset("arch.fault.hpfar_el2"), vcpu.fault_hpfar)


HPFAR_NS = 1 << 63
S2_XN_NONE = 0b10


def _core_for(h: HypState, vcpu: PkvmHypVcpu):
    """The CPU this hyp vCPU runs on (one emulator core per hyp vCPU, made at its first run)."""
    if vcpu.engine is None:
        from pkvm.machine.cpu import Core

        vcpu.engine = Core()
        vcpu.exit_data["view_cursor"] = 0
        pgt = vcpu.vm.pgt
        if pgt.touched is None:
            pgt.touched = []
        vcpu.exit_data["view_cursor"] = 0
        _sync_view(h, vcpu, vcpu.engine, full=True)
    return vcpu.engine


def _sync_view(h: HypState, vcpu: PkvmHypVcpu, core, full: bool = False) -> None:
    """Bring the emulator's stage-2 view up to date with the guest stage-2 (what changed)."""
    pgt = vcpu.vm.pgt
    touched = pgt.touched
    assert touched is not None
    if full:
        ranges = [(ipa, 1 << (12 + 9 * (3 - level))) for ipa, level, _ in pgt.leaves(valid_only=True)]
    else:
        cursor = vcpu.exit_data["view_cursor"]
        ranges = touched[cursor:]
    vcpu.exit_data["view_cursor"] = len(touched)
    mem = h.mem
    for addr, size in ranges:
        ipa = addr & ~0xFFF
        end = addr + size
        while ipa < end:
            ret, pte, level = pgt.get_leaf(ipa)
            gsize = 1 << (12 + 9 * (3 - level)) if not ret else 0x1000
            base = ipa & ~(gsize - 1)
            if not ret and pte & 1 and mem.range_is_ram(pte & 0xFFFF_FFFF_F000 & ~(gsize - 1), gsize):
                pa = pte & 0xFFFF_FFFF_F000 & ~(gsize - 1)
                core.map(base, gsize, mem.host_address(pa), writable=bool(pte & (1 << 7)),
                         executable=((pte >> 53) & 3) != S2_XN_NONE)
            else:
                core.unmap(base, gsize)
            ipa = base + gsize


def kvm_vcpu_run(h: HypState, vcpu: PkvmHypVcpu) -> int:
    """`__kvm_vcpu_run`: enter the guest, return the exit code."""
    runner = getattr(h, "guest_runner", None)
    if runner is not None:
        return runner(h, vcpu)
    if not h.profile.hyp_owned_guest_stage2:
        return ARM_EXCEPTION_IRQ  # 6.12 guests run on the host-managed stage-2: not modelled
    from pkvm.abi.host_structs import (
        IFLAG_INCREMENT_PC,
        IFLAG_PENDING_EXCEPTION,
        ctxt_pack,
        ctxt_unpack,
    )
    from pkvm.hyp.pvm_exits import handle_pvm_hvc64, handle_pvm_sysreg
    from pkvm.machine.cpu import ExitKind

    core = _core_for(h, vcpu)
    ctx = ctxt_unpack(vcpu.ctxt)
    if vcpu.iflags & IFLAG_INCREMENT_PC:  # __kvm_adjust_pc
        ctx.pc = (ctx.pc + 4) & 0xFFFF_FFFF_FFFF_FFFF
        vcpu.iflags &= ~IFLAG_INCREMENT_PC
    core.load_context(ctx)
    if vcpu.iflags & IFLAG_PENDING_EXCEPTION:
        core.inject_undef()
        vcpu.iflags &= ~IFLAG_PENDING_EXCEPTION
    protected = vcpu.vm.is_protected
    budget = getattr(h, "guest_timeslice", None)
    code = ARM_EXCEPTION_TRAP
    while True:
        _sync_view(h, vcpu, core)
        ex = core.run(budget)
        if ex.kind is ExitKind.BUDGET:
            code = ARM_EXCEPTION_IRQ
            break
        vcpu.fault_esr = ex.esr
        if ex.kind in (ExitKind.DABT, ExitKind.IABT):
            vcpu.fault_far = ex.far
            vcpu.fault_hpfar = ex.hpfar | HPFAR_NS
        if protected and ex.kind is ExitKind.HVC and handle_pvm_hvc64(h, vcpu, core):
            continue
        if protected and ex.kind is ExitKind.SYSREG and handle_pvm_sysreg(h, vcpu, core, ex.esr):
            continue
        break
    vcpu.ctxt = ctxt_pack(core.save_context(), vcpu.ctxt)
    return code


def handle_vcpu_run(h: HypState, host_vcpu_va: int) -> int:
    """The body of `handle___kvm_vcpu_run` in pKVM mode; returns x1."""
    prof = h.profile
    if prof.explicit_vcpu_load:
        vcpu = pkvm_get_loaded_hyp_vcpu(h)
        if vcpu is None:
            return -EINVAL
        flush_hyp_vcpu(h, vcpu)
        ret = kvm_vcpu_run(h, vcpu)
        sync_hyp_vcpu(h, vcpu)
        return ret
    # 6.12: look the hyp vCPU up from the host's vCPU on every run (plain host reads).
    from pkvm.hyp.mm import kern_hyp_va

    host_kvm = kern_hyp_va(h, vcpu_field(h, host_vcpu_va, "kvm"))
    handle = prof.handle(kvm_field(h, host_kvm, "arch.pkvm.handle"))
    idx = vcpu_field(h, host_vcpu_va, "vcpu_idx")
    h.locks.preempt("host-read", "vcpu->kvm->arch.pkvm.handle")
    vcpu = pkvm_load_hyp_vcpu(h, handle, idx & 0xFFFF_FFFF)
    if vcpu is None:
        return -EINVAL
    try:
        flush_hyp_vcpu(h, vcpu)
        ret = kvm_vcpu_run(h, vcpu)
        sync_hyp_vcpu(h, vcpu)
    finally:
        pkvm_put_hyp_vcpu(h, vcpu)
    return ret
