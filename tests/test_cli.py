"""The `pkvm` command line: every command, its outputs and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pkvm.cli.main import app

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    """Output without rich's box characters and line wrapping."""
    return " ".join(text.replace("│", " ").split())


def test_help_lists_commands():
    r = invoke("--help")
    assert r.exit_code == 0
    for cmd in ("demo", "run", "map", "trace"):
        assert cmd in r.output
    for cmd in ("demo", "run", "map", "trace"):
        assert invoke(cmd, "--help").exit_code == 0


@pytest.mark.parametrize("abi", ["latest", "6.12"])
def test_demo(abi):
    r = invoke("demo", "--abi", abi, "--memory", "256M")
    assert r.exit_code == 0, r.output
    assert "refused ✓" in r.output and "ALLOWED" not in r.output
    assert "page counts after teardown equal those after boot" in flat(r.output)
    if abi == "latest":
        assert "HostDataAbort" in r.output and "-EINVAL" in r.output


def test_demo_bad_abi():
    assert invoke("demo", "--abi", "5.0").exit_code == 2


def test_run_ok():
    r = invoke("run", EXAMPLES / "share_hyp.toml")
    assert r.exit_code == 0, r.output
    assert "OK" in r.output and "-EPERM" in r.output


def test_run_failed_expectation(tmp_path):
    f = tmp_path / "f.toml"
    f.write_text('[[step]]\nhvc = "__pkvm_host_share_hyp"\nargs = ["page:a"]\n'
                 'expect = { errno = "EPERM" }\n')
    r = invoke("run", f)
    assert r.exit_code == 1
    out = flat(r.output)
    assert "expected -EPERM got ok" in out and "SHARED_OWNED" in out.replace(" ", "")


def test_run_scenario_error(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('[machine]\nmemory = "256M"\n\n[[step]]\nhvc = "no_such_call"\n')
    r = invoke("run", f)
    assert r.exit_code == 2
    assert f"{f}:5:" in r.output.replace("\n", "")
    assert "unknown hypercall" in flat(r.output)
    assert invoke("run", tmp_path / "missing.toml").exit_code == 2


def test_trace_outputs(tmp_path):
    jl, pf = tmp_path / "t.jsonl", tmp_path / "t.json"
    r = invoke("trace", EXAMPLES / "protected_vm.toml", "--jsonl", jl, "--perfetto", pf)
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in jl.read_text().splitlines()]
    assert any(x["call"] == "__pkvm_host_donate_guest" for x in lines)
    ev = json.loads(pf.read_text())["traceEvents"]
    assert sum(e["ph"] == "X" for e in ev) == len(lines)
    assert any(e["ph"] == "C" for e in ev)


def test_map_before_after(tmp_path):
    png, html = tmp_path / "m.png", tmp_path / "m.html"
    r = invoke("map", EXAMPLES / "share_hyp.toml", "--png", png, "--html", html, "--before")
    assert r.exit_code == 0, r.output
    for p in (png, html, tmp_path / "m.before.png", tmp_path / "m.before.html"):
        assert p.stat().st_size > 1000


def test_map_fresh_and_usage(tmp_path):
    png = tmp_path / "fresh.png"
    assert invoke("map", "--png", png, "--memory", "128M").exit_code == 0
    assert png.exists()
    assert invoke("map").exit_code == 2


# -- every bad input is one line and exit 2 ------------------------------------------------------
def one_error_line(r, code: int = 2) -> str:
    """The command exited `code` with exactly one line on stderr, and no traceback."""
    assert r.exit_code == code, r.output
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in r.output
    return lines[0]


