"""The FF-A proxy's mailbox and memory-transaction calls (`nvhe/ffa.c`, second half).

`do_ffa_rxtx_map` / `do_ffa_rxtx_unmap`, `__do_ffa_mem_xfer` (MEM_SHARE / MEM_LEND),
`do_ffa_mem_frag_tx`, `do_ffa_mem_reclaim` and `do_ffa_part_get`; see `pkvm.hyp.ffa`. EL2 reads
the host's mailbox through its own stage-1 (the pages are shared and pinned) and its own
mailbox and descriptor buffer in the carve-out; every descriptor field is read once, from EL2's
copy, as the kernel does after its `memcpy`.
"""

from __future__ import annotations

import struct
from typing import Final

from pkvm.abi.ffa import (
    FFA_COMPOSITE_SZ,
    FFA_EP_MEM_OFFSET_OFF,
    FFA_FN64_MEM_RETRIEVE_REQ,
    FFA_FN64_RXTX_MAP,
    FFA_MEM_FRAG_RX,
    FFA_MEM_FRAG_TX,
    FFA_MEM_RECLAIM,
    FFA_MEM_REGION_SZ,
    FFA_MEM_RETRIEVE_RESP,
    FFA_PAGE_SIZE,
    FFA_PARTITION_INFO_GET,
    FFA_RANGE_SZ,
    FFA_RET_ABORTED,
    FFA_RET_BUSY,
    FFA_RET_DENIED,
    FFA_RET_INVALID_PARAMETERS,
    FFA_RET_NO_MEMORY,
    FFA_RET_SUCCESS,
    FFA_RX_RELEASE,
    FFA_RXTX_UNMAP,
    FFA_SUCCESS,
    FFA_VERSION_1_0,
    ffa_emad_size,
)
from pkvm.hyp.ffa import (
    FFA_1_0_PARTITON_INFO_SZ,
    HOST_FFA_ID,
    MBOX_BYTES,
    constituents_offset,
    ffa_res,
    host_share_ffa,
    mem_region_sz,
    smc12,
)
from pkvm.hyp.mem_protect import (
    __pkvm_host_share_hyp,
    __pkvm_host_unshare_hyp,
    _warn,
    hyp_pin_shared_mem,
    hyp_unpin_shared_mem,
)
from pkvm.hyp.mm import el2_read, el2_write, hyp_va
from pkvm.hyp.state import HypState
from pkvm.machine.memory import PAGE_SHIFT, PAGE_SIZE

U32: Final = 0xFFFF_FFFF


def _u32(v: int) -> int:
    return v & U32


# -- mailboxes -----------------------------------------------------------------------------
def ffa_map_hyp_buffers(h: HypState, npages: int) -> int:
    p = h.ffa
    res = smc12(h, FFA_FN64_RXTX_MAP, p.hyp_tx, p.hyp_rx, npages)
    return FFA_RET_SUCCESS if res[0] == FFA_SUCCESS else _s32(res[2])


def ffa_unmap_hyp_buffers(h: HypState) -> int:
    res = smc12(h, FFA_RXTX_UNMAP, HOST_FFA_ID)
    return FFA_RET_SUCCESS if res[0] == FFA_SUCCESS else _s32(res[2])


def _s32(v: int) -> int:
    v &= U32
    return v - (1 << 32) if v >> 31 else v


