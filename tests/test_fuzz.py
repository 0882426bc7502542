"""The hostile-host fuzzer finds each seeded bug; the clean model survives it."""

from __future__ import annotations

import functools
import pickle
import random
import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pkvm
from pkvm import snapshot
from pkvm.check import fuzz_ops
from pkvm.check.bugs import BUGS
from pkvm.check.fuzz import Campaign, execute, generate, replay
from pkvm.errors import errno_name

MEM, CPUS = "64M", 2


def _steps(abi: str, seed: int, n: int):
    prof = pkvm.Machine(memory=MEM, cpus=CPUS, abi=abi, trace=False).profile
    return generate(random.Random(seed), prof, CPUS, n)


@pytest.mark.parametrize("abi", ["latest", "6.12"])
@pytest.mark.parametrize("seed", [0, 1])
def test_clean_model_survives(abi: str, seed: int) -> None:
    r = execute(_steps(abi, seed, 600), MEM, CPUS, abi)
    assert r.failure is None, str(r.failure)
    assert r.steps_run == 600
    assert sum(r.calls.values()) > 600


def test_a_page_an_orphaned_guest_borrowed_is_no_ffa_owner_finding() -> None:
    """A 7.2 VM finalised while its guest still borrowed a host page leaves the page host
    SHARED_OWNED with no borrower (`__pkvm_finalize_teardown_vm` does not reclaim it): the full
    check's FF-A owner excuses it as the guest-consistent check does. Seed 429 found the false
    finding at the end-of-run full check."""
    r = execute(_steps("latest", 429, 300), MEM, CPUS, "latest")
    assert r.failure is None, str(r.failure)
    assert r.orphan_borrowed > 0  # the excuse is counted (and printed by `pkvm fuzz`)


# (bug, abi, seed, steps, failure signature): each found by the fuzzer alone from a fixed seed
# within its step budget (`pkvm fuzz --seed S --steps N --bug B` finds it, well within 60 s).
FOUND = [
    ("load-no-pin", "latest", 0, 100, "invariant:vm-refcount"),
    ("teardown-keeps-stage2", "latest", 0, 50, "invariant:hyp-accounting"),
    ("teardown-keeps-stage2", "6.12", 0, 50, "invariant:hyp-accounting"),
    ("vcpu-index-range", "latest", 0, 1800, "exception:IndexError@init_vcpu_slot"),
    ("unpin-underflow", "latest", 0, 1150, "invariant:pin-refcount"),
    ("unpin-underflow", "6.12", 0, 1400, "invariant:pin-refcount"),
    ("double-fetch", "latest", 2, 300, "exception:IndexError@_init_vcpu_locked"),
    ("handle-range", "latest", 0, 50, "exception:IndexError@get_vm_by_handle"),
    ("teardown-no-wipe", "latest", 0, 200, "invariant:ghost"),
    ("unshare-pinned", "6.12", 0, 1400, "invariant:ghost"),
    ("unshare-pinned", "latest", 0, 1200, "invariant:ghost"),
    ("share-guest-warn", "latest", 0, 750, "invariant:no-warn"),
    ("memcache-capacity", "latest", 0, 2000, "invariant:no-warn"),
    ("range-args", "latest", 0, 3600, "invariant:ghost"),
    ("donate-guest-keeps-host", "latest", 0, 200, "invariant:ghost"),
    ("reclaim-live", "latest", 0, 250, "invariant:ghost"),
    ("load-dying", "latest", 0, 300, "invariant:ghost"),
    ("refill-no-writeback", "latest", 0, 250, "invariant:ghost"),
    ("force-reclaim-no-wipe", "latest", 0, 1850, "invariant:ghost"),
    ("young-not-cleared", "latest", 2, 850, "invariant:ghost"),
    ("unshare-guest-count", "latest", 17, 2600, "invariant:ghost"),
    ("teardown-keeps-pin", "latest", 0, 1250, "invariant:pin-refcount"),
    ("teardown-keeps-pin", "6.12", 0, 50, "invariant:pin-refcount"),
    ("hyp-vm-no-wipe", "latest", 0, 50, "invariant:hw"),
    ("poison-after-return", "latest", 0, 200, "invariant:hw"),
    ("hyp-unmap-no-tlbi", "latest", 0, 50, "invariant:hw"),
    ("hyp-unmap-no-tlbi", "6.12", 0, 100, "invariant:hw"),
]


