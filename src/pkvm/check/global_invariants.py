"""Global invariants: the VM table, pins and refcounts, page-table pages, pools and the hyp's
accounting of the pages it owns outside its carve-out.

`GlobalInvariants` is the part of the `Checker` (`pkvm.check.invariants`) that checks facts
spanning many pages; it builds on the per-page checks of `PageInvariants`.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any, Final

from pkvm.abi import sizes
from pkvm.check.page_invariants import NOPAGE, OWNED, SB, SO, PageInvariants
from pkvm.check.violations import InvariantViolation
from pkvm.inspect import (
    RESERVED_ENTRY,
    PkvmHypVm,
    hyp_pa,
    hyp_state_of_pte,
    hyp_va,
    used,
)
from pkvm.machine.memory import PAGE_SHIFT, PAGE_SIZE

OWNED_BYTE: Final = bytes([OWNED])  # a hyp_vmemmap state byte (one per page) that reads OWNED

if TYPE_CHECKING:
    from pkvm.inspect import Inspector


class GlobalInvariants(PageInvariants):
    """Checks over the hyp's global structures; the `Checker` supplies `carveout` and `inspect`
    (the machine's read-only view, for the FF-A proxy's mailbox)."""

    carveout: tuple[int, int]
    inspect: Inspector
    _globals_pfns: set[int]
    _pins_key: tuple[Any, ...] | None = None  # `_pin_key` at the last pin check that passed
    _pins_pfns: set[int] = set()  # (never changed in place) the pages it pinned

    def expected_pins(self) -> Counter[int]:
        pins: Counter[Any] = Counter()
        prof = self.h.profile
        spans: list[tuple[int, int]] = []  # (host VA, size) of each pinned struct
        for _handle, vm in self.live_vms():
            spans.append((vm.host_kvm, prof.sizeof_kvm))
            for vcpu in used(vm.vcpus):
                spans.append((vcpu.host_vcpu, prof.sizeof_kvm_vcpu))
        for va, size in spans:  # (a loop, not a closure called per struct)
            for p in range(va & ~(PAGE_SIZE - 1), va + size, PAGE_SIZE):
                pins[hyp_pa(p) >> PAGE_SHIFT] += 1
        ffa = self.inspect.ffa_proxy()  # the host's FF-A mailbox, pinned by RXTX_MAP
        for pa in (ffa["host_tx"], ffa["host_rx"]) if ffa and ffa["host_tx"] else ():
            pins[pa >> PAGE_SHIFT] += 1
        return pins

    def _pin_key(self) -> tuple[Any, ...]:
        """Everything `expected_pins` reads: each live VM (identity, its host struct kvm) and
        each of its vCPUs (identity, its host struct kvm_vcpu), and the FF-A mailbox."""
        ffa = self.inspect.ffa_proxy()
        return tuple([(id(vm), vm.host_kvm, tuple([(id(v), v.host_vcpu) for v in vm.vcpus
                                                   if v is not None]))
                      for _, vm in self.live_vms()]), ffa and (ffa["host_tx"], ffa["host_rx"])

    def check_globals(self, all_shared: bool = False, touched: set[int] | None = None) -> None:
        """The VM table, loaded vCPUs, VM refcounts and pins. With `touched` (the pages whose
        entries changed since the last check, 7.2), the pins are checked again only when what
        they are computed from (`_pin_key`) changed or one of their pages was touched: else
        the answer is the last one's, which passed."""
        h = self.h
        vm_page = h.vm_page
        vmm = h.vmemmap
        live: list[PkvmHypVm] = []
        loaded_per_vm: list[int] = []  # vCPUs of each live VM that say they are loaded
        on_cpu = h.loaded_hyp_vcpu
        for idx, slot in h.vm_slots():
            if slot is RESERVED_ENTRY:
                continue
            if not isinstance(slot, PkvmHypVm):
                raise InvariantViolation("vm-table", f"slot {idx} holds {slot!r}")
            if slot.handle != idx + sizes.HANDLE_OFFSET:
                raise InvariantViolation("vm-table", f"slot {idx} holds a VM with another handle",
                                         None, hex(idx + sizes.HANDLE_OFFSET), hex(slot.handle))
            live.append(slot)
            loaded = 0
            for k, vcpu in enumerate(slot.vcpus):
                if vcpu is None:
                    continue
                if vcpu.vm is not slot or vcpu.vcpu_idx != k:
                    raise InvariantViolation("vm-table", f"VM {slot.handle:#x} vcpus[{k}] is "
                                             f"vCPU {vcpu.vcpu_idx} of another VM")
                if vcpu.loaded_on is not None:
                    if on_cpu[vcpu.loaded_on] is not vcpu:
                        raise InvariantViolation(
                            "vm-table", f"vCPU {k} of VM {slot.handle:#x} says loaded on cpu "
                            f"{vcpu.loaded_on}, that CPU disagrees")
                    loaded += 1
            loaded_per_vm.append(loaded)
        live_ids = {id(v) for v in live}
        for cpu, loaded_vcpu in enumerate(on_cpu):
            if loaded_vcpu is None:
                continue
            vcpu = loaded_vcpu
            if id(vcpu.vm) not in live_ids or vcpu.loaded_on != cpu:
                raise InvariantViolation("vm-table", f"cpu {cpu} has a loaded vCPU of a VM not in "
                                         "the table or loaded elsewhere", None,
                                         f"vCPU of a live VM loaded on {cpu}",
                                         f"VM {vcpu.vm.handle:#x}, loaded_on {vcpu.loaded_on}")
        vm_pfns: set[int] = set()
        for vm, loaded in zip(live, loaded_per_vm):
            if not h.profile.explicit_vcpu_load:
                loaded = 0
            pfn = vm_page(vm) >> PAGE_SHIFT
            vm_pfns.add(pfn)
            rc = vmm.refcount[pfn - self._ram_lo]
            if rc != loaded:
                raise InvariantViolation("vm-refcount", f"hyp VM {vm.handle:#x}", pfn,
                                         f"refcount {loaded} (loaded vCPUs)", f"refcount {rc}")
        self._check_pins(vm_pfns, all_shared, touched)

    def _check_pins(self, vm_pfns: set[int], all_shared: bool, touched: set[int] | None) -> None:
        """`pin-refcount` (see `check_globals`); notes the pages the globals read."""
        vmm = self.h.vmemmap
        key = self._pin_key() if self._in_vmemmap and not all_shared else None
        if touched is not None and key is not None and key == self._pins_key and \
                not touched & self._pins_pfns:
            self._globals_pfns = self._pins_pfns | vm_pfns
            return
        pins = self.expected_pins()
        pfns = set(pins)
        self._globals_pfns = pfns | vm_pfns
        self._pins_key = None
        if all_shared:
            pfns |= self._shared_pages()
        hs, ys = vmm.host_state, vmm.hyp_state
        for pfn in pfns:
            i = pfn - self._ram_lo
            if not 0 <= i < vmm.nr:
                raise InvariantViolation("pin-refcount", "a pinned host struct lies outside RAM",
                                         pfn)
            # 7.2: the states straight from the vmemmap bytes (what `page_states` reads there)
            states = (hs[i], ys[i]) if self._in_vmemmap else self.page_states(pfn)
            if pfn in pins and states != (SO, SB):
                states = self.page_states(pfn)
                raise InvariantViolation("pin-refcount", "a pinned page is not shared with the hyp",
                                         pfn, "SHARED_OWNED/SHARED_BORROWED",
                                         f"{states[0].name}/{states[1].name}")
            if states == (SO, SB) and vmm.refcount[i] != pins.get(pfn, 0):
                raise InvariantViolation("pin-refcount", "pins do not match users", pfn,
                                         f"refcount {pins.get(pfn, 0)}", f"refcount {vmm.refcount[i]}")
        self._pins_key, self._pins_pfns = key, set(pins)

    def _shared_pages(self) -> set[int]:
        h = self.h
        if self._in_vmemmap:
            vmm = h.vmemmap
            hs, ys = vmm.host_state, vmm.hyp_state
            return {self._ram_lo + i for i in range(vmm.nr) if hs[i] == SO and ys[i] == SB}
        lo = hyp_va(self._ram_lo << PAGE_SHIFT)
        size = (self._ram_hi - self._ram_lo) << PAGE_SHIFT
        return {hyp_pa(a) >> PAGE_SHIFT for a, lvl, pte in h.hyp_pgt.leaves(lo, size, True)
                if lvl == 3 and hyp_state_of_pte(pte) == SB}

    def _tables(self) -> list[tuple[str, Any]]:
        h = self.h
        out: list[tuple[str, Any]] = [("hyp stage-1", h.hyp_pgt), ("host stage-2", h.host_pgt)]
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
                counted = h.counted_entries(pgt, table, h.mem)
                rc = vmm.refcount[vmm.idx(table)]
                if rc != 1 + counted:
                    raise InvariantViolation("table-pages", f"{name} table page refcount", pfn,
                                             f"1 + {counted} counted entries", rc)

    def pools(self) -> list[tuple[str, Any]]:
        h = self.h
        out: list[tuple[str, Any]] = h.pools()
        out += [(f"vm {hd:#x} pool", vm.pool) for hd, vm in self.live_vms()]
        return out

    def hyp_owned_pages(self) -> set[int]:
        """pfns the hyp owns outside its carve-out."""
        h = self.h
        cb, cs = self.carveout
        c_lo, c_hi = cb >> PAGE_SHIFT, (cb + cs) >> PAGE_SHIFT
        lo = self._ram_lo
        if self._in_vmemmap:  # every OWNED (0) byte of hyp_state outside the carve-out
            ys = h.vmemmap.hyp_state
            out = set()
            for first_pfn, end_pfn in ((lo, min(c_lo, self._ram_hi)),
                                       (max(c_hi, lo), self._ram_hi)):
                if first_pfn >= end_pfn:
                    continue
                part = ys[first_pfn - lo:end_pfn - lo].tobytes()
                i = part.find(OWNED_BYTE)
                while i >= 0:
                    out.add(first_pfn + i)
                    i = part.find(OWNED_BYTE, i + 1)
        else:  # walk the hyp stage-1 on either side of the carve-out (most of what it maps)
            out = set()
            for first_pfn, end_pfn in ((lo, c_lo), (c_hi, self._ram_hi)):
                if first_pfn >= end_pfn:
                    continue
                va = hyp_va(first_pfn << PAGE_SHIFT)
                for a, level, pte in h.hyp_pgt.leaves(va, (end_pfn - first_pfn) << PAGE_SHIFT,
                                                      True):
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
            for vcpu in used(vm.vcpus):
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
