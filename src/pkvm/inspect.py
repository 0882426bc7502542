"""The read-only view of a machine, for tests, checkers and tools (`machine.inspect`).

Everything `Inspector` returns is a copy: nothing here can change hyp state. `HypView`
(`machine.inspect.hyp_view()`) is the view the invariant checker and the ghost specification
read the hyp's own structures through: the vmemmap arrays and RAM as read-only memoryviews, the
VM table and the per-CPU loaded vCPUs as tuples, and the hyp's page-table, VM and pool objects
for reading. With the pure decoders re-exported here (page states, annotations, hyp VA <-> PA),
it is all `pkvm.check` may use of the hyp: an import contract (pyproject.toml) forbids
`pkvm.check` to import `pkvm.hyp`, so an oracle cannot call the code it checks.
"""

from __future__ import annotations

import copy
import functools
import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import compress, repeat
from operator import is_not, itemgetter
from typing import TYPE_CHECKING, Any, TypeVar, cast

from mypy_extensions import mypyc_attr

from pkvm.abi.sizes import HANDLE_OFFSET
from pkvm.arch.pgtable import KvmPgtable, pte_valid, stage2_pte_prot
from pkvm.hyp.mem_protect import (
    decode_host_annotation,
    get_host_state,
    get_hyp_state,
    host_state_of_pte,
    hyp_state_of_pte,
)
from pkvm.hyp.mem_protect_guest import guest_state_of_pte
from pkvm.hyp.memory import ComponentId, PageState
from pkvm.hyp.mm import hyp_pa, hyp_va, kern_hyp_va_to_pa
from pkvm.hyp.page_alloc import HypPool
from pkvm.hyp.pkvm import RESERVED_ENTRY, handle_to_idx, live_vms, vm_page, vm_snapshot
from pkvm.hyp.pkvm_structs import HYP_VCPU, HYP_VM, PkvmHypVcpu, PkvmHypVm
from pkvm.machine.memory import PAGE_SHIFT

if TYPE_CHECKING:
    from pkvm.abi.profiles import Profile
    from pkvm.board import Machine
    from pkvm.hyp.state import HypState

__all__ = [
    "RESERVED_ENTRY", "ComponentId", "HypView", "Inspector", "PageInfo", "PageState",
    "PkvmHypVcpu", "PkvmHypVm", "decode_host_annotation", "guest_state_of_pte",
    "hyp_state_of_pte", "hyp_pa", "hyp_va",
]

STATE_NAMES: dict[int, str] = {s: s.name for s in PageState}  # a state (or its int) -> name


_T = TypeVar("_T")


def used_slots(table: Sequence[Any]) -> Iterator[int]:
    """The indices of a table's slots that are not None (the VM table's used slots, a VM's
    initialised vCPUs), found without a Python loop over the free ones."""
    return compress(range(len(table)), map(is_not, table, repeat(None)))


def used(table: Sequence[_T | None]) -> list[_T]:
    """The slots of `table` that are not None, in order (as `used_slots`)."""
    return cast("list[_T]", list(compress(table, map(is_not, table, repeat(None)))))


PAGE_STATE_VALUES = {s.name: int(s) for s in PageState}  # the values `page_states` returns


@dataclass(frozen=True)
class PageInfo:
    pfn: int
    owner: Any  # "host", "hyp", ("guest", handle) or None (not memory)
    host: str
    hyp: str
    guests: dict[int, str]
    refcount: int
    share_count: int


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