def test_catalog_is_hunted() -> None:
    """Every seeded bug is found by the fuzzer or the explorer in these tests, and names the
    upstream fix (or kernel rule) it is modelled on."""
    hunted = {f[0] for f in FOUND} | {e[1] for e in EXPLORED} | {"donate-nomap"} | {
        f[0] for f in SMC_FOUND}
    missed = set(BUGS) - hunted
    print("seeded bugs no search finds yet:", NOT_FOUND_BY_SEARCH)
    assert missed == set(NOT_FOUND_BY_SEARCH)
    assert len(BUGS) >= 20
    assert all(b.upstream for b in BUGS.values())


# Seeded bugs the fuzzer and the explorer do not find yet, each with the reason (none may hide).
NOT_FOUND_BY_SEARCH: dict[str, str] = {}


@pytest.mark.parametrize("bug,abi,seed,budget,signature", FOUND)
def test_fuzzer_finds_seeded_bug(bug: str, abi: str, seed: int, budget: int, signature: str) -> None:
    steps = _steps(abi, seed, budget)
    found = execute(steps, MEM, CPUS, abi, (bug,))
    assert found.failure is not None and found.failure.signature == signature, found.failure
    clean = execute(steps[: found.failure.step_index + 1], MEM, CPUS, abi)
    assert clean.failure is None, str(clean.failure)


# Found by `pkvm fuzz --smc` (host SMCs mixed in: hostile FF-A and PSCI calls), same form.
SMC_FOUND = [
    ("ffa-unaligned-range", "latest", 0, 400, "invariant:ghost"),
]


@pytest.mark.parametrize("bug,abi,seed,budget,signature", SMC_FOUND)
def test_fuzzer_with_smc_finds_seeded_bug(bug: str, abi: str, seed: int, budget: int,
                                          signature: str) -> None:
    prof = pkvm.Machine(memory=MEM, cpus=CPUS, abi=abi, trace=False).profile
    steps = generate(random.Random(seed), prof, CPUS, budget, smc=True)
    found = execute(steps, MEM, CPUS, abi, (bug,), smc=True)
    assert found.failure is not None and found.failure.signature == signature, found.failure
    clean = execute(steps[: found.failure.step_index + 1], MEM, CPUS, abi, smc=True)
    assert clean.failure is None, str(clean.failure)


def test_fuzzer_finds_donate_nomap_as_an_el2_fault() -> None:
    """The seeded missing memory check lets a non-RAM page reach `hyp_vmemmap`: an EL2 data
    abort (as on hardware), which a correct hyp never takes; the clean model never does."""
    steps = _steps("latest", 22, 50)
    found = execute(steps, MEM, CPUS, "latest", ("donate-nomap",), stop_on_panic=True)
    assert found.failure is not None and found.failure.kind == "panic", found.failure
    assert "hyp_vmemmap" in found.failure.message
    clean = execute(steps[: found.failure.step_index + 1], MEM, CPUS, "latest", stop_on_panic=True)
    assert clean.failure is None, str(clean.failure)


def test_shrink_and_reproducer(tmp_path) -> None:
    out = tmp_path / "repro.toml"
    res = Campaign(seed=0, steps=100, abi="latest", bugs=("load-no-pin",), out=str(out)).run()
    assert res.found and res.minimal is not None
    assert len(res.minimal) <= 3
    doc = tomllib.loads(out.read_text())
    assert doc["machine"] == {"memory": MEM, "cpus": CPUS, "abi": "latest", "check": True}
    scenario = pytest.importorskip("pkvm.scenario")
    assert scenario.load(str(out)).run().ok  # `pkvm run` reads it; the clean model passes
    again = replay(doc["machine"], doc["step"], bugs=("load-no-pin",))
    assert again is not None and again.signature == "invariant:vm-refcount"
    assert replay(doc["machine"], doc["step"]) is None  # the clean model passes the same steps


