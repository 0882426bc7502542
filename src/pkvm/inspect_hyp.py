"""`HypView`: the read-only view of the hyp's own structures that the invariant checker and the
ghost read (`machine.inspect.hyp_view()`, re-exported by `pkvm.inspect`), with its vmemmap and
RAM views and the helpers that walk the VM table's used slots.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Final, TypeVar

from mypy_extensions import mypyc_attr

from pkvm.arch.pgtable import KvmPgtable
from pkvm.hyp.mem_protect import get_host_state, get_hyp_state, host_state_of_pte
from pkvm.hyp.memory import PageState
from pkvm.hyp.page_alloc import HypPool
from pkvm.hyp.pkvm import live_vms, vm_page
from pkvm.hyp.pkvm_structs import HYP_VCPU, HYP_VM, PkvmHypVcpu, PkvmHypVm

if TYPE_CHECKING:
    from pkvm.abi.profiles import Profile
    from pkvm.hyp.state import HypState

_T = TypeVar("_T")


def used_slots(table: Sequence[Any]) -> list[int]:
    """The indices of a table's slots that are not None (the VM table's used slots, a VM's
    initialised vCPUs), in order. A plain loop: compiled, it runs at C speed (~0.5 us over the
    VM table's 255 slots, where the iterator chain `compress(range, map(is_not, ...))` it
    replaced called `is_not` once per slot, ~5 us)."""
    out: list[int] = []
    if isinstance(table, list):  # (indexed: a compiled loop over a list, no iterator)
        lst: list[Any] = table
        for i in range(len(lst)):
            if lst[i] is not None:
                out.append(i)
        return out
    i = 0
    for s in table:
        if s is not None:
            out.append(i)
        i += 1
    return out


def same_objects(a: list[Any], b: list[Any]) -> bool:
    """Do two lists hold the same objects (identity), slot by slot, where each object's
    equality is its identity (None, `RESERVED_ENTRY`, hyp VMs: no `__eq__` of their own)? A
    list comparison (C: it skips a slot whose two objects are the same without asking
    `__eq__`; ~5 instructions a slot, where a compiled loop over the slots costs ~30 and
    `list.count(None)`, the test it replaced, ~20)."""
    return len(a) == len(b) and a == b


def used(table: Sequence[_T | None]) -> list[_T]:
    """The slots of `table` that are not None, in order (as `used_slots`)."""
    return [s for s in table if s is not None]


def _host_pgt(h: HypState) -> KvmPgtable:
    """The host stage-2 (it exists from `__pkvm_init` on, before any view is made)."""
    mmu = h.host_mmu
    assert mmu is not None
    return mmu.pgt


def _hyp_pgt(h: HypState) -> KvmPgtable:
    """The hyp stage-1 (it exists from `__pkvm_init` on)."""
    pgt = h.pkvm_pgtable
    assert pgt is not None
    return pgt


# The views recording each vmemmap's stores (`VmemmapView.record_dirty`), as weak references: a
# drain hands what it takes to the other recorders of the same vmemmap, so two checkers never
# steal from each other. Keyed by the vmemmap's id (compiled with mypyc, a HypVmemmap takes no
# weak reference): a live view holds its vmemmap, so the id of an entry with a live view is never
# reused. A view's death removes its reference, and the entry with its last one (`_forget`), so
# registering costs the same however many machines a fuzzer has booted and dropped.
_RECORDERS: Final[dict[int, list[weakref.ref[VmemmapView]]]] = {}


def _forget(key: int, peers: list[weakref.ref[VmemmapView]],
            ref: weakref.ref[VmemmapView]) -> None:
    """A recording view died: drop its reference, and its vmemmap's entry with the last one."""
    if ref in peers:
        peers.remove(ref)
    if not peers and _RECORDERS.get(key) is peers:
        del _RECORDERS[key]


