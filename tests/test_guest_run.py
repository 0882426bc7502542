"""Guests run through the modelled run path: exits, PSCI, pKVM guest calls, isolation."""

from __future__ import annotations

import io

import pytest

import pkvm
from pkvm import guests
from pkvm.host.vmm import Vmm


def boot(image: bytes, protected: bool = True, vcpus: int = 1, memory: str = "16M",
         timeslice: int | None = None):
    m = pkvm.Machine(memory="256M", cpus=2, timeslice=timeslice)
    before = m.inspect.page_counts()
    vmm = Vmm(m.host, image, memory=memory, vcpus=vcpus, protected=protected, out=io.StringIO())
    return m, vmm, before


@pytest.mark.parametrize("protected", [True, False])
def test_hello_prints_and_powers_off(protected):
    m, vmm, before = boot(guests.image("hello"), protected)
    s = vmm.run()
    assert s.reason == "shutdown"
    assert s.console == "Hello from a pKVM guest!\n"
    assert s.exits["mmio"] == len(s.console)
    vmm.destroy()
    assert m.inspect.page_counts() == before


def test_memwalk_faults_in_every_page_and_pages_are_wiped_after_teardown():
    m, vmm, before = boot(guests.patch(guests.image("memwalk"), 2), memory="8M")
    s = vmm.run()
    assert s.console.strip() == "memwalk: OK"
    assert s.exits["stage2_fault"] >= 512
    touched = dict(vmm.vm.mapped)
    assert len(touched) >= 513
    # While the protected guest lives, every page it touched is out of the host's reach.
    for pa in list(touched.values())[:64]:
        with pytest.raises(pkvm.HostDataAbort):
            m.host.read(pa, 8)
        with pytest.raises(pkvm.HostDataAbort):
            m.host.write(pa, b"x")
    vmm.destroy()
    for pa in touched.values():
        assert m.host.read(pa, 4096) == bytes(4096)
    assert m.inspect.page_counts() == before


def test_oob_read_beyond_guest_ram_is_an_mmio_exit_answered_by_the_vmm():
    m, vmm, _ = boot(guests.image("oob"))
    vm = vmm.vm
    ex = None
    while True:
        ex = vm.vcpus[0].run()
        if ex.kind == "mmio" and not ex.write:
            break
        assert ex.kind == "mmio"
    assert ex.addr == guests.OOB_IPA and ex.size == 8
    vm.vcpus[0].complete_mmio(0x1122_3344_5566_7788)
    out = bytearray()
    while (ex := vm.vcpus[0].run()).kind == "mmio":
        out.append(ex.data)
    assert ex.kind == "system_event"
    assert "0x1122334455667788" in out.decode()
    vmm.destroy()


def test_share_guest_page_is_readable_by_the_host_the_others_are_not():
    m, vmm, before = boot(guests.image("share"))
    s = vmm.run()
    assert s.reason == "shutdown" and s.console.startswith("share: hello through a shared page")
    vm = vmm.vm
    shared_gfn = (guests.RAM_BASE + guests.SHARE_PAGE_OFFSET) >> 12
    shared_pa = vm.mapped[shared_gfn]
    assert m.inspect.page(shared_pa >> 12).host == "SHARED_BORROWED"
    assert b"hello through a shared page" in m.host.read(shared_pa, 4096)
    with pytest.raises(pkvm.HostDataAbort):
        m.host.read(vm.mapped[guests.RAM_BASE >> 12], 8)
    vmm.destroy()
    assert m.inspect.page_counts() == before
    # A page the guest shared back is returned as it is (not wiped).
    assert b"hello through a shared page" in m.host.read(shared_pa, 4096)


def test_smp_guest_brings_up_its_second_vcpu_with_psci_cpu_on():
    m, vmm, before = boot(guests.image("smp"), vcpus=2, timeslice=20_000)
    s = vmm.run()
    assert s.reason == "shutdown"
    assert "vCPU 1 up, context 0x0000000000005ec0" in s.console
    assert "vCPU 0 saw vCPU 1 report" in s.console
    vmm.destroy()
    assert m.inspect.page_counts() == before