def test_raced_predictions_are_counted() -> None:
    """Calls whose inputs a racing host store changed are not judged by the guest-memory ghost:
    that excuse is counted per run (and printed by `pkvm fuzz`)."""
    r = execute(_steps("latest", 6, 1500), MEM, CPUS, "latest")
    assert r.failure is None, str(r.failure)
    assert r.raced > 0


def test_coverage_is_collected() -> None:
    r = execute(_steps("latest", 3, 300), MEM, CPUS, "latest")
    names = {n for n, _ in r.calls}
    assert {"__pkvm_host_share_hyp", "__pkvm_vcpu_load", "__pkvm_init_vm"} <= names
    assert any(res != "0" for _, res in r.calls)
    assert r.transitions


# --- pkvm explore -------------------------------------------------------------------------------
def _make(abi: str = "latest", bugs: tuple[str, ...] = ()):
    return lambda: pkvm.Machine(memory=MEM, cpus=CPUS, abi=abi, trace=False, bugs=bugs)


@pytest.mark.parametrize("name", ["share-share", "reserve-reserve"])
def test_explore_clean_scenarios_exhaust(name: str) -> None:
    from pkvm.check.explore import SCENARIOS, explore

    r = explore(_make(), SCENARIOS[name][1], bound=2, max_runs=400)
    assert not r.findings, r.findings[0].finding
    assert r.exhausted and r.executions > 10


# (scenario, bug, what the finding names): found by `pkvm explore` alone.
EXPLORED = [("load-teardown", "load-no-pin", "vm-refcount")]


@pytest.mark.parametrize("name,bug,expect", EXPLORED)
def test_explore_finds_race_bugs(name: str, bug: str, expect: str) -> None:
    from pkvm.check.explore import SCENARIOS, explore

    r = explore(_make(bugs=(bug,)), SCENARIOS[name][1], bound=2, max_runs=50)
    assert r.findings and expect in (r.findings[0].finding or "")


USER_SCENARIO = """
[machine]
memory = "64M"
cpus = 2
abi = "latest"

[[step]]
create_vm = "a"
vcpus = 1
memory = "256K"

[[step]]
map = "a"
gfn = 0x40000

[[step]]
hvc = "__pkvm_vcpu_load"
args = ["vm:a", 0, 0]
cpu = 0

[[step]]
hvc = "__pkvm_vcpu_put"
cpu = 0

[[step]]
hvc = "__pkvm_start_teardown_vm"
args = ["vm:a"]
cpu = 1

[[step]]
host_write = "gfn:a:0x40000"
data = "00"
cpu = 1
"""


def test_explore_a_user_scenario_file(tmp_path) -> None:
    """`pkvm explore FILE.toml`: set-up steps first, hvc / host_write steps split by `cpu`."""
    from pkvm.check.explore import explore, from_file

    path = tmp_path / "race.toml"
    path.write_text(USER_SCENARIO)
    make, setup, machine = from_file(str(path))
    assert machine["abi"] == "latest"
    progs = setup(make())
    assert [op[1] for op in progs[0]] == ["__pkvm_vcpu_load", "__pkvm_vcpu_put"]
    assert progs[1][0][1] == "__pkvm_start_teardown_vm" and progs[1][1][0] == "store"
    clean = explore(make, setup, bound=1, max_runs=60)
    assert not clean.findings, clean.findings[0].finding
    make_bug, setup_bug, _ = from_file(str(path), ("load-no-pin",))
    r = explore(make_bug, setup_bug, bound=1, max_runs=60)
    assert r.findings and "vm-refcount" in (r.findings[0].finding or "")


def test_oracle_registry_is_one_line(monkeypatch) -> None:
    """A module with `violations(inspect) -> list[str]` becomes a per-call oracle by one entry
    in `pkvm.check.oracles.ORACLES`; its finding is an InvariantViolation named after it."""
    import types

    from pkvm.check import InvariantViolation, oracles

    seen = []
    mod = types.SimpleNamespace(violations=lambda insp: seen.append(insp) or (
        ["two pages shared"] if len(seen) == 2 else []))
    monkeypatch.setitem(oracles.ORACLES, "example", mod)
    m = pkvm.Machine(memory=MEM, cpus=CPUS, check=True, trace=False)
    pfn = m.host.alloc_pages(2) >> 12
    m.hvc(0, "__pkvm_host_share_hyp", pfn)
    with pytest.raises(InvariantViolation) as e:
        m.hvc(0, "__pkvm_host_share_hyp", pfn + 1)
    assert e.value.invariant == "example" and seen[0] is m.inspect


