"""The host's SMC door (`handle_host_smc`): the PSCI relay, the FF-A proxy, the forward to EL3.

The table is what the real 6.12 and 7.2 hypervisors answered under QEMU (firmware: QEMU's PSCI
1.1, no SMCCC calls, no FF-A), register by register; the model's firmware is switched the same.
"""

import pytest

import pkvm

M1 = (1 << 64) - 1
FFA_ERROR = 0x8400_0060
MARK = tuple(0x11 * i for i in range(1, 8))  # x1..x7 = 0x11, 0x22 ... 0x77


def _m(abi):
    return pkvm.Machine(memory="256M", cpus=2, abi=abi)


def s64(v):
    return v - (1 << 64) if v >> 63 else v


# (function ID, args, (x0, x1, x2, x3) on 6.12, the same on 7.2 or None for "same", imm)
TABLE = [
    (0x8400_0000, (), (0x10001, 0, 0, 0), None, 0),
    (0x8400_0000, MARK, (0x10001, 0, 0, 0), None, 0),
    (0x8400_000A, (0x8400_0000,), (0, 0, 0, 0), None, 0),
    (0x8400_000A, (0xC400_0003,), (0, 0, 0, 0), None, 0),
    (0x8400_000A, (0xC400_000E,), (-1, 0, 0, 0), None, 0),
    (0x8400_000A, (0xC400_0012,), (-1, 0, 0, 0), None, 0),
    (0x8400_000A, (0x8000_0000,), (-1, 0, 0, 0), None, 0),
    (0x8400_000A, (0x8400_0063,), (-1, 0, 0, 0), None, 0),
    (0x8400_0006, (), (2, 0, 0, 0), None, 0),
    (0xC400_0003, (0x1, 0, 0, 0x44, 0x55, 0x66, 0x77), (-4, 0, 0, 0), None, 0),
    (0xC400_0003, (0x0, 0, 0), (-4, 0, 0, 0), None, 0),
    (0xC400_0003, (0x2, 0, 0), (-2, 0, 0, 0), None, 0),
    (0xC400_0003, (0x100, 0, 0), (-2, 0, 0, 0), None, 0),
    (0xC400_0003, (0x100_0000_0000, 0, 0), (-2, 0, 0, 0), None, 0),
    (0x8400_0003, (0x1,), (-1, 0, 0, 0), None, 0),
    (0x8400_0004, (0x1, 0), (-1, 0, 0, 0), None, 0),
    (0xC400_0004, (0x1, 0), (0, 0, 0, 0), None, 0),
    (0xC400_0004, (0x2, 0), (-2, 0, 0, 0), None, 0),
    (0xC400_0007, (), (-1, 0, 0, 0), None, 0),
    (0x8400_001F, (), (-1, 0, 0, 0), None, 0),
    (0xC400_001F, (), (-1, 0, 0, 0), None, 0),
    (0x8401_0000, (), (-1, 0, 0, 0), None, 0),
    (0x1_8400_0000, (), (0x10001, 0, 0, 0), (-1, 0, 0, 0), 0),
    (0x8400_0000, (), (0x10001, 0, 0, 0), (-1, 0, 0, 0), 1),
    (0x8400_0069, (), (FFA_ERROR, 0, -2, 0), (-1, 0, 0, 0), 0xFFFF),
    (0x8000_0000, (), (-1, 0, 0, 0), None, 0),
    (0x8000_0001, (0x8000_8000,), (-1, 0x8000_8000, 0, 0), None, 0),
    (0x8000_0001, (0x8000_7FFF,), (-1, 0x8000_7FFF, 0, 0), None, 0),
    (0xC300_0000, MARK, (-1, 0x11, 0x22, 0x33), None, 0),
    (0x8200_0000, (), (-1, 0, 0, 0), None, 0),
    (0x8400_0069, MARK, (FFA_ERROR, 0, -2, 0), None, 0),
    (0x8400_0064, (0xC400_0073,), (FFA_ERROR, 0, -2, 0), None, 0),
    (0x8400_0064, (0x8400_0072,), (FFA_ERROR, 0, -2, 0), None, 0),
    (0xC400_0066, (0x4800_0000, 0x4800_1000, 1), (FFA_ERROR, 0, -2, 0), None, 0),
    (0xC400_0066, (0x1, 0x2, 1), (FFA_ERROR, 0, -2, 0), None, 0),
    (0x8400_0066, (0x4800_2000, 0x4800_3000, 1), (FFA_ERROR, 0, -2, 0), None, 0),
    (0x8400_0067, (0,), (FFA_ERROR, 0, -2, 0), None, 0),
    (0x8400_0073, (0x30, 0x30, 0, 0), (FFA_ERROR, 0, -2, 0), None, 0),
    (0xC400_0073, (0x30, 0x30, 0, 0), (FFA_ERROR, 0, -2, 0), None, 0),
    (0x8400_0072, (0x30, 0x30, 0, 0), (FFA_ERROR, 0, -2, 0), None, 0),
    (0xC400_0071, (0x30, 0x30, 0, 0), (FFA_ERROR, 0, -2, 0), None, 0),
    (0x8400_0077, (1, 0, 0), (FFA_ERROR, 0, -2, 0), None, 0),
    (0x8400_0077, (0xFFFF_FFFF, 0xFFFF_FFFF, 0), (FFA_ERROR, 0, -2, 0), None, 0),
    (0x8400_0068, (0, 0, 0, 0, 0), (FFA_ERROR, 0, -2, 0), None, 0),
    (0x8400_007B, (1, 0, 0x10, 0), (FFA_ERROR, 0, -2, 0), None, 0),
    (0x8400_0065, (), (FFA_ERROR, 0, -2, 0), None, 0),
    (0x8400_0060, (), (FFA_ERROR, 0, -2, 0), None, 0),
    (0x8400_0061, (), (FFA_ERROR, 0, -2, 0), None, 0),
    (0x8400_00FF, (), (FFA_ERROR, 0, -2, 0), None, 0),
    (0xC400_00FF, (), (FFA_ERROR, 0, -2, 0), None, 0),
    (0x1_8400_0069, (), (FFA_ERROR, 0, -2, 0), (-1, 0, 0, 0), 0),
    (0x8401_0069, (), (FFA_ERROR, 0, -2, 0), None, 0),
    (0x8400_0063, (0x20000,), (-1, 0, 0, 0), None, 0),
    (0x8400_0063, (0x0,), (-1, 0, 0, 0), None, 0),
    (0x8400_0063, (0x10000,), (-1, 0, 0, 0), None, 0),
    (0x8400_0063, (0x10001, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77), (-1, 0, 0, 0), None, 0),
    (0x8400_0063, (0x10002,), (-1, 0, 0, 0), None, 0),
]


