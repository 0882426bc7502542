"""VM table, hyp VM / vCPU init, load/put, teardown and the host driver (vm-state.md §3-§5)."""

import pytest

import pkvm
from conftest import (
    E2BIG,
    EAGAIN,
    EBUSY,
    EINVAL,
    ENOENT,
    ENOMEM,
    EPERM,
    PAGE,
    RawVm,
    hyp_region,
    snapshot,
)
from pkvm.abi.host_structs import KVM, KVM_VCPU
from pkvm.hyp import mem_protect as mp

HCR = (1 << 31) | (1 << 27)


def donate_hyp(m, pfn, n=1):
    """The EL2-internal donation (not a hypercall)."""
    return mp.__pkvm_host_donate_hyp(m._hyp, pfn, n)


def vm_rec(m, handle):
    for v in m.inspect.vms():
        if v["handle"] == handle:
            return v
    return None


def counts_ok(m, before):
    assert m.inspect.page_counts() == before


# -- the VM table --------------------------------------------------------------------------
class TestTable:
    def test_7_2_reserve_fills_table(self, m72):
        m = m72
        handles = [m.hvc(0, "__pkvm_reserve_vm").x1 for _ in range(255)]
        assert handles == list(range(0x1000, 0x1000 + 255))
        before = snapshot(m)
        r = m.hvc(1, "__pkvm_reserve_vm")
        assert (r.x0, r.x1) == (0, -ENOMEM)
        assert snapshot(m) == before
        # the driver reports it, and leaves nothing behind
        with pytest.raises(pkvm.HostError) as ei:
            m.host.create_vm(vcpus=1, memory="1M")
        assert ei.value.errno == ENOMEM
        assert m.inspect.page_counts() == before["counts"]
        # a freed slot is found again
        m.hvc(0, "__pkvm_unreserve_vm", 0x1080)
        assert m.hvc(0, "__pkvm_reserve_vm").x1 == 0x1080

    def test_6_12_init_vm_fills_table(self, m612):
        m = m612
        vms = [m.host.create_vm(vcpus=1, memory="1M") for _ in range(255)]
        assert sorted(v.handle for v in vms) == list(range(0x1000, 0x1000 + 255))
        before = m.inspect.page_counts()
        with pytest.raises(pkvm.HostError) as ei:
            m.host.create_vm(vcpus=1, memory="1M")
        assert ei.value.errno == ENOMEM
        assert ei.value.call == "__pkvm_init_vm"
        assert m.inspect.page_counts() == before
        vms[7].destroy()
        assert m.host.create_vm(vcpus=1, memory="1M").handle == 0x1007

    def test_handle_reuse_lowest_first(self, machine):
        m = machine
        vms = [m.host.create_vm(vcpus=1, memory="1M") for _ in range(4)]
        for v in vms:
            v.map(0x40000)  # 7.2: creates the hyp VM
        assert [v.handle for v in vms] == [0x1000, 0x1001, 0x1002, 0x1003]
        vms[2].destroy()
        vms[1].destroy()
        a = m.host.create_vm(vcpus=1, memory="1M")
        a.map(0x40000)
        b = m.host.create_vm(vcpus=1, memory="1M")
        assert (a.handle, b.handle) == (0x1001, 0x1002)
        c = m.host.create_vm(vcpus=1, memory="1M")
        assert c.handle == 0x1004

    def test_reserved_slot_invisible_to_lookup(self, m72):
        m = m72
        h = m.hvc(0, "__pkvm_reserve_vm").x1
        assert vm_rec(m, h) == {"handle": h, "state": "reserved", "protected": None, "vcpus": {}}
        before = snapshot(m)
        assert m.hvc(0, "__pkvm_start_teardown_vm", h).x1 == -EINVAL
        assert m.hvc(0, "__pkvm_finalize_teardown_vm", h).x1 == -EINVAL
        vm = RawVm(m, 1)
        assert vm.init_vcpu(0, handle=h) == -ENOENT
        assert m.hvc(0, "__pkvm_host_unshare_guest", h, 0x40000, 1).x1 == -EINVAL
        assert m.inspect.vms() == before["vms"]

    def test_unreserve_semantics(self, m72):
        m = m72
        vm = RawVm(m, 1)
        h = vm.create()
        # unreserve of a live VM, of a free slot, of junk: ignored, x1 unchanged
        for handle in (h, 0x1005, 0xFFFF, 0):
            r = m.hvc(0, "__pkvm_unreserve_vm", handle)
            assert (r.x0, r.x1) == (0, handle)
        assert vm_rec(m, h)["state"] == "live"
        # a reserved slot is freed
        h2 = m.hvc(0, "__pkvm_reserve_vm").x1
        assert h2 == h + 1
        m.hvc(0, "__pkvm_unreserve_vm", h2)
        assert vm_rec(m, h2) is None
        # init_vm on an unreserved handle fails and leaves nothing
        vm2 = RawVm(m, 1)
        vm2.set_handle(h2)
        before = m.inspect.page_counts()
        assert vm2.init_vm() == -EINVAL
        assert m.inspect.page_counts() == before
        assert m.inspect.page(vm2.kvm_pa >> 12).refcount == 0

    def test_7_2_init_vm_twice(self, m72):
        m = m72
        vm = RawVm(m, 1)
        vm.create()
        before = m.inspect.page_counts()
        assert vm.init_vm() == -EINVAL  # slot holds a live VM, not RESERVED_ENTRY
        assert m.inspect.page_counts() == before
        assert m.inspect.page(vm.kvm_pa >> 12).refcount == 1


