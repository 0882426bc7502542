"""Guest ownership transitions of `nvhe/mem_protect.c` (7.2 only): host <-> guest, guest -> host.

Locks: host then guest (`guest_lock_component`); force-reclaim takes the VM table lock first.
The guest stage-2 carries each page's guest state in its leaf's software bits; the host side of
a guest-owned page is a donation annotation naming (handle, gfn).
"""

from __future__ import annotations

from typing import Final

from pkvm.errors import E2BIG, EAGAIN, EBUSY, EFAULT, EHWPOISON, EINVAL, ENOENT, ENOMEM, EPERM
from pkvm.hyp.mem_protect import (
    KVM_GUEST_INVALID_PTE_TYPE_POISONED,
    KVM_INVALID_PTE_TYPE_SHIFT,
    PKVM_PAGE_STATE_PROT_MASK,
    _warn,
    addr_is_memory,
    check_range_allowed_memory,
    decode_host_annotation,
    get_host_state,
    host_check_page_state_range,
    host_set_page_state_range,
    host_stage2_set_owner_locked,
    host_stage2_set_owner_metadata_locked,
    hyp_pfn_to_phys,
    pfn_range_is_valid,
    pkvm_getstate,
    pkvm_mkstate,
)
from pkvm.hyp.memory import ComponentId, PageState
from pkvm.hyp.mm import el2_fixmap_zero
from pkvm.hyp.panic import HypBug
from pkvm.hyp.pgtable import (
    KVM_PGTABLE_PROT_RWX,
    KVM_PGTABLE_PROT_X,
    KVM_PGTABLE_WALK_IGNORE_EAGAIN,
    KVM_PGTABLE_WALK_LEAF,
    KVM_PTE_LEAF_ATTR_HI_S2_XN,
    KVM_PTE_LEAF_ATTR_LO_S2_AF,
    KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R,
    KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W,
    VisitCtx,
    granule_size,
    pte_to_phys,
    pte_valid,
    stage2_set_prot_attr,
)
from pkvm.hyp.pkvm import get_vm_by_handle
from pkvm.hyp.pkvm_structs import PkvmHypVcpu, PkvmHypVm
from pkvm.hyp.state import HypState
from pkvm.machine.esr import EC, FSC, esr_ec
from pkvm.machine.memory import PAGE_SHIFT, PAGE_SIZE

U32_MAX: Final = 0xFFFF_FFFF
KVM_PGTABLE_LAST_LEVEL: Final = 3
ESR_ELx_FSC_TYPE: Final = 0x3C  # the fault status code without its level
HPFAR_EL2_NS: Final = 1 << 63
HPFAR_MASK: Final = ((1 << 64) - 1) & ~HPFAR_EL2_NS & ~0xF  # HPFAR_EL2.FIPA: the IPA's page, from bit 4
HPFAR_IPA_SHIFT: Final = 8
GFN_META_HANDLE_MASK: Final = 0xFFFF  # GENMASK(15, 0) of the host PTE's owner annotation
POISONED_PTE: Final = KVM_GUEST_INVALID_PTE_TYPE_POISONED << KVM_INVALID_PTE_TYPE_SHIFT
KVM_MMU_CACHE_MIN_PAGES: Final = 3
GFN_META_SHIFT: Final = 16
GFN_META_BITS: Final = 40  # GENMASK(55, 16) of the host PTE's owner annotation
# A valid leaf's state is in its software bits SW0/SW1, which `stage2_pte_prot` copies into the
# prot unchanged: the state by those two bits (tests/test_fast_paths.py checks it agrees).
_SW_SHIFT: Final = 55
_STATE_OF_SW: Final = tuple(pkvm_getstate(sw << _SW_SHIFT) for sw in range(4))
assert PKVM_PAGE_STATE_PROT_MASK == 3 << _SW_SHIFT


def guest_pte_is_poisoned(pte: int) -> bool:
    return not pte_valid(pte) and pte >> KVM_INVALID_PTE_TYPE_SHIFT == KVM_GUEST_INVALID_PTE_TYPE_POISONED


def guest_state_of_pte(pte: int) -> PageState:
    """`guest_get_page_state` of a guest stage-2 leaf."""
    if not pte & 1:  # not pte_valid(pte)
        if pte >> KVM_INVALID_PTE_TYPE_SHIFT == KVM_GUEST_INVALID_PTE_TYPE_POISONED:
            return PageState.POISON
        return PageState.NOPAGE
    return _STATE_OF_SW[(pte >> _SW_SHIFT) & 3]  # pkvm_getstate(stage2_pte_prot(pte))


