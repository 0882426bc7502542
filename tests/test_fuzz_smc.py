"""`pkvm fuzz --smc` and `pkvm explore` with host SMCs; the FF-A ghost and the FF-A owner."""

from __future__ import annotations

import random
import struct
import tomllib

import pytest

import pkvm
from pkvm.abi.ffa import FFA_ERROR, FFA_RET_DENIED, FFA_SUCCESS
from pkvm.check.ffa_ops import FfaHost, mem_descriptor
from pkvm.check.fuzz import Campaign, execute, generate, replay
from pkvm.check.oracles import NoWarn, excused_warns

MEM, CPUS = "64M", 2
ABIS = ["6.12", "latest"]


def _smc_steps(abi: str, seed: int, n: int):
    prof = pkvm.Machine(memory=MEM, cpus=CPUS, abi=abi, trace=False).profile
    return generate(random.Random(seed), prof, CPUS, n, smc=True)


def test_smc_steps_are_opt_in() -> None:
    """Without `smc` the generator draws exactly what it drew before (pinned seeds stay)."""
    prof = pkvm.Machine(memory=MEM, cpus=CPUS, trace=False).profile
    plain = generate(random.Random(5), prof, CPUS, 300)
    assert not any(s.op.startswith("smc_") for s in plain)
    mixed = _smc_steps("latest", 5, 300)
    assert {s.op for s in mixed} >= {"smc_ffa", "smc_psci"}


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("seed", [0, 1])
def test_clean_model_survives_hostile_smcs(abi: str, seed: int) -> None:
    r = execute(_smc_steps(abi, seed, 500), MEM, CPUS, abi, smc=True)
    assert r.failure is None, str(r.failure)
    smcs = {(name, res): n for (name, res), n in r.calls.items() if name.startswith("smc:")}
    assert sum(smcs.values()) > 50
    assert any(name.startswith("smc:psci:") for name, _ in smcs)
    # the memory paths are reached, accepted and refused
    xfer = {res for (name, res) in smcs if name in ("smc:ffa:0xc4000073", "smc:ffa:0xc4000072")}
    assert "FFA_SUCCESS" in xfer and "FFA_ERROR -6" in xfer and "FFA_ERROR -2" in xfer


def test_smc_campaign_shrinks_and_replays(tmp_path) -> None:
    """A finding in an SMC run shrinks to a few steps, and its reproducer (with `smc` steps and
    a secure world in [machine]) replays it; the clean model passes the same steps."""
    out = tmp_path / "repro.toml"
    res = Campaign(seed=0, steps=400, abi="latest", bugs=("ffa-unaligned-range",),
                   out=str(out), smc=True).run()
    assert res.found and res.minimal is not None and len(res.minimal) <= 4, res.minimal
    assert res.minimal_failure is not None
    assert res.minimal_failure.signature == "invariant:ghost"
    doc = tomllib.loads(out.read_text())
    assert doc["machine"]["ffa"] is True
    assert any("smc" in st for st in doc["step"])
    again = replay(doc["machine"], doc["step"], bugs=("ffa-unaligned-range",))
    assert again is not None and again.signature == "invariant:ghost"
    clean = replay(doc["machine"], doc["step"])  # (may end at the kernel's own frag_tx WARN)
    assert clean is None or clean.signature != "invariant:ghost", clean
    from pkvm import scenario

    assert scenario.load(str(out)).run().ok  # `pkvm run` reads it too


# -- the ghost of the FF-A proxy ---------------------------------------------------------------
def _ready(abi: str) -> tuple[pkvm.Machine, FfaHost]:
    m = pkvm.Machine(memory=MEM, cpus=CPUS, abi=abi, ffa=True, check=True, trace=False)
    f = FfaHost(m)
    assert f.negotiate(m.profile.ffa_hyp_version) > 0
    assert f.map_mailbox().regs[0] == FFA_SUCCESS
    return m, f