# -- handles -------------------------------------------------------------------------------
class TestHandles:
    @pytest.mark.parametrize("forged", [0, 0xFFF, 0x10FF, 0x1FFF, 0xFFFF, 0xFFFF_FFFF, 0x1001])
    def test_forged_handle(self, machine, forged):
        m = machine
        vm = RawVm(m, 1)
        vm.create()
        before = snapshot(m)
        if m.abi == "6.12":
            assert m.hvc(0, "__pkvm_teardown_vm", forged).x1 == -ENOENT
        else:
            assert m.hvc(0, "__pkvm_start_teardown_vm", forged).x1 == -EINVAL
            assert m.hvc(0, "__pkvm_finalize_teardown_vm", forged).x1 == -EINVAL
            r = m.hvc(0, "__pkvm_vcpu_load", forged, 0, HCR)
            assert (r.x0, r.x1) == (0, forged - (1 << 64) if forged >> 63 else forged)
            assert m.hvc(0, "__pkvm_reclaim_dying_guest_page", forged, 0x40000).x1 == -EINVAL
        assert snapshot(m) == before
        assert vm.init_vcpu(0, handle=forged) == -ENOENT
        assert m.inspect.vms() == before["vms"]

    def test_7_2_handle_truncated_to_16_bits(self, m72):
        m = m72
        vm = RawVm(m, 1)
        h = vm.create()
        assert h == 0x1000
        m.hvc(1, "__pkvm_vcpu_load", 0x1_0000 + h, 0, HCR)
        assert vm_rec(m, h)["vcpus"] == {0: 1}
        m.hvc(1, "__pkvm_vcpu_put")
        assert m.hvc(0, "__pkvm_start_teardown_vm", 0x11000).x1 == 0
        assert vm_rec(m, h)["state"] == "dying"
        assert m.hvc(0, "__pkvm_finalize_teardown_vm", 0xFFFF_0000_0001_1000).x1 == 0
        assert vm_rec(m, h) is None

    def test_6_12_handle_truncated_to_32_bits(self, m612):
        m = m612
        vm = RawVm(m, 1)
        h = vm.create()
        assert m.hvc(0, "__pkvm_teardown_vm", 0x1_0000 + h).x1 == -ENOENT  # 32 bits: no wrap
        assert m.hvc(0, "__pkvm_teardown_vm", (0xABCD << 32) | h).x1 == 0
        assert m.inspect.vms() == []

    def test_stale_handle(self, machine):
        m = machine
        vm = RawVm(m, 1)
        h = vm.create()
        assert vm.teardown() == 0
        before = snapshot(m)
        if m.abi == "6.12":
            assert m.hvc(0, "__pkvm_teardown_vm", h).x1 == -ENOENT
        else:
            assert m.hvc(0, "__pkvm_start_teardown_vm", h).x1 == -EINVAL
            assert m.hvc(0, "__pkvm_finalize_teardown_vm", h).x1 == -EINVAL
            m.hvc(0, "__pkvm_vcpu_load", h, 0, HCR)
            assert m.hvc(0, "__pkvm_vcpu_in_poison_fault").x1 == -EINVAL
        assert vm.init_vcpu(0) == -ENOENT
        assert m.inspect.page_counts() == before["counts"]
        assert m.inspect.vms() == []


# -- init_vm ---------------------------------------------------------------------------------
class TestInitVm:
    def test_kvm_not_shared(self, machine):
        m = machine
        vm = RawVm(m, 1, share=False)
        if m.abi != "6.12":
            vm.reserve()
        before = m.inspect.page_counts()
        assert vm.init_vm() == -EPERM
        assert m.inspect.page_counts() == before

    def test_no_vcpus(self, machine):
        m = machine
        vm = RawVm(m, 0)
        if m.abi != "6.12":
            vm.reserve()
        before = m.inspect.page_counts()
        assert vm.init_vm() == -EINVAL
        assert m.inspect.page_counts() == before
        assert m.inspect.page(vm.kvm_pa >> 12).refcount == 0

    def test_7_2_handle_below_offset(self, m72):
        vm = RawVm(m72, 1)
        vm.set_handle(0xFFF)
        before = m72.inspect.page_counts()
        assert vm.init_vm() == -EINVAL
        assert m72.inspect.page_counts() == before

    @pytest.mark.parametrize("what", ["vm_carveout", "pgd_carveout", "vm_unaligned",
                                      "pgd_unaligned", "vm_shared", "pgd_donated",
                                      "vm_second_page_foreign"])
    def test_bad_donation_is_enomem(self, machine, what):
        m = machine
        vm = RawVm(m, 1)
        if m.abi != "6.12":
            vm.reserve()
        carve = hyp_region(m).start + 16 * PAGE
        vm_pa, pgd_pa = m.host.alloc_pages(2), m.host.alloc_pages(1)
        if what == "vm_carveout":
            vm_pa = carve
        elif what == "pgd_carveout":
            pgd_pa = carve
        elif what == "vm_unaligned":
            vm_pa += 8
        elif what == "pgd_unaligned":
            pgd_pa += 0x800
        elif what == "vm_shared":
            assert m.hvc(0, "__pkvm_host_share_hyp", vm_pa >> 12).x1 == 0
        elif what == "pgd_donated":
            assert donate_hyp(m, pgd_pa >> 12) == 0
        elif what == "vm_second_page_foreign":
            assert m.hvc(0, "__pkvm_host_share_hyp", (vm_pa >> 12) + 1).x1 == 0
        before = snapshot(m)
        assert vm.init_vm(vm_pa=vm_pa, pgd_pa=pgd_pa) == -ENOMEM
        after = snapshot(m)
        assert (after["counts"], after["vms"]) == (before["counts"], before["vms"])
        assert m.inspect.page(vm.kvm_pa >> 12).refcount == 0  # unpinned again
        assert not m.dead

    def test_init_vm_states(self, machine):
        m = machine
        vm = RawVm(m, 2)
        before = m.inspect.page_counts()
        if m.abi != "6.12":
            vm.reserve()
        ret = vm.init_vm()
        assert ret == (0x1000 if m.abi == "6.12" else 0)
        after = m.inspect.page_counts()
        # hyp_vm (2 pages) + pgd (1) donated
        assert after[("hyp", "OWNED")] - before[("hyp", "OWNED")] == 3
        assert m.inspect.page(vm.kvm_pa >> 12).refcount == 1
        for k in range(2):
            p = m.inspect.page((vm.vm_pa >> 12) + k)
            assert (p.owner, p.host, p.hyp) == ("hyp", "NOPAGE", "OWNED")
        rec = vm_rec(m, vm.handle)
        assert rec["state"] == "live" and rec["vcpus"] == {}
        assert rec["protected"] is False


