"""Host SMC conformance (`pkvm.conform.smc`): x0..x17 of the same SMCs on the real kernels and
the model. The tests marked ``conform`` boot QEMU; the rest check the harness offline."""

from __future__ import annotations

import os

import pytest

from pkvm.conform import smc as S
from pkvm.conform.real import SetupError, ensure_setup


def test_calls_load_markers_and_never_power_down():
    calls = S.fixed_calls() + S.random_calls(7, 300)
    for c in calls:
        assert len(c.regs) == 18 and c.regs[8:] == S.MARKERS
        assert (c.regs[0] & 0xFFFF_FFFF) not in S.POWER_DOWN
        assert c.command().split()[:3] == ["smc", str(c.cpu), hex(c.imm)]
        assert len(c.command().split()) == 3 + 18
    assert S.random_calls(7, 50) == S.random_calls(7, 50)
    assert S.random_calls(7, 50) != S.random_calls(8, 50)
    rnd = S.random_calls(3, 400)
    assert {c.imm for c in rnd} == {0, 1, 0xFFFF}
    assert any(c.regs[0] >> 32 for c in rnd) and {c.cpu for c in rnd} == {0, 1}
    with pytest.raises(ValueError):
        S.call(0x8400_0002)  # CPU_OFF
    with pytest.raises(ValueError):
        S.call(0x8400_0000, imm=2)


@pytest.mark.parametrize("kernel", ["6.12", "7.2"])
def test_compare_sees_every_register(kernel):
    """A difference in any one of x0..x17 is a difference; equal answers agree."""
    calls = S.fixed_calls()[:3]
    model = S.run_model(kernel, calls)
    assert S.compare(kernel, calls, list(model)).differences == []
    for i in range(18):
        real = list(model)
        regs = list(real[1])
        regs[i] ^= 1
        real[1] = tuple(regs)
        diffs = S.compare(kernel, calls, real).differences
        assert len(diffs) == 1 and f"x{i} real" in diffs[0]
    real = list(model)
    real[2] = "machine died: x"
    assert len(S.compare(kernel, calls, real).differences) == 1


def test_model_answers_as_the_door_routes():
    """Spot checks of the model side against the door's routes (both kernels, no FF-A)."""
    calls = [S.call(S.PSCI_VERSION, *S.ARGS_11_77), S.call(S.FFA_ID_GET, *S.ARGS_11_77),
             S.call(S.PSCI_VERSION, imm=1), S.call(S.AFF64, 0x7E46, 0xFFF)]
    old, new = S.run_model("6.12", calls), S.run_model("7.2", calls)
    assert old[0][:8] == (0x10001, 0, 0, 0, 0x44, 0x55, 0x66, 0x77) and old[0][8:] == S.MARKERS
    assert old[1][:3] == (0x8400_0060, 0, (-2) & S.U64) and old[1][4:8] == (0x44, 0x55, 0x66, 0x77)
    assert new[1][:3] == (0x8400_0060, 0, (-2) & S.U64) and new[1][4:] == (0,) * 14
    assert old[2][0] == 0x10001 and new[2][0] == S.U64 and new[2][8:] == S.MARKERS
    # QEMU's AFFINITY_INFO: any level above 0 is on, whatever the target (measured on both)
    assert old[3][0] == new[3][0] == 0


def _setup_or_fail(kernel: str) -> None:
    """Set the real side up, or FAIL (a set-up failure is a failure), unless the user asked for
    the real-kernel tests to be optional (PKVM_CONFORM_OPTIONAL=1), as test_conform_real does."""
    try:
        ensure_setup(kernel, progress=False)
    except SetupError as e:
        why = f"real {kernel} kernel harness cannot be set up here: {e}"
        if os.environ.get("PKVM_CONFORM_OPTIONAL") == "1":
            pytest.skip(why)
        pytest.fail(why + " (deselect with -m 'not conform', or PKVM_CONFORM_OPTIONAL=1 to skip)")


@pytest.mark.conform
@pytest.mark.parametrize("kernel", ["6.12", "7.2"])
def test_real_smc_agree(kernel):
    """Every measured SMC and 40 seeded hostile ones: x0..x17 equal on both sides."""
    _setup_or_fail(kernel)
    rep = S.compare(kernel, S.fixed_calls() + S.random_calls(1, 40))
    print(rep.summary())
    assert rep.differences == []
