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
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from pkvm.abi.sizes import HANDLE_OFFSET
from pkvm.arch.pgtable import KvmPgtable, pte_valid, stage2_pte_prot
from pkvm.arch.pte import KVM_PTE_ADDR_MASK, granule_shift, pte_table
from pkvm.hyp.mem_protect import (
    VmemmapPageStates,
    decode_host_annotation,
    get_host_state,
    get_hyp_state,
    host_state_of_pte,
    hyp_state_of_pte,
)
from pkvm.hyp.mem_protect_guest import guest_state_of_pte
from pkvm.hyp.memory import ComponentId, PageState
from pkvm.hyp.mm import hyp_pa, hyp_va, kern_hyp_va_to_pa
from pkvm.hyp.pkvm import RESERVED_ENTRY, handle_to_idx, live_vms, vm_snapshot
from pkvm.hyp.pkvm_structs import PkvmHypVcpu, PkvmHypVm
from pkvm.inspect_hyp import (  # (re-exported: the checkers' view)
    VCPU_SPANS,
    VM_SPANS,
    HypView,
    RamView,
    VmemmapView,
    _host_pgt,
    _hyp_pgt,
    same_objects,
    used,
    used_slots,
)
from pkvm.machine.memory import PAGE_SHIFT

if TYPE_CHECKING:
    from pkvm.abi.profiles import Profile
    from pkvm.board import Machine
    from pkvm.hyp.state import HypState

__all__ = [
    "RESERVED_ENTRY", "ComponentId", "HypView", "Inspector", "PageInfo", "PageState",
    "PkvmHypVcpu", "PkvmHypVm", "decode_host_annotation", "guest_state_of_pte",
    "hyp_state_of_pte", "hyp_pa", "hyp_va", "RamView", "VmemmapView", "VM_SPANS", "VCPU_SPANS",
    "same_objects", "used", "used_slots",
]

STATE_NAMES: Final[dict[int, str]] = {s: s.name for s in PageState}  # a state (or its int) -> name
# A 7.2 vmemmap state byte -> its state's name (`pages_quick`; values 0..4, as `_state` reads)
_BYTE_NAMES: Final[list[str]] = [STATE_NAMES[s] for s in sorted(PageState)]
_U64: Final = (1 << 64) - 1


def _leaf_run(pgt: KvmPgtable, ipa: int, n: int) -> list[tuple[int, int, int] | None] | None:
    """`Inspector.guest_leaves` of [ipa, ipa + n pages) in RAM-held table `pgt`, each table page
    read at once: the leaves of one last-level table page are one slice of it, a block or an
    invalid entry above the last level answers for every page it covers. None (the caller walks
    each page) when the run leaves the IPA space or meets a table page outside RAM."""
    ram = pgt.ram
    if ram is None or ipa + (n << PAGE_SHIFT) > 1 << pgt.ia_bits:
        return None
    u64, base = ram.u64, ram.base
    words = len(u64)
    out: list[tuple[int, int, int] | None] = []
    k = 0
    while k < n:
        addr = ipa + (k << PAGE_SHIFT)
        table, level = pgt.pgd, pgt.start_level
        while True:
            off = (table + ((addr >> granule_shift(level)) & 511) * 8 - base) >> 3
            if not 0 <= off < words:
                return None
            pte = u64[off]
            if not pte_table(pte, level):
                break
            table = pte & KVM_PTE_ADDR_MASK
            level += 1
        if level == 3:  # this entry and the rest of its table page, as far as the run goes
            m = min(512 - ((addr >> PAGE_SHIFT) & 511), n - k)
            if off + m > words:
                return None
            out += [(0, 3, p) for p in u64[off:off + m].tolist()]
        else:  # one entry for the rest of the granule it covers
            g = granule_shift(level)
            m = min(((((addr >> g) + 1) << g) - addr) >> PAGE_SHIFT, n - k)
            out += [(0, level, pte)] * m
        k += m
    return out


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

    def pages_quick(self, pfn: int, n: int) -> list[tuple[str, str, int, int] | None]:
        """`page_quick` of pfn .. pfn + n - 1; in 7.2, a run inside RAM is read as slices of
        the vmemmap's arrays (tests/test_checker_fast.py compares with `page_quick`)."""
        h = self._h
        vm = h.vmemmap
        i = pfn - vm.base_pfn
        if n > 0 and isinstance(h.page_states, VmemmapPageStates) and 0 <= i and \
                i + n <= vm.nr and h.mem.is_ram(pfn << PAGE_SHIFT) and \
                h.mem.is_ram((pfn + n - 1) << PAGE_SHIFT):
            hs, ys = vm.host_state[i:i + n], vm.hyp_state[i:i + n]
            names = _BYTE_NAMES
            if max(hs) < len(names) and max(ys) < len(names):
                return [(names[a], names[b], r, c) for a, b, r, c in zip(
                    hs, ys, vm.refcount[i:i + n], vm.host_share_guest_count[i:i + n])]
        return [self.page_quick(pfn + k) for k in range(n)]

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

    def guest_leaves(self, handle: int, ipa: int, n: int) -> list[tuple[int, int, int] | None]:
        """`guest_leaf` of each of the n pages from `ipa` (wrapping at 2^64), read a table page
        at a time where it can (`_leaf_run`; tests/test_checker_fast.py compares)."""
        table = self._h.vm_table or []
        idx = handle_to_idx(handle)
        slot = table[idx] if idx < len(table) else None
        if isinstance(slot, PkvmHypVm) and slot.pgt is not None and slot.pgt.pgd and n > 1:
            run = _leaf_run(slot.pgt, ipa, n)
            if run is not None:
                return run
        return [self.guest_leaf(handle, (ipa + (k << PAGE_SHIFT)) & _U64) for k in range(n)]

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

