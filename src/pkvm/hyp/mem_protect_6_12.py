"""6.12's memory protection (`nvhe/mem_protect.c` of Linux 6.12): page states in PTE bits and
the transitions as `do_share` / `do_unshare` / `do_donate` between an initiator and a completer.

The host's state of a page is in the software bits of its host stage-2 leaf (a missing leaf is an
OWNED page not yet faulted in; an annotated one is NOPAGE), the hyp's in its hyp stage-1 leaf (no
leaf: NOPAGE). A transition is a `PkvmMemTransition` naming both sides; each side first checks
its part (`host_request_*`, `hyp_ack_*`), then both change (`host_initiate_*`,
`hyp_complete_*`), and a failure after the checks is a WARN. Linux 6.12 is built without
`CONFIG_NVHE_EL2_DEBUG`, so a completer skips checking its own page tables.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Final

from pkvm.errors import EBUSY, EFAULT, EINVAL, EPERM
from pkvm.hyp.mem_protect import (
    _HYP_MAY_WRITE,
    KVM_INVALID_PTE_OWNER_SHIFT,
    PKVM_HOST_MEM_PROT,
    _warn,
    addr_is_memory,
    host_hyp_locked,
    host_stage2_idmap_locked,
    host_stage2_try,
    host_state_of_pte,
    hyp_pfn_to_phys,
    hyp_state_of_pte,
    pkvm_mkstate,
)
from pkvm.hyp.memory import ComponentId, HostHypTransitions, PageState, PageStates
from pkvm.hyp.mm import hyp_pa, hyp_va, pkvm_create_mappings_locked
from pkvm.hyp.pgtable import KVM_PGTABLE_WALK_LEAF, PAGE_HYP, KvmPgtable, VisitCtx
from pkvm.hyp.state import HypState
from pkvm.machine.memory import PAGE_SHIFT, PAGE_SIZE

U64: Final = 0xFFFF_FFFF_FFFF_FFFF
CONFIG_NVHE_EL2_DEBUG: Final = False
KVM_MAX_OWNER_ID: Final = ComponentId.HYP  # 6.12's owner ids: the host and the hyp


@dataclass(slots=True)
class Initiator:
    id: ComponentId
    addr: int  # in the initiator's address space
    completer_addr: int  # the same pages in the completer's


@dataclass(slots=True)
class PkvmMemTransition:
    """`struct pkvm_mem_transition` (`size`: its `nr_pages * PAGE_SIZE`, as a u64)."""

    nr_pages: int
    initiator: Initiator
    completer: ComponentId
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = (self.nr_pages * PAGE_SIZE) & U64


@dataclass(slots=True)
class PkvmMemShare:
    tx: PkvmMemTransition
    completer_prot: int


StateOfPte = Callable[[int, int], PageState]


# -- checking a range of leaves --------------------------------------------------------------
def check_page_state_range(pgt: KvmPgtable, addr: int, size: int, get_page_state: StateOfPte,
                           desired: PageState) -> int:
    """A LEAF walk, the first leaf not in `desired` is -EPERM.

    One aligned page is one leaf: `get_leaf` finds the entry the walk would visit (and fails
    with the walk's errno; tests/test_fast_paths.py checks they agree)."""
    if size == PAGE_SIZE and not addr & (PAGE_SIZE - 1):
        ret, pte, _ = pgt.get_leaf(addr)
        if ret:
            return ret
        return 0 if get_page_state(pte, addr) == desired else -EPERM
    return check_walk_generic(pgt, addr, size, get_page_state, desired)


def check_walk_generic(pgt: KvmPgtable, addr: int, size: int, get_page_state: StateOfPte,
                       desired: PageState) -> int:

    def visit(ctx: VisitCtx, _v: int) -> int:
        return 0 if get_page_state(ctx.old, ctx.addr) == desired else -EPERM

    return pgt.walk(addr, size, visit, KVM_PGTABLE_WALK_LEAF)


# -- the host's side -------------------------------------------------------------------------
def __host_check_page_state_range(h: HypState, addr: int, size: int, state: PageState) -> int:
    h.host_mmu.lock.assert_held()
    return check_page_state_range(h.host_mmu.pgt, addr, size,
                                  lambda pte, a: host_state_of_pte(h, pte, a), state)


def __host_set_page_state_range(h: HypState, addr: int, size: int, state: PageState) -> int:
    return host_stage2_idmap_locked(h, addr, size, pkvm_mkstate(PKVM_HOST_MEM_PROT, state))


def host_stage2_set_owner_locked(h: HypState, addr: int, size: int, owner: int) -> int:
    """`kvm_pgtable_stage2_set_owner`: an annotation with the owner id in bits 9:2 (the host's
    id, 0, leaves an empty entry that faults back in as OWNED)."""
    if owner > KVM_MAX_OWNER_ID:
        return -EINVAL
    pgt = h.host_mmu.pgt
    if owner == ComponentId.HOST:
        return host_stage2_try(h, lambda: pgt.stage2_unmap(addr, size))
    ann = owner << KVM_INVALID_PTE_OWNER_SHIFT
    return host_stage2_try(h, lambda: pgt.stage2_map(addr, size, None, 0, annotation=ann))


def host_request_owned_transition(h: HypState, tx: PkvmMemTransition) -> int:
    return __host_check_page_state_range(h, tx.initiator.addr, tx.size, PageState.OWNED)


def host_request_unshare(h: HypState, tx: PkvmMemTransition) -> int:
    return __host_check_page_state_range(h, tx.initiator.addr, tx.size, PageState.SHARED_OWNED)


def host_initiate_share(h: HypState, tx: PkvmMemTransition) -> int:
    return __host_set_page_state_range(h, tx.initiator.addr, tx.size, PageState.SHARED_OWNED)


def host_initiate_unshare(h: HypState, tx: PkvmMemTransition) -> int:
    return __host_set_page_state_range(h, tx.initiator.addr, tx.size, PageState.OWNED)


def host_initiate_donation(h: HypState, tx: PkvmMemTransition) -> int:
    return host_stage2_set_owner_locked(h, tx.initiator.addr, tx.size, tx.completer)


def __host_ack_skip_pgtable_check(tx: PkvmMemTransition) -> bool:
    return not (CONFIG_NVHE_EL2_DEBUG or tx.initiator.id != ComponentId.HYP)


def host_ack_donation(h: HypState, addr: int, tx: PkvmMemTransition) -> int:
    if __host_ack_skip_pgtable_check(tx):
        return 0
    return __host_check_page_state_range(h, addr, tx.size, PageState.NOPAGE)


def host_complete_donation(h: HypState, addr: int, tx: PkvmMemTransition) -> int:
    return host_stage2_set_owner_locked(h, addr, tx.size, tx.completer)


# -- the hyp's side (addresses are hyp VAs) --------------------------------------------------
def __hyp_check_page_state_range(h: HypState, addr: int, size: int, state: PageState) -> int:
    h.pkvm_pgd_lock.assert_held()
    return check_page_state_range(h.pkvm_pgtable, addr, size,
                                  lambda pte, a: hyp_state_of_pte(pte), state)


def hyp_request_donation(h: HypState, tx: PkvmMemTransition) -> int:
    return __hyp_check_page_state_range(h, tx.initiator.addr, tx.size, PageState.OWNED)


def hyp_initiate_donation(h: HypState, tx: PkvmMemTransition) -> int:
    unmapped = h.pkvm_pgtable.hyp_unmap(tx.initiator.addr, tx.size)
    return -EFAULT if unmapped != tx.size else 0


def __hyp_ack_skip_pgtable_check(tx: PkvmMemTransition) -> bool:
    return not (CONFIG_NVHE_EL2_DEBUG or tx.initiator.id != ComponentId.HOST)


def hyp_ack_share(h: HypState, addr: int, tx: PkvmMemTransition, perms: int) -> int:
    if perms != PAGE_HYP:
        return -EPERM
    if __hyp_ack_skip_pgtable_check(tx):
        return 0
    return __hyp_check_page_state_range(h, addr, tx.size, PageState.NOPAGE)


def hyp_ack_unshare(h: HypState, addr: int, tx: PkvmMemTransition) -> int:
    if tx.initiator.id == ComponentId.HOST and h.vmemmap.page_count(hyp_pa(addr)):
        if not h.bug("unshare-pinned"):  # seeded: a pinned page can be unshared
            return -EBUSY
    if __hyp_ack_skip_pgtable_check(tx):
        return 0
    return __hyp_check_page_state_range(h, addr, tx.size, PageState.SHARED_BORROWED)


def hyp_ack_donation(h: HypState, addr: int, tx: PkvmMemTransition) -> int:
    if __hyp_ack_skip_pgtable_check(tx):
        return 0
    return __hyp_check_page_state_range(h, addr, tx.size, PageState.NOPAGE)


def hyp_complete_share(h: HypState, addr: int, tx: PkvmMemTransition, perms: int) -> int:
    prot = pkvm_mkstate(perms, PageState.SHARED_BORROWED)
    return pkvm_create_mappings_locked(h, addr, addr + tx.size, prot)


def hyp_complete_unshare(h: HypState, addr: int, tx: PkvmMemTransition) -> int:
    unmapped = h.pkvm_pgtable.hyp_unmap(addr, tx.size)
    return -EFAULT if unmapped != tx.size else 0


def hyp_complete_donation(h: HypState, addr: int, tx: PkvmMemTransition) -> int:
    prot = pkvm_mkstate(PAGE_HYP, PageState.OWNED)
    return pkvm_create_mappings_locked(h, addr, addr + tx.size, prot)


# -- share, unshare, donate ------------------------------------------------------------------
def check_share(h: HypState, share: PkvmMemShare) -> int:
    tx = share.tx
    if tx.initiator.id != ComponentId.HOST:
        return -EINVAL
    ret = host_request_owned_transition(h, tx)
    if ret:
        return ret
    if tx.completer != ComponentId.HYP:
        return -EINVAL
    return hyp_ack_share(h, tx.initiator.completer_addr, tx, share.completer_prot)


def __do_share(h: HypState, share: PkvmMemShare) -> int:
    tx = share.tx
    if tx.initiator.id != ComponentId.HOST:
        return -EINVAL
    ret = host_initiate_share(h, tx)
    if ret:
        return ret
    if tx.completer != ComponentId.HYP:
        return -EINVAL
    return hyp_complete_share(h, tx.initiator.completer_addr, tx, share.completer_prot)


def do_share(h: HypState, share: PkvmMemShare) -> int:
    """The owner grants access: initiator OWNED -> SHARED_OWNED, completer NOPAGE ->
    SHARED_BORROWED."""
    ret = check_share(h, share)
    if ret:
        return ret
    _warn(h, __do_share(h, share))
    return 0


def check_unshare(h: HypState, share: PkvmMemShare) -> int:
    tx = share.tx
    if tx.initiator.id != ComponentId.HOST:
        return -EINVAL
    ret = host_request_unshare(h, tx)
    if ret:
        return ret
    if tx.completer != ComponentId.HYP:
        return -EINVAL
    return hyp_ack_unshare(h, tx.initiator.completer_addr, tx)


def __do_unshare(h: HypState, share: PkvmMemShare) -> int:
    tx = share.tx
    if tx.initiator.id != ComponentId.HOST:
        return -EINVAL
    ret = host_initiate_unshare(h, tx)
    if ret:
        return ret
    if tx.completer != ComponentId.HYP:
        return -EINVAL
    return hyp_complete_unshare(h, tx.initiator.completer_addr, tx)


def do_unshare(h: HypState, share: PkvmMemShare) -> int:
    """The owner revokes a share: initiator SHARED_OWNED -> OWNED, completer SHARED_BORROWED ->
    NOPAGE."""
    ret = check_unshare(h, share)
    if ret:
        return ret
    _warn(h, __do_unshare(h, share))
    return 0


def check_donation(h: HypState, tx: PkvmMemTransition) -> int:
    if tx.initiator.id == ComponentId.HOST:
        ret = host_request_owned_transition(h, tx)
        if ret and h.bug("donate-nomap") and not addr_is_memory(h, tx.initiator.addr):
            ret = 0  # seeded: no memory check
    elif tx.initiator.id == ComponentId.HYP:
        ret = hyp_request_donation(h, tx)
    else:
        ret = -EINVAL
    if ret:
        return ret
    if tx.completer == ComponentId.HOST:
        return host_ack_donation(h, tx.initiator.completer_addr, tx)
    if tx.completer == ComponentId.HYP:
        return hyp_ack_donation(h, tx.initiator.completer_addr, tx)
    return -EINVAL


def __do_donate(h: HypState, tx: PkvmMemTransition) -> int:
    if tx.initiator.id == ComponentId.HOST:
        ret = host_initiate_donation(h, tx)
    elif tx.initiator.id == ComponentId.HYP:
        ret = hyp_initiate_donation(h, tx)
    else:
        ret = -EINVAL
    if ret:
        return ret
    if tx.completer == ComponentId.HOST:
        return host_complete_donation(h, tx.initiator.completer_addr, tx)
    if tx.completer == ComponentId.HYP:
        return hyp_complete_donation(h, tx.initiator.completer_addr, tx)
    return -EINVAL


def do_donate(h: HypState, tx: PkvmMemTransition) -> int:
    """The owner gives the pages away: initiator OWNED -> NOPAGE, completer NOPAGE -> OWNED."""
    ret = check_donation(h, tx)
    if ret:
        return ret
    _warn(h, __do_donate(h, tx))
    return 0


# -- the hypercalls --------------------------------------------------------------------------
def _host_to_hyp(pfn: int, nr_pages: int) -> PkvmMemTransition:
    phys = hyp_pfn_to_phys(pfn)
    return PkvmMemTransition(nr_pages, Initiator(ComponentId.HOST, phys, hyp_va(phys)),
                             ComponentId.HYP)


def host_share_hyp(h: HypState, pfn: int) -> int:
    """6.12 `__pkvm_host_share_hyp`: the hyp maps the page at once, SHARED_BORROWED."""
    with host_hyp_locked(h):
        return do_share(h, PkvmMemShare(_host_to_hyp(pfn, 1), PAGE_HYP))


def host_unshare_hyp(h: HypState, pfn: int) -> int:
    """6.12 `__pkvm_host_unshare_hyp`."""
    with host_hyp_locked(h):
        return do_unshare(h, PkvmMemShare(_host_to_hyp(pfn, 1), PAGE_HYP))


def host_donate_hyp(h: HypState, pfn: int, nr_pages: int) -> int:
    """6.12 `__pkvm_host_donate_hyp` (no pfn range check: that came later)."""
    with host_hyp_locked(h):
        return do_donate(h, _host_to_hyp(pfn, nr_pages))


def hyp_donate_host(h: HypState, pfn: int, nr_pages: int) -> int:
    """6.12 `__pkvm_hyp_donate_host`."""
    phys = hyp_pfn_to_phys(pfn)
    tx = PkvmMemTransition(nr_pages, Initiator(ComponentId.HYP, hyp_va(phys), phys),
                           ComponentId.HOST)
    with host_hyp_locked(h):
        return do_donate(h, tx)


# -- the store -------------------------------------------------------------------------------
# The store's methods reach these through names without leading underscores (a name with two in
# a class body is mangled).
host_check_range, hyp_check_range = __host_check_page_state_range, __hyp_check_page_state_range
host_set_range = __host_set_page_state_range


class PtePageStates(PageStates):
    """6.12: page states are software bits of the host stage-2 and hyp stage-1 leaves."""

    transitions: ClassVar[HostHypTransitions] = sys.modules[__name__]  # do_share ..., above

    def get_host_state(self, h: HypState, pa: int) -> PageState:
        _, pte, _ = h.host_mmu.pgt.get_leaf(pa)
        return host_state_of_pte(h, pte, pa)

    def get_hyp_state(self, h: HypState, pa: int) -> PageState:
        ret, pte, _ = h.pkvm_pgtable.get_leaf(hyp_va(pa))
        return PageState.NOPAGE if ret else hyp_state_of_pte(pte)

    def host_check_page_state_range(self, h: HypState, addr: int, size: int,
                                    state: PageState) -> int:
        return host_check_range(h, addr, size, state)

    def hyp_check_page_state_range(self, h: HypState, phys: int, size: int,
                                   state: PageState) -> int:
        return hyp_check_range(h, hyp_va(phys), size, state)

    def host_set_page_state_range(self, h: HypState, addr: int, size: int,
                                  state: PageState) -> int:
        return host_set_range(h, addr, size, state)

    def host_stage2_set_owner_locked(self, h: HypState, addr: int, size: int, owner: int) -> int:
        return host_stage2_set_owner_locked(h, addr, size, owner)

    def hyp_may_write(self, h: HypState, pa: int) -> bool:
        """A page found writable stays so until the hyp stage-1 next changes (a memo, as cheap
        as 7.2's read of its vmemmap byte)."""
        memo = h.store_ok
        gen = h.pkvm_pgtable.gen
        page = pa >> PAGE_SHIFT
        if memo[0] != gen:
            memo[0] = gen
            memo[1].clear()
        elif page in memo[1]:
            return True
        if self.get_hyp_state(h, pa) in _HYP_MAY_WRITE:
            memo[1].add(page)
            return True
        return False

    def fix_host_ownership_page(self, h: HypState, phys: int, state: PageState) -> int:
        # 6.12 keeps the states in the host stage-2's software bits: the page is mapped for
        # the host with the state that mirrors the hyp's.
        if state == PageState.OWNED:
            return self.host_stage2_set_owner_locked(h, phys, PAGE_SIZE, ComponentId.HYP)
        if state == PageState.SHARED_OWNED:
            mirror = PageState.SHARED_BORROWED
        elif state == PageState.SHARED_BORROWED:
            mirror = PageState.SHARED_OWNED
        else:
            return -EINVAL
        return host_stage2_idmap_locked(h, phys, PAGE_SIZE,
                                        pkvm_mkstate(PKVM_HOST_MEM_PROT, mirror))

    def pin_first(self, h: HypState, va: int) -> None:
        """A borrowed page is mapped at EL2 from its share to its unshare: nothing to do."""

    def unpin_last(self, h: HypState, va: int) -> None:
        """Nothing to do (see `pin_first`)."""