@mypyc_attr(native_class=False)  # weakly referenced (_RECORDERS): a native class takes no weakref
class VmemmapView:
    """`hyp_vmemmap`, read-only: each per-page array as a read-only memoryview, and the pages
    whose entries the hyp stored to since the last look (`record_dirty`, `drain_dirty`)."""

    __slots__ = ("base_pfn", "nr", "refcount", "host_state", "hyp_state",
                 "host_share_guest_count", "_v", "_backlog", "__weakref__")

    def __init__(self, h: HypState):
        v = h.vmemmap
        self._v = v
        self.base_pfn: int = v.base_pfn
        self.nr: int = v.nr
        self.refcount = memoryview(v.refcount).toreadonly()
        self.host_state = memoryview(v.host_state).toreadonly()
        self.hyp_state = memoryview(v.hyp_state).toreadonly()
        self.host_share_guest_count = memoryview(v.host_share_guest_count).toreadonly()
        self._backlog: set[int] | None = None  # entries drained by another recorder, for this one

    def record_dirty(self) -> None:
        """From now on, note every page whose refcount, states or share count the hyp stores to
        (`HypVmemmap.touch`), for `drain_dirty`."""
        if self._backlog is not None:
            return
        self._backlog = set()
        if self._v.dirty is None:
            self._v.dirty = set()
        key = id(self._v)
        peers = _RECORDERS.setdefault(key, [])
        peers.append(weakref.ref(self, functools.partial(_forget, key, peers)))

    def drain_dirty(self) -> set[int]:
        """The pfns whose entries the hyp stored to since the last drain (a superset of those
        whose values changed), forgotten here; empty unless `record_dirty` was called."""
        if self._backlog is None:
            return set()
        v = self._v
        new = v.dirty
        if not new:
            if new is None:
                v.dirty = set()
            if not self._backlog:
                return set()  # no store since the last drain (most calls before their entry)
            new = set()
        else:
            v.dirty = set()
            peers = _RECORDERS.get(id(v))
            if peers is not None and len(peers) > 1:  # (this view alone: nobody to hand to)
                for ref in peers:
                    other = ref()
                    if other is not None and other is not self and other._backlog is not None:
                        other._backlog |= new
        taken = self._backlog
        if taken:
            taken |= new
            self._backlog = set()
        else:  # (the usual case: nothing handed over by another recorder)
            taken = new
        base = self.base_pfn
        return {base + i for i in taken}

    def idx(self, pa: int) -> int:
        return self._v.idx(pa)

    def covers(self, pa: int) -> bool:
        return self._v.covers(pa)

    def page_count(self, pa: int) -> int:
        return int(self.refcount[self._v.idx(pa)])


class RamView:
    """RAM as an observer with every page mapped sees it: reads only."""

    __slots__ = ("base", "end", "nr_pages", "u64", "_mem")

    def __init__(self, h: HypState):
        mem = h.mem
        self._mem = mem
        self.base: int = mem.base
        self.end: int = mem.end
        self.nr_pages: int = mem.nr_pages
        self.u64 = mem.u64.toreadonly()

    def is_ram(self, pa: int) -> bool:
        return self._mem.is_ram(pa)

    def read(self, pa: int, n: int) -> bytes:
        return self._mem.read(pa, n)

    def read_u64(self, pa: int) -> int:
        return self._mem.read_u64(pa)

    def page_is_zero(self, pa: int) -> bool:
        return self._mem.page_is_zero(pa)


# The byte spans of a hyp VM and a hyp vCPU that `HypView.struct_gen` reads (offsets in the
# struct): struct kvm's created_vcpus, arch.pkvm.handle, is_protected, is_created, is_dying and
# the VM's host_kvm; struct kvm_vcpu's kvm, vcpu_id, vcpu_idx and the vCPU's host_vcpu and
# loaded_hyp_vcpu (`pkvm.hyp.pkvm_structs`).
VM_SPANS: tuple[tuple[int, int], ...] = (
    (HYP_VM["kvm.created_vcpus"][0], HYP_VM["kvm.arch.pkvm.is_dying"][0] + 1),
    (HYP_VM["host_kvm"][0], HYP_VM["host_kvm"][0] + 8))
