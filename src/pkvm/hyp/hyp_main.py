"""Host hypercall dispatch (`nvhe/hyp-main.c`).

`handle_host_hcall` decodes x0 as Linux does (clear the SVE hint bit 16, subtract the vendor-hyp
fast-call base from all 64 bits), applies the profile's gate (boot-time calls before finalise,
pKVM calls after), writes x0 = SMCCC_RET_SUCCESS and runs the handler. Each handler reads its
arguments in one place with their C types (`HostCtxt.u64`, `.handle`, `.u32` ...) from the saved
host registers and writes its result in one place (`HostCtxt.ret`), as Linux's `DECLARE_REG` /
`cpu_reg` do; nothing else in the hyp touches host registers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from pkvm.abi.host_structs import IFLAG_INCREMENT_PC, KVM_VCPU
from pkvm.abi.profiles import ARM_SMCCC_CALL_HINTS, Profile
from pkvm.errors import EINVAL, ENODEV
from pkvm.hyp import mem_protect_guest as mpg
from pkvm.hyp import pkvm, pkvm_one_phase, pkvm_two_phase, tlb
from pkvm.hyp.ffa import hyp_ffa_init, kvm_host_ffa_handler
from pkvm.hyp.mem_protect import __pkvm_host_share_hyp, __pkvm_host_unshare_hyp
from pkvm.hyp.mm import SHORT_MAX, el2_read, el2_write_u64, kern_hyp_va
from pkvm.hyp.panic import HypBug
from pkvm.hyp.pkvm_structs import PkvmHypVcpu, PkvmHypVm
from pkvm.hyp.psci_relay import kvm_host_psci_handler
from pkvm.hyp.setup import pkvm_init, pkvm_prot_finalize
from pkvm.hyp.state import HypState
from pkvm.hyp.switch import HCR_TWE, HCR_TWI

U64: Final = 0xFFFF_FFFF_FFFF_FFFF
SMCCC_RET_SUCCESS: Final = 0
SMCCC_RET_NOT_SUPPORTED: Final = U64  # -1


class HostCtxt:
    """The host's saved registers at an HVC, with typed accessors (`DECLARE_REG`)."""

    __slots__ = ("regs", "h")

    def __init__(self, h: HypState, regs: list[int]):
        self.h = h
        self.regs = regs

    def u64(self, n: int) -> int:
        v = self.regs[n]
        return v & U64 if v >> 64 else v  # (a register the door filled: no new int)

    def u32(self, n: int) -> int:
        return self.regs[n] & 0xFFFF_FFFF

    def s32(self, n: int) -> int:
        v = self.regs[n] & 0xFFFF_FFFF
        return v - (1 << 32) if v & 0x8000_0000 else v

    def bool(self, n: int) -> bool:
        """`DECLARE_REG(bool, ...)`: a C conversion to bool, true for any non-zero register."""
        return (self.regs[n] & U64) != 0

    def handle(self, n: int) -> int:
        """`pkvm_handle_t`: 32 bits in 6.12, 16 in 7.2."""
        return self.h.profile.handle(self.regs[n])

    def host_ptr(self, n: int) -> int:
        """A host kernel pointer, turned into a hyp VA with `kern_hyp_va`."""
        return kern_hyp_va(self.h, self.regs[n])

    def ret(self, value: int) -> None:
        self.regs[1] = value if 0 <= value <= SHORT_MAX else value & U64  # (no long mask)


Handler = Callable[[HypState, HostCtxt], None]
HANDLERS: dict[str, Handler] = {}


def host_hcall(name: str) -> Callable[[Handler], Handler]:
    """Register the handler of host hypercall `name` (in whichever profiles have it)."""

    def register(fn: Handler) -> Handler:
        HANDLERS[name] = fn
        _HOST_HCALL.clear()
        return fn

    return register


# `host_hcall[]`: one profile's handlers indexed by function number, built once per profile
# (after every handler below has registered) so that a call costs one tuple index.
_HOST_HCALL: dict[str, tuple[tuple[str, Handler | None], ...]] = {}


