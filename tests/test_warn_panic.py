"""A `WARN_ON` that fires at EL2 is a hyp panic, as in Linux: nVHE/pKVM hyp code makes WARN a
BRK and `nvhe_hyp_panic_handler` (arch/arm64/kvm/handle_exit.c) treats it as fatal."""

from __future__ import annotations

import random

import pytest

import pkvm
from pkvm.abi.ffa import FFA_SUCCESS
from pkvm.check.ffa_ops import FfaHost, hostile_ffa_op
from pkvm.check.fuzz import Failure, _warn_failure
from pkvm.check.oracles import NoWarn, excused_warns
from pkvm.conform.diff import compare_step
from pkvm.conform.model import run_sequence_on_model
from pkvm.conform.real import RawStep, RealResult


def _gfn_meta_machine():
    """A machine one `__pkvm_host_donate_guest` away from the `encode_gfn_meta` WARN."""
    m = pkvm.Machine(memory="256M", cpus=2)
    vm = m.host.create_vm(vcpus=1, protected=True, memory="8M")
    vm.map(0x40000, 1)
    vm.topup_memcache(vm.vcpus[0])
    assert m.hvc(0, "__pkvm_vcpu_load", vm.handle, 0, 0).x0 == 0
    return m, m.host.alloc_pages(1) >> 12


def test_warn_panics_the_machine_and_names_its_function():
    m, pfn = _gfn_meta_machine()
    m.tracing = True
    with pytest.raises(pkvm.HypPanic) as e:
        m.hvc(0, "__pkvm_host_donate_guest", pfn, 1 << 52)
    assert e.value.warn and e.value.cpu == 0
    assert e.value.reason.startswith("WARN_ON in encode_gfn_meta (pkvm/hyp/mem_protect_guest.py:")
    assert "WARN_ON in encode_gfn_meta" in str(e.value)
    assert m.trace[-1].panic == e.value.reason  # the trace shows the call that died
    assert m.dead == e.value.reason
    assert len(m.inspect.warnings()) == 1  # the site stays visible
    for door in (lambda: m.hvc(1, "__pkvm_vcpu_put"), lambda: m.smc(1, "PSCI_VERSION"),
                 lambda: m.host.read(0x4000_0000, 8)):
        with pytest.raises(pkvm.HypPanic):
            door()


def test_a_bug_panic_is_not_a_warn_panic():
    m = pkvm.Machine(memory="64M", cpus=2)
    with pytest.raises(pkvm.HypPanic) as e:
        m.hvc(0, "__kvm_tlb_flush_vmid", 0)  # a NULL host pointer dereferenced at EL2
    assert not e.value.warn and not e.value.reason.startswith("WARN_ON")
    assert m.inspect.warnings() == []


def test_the_fuzzer_calls_a_host_reached_warn_a_no_warn_finding():
    m, pfn = _gfn_meta_machine()
    with pytest.raises(pkvm.HypPanic) as e:
        m.hvc(0, "__pkvm_host_donate_guest", pfn, 1 << 52)
    f = _warn_failure(e.value, m, 7)
    assert isinstance(f, Failure) and f.signature == "invariant:no-warn" and f.step_index == 7
    assert "encode_gfn_meta" in f.message


def test_the_known_kernel_warn_is_availability_not_a_finding():
    """The frag_tx reclaim WARN the kernel lets a host reach panics the same way, but it is the
    kernel's own behaviour: excused by its one entry, counted, not a no-warn finding."""
    m = pkvm.Machine(memory="64M", cpus=2, ffa=True)
    f = FfaHost(m)
    assert f.negotiate(0x1_0002) > 0 and f.map_mailbox().regs[0] == FFA_SUCCESS
    rng = random.Random(3)
    with pytest.raises(pkvm.HypPanic) as e:
        for _ in range(60):
            hostile_ffa_op(m, f, rng)
    assert e.value.warn and e.value.reason.startswith("WARN_ON in do_ffa_mem_frag_tx (")
    assert _warn_failure(e.value, m, 0) is None
    assert excused_warns(m.inspect) == {"ffa-frag-tx-reclaim": 1}
    assert NoWarn.violations(m.inspect) == []


def test_conformance_sees_a_warn_panic_as_a_hyp_panic():
    m, pfn = _gfn_meta_machine()
    st = RawStep("__pkvm_host_donate_guest", (pfn, 1 << 52))
    (mo,) = run_sequence_on_model("7.2", [st], machine=m)
    assert mo.panic and mo.note.startswith("hyp panic: WARN_ON in encode_gfn_meta")
    real = RealResult(0, 0, 0, 0, panic=True, note="hyp panic: Kernel panic - not syncing: HYP panic:")
    assert compare_step("7.2", 0, st, mo, real).agree
    alive = RealResult(0, -22, 0, 0)
    assert not compare_step("7.2", 0, st, mo, alive).agree



