"""The hyp VM and vCPU live as bytes in the pages the host donated (`pkvm.hyp.pkvm_structs`)."""

from __future__ import annotations

import struct

import pytest

import pkvm
from pkvm.abi import sizes
from pkvm.abi.host_structs import KVM, KVM_VCPU
from pkvm.check import hw_oracles
from pkvm.hyp.pkvm_structs import HYP_VCPU, HYP_VM, vcpus_slot
from pkvm.machine.memory import PAGE_SIZE

ABIS = ["latest", "6.12"]


def _u(raw: bytes, layout: dict, name: str) -> int:
    off, fmt = layout[name]
    return struct.unpack_from("<" + fmt, raw, off)[0]


def _watch(m: pkvm.Machine) -> list[str]:
    """Run the oracles after every hypercall, as the checker does."""
    found: list[str] = []
    m.listeners.append(lambda rec: found.extend(hw_oracles.violations(m.inspect)))
    return found


def _vm(m: pkvm.Machine, vcpus: int = 2):
    protected = m.profile.protected_vms
    vm = m.host.create_vm(vcpus=vcpus, protected=protected, memory="16M")
    vm.map(0x40000, 2)
    for v in vm.vcpus:
        vm.ensure_hyp_vcpu(v)  # 7.2 creates a hyp vCPU at its first KVM_RUN
    return vm


@pytest.mark.parametrize("abi", ABIS)
def test_hyp_vm_fields_are_in_the_donated_pages(abi):
    m = pkvm.Machine(memory="256M", abi=abi)
    vm = _vm(m)
    size = sizes.pkvm_get_hyp_vm_size(2)
    raw = m.inspect.read(vm.hyp_vm_pa, size)
    assert _u(raw, HYP_VM, "kvm.arch.pkvm.handle") == vm.handle
    assert _u(raw, HYP_VM, "kvm.created_vcpus") == 2
    assert _u(raw, HYP_VM, "kvm.arch.mmu.vmid") == vm.handle - 0x1000 + 1
    pgd = _u(raw, HYP_VM, "kvm.arch.mmu.pgd_phys")
    assert pgd == vm.pgd_pa and pgd % PAGE_SIZE == 0
    host_kvm = _u(raw, HYP_VM, "host_kvm")
    # the back-pointer is the hyp's VA of the host struct kvm: the same page offset
    assert host_kvm & 0xFFF == vm.kvm_pa & 0xFFF
    slots = [struct.unpack_from("<Q", raw, vcpus_slot(i))[0] for i in range(2)]
    assert all(slots) and slots[0] != slots[1]
    if abi == "6.12":
        assert _u(raw, HYP_VM, "nr_vcpus") == 2


@pytest.mark.parametrize("abi", ABIS)
def test_hyp_vcpu_fields_and_context_are_in_the_donated_pages(abi):
    m = pkvm.Machine(memory="256M", abi=abi)
    vm = _vm(m)
    for v in vm.vcpus:
        raw = m.inspect.read(v.hyp_mem, sizes.PKVM_HYP_VCPU_SIZE)
        assert _u(raw, HYP_VCPU, "vcpu.vcpu_idx") == v.idx
        assert _u(raw, HYP_VCPU, "host_vcpu") & 0xFFF == v.pa & 0xFFF
        assert _u(raw, HYP_VCPU, "vcpu.kvm") & 0xFFF == vm.hyp_vm_pa & 0xFFF
    # a run flushes the host's context into the hyp vCPU: the registers land in its bytes
    v = vm.vcpus[0]
    regs = v.regs
    regs.x[5] = 0x5EC12E7_0000_0005
    v.regs = regs
    v.run()
    raw = m.inspect.read(v.hyp_mem, sizes.PKVM_HYP_VCPU_SIZE)
    x5 = struct.unpack_from("<Q", raw, KVM_VCPU.offset("arch.ctxt.regs") + 5 * 8)[0]
    assert x5 == 0x5EC12E7_0000_0005


@pytest.mark.parametrize("abi", ABIS)
def test_teardown_returns_the_hyp_vm_wiped(abi):
    m = pkvm.Machine(memory="256M", abi=abi)
    found = _watch(m)
    vm = _vm(m)
    pages = [vm.hyp_vm_pa + i * PAGE_SIZE for i in range(vm.hyp_vm_pages)]
    pages += [v.hyp_mem for v in vm.vcpus]
    vm.destroy()
    for pa in pages:
        assert m.host.read(pa + 8, PAGE_SIZE - 8) == bytes(PAGE_SIZE - 8)
    assert found == []


@pytest.mark.parametrize("abi", ABIS)
def test_missed_wipe_leaks_real_bytes_and_is_found(abi):
    m = pkvm.Machine(memory="256M", abi=abi, bugs=("hyp-vm-no-wipe",))
    found = _watch(m)
    vm = _vm(m)
    first, kvm_pa = vm.hyp_vm_pa, vm.kvm_pa
    vcpu_pa = vm.vcpus[0].hyp_mem
    vm.destroy()
    # the host reads its hyp VM back: the hyp's pointer to its struct kvm is in the bytes
    raw = m.host.read(first, 2 * PAGE_SIZE)
    host_kvm = _u(raw, HYP_VM, "host_kvm")
    assert host_kvm and host_kvm & 0xFFF == kvm_pa & 0xFFF
    raw = m.host.read(vcpu_pa, 2 * PAGE_SIZE)
    assert _u(raw, HYP_VCPU, "host_vcpu") & 0xFFF == vm.vcpus[0].pa & 0xFFF
    assert found and all("returned to the host unwiped" in f for f in found)


def test_layout_fits_the_model_sizes():
    assert HYP_VM["nr_vcpus"][0] < sizes.PKVM_HYP_VM_SIZE
    assert KVM.size <= HYP_VM["host_kvm"][0]
    assert max(f.offset + f.size for f in KVM_VCPU.fields.values()) <= HYP_VCPU["host_vcpu"][0]


def test_the_hardware_oracles_doc_snippet_runs(capsys):
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "checking.md").read_text()
    section = text.split("### Hardware oracles", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "docs/checking.md", "exec"), {})
    assert "returned to the host unwiped" in capsys.readouterr().out