def host_hcall_table(prof: Profile) -> tuple[tuple[str, Handler | None], ...]:
    table = _HOST_HCALL.get(prof.name)
    if table is None:
        table = _HOST_HCALL[prof.name] = tuple((name, HANDLERS.get(name)) for name in prof.hcalls)
    return table


def handle_host_hcall(h: HypState, regs: list[int]) -> str | None:
    """Dispatch the HVC in `regs` (x0.. of the calling CPU); returns the call's name or None."""
    prof = h.profile
    n = prof.decode(regs[0])
    if n is None or not prof.gate(n, h.protected_mode_initialized):
        regs[0] = SMCCC_RET_NOT_SUPPORTED
        return None
    name, handler = host_hcall_table(prof)[n]
    if handler is None:
        regs[0] = SMCCC_RET_NOT_SUPPORTED
        return None
    regs[0] = SMCCC_RET_SUCCESS
    handler(h, HostCtxt(h, regs))
    return name


# -- boot-time calls ------------------------------------------------------------------------
@host_hcall("__pkvm_init")
def handle___pkvm_init(h: HypState, c: HostCtxt) -> None:
    ret = pkvm_init(h, c.u64(1), c.u64(2))
    if not ret:  # __pkvm_init_finalise sets the FF-A proxy up
        ret = hyp_ffa_init(h)
    c.ret(ret)


@host_hcall("__kvm_get_mdcr_el2")
def handle___kvm_get_mdcr_el2(h: HypState, c: HostCtxt) -> None:
    c.ret(0)


@host_hcall("__pkvm_create_private_mapping")
def handle___pkvm_create_private_mapping(h: HypState, c: HostCtxt) -> None:
    c.ret(0)


@host_hcall("__pkvm_cpu_set_vector")
def handle___pkvm_cpu_set_vector(h: HypState, c: HostCtxt) -> None:
    c.ret(0)


@host_hcall("__kvm_enable_ssbs")
def handle___kvm_enable_ssbs(h: HypState, c: HostCtxt) -> None:
    pass


@host_hcall("__vgic_v3_init_lrs")
def handle___vgic_v3_init_lrs(h: HypState, c: HostCtxt) -> None:
    pass


@host_hcall("__vgic_v3_get_gic_config")
def handle___vgic_v3_get_gic_config(h: HypState, c: HostCtxt) -> None:
    c.ret(0)


@host_hcall("__pkvm_prot_finalize")
def handle___pkvm_prot_finalize(h: HypState, c: HostCtxt) -> None:
    h.protected_mode_initialized = True  # the static key is set before the per-CPU calls
    c.ret(pkvm_prot_finalize(h))


# -- host <-> hyp sharing ---------------------------------------------------------------------
@host_hcall("__pkvm_host_share_hyp")
def handle___pkvm_host_share_hyp(h: HypState, c: HostCtxt) -> None:
    c.ret(__pkvm_host_share_hyp(h, c.u64(1)))


@host_hcall("__pkvm_host_unshare_hyp")
def handle___pkvm_host_unshare_hyp(h: HypState, c: HostCtxt) -> None:
    c.ret(__pkvm_host_unshare_hyp(h, c.u64(1)))


# -- calls that dereference a host structure and otherwise only flush -------------------------
def _deref(h: HypState, c: HostCtxt, n: int, size: int = 8) -> bytes:
    """Read a host struct the way EL2 does: through its stage-1 (unmapped: hyp panic)."""
    return el2_read(h, c.host_ptr(n), size)


@host_hcall("__kvm_flush_vm_context")
def handle___kvm_flush_vm_context(h: HypState, c: HostCtxt) -> None:
    pass


@host_hcall("__kvm_tlb_flush_vmid_ipa")
def handle___kvm_tlb_flush_vmid_ipa(h: HypState, c: HostCtxt) -> None:
    tlb.__kvm_tlb_flush_vmid_ipa(h, c.host_ptr(1), c.u64(2), c.s32(3))


@host_hcall("__kvm_tlb_flush_vmid_ipa_nsh")
def handle___kvm_tlb_flush_vmid_ipa_nsh(h: HypState, c: HostCtxt) -> None:
    tlb.__kvm_tlb_flush_vmid_ipa_nsh(h, c.host_ptr(1), c.u64(2), c.s32(3))


