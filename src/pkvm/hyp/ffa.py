"""The host's FF-A calls, proxied by EL2 (`nvhe/ffa.c`).

The proxy claims every fast standard-owner call with function number 0x60-0xFF (`is_ffa_call`).
Until a version is negotiated it answers all of them but FFA_VERSION with INVALID_PARAMETERS.
It is only set up (`hyp_ffa_init`, at finalise) when the host found SMCCC >= 1.2 and the
firmware answers FFA_VERSION: then EL2 owns a mailbox of its own (TX, RX) and a descriptor
buffer in its carve-out, registers them with the secure world at the first successful
negotiation (`hyp_ffa_post_init` checks FFA_ID_GET and the RXTX_MAP granule), and:

- RXTX_MAP (64-bit only) shares the host's TX and RX pages with EL2 and pins them
  (`__pkvm_host_share_hyp` + `hyp_pin_shared_mem`), after mapping EL2's own pair with the SPMC;
  RXTX_UNMAP undoes it.
- MEM_SHARE / MEM_LEND copy the host's descriptor from its TX into EL2's, check it (a single
  endpoint, the host as sender, the endpoint and composite offsets inside the fragment, whole
  16-byte constituents), move every constituent range host OWNED -> SHARED_OWNED
  (`__pkvm_host_share_ffa`; lending is treated as sharing: EL2 keeps no separate "lent"
  state), and only then forward the call from EL2's TX; a failed forward unshares again.
  MEM_FRAG_TX does the same for each further fragment.
- MEM_RECLAIM first retrieves the transaction's descriptor from the SPMC (RETRIEVE_REQ, then
  FRAG_RX for each further fragment) into the descriptor buffer, checks it, forwards the reclaim
  and, on success, gives the ranges back (SHARED_OWNED -> OWNED).
- FEATURES answers MEM_SHARE/LEND itself; PARTITION_INFO_GET copies the SPMC's answer into the
  host's RX; calls in `ffa_call_supported`'s refusal list get NOT_SUPPORTED; every other FF-A
  call goes to the firmware unchanged.

Each reply is written with `ffa_set_retval`: x0..x3 in 6.12, x0..x17 in 7.2
(`Profile.ffa_retval_regs`). The 6.12/7.2 differences in the checks are profile fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from pkvm.abi.ffa import (
    FFA_COMPOSITE_SZ,
    FFA_CONSOLE_LOG,
    FFA_ERROR,
    FFA_FEAT_RXTX_MIN_SZ_MASK,
    FFA_FEATURES,
    FFA_FN64_MEM_DONATE,
    FFA_FN64_MEM_LEND,
    FFA_FN64_MEM_RETRIEVE_REQ,
    FFA_FN64_MEM_SHARE,
    FFA_FN64_RXTX_MAP,
    FFA_ID_GET,
    FFA_MEM_DONATE,
    FFA_MEM_FRAG_RX,
    FFA_MEM_FRAG_TX,
    FFA_MEM_LEND,
    FFA_MEM_OP_PAUSE,
    FFA_MEM_OP_RESUME,
    FFA_MEM_RECLAIM,
    FFA_MEM_REGION_SZ,
    FFA_MEM_REGION_SZ_1_0,
    FFA_MEM_RELINQUISH,
    FFA_MEM_RETRIEVE_REQ,
    FFA_MEM_RETRIEVE_RESP,
    FFA_MEM_SHARE,
    FFA_MSG_POLL,
    FFA_MSG_SEND,
    FFA_MSG_SEND_DIRECT_REQ2,
    FFA_MSG_SEND_DIRECT_RESP,
    FFA_MSG_SEND_DIRECT_RESP2,
    FFA_MSG_WAIT,
    FFA_NOTIFICATION_CALLS,
    FFA_PARTITION_INFO_GET,
    FFA_PARTITION_INFO_GET_REGS,
    FFA_RANGE_SZ,
    FFA_RET_INVALID_PARAMETERS,
    FFA_RET_NOT_SUPPORTED,
    FFA_RET_SUCCESS,
    FFA_RXTX_MAP,
    FFA_RXTX_UNMAP,
    FFA_SUCCESS,
    FFA_VERSION,
    FFA_VERSION_1_0,
)
from pkvm.abi.sizes import hyp_ffa_proxy_pages
from pkvm.errors import EINVAL
from pkvm.hyp.mem_protect import (
    _warn,
    host_check_page_state_range,
    host_hyp_locked,
    host_set_page_state_range,
    hyp_pfn_to_phys,
    pfn_range_is_valid,
)
from pkvm.hyp.memory import PageState
from pkvm.hyp.state import HypState
from pkvm.machine.memory import PAGE_SIZE

U64: Final = 0xFFFF_FFFF_FFFF_FFFF
HOST_FFA_ID: Final = 0
KVM_FFA_MBOX_NR_PAGES: Final = 1
MBOX_BYTES: Final = KVM_FFA_MBOX_NR_PAGES * PAGE_SIZE

FFA_1_0_PARTITON_INFO_SZ: Final = 8


def major(v: int) -> int:
    return (v >> 16) & 0x7FFF


def minor(v: int) -> int:
    return v & 0xFFFF


def mem_region_sz(version: int) -> int:
    return FFA_MEM_REGION_SZ if version > FFA_VERSION_1_0 else FFA_MEM_REGION_SZ_1_0


def constituents_offset(n: int) -> int:
    return FFA_COMPOSITE_SZ + FFA_RANGE_SZ * n


@dataclass
class FfaProxy:
    """The proxy's state: EL2's mailbox and descriptor buffer, the host's mailbox, the version."""

    hyp_tx: int = 0  # PAs in the carve-out (0: the proxy was never set up)
    hyp_rx: int = 0
    desc_buf: int = 0
    desc_len: int = 0
    host_tx: int = 0  # PAs of the host's pinned mailbox pages (0: none)
    host_rx: int = 0
    version: int = 0
    negotiated: bool = False