class _HostGuest:
    def __init__(self, h: HypState, vm: "PkvmHypVm"):
        self.h, self.vm = h, vm

    def __enter__(self) -> None:
        self.h.host_mmu.lock.acquire()
        self.vm.lock.acquire()

    def __exit__(self, typ: object, value: object, tb: object) -> None:
        self.vm.lock.release()
        self.h.host_mmu.lock.release()


def guest_check_page_state_range(vm: "PkvmHypVm", addr: int, size: int, want: PageState) -> int:
    vm.lock.assert_held()
    if size == PAGE_SIZE and not addr & (PAGE_SIZE - 1):
        # One page: the walk visits exactly the leaf covering it.
        ret, pte, _ = vm.pgt.get_leaf(addr)
        if ret:
            return ret
        return 0 if guest_state_of_pte(pte) == want else -EPERM
    return _guest_check_walk(vm, addr, size, want)


def _guest_check_walk(vm: "PkvmHypVm", addr: int, size: int, want: PageState) -> int:
    """The generic check: every leaf of the range walked (a function of its own, so that the
    one-page path above makes no closure)."""

    def visit(ctx: VisitCtx, _v: int) -> int:
        return 0 if guest_state_of_pte(ctx.old) == want else -EPERM

    return vm.pgt.walk(addr, size, visit, KVM_PGTABLE_WALK_LEAF)


def get_valid_guest_pte(h: HypState, vm: "PkvmHypVm", ipa: int) -> tuple[int, int, int]:
    """(ret, pte, phys) of the last-level leaf mapping `ipa`."""
    ret, pte, level = vm.pgt.get_leaf(ipa)
    if ret:
        return ret, 0, 0
    if guest_pte_is_poisoned(pte):
        return -EHWPOISON, 0, 0
    if not pte_valid(pte):
        return -ENOENT, 0, 0
    if level != KVM_PGTABLE_LAST_LEVEL:
        return -E2BIG, 0, 0
    phys = pte_to_phys(pte)
    ret = check_range_allowed_memory(h, phys, phys + PAGE_SIZE)
    if ret:
        _warn(h, ret)
        return ret, 0, 0
    return 0, pte, phys


def guest_check_pgtable_memcache(h: HypState, vcpu: "PkvmHypVcpu") -> int:
    if h.bug("memcache-capacity"):  # seeded: no capacity check before the share/donate
        return 0
    return -ENOMEM if vcpu.memcache[1] < KVM_MMU_CACHE_MIN_PAGES else 0


def guest_check_transition_size(phys: int, ipa: int, nr_pages: int) -> tuple[int, int]:
    if nr_pages == 1:
        return 0, PAGE_SIZE
    block = granule_size(KVM_PGTABLE_LAST_LEVEL - 1)
    if nr_pages != block >> PAGE_SHIFT or (phys | ipa) & (block - 1):
        return -EINVAL, 0
    return 0, block



def encode_gfn_meta(h: HypState, vm: "PkvmHypVm", gfn: int) -> int:
    """`host_stage2_encode_gfn_meta`: WARN (a hyp panic) when the gfn does not fit its field;
    otherwise the handle and gfn packed as FIELD_PREP does."""
    _warn(h, gfn >> GFN_META_BITS)
    return (vm.handle & GFN_META_HANDLE_MASK) | ((gfn & ((1 << GFN_META_BITS) - 1)) << GFN_META_SHIFT)


def _guest_map(h: HypState, vm: "PkvmHypVm", vcpu: "PkvmHypVcpu | None", ipa: int, size: int,
               phys: int, prot: int) -> int:
    vm.mm_ops.vcpu = vcpu
    try:
        return vm.pgt.stage2_map(ipa, size, phys, prot)
    finally:
        vm.mm_ops.vcpu = None


def __pkvm_host_donate_guest(h: HypState, pfn: int, gfn: int, vcpu: "PkvmHypVcpu") -> int:
    vm = vcpu.vm
    phys, ipa = hyp_pfn_to_phys(pfn), hyp_pfn_to_phys(gfn)
    with _HostGuest(h, vm):
        ret = host_check_page_state_range(h, phys, PAGE_SIZE, PageState.OWNED)
        if ret:
            return ret
        ret = guest_check_page_state_range(vm, ipa, PAGE_SIZE, PageState.NOPAGE)
        if ret:
            return ret
        ret = guest_check_pgtable_memcache(h, vcpu)
        if ret:
            return ret
        if not h.bug("donate-guest-keeps-host"):  # seeded: the host keeps its mapping
            _warn(h, host_stage2_set_owner_metadata_locked(
                h, phys, PAGE_SIZE, ComponentId.GUEST, encode_gfn_meta(h, vm, gfn)))
        _warn(h, _guest_map(h, vm, vcpu, ipa, PAGE_SIZE, phys,
                            pkvm_mkstate(KVM_PGTABLE_PROT_RWX, PageState.OWNED)))
        return 0


