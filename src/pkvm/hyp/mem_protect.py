"""Memory protection (`nvhe/mem_protect.c`): the host stage-2, page ownership, transitions.

Every transition is written as *check everything, then change everything*, under the host lock
then the hyp lock (then a guest's), so a refusal changes nothing. Where a page's state lives is
the kernel's page-state store (`HypState.page_states`, chosen once per kernel): 7.2's
vmemmap (`VmemmapPageStates`, here, with 7.2's transitions) or 6.12's page-table software bits
(`pkvm.hyp.mem_protect_6_12`, with 6.12's `do_share` / `do_unshare` / `do_donate`). Callers use
the kernel's names (`get_host_state`, `__pkvm_host_share_hyp`, ...), which ask the store.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import ClassVar, Final

from pkvm.errors import EAGAIN, EBUSY, EINVAL, ENOMEM, EPERM
from pkvm.hyp.memblock import (  # re-exported: the kernel has them in mem_protect.c
    addr_is_allowed_memory as addr_is_allowed_memory,
)
from pkvm.hyp.memblock import addr_is_memory as addr_is_memory
from pkvm.hyp.memblock import check_range_allowed_memory as check_range_allowed_memory
from pkvm.hyp.memblock import find_mem_range as find_mem_range
from pkvm.hyp.memblock import pfn_range_is_valid as pfn_range_is_valid
from pkvm.hyp.memblock import range_is_memory as range_is_memory
from pkvm.hyp.memory import ComponentId, HostHypTransitions, PageState, PageStates
from pkvm.hyp.mm import SHORT_MAX, hyp_pa, hyp_va, pkvm_create_mappings_locked
from pkvm.hyp.panic import HypBug, HypWarn
from pkvm.hyp.pgtable import (
    KVM_PGTABLE_PROT_RW,
    KVM_PGTABLE_PROT_RWX,
    KVM_PGTABLE_PROT_SW0,
    KVM_PGTABLE_PROT_SW1,
    KVM_PGTABLE_WALK_IGNORE_EAGAIN,
    PAGE_HYP,
    granule_size,
    hyp_pte_prot,
    pte_valid,
    stage2_pte_prot,
)
from pkvm.hyp.state import HypState
from pkvm.machine.memory import PAGE_SHIFT, PAGE_SIZE

U64: Final = 0xFFFF_FFFF_FFFF_FFFF
ULONG_MAX: Final = U64

PKVM_HOST_MEM_PROT: Final = KVM_PGTABLE_PROT_RWX
PKVM_HOST_MMIO_PROT: Final = KVM_PGTABLE_PROT_RW
PKVM_PAGE_STATE_PROT_MASK: Final = KVM_PGTABLE_PROT_SW0 | KVM_PGTABLE_PROT_SW1

# 6.12 invalid-PTE owner annotation (bits 9:2) and 7.2 typed annotations (bits 63:60).
KVM_INVALID_PTE_OWNER_SHIFT: Final = 2
KVM_INVALID_PTE_OWNER_MASK: Final = 0xFF
KVM_INVALID_PTE_TYPE_SHIFT: Final = 60
KVM_INVALID_PTE_TYPE_LOCKED: Final = 1
KVM_HOST_INVALID_PTE_TYPE_DONATION: Final = 2
KVM_GUEST_INVALID_PTE_TYPE_POISONED: Final = 3
KVM_HOST_DONATION_PTE_OWNER_SHIFT: Final = 1
KVM_HOST_DONATION_PTE_OWNER_MASK: Final = 0x7 << 1
KVM_HOST_DONATION_PTE_MAX_OWNER: Final = KVM_HOST_DONATION_PTE_OWNER_MASK >> KVM_HOST_DONATION_PTE_OWNER_SHIFT
KVM_HOST_DONATION_PTE_EXTRA_SHIFT: Final = 4
KVM_HOST_DONATION_PTE_EXTRA_BITS: Final = 56
KVM_HOST_DONATION_PTE_EXTRA_MASK: Final = ((1 << KVM_HOST_DONATION_PTE_EXTRA_BITS) - 1) << 4
HYP_PAGE_REFCOUNT_MAX: Final = 0xFFFF  # `struct hyp_page`'s refcount is a u16


# A page state as a plain int for the per-call paths (an enum member lookup costs 4x a global).
NOPAGE: Final = int(PageState.NOPAGE)


_PAGE_STATES: Final = tuple(sorted(PageState))  # values 0..4: the member by tuple index
assert [int(p) for p in _PAGE_STATES] == list(range(len(_PAGE_STATES)))
_HYP_MAY_WRITE: Final = frozenset({PageState.OWNED, PageState.SHARED_OWNED,
                                   PageState.SHARED_BORROWED})


def _state(value: int) -> PageState:
    """`PageState(value)` without the enum call (a lookup in the members by value)."""
    return _PAGE_STATES[value] if 0 <= value < len(_PAGE_STATES) else PageState(value)


def hyp_pfn_to_phys(pfn: int) -> int:
    phys = pfn << PAGE_SHIFT
    return phys if 0 <= phys <= SHORT_MAX else phys & U64


# -- page states in page-table software bits (include/nvhe/mem_protect.h) -------------------
def pkvm_getstate(prot: int) -> PageState:
    bits = prot & PKVM_PAGE_STATE_PROT_MASK
    if bits == 0:
        return PageState.OWNED
    if bits == KVM_PGTABLE_PROT_SW0:
        return PageState.SHARED_OWNED
    if bits == KVM_PGTABLE_PROT_SW1:
        return PageState.SHARED_BORROWED
    return PageState.NOPAGE  # __PKVM_PAGE_RESERVED: never used for a live page


_STATE_PROT_BITS: Final = {PageState.OWNED: 0, PageState.SHARED_OWNED: KVM_PGTABLE_PROT_SW0,
                    PageState.SHARED_BORROWED: KVM_PGTABLE_PROT_SW1}


def pkvm_mkstate(prot: int, state: PageState) -> int:
    return (prot & ~PKVM_PAGE_STATE_PROT_MASK) | _STATE_PROT_BITS[state]


def host_state_of_pte(h: HypState, pte: int, addr: int) -> PageState:
    """6.12 `host_get_page_state`: from a host stage-2 leaf."""
    if not addr_is_allowed_memory(h, addr):
        return PageState.NOPAGE
    if not pte_valid(pte) and pte:
        return PageState.NOPAGE
    return pkvm_getstate(stage2_pte_prot(pte))


def hyp_state_of_pte(pte: int) -> PageState:
    """6.12 `hyp_get_page_state`: from a hyp stage-1 leaf."""
    if not pte_valid(pte):
        return PageState.NOPAGE
    return pkvm_getstate(hyp_pte_prot(pte))


# -- the kernel's page-state store (`HypState.page_states`) -------------------------
def get_host_state(h: HypState, pa: int) -> PageState:
    """The host's state of the page at `pa`, wherever this kernel keeps it."""
    return h.page_states.get_host_state(h, pa)


