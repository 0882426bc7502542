"""The ghost: a small abstract specification checked against the model after each hypercall.

It is written from the kernel's rules (`nvhe/mem_protect.c` for host↔hyp sharing, `nvhe/pkvm.c`
for the VM table), not from the model's hyp code. Its parts:

* **Pages** — for `__pkvm_host_share_hyp` / `__pkvm_host_unshare_hyp` the ghost abstracts the
  concrete pre-state of the page the call names (host state, hyp state, pins) at hypercall entry,
  computes the expected `x1` and abstract post-state, and compares both with the concrete result.
  In 7.2 it also checks the frame condition: no other page's `hyp_vmemmap` entry changed.
* **VM table** — the ghost keeps its own abstract table (free / reserved / live VM with its dying
  flag, created vCPU count, initialised and loaded vCPUs) and each CPU's loaded vCPU. VM-table
  calls are predicted (result and post-state); every call's concrete table must then equal the
  ghost's. Choices the kernel leaves to the implementation (which vCPU index `init_vcpu` filled)
  are read back from the concrete state once checked to be allowed.
* **Every other host hypercall** — `pkvm.check.ghost_calls` (the gate, x0/x2/x3 of every call,
  the flush/register/refusal calls and their frame), `pkvm.check.ghost_guest` (the 7.2
  guest-memory calls), `pkvm.check.ghost_pvm` (the guest's own HVCs EL2 answers during a run),
  `pkvm.check.ghost_ffa` (host SMCs to the FF-A proxy).

`judged` counts the calls each prediction compared, by name (the coverage test reads it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from pkvm.abi import sizes
from pkvm.abi.host_structs import KVM_VCPU
from pkvm.abi.profiles import func_ids
from pkvm.check.ghost_calls import CallsGhost
from pkvm.check.ghost_ffa import FfaGhost
from pkvm.check.ghost_guest import GuestGhost, host_u32, init_vm_checks, pin_errno, range_errno
from pkvm.check.ghost_pvm import PvmGhost
from pkvm.check.page_invariants import PageInvariants
from pkvm.check.violations import InvariantViolation
from pkvm.errors import EBUSY, EINVAL, ENOENT, ENOMEM, EPERM, ERANGE
from pkvm.inspect import (
    RESERVED_ENTRY,
    HypView,
    PageState,
    PkvmHypVm,
    used_slots,
)
from pkvm.machine.memory import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from pkvm.abi.profiles import Profile
    from pkvm.board import TraceRecord

U64: Final = 0xFFFF_FFFF_FFFF_FFFF


OWNED: Final = PageState.OWNED
SO: Final = PageState.SHARED_OWNED
SB: Final = PageState.SHARED_BORROWED
NOPAGE: Final = PageState.NOPAGE


class GhostVm(NamedTuple):  # (a named tuple: built for every live VM after most calls)
    dying: bool
    created: int
    vcpus: frozenset[int]
    loaded: tuple[tuple[int, int], ...]  # (vcpu idx, cpu), sorted


RESERVED: Final = "reserved"

VM_TABLE_CALLS: Final = frozenset({
    "__pkvm_reserve_vm", "__pkvm_unreserve_vm", "__pkvm_init_vm", "__pkvm_init_vcpu",
    "__pkvm_vcpu_load", "__pkvm_vcpu_put", "__pkvm_start_teardown_vm",
    "__pkvm_finalize_teardown_vm", "__pkvm_teardown_vm",
})


def _retired(*args: Any) -> Any:
    """A retired ghost's callbacks (`Ghost.retire`): its machine is dead, nothing calls them."""
    raise RuntimeError("a retired checker's ghost was called")


def func_id(prof: Profile, name: str) -> int | None:
    """`prof.func_id(name)`, from the profile's table (`func_ids`) where it has the name
    (tests/test_checker_runs.py compares)."""
    ids = func_ids(prof)
    return ids[name] if name in ids else prof.func_id(name)


class GhostPage:
    """One page as the ghost abstracts it: host state, hyp state, pins (its refcount). A
    native class with its own `__eq__` (built and compared around every share/unshare_hyp: a
    dataclass's generated comparison and a named tuple's constructor are interpreted)."""

    def __init__(self, host: PageState, hyp: PageState, pins: int):
        self.host = host
        self.hyp = hyp
        self.pins = pins

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GhostPage):
            return False
        return self.host == other.host and self.hyp == other.hyp and self.pins == other.pins

    def __repr__(self) -> str:
        return f"GhostPage(host={self.host!r}, hyp={self.hyp!r}, pins={self.pins!r})"


