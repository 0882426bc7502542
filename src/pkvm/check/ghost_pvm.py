"""The ghost of a protected guest's own pKVM calls: the HVCs EL2 answers during `__kvm_vcpu_run`.

Written from `nvhe/pkvm.c` (`kvm_handle_pvm_hvc64`, `pkvm_memshare_call`,
`pkvm_memunshare_call`, `__pkvm_memshare_page_req`) and `nvhe/mem_protect.c`
(`__pkvm_guest_share_host`, `__pkvm_guest_unshare_host`, `get_valid_guest_pte`). Linux 7.2
answers four vendor-hypervisor calls at EL2 — FEATURES, HYP_MEMINFO, MEM_SHARE, MEM_UNSHARE —
and hands every other guest HVC to the host (6.12 has no protected guests: its guests' HVCs all
go to the host).

The seam: `Inspector.watch_guest_hvcs` calls the ghost at the entry and the exit of every guest
HVC EL2 handles. At entry the ghost abstracts the guest's x0..x3 and PC, the guest stage-2 leaf
at the IPA a MEM_SHARE/UNSHARE names and the host state of the page it maps, and predicts: the
guest's x0..x3 after (the SMCCC result written with `smccc_set_retval`, or untouched when EL2
exits to the host), whether EL2 handled the call, the PC (rewound by 4 for the "page not mapped
yet" exit, so that the HVC replays once the host has faulted the page in; else unchanged), the
fake data abort that exit reports (ESR, HPFAR), and the post-state: guest leaf OWNED → SHARED_OWNED
and host NOPAGE → SHARED_BORROWED for a share, back for an unshare, nothing for a refusal. At
exit it compares. A mismatch is kept and reported when the host's `__kvm_vcpu_run` returns (the
ghost never raises inside EL2); the pages the guest's calls changed are handed to the run's
frame (`CallsGhost.guest_pages`): a run may change no other page state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from pkvm.arch.pgtable import KVM_PGTABLE_PROT_RWX
from pkvm.check.ghost_calls import CallsGhost
from pkvm.check.ghost_guest import Leaf
from pkvm.errors import E2BIG, EHWPOISON, ENOENT, EPERM
from pkvm.machine.memory import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from pkvm.board import TraceRecord

U64: Final = 0xFFFF_FFFF_FFFF_FFFF
RET_SUCCESS: Final = 0
RET_INVALID_PARAMETER: Final = (-3) & U64
FEATURES_FID: Final = 0x8600_0000  # ARM_SMCCC_VENDOR_HYP_KVM_FEATURES_FUNC_ID
MEMINFO_FID: Final = 0xC600_0002  # ..._HYP_MEMINFO_FUNC_ID
MEM_SHARE_FID: Final = 0xC600_0003
MEM_UNSHARE_FID: Final = 0xC600_0004
# FEATURES: bits of ARM_SMCCC_KVM_FUNC_FEATURES, _HYP_MEMINFO, _MEM_SHARE, _MEM_UNSHARE
PVM_FEATURES: Final = (1 << 0) | (1 << 2) | (1 << 3) | (1 << 4)
# `__pkvm_memshare_page_req`: DABT_LOW, IL, WnR, translation fault at level 3
MEMSHARE_FAULT_ESR: Final = (0x24 << 26) | (1 << 25) | (1 << 6) | 0x04 | 3
HPFAR_NS: Final = 1 << 63
HPFAR_MASK: Final = U64 & ~0xF

NAMES = {FEATURES_FID: "FEATURES", MEMINFO_FID: "HYP_MEMINFO", MEM_SHARE_FID: "MEM_SHARE",
         MEM_UNSHARE_FID: "MEM_UNSHARE"}


class PvmGhost:
    """Predicts each guest HVC EL2 handles; reports through `fail` after the host's run."""

    def __init__(self, inspect: Any, calls: CallsGhost, fail: Callable[[str, Any, Any], None]):
        self.i = inspect
        self.calls = calls
        self.fail = fail
        self.judged = calls.judged
        self.want: dict[str, Any] | None = None
        self.mismatch: tuple[str, Any, Any] | None = None
        self.pages: set[int] = set()  # pfns the guest's calls changed in the current run
        inspect.watch_guest_hvcs(self._watch)

    def _watch(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "entry":
            self.want = self.predict(info)
            return
        want, self.want = self.want, None
        if want is None or self.mismatch is not None:
            return
        self.judged[f"guest {want['call']}"] += 1
        self.mismatch = self.compare(want, info)
        if want["pfn"] is not None and want["ret"] == 0:
            self.pages.add(want["pfn"])

    # -- prediction -------------------------------------------------------------------------
    def _guest_pte(self, handle: int, ipa: int) -> tuple[int, Leaf | None]:
        """`get_valid_guest_pte`: 0 and the leaf, or the errno."""
        leaf = Leaf.of(self.i.guest_leaf(handle, ipa))
        if leaf is None:
            return -ENOENT, None
        if leaf.ret:
            return leaf.ret, leaf
        if leaf.state == "POISON":
            return -EHWPOISON, leaf
        if leaf.pa is None:
            return -ENOENT, leaf
        if leaf.level != 3:
            return -E2BIG, leaf
        return 0, leaf

    def _host(self, pfn: int) -> str | None:
        p = self.i.page_quick(pfn)
        return None if p is None else p[0]

    def predict(self, info: dict[str, Any]) -> dict[str, Any]:
        regs, pc = list(info["regs"]), info["pc"]
        fid, a1, a2, a3 = regs[0] & 0xFFFF_FFFF, regs[1], regs[2], regs[3]
        want: dict[str, Any] = {"call": NAMES.get(fid, f"{fid:#x} (to the host)"),
                                "handled": True, "pc": pc, "fault": None, "pfn": None,
                                "ret": None, "handle": info["handle"], "ipa": a1,
                                "regs": [RET_INVALID_PARAMETER, 0, 0, 0]}
        if fid == FEATURES_FID:
            want["regs"][0] = PVM_FEATURES
        elif fid == MEMINFO_FID:
            if not (a1 or a2 or a3):
                want["regs"][0] = PAGE_SIZE
        elif fid in (MEM_SHARE_FID, MEM_UNSHARE_FID):
            if not (a2 or a3) and not a1 & (PAGE_SIZE - 1):
                self._predict_mem(want, fid == MEM_SHARE_FID, regs)
        else:  # "Punt everything else back to the host"
            want.update(handled=False, regs=regs)
        return want

    def _predict_mem(self, want: dict[str, Any], share: bool, regs: list[int]) -> None:
        ipa = want["ipa"]
        ret, leaf = self._guest_pte(want["handle"], ipa)
        want["leaf"] = leaf
        if not ret:
            assert leaf is not None and leaf.pa is not None
            want["pfn"] = pfn = leaf.pa >> PAGE_SHIFT
            want["host"] = self._host(pfn)
            g_from, h_from = ("OWNED", "NOPAGE") if share else ("SHARED_OWNED", "SHARED_BORROWED")
            if leaf.state != g_from or want["host"] != h_from:
                ret = -EPERM
        want["ret"] = ret
        if ret == 0:
            want["regs"][0] = RET_SUCCESS
        elif ret == -ENOENT and share:  # exit to the host to fault the page in; then replay
            hpfar = (HPFAR_NS | (ipa >> 8)) & HPFAR_MASK
            want.update(handled=False, regs=regs, pc=(want["pc"] - 4) & U64,
                        fault=(MEMSHARE_FAULT_ESR, hpfar))

    # -- comparison -------------------------------------------------------------------------
    def compare(self, want: dict[str, Any], got: dict[str, Any]) -> tuple[str, Any, Any] | None:
        call = f"guest {want['call']} (ipa {want['ipa']:#x})"
        if got["handled"] != want["handled"]:
            return f"{call}: answered at EL2", want["handled"], got["handled"]
        if list(got["regs"]) != want["regs"]:
            return (f"{call}: the guest's x0..x3 after", [hex(r) for r in want["regs"]],
                    [hex(r) for r in got["regs"]])
        if got["pc"] != want["pc"]:
            return f"{call}: the guest's PC after", hex(want["pc"]), hex(got["pc"])
        if want["fault"] is not None and tuple(got["fault"]) != want["fault"]:
            return (f"{call}: the fake data abort (ESR, HPFAR) for the host",
                    tuple(map(hex, want["fault"])), tuple(map(hex, got["fault"])))
        if want["ret"] is None:
            return None
        leaf = Leaf.of(self.i.guest_leaf(want["handle"], want["ipa"]))
        pfn = want["pfn"]
        if want["ret"]:
            if leaf != want["leaf"]:
                return f"{call} refused: the guest leaf", want["leaf"], leaf
            if pfn is not None and self._host(pfn) != want["host"]:
                return f"{call} refused: the host state", want["host"], self._host(pfn)
            return None
        share = want["call"] == "MEM_SHARE"
        old = want["leaf"]
        exp = Leaf(0, "SHARED_OWNED" if share else "OWNED", 3, old.pa, KVM_PGTABLE_PROT_RWX,
                   leaf.young if leaf is not None else False)
        if leaf != exp:
            return f"{call}: the guest leaf after", exp, leaf
        host = "SHARED_BORROWED" if share else "NOPAGE"
        if self._host(pfn) != host:
            return f"{call}: host state of page {pfn:#x} after", host, self._host(pfn)
        return None

    # -- at the host's run ------------------------------------------------------------------
    def after_call(self, rec: TraceRecord) -> None:
        """At the end of a host hypercall: report a kept mismatch, hand the run its pages."""
        if rec.name != "__kvm_vcpu_run":
            return
        bad, self.mismatch = self.mismatch, None
        self.calls.guest_pages, self.pages = self.pages, set()
        if bad is not None:
            self.fail(*bad)
