"""Memory protection (`nvhe/mem_protect.c`): the host stage-2, page ownership, transitions.

Every transition is written as *check everything, then change everything*, under the host lock
then the hyp lock (then a guest's), so a refusal changes nothing. Page states live where each
kernel keeps them: 6.12 in the software bits of the host stage-2 and hyp stage-1 leaves, 7.2 in
the vmemmap (`profile.page_state_in_vmemmap`).
"""

from __future__ import annotations

from pkvm.errors import EAGAIN, EBUSY, EFAULT, EINVAL, ENOMEM, EPERM
from pkvm.hyp.memory import ComponentId, PageState
from pkvm.hyp.mm import hyp_pa, hyp_va, pkvm_create_mappings_locked
from pkvm.hyp.panic import HypBug, HypWarn
from pkvm.hyp.pgtable import (
    KVM_PGTABLE_PROT_RW,
    KVM_PGTABLE_PROT_RWX,
    KVM_PGTABLE_PROT_SW0,
    KVM_PGTABLE_PROT_SW1,
    KVM_PGTABLE_WALK_IGNORE_EAGAIN,
    KVM_PGTABLE_WALK_LEAF,
    PAGE_HYP,
    VisitCtx,
    granule_size,
    hyp_pte_prot,
    pte_valid,
    stage2_pte_prot,
)
from pkvm.hyp.state import HypState
from pkvm.machine.memory import PAGE_SHIFT, PAGE_SIZE

U64 = 0xFFFF_FFFF_FFFF_FFFF
ULONG_MAX = U64

PKVM_HOST_MEM_PROT = KVM_PGTABLE_PROT_RWX
PKVM_HOST_MMIO_PROT = KVM_PGTABLE_PROT_RW
PKVM_PAGE_STATE_PROT_MASK = KVM_PGTABLE_PROT_SW0 | KVM_PGTABLE_PROT_SW1

# 6.12 invalid-PTE owner annotation (bits 9:2) and 7.2 typed annotations (bits 63:60).
KVM_INVALID_PTE_OWNER_SHIFT = 2
KVM_MAX_OWNER_ID_6_12 = 1
KVM_INVALID_PTE_TYPE_SHIFT = 60
KVM_INVALID_PTE_TYPE_LOCKED = 1
KVM_HOST_INVALID_PTE_TYPE_DONATION = 2
KVM_GUEST_INVALID_PTE_TYPE_POISONED = 3
KVM_HOST_DONATION_PTE_OWNER_SHIFT = 1
KVM_HOST_DONATION_PTE_OWNER_MASK = 0x7 << 1
KVM_HOST_DONATION_PTE_EXTRA_SHIFT = 4
KVM_HOST_DONATION_PTE_EXTRA_MASK = ((1 << 56) - 1) << 4


# Page states as plain ints for the per-call paths (an enum member lookup costs 4x a global).
OWNED, SHARED_OWNED, SHARED_BORROWED, NOPAGE = (int(PageState.OWNED), int(PageState.SHARED_OWNED),
                                                int(PageState.SHARED_BORROWED), int(PageState.NOPAGE))


_PAGE_STATES = tuple(sorted(PageState))  # values 0..4: the member by tuple index
assert [int(p) for p in _PAGE_STATES] == list(range(len(_PAGE_STATES)))


def _state(value: int) -> PageState:
    """`PageState(value)` without the enum call (a lookup in the members by value)."""
    return _PAGE_STATES[value] if 0 <= value < len(_PAGE_STATES) else PageState(value)


def hyp_pfn_to_phys(pfn: int) -> int:
    return (pfn << PAGE_SHIFT) & U64


# -- the memblock map ----------------------------------------------------------------------
def find_mem_range(h: HypState, addr: int) -> tuple[bool, int, int]:
    """(is memory, start, end) of the region or gap around `addr` (`find_mem_range`)."""
    start = 0
    for reg in h.hyp_memory:
        if addr < reg.base:
            return False, start, reg.base
        if addr < reg.end:
            return True, reg.base, reg.end
        start = reg.end
    return False, start, ULONG_MAX


def addr_is_memory(h: HypState, addr: int) -> bool:
    return find_mem_range(h, addr)[0]


def addr_is_allowed_memory(h: HypState, addr: int) -> bool:
    for reg in h.hyp_memory:
        if reg.base <= addr < reg.end:
            return not reg.nomap
    return False


def range_is_memory(h: HypState, start: int, end: int) -> bool:
    hit, rs, re_ = find_mem_range(h, start)
    return hit and rs <= ((end - 1) & U64) < re_


