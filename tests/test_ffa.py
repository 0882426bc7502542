"""The FF-A proxy (`nvhe/ffa.c`) against the modelled secure world (`Machine(ffa=True)`)."""

import random

import pytest

import pkvm
from pkvm.abi.ffa import FFA_ERROR, FFA_MEM_FRAG_RX, FFA_SUCCESS
from pkvm.check.ffa_ops import (
    FfaHost,
    attach_ffa_owner_check,
    check_ffa_owner,
    hostile_ffa_op,
    mem_descriptor,
)

ABIS = ["6.12", "latest"]


def _host(abi, check=False):
    m = pkvm.Machine(memory="64M", cpus=2, abi=abi, ffa=True, check=check)
    return m, FfaHost(m)


def _ready(abi, check=False):
    m, f = _host(abi, check)
    assert f.negotiate(0x1_0001 if abi == "6.12" else 0x1_0002) > 0
    assert f.map_mailbox().regs[0] == FFA_SUCCESS
    return m, f


@pytest.mark.parametrize("abi", ABIS)
def test_version_negotiation(abi):
    m, f = _host(abi)
    hyp_version = 0x1_0001 if abi == "6.12" else 0x1_0002
    assert m.smc(0, "FFA_ID_GET").x2 == -2  # not negotiated yet
    assert m.smc(0, "FFA_VERSION", 0x2_0000).x0 == -1  # major 2
    assert f.negotiate(hyp_version) == hyp_version
    assert m.smc(0, "FFA_ID_GET").regs[0] == FFA_SUCCESS  # passed through to the SPMC
    lower = m.smc(0, "FFA_VERSION", 0x1_0000).x0
    assert lower == (-1 if abi == "latest" else hyp_version)  # 7.2 refuses a later downgrade


@pytest.mark.parametrize("abi", ABIS)
def test_rxtx_map_shares_and_pins(abi):
    m, f = _host(abi)
    f.negotiate()
    r = f.map_mailbox()
    assert r.regs[0] == FFA_SUCCESS
    for pa in (f.tx, f.rx):
        info = m.inspect.page(pa >> 12)
        assert (info.host, info.hyp) == ("SHARED_OWNED", "SHARED_BORROWED")
        assert m.hvc(0, "__pkvm_host_unshare_hyp", pa >> 12).x1 == -16  # pinned: -EBUSY
    assert m.smc(0, "FFA_RXTX_MAP", f.tx, f.rx, 1).x2 == -6  # DENIED: already mapped
    assert m.smc(0, "FFA_RXTX_UNMAP", 1).x2 == -2  # not the host's ID
    assert m.smc(0, "FFA_RXTX_UNMAP", 0).regs[0] == FFA_SUCCESS
    assert m.inspect.page(f.tx >> 12).host == "OWNED"
    assert m.firmware.spmc.mailbox is None


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("bad", [dict(npages=2), dict(tx_off=8), dict(hyp_page=True)])
def test_rxtx_map_refusals(abi, bad):
    m, f = _host(abi)
    f.negotiate()
    tx, rx = m.host.alloc_pages(1), m.host.alloc_pages(1)
    if bad.get("hyp_page"):
        tx = next(r for r in m.memory_map() if r.kind == "hyp").start
    r = m.smc(0, "FFA_RXTX_MAP", tx + bad.get("tx_off", 0), rx, bad.get("npages", 1))
    assert (r.regs[0], r.x2) == (FFA_ERROR, -2)
    assert m.firmware.spmc.mailbox is None  # everything undone
    assert m.inspect.page(rx >> 12).host == "OWNED"


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("lend", [False, True])
def test_share_and_reclaim(abi, lend):
    m, f = _ready(abi, check=True)
    pages = m.host.alloc_pages(3)
    before = m.inspect.page_counts()
    r = f.share([(pages, 2), (pages + 0x2000, 1)], lend=lend)
    assert r.regs[0] == FFA_SUCCESS, r
    handle = r.regs[2] | r.regs[3] << 32
    for k in range(3):
        assert m.inspect.page((pages >> 12) + k).host == "SHARED_OWNED"
    check_ffa_owner(m)
    # pages shared with the secure world cannot go to the hyp (or be shared twice)
    assert m.hvc(0, "__pkvm_host_share_hyp", pages >> 12).x1 == -1
    assert f.share([(pages, 1)]).x2 == -6  # DENIED at EL2: not OWNED
    # a partition holding the memory makes the reclaim fail; the pages stay shared
    assert m.firmware.spmc.sp_retrieve(handle)
    assert f.reclaim(handle).x2 == -6
    assert m.inspect.page(pages >> 12).host == "SHARED_OWNED"
    assert m.firmware.spmc.sp_relinquish(handle)
    assert f.reclaim(handle).regs[0] == FFA_SUCCESS
    assert m.inspect.page_counts() == before
    check_ffa_owner(m)
    assert f.reclaim(handle).x2 == -2  # gone


