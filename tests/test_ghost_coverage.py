"""The ghost predicts every host hypercall of both kernels, and the guest's own pKVM calls.

`test_every_hypercall_is_judged` issues each hypercall of a profile on a checked machine and
fails unless the ghost compared a prediction for it (`Ghost.judged`); the parts it leaves to the
invariants are the one table `ghost_calls.LEFT_TO_INVARIANTS` (printed in docs/checking.md).
The forged-record tests show the comparisons bite: the ghost is handed a record of a real call
with one value changed and must reject it (nothing in the model is patched).
"""

from __future__ import annotations

import dataclasses
import io
import struct

import pytest

import pkvm
from pkvm.abi.profiles import ALL_HCALL_NAMES, profile_for
from pkvm.check.ghost_calls import LEFT_TO_INVARIANTS, RULES
from pkvm.check.invariants import InvariantViolation
from pkvm.host.kvm import host_va
from pkvm.host.vmm import Vmm

LAST = ("__pkvm_vcpu_put", "__pkvm_start_teardown_vm", "__pkvm_finalize_teardown_vm",
        "__pkvm_teardown_vm")
PANICS = ("__vgic_v5_save_apr", "__vgic_v5_restore_vmcr_apr")


def _machine(abi: str) -> tuple[pkvm.Machine, object]:
    m = pkvm.Machine(memory="64M", cpus=2, abi=abi, check=True, timeslice=2000)
    vm = m.host.create_vm(vcpus=1, protected=False, memory="256K")
    vm.map(0x40000, 1)  # the hyp VM and vCPU 0 exist, their host structs pinned
    return m, vm


def _args(name: str, vm, prof) -> tuple[int, ...]:
    kvm, vcpu = host_va(vm.kvm_pa), vm.vcpus[0].va
    if name.startswith("__kvm_tlb") or name == "__kvm_flush_cpu_context":
        return (kvm, 0x1000, 3)
    if name in ("__kvm_adjust_pc", "__pkvm_vcpu_init_traps", "__kvm_vcpu_run") \
            or name.startswith("__vgic_v3_save") or name.startswith("__vgic_v3_restore"):
        return (vcpu,)
    if name in ("__pkvm_vcpu_load",):
        return (vm.handle, 0, 0)
    if name in ("__pkvm_init_vm", "__pkvm_init_vcpu"):
        return (vm.handle, vcpu, 0)
    if name.startswith("__tracing") or name == "__kvm_timer_set_cntvoff":
        return (0x1234,)
    if "guest" in name or name in LAST or name in ("__pkvm_tlb_flush_vmid",
                                                   "__pkvm_unreserve_vm"):
        return (vm.handle, 0x40000, 1, 0)
    return (0x40000, 0, 0)


@pytest.mark.parametrize("abi", ["6.12", "latest"])
def test_every_hypercall_is_judged(abi):
    prof = profile_for(abi)
    m, vm = _machine(abi)
    order = [n for n in prof.hcalls if n not in LAST and n not in PANICS]
    order += [n for n in LAST if n in prof.hcalls]
    for name in order:
        try:
            m.hvc(1 if name == "__pkvm_vcpu_put" else 0, name, *_args(name, vm, prof))
        except pkvm.HostError:
            pass
    for name in PANICS:
        if name in prof.hcalls:
            m2, vm2 = _machine(abi)
            with pytest.raises(pkvm.HypPanic):
                m2.hvc(0, name, *_args(name, vm2, prof))
            m.checker.ghost.judged.update(m2.checker.ghost.judged)
    judged = m.checker.ghost.judged
    missing = [n for n in prof.hcalls
               if not judged[n] and not judged[f"{n} (refused by the gate)"]]
    assert not missing, f"hypercalls the ghost never judged: {missing}"
    m.hvc(0, 0xC600_0000 + len(prof.hcalls) + 7)  # past the table: refused
    assert judged["unknown function ID (refused by the gate)"] == 1


