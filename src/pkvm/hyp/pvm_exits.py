"""Exits EL2 handles itself for a protected guest (7.2): pKVM's guest hypercalls
(`nvhe/pkvm.c: kvm_handle_pvm_hvc64`) and trapped system registers (`nvhe/sys_regs.c`).

A handler returns True to re-enter the guest, False to exit to the host.
"""

from __future__ import annotations

from typing import Final

from pkvm.errors import ENOENT
from pkvm.hyp.mem_protect import _warn
from pkvm.hyp.mem_protect_guest import __pkvm_guest_share_host, __pkvm_guest_unshare_host
from pkvm.hyp.pkvm_structs import PkvmHypVcpu
from pkvm.hyp.state import HypState
from pkvm.hyp.sys_regs import HOST, PVM_SYS_REG_DESCS, UNDEF, pvm_sysreg_access
from pkvm.machine.cpu import Core
from pkvm.machine.memory import PAGE_SHIFT, PAGE_SIZE

U64: Final = 0xFFFF_FFFF_FFFF_FFFF
SMCCC_RET_SUCCESS: Final = 0
SMCCC_RET_NOT_SUPPORTED: Final = U64
SMCCC_RET_INVALID_PARAMETER: Final = (-3) & U64

ARM_SMCCC_VENDOR_HYP_KVM_FEATURES_FUNC_ID: Final = 0x8600_0000
ARM_SMCCC_VENDOR_HYP_KVM_HYP_MEMINFO_FUNC_ID: Final = 0xC600_0002
ARM_SMCCC_VENDOR_HYP_KVM_MEM_SHARE_FUNC_ID: Final = 0xC600_0003
ARM_SMCCC_VENDOR_HYP_KVM_MEM_UNSHARE_FUNC_ID: Final = 0xC600_0004
PVM_FEATURES: Final = (1 << 0) | (1 << 2) | (1 << 3) | (1 << 4)

# The fake data abort `__pkvm_memshare_page_req` makes the host take for an unmapped IPA.
FAKE_ABORT_ESR: Final = 0x9200_0047
HPFAR_NS: Final = 1 << 63



def handle_pvm_hvc64(h: HypState, vcpu: PkvmHypVcpu, core: Core) -> bool:
    """Answer FEATURES / HYP_MEMINFO / MEM_SHARE / MEM_UNSHARE at EL2; anything else exits.
    Observers (`h.guest_hvc_watchers`, model bookkeeping) see copies of the registers."""
    if not h.guest_hvc_watchers:
        return _handle_pvm_hvc64(h, vcpu, core)
    entry = {"cpu": h.cpu, "handle": vcpu.vm.handle, "vcpu_idx": vcpu.vcpu_idx,
             "regs": [core.x(i) for i in range(4)], "pc": core.pc}
    for fn in h.guest_hvc_watchers:
        fn("entry", entry)
    handled = _handle_pvm_hvc64(h, vcpu, core)
    out = {"cpu": h.cpu, "regs": [core.x(i) for i in range(4)], "pc": core.pc,
           "handled": handled, "fault": (vcpu.fault_esr, vcpu.fault_hpfar)}
    for fn in h.guest_hvc_watchers:
        fn("exit", out)
    return handled


def _handle_pvm_hvc64(h: HypState, vcpu: PkvmHypVcpu, core: Core) -> bool:
    fid = core.x(0) & 0xFFFF_FFFF
    a1, a2, a3 = core.x(1), core.x(2), core.x(3)
    ret = [SMCCC_RET_INVALID_PARAMETER, 0, 0, 0]
    if fid == ARM_SMCCC_VENDOR_HYP_KVM_FEATURES_FUNC_ID:
        ret[0] = PVM_FEATURES
    elif fid == ARM_SMCCC_VENDOR_HYP_KVM_HYP_MEMINFO_FUNC_ID:
        if not (a1 or a2 or a3):
            ret[0] = PAGE_SIZE
    elif fid == ARM_SMCCC_VENDOR_HYP_KVM_MEM_SHARE_FUNC_ID:
        if not (a2 or a3) and not a1 & (PAGE_SIZE - 1):
            err = __pkvm_guest_share_host(h, vcpu, a1 >> PAGE_SHIFT)
            if err == -ENOENT:
                return memshare_page_req(vcpu, core, a1)
            if not err:
                ret[0] = SMCCC_RET_SUCCESS
    elif fid == ARM_SMCCC_VENDOR_HYP_KVM_MEM_UNSHARE_FUNC_ID:
        if not (a2 or a3) and not a1 & (PAGE_SIZE - 1):
            if not __pkvm_guest_unshare_host(h, vcpu, a1 >> PAGE_SHIFT):
                ret[0] = SMCCC_RET_SUCCESS
    else:
        return False
    for i, v in enumerate(ret):
        core.set_x(i, v)
    return True


def memshare_page_req(vcpu: PkvmHypVcpu, core: Core, ipa: int) -> bool:
    """The page to share is not mapped yet: make the host fault it in; the HVC replays."""
    vcpu.fault_esr = FAKE_ABORT_ESR
    vcpu.fault_hpfar = (HPFAR_NS | (ipa >> 8)) & ~0xF
    vcpu.fault_far = 0
    core.pc = core.pc - 4
    return False


def handle_pvm_sysreg(h: HypState, vcpu: PkvmHypVcpu, core: Core, esr: int) -> bool:
    """`kvm_handle_pvm_sysreg`: the kernel's table decides (`pkvm.hyp.sys_regs`). Registers
    outside it that only trap here because the emulated CPU lacks them (the GIC CPU interface,
    the timers) go to the host, which emulates them; anything else is UNDEF for the guest."""
    op0, op2, op1, crn = (esr >> 20) & 3, (esr >> 17) & 7, (esr >> 14) & 7, (esr >> 10) & 15
    rt, crm, read = (esr >> 5) & 31, (esr >> 1) & 15, esr & 1
    enc = (op0, op1, crn, crm, op2)
    if enc not in PVM_SYS_REG_DESCS and op0 == 3 and op1 in (0, 3) and crn in (12, 14):
        return False  # the GIC CPU interface and the timer: the host emulates them
    regval = core.x(rt) if rt != 31 else 0
    kind, value = pvm_sysreg_access(vcpu.vm, enc, not read, regval)
    if kind == HOST:
        return False
    if kind in (UNDEF, "idst"):
        core.inject_undef() if kind == UNDEF else core.inject_sync(esr, 0)
        return True
    if kind == "warn":
        _warn(h, True)  # read_id_reg: the VM's ID registers were never initialised
    if read and rt != 31:
        core.set_x(rt, value)
    core.skip()
    return True