@pytest.mark.parametrize("abi", ABIS)
def test_ghost_predicts_share_lend_reclaim(abi: str) -> None:
    m, f = _ready(abi)
    ghost = m.checker.ghost.ffa
    a, b = m.host.alloc_pages(2), m.host.alloc_pages(1)
    before = ghost.predicted
    assert f.share([(a, 2)]).regs[0] == FFA_SUCCESS
    assert f.share([(b, 1)], lend=True).regs[0] == FFA_SUCCESS  # lent: shared as well
    assert sorted(ghost.transactions.values()) == sorted([[(a >> 12, 2)], [(b >> 12, 1)]])
    assert m.inspect.page(b >> 12).host == "SHARED_OWNED"
    r = f.share([(a, 1)])  # already shared: DENIED, nothing changes
    assert (r.regs[0], r.x2) == (FFA_ERROR, FFA_RET_DENIED)
    for h in list(f.handles):
        assert f.reclaim(h).regs[0] == FFA_SUCCESS
    assert ghost.transactions == {} and m.inspect.page(a >> 12).host == "OWNED"
    assert ghost.predicted - before == 5
    m.checker.check_all()


@pytest.mark.parametrize("abi", ABIS)
def test_full_check_knows_the_pinned_mailbox(abi: str) -> None:
    """The host's FF-A mailbox is pinned by EL2 (RXTX_MAP): the pin invariant counts it (before,
    a full check after RXTX_MAP reported pin-refcount), and RXTX_UNMAP releases it."""
    m, f = _ready(abi)
    m.checker.check_all()
    assert m.smc(0, "FFA_RXTX_UNMAP", 0).regs[0] == FFA_SUCCESS
    m.checker.check_all()


def test_full_check_finds_a_page_shared_with_no_borrower() -> None:
    """The FF-A owner at a full check: a host SHARED_OWNED page nobody borrows is reported."""
    from pkvm.check.ghost_ffa import check_owner_full
    from pkvm.check.invariants import InvariantViolation

    m, f = _ready("latest")
    page = m.host.alloc_pages(1)
    assert f.share([(page, 1)]).regs[0] == FFA_SUCCESS
    check_owner_full(m.inspect, m.firmware)
    m.firmware.spmc.transactions.clear()  # the secure world forgets it (hardware side)
    with pytest.raises(InvariantViolation, match="no hyp, guest or secure-world borrower"):
        check_owner_full(m.inspect, m.firmware)


# -- scenario files and the explorer -----------------------------------------------------------
def test_scenario_smc_steps(tmp_path) -> None:
    from pkvm import scenario

    path = tmp_path / "ffa.toml"
    path.write_text("""
[machine]
memory = "64M"
ffa = true
check = true

[[step]]
smc = "FFA_ID_GET"
expect = { x0 = 0x84000060, x2 = -2 }
note = "before FFA_VERSION: INVALID_PARAMETERS"

[[step]]
smc = "FFA_VERSION"
args = [0x10001]

[[step]]
alloc = "tx"

[[step]]
alloc = "rx"

[[step]]
smc = "FFA_RXTX_MAP"
args = ["pa:tx", "pa:rx", 1]
expect = { x0 = 0x84000061 }
""")
    res = scenario.load(str(path)).run()
    assert res.ok, [str(s.detail) for s in res.steps]
    assert res.machine.inspect.ffa_proxy()["host_tx"]


def _race_text(desc_hex: str) -> str:
    return f"""
[machine]
memory = "64M"
cpus = 2
ffa = true

[[step]]
alloc = "tx"

[[step]]
alloc = "rx"

[[step]]
alloc = "x"

[[step]]
smc = "FFA_VERSION"
args = [0x10001]

[[step]]
smc = "FFA_RXTX_MAP"
args = ["pa:tx", "pa:rx", 1]

[[step]]
host_write = "pa:tx"
data = "{desc_hex}"

[[step]]
smc = "FFA_MEM_SHARE"
args = [{len(desc_hex) // 2}, {len(desc_hex) // 2}, 0, 0]

[[step]]
hvc = "__pkvm_host_share_hyp"
args = ["page:x"]
cpu = 1
"""


