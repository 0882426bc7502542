"""The host driver's side of the VM life cycle where the kernels differ in shape.

`arch/arm64/kvm/pkvm.c` of 6.12 makes the hyp VM in one call that also answers its handle, runs a
vCPU by passing its `struct kvm_vcpu` to `__kvm_vcpu_run` and tears the VM down in one call
(`__pkvm_teardown_vm`). 7.2 reserves the handle when the VM is created (`pkvm_init_host_vm`),
loads a vCPU on the CPU around its runs (`__pkvm_vcpu_load` / `__pkvm_vcpu_put`) and tears down
in two phases, giving each guest page back in between. Each `HostVm` takes the one of its kernel
(`Profile.vm_lifecycle`) when it is created; the hyp side is `pkvm.hyp.pkvm_one_phase` /
`pkvm_two_phase`.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Protocol

from pkvm.abi.host_structs import (
    HYP_MEMCACHE_ACCOUNT_STAGE2,
    KVM_ARCH_FLAG_ID_REGS_INITIALIZED,
    KVM_VCPU,
)
from pkvm.errors import HostError

if TYPE_CHECKING:
    from pkvm.host.kvm import HostVcpu, HostVm


VGIC_V3_OFF = KVM_VCPU.offset("arch.vgic_v3.vgic_hcr")  # &vcpu->arch.vgic_cpu.vgic_v3

class HostVmLife(Protocol):
    def init_kvm(self, vm: HostVm) -> None:
        """Fields of the new `struct kvm` written before it is shared with the hyp."""
        ...

    def init_host_vm(self, vm: HostVm) -> None:
        """Once `struct kvm` is shared: `pkvm_init_host_vm`."""
        ...

    def vcpus_created(self, vm: HostVm) -> None:
        """Once every `struct kvm_vcpu` is shared."""
        ...

    def hyp_vm_created(self, vm: HostVm, x1: int) -> None:
        """`__pkvm_init_vm` answered `x1` (>= 0)."""
        ...

    def vcpu_load(self, vm: HostVm, vcpu: HostVcpu, hcr: int, cpu: int) -> None:
        """`kvm_arch_vcpu_load` before running or mapping with `vcpu` on `cpu`."""
        ...

    def vcpu_put(self, vm: HostVm, cpu: int) -> None:
        ...

    def vgic_load(self, vm: HostVm, vcpu: HostVcpu, cpu: int) -> None:
        """The vGIC state EL2 restores when `kvm_arch_vcpu_load` runs before `KVM_RUN`."""
        ...

    def vgic_put(self, vm: HostVm, vcpu: HostVcpu, cpu: int) -> None:
        ...

    def arch_vcpu_load(self, vm: HostVm, vcpu: HostVcpu, hcr: int, cpu: int) -> None:
        """`kvm_arch_vcpu_load` as `KVM_RUN` calls it: `vcpu_load`, then `vgic_load`."""
        ...

    def arch_vcpu_put(self, vm: HostVm, vcpu: HostVcpu, cpu: int) -> None:
        """`kvm_arch_vcpu_put`: `vgic_put`, then `vcpu_put`."""
        ...

    def destroy(self, vm: HostVm) -> None:
        """`pkvm_destroy_hyp_vm`: tear the hyp VM down, collect what came back."""
        ...


class OnePhase:
    """Linux 6.12."""

    def init_kvm(self, vm: HostVm) -> None:
        pass

    def init_host_vm(self, vm: HostVm) -> None:
        pass

    def vcpus_created(self, vm: HostVm) -> None:
        """Make the hyp VM and all its vCPUs now, as the first `KVM_RUN` would, so that the
        VM's handle is known from the start."""
        vm.create_hyp_vm()
        for vcpu in vm.vcpus:
            vm.create_hyp_vcpu(vcpu)

    def hyp_vm_created(self, vm: HostVm, x1: int) -> None:
        vm.handle = x1
        vm.write_kvm_field("arch.pkvm.handle", x1)

    def vcpu_load(self, vm: HostVm, vcpu: HostVcpu, hcr: int, cpu: int) -> None:
        pass  # each `__kvm_vcpu_run` names its vCPU

    def vcpu_put(self, vm: HostVm, cpu: int) -> None:
        pass

    def vgic_load(self, vm: HostVm, vcpu: HostVcpu, cpu: int) -> None:
        pass  # 6.12's host saves and restores the vGIC state itself

    def vgic_put(self, vm: HostVm, vcpu: HostVcpu, cpu: int) -> None:
        pass

    def arch_vcpu_load(self, vm: HostVm, vcpu: HostVcpu, hcr: int, cpu: int) -> None:
        pass

    def arch_vcpu_put(self, vm: HostVm, vcpu: HostVcpu, cpu: int) -> None:
        pass

    def destroy(self, vm: HostVm) -> None:
        if not vm.handle:
            return
        ret = vm.hvc("__pkvm_teardown_vm", vm.handle)
        if ret:
            warnings.warn(f"__pkvm_teardown_vm({vm.handle:#x}) = {ret}: the hyp VM leaks",
                          stacklevel=3)
        else:
            vm.free_teardown_mc("teardown_mc")


