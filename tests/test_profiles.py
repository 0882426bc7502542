"""Kernel names resolve through one table; each kernel's VM life cycle is chosen once at boot."""

from __future__ import annotations

import pytest

from pkvm.abi.profiles import ABI_ALIASES, PROFILE_6_12, PROFILE_7_2, abi_name, profile_for
from pkvm.board import Machine
from pkvm.errors import HypPanic
from pkvm.host.kvm_life import OnePhase, TwoPhase
from pkvm.hyp import pkvm_one_phase, pkvm_two_phase


def test_aliases_resolve_to_the_profiles() -> None:
    assert profile_for("6.12") is PROFILE_6_12
    assert profile_for("7.2") is profile_for("latest") is PROFILE_7_2
    assert abi_name("7.2") == "latest"
    assert set(ABI_ALIASES.values()) == {PROFILE_6_12.name, PROFILE_7_2.name}
    with pytest.raises(ValueError, match="unknown abi '7.1'"):
        profile_for("7.1")


@pytest.mark.parametrize(("abi", "hyp_life", "host_life"), [
    ("6.12", pkvm_one_phase, OnePhase), ("7.2", pkvm_two_phase, TwoPhase)])
def test_life_cycle_chosen_at_boot(abi: str, hyp_life: object, host_life: type) -> None:
    m = Machine(abi=abi)
    assert m._hyp.life is hyp_life
    vm = m.host.create_vm(vcpus=2, memory="16M")
    assert isinstance(vm.life, host_life)
    # 6.12 made the hyp VM at create (its handle is x1 of __pkvm_init_vm); 7.2 reserved it.
    assert vm.handle == 0x1000 and vm.is_created == (abi == "6.12")
    vm.destroy()


def test_teardown_refused_while_the_vm_is_held_72() -> None:
    """7.2: `__pkvm_start_teardown_vm` of a VM with a loaded vCPU answers the profile's refusal
    errno (-EINVAL from `get_pkvm_unref_hyp_vm_locked`) and leaves the VM live."""
    m = Machine(abi="7.2")
    vm = m.host.create_vm(vcpus=1, memory="16M")
    vm.ensure_hyp_vcpu(vm.vcpus[0])
    assert m.hvc(1, "__pkvm_vcpu_load", vm.handle, 0, 0).x0 == 0
    r = m.hvc(0, "__pkvm_start_teardown_vm", vm.handle)
    assert r.x1 == m.profile.teardown_refusal_errno_busy == -22
    assert m.hvc(1, "__pkvm_vcpu_put").x0 == 0
    assert m.hvc(0, "__pkvm_start_teardown_vm", vm.handle).x1 == 0


def test_teardown_refused_while_the_vm_is_held_612() -> None:
    """6.12 holds the VM only inside `__kvm_vcpu_run` (the test takes that hold as the run's
    first step does): `__pkvm_teardown_vm` then WARNs, which at EL2 is a hyp panic."""
    m = Machine(abi="6.12")
    vm = m.host.create_vm(vcpus=1, memory="16M")
    h = m._hyp
    assert h.life.pkvm_load_hyp_vcpu(h, vm.handle, 0) is not None
    with pytest.raises(HypPanic, match="WARN_ON in __pkvm_teardown_vm"):
        m.hvc(0, "__pkvm_teardown_vm", vm.handle)