def get_hyp_state(h: HypState, pa: int) -> PageState:
    return h.page_states.get_hyp_state(h, pa)


def host_check_page_state_range(h: HypState, addr: int, size: int, want: PageState) -> int:
    return h.page_states.host_check_page_state_range(h, addr, size, want)


def hyp_check_page_state_range(h: HypState, addr: int, size: int, want: PageState) -> int:
    return h.page_states.hyp_check_page_state_range(h, addr, size, want)


def host_set_page_state_range(h: HypState, addr: int, size: int, state: PageState) -> int:
    return h.page_states.host_set_page_state_range(h, addr, size, state)


def host_stage2_set_owner_locked(h: HypState, addr: int, size: int, owner: int) -> int:
    return h.page_states.host_stage2_set_owner_locked(h, addr, size, owner)


def __pkvm_host_share_hyp(h: HypState, pfn: int) -> int:
    return h.page_states.transitions.host_share_hyp(h, pfn)


def __pkvm_host_unshare_hyp(h: HypState, pfn: int) -> int:
    return h.page_states.transitions.host_unshare_hyp(h, pfn)


def __pkvm_host_donate_hyp(h: HypState, pfn: int, nr_pages: int) -> int:
    return h.page_states.transitions.host_donate_hyp(h, pfn, nr_pages)