def check_range_allowed_memory(h: HypState, start: int, end: int) -> int:
    """7.2: the range lies in one region or gap (-EINVAL) and is allowed memory (-EPERM)."""
    hit, rs, re_ = find_mem_range(h, start)
    last = (end - 1) & U64
    if not rs <= last < re_:
        return -EINVAL
    if not hit or not addr_is_allowed_memory(h, start):
        return -EPERM
    return 0


def pfn_range_is_valid(h: HypState, pfn: int, nr_pages: int) -> bool:
    limit = 1 << (h.host_mmu.pgt.ia_bits - PAGE_SHIFT)  # type: ignore[union-attr]
    return pfn < limit and nr_pages <= limit - pfn


# -- page states ---------------------------------------------------------------------------
def pkvm_getstate(prot: int) -> PageState:
    bits = prot & PKVM_PAGE_STATE_PROT_MASK
    if bits == 0:
        return PageState.OWNED
    if bits == KVM_PGTABLE_PROT_SW0:
        return PageState.SHARED_OWNED
    if bits == KVM_PGTABLE_PROT_SW1:
        return PageState.SHARED_BORROWED
    return PageState.NOPAGE  # __PKVM_PAGE_RESERVED: never used for a live page


def pkvm_mkstate(prot: int, state: PageState) -> int:
    bits = {PageState.OWNED: 0, PageState.SHARED_OWNED: KVM_PGTABLE_PROT_SW0,
            PageState.SHARED_BORROWED: KVM_PGTABLE_PROT_SW1}[state]
    return (prot & ~PKVM_PAGE_STATE_PROT_MASK) | bits


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


def get_host_state(h: HypState, pa: int) -> PageState:
    """The host's state of the page at `pa`, wherever this profile keeps it."""
    if h.profile.page_state_in_vmemmap:
        if not h.vmemmap.covers(pa):
            return PageState.NOPAGE
        return _state(h.vmemmap.host_state[h.vmemmap.idx(pa)])
    _, pte, _ = h.host_mmu.pgt.get_leaf(pa)  # type: ignore[union-attr]
    return host_state_of_pte(h, pte, pa)


def get_hyp_state(h: HypState, pa: int) -> PageState:
    if h.profile.page_state_in_vmemmap:
        if not h.vmemmap.covers(pa):
            return PageState.NOPAGE
        return _state(h.vmemmap.hyp_state[h.vmemmap.idx(pa)])
    ret, pte, _ = h.pkvm_pgtable.get_leaf(hyp_va(pa))  # type: ignore[union-attr]
    return PageState.NOPAGE if ret else hyp_state_of_pte(pte)


def _check_walk(pgt, addr: int, size: int, state_of, want: PageState) -> int:
    """6.12 `check_page_state_range`: a LEAF walk, the first mismatch is -EPERM.

    One aligned page is one leaf: `get_leaf` finds the entry the walk would visit (and fails
    with the walk's errno; tests/test_fast_paths.py checks they agree)."""
    if size == PAGE_SIZE and not addr & (PAGE_SIZE - 1):
        ret, pte, _ = pgt.get_leaf(addr)
        if ret:
            return ret
        return 0 if state_of(pte, addr) == want else -EPERM
    return check_walk_generic(pgt, addr, size, state_of, want)


def check_walk_generic(pgt, addr: int, size: int, state_of, want: PageState) -> int:

    def visit(ctx: VisitCtx, _v: int) -> int:
        return 0 if state_of(ctx.old, ctx.addr) == want else -EPERM

    return pgt.walk(addr, size, visit, KVM_PGTABLE_WALK_LEAF)


def host_check_page_state_range(h: HypState, addr: int, size: int, want: PageState) -> int:
    h.host_mmu.lock.assert_held()  # type: ignore[union-attr]
    if not h.profile.page_state_in_vmemmap:
        return _check_walk(h.host_mmu.pgt, addr, size,  # type: ignore[union-attr]
                           lambda pte, a: host_state_of_pte(h, pte, a), want)
    if size == PAGE_SIZE:
        # One page inside one memory region: the region checks reduce to "mapped memory"
        # (tests/test_fast_paths.py checks this agrees with the range check below).
        for reg in h.hyp_memory:
            if reg.base <= addr and addr + PAGE_SIZE <= reg.end and not reg.nomap:
                vm = h.vmemmap
                return 0 if vm.host_state[(addr >> PAGE_SHIFT) - vm.base_pfn] == want else -EPERM
    return host_check_vmemmap_range(h, addr, size, want)


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