@pytest.mark.parametrize("abi", ABIS)
def test_fragmented_share(abi):
    m, f = _ready(abi)
    pages = [m.host.alloc_pages(1) for _ in range(3)]
    desc = mem_descriptor(f.version, [(p, 1) for p in pages])
    first = len(desc) - 32  # the last two constituents in a second fragment
    r = f.send("FFA_MEM_SHARE", desc, length=len(desc), fraglen=first)
    assert r.regs[0] == FFA_MEM_FRAG_RX and r.regs[3] == first
    handle = r.regs[1] | r.regs[2] << 32
    assert m.inspect.page(pages[0] >> 12).host == "SHARED_OWNED"
    assert m.inspect.page(pages[2] >> 12).host == "OWNED"
    r = f.frag_tx(handle, desc[first:])
    assert r.regs[0] == FFA_SUCCESS
    assert all(m.inspect.page(p >> 12).host == "SHARED_OWNED" for p in pages)
    assert f.reclaim(handle).regs[0] == FFA_SUCCESS
    assert all(m.inspect.page(p >> 12).host == "OWNED" for p in pages)


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("kw,err", [
    (dict(ep_count=2), -2), (dict(sender=1), -2), (dict(composite_off=0), -2),
    (dict(composite_off=4090), -2),
])
def test_descriptor_refusals(abi, kw, err):
    m, f = _ready(abi)
    page = m.host.alloc_pages(1)
    before = m.inspect.page_counts()
    r = f.share([(page, 1)], **kw)
    assert (r.regs[0], r.x2) == (FFA_ERROR, err)
    assert m.inspect.page_counts() == before


def test_72_checks_the_endpoint_offset():
    """7.2 takes the EMAD offset from the descriptor and bounds-checks it ("Validate the offset
    to the mem access descriptor"); 6.12 uses the fixed v1.1 offset and ignores the field."""
    for abi in ABIS:
        m, f = _ready(abi)
        page = m.host.alloc_pages(1)
        r = f.share([(page, 1)], ep_mem_offset=0xFFFF_FFF0)
        if abi == "latest":
            assert (r.regs[0], r.x2) == (FFA_ERROR, -2)
            assert m.inspect.page(page >> 12).host == "OWNED"
        else:  # EL2 passes it on; the SPMC refuses it; EL2 gives the pages back
            assert m.firmware.calls[-1] == 0xC400_0073 and r.x2 == -2
            assert m.inspect.page(page >> 12).host == "OWNED"


def test_72_requires_aligned_range_addresses():
    for abi in ABIS:
        m, f = _ready(abi)
        page = m.host.alloc_pages(1)
        n = len(m.firmware.calls)
        r = f.share([(page + 0x10, 1)])
        if abi == "latest":  # refused at EL2 (DENIED), the SPMC never sees it
            assert r.x2 == -6 and len(m.firmware.calls) == n
        else:  # 6.12 checks only the size: EL2 shares the page, the SPMC refuses, EL2 undoes
            assert r.x2 == -2 and m.firmware.calls[-1] == 0xC400_0073
        assert m.inspect.page(page >> 12).host == "OWNED"