def __pkvm_hyp_donate_host(h: HypState, pfn: int, nr_pages: int) -> int:
    return h.page_states.transitions.hyp_donate_host(h, pfn, nr_pages)


# -- the host stage-2 ----------------------------------------------------------------------
def host_stage2_force_pte_cb(h: HypState) -> Callable[[int, int, int], bool]:
    """The host stage-2's `force_pte_cb` (a partial, so a machine snapshot can pickle it)."""
    return functools.partial(_host_stage2_force_pte, h)


def _host_stage2_force_pte(h: HypState, addr: int, end: int, prot: int) -> bool:
    return prot != (PKVM_HOST_MEM_PROT if range_is_memory(h, addr, end) else PKVM_HOST_MMIO_PROT)


def host_stage2_unmap_dev_all(h: HypState) -> int:
    """Unmap every gap between memory regions (MMIO mappings fault back in)."""
    pgt = h.host_mmu.pgt
    addr = 0
    for reg in h.hyp_memory:
        ret = pgt.stage2_unmap(addr, reg.base - addr)
        if ret:
            return ret
        addr = reg.end
    return pgt.stage2_unmap(addr, (1 << pgt.ia_bits) - addr)


def host_stage2_try(h: HypState, fn: Callable[[], int]) -> int:
    ret = fn()
    if ret == -ENOMEM:
        ret = host_stage2_unmap_dev_all(h)
        if ret:
            return ret
        ret = fn()
    return ret


def host_stage2_try_map(h: HypState, addr: int, size: int, phys: int | None, prot: int,
                        annotation: int = 0, flags: int = 0) -> int:
    """`host_stage2_try(kvm_pgtable_stage2_map, ...)` with its arguments spelled out (no
    closure on the per-page paths): the map, then once more after unmapping every MMIO
    range where it ran out of table pages."""
    pgt = h.host_mmu.pgt
    ret = pgt.stage2_map(addr, size, phys, prot, annotation, flags)
    if ret == -ENOMEM:
        ret = host_stage2_unmap_dev_all(h)
        if ret:
            return ret
        ret = pgt.stage2_map(addr, size, phys, prot, annotation, flags)
    return ret


def host_stage2_idmap_locked(h: HypState, addr: int, size: int, prot: int) -> int:
    return host_stage2_try_map(h, addr, size, addr, prot, 0, KVM_PGTABLE_WALK_IGNORE_EAGAIN)


def host_donation_annotation(owner: int, meta: int) -> int:
    return (
        (KVM_HOST_INVALID_PTE_TYPE_DONATION << KVM_INVALID_PTE_TYPE_SHIFT)
        | (owner << KVM_HOST_DONATION_PTE_OWNER_SHIFT)
        | (meta << KVM_HOST_DONATION_PTE_EXTRA_SHIFT)
    )


def decode_host_annotation(pte: int) -> tuple[int, int] | None:
    """(owner id, meta) of a host stage-2 annotation, in either profile's format."""
    if pte_valid(pte) or not pte:
        return None
    ptype = pte >> KVM_INVALID_PTE_TYPE_SHIFT
    if ptype == KVM_HOST_INVALID_PTE_TYPE_DONATION:
        owner = (pte & KVM_HOST_DONATION_PTE_OWNER_MASK) >> KVM_HOST_DONATION_PTE_OWNER_SHIFT
        return owner, (pte & KVM_HOST_DONATION_PTE_EXTRA_MASK) >> KVM_HOST_DONATION_PTE_EXTRA_SHIFT
    return (pte >> KVM_INVALID_PTE_OWNER_SHIFT) & KVM_INVALID_PTE_OWNER_MASK, 0


