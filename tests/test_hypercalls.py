"""Host hypercall dispatch, gating and the measured answers of the real hypervisors.

Spec: README "Register conventions", "Measured on the real hypervisors", "Measured: host calls
with NULL/zero arguments"; vm-state.md §1.
"""

import pytest

import pkvm
from conftest import (
    EAGAIN,
    EFAULT,
    EINVAL,
    ENODEV,
    ENOENT,
    EPERM,
    ERANGE,
    hyp_region,
    snapshot,
)

BASE = 0xC600_0000
U64 = (1 << 64) - 1


def nr(m):
    return m.profile.nr_hcalls


def fid(m, name):
    return m.profile.func_id(name)


# -- measured table (1 GiB, 2 CPUs) ----------------------------------------------------------
class TestMeasured:
    def test_machine_shape(self, machine1g):
        ram = [r for r in machine1g.memory_map() if r.kind == "ram"][0]
        assert (ram.start, ram.end) == (0x4000_0000, 0x8000_0000)
        hyp = hyp_region(machine1g)
        assert hyp.start <= 0x7F200 << 12 < hyp.end
        # kvm_hyp_reserve rounded to 2 MiB: 10 MiB (6.12) / 12 MiB (7.2), ending 6 MiB below RAM end
        assert hyp.size == (10 << 20 if machine1g.abi == "6.12" else 12 << 20)
        assert hyp.end == 0x8000_0000 - (6 << 20)
        assert ram.start <= hyp.start and hyp.end <= ram.end

    def test_share_unshare_sequence(self, machine1g):
        m = machine1g
        pfn = m.host.alloc_pages(1) >> 12
        assert m.hvc(0, "__pkvm_host_share_hyp", pfn) == pkvm.HvcResult(0, 0, 0, 0)
        assert m.hvc(0, "__pkvm_host_share_hyp", pfn).x1 == -EPERM
        assert m.hvc(1, "__pkvm_host_unshare_hyp", pfn).x1 == 0
        assert m.hvc(1, "__pkvm_host_unshare_hyp", pfn).x1 == -EPERM

    def test_unshare_never_shared(self, machine1g):
        pfn = machine1g.host.alloc_pages(1) >> 12
        r = machine1g.hvc(0, "__pkvm_host_unshare_hyp", pfn)
        assert (r.x0, r.x1) == (0, -EPERM)

    @pytest.mark.parametrize("pfn", [0x40000, 0x7FFFF])
    def test_first_and_last_ram_pfn(self, machine1g, pfn):
        r = machine1g.hvc(0, "__pkvm_host_share_hyp", pfn)
        assert (r.x0, r.x1) == (0, 0)
        assert machine1g.inspect.page(pfn).host == "SHARED_OWNED"
        assert machine1g.inspect.page(pfn).hyp == "SHARED_BORROWED"

    @pytest.mark.parametrize("pfn", [0x80000, 0x9000, 0x8000, 0xFFFFFFFFF])
    def test_not_ram_is_eperm(self, machine1g, pfn):
        before = snapshot(machine1g)
        r = machine1g.hvc(0, "__pkvm_host_share_hyp", pfn)
        assert (r.x0, r.x1) == (0, -EPERM)
        r = machine1g.hvc(0, "__pkvm_host_unshare_hyp", pfn)
        assert (r.x0, r.x1) == (0, -EPERM)
        assert snapshot(machine1g) == before

    def test_all_ones_pfn(self, machine1g):
        m = machine1g
        r = m.hvc(0, "__pkvm_host_share_hyp", U64)
        assert r.x1 == (-ERANGE if m.abi == "6.12" else -EINVAL)

    def test_carveout_pfn(self, machine1g):
        m = machine1g
        before = snapshot(m)
        assert m.hvc(0, "__pkvm_host_share_hyp", 0x7F200).x1 == -EPERM
        assert m.hvc(0, "__pkvm_host_unshare_hyp", 0x7F200).x1 == -EPERM
        assert snapshot(m) == before

    @pytest.mark.parametrize("handle", [0, 0x1000])
    def test_6_12_teardown_empty(self, handle):
        m = pkvm.Machine(memory="1G", cpus=2, abi="6.12")
        r = m.hvc(0, "__pkvm_teardown_vm", handle)
        assert (r.x0, r.x1) == (0, -ENOENT)

    def test_flush_vm_context(self, machine1g):
        r = machine1g.hvc(0, "__kvm_flush_vm_context")
        assert (r.x0, r.x1) == (0, 0)

    def test_prot_finalize_again(self, machine1g):
        for cpu in (0, 1):
            r = machine1g.hvc(cpu, "__pkvm_prot_finalize")
            assert (r.x0, r.x1) == (0, -EPERM)

    def test_boot_calls_refused_after_finalise(self, machine1g):
        m = machine1g
        names = ["__pkvm_init"] + (["__kvm_get_mdcr_el2"] if m.abi == "6.12" else [])
        for name in names:
            r = m.hvc(0, name, 1, 2, 3)
            assert (r.x0, r.x1, r.x2, r.x3) == (-1, 1, 2, 3)
        # every n below __pkvm_prot_finalize is refused
        for n in range(m.profile.number("__pkvm_prot_finalize")):
            assert m.hvc(0, BASE + n).x0 == -1

    def test_unknown_ids(self, machine1g):
        m = machine1g
        for x0 in (BASE + nr(m), BASE + nr(m) + 1, BASE + 0xFFFF, 0x8400_0000, 0x8600_0000,
                   (1 << 32) | fid(m, "__pkvm_host_share_hyp"), 0, U64):
            r = m.hvc(0, x0, 7, 8, 9)
            assert (r.x0, r.x1, r.x2, r.x3) == (-1, 7, 8, 9), hex(x0)

    @pytest.mark.parametrize("name", ["__pkvm_host_share_guest", "__pkvm_host_donate_guest",
                                      "__pkvm_vcpu_in_poison_fault"])
    def test_7_2_guest_calls_need_loaded_vcpu(self, name):
        m = pkvm.Machine(memory="1G", cpus=2, abi="latest")
        pfn = m.host.alloc_pages(1) >> 12
        before = snapshot(m)
        r = m.hvc(0, name, pfn, 0x40000, 1, 0xF)
        assert (r.x0, r.x1) == (0, -EINVAL)
        assert snapshot(m) == before

    @pytest.mark.parametrize("name", ["__pkvm_host_unshare_guest",
                                      "__pkvm_reclaim_dying_guest_page"])
    def test_7_2_guest_calls_by_handle_empty_table(self, name):
        m = pkvm.Machine(memory="1G", cpus=2, abi="latest")
        r = m.hvc(0, name, 0x1000, 0x40000, 1)
        assert (r.x0, r.x1) == (0, -EINVAL)

    def test_7_2_force_reclaim(self):
        m = pkvm.Machine(memory="1G", cpus=2, abi="latest")
        pa = m.host.alloc_pages(1)
        before = snapshot(m)
        assert m.hvc(0, "__pkvm_force_reclaim_guest_page", pa).x1 == -EAGAIN
        assert m.hvc(0, "__pkvm_force_reclaim_guest_page", 0x1_0000_0000).x1 == -EFAULT
        assert snapshot(m) == before