def hyp_check_page_state_range(h: HypState, addr: int, size: int, want: PageState) -> int:
    h.pkvm_pgd_lock.assert_held()
    if not h.profile.page_state_in_vmemmap:
        return _check_walk(h.pkvm_pgtable, hyp_va(addr), size,
                           lambda pte, a: hyp_state_of_pte(pte), want)
    vm = h.vmemmap
    states, first, nr = vm.hyp_state, vm.base_pfn, vm.nr
    pfn0 = addr >> PAGE_SHIFT
    for pfn in range(pfn0, pfn0 + (max(size, 0) + PAGE_SIZE - 1 >> PAGE_SHIFT)):
        i = pfn - first
        if (states[i] if 0 <= i < nr else NOPAGE) != want:
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
    for k in range(i, i + (size >> PAGE_SHIFT)):
        vm.host_state[k] = state


def set_hyp_state_range(h: HypState, addr: int, size: int, state: PageState) -> None:
    vm = h.vmemmap
    i = vm.idx(addr)
    for k in range(i, i + (size >> PAGE_SHIFT)):
        vm.hyp_state[k] = state


# -- the host stage-2 ----------------------------------------------------------------------
def host_stage2_force_pte_cb(h: HypState):
    def cb(addr: int, end: int, prot: int) -> bool:
        if range_is_memory(h, addr, end):
            return prot != PKVM_HOST_MEM_PROT
        return prot != PKVM_HOST_MMIO_PROT

    return cb


def host_stage2_unmap_dev_all(h: HypState) -> int:
    """Unmap every gap between memory regions (MMIO mappings fault back in)."""
    pgt = h.host_mmu.pgt  # type: ignore[union-attr]
    addr = 0
    for reg in h.hyp_memory:
        ret = pgt.stage2_unmap(addr, reg.base - addr)
        if ret:
            return ret
        addr = reg.end
    return pgt.stage2_unmap(addr, (1 << pgt.ia_bits) - addr)


def host_stage2_try(h: HypState, fn) -> int:
    ret = fn()
    if ret == -ENOMEM:
        ret = host_stage2_unmap_dev_all(h)
        if ret:
            return ret
        ret = fn()
    return ret


def host_stage2_idmap_locked(h: HypState, addr: int, size: int, prot: int) -> int:
    pgt = h.host_mmu.pgt  # type: ignore[union-attr]
    return host_stage2_try(
        h, lambda: pgt.stage2_map(addr, size, addr, prot, flags=KVM_PGTABLE_WALK_IGNORE_EAGAIN)
    )


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
    return (pte >> KVM_INVALID_PTE_OWNER_SHIFT) & 0xFF, 0


def host_stage2_set_owner_metadata_locked(h: HypState, addr: int, size: int, owner: int,
                                          meta: int) -> int:
    if owner == ComponentId.HOST:
        return -EINVAL
    if not range_is_memory(h, addr, (addr + size) & U64):
        return -EPERM
    if owner > 7 or meta >= 1 << 56:
        return -EINVAL
    pgt = h.host_mmu.pgt  # type: ignore[union-attr]
    ann = host_donation_annotation(owner, meta)
    ret = host_stage2_try(h, lambda: pgt.stage2_map(addr, size, None, 0, annotation=ann))
    if ret:
        return ret
    set_host_state_range(h, addr, size, PageState.NOPAGE)
    return 0


def host_stage2_set_owner_locked(h: HypState, addr: int, size: int, owner: int) -> int:
    pgt = h.host_mmu.pgt  # type: ignore[union-attr]
    if not h.profile.page_state_in_vmemmap:
        # 6.12 kvm_pgtable_stage2_set_owner: owner id in bits 9:2; the host gets a zero leaf.
        if owner > KVM_MAX_OWNER_ID_6_12:
            return -EINVAL
        ann = owner << KVM_INVALID_PTE_OWNER_SHIFT
        if owner == ComponentId.HOST:
            return host_stage2_try(h, lambda: pgt.stage2_unmap(addr, size))
        return host_stage2_try(h, lambda: pgt.stage2_map(addr, size, None, 0, annotation=ann))
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


def host_set_page_state_range(h: HypState, addr: int, size: int, state: PageState) -> int:
    if not h.profile.page_state_in_vmemmap:
        return host_stage2_idmap_locked(h, addr, size, pkvm_mkstate(PKVM_HOST_MEM_PROT, state))
    vm = h.vmemmap
    i = (addr >> PAGE_SHIFT) - vm.base_pfn
    if not 0 <= i < vm.nr or vm.host_state[i] == NOPAGE:  # get_host_state(h, addr) == NOPAGE
        ret = host_stage2_idmap_locked(h, addr, size, PKVM_HOST_MEM_PROT)
        if ret:
            return ret
    set_host_state_range(h, addr, size, state)
    return 0