@host_hcall("__kvm_tlb_flush_vmid_range")
def handle___kvm_tlb_flush_vmid_range(h: HypState, c: HostCtxt) -> None:
    tlb.__kvm_tlb_flush_vmid_range(h, c.host_ptr(1), c.u64(2), c.u64(3))


@host_hcall("__kvm_tlb_flush_vmid")
def handle___kvm_tlb_flush_vmid(h: HypState, c: HostCtxt) -> None:
    tlb.__kvm_tlb_flush_vmid(h, c.host_ptr(1))


@host_hcall("__kvm_flush_cpu_context")
def handle___kvm_flush_cpu_context(h: HypState, c: HostCtxt) -> None:
    tlb.__kvm_flush_cpu_context(h, c.host_ptr(1))


@host_hcall("__kvm_timer_set_cntvoff")
def handle___kvm_timer_set_cntvoff(h: HypState, c: HostCtxt) -> None:
    h.el2[h.cpu].cntvoff_el2 = c.u64(1)


def _vgic_cpu_if(h: HypState, c: HostCtxt) -> None:
    _deref(h, c, 1, 16)


for _name in ("__vgic_v3_save_vmcr_aprs", "__vgic_v3_save_aprs", "__vgic_v3_restore_vmcr_aprs"):
    host_hcall(_name)(_vgic_cpu_if)


def _vgic_v5(h: HypState, c: HostCtxt) -> None:
    raise HypBug("GICv5 system register access at EL2 on a GICv3 machine: undefined instruction")


for _name in ("__vgic_v5_save_apr", "__vgic_v5_restore_vmcr_apr"):
    host_hcall(_name)(_vgic_v5)


@host_hcall("__pkvm_vcpu_init_traps")
def handle___pkvm_vcpu_init_traps(h: HypState, c: HostCtxt) -> None:
    va = c.host_ptr(1)
    el2_read(h, va, 8)
    el2_write_u64(h, va + KVM_VCPU.offset("arch.mdcr_el2"), 0)


def _tracing_absent(h: HypState, c: HostCtxt) -> None:
    c.ret(-ENODEV)


for _name in ("__tracing_load", "__tracing_enable", "__tracing_swap_reader", "__tracing_reset",
              "__tracing_enable_event"):
    host_hcall(_name)(_tracing_absent)


def _noop(h: HypState, c: HostCtxt) -> None:
    pass


for _name in ("__tracing_unload", "__tracing_update_clock", "__tracing_write_event"):
    host_hcall(_name)(_noop)


# -- hyp VMs and vCPUs (nvhe/pkvm.c) ---------------------------------------------------------
@host_hcall("__pkvm_init_vm")
def handle___pkvm_init_vm(h: HypState, c: HostCtxt) -> None:
    c.ret(pkvm.__pkvm_init_vm(h, c.host_ptr(1), c.host_ptr(2), c.host_ptr(3)))


@host_hcall("__pkvm_init_vcpu")
def handle___pkvm_init_vcpu(h: HypState, c: HostCtxt) -> None:
    c.ret(pkvm.__pkvm_init_vcpu(h, c.handle(1), c.host_ptr(2), c.host_ptr(3)))


@host_hcall("__pkvm_teardown_vm")
def handle___pkvm_teardown_vm(h: HypState, c: HostCtxt) -> None:
    c.ret(pkvm_one_phase.__pkvm_teardown_vm(h, c.handle(1)))


@host_hcall("__pkvm_reserve_vm")
def handle___pkvm_reserve_vm(h: HypState, c: HostCtxt) -> None:
    c.ret(pkvm_two_phase.__pkvm_reserve_vm(h))


@host_hcall("__pkvm_unreserve_vm")
def handle___pkvm_unreserve_vm(h: HypState, c: HostCtxt) -> None:
    pkvm_two_phase.__pkvm_unreserve_vm(h, c.handle(1))


