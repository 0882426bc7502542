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