def host_stage2_set_owner_metadata_locked(h: HypState, addr: int, size: int, owner: int,
                                          meta: int) -> int:
    if owner == ComponentId.HOST:
        return -EINVAL
    if not range_is_memory(h, addr, (addr + size) & U64):
        return -EPERM
    if owner > KVM_HOST_DONATION_PTE_MAX_OWNER or meta >> KVM_HOST_DONATION_PTE_EXTRA_BITS:
        return -EINVAL
    ret = host_stage2_try_map(h, addr, size, None, 0, host_donation_annotation(owner, meta))
    if ret:
        return ret
    set_host_state_range(h, addr, size, PageState.NOPAGE)
    return 0


def host_stage2_adjust_range(h: HypState, addr: int) -> tuple[int, int, int]:
    """Pick the largest granule around `addr` that lies in its region or gap and is unmapped."""
    is_mem, rstart, rend = find_mem_range(h, addr)
    ret, pte, level = h.host_mmu.pgt.get_leaf(addr)
    if ret:
        return ret, 0, 0
    if pte_valid(pte):
        return h.profile.host_idmap_exists_errno, 0, 0
    if pte:
        return -EPERM, 0, 0
    first = 1 if h.profile.host_idmap_skip_level0 else 0
    for lvl in range(max(level, first), 4):
        g = granule_size(lvl)
        start = addr & ~(g - 1)
        end = start + g
        if rstart <= start and end <= rend:
            return 0, start, end
    return -EINVAL, 0, 0


def host_stage2_idmap(h: HypState, addr: int) -> int:
    is_mem, _, _ = find_mem_range(h, addr)
    prot = PKVM_HOST_MEM_PROT if is_mem else PKVM_HOST_MMIO_PROT
    with h.host_mmu.lock:
        ret, start, end = host_stage2_adjust_range(h, addr)
        if ret:
            return ret
        return host_stage2_idmap_locked(h, start, end - start, prot)


def handle_host_mem_abort(h: HypState, addr: int) -> int:
    """A host stage-2 fault at IPA `addr`: map it if the host may have it.

    Returns 0 (retry the access), or -EPERM where the host touched a page it does not own;
    the board turns -EPERM into `HostDataAbort` (fatal in 6.12, where Linux BUG()s).
    Other errors are hyp panics, as in Linux."""
    ret = host_stage2_idmap(h, addr)
    if ret in (0, -EAGAIN, h.profile.host_idmap_exists_errno):
        return 0 if ret == 0 else ret
    if ret == -EPERM:
        return -EPERM
    raise HypBug(f"host stage-2 idmap of {addr:#x} failed with {ret}")


# -- 7.2: page states in the hyp vmemmap (`struct hyp_page`) --------------------------------
def host_check_vmemmap_range(h: HypState, addr: int, size: int, want: PageState) -> int:
    """7.2 `__host_check_page_state_range` for any range."""
    ret = check_range_allowed_memory(h, addr, (addr + size) & U64)
    if ret:
        return ret
    vm = h.vmemmap
    i = vm.idx(addr)
    states = vm.host_state
    for k in range(i, i + (size >> PAGE_SHIFT)):
        if states[k] != want:
            return -EPERM
    return 0


def hyp_check_page_count_range(h: HypState, addr: int, size: int) -> int:
    vm = h.vmemmap
    for pa in range(addr, addr + size, PAGE_SIZE):
        if vm.refcount[vm.idx(pa)]:
            return -EBUSY
    return 0


def set_host_state_range(h: HypState, addr: int, size: int, state: PageState) -> None:
    """7.2 `__host_update_page_state`."""
    vm = h.vmemmap
    i = vm.idx(addr)
    vm.touch_range(i, size >> PAGE_SHIFT)
    for k in range(i, i + (size >> PAGE_SHIFT)):
        vm.host_state[k] = state


