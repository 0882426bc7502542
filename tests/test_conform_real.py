"""The spec's measured tables, re-measured on the real kernels (Linux's own pKVM under QEMU).

These are the ground truth the model is compared with: README "Measured on the real
hypervisors" and "Measured: host calls with NULL/zero arguments". Each row is a short hypercall
sequence with the (x0, x1) the spec records for each step ("panic" for a hyp panic, None for a
clean-up step that restores state for the rows after it). All rows of one kernel run in one
``run_sequences`` call: rows that do not panic share boots, each panicking row gets its own.

The tests marked ``conform`` boot QEMU; the rest check the harness's own pieces offline.
Set-up (``python -m pkvm.conform.setup``) must have run, or run here: it needs root the first time
on a fresh machine (apt-get install) and network access to the Debian mirror. Without them the
tests FAIL with the reason (deselect them with `-m "not conform"`; `PKVM_CONFORM_OPTIONAL=1`
makes them skip instead).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pkvm.conform.real import (
    BootLog,
    RawStep,
    RealResult,
    _commands,
    _not_issued,
    _Pending,
    run_sequences,
    vm_create,
    vm_destroy,
    vm_run,
)
from pkvm.conform.setup import (
    Kernel,
    SetupError,
    ensure_setup,
    host_hcall_ids,
    host_hcall_names,
)

EPERM, ENOENT, EAGAIN, EFAULT, ENODEV, EINVAL, ERANGE = 1, 2, 11, 14, 19, 22, 34
NOT_SUPPORTED = -1  # SMCCC_RET_NOT_SUPPORTED in x0
PANIC = "panic"
HOST_PANIC = "host panic"  # the host kernel (EL1) dies, not the hyp
HOST = 0xC600_0000

# (x0, x1 or None: not checked), PANIC, HOST_PANIC, or None (clean-up step: only no panic)
Expect = tuple[int, int | None] | str | None


@dataclass(frozen=True)
class Row:
    id: str
    kernels: tuple[str, ...]
    steps: tuple[RawStep, ...]
    expect: tuple[Expect, ...]  # one per step


def S(call: str | int, *args: int | str) -> RawStep:
    return RawStep(call, tuple(args))


def ok(x1: int = 0) -> tuple[int, int]:
    return (0, x1)


BOTH = ("6.12", "7.2")
V612 = ("6.12",)
V72 = ("7.2",)
SHARE, UNSHARE = "__pkvm_host_share_hyp", "__pkvm_host_unshare_hyp"

# README: "Measured on the real hypervisors".
MEASURED = [
    Row("share-unshare-twice", BOTH,
        (S(SHARE, "page:a"), S(SHARE, "page:a"), S(UNSHARE, "page:a"), S(UNSHARE, "page:a")),
        (ok(), ok(-EPERM), ok(), ok(-EPERM))),
    Row("unshare-never-shared", BOTH, (S(UNSHARE, "page:b"),), (ok(-EPERM),)),
    Row("share-first-ram-pfn", BOTH, (S(SHARE, 0x40000), S(UNSHARE, 0x40000)), (ok(), None)),
    Row("share-last-ram-pfn", BOTH, (S(SHARE, 0x7FFFF), S(UNSHARE, 0x7FFFF)), (ok(), None)),
    Row("share-past-ram", BOTH, (S(SHARE, 0x80000),), (ok(-EPERM),)),
    Row("share-mmio-uart", BOTH, (S(SHARE, 0x9000),), (ok(-EPERM),)),
    Row("share-pfn-2^36-1", BOTH, (S(SHARE, 0xFFFFFFFFF),), (ok(-EPERM),)),
    Row("share-carveout", BOTH, (S(SHARE, 0x7F200), S(UNSHARE, 0x7F200)),
        (ok(-EPERM), ok(-EPERM))),
    Row("teardown-empty-table", V612,
        (S("__pkvm_teardown_vm", 0), S("__pkvm_teardown_vm", 0x1000)),
        (ok(-ENOENT), ok(-ENOENT))),
    Row("flush-vm-context", BOTH, (S("__kvm_flush_vm_context"),), (ok(),)),
    Row("prot-finalize-again", BOTH, (S("__pkvm_prot_finalize"),), (ok(-EPERM),)),
    Row("boot-time-pkvm-init", BOTH, (S("__pkvm_init"),), ((NOT_SUPPORTED, None),)),
    Row("boot-time-get-mdcr", V612, (S("__kvm_get_mdcr_el2"),), ((NOT_SUPPORTED, None),)),
    Row("unknown-n-26", V612, (S(HOST + 26), S(HOST + 49)),
        ((NOT_SUPPORTED, None), (NOT_SUPPORTED, None))),
    Row("unknown-n-50", V72, (S(HOST + 50), S(HOST + 100)),
        ((NOT_SUPPORTED, None), (NOT_SUPPORTED, None))),
    Row("unknown-psci-and-vendor", BOTH, (S(0x8400_0000), S(0x8600_0000)),
        ((NOT_SUPPORTED, None), (NOT_SUPPORTED, None))),
    Row("guest-calls-without-loaded-vcpu", V72,
        (S("__pkvm_host_share_guest", "page:g", 0x40000, 1, 3),
         S("__pkvm_host_donate_guest", "page:g", 0x40000, 1),
         S("__pkvm_vcpu_in_poison_fault")),
        (ok(-EINVAL), ok(-EINVAL), ok(-EINVAL))),
    Row("guest-calls-empty-table", V72,
        (S("__pkvm_host_unshare_guest", 0x1000, 0x40000, 1),
         S("__pkvm_reclaim_dying_guest_page", 0x1000, 0x40000)),
        (ok(-EINVAL), ok(-EINVAL))),
    Row("force-reclaim-host-page", V72, (S("__pkvm_force_reclaim_guest_page", "pa:h"),),
        (ok(-EAGAIN),)),
    Row("force-reclaim-past-ram", V72, (S("__pkvm_force_reclaim_guest_page", 0x1_0000_0000),),
        (ok(-EFAULT),)),
]  # fmt: skip

# README: "Measured: host calls with NULL/zero arguments" (values that differ per kernel).
NULL_ARGS = [
    Row("reserve-vm-empty-table", V72,
        (S("__pkvm_reserve_vm"), S("__pkvm_unreserve_vm", 0x1000), S("__pkvm_reserve_vm"),
         S("__pkvm_unreserve_vm", 0x1000)),
        (ok(0x1000), None, ok(0x1000), None)),
    Row("timer-set-cntvoff", BOTH, (S("__kvm_timer_set_cntvoff"),), (ok(),)),
    Row("init-vm-null", BOTH, (S("__pkvm_init_vm", 0, 0, 0),), (ok(-EPERM),)),
    Row("init-vcpu-null", BOTH, (S("__pkvm_init_vcpu", 0x1000, 0, 0),), (ok(-ENOENT),)),
    Row("vcpu-load-no-result", V72, (S("__pkvm_vcpu_load", 0x1000, 0, 0),), (ok(0x1000),)),
    Row("tlb-flush-vmid-no-result", V72, (S("__pkvm_tlb_flush_vmid", 0x1000),), (ok(0x1000),)),
    Row("vcpu-put", V72, (S("__pkvm_vcpu_put"),), (ok(),)),
    Row("teardown-null", V72,
        (S("__pkvm_start_teardown_vm", 0), S("__pkvm_start_teardown_vm", 0x1000),
         S("__pkvm_finalize_teardown_vm", 0), S("__pkvm_finalize_teardown_vm", 0x1000)),
        (ok(-EINVAL),) * 4),
    Row("tracing-nodev", V72, (S("__tracing_load", 0, 0), S("__tracing_swap_reader")),
        (ok(-ENODEV), ok(-ENODEV))),
    Row("vcpu-run-null-7.2", V72, (S("__kvm_vcpu_run"),), (ok(-EINVAL),)),
]  # fmt: skip

# Per-kernel errnos of __pkvm_host_share_hyp on out-of-range pfns: (pfn, 6.12, 7.2).
SHARE_WIDE = [
    (0xFFFF_FFFF_FFFF_FFFF, -ERANGE, -EINVAL),
    (0x10_0000_0000, -ERANGE, -EPERM),
    (0xFFFF_FFFF_FFFF, -ERANGE, -EPERM),
    (0xF_FFFF_FFFF_FFFF, -ERANGE, -EINVAL),
    (0x10_0000_0000_0000, -EPERM, -EPERM),
]
for _pfn, _e612, _e72 in SHARE_WIDE:
    NULL_ARGS.append(Row(f"share-pfn-{_pfn:#x}-6.12", V612, (S(SHARE, _pfn),), (ok(_e612),)))
    NULL_ARGS.append(Row(f"share-pfn-{_pfn:#x}-7.2", V72, (S(SHARE, _pfn),), (ok(_e72),)))
NULL_ARGS.append(
    Row("share-pfn-wraps-into-ram", BOTH,
        (S(SHARE, 0xFFF0_0000_0004_0000), S(UNSHARE, 0x40000)), (ok(), None))
)  # fmt: skip

# VM life cycles through /dev/kvm (the VMM helper); README "Measured: guests under the real
# kernels". KVM_EXIT_MMIO is 6; the first VM of an empty table gets handle 0x1000. `vmm:destroy`
# reads the guest's RAM back after the teardown: x1 counts its non-zero 64-bit words. A normal
# VM's memory is the VMM's own and keeps the guest's code (GUEST_CODE: two words); a protected
# VM's pages come back wiped.
KVM_EXIT_MMIO = 6
CODE_WORDS = 2
VMS = [
    Row("vm-create-run-destroy", BOTH,
        (vm_create("vm:a", 2), vm_run("vm:a", 0), vm_run("vm:a", 1), vm_destroy("vm:a")),
        (ok(0x1000), ok(KVM_EXIT_MMIO), ok(KVM_EXIT_MMIO), ok(CODE_WORDS))),
    Row("protected-vm-6.12-einval", V612, (vm_create("vm:p", 1, protected=True),),
        ((-EINVAL, None),)),
    Row("protected-vm-7.2", V72,
        (vm_create("vm:p", 1, protected=True), vm_run("vm:p"), vm_destroy("vm:p")),
        ((0, None), ok(KVM_EXIT_MMIO), ok())),
]  # fmt: skip

# Not in the spec's tables, measured here (docs/conform.md "Observed"): the host may tear down
# a VM KVM still uses; the hyp survives; running it again kills the host with an SError.
TEARDOWN = {"6.12": "__pkvm_teardown_vm", "7.2": "__pkvm_start_teardown_vm"}
for _k in BOTH:
    VMS.append(
        Row(f"teardown-live-vm-then-destroy-{_k}", (_k,),
            (vm_create("vm:t", 1), S(TEARDOWN[_k], "vm:t"), vm_destroy("vm:t"),
             S("__kvm_flush_vm_context")),
            ((0, None), ok(), ok(CODE_WORDS), ok()))
    )  # fmt: skip
OBSERVED_PANICS = [
    Row(f"teardown-live-vm-then-run-{_k}", (_k,),
        (vm_create("vm:t", 1), S(TEARDOWN[_k], "vm:t"), vm_run("vm:t")),
        ((0, None), ok(), HOST_PANIC))
    for _k in BOTH
]  # fmt: skip

# Hyp panics: a NULL host pointer reaches EL2 (one boot each, last so they end boots cleanly).
PANICS = [
    Row("adjust-pc-null", BOTH, (S("__kvm_adjust_pc"),), (PANIC,)),
    Row("tlb-flush-vmid-ipa-null", BOTH, (S("__kvm_tlb_flush_vmid_ipa"),), (PANIC,)),
    Row("tlb-flush-vmid-null", BOTH, (S("__kvm_tlb_flush_vmid"),), (PANIC,)),
    Row("tlb-flush-vmid-range-null", BOTH, (S("__kvm_tlb_flush_vmid_range", 0, 0, 1),), (PANIC,)),
    Row("flush-cpu-context-null", BOTH, (S("__kvm_flush_cpu_context"),), (PANIC,)),
    Row("vgic-save-vmcr-aprs-null", V612, (S("__vgic_v3_save_vmcr_aprs"),), (PANIC,)),
    Row("vgic-save-aprs-null", V72, (S("__vgic_v3_save_aprs"),), (PANIC,)),
    Row("vgic-restore-vmcr-aprs-null", BOTH, (S("__vgic_v3_restore_vmcr_aprs"),), (PANIC,)),
    Row("vcpu-run-null-6.12", V612, (S("__kvm_vcpu_run"),), (PANIC,)),
    Row("vcpu-init-traps-null", V612, (S("__pkvm_vcpu_init_traps"),), (PANIC,)),
]  # fmt: skip

# NULL rows first (the reserve-vm row wants an empty VM table), then the first table, the VM
# life cycles, then the panics.
ROWS = NULL_ARGS + MEASURED + VMS + PANICS + OBSERVED_PANICS


@dataclass
class Measured:
    results: dict[str, list[RealResult]]
    boots: list[BootLog]
    seconds: float


_MEASURED: dict[str, Measured] = {}


_SETUP_FAILED: dict[str, str] = {}  # kernel -> why, so a failing set-up is tried once


def setup_or_skip(kernel: str) -> None:
    """Set the real side up, or FAIL: a set-up failure is a failure (CI reaches the package
    registries). Deselect these tests where the set-up cannot run (`-m "not conform"`);
    `PKVM_CONFORM_OPTIONAL=1` turns the failure into a skip that says why."""
    if kernel not in _SETUP_FAILED:
        try:
            ensure_setup(kernel, progress=False)
            return
        except SetupError as e:
            _SETUP_FAILED[kernel] = str(e)
    why = f"real {kernel} kernel harness cannot be set up here: {_SETUP_FAILED[kernel]}"
    if os.environ.get("PKVM_CONFORM_OPTIONAL") == "1":
        pytest.skip(why)
    pytest.fail(why + " (deselect with -m 'not conform', or PKVM_CONFORM_OPTIONAL=1 to skip)")


def measure(kernel: str) -> Measured:
    if kernel not in _MEASURED:
        setup_or_skip(kernel)
        rows = [r for r in ROWS if kernel in r.kernels]
        logs: list[BootLog] = []
        t0 = time.monotonic()
        res = run_sequences(kernel, [list(r.steps) for r in rows], logs=logs)
        _MEASURED[kernel] = Measured(
            {r.id: out for r, out in zip(rows, res, strict=True)}, logs, time.monotonic() - t0
        )
        print(
            f"\n[conform] {kernel}: {len(rows)} sequences, {len(logs)} machines, "
            f"{_MEASURED[kernel].seconds:.1f} s "
            f"(each {', '.join(f'{b.seconds:.1f}' for b in logs)})"
        )
    return _MEASURED[kernel]


def _cases() -> list[object]:
    # With pytest-xdist, `--dist loadgroup` keeps each kernel's rows on one worker (one set of
    # boots per kernel instead of one per worker).
    return [
        pytest.param(k, r, id=f"{k}-{r.id}", marks=pytest.mark.xdist_group(f"conform-{k}"))
        for r in ROWS
        for k in r.kernels
    ]


@pytest.mark.conform
@pytest.mark.parametrize(("kernel", "row"), _cases())
def test_measured_row(kernel: str, row: Row) -> None:
    got = measure(kernel).results[row.id]
    assert len(got) == len(row.steps)
    for i, (step, want, r) in enumerate(zip(row.steps, row.expect, got, strict=True)):
        where = f"{kernel} {row.id} step {i} {step.call}{step.args}"
        if want is None:
            assert not r.panic, f"{where}: clean-up step panicked: {r.note}"
            continue
        if want == PANIC:
            assert r.panic, f"{where}: expected a hyp panic, got x0={r.x0} x1={r.x1}"
            assert r.note.startswith("hyp panic"), f"{where}: {r.note}"
            continue
        if want == HOST_PANIC:
            assert r.panic, f"{where}: expected the host to die, got x0={r.x0} x1={r.x1}"
            assert r.note.startswith("host kernel panic"), f"{where}: {r.note}"
            continue
        assert not r.panic, f"{where}: unexpected hyp panic: {r.note}"
        assert isinstance(want, tuple)
        x0, x1 = want
        assert r.x0 == x0, f"{where}: x0={r.x0}, spec says {x0}"
        if x1 is not None:
            assert r.x1 == x1, f"{where}: x1={r.x1:#x}, spec says {x1:#x}"


@pytest.mark.conform
@pytest.mark.parametrize("kernel", BOTH)
def test_refused_call_leaves_registers(kernel: str) -> None:
    """An unknown call (x0 = -1) returns x1..x3 as the host passed them (spec: measured)."""
    setup_or_skip(kernel)
    [[r]] = run_sequences(kernel, [[S(0x8400_0000, 0x1234, 0xFFFF_FFFF_FFFF_FFFF, 7)]])
    assert (r.x0, r.x1, r.x2, r.x3) == (-1, 0x1234, 0xFFFF_FFFF_FFFF_FFFF, 7)


@pytest.mark.conform
@pytest.mark.parametrize("kernel", BOTH)
def test_no_host_hypercall_writes_x2_x3(kernel: str) -> None:
    setup_or_skip(kernel)
    [[a, b]] = run_sequences(
        kernel, [[S("__kvm_flush_vm_context", 0, 0xAB, 0xCD), S(SHARE, "page:z", 0x55, 0x66)]]
    )
    assert (a.x0, a.x1, a.x2, a.x3) == (0, 0, 0xAB, 0xCD)
    assert (b.x0, b.x1, b.x2, b.x3) == (0, 0, 0x55, 0x66)


# -- the harness's own pieces, offline (no set-up, no QEMU) ------------------------------------

ENUM_WITH_MARKERS = """
#define MARKER(m) m, __after_##m = m - 1
enum __kvm_host_smccc_func {
	/* comment */
	__KVM_HOST_SMCCC_FUNC___pkvm_init = __KVM_HOST_SMCCC_FUNC___kvm_hyp_init + 1,
	__KVM_HOST_SMCCC_FUNC___kvm_enable_ssbs,