# -- NULL / zero arguments ------------------------------------------------------------------
PANIC_BOTH = ["__kvm_adjust_pc", "__kvm_tlb_flush_vmid_ipa", "__kvm_tlb_flush_vmid",
              "__kvm_flush_cpu_context", "__vgic_v3_restore_vmcr_aprs"]


class TestNullArguments:
    @pytest.mark.parametrize("name", PANIC_BOTH + ["__kvm_tlb_flush_vmid_range", "save_aprs"])
    def test_panics(self, machine, name):
        m = machine
        args = ()
        if name == "__kvm_tlb_flush_vmid_range":
            args = (0, 0, 1)
        if name == "save_aprs":
            name = "__vgic_v3_save_vmcr_aprs" if m.abi == "6.12" else "__vgic_v3_save_aprs"
        with pytest.raises(pkvm.HypPanic) as ei:
            m.hvc(1, name, *args)
        assert ei.value.cpu == 1
        assert ei.value.call == name
        assert ei.value.reason
        assert m.dead
        # the machine is dead: every later call and host access raises again
        with pytest.raises(pkvm.HypPanic):
            m.hvc(0, "__kvm_flush_vm_context")
        with pytest.raises(pkvm.HypPanic):
            m.hvc(0, 0x8400_0000)
        with pytest.raises(pkvm.HypPanic):
            m.host.read(0x4000_0000 + (8 << 20), 8)
        with pytest.raises(pkvm.HypPanic):
            m.host.write(0x4000_0000 + (8 << 20), b"x")

    @pytest.mark.parametrize("name", ["__vgic_v5_save_apr", "__vgic_v5_restore_vmcr_apr"])
    def test_7_2_gicv5_panics(self, m72, name):
        # the model's GIC is v3: GICv5 register accesses at EL2 are undefined (inferred)
        with pytest.raises(pkvm.HypPanic):
            m72.hvc(0, name, 0)
        assert m72.dead

    @pytest.mark.parametrize("name", ["__kvm_tlb_flush_vmid_ipa_nsh"])
    def test_other_deref_panics(self, machine, name):
        with pytest.raises(pkvm.HypPanic):
            machine.hvc(0, name, 0, 0, 0)

    def test_shared_pointer_does_not_panic(self, machine):
        # a host pointer into a page shared with (6.12) / pinned by (7.2) the hyp is readable
        m = machine
        vm = m.host.create_vm(vcpus=1, memory="1M")
        vm.map(0x40000)
        from conftest import kva

        r = m.hvc(0, "__kvm_adjust_pc", kva(vm.vcpus[0].pa))
        assert r.x0 == 0 and not m.dead

    def test_vcpu_run(self, machine):
        if machine.abi == "6.12":
            with pytest.raises(pkvm.HypPanic):
                machine.hvc(0, "__kvm_vcpu_run", 0)
        else:
            r = machine.hvc(0, "__kvm_vcpu_run", 0)
            assert (r.x0, r.x1) == (0, -EINVAL)

    def test_6_12_vcpu_init_traps(self, m612):
        with pytest.raises(pkvm.HypPanic):
            m612.hvc(0, "__pkvm_vcpu_init_traps", 0)

    def test_timer_set_cntvoff(self, machine):
        r = machine.hvc(0, "__kvm_timer_set_cntvoff", 0)
        assert (r.x0, r.x1) == (0, 0)

    def test_init_vm_null(self, machine):
        before = snapshot(machine)
        r = machine.hvc(0, "__pkvm_init_vm", 0, 0, 0)
        assert (r.x0, r.x1) == (0, -EPERM)
        assert snapshot(machine) == before

    def test_init_vcpu_null(self, machine):
        # the first RAM page is donated, zeroed, returned, then -ENOENT
        m = machine
        m.host.write(0x4000_0000, b"\xaa" * 16)
        before = snapshot(m)
        r = m.hvc(0, "__pkvm_init_vcpu", 0x1000, 0, 0)
        assert (r.x0, r.x1) == (0, -ENOENT)
        # ownership is back as it was (the host stage-2 may now map the page at 4 KiB)
        after = snapshot(m)
        assert (after["counts"], after["hyp"], after["vms"]) == (
            before["counts"], before["hyp"], before["vms"])
        assert m.inspect.page(0x40000).host == "OWNED"
        assert m.host.read(0x4000_0000, 16) == bytes(16)

    @pytest.mark.parametrize("name", ["__pkvm_vcpu_load", "__pkvm_tlb_flush_vmid"])
    def test_7_2_no_result_keeps_x1(self, m72, name):
        r = m72.hvc(0, name, 0x1000, 0, 0)
        assert (r.x0, r.x1) == (0, 0x1000)

    def test_7_2_vcpu_put(self, m72):
        r = m72.hvc(0, "__pkvm_vcpu_put")
        assert (r.x0, r.x1) == (0, 0)

    @pytest.mark.parametrize("name", ["__pkvm_start_teardown_vm", "__pkvm_finalize_teardown_vm"])
    @pytest.mark.parametrize("handle", [0, 0x1000])
    def test_7_2_teardown_empty(self, m72, name, handle):
        r = m72.hvc(0, name, handle)
        assert (r.x0, r.x1) == (0, -EINVAL)

    def test_7_2_reserve_unreserve(self, m72):
        assert m72.hvc(0, "__pkvm_reserve_vm").x1 == 0x1000
        r = m72.hvc(0, "__pkvm_unreserve_vm", 0x1000)
        assert (r.x0, r.x1) == (0, 0x1000)
        assert m72.hvc(0, "__pkvm_reserve_vm").x1 == 0x1000

    @pytest.mark.parametrize("name", ["__tracing_load", "__tracing_swap_reader",
                                      "__tracing_enable", "__tracing_reset",
                                      "__tracing_enable_event"])
    def test_7_2_tracing_absent(self, m72, name):
        r = m72.hvc(0, name, 0, 0)
        assert (r.x0, r.x1) == (0, -ENODEV)

    @pytest.mark.parametrize("name", ["__tracing_unload", "__tracing_update_clock",
                                      "__tracing_write_event"])
    def test_7_2_tracing_noop(self, m72, name):
        r = m72.hvc(0, name, 0x1234)
        assert (r.x0, r.x1) == (0, 0x1234)

    @pytest.mark.parametrize("pfn, e612, e72", [
        (U64, -ERANGE, -EINVAL),
        (0x1000000000, -ERANGE, -EPERM),
        (0x1234567890, -ERANGE, -EPERM),
        (0xFFFFFFFFFFFF, -ERANGE, -EPERM),
        (0xFFFFFFFFFFFFF, -ERANGE, -EINVAL),
        (0x10000000000000, -EPERM, -EPERM),
        (0x8000000000000000, -EPERM, -EPERM),
    ])
    def test_share_hyp_odd_pfns(self, machine, pfn, e612, e72):
        before = snapshot(machine)
        r = machine.hvc(0, "__pkvm_host_share_hyp", pfn)
        assert (r.x0, r.x1) == (0, e612 if machine.abi == "6.12" else e72)
        assert snapshot(machine) == before

    def test_share_hyp_pfn_wraps_into_ram(self, machine):
        r = machine.hvc(0, "__pkvm_host_share_hyp", 0xFFF0000000040000)
        assert (r.x0, r.x1) == (0, 0)
        assert machine.inspect.page(0x40000).host == "SHARED_OWNED"
        # unshare through the plain pfn works: it is the same page
        assert machine.hvc(0, "__pkvm_host_unshare_hyp", 0x40000).x1 == 0