@pytest.mark.parametrize("abi", ABIS)
def test_explore_interleaves_an_ffa_share_with_a_hyp_share(tmp_path, abi: str) -> None:
    """One page shared with the secure world (FF-A, cpu 0) and with the hyp (HVC, cpu 1) at the
    same time: every interleaving at every preemption point keeps the invariants (FF-A owner
    included) and is linearizable; exactly one of the two shares wins."""
    from pkvm.check.explore import explore, from_file

    path = tmp_path / "race.toml"
    path.write_text(_race_text("00" * 16).replace('memory = "64M"', f'memory = "64M"\nabi = "{abi}"'))
    make, setup, _ = from_file(str(path))
    pfn = setup(make())[1][0][2]  # where `x` is: allocation is deterministic
    version = 0x1_0001
    desc = mem_descriptor(version, [(pfn << 12, 1)])
    path.write_text(_race_text(desc.hex()).replace('memory = "64M"',
                                                   f'memory = "64M"\nabi = "{abi}"'))
    make, setup, _ = from_file(str(path))
    res = explore(make, setup, bound=1, max_runs=400)
    assert res.findings == [], res.findings[0].finding
    assert res.executions > 5
    m = make()
    programs = setup(m)
    from pkvm.check.explore import call

    for c in (0, 1):
        for op in programs[c]:
            if op[0] != "store":
                call(m, c, op)
            else:
                m.host.write(op[1], op[2], cpu=c)
    assert m.inspect.page(pfn).host == "SHARED_OWNED"  # FF-A first: the hyp share was refused
    assert m.inspect.page(pfn).hyp == "NOPAGE"
    assert struct.unpack_from("<I", desc, 28)[0] == 1


def test_cli_fuzz_smc() -> None:
    from typer.testing import CliRunner

    from pkvm.cli.main import app

    r = CliRunner().invoke(app, ["fuzz", "--smc", "--steps", "80", "--seed", "3", "-q",
                                 "--no-coverage", "--out", "/dev/null"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "of them host SMCs" in text and text.endswith("clean")


def test_scenario_ffa_key_and_explore_imm_are_checked(tmp_path) -> None:
    from pkvm import scenario
    from pkvm.check.explore import from_file

    bad = tmp_path / "bad.toml"
    bad.write_text('[machine]\nffa = 1\n\n[[step]]\nsmc = "FFA_VERSION"\n')
    with pytest.raises(scenario.ScenarioError, match="ffa .* must be true or false"):
        scenario.load(str(bad))
    bad.write_text('[[step]]\nsmc = "FFA_NOPE"\n')
    with pytest.raises(scenario.ScenarioError, match="unknown SMC"):
        scenario.load(str(bad))
    bad.write_text('[[step]]\nsmc = "FFA_VERSION"\nimm = 3\n')
    assert scenario.load(str(bad)).run().ok  # `pkvm run` issues `smc #3`
    with pytest.raises(scenario.ScenarioError, match="immediate 0"):
        from_file(str(bad))


def test_unshare_hyp_of_an_ffa_page_warns_in_6_12() -> None:
    """Found by `pkvm fuzz --smc` (6.12): `__pkvm_host_unshare_hyp` of a page the host shared
    with FF-A passes 6.12's checks (the hyp side is not checked for host-initiated transitions
    without CONFIG_NVHE_EL2_DEBUG) and WARNs in `do_unshare` when the hyp unmap finds nothing;
    before, the model returned -EFAULT. A kernel WARN the host reaches: counted, not a finding.
    7.2 checks the hyp state (SHARED_BORROWED) and refuses with -EPERM."""
    for abi in ABIS:
        m, f = _ready(abi)
        page = m.host.alloc_pages(1)
        assert f.share([(page, 1)]).regs[0] == FFA_SUCCESS
        if abi == "latest":
            assert m.hvc(0, "__pkvm_host_unshare_hyp", page >> 12).x1 == -1  # -EPERM
            continue
        with pytest.raises(pkvm.HypPanic) as e:
            m.hvc(0, "__pkvm_host_unshare_hyp", page >> 12)
        assert e.value.warn and "WARN_ON in do_unshare" in e.value.reason
        assert excused_warns(m.inspect) == {"unshare-hyp-ffa-page": 1}
        assert NoWarn.violations(m.inspect) == []
