"""The ghost of EL2's FF-A proxy (`nvhe/ffa.c`): predicts each host FF-A SMC and owns the
FF-A owner invariant.

Written from the kernel's `kvm_host_ffa_handler` and the functions it calls (6.12 and 7.2, the
differences as `Profile` fields), not from `pkvm.hyp`. At the SMC's entry the ghost reads the
pre-state through `pkvm.inspect` (the proxy's negotiated version and the host's mailbox, the
host's TX page, the pages the descriptor names) and computes:

* what EL2 answers by itself: INVALID_PARAMETERS before a version is negotiated, NOT_SUPPORTED
  for the calls `ffa_call_supported` refuses, the checks of RXTX_MAP/UNMAP, and of MEM_SHARE /
  MEM_LEND / MEM_FRAG_TX (`__do_ffa_mem_xfer`: reserved registers, lengths, the endpoint and
  composite offsets, whole constituents; then every range must be host-owned memory, or the
  call is DENIED and nothing changes);
* the post-state of every page the call may change: the mailbox pages shared with EL2 and
  pinned (host SHARED_OWNED, hyp SHARED_BORROWED, one more reference), released by
  RXTX_UNMAP; the ranges of a transfer host SHARED_OWNED with no hyp mapping when the secure
  world accepted it (share and lend alike: `__do_ffa_mem_xfer` uses `__pkvm_host_share_ffa`
  for both, so the host keeps access to lent pages), unchanged when it refused; and OWNED again
  after a successful MEM_RECLAIM, for exactly the ranges of that handle.

What the secure world answers a forwarded call is its own business (the ghost checks only that
the post-state matches the answer). The FF-A owner: after every FF-A SMC the secure world's
transactions hold exactly the ranges the ghost saw EL2 forward (`check_owner`), and at every full
check every host SHARED_OWNED RAM page with no hyp or guest borrower is held by the secure world
(`check_owner_full`). The kernel leaves one case behind: when a later fragment of a transaction
fails and the secure world drops the transaction, the earlier fragments' pages stay
SHARED_OWNED (`do_ffa_mem_frag_tx` only unshares the failing fragment); the ghost counts those
pages as `orphans` rather than reporting them.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from pkvm.abi import ffa as F
from pkvm.abi.profiles import ARM_SMCCC_CALL_HINTS
from pkvm.check.violations import InvariantViolation
from pkvm.inspect import PAGE_STATE_VALUES as V
from pkvm.machine.firmware import smc_func_id

if TYPE_CHECKING:
    from pkvm.board import TraceRecord

U32: Final = 0xFFFF_FFFF
U64: Final = 0xFFFF_FFFF_FFFF_FFFF
PAGE: Final = 4096
Ranges = list[tuple[int, int]]  # (first pfn, pages)

REFUSED: Final = frozenset({
    F.FFA_FN64_MEM_RETRIEVE_REQ, F.FFA_MEM_RETRIEVE_RESP, F.FFA_MEM_RELINQUISH,
    F.FFA_MEM_OP_PAUSE, F.FFA_MEM_OP_RESUME, F.FFA_MEM_FRAG_RX, F.FFA_FN64_MEM_DONATE,
    F.FFA_MSG_SEND, F.FFA_MSG_POLL, F.FFA_MSG_WAIT, F.FFA_MSG_SEND_DIRECT_RESP, F.FFA_RXTX_MAP,
    F.FFA_MEM_DONATE, F.FFA_MEM_RETRIEVE_REQ})
REFUSED_1_2: Final = frozenset({*F.FFA_NOTIFICATION_CALLS, F.FFA_MSG_SEND_DIRECT_REQ2,
                         F.FFA_MSG_SEND_DIRECT_RESP2, F.FFA_CONSOLE_LOG,
                         F.FFA_PARTITION_INFO_GET_REGS})
XFER: Final = frozenset({F.FFA_MEM_SHARE, F.FFA_FN64_MEM_SHARE, F.FFA_MEM_LEND, F.FFA_FN64_MEM_LEND})


def is_ffa_call(fid: int) -> bool:
    """`is_ffa_call`: a fast standard-secure-service call, function number 0x60..0xFF."""
    return bool(fid >> 31 & 1) and (fid >> 24) & 0x3F == 4 and 0x60 <= fid & 0xFFFF <= 0xFF


def _s32(v: int) -> int:
    v &= U32
    return v - (1 << 32) if v >> 31 else v


@dataclass
class Plan:
    """What the ghost expects of one FF-A SMC."""

    kind: str  # "error" | "version" | "map" | "unmap" | "xfer" | "frag" | "reclaim" | "any"
    code: int = 0  # for "error": the FFA_RET_* EL2 answers
    ranges: Ranges = field(default_factory=list)  # pages the call moves (xfer/frag/map/unmap)
    handle: int = 0
    fraglen: int = 0
    length: int = 0
    req: int = 0  # FFA_VERSION's requested version
    pre: dict[int, tuple[str, str, int, int] | None] = field(default_factory=dict)


class FfaGhost:
    """Installed on a machine by the ghost (`pkvm.check.ghost`): interposed on the SMC door
    (`Machine.interpose_smc`) to see each SMC's pre-state; `after_call` is called with every
    trace record."""

    def __init__(self, machine: Any, fail: Callable[[str, Any, Any], None]):
        self.m = machine
        self.ins = machine.inspect
        self.prof = self.ins.profile
        self.fail = fail
        self.transactions: dict[int, Ranges] = {}  # handle -> ranges EL2 shared for it
        self.orphans: Ranges = []  # pages the kernel leaves SHARED_OWNED (see the module doc)
        self.plan: Plan | None = None
        self.predicted = 0
        base, size = machine.carveout  # (the "hyp" region of `machine.memory_map()`)
        self._carve = (base >> 12, (base + size) >> 12)
        machine.interpose_smc(self._interpose)

    def _interpose(self, proceed: Callable[..., Any], cpu: int, func: Any,
                   args: tuple[int, ...], imm: int) -> Any:
        self.before_call(cpu, func, args, imm)
        return proceed(cpu, func, args, imm)

    # -- entry ----------------------------------------------------------------------------
    def before_call(self, cpu: int, func: Any, args: tuple[int, ...], imm: int) -> None:
        self.plan = None
        try:
            x0 = smc_func_id(func) if isinstance(func, str) else func & U64
        except ValueError:
            return
        if self.prof.smc_refuses_imm_and_upper and (imm or (x0 & ~ARM_SMCCC_CALL_HINTS) >> 32):
            return
        fid = x0 & ~ARM_SMCCC_CALL_HINTS & U32
        if not is_ffa_call(fid):
            return
        regs = [a & U64 for a in args] + [0] * (17 - len(args))
        self.plan = self._predict(fid, [x0, *regs])

    def _predict(self, fid: int, r: list[int]) -> Plan:
        p = self.ins.ffa_proxy() or {"negotiated": False, "host_tx": 0, "version": 0,
                                     "desc_len": 0}
        if fid != F.FFA_VERSION and not p["negotiated"]:
            return Plan("error", F.FFA_RET_INVALID_PARAMETERS)
        if fid == F.FFA_VERSION:
            return Plan("version", req=r[1] & U32)
        if fid == F.FFA_FEATURES:
            f = r[1] & U32
            if f in REFUSED or (self.prof.ffa_refuses_1_2_calls and f in REFUSED_1_2):
                return Plan("error", F.FFA_RET_NOT_SUPPORTED)
            return Plan("features" if f in XFER else "any")
        if fid == F.FFA_FN64_RXTX_MAP:
            return self._map(p, r)
        if fid == F.FFA_RXTX_UNMAP:
            if r[1] & U32 or not p["host_tx"]:
                return Plan("error", F.FFA_RET_INVALID_PARAMETERS)
            return self._with_pre(Plan("unmap", ranges=[(p["host_tx"] >> 12, 1),
                                                        (p["host_rx"] >> 12, 1)]))
        if fid in XFER:
            return self._xfer(p, r)
        if fid == F.FFA_MEM_FRAG_TX:
            return self._frag(p, r)
        if fid == F.FFA_MEM_RECLAIM:
            h = (r[1] & U32) | (r[2] & U32) << 32
            return self._with_pre(Plan("reclaim", ranges=list(self.transactions.get(h, [])),
                                       handle=h))
        if fid == F.FFA_PARTITION_INFO_GET and not p["host_rx"]:
            return Plan("error", F.FFA_RET_BUSY)
        if fid in REFUSED or (self.prof.ffa_refuses_1_2_calls and fid in REFUSED_1_2):
            return Plan("error", F.FFA_RET_NOT_SUPPORTED)
        return Plan("any")

    def _with_pre(self, plan: Plan) -> Plan:
        for pfn, n in plan.ranges:
            for q in self._ram_pfns(pfn, n):
                plan.pre[q] = self.ins.page_quick(q)
        return plan

    def _ram_pfns(self, pfn: int, n: int) -> range:
        lo, hi = self.ins.ram_range()
        return range(max(pfn, lo >> 12), min(pfn + n, hi >> 12))

    # -- RXTX_MAP -------------------------------------------------------------------------
    def _share_hyp_ok(self, pfn: int) -> bool:
        """`__pkvm_host_share_hyp` of one page would succeed (`__pkvm_host_share_hyp`'s checks)."""
        q = self.ins.page_quick(pfn)
        if q is None or q[0] != "OWNED":
            return False
        return not self.prof.host_transitions_check_hyp_state or q[1] == "NOPAGE"

    def _map(self, p: dict[str, Any], r: list[int]) -> Plan:
        tx, rx, npages = r[1], r[2], r[3] & U32
        if npages != 1 or tx & (PAGE - 1) or rx & (PAGE - 1):
            return Plan("error", F.FFA_RET_INVALID_PARAMETERS)
        if p["host_tx"]:
            return Plan("error", F.FFA_RET_DENIED)
        if tx == rx or not self._share_hyp_ok(tx >> 12) or not self._share_hyp_ok(rx >> 12):
            return Plan("error", F.FFA_RET_INVALID_PARAMETERS)
        return self._with_pre(Plan("map", ranges=[(tx >> 12, 1), (rx >> 12, 1)]))

    # -- MEM_SHARE / MEM_LEND / MEM_FRAG_TX -------------------------------------------------
    def _xfer(self, p: dict[str, Any], r: list[int]) -> Plan:
        length, fraglen = r[1] & U32, r[2] & U32
        version = p["version"]
        strict = self.prof.ffa_strict_descriptors
        if r[3] or r[4] & U32 or fraglen > length or fraglen > PAGE:
            return Plan("error", F.FFA_RET_INVALID_PARAMETERS)
        region = F.FFA_MEM_REGION_SZ if version > F.FFA_VERSION_1_0 else F.FFA_MEM_REGION_SZ_1_0
        esize = F.ffa_emad_size(version) if strict else 16
        if fraglen < ((region + esize) if strict else F.FFA_MEM_REGION_SZ + 16):
            return Plan("error", F.FFA_RET_INVALID_PARAMETERS)
        if not p["host_tx"]:
            return Plan("error", F.FFA_RET_INVALID_PARAMETERS)
        if length > p["desc_len"]:
            return Plan("error", F.FFA_RET_NO_MEMORY)
        buf = self.ins.read(p["host_tx"], fraglen)
        if version <= F.FFA_VERSION_1_0:
            em_off = F.FFA_EP_MEM_OFFSET_OFF
        elif strict:
            em_off, = struct.unpack_from("<I", buf, F.FFA_EP_MEM_OFFSET_OFF)
        else:
            em_off = F.FFA_MEM_REGION_SZ
        if strict and em_off + esize > fraglen:
            return Plan("error", F.FFA_RET_INVALID_PARAMETERS)
        sender, = struct.unpack_from("<H", buf, 0)
        ep_count, = struct.unpack_from("<I", buf, 28)
        composite, = struct.unpack_from("<I", buf, em_off + 4)
        if not composite or ep_count != 1 or sender != 0:
            return Plan("error", F.FFA_RET_INVALID_PARAMETERS)
        first = composite + F.FFA_COMPOSITE_SZ
        if first > U32 or fraglen < first or (fraglen - first) % F.FFA_RANGE_SZ:
            return Plan("error", F.FFA_RET_INVALID_PARAMETERS)
        ranges = self._share_ranges(buf, first, (fraglen - first) // F.FFA_RANGE_SZ)
        if ranges is None:
            return Plan("error", F.FFA_RET_DENIED)
        return self._with_pre(Plan("xfer", ranges=ranges, fraglen=fraglen, length=length))

    def _frag(self, p: dict[str, Any], r: list[int]) -> Plan:
        handle = (r[1] & U32) | (r[2] & U32) << 32
        fraglen = r[3] & U32
        if fraglen > PAGE or fraglen % F.FFA_RANGE_SZ or not p["host_tx"]:
            return Plan("error", F.FFA_RET_INVALID_PARAMETERS)
        buf = self.ins.read(p["host_tx"], fraglen) if fraglen else b""
        ranges = self._share_ranges(buf, 0, fraglen // F.FFA_RANGE_SZ)
        if ranges is None:
            return Plan("frag-denied", F.FFA_RET_DENIED, handle=handle)
        return self._with_pre(Plan("frag", ranges=ranges, handle=handle, fraglen=fraglen))

    def _share_ranges(self, buf: bytes, off: int, n: int) -> Ranges | None:
        """`ffa_host_share_ranges`: the (pfn, pages) each constituent shares, or None when one
        of them cannot be shared (the call is DENIED and the earlier ones are rolled back)."""
        out: Ranges = []
        taken: set[int] = set()
        for i in range(n):
            addr, cnt = struct.unpack_from("<QI", buf, off + F.FFA_RANGE_SZ * i)
            if self.prof.ffa_strict_descriptors and addr & (PAGE - 1):
                return None
            pfn = addr >> 12
            if not self._shareable(pfn, cnt, taken):
                return None
            if cnt:
                out.append((pfn, cnt))
                taken.update(range(pfn, pfn + cnt))
        return out

    def _shareable(self, pfn: int, n: int, taken: set[int]) -> bool:
        """`__pkvm_host_share_ffa(pfn, n)` would succeed: every page host-owned memory (pages
        `taken` by earlier ranges of the same call are SHARED_OWNED by now). 7.2 first checks
        the range against the host's IPA space (`pfn_range_is_valid`) and then finds its
        region (`check_range_allowed_memory`); 6.12 reads each page's state from the host
        stage-2, where a page that is not memory is NOPAGE (`host_get_page_state`)."""
        lo, hi = (a >> 12 for a in self.ins.ram_range())
        limit = 1 << (self.ins.host_ia_bits() - 12)
        if self.prof.ffa_share_checks_pfn_range and not (pfn < limit and n <= limit - pfn):
            return False
        if not n:
            return True
        if not (lo <= pfn and pfn + n <= hi):
            return False
        for q in range(pfn, pfn + n):
            st = self.ins.page_quick(q)
            if q in taken or st is None or st[0] != "OWNED":
                return False
        return True

    # -- after the call ------------------------------------------------------------------
    def after_call(self, rec: TraceRecord, changed: set[int]) -> None:
        plan, self.plan = self.plan, None
        if rec.name.startswith("smc:") and plan is not None:
            self._judge(rec, plan, changed)
            self.check_owner()

    def _judge(self, rec: Any, plan: Plan, changed: set[int]) -> None:
        self.predicted += 1
        what = f"{rec.name}{tuple(hex(a) for a in rec.args[:4])}"
        path = rec.name.split(":")[1]
        res0, res2 = rec.x0 & U64, _s32(rec.x2)
        if plan.kind in ("error", "frag-denied"):
            if path != "ffa" or res0 != F.FFA_ERROR or res2 != plan.code:
                self.fail(f"FF-A {what}: EL2's answer", ("FFA_ERROR", plan.code),
                          (path, hex(res0), res2))
            if plan.kind == "frag-denied" and plan.handle in self.transactions:
                self.orphans += self.transactions.pop(plan.handle)
            self._frame(what, changed, set())
            return
        if path != "ffa" and plan.kind != "any":
            self.fail(f"FF-A {what}: routed to", "ffa", path)
        moved = {q for pfn, n in plan.ranges for q in self._ram_pfns(pfn, n)}
        want: tuple[str, str, int] | None = None  # what every page of `moved` becomes
        if plan.kind == "version":
            self._version(what, plan, res0)
        elif plan.kind == "features":
            if res0 != F.FFA_SUCCESS or rec.x2:
                self.fail(f"FF-A {what}: FEATURES of a memory transfer", (F.FFA_SUCCESS, 0),
                          (hex(res0), rec.x2))
        elif plan.kind == "map":
            if res0 == F.FFA_SUCCESS:
                want = ("SHARED_OWNED", "SHARED_BORROWED", 1)
        elif plan.kind == "unmap":
            if res0 != F.FFA_SUCCESS:
                self.fail(f"FF-A {what}: RXTX_UNMAP of the mapped mailbox", "FFA_SUCCESS",
                          hex(res0))
            want = ("OWNED", "NOPAGE", -1)
        elif plan.kind in ("xfer", "frag"):
            if self._transfer(rec, plan, res0):
                want = ("SHARED_OWNED", "NOPAGE", 0)
        elif plan.kind == "reclaim":
            if self._reclaim(plan, what, res0):
                want = ("OWNED", "NOPAGE", 0)
        for q in moved:
            self._expect(what, q, plan, want)
        self._frame(what, changed, moved)

    def _expect(self, what: str, q: int, plan: Plan, want: tuple[str, str, int] | None) -> None:
        """Page q after the call: `want` (host, hyp, refcount delta), or unchanged."""
        pre, post = plan.pre.get(q), self.ins.page_quick(q)
        if pre is None:
            return
        exp = pre if want is None else (want[0], want[1], pre[2] + want[2], pre[3])
        if post != exp:
            self.fail(f"FF-A {what}: post-state of pfn {q:#x} (host, hyp, refcount, guest "
                      f"shares)", exp, post)

    def _transfer(self, rec: Any, plan: Plan, res0: int) -> bool:
        """Did the secure world accept the forwarded transfer? (then its ranges are shared)"""
        if plan.kind == "xfer":
            if plan.fraglen == plan.length:
                ok = res0 == F.FFA_SUCCESS
                handle = (rec.x2 & U32) | (rec.x3 & U32) << 32
            else:
                ok = res0 == F.FFA_MEM_FRAG_RX and rec.x3 & U32 == plan.fraglen
                handle = (rec.x1 & U32) | (rec.x2 & U32) << 32
        else:
            ok = res0 in (F.FFA_SUCCESS, F.FFA_MEM_FRAG_RX)
            handle = plan.handle
        if ok:
            self.transactions.setdefault(handle, []).extend(plan.ranges)
        elif plan.kind == "frag" and handle in self.transactions:
            spmc = self.m.firmware.spmc
            if spmc is None or handle not in spmc.transactions:  # the secure world dropped it
                self.orphans += self.transactions.pop(handle)
        return ok

    def _reclaim(self, plan: Plan, what: str, res0: int) -> bool:
        if res0 != F.FFA_SUCCESS:
            return False
        if plan.handle not in self.transactions:
            self.fail(f"FF-A {what}: a reclaim succeeded", "a handle EL2 forwarded",
                      hex(plan.handle))
        del self.transactions[plan.handle]
        return True

    def _version(self, what: str, plan: Plan, res0: int) -> None:
        p = self.ins.ffa_proxy() or {"negotiated": False, "version": 0}
        req = plan.req
        if (req >> 16) & 0x7FFF != 1:
            if res0 != F.FFA_RET_NOT_SUPPORTED & U64:
                self.fail(f"FF-A {what}: FFA_VERSION of major != 1", "NOT_SUPPORTED", hex(res0))
            return
        if res0 == F.FFA_RET_NOT_SUPPORTED & U64:
            return
        if not p["negotiated"] or res0 != p["version"]:
            self.fail(f"FF-A {what}: FFA_VERSION's answer is the negotiated version",
                      hex(p["version"]), hex(res0))
        if self.prof.ffa_refuses_downgrade_after_negotiation and req & 0xFFFF < res0 & 0xFFFF:
            self.fail(f"FF-A {what}: a downgrade after negotiation", "NOT_SUPPORTED", hex(res0))

    def _frame(self, what: str, changed: set[int], allowed: set[int]) -> None:
        """No page outside the hyp's carve-out changed but those the call names (inside it,
        EL2's page-table pages come and go with its stage-1 mappings)."""
        lo, hi = self._carve
        extra = {p for p in changed - allowed if not lo <= p < hi}
        if extra:
            self.fail(f"FF-A {what} changed pages it does not name", sorted(hex(p) for p in
                                                                          allowed)[:8],
                      sorted(hex(p) for p in extra)[:8])

    # -- the FF-A owner ----------------------------------------------------------------
    def check_owner(self) -> None:
        """The secure world holds exactly the ranges EL2 forwarded, per handle; every RAM page
        of them is host SHARED_OWNED and not the hyp's."""
        spmc = self.m.firmware.spmc
        held = {h: sorted((a >> 12, n) for a, n in sent_ranges(bytes(t.received)) if n)
                for h, t in (spmc.transactions.items() if spmc is not None else ())}
        mine = {h: sorted(r) for h, r in self.transactions.items()}
        if held != mine:
            self.fail("FF-A owner: the secure world's transactions (handle: (pfn, pages))",
                      mine, held)
        for ranges in mine.values():
            for pfn, n in ranges:
                for q in self._ram_pfns(pfn, n):
                    st = self.ins.page_quick(q)
                    if st is None or st[:2] != ("SHARED_OWNED", "NOPAGE"):
                        self.fail(f"FF-A owner: pfn {q:#x} in a transaction",
                                  ("SHARED_OWNED", "NOPAGE"), st)


def sent_ranges(desc: bytes) -> list[tuple[int, int]]:
    """Every constituent (address, pages) the secure world was sent for one transaction: the
    16-byte entries after the composite header to the end of what it received, all fragments
    included (whatever the composite's range count claims)."""
    if len(desc) < F.FFA_MEM_REGION_SZ:
        return []
    ep_off, = struct.unpack_from("<I", desc, F.FFA_EP_MEM_OFFSET_OFF)
    if ep_off + 8 > len(desc):
        return []
    comp, = struct.unpack_from("<I", desc, ep_off + 4)
    first = comp + F.FFA_COMPOSITE_SZ
    return [struct.unpack_from("<QI", desc, o)
            for o in range(first, len(desc) - F.FFA_RANGE_SZ + 1, F.FFA_RANGE_SZ)]


def check_owner_full(ins: Any, firmware: Any, excused: Ranges | None = None) -> None:
    """Every host SHARED_OWNED RAM page that neither the hyp nor a guest borrows is held by the
    secure world (or is one of the kernel's `excused` leftovers), and every RAM page the secure
    world holds is host SHARED_OWNED and not the hyp's."""
    spmc = firmware.spmc
    host, hyp, guests = ins.page_states()
    base = ins.ram_range()[0] >> 12
    n = len(host)
    held = bytearray(n)
    for rngs in ([(a >> 12, k) for a, k in sent_ranges(bytes(t.received))] for t in
                 (spmc.transactions.values() if spmc is not None else ())):
        for pfn, k in rngs:
            lo, hi = max(pfn - base, 0), min(pfn + k - base, n)
            if lo < hi:
                held[lo:hi] = b"\1" * (hi - lo)
    for pfn, k in excused or ():
        lo, hi = max(pfn - base, 0), min(pfn + k - base, n)
        if lo < hi:
            held[lo:hi] = b"\2" * (hi - lo)
    so, sb, nopage = V["SHARED_OWNED"], V["SHARED_BORROWED"], V["NOPAGE"]
    for i in range(n):
        if held[i] == 1 and (host[i] != so or hyp[i] != nopage):
            raise InvariantViolation("ffa-owner", f"pfn {base + i:#x} is held by the secure "
                                     f"world but host {host[i]} hyp {hyp[i]}", base + i)
        if host[i] == so and hyp[i] != sb and (base + i) not in guests and not held[i]:
            raise InvariantViolation("ffa-owner", f"pfn {base + i:#x} is host SHARED_OWNED with "
                                     "no hyp, guest or secure-world borrower", base + i)