def host_stage2_adjust_range(h: HypState, addr: int) -> tuple[int, int, int]:
    """Pick the largest granule around `addr` that lies in its region or gap and is unmapped."""
    is_mem, rstart, rend = find_mem_range(h, addr)
    ret, pte, level = h.host_mmu.pgt.get_leaf(addr)  # type: ignore[union-attr]
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
    with h.host_mmu.lock:  # type: ignore[union-attr]
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


# -- host <-> hyp transitions ------------------------------------------------------------
class _HostHyp:
    """Take the host then the hyp lock, release in reverse (`host_lock_component` ...)."""

    def __init__(self, h: HypState):
        self.h = h

    def __enter__(self) -> None:
        self.h.host_mmu.lock.acquire()  # type: ignore[union-attr]
        self.h.pkvm_pgd_lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self.h.pkvm_pgd_lock.release()
        self.h.host_mmu.lock.release()  # type: ignore[union-attr]


def host_hyp_locked(h: HypState) -> _HostHyp:
    return _HostHyp(h)


def __pkvm_host_share_hyp(h: HypState, pfn: int) -> int:
    phys = hyp_pfn_to_phys(pfn)
    with host_hyp_locked(h):
        ret = host_check_page_state_range(h, phys, PAGE_SIZE, PageState.OWNED)
        if ret:
            return ret
        if h.profile.page_state_in_vmemmap:
            ret = hyp_check_page_state_range(h, phys, PAGE_SIZE, PageState.NOPAGE)
            if ret:
                return ret
            set_hyp_state_range(h, phys, PAGE_SIZE, PageState.SHARED_BORROWED)
            _warn(h, host_set_page_state_range(h, phys, PAGE_SIZE, PageState.SHARED_OWNED))
            return 0
        # 6.12 do_share: the completer (hyp) accepts PAGE_HYP from the host.
        _warn(h, host_set_page_state_range(h, phys, PAGE_SIZE, PageState.SHARED_OWNED))
        _warn(h, pkvm_create_mappings_locked(
            h, hyp_va(phys), hyp_va(phys) + PAGE_SIZE,
            pkvm_mkstate(PAGE_HYP, PageState.SHARED_BORROWED)))
        return 0


def __pkvm_host_unshare_hyp(h: HypState, pfn: int) -> int:
    phys = hyp_pfn_to_phys(pfn)
    with host_hyp_locked(h):
        ret = host_check_page_state_range(h, phys, PAGE_SIZE, PageState.SHARED_OWNED)
        if ret:
            return ret
        if h.profile.page_state_in_vmemmap:
            ret = hyp_check_page_state_range(h, phys, PAGE_SIZE, PageState.SHARED_BORROWED)
            if ret:
                return ret
            ret = hyp_check_page_count_range(h, phys, PAGE_SIZE)
            if ret and not h.bug("unshare-pinned"):  # seeded: a pinned page can be unshared
                return ret
            set_hyp_state_range(h, phys, PAGE_SIZE, PageState.NOPAGE)
            _warn(h, host_set_page_state_range(h, phys, PAGE_SIZE, PageState.OWNED))
            return 0
        if not h.vmemmap.covers(phys):
            return -EPERM
        if h.vmemmap.page_count(phys) and not h.bug("unshare-pinned"):
            return -EBUSY
        _warn(h, host_set_page_state_range(h, phys, PAGE_SIZE, PageState.OWNED))
        # do_unshare returns WARN_ON(__do_unshare()): hyp_complete_unshare's -EFAULT (an unmap
        # that removed nothing: a page the host shared with FF-A, never the hyp's) WARNs.
        unmapped = h.pkvm_pgtable.hyp_unmap(hyp_va(phys), PAGE_SIZE)  # type: ignore[union-attr]
        _warn(h, unmapped != PAGE_SIZE)
        return 0


def __pkvm_host_donate_hyp(h: HypState, pfn: int, nr_pages: int) -> int:
    phys = hyp_pfn_to_phys(pfn)
    size = (PAGE_SIZE * nr_pages) & U64
    if h.profile.page_state_in_vmemmap and not pfn_range_is_valid(h, pfn, nr_pages):
        return -EINVAL
    with host_hyp_locked(h):
        return _host_donate_hyp_locked(h, phys, size)