def set_hyp_state_range(h: HypState, addr: int, size: int, state: PageState) -> None:
    """7.2 `__hyp_set_page_state_range`."""
    vm = h.vmemmap
    i = vm.idx(addr)
    vm.touch_range(i, size >> PAGE_SHIFT)
    for k in range(i, i + (size >> PAGE_SHIFT)):
        vm.hyp_state[k] = state


class VmemmapPageStates(PageStates):
    """7.2: each page's host and hyp states are fields of its `struct hyp_page`; the host
    stage-2 only maps (or annotates) and the hyp stage-1 maps a borrowed page while pinned."""

    transitions: ClassVar[HostHypTransitions] = sys.modules[__name__]  # 7.2's, below

    def get_host_state(self, h: HypState, pa: int) -> PageState:
        vm = h.vmemmap
        i = (pa >> PAGE_SHIFT) - vm.base_pfn
        return _state(vm.host_state[i]) if 0 <= i < vm.nr else PageState.NOPAGE

    def get_hyp_state(self, h: HypState, pa: int) -> PageState:
        vm = h.vmemmap
        i = (pa >> PAGE_SHIFT) - vm.base_pfn
        return _state(vm.hyp_state[i]) if 0 <= i < vm.nr else PageState.NOPAGE

    def host_check_page_state_range(self, h: HypState, addr: int, size: int,
                                    state: PageState) -> int:
        h.host_mmu.lock.assert_held()
        if size == PAGE_SIZE:
            # One page inside one memory region: the region checks reduce to "mapped memory"
            # (tests/test_fast_paths.py checks this agrees with the range check below).
            for reg in h.hyp_memory:
                if reg.base <= addr and addr + PAGE_SIZE <= reg.end and not reg.nomap:
                    vm = h.vmemmap
                    i = (addr >> PAGE_SHIFT) - vm.base_pfn
                    return 0 if vm.host_state[i] == state else -EPERM
        return host_check_vmemmap_range(h, addr, size, state)

    def hyp_check_page_state_range(self, h: HypState, phys: int, size: int,
                                   state: PageState) -> int:
        h.pkvm_pgd_lock.assert_held()
        vm = h.vmemmap
        states, first, nr = vm.hyp_state, vm.base_pfn, vm.nr
        pfn0 = phys >> PAGE_SHIFT
        for pfn in range(pfn0, pfn0 + (max(size, 0) + PAGE_SIZE - 1 >> PAGE_SHIFT)):
            i = pfn - first
            if (states[i] if 0 <= i < nr else NOPAGE) != state:
                return -EPERM
        return 0

    def host_set_page_state_range(self, h: HypState, addr: int, size: int,
                                  state: PageState) -> int:
        vm = h.vmemmap
        i = (addr >> PAGE_SHIFT) - vm.base_pfn
        if not 0 <= i < vm.nr or vm.host_state[i] == NOPAGE:  # get_host_state(...) == NOPAGE
            ret = host_stage2_idmap_locked(h, addr, size, PKVM_HOST_MEM_PROT)
            if ret:
                return ret
        set_host_state_range(h, addr, size, state)
        return 0

    def host_stage2_set_owner_locked(self, h: HypState, addr: int, size: int, owner: int) -> int:
        if owner == ComponentId.HOST:
            if not range_is_memory(h, addr, (addr + size) & U64):
                return -EPERM
            ret = host_stage2_idmap_locked(h, addr, size, PKVM_HOST_MEM_PROT)
            if ret:
                return ret
            set_host_state_range(h, addr, size, PageState.OWNED)
            return 0
        if owner == ComponentId.HYP:
            return host_stage2_set_owner_metadata_locked(h, addr, size, owner, 0)
        return -EINVAL

    def hyp_may_write(self, h: HypState, pa: int) -> bool:
        vm = h.vmemmap
        return vm.hyp_state[(pa >> PAGE_SHIFT) - vm.base_pfn] in _HYP_MAY_WRITE

    def fix_host_ownership_page(self, h: HypState, phys: int, state: PageState) -> int:
        # 7.2 propagates the hyp stage-1's annotation to the page's vmemmap states. (Its hyp
        # text, mapped read-only for the host, is not in the model's RAM.)
        if state == PageState.OWNED:
            set_hyp_state_range(h, phys, PAGE_SIZE, PageState.OWNED)
            return self.host_stage2_set_owner_locked(h, phys, PAGE_SIZE, ComponentId.HYP)
        if state == PageState.SHARED_OWNED:
            set_hyp_state_range(h, phys, PAGE_SIZE, PageState.SHARED_OWNED)
            set_host_state_range(h, phys, PAGE_SIZE, PageState.SHARED_BORROWED)
        elif state == PageState.SHARED_BORROWED:
            set_hyp_state_range(h, phys, PAGE_SIZE, PageState.SHARED_BORROWED)
            set_host_state_range(h, phys, PAGE_SIZE, PageState.SHARED_OWNED)
        else:
            return -EINVAL
        return 0

    def pin_first(self, h: HypState, va: int) -> None:
        _warn(h, pkvm_create_mappings_locked(h, va, va + PAGE_SIZE, PAGE_HYP))

    def unpin_last(self, h: HypState, va: int) -> None:
        _warn(h, h.pkvm_pgtable.hyp_unmap(va, PAGE_SIZE) != PAGE_SIZE)