# -- init_vcpu -------------------------------------------------------------------------------
class TestInitVcpu:
    def test_6_12_order_enforced(self, m612):
        m = m612
        vm = RawVm(m, 3)
        vm.init_vm()
        vm.make_vcpu(0)
        vm.make_vcpu(1)
        before = m.inspect.page_counts()
        assert vm.init_vcpu(1) == -EINVAL
        assert m.inspect.page_counts() == before
        assert m.inspect.page(vm.vcpu_pa[1] >> 12).refcount == 0
        assert vm.init_vcpu(0) == 0
        assert vm.init_vcpu(0) == -EINVAL  # duplicate: host idx 0 != next index 1
        assert vm.init_vcpu(1) == 0
        assert vm.init_vcpu(2) == 0
        vm.make_vcpu(3)
        assert vm.init_vcpu(3) == -EINVAL  # beyond created_vcpus
        assert vm_rec(m, vm.handle)["vcpus"] == {0: None, 1: None, 2: None}

    def test_7_2_any_order(self, m72):
        m = m72
        vm = RawVm(m, 3)
        vm.reserve()
        vm.init_vm()
        assert vm.init_vcpu(2) == 0
        assert vm.init_vcpu(0) == 0
        assert vm_rec(m, vm.handle)["vcpus"] == {0: None, 2: None}
        assert vm.init_vcpu(1) == 0
        assert set(vm_rec(m, vm.handle)["vcpus"]) == {0, 1, 2}

    def test_7_2_duplicate_and_out_of_range(self, m72):
        m = m72
        vm = RawVm(m, 2)
        vm.reserve()
        vm.init_vm()
        assert vm.init_vcpu(1) == 0
        other = vm.make_vcpu(7)
        vm._w(other, KVM_VCPU, "vcpu_idx", 1)  # another host vCPU claiming slot 1
        vm.make_vcpu(2)
        vm.make_vcpu(-1)
        before = m.inspect.page_counts()
        assert vm.init_vcpu(1) == -EINVAL  # the same host vCPU again
        assert vm.init_vcpu(7) == -EINVAL
        assert vm.init_vcpu(2) == -EINVAL  # out of range
        assert vm.init_vcpu(-1) == -EINVAL
        assert m.inspect.page_counts() == before
        assert m.inspect.page(other >> 12).refcount == 0
        assert m.inspect.page(vm.vcpu_pa[2] >> 12).refcount == 0
        assert m.inspect.page(vm.vcpu_pa[1] >> 12).refcount == 1
        assert vm_rec(m, vm.handle)["vcpus"] == {1: None}

    def test_vcpu_not_shared(self, machine):
        m = machine
        vm = RawVm(m, 1)
        if m.abi != "6.12":
            vm.reserve()
        vm.init_vm()
        vm.make_vcpu(0, share=False)
        before = m.inspect.page_counts()
        assert vm.init_vcpu(0) == -EBUSY
        assert m.inspect.page_counts() == before

    def test_bad_vcpu_donation(self, machine):
        m = machine
        vm = RawVm(m, 1)
        if m.abi != "6.12":
            vm.reserve()
        vm.init_vm()
        vm.make_vcpu(0)
        before = m.inspect.page_counts()
        assert vm.init_vcpu(0, mem_pa=hyp_region(m).start) == -ENOMEM
        mem = m.host.alloc_pages(2)
        assert vm.init_vcpu(0, mem_pa=mem + 16) == -ENOMEM
        assert m.hvc(0, "__pkvm_host_share_hyp", (mem >> 12) + 1).x1 == 0
        before = m.inspect.page_counts()
        assert vm.init_vcpu(0, mem_pa=mem) == -ENOMEM  # second page not host-owned
        assert m.inspect.page_counts() == before
        assert vm_rec(m, vm.handle)["vcpus"] == {}

    def test_7_2_needs_id_regs_flag(self, m72):
        m = m72
        vm = RawVm(m, 1, id_regs=False)
        vm.reserve()
        vm.init_vm()
        vm.make_vcpu(0)
        before = m.inspect.page_counts()
        assert vm.init_vcpu(0) == -EINVAL
        assert m.inspect.page_counts() == before

    def test_init_vcpu_of_torn_down_vm(self, machine):
        m = machine
        vm = RawVm(m, 2)
        if m.abi != "6.12":
            vm.reserve()
        vm.init_vm()
        assert vm.init_vcpu(0) == 0
        vm.make_vcpu(1)
        assert vm.teardown() == 0
        before = m.inspect.page_counts()
        mem = m.host.alloc_pages(2)
        m.host.write(mem, b"\x5a" * 64)
        assert vm.init_vcpu(1, mem_pa=mem) == -ENOENT
        assert m.inspect.page_counts() == before
        assert m.host.read(mem, 64) == bytes(64)  # donated, zeroed, returned


