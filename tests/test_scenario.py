"""Scenario files: parsing, errors with file:line, running, expectations, dump/load round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

import pkvm
from pkvm import scenario
from pkvm.testing import strategies as pst

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("name", ["share_hyp", "protected_vm", "carveout"])
def test_examples_hold(name):
    result = scenario.load(EXAMPLES / f"{name}.toml").run()
    assert result.ok, [(f.index, f.expected, f.detail) for f in result.failures]


def test_symbols_and_expectations():
    scn = scenario.loads('''
[machine]
memory = "128M"
[[step]]
alloc = "buf"
pages = 2
[[step]]
hvc = "__pkvm_host_share_hyp"
args = ["page:buf+1"]
expect = { x0 = 0, x1 = 0 }
[[step]]
hvc = "__pkvm_host_share_hyp"
args = ["page:buf+1"]
expect = { errno = "EPERM" }
[[step]]
host_write = { addr = "pa:buf+0x10", data = "0102" }
[[step]]
host_read = "pa:buf+0x10"
size = 2
expect = { data = "0102" }
''', "t.toml")
    m = pkvm.Machine(memory="128M", cpus=2)
    result = scn.run(m)
    assert result.ok
    pfn = result.steps[0].value >> 12
    assert m.inspect.page(pfn + 1).host == "SHARED_OWNED"
    assert m.inspect.page(pfn).host == "OWNED"


def test_failed_expectation_reports_pages():
    scn = scenario.loads('''
[[step]]
hvc = "__pkvm_host_share_hyp"
args = ["page:a"]
[[step]]
hvc = "__pkvm_host_share_hyp"
args = ["page:a"]
expect = { ok = true }
''')
    result = scn.run()
    assert not result.ok
    (fail,) = result.failures
    assert fail.index == 1 and fail.expected == "ok=true" and "EPERM" in fail.detail
    assert fail.pages and fail.pages[0].host == "SHARED_OWNED"


@pytest.mark.parametrize("text, line, words", [
    ('[[step]]\nhvc = "__pkvm_host_shar_hyp"\n', 2, "unknown hypercall"),
    (('[machine]\nmemory="256M"\n\n[[step]]\nhvc = "__kvm_flush_vm_context"\n\n[[step]]\n'
      'hvc = "__pkvm_host_share_hyp"\nargs = ["pfn:a"]\n'), 9, "bad value"),
    ('[[step]]\nhvc = "__pkvm_host_share_hyp"\nexpect = { errno = "EWHAT" }\n', 3, "errno"),
    ('[[step]]\nalloc = "a"\nbogus = 1\n', 3, "unknown key"),
    ('[[step]]\ncpu = 1\n', 1, "exactly one of"),
    ('[[step]]\nhvc = "__pkvm_host_share_hyp"\nargs = [true]\n', 3, "integer"),
    ('[[step\n', 1, "TOML"),
])
def test_errors_name_the_line(text, line, words):
    with pytest.raises(scenario.ScenarioError) as e:
        scenario.loads(text, "s.toml")
    assert e.value.line == line
    assert str(e.value).startswith(f"s.toml:{line}: ")
    assert words in str(e.value)


def test_runtime_scenario_errors():
    with pytest.raises(scenario.ScenarioError, match="no VM named 'v'"):
        scenario.loads('[[step]]\nhvc = "__pkvm_vcpu_load"\nargs = ["vm:v", 0, 0]\n').run()


def test_abort_and_panic_outcomes():
    scn = scenario.loads('''
[machine]
abi = "6.12"
[[step]]
hvc = "__kvm_adjust_pc"
expect = { panic = true }
[[step]]
hvc = "__kvm_flush_vm_context"
expect = { panic = true }
''')
    assert scn.run().ok
    m = pkvm.Machine(memory="128M", cpus=2)
    scn = scenario.loads(f'[[step]]\nhost_read = {m.carveout[0]}\nexpect = {{ abort = true }}\n')
    assert scn.run(m).ok


def test_dump_round_trip(tmp_path):
    path = tmp_path / "repro.toml"
    scenario.dump([(0, "__pkvm_host_share_hyp", [0x40000], {"ok": True}),
                   (1, "__pkvm_host_share_hyp", [0xFFFF_FFFF_FFFF_FFFF]),
                   {"alloc": "a", "pages": 2}], path, machine={"memory": "128M"})
    scn = scenario.load(path)
    assert scn.machine["memory"] == "128M" and len(scn.steps) == 3
    assert scn.steps[1].cpu == 1 and scn.steps[2].action == "alloc"
    result = scn.run()
    assert result.ok
    assert result.steps[1].value.x1 == -22  # -EINVAL: 2^64-1 reached the hyp intact
    scenario.dump(scn.steps, tmp_path / "again.toml")
    assert [s.as_table() for s in scenario.load(tmp_path / "again.toml").steps] == \
        [s.as_table() for s in scn.steps]


# -- the library API for tests: pytest plugin and Hypothesis strategies -------------------------


@pytest.mark.parametrize("pkvm_abi", ["6.12", "latest"])
def test_plugin_fixture(pkvm_machine, pkvm_abi):
    assert pkvm_machine.abi == ("6.12" if pkvm_abi == "6.12" else "latest")
    pfn = pkvm_machine.host.alloc_pages(1) >> 12
    assert pkvm_machine.hvc(0, "__pkvm_host_share_hyp", pfn).ok


@pytest.mark.pkvm(memory="128M", cpus=3)
def test_plugin_marker(pkvm_machine):
    assert pkvm_machine.nr_cpus == 3 and pkvm_machine.mem.size == 128 << 20


def test_interesting_pfns():
    m = pkvm.Machine(memory="256M", cpus=2)
    edges = pst.interesting_pfns("256M", 2, "latest")
    assert m.carveout[0] >> 12 in edges and 0xFFF0_0000_0004_0000 in edges
    assert (m.mem.end >> 12) - 1 in edges and m.mem.end >> 12 in edges


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(calls=pst.call_sequences(abi="latest", max_size=8), pfn=pst.pfns())
def test_strategies_drive_the_model(calls, pfn):
    m = pkvm.Machine(memory="256M", cpus=2, trace=False)
    r = m.hvc(0, "__pkvm_host_share_hyp", pfn)
    assert r.x0 == 0
    for cpu, name, args in calls:
        try:
            m.hvc(cpu, name, *args)
        except pkvm.HypPanic:
            break


# -- bad [machine] values ------------------------------------------------------------------------
@pytest.mark.parametrize("key, value, words", [
    ("abi", 6.12, "must be a string"),
    ("abi", "5.0", "unknown abi '5.0'"),
    ("memory", "1K", "at least 64M"),
    ("memory", "64M+1", "is not a size"),
    ("memory", (64 << 20) + 1, "whole number of 4 KiB pages"),
    ("memory", True, "bytes or a size"),
    ("cpus", "two", "must be an integer"),
    ("cpus", 0, "between 1 and 64"),
    ("cpus", 65, "between 1 and 64"),
    ("check", 1, "true or false"),
])
def test_machine_values_are_checked(key, value, words):
    problem = scenario.machine_value_error(key, value)
    assert problem is not None and words in problem


@pytest.mark.parametrize("key, value", [("abi", "6.12"), ("abi", "latest"), ("abi", "7.2"),
                                        ("memory", "64M"), ("memory", 1 << 30), ("cpus", 64),
                                        ("check", True)])
def test_good_machine_values_pass(key, value):
    assert scenario.machine_value_error(key, value) is None


def test_machine_value_errors_name_their_line():
    with pytest.raises(scenario.ScenarioError) as e:
        scenario.loads('# c\n[machine]\nabi = "latest"\ncpus = "two"\n\n[[step]]\nalloc = "a"\n',
                       "f.toml")
    assert e.value.line == 4 and "cpus must be an integer" in str(e.value)


def test_non_utf8_and_empty_files_are_scenario_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'[[step]]\nnote = "caf\xe9"\nalloc = "a"\n')
    with pytest.raises(scenario.ScenarioError) as e:
        scenario.load(bad)
    assert e.value.line == 2 and "not a text file" in str(e.value)
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    with pytest.raises(scenario.ScenarioError, match="no steps"):
        scenario.load(empty)


def test_steps_after_a_failed_create_vm_are_not_run():
    scn = scenario.loads('[machine]\nabi = "6.12"\n\n[[step]]\ncreate_vm = "g"\nprotected = true\n'
                         '\n[[step]]\nmap = "g"\nexpect = { ok = true }\n\n[[step]]\n'
                         'hvc = "__pkvm_teardown_vm"\nargs = ["vm:g"]\n', "f.toml")
    r = scn.run()
    assert [s.outcome for s in r.steps] == ["errno", "not run", "not run"]
    assert [s.passed for s in r.steps] == [None, False, None]
    assert "its create_vm (step 1) failed" in r.steps[1].detail


def test_a_call_without_a_result_is_not_a_value():
    scn = scenario.loads('[[step]]\ncreate_vm = "g"\nvcpus = 1\n\n[[step]]\n'
                         'hvc = "__pkvm_vcpu_load"\nargs = ["vm:g", 0, 0]\nexpect = { ok = true }\n')
    r = scn.run()
    assert r.ok and r.steps[1].outcome == "ok" and "x1 left as passed" in r.steps[1].detail
