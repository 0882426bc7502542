"""The hostile-host fuzzer finds each seeded bug; the clean model survives it."""

from __future__ import annotations

import random
import tomllib

import pytest

import pkvm
from pkvm.check.bugs import BUGS
from pkvm.check.fuzz import Campaign, execute, generate, replay

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


# (bug, abi, seed, step budget, failure signature): each found within its budget.
FOUND = [
    ("load-no-pin", "latest", 0, 100, "invariant:vm-refcount"),
    ("teardown-keeps-stage2", "latest", 0, 200, "invariant:hyp-accounting"),
    ("teardown-keeps-stage2", "6.12", 0, 100, "invariant:hyp-accounting"),
    ("vcpu-index-range", "latest", 0, 200, "exception:IndexError@_init_vcpu_locked"),
    ("unpin-underflow", "latest", 3, 400, "invariant:pin-refcount"),
    ("unpin-underflow", "6.12", 0, 300, "invariant:pin-refcount"),
    ("double-fetch", "latest", 0, 500, "exception:IndexError@_init_vcpu_locked"),
]


@pytest.mark.parametrize("bug,abi,seed,budget,signature", FOUND)
def test_fuzzer_finds_seeded_bug(bug: str, abi: str, seed: int, budget: int, signature: str) -> None:
    assert bug in BUGS
    steps = _steps(abi, seed, budget)
    found = execute(steps, MEM, CPUS, abi, (bug,))
    assert found.failure is not None and found.failure.signature == signature, found.failure
    clean = execute(steps[: found.failure.step_index + 1], MEM, CPUS, abi)
    assert clean.failure is None, str(clean.failure)


def test_fuzzer_finds_donate_nomap_as_an_el2_fault() -> None:
    """The seeded missing memory check lets a non-RAM page reach `hyp_vmemmap`: an EL2 data
    abort (as on hardware), which a correct hyp never takes; the clean model never does."""
    steps = _steps("latest", 0, 100)
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


def test_coverage_is_collected() -> None:
    r = execute(_steps("latest", 3, 300), MEM, CPUS, "latest")
    names = {n for n, _ in r.calls}
    assert {"__pkvm_host_share_hyp", "__pkvm_vcpu_load", "__pkvm_init_vm"} <= names
    assert any(res != "0" for _, res in r.calls)
    assert r.transitions


# --- pkvm explore -------------------------------------------------------------------------------
def _make(abi: str = "latest", bugs: tuple[str, ...] = ()):
    return lambda: pkvm.Machine(memory=MEM, cpus=CPUS, abi=abi, trace=False, bugs=bugs)


@pytest.mark.parametrize("name", ["share-share", "reserve-reserve", "init-vcpu-race"])
def test_explore_clean_scenarios_exhaust(name: str) -> None:
    from pkvm.check.explore import SCENARIOS, explore

    r = explore(_make(), SCENARIOS[name][1], bound=2, max_runs=400)
    assert not r.findings, r.findings[0].finding
    assert r.exhausted and r.executions > 10


@pytest.mark.parametrize("name,bug,expect", [
    ("init-vcpu-race", "double-fetch", "IndexError"),
    ("load-teardown", "load-no-pin", "vm-refcount"),
])
def test_explore_finds_race_bugs(name: str, bug: str, expect: str) -> None:
    from pkvm.check.explore import SCENARIOS, explore

    r = explore(_make(bugs=(bug,)), SCENARIOS[name][1], bound=2, max_runs=50)
    assert r.findings and expect in (r.findings[0].finding or "")