def do_ffa_rxtx_map(h: HypState, regs: list[int]) -> list[int]:
    p = h.ffa
    tx, rx, npages = regs[1], regs[2], _u32(regs[3])
    if npages != MBOX_BYTES // FFA_PAGE_SIZE or tx & (PAGE_SIZE - 1) or rx & (PAGE_SIZE - 1):
        return ffa_res(FFA_RET_INVALID_PARAMETERS)
    if p.host_tx:
        return ffa_res(FFA_RET_DENIED)
    ret = ffa_map_hyp_buffers(h, npages)
    if ret:
        return ffa_res(ret)
    if __pkvm_host_share_hyp(h, tx >> PAGE_SHIFT):
        ffa_unmap_hyp_buffers(h)
        return ffa_res(FFA_RET_INVALID_PARAMETERS)
    if __pkvm_host_share_hyp(h, rx >> PAGE_SHIFT):
        __pkvm_host_unshare_hyp(h, tx >> PAGE_SHIFT)
        ffa_unmap_hyp_buffers(h)
        return ffa_res(FFA_RET_INVALID_PARAMETERS)
    if hyp_pin_shared_mem(h, hyp_va(tx), hyp_va(tx) + 1):
        __pkvm_host_unshare_hyp(h, rx >> PAGE_SHIFT)
        __pkvm_host_unshare_hyp(h, tx >> PAGE_SHIFT)
        ffa_unmap_hyp_buffers(h)
        return ffa_res(FFA_RET_INVALID_PARAMETERS)
    if hyp_pin_shared_mem(h, hyp_va(rx), hyp_va(rx) + 1):
        hyp_unpin_shared_mem(h, hyp_va(tx), hyp_va(tx) + 1)
        __pkvm_host_unshare_hyp(h, rx >> PAGE_SHIFT)
        __pkvm_host_unshare_hyp(h, tx >> PAGE_SHIFT)
        ffa_unmap_hyp_buffers(h)
        return ffa_res(FFA_RET_INVALID_PARAMETERS)
    p.host_tx, p.host_rx = tx, rx
    return ffa_res(FFA_RET_SUCCESS)


def do_ffa_rxtx_unmap(h: HypState, regs: list[int]) -> list[int]:
    p = h.ffa
    if _u32(regs[1]) != HOST_FFA_ID or not p.host_tx:
        return ffa_res(FFA_RET_INVALID_PARAMETERS)
    for pa in (p.host_tx, p.host_rx):
        hyp_unpin_shared_mem(h, hyp_va(pa), hyp_va(pa) + 1)
        _warn(h, __pkvm_host_unshare_hyp(h, pa >> PAGE_SHIFT))
    p.host_tx = p.host_rx = 0
    ffa_unmap_hyp_buffers(h)
    return ffa_res(FFA_RET_SUCCESS)


# -- constituent ranges ------------------------------------------------------------------------
def _ranges(buf: bytes, off: int, n: int) -> list[tuple[int, int]]:
    return [struct.unpack_from("<QI", buf, off + FFA_RANGE_SZ * i) for i in range(n)]


