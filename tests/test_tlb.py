"""TLBs hold translations until the kernel's TLBI; an access through a stale entry is found."""

from __future__ import annotations

import pytest

import pkvm
from pkvm.check import hw_oracles
from pkvm.machine.mmu import Tlb

ABIS = ["latest", "6.12"]


def _watch(m: pkvm.Machine) -> list[str]:
    found: list[str] = []
    m.listeners.append(lambda rec: found.extend(hw_oracles.violations(m.inspect)))
    return found


def test_tlb_invalidation_by_range_and_block():
    t = Tlb("t")
    for page in range(0x40000, 0x40400):
        t.entries[page << 1] = [page << 12, 1, 0]
    t.flush_va(0x4000_1000, 3)  # one page
    assert (0x40001 << 1) not in t.entries and (0x40002 << 1) in t.entries
    t.flush_va(0x4000_0000, 2)  # a 2 MiB block: all 512 pages under it
    assert not any(0x40000 <= k >> 1 < 0x40200 for k in t.entries)
    assert (0x40200 << 1) in t.entries
    t.flush_range(0x4020_0000, 0x1000 * 0x200)  # the cheaper scan of every entry
    assert t.entries == {}


def _touch_then_donate(m: pkvm.Machine) -> int:
    """The host writes a page (its TLB caches the translation), then donates it to a guest."""
    vm = m.host.create_vm(vcpus=1, protected=True, memory="16M")
    vm.write(0x4000_0000, b"secret")  # through the memslot: a host write of the backing page
    assert m.host.read(vm.backing(0x40000), 6) == b"secret"  # and a read: both cached
    vm.map(0x40000, 1)
    return vm.mapped[0x40000]


def test_host_access_after_donation_is_refused():
    """The host stage-2 walker invalidates when it breaks a valid entry: no stale use."""
    m = pkvm.Machine(memory="256M")
    found = _watch(m)
    pa = _touch_then_donate(m)
    with pytest.raises(pkvm.HostDataAbort):
        m.host.read(pa, 6)
    assert found == [] and m.inspect.tlb_stale_uses() == []


def test_a_missing_host_stage2_tlbi_lets_a_stale_translation_be_used(monkeypatch):
    """Take the TLBI out of the host stage-2 walker: the host keeps reaching a donated page
    through its TLB, and the oracle reports the access."""
    m = pkvm.Machine(memory="256M")
    monkeypatch.setattr(m.inspect.table("host"), "tlbi", None)
    pa = _touch_then_donate(m)
    assert m.host.read(pa, 6) == b"secret"  # the guest's page, through the stale entry
    stale = hw_oracles.violations(m.inspect)
    assert stale and "host read of IPA" in stale[0]


def _teardown_then_touch(m: pkvm.Machine) -> None:
    """EL2 writes a hyp VM into its donated pages (its TLB caches them); teardown gives them
    back (`kvm_pgtable_hyp_unmap`); then the host passes a pointer into one of them."""
    vm = m.host.create_vm(vcpus=1, protected=False, memory="16M")
    vm.map(0x40000, 1)
    pa = vm.hyp_vm_pa
    vm.destroy()
    m.hvc(0, "__kvm_tlb_flush_vmid", pa + 0x800)  # EL2 reads the "kvm_s2_mmu" at that pointer


@pytest.mark.parametrize("abi", ABIS)
def test_clean_hyp_unmap_invalidates(abi):
    m = pkvm.Machine(memory="256M", abi=abi)
    found = _watch(m)
    with pytest.raises(pkvm.HypPanic, match="not mapped in the hyp stage-1"):
        _teardown_then_touch(m)
    assert found == []


@pytest.mark.parametrize("abi", ABIS)
def test_seeded_hyp_unmap_no_tlbi_is_found(abi):
    m = pkvm.Machine(memory="256M", abi=abi, bugs=("hyp-unmap-no-tlbi",))
    found = _watch(m)
    _teardown_then_touch(m)  # no panic: EL2 read the page through its stale TLB entry
    assert found and "stale TLB entry used: EL2 stage-1: EL2 read" in found[0]


@pytest.mark.parametrize("abi", ABIS)
def test_vm_life_cycle_keeps_every_tlb_fresh(abi):
    m = pkvm.Machine(memory="256M", abi=abi, cpus=2)
    found = _watch(m)
    for _ in range(2):
        vm = m.host.create_vm(vcpus=2, protected=m.profile.protected_vms, memory="16M")
        vm.map(0x40000, 8)
        for gfn in list(vm.mapped)[:2]:
            with pytest.raises(pkvm.HostDataAbort) if m.profile.protected_vms else _nullctx():
                m.host.read(vm.mapped[gfn], 8)
        vm.destroy()
    assert found == []


class _nullctx:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_poison_after_return_is_an_el2_store_to_a_host_page():
    m = pkvm.Machine(memory="256M", bugs=("poison-after-return",))
    found = _watch(m)
    vm = m.host.create_vm(vcpus=1, protected=True, memory="16M")
    vm.map(0x40000, 2)
    vm.destroy()
    assert found and all("EL2 fixmap store to PA" in f and "host state OWNED" in f for f in found)


@pytest.mark.parametrize("abi", ABIS)
def test_a_clean_fuzz_run_never_trips_the_hardware_oracles(abi, monkeypatch):
    """Hostile steps from the fuzzer's generator, on the clean model: every machine the run
    makes (one more after each hyp panic) is watched after every hypercall."""
    import random

    from pkvm.abi.profiles import get_profile
    from pkvm.check import fuzz, fuzz_ops

    found: list[str] = []
    machines: list[pkvm.Machine] = []
    booted = fuzz_ops.booted_machine

    def watched(*args, **kwargs):
        m = booted(*args, **kwargs)
        machines.append(m)
        m.listeners.append(lambda rec: found.extend(hw_oracles.violations(m.inspect)))
        return m

    monkeypatch.setattr(fuzz_ops, "booted_machine", watched)
    steps = fuzz.generate(random.Random(12), get_profile(abi), 2, 600)
    res = fuzz.execute(steps, "256M", 2, abi)
    assert res.failure is None and res.steps_run == 600
    assert machines and sum(res.calls.values()) > 300
    assert found == []