def scenario_file(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    f = tmp_path / name
    f.write_text(text)
    return f


STEP = '\n[[step]]\nhvc = "__pkvm_host_share_hyp"\nargs = ["page:a"]\n'


@pytest.mark.parametrize("args, words", [
    (["demo", "--pages", "0"], "--pages 0: must be at least 1"),
    (["demo", "--pages", "-3"], "--pages -3"),
    (["demo", "--pages", "5000"], "at most 4096 pages"),
    (["demo", "--cpus", "0"], "--cpus 0"),
    (["demo", "--cpus", "1"], "at least 2 CPUs"),
    (["demo", "--abi", "5.0"], "--abi 5.0: unknown abi"),
    (["demo", "--memory", "1K"], "--memory 1K: memory must be at least 64M"),
    (["demo", "--memory", "lots"], "is not a size"),
    (["demo", "--jsonl", "/nonexistent/dir/t.jsonl"], "directory /nonexistent/dir does not exist"),
    (["fuzz", "--abi", "5.0"], "--abi 5.0"),
    (["fuzz", "--memory", "1K"], "--memory 1K"),
    (["fuzz", "--cpus", "0"], "--cpus 0"),
    (["fuzz", "--steps", "-5"], "--steps -5: must be at least 1"),
    (["fuzz", "--bug", "nope"], "--bug nope: unknown seeded bug"),
    (["fuzz", "--out", "/nonexistent/r.toml"], "--out /nonexistent/r.toml"),
    (["explore", "share-unshare", "--bound", "-1"], "--bound -1: must be at least 0"),
    (["explore", "share-unshare", "--max-runs", "0"], "--max-runs 0"),
    (["explore", "share-unshare", "--abi", "5.0"], "--abi 5.0"),
    (["explore", "no-such-scenario"], "unknown scenario"),
    (["map", "--cpus", "0", "--png", "x.png"], "--cpus 0"),
    (["map", "--png", "/nonexistent/dir/x.png"], "--png /nonexistent/dir/x.png: directory"),
    (["map", "--png", "x.png", "--at", "1"], "--at 1: needs a SCENARIO"),
    (["map", EXAMPLES / "share_hyp.toml", "--png", "x.png", "--at", "0"], "--at 0"),
    (["map", EXAMPLES / "share_hyp.toml", "--png", "x.png", "--at", "999"], "steps"),
    (["map"], "say where to draw"),
    (["trace", EXAMPLES / "share_hyp.toml", "--every", "0"], "--every 0"),
    (["trace", EXAMPLES / "share_hyp.toml", "--every", "-3"], "--every -3"),
    (["trace", EXAMPLES / "share_hyp.toml", "--perfetto", "/nonexistent/x.json"],
     "--perfetto /nonexistent/x.json"),
    (["run", EXAMPLES / "share_hyp.toml", "--abi", "5.0"], "--abi 5.0: unknown abi"),
    (["run", EXAMPLES / "share_hyp.toml", "--jsonl", "/nonexistent/t.jsonl"], "--jsonl"),
    (["run-guest", "hello", "--initrd", "/nonexistent.cpio"], "--initrd /nonexistent.cpio"),
    (["run-guest", "hello", "--memory", "0"], "--memory 0"),
    (["run-guest", "hello", "--vcpus", "0"], "--vcpus 0"),
    (["run-guest", "hello", "--abi", "5.0"], "--abi 5.0"),
    (["run-guest", "hello", "--param", "3"], "--param"),
    (["run-guest", "hello", "--protected", "--abi", "6.12"], "has no protected VMs"),
    (["run-guest", "smp", "--vcpus", "1"], "the smp guest needs 2 vCPUs"),
    (["run-guest", "share", "--abi", "6.12"], "the share guest needs a protected VM"),
    (["run-guest", "share", "--no-protected"], "needs a protected VM"),
    (["run-guest", "/nonexistent.bin"], "no such file and not a built-in guest"),
    (["conform", "--kernel", "5"], "--kernel 5"),
    (["conform", "/nonexistent.toml"], "cannot read the scenario"),
])
def test_bad_option_is_one_line_and_exit_2(args, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_error_line(invoke(*args))
    assert words in line, line


def test_machine_too_big_for_this_host_says_so(monkeypatch):
    import pkvm.machine.memory as memory

    def no_memory(*a, **k):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(memory.mmap, "mmap", no_memory)
    line = one_error_line(invoke("demo", "--memory", "32G"))
    assert "cannot reserve 32 GiB of RAM for the machine (this host has" in line
    assert "--memory" in line


@pytest.mark.parametrize("text, words, lineno", [
    (b"\xff\xfe[machine]\n", "not a text file", 1),
    (b"", "no steps", None),
    (b'[machine]\nmemory = "256M"\n', "no steps", None),
    (b'[machine]\nmemroy = "256M"\n' + STEP.encode(), "unknown [machine] key 'memroy'", 2),
    (b'[machine]\ncpus = 2\nmemory = "1M"\n' + STEP.encode(), "[machine] memory must be at least", 3),
    (b'[machine]\ncpus = "two"\n' + STEP.encode(), "cpus must be an integer, not 'two'", 2),
    (b'[machine]\nabi = 6.12\n' + STEP.encode(), 'abi must be a string such as "6.12"', 2),
    (b'[machine]\nabi = "5.0"\n' + STEP.encode(), "unknown abi '5.0'", 2),
    (b'[machine]\ncheck = "yes"\n' + STEP.encode(), "check must be true or false", 2),
    (b'[machine]\n[other]\n' + STEP.encode(), "expected only [machine] and [[step]] tables", None),
])
def test_scenario_mistakes_name_file_and_line(tmp_path, text, words, lineno):
    f = tmp_path / "abi.toml"
    f.write_bytes(text)
    line = one_error_line(invoke("run", f))
    assert words in line, line
    assert line.startswith(f"error: {f}:{lineno}: " if lineno else f"error: {f}: "), line
    assert "not supported between" not in line


def test_command_line_abi_is_blamed_on_the_option(tmp_path):
    line = one_error_line(invoke("run", EXAMPLES / "share_hyp.toml", "--abi", "5.0"))
    assert "share_hyp.toml" not in line and line.startswith("error: --abi 5.0:")


def test_help_keeps_brackets_and_has_no_type_hints_for_flags():
    r = invoke("run", "--help")
    assert "[machine] abi" in flat(r.output)
    assert "<bool>" not in r.output and "{" not in r.output.splitlines()[0]
    assert "run [OPTIONS] SCENARIO" in r.output
    assert "(the message names file:line)" in flat(r.output)  # reflowed, not cut mid-sentence
    top = invoke("--help").output
    assert "..." not in top.split("Commands:")[1]  # every command's summary is a whole sentence
    g = invoke("run-guest", "--help")
    assert "run-guest [OPTIONS] IMAGE" in g.output and "<bool>" not in g.output


def test_version_and_python_m_pkvm():
    import subprocess
    import sys

    import pkvm
    from pkvm import _compiled

    r = invoke("--version")
    assert r.exit_code == 0 and r.output.startswith(f"pkvm {pkvm.__version__}, ")
    assert ("compiled with mypyc" in r.output) == bool(_compiled.loaded())
    p = subprocess.run([sys.executable, "-m", "pkvm", "--version"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.startswith(f"pkvm {pkvm.__version__}, ")


def test_closed_pipe_is_not_a_failed_check():
    """`pkvm demo | head -1`: the reader goes away; the exit is SIGPIPE's 141, never 1."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "pkvm", "demo"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    assert p.stdout is not None
    first = p.stdout.readline()
    p.stdout.close()
    _, err = p.communicate(timeout=300)
    assert first.strip()
    assert p.returncode == 141, err
    assert b"Traceback" not in err and b"BrokenPipe" not in err


# -- messages -----------------------------------------------------------------------------------
def test_run_protected_vm_on_6_12_is_a_failed_chain_not_a_usage_error():
    r = invoke("run", EXAMPLES / "protected_vm.toml", "--abi", "6.12")
    assert r.exit_code == 1, r.output
    out = flat(r.output)
    assert "not run VM 'guest' does not exist: its create_vm (step 1) failed" in out
    assert "no VM named" not in out


def test_run_says_x1_is_passed_back_not_a_value():
    r = invoke("run", EXAMPLES / "protected_vm.toml")
    assert r.exit_code == 0, r.output
    load = next(x for x in r.output.splitlines() if "__pkvm_vcpu_load(" in x)
    assert "→ ok x0=0 (x1 left as passed, 0x1000)" in load and "value" not in load


def test_demo_6_12_says_why_once_and_tables_read_at_80_columns(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    r = invoke("demo", "--abi", "6.12", "--memory", "256M")
    assert r.exit_code == 0, r.output
    assert flat(r.output).count("has no protected VM type") == 1
    assert max(len(x) for x in r.output.splitlines()) <= 80
    for call in ("__pkvm_host_share_hyp(0x9000)", "__pkvm_teardown_vm(0x1100)"):
        assert call in r.output  # whole, not broken mid-word
    assert "the hyp's answer" in r.output and "…" not in r.output


def test_fuzz_coverage_reads_at_80_columns(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    r = invoke("fuzz", "--steps", "200", "--out", tmp_path / "r.toml")
    assert r.exit_code == 0, r.output
    assert max(len(x) for x in r.output.splitlines()) <= 80
    assert "__pkvm_host_share_hyp " in r.output and "…" not in r.output
    assert "━" not in r.stderr  # no progress bar when not on a terminal


def test_progress_shows_on_a_terminal_only(monkeypatch):
    import io

    from rich.console import Console

    from pkvm.cli import common

    buf = io.StringIO()
    monkeypatch.setattr(common, "err_console", Console(file=buf, force_terminal=True, width=80))
    seen = []
    with common.progress("exploring demo", 10) as update:
        for i in range(1, 11):
            update(i)
            seen.append(i)
    assert "exploring demo" in buf.getvalue()
    buf2 = io.StringIO()
    monkeypatch.setattr(common, "err_console", Console(file=buf2, force_terminal=True))
    with common.progress("quiet", 10, quiet=True) as update:
        update(5)
    assert buf2.getvalue() == ""


def test_explore_counts_runs_through_the_callback():
    import pkvm
    from pkvm.check.explore import SCENARIOS, explore

    _, setup, _ = SCENARIOS["share-unshare"]
    counts: list[int] = []
    r = explore(lambda: pkvm.Machine(memory="64M", cpus=2, trace=False), setup, bound=1,
                max_runs=5, progress=counts.append)
    assert counts == list(range(1, r.executions + 1))


# -- guests -------------------------------------------------------------------------------------
@pytest.mark.parametrize("data, words", [
    (b"", "the image is empty"),
    (b"\x7fELF\x02\x01\x01" + bytes(64), "ELF file, not a raw image: convert it with"),
    (b"\x1f\x8b\x08" + bytes(64), "gzip-compressed"),
    (b"#!/bin/sh\necho hello\n", "looks like text"),
    (bytes(4096), "its first word 0x00000000 is no AArch64 instruction"),
    (bytes.fromhex("6e4970a7") + bytes(60), "is no AArch64 instruction"),
])
def test_run_guest_recognises_what_is_not_a_guest(tmp_path, data, words):
    f = tmp_path / "img.bin"
    f.write_bytes(data)
    assert words in one_error_line(invoke("run-guest", f))


def test_guest_exception_to_an_unset_vector_is_said_in_words(tmp_path):
    f = tmp_path / "brk.bin"
    f.write_bytes(bytes.fromhex("000020d4"))  # brk #0: a synchronous exception at EL1
    r = invoke("run-guest", f)
    assert r.exit_code == 1
    assert "took a synchronous exception from the current EL with SP_ELx" in flat(r.stderr)
    assert "VBAR_EL1 + 0x200" in r.stderr


@pytest.mark.parametrize("name, args, console, shows", [
    ("share", [], "share: hello through a shared page", "MEM_SHARE"),
    ("smp", [], "smp: vCPU 0 saw vCPU 1 report", "CPU_ON"),
    ("oob", [], "oob: read 0x0000000000000000", "past its RAM"),
    ("loop", ["--param", "1000"], "", "compute loop"),
    ("memwalk", ["--param", "1"], "memwalk: OK", "first touch"),
])
def test_builtin_guests_get_what_they_need_and_say_what_they_show(name, args, console, shows):
    r = invoke("run-guest", name, *args)
    assert r.exit_code == 0, r.output
    assert console in r.stdout and "FAIL" not in r.stdout
    assert shows in flat(r.stderr)


def test_a_guest_that_prints_fail_exits_1(tmp_path):
    from pkvm import guests

    # memwalk over more MiB than the guest has: it faults past RAM and prints FAIL
    r = invoke("run-guest", "memwalk", "--param", "64", "--memory", "16M")
    if "FAIL" in r.stdout:
        assert r.exit_code == 1
        assert "the guest reported a failure" in r.stderr
    else:  # the walk past RAM ended the run another way: still not a success
        assert r.exit_code == 1, r.output
    assert guests.NAMES


def test_square_brackets_in_names_and_messages_print_as_written(tmp_path):
    f = tmp_path / "[bold]x[red].toml"
    f.write_text('[machine]\nmemroy = "256M"\n' + STEP)
    line = one_error_line(invoke("run", f))
    assert "[bold]x[red].toml:2: unknown [machine] key 'memroy'" in line
    ok = tmp_path / "[v].toml"
    ok.write_text(STEP)
    r = invoke("run", ok)
    # the console may wrap a long temporary path: read the output as one line
    assert r.exit_code == 0 and "[v].toml" in r.output.replace("\n", "")
