"""The 7.2 shape of the VM life cycle (`nvhe/pkvm.c` of Linux 7.2; see `pkvm.VmLife`).

The host reserves a handle first (`__pkvm_reserve_vm`) and `__pkvm_init_vm` fills the reserved
slot; a hyp vCPU goes to the slot of its host index, in any order; the host loads a vCPU on a
CPU (`__pkvm_vcpu_load`, held until `__pkvm_vcpu_put`) and `__kvm_vcpu_run` runs the loaded one;
teardown starts (`is_dying`: guest pages can be reclaimed) and then finalises.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from pkvm.abi import sizes
from pkvm.abi.host_structs import KVM, KVM_ARCH_FLAG_ID_REGS_INITIALIZED, KVM_ARM_VCPU_PSCI_0_2
from pkvm.errors import EINVAL
from pkvm.hyp.mem_protect_guest import __pkvm_host_reclaim_page_guest
from pkvm.hyp.mm import el2_read_u64s
from pkvm.hyp.pkvm import (
    RESERVED_ENTRY,
    _teardown_hyp_memory,
    find_free_vm_table_entry,
    get_pkvm_hyp_vm,
    get_vm_by_handle,
    handle_to_idx,
    kvm_field,
    pkvm_get_loaded_hyp_vcpu,
    put_pkvm_hyp_vm,
    remove_vm_table_entry,
    vm_ref_dec,
    vm_ref_inc,
    vm_refcount,
)
from pkvm.hyp.pkvm_structs import PkvmHypVcpu, PkvmHypVm
from pkvm.hyp.state import HypState
from pkvm.hyp.switch import flush_hyp_vcpu, kvm_vcpu_run, pkvm_vcpu_init_traps, sync_hyp_vcpu
from pkvm.hyp.sys_regs import kvm_init_pvm_id_regs

# The guest stage-2's table pages go back in their own memcache (accounted as stage-2).
STAGE2_TEARDOWN_MC: Final = "stage2_teardown_mc"
_HOST_ID_REGS: Final = KVM.field("arch.id_regs")  # u64[], each element a host read


# -- the reserved handle -----------------------------------------------------------------------
def __pkvm_reserve_vm(h: HypState) -> int:
    with h.vm_table_lock:
        if not h.vm_table:
            return -EINVAL
        idx = find_free_vm_table_entry(h)
        if idx < 0:
            return idx
        h.vm_table[idx] = RESERVED_ENTRY
        return idx + sizes.HANDLE_OFFSET


def __pkvm_unreserve_vm(h: HypState, handle: int) -> None:
    if not h.vm_table:
        return
    with h.vm_table_lock:
        idx = handle_to_idx(handle)
        if idx < sizes.KVM_MAX_PVMS and h.vm_table[idx] is RESERVED_ENTRY:
            h.vm_table[idx] = None


def insert_vm_table_entry(h: HypState, handle: int, vm: PkvmHypVm) -> int:
    with h.vm_table_lock:
        idx = handle_to_idx(handle)
        if not h.vm_table or idx >= sizes.KVM_MAX_PVMS or h.vm_table[idx] is not RESERVED_ENTRY:
            return -EINVAL
        h.vm_table[idx] = vm
        return 0


# -- init -----------------------------------------------------------------------------------
def init_vm_handle(h: HypState, host_kvm: int) -> int:
    """The handle the host reserved, read from its `struct kvm`."""
    handle = h.profile.handle(kvm_field(h, host_kvm, "arch.pkvm.handle"))
    return handle if handle >= sizes.HANDLE_OFFSET else -EINVAL


def init_vm_arch(h: HypState, host_kvm: int, is_protected: bool) -> tuple[int, int]:
    """`pkvm_init_features_from_host`: a protected VM keeps only PSCI 0.2 of the host's
    features; a normal VM takes them all and the host's flags but ID_REGS_INITIALIZED."""
    host_flags = kvm_field(h, host_kvm, "arch.flags")
    host_features = kvm_field(h, host_kvm, "arch.vcpu_features")
    if is_protected:
        return 0, host_features & KVM_ARM_VCPU_PSCI_0_2
    return host_flags & ~KVM_ARCH_FLAG_ID_REGS_INITIALIZED, host_features


def insert_vm(h: HypState, handle: int, build: Callable[[int], PkvmHypVm],
              undo: Callable[[int], int]) -> int:
    """Build the VM under its reserved handle and fill the reserved slot; x1 = 0."""
    vm = build(handle)
    ret = insert_vm_table_entry(h, handle, vm)
    if ret:
        vm.pgt.destroy()
        return undo(ret)
    h.hyp_vms[vm.vm_va] = vm
    return 0