def test_left_to_invariants_is_small_and_names_real_hypercalls():
    assert len(LEFT_TO_INVARIANTS) <= 6
    assert set(LEFT_TO_INVARIANTS) <= ALL_HCALL_NAMES
    assert set(RULES) <= ALL_HCALL_NAMES
    assert all(len(r.split()) >= 3 for r in LEFT_TO_INVARIANTS.values())


def _forge(m: pkvm.Machine, name: str, args: tuple[int, ...], **change: int) -> None:
    """Run `name` on a traced, checked machine, then hand the ghost its record with `change`."""
    ghost = m.checker.ghost
    m.checker.before_call(0, name, args)
    m.listeners.remove(m.checker.after_call)
    try:
        m.hvc(0, name, *args)
    finally:
        m.listeners.append(m.checker.after_call)
    rec = dataclasses.replace(m.trace[-1], **change)
    ghost.after_call(rec, set())


@pytest.mark.parametrize("abi, name, args, change", [
    ("latest", "__tracing_load", (0, 0), {"x1": 0}),                    # -ENODEV expected
    ("6.12", "__kvm_flush_vm_context", (0x55,), {"x1": -22}),             # x1 untouched
    ("latest", "__pkvm_prot_finalize", (), {"x1": 0}),                  # -EPERM expected
    ("6.12", "__pkvm_init", (0, 0), {"x0": 0}),                           # the gate: -1
    ("latest", "__kvm_vcpu_run", (0,), {"x1": 2}),                      # no vCPU: -EINVAL
    ("latest", "__pkvm_vcpu_in_poison_fault", (), {"x1": 0}),           # no vCPU: -EINVAL
    ("latest", "__kvm_timer_set_cntvoff", (5,), {"x3": 1}),             # x3 untouched
    ("latest", "__pkvm_init_vm", (0, 0, 0), {"x1": -22}),               # pin refused: -EPERM
    ("latest", "__pkvm_init_vcpu", (0x1000, 0, 0), {"x1": -12}),        # donated; no VM: -ENOENT
])
def test_the_ghost_rejects_a_forged_result(abi, name, args, change):
    m = pkvm.Machine(memory="64M", cpus=2, abi=abi, check=True, trace=True)
    m.hvc(0, name, *args)  # the true record passes
    with pytest.raises(InvariantViolation) as e:
        _forge(m, name, args, **change)
    assert e.value.invariant == "ghost"


def test_the_ghost_sees_a_frame_violation():
    """A flush that (as the forged record claims) changed a page's vmemmap entry is caught."""
    m = pkvm.Machine(memory="64M", cpus=2, abi="latest", check=True, trace=True)
    ghost = m.checker.ghost
    m.checker.before_call(0, "__kvm_flush_vm_context", ())
    m.listeners.remove(m.checker.after_call)
    m.hvc(0, "__kvm_flush_vm_context")
    with pytest.raises(InvariantViolation, match="changes no page"):
        ghost.after_call(m.trace[-1], {m.inspect.ram_range()[0] >> 12})


# -- the guest's own pKVM calls ----------------------------------------------------------------
def _movz_movk(rd: int, value: int) -> list[int]:
    out = [0xD2800000 | ((value & 0xFFFF) << 5) | rd]
    for sh in (1, 2, 3):
        part = (value >> (16 * sh)) & 0xFFFF
        if part:
            out.append(0xF2800000 | (sh << 21) | (part << 5) | rd)
    return out


def _hvc(x0: int, x1: int = 0, x2: int = 0, x3: int = 0, keep: int | None = None) -> list[int]:
    code = _movz_movk(0, x0) + _movz_movk(1, x1) + _movz_movk(2, x2) + _movz_movk(3, x3)
    code.append(0xD4000002)  # hvc #0
    if keep is not None:
        code.append(0xAA0003E0 | (0 << 16) | keep)  # mov x<keep>, x0
    return code


