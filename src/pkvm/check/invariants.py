"""Named invariants over the hyp state, checked after every hypercall (`Machine(check=True)`).

Each invariant is a promise pKVM makes (spec `memory.md` §6, `run-and-check.md` §5.2); `INVARIANTS`
lists them by name with the sentence a violation quotes. The `Checker` reads hyp state read-only
and is incremental: after each call it finds the pages whose `hyp_vmemmap` entry changed (7.2
keeps page states there) plus the pages the call's arguments name, checks those pages against
every table, and re-checks the cheap global facts (VM table, loaded vCPUs, pins, VM refcounts).
Every `full_every` calls, and on `check_all()`, it checks every page and every table.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pkvm.abi import sizes
from pkvm.hyp.mem_protect import decode_host_annotation, get_host_state, get_hyp_state
from pkvm.hyp.memory import ComponentId, PageState
from pkvm.hyp.mm import hyp_pa, hyp_va
from pkvm.hyp.pgtable import KVM_PTE_ADDR_MASK, pte_valid
from pkvm.machine.memory import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from pkvm.board import Machine, TraceRecord
    from pkvm.hyp.pkvm import PkvmHypVm
    from pkvm.hyp.state import HypState

OWNED, SO, SB, NOPAGE = (PageState.OWNED, PageState.SHARED_OWNED, PageState.SHARED_BORROWED,
                         PageState.NOPAGE)

# memory.md §4.1: (host, hyp, guest states) a RAM page may be in; "*" = N >= 1 guests.
ALLOWED_PAIRS_7_2: dict[tuple[PageState, PageState], str] = {
    (OWNED, NOPAGE): "ordinary host memory",
    (SO, SB): "shared with the hyp",
    (NOPAGE, OWNED): "hyp-owned (carve-out or donated)",
    (SO, NOPAGE): "shared with FF-A or with N non-protected guests",
    (NOPAGE, NOPAGE): "donated to a protected guest",
    (SB, NOPAGE): "a protected guest shared it back",
}
ALLOWED_PAIRS_6_12: dict[tuple[PageState, PageState], str] = {
    (OWNED, NOPAGE): "ordinary host memory",
    (SO, SB): "shared with the hyp",
    (NOPAGE, OWNED): "hyp-owned (carve-out or donated)",
    (SB, SO): "kvm_vgic_global_state page",
    (SO, NOPAGE): "shared with FF-A",
}


@dataclass(frozen=True)
class Invariant:
    name: str
    doc: str


INVARIANTS: dict[str, Invariant] = {i.name: i for i in [
    Invariant("state-pair", "each RAM page's (host, hyp, guest) states are a pair of memory.md "
              "§4.1, so it has exactly one owner"),
    Invariant("guest-consistent", "a guest stage-2 mapping agrees with the host and hyp states: "
              "guest OWNED needs host/hyp NOPAGE, guest SHARED_BORROWED needs host SHARED_OWNED "
              "and host_share_guest_count = number of such mappings; one guest owner at most"),
    Invariant("host-s2-agrees", "the host stage-2 tells the same story: host NOPAGE <=> an "
              "ownership annotation (owner hyp for hyp pages, a guest for guest pages)"),
    Invariant("hyp-s1-agrees", "hyp OWNED pages are mapped in the hyp stage-1; a SHARED_BORROWED "
              "page is mapped exactly while pinned (7.2); NOPAGE pages are not mapped"),
    Invariant("no-host-access", "every valid host stage-2 leaf is an identity map of memory the "
              "host owns or shares; never a hyp or guest-private page"),
    Invariant("pin-refcount", "a host page shared with the hyp has refcount = its users (pins "
              "by live hyp VMs' struct kvm and hyp vCPUs' struct kvm_vcpu)"),
    Invariant("vm-refcount", "a hyp VM page's refcount = CPUs with one of its vCPUs loaded "
              "(7.2); 0 between calls (6.12)"),
    Invariant("vm-table", "the VM table holds only free, reserved or hyp VMs whose handle "
              "matches their slot; loaded vCPUs belong to live VMs and are loaded where the "
              "per-CPU pointer says"),
    Invariant("table-pages", "every page-table page is hyp-owned, in one table only, with "
              "refcount 1 + counted entries"),
    Invariant("hyp-accounting", "every hyp-owned page outside the carve-out belongs to a live "
              "VM: its hyp VM or vCPU structs, stage-2 pool or tables, or a vCPU memcache"),
    Invariant("pool-free-lists", "free pool blocks have refcount 0, are zero and sit on one "
              "free list"),
    Invariant("ghost", "the model's result and abstract post-state equal the ghost "
              "specification's (pkvm.check.ghost)"),
    Invariant("no-warn", "no hyp WARN_ON fires on a path the host can reach (a WARN the host can "
              "provoke is a kernel bug: the host gets an errno instead)"),
    Invariant("no-exception", "nothing a host passes makes the hyp raise anything but HypPanic"),
    Invariant("ffa-owner", "every RAM page the secure world holds is host SHARED_OWNED and not "
              "the hyp's; every host SHARED_OWNED page no hyp or guest borrows is held by the "
              "secure world (pkvm.check.ghost_ffa)"),
]}


class InvariantViolation(AssertionError):
    """A promise of pKVM no longer holds; the message says which and what differs."""

    def __init__(self, invariant: str, detail: str, pfn: int | None = None,
                 expected: Any = None, found: Any = None, call: str | None = None):
        self.invariant = invariant
        self.detail = detail
        self.pfn = pfn
        self.expected = expected
        self.found = found
        self.call = call
        super().__init__(self._render())

    def _render(self) -> str:
        inv = INVARIANTS.get(self.invariant)
        lines = [f"invariant {self.invariant!r} violated" + (f" after {self.call}" if self.call else "")]
        if inv is not None:
            lines.append(f"  promise : {inv.doc}")
        if self.pfn is not None:
            lines.append(f"  page    : pfn {self.pfn:#x} (pa {self.pfn << PAGE_SHIFT:#x})")
        lines.append(f"  what    : {self.detail}")
        if self.expected is not None or self.found is not None:
            lines.append(f"  expected: {self.expected}")
            lines.append(f"  found   : {self.found}")
        return "\n".join(lines)


def _diff(cur: bytes, prev: bytes, lo: int, hi: int, w: int, base: int, out: set[int]) -> None:
    """Add base + index of every differing `w`-byte element of cur[lo:hi] (bisection)."""
    if cur[lo:hi] == prev[lo:hi]:
        return
    if hi - lo <= w:
        out.add(base + lo // w)
        return
    mid = lo + (hi - lo) // w // 2 * w
    _diff(cur, prev, lo, mid, w, base, out)
    _diff(cur, prev, mid, hi, w, base, out)


def _valid_leaves(mem: Any, pgd: int, start_level: int) -> list[tuple[int, int]]:
    """(level, pte) of every valid leaf under `pgd`: whole tables read at once (fast)."""
    out: list[tuple[int, int]] = []
    u64, base = mem.u64, mem.base
    stack = [(pgd, start_level)]
    while stack:
        table, level = stack.pop()
        off = (table - base) >> 3
        for pte in u64[off:off + 512].tolist():
            if not pte & 1:
                continue
            if level < 3 and pte & 2:
                stack.append((pte & KVM_PTE_ADDR_MASK, level + 1))
            else:
                out.append((level, pte))
    return out


# Calls that cannot change any guest stage-2: the cached guest map survives them.
_GUEST_S2_STILL = frozenset({
    "__pkvm_host_share_hyp", "__pkvm_host_unshare_hyp", "__pkvm_reserve_vm",
    "__pkvm_unreserve_vm", "__pkvm_vcpu_load", "__pkvm_vcpu_put", "__pkvm_init_vcpu",
    "__pkvm_start_teardown_vm", "__pkvm_tlb_flush_vmid", "__kvm_flush_vm_context",
})


def _name(s: Any) -> str:
    return PageState(s).name if isinstance(s, int) else str(s)


class Checker:
    """Runs the invariants (and the ghost specification) after every hypercall of a machine."""

    def __init__(self, machine: Machine, full_every: int = 512, ghost: bool = True,
                 initial_check: bool = True):
        self.machine = machine
        self.h: HypState = machine._hyp  # read-only introspection
        self.full_every = full_every
        self.calls = 0
        self._pending: set[int] = set()
        self._gmap: dict[int, list[tuple[int, PageState]]] | None = None
        self._live: list[tuple[int, PkvmHypVm]] | None = None
        # Pages a 7.2 guest still had when its VM was finalised: finalize does not reclaim
        # them (vm-state.md §4.5), so they keep their state with no guest mapping left.
        self.orphan_owned: set[int] = set()
        self.orphan_borrowed: Counter = Counter()
        self._about_to_orphan: list[tuple[int, PageState]] | None = None
        self.transitions: Counter = Counter()  # ((host, hyp) before, after) -> pages
        self._globals_fp: tuple | None = None  # see _fingerprint
        self._globals_pfns: set[int] = set()
        self.globals_skipped = 0
        vm = self.h.vmemmap
        self._in_vmemmap = self.h.profile.page_state_in_vmemmap
        self._prev = [a.tobytes() for a in self._arrays()]
        self._ram_lo = vm.base_pfn
        self._ram_hi = vm.base_pfn + vm.nr
        self.ghost = None
        if ghost:
            from pkvm.check.ghost import Ghost

            self.ghost = Ghost(self)
        if initial_check:
            self.check_all()
        self._install_entry_hook()

    def _install_entry_hook(self) -> None:
        """Let the ghost see the pre-state: wrap this machine's `hvc` (an instance attribute,
        which the host's port also goes through). Hyp state is only read."""
        m = self.machine
        inner = m.hvc

        def hvc(cpu: int, func: Any, *args: int):  # type: ignore[no-untyped-def]
            self.before_call(cpu, func, args)
            return inner(cpu, func, *args)

        m.hvc = hvc  # type: ignore[method-assign]

    def _arrays(self) -> list[Any]:
        vm = self.h.vmemmap
        if not self._in_vmemmap:
            return [vm.refcount]
        return [vm.host_state, vm.hyp_state, vm.refcount, vm.host_share_guest_count]

    # -- driving ---------------------------------------------------------------------------
    def before_call(self, cpu: int, func: Any, args: tuple[int, ...]) -> None:
        # Pages changed since the last call (host stage-2 faults handled by the hyp): checked
        # after this call, but not blamed on it.
        self._live = None
        if func == "__pkvm_finalize_teardown_vm" and args and self._in_vmemmap:
            self._about_to_orphan = self._guest_pages_of(args[0])
        if self.ghost is not None and func in ("__pkvm_host_share_hyp", "__pkvm_host_unshare_hyp"):
            self._pending |= self._changed_pages()
        if self.ghost is not None:
            self.ghost.before_call(cpu, func, args)

    def after_call(self, rec: TraceRecord) -> None:
        if rec.panic is not None:
            return
        self.calls += 1
        where = f"call #{rec.seq} {rec.name}{tuple(hex(a) for a in rec.args)} on cpu {rec.cpu}"
        try:
            changed = self._changed_pages()
            pending, self._pending = self._pending, set()
            self._live = None
            if rec.x0 == 0 and rec.name not in _GUEST_S2_STILL and (changed or rec.x1 >= 0):
                self._gmap = None  # (a refused call that changed no vmemmap entry keeps it)
            if self._about_to_orphan is not None:
                if rec.name == "__pkvm_finalize_teardown_vm" and rec.x0 == 0 and rec.x1 == 0:
                    for pfn, st in self._about_to_orphan:
                        if st == SB:
                            self.orphan_borrowed[pfn] += 1
                        else:
                            self.orphan_owned.add(pfn)
                        changed.add(pfn)
                self._about_to_orphan = None
            if self.ghost is not None:
                self.ghost.after_call(rec, changed, full=self._full_due())
            self._oracles()
            if self._full_due():
                self.check_all()
            else:
                touched = changed | pending | self._arg_pages(rec.args)
                self.check_pages(touched, rec.name)
                fp = self._fingerprint()
                if fp != self._globals_fp or touched & self._globals_pfns:
                    self.check_globals()
                    self._globals_fp = fp
                else:
                    self.globals_skipped += 1
                if rec.name in ("__pkvm_finalize_teardown_vm", "__pkvm_teardown_vm") and rec.x1 == 0:
                    self.check_hyp_accounting()
        except InvariantViolation as v:
            v.call = where
            v.args = (v._render(),)
            raise

    def _oracles(self) -> None:
        """The registered per-call oracles of `pkvm.check.oracles` (WARNs, hardware)."""
        from pkvm.check.oracles import run_all

        found = run_all(self.machine.inspect)
        if found:
            name, msg = found[0]
            raise InvariantViolation(name, msg)

    def _fingerprint(self) -> tuple:
        """What the global facts depend on besides page entries: the VM table's slots, each
        live VM's dying flag, vCPUs and where they are loaded, and the per-CPU loaded vCPUs.
        `check_globals` re-runs when this changes or a call touches one of the pages it read
        (`_globals_pfns`: pinned pages and hyp VM pages)."""
        table = self.h.vm_table or []
        if table.count(None) == len(table):
            return (), tuple(map(id, self.h.loaded_hyp_vcpu))
        vms = tuple((id(s), getattr(s, "is_dying", None), getattr(s, "created_vcpus", None),
                     tuple((id(v), v.loaded_on) for v in s.vcpus if v is not None)
                     if hasattr(s, "vcpus") else ())
                    for s in table if s is not None)
        return vms, tuple(map(id, self.h.loaded_hyp_vcpu))

    def _full_due(self) -> bool:
        return bool(self.full_every) and self.calls % self.full_every == 0

    def _arg_pages(self, args: Iterable[int]) -> set[int]:
        out = set()
        for a in args:
            for pfn in (a & 0xFFFF_FFFF_FFFF_FFFF, (a >> PAGE_SHIFT),
                        (hyp_pa(a) >> PAGE_SHIFT) & 0xFFFF_FFFF_FFFF_FFFF):
                pfn &= (1 << 52) - 1
                if self._ram_lo <= pfn < self._ram_hi:
                    out.add(pfn)
        return out

    def _changed_pages(self) -> set[int]:
        """pfns whose vmemmap entry (states, refcount, share count) changed since last call."""
        out: set[int] = set()
        base = self._ram_lo
        cur_all = [a.tobytes() for a in self._arrays()]
        for k, (cur, prev) in enumerate(zip(cur_all, self._prev)):
            if cur == prev:
                continue
            _diff(cur, prev, 0, len(cur), self._arrays()[k].itemsize, base, out)
        if out:
            if self._in_vmemmap:
                ph, py = self._prev[0], self._prev[1]
                vm = self.h.vmemmap
                for pfn in out:
                    i = pfn - base
                    a, b = (ph[i], py[i]), (vm.host_state[i], vm.hyp_state[i])
                    if a != b:
                        self.transitions[(tuple(map(_name, a)), tuple(map(_name, b)))] += 1
            self._prev = cur_all
        return out

    # -- per page --------------------------------------------------------------------------
    def page_states(self, pfn: int) -> tuple[PageState, PageState]:
        pa = pfn << PAGE_SHIFT
        return get_host_state(self.h, pa), get_hyp_state(self.h, pa)

    def live_vms(self) -> list[tuple[int, PkvmHypVm]]:
        """(handle, VM) of every hyp VM in the table (cached for the duration of one check)."""
        if self._live is not None:
            return self._live
        table = self.h.vm_table or []
        if table.count(None) == len(table):
            out = []
        else:
            from pkvm.hyp.pkvm import live_vms

            out = live_vms(self.h)
        self._live = out
        return out

    def guest_map(self) -> dict[int, list[tuple[int, PageState]]]:
        """pfn -> [(handle, guest state)] over every valid leaf of every hyp-owned guest stage-2.

        Cached between calls that cannot change a guest stage-2 (`_GUEST_S2_STILL`)."""
        if self._gmap is not None:
            return self._gmap
        from pkvm.hyp.mem_protect_guest import guest_state_of_pte

        out: dict[int, list[tuple[int, PageState]]] = {}
        for handle, vm in self.live_vms():
            if vm.pgt is None or not vm.pgt.pgd:
                continue
            for level, pte in _valid_leaves(self.h.mem, vm.pgt.pgd, vm.pgt.start_level):
                pfn = (pte & KVM_PTE_ADDR_MASK) >> PAGE_SHIFT
                st = guest_state_of_pte(pte)
                for k in range(1 << (9 * (3 - level))):
                    out.setdefault(pfn + k, []).append((handle, st))
        self._gmap = out
        return out

    def _guest_pages_of(self, raw_handle: int) -> list[tuple[int, PageState]]:
        handle = self.h.profile.handle(raw_handle)
        return [(pfn, st) for pfn, lst in self.guest_map().items() for hd, st in lst
                if hd == handle]

    def check_pages(self, pfns: Iterable[int], call: str = "", gmap: dict | None = None) -> None:
        pfns = [p for p in pfns if self._ram_lo <= p < self._ram_hi]
        if not pfns:
            return
        h = self.h
        if gmap is None:
            gmap = self.guest_map() if h.profile.hyp_owned_guest_stage2 else {}
        host_pgt = h.host_mmu.pgt  # type: ignore[union-attr]
        hyp_pgt = h.pkvm_pgtable
        assert hyp_pgt is not None
        for pfn in pfns:
            pa = pfn << PAGE_SHIFT
            _, hpte, _ = host_pgt.get_leaf(pa)
            ret, ypte, _ = hyp_pgt.get_leaf(hyp_va(pa))
            self._check_page(pfn, self.page_states(pfn), hpte, 0 if ret else ypte,
                             gmap.get(pfn, []))

    def _check_page(self, pfn: int, states: tuple[PageState, PageState], hpte: int, ypte: int,
                    guests: list[tuple[int, PageState]]) -> None:
        h = self.h
        host, hyp = states
        i = pfn - self._ram_lo
        vmm = h.vmemmap
        pa = pfn << PAGE_SHIFT
        allowed = ALLOWED_PAIRS_7_2 if self._in_vmemmap else ALLOWED_PAIRS_6_12
        pair = (host, hyp)
        if pair not in allowed:
            raise InvariantViolation("state-pair", "(host, hyp) is not a pair of memory.md §4.1",
                                     pfn, "one of " + ", ".join(f"{a.name}/{b.name}" for a, b in allowed),
                                     f"{host.name}/{hyp.name}")
        # guests
        if self._in_vmemmap:
            gstates = [s for _, s in guests]
            owners = [g for g, s in guests if s in (OWNED, SO)]
            borrowed = gstates.count(SB)
            if len(owners) > 1:
                raise InvariantViolation("guest-consistent", "two guests own one page", pfn,
                                         "at most one guest owner", owners)
            want: str | None = None
            orphan = pfn in self.orphan_owned and not gstates
            obor = self.orphan_borrowed.get(pfn, 0)
            if pair == (NOPAGE, NOPAGE) and gstates != [OWNED] and not orphan:
                want = "exactly one guest mapping, OWNED"
            elif pair == (SB, NOPAGE) and gstates != [SO] and not orphan:
                want = "exactly one guest mapping, SHARED_OWNED"
            elif pair == (SO, NOPAGE):
                if any(s != SB for s in gstates) or borrowed + obor != vmm.host_share_guest_count[i]:
                    want = f"{vmm.host_share_guest_count[i]} SHARED_BORROWED guest mappings " \
                           f"(host_share_guest_count; {obor} of them orphaned by a teardown)"
            elif pair not in ((NOPAGE, NOPAGE), (SB, NOPAGE)) and gstates:
                want = f"no guest mapping for a {host.name}/{hyp.name} page"
            if want is None and pair != (SO, NOPAGE) and vmm.host_share_guest_count[i]:
                want = "host_share_guest_count 0"
            if want is not None:
                raise InvariantViolation(
                    "guest-consistent", "guest stage-2 mappings disagree with host/hyp states",
                    pfn, want, f"host {host.name}, hyp {hyp.name}, guests "
                    f"{[(hex(g), s.name) for g, s in guests]}, share count "
                    f"{vmm.host_share_guest_count[i]}")
            # host stage-2
            ann = decode_host_annotation(hpte)
            if (host == NOPAGE) != (ann is not None):
                raise InvariantViolation("host-s2-agrees", "host NOPAGE <=> annotated host leaf",
                                         pfn, f"annotation iff host NOPAGE (host {host.name})",
                                         f"host leaf {hpte:#x}")
            if ann is not None:
                want_owner = ComponentId.HYP if hyp == OWNED else ComponentId.GUEST
                if ann[0] != want_owner:
                    raise InvariantViolation("host-s2-agrees", "annotation names the wrong owner",
                                             pfn, ComponentId(want_owner).name, ann)
            # hyp stage-1
            mapped = pte_valid(ypte) and (ypte & KVM_PTE_ADDR_MASK) == pa
            rc = vmm.refcount[i]
            if hyp == OWNED and not mapped:
                raise InvariantViolation("hyp-s1-agrees", "hyp-owned page not mapped at EL2", pfn,
                                         "a valid hyp stage-1 leaf", f"{ypte:#x}")
            if hyp == SB and mapped != (rc > 0):
                raise InvariantViolation("hyp-s1-agrees", "shared page mapped at EL2 <=> pinned",
                                         pfn, f"mapped={rc > 0} (refcount {rc})", f"mapped={mapped}")
            if hyp == NOPAGE and pte_valid(ypte):
                raise InvariantViolation("hyp-s1-agrees", "page the hyp does not have is mapped "
                                         "at EL2", pfn, "no hyp stage-1 leaf", f"{ypte:#x}")
        else:
            ann = decode_host_annotation(hpte)
            if host == NOPAGE and (ann is None or ann[0] != ComponentId.HYP) and hyp == OWNED:
                raise InvariantViolation("host-s2-agrees", "hyp page without hyp annotation",
                                         pfn, "owner HYP annotation", f"host leaf {hpte:#x}")
        # host access
        if pte_valid(hpte) and host not in (OWNED, SO, SB):
            raise InvariantViolation("no-host-access", "the host stage-2 maps a page it may not "
                                     "touch", pfn, f"no valid host leaf ({host.name}/{hyp.name})",
                                     f"host leaf {hpte:#x}")

    # -- globals ---------------------------------------------------------------------------
    def expected_pins(self) -> Counter:
        pins: Counter = Counter()

        def add(va: int, size: int) -> None:
            lo = va & ~(PAGE_SIZE - 1)
            for p in range(lo, va + size, PAGE_SIZE):
                pins[hyp_pa(p) >> PAGE_SHIFT] += 1

        for _handle, vm in self.live_vms():
            add(vm.host_kvm, self.h.profile.sizeof_kvm)
            for vcpu in vm.vcpus:
                if vcpu is not None:
                    add(vcpu.host_vcpu, self.h.profile.sizeof_kvm_vcpu)
        ffa = self.machine.inspect.ffa_proxy()  # the host's FF-A mailbox, pinned by RXTX_MAP
        for pa in (ffa["host_tx"], ffa["host_rx"]) if ffa and ffa["host_tx"] else ():
            pins[pa >> PAGE_SHIFT] += 1
        return pins

    def check_globals(self, all_shared: bool = False) -> None:
        from pkvm.hyp.pkvm import RESERVED_ENTRY, PkvmHypVm, vm_page

        h = self.h
        vmm = h.vmemmap
        table = h.vm_table or []
        live: list[PkvmHypVm] = []
        for idx, slot in enumerate(table if table.count(None) != len(table) else ()):
            if slot is None or slot is RESERVED_ENTRY:
                continue
            if not isinstance(slot, PkvmHypVm):
                raise InvariantViolation("vm-table", f"slot {idx} holds {slot!r}")
            if slot.handle != idx + sizes.HANDLE_OFFSET:
                raise InvariantViolation("vm-table", f"slot {idx} holds a VM with another handle",
                                         None, hex(idx + sizes.HANDLE_OFFSET), hex(slot.handle))
            live.append(slot)
            for k, vcpu in enumerate(slot.vcpus):
                if vcpu is None:
                    continue
                if vcpu.vm is not slot or vcpu.vcpu_idx != k:
                    raise InvariantViolation("vm-table", f"VM {slot.handle:#x} vcpus[{k}] is "
                                             f"vCPU {vcpu.vcpu_idx} of another VM")
                if vcpu.loaded_on is not None and h.loaded_hyp_vcpu[vcpu.loaded_on] is not vcpu:
                    raise InvariantViolation("vm-table", f"vCPU {k} of VM {slot.handle:#x} says "
                                             f"loaded on cpu {vcpu.loaded_on}, that CPU disagrees")
        live_ids = {id(v) for v in live}
        for cpu, vcpu in enumerate(h.loaded_hyp_vcpu):
            if vcpu is None:
                continue
            if id(vcpu.vm) not in live_ids or vcpu.loaded_on != cpu:
                raise InvariantViolation("vm-table", f"cpu {cpu} has a loaded vCPU of a VM not in "
                                         "the table or loaded elsewhere", None,
                                         f"vCPU of a live VM loaded on {cpu}",
                                         f"VM {vcpu.vm.handle:#x}, loaded_on {vcpu.loaded_on}")
        for vm in live:
            loaded = sum(1 for v in vm.vcpus if v is not None and v.loaded_on is not None)
            if not h.profile.explicit_vcpu_load:
                loaded = 0
            pfn = vm_page(vm) >> PAGE_SHIFT
            rc = vmm.refcount[pfn - self._ram_lo]
            if rc != loaded:
                raise InvariantViolation("vm-refcount", f"hyp VM {vm.handle:#x}", pfn,
                                         f"refcount {loaded} (loaded vCPUs)", f"refcount {rc}")
        pins = self.expected_pins()
        pfns = set(pins)
        self._globals_pfns = pfns | {vm_page(v) >> PAGE_SHIFT for v in live}
        if all_shared:
            pfns |= self._shared_pages()
        for pfn in pfns:
            i = pfn - self._ram_lo
            if not 0 <= i < vmm.nr:
                raise InvariantViolation("pin-refcount", "a pinned host struct lies outside RAM",
                                         pfn)
            states = self.page_states(pfn)
            if pfn in pins and states != (SO, SB):
                raise InvariantViolation("pin-refcount", "a pinned page is not shared with the hyp",
                                         pfn, "SHARED_OWNED/SHARED_BORROWED",
                                         f"{states[0].name}/{states[1].name}")
            if states == (SO, SB) and vmm.refcount[i] != pins.get(pfn, 0):
                raise InvariantViolation("pin-refcount", "pins do not match users", pfn,
                                         f"refcount {pins.get(pfn, 0)}", f"refcount {vmm.refcount[i]}")

    def _shared_pages(self) -> set[int]:
        h = self.h
        if self._in_vmemmap:
            vmm = h.vmemmap
            hs, ys = vmm.host_state, vmm.hyp_state
            return {self._ram_lo + i for i in range(vmm.nr) if hs[i] == SO and ys[i] == SB}
        from pkvm.hyp.mem_protect import hyp_state_of_pte

        assert h.pkvm_pgtable is not None
        lo = hyp_va(self._ram_lo << PAGE_SHIFT)
        size = (self._ram_hi - self._ram_lo) << PAGE_SHIFT
        return {hyp_pa(a) >> PAGE_SHIFT for a, lvl, pte in h.pkvm_pgtable.leaves(lo, size, True)
                if lvl == 3 and hyp_state_of_pte(pte) == SB}

    # -- everything --------------------------------------------------------------------------
    def check_all(self) -> None:
        """Every invariant over every page and table (slow: tens of ms)."""
        h = self.h
        self._gmap = None
        self._live = None
        gmap = self.guest_map() if h.profile.hyp_owned_guest_stage2 else {}
        host_leaf: dict[int, int] = {}
        for addr, level, pte in h.host_mmu.pgt.leaves():  # type: ignore[union-attr]
            if pte_valid(pte) and (pte & KVM_PTE_ADDR_MASK) != addr:
                raise InvariantViolation("no-host-access", "host stage-2 is not an identity map",
                                         addr >> PAGE_SHIFT, hex(addr), hex(pte & KVM_PTE_ADDR_MASK))
            first = addr >> PAGE_SHIFT
            for k in range(1 << (9 * (3 - level))):
                if self._ram_lo <= first + k < self._ram_hi:
                    host_leaf[first + k] = pte
        hyp_leaf: dict[int, int] = {}
        assert h.pkvm_pgtable is not None
        lo = hyp_va(self._ram_lo << PAGE_SHIFT)
        size = (self._ram_hi - self._ram_lo) << PAGE_SHIFT
        for addr, level, pte in h.pkvm_pgtable.leaves(lo, size):
            first = hyp_pa(addr) >> PAGE_SHIFT
            for k in range(1 << (9 * (3 - level))):
                hyp_leaf[first + k] = pte
        vmm = h.vmemmap
        lo = self._ram_lo
        if self._in_vmemmap:
            hs, ys, sc = vmm.host_state, vmm.hyp_state, vmm.host_share_guest_count
            for i in range(vmm.nr):
                pfn = lo + i
                hp = host_leaf.get(pfn, 0)
                if (hs[i] == OWNED and ys[i] == NOPAGE and not sc[i] and (hp == 0 or hp & 1)
                        and pfn not in gmap and pfn not in hyp_leaf):
                    continue  # ordinary host memory, nothing maps it elsewhere: the fast path
                self._check_page(pfn, self.page_states(pfn), hp, hyp_leaf.get(pfn, 0),
                                 gmap.get(pfn, []))
        else:
            from pkvm.hyp.mem_protect import host_state_of_pte, hyp_state_of_pte

            for pfn in range(lo, self._ram_hi):
                hp, yp = host_leaf.get(pfn, 0), hyp_leaf.get(pfn, 0)
                states = (host_state_of_pte(h, hp, pfn << PAGE_SHIFT), hyp_state_of_pte(yp))
                self._check_page(pfn, states, hp, yp, [])
        self.check_globals(all_shared=True)
        self.check_tables()
        self.check_pools()
        self.check_hyp_accounting()
        from pkvm.check.ghost_ffa import check_owner_full  # the FF-A owner

        check_owner_full(self.machine.inspect, self.machine.firmware,
                         self.ghost.ffa.orphans if self.ghost is not None else None)

    def _tables(self) -> list[tuple[str, Any]]:
        h = self.h
        out: list[tuple[str, Any]] = [("hyp stage-1", h.pkvm_pgtable),
                                      ("host stage-2", h.host_mmu.pgt)]  # type: ignore[union-attr]
        for handle, vm in self.live_vms():
            if vm.pgt is not None and vm.pgt.pgd:
                out.append((f"guest {handle:#x} stage-2", vm.pgt))
        return out

    def check_tables(self) -> None:
        h = self.h
        vmm = h.vmemmap
        seen: dict[int, str] = {}
        for name, pgt in self._tables():
            for table in pgt.table_pages():
                pfn = table >> PAGE_SHIFT
                if pfn in seen:
                    raise InvariantViolation("table-pages", f"page in two tables: {seen[pfn]} "
                                             f"and {name}", pfn)
                seen[pfn] = name
                if not vmm.covers(table):
                    continue
                host, hyp = self.page_states(pfn)
                if hyp != OWNED or host != NOPAGE:
                    raise InvariantViolation("table-pages", f"{name} table page not hyp-owned",
                                             pfn, "NOPAGE/OWNED", f"{host.name}/{hyp.name}")
                counted = sum(1 for k in range(512) if pgt._counted(h.mem.read_u64(table + 8 * k)))
                rc = vmm.refcount[vmm.idx(table)]
                if rc != 1 + counted:
                    raise InvariantViolation("table-pages", f"{name} table page refcount", pfn,
                                             f"1 + {counted} counted entries", rc)

    def pools(self) -> list[tuple[str, Any]]:
        h = self.h
        out = [("hpool", h.hpool), ("host_s2_pool", h.host_s2_pool)]
        out += [(f"vm {hd:#x} pool", vm.pool) for hd, vm in self.live_vms()]
        return [(n, p) for n, p in out if p is not None]

    def hyp_owned_pages(self) -> set[int]:
        """pfns the hyp owns outside its carve-out."""
        h = self.h
        cb, cs = self.machine.carveout
        c_lo, c_hi = cb >> PAGE_SHIFT, (cb + cs) >> PAGE_SHIFT
        lo = self._ram_lo
        if self._in_vmemmap:
            ys = h.vmemmap.hyp_state
            out = {lo + i for i in range(h.vmemmap.nr) if ys[i] == OWNED}
        else:
            from pkvm.hyp.mem_protect import hyp_state_of_pte

            assert h.pkvm_pgtable is not None
            va = hyp_va(lo << PAGE_SHIFT)
            size = (self._ram_hi - lo) << PAGE_SHIFT
            out = set()
            for a, level, pte in h.pkvm_pgtable.leaves(va, size, True):
                if hyp_state_of_pte(pte) == OWNED:
                    first = hyp_pa(a) >> PAGE_SHIFT
                    out.update(range(first, first + (1 << (9 * (3 - level)))))
        return {p for p in out if not c_lo <= p < c_hi}

    def vm_owned_pages(self) -> dict[int, str]:
        """pfn -> what it is, for every page a live hyp VM accounts for."""
        h = self.h
        out: dict[int, str] = {}

        def add(pa: int, size: int, what: str) -> None:
            for p in range(pa >> PAGE_SHIFT, (pa + size + PAGE_SIZE - 1) >> PAGE_SHIFT):
                out[p] = what

        for hd, vm in self.live_vms():
            add(hyp_pa(vm.vm_va), vm.vm_size, f"VM {hd:#x} hyp VM")
            add(vm.pool.range_start, vm.pool.range_end - vm.pool.range_start, f"VM {hd:#x} pool")
            if vm.pgt is not None and vm.pgt.pgd:
                for t in vm.pgt.table_pages():
                    add(t, PAGE_SIZE, f"VM {hd:#x} stage-2 table")
            for pa, order in vm.pool.free_blocks():
                add(pa, PAGE_SIZE << order, f"VM {hd:#x} pool (free)")
            for vcpu in vm.vcpus:
                if vcpu is None:
                    continue
                add(hyp_pa(vcpu.mem_va), sizes.PKVM_HYP_VCPU_SIZE, f"VM {hd:#x} vCPU {vcpu.vcpu_idx}")
                pa, n = vcpu.memcache[0], vcpu.memcache[1]
                while n > 0 and h.mem.is_ram(pa):
                    add(pa & ~(PAGE_SIZE - 1), PAGE_SIZE, f"VM {hd:#x} vCPU memcache")
                    pa = h.mem.read_u64(pa & ~(PAGE_SIZE - 1))
                    n -= 1
        return out

    def check_hyp_accounting(self) -> None:
        owned = self.vm_owned_pages()
        stray = sorted(self.hyp_owned_pages() - set(owned))
        if stray:
            raise InvariantViolation("hyp-accounting", f"{len(stray)} hyp-owned page(s) outside "
                                     "the carve-out belong to no live VM (a leak, or a VM's "
                                     "memory left behind by teardown)", stray[0],
                                     "owned by a live VM", [hex(p) for p in stray[:8]])

    def check_pools(self) -> None:
        h = self.h
        vmm = h.vmemmap
        listed: dict[int, str] = {}
        for name, pool in self.pools():
            for pa, order in pool.free_blocks():
                pfn = pa >> PAGE_SHIFT
                if pfn in listed:
                    raise InvariantViolation("pool-free-lists", f"free block on two lists "
                                             f"({listed[pfn]}, {name})", pfn)
                listed[pfn] = name
                for k in range(1 << order):
                    p = pa + (k << PAGE_SHIFT)
                    if vmm.refcount[vmm.idx(p)]:
                        raise InvariantViolation("pool-free-lists", f"{name}: free page in use",
                                                 p >> PAGE_SHIFT, "refcount 0",
                                                 vmm.refcount[vmm.idx(p)])
                    if not h.mem.page_is_zero(p):
                        raise InvariantViolation("pool-free-lists", f"{name}: free page not zero",
                                                 p >> PAGE_SHIFT)


Check = Callable[[Checker], None]