def init_vcpu_check(vm: PkvmHypVm) -> int:
    return 0


def init_vcpu_slot(h: HypState, vm: PkvmHypVm, host_idx: int) -> int:
    """The slot of the host vCPU's index, once the VM's ID registers are set up."""
    idx = host_idx
    if vm.is_protected:  # pkvm_vcpu_init_sysregs
        kvm_init_pvm_id_regs(vm, h.sys_vals)
    else:
        host_flags = kvm_field(h, vm.host_kvm, "arch.flags")
        if not host_flags & KVM_ARCH_FLAG_ID_REGS_INITIALIZED:
            return -EINVAL
        if not vm.id_regs_initialized:
            base = vm.host_kvm + _HOST_ID_REGS.offset
            vm.set_id_regs(tuple(el2_read_u64s(h, base, _HOST_ID_REGS.count)))
    bad_idx = idx < 0 or idx >= vm.created_vcpus
    if h.bug("vcpu-index-range") and idx >= 0:
        bad_idx = idx > len(vm.vcpus)  # seeded: off by one, idx == created_vcpus passes
    if bad_idx or vm.vcpus[idx] is not None:
        return -EINVAL
    return idx


def init_vcpu_done(vm: PkvmHypVm) -> None:
    pass


def init_vcpu_traps(h: HypState, vcpu: PkvmHypVcpu) -> int:
    return pkvm_vcpu_init_traps(h, vcpu)


# -- explicit load / put -----------------------------------------------------------------------
def pkvm_load_hyp_vcpu(h: HypState, handle: int, vcpu_idx: int) -> PkvmHypVcpu | None:
    cpu = h.cpu
    if h.loaded_hyp_vcpu[cpu] is not None:
        return None
    with h.vm_table_lock:
        vm = get_vm_by_handle(h, handle)
        if vm is None:
            return None
        if (vm.is_dying and not h.bug("load-dying")) or vcpu_idx >= vm.created_vcpus:
            return None
        vcpu = vm.vcpus[vcpu_idx]
        if vcpu is None or vcpu.loaded_on is not None:
            return None
        vcpu.loaded_on = cpu
        if not h.bug("load-no-pin"):
            vm_ref_inc(h, vm)
    h.loaded_hyp_vcpu[cpu] = vcpu
    return vcpu


def pkvm_put_hyp_vcpu(h: HypState, vcpu: PkvmHypVcpu) -> None:
    with h.vm_table_lock:
        vcpu.loaded_on = None
        h.loaded_hyp_vcpu[h.cpu] = None
        if not h.bug("load-no-pin"):
            vm_ref_dec(h, vcpu.vm)


def handle_vcpu_run(h: HypState, host_vcpu: int) -> int:
    """Run the vCPU loaded on this CPU (x1 is not read)."""
    vcpu = pkvm_get_loaded_hyp_vcpu(h)
    if vcpu is None:
        return -EINVAL
    flush_hyp_vcpu(h, vcpu)
    ret = kvm_vcpu_run(h, vcpu)
    sync_hyp_vcpu(h, vcpu)
    return ret


# -- two-phase teardown -----------------------------------------------------------------------
def get_pkvm_unref_hyp_vm_locked(h: HypState, handle: int) -> PkvmHypVm | int:
    """The VM of `handle` if no reference is held on it, else the refusal's errno."""
    vm = get_vm_by_handle(h, handle)
    if vm is None:
        return -EINVAL
    if vm_refcount(h, vm):
        return h.profile.teardown_refusal_errno_busy
    return vm


def __pkvm_start_teardown_vm(h: HypState, handle: int) -> int:
    with h.vm_table_lock:
        vm = get_pkvm_unref_hyp_vm_locked(h, handle)
        if isinstance(vm, int):
            return vm
        if vm.is_dying:
            return -EINVAL
        vm.is_dying = True
        return 0


def __pkvm_finalize_teardown_vm(h: HypState, handle: int) -> int:
    with h.vm_table_lock:
        vm = get_pkvm_unref_hyp_vm_locked(h, handle)
        if isinstance(vm, int):
            return vm
        if not vm.is_dying:
            return -EINVAL
        remove_vm_table_entry(h, handle)
    _teardown_hyp_memory(h, vm)
    return 0


def __pkvm_reclaim_dying_guest_page(h: HypState, handle: int, gfn: int) -> int:
    vm = get_pkvm_hyp_vm(h, handle)
    if vm is None:
        return -EINVAL
    try:
        if not vm.is_dying and not h.bug("reclaim-live"):  # seeded: reclaim from a live VM
            return -EINVAL
        return __pkvm_host_reclaim_page_guest(h, gfn, vm)
    finally:
        put_pkvm_hyp_vm(h, vm)
