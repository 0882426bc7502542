"""The divergences issue 14 found, each against the kernel source (failing before its fix)."""

import pytest

import pkvm
from conftest import EINVAL, ENOMEM, RawVm, kva


@pytest.mark.parametrize("abi", ["latest", "6.12"])
@pytest.mark.parametrize("created", [-1, -2, -(1 << 31)])
def test_negative_created_vcpus_is_unsigned(abi, created):
    """`__pkvm_init_vm` reads `created_vcpus` into an `unsigned int` (nvhe/pkvm.c): a negative
    count passes `nr_vcpus < 1`, sizes a hyp VM of ~8 * 2^32 bytes whose donation fails."""
    m = pkvm.Machine(memory="256M", cpus=2, abi=abi)
    vm = RawVm(m, nr_vcpus=created)
    if m.profile.reserve_vm:
        assert vm.reserve() > 0
    before = m.inspect.page_counts()
    vm_pa, pgd_pa = m.host.alloc_pages(4), m.host.alloc_pages(1)
    r = m.hvc(0, "__pkvm_init_vm", kva(vm.kvm_pa), kva(vm_pa), kva(pgd_pa))
    assert r.x1 == -ENOMEM
    assert m.inspect.page_counts() == before


@pytest.mark.parametrize("abi", ["latest", "6.12"])
def test_zero_created_vcpus_is_einval(abi):
    m = pkvm.Machine(memory="256M", cpus=2, abi=abi)
    vm = RawVm(m, nr_vcpus=0)
    if m.profile.reserve_vm:
        vm.reserve()
    assert vm.init_vm() == -EINVAL


@pytest.mark.parametrize("mkold", [2, 0x100, 1 << 63])
def test_mkold_is_a_c_bool(mkold):
    """`DECLARE_REG(bool, mkold, host_ctxt, 4)`: any non-zero x4 clears the access flag."""
    m = pkvm.Machine(memory="256M", cpus=2)
    vm = m.host.create_vm(vcpus=1, memory="8M")
    vm.ensure_hyp_vcpu(vm.vcpus[0])
    vm.topup_memcache(vm.vcpus[0])
    assert m.hvc(0, "__pkvm_vcpu_load", vm.handle, 0, 0).x0 == 0
    pfn = m.host.alloc_pages(1) >> 12
    assert m.hvc(0, "__pkvm_host_share_guest", pfn, 0x40002, 1, 0xF).x1 == 0
    h = vm.handle
    assert m.hvc(0, "__pkvm_host_test_clear_young_guest", h, 0x40002, 1, mkold).x1 == 1
    # the flag was cleared: a second look finds the page old
    assert m.hvc(0, "__pkvm_host_test_clear_young_guest", h, 0x40002, 1, 0).x1 == 0


def test_gfn_meta_that_does_not_fit_warns():
    """`host_stage2_encode_gfn_meta` WARNs when the gfn does not fit GENMASK(55, 16). A gfn of
    2^52 becomes IPA 0 (`hyp_pfn_to_phys` is 64 bits wide); the WARN fires, and a WARN at EL2
    is a hyp panic (`nvhe_hyp_panic_handler` treats every hyp bug, warnings included, as fatal)."""
    m = pkvm.Machine(memory="256M", cpus=2)
    vm = m.host.create_vm(vcpus=1, protected=True, memory="8M")
    vm.map(0x40000, 1)
    vm.topup_memcache(vm.vcpus[0])
    assert m.hvc(0, "__pkvm_vcpu_load", vm.handle, 0, 0).x0 == 0
    pfn = m.host.alloc_pages(1) >> 12
    assert m.hvc(0, "__pkvm_host_donate_guest", pfn, 1 << 36).x1 == -34  # beyond the IPA space
    assert m.inspect.warnings() == []
    with pytest.raises(pkvm.HypPanic) as e:
        m.hvc(0, "__pkvm_host_donate_guest", pfn, 1 << 52)
    assert e.value.warn and e.value.call == "__pkvm_host_donate_guest"
    assert e.value.reason.startswith("WARN_ON in encode_gfn_meta (")
    assert len(m.inspect.warnings()) == 1
    assert "encode_gfn_meta" in m.inspect.warnings()[0]
    with pytest.raises(pkvm.HypPanic):  # the machine is dead
        m.hvc(0, "__pkvm_vcpu_put")