def _regs_after(abi, fid, args, imm):
    m = _m(abi)
    args = tuple(args) + (0,) * (7 - len(args)) + tuple(0x1000 + i for i in range(8, 18))
    return m.smc(0, fid, *args, imm=imm), args


@pytest.mark.parametrize("abi", ["6.12", "latest"])
@pytest.mark.parametrize("fid,args,want612,want72,imm", TABLE,
                         ids=[f"{t[0]:#x}-{i}" for i, t in enumerate(TABLE)])
def test_measured_table(abi, fid, args, want612, want72, imm):
    r, passed = _regs_after(abi, fid, args, imm)
    want = want612 if abi == "6.12" or want72 is None else want72
    assert tuple(s64(x) for x in r.regs[:4]) == want
    # x4..x17 by path (smc.md §1): the relay, 7.2 refusals and EL3 leave them; 7.2's proxy
    # writes x0..x17 (0 in every reply under QEMU); 6.12's proxy writes x0..x3.
    if r.path == "ffa" and abi == "latest":
        assert r.regs[4:] == (0,) * 14
    else:
        assert r.regs[4:] == passed[3:]


@pytest.mark.parametrize("abi", ["6.12", "latest"])
def test_after_failed_negotiation_ffa_still_refused(abi):
    m = _m(abi)
    for v in (0x10000, 0x10001, 0x10002):
        assert m.smc(0, "FFA_VERSION", v).x0 == -1
        r = m.smc(0, "FFA_ID_GET")
        assert (r.regs[0], r.x2) == (FFA_ERROR, -2)
    pa = m.host.alloc_pages(2)
    assert m.smc(0, "FFA_RXTX_MAP", pa, pa + 4096, 1).x2 == -2
    assert m.inspect.page(pa >> 12).host == "OWNED"


@pytest.mark.parametrize("abi", ["6.12", "latest"])
def test_paths_reach_firmware_as_the_kernel_routes_them(abi):
    m = _m(abi)
    fw = m.firmware
    n = len(fw.calls)
    m.smc(0, 0xC400_0003, 0x2, 0, 0)  # refused at EL2: the firmware never hears of it
    m.smc(0, 0x8400_0069)  # FF-A, not negotiated: answered at EL2
    assert len(fw.calls) == n
    m.smc(0, 0x8401_0000)  # PSCI_VERSION with the SVE hint: forwarded with the hint set
    assert fw.calls[-1] == 0x8401_0000
    m.smc(0, 0xC400_0003, 0x1, 0x1234, 0x5678)  # CPU_ON: the entry point is EL2's
    assert fw.calls[-1] == 0xC400_0003


