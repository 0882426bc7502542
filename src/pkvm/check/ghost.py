"""The ghost: a small abstract specification checked against the model after each hypercall.

It is written from the spec alone (`memory.md` §4.3–§4.4 for host↔hyp sharing, `vm-state.md` for
the VM table), not from the hyp code. Two parts:

* **Pages** — for `__pkvm_host_share_hyp` / `__pkvm_host_unshare_hyp` the ghost abstracts the
  concrete pre-state of the page the call names (host state, hyp state, pins) at hypercall entry,
  computes the expected `x1` and abstract post-state, and compares both with the concrete result.
  In 7.2 it also checks the frame condition: no other page's `hyp_vmemmap` entry changed.
* **VM table** — the ghost keeps its own abstract table (free / reserved / live VM with its dying
  flag, created vCPU count, initialised and loaded vCPUs) and each CPU's loaded vCPU. VM-table
  calls are predicted (result and post-state); every call's concrete table must then equal the
  ghost's. Choices the spec leaves to the implementation (which vCPU index `init_vcpu` filled)
  are read back from the concrete state once checked to be allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from pkvm.abi import sizes
from pkvm.errors import EBUSY, EINVAL, ENOENT, ENOMEM, EPERM, ERANGE
from pkvm.hyp.memory import PageState
from pkvm.machine.memory import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from pkvm.board import TraceRecord
    from pkvm.check.invariants import Checker

U64 = 0xFFFF_FFFF_FFFF_FFFF


def range_errno(lo: int, hi: int, phys: int, size: int) -> int:
    """7.2's `check_range_allowed_memory` over [phys, phys + size) with RAM at [lo, hi): the
    range must lie in one region or gap (`find_mem_range`; the last gap ends at ULONG_MAX,
    exclusive), else -EINVAL; outside RAM, -EPERM."""
    last = (phys + size - 1) & U64
    if lo <= phys < hi:
        rs, re_ = lo, hi
    elif phys < lo:
        rs, re_ = 0, lo
    else:
        rs, re_ = hi, U64
    if not rs <= last < re_:
        return -EINVAL
    return 0 if lo <= phys < hi else -EPERM
OWNED, SO, SB, NOPAGE = (PageState.OWNED, PageState.SHARED_OWNED, PageState.SHARED_BORROWED,
                         PageState.NOPAGE)


@dataclass(frozen=True)
class GhostVm:
    dying: bool
    created: int
    vcpus: frozenset[int]
    loaded: tuple[tuple[int, int], ...]  # (vcpu idx, cpu), sorted


RESERVED = "reserved"
VM_TABLE_CALLS = frozenset({
    "__pkvm_reserve_vm", "__pkvm_unreserve_vm", "__pkvm_init_vm", "__pkvm_init_vcpu",
    "__pkvm_vcpu_load", "__pkvm_vcpu_put", "__pkvm_start_teardown_vm",
    "__pkvm_finalize_teardown_vm", "__pkvm_teardown_vm",
})


@dataclass
class GhostPage:
    host: PageState
    hyp: PageState
    pins: int


@dataclass
class Ghost:
    checker: Checker
    table: list[Any] = field(default_factory=list)  # None | RESERVED | GhostVm
    pre_page: tuple[int, GhostPage | None] | None = None

    def __post_init__(self) -> None:
        from pkvm.check.ghost_guest import GuestGhost

        self.table = self.abstract_table()
        self.guest = GuestGhost(self.checker.machine.inspect,
                                lambda what, want, found: self._fail(None, what, want, found))
        from pkvm.check.ghost_ffa import FfaGhost  # the FF-A proxy's SMCs

        self.ffa = FfaGhost(self.checker.machine,
                            lambda what, want, found: self._fail(None, what, want, found))

    # -- abstraction functions --------------------------------------------------------------
    def abstract_table(self) -> list[Any]:
        from pkvm.hyp.pkvm import RESERVED_ENTRY, PkvmHypVm

        h = self.checker.h
        out: list[Any] = []
        for slot in h.vm_table or []:
            if slot is None:
                out.append(None)
            elif slot is RESERVED_ENTRY:
                out.append(RESERVED)
            elif not hasattr(slot, "vcpus"):
                out.append(f"not a hyp VM: {slot!r}")
            else:
                assert isinstance(slot, PkvmHypVm)
                vcpus = frozenset(v.vcpu_idx for v in slot.vcpus if v is not None)
                loaded = tuple(sorted((v.vcpu_idx, v.loaded_on) for v in slot.vcpus
                                      if v is not None and v.loaded_on is not None))
                out.append(GhostVm(slot.is_dying, slot.created_vcpus, vcpus, loaded))
        return out

    def abstract_page(self, phys: int) -> GhostPage | None:
        h = self.checker.h
        if not h.mem.is_ram(phys):
            return None
        host, hyp = self.checker.page_states(phys >> PAGE_SHIFT)
        return GhostPage(host, hyp, h.vmemmap.page_count(phys))

    # -- hooks ------------------------------------------------------------------------------
    def before_call(self, cpu: int, func: Any, args: tuple[int, ...]) -> None:
        self.pre_page = None
        name = func if isinstance(func, str) else None
        if name in ("__pkvm_host_share_hyp", "__pkvm_host_unshare_hyp") and args:
            phys = (args[0] << PAGE_SHIFT) & U64
            self.pre_page = (phys, self.abstract_page(phys))
        if name is not None and self.checker.h.profile.explicit_vcpu_load:
            self.guest.before(cpu, name, args, self.checker.h.profile.handle)

    def after_call(self, rec: TraceRecord, changed: set[int], full: bool = False) -> None:
        self.ffa.after_call(rec, changed)
        if rec.x0 == 0:
            self.guest.after(rec)
        if rec.x0 != 0 or rec.name not in VM_TABLE_CALLS:
            if full:
                self._compare_table(rec, self.table)
            else:
                self._quick_compare(rec)
            if rec.x0 != 0:
                return
        if rec.name in ("__pkvm_host_share_hyp", "__pkvm_host_unshare_hyp") and self.pre_page:
            self._page_call(rec, changed)
        if rec.name in VM_TABLE_CALLS:
            self._table_call(rec)

    def _fail(self, rec: TraceRecord | None, what: str, expected: Any, found: Any) -> None:
        from pkvm.check.invariants import InvariantViolation

        raise InvariantViolation("ghost", what, None, expected, found)

    # -- host <-> hyp sharing (memory.md §4.3, §4.4) ------------------------------------------
    def _range_errno(self, phys: int) -> int:
        """The errno of the range/memory checks for one page at `phys`, or 0."""
        h = self.checker.h
        lo, hi = h.mem.base, h.mem.end
        if h.profile.page_state_in_vmemmap:
            return range_errno(lo, hi, phys, PAGE_SIZE)
        if phys + PAGE_SIZE > 1 << 48:
            return -ERANGE
        return 0 if lo <= phys < hi else -EPERM

    def expect_share(self, phys: int, pre: GhostPage | None) -> tuple[int, GhostPage | None]:
        err = self._range_errno(phys)
        if err:
            return err, pre
        assert pre is not None
        if pre.host != OWNED:
            return -EPERM, pre
        if self.checker.h.profile.page_state_in_vmemmap and pre.hyp != NOPAGE:
            return -EPERM, pre
        return 0, replace(pre, host=SO, hyp=SB)

    def expect_unshare(self, phys: int, pre: GhostPage | None) -> tuple[int, GhostPage | None]:
        err = self._range_errno(phys)
        if err:
            return err, pre
        assert pre is not None
        if pre.host != SO:
            return -EPERM, pre
        if self.checker.h.profile.page_state_in_vmemmap and pre.hyp != SB:
            return -EPERM, pre
        if pre.pins:
            return -EBUSY, pre
        return 0, replace(pre, host=OWNED, hyp=NOPAGE)

    def _page_call(self, rec: TraceRecord, changed: set[int]) -> None:
        assert self.pre_page is not None
        phys, pre = self.pre_page
        fn = self.expect_share if rec.name == "__pkvm_host_share_hyp" else self.expect_unshare
        want_x1, want_post = fn(phys, pre)
        if rec.x1 != want_x1:
            self._fail(rec, f"{rec.name}(pfn {rec.args[0]:#x}) result, pre-state {pre}",
                       want_x1, rec.x1)
        post = self.abstract_page(phys)
        if post != want_post:
            self._fail(rec, f"{rec.name}(pfn {rec.args[0]:#x}) post-state of the page",
                       want_post, post)
        if self.checker.h.profile.page_state_in_vmemmap:
            others = changed - {phys >> PAGE_SHIFT}
            if others:
                self._fail(rec, f"{rec.name} changed pages it does not name",
                           "no other page changed", sorted(hex(p) for p in others)[:8])

    # -- the VM table (vm-state.md) ----------------------------------------------------------
    def _slot(self, handle: int) -> int | None:
        idx = (handle - sizes.HANDLE_OFFSET) & 0xFFFF_FFFF
        return idx if idx < len(self.table) else None

    def _table_call(self, rec: TraceRecord) -> None:
        prof = self.checker.h.profile
        t = list(self.table)
        name, cpu, x1 = rec.name, rec.cpu, rec.x1
        a = list(rec.args) + [0] * 6
        handle = prof.handle(a[0])
        idx = self._slot(handle)
        slot = t[idx] if idx is not None else None
        vm = slot if isinstance(slot, GhostVm) else None
        conc = self.abstract_table()

        def loaded_on(c: int) -> tuple[int, int] | None:
            for i, s in enumerate(t):
                if isinstance(s, GhostVm):
                    for v, lc in s.loaded:
                        if lc == c:
                            return i, v
            return None

        if name == "__pkvm_reserve_vm":
            free = next((i for i, s in enumerate(t) if s is None), None)
            want = -ENOMEM if free is None else free + sizes.HANDLE_OFFSET
            if x1 != want:
                self._fail(rec, "reserve_vm result (first free slot)", hex(want), hex(x1))
            if free is not None:
                t[free] = RESERVED
        elif name == "__pkvm_unreserve_vm":
            if idx is not None and slot == RESERVED:
                t[idx] = None
        elif name == "__pkvm_init_vm":
            diff = [i for i in range(len(t)) if t[i] != conc[i]]
            if prof.reserve_vm:
                if x1 == 0:
                    if len(diff) != 1 or t[diff[0]] != RESERVED or not isinstance(conc[diff[0]], GhostVm):
                        self._fail(rec, "init_vm success turns one reserved slot into a VM",
                                   "one reserved -> live slot", [hex(i + 0x1000) for i in diff])
                    i = diff[0]
                    t[i] = GhostVm(False, conc[i].created, frozenset(), ())
            else:
                free = next((i for i, s in enumerate(t) if s is None), None)
                if x1 > 0:
                    if free is None or x1 != free + sizes.HANDLE_OFFSET:
                        self._fail(rec, "init_vm handle (first free slot)",
                                   hex(free + sizes.HANDLE_OFFSET) if free is not None else "-ENOMEM",
                                   hex(x1))
                    assert free is not None
                    c = conc[free]
                    t[free] = GhostVm(False, c.created if isinstance(c, GhostVm) else -1,
                                      frozenset(), ())
                elif free is None and x1 != -ENOMEM and x1 >= 0:
                    self._fail(rec, "init_vm with a full table", -ENOMEM, x1)
        elif name == "__pkvm_init_vcpu":
            if vm is None:
                if x1 not in (-ENOMEM, -ENOENT):
                    self._fail(rec, f"init_vcpu on handle {handle:#x}, not a live VM",
                               "-ENOMEM or -ENOENT", x1)
            elif x1 == 0:
                c = conc[idx] if idx is not None else None
                new = (c.vcpus - vm.vcpus) if isinstance(c, GhostVm) else frozenset()
                if len(new) != 1 or not isinstance(c, GhostVm) or c.vcpus < vm.vcpus:
                    self._fail(rec, "init_vcpu success adds exactly one vCPU",
                               sorted(vm.vcpus), sorted(c.vcpus) if isinstance(c, GhostVm) else c)
                (v,) = new
                if not 0 <= v < vm.created:
                    self._fail(rec, f"init_vcpu index in range of created_vcpus ({vm.created})",
                               f"0..{vm.created - 1}", v)
                if not prof.reserve_vm and v != len(vm.vcpus):
                    self._fail(rec, "6.12 initialises vCPUs in order", len(vm.vcpus), v)
                t[idx] = replace(vm, vcpus=vm.vcpus | {v})  # type: ignore[index]
        elif name == "__pkvm_vcpu_load" and prof.explicit_vcpu_load:
            v = a[1] & 0xFFFF_FFFF
            ok = (loaded_on(cpu) is None and vm is not None and not vm.dying and v < vm.created
                  and v in vm.vcpus and all(lv != v for lv, _ in vm.loaded))
            if ok:
                assert vm is not None and idx is not None
                t[idx] = replace(vm, loaded=tuple(sorted(vm.loaded + ((v, cpu),))))
        elif name == "__pkvm_vcpu_put" and prof.explicit_vcpu_load:
            cur = loaded_on(cpu)
            if cur is not None:
                i, v = cur
                g = t[i]
                t[i] = replace(g, loaded=tuple(x for x in g.loaded if x != (v, cpu)))
        elif name == "__pkvm_start_teardown_vm":
            ok = vm is not None and not vm.dying and not vm.loaded
            if x1 != (0 if ok else -EINVAL):
                self._fail(rec, f"start_teardown({handle:#x}) with ghost slot {slot}",
                           0 if ok else -EINVAL, x1)
            if ok:
                assert vm is not None and idx is not None
                t[idx] = replace(vm, dying=True)
        elif name == "__pkvm_finalize_teardown_vm":
            ok = vm is not None and vm.dying and not vm.loaded
            if x1 != (0 if ok else -EINVAL):
                self._fail(rec, f"finalize_teardown({handle:#x}) with ghost slot {slot}",
                           0 if ok else -EINVAL, x1)
            if ok:
                t[idx] = None  # type: ignore[index]
        elif name == "__pkvm_teardown_vm":
            ok = vm is not None
            if x1 != (0 if ok else -ENOENT):
                self._fail(rec, f"teardown_vm({handle:#x}) with ghost slot {slot}",
                           0 if ok else -ENOENT, x1)
            if ok:
                t[idx] = None  # type: ignore[index]
        self._compare_table(rec, t, conc)
        self.table = t

    def _quick_compare(self, rec: TraceRecord) -> None:
        """Cheap frame check for calls outside the VM table: slot kinds still counted alike."""
        from pkvm.hyp.pkvm import RESERVED_ENTRY

        table = self.checker.h.vm_table or []
        if (table.count(None), table.count(RESERVED_ENTRY)) != (
                self.table.count(None), self.table.count(RESERVED)):
            self._compare_table(rec, self.table)

    def _compare_table(self, rec: TraceRecord, t: list[Any], conc: list[Any] | None = None) -> None:
        if conc is None:
            conc = self.abstract_table()
        if conc != t:
            diff = [i for i in range(len(t)) if t[i] != conc[i]]
            i = diff[0]
            self._fail(rec, f"VM table slot {i + sizes.HANDLE_OFFSET:#x} after {rec.name}",
                       t[i], conc[i])