	MARKER(__KVM_HOST_SMCCC_FUNC_MIN_PKVM),

	__KVM_HOST_SMCCC_FUNC___pkvm_prot_finalize,
	MARKER(__KVM_HOST_SMCCC_FUNC_MAX)
};
"""


def test_enum_markers_take_no_number(tmp_path: Path) -> None:
    h = tmp_path / "kvm_asm.h"
    h.write_text(ENUM_WITH_MARKERS)
    names = host_hcall_names(h)
    assert names == ["__pkvm_init", "__kvm_enable_ssbs", "__pkvm_prot_finalize"]
    assert host_hcall_ids(names, h) == {
        "__kvm_hyp_init": 0,
        "__pkvm_init": 1,
        "__kvm_enable_ssbs": 2,
        "__pkvm_prot_finalize": 3,
    }


def test_raw_step_checks_its_arguments() -> None:
    assert RawStep("__kvm_flush_vm_context", 5).args == (5,)  # type: ignore[arg-type]
    assert RawStep(0xC600_0000, [1, "page:a"]).args == (1, "page:a")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        RawStep("__kvm_flush_vm_context", (1, 2, 3, 4, 5, 6, 7))
    with pytest.raises(ValueError, match="symbolic argument"):
        RawStep("__pkvm_host_share_hyp", ("pfn:a",))
    with pytest.raises(ValueError, match="VMM steps"):
        RawStep("vmm:reboot", ("vm:a",))
    with pytest.raises(ValueError, match="vm:NAME"):
        RawStep("vmm:run", (0,))


def test_commands_scope_names_and_skip_absent_calls(tmp_path: Path) -> None:
    k = Kernel("7.2", "7.2.13+deb14-arm64", tmp_path, tmp_path / "Image", tmp_path / "m.ko",
               tmp_path / "helper", tmp_path / "busybox",
               {"__pkvm_host_share_hyp": 29, "__pkvm_start_teardown_vm": 45})  # fmt: skip
    seq = [
        RawStep("__pkvm_host_share_hyp", ("page:a", -1)),
        RawStep("__pkvm_teardown_vm", (1,)),  # 6.12 only: not sent to a 7.2 kernel
        vm_create("vm:v", 2, protected=True),
        RawStep("__pkvm_start_teardown_vm", ("vm:v",), cpu=1),
        RawStep(0x8400_0000),
    ]
    cmds, owners = _commands(k, [_Pending(3, seq)])
    assert cmds == [
        "seq 3",
        "page a",
        "hvc 0 __pkvm_host_share_hyp page:a 0xffffffffffffffff",
        "vmm create 3.v 2 1",
        "hvc 1 __pkvm_start_teardown_vm vm:3.v",
        "hvc 0 0x84000000",
    ]
    assert [j for _, j in owners] == [-1, -2, 0, 2, 3, 4]
    [r] = [_not_issued(k, seq[1], {})]
    assert (r.x0, r.x1) == (-1, 1)
