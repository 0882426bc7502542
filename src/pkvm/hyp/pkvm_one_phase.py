"""The 6.12 shape of the VM life cycle (`nvhe/pkvm.c` of Linux 6.12; see `pkvm.VmLife`).

`__pkvm_init_vm` takes the first free slot of the VM table itself and answers the handle;
hyp vCPUs are made strictly in order (0, 1, 2 ...); there is no explicit vCPU load: each
`__kvm_vcpu_run` looks its hyp vCPU up from the host's `struct kvm_vcpu`, holds the VM for the
length of the run and lets go; `__pkvm_teardown_vm` tears the VM down in one call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from pkvm.abi import sizes
from pkvm.errors import EINVAL, ENOENT
from pkvm.hyp.mem_protect import _warn
from pkvm.hyp.mm import kern_hyp_va
from pkvm.hyp.pkvm import (
    _teardown_hyp_memory,
    find_free_vm_table_entry,
    get_vm_by_handle,
    kvm_field,
    remove_vm_table_entry,
    vcpu_field,
    vm_ref_dec,
    vm_ref_inc,
    vm_refcount,
)
from pkvm.hyp.pkvm_structs import PkvmHypVcpu, PkvmHypVm
from pkvm.hyp.state import HypState
from pkvm.hyp.switch import flush_hyp_vcpu, kvm_vcpu_run, pkvm_vcpu_init_traps, sync_hyp_vcpu

# The guest stage-2's table pages go back in the one teardown memcache.
STAGE2_TEARDOWN_MC: Final = "teardown_mc"


# -- init -----------------------------------------------------------------------------------
def init_vm_handle(h: HypState, host_kvm: int) -> int:
    return 0  # chosen by insert_vm


def init_vm_arch(h: HypState, host_kvm: int, is_protected: bool) -> tuple[int, int]:
    return 0, 0  # 6.12 copies neither the host's arch flags nor its vCPU features


def insert_vm(h: HypState, handle: int, build: Callable[[int], PkvmHypVm],
              undo: Callable[[int], int]) -> int:
    """`insert_vm_table_entry` (6.12): the first free slot, taken under `vm_table_lock`."""
    with h.vm_table_lock:
        idx = find_free_vm_table_entry(h)
        if idx >= 0:
            handle = idx + sizes.HANDLE_OFFSET
            vm = build(handle)
            h.vm_table[idx] = vm
    if idx < 0:
        return undo(idx)  # after the table lock, as Linux gives the donations back
    h.hyp_vms[vm.vm_va] = vm
    return handle


def init_vcpu_check(vm: PkvmHypVm) -> int:
    return -EINVAL if vm.nr_vcpus >= vm.created_vcpus else 0


def init_vcpu_slot(h: HypState, vm: PkvmHypVm, host_idx: int) -> int:
    """The next slot, and only if the host's vCPU has that index."""
    return vm.nr_vcpus if host_idx == vm.nr_vcpus else -EINVAL


def init_vcpu_done(vm: PkvmHypVm) -> None:
    vm.nr_vcpus += 1


def init_vcpu_traps(h: HypState, vcpu: PkvmHypVcpu) -> int:
    return pkvm_vcpu_init_traps(h, vcpu)


# -- a run holds its vCPU -------------------------------------------------------------------
def pkvm_load_hyp_vcpu(h: HypState, handle: int, vcpu_idx: int) -> PkvmHypVcpu | None:
    with h.vm_table_lock:
        vm = get_vm_by_handle(h, handle)
        if vm is None or vcpu_idx >= vm.nr_vcpus:
            return None
        vcpu = vm.vcpus[vcpu_idx]
        if not h.bug("load-no-pin"):
            vm_ref_inc(h, vm)
    return vcpu


def pkvm_put_hyp_vcpu(h: HypState, vcpu: PkvmHypVcpu) -> None:
    with h.vm_table_lock:
        if not h.bug("load-no-pin"):
            vm_ref_dec(h, vcpu.vm)


def handle_vcpu_run(h: HypState, host_vcpu: int) -> int:
    """Look the hyp vCPU up from the host's vCPU on every run (plain host reads)."""
    host_kvm = kern_hyp_va(h, vcpu_field(h, host_vcpu, "kvm"))
    handle = h.profile.handle(kvm_field(h, host_kvm, "arch.pkvm.handle"))
    idx = vcpu_field(h, host_vcpu, "vcpu_idx")
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


# -- teardown ---------------------------------------------------------------------------------
def __pkvm_teardown_vm(h: HypState, handle: int) -> int:
    """One call: refused (with a WARN) while a run holds the VM."""
    with h.vm_table_lock:
        vm = get_vm_by_handle(h, handle)
        if vm is None:
            return -ENOENT
        if vm_refcount(h, vm):
            _warn(h, 1)
            return h.profile.teardown_refusal_errno_busy
        remove_vm_table_entry(h, handle)
    _teardown_hyp_memory(h, vm)
    return 0
