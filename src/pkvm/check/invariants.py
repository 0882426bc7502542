"""Named invariants over the hyp state, checked after every hypercall (`Machine(check=True)`).

Each invariant is a promise pKVM makes (docs/checking.md names the kernel rule); `INVARIANTS`
lists them by name with the sentence a violation quotes. The `Checker` reads hyp state read-only
and is incremental: after each call it finds the pages whose `hyp_vmemmap` entry changed (7.2
keeps page states there) plus the pages the call's arguments name, checks those pages against
every table, and re-checks the cheap global facts (VM table, loaded vCPUs, pins, VM refcounts).
The changed pages come from the hyp's own stores: every writer of an entry notes it
(`VmemmapView.drain_dirty`), and the checker compares just those entries with its copy.
Every `full_every` calls, and on `check_all()`, it checks every page and every table; the
periodic full check also compares the whole vmemmap with the copy, so a store no writer noted is
still seen (the finding `noted-stores`).
"""

from __future__ import annotations

import re
from array import array
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

from pkvm.arch.pgtable import KVM_PTE_ADDR_MASK, pte_valid
from pkvm.check.ghost import Ghost
from pkvm.check.ghost_ffa import check_owner_full
from pkvm.check.global_invariants import GlobalInvariants
from pkvm.check.host_pointers import HostPointerWatch
from pkvm.check.oracles import run_all
from pkvm.check.page_invariants import SB, plain_page, plain_page_6_12
from pkvm.check.violations import INVARIANTS, Invariant, InvariantViolation
from pkvm.inspect import (
    STATE_NAMES,
    PageState,
    PkvmHypVm,
    hyp_pa,
    hyp_state_of_pte,
    hyp_va,
)
from pkvm.machine.memory import PAGE_SHIFT

if TYPE_CHECKING:
    from pkvm.board import HvcResult, Machine, Proceed, TraceRecord

__all__ = ["INVARIANTS", "Checker", "Invariant", "InvariantViolation"]


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


def _copies(arrays: list[Any], spare: list[array[Any]]) -> list[array[Any]]:
    """A copy of each of `arrays` (the vmemmap's), written into the `spare` arrays of a checker
    that is done (a fuzzer's reboot after a hyp panic) where they have the same type and length:
    a copy into memory in use already takes ~13 us, a fresh one ~100 us (the new pages' faults)."""
    if len(spare) == len(arrays) and all(
            p.typecode == a.format and len(p) == len(a) for p, a in zip(spare, arrays)):
        for p, a in zip(spare, arrays):
            memoryview(p)[:] = a
        return spare
    return [array(a.format, a.tobytes()) for a in arrays]


_PFN_MASK: Final = (1 << 52) - 1


# Calls that cannot change any guest stage-2: the cached guest map survives them.
_GUEST_S2_STILL: Final = frozenset({
    "__pkvm_host_share_hyp", "__pkvm_host_unshare_hyp", "__pkvm_reserve_vm",
    "__pkvm_unreserve_vm", "__pkvm_vcpu_load", "__pkvm_vcpu_put", "__pkvm_init_vcpu",
    "__pkvm_start_teardown_vm", "__pkvm_tlb_flush_vmid", "__kvm_flush_vm_context",
})


_NOT_OWNED: Final = re.compile(b"[^" + re.escape(bytes([PageState.OWNED])) + b"]")
_NOT_NOPAGE: Final = re.compile(b"[^" + re.escape(bytes([PageState.NOPAGE])) + b"]")
_NONZERO: Final = re.compile(b"[^\x00]")

# (h0 | y0 << 8 | h1 << 16 | y1 << 24: the state bytes packed) -> the same as names (`_note`)
_TRANSITION_NAMES: Final[dict[int, tuple[tuple[str, str], tuple[str, str]]]] = {}


def _name(s: Any) -> str:
    if isinstance(s, int):
        return STATE_NAMES[s] if s in STATE_NAMES else PageState(s).name
    return str(s)