# -- load / put (7.2) -------------------------------------------------------------------------
class TestLoadPut:
    def setup_vm(self, m, n=2, protected=False):
        vm = RawVm(m, n, protected=protected)
        vm.create()
        return vm

    def test_load_put(self, m72):
        m = m72
        vm = self.setup_vm(m)
        h = vm.handle
        r = m.hvc(0, "__pkvm_vcpu_load", h, 0, HCR)
        assert (r.x0, r.x1) == (0, h)
        rec = vm_rec(m, h)
        assert rec["vcpus"] == {0: 0, 1: None} and rec["refcount"] == 1
        # the same vCPU on another CPU: refused silently
        before = snapshot(m)
        m.hvc(1, "__pkvm_vcpu_load", h, 0, HCR)
        assert snapshot(m) == before
        # another vCPU on a CPU that already has one: refused
        m.hvc(0, "__pkvm_vcpu_load", h, 1, HCR)
        assert snapshot(m) == before
        # out of range / huge index
        m.hvc(1, "__pkvm_vcpu_load", h, 2, HCR)
        m.hvc(1, "__pkvm_vcpu_load", h, 0xFFFF_FFFF, HCR)
        assert snapshot(m) == before
        m.hvc(1, "__pkvm_vcpu_load", h, 1, HCR)
        assert vm_rec(m, h)["vcpus"] == {0: 0, 1: 1}
        assert vm_rec(m, h)["refcount"] == 2
        # put on each CPU
        assert m.hvc(1, "__pkvm_vcpu_put", 0x77).x1 == 0x77
        assert vm_rec(m, h)["vcpus"] == {0: 0, 1: None}
        m.hvc(1, "__pkvm_vcpu_put")  # nothing loaded there: nothing happens
        assert vm_rec(m, h)["refcount"] == 1
        m.hvc(0, "__pkvm_vcpu_put")
        assert vm_rec(m, h)["refcount"] == 0
        # the vCPU can move CPUs once put
        m.hvc(1, "__pkvm_vcpu_load", h, 0, HCR)
        assert vm_rec(m, h)["vcpus"][0] == 1

    def test_load_missing_vcpu(self, m72):
        m = m72
        vm = RawVm(m, 2)
        vm.reserve()
        vm.init_vm()
        vm.init_vcpu(1)
        m.hvc(0, "__pkvm_vcpu_load", vm.handle, 0, HCR)
        assert vm_rec(m, vm.handle)["vcpus"] == {1: None}

    def test_teardown_with_loaded_vcpu(self, m72):
        m = m72
        vm = self.setup_vm(m)
        m.hvc(1, "__pkvm_vcpu_load", vm.handle, 1, HCR)
        before = snapshot(m)
        assert m.hvc(0, "__pkvm_start_teardown_vm", vm.handle).x1 == -EINVAL
        assert m.hvc(0, "__pkvm_finalize_teardown_vm", vm.handle).x1 == -EINVAL
        assert snapshot(m) == before
        m.hvc(1, "__pkvm_vcpu_put")
        assert vm.teardown() == 0

    def test_dying_vm(self, m72):
        m = m72
        vm = self.setup_vm(m)
        assert m.hvc(0, "__pkvm_start_teardown_vm", vm.handle).x1 == 0
        assert vm_rec(m, vm.handle)["state"] == "dying"
        m.hvc(0, "__pkvm_vcpu_load", vm.handle, 0, HCR)
        assert vm_rec(m, vm.handle)["vcpus"] == {0: None, 1: None}
        assert m.hvc(0, "__pkvm_start_teardown_vm", vm.handle).x1 == -EINVAL
        # lookups by handle still work while dying
        r = m.hvc(0, "__pkvm_tlb_flush_vmid", vm.handle)
        assert (r.x0, r.x1) == (0, vm.handle)
        assert m.hvc(0, "__pkvm_host_unshare_guest", vm.handle, 0x40000, 1).x1 == -ENOENT
        assert m.hvc(0, "__pkvm_finalize_teardown_vm", vm.handle).x1 == 0
        assert m.hvc(0, "__pkvm_finalize_teardown_vm", vm.handle).x1 == -EINVAL

    def test_finalize_needs_start(self, m72):
        m = m72
        vm = self.setup_vm(m)
        assert m.hvc(0, "__pkvm_finalize_teardown_vm", vm.handle).x1 == -EINVAL
        assert vm_rec(m, vm.handle)["state"] == "live"

    def test_guest_call_gating(self, m72):
        m = m72
        pvm = self.setup_vm(m, 1, protected=True)
        npvm = self.setup_vm(m, 1)
        pfn = m.host.alloc_pages(1) >> 12
        m.hvc(0, "__pkvm_vcpu_load", pvm.handle, 0, HCR)
        m.hvc(1, "__pkvm_vcpu_load", npvm.handle, 0, HCR)
        before = snapshot(m)
        # share/relax/mkyoung need a non-protected vCPU; donate a protected one
        assert m.hvc(0, "__pkvm_host_share_guest", pfn, 0x40000, 1, 0xF).x1 == -EINVAL
        assert m.hvc(0, "__pkvm_host_relax_perms_guest", 0x40000, 0xF).x1 == -EINVAL
        assert m.hvc(0, "__pkvm_host_mkyoung_guest", 0x40000).x1 == -EINVAL
        assert m.hvc(1, "__pkvm_host_donate_guest", pfn, 0x40000).x1 == -EINVAL
        # by-handle calls refuse protected VMs
        for name in ("__pkvm_host_unshare_guest", "__pkvm_host_wrprotect_guest",
                     "__pkvm_host_test_clear_young_guest"):
            assert m.hvc(0, name, pvm.handle, 0x40000, 1).x1 == -EINVAL, name
        assert snapshot(m) == before

    def test_no_loaded_vcpu(self, m72):
        m = m72
        self.setup_vm(m, 1)
        pfn = m.host.alloc_pages(1) >> 12
        before = snapshot(m)
        for name, args in (("__pkvm_host_share_guest", (pfn, 0x40000, 1, 0xF)),
                           ("__pkvm_host_donate_guest", (pfn, 0x40000)),
                           ("__pkvm_host_relax_perms_guest", (0x40000, 0xF)),
                           ("__pkvm_host_mkyoung_guest", (0x40000,)),
                           ("__pkvm_vcpu_in_poison_fault", ())):
            r = m.hvc(1, name, *args)
            assert (r.x0, r.x1) == (0, -EINVAL), name
        assert snapshot(m) == before