@pytest.mark.parametrize("pa", [0, 0x4000_0000 - 0x1000, 0x4000_0000 + (64 << 20), -0x1000])
def test_vmemmap_index_outside_ram_is_a_hyp_fault(pa):
    """`hyp_phys_to_page` of a PA outside RAM points outside the mapped vmemmap: an EL2 data
    abort, never an index Python wraps to the end of RAM."""
    from pkvm.hyp.memory import HypVmemmap
    from pkvm.hyp.panic import HypBug
    from pkvm.machine.memory import PhysMemory

    vmemmap = HypVmemmap.over(PhysMemory(64 << 20), 0xFF)
    assert vmemmap.idx(0x4000_0000) == 0
    with pytest.raises(HypBug):
        vmemmap.idx(pa)


def _host_hcr_after_run(protected, abi="latest"):
    from pkvm import guests
    from pkvm.host.vmm import Vmm

    m = pkvm.Machine(memory="512M", abi=abi)
    vmm = Vmm(m.host, guests.image("hello"), memory="16M", protected=protected)
    vmm.run()
    vcpu = vmm.vm.vcpus[0]
    return int.from_bytes(m.host.read(vcpu.field_pa("arch.hcr_el2"), 8), "little")


# HCR_EL2 bits (arch/arm64/include/asm/kvm_arm.h).
VM, SWIO, PTW, FMO, IMO, AMO, FB, BSU_IS = 1, 2, 4, 8, 16, 32, 1 << 9, 1 << 10
TWI, TWE, TID1, TID2, TID3, TSC, TIDCP, TACR, TSW, RW = (
    1 << 13, 1 << 14, 1 << 16, 1 << 17, 1 << 18, 1 << 19, 1 << 20, 1 << 21, 1 << 22, 1 << 31)
E2H, TLOR, TERR, TEA, TID5 = 1 << 34, 1 << 35, 1 << 36, 1 << 37, 1 << 58
GUEST_FLAGS = (TSC | TSW | TWE | TWI | VM | BSU_IS | FB | TACR | AMO | SWIO | TIDCP | RW | TLOR
               | FMO | IMO | PTW | TID3 | TID1)


def test_72_hyp_vcpu_hcr_is_initialised_and_synced():
    """7.2 `pkvm_vcpu_reset_hcr`: HCR_GUEST_FLAGS | E2H (hVHE: the CPU has VHE) | TID2 (no
    FEAT_EVT); no RAS, FWB or MTE on the board's CPU. The host reads it back after a run
    (`sync_hyp_vcpu`), with the TWI/TWE the host's own HCR asked for."""
    hcr = _host_hcr_after_run(False)
    base = GUEST_FLAGS | E2H | TID2
    mask = ~(TWI | TWE | (1 << 7) | (1 << 8)) & (2**64 - 1)  # flushed from the host: TWI/TWE/VI/VSE
    assert hcr & mask == base & mask
    assert hcr & RW


def test_72_protected_vcpu_hcr_has_pvm_traps():
    """`pvm_init_traps_hcr`: no RAS in the VM's ID registers -> TERR|TEA; no MTE -> TID5."""
    hcr = _host_hcr_after_run(True)
    base = GUEST_FLAGS | E2H | TID2 | TERR | TEA | TID5
    mask = ~(TWI | TWE | (1 << 7) | (1 << 8)) & (2**64 - 1)
    assert hcr & mask == base & mask


def test_612_hcr_is_the_hosts():
    """6.12's flush copies the host's whole HCR_EL2 and sync writes it back unchanged."""
    hcr = _host_hcr_after_run(False, abi="6.12")
    assert hcr & RW


def test_declare_reg_u32_truncation():
    """`DECLARE_REG(unsigned int, vcpu_idx, host_ctxt, 2)` of `__pkvm_vcpu_load` and
    `DECLARE_REG(u32, npages, ctxt, 3)` of FF-A RXTX_MAP keep the low 32 bits."""
    from pkvm.abi.ffa import FFA_SUCCESS
    from pkvm.check.ffa_ops import FfaHost

    m = pkvm.Machine(memory="256M", cpus=2)
    vm = m.host.create_vm(vcpus=1, memory="8M")
    vm.ensure_hyp_vcpu(vm.vcpus[0])
    m.hvc(0, "__pkvm_vcpu_load", vm.handle, 1 << 32, 0)
    assert m.inspect.vms()[0]["vcpus"][0] == 0  # loaded on CPU 0: index 0
    m2 = pkvm.Machine(memory="64M", cpus=2, ffa=True)
    f = FfaHost(m2)
    f.negotiate(0x1_0002)
    tx, rx = m2.host.alloc_pages(1), m2.host.alloc_pages(1)
    assert m2.smc(0, "FFA_RXTX_MAP", tx, rx, 1 | 1 << 32).regs[0] == FFA_SUCCESS