class Inspector:
    def __init__(self, hyp: "HypState", machine: "Machine"):
        self._h = hyp
        self._m = machine

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled (a machine snapshot) as its constructor's arguments (compiled with mypyc, a
        class is not rebuilt from its attributes alone)."""
        return (Inspector, (self._h, self._m))

    # -- VMs ---------------------------------------------------------------------------
    def vms(self) -> list[dict[str, Any]]:
        h = self._h
        out = []
        for idx, slot in enumerate(h.vm_table or []):
            if slot is None:
                continue
            handle = idx + HANDLE_OFFSET
            if slot is RESERVED_ENTRY:
                out.append({"handle": handle, "state": "reserved", "protected": None, "vcpus": {}})
            elif isinstance(slot, PkvmHypVm):
                out.append(vm_snapshot(h, slot, handle))
            else:
                out.append({"handle": handle, "state": f"not a hyp VM: {slot!r}",
                            "protected": None, "vcpus": {}})
        return out

    # -- pages -------------------------------------------------------------------------
    def guest_states(self) -> dict[int, dict[int, PageState]]:
        """handle -> {pa: state} for every page mapped in a hyp-owned guest stage-2."""
        out: dict[int, dict[int, PageState]] = {}
        for handle, vm in live_vms(self._h):
            states: dict[int, PageState] = {}
            if vm.pgt is not None and vm.pgt.pgd:
                for _ipa, level, pte in vm.pgt.leaves(valid_only=True):
                    pa = pte & 0xFFFF_FFFF_F000
                    for k in range(1 << (9 * (3 - level))):
                        states[pa + (k << PAGE_SHIFT)] = guest_state_of_pte(pte)
            out[handle] = states
        return out

    def page_counts(self) -> dict[tuple[Any, str], int]:
        """{(owner, state): pages}: each component's pages in each state other than NOPAGE."""
        h = self._h
        mem = h.mem
        counts: Counter[tuple[Any, str]] = Counter()
        if h.profile.page_state_in_vmemmap:
            vm = h.vmemmap
            hs = Counter(vm.host_state)
            ys = Counter(vm.hyp_state)
            for s, n in hs.items():
                if s != PageState.NOPAGE:
                    counts[("host", PageState(s).name)] += n
            for s, n in ys.items():
                if s != PageState.NOPAGE:
                    counts[("hyp", PageState(s).name)] += n
        else:
            for i in range(mem.nr_pages):
                pa = mem.base + (i << PAGE_SHIFT)
                s = get_host_state(h, pa)
                if s != PageState.NOPAGE:
                    counts[("host", PageState(s).name)] += 1
            for _va, level, pte in _hyp_pgt(h).leaves(valid_only=True):
                counts[("hyp", PageState(hyp_state_of_pte(pte)).name)] += 1 << (9 * (3 - level))
        for handle, states in self.guest_states().items():
            for s in states.values():
                counts[(("guest", handle), PageState(s).name)] += 1
        return {k: v for k, v in counts.items() if v}

    def page(self, pfn: int) -> PageInfo:
        h = self._h
        pa = pfn << PAGE_SHIFT
        if not h.mem.is_ram(pa):
            return PageInfo(pfn, None, "NOPAGE", "NOPAGE", {}, 0, 0)
        host = get_host_state(h, pa)
        hyp = get_hyp_state(h, pa)
        guests = {hd: PageState(st[pa]).name for hd, st in self.guest_states().items() if pa in st}
        owner: Any = None
        if host in (PageState.OWNED, PageState.SHARED_OWNED):
            owner = "host"
        elif hyp in (PageState.OWNED, PageState.SHARED_OWNED):
            owner = "hyp"
        else:
            for hd, s in guests.items():
                if s in ("OWNED", "SHARED_OWNED"):
                    owner = ("guest", hd)
        i = h.vmemmap.idx(pa)
        return PageInfo(pfn, owner, host.name, hyp.name, guests, h.vmemmap.refcount[i],
                        h.vmemmap.host_share_guest_count[i])

    def host_annotation(self, pa: int) -> tuple[int, int] | None:
        _, pte, _ = _host_pgt(self._h).get_leaf(pa)
        return decode_host_annotation(pte)

    # -- tables ------------------------------------------------------------------------
    def tables(self) -> list[str]:
        names = ["hyp", "host"]
        names += [f"guest:{hd:#x}" for hd, vm in live_vms(self._h) if vm.pgt is not None]
        return names

    def table(self, name: str) -> KvmPgtable:
        h = self._h
        if name in ("hyp", "hyp stage-1") and h.pkvm_pgtable is not None:
            return h.pkvm_pgtable
        if name in ("host", "host stage-2") and h.host_mmu is not None:
            return h.host_mmu.pgt
        if name.startswith("guest:"):
            want = int(name.split(":", 1)[1], 0)
            for hd, vm in live_vms(h):
                if hd == want and vm.pgt is not None:
                    return vm.pgt
        raise KeyError(f"no table {name!r}; tables: {self.tables()}")

    def walk(self, name: str) -> list[dict[str, Any]]:
        """Every non-zero leaf of a table: {addr, level, size, pte, valid, prot, out}."""
        pgt = self.table(name)
        out = []
        for addr, level, pte in pgt.leaves():
            out.append({
                "addr": addr, "level": level, "size": 1 << (12 + 9 * (3 - level)), "pte": pte,
                "valid": pte_valid(pte), "out": pte & 0xFFFF_FFFF_F000 if pte_valid(pte) else None,
                "prot": stage2_pte_prot(pte) if pgt.stage == 2 else None,
            })
        return out

    def pool(self, name: str) -> dict[str, int]:
        h = self._h
        pool = {"hpool": h.hpool, "host_s2_pool": h.host_s2_pool}[name]
        assert pool is not None
        return {"pages": pool.nr_pages, "free": pool.free_pages(), "start": pool.range_start}

    def warnings(self) -> list[str]:
        """Each fired WARN's site: its function's frame and the one above, as tracebacks print."""
        return [w.stack for w in self._h.warnings]

    # -- what the hardware saw (for `pkvm.check.hw_oracles`) ---------------------------------
    def tlb_stale_uses(self) -> list[str]:
        """Every access made through a TLB entry a fresh walk disagreed with (EL2, host)."""
        h = self._h
        return list(h.el2_tlb.stale_uses) + list(h.host_s2_tlb.stale_uses)

    def el2_bad_stores(self) -> list[str]:
        """Every EL2 store to a page the hyp neither owned nor had shared with it."""
        return list(self._h.bad_stores)

    def wiped_returns(self) -> list[int]:
        """PAs of pages the latest hypercall handed back to the host after a kernel wipe."""
        return list(self._h.wiped_returns)

    def hw_event_count(self) -> int:
        """How many stale-TLB uses, stray EL2 stores and wiped returns there are now, the three
        lists above (cheap: a per-call oracle asks for the lists only when this is not 0)."""
        h = self._h
        return (len(h.el2_tlb.stale_uses) + len(h.host_s2_tlb.stale_uses) + len(h.bad_stores)
                + len(h.wiped_returns))

    def warning_count(self) -> int:
        """How many hyp WARN_ONs have fired so far (cheap: for per-call oracles)."""
        return len(self._h.warnings)

    # -- cheap per-call views (for the checkers' per-hypercall oracles) --------------------
    def read(self, pa: int, n: int) -> bytes:
        """A copy of `n` bytes of RAM at `pa` (what any observer with the page mapped sees)."""
        return self._h.mem.read(pa, n)

    def is_ram(self, pa: int) -> bool:
        return self._h.mem.is_ram(pa)

    def ram_range(self) -> tuple[int, int]:
        """[base, end) of the one RAM region the hyp knows (its memblock)."""
        return self._h.mem.base, self._h.mem.end

    def page_quick(self, pfn: int) -> tuple[str, str, int, int] | None:
        """(host state, hyp state, refcount, host_share_guest_count) of one RAM page, or None."""
        h = self._h
        pa = pfn << PAGE_SHIFT
        if not 0 <= pa < 1 << 64 or not h.mem.is_ram(pa):
            return None
        i = h.vmemmap.idx(pa)
        return (STATE_NAMES[get_host_state(h, pa)], STATE_NAMES[get_hyp_state(h, pa)],
                h.vmemmap.refcount[i], h.vmemmap.host_share_guest_count[i])

    def host_ia_bits(self) -> int:
        """The host stage-2's input-address size (`pfn_range_is_valid`'s limit)."""
        return self._h.host_mmu.pgt.ia_bits

    def ffa_proxy(self) -> dict[str, Any] | None:
        """EL2's FF-A proxy (`nvhe/ffa.c`): whether it was set up at init, the negotiated
        version, the host's pinned mailbox PAs (0: none) and the descriptor buffer's size;
        None before the proxy's state exists."""
        p = self._h.ffa
        if p is None:
            return None
        return {"set_up": bool(p.hyp_tx), "negotiated": p.negotiated, "version": p.version,
                "host_tx": p.host_tx, "host_rx": p.host_rx, "desc_len": p.desc_len}

    def vm(self, handle: int) -> dict[str, Any] | None:
        """The hyp VM in the slot of `handle` (None if free or reserved): protected, dying,
        vCPUs created and initialised, where each is loaded."""
        table = self._h.vm_table or []
        idx = handle_to_idx(handle)
        slot = table[idx] if idx < len(table) else None
        if not isinstance(slot, PkvmHypVm):
            return None
        return {"handle": slot.handle, "protected": slot.is_protected, "dying": slot.is_dying,
                "created": slot.created_vcpus,
                "vcpus": {v.vcpu_idx: v.loaded_on for v in used(slot.vcpus)}}

    def loaded_vcpu(self, cpu: int) -> dict[str, Any] | None:
        """The hyp vCPU loaded on `cpu` (7.2): its VM's handle, protected/dying, its index, the
        hyp memcache (head, nr) and the PA of the host struct kvm_vcpu it mirrors."""
        lv = self._h.loaded_hyp_vcpu
        v = lv[cpu] if 0 <= cpu < len(lv) else None
        if v is None:
            return None
        return {"handle": v.vm.handle, "protected": v.vm.is_protected, "dying": v.vm.is_dying,
                "idx": v.vcpu_idx, "memcache": (v.memcache[0], v.memcache[1]),
                "host_vcpu_pa": hyp_pa(v.host_vcpu)}

    def guest_leaf(self, handle: int, ipa: int) -> tuple[int, int, int] | None:
        """(ret, level, descriptor) of the guest stage-2 leaf covering `ipa` in VM `handle` as
        `kvm_pgtable_get_leaf` finds it (the descriptor may be invalid: 0 or an annotation; ret
        -ERANGE past the IPA space), or None if there is no such VM or table."""
        table = self._h.vm_table or []
        idx = handle_to_idx(handle)
        slot = table[idx] if idx < len(table) else None
        if not isinstance(slot, PkvmHypVm) or slot.pgt is None or not slot.pgt.pgd:
            return None
        ret, pte, level = slot.pgt.get_leaf(ipa)
        return ret, level, pte

    def host_ptr_pa(self, host_va: int) -> int:
        """The PA EL2 resolves a host kernel pointer to (`__hyp_pa(kern_hyp_va(va))`)."""
        return kern_hyp_va_to_pa(self._h, host_va)

    def finalised(self) -> bool:
        """Has `__pkvm_prot_finalize` run (`is_protected_kvm_enabled` past init)?"""
        return self._h.protected_mode_initialized

    def cntvoff(self, cpu: int) -> int:
        """CNTVOFF_EL2 of `cpu` as EL2 last set it."""
        return self._h.el2[cpu].cntvoff_el2

    def vcpu_fault(self, cpu: int) -> tuple[int, int] | None:
        """(ESR_EL2, HPFAR_EL2) of the last exit of the hyp vCPU loaded on `cpu`, or None."""
        lv = self._h.loaded_hyp_vcpu
        v = lv[cpu] if 0 <= cpu < len(lv) else None
        return None if v is None else (v.fault_esr, v.fault_hpfar)

    def watch_guest_hvcs(self, fn: Any) -> None:
        """Call `fn(phase, info)` around every guest HVC EL2 handles itself
        (`kvm_handle_pvm_hvc64`): phase "entry" with the guest's x0..x3, then "exit" with
        x0..x3, whether EL2 handled it, and the vCPU's fault ESR/HPFAR (read-only copies)."""
        self._h.guest_hvc_watchers.append(fn)

    def carve(self) -> Any:
        return copy.copy(self._h.carve)

    @property
    def profile(self) -> Profile:
        return self._h.profile

    def hyp_view(self) -> HypView:
        """The read-only view of the hyp's own structures (for `pkvm.check`)."""
        return HypView(self._h)

    # -- bulk page states (for pictures and counters) -------------------------------------
    def page_states(self) -> tuple[bytes, bytes, dict[int, tuple[int, int]]]:
        """Every RAM page at once: (host_states, hyp_states, guests).

        `host_states[i]` / `hyp_states[i]` are `PageState` values of RAM page i (pfn =
        RAM base pfn + i), as `page(pfn).host` / `.hyp` give them one at a time; `guests` maps a
        pfn to (handle, PageState value) for every page in a hyp-owned guest stage-2. Read-only.
        """
        h = self._h
        mem = h.mem
        n = mem.nr_pages
        base_pfn = mem.base >> PAGE_SHIFT
        if h.profile.page_state_in_vmemmap:
            host = bytes(h.vmemmap.host_state)
            hyp = bytes(h.vmemmap.hyp_state)
        else:
            hs = bytearray([PageState.OWNED]) * n  # an empty host stage-2 entry reads OWNED
            for addr, level, pte in _host_pgt(h).leaves():
                i = (addr >> PAGE_SHIFT) - base_pfn
                k = 1 << (9 * (3 - level))
                lo, hi = max(i, 0), min(i + k, n)
                if lo < hi:
                    hs[lo:hi] = bytes([host_state_of_pte(h, pte, addr)]) * (hi - lo)
            ys = bytearray([PageState.NOPAGE]) * n
            for va, level, pte in _hyp_pgt(h).leaves(valid_only=True):
                i = (hyp_pa(va) >> PAGE_SHIFT) - base_pfn
                k = 1 << (9 * (3 - level))
                lo, hi = max(i, 0), min(i + k, n)
                if lo < hi:
                    ys[lo:hi] = bytes([hyp_state_of_pte(pte)]) * (hi - lo)
            host, hyp = bytes(hs), bytes(ys)
        guests: dict[int, tuple[int, int]] = {}
        for handle, states in self.guest_states().items():
            for pa, s in states.items():
                guests[pa >> PAGE_SHIFT] = (handle, int(s))
        return host, hyp, guests