GUEST_IPA = 0x4000_0000
PAGE2 = GUEST_IPA + 0x2000  # a page of the guest's RAM the code never touches


def _pvm_guest() -> bytes:
    """FEATURES, HYP_MEMINFO with a stray argument, MEM_SHARE unaligned, MEM_SHARE of an
    unmapped page (faulted in by the host, replayed), the same share again (refused),
    MEM_UNSHARE twice, a call EL2 hands to the host, then PSCI SYSTEM_OFF."""
    code: list[int] = []
    code += _hvc(0x8600_0000, keep=19)
    code += _hvc(0xC600_0002, 1, keep=20)
    code += _hvc(0xC600_0003, PAGE2 + 8, keep=21)
    code += _hvc(0xC600_0003, PAGE2, keep=22)
    code += _hvc(0xC600_0003, PAGE2, keep=23)
    code += _hvc(0xC600_0004, PAGE2, keep=24)
    code += _hvc(0xC600_0004, PAGE2, keep=25)
    code += _hvc(0xC600_0005, PAGE2, keep=26)
    code += _hvc(0x8400_0008)  # PSCI SYSTEM_OFF
    return b"".join(struct.pack("<I", w) for w in code)


def test_a_protected_guest_s_pkvm_calls_are_predicted():
    m = pkvm.Machine(memory="256M", cpus=2, check=True)
    vmm = Vmm(m.host, _pvm_guest(), memory="1M", vcpus=1, protected=True, out=io.StringIO())
    s = vmm.run()
    assert s.reason == "shutdown"
    x = vmm.vm.vcpus[0].regs.x
    inval = 2**64 - 3
    assert (x[19], x[20], x[21], x[22], x[23], x[24], x[25]) == (
        0x1D, inval, inval, 0, inval, 0, inval)
    judged = m.checker.ghost.judged
    assert judged["guest FEATURES"] == 1 and judged["guest HYP_MEMINFO"] == 1
    assert judged["guest MEM_SHARE"] == 4  # unaligned, not mapped yet, replayed, again
    assert judged["guest MEM_UNSHARE"] == 2
    assert judged["guest 0xc6000005 (to the host)"] == 1
    vmm.destroy()


def test_a_wrong_guest_hvc_answer_is_caught():
    """The guest-HVC ghost compares: handed an exit whose x0 differs from EL2's, it reports
    the mismatch when the host's run returns."""
    m = pkvm.Machine(memory="256M", cpus=2, check=True)
    pvm = m.checker.ghost.pvm
    want = pvm.predict({"regs": [0x8600_0000, 0, 0, 0], "pc": 0x4000_0004, "handle": 0x1000})
    bad = pvm.compare(want, {"regs": [0x1F, 0, 0, 0], "pc": 0x4000_0004, "handled": True,
                             "fault": (0, 0)})
    assert bad is not None and "x0..x3" in bad[0]
    assert pvm.compare(want, {"regs": [0x1D, 0, 0, 0], "pc": 0x4000_0004, "handled": True,
                              "fault": (0, 0)}) is None


# Mutants of the guest-HVC path, each applied to a scratch copy of the package and run in a
# subprocess (the model under test is never patched in this process): the guest above must
# trip the ghost on each, and not on the unmutated copy.
PVM_MUTANTS = {
    "clean": ("hyp/pvm_exits.py", "", ""),
    "refused-share-succeeds": (
        "hyp/pvm_exits.py",
        "            if not err:\n                ret[0] = SMCCC_RET_SUCCESS",
        "            if err != 1:\n                ret[0] = SMCCC_RET_SUCCESS"),
    "share-leaves-host-nopage": (
        "hyp/mem_protect_guest.py",
        "host_set_page_state_range(h, phys, PAGE_SIZE, PageState.SHARED_BORROWED)",
        "host_set_page_state_range(h, phys, PAGE_SIZE, PageState.NOPAGE)"),
    "fault-in-no-replay": ("hyp/pvm_exits.py", "    core.pc = core.pc - 4\n", ""),
}