def is_ffa_call(fid: int) -> bool:
    fast = bool(fid & (1 << 31))
    owner = (fid >> 24) & 0x3F
    num = fid & 0xFFFF
    return fast and owner == 4 and 0x60 <= num <= 0xFF


def ffa_error(code: int) -> list[int]:
    res = [0] * 18
    res[0] = FFA_ERROR
    res[2] = code & U64
    return res


def ffa_res(ret: int, prop: int = 0) -> list[int]:
    if ret == FFA_RET_SUCCESS:
        res = [0] * 18
        res[0], res[2] = FFA_SUCCESS, prop
        return res
    return ffa_error(ret)


def smc12(h: HypState, *args: int) -> list[int]:
    """`hyp_smccc_1_2_smc`: an SMC from EL2 with x0..x17 (unset ones 0); all 18 come back."""
    regs = [a & U64 for a in args] + [0] * (18 - len(args))
    h.smc_to_el3(h.cpu, regs)
    return regs


EOPNOTSUPP: Final = 95  # Linux's value (not among `pkvm.errors`, which the hyp's other files use)


def _proxy(h: HypState) -> FfaProxy:
    return h.ffa


# -- set-up (`hyp_ffa_init` at finalise, `hyp_ffa_post_init` at the first negotiation) --------
def hyp_ffa_init(h: HypState) -> int:
    """0, or -EOPNOTSUPP when the firmware's FF-A version is not 1.x (fails `__pkvm_init`)."""
    p = h.ffa = FfaProxy()
    if h.psci.smccc_version < 0x1_0002:
        return 0
    res = smc12(h, FFA_VERSION, h.profile.ffa_hyp_version)
    if res[0] & 0xFFFF_FFFF == FFA_RET_NOT_SUPPORTED & 0xFFFF_FFFF:
        return 0
    if major(res[0]) != 1:
        return -EOPNOTSUPP
    p.version = res[0] & 0xFFFF_FFFF if minor(res[0]) < minor(h.profile.ffa_hyp_version) else (
        h.profile.ffa_hyp_version)
    base = h.carve.ffa_proxy
    p.hyp_tx, p.hyp_rx = base, base + MBOX_BYTES
    p.desc_buf = base + 2 * MBOX_BYTES
    p.desc_len = PAGE_SIZE * (hyp_ffa_proxy_pages() - 2 * KVM_FFA_MBOX_NR_PAGES)
    return 0


def hyp_ffa_post_init(h: HypState) -> int:
    res = smc12(h, FFA_ID_GET)
    if res[0] != FFA_SUCCESS:
        return -EOPNOTSUPP
    if res[2] != HOST_FFA_ID:
        return -EINVAL
    res = smc12(h, FFA_FEATURES, FFA_FN64_RXTX_MAP)
    if res[0] != FFA_SUCCESS:
        return -EOPNOTSUPP
    gran = res[2] & FFA_FEAT_RXTX_MIN_SZ_MASK if h.profile.ffa_rxtx_min_sz_masked else res[2]
    sizes = {0: 4096, 1: 64 * 1024, 2: 16 * 1024}
    if gran not in sizes:
        return -EINVAL
    return -EOPNOTSUPP if sizes[gran] > PAGE_SIZE else 0


def do_ffa_version(h: HypState, regs: list[int]) -> list[int]:
    p = _proxy(h)
    req = regs[1] & 0xFFFF_FFFF
    res = [0] * 18
    if major(req) != 1:
        res[0] = FFA_RET_NOT_SUPPORTED & U64
        return res
    if p.negotiated:
        if h.profile.ffa_refuses_downgrade_after_negotiation and minor(req) < minor(p.version):
            res[0] = FFA_RET_NOT_SUPPORTED & U64
        else:
            res[0] = p.version
        return res
    if minor(req) < minor(p.version):
        res = smc12(h, FFA_VERSION, req)
        if res[0] & 0xFFFF_FFFF == FFA_RET_NOT_SUPPORTED & 0xFFFF_FFFF:
            return res
        p.version = req
    res = [0] * 18
    if hyp_ffa_post_init(h):
        res[0] = FFA_RET_NOT_SUPPORTED & U64
    else:
        p.negotiated = True
        res[0] = p.version
    return res