def __pkvm_host_share_guest(h: HypState, pfn: int, gfn: int, nr_pages: int,
                            vcpu: "PkvmHypVcpu", prot: int) -> int:
    vm = vcpu.vm
    phys, ipa = hyp_pfn_to_phys(pfn), hyp_pfn_to_phys(gfn)
    if prot & ~KVM_PGTABLE_PROT_RWX:
        return -EINVAL
    if not pfn_range_is_valid(h, pfn, nr_pages) and not h.bug("range-args"):
        return -EINVAL
    ret, size = guest_check_transition_size(phys, ipa, nr_pages)
    if ret:
        return ret
    ret = check_range_allowed_memory(h, phys, phys + size)
    if ret:
        return ret
    vmm = h.vmemmap
    with _HostGuest(h, vm):
        ret = guest_check_page_state_range(vm, ipa, size, PageState.NOPAGE)
        if ret:
            return ret
        for pa in range(phys, phys + size, PAGE_SIZE):
            i = vmm.idx(pa)
            state = vmm.host_state[i]
            if state == PageState.OWNED:
                continue
            if state == PageState.SHARED_OWNED:
                if vmm.host_share_guest_count[i] == U32_MAX:
                    return -EBUSY
                if vmm.host_share_guest_count[i]:
                    continue
            _warn(h, h.bug("share-guest-warn"))  # seeded: WARN on a host-reachable refusal
            return -EPERM
        ret = guest_check_pgtable_memcache(h, vcpu)
        if ret:
            return ret
        for pa in range(phys, phys + size, PAGE_SIZE):
            i = vmm.idx(pa)
            vmm.touch(i)
            vmm.host_state[i] = PageState.SHARED_OWNED
            vmm.host_share_guest_count[i] += 1
        _warn(h, _guest_map(h, vm, vcpu, ipa, size, phys,
                            pkvm_mkstate(prot, PageState.SHARED_BORROWED)))
        return 0


def check_host_shared_guest(h: HypState, vm: "PkvmHypVm", ipa: int, size: int) -> tuple[int, int]:
    ret, pte, level = vm.pgt.get_leaf(ipa)
    if ret:
        return ret, 0
    if not pte_valid(pte):
        return -ENOENT, 0
    if size and granule_size(level) != size:
        return -E2BIG, 0
    if not size:
        size = granule_size(level)
    if guest_state_of_pte(pte) != PageState.SHARED_BORROWED:
        return -EPERM, 0
    phys = pte_to_phys(pte)
    ret = check_range_allowed_memory(h, phys, phys + size)
    if ret:
        _warn(h, ret)
        return ret, 0
    vmm = h.vmemmap
    for pa in range(phys, phys + size, PAGE_SIZE):
        i = vmm.idx(pa)
        if vmm.host_state[i] != PageState.SHARED_OWNED:
            return -EPERM, 0
        if not vmm.host_share_guest_count[i]:
            _warn(h, 1)
            return -EINVAL, 0
    return 0, phys


def __pkvm_host_unshare_guest(h: HypState, gfn: int, nr_pages: int, vm: "PkvmHypVm") -> int:
    ipa = hyp_pfn_to_phys(gfn)
    ret, size = guest_check_transition_size(0, ipa, nr_pages)
    if ret:
        return ret
    vmm = h.vmemmap
    with _HostGuest(h, vm):
        ret, phys = check_host_shared_guest(h, vm, ipa, size)
        if ret:
            return ret
        ret = vm.pgt.stage2_unmap(ipa, size)
        if ret:
            return ret
        for pa in range(phys, phys + size, PAGE_SIZE):
            i = vmm.idx(pa)
            vmm.touch(i)
            vmm.host_share_guest_count[i] -= 1
            if not vmm.host_share_guest_count[i] or h.bug("unshare-guest-count"):
                vmm.host_state[i] = PageState.OWNED  # (seeded: even while still shared)
        return 0


