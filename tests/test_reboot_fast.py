"""The fuzzer's reboot after a hyp panic (`fuzz._reboot`: a snapshot load that recycles the dead
machine, a new checker): each of its shortcuts gives what the generic path it replaces gives."""

import gc
import weakref

import pytest

from pkvm import Machine
from pkvm.abi.profiles import get_profile
from pkvm.check import fuzz, fuzz_ops, host_pointers
from pkvm.check.fuzz_gen import generate
from test_snapshot import run_alike

ABIS = ["latest", "6.12"]


@pytest.mark.parametrize("abi", ABIS + ["7.2"])
def test_a_host_pointer_watch_knows_its_profiles_calls_as_made_afresh(abi):
    """`HostPointerWatch` takes its spans and calls from a table made once per profile
    (`host_pointers._WATCHED`): the same as `_watched` makes for that profile."""
    m = Machine(memory="64M", cpus=2, abi=abi, trace=False)
    prof = m.inspect.profile
    a, b = host_pointers.HostPointerWatch(m.inspect), host_pointers.HostPointerWatch(m.inspect)
    assert (a._span, a._calls) == host_pointers._watched(prof) == (b._span, b._calls)
    assert a._calls is b._calls  # made once
    assert set(a._calls) == {n for n in host_pointers.STORES_THROUGH_HOST_POINTER
                             if n in prof.hcalls}
    other = get_profile("6.12" if prof.name != "6.12" else "latest")
    assert host_pointers._watched(other) != host_pointers._watched(prof) or \
        set(other.hcalls) & set(host_pointers.STORES_THROUGH_HOST_POINTER) == \
        set(prof.hcalls) & set(host_pointers.STORES_THROUGH_HOST_POINTER)


@pytest.mark.parametrize("abi", ABIS)
def test_the_ffa_ghost_takes_the_carveout_the_memory_map_names(abi):
    """The FF-A ghost's carve-out (the machine's `carveout`) is the memory map's "hyp" region."""
    w = fuzz_ops.World("64M", 2, abi, (), smc=True)
    hyp = next(r for r in w.m.memory_map() if r.kind == "hyp")
    assert w.m.checker.ghost.ffa._carve == (hyp.start >> 12, hyp.end >> 12)


@pytest.mark.parametrize("abi", ABIS)
def test_reboot_after_reboot_checks_as_a_fresh_world(abi):
    """Several reboots in a row (each recycling the last world) give a world whose steps,
    results and checker findings are a fresh world's."""
    w = fuzz_ops.World("64M", 2, abi, ())
    steps = generate(__import__("random").Random(5), w.m.profile, 2, 40)
    for _ in range(3):
        for step in steps[:10]:
            try:
                fuzz_ops.run_step(w, step)
            except Exception:  # noqa: BLE001 (a panic or a finding: the machine is rebooted)
                pass
        w = fuzz._reboot(fuzz.RunResult(), w)
    fresh = fuzz_ops.World("64M", 2, abi, ())
    assert w.m.checker._prev == fresh.m.checker._prev
    assert w.m.checker.calls == fresh.m.checker.calls == 0
    run_alike((w, fresh), steps)
    assert w.results == fresh.results
    assert w.m.checker.transitions == fresh.m.checker.transitions
    assert dict(w.m.checker.ghost.judged) == dict(fresh.m.checker.ghost.judged)


@pytest.mark.parametrize("abi", ABIS)
def test_a_retired_world_is_freed_without_a_collection(abi):
    """`World.retire` (the dead world a reboot replaced) drops the cycles its checker
    (`Checker.retire`) and machine (`Machine.discard`) make: with the collector off, the dead
    machine is freed by reference counting, and a collection then finds nothing left of it."""
    w = fuzz_ops.World("64M", 2, abi, ())
    gc.collect()
    gc.disable()
    try:
        dead = weakref.ref(w.m)
        new = fuzz._reboot(fuzz.RunResult(), w)
        del w
        assert dead() is None
        assert gc.collect() == 0
    finally:
        gc.enable()
    assert new.m.checker.ghost is not None and not new.m.dead