class Checker(GlobalInvariants):
    """Runs the invariants (and the ghost specification) after every hypercall of a machine."""

    def __init__(self, machine: Machine, full_every: int = 512, ghost: bool = True,
                 initial_check: bool = True, recycle: Checker | None = None):
        # The attributes the base classes declare are assigned here without an annotation:
        # re-declared, mypyc reports each to the garbage collector twice, and a dropped
        # machine with its checker is never freed (tests/test_check.py).
        self.machine = machine
        self.carveout = machine.carveout
        self.inspect = machine.inspect
        self.h = machine.inspect.hyp_view()
        self.full_every = full_every
        self.calls = 0
        self._pending: set[int] = set()
        self._gmap = None
        self._leaf_cache = {}
        self._gmap_built = None
        self._live = None
        # Pages a 7.2 guest still had when its VM was finalised: finalize does not reclaim
        # them (`__pkvm_finalize_teardown_vm`), so they keep their state with no guest
        # mapping left.
        self.orphan_owned = set()
        self.orphan_borrowed = Counter()
        self._about_to_orphan: list[tuple[int, PageState]] | None = None
        self.transitions = Counter()  # ((host, hyp) before, after) -> pages
        self._globals_fp: tuple[Any, ...] | None = None  # see _fingerprint
        self._fp: tuple[Any, ...] | None = None  # the last _fingerprint, at struct_gen _fp_gen
        self._fp_gen = -1
        self._globals_pfns = set()
        self.globals_skipped = 0
        vm = self.h.vmemmap
        self._in_vmemmap = self.h.profile.page_state_in_vmemmap
        vm.record_dirty()
        self._prev: list[array[Any]] = _copies(
            self._arrays(), recycle._prev if recycle is not None else [])
        self._pairs = list(zip(self._arrays(), self._prev))  # (the view's arrays are fixed)
        self.unrecorded = 0  # changed entries only the whole-vmemmap comparison found
        self._ram_lo = vm.base_pfn
        self._ram_hi = vm.base_pfn + vm.nr
        self.ghost = None
        if ghost:
            self.ghost = Ghost(self)
        self.host_pointers = HostPointerWatch(machine.inspect)
        if initial_check:
            self.check_all()
        self._install_entry_hook()

    def retire(self) -> None:
        """This checker's machine is dead and replaced (a fuzzer's reboot): drop the cycles
        its ghost makes (`Ghost.retire`), so reference counting frees both now. Not used
        again."""
        if self.ghost is not None:
            self.ghost.retire()
            self.ghost = None

    def _install_entry_hook(self) -> None:
        """Let the ghost see the pre-state: an interposer on the machine's hypercalls (the
        host's own go through it too). Hyp state is only read."""
        self.machine.interpose_hvc(self._before)

    def _before(self, proceed: Proceed, cpu: int, func: str | int,
                args: tuple[int, ...]) -> HvcResult:
        if self.h.held:  # the checker's readings of one state must not span a hypercall
            raise RuntimeError(f"hypercall {func!r} issued while the checker reads hyp state")
        self.h.hold(True)
        try:
            self.before_call(cpu, func, args)
        finally:
            self.h.hold(False)
        return proceed(cpu, func, args)

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
        if self.ghost is not None:  # what changed before the call is not the call's doing
            self._pending |= self._changed_pages()
        if self.ghost is not None:
            self.ghost.before_call(cpu, func, args)
        self.host_pointers.before(func, args)

    def after_call(self, rec: TraceRecord) -> None:
        if rec.panic is not None:
            if self.ghost is not None:
                self.ghost.calls.panicked(rec)
            return
        self.host_pointers.after()  # the kernel's own finding, before the state it corrupted
        self.calls += 1
        self.h.hold(True)  # one reading of the VM table for every check of this post-state
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
            full = self._full_due()
            if self.ghost is not None:
                self.ghost.after_call(rec, changed, full=full)
            self._oracles()
            if full:
                self.check_all()
                self._full_sweep()
            else:
                touched = changed | pending | self._arg_pages(rec.args)
                self.check_pages(touched, rec.name)
                fp = self._fingerprint_now()
                if fp != self._globals_fp or touched & self._globals_pfns:
                    self.check_globals(touched=touched)
                    self._globals_fp = fp
                else:
                    self.globals_skipped += 1
                if rec.name in ("__pkvm_finalize_teardown_vm", "__pkvm_teardown_vm") and rec.x1 == 0:
                    self.check_hyp_accounting()
        except InvariantViolation as v:
            v.call = (f"call #{rec.seq} {rec.name}{tuple(hex(a) for a in rec.args)} "
                      f"on cpu {rec.cpu}")
            v.args = (v._render(),)
            raise
        finally:
            self.h.hold(False)

    def check_changed(self) -> None:
        """The pages changed since the last check and the global facts, with no call to blame
        (the explorer's check between steps, when no CPU is inside the hyp)."""
        self._live = None
        self._gmap = None
        self.check_pages(self._changed_pages())
        self.check_globals()
        self._full_sweep()

    def _oracles(self) -> None:
        """The registered per-call oracles of `pkvm.check.oracles` (WARNs, hardware)."""
        found = run_all(self.machine.inspect)
        if found:
            name, msg = found[0]
            raise InvariantViolation(name, msg)

    def _fingerprint(self) -> tuple[Any, ...]:
        """What the global facts depend on besides page entries: the VM table's used slots, each
        live VM's dying flag, vCPUs and where they are loaded, and the per-CPU loaded vCPUs.
        `check_globals` re-runs when this changes or a call touches one of the pages it read
        (`_globals_pfns`: pinned pages and hyp VM pages)."""
        vms = tuple([(i, id(s), s.is_dying, s.created_vcpus,
                      tuple([(id(v), v.loaded_on) for v in s.vcpus if v is not None]))
                     if isinstance(s, PkvmHypVm) else (i, id(s))
                     for i, s in self.h.vm_slots()])
        return vms, tuple(map(id, self.h.loaded_hyp_vcpu))

    def _fingerprint_now(self) -> tuple[Any, ...]:
        """`_fingerprint`, read again only when `HypView.struct_gen` says something it reads
        may have changed since the last reading (the generation reads a superset of its
        inputs: tests/test_checker_fast.py holds the two together)."""
        gen = self.h.struct_gen()
        if gen != self._fp_gen or self._fp is None:
            self._fp = self._fingerprint()
            self._fp_gen = gen
        return self._fp

    def _full_due(self) -> bool:
        return bool(self.full_every) and self.calls % self.full_every == 0

    def _arg_pages(self, args: Iterable[int]) -> set[int]:
        """The RAM pages an argument names as a pfn, a PA or a hyp VA (52-bit pfns)."""
        out = set()
        lo, hi = self._ram_lo, self._ram_hi
        for a in args:  # (three tests rather than a loop over a tuple built per argument)
            pfn = a & _PFN_MASK
            if lo <= pfn < hi:
                out.add(pfn)
            pfn = (a >> PAGE_SHIFT) & _PFN_MASK
            if lo <= pfn < hi:
                out.add(pfn)
            pfn = (hyp_pa(a) >> PAGE_SHIFT) & _PFN_MASK
            if lo <= pfn < hi:
                out.add(pfn)
        return out

    def _changed_pages(self) -> set[int]:
        """pfns whose vmemmap entry (states, refcount, share count) changed since last call:
        of those the hyp's writers noted, the ones that differ from the copy (then updated)."""
        if self.h.nothing_dirty():  # (most calls' pre-state: a drain would answer empty)
            return set()
        dirty = self.h.vmemmap.drain_dirty()
        if not dirty:
            return set()
        if self._in_vmemmap:
            return self._changed_of(dirty)
        return self._changed_generic(dirty)

    def _changed_of(self, dirty: set[int]) -> set[int]:
        """7.2's `_changed_generic`: each of a page's four entries read once, for the
        comparison, the transition count and the copy (tests/test_checker_runs.py compares)."""
        out: set[int] = set()
        base = self._ram_lo
        (ch, ph), (cy, py), (cr, pr), (cs, ps) = self._pairs
        for pfn in dirty:
            i: Any = pfn - base  # (boxed once for the eight reads, not once for each)
            h0, h1, y0, y1 = ph[i], ch[i], py[i], cy[i]
            r0, r1, s0, s1 = pr[i], cr[i], ps[i], cs[i]
            if h0 != h1 or y0 != y1:
                self._transition(i, h0, y0, h1, y1)
            elif r0 == r1 and s0 == s1:
                continue
            out.add(pfn)
            if r0 != r1:
                pr[i] = r1
            if s0 != s1:
                ps[i] = s1
        return out

    _tcount: dict[int, int]  # packed state key -> pages, since `transitions` was set
    _tbase: Counter[Any]  # what `transitions` was last set to

    @property
    def transitions(self) -> Counter[Any]:
        """((host, hyp) before, (host, hyp) after) as names -> pages that changed so (7.2): a
        new Counter, from what it was set to and the changes `_transition` counted since."""
        out: Counter[Any] = Counter(self._tbase)
        for key, n in self._tcount.items():
            out[_TRANSITION_NAMES[key]] += n
        return out

    @transitions.setter
    def transitions(self, value: Counter[Any]) -> None:
        self._tbase = value
        self._tcount = {}

    def _transition(self, i: Any, h0: int, y0: int, h1: int, y1: int) -> None:
        """Count the change of (host, hyp) state of the page at vmemmap index `i` (the names
        made once per change) and bring the copy's two states up to date (7.2)."""
        key = h0 | y0 << 8 | h1 << 16 | y1 << 24  # (state bytes: an int key, no tuple)
        if key not in _TRANSITION_NAMES:
            _TRANSITION_NAMES[key] = ((_name(h0), _name(y0)), (_name(h1), _name(y1)))
        tc = self._tcount
        tc[key] = tc.get(key, 0) + 1
        if h0 != h1:
            self._pairs[0][1][i] = h1
        if y0 != y1:
            self._pairs[1][1][i] = y1

    def _changed_generic(self, dirty: set[int]) -> set[int]:
        """Of the noted pfns `dirty`, those whose entry differs from the copy (then noted)."""
        out: set[int] = set()
        base = self._ram_lo
        pairs = self._pairs
        for pfn in dirty:
            i = pfn - base
            for cur, prev in pairs:
                if cur[i] != prev[i]:
                    out.add(pfn)
                    break
        if out:
            self._note(out)
        return out

    def _sweep(self) -> set[int]:
        """The whole-vmemmap comparison: pfns whose entry differs from the copy although no
        writer noted it (after `_changed_pages`), counted in `unrecorded`; the copy made whole."""
        out: set[int] = set()
        for cur, prev in zip(self._arrays(), self._prev):
            c, p = cur.tobytes(), prev.tobytes()
            if c != p:
                _diff(c, p, 0, len(c), cur.itemsize, self._ram_lo, out)
        self.unrecorded += len(out)
        self._note(out)
        return out

    def _full_sweep(self) -> None:
        """`_sweep` at a full check: an entry no writer noted is a finding (`noted-stores`)."""
        missed = self._sweep()
        if missed:
            first = min(missed)
            raise InvariantViolation("noted-stores", f"{len(missed)} vmemmap entries changed "
                                     "since the last full check with no writer noting them",
                                     first, "noted", "not noted")

    def _note(self, pfns: set[int]) -> None:
        """Count the page-state transitions of `pfns` and bring the copy up to date."""
        base = self._ram_lo
        idx = [pfn - base for pfn in pfns]
        if self._in_vmemmap:  # (each state read once, for the count and the copy)
            (ch, ph), (cy, py) = self._pairs[:2]
            for i in idx:
                h0, y0, h1, y1 = ph[i], py[i], ch[i], cy[i]
                if h0 != h1 or y0 != y1:
                    self._transition(i, h0, y0, h1, y1)
            rest = self._pairs[2:]
        else:
            rest = self._pairs
        for cur, prev in rest:
            for i in idx:
                v = cur[i]
                if prev[i] != v:  # (a store into the copy costs more than a read)
                    prev[i] = v

    # -- everything --------------------------------------------------------------------------
    def _unplain(self, host_leaf: dict[int, int], hyp_leaf: dict[int, int],
                 gmap: dict[int, Any]) -> list[int]:
        """7.2: the vmemmap indices, ascending, of every page that is not host OWNED, hyp
        NOPAGE, shared with no guest, with a host leaf empty or valid, no valid hyp leaf and no
        guest mapping (`plain_page`'s first case: the pages the checks skip), found by byte
        searches of the state arrays rather than a loop over every page."""
        vmm = self.h.vmemmap
        lo, nr = self._ram_lo, vmm.nr
        found = {m.start() for m in _NOT_OWNED.finditer(vmm.host_state.tobytes())}
        found.update(m.start() for m in _NOT_NOPAGE.finditer(vmm.hyp_state.tobytes()))
        w = vmm.host_share_guest_count.itemsize
        found.update(m.start() // w for m in _NONZERO.finditer(
            vmm.host_share_guest_count.tobytes()))
        found.update(pfn - lo for pfn, pte in host_leaf.items() if pte and not pte & 1)
        found.update(pfn - lo for pfn, pte in hyp_leaf.items() if pte & 1)
        found.update(pfn - lo for pfn in gmap)
        return sorted(i for i in found if 0 <= i < nr)

    def check_all(self) -> None:
        """Every invariant over every page and table (slow: tens of ms)."""
        h = self.h
        self._gmap = None
        self._live = None
        gmap = self.guest_map() if h.profile.hyp_owned_guest_stage2 else {}
        host_leaf, hyp_leaf = self._leaf_maps()
        vmm = h.vmemmap
        lo = self._ram_lo
        if self._in_vmemmap:
            hs, ys, sc = vmm.host_state, vmm.hyp_state, vmm.host_share_guest_count
            for i in self._unplain(host_leaf, hyp_leaf, gmap):
                pfn = lo + i
                hp, yp, guests = host_leaf.get(pfn, 0), hyp_leaf.get(pfn, 0), gmap.get(pfn, [])
                if plain_page(hs[i], ys[i], sc[i], hp, yp, pfn << PAGE_SHIFT, guests):
                    continue  # host memory or the hyp's own, nothing else maps it: the fast path
                self._check_page(pfn, self.page_states(pfn), hp, yp, guests)
        else:
            state_of = h.host_state_of_pte
            for pfn in range(lo, self._ram_hi):
                hp, yp = host_leaf.get(pfn, 0), hyp_leaf.get(pfn, 0)
                states = (state_of(hp, pfn << PAGE_SHIFT), hyp_state_of_pte(yp))
                if plain_page_6_12(*states):
                    continue  # ordinary host memory: the fast path
                self._check_page(pfn, states, hp, yp, [])
        self.check_globals(all_shared=True)
        self.check_tables()
        self.check_pools()
        self.check_hyp_accounting()
        # The FF-A owner. Pages the kernel leaves SHARED_OWNED with no borrower it could name
        # are excused: FF-A's orphans, and the pages a 7.2 guest still borrowed when its VM was
        # finalised (`orphan_borrowed`, as the guest-consistent check above counts them).
        excused = [(pfn, 1) for pfn, n in self.orphan_borrowed.items() if n]
        if self.ghost is not None:
            excused += self.ghost.ffa.orphans
        check_owner_full(self.machine.inspect, self.machine.firmware, excused)

    def _leaf_maps(self) -> tuple[dict[int, int], dict[int, int]]:
        """pfn -> the host stage-2 leaf and the hyp stage-1 leaf (non-zero) of each RAM page;
        a valid host leaf that is not the identity map is the finding `no-host-access`."""
        h = self.h
        host_leaf: dict[int, int] = {}
        for addr, level, pte in h.host_pgt.leaves():
            if pte_valid(pte) and (pte & KVM_PTE_ADDR_MASK) != addr:
                raise InvariantViolation("no-host-access", "host stage-2 is not an identity map",
                                         addr >> PAGE_SHIFT, hex(addr), hex(pte & KVM_PTE_ADDR_MASK))
            first = addr >> PAGE_SHIFT
            for k in range(1 << (9 * (3 - level))):
                if self._ram_lo <= first + k < self._ram_hi:
                    host_leaf[first + k] = pte
        hyp_leaf: dict[int, int] = {}
        lo = hyp_va(self._ram_lo << PAGE_SHIFT)
        size = (self._ram_hi - self._ram_lo) << PAGE_SHIFT
        for addr, level, pte in h.hyp_pgt.leaves(lo, size):
            first = hyp_pa(addr) >> PAGE_SHIFT
            for k in range(1 << (9 * (3 - level))):
                hyp_leaf[first + k] = pte
        return host_leaf, hyp_leaf