# -- teardown --------------------------------------------------------------------------------
class TestTeardown:
    def test_teardown_twice(self, machine):
        m = machine
        vm = RawVm(m, 2)
        vm.make_vcpu(0)
        vm.make_vcpu(1)
        before_all = m.inspect.page_counts()
        vm.create()
        assert vm.teardown() == 0
        if m.abi == "6.12":
            assert vm.teardown() == -ENOENT
        else:
            assert vm.teardown() == -EINVAL
        # pins dropped, donations back with the host
        assert m.inspect.page(vm.kvm_pa >> 12).refcount == 0
        assert m.inspect.page_counts() == before_all

    def test_teardown_returns_pages_in_memcache(self, machine):
        m = machine
        vm = RawVm(m, 1)
        vm.create()
        assert vm.teardown() == 0
        nr = int.from_bytes(m.host.read(vm.kvm_pa + KVM.offset("arch.pkvm.teardown_mc.nr_pages"), 8),
                            "little")
        # the hyp vCPU (2 pages) and the hyp VM (2 pages); the pgd goes to the stage-2 memcache
        # in 7.2 and to teardown_mc in 6.12
        assert nr == (5 if m.abi == "6.12" else 4)
        # zeroed before being pushed: only the memcache link (first word) is set
        for k in range(2):
            assert m.host.read(vm.vm_pa + k * PAGE + 8, PAGE - 8) == bytes(PAGE - 8)