def _host_donate_hyp_locked(h: HypState, phys: int, size: int) -> int:
    ret = host_check_page_state_range(h, phys, size, PageState.OWNED)
    if ret and h.bug("donate-nomap") and not addr_is_memory(h, phys):  # seeded: no memory check
        ret = 0
    if ret:
        return ret
    if h.profile.page_state_in_vmemmap:
        ret = hyp_check_page_state_range(h, phys, size, PageState.NOPAGE)
        if ret:
            return ret
        set_hyp_state_range(h, phys, size, PageState.OWNED)
    _warn(h, pkvm_create_mappings_locked(h, hyp_va(phys), hyp_va(phys) + size, PAGE_HYP))
    _warn(h, host_stage2_set_owner_locked(h, phys, size, ComponentId.HYP))
    return 0


def __pkvm_hyp_donate_host(h: HypState, pfn: int, nr_pages: int) -> int:
    phys = hyp_pfn_to_phys(pfn)
    size = (PAGE_SIZE * nr_pages) & U64
    if h.profile.page_state_in_vmemmap and not pfn_range_is_valid(h, pfn, nr_pages):
        return -EINVAL
    with host_hyp_locked(h):
        ret = hyp_check_page_state_range(h, phys, size, PageState.OWNED)
        if ret:
            return ret
        if h.profile.page_state_in_vmemmap:
            ret = host_check_page_state_range(h, phys, size, PageState.NOPAGE)
            if ret:
                return ret
            ret = hyp_check_page_count_range(h, phys, size)
            if ret:
                return ret
            set_hyp_state_range(h, phys, size, PageState.NOPAGE)
        unmapped = h.pkvm_pgtable.hyp_unmap(hyp_va(phys), size)  # type: ignore[union-attr]
        if unmapped != size:
            if not h.profile.page_state_in_vmemmap:
                return -EFAULT
            _warn(h, 1)
        _warn(h, host_stage2_set_owner_locked(h, phys, size, ComponentId.HOST))
        return 0


def hyp_pin_shared_mem(h: HypState, start_va: int, end_va: int) -> int:
    """Pin host pages shared with the hyp for as long as EL2 uses them (refcount per page)."""
    start = start_va & ~(PAGE_SIZE - 1)
    end = (end_va + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    phys = hyp_pa(start)
    size = (end - start) & U64
    with host_hyp_locked(h):
        ret = host_check_page_state_range(h, phys, size, PageState.SHARED_OWNED)
        if ret:
            return ret
        ret = hyp_check_page_state_range(h, phys, size, PageState.SHARED_BORROWED)
        if ret:
            return ret
        vm = h.vmemmap
        for va in range(start, end, PAGE_SIZE):
            i = vm.idx(hyp_pa(va))
            if vm.refcount[i] == 0xFFFF:
                raise HypBug("hyp_page_ref_inc: refcount overflow")
            vm.refcount[i] += 1
            if vm.refcount[i] == 1 and h.profile.page_state_in_vmemmap:
                _warn(h, pkvm_create_mappings_locked(h, va, va + PAGE_SIZE, PAGE_HYP))
        return 0


def hyp_unpin_shared_mem(h: HypState, start_va: int, end_va: int) -> None:
    start = start_va & ~(PAGE_SIZE - 1)
    end = (end_va + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    with host_hyp_locked(h):
        vm = h.vmemmap
        for va in range(start, end, PAGE_SIZE):
            i = vm.idx(hyp_pa(va))
            if vm.refcount[i] == 1 and h.profile.page_state_in_vmemmap:
                _warn(h, h.pkvm_pgtable.hyp_unmap(va, PAGE_SIZE) != PAGE_SIZE)  # type: ignore[union-attr]
            if vm.refcount[i] == 0:
                raise HypBug("hyp_page_ref_dec: refcount underflow on unpin")
            vm.refcount[i] -= 1


# -- WARN_ON ----------------------------------------------------------------------------
def _warn(h: HypState, cond: object) -> None:
    """A `WARN_ON`: when it fires, record the site (for `inspect.warnings()`) and panic, as the
    kernel's hyp does (a WARN at EL2 is a `BRK` that `nvhe_hyp_panic_handler` treats as fatal)."""
    if cond:
        import sys
        import traceback

        h.warnings.append("".join(traceback.format_stack(limit=3)[:-1]))
        caller = sys._getframe(1)
        where = f"{caller.f_code.co_filename.split('/src/')[-1]}:{caller.f_lineno}"
        raise HypWarn(caller.f_code.co_name, where)
