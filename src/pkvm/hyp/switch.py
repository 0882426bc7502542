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


def kvm_vcpu_run(h: HypState, vcpu: PkvmHypVcpu) -> int:
    """`__kvm_vcpu_run`: enter the guest, return the exit code."""
    runner = getattr(h, "guest_runner", None)
    if runner is None:
        return ARM_EXCEPTION_IRQ
    return runner(h, vcpu)


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