# -- the host driver -------------------------------------------------------------------------
class TestDriver:
    @pytest.mark.parametrize("protected", [False, True])
    def test_create_map_destroy_balanced(self, machine, protected):
        m = machine
        if protected and m.abi == "6.12":
            pytest.skip("6.12 has no protected VMs (test_6_12_protected_einval)")
        before = m.inspect.page_counts()
        vm = m.host.create_vm(vcpus=2, protected=protected, memory="8M")
        assert len(vm.vcpus) == 2
        assert vm.handle == 0x1000
        vm.map(0x40000, 4)
        vm.map(0x40100, 2, cpu=1)
        if m.abi == "latest":
            counts = m.inspect.page_counts()
            state = "OWNED" if protected else "SHARED_BORROWED"
            assert counts[(("guest", vm.handle), state)] == 6
            rec = vm_rec(m, vm.handle)
            assert rec["protected"] is protected and rec["vcpus"] == {0: None}
        vm.destroy()
        assert m.inspect.page_counts() == before
        assert m.inspect.vms() == []
        assert not m.inspect.warnings()

    def test_many_vms_balanced(self, machine):
        m = machine
        before = m.inspect.page_counts()
        vms = [m.host.create_vm(vcpus=3, memory="2M") for _ in range(5)]
        for i, v in enumerate(vms):
            v.map(0x40000 + i, 3)
        for v in vms[::2] + vms[1::2]:
            v.destroy()
        assert m.inspect.page_counts() == before

    def test_6_12_protected_einval(self, m612):
        before = m612.inspect.page_counts()
        with pytest.raises(pkvm.HostError) as ei:
            m612.host.create_vm(vcpus=1, protected=True, memory="4M")
        assert ei.value.errno == EINVAL
        assert isinstance(ei.value, OSError)
        assert m612.inspect.page_counts() == before

    def test_protected_pages_isolated_then_wiped(self, m72):
        m = m72
        vm = m.host.create_vm(vcpus=1, protected=True, memory="4M")
        pattern = bytes(range(1, 256)) * 16
        vm.write(0x4000_0000, pattern)
        vm.write(0x4000_0000 + PAGE, b"second")
        backing = vm.backing(0x40000)
        assert m.host.read(backing, len(pattern)) == pattern
        vm.map(0x40000, 2)
        p = m.inspect.page(backing >> 12)
        assert p.owner == ("guest", vm.handle) and p.host == "NOPAGE"
        with pytest.raises(pkvm.HostDataAbort) as ei:
            m.host.read(backing, 8)
        assert not ei.value.fatal and not m.dead
        with pytest.raises(pkvm.HostDataAbort):
            m.host.write(backing + 100, b"x")
        vm.destroy()
        assert m.host.read(backing, PAGE) == bytes(PAGE)
        assert m.inspect.page(backing >> 12).owner == "host"

    def test_np_guest_pages_stay_host_readable(self, machine):
        m = machine
        vm = m.host.create_vm(vcpus=1, memory="4M")
        vm.write(0x4000_0000, b"shared data")
        vm.map(0x40000)
        backing = vm.backing(0x40000)
        assert m.host.read(backing, 11) == b"shared data"
        if m.abi == "latest":
            p = m.inspect.page(backing >> 12)
            assert p.host == "SHARED_OWNED" and p.share_count == 1
        vm.destroy()
        assert m.host.read(backing, 11) == b"shared data"

    def test_map_outside_memslot(self, machine):
        vm = machine.host.create_vm(vcpus=1, memory="1M")
        with pytest.raises(pkvm.HostError) as ei:
            vm.map(0x40000 + 256)
        assert ei.value.errno == 14  # EFAULT
        with pytest.raises(pkvm.HostError):
            vm.map(0x3FFFF)

    def test_bad_arguments(self, machine):
        with pytest.raises(ValueError):
            machine.host.create_vm(vcpus=0)

    def test_7_2_hyp_vm_made_at_first_map(self, m72):
        m = m72
        vm = m.host.create_vm(vcpus=2, memory="1M")
        assert vm_rec(m, vm.handle)["state"] == "reserved"
        vm.map(0x40000)
        assert vm_rec(m, vm.handle)["vcpus"] == {0: None}
        vm.destroy()
        vm2 = m.host.create_vm(vcpus=1, memory="1M")
        vm2.destroy()  # never created: only unreserved
        assert m.inspect.vms() == []

    def test_destroy_with_loaded_vcpu_warns(self, m72):
        m = m72
        vm = m.host.create_vm(vcpus=1, memory="1M")
        vm.map(0x40000)
        m.hvc(1, "__pkvm_vcpu_load", vm.handle, 0, HCR)
        with pytest.warns(UserWarning):
            vm.destroy()
        assert vm_rec(m, vm.handle) is not None  # the hyp VM leaks, as in Linux

    def test_host_scribbles_kvm(self, m72):
        """The host rewriting its struct kvm after create cannot confuse the hyp's copy."""
        m = m72
        vm = m.host.create_vm(vcpus=2, memory="1M")
        vm.map(0x40000)
        m.host.write(vm.kvm_pa + KVM.offset("created_vcpus"), (200).to_bytes(4, "little"))
        m.host.write(vm.kvm_pa + KVM.offset("arch.pkvm.handle"), (0x1005).to_bytes(4, "little"))
        assert vm_rec(m, vm.handle)["vcpus"] == {0: None}
        # vCPU index 5 is beyond the hyp's snapshot of created_vcpus
        raw = RawVm(m, 1)
        raw.kvm_pa = vm.kvm_pa
        raw.handle = vm.handle
        raw.make_vcpu(5)
        assert raw.init_vcpu(5) == -EINVAL
        m.host.write(vm.kvm_pa + KVM.offset("created_vcpus"), (2).to_bytes(4, "little"))
        m.host.write(vm.kvm_pa + KVM.offset("arch.pkvm.handle"), vm.handle.to_bytes(4, "little"))
        vm.destroy()
        assert vm_rec(m, vm.handle) is None


