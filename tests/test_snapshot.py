"""Machine snapshots (`Machine.snapshot` / `Machine.restore`, `pkvm.snapshot`): a restored machine
is the saved one, continues as it would have, and shares nothing with it; the fuzzer's reboots
from a snapshot give the same campaign as booting afresh."""

import random

import pytest

from pkvm import Machine, guests
from pkvm.check import fuzz, fuzz_ops
from pkvm.check.fuzz_gen import generate
from pkvm.host.vmm import Vmm
from pkvm.machine.memory import PAGE_SHIFT

ABIS = ["latest", "6.12"]


def state(m: Machine) -> tuple:
    """Everything a user sees of a machine: RAM, the VM table, page states of every RAM page."""
    ins = m.inspect
    return (m.mem.nonzero_pages(), repr(ins.vms()), ins.page_states(), m.dead)


def busy_machine(abi: str) -> tuple[Machine, object]:
    """A machine with a VM, a vCPU, a page shared with the hyp and memory mapped in the guest."""
    m = Machine(memory="64M", cpus=2, abi=abi, trace=8)
    vm = m.host.create_vm(vcpus=2, memory="1M")
    vm.map(0x40000, 2)
    pfn = m.host.alloc_pages(1) >> PAGE_SHIFT
    assert m.hvc(0, "__pkvm_host_share_hyp", pfn).ok
    return m, vm


@pytest.mark.parametrize("abi", ABIS)
def test_restored_machine_is_the_saved_one_and_independent(abi):
    m, vm = busy_machine(abi)
    data = m.snapshot()
    before = state(m)
    twin = Machine.restore(data)
    assert state(twin) == before
    assert list(twin.trace) and [r.name for r in twin.trace] == [r.name for r in m.trace]
    # Both continue alike ...
    for mach in (m, twin):
        hv = mach.host.vms[0]
        hv.map(0x40002)
        hv.destroy()
    assert state(twin) == state(m)
    # ... and share nothing: a store into one is not in the other.
    pa = m.host.alloc_pages(1)
    m.host.port.write(0, pa, b"\x5a" * 8)
    assert m.mem.read(pa, 8) == b"\x5a" * 8 and twin.mem.read(pa, 8) == bytes(8)
    assert state(Machine.restore(data)) == before  # the snapshot itself is unchanged


@pytest.mark.parametrize("abi", ABIS)
def test_snapshot_refuses_what_it_cannot_hold(abi):
    checked = Machine(memory="64M", cpus=1, abi=abi, check=True)
    with pytest.raises(ValueError, match="checker"):
        checked.snapshot()
    m = Machine(memory="64M", cpus=1, abi=abi)
    m.interpose_hvc(lambda proceed, cpu, f, a: proceed(cpu, f, a))
    with pytest.raises(ValueError, match="interposers"):
        m.snapshot()


def test_snapshot_refuses_a_cpu_that_ran_a_guest():
    m = Machine(memory="64M", cpus=1, trace=False)
    vmm = Vmm(m.host, guests.image("hello"), memory="16M")
    vmm.run()
    with pytest.raises(ValueError, match="guest code"):
        m.snapshot()


@pytest.mark.parametrize("abi", ABIS)
def test_fuzzer_reboots_from_a_snapshot_as_from_a_boot(abi, monkeypatch):
    """The same steps give the same campaign (calls, results, panics, coverage) whether each
    reboot after a hyp panic loads the snapshot or boots again."""
    m = Machine(memory="64M", cpus=2, abi=abi, trace=False)
    steps = generate(random.Random(7), m.profile, 2, 600)
    fast = fuzz.execute(steps, "64M", 2, abi)
    assert len(fast.panics) >= 3  # the run rebooted several times

    def boot(memory, cpus, abi, bugs, smc):
        return Machine(memory=memory, cpus=cpus, abi=abi, trace=False, bugs=bugs, ffa=smc)

    monkeypatch.setattr(fuzz_ops, "booted_machine", boot)
    slow = fuzz.execute(steps, "64M", 2, abi)
    for f in ("failure", "panics", "known_warns", "steps_run", "calls", "transitions",
              "driver_errors", "raced"):
        assert getattr(fast, f) == getattr(slow, f), f

