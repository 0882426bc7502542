"""Guest conformance: every built-in guest under the real KVM and in the model, exit by exit.

The ``conform`` tests run each kernel's guests on restored QEMU machines (four each, one VM
after the other) and compare every exit of every vCPU with the model's; the rest check the comparison's
own pieces offline.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pkvm import guests
from pkvm.cli.main import app
from pkvm.conform.guest import (
    CHUNK,
    NISV_SEA,
    PROBE_SYSREGS,
    SYSREG_VALUE,
    GuestRun,
    _image_commands,
    compare,
    device_read,
    diverges,
    guest_spec,
    known_counts,
    run_model,
    run_real_many,
)
from test_conform_real import setup_or_skip

EINVAL = 22
CASES = [(k, g, p) for k in ("6.12", "7.2") for g in guests.NAMES for p in (False, True)]
PROBES = [("6.12", "probe", False), ("6.12", "probe", True), ("7.2", "probe", False),
          ("7.2", "probe", True)]
_REAL: dict[str, dict[tuple[str, bool], GuestRun]] = {}


def real_runs(kernel: str) -> dict[tuple[str, bool], GuestRun]:
    if kernel not in _REAL:
        setup_or_skip(kernel)
        todo = [(g, p) for k, g, p in CASES + PROBES if k == kernel]
        _REAL[kernel] = dict(zip(todo, run_real_many(kernel, todo), strict=True))
    return _REAL[kernel]


@pytest.mark.conform
@pytest.mark.xdist_group("guest")
@pytest.mark.parametrize(("kernel", "guest", "protected"), CASES,
                         ids=[f"{k}-{g}{'-protected' if p else ''}" for k, g, p in CASES])
def test_guest_exits_agree(kernel: str, guest: str, protected: bool) -> None:
    real = real_runs(kernel)[(guest, protected)]
    model = run_model(kernel, guest, protected)
    # only the idregs guest prints ID register values, where the CPUs differ (SYSREG_VALUE)
    rows = compare(model, real, (kernel, guest, protected) if guest == "idregs" else None)
    bad = [r for r in rows if not r.agree and r.known is None]
    assert not bad, f"{len(bad)} of {len(rows)} rows differ, first: {bad[:5]}"
    assert {r.known for r in rows if r.known} <= {SYSREG_VALUE}
    if protected and kernel == "6.12":  # 6.12 has no protected VM type
        assert (real.x0, real.at) == (-EINVAL, "KVM_CREATE_VM")
        return
    assert real.x0 == 0 and real.stop == "shutdown"
    if guest not in ("loop", "mmio"):
        assert real.console.endswith("\n")
        assert "FAIL" not in real.console or (guest == "share" and not protected)
    if guest == "share":  # a normal VM's host KVM does not offer pKVM's guest calls
        assert ("FAIL" in real.console) != protected


@pytest.mark.conform
@pytest.mark.xdist_group("guest")
@pytest.mark.parametrize(("kernel", "guest", "protected"), PROBES,
                         ids=[f"{k}{'-protected' if p else ''}" for k, _, p in PROBES])
def test_probe_agrees_but_for_known_rows(kernel: str, guest: str, protected: bool) -> None:
    """The probe guest's PSCI/SMCCC/pKVM answers agree; what differs is narrowly known."""
    real = real_runs(kernel)[(guest, protected)]
    rows = compare(run_model(kernel, guest, protected), real, (kernel, guest, protected))
    bad = [r for r in rows if not r.agree and r.known is None]
    assert not bad, f"{len(bad)} rows differ unexplained, first: {bad[:5]}"
    counts = known_counts(rows)
    print(f"{kernel} probe{' protected' if protected else ''}: known rows {counts}")
    if protected and kernel == "6.12":
        assert real.x0 == -EINVAL and not counts
        return
    assert "psci_version=" in real.console and "hyp_meminfo=" in real.console
    assert set(counts) == ({SYSREG_VALUE, NISV_SEA} if protected else {SYSREG_VALUE})
    for r in rows:
        if r.known == SYSREG_VALUE:
            assert r.model_line.split("=")[0] in PROBE_SYSREGS
    if protected:
        assert counts[NISV_SEA] == 2 and real.stop == "timeout"