# -- 7.2 guest-memory calls with a loaded vCPU ---------------------------------------------------
class TestGuestMemory:
    @pytest.fixture
    def np(self, m72):
        m = m72
        vm = m.host.create_vm(vcpus=2, memory="8M")
        vm.ensure_hyp_vcpu(vm.vcpus[0])
        vm.topup_memcache(vm.vcpus[0])
        m.hvc(0, "__pkvm_vcpu_load", vm.handle, 0, HCR)
        assert vm_rec(m, vm.handle)["vcpus"][0] == 0
        return m, vm

    def share(self, m, pfn, gfn, n=1, prot=0xF, cpu=0):
        """As the driver does: top up the vCPU memcache, then share (refill moves it to EL2)."""
        for vm in list(m.host.vms):
            if vm.handle and vm.vcpus[0].hyp_created and cpu == 0:
                vm.topup_memcache(vm.vcpus[0])
        return m.hvc(cpu, "__pkvm_host_share_guest", pfn, gfn, n, prot).x1

    def prime(self, m):
        """Move the host's memcache pages to the hyp (they stay moved even if a call fails)."""
        self.share(m, 0x9000, 0x40000)

    def test_share_unshare(self, np):
        m, vm = np
        pfn = m.host.alloc_pages(1) >> 12
        assert self.share(m, pfn, 0x40000) == 0
        p = m.inspect.page(pfn)
        assert (p.host, p.share_count, p.guests) == ("SHARED_OWNED", 1, {vm.handle: "SHARED_BORROWED"})
        assert self.share(m, pfn, 0x40000) == -EPERM  # IPA already mapped
        assert self.share(m, pfn, 0x40001) == 0  # np multi-sharing
        assert m.inspect.page(pfn).share_count == 2
        h = vm.handle
        assert m.hvc(1, "__pkvm_host_unshare_guest", h, 0x40000, 1).x1 == 0
        assert m.inspect.page(pfn).host == "SHARED_OWNED"
        assert m.hvc(1, "__pkvm_host_unshare_guest", h, 0x40000, 1).x1 == -ENOENT
        assert m.hvc(1, "__pkvm_host_unshare_guest", h, 0x40001, 1).x1 == 0
        p = m.inspect.page(pfn)
        assert (p.host, p.share_count, p.guests, p.owner) == ("OWNED", 0, {}, "host")

    @pytest.mark.parametrize("args, err", [
        ((0x10,), EINVAL),  # prot beyond RWX (DEVICE)
        ((0xF, 2), EINVAL),  # neither a page nor a 2 MiB block
        ((0xF, 512), EINVAL),  # block, but pfn/IPA not 2 MiB-aligned
    ])
    def test_share_refusals(self, np, args, err):
        m, vm = np
        pfn = m.host.alloc_pages(1) >> 12
        prot = args[0]
        n = args[1] if len(args) > 1 else 1
        self.prime(m)
        before = snapshot(m)
        assert self.share(m, pfn, 0x40001, n, prot) == -err
        assert snapshot(m)["counts"] == before["counts"]

    def test_share_foreign_pfns(self, np):
        m, vm = np
        self.prime(m)
        before = m.inspect.page_counts()
        assert self.share(m, 1 << 36, 0x40000) == -EINVAL  # beyond the host IPA space
        assert self.share(m, 0x9000, 0x40000) == -EPERM  # MMIO
        assert self.share(m, hyp_region(m).start >> 12, 0x40000) == -EPERM  # hyp-owned
        assert m.inspect.page_counts() == before
        shared = m.host.alloc_pages(1) >> 12
        assert m.hvc(0, "__pkvm_host_share_hyp", shared).x1 == 0
        before = m.inspect.page_counts()
        assert self.share(m, shared, 0x40000) == -EPERM  # shared with the hyp
        assert m.inspect.page_counts() == before

    def test_share_block(self, np):
        m, vm = np
        base = m.host.alloc_pages(1024)
        pfn = ((base >> 12) + 511) & ~511
        assert self.share(m, pfn, 0x40000 + 512, 512) == 0
        assert m.inspect.page(pfn + 300).host == "SHARED_OWNED"
        h = vm.handle
        assert m.hvc(0, "__pkvm_host_unshare_guest", h, 0x40000 + 512, 1).x1 == -E2BIG
        assert m.hvc(0, "__pkvm_host_unshare_guest", h, 0x40000 + 512, 512).x1 == 0
        assert m.inspect.page(pfn + 300).host == "OWNED"

    def test_empty_memcache_is_enomem(self, m72):
        m = m72
        vm = m.host.create_vm(vcpus=2, memory="8M")
        vm.ensure_hyp_vcpu(vm.vcpus[1])  # never topped up
        m.hvc(1, "__pkvm_vcpu_load", vm.handle, 1, HCR)
        pfn = m.host.alloc_pages(1) >> 12
        before = m.inspect.page_counts()
        assert self.share(m, pfn, 0x40000, cpu=1) == -ENOMEM
        assert m.inspect.page_counts() == before

    def test_wrprotect_young(self, np):
        from pkvm.hyp.pgtable import stage2_pte_prot

        m, vm = np
        h = vm.handle
        pfn = m.host.alloc_pages(1) >> 12
        assert self.share(m, pfn, 0x40002, prot=0xC) == 0  # RW
        leaf = lambda: [e for e in m.inspect.walk(f"guest:{h:#x}") if e["addr"] == 0x40002000][0]  # noqa: E731
        assert leaf()["prot"] & 0xF == 0xC
        assert m.hvc(0, "__pkvm_host_wrprotect_guest", h, 0x40002, 1).x1 == 0
        assert leaf()["prot"] & 0xF == 0x8
        assert m.hvc(0, "__pkvm_host_relax_perms_guest", 0x40002, 0xF).x1 == 0
        assert stage2_pte_prot(leaf()["pte"]) & 0xF == 0xF
        assert m.hvc(0, "__pkvm_host_test_clear_young_guest", h, 0x40002, 1, 1).x1 == 1
        assert m.hvc(0, "__pkvm_host_test_clear_young_guest", h, 0x40002, 1, 0).x1 == 0
        assert m.hvc(0, "__pkvm_host_mkyoung_guest", 0x40002).x1 == 0
        assert m.hvc(0, "__pkvm_host_test_clear_young_guest", h, 0x40002, 1, 0).x1 == 1
        # an unmapped gfn: wrprotect skips invalid leaves, test_clear_young finds nothing young
        assert m.hvc(0, "__pkvm_host_wrprotect_guest", h, 0x40003, 1).x1 == 0
        assert m.hvc(0, "__pkvm_host_test_clear_young_guest", h, 0x40003, 1, 1).x1 == 0
        assert m.hvc(0, "__pkvm_host_relax_perms_guest", 0x40002, 0x10).x1 == -EINVAL

    def test_relax_perms_unmapped_is_eagain(self, np):
        m, vm = np
        r = m.hvc(0, "__pkvm_host_relax_perms_guest", 0x40005, 0xF)
        assert (r.x0, r.x1) == (0, -EAGAIN)

    def test_mkyoung_always_zero(self, np):
        m, vm = np
        assert m.hvc(0, "__pkvm_host_mkyoung_guest", 1 << 36).x1 == 0

    def test_destroy_after_manual_traffic_balanced(self, m72):
        m = m72
        before = m.inspect.page_counts()
        vm = m.host.create_vm(vcpus=1, memory="4M")
        vm.map(0x40000, 3)
        m.hvc(0, "__pkvm_vcpu_load", vm.handle, 0, HCR)
        m.hvc(0, "__pkvm_host_wrprotect_guest", vm.handle, 0x40001, 1)
        m.hvc(0, "__pkvm_vcpu_put")
        vm.destroy()
        assert m.inspect.page_counts() == before