@host_hcall("__pkvm_start_teardown_vm")
def handle___pkvm_start_teardown_vm(h: HypState, c: HostCtxt) -> None:
    c.ret(pkvm_two_phase.__pkvm_start_teardown_vm(h, c.handle(1)))


@host_hcall("__pkvm_finalize_teardown_vm")
def handle___pkvm_finalize_teardown_vm(h: HypState, c: HostCtxt) -> None:
    c.ret(pkvm_two_phase.__pkvm_finalize_teardown_vm(h, c.handle(1)))


@host_hcall("__pkvm_reclaim_dying_guest_page")
def handle___pkvm_reclaim_dying_guest_page(h: HypState, c: HostCtxt) -> None:
    c.ret(pkvm_two_phase.__pkvm_reclaim_dying_guest_page(h, c.handle(1), c.u64(2)))


@host_hcall("__pkvm_force_reclaim_guest_page")
def handle___pkvm_force_reclaim_guest_page(h: HypState, c: HostCtxt) -> None:
    c.ret(mpg.__pkvm_host_force_reclaim_page_guest(h, c.u64(1)))


@host_hcall("__pkvm_vcpu_load")
def handle___pkvm_vcpu_load(h: HypState, c: HostCtxt) -> None:
    vcpu = pkvm_two_phase.pkvm_load_hyp_vcpu(h, c.handle(1), c.u32(2))
    if vcpu is None:
        return
    hcr = c.u64(3)
    if vcpu.vm.is_protected:
        mask = HCR_TWI | HCR_TWE
        vcpu.hcr_el2 = (vcpu.hcr_el2 & ~mask) | (hcr & mask)


@host_hcall("__pkvm_vcpu_put")
def handle___pkvm_vcpu_put(h: HypState, c: HostCtxt) -> None:
    vcpu = pkvm.pkvm_get_loaded_hyp_vcpu(h)
    if vcpu is not None:
        pkvm_two_phase.pkvm_put_hyp_vcpu(h, vcpu)


@host_hcall("__kvm_vcpu_run")
def handle___kvm_vcpu_run(h: HypState, c: HostCtxt) -> None:
    c.ret(h.life.handle_vcpu_run(h, c.host_ptr(1)))


@host_hcall("__kvm_adjust_pc")
def handle___kvm_adjust_pc(h: HypState, c: HostCtxt) -> None:
    va = c.host_ptr(1)
    iflags = pkvm.vcpu_field(h, va, "arch.iflags")
    if iflags & IFLAG_INCREMENT_PC:
        pc = pkvm.vcpu_field(h, va, "arch.ctxt.pc")
        el2_write_u64(h, va + KVM_VCPU.offset("arch.ctxt.pc"), pc + 4)
        el2_write_u64(h, va + KVM_VCPU.offset("arch.iflags"), iflags & ~IFLAG_INCREMENT_PC)


def _loaded(h: HypState, protected: bool | None) -> PkvmHypVcpu | None:
    vcpu = pkvm.pkvm_get_loaded_hyp_vcpu(h)
    if vcpu is None or (protected is not None and vcpu.vm.is_protected != protected):
        return None
    return vcpu


@host_hcall("__pkvm_host_donate_guest")
def handle___pkvm_host_donate_guest(h: HypState, c: HostCtxt) -> None:
    vcpu = _loaded(h, True)
    if vcpu is None:
        c.ret(-EINVAL)
        return
    ret = pkvm.pkvm_refill_memcache(h, vcpu)
    if not ret:
        ret = mpg.__pkvm_host_donate_guest(h, c.u64(1), c.u64(2), vcpu)
    c.ret(ret)


@host_hcall("__pkvm_host_share_guest")
def handle___pkvm_host_share_guest(h: HypState, c: HostCtxt) -> None:
    vcpu = _loaded(h, False)
    if vcpu is None:
        c.ret(-EINVAL)
        return
    ret = pkvm.pkvm_refill_memcache(h, vcpu)
    if not ret:
        ret = mpg.__pkvm_host_share_guest(h, c.u64(1), c.u64(2), c.u64(3), vcpu, c.u64(4))
    c.ret(ret)