@dataclass
class Ghost:
    # Any, not Checker: compiled with mypyc, a dataclass's field types are read when its module
    # starts, and pkvm.check.invariants (which imports this module) has no Checker yet then
    checker: Any
    table: list[Any] = field(default_factory=list)  # None | RESERVED | GhostVm
    pre_page: tuple[int, GhostPage | None] | None = None
    pre_init_vm: int | None = None  # 7.2 init_vm: the errno of its first checks, or 0
    pre_init_vcpu: frozenset[int] | None = None  # 7.2 init_vcpu: the results it may give
    _kinds_of: tuple[Any, tuple[int, int], list[int]] = (None, (0, 0), [])  # see _kinds
    _found_of: tuple[Any, int] = (None, 0)  # (vm_slots' answer, its reserved slots)
    _abs: list[Any] | None = None  # abstract_table's last answer, at struct_gen _abs_gen
    _abs_gen: int = -1
    # a call's name -> (its function ID, its name as the profile's table has it)
    _ids: dict[Any, tuple[int | None, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.table = list(self.abstract_table())
        fail = lambda what, want, found: self._fail(None, what, want, found)  # noqa: E731
        inspect = self.checker.machine.inspect
        self.guest = GuestGhost(inspect, fail)
        self.calls = CallsGhost(inspect, self.checker.h.profile, fail, self._generations,
                                lambda: bool(self.guest.raced_now()))
        self.judged = self.calls.judged
        self.guest.judged = self.judged
        self.pvm = PvmGhost(inspect, self.calls, fail)  # the guest's own HVCs answered at EL2
        self.ffa = FfaGhost(self.checker.machine, fail)  # the FF-A proxy's SMCs

    def retire(self) -> None:
        """Drop what this ghost and its parts hold each other by (their `fail` and frame
        callbacks, the guest-HVC ghost's view of the machine, the checker): a fuzzer's reboot
        retires the dead machine's checker, which reference counting then frees at once
        rather than a collection finding the cycles (`Checker.retire`). Not used again."""
        self.guest.fail = self.pvm.fail = self.ffa.fail = _retired
        self.guest.raced_now = _retired
        self.calls.fail = self.calls.frame_of = self.calls.raced = _retired
        self.pvm.i = None  # (the hyp's list of guest-HVC watchers holds the PvmGhost)
        self.checker = None

    # -- abstraction functions --------------------------------------------------------------
    def abstract_table(self) -> list[Any]:
        """The concrete VM table, abstracted (do not modify the list): read again only when
        `HypView.struct_gen` says something it reads may have changed."""
        h: HypView = self.checker.h  # (typed: native calls)
        gen = h.struct_gen()
        if gen != self._abs_gen or self._abs is None:
            self._abs = self._abstract_table()
            self._abs_gen = gen
        return self._abs

    def _abstract_table(self) -> list[Any]:
        """The concrete VM table, abstracted (the generic reading)."""
        h: HypView = self.checker.h
        out: list[Any] = [None] * h.vm_table_size()  # the free slots (most of them) as they are
        for i, slot in h.vm_slots():
            if slot is RESERVED_ENTRY:
                out[i] = RESERVED
            elif not hasattr(slot, "vcpus"):
                out[i] = f"not a hyp VM: {slot!r}"
            else:
                assert isinstance(slot, PkvmHypVm)
                out[i] = _abstract_vm(slot)
        return out

    def abstract_page(self, phys: int) -> GhostPage | None:
        c: PageInvariants = self.checker  # (typed: native calls)
        h = c.h
        if not h.mem.is_ram(phys):
            return None
        pfn = phys >> PAGE_SHIFT
        host, hyp = c.page_states(pfn)
        return GhostPage(host, hyp, h.vmemmap.refcount[pfn - c._ram_lo])  # (`page_count`)

    def _generations(self) -> tuple[int, ...]:
        """The descriptor-write generations of the host stage-2, the hyp stage-1 and every
        live guest stage-2 (a frame: equal before and after a call that writes none)."""
        h: HypView = self.checker.h
        guests = tuple(s.pgt.gen for _, s in h.vm_slots()
                       if isinstance(s, PkvmHypVm) and s.pgt is not None)
        return (h.host_pgt.gen, h.hyp_pgt.gen) + guests

    # -- hooks ------------------------------------------------------------------------------
    def before_call(self, cpu: int, func: Any, args: tuple[int, ...]) -> None:
        self.pre_page = None
        h: HypView = self.checker.h
        prof = h.profile
        known = self._ids.get(func) if isinstance(func, str) else None
        if known is None:
            fid = func if isinstance(func, int) else func_id(prof, func)
            n = prof.decode(fid) if fid is not None else None
            known = (fid, prof.hcalls[n] if n is not None else func)
            if isinstance(func, str):  # (names only: a hostile host draws any number)
                self._ids[func] = known
        fid, func = known
        if fid is not None:
            self.calls.before(cpu, fid, args)
        name = func if isinstance(func, str) else None
        self.pre_init_vm = self.pre_init_vcpu = None
        if name in ("__pkvm_init_vm", "__pkvm_init_vcpu") and prof.reserve_vm and \
                prof.share_hyp_checks_allowed_memory:  # 7.2's init checks
            a = list(args) + [0] * 3
            if name == "__pkvm_init_vm":
                self.pre_init_vm = init_vm_checks(self.checker.machine.inspect, prof, a[0])
            else:
                self.pre_init_vcpu = self._init_vcpu_checks(prof.handle(a[0]), a[1], a[2])
        if name in ("__pkvm_host_share_hyp", "__pkvm_host_unshare_hyp") and args:
            phys = (args[0] << PAGE_SHIFT) & U64
            self.pre_page = (phys, self.abstract_page(phys))
        if name is not None and prof.hyp_owned_guest_stage2:
            self.guest.before(cpu, name, args, prof.handle)

    def after_call(self, rec: TraceRecord, changed: set[int], full: bool = False) -> None:
        self.ffa.after_call(rec, changed)
        self.pvm.after_call(rec)
        if self.calls.after(rec, changed, lambda: self._compare_table(rec, self.table)):
            return
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

    def _init_vcpu_checks(self, handle: int, host_vcpu: int, vcpu_hva: int) -> frozenset[int]:
        """7.2 `__pkvm_init_vcpu` on the pre-state: the donation of the hyp vCPU's pages
        (`map_donated_memory`: page-aligned, in one memory region, host OWNED and hyp NOPAGE,
        else -ENOMEM), the VM (`get_vm_by_handle`, else -ENOENT), the pin of the host's struct
        kvm_vcpu (else -EBUSY), then `register_hyp_vcpu`'s index (below `created_vcpus`, slot
        free, else -EINVAL); with a good index `pkvm_vcpu_init_sysregs` may still refuse a
        non-protected VM whose host never initialised its ID registers (-EINVAL)."""
        i = self.checker.machine.inspect
        prof = self.checker.h.profile
        pa = i.host_ptr_pa(vcpu_hva)
        n = (sizes.PKVM_HYP_VCPU_SIZE + PAGE_SIZE - 1) >> PAGE_SHIFT
        lo, hi = i.ram_range()
        if pa & (PAGE_SIZE - 1) or range_errno(lo, hi, pa, n << PAGE_SHIFT):
            return frozenset({-ENOMEM})
        pages = [i.page_quick((pa >> PAGE_SHIFT) + k) for k in range(n)]
        if any(p is None or p[:2] != ("OWNED", "NOPAGE") for p in pages):
            return frozenset({-ENOMEM})
        idx = self._slot(handle)
        vm = self.table[idx] if idx is not None else None
        if not isinstance(vm, GhostVm):
            return frozenset({-ENOENT})
        hv = i.host_ptr_pa(host_vcpu)
        if pin_errno(i, hv, prof.sizeof_kvm_vcpu):
            return frozenset({-EBUSY})
        v = host_u32(i, hv + KVM_VCPU.offset("vcpu_idx"))
        if v >= vm.created or v in vm.vcpus:
            return frozenset({-EINVAL})
        return frozenset({0, -EINVAL})

    def _fail(self, rec: TraceRecord | None, what: str, expected: Any, found: Any) -> None:
        raise InvariantViolation("ghost", what, None, expected, found)

    # -- host <-> hyp sharing (nvhe/mem_protect.c) ---------------------------------------------
    def _range_errno(self, phys: int) -> int:
        """The errno of the range/memory checks for one page at `phys`, or 0."""
        h: HypView = self.checker.h
        lo, hi = h.mem.base, h.mem.end
        if h.profile.share_hyp_checks_allowed_memory:
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
        if self.checker.h.profile.host_transitions_check_hyp_state and pre.hyp != NOPAGE:
            return -EPERM, pre
        return 0, GhostPage(SO, SB, pre.pins)

    def expect_unshare(self, phys: int, pre: GhostPage | None) -> tuple[int, GhostPage | None]:
        err = self._range_errno(phys)
        if err:
            return err, pre
        assert pre is not None
        if pre.host != SO:
            return -EPERM, pre
        if self.checker.h.profile.host_transitions_check_hyp_state and pre.hyp != SB:
            return -EPERM, pre
        if pre.pins:
            return -EBUSY, pre
        return 0, GhostPage(OWNED, NOPAGE, pre.pins)

    def _page_call(self, rec: TraceRecord, changed: set[int]) -> None:
        assert self.pre_page is not None
        phys, pre = self.pre_page
        self.judged[rec.name] += 1
        want_x1, want_post = self.expect_share(phys, pre) if \
            rec.name == "__pkvm_host_share_hyp" else self.expect_unshare(phys, pre)
        if rec.x1 != want_x1:
            self._fail(rec, f"{rec.name}(pfn {rec.args[0]:#x}) result, pre-state {pre}",
                       want_x1, rec.x1)
        post = self.abstract_page(phys)
        if post != want_post:
            self._fail(rec, f"{rec.name}(pfn {rec.args[0]:#x}) post-state of the page",
                       want_post, post)
        if self.checker.h.profile.hyp_maps_shared_only_while_pinned:
            others = changed - {phys >> PAGE_SHIFT}
            if others:
                self._fail(rec, f"{rec.name} changed pages it does not name",
                           "no other page changed", sorted(hex(p) for p in others)[:8])

    # -- the VM table (nvhe/pkvm.c) ----------------------------------------------------------
    def _slot(self, handle: int) -> int | None:
        idx = (handle - sizes.HANDLE_OFFSET) & 0xFFFF_FFFF
        return idx if idx < len(self.table) else None

    def _table_call(self, rec: TraceRecord) -> None:
        """Predict a VM-table call's result and post-table (`TABLE_CALLS`), then compare."""
        c = TableCall(self, rec)
        self.judged[rec.name] += 1
        TABLE_CALLS[rec.name](c)
        self._compare_table(rec, c.t, c.conc)
        if c.t != self.table:  # (an unchanged table stays the same object: `_kinds`)
            self.table = c.t

    def _quick_compare(self, rec: TraceRecord) -> None:
        """Cheap frame check for calls outside the VM table: slot kinds still counted alike."""
        h: HypView = self.checker.h
        found = h.vm_slots()  # the used slots: the others are free (the same list: the same)
        fo = self._found_of
        if fo[0] is not found:
            fo = self._found_of = (found, sum(1 for _, s in found if s is RESERVED_ENTRY))
        if self._kinds_of[0] is not self.table:
            self._kinds_and_used()
        free, reserved = self._kinds_of[1]  # (`_kinds`, compared as two ints)
        if h.vm_table_size() - len(found) != free or fo[1] != reserved:
            self._compare_table(rec, self.table)

    def _kinds(self) -> tuple[int, int]:
        """(free, reserved) slots of the ghost's table, counted once per table (the table is
        replaced, never changed in place: `_table_call`)."""
        return self._kinds_and_used()[0]

    def _kinds_and_used(self) -> tuple[tuple[int, int], list[int]]:
        """`_kinds` and the indices of the ghost table's used slots, found once per table."""
        t = self.table
        if self._kinds_of[0] is not t:
            idx = used_slots(t)
            reserved = [t[i] for i in idx].count(RESERVED)  # (a used slot: a name or a VM)
            self._kinds_of = (t, (len(t) - len(idx), reserved), idx)
        return self._kinds_of[1], self._kinds_of[2]

    def _compare_table(self, rec: TraceRecord, t: list[Any], conc: list[Any] | None = None) -> None:
        if conc is None:
            conc = self.abstract_table()
        if conc != t:
            i = _differing(t, conc)[0]
            self._fail(rec, f"VM table slot {i + sizes.HANDLE_OFFSET:#x} after {rec.name}",
                       t[i], conc[i])


def _abstract_vm(slot: PkvmHypVm) -> GhostVm:
    """One hyp VM, abstracted: dying, vCPUs created, vCPUs initialised and where each is
    loaded."""
    made = [v for v in slot.vcpus if v is not None]
    vcpus = frozenset([v.vcpu_idx for v in made])
    loaded = tuple(sorted([(v.vcpu_idx, v.loaded_on) for v in made
                           if v.loaded_on is not None]))
    return GhostVm(slot.is_dying, slot.created_vcpus, vcpus, loaded)


def _differing(t: list[Any], conc: list[Any]) -> list[int]:
    """The slots where two tables (of one length) differ, in order (a compiled loop)."""
    out: list[int] = []
    for i in range(len(t)):
        a, b = t[i], conc[i]
        if a is not b and a != b:  # (most slots: both None)
            out.append(i)
    return out


class TableCall:
    """One VM-table call as the ghost predicts it: the ghost table `t` it updates, the
    concrete table `conc` after the call, and the slot the handle argument names."""

    def __init__(self, ghost: Ghost, rec: TraceRecord):
        self.ghost = ghost
        self.rec = rec
        self.prof = ghost.checker.h.profile
        self.t = list(ghost.table)
        self.cpu, self.x1 = rec.cpu, rec.x1
        self.a = list(rec.args) + [0] * 6
        self.handle = self.prof.handle(self.a[0])
        self.idx = ghost._slot(self.handle)
        self.slot = self.t[self.idx] if self.idx is not None else None
        self.vm = self.slot if isinstance(self.slot, GhostVm) else None
        self.conc = ghost.abstract_table()

    def fail(self, what: str, expected: Any, found: Any) -> None:
        self.ghost._fail(self.rec, what, expected, found)

    def loaded_on(self, cpu: int) -> tuple[int, int] | None:
        """(slot, vCPU index) of the vCPU the ghost has loaded on `cpu`, or None (asked before
        the prediction changes `t`: the used slots are the ghost table's)."""
        for i in self.ghost._kinds_and_used()[1]:
            s = self.t[i]
            if isinstance(s, GhostVm) and s.loaded:
                for v, lc in s.loaded:
                    if lc == cpu:
                        return i, v
        return None

    def first_free(self) -> int | None:
        return self.t.index(None) if None in self.t else None


def _reserve_vm(c: TableCall) -> None:
    free = c.first_free()
    want = -ENOMEM if free is None else free + sizes.HANDLE_OFFSET
    if c.x1 != want:
        c.fail("reserve_vm result (first free slot)", hex(want), hex(c.x1))
    if free is not None:
        c.t[free] = RESERVED


def _unreserve_vm(c: TableCall) -> None:
    if c.idx is not None and c.slot == RESERVED:
        c.t[c.idx] = None


def _init_vm(c: TableCall) -> None:
    t, conc, x1 = c.t, c.conc, c.x1
    if c.prof.reserve_vm:  # init_vm fills a slot the host reserved first
        first = c.ghost.pre_init_vm
        if first and x1 != first and not c.ghost.guest.raced_now():
            c.fail("init_vm result (hyp_pin_shared_mem of struct kvm, created_vcpus, handle)",
                   first, x1)
        diff = _differing(t, conc)
        if x1 == 0:
            if len(diff) != 1 or t[diff[0]] != RESERVED or not isinstance(conc[diff[0]], GhostVm):
                c.fail("init_vm success turns one reserved slot into a VM",
                       "one reserved -> live slot", [hex(i + sizes.HANDLE_OFFSET) for i in diff])
            i = diff[0]
            t[i] = GhostVm(False, conc[i].created, frozenset(), ())
        return
    free = c.first_free()
    if x1 > 0:
        if free is None or x1 != free + sizes.HANDLE_OFFSET:
            c.fail("init_vm handle (first free slot)",
                   hex(free + sizes.HANDLE_OFFSET) if free is not None else "-ENOMEM", hex(x1))
        assert free is not None
        got = conc[free]
        t[free] = GhostVm(False, got.created if isinstance(got, GhostVm) else -1, frozenset(), ())
    elif free is None and x1 != -ENOMEM and x1 >= 0:
        c.fail("init_vm with a full table", -ENOMEM, x1)


def _init_vcpu(c: TableCall) -> None:
    vm, idx = c.vm, c.idx
    may = c.ghost.pre_init_vcpu
    if may is not None and c.x1 not in may and not c.ghost.guest.raced_now():
        c.fail("init_vcpu result (donation, handle, pin of struct kvm_vcpu, vCPU index)",
               sorted(may), c.x1)
    if vm is None:
        if c.x1 not in (-ENOMEM, -ENOENT):
            c.fail(f"init_vcpu on handle {c.handle:#x}, not a live VM", "-ENOMEM or -ENOENT", c.x1)
        return
    if c.x1 != 0:
        return
    assert idx is not None
    got = c.conc[idx]
    new = (got.vcpus - vm.vcpus) if isinstance(got, GhostVm) else frozenset()
    if len(new) != 1 or not isinstance(got, GhostVm) or got.vcpus < vm.vcpus:
        c.fail("init_vcpu success adds exactly one vCPU", sorted(vm.vcpus),
               sorted(got.vcpus) if isinstance(got, GhostVm) else got)
    (v,) = new
    if not 0 <= v < vm.created:
        c.fail(f"init_vcpu index in range of created_vcpus ({vm.created})",
               f"0..{vm.created - 1}", v)
    if c.prof.vcpu_init_in_order and v != len(vm.vcpus):
        c.fail("hyp vCPUs are initialised in order", len(vm.vcpus), v)
    c.t[idx] = GhostVm(vm.dying, vm.created, vm.vcpus | {v}, vm.loaded)


def _vcpu_load(c: TableCall) -> None:
    if not c.prof.explicit_vcpu_load:
        return
    vm, v = c.vm, c.a[1] & 0xFFFF_FFFF
    ok = (c.loaded_on(c.cpu) is None and vm is not None and not vm.dying and v < vm.created
          and v in vm.vcpus and all(lv != v for lv, _ in vm.loaded))
    if ok:
        assert vm is not None and c.idx is not None
        c.t[c.idx] = GhostVm(vm.dying, vm.created, vm.vcpus,
                             tuple(sorted(vm.loaded + ((v, c.cpu),))))


def _vcpu_put(c: TableCall) -> None:
    if not c.prof.explicit_vcpu_load:
        return
    cur = c.loaded_on(c.cpu)
    if cur is not None:
        i, v = cur
        g = c.t[i]
        c.t[i] = GhostVm(g.dying, g.created, g.vcpus,
                         tuple([x for x in g.loaded if x != (v, c.cpu)]))


def _start_teardown_vm(c: TableCall) -> None:
    vm = c.vm
    ok = vm is not None and not vm.dying and not vm.loaded
    if c.x1 != (0 if ok else -EINVAL):
        c.fail(f"start_teardown({c.handle:#x}) with ghost slot {c.slot}", 0 if ok else -EINVAL,
               c.x1)
    if ok:
        assert vm is not None and c.idx is not None
        c.t[c.idx] = GhostVm(True, vm.created, vm.vcpus, vm.loaded)


def _finalize_teardown_vm(c: TableCall) -> None:
    vm = c.vm
    ok = vm is not None and vm.dying and not vm.loaded
    if c.x1 != (0 if ok else -EINVAL):
        c.fail(f"finalize_teardown({c.handle:#x}) with ghost slot {c.slot}",
               0 if ok else -EINVAL, c.x1)
    if ok:
        assert c.idx is not None
        c.t[c.idx] = None


def _teardown_vm(c: TableCall) -> None:
    ok = c.vm is not None
    if c.x1 != (0 if ok else -ENOENT):
        c.fail(f"teardown_vm({c.handle:#x}) with ghost slot {c.slot}", 0 if ok else -ENOENT, c.x1)
    if ok:
        assert c.idx is not None
        c.t[c.idx] = None


# The VM-table calls (`VM_TABLE_CALLS`), each with its prediction.
TABLE_CALLS: dict[str, Callable[[TableCall], None]] = {
    "__pkvm_reserve_vm": _reserve_vm,
    "__pkvm_unreserve_vm": _unreserve_vm,
    "__pkvm_init_vm": _init_vm,
    "__pkvm_init_vcpu": _init_vcpu,
    "__pkvm_vcpu_load": _vcpu_load,
    "__pkvm_vcpu_put": _vcpu_put,
    "__pkvm_start_teardown_vm": _start_teardown_vm,
    "__pkvm_finalize_teardown_vm": _finalize_teardown_vm,
    "__pkvm_teardown_vm": _teardown_vm,
}