@pytest.mark.parametrize("abi", ["6.12", "latest"])
def test_secondary_cpu_comes_up_through_the_relay(abi):
    """CPU_OFF then CPU_ON: the CPU enters EL2 (its host stage-2 back on) before the host's pc."""
    m = _m(abi)
    hyp_pa = next(r for r in m.memory_map() if r.kind == "hyp").start
    r = m.smc(1, "CPU_OFF")
    assert r.powered_off and m.firmware.power[1] == "off"
    with pytest.raises(ValueError):
        m.hvc(1, "__pkvm_host_share_hyp", 0)
    assert m.smc(0, "AFFINITY_INFO", 1, 0).x0 == 1  # OFF
    r = m.smc(0, "CPU_ON", 1, 0x4008_0000, 0xABCD)
    assert r.x0 == 0 and r.path == "psci"
    assert m.host_entry[1] == (0x4008_0000, 0xABCD)
    assert m.smc(0, "AFFINITY_INFO", 1, 0).x0 == 0
    assert m.smc(0, "CPU_ON", 1, 0, 0).x0 == -4  # ALREADY_ON (the firmware says so)
    # the host stage-2 is on for CPU 1 again: the carve-out is out of its reach
    with pytest.raises(pkvm.HostDataAbort):
        m.host_translate(1, hyp_pa, False)


@pytest.mark.parametrize("abi", ["6.12", "latest"])
def test_cpu_off_loses_el2_state(abi):
    """Without the relay's re-entry the CPU would come back with no host stage-2: the model
    clears a powered-down CPU's EL2 registers, so the test above can fail."""
    m = _m(abi)
    m.smc(1, "CPU_OFF")
    assert m.el2[1].vttbr_el2 == 0
    m.smc(0, "CPU_ON", 1, 0x4008_0000, 0)
    assert m.el2[1].vttbr_el2 == m.el2[0].vttbr_el2 != 0


def test_machine_boots_secondaries_with_cpu_on():
    m = pkvm.Machine(memory="256M", cpus=4)
    cpu_on = [f for f in m.firmware.calls if f == 0xC400_0003]
    assert len(cpu_on) == 3
    assert all(m.host_entry[c][1] == c for c in (1, 2, 3))


@pytest.mark.parametrize("abi", ["6.12", "latest"])
def test_smc_door_with_checker(abi):
    m = pkvm.Machine(memory="256M", cpus=2, abi=abi, check=True)
    for fid in (0x8400_0000, 0x8400_0069, 0x8000_0000, 0xC400_0003, 0x8400_0063):
        m.smc(0, fid, 1, 0, 0)
    assert m.checker is not None


FIDS = [0x8400_0000, 0x8400_0002, 0x8400_0008, 0xC400_0001, 0xC400_0003, 0xC400_000E,
        0x8400_000A, 0x8400_0015, 0x8400_0060, 0x8400_0063, 0xC400_0066, 0x8400_0067,
        0xC400_0073, 0x8400_0077, 0x8400_007B, 0x8000_0000, 0xC600_0000, 0x0, (1 << 64) - 1]


@pytest.mark.parametrize("abi", ["6.12", "latest"])
@pytest.mark.parametrize("ffa", [False, True])
def test_hostile_smcs_never_raise(abi, ffa):
    """Any x0..x17 and immediate: the door answers (CPU_OFF and SYSTEM_OFF excepted from the
    CPUs the test still uses), the checkers hold, no Python exception escapes EL2."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    m = pkvm.Machine(memory="64M", cpus=2, abi=abi, ffa=ffa, check=True)
    u64 = st.one_of(st.integers(0, (1 << 64) - 1), st.sampled_from([0, 1, 0x4000_0000, 0x1000]))

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.sampled_from(FIDS), u64), st.lists(u64, max_size=17),
           st.sampled_from([0, 0, 1, 0xFFFF]))
    def run(fid, args, imm):
        if fid & 0xFFFF_FFFF in (0x8400_0002, 0x8400_0008, 0x8400_0009):
            return  # powering the CPU or the board off ends the test's machine
        r = m.smc(0, fid, *args, imm=imm)
        assert r.path in ("refused", "psci", "ffa", "el3")
        assert m.dead is None

    run()