# -- the handler ---------------------------------------------------------------------------
def ffa_call_supported(h: HypState, fid: int) -> bool:
    refused = {FFA_FN64_MEM_RETRIEVE_REQ, FFA_MEM_RETRIEVE_RESP, FFA_MEM_RELINQUISH,
               FFA_MEM_OP_PAUSE, FFA_MEM_OP_RESUME, FFA_MEM_FRAG_RX, FFA_FN64_MEM_DONATE,
               FFA_MSG_SEND, FFA_MSG_POLL, FFA_MSG_WAIT, FFA_MSG_SEND_DIRECT_RESP, FFA_RXTX_MAP,
               FFA_MEM_DONATE, FFA_MEM_RETRIEVE_REQ}
    if h.profile.ffa_refuses_1_2_calls:
        refused |= set(FFA_NOTIFICATION_CALLS) | {FFA_MSG_SEND_DIRECT_REQ2,
                                                  FFA_MSG_SEND_DIRECT_RESP2, FFA_CONSOLE_LOG,
                                                  FFA_PARTITION_INFO_GET_REGS}
    return fid not in refused


def do_ffa_features(h: HypState, regs: list[int]) -> list[int] | None:
    fid = regs[1] & 0xFFFF_FFFF
    if not ffa_call_supported(h, fid):
        return ffa_res(FFA_RET_NOT_SUPPORTED)
    if fid in (FFA_MEM_SHARE, FFA_FN64_MEM_SHARE, FFA_MEM_LEND, FFA_FN64_MEM_LEND):
        return ffa_res(FFA_RET_SUCCESS, 0)  # no dynamic buffers
    return None  # to the firmware


def kvm_host_ffa_handler(h: HypState, regs: list[int], fid: int) -> bool:
    """Claim (True) and answer the host's FF-A call `fid` (32 bits, hint cleared)."""
    from pkvm.hyp import ffa_mem  # late on purpose: ffa_mem imports this module

    if not is_ffa_call(fid):
        return False
    p = _proxy(h)
    res: list[int] | None
    if fid != FFA_VERSION and not p.negotiated:
        res = ffa_error(FFA_RET_INVALID_PARAMETERS)
    elif fid == FFA_FEATURES:
        res = do_ffa_features(h, regs)
        if res is None:
            return False
    elif fid == FFA_FN64_RXTX_MAP:
        res = ffa_mem.do_ffa_rxtx_map(h, regs)
    elif fid == FFA_RXTX_UNMAP:
        res = ffa_mem.do_ffa_rxtx_unmap(h, regs)
    elif fid in (FFA_MEM_SHARE, FFA_FN64_MEM_SHARE):
        res = ffa_mem.do_ffa_mem_xfer(h, FFA_FN64_MEM_SHARE, regs)
    elif fid in (FFA_MEM_LEND, FFA_FN64_MEM_LEND):
        res = ffa_mem.do_ffa_mem_xfer(h, FFA_FN64_MEM_LEND, regs)
    elif fid == FFA_MEM_RECLAIM:
        res = ffa_mem.do_ffa_mem_reclaim(h, regs)
    elif fid == FFA_MEM_FRAG_TX:
        res = ffa_mem.do_ffa_mem_frag_tx(h, regs)
    elif fid == FFA_VERSION:
        res = do_ffa_version(h, regs)
    elif fid == FFA_PARTITION_INFO_GET:
        res = ffa_mem.do_ffa_part_get(h, regs)
    elif ffa_call_supported(h, fid):
        return False  # pass through to the firmware
    else:
        res = ffa_error(FFA_RET_NOT_SUPPORTED)
    for i in range(h.profile.ffa_retval_regs):
        regs[i] = res[i] & U64
    return True


# -- helpers for ffa_mem.py ------------------------------------------------------------------
def host_share_ffa(h: HypState, pfn: int, nr_pages: int, share: bool) -> int:
    """`__pkvm_host_share_ffa` / `__pkvm_host_unshare_ffa`: the host's pages OWNED <->
    SHARED_OWNED (the secure world is the borrower; EL2 maps nothing)."""
    phys = hyp_pfn_to_phys(pfn)
    size = (PAGE_SIZE * nr_pages) & U64
    if h.profile.ffa_share_checks_pfn_range and not pfn_range_is_valid(h, pfn, nr_pages):
        return -EINVAL
    if not size:
        return 0
    frm, to = (PageState.OWNED, PageState.SHARED_OWNED) if share else (
        PageState.SHARED_OWNED, PageState.OWNED)
    with host_hyp_locked(h):
        ret = host_check_page_state_range(h, phys, size, frm)
        if ret:
            return ret
        _warn(h, host_set_page_state_range(h, phys, size, to))
    return 0