# FEATURES (0x8600_0000) -> x19, HYP_MEMINFO (0xC600_0002) -> x20, then PSCI SYSTEM_OFF.
EL2_CALLS = bytes.fromhex(
    "000080d200c0b0f2020000d4f30300aa400080d200c0b8f2020000d4f40300aa000180d20080b0f2020000d4")


@pytest.mark.parametrize("protected, features, meminfo", [
    (True, 0x1D, 4096),                       # answered at EL2 (measured on 7.2)
    (False, 3, 2**64 - 1),                    # the host: vendor bitmap (FUNC_FEAT, PTP); MEMINFO -1
])
def test_pkvm_guest_calls(protected, features, meminfo):
    m, vmm, _ = boot(EL2_CALLS, protected)
    vcpu = vmm.vm.vcpus[0]
    ex = vcpu.run()
    assert ex.kind == "system_event" and ex.event == "shutdown"
    regs = vcpu.regs
    assert regs.x[19] == features
    assert regs.x[20] == meminfo
    # Host-answered HVCs were counted; EL2-answered ones never reached the host.
    assert vcpu.runner.exits.get("hvc", 0) == (1 if protected else 3)
    vmm.destroy()


def test_host_cannot_change_hyp_controlled_hcr_bits_of_a_protected_vcpu():
    m, vmm, _ = boot(guests.image("hello"))
    vm = vmm.vm
    ex = vm.vcpus[0].run()
    assert ex.kind == "mmio"
    hyp_vcpu = m._hyp.vm_table[0].vcpus[0]
    hcr_before = hyp_vcpu.hcr_el2
    # The host scribbles every HCR_EL2 bit into its struct kvm_vcpu; 7.2 takes TWI/TWE/VSE only.
    from pkvm.abi.host_structs import KVM_VCPU

    m.host.write(vm.vcpus[0].pa + KVM_VCPU.offset("arch.hcr_el2"), (2**64 - 1).to_bytes(8, "little"))
    vm.vcpus[0].run()
    # TWI, TWE, VSE as 7.2 takes them, and VI: the model's stand-in for the vGIC list
    # registers through which the host's emulated GIC raises the guest's interrupt line.
    mask = (1 << 13) | (1 << 14) | (1 << 8) | (1 << 7)
    assert hyp_vcpu.hcr_el2 & ~mask == hcr_before & ~mask
    vmm.destroy()


def test_6_12_guest_runs_on_the_host_managed_stage2_and_stays_host_owned():
    m = pkvm.Machine(memory="256M", cpus=2, abi="6.12")
    before = m.inspect.page_counts()
    vmm = Vmm(m.host, guests.patch(guests.image("memwalk"), 1), memory="4M", out=io.StringIO())
    s = vmm.run()
    assert s.console.strip() == "memwalk: OK"
    assert s.exits["stage2_fault"] >= 256
    # 6.12 guest memory never leaves the host: the host reads it while the VM lives.
    pa = vmm.vm.mapped[guests.RAM_BASE >> 12]
    assert m.host.read(pa, 4) == guests.image("memwalk")[:4]
    assert m.inspect.page(pa >> 12).owner == "host"
    vmm.destroy()
    assert m.inspect.page_counts() == before


def test_a_host_managed_stage2_table_pointing_outside_ram_is_no_translation():
    """6.12 runs a guest on the stage-2 the host builds in its own memory, so a hostile host can
    point a table descriptor anywhere. The walk of a table outside RAM translates nothing (the
    MMU's walk would abort): the guest runs on, and no Python exception leaves the hyp."""
    m = pkvm.Machine(memory="256M", cpus=2, abi="6.12")
    vmm = Vmm(m.host, guests.image("hello"), memory="16M", protected=False, out=io.StringIO())
    s2 = vmm.vm.s2
    idx = 4  # a top-level entry far above the guest's RAM at 1 GiB
    m.host.write_u64(s2.pgd + idx * 8, (1 << 40) | 0b11)  # a table at 1 TiB: no RAM there
    s = vmm.run()
    assert s.reason == "shutdown" and s.console == "Hello from a pKVM guest!\n"
