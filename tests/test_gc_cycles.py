"""The hyp leaves no reference cycles behind (so reference counting, not a collection, frees
what a call or a dead machine drops): no compiled closure environment per call (the stage-2
map walk, `__pkvm_init_vm`), no cycle inside a hyp VM (its stage-2's page operations, its
vCPUs' memcaches, its vCPU slots once torn down), none between a discarded machine's hyp state
and the VMs it still had. (The host's VM objects still make cycles among themselves: a
discarded machine's host is emptied, so they hold no hyp state.)"""

import gc
import random
import weakref

import pytest

from pkvm import Machine
from pkvm.check import fuzz, fuzz_ops
from pkvm.check.fuzz_gen import generate
from pkvm.hyp.pkvm_structs import PkvmHypVcpu, PkvmHypVm


def _kind(o: object) -> str:
    return f"{type(o).__module__}.{type(o).__qualname__}"


def _hyp_garbage() -> list[str]:
    """The hyp's objects and machines (and any compiled closure environment) a collection
    finds, with the collector's saving switched on: what only a collection would free."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found = sorted({_kind(o) for o in gc.garbage
                        if _kind(o).startswith(("pkvm.hyp.", "pkvm.board."))
                        or _kind(o).endswith("_env")})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    return found


@pytest.mark.parametrize("abi", ["latest", "6.12"])
def test_fuzz_steps_and_reboots_leave_no_cyclic_hyp_garbage(abi):
    """Fuzz steps (VMs made, mapped, torn down; hyp panics and reboots that retire the dead
    world, VMs and all), then the last world retired: a collection finds no hyp object."""
    w = fuzz_ops.World("64M", 2, abi, ())
    steps = generate(random.Random(3), w.m.profile, 2, 400)
    gc.collect()
    gc.disable()
    try:
        for step in steps:
            try:
                fuzz_ops.run_step(w, step)
            except Exception:  # noqa: BLE001 (a panic or a finding: the machine is rebooted)
                pass
            if w.m.dead:
                w = fuzz._reboot(fuzz.RunResult(), w)
        w.retire()
        del w
        assert _hyp_garbage() == []
    finally:
        gc.enable()


def _count(kind: type) -> int:
    return sum(isinstance(o, kind) for o in gc.get_objects())


@pytest.mark.parametrize("abi", ["latest", "6.12"])
def test_a_torn_down_vm_and_a_discarded_machines_vms_are_freed_without_a_collection(abi):
    """A hyp VM with vCPUs and guest stage-2 tables is freed when teardown drops it; a machine
    discarded with VMs still live frees them (and itself) too; the collector is off. (Compiled
    classes take no weak references: the live hyp VMs and vCPUs are counted.)"""
    gc.collect()
    vms0, vcpus0 = _count(PkvmHypVm), _count(PkvmHypVcpu)
    m = Machine(memory="64M", cpus=2, abi=abi, trace=False)
    gc.disable()
    try:
        vmms = [m.host.create_vm(vcpus=2, memory="1M") for _ in range(2)]
        for v in vmms:
            v.map(0x40000)  # 7.2: creates the hyp VM
            v.map(0x40001)
        assert len(m._hyp.hyp_vms) == 2
        vcpus = [c for vm in m._hyp.hyp_vms.values() for c in vm.vcpus if c is not None]
        assert _count(PkvmHypVm) == vms0 + 2 and _count(PkvmHypVcpu) == vcpus0 + len(vcpus)
        assert vcpus
        del vcpus
        first = [c for c in next(iter(m._hyp.hyp_vms.values())).vcpus if c is not None]
        n_first = len(first)
        del first
        before = _count(PkvmHypVcpu)
        vmms[0].destroy()
        assert _count(PkvmHypVm) == vms0 + 1 and _count(PkvmHypVcpu) == before - n_first
        dead = weakref.ref(m)
        m.discard()
        del m, vmms
        assert dead() is None
        assert (_count(PkvmHypVm), _count(PkvmHypVcpu)) == (vms0, vcpus0)
        assert _hyp_garbage() == []
    finally:
        gc.enable()