# The views recording each vmemmap's stores (`VmemmapView.record_dirty`), as weak references: a
# drain hands what it takes to the other recorders of the same vmemmap, so two checkers never
# steal from each other. Keyed by the vmemmap's id (compiled with mypyc, a HypVmemmap takes no
# weak reference): a live view holds its vmemmap, so the id of an entry with a live view is never
# reused. A view's death removes its reference, and the entry with its last one (`_forget`), so
# registering costs the same however many machines a fuzzer has booted and dropped.
_RECORDERS: dict[int, list[weakref.ref[VmemmapView]]] = {}


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
        taken, self._backlog = self._backlog | new, set()
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
        # (table length, answer, its indices, its slots): see vm_slots
        self._slots: tuple[int, list[tuple[int, object]], list[int], list[object]] = (
            -1, [], [], [])
        self.held = False  # see hold
        self._read_in_hold = False  # vm_slots has read the table since the hold began
        # struct_gen's last reading: (used slots, their hyp VMs, each VM's vCPU array (a copy),
        # each CPU's loaded vCPU (a copy), the field bytes' spans, those bytes)
        self._skey: tuple[Any, list[PkvmHypVm], list[list[Any]], list[Any], Any, bytes] = (
            None, [], [], [], None, b"")
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

    @property
    def vm_table(self) -> tuple[object | None, ...]:
        """The VM table's slots: None (free), `RESERVED_ENTRY` or a `PkvmHypVm`."""
        return tuple(self._h.vm_table or ())

    def vm_table_size(self) -> int:
        """How many slots the VM table has (used or free)."""
        return len(self._h.vm_table or ())

    def vm_slots(self) -> list[tuple[int, object]]:
        """(index, slot) of every used slot of the VM table, in order; do not modify the list.
        The last answer is reused when it still holds: each slot it named holds the same object
        (identity) and every other slot is free (the table counts that many None)."""
        if self._read_in_hold:
            return self._slots[1]
        self._read_in_hold = self.held
        table = self._h.vm_table or []
        n, found, idxs, objs = self._slots
        if n != len(table) or table.count(None) != n - len(found) or any(
                map(is_not, map(table.__getitem__, idxs), objs)):
            idxs = list(used_slots(table))
            objs = [table[i] for i in idxs]
            found = list(zip(idxs, objs))
            self._slots = (len(table), found, idxs, objs)
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
        if found is k[0] and lists == k[2] and h.loaded_hyp_vcpu == k[3]:
            raw = b"".join(k[4](h.mem._map))
            if raw == k[5]:
                return self._sgen
            self._skey = (found, vms, k[2], k[3], k[4], raw)
            self._sgen += 1
            return self._sgen
        spans = [slice(vm._off + a, vm._off + b) for vm in vms for a, b in VM_SPANS]
        spans += [slice(v._off + a, v._off + b) for vm in vms for v in vm.vcpus
                  if v is not None for a, b in VCPU_SPANS]
        get = itemgetter(*spans, slice(0, 0))  # (the empty span: always a tuple)
        self._skey = (found, vms, [list(x) for x in lists], list(h.loaded_hyp_vcpu), get,
                      b"".join(get(h.mem._map)))
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