def _update_guest(vm: "PkvmHypVm", ipa: int, size: int, set_bits: int, clr_bits: int,
                  flags: int = KVM_PGTABLE_WALK_IGNORE_EAGAIN) -> tuple[int, int]:
    with vm.lock:
        return vm.pgt.stage2_update_leaf(ipa, size, set_bits, clr_bits, flags)


def __pkvm_host_relax_perms_guest(h: HypState, gfn: int, prot: int, vcpu: "PkvmHypVcpu") -> int:
    if prot & ~KVM_PGTABLE_PROT_RWX:
        return -EINVAL
    attr = stage2_set_prot_attr(prot, 0)
    if attr is None:
        return -EINVAL
    set_bits = attr & (KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R | KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W)  # added only
    clr_bits = 0
    if prot & KVM_PGTABLE_PROT_X:  # X, when asked for, is set exactly as asked (PX, UX)
        set_bits |= attr & KVM_PTE_LEAF_ATTR_HI_S2_XN
        clr_bits = ~attr & KVM_PTE_LEAF_ATTR_HI_S2_XN
    # Walked without IGNORE_EAGAIN: an unmapped gfn answers -EAGAIN, as in Linux.
    ret, _ = _update_guest(vcpu.vm, hyp_pfn_to_phys(gfn), PAGE_SIZE,
                           set_bits | KVM_PTE_LEAF_ATTR_LO_S2_AF, clr_bits, flags=0)
    return ret


def __pkvm_host_wrprotect_guest(h: HypState, gfn: int, nr_pages: int, vm: "PkvmHypVm") -> int:
    ipa = hyp_pfn_to_phys(gfn)
    ret, size = guest_check_transition_size(0, ipa, nr_pages)
    if ret:
        return ret
    ret, _ = _update_guest(vm, ipa, size, 0, KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W)
    return ret


def __pkvm_host_test_clear_young_guest(h: HypState, gfn: int, nr_pages: int, mkold: bool,
                                       vm: "PkvmHypVm") -> int:
    ipa = hyp_pfn_to_phys(gfn)
    ret, size = guest_check_transition_size(0, ipa, nr_pages)
    if ret:
        return ret
    clr = KVM_PTE_LEAF_ATTR_LO_S2_AF if mkold and not h.bug("young-not-cleared") else 0
    ret, acc = _update_guest(vm, ipa, size, 0, clr)
    if ret:  # kvm_pgtable_stage2_test_clear_young WARNs on a failed walk: a hyp panic
        raise HypBug(f"WARN_ON in kvm_pgtable_stage2_test_clear_young: walk of IPA {ipa:#x} "
                     f"+ {size:#x} = {ret}")
    return 1 if acc & KVM_PTE_LEAF_ATTR_LO_S2_AF else 0


def __pkvm_host_mkyoung_guest(h: HypState, gfn: int, vcpu: "PkvmHypVcpu") -> int:
    """Set the access flag; Linux's `kvm_pgtable_stage2_mkyoung` returns nothing: always 0."""
    _update_guest(vcpu.vm, hyp_pfn_to_phys(gfn), PAGE_SIZE, KVM_PTE_LEAF_ATTR_LO_S2_AF, 0)
    return 0


def hyp_poison_page(h: HypState, phys: int) -> None:
    """Wipe a page leaving a guest, through the hyp fixmap."""
    el2_fixmap_zero(h, phys)


def __pkvm_host_reclaim_page_guest(h: HypState, gfn: int, vm: "PkvmHypVm") -> int:
    ipa = hyp_pfn_to_phys(gfn)
    with _HostGuest(h, vm):
        ret, pte, phys = get_valid_guest_pte(h, vm, ipa)
        if not ret:
            state = guest_state_of_pte(pte)
            if state == PageState.OWNED:
                _warn(h, host_check_page_state_range(h, phys, PAGE_SIZE, PageState.NOPAGE))
                if not h.bug("teardown-no-wipe") and not h.bug("poison-after-return"):
                    hyp_poison_page(h, phys)
            elif state == PageState.SHARED_OWNED:
                _warn(h, host_check_page_state_range(h, phys, PAGE_SIZE, PageState.SHARED_BORROWED))
            else:
                ret = -EPERM
            if not ret:
                _warn(h, vm.pgt.stage2_unmap(ipa, PAGE_SIZE))
                _warn(h, host_stage2_set_owner_locked(h, phys, PAGE_SIZE, ComponentId.HOST))
                if state == PageState.OWNED and h.bug("poison-after-return"):
                    hyp_poison_page(h, phys)  # seeded: the wipe comes after the host has it
    return ret if ret and ret != -EHWPOISON else 0