# -- host <-> hyp transitions ------------------------------------------------------------
class _HostHyp:
    """Take the host then the hyp lock, release in reverse (`host_lock_component` ...)."""

    def __init__(self, h: HypState):
        self.h = h

    def __enter__(self) -> None:
        self.h.host_mmu.lock.acquire()
        self.h.pkvm_pgd_lock.acquire()

    def __exit__(self, typ: object, value: object, tb: object) -> None:
        self.h.pkvm_pgd_lock.release()
        self.h.host_mmu.lock.release()


def host_hyp_locked(h: HypState) -> _HostHyp:
    return _HostHyp(h)


def host_share_hyp(h: HypState, pfn: int) -> int:
    """7.2 `__pkvm_host_share_hyp`: the hyp borrows the page (mapped at EL2 only once pinned)."""
    phys = hyp_pfn_to_phys(pfn)
    with host_hyp_locked(h):
        ret = host_check_page_state_range(h, phys, PAGE_SIZE, PageState.OWNED)
        if ret:
            return ret
        ret = hyp_check_page_state_range(h, phys, PAGE_SIZE, PageState.NOPAGE)
        if ret:
            return ret
        set_hyp_state_range(h, phys, PAGE_SIZE, PageState.SHARED_BORROWED)
        _warn(h, host_set_page_state_range(h, phys, PAGE_SIZE, PageState.SHARED_OWNED))
        return 0


def host_unshare_hyp(h: HypState, pfn: int) -> int:
    """7.2 `__pkvm_host_unshare_hyp`: refused (-EBUSY) while the hyp has the page pinned."""
    phys = hyp_pfn_to_phys(pfn)
    with host_hyp_locked(h):
        ret = host_check_page_state_range(h, phys, PAGE_SIZE, PageState.SHARED_OWNED)
        if ret:
            return ret
        ret = hyp_check_page_state_range(h, phys, PAGE_SIZE, PageState.SHARED_BORROWED)
        if ret:
            return ret
        ret = hyp_check_page_count_range(h, phys, PAGE_SIZE)
        if ret and not h.bug("unshare-pinned"):  # seeded: a pinned page can be unshared
            return ret
        set_hyp_state_range(h, phys, PAGE_SIZE, PageState.NOPAGE)
        _warn(h, host_set_page_state_range(h, phys, PAGE_SIZE, PageState.OWNED))
        return 0