VCPU_SPANS: tuple[tuple[int, int], ...] = (
    (HYP_VCPU["vcpu.kvm"][0], HYP_VCPU["vcpu.vcpu_idx"][0] + 4),
    (HYP_VCPU["host_vcpu"][0], HYP_VCPU["loaded_hyp_vcpu"][0] + 8))


class HypView:
    """The hyp's state for oracles, read-only (see the module docstring)."""

    def __init__(self, h: HypState):
        self._h = h
        self.profile: Profile = h.profile
        self.vmemmap = VmemmapView(h)
        self.mem = RamView(h)
        # (a copy of the table's slots, the answer): see vm_slots
        self._slots: tuple[list[object | None] | None, list[tuple[int, object]]] = (None, [])
        self.held = False  # see hold
        self._read_in_hold = False  # vm_slots has read the table since the hold began
        # struct_gen's last reading: (used slots, their hyp VMs, each VM's vCPU array (a copy),
        # each CPU's loaded vCPU (a copy), the field bytes' spans, those bytes)
        self._skey: tuple[Any, list[PkvmHypVm], list[list[Any]], list[Any], Any, Any] = (
            None, [], [], [], None, ())
        self._sgen = 0
        self._gen_in_hold = False  # struct_gen has read the structs since the hold began

    def hold(self, on: bool) -> None:
        """Hold (`on`) or release the reading of the VM table: while held, `vm_slots` reads
        the table once (at its first call) and answers that reading until the release. For a
        caller that reads one state several times with no hypercall in between (the checker,
        before and after each call: its interposer refuses a hypercall while the view is
        held)."""
        self.held = on
        self._read_in_hold = False
        self._gen_in_hold = False

    def nothing_dirty(self) -> bool:
        """True when `vmemmap.drain_dirty()` would answer the empty set and change nothing: the
        hyp noted no store since the last drain (its set is empty, not None) and no other
        recorder handed any over. A native read of the hyp's set, where a drain is a method
        call on the (non-native) view (tests/test_checker_kept.py compares the two)."""
        d = self._h.vmemmap.dirty
        return d is not None and not d and not self.vmemmap._backlog

    @property
    def vm_table(self) -> tuple[object | None, ...]:
        """The VM table's slots: None (free), `RESERVED_ENTRY` or a `PkvmHypVm`."""
        return tuple(self._h.vm_table or ())

    def vm_table_size(self) -> int:
        """How many slots the VM table has (used or free)."""
        return len(self._h.vm_table or ())

    def vm_slots(self) -> list[tuple[int, object]]:
        """(index, slot) of every used slot of the VM table, in order; do not modify the list.
        The last answer is reused when it still holds: every slot holds the same object as at
        that reading (`same_objects` against a copy of the slots; the used ones by identity)."""
        if self._read_in_hold:
            return self._slots[1]
        self._read_in_hold = self.held
        table = self._h.vm_table or []
        copy, found = self._slots
        if copy is None or not same_objects(copy, table):
            return self._read_slots(table)
        for i, s in found:  # (the used slots by identity too: a compiled loop over a few)
            if table[i] is not s:
                return self._read_slots(table)
        return found

    def _read_slots(self, table: list[object | None]) -> list[tuple[int, object]]:
        """`vm_slots`' reading of every slot, kept (with a copy of the slots) for the next
        call."""
        found = [(i, table[i]) for i in used_slots(table)]
        self._slots = (list(table), found)
        return found

    def struct_gen(self) -> int:
        """A number that changes whenever anything the checker reads of the VM table, the hyp
        VMs and their vCPUs may have changed (and stays while none did): the used slots
        (`vm_slots`: each the same object), each CPU's loaded vCPU, each live VM's vCPU array
        (the same objects), and the bytes of the fields read from the structs' pages in RAM
        (`STRUCT_SPANS`: created_vcpus, handle, is_protected/is_created/is_dying, host_kvm;
        each vCPU's kvm, vcpu_id, vcpu_idx, host_vcpu, loaded_hyp_vcpu). The bytes are read back
        rather than noted by their writers, so a store by any path (a stray EL2 store, a bug
        that skips a setter) changes the number as the field's own setter would. Held
        (`hold`), the structs are read once, at the first call in the hold."""
        if self._gen_in_hold:
            return self._sgen
        self._gen_in_hold = self.held
        found = self.vm_slots()
        h = self._h
        k = self._skey
        if found is k[0]:
            vms = k[1]
        else:
            vms = [s for _, s in found if isinstance(s, PkvmHypVm)]
        lists = [vm.vcpus for vm in vms]
        if found is k[0] and lists == k[2]:  # the same structs: the same spans
            raw = k[4](h.mem._map)  # (a tuple of the spans' bytes, compared as it is)
            loaded = k[3] if h.loaded_hyp_vcpu == k[3] else list(h.loaded_hyp_vcpu)
            if raw == k[5] and loaded is k[3]:
                return self._sgen
            self._skey = (found, vms, k[2], loaded, k[4], raw)
            self._sgen += 1
            return self._sgen
        spans = [slice(vm._off + a, vm._off + b) for vm in vms for a, b in VM_SPANS]
        spans += [slice(v._off + a, v._off + b) for vm in vms for v in vm.vcpus
                  if v is not None for a, b in VCPU_SPANS]
        get = itemgetter(*spans, slice(0, 0))  # (the empty span: always a tuple)
        self._skey = (found, vms, [list(x) for x in lists], list(h.loaded_hyp_vcpu), get,
                      get(h.mem._map))
        self._sgen += 1
        return self._sgen

    @property
    def loaded_hyp_vcpu(self) -> tuple[PkvmHypVcpu | None, ...]:
        return tuple(self._h.loaded_hyp_vcpu)

    @property
    def host_pgt(self) -> KvmPgtable:
        return _host_pgt(self._h)

    @property
    def hyp_pgt(self) -> KvmPgtable:
        return _hyp_pgt(self._h)

    def pools(self) -> list[tuple[str, HypPool]]:
        """The hyp's global page pools (each VM's own pool is `vm.pool`)."""
        h = self._h
        out = [("hpool", h.hpool), ("host_s2_pool", h.host_s2_pool)]
        return [(name, pool) for name, pool in out if pool is not None]

    def live_vms(self) -> list[tuple[int, PkvmHypVm]]:
        """(handle, VM) of every hyp VM in the table."""
        return live_vms(self._h)

    def host_state(self, pa: int) -> PageState:
        return get_host_state(self._h, pa)

    def hyp_state(self, pa: int) -> PageState:
        return get_hyp_state(self._h, pa)

    def host_state_of_pte(self, pte: int, addr: int) -> PageState:
        """6.12: the host's state of `addr` from its host stage-2 leaf `pte`."""
        return host_state_of_pte(self._h, pte, addr)

    @staticmethod
    def vm_page(vm: PkvmHypVm) -> int:
        """PA of the page holding hyp VM `vm`'s struct."""
        return vm_page(vm)

    @staticmethod
    def counted_entries(pgt: KvmPgtable, table: int, mem: RamView) -> int:
        """Entries of table page `table` that hold a reference on it (its refcount - 1): in a
        stage-1 table the valid ones, in a stage-2 table every non-zero one (an invalid entry
        carrying an ownership annotation holds its reference too)."""
        ptes = mem.u64[(table - mem.base) >> 3:((table - mem.base) >> 3) + 512].tolist()
        if pgt.stage == 1:
            return sum(pte & 1 for pte in ptes)
        return sum(1 for pte in ptes if pte)