def __pkvm_host_force_reclaim_page_guest(h: HypState, phys: int) -> int:
    phys &= ~(PAGE_SIZE - 1)
    assert h.vm_table_lock is not None and h.host_mmu is not None
    with h.vm_table_lock:
        with h.host_mmu.lock:
            if not addr_is_memory(h, phys):
                return -EFAULT
            state = get_host_state(h, phys)
            if state in (PageState.OWNED, PageState.SHARED_OWNED, PageState.SHARED_BORROWED):
                return -EAGAIN
            if state != PageState.NOPAGE:
                return -EPERM
            ret, pte, level = h.host_mmu.pgt.get_leaf(phys)
            if ret:
                return ret
            if level != KVM_PGTABLE_LAST_LEVEL:
                _warn(h, 1)
                return -EINVAL
            ann = decode_host_annotation(pte)
            if ann is None:
                return -EINVAL
            owner, meta = ann
            if owner != ComponentId.GUEST:
                return -EPERM
            vm = get_vm_by_handle(h, meta & GFN_META_HANDLE_MASK)
            if vm is None:
                return -EAGAIN
            gfn = meta >> GFN_META_SHIFT
            ipa = hyp_pfn_to_phys(gfn)
            with vm.lock:
                ret, gpte, pa = get_valid_guest_pte(h, vm, ipa)
                if ret:
                    return ret
                _warn(h, pa != phys)
                if guest_state_of_pte(gpte) != PageState.OWNED:
                    return -EPERM
                ret = vm.pgt.stage2_map(ipa, PAGE_SIZE, None, 0, annotation=POISONED_PTE)
                if ret:
                    return ret
                if not h.bug("force-reclaim-no-wipe"):
                    hyp_poison_page(h, phys)
                _warn(h, host_stage2_set_owner_locked(h, phys, PAGE_SIZE, ComponentId.HOST))
                return 0


def __pkvm_guest_share_host(h: HypState, vcpu: "PkvmHypVcpu", gfn: int) -> int:
    vm = vcpu.vm
    ipa = hyp_pfn_to_phys(gfn)
    with _HostGuest(h, vm):
        ret, pte, phys = get_valid_guest_pte(h, vm, ipa)
        if ret:
            return ret
        if guest_state_of_pte(pte) != PageState.OWNED:
            return -EPERM
        if host_check_page_state_range(h, phys, PAGE_SIZE, PageState.NOPAGE):
            return -EPERM
        _warn(h, _guest_map(h, vm, vcpu, ipa, PAGE_SIZE, phys,
                            pkvm_mkstate(KVM_PGTABLE_PROT_RWX, PageState.SHARED_OWNED)))
        _warn(h, host_set_page_state_range(h, phys, PAGE_SIZE, PageState.SHARED_BORROWED))
        return 0


def __pkvm_guest_unshare_host(h: HypState, vcpu: "PkvmHypVcpu", gfn: int) -> int:
    vm = vcpu.vm
    ipa = hyp_pfn_to_phys(gfn)
    with _HostGuest(h, vm):
        ret, pte, phys = get_valid_guest_pte(h, vm, ipa)
        if ret:
            return ret
        if guest_state_of_pte(pte) != PageState.SHARED_OWNED:
            return -EPERM
        if host_check_page_state_range(h, phys, PAGE_SIZE, PageState.SHARED_BORROWED):
            return -EPERM
        _warn(h, host_stage2_set_owner_metadata_locked(h, phys, PAGE_SIZE, ComponentId.GUEST,
                                                       encode_gfn_meta(h, vm, gfn)))
        _warn(h, _guest_map(h, vm, vcpu, ipa, PAGE_SIZE, phys,
                            pkvm_mkstate(KVM_PGTABLE_PROT_RWX, PageState.OWNED)))
        return 0


def vcpu_in_poison_fault(h: HypState, vcpu: "PkvmHypVcpu") -> int:
    esr = vcpu.fault_esr
    if esr_ec(esr) not in (EC.DABT_LOW, EC.IABT_LOW) or (esr & ESR_ELx_FSC_TYPE) != FSC.FAULT:
        return -EINVAL
    ipa = (vcpu.fault_hpfar & HPFAR_MASK) << HPFAR_IPA_SHIFT
    ret, pte, level = vcpu.vm.pgt.get_leaf(ipa)
    if ret:
        return ret
    if level != KVM_PGTABLE_LAST_LEVEL:
        return -EINVAL
    return 1 if guest_pte_is_poisoned(pte) else 0