@pytest.mark.conform
def test_cli_guest_side_by_side() -> None:
    setup_or_skip("7.2")
    r = CliRunner().invoke(app, ["conform", "--guest", "oob", "--kernel", "7.2"])
    assert r.exit_code == 0, r.output
    assert "mr 100000000 8 0" in r.output
    assert re.search(r"(\d+)/\1 rows agree", r.output)


# --- offline -------------------------------------------------------------------------------------


def test_model_hello_and_protected_on_6_12() -> None:
    r = run_model("7.2", "hello")
    assert (r.x0, r.stop, r.console) == (0, "shutdown", "Hello from a pKVM guest!\n")
    assert r.exits[0][-1] == "e 1" and r.exits[0][0] == "mw 9000000 1 48"
    r = run_model("6.12", "hello", protected=True)
    assert (r.x0, r.at, r.exits) == (-EINVAL, "KVM_CREATE_VM", [])


def test_compare_shows_every_difference() -> None:
    a = GuestRun(0, "", "shutdown", [["mw 9000000 1 48", "e 1"], []])
    same = GuestRun(0, "", "shutdown", [["mw 9000000 1 48", "e 1"], []])
    assert not diverges(compare(a, same))
    for other in (
        GuestRun(0, "", "shutdown", [["mw 9000000 1 49", "e 1"], []]),  # data
        GuestRun(0, "", "shutdown", [["mw 9000000 1 48"], []]),  # a missing exit
        GuestRun(0, "", "shutdown", [["mw 9000000 1 48", "e 1"], ["mw 9000000 1 a"]]),  # vCPU 1
        GuestRun(0, "", "limit", [["mw 9000000 1 48", "e 1"], []]),  # stop reason
        GuestRun(-EINVAL, "KVM_CREATE_VM", "", []),  # set-up
    ):
        rows = compare(a, other)
        assert diverges(rows) and sum(not r.agree for r in rows) >= 1


def test_image_travels_in_short_lines_without_zero_chunks() -> None:
    data = guests.image("share")  # 8 KiB, the second page all zeros
    cmds = _image_commands(data)
    assert all(len(c) < 4000 for c in cmds)  # a tty line holds 4095 characters
    back = bytearray(len(data))
    for c in cmds:
        _, _, off, hexdata = c.split()
        back[int(off) : int(off) + len(hexdata) // 2] = bytes.fromhex(hexdata)
    assert bytes(back) == data and len(cmds) < len(data) // CHUNK


def test_specs_and_devices(tmp_path: Path) -> None:
    assert guest_spec("smp").vcpus == 2 and guest_spec("hello").vcpus == 1
    assert guest_spec("memwalk").image != guests.image("memwalk")  # patched smaller
    f = tmp_path / "g.bin"
    f.write_bytes(guests.image("hello"))
    assert guest_spec(str(f)).image == guests.image("hello")
    with pytest.raises(ValueError, match="not a built-in guest"):
        guest_spec("nonesuch")
    assert (device_read(0x0900_0018), device_read(0x0900_0FE0), device_read(0x0A00_0000)) == (
        0x90, 0x11, 0)  # fmt: skip


@pytest.mark.conform
def test_docs_guest_section_snippet_runs(capsys: pytest.CaptureFixture[str]) -> None:
    setup_or_skip("7.2")
    text = (Path(__file__).parent.parent / "docs" / "conform.md").read_text()
    section = re.split(r"\n#{2,3} ", text.split("### Guest conformance", 1)[1], maxsplit=1)[0]
    [code] = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    exec(compile(code, "docs/conform.md", "exec"), {})
    assert "share: hello through a shared page at 0x0000000040001000" in capsys.readouterr().out


@pytest.mark.conform
@pytest.mark.xdist_group("guest")
def test_a_wrong_model_diverges(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose PSCI CPU_ON hands the new vCPU a wrong context is caught."""
    from pkvm.host import psci

    real = real_runs("7.2")[("smp", False)]
    right = psci.kvm_psci_vcpu_on
    monkeypatch.setattr(psci, "kvm_psci_vcpu_on",
                        lambda runner, cpu_id, entry, ctx: right(runner, cpu_id, entry, ctx + 1))
    rows = compare(run_model("7.2", "smp"), real)
    bad = [r for r in rows if not r.agree]
    assert [(r.vcpu, r.model, r.real) for r in bad] == [(1, "mw 9000000 1 31", "mw 9000000 1 30")]