class TestProtectedReclaim:
    @pytest.fixture
    def pvm(self, m72):
        m = m72
        vm = m.host.create_vm(vcpus=1, protected=True, memory="4M")
        vm.write(0x4000_0000, b"\x77" * PAGE)
        vm.map(0x40000, 2)
        return m, vm

    def test_donate_guest_refusals(self, pvm):
        m, vm = pvm
        vm.topup_memcache(vm.vcpus[0])
        m.hvc(0, "__pkvm_vcpu_load", vm.handle, 0, HCR)
        used = vm.backing(0x40000) >> 12
        fresh = m.host.alloc_pages(1) >> 12
        m.hvc(0, "__pkvm_host_donate_guest", 0x9000, 0x40010)  # prime the refill
        before = m.inspect.page_counts()
        assert m.hvc(0, "__pkvm_host_donate_guest", used, 0x40005).x1 == -EPERM  # not host's
        assert m.hvc(0, "__pkvm_host_donate_guest", fresh, 0x40001).x1 == -EPERM  # IPA mapped
        assert m.hvc(0, "__pkvm_host_donate_guest", hyp_region(m).start >> 12,
                     0x40005).x1 == -EPERM
        assert m.inspect.page_counts() == before
        assert m.hvc(0, "__pkvm_host_donate_guest", fresh, 0x40005).x1 == 0
        ann = m.inspect.host_annotation(fresh << 12)
        assert ann == (2, vm.handle | (0x40005 << 16))  # owner GUEST, meta = handle | gfn << 16
        m.hvc(0, "__pkvm_vcpu_put")

    def test_force_reclaim(self, pvm):
        m, vm = pvm
        pa = vm.backing(0x40000)
        assert m.inspect.page(pa >> 12).owner == ("guest", vm.handle)
        r = m.hvc(1, "__pkvm_force_reclaim_guest_page", pa + 0x123)
        assert (r.x0, r.x1) == (0, 0)
        p = m.inspect.page(pa >> 12)
        assert (p.owner, p.host, p.guests) == ("host", "OWNED", {})
        assert m.host.read(pa, PAGE) == bytes(PAGE)  # wiped
        assert m.hvc(1, "__pkvm_force_reclaim_guest_page", pa).x1 == -EAGAIN
        # the guest IPA is poisoned, not free: donating there is refused
        fresh = m.host.alloc_pages(1) >> 12
        vm.topup_memcache(vm.vcpus[0])
        m.hvc(0, "__pkvm_vcpu_load", vm.handle, 0, HCR)
        assert m.hvc(0, "__pkvm_host_donate_guest", fresh, 0x40000).x1 == -EPERM
        m.hvc(0, "__pkvm_vcpu_put")
        vm.destroy()
        assert m.inspect.vms() == []

    def test_reclaim_dying(self, pvm):
        m, vm = pvm
        h = vm.handle
        pa = vm.backing(0x40001)
        assert m.hvc(0, "__pkvm_reclaim_dying_guest_page", h, 0x40001).x1 == -EINVAL  # not dying
        assert m.hvc(0, "__pkvm_start_teardown_vm", h).x1 == 0
        assert m.hvc(0, "__pkvm_reclaim_dying_guest_page", h, 0x40003).x1 == -ENOENT
        assert m.hvc(0, "__pkvm_reclaim_dying_guest_page", h, 0x40001).x1 == 0
        assert m.inspect.page(pa >> 12).owner == "host"
        assert m.host.read(pa, PAGE) == bytes(PAGE)
        assert m.hvc(0, "__pkvm_reclaim_dying_guest_page", h, 0x40001).x1 == -ENOENT
        # the driver finishes the job
        vm.mapped.pop(0x40001)
        with pytest.warns(UserWarning):  # the driver's own start_teardown is refused: WARN
            vm.destroy()
        assert m.inspect.vms() == []

    def test_reclaim_dying_np_page_is_eperm(self, m72):
        m = m72
        vm = m.host.create_vm(vcpus=1, memory="4M")
        vm.map(0x40000)
        h = vm.handle
        assert m.hvc(0, "__pkvm_start_teardown_vm", h).x1 == 0
        assert m.hvc(0, "__pkvm_reclaim_dying_guest_page", h, 0x40000).x1 == -EPERM
        assert m.hvc(0, "__pkvm_host_unshare_guest", h, 0x40000, 1).x1 == 0  # dying: still works
        vm.mapped.clear()
        with pytest.warns(UserWarning):
            vm.destroy()
        assert m.inspect.vms() == []
