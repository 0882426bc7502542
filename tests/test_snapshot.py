"""Machine snapshots (`Machine.snapshot` / `Machine.restore`, `pkvm.snapshot`): a restored machine
is the saved one, continues as it would have, and shares nothing with it; the fuzzer's reboots
from a snapshot give the same campaign as booting afresh."""

import io
import pickle
import random
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pkvm import Machine, guests, snapshot
from pkvm.check import fuzz, fuzz_ops
from pkvm.check.fuzz_gen import generate
from pkvm.errors import HypPanic
from pkvm.host.vmm import Vmm
from pkvm.machine.memory import PAGE_SHIFT
from pkvm.snapshot_load import LoadHooks

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

    def boot(memory, cpus, abi, bugs, smc, recycle=None):
        return Machine(memory=memory, cpus=cpus, abi=abi, trace=False, bugs=bugs, ffa=smc)

    monkeypatch.setattr(fuzz_ops, "booted_machine", boot)
    slow = fuzz.execute(steps, "64M", 2, abi)
    for f in ("failure", "panics", "known_warns", "steps_run", "calls", "transitions",
              "driver_errors", "raced"):
        assert getattr(fast, f) == getattr(slow, f), f



def _dirty_and_panic(m: Machine) -> None:
    """Stores all over a machine (a guest's run, host pages, a shared page, a VM's pages and
    vmemmap entries), then a hyp panic: the state a fuzzer's reboot starts from."""
    vmm = Vmm(m.host, guests.image("hello"), memory="16M")  # guest code stores through unicorn
    vmm.run()
    vm = m.host.create_vm(vcpus=2, memory="1M")
    vm.map(0x40000, 3)
    for k in range(6):
        pa = m.host.alloc_pages(2)
        m.host.port.write(0, pa + 4096 * (k & 1), bytes([k + 1]) * 4096)
    assert m.hvc(0, "__pkvm_host_share_hyp", m.host.alloc_pages(1) >> PAGE_SHIFT).ok
    with pytest.raises(HypPanic):
        m.hvc(0, "__vgic_v3_restore_vmcr_aprs", 0x8000_8000_0000)  # a hyp VA past RAM
    assert m.dead


@pytest.mark.parametrize("abi", ABIS)
def test_a_load_that_recycles_a_dead_machine_is_a_fresh_load(abi):
    """`Machine.restore(data, recycle=dead)` (the fuzzer's reboot after a hyp panic) takes over
    the dead machine's RAM file and vmemmap arrays, set back to the snapshot's contents: the
    machine it gives saves to the same bytes as a fresh load (hyp state, RAM, vmemmap, host),
    holds no page the dead one wrote, and continues alike."""
    key = ("64M", 2, abi, (), False)
    data = fuzz_ops._BOOTED.get(key) or fuzz_ops.booted_machine(*key).snapshot()
    dead = Machine.restore(data)
    _dirty_and_panic(dead)
    mem, arrays = dead.mem, dead.spare_arrays()
    reborn = Machine.restore(data, recycle=dead)
    assert reborn.mem is mem and {id(a) for a in reborn.spare_arrays()} == set(map(id, arrays))
    fresh = Machine.restore(data)
    assert reborn.snapshot() == fresh.snapshot()
    assert state(reborn) == state(fresh)
    for mach in (reborn, fresh):  # and both continue alike
        _dirty_and_panic(mach)
    assert state(reborn) == state(fresh)
    other = Machine(memory="128M", cpus=2, abi=abi, trace=False)  # another size: nothing reused
    again = Machine.restore(data, recycle=other)
    assert again.mem is not other.mem and again.snapshot() == Machine.restore(data).snapshot()
    with pytest.raises(HypPanic, match="recycled"):  # (it may not be used again)
        other.hvc(0, "__pkvm_host_share_hyp", 0)


def run_alike(worlds, steps) -> None:
    """Run `steps` on each fuzzer world in turn, counting what any step raises in its results
    (compared by the caller, whatever it is); a dead machine ends its world's run."""
    for world in worlds:
        for step in steps:
            try:
                fuzz_ops.run_step(world, step)
            except Exception as e:  # noqa: BLE001 (compared by the caller)
                world.results[("raised", type(e).__name__)] += 1
                if world.m.dead:
                    break