def _share_ranges(h: HypState, ranges: list[tuple[int, int]], share: bool) -> int:
    """`__ffa_host_share_ranges` / `__ffa_host_unshare_ranges`: how many ranges went through."""
    for i, (addr, pg_cnt) in enumerate(ranges):
        sz = pg_cnt * FFA_PAGE_SIZE
        strict = h.profile.ffa_strict_descriptors and not h.bug("ffa-unaligned-range")  # seeded
        aligned = sz | addr if strict else sz
        if aligned & (PAGE_SIZE - 1):
            return i
        if host_share_ffa(h, addr >> PAGE_SHIFT, sz // PAGE_SIZE, share):
            return i
    return len(ranges)


def ffa_host_share_ranges(h: HypState, ranges: list[tuple[int, int]], share: bool = True) -> int:
    done = _share_ranges(h, ranges, share)
    if done != len(ranges):
        _warn(h, _share_ranges(h, ranges[:done], not share) != done)
        return FFA_RET_DENIED
    return 0


# -- MEM_SHARE / MEM_LEND / MEM_FRAG_TX ----------------------------------------------------------
def _copy_from_host_tx(h: HypState, n: int) -> bytes:
    """`memcpy(hyp_buffers.tx, host_buffers.tx, n)`; returns EL2's copy."""
    p = h.ffa
    data = el2_read(h, hyp_va(p.host_tx), n) if n else b""
    if n:
        el2_write(h, hyp_va(p.hyp_tx), data)
    return data


def _emad_off(h: HypState, buf: bytes) -> int:
    version = h.ffa.version
    if not h.profile.ffa_strict_descriptors:
        return FFA_EP_MEM_OFFSET_OFF if version <= FFA_VERSION_1_0 else FFA_MEM_REGION_SZ
    if version <= FFA_VERSION_1_0:
        return FFA_EP_MEM_OFFSET_OFF
    off: int = struct.unpack_from("<I", buf, FFA_EP_MEM_OFFSET_OFF)[0]
    return off


def do_ffa_mem_xfer(h: HypState, fid: int, regs: list[int]) -> list[int]:
    p = h.ffa
    length, fraglen, addr_mbz, npages_mbz = _u32(regs[1]), _u32(regs[2]), regs[3], _u32(regs[4])
    version = p.version
    if addr_mbz or npages_mbz or fraglen > length or fraglen > MBOX_BYTES:
        return ffa_res(FFA_RET_INVALID_PARAMETERS)
    strict = h.profile.ffa_strict_descriptors
    min_len = mem_region_sz(version) + ffa_emad_size(version) if strict else FFA_MEM_REGION_SZ + 16
    if fraglen < min_len:
        return ffa_res(FFA_RET_INVALID_PARAMETERS)
    if not p.host_tx:
        return ffa_res(FFA_RET_INVALID_PARAMETERS)
    if length > p.desc_len:
        return ffa_res(FFA_RET_NO_MEMORY)
    buf = _copy_from_host_tx(h, fraglen)
    em_off = _emad_off(h, buf)
    esize = ffa_emad_size(version) if strict else 16
    if strict and em_off + esize > fraglen:
        return ffa_res(FFA_RET_INVALID_PARAMETERS)
    if em_off + 8 > len(buf):  # 6.12 reads past the fragment: EL2's copy holds what was there
        buf = buf + el2_read(h, hyp_va(p.hyp_tx) + len(buf), em_off + 8 - len(buf))
    sender_id, = struct.unpack_from("<H", buf, 0)
    ep_count, = struct.unpack_from("<I", buf, 28)
    offset, = struct.unpack_from("<I", buf, em_off + 4)  # composite_off
    if not offset or ep_count != 1 or sender_id != HOST_FFA_ID:
        return ffa_res(FFA_RET_INVALID_PARAMETERS)
    checked = offset + FFA_COMPOSITE_SZ
    if checked > U32 or fraglen < checked:
        return ffa_res(FFA_RET_INVALID_PARAMETERS)
    tail = fraglen - checked
    if tail % FFA_RANGE_SZ:
        return ffa_res(FFA_RET_INVALID_PARAMETERS)
    ranges = _ranges(buf, checked, tail // FFA_RANGE_SZ)
    ret = ffa_host_share_ranges(h, ranges)
    if ret:
        return ffa_res(ret)
    res = smc12(h, fid, length, fraglen)
    if fraglen != length:
        ok = res[0] == FFA_MEM_FRAG_RX and res[3] == fraglen
    else:
        ok = res[0] == FFA_SUCCESS
    if not ok:
        _warn(h, ffa_host_share_ranges(h, ranges, share=False))
    return res


def do_ffa_mem_frag_tx(h: HypState, regs: list[int]) -> list[int]:
    p = h.ffa
    handle_lo, handle_hi, fraglen, endpoint = (_u32(regs[i]) for i in (1, 2, 3, 4))
    if fraglen > MBOX_BYTES or fraglen % FFA_RANGE_SZ or not p.host_tx:
        return ffa_res(FFA_RET_INVALID_PARAMETERS)
    buf = _copy_from_host_tx(h, fraglen)
    ranges = _ranges(buf, 0, fraglen // FFA_RANGE_SZ)
    ret = ffa_host_share_ranges(h, ranges)
    if ret:
        res = smc12(h, FFA_MEM_RECLAIM, handle_lo, handle_hi, 0)
        _warn(h, res[0] != FFA_SUCCESS)
        return ffa_res(ret)
    res = smc12(h, FFA_MEM_FRAG_TX, handle_lo, handle_hi, fraglen, endpoint)
    if res[0] not in (FFA_SUCCESS, FFA_MEM_FRAG_RX):
        _warn(h, ffa_host_share_ranges(h, ranges, share=False))
    return res


# -- MEM_RECLAIM -----------------------------------------------------------------------------
def _retrieve_descriptor(h: HypState, handle_lo: int, handle_hi: int) -> tuple[int, bytes | None,
                                                                            list[int] | None]:
    """RETRIEVE_REQ (+ FRAG_RX) into the descriptor buffer: (ret, descriptor, SPMC reply)."""
    p = h.ffa
    version = p.version
    req = bytearray(FFA_MEM_REGION_SZ)
    struct.pack_into("<HHIQ", req, 0, HOST_FFA_ID, 0, 0, handle_lo | handle_hi << 32)
    el2_write(h, hyp_va(p.hyp_tx), bytes(req))
    res = smc12(h, FFA_FN64_MEM_RETRIEVE_REQ, FFA_MEM_REGION_SZ, FFA_MEM_REGION_SZ)
    if res[0] != FFA_MEM_RETRIEVE_RESP:
        return 0, None, res
    length, fraglen = _u32(res[1]), _u32(res[2])
    rx = el2_read(h, hyp_va(p.hyp_rx), MBOX_BYTES)
    strict = h.profile.ffa_strict_descriptors
    em_off = _emad_off(h, rx)
    if strict and em_off + ffa_emad_size(version) > fraglen:
        return FFA_RET_INVALID_PARAMETERS, None, smc12(h, FFA_RX_RELEASE)
    offset, = struct.unpack_from("<I", rx, em_off + 4) if em_off + 8 <= len(rx) else (0,)
    bad = (offset + constituents_offset(0) > length) if strict else (offset > length)
    if bad or fraglen > MBOX_BYTES:
        if not strict:
            _warn(h, True)
        return FFA_RET_ABORTED, None, smc12(h, FFA_RX_RELEASE)
    if length > p.desc_len:
        return FFA_RET_NO_MEMORY, None, smc12(h, FFA_RX_RELEASE)
    desc = bytearray(rx[:fraglen])
    smc12(h, FFA_RX_RELEASE)
    fragoff = fraglen
    while fragoff < length:
        res = smc12(h, FFA_MEM_FRAG_RX, handle_lo, handle_hi, fragoff, HOST_FFA_ID)
        if res[0] != FFA_MEM_FRAG_TX:
            return FFA_RET_INVALID_PARAMETERS, None, res
        fraglen = _u32(res[3])
        desc += el2_read(h, hyp_va(p.hyp_rx), min(fraglen, MBOX_BYTES))
        smc12(h, FFA_RX_RELEASE)
        fragoff += fraglen
    el2_write(h, hyp_va(p.desc_buf), bytes(desc[: p.desc_len]))
    return 0, bytes(desc) + bytes(max(0, offset + FFA_COMPOSITE_SZ - len(desc))), [offset, length]


def do_ffa_mem_reclaim(h: HypState, regs: list[int]) -> list[int]:
    handle_lo, handle_hi, flags = _u32(regs[1]), _u32(regs[2]), _u32(regs[3])
    ret, desc, extra = _retrieve_descriptor(h, handle_lo, handle_hi)
    if ret:
        return ffa_res(ret)
    if desc is None:
        return extra or ffa_res(FFA_RET_INVALID_PARAMETERS)
    assert extra is not None
    offset, length = extra
    cnt, = struct.unpack_from("<I", desc, offset + 4)
    if h.profile.ffa_strict_descriptors and offset + constituents_offset(cnt) > length:
        return ffa_res(FFA_RET_ABORTED)
    res = smc12(h, FFA_MEM_RECLAIM, handle_lo, handle_hi, flags)
    if res[0] != FFA_SUCCESS:
        return res
    start = offset + FFA_COMPOSITE_SZ
    n = min(cnt, max(0, (len(desc) - start) // FFA_RANGE_SZ))
    _warn(h, ffa_host_share_ranges(h, _ranges(desc, start, n), share=False))
    return res


# -- PARTITION_INFO_GET ----------------------------------------------------------------------
def do_ffa_part_get(h: HypState, regs: list[int]) -> list[int]:
    p = h.ffa
    if not p.host_rx:
        return ffa_res(FFA_RET_BUSY)
    uuid = [_u32(regs[i]) for i in (1, 2, 3, 4)]
    flags = _u32(regs[5])
    res = smc12(h, FFA_PARTITION_INFO_GET, *uuid, flags)
    if res[0] != FFA_SUCCESS:
        return res
    count = _u32(res[2])
    if not count:
        return res
    if p.version > FFA_VERSION_1_0:
        if flags & 1:
            return res
        size = _u32(res[3])
    else:
        size = FFA_1_0_PARTITON_INFO_SZ
    copy = size * count
    if copy > MBOX_BYTES:
        return ffa_res(FFA_RET_ABORTED)
    el2_write(h, hyp_va(p.host_rx), el2_read(h, hyp_va(p.hyp_rx), copy))
    return res