def _np_by_handle(h: HypState, c: HostCtxt, fn: Callable[[PkvmHypVm], int]) -> None:
    vm = pkvm.get_np_pkvm_hyp_vm(h, c.handle(1))
    if vm is None:
        c.ret(-EINVAL)
        return
    try:
        c.ret(fn(vm))
    finally:
        pkvm.put_pkvm_hyp_vm(h, vm)


@host_hcall("__pkvm_host_unshare_guest")
def handle___pkvm_host_unshare_guest(h: HypState, c: HostCtxt) -> None:
    _np_by_handle(h, c, lambda vm: mpg.__pkvm_host_unshare_guest(h, c.u64(2), c.u64(3), vm))


@host_hcall("__pkvm_host_wrprotect_guest")
def handle___pkvm_host_wrprotect_guest(h: HypState, c: HostCtxt) -> None:
    _np_by_handle(h, c, lambda vm: mpg.__pkvm_host_wrprotect_guest(h, c.u64(2), c.u64(3), vm))


@host_hcall("__pkvm_host_test_clear_young_guest")
def handle___pkvm_host_test_clear_young_guest(h: HypState, c: HostCtxt) -> None:
    _np_by_handle(h, c, lambda vm: mpg.__pkvm_host_test_clear_young_guest(
        h, c.u64(2), c.u64(3), c.bool(4), vm))


@host_hcall("__pkvm_host_relax_perms_guest")
def handle___pkvm_host_relax_perms_guest(h: HypState, c: HostCtxt) -> None:
    vcpu = _loaded(h, False)
    c.ret(-EINVAL if vcpu is None else mpg.__pkvm_host_relax_perms_guest(h, c.u64(1), c.u64(2), vcpu))


@host_hcall("__pkvm_host_mkyoung_guest")
def handle___pkvm_host_mkyoung_guest(h: HypState, c: HostCtxt) -> None:
    vcpu = _loaded(h, False)
    c.ret(-EINVAL if vcpu is None else mpg.__pkvm_host_mkyoung_guest(h, c.u64(1), vcpu))


@host_hcall("__pkvm_vcpu_in_poison_fault")
def handle___pkvm_vcpu_in_poison_fault(h: HypState, c: HostCtxt) -> None:
    vcpu = _loaded(h, None)
    c.ret(-EINVAL if vcpu is None else mpg.vcpu_in_poison_fault(h, vcpu))


@host_hcall("__pkvm_tlb_flush_vmid")
def handle___pkvm_tlb_flush_vmid(h: HypState, c: HostCtxt) -> None:
    vm = pkvm.get_np_pkvm_hyp_vm(h, c.handle(1))
    if vm is not None:
        pkvm.put_pkvm_hyp_vm(h, vm)


# -- the host's SMC door (`handle_host_smc`) ---------------------------------------------------
def handle_host_smc(h: HypState, regs: list[int], imm: int = 0) -> str:
    """A host `smc #imm` trapped to EL2 (HCR_EL2.TSC) with x0..x17 in `regs`; returns the path
    it took: "refused" (7.2: non-zero immediate or bits 63:32 set), "psci", "ffa" or "el3".
    The caller advances the host's PC past the SMC (`kvm_skip_host_instr`)."""
    func_id = regs[0] & U64
    if h.profile.smc_refuses_imm_and_upper and imm:
        regs[0] = SMCCC_RET_NOT_SUPPORTED
        return "refused"
    func_id &= ~ARM_SMCCC_CALL_HINTS
    if h.profile.smc_refuses_imm_and_upper and func_id >> 32:
        regs[0] = SMCCC_RET_NOT_SUPPORTED
        return "refused"
    fid = func_id & 0xFFFF_FFFF  # the relay and the proxy take a u32
    if kvm_host_psci_handler(h, regs, fid):
        return "psci"
    if kvm_host_ffa_handler(h, regs, fid):
        return "ffa"
    default_host_smc_handler(h, regs)
    return "el3"


def default_host_smc_handler(h: HypState, regs: list[int]) -> None:
    """`__kvm_hyp_host_forward_smc`: x0..x17 to EL3 exactly as the host left them, and back."""
    h.smc_to_el3(h.cpu, regs)