class TwoPhase:
    """Linux 7.2."""

    def init_kvm(self, vm: HostVm) -> None:
        vm.write_kvm_field("arch.flags", KVM_ARCH_FLAG_ID_REGS_INITIALIZED)
        vm.write_kvm_field("arch.pkvm.stage2_teardown_mc.flags", HYP_MEMCACHE_ACCOUNT_STAGE2)

    def init_host_vm(self, vm: HostVm) -> None:
        ret = vm.hvc("__pkvm_reserve_vm")
        if ret < 0:
            raise HostError(-ret, "__pkvm_reserve_vm", ret)
        vm.handle = ret
        vm.write_kvm_field("arch.pkvm.handle", ret)
        vm.write_kvm_field("arch.pkvm.is_protected", int(vm.protected))

    def vcpus_created(self, vm: HostVm) -> None:
        pass  # the hyp VM and each hyp vCPU are made at the vCPU's first run or map

    def hyp_vm_created(self, vm: HostVm, x1: int) -> None:
        pass  # the handle was reserved

    def vcpu_load(self, vm: HostVm, vcpu: HostVcpu, hcr: int, cpu: int) -> None:
        vm.hvc("__pkvm_vcpu_load", vm.handle, vcpu.idx, hcr, cpu=cpu)

    def vcpu_put(self, vm: HostVm, cpu: int) -> None:
        vm.hvc("__pkvm_vcpu_put", cpu=cpu)

    def vgic_load(self, vm: HostVm, vcpu: HostVcpu, cpu: int) -> None:
        # arm.c kvm_arch_vcpu_load, after the hyp vCPU's load: EL2 restores its vGIC VMCR and
        # APRs (reading the loaded hyp vCPU: after a raw teardown the hyp panics, as Linux's).
        vm.host.port.hvc(cpu, "__vgic_v3_restore_vmcr_aprs", vcpu.va + VGIC_V3_OFF)

    def vgic_put(self, vm: HostVm, vcpu: HostVcpu, cpu: int) -> None:
        # kvm_arch_vcpu_put, before the hyp vCPU's put: EL2 saves the APRs.
        vm.host.port.hvc(cpu, "__vgic_v3_save_aprs", vcpu.va + VGIC_V3_OFF)

    # `KVM_RUN` calls these two on every entry: `vcpu_load` + `vgic_load` and `vgic_put` +
    # `vcpu_put` above, the same four hypercalls, without their frames (`HostVm.hvc`'s check
    # that the call is offered is kept).
    def arch_vcpu_load(self, vm: HostVm, vcpu: HostVcpu, hcr: int, cpu: int) -> None:
        hvc = vm.host.port.hvc
        x0 = hvc(cpu, "__pkvm_vcpu_load", vm.handle, vcpu.idx, hcr).x0
        if x0:
            raise HostError.not_offered("__pkvm_vcpu_load", x0)
        hvc(cpu, "__vgic_v3_restore_vmcr_aprs", vcpu.va + VGIC_V3_OFF)

    def arch_vcpu_put(self, vm: HostVm, vcpu: HostVcpu, cpu: int) -> None:
        hvc = vm.host.port.hvc
        hvc(cpu, "__vgic_v3_save_aprs", vcpu.va + VGIC_V3_OFF)
        x0 = hvc(cpu, "__pkvm_vcpu_put").x0
        if x0:
            raise HostError.not_offered("__pkvm_vcpu_put", x0)

    def destroy(self, vm: HostVm) -> None:
        if not vm.is_created:
            if vm.handle:
                vm.hvc("__pkvm_unreserve_vm", vm.handle)
            return
        ret = vm.hvc("__pkvm_start_teardown_vm", vm.handle)
        if ret:
            warnings.warn(f"__pkvm_start_teardown_vm({vm.handle:#x}) = {ret}", stacklevel=3)
        # One call per page (`HostVm.hvc`'s check written out: one frame less per page).
        name = "__pkvm_reclaim_dying_guest_page" if vm.protected else "__pkvm_host_unshare_guest"
        extra = () if vm.protected else (1,)  # nr_pages
        hvc, handle, mapped = vm.host.port.hvc, vm.handle, vm.mapped
        for gfn in list(mapped):
            res = hvc(0, name, handle, gfn, *extra) if extra else hvc(0, name, handle, gfn)
            if res.x0:
                raise HostError.not_offered(name, res.x0)
            if res.x1:
                warnings.warn(f"releasing gfn {gfn:#x} failed: {res.x1}", stacklevel=3)
            else:
                del mapped[gfn]
        ret = vm.hvc("__pkvm_finalize_teardown_vm", vm.handle)
        if ret:
            warnings.warn(f"__pkvm_finalize_teardown_vm({vm.handle:#x}) = {ret}: "
                          "the hyp VM leaks", stacklevel=3)
            return
        vm.free_teardown_mc("teardown_mc")
        vm.free_teardown_mc("stage2_teardown_mc")


HOST_VM_LIFECYCLES: dict[str, HostVmLife] = {"one-phase": OnePhase(), "two-phase": TwoPhase()}