def host_donate_hyp(h: HypState, pfn: int, nr_pages: int) -> int:
    """7.2 `__pkvm_host_donate_hyp`."""
    phys = hyp_pfn_to_phys(pfn)
    size = (PAGE_SIZE * nr_pages) & U64
    if not pfn_range_is_valid(h, pfn, nr_pages):
        return -EINVAL
    with host_hyp_locked(h):
        ret = host_check_page_state_range(h, phys, size, PageState.OWNED)
        if ret and h.bug("donate-nomap") and not addr_is_memory(h, phys):  # seeded: no memory check
            ret = 0
        if ret:
            return ret
        ret = hyp_check_page_state_range(h, phys, size, PageState.NOPAGE)
        if ret:
            return ret
        set_hyp_state_range(h, phys, size, PageState.OWNED)
        _warn(h, pkvm_create_mappings_locked(h, hyp_va(phys), hyp_va(phys) + size, PAGE_HYP))
        _warn(h, host_stage2_set_owner_locked(h, phys, size, ComponentId.HYP))
        return 0


def hyp_donate_host(h: HypState, pfn: int, nr_pages: int) -> int:
    """7.2 `__pkvm_hyp_donate_host`."""
    phys = hyp_pfn_to_phys(pfn)
    size = (PAGE_SIZE * nr_pages) & U64
    if not pfn_range_is_valid(h, pfn, nr_pages):
        return -EINVAL
    with host_hyp_locked(h):
        ret = hyp_check_page_state_range(h, phys, size, PageState.OWNED)
        if ret:
            return ret
        ret = host_check_page_state_range(h, phys, size, PageState.NOPAGE)
        if ret:
            return ret
        ret = hyp_check_page_count_range(h, phys, size)
        if ret:
            return ret
        set_hyp_state_range(h, phys, size, PageState.NOPAGE)
        _warn(h, h.pkvm_pgtable.hyp_unmap(hyp_va(phys), size) != size)
        _warn(h, host_stage2_set_owner_locked(h, phys, size, ComponentId.HOST))
        return 0


def hyp_pin_shared_mem(h: HypState, start_va: int, end_va: int) -> int:
    """Pin host pages shared with the hyp for as long as EL2 uses them (refcount per page)."""
    start = start_va & ~(PAGE_SIZE - 1)
    end = (end_va + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    phys = hyp_pa(start)
    size = (end - start) & U64
    store = h.page_states
    with host_hyp_locked(h):
        ret = store.host_check_page_state_range(h, phys, size, PageState.SHARED_OWNED)
        if ret:
            return ret
        ret = store.hyp_check_page_state_range(h, phys, size, PageState.SHARED_BORROWED)
        if ret:
            return ret
        vm = h.vmemmap
        for va in range(start, end, PAGE_SIZE):
            i = vm.idx(hyp_pa(va))
            if vm.refcount[i] == HYP_PAGE_REFCOUNT_MAX:
                raise HypBug("hyp_page_ref_inc: refcount overflow")
            vm.touch(i)
            vm.refcount[i] += 1
            if vm.refcount[i] == 1:
                store.pin_first(h, va)
        return 0


def hyp_unpin_shared_mem(h: HypState, start_va: int, end_va: int) -> None:
    start = start_va & ~(PAGE_SIZE - 1)
    end = (end_va + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    store = h.page_states
    with host_hyp_locked(h):
        vm = h.vmemmap
        for va in range(start, end, PAGE_SIZE):
            i = vm.idx(hyp_pa(va))
            if vm.refcount[i] == 1:
                store.unpin_last(h, va)
            if vm.refcount[i] == 0:
                raise HypBug("hyp_page_ref_dec: refcount underflow on unpin")
            vm.touch(i)
            vm.refcount[i] -= 1


# -- WARN_ON ----------------------------------------------------------------------------
def _warn(h: HypState, cond: object) -> None:
    """A `WARN_ON`: when it fires, record the site (for `inspect.warnings()`) and panic, as the
    kernel's hyp does (a WARN at EL2 is a `BRK` that `nvhe_hyp_panic_handler` treats as fatal)."""
    if cond:
        warn = HypWarn()  # it finds its site in its traceback (see there)
        h.warnings.append(warn)
        raise warn