@pytest.mark.parametrize("abi", ABIS)
def test_a_reboots_world_and_checker_are_a_fresh_ones(abi):
    """The fuzzer's reboot (`World(recycle=...)`) after a hyp panic: the new machine and its
    checker's copy of the vmemmap equal a fresh world's, and the same steps give the same
    results on both."""
    w = fuzz_ops.World("64M", 2, abi, ())
    _dirty_and_panic(w.m)
    mem, prev = w.m.mem, w.m.checker._prev
    reborn = fuzz._reboot(fuzz.RunResult(), w)
    assert not vars(w)  # retired: what it held is dropped (`World.retire`)
    fresh = fuzz_ops.World("64M", 2, abi, ())
    assert reborn.m.mem is mem and reborn.m.checker._prev is prev
    assert state(reborn.m) == state(fresh.m)
    assert reborn.m.checker._prev == fresh.m.checker._prev
    steps = generate(random.Random(3), fresh.m.profile, 2, 60)
    run_alike((reborn, fresh), steps)
    assert reborn.results == fresh.results
    assert reborn.m.checker.transitions == fresh.m.checker.transitions
    assert state(reborn.m) == state(fresh.m)


class _Dead:
    """A machine done with, as `snapshot.load`'s `recycle` sees one (no RAM to reuse here)."""

    mem = None

    def __init__(self, arrays):
        self.arrays = arrays

    def spare_arrays(self):
        return list(self.arrays)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["B", "H", "I", "Q", "bytearray"]), st.integers(4096, 5000),
       st.lists(st.tuples(st.integers(0, 4999), st.integers(0, 255)), max_size=40),
       st.booleans())
def test_a_large_array_saves_as_its_runs_and_loads_whole(typecode, n, writes, spare):
    """`snapshot._Saver` keeps a large typed array (or bytearray: the host allocator's map) as
    its fill value and the runs of other values; a load gives the same array, one object where
    the saved one was held twice, into a recycled machine's spare array (its old contents
    overwritten) or a new one."""
    def filled(v, k):
        return bytearray([v]) * k if typecode == "bytearray" else array(typecode, [v]) * k

    a = filled(3, n)
    for i, v in writes:
        a[i % n] = v
    out = io.BytesIO()
    small_one = filled(1, 2)
    snapshot._Saver(out, {}).dump((a, [a], small_one))
    itemsize = 1 if typecode == "bytearray" else a.itemsize
    assert len(out.getvalue()) < 1024 + 4 * len(writes) * itemsize
    old = filled(7, n)
    x, (y,), small = snapshot._Loader(out.getvalue(), _Dead([old] if spare else [])).load()
    assert x == a and type(x) is type(a) and x is y and small == small_one
    assert (x is old) == spare


@pytest.mark.parametrize("abi", ABIS)
def test_a_load_finds_each_class_as_pickle_does(abi, monkeypatch):
    """`snapshot._Loader.find_class` (a module's attribute, the module already imported) gives
    what `pickle.Unpickler.find_class` gives for every global a snapshot names, and a load
    through pickle's own lookup is the same machine (it saves to the same bytes)."""
    key = ("64M", 2, abi, (), False)
    data = fuzz_ops._BOOTED.get(key) or fuzz_ops.booted_machine(*key).snapshot()
    names: list[tuple[str, str]] = []

    class Recording(snapshot._Loader):
        def find_class(self, module, name):
            found = super().find_class(module, name)
            assert found is pickle.Unpickler.find_class(self, module, name)
            names.append((module, name))
            return found

    Recording(data).load()
    assert ("pkvm.board", "Machine") in names and len(names) >= 10
    # the compiled lookup a load uses (`snapshot_load.LoadHooks`) gives the same, and a load
    # installs it unless its class has a lookup of its own
    loader = snapshot._Loader(data)
    assert loader.find_class.__self__.__class__ is LoadHooks
    assert "find_class" not in vars(Recording(data))
    for module, name in names + [("collections", "OrderedDict"), ("os.path", "join")]:
        assert loader.find_class(module, name) is pickle.Unpickler.find_class(loader, module, name)
    fast = Machine.restore(data)
    monkeypatch.setattr(snapshot._Loader, "find_class", pickle.Unpickler.find_class)
    generic = Machine.restore(data)
    assert fast.snapshot() == generic.snapshot()