_RUN = """
import io, sys, pkvm
from pkvm.host.vmm import Vmm
from pkvm.check.invariants import InvariantViolation
assert pkvm.__file__.startswith(sys.argv[2]), pkvm.__file__
m = pkvm.Machine(memory="256M", cpus=2, check=True)
vmm = Vmm(m.host, bytes.fromhex(sys.argv[1]), memory="1M", vcpus=1, protected=True,
          out=io.StringIO())
try:
    vmm.run()
except InvariantViolation as e:
    print("FOUND", e.invariant, e.detail)
else:
    print("CLEAN")
"""


@pytest.mark.parametrize("mutant", sorted(PVM_MUTANTS))
def test_a_mutant_of_the_guest_hvc_path_is_caught(tmp_path, mutant):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    src = Path(pkvm.__file__).parent
    shutil.copytree(src, tmp_path / "pkvm",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "conform"))
    rel, old, new = PVM_MUTANTS[mutant]
    f = tmp_path / "pkvm" / rel
    text = f.read_text()
    assert old in text
    f.write_text(text.replace(old, new, 1))
    out = subprocess.run([sys.executable, "-c", _RUN, _pvm_guest().hex(), str(tmp_path)],
                         capture_output=True, text=True, env={"PYTHONPATH": str(tmp_path)},
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    if mutant == "clean":
        assert out.stdout.strip() == "CLEAN"
    else:
        assert out.stdout.startswith("FOUND ghost guest MEM_"), out.stdout


def test_checking_md_lists_every_oracle_with_its_kernel_rule():
    """Every invariant, registered oracle, ghost rule and excuse is in docs/checking.md, each in
    a table row that names a kernel function or file; the excuse table is the code's."""
    from pathlib import Path

    from pkvm.check.oracles import ORACLES
    from pkvm.check.violations import INVARIANTS

    doc = (Path(__file__).parent.parent / "docs" / "checking.md").read_text()
    rows = [line for line in doc.splitlines() if line.startswith("| ")]
    hw = ("stale TLB entry used", "EL2 store outside the hyp's pages", "wiped on return")
    names = [f"`{n}`" for n in [*INVARIANTS, *ORACLES, *RULES]] + list(hw) + [
        "availability (the panic rule)", "confidentiality", "guest's own HVCs"]
    missing = [n for n in names if not any(n in r for r in rows)]
    assert not missing, f"not in a table of docs/checking.md: {missing}"
    def cites_kernel(row: str) -> bool:
        last = row.rstrip().rstrip("|").split("|")[-1]
        return ".c" in last or ".h" in last or "`__" in last or "_" in last and "`" in last

    bare = [n for n in names if not any(n in r and cites_kernel(r) for r in rows)]
    assert not bare, f"no row naming a kernel rule for {bare}"
    for name, why in LEFT_TO_INVARIANTS.items():
        assert f"| `{name}` | {why} |" in doc, name


@pytest.mark.parametrize("abi", ["6.12", "latest"])
def test_a_non_protected_guest_s_pkvm_calls_go_to_the_host(abi):
    """6.12 answers no guest HVC at EL2 (no protected guests; `pvm_exit_handlers` has no HVC
    entry), 7.2 only a protected guest's: the guest-HVC ghost sees none of these."""
    m = pkvm.Machine(memory="256M", cpus=2, abi=abi, check=True)
    vmm = Vmm(m.host, _pvm_guest(), memory="1M", vcpus=1, protected=False, out=io.StringIO())
    assert vmm.run().reason == "shutdown"
    assert vmm.vm.vcpus[0].regs.x[19] == 3  # the host's vendor-hyp bitmap, not EL2's 0x1D
    assert not [k for k in m.checker.ghost.judged if k.startswith("guest ")]
    assert m.checker.ghost.judged["__kvm_vcpu_run"] >= 1
    vmm.destroy()