def test_a_store_into_hyp_memory_through_a_raw_host_pointer_is_counted_apart():
    """Linux 6.12's `__pkvm_vcpu_init_traps` writes through `kern_hyp_va()` of the host's
    pointer: given one into a hyp VM's donated struct, it corrupts the hyp's own memory. The
    fuzzer counts that as the kernel's finding (and reboots), not as the model's failure; the
    run stays clean, and the counted call is exactly that handler."""
    m = pkvm.Machine(memory="64M", cpus=2, abi="6.12", trace=False)
    steps = generate(random.Random(7), m.profile, 2, 3814)
    res = execute(steps, "64M", 2, "6.12")
    assert res.failure is None
    assert dict(res.host_pointer_stores) == {"__pkvm_vcpu_init_traps": 1}


class _NoLabels(dict):
    """A `fuzz_ops._ERRNO_LABELS` that keeps nothing: each label made by `errno_name` anew."""

    def __contains__(self, key: object) -> bool:
        return False

    def get(self, key: object, default: object = None) -> object:  # type: ignore[override]
        return default

    def __setitem__(self, key: object, value: object) -> None:
        pass


@pytest.mark.parametrize("abi", ["latest", "6.12"])
def test_the_fuzzers_fast_paths_give_the_generic_run(abi: str, monkeypatch) -> None:
    """The fuzzer's fast paths (the interposer chains composed once by `Machine.interpose_hvc`
    and `interpose_smc`, the fuzzer's calls through the host port's compiled `hvc`, the result
    labels kept once made, the snapshot load's class lookup) give the run the generic ways
    give: the same log, calls and their results, panics, coverage and failure."""
    steps = _steps(abi, 7, 600)
    fast = execute(steps, MEM, CPUS, abi)
    assert len(fast.panics) >= 3 and len(fast.log) > 100  # (rebooted several times)

    def interpose_hvc(self, fn):  # the chain left to `_interpose`, looked up at each call
        self._interposers.append(fn)
        self._door.interposed = self._interpose

    def interpose_smc(self, fn):
        self._smc_interposers.append(fn)
        self._smc_chain = functools.partial(self._smc_interposed, len(self._smc_interposers) - 1)

    init = fuzz_ops.World.__init__

    def world(self, *a, **k):
        init(self, *a, **k)
        self.hvc = self.m.hvc

    monkeypatch.setattr(pkvm.Machine, "interpose_hvc", interpose_hvc)
    monkeypatch.setattr(pkvm.Machine, "interpose_smc", interpose_smc)
    monkeypatch.setattr(fuzz_ops.World, "__init__", world)
    monkeypatch.setattr(fuzz_ops, "_ERRNO_LABELS", _NoLabels())
    monkeypatch.setattr(snapshot._Loader, "find_class", pickle.Unpickler.find_class)
    generic = execute(steps, MEM, CPUS, abi)
    for f in ("failure", "panics", "known_warns", "steps_run", "calls", "transitions",
              "driver_errors", "raced", "orphan_borrowed", "host_pointer_stores", "log"):
        assert getattr(fast, f) == getattr(generic, f), f


@settings(max_examples=200, deadline=None)
@given(st.integers(-1, 1), st.one_of(st.integers(-5000, 5000), st.integers(-(1 << 63), 1 << 63)))
def test_a_result_label_is_made_once_as_errno_name_makes_it(x0: int, x1: int) -> None:
    """`fuzz_ops._result_label` keeps each errno's label once made: the same as `errno_name`'s."""
    want = ("x0=-1 (unknown)" if x0 else "0" if x1 == 0 else errno_name(-x1) if -4096 < x1 < 0
            else "value")
    assert fuzz_ops._result_label(x0, x1) == want == fuzz_ops._result_label(x0, x1)