# -- register conventions ---------------------------------------------------------------------
class TestConventions:
    def test_sve_hint_bit(self, machine):
        m = machine
        pfn = m.host.alloc_pages(1) >> 12
        r = m.hvc(0, fid(m, "__pkvm_host_share_hyp") | (1 << 16), pfn)
        assert (r.x0, r.x1) == (0, 0)
        assert m.inspect.page(pfn).host == "SHARED_OWNED"

    def test_numbers(self, machine):
        m = machine
        n = 9 if m.abi == "6.12" else 29
        assert fid(m, "__pkvm_host_share_hyp") == BASE + n
        assert nr(m) == (26 if m.abi == "6.12" else 50)
        # an int is always the whole x0, never an index
        assert m.hvc(0, n, 0x40000).x0 == -1

    def test_args_reduced_mod_2_64(self, machine):
        m = machine
        pfn = m.host.alloc_pages(1) >> 12
        r = m.hvc(0, "__pkvm_host_share_hyp", pfn + (5 << 64))
        assert (r.x0, r.x1) == (0, 0)
        r = m.hvc(0, "__pkvm_host_unshare_hyp", pfn - (1 << 64))
        assert (r.x0, r.x1) == (0, 0)
        # a negative int is the two's-complement register
        assert m.hvc(0, "__pkvm_host_share_hyp", -1).x1 == m.hvc(0, "__pkvm_host_share_hyp", U64).x1
        # and so is the function ID
        r = m.hvc(0, fid(m, "__pkvm_host_share_hyp") + (1 << 64), pfn)
        assert (r.x0, r.x1) == (0, 0)

    def test_registers_signed_unsigned(self, machine):
        r = machine.hvc(0, 0x8400_0000, U64, U64, U64)
        assert (r.x0, r.x1, r.x2, r.x3) == (-1, -1, U64, U64)

    def test_other_profile_name(self, machine):
        other = "__pkvm_reserve_vm" if machine.abi == "6.12" else "__pkvm_teardown_vm"
        r = machine.hvc(0, other, 1, 2, 3)
        assert (r.x0, r.x1, r.x2, r.x3) == (-1, 1, 2, 3)
        if machine.abi == "6.12":
            for name in ("__pkvm_vcpu_load", "__pkvm_host_share_guest", "__tracing_load"):
                assert machine.hvc(0, name, 4).x0 == -1
        else:
            for name in ("__kvm_get_mdcr_el2", "__pkvm_vcpu_init_traps",
                         "__vgic_v3_save_vmcr_aprs"):
                assert machine.hvc(0, name, 4).x0 == -1

    def test_name_of_neither(self, machine):
        with pytest.raises(ValueError):
            machine.hvc(0, "__pkvm_no_such_call")

    def test_caller_mistakes(self, machine):
        with pytest.raises(ValueError):
            machine.hvc(2, "__kvm_flush_vm_context")
        with pytest.raises(ValueError):
            machine.hvc(-1, "__kvm_flush_vm_context")
        with pytest.raises(TypeError):
            machine.hvc(0, "__kvm_flush_vm_context", 1, 2, 3, 4, 5, 6, 7)
        assert not machine.dead

    def test_refused_keeps_x1_to_x3(self, machine):
        for x0 in (0x8400_0000, BASE + nr(machine), fid(machine, "__pkvm_init")):
            r = machine.hvc(1, x0, 0x11, 0x22, 0x33, 0x44)
            assert (r.x0, r.x1, r.x2, r.x3) == (-1, 0x11, 0x22, 0x33)

    def test_handlers_never_write_x2_x3(self, machine):
        pfn = machine.host.alloc_pages(1) >> 12
        r = machine.hvc(0, "__pkvm_host_share_hyp", pfn, 0xAAAA, 0xBBBB)
        assert (r.x0, r.x1, r.x2, r.x3) == (0, 0, 0xAAAA, 0xBBBB)
        r = machine.hvc(0, "__pkvm_host_share_hyp", pfn, 0xAAAA, 0xBBBB)
        assert (r.x1, r.x2, r.x3) == (-EPERM, 0xAAAA, 0xBBBB)

    def test_no_result_handlers_keep_x1(self, machine):
        m = machine
        names = ["__kvm_flush_vm_context", "__kvm_timer_set_cntvoff"]
        if m.abi == "latest":
            names += ["__pkvm_unreserve_vm", "__pkvm_vcpu_put", "__pkvm_tlb_flush_vmid",
                      "__pkvm_vcpu_load"]
        for name in names:
            r = m.hvc(0, name, 0xDEAD, 0xBEEF)
            assert (r.x0, r.x1, r.x2) == (0, 0xDEAD, 0xBEEF), name

    def test_6_12_all_calls_reachable(self, m612):
        # after finalise, 8..25 dispatch (x0 = 0); the NULL panics aside
        safe = ["__pkvm_prot_finalize", "__pkvm_host_share_hyp", "__pkvm_host_unshare_hyp",
                "__kvm_flush_vm_context", "__kvm_timer_set_cntvoff", "__pkvm_init_vm",
                "__pkvm_teardown_vm"]
        for name in safe:
            assert m612.hvc(0, name).x0 == 0, name

    def test_trace_records_calls(self, machine):
        machine.hvc(1, "__kvm_flush_vm_context")
        rec = machine.trace[-1]
        assert (rec.cpu, rec.name, rec.x0) == (1, "__kvm_flush_vm_context", 0)
