"""Invariants and the ghost specification (`pkvm.check`)."""

from __future__ import annotations

import gc
import weakref

import pytest

import pkvm
from pkvm.check import Checker, InvariantViolation
from pkvm.check.invariants import INVARIANTS

ABIS = ["latest", "6.12"]


def _machine(abi: str, **kw) -> pkvm.Machine:
    return pkvm.Machine(memory="64M", cpus=2, abi=abi, check=True, trace=False, **kw)


@pytest.mark.parametrize("abi", ABIS)
def test_clean_boot_passes_every_invariant(abi: str) -> None:
    m = _machine(abi)
    assert isinstance(m.checker, Checker)
    m.checker.check_all()


@pytest.mark.parametrize("abi", ABIS)
def test_ghost_agrees_on_host_supplied_pfns(abi: str) -> None:
    """memory.md §4.4 rows, plus a second share / unshare, all judged by the ghost."""
    m = _machine(abi)
    pfn = m.host.alloc_pages(1) >> 12
    ram_lo, ram_hi = m.mem.base >> 12, m.mem.end >> 12
    carve = m.carveout[0] >> 12
    rows = [pfn, pfn, ram_lo, ram_hi - 1, ram_hi, 0x9000, carve, 0xFFFFFFFFF, 0x1000000000,
            0xFFFFFFFFFFFFF, 0x10000000000000, 0xFFF0000000000000 | ram_lo, 2**64 - 1]
    for p in rows:
        m.hvc(0, "__pkvm_host_share_hyp", p)
    for p in rows:
        m.hvc(1, "__pkvm_host_unshare_hyp", p)
    m.checker.check_all()
    assert m.hvc(0, "__pkvm_host_share_hyp", 2**64 - 1).x1 == (-22 if abi == "latest" else -34)


@pytest.mark.parametrize("abi", ABIS)
def test_vm_life_is_checked(abi: str) -> None:
    m = _machine(abi)
    vms = [m.host.create_vm(vcpus=2, protected=(abi == "latest" and k == 0), memory="256K")
           for k in range(2)]
    for vm in vms:
        vm.map(0x40000, 4)
    m.checker.check_all()
    for vm in vms:
        vm.destroy()
    m.checker.check_all()
    assert m.checker.calls > 10


def test_violation_names_invariant_page_and_values() -> None:
    m = _machine("6.12")  # (7.2 would first notice the pinned page is not mapped at EL2)
    pa = m.host.alloc_pages(1)
    assert m.hvc(0, "__pkvm_host_share_hyp", pa >> 12).x1 == 0
    h = m._hyp  # simulate a hyp bug: a stray pin
    h.vmemmap.refcount[h.vmemmap.idx(pa)] += 1
    with pytest.raises(InvariantViolation) as ei:
        m.checker.check_all()
    v = ei.value
    assert v.invariant == "pin-refcount" and v.pfn == pa >> 12
    assert "refcount 0" in str(v) and "refcount 1" in str(v)
    assert v.invariant in INVARIANTS


def test_state_pair_violation_after_call() -> None:
    m = _machine("latest")
    pa = m.host.alloc_pages(1)
    h = m._hyp
    h.vmemmap.hyp_state[h.vmemmap.idx(pa)] = 0  # hyp OWNED while the host owns it too
    with pytest.raises(InvariantViolation) as ei:
        m.hvc(0, "__pkvm_host_unshare_hyp", pa >> 12)
    assert ei.value.invariant == "state-pair"
    assert "__pkvm_host_unshare_hyp" in str(ei.value)


def test_ghost_catches_wrong_result() -> None:
    m = _machine("latest")
    h = m._hyp
    m.hvc(0, "__pkvm_reserve_vm")
    h.vm_table[5] = object()  # a slot the ghost does not know about
    with pytest.raises(InvariantViolation) as ei:
        m.hvc(0, "__pkvm_reserve_vm")
    assert ei.value.invariant in ("ghost", "vm-table")


def test_load_no_pin_caught_at_load() -> None:
    m = _machine("latest", bugs=("load-no-pin",))
    vm = m.host.create_vm(vcpus=1, memory="256K")
    with pytest.raises(InvariantViolation) as ei:
        vm.map(0x40000, 1)
    assert ei.value.invariant == "vm-refcount"


@pytest.mark.parametrize("abi", ABIS)
def test_teardown_keeps_stage2_caught(abi: str) -> None:
    m = _machine(abi, bugs=("teardown-keeps-stage2",))
    vm = m.host.create_vm(vcpus=1, memory="256K")
    vm.map(0x40000, 2)
    with pytest.raises(InvariantViolation) as ei:
        vm.destroy()
    assert ei.value.invariant == "hyp-accounting"


def test_unpin_underflow_caught() -> None:
    from pkvm.host.kvm import host_va

    m = _machine("latest", bugs=("unpin-underflow",))
    vm = m.host.create_vm(vcpus=1, memory="256K")
    vm.map(0x40000, 1)  # the hyp VM exists and pins the host struct kvm
    m.host.write(vm.kvm_field_pa("created_vcpus"), (0).to_bytes(4, "little"))
    fresh = [host_va(m.host.alloc_pages(2)) for _ in range(2)]
    with pytest.raises(InvariantViolation) as ei:
        m.hvc(0, "__pkvm_init_vm", host_va(vm.kvm_pa), *fresh)
    assert ei.value.invariant == "pin-refcount"


@pytest.mark.parametrize("abi", ABIS)
def test_a_dropped_checked_machine_is_freed(abi: str) -> None:
    """A checked machine and its checker form reference cycles (the checker's interposer on
    the machine's door, its view of the hyp); the garbage collector must be able to free them.
    Compiled with mypyc, a checker that declared an attribute its base class already declares
    reported that reference twice to the collector, which then took the whole machine for
    reachable and never freed it: every fuzzer reboot leaked its dead machine."""
    m = pkvm.Machine(memory="64M", cpus=2, abi=abi, check=True)
    vm = m.host.create_vm(vcpus=1, memory=4 * 4096)
    vm.map(0x40000, 4)
    gone = weakref.ref(m)
    del m, vm
    gc.collect()
    assert gone() is None