def test_the_fuzzer_counts_known_warn_panics(monkeypatch: pytest.MonkeyPatch):
    """The same run is a `no-warn` finding, or, were its WARN site a `KNOWN_KERNEL_WARNS` entry,
    an availability finding counted in `known_warns` (the fuzzer goes on with a new machine)."""
    from pkvm.check import oracles
    from pkvm.check.fuzz import execute, generate

    prof = pkvm.Machine(memory="64M", cpus=2, trace=False).profile
    steps = generate(random.Random(0), prof, 2, 750)  # test_fuzz: found at step 722
    found = execute(steps, "64M", 2, "latest", ("share-guest-warn",))
    assert found.failure is not None and found.failure.signature == "invariant:no-warn"
    assert "WARN_ON in __pkvm_host_share_guest" in found.failure.message
    assert not found.known_warns
    monkeypatch.setitem(oracles.KNOWN_KERNEL_WARNS, "test-site", (
        ("__pkvm_host_share_guest",),
        '_warn(h, h.bug("share-guest-warn"))  # seeded: WARN on a host-reachable refusal', "test"))
    steps = steps[: found.failure.step_index + 1]
    known = execute(steps, "64M", 2, "latest", ("share-guest-warn",))
    assert known.failure is None, known.failure
    assert known.known_warns == {"test-site": 1}
    assert any("WARN_ON in __pkvm_host_share_guest" in p for p in known.panics)


def _share_hyp_page_with_guest(m):
    """A page the host shared with the hyp, offered to a guest: refused with -EPERM (the seeded
    `share-guest-warn` also WARNs there)."""
    vm = m.host.create_vm(vcpus=1, protected=False, memory="1M")
    vm.map(0x40000, 1)
    vm.topup_memcache(vm.vcpus[0])
    assert m.hvc(0, "__pkvm_vcpu_load", vm.handle, 0, 0).x0 == 0
    pfn = m.host.alloc_pages(1) >> 12
    assert m.hvc(0, "__pkvm_host_share_hyp", pfn).x1 == 0
    return {0: [("hvc", "__pkvm_host_share_guest", pfn, 0x40002, 1, 0xF)],
            1: [("hvc", "__pkvm_host_share_hyp", pfn)]}


@pytest.mark.parametrize("bugs", [(), ("share-guest-warn",)])
def test_the_explorer_reports_a_warn_panic(bugs):
    from pkvm.check.explore import explore

    def make():
        return pkvm.Machine(memory="64M", cpus=2, trace=False, bugs=bugs)

    r = explore(make, _share_hyp_page_with_guest, bound=1, max_runs=20)
    if not bugs:
        assert not r.findings, r.findings[0].finding
    else:
        assert r.findings and (r.findings[0].finding or "").startswith("no-warn: hyp WARN_ON")


def test_force_reclaim_of_a_page_whose_handle_was_reused_warns_as_linux_72_does():
    """7.2's `__pkvm_finalize_teardown_vm` leaves the dying guest's data pages annotated with
    (handle, gfn). A host that finalizes without reclaiming them, lets a new VM take the same
    handle and map another page at that gfn, then force-reclaims an old page reaches
    `WARN_ON(pa != phys)` in `__pkvm_host_force_reclaim_page_guest`: a WARN the kernel itself lets
    a host reach, excused at that one site (`force-reclaim-reused-handle`) and counted."""
    m = pkvm.Machine(memory="128M", cpus=2, trace=False)
    old = m.host.create_vm(vcpus=1, protected=True, memory="1M")
    old.map(0x40000, 1)
    page = old.mapped[0x40000]
    assert m.hvc(0, "__pkvm_start_teardown_vm", old.handle).ok
    assert m.hvc(0, "__pkvm_finalize_teardown_vm", old.handle).ok  # no reclaim first
    new = m.host.create_vm(vcpus=1, protected=True, memory="1M")
    new.map(0x40000, 1)
    assert new.handle == old.handle and new.mapped[0x40000] != page
    with pytest.raises(pkvm.HypPanic) as e:
        m.hvc(0, "__pkvm_force_reclaim_guest_page", page)
    assert e.value.warn and "__pkvm_host_force_reclaim_page_guest" in str(e.value)
    assert excused_warns(m.inspect) == {"force-reclaim-reused-handle": 1}
    assert NoWarn.violations(m.inspect) == []