@pytest.mark.parametrize("abi", ABIS)
def test_partition_info(abi):
    m, f = _host(abi)
    f.negotiate()
    assert m.smc(0, "FFA_PARTITION_INFO_GET", 0, 0, 0, 0, 0).x2 == -4  # BUSY: no host RX
    f.map_mailbox()
    r = m.smc(0, "FFA_PARTITION_INFO_GET", 0, 0, 0, 0, 0)
    assert r.regs[0] == FFA_SUCCESS and r.regs[2] == 1
    assert int.from_bytes(m.host.read(f.rx, 2), "little") == 0x8001


@pytest.mark.parametrize("abi", ABIS)
def test_refused_calls(abi):
    m, f = _ready(abi)
    for fid in (0x8400_0074, 0x8400_0071, 0xC400_0071, 0x8400_0066):  # RETRIEVE_REQ, DONATE...
        assert m.smc(0, fid).x2 == -1
    r = m.smc(0, 0x8400_007D)  # NOTIFICATION_BITMAP_CREATE: 7.2 refuses, 6.12 passes it on
    assert r.path == "ffa" if abi == "latest" else r.path == "el3"
    assert m.smc(0, "FFA_FEATURES", 0xC400_0073).regs[0] == FFA_SUCCESS  # answered at EL2


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("seed", [1, 2])
def test_hostile_ffa_calls_keep_invariants(abi, seed):
    m, f = _ready(abi, check=True)
    rng = random.Random(seed)
    if _hostile_until_known_warn(m, f, rng, 60, each=check_ffa_owner):
        return  # the kernel's own frag_tx reclaim WARN: fatal at EL2, as in Linux
    assert m.dead is None


def _hostile_until_known_warn(m, f, rng, n, each=None) -> bool:
    """Run `n` hostile FF-A calls; True if one panicked the hyp at the one WARN the kernel lets
    a host reach (`KNOWN_KERNEL_WARNS`), the only panic these calls may cause."""
    from pkvm.check.oracles import NoWarn, excused_warns

    for _ in range(n):
        try:
            hostile_ffa_op(m, f, rng)
        except pkvm.HypPanic as e:
            assert e.warn and "WARN_ON in do_ffa_mem_frag_tx" in e.reason, e
            assert excused_warns(m.inspect) == {"ffa-frag-tx-reclaim": 1}
            assert NoWarn.violations(m.inspect) == []
            return True
        if each is not None:
            each(m)
    return False


def test_owner_check_runs_as_a_listener():
    m, f = _ready("latest")
    attach_ffa_owner_check(m)
    page = m.host.alloc_pages(1)
    assert f.share([(page, 1)]).regs[0] == FFA_SUCCESS  # checked after the SMC
    m.firmware.spmc.transactions.clear()  # the secure world forgets: the check must notice
    with pytest.raises(AssertionError):
        m.smc(0, "FFA_FEATURES", 0xC400_0073)  # answered at EL2: path "ffa"


@pytest.mark.parametrize("ffa", [False, True])
def test_fuzzer_step_is_replayable(ffa):
    from pkvm.check.ffa_ops import ffa_step

    def run():
        m = pkvm.Machine(memory="64M", cpus=2, ffa=ffa)
        out = []
        for s in range(25):
            try:
                out.append(ffa_step(m, s).regs)
            except pkvm.HypPanic as e:  # a WARN at EL2 is fatal: the replay must panic alike
                out.append(e.reason)
                break
        return out, m.inspect.page_counts()

    assert run() == run()


def test_known_kernel_warn_is_excused_narrowly_and_counted():
    """The frag_tx reclaim WARN the kernel lets a host reach is excused by its one entry, and
    counted; any other WARN is still reported."""
    from pkvm.check.oracles import NoWarn, excused_warns

    m, f = _ready("latest", check=False)
    rng = random.Random(3)
    assert _hostile_until_known_warn(m, f, rng, 60)  # a WARN at EL2 panics, as in Linux
    assert m.dead and m.dead.startswith("WARN_ON in do_ffa_mem_frag_tx")
    assert excused_warns(m.inspect) == {"ffa-frag-tx-reclaim": 1}
    assert NoWarn.violations(m.inspect) == []
    from pkvm.hyp.panic import HypWarn

    m._hyp.warnings.append(HypWarn(("other", "x.py:1", "  File \"x.py\", line 1, in other\n"
                                                      "    _warn(h, 1)\n")))
    assert NoWarn.violations(m.inspect)
