"""A modelled secure world: an FF-A 1.2 SPMC at EL3 with secure partitions (hardware side).

Enough of FF-A for the normal world's memory-sharing ABI (DEN0077A): version, ID_GET, FEATURES,
one RX/TX mailbox pair per normal-world endpoint (the hypervisor maps its own, endpoint 0),
PARTITION_INFO_GET, MEM_SHARE / MEM_LEND with fragments (FRAG_TX / FRAG_RX), RETRIEVE_REQ for
the hypervisor's reclaim, MEM_RECLAIM, RX_RELEASE. Transactions are kept by handle with the
constituent ranges the sender described; a secure partition can retrieve a transaction
(`sp_retrieve`), after which a reclaim is DENIED until it relinquishes (`sp_relinquish`).
Descriptors use the FF-A v1.1+ layout of the version the caller negotiated (48-byte header,
16-byte endpoint descriptors, 32 from v1.2).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from pkvm.abi.ffa import (
    FFA_ERROR,
    FFA_FEATURES,
    FFA_FN64_MEM_LEND,
    FFA_FN64_MEM_RETRIEVE_REQ,
    FFA_FN64_MEM_SHARE,
    FFA_FN64_RXTX_MAP,
    FFA_ID_GET,
    FFA_MEM_FRAG_RX,
    FFA_MEM_FRAG_TX,
    FFA_MEM_LEND,
    FFA_MEM_RECLAIM,
    FFA_MEM_RETRIEVE_REQ,
    FFA_MEM_RETRIEVE_RESP,
    FFA_MEM_SHARE,
    FFA_PAGE_SIZE,
    FFA_PARTITION_INFO_GET,
    FFA_RET_BUSY,
    FFA_RET_DENIED,
    FFA_RET_INVALID_PARAMETERS,
    FFA_RET_NOT_SUPPORTED,
    FFA_RX_RELEASE,
    FFA_RXTX_MAP,
    FFA_RXTX_UNMAP,
    FFA_SUCCESS,
    FFA_VERSION,
    FFA_VERSION_1_2,
)

if TYPE_CHECKING:
    from pkvm.machine.memory import PhysMemory

U64: Final = 0xFFFF_FFFF_FFFF_FFFF
PARTITION_INFO_SZ: Final = 24  # v1.1+ partition descriptor


@dataclass
class Transaction:
    handle: int
    kind: str  # "share" / "lend"
    sender: int
    receiver: int
    length: int  # total descriptor length announced
    received: bytearray = field(default_factory=bytearray)
    complete: bool = False
    retrieved: bool = False

    def ranges(self) -> list[tuple[int, int]]:
        return parse_ranges(bytes(self.received))


def parse_ranges(desc: bytes) -> list[tuple[int, int]]:
    """The (address, page count) constituents of a v1.1+ memory-transaction descriptor."""
    if len(desc) < 48:
        return []
    ep_off, = struct.unpack_from("<I", desc, 32)
    if ep_off + 8 > len(desc):
        return []
    comp, = struct.unpack_from("<I", desc, ep_off + 4)
    if comp + 16 > len(desc):
        return []
    cnt, = struct.unpack_from("<I", desc, comp + 4)
    out = []
    for i in range(cnt):
        o = comp + 16 + 16 * i
        if o + 12 > len(desc):
            break
        out.append(struct.unpack_from("<QI", desc, o))
    return out


class Spmc:
    """The secure world behind EL3 (FF-A endpoint IDs 0x8001.. for its partitions)."""

    def __init__(self, mem: "PhysMemory", partitions: int = 1):
        self.mem = mem
        self.partitions = [0x8001 + i for i in range(partitions)]
        self.mailbox: tuple[int, int] | None = None  # (tx, rx) of endpoint 0
        self.rx_busy = False
        self.version = 0
        self.transactions: dict[int, Transaction] = {}
        self._next_handle = 0x1000
        self._retrieve: bytes | None = None  # a retrieved descriptor being handed out

    def __reduce__(self) -> tuple[Any, ...]:  # as `Tlb.__reduce__` (machine/mmu.py)
        return (Spmc, (self.mem,), self.__getstate__())

    @staticmethod
    def claims(fid: int) -> bool:
        return ((fid >> 24) & 0x3F) == 4 and 0x60 <= (fid & 0xFFFF) <= 0xFF and bool(fid >> 31)

    def smc(self, cpu: int, regs: list[int]) -> None:
        fid = regs[0] & 0xFFFF_FFFF
        out = self._call(fid, regs)
        for i in range(18):
            regs[i] = (out[i] if i < len(out) else 0) & U64

    # -- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _err(code: int) -> list[int]:
        return [FFA_ERROR, 0, code & U64]

    @staticmethod
    def _ok(*vals: int) -> list[int]:
        return [FFA_SUCCESS, *vals]

    def pages_in_use(self) -> set[int]:
        """Every pfn of every open transaction (the FF-A side's view, for the checkers)."""
        out: set[int] = set()
        for t in self.transactions.values():
            for addr, cnt in t.ranges():
                out.update(range(addr >> 12, (addr >> 12) + cnt))
        return out

    def _call(self, fid: int, r: list[int]) -> list[int]:
        if fid == FFA_VERSION:
            if (r[1] >> 16) & 0x7FFF != 1:
                return [FFA_RET_NOT_SUPPORTED & U64]
            self.version = min(r[1] & 0xFFFF_FFFF, FFA_VERSION_1_2)
            return [FFA_VERSION_1_2]
        if fid == FFA_ID_GET:
            return self._ok(0, 0)
        if fid == FFA_FEATURES:
            f = r[1] & 0xFFFF_FFFF
            if f in (FFA_FN64_RXTX_MAP, FFA_RXTX_MAP, FFA_MEM_SHARE, FFA_FN64_MEM_SHARE,
                     FFA_MEM_LEND, FFA_FN64_MEM_LEND, FFA_ID_GET, FFA_VERSION,
                     FFA_PARTITION_INFO_GET, FFA_MEM_RECLAIM, FFA_FN64_MEM_RETRIEVE_REQ):
                return self._ok(0, 0)  # RXTX_MAP: 4K minimum buffer
            return self._err(FFA_RET_NOT_SUPPORTED)
        if fid in (FFA_FN64_RXTX_MAP, FFA_RXTX_MAP):
            if self.mailbox is not None:
                return self._err(FFA_RET_DENIED)
            if r[3] & 0xFFFF_FFFF != 1 or (r[1] | r[2]) & (FFA_PAGE_SIZE - 1):
                return self._err(FFA_RET_INVALID_PARAMETERS)
            self.mailbox = (r[1], r[2])
            return self._ok()
        if fid == FFA_RXTX_UNMAP:
            if self.mailbox is None:
                return self._err(FFA_RET_INVALID_PARAMETERS)
            self.mailbox = None
            return self._ok()
        if fid == FFA_RX_RELEASE:
            if not self.rx_busy:
                return self._err(FFA_RET_DENIED)
            self.rx_busy = False
            return self._ok()
        if fid == FFA_PARTITION_INFO_GET:
            return self._part_info(r)
        if fid in (FFA_MEM_SHARE, FFA_FN64_MEM_SHARE, FFA_MEM_LEND, FFA_FN64_MEM_LEND):
            kind = "share" if (fid & 0xFF) == 0x73 else "lend"
            return self._mem_xfer(kind, r[1] & 0xFFFF_FFFF, r[2] & 0xFFFF_FFFF)
        if fid == FFA_MEM_FRAG_TX:
            return self._frag_tx(r[1] & 0xFFFF_FFFF | (r[2] & 0xFFFF_FFFF) << 32, r[3] & 0xFFFF_FFFF)
        if fid in (FFA_MEM_RETRIEVE_REQ, FFA_FN64_MEM_RETRIEVE_REQ):
            return self._retrieve_req(r[1] & 0xFFFF_FFFF)
        if fid == FFA_MEM_FRAG_RX:
            return self._frag_rx(r[3] & 0xFFFF_FFFF)
        if fid == FFA_MEM_RECLAIM:
            handle = r[1] & 0xFFFF_FFFF | (r[2] & 0xFFFF_FFFF) << 32
            t = self.transactions.get(handle)
            if t is None or not t.complete:
                return self._err(FFA_RET_INVALID_PARAMETERS)
            if t.retrieved:
                return self._err(FFA_RET_DENIED)
            del self.transactions[handle]
            return self._ok()
        return self._err(FFA_RET_NOT_SUPPORTED)

    def _tx(self, n: int) -> bytes:
        assert self.mailbox is not None
        return self.mem.read(self.mailbox[0], n)

    def _put_rx(self, data: bytes) -> bool:
        if self.mailbox is None or self.rx_busy:
            return False
        self.mem.write(self.mailbox[1], data[:FFA_PAGE_SIZE])
        self.rx_busy = True
        return True

    def _part_info(self, r: list[int]) -> list[int]:
        if r[5] & 1:
            return self._ok(0, len(self.partitions), PARTITION_INFO_SZ)
        data = b"".join(struct.pack("<HHI16s", pid, 1, 0x3, bytes(16)) for pid in self.partitions)
        if not self._put_rx(data):
            return self._err(FFA_RET_BUSY)
        return self._ok(0, len(self.partitions), PARTITION_INFO_SZ)

    def _mem_xfer(self, kind: str, length: int, fraglen: int) -> list[int]:
        if self.mailbox is None or fraglen > FFA_PAGE_SIZE or fraglen > length or fraglen < 48 + 16:
            return self._err(FFA_RET_INVALID_PARAMETERS)
        frag = self._tx(fraglen)
        sender, = struct.unpack_from("<H", frag, 0)
        ep_off, ep_count = struct.unpack_from("<I", frag, 32)[0], struct.unpack_from("<I", frag, 28)[0]
        if ep_count != 1 or ep_off + 16 > fraglen:
            return self._err(FFA_RET_INVALID_PARAMETERS)
        receiver, = struct.unpack_from("<H", frag, ep_off)
        if receiver not in self.partitions:
            return self._err(FFA_RET_INVALID_PARAMETERS)
        handle = self._next_handle
        self._next_handle += 1
        t = Transaction(handle, kind, sender, receiver, length, bytearray(frag))
        if self._overlaps(t, final=fraglen == length):
            return self._err(FFA_RET_DENIED)
        self.transactions[handle] = t
        if fraglen < length:
            return [FFA_MEM_FRAG_RX, handle & 0xFFFF_FFFF, handle >> 32, fraglen]
        if not self._well_formed(t):
            del self.transactions[handle]
            return self._err(FFA_RET_INVALID_PARAMETERS)
        t.complete = True
        return self._ok(0, handle & 0xFFFF_FFFF, handle >> 32)

    @staticmethod
    def _well_formed(t: Transaction) -> bool:
        """The composite region's range count and page total match the descriptor."""
        desc = bytes(t.received)
        ep_off, = struct.unpack_from("<I", desc, 32)
        if ep_off + 8 > len(desc):
            return False
        comp, = struct.unpack_from("<I", desc, ep_off + 4)
        if comp + 16 > len(desc):
            return False
        total, cnt = struct.unpack_from("<II", desc, comp)
        if comp + 16 + 16 * cnt != t.length:
            return False
        ranges = t.ranges()
        return len(ranges) == cnt and total == sum(n for _, n in ranges) and all(
            n and not a & (FFA_PAGE_SIZE - 1) for a, n in ranges)

    def _overlaps(self, t: Transaction, final: bool) -> bool:
        """The same page in two transactions (or twice in one) is refused."""
        mine: list[int] = []
        for addr, cnt in t.ranges():
            mine.extend(range(addr >> 12, (addr >> 12) + cnt))
        if len(set(mine)) != len(mine):
            return True
        others: set[int] = set()
        for o in self.transactions.values():
            if o is not t:
                for addr, cnt in o.ranges():
                    others.update(range(addr >> 12, (addr >> 12) + cnt))
        return bool(others & set(mine))

    def _frag_tx(self, handle: int, fraglen: int) -> list[int]:
        t = self.transactions.get(handle)
        if t is None or t.complete or self.mailbox is None or fraglen > FFA_PAGE_SIZE:
            return self._err(FFA_RET_INVALID_PARAMETERS)
        before = bytes(t.received)
        t.received += self._tx(fraglen)
        if len(t.received) > t.length or self._overlaps(t, final=False):
            t.received = bytearray(before)
            return self._err(FFA_RET_INVALID_PARAMETERS)
        if len(t.received) < t.length:
            return [FFA_MEM_FRAG_RX, handle & 0xFFFF_FFFF, handle >> 32, len(t.received)]
        if not self._well_formed(t):
            del self.transactions[handle]
            return self._err(FFA_RET_INVALID_PARAMETERS)
        t.complete = True
        return self._ok(0, handle & 0xFFFF_FFFF, handle >> 32)

    def _retrieve_req(self, length: int) -> list[int]:
        if self.mailbox is None or length < 48:
            return self._err(FFA_RET_INVALID_PARAMETERS)
        req = self._tx(length)
        handle, = struct.unpack_from("<Q", req, 8)
        t = self.transactions.get(handle)
        if t is None or not t.complete:
            return self._err(FFA_RET_INVALID_PARAMETERS)
        desc = bytes(t.received)
        first = desc[:FFA_PAGE_SIZE]
        if not self._put_rx(first):
            return self._err(FFA_RET_BUSY)
        self._retrieve = desc
        return [FFA_MEM_RETRIEVE_RESP, len(desc), len(first)]

    def _frag_rx(self, fragoff: int) -> list[int]:
        desc = self._retrieve
        if desc is None or fragoff >= len(desc):
            return self._err(FFA_RET_INVALID_PARAMETERS)
        chunk = desc[fragoff : fragoff + FFA_PAGE_SIZE]
        if not self._put_rx(chunk):
            return self._err(FFA_RET_BUSY)
        return [FFA_MEM_FRAG_TX, 0, 0, len(chunk)]

    # -- the secure partitions' side -----------------------------------------------------------
    def sp_retrieve(self, handle: int) -> bool:
        t = self.transactions.get(handle)
        if t is None or not t.complete:
            return False
        t.retrieved = True
        return True

    def sp_relinquish(self, handle: int) -> bool:
        t = self.transactions.get(handle)
        if t is None or not t.retrieved:
            return False
        t.retrieved = False
        return True
