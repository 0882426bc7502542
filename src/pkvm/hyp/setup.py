"""Bringing pKVM up (`nvhe/setup.c`): `__pkvm_init`, `__pkvm_init_finalise`, prot_finalize.

`__pkvm_init(phys, size, ...)` divides the carve-out with a bump allocator, rebuilds the hyp
stage-1, then `__pkvm_init_finalise` creates the page pools, the (empty) host stage-2, fixes the
refcounts of the stage-1 table pages, hands every carve-out page to the hyp in the host stage-2
(`fix_host_ownership`) and installs the VM table. `__pkvm_prot_finalize` then turns the host
stage-2 on, CPU by CPU.
"""

from __future__ import annotations

from typing import Final

from pkvm.abi import sizes
from pkvm.errors import EINVAL, ENOMEM, EPERM
from pkvm.hyp import pkvm_one_phase, pkvm_two_phase
from pkvm.hyp.mem_protect import (
    addr_is_memory,
    host_stage2_force_pte_cb,
    pkvm_getstate,
)
from pkvm.hyp.mm import hyp_stage1_tlbi, hyp_va, pkvm_create_mappings_locked
from pkvm.hyp.page_alloc import HypPool
from pkvm.hyp.pgtable import (
    KVM_PGTABLE_WALK_LEAF,
    KVM_PGTABLE_WALK_TABLE_POST,
    PAGE_HYP,
    PAGE_HYP_EXEC,
    PAGE_HYP_RO,
    KvmPgtable,
    VisitCtx,
    hyp_pte_prot,
    pte_to_phys,
    pte_valid,
)
from pkvm.hyp.pkvm import VmLife
from pkvm.hyp.state import HYP_VA_BITS, HostMmu, HypState
from pkvm.machine.memory import PAGE_SHIFT, PAGE_SIZE
from pkvm.machine.mmu import HCR_FWB, HCR_VM

# The hyp image the model places at the end of the carve-out: text, rodata, data, bss, then
# one per-CPU page and one stack page per CPU.
HYP_TEXT_PAGES: Final = 4
HYP_RODATA_PAGES: Final = 1
HYP_DATA_PAGES: Final = 1
HYP_BSS_PAGES: Final = 2


# The VM life cycle of each kernel (`Profile.vm_lifecycle`), installed at `__pkvm_init`.
VM_LIFECYCLES: dict[str, VmLife] = {"one-phase": pkvm_one_phase, "two-phase": pkvm_two_phase}


def hyp_image_pages(nr_cpus: int) -> int:
    return HYP_TEXT_PAGES + HYP_RODATA_PAGES + HYP_DATA_PAGES + HYP_BSS_PAGES + 2 * nr_cpus


class _EarlyAlloc:
    """`hyp_early_alloc`: a bump allocator; pages it hands out are never freed."""

    def __init__(self, h: HypState, base: int, nr_pages: int):
        self.h = h
        self.base = base
        self.cur = base
        self.end = base + (nr_pages << PAGE_SHIFT)

    def contig(self, nr_pages: int) -> int | None:
        if nr_pages == 0:
            return self.cur
        if self.cur + (nr_pages << PAGE_SHIFT) > self.end:
            return None
        pa = self.cur
        self.cur += nr_pages << PAGE_SHIFT
        self.h.mem.zero(pa, nr_pages << PAGE_SHIFT)
        return pa

    def zalloc_page(self) -> int | None:
        return self.contig(1)

    def get_page(self, pa: int) -> None:
        pass

    def put_page(self, pa: int) -> None:
        pass

    def page_count(self, pa: int) -> int:
        return 1

    @property
    def used_pages(self) -> int:
        return (self.cur - self.base) >> PAGE_SHIFT


def _regions(h: HypState) -> list[tuple[int, int]]:
    return [(r.base, r.size) for r in h.hyp_memory]


def divide_memory_pool(h: HypState, phys: int, size: int) -> int:
    c = h.carve
    regions = _regions(h)
    bump = _EarlyAlloc(h, phys, size >> PAGE_SHIFT)
    c.base, c.size = phys, size
    parts = [
        ("selftest", sizes.pkvm_selftest_pages()),
        ("vmemmap", sizes.hyp_vmemmap_pages(regions, h.profile.hyp_page_size)),
        ("vm_table", sizes.hyp_vm_table_pages()),
        ("hyp_pgt", sizes.hyp_s1_pgtable_pages(regions)),
        ("host_s2_pgt", sizes.host_s2_pgtable_pages(regions)),
        ("ffa_proxy", sizes.hyp_ffa_proxy_pages()),
        ("image", hyp_image_pages(h.nr_cpus)),
    ]
    for name, nr in parts:
        pa = bump.cur if nr == 0 else bump.contig(nr)
        if pa is None:
            return -ENOMEM
        setattr(c, name, pa)
        if hasattr(c, name + "_pages"):
            setattr(c, name + "_pages", nr)
    # The image is not a divide_memory_pool chunk in Linux: keep it at the end of the carve-out.
    c.image = phys + size - (hyp_image_pages(h.nr_cpus) << PAGE_SHIFT)
    c.image_pages = hyp_image_pages(h.nr_cpus)
    return 0


def image_sections(h: HypState) -> list[tuple[str, int, int, int]]:
    """(name, first pa, pages, prot) of each part of the hyp image."""
    c = h.carve
    out = []
    pa = c.image
    for name, pages, prot in (
        ("text", HYP_TEXT_PAGES, PAGE_HYP_EXEC),
        ("rodata", HYP_RODATA_PAGES, PAGE_HYP_RO),
        ("data", HYP_DATA_PAGES, PAGE_HYP),
        ("bss", HYP_BSS_PAGES, PAGE_HYP),
        ("percpu", h.nr_cpus, PAGE_HYP),
        ("stacks", h.nr_cpus, PAGE_HYP),
    ):
        out.append((name, pa, pages, prot))
        pa += pages << PAGE_SHIFT
    return out


def recreate_hyp_mappings(h: HypState, early: _EarlyAlloc) -> int:
    c = h.carve
    pgt = KvmPgtable(h.mem, early, stage=1, name="hyp stage-1", ia_bits=HYP_VA_BITS,
                     eagain_stops=h.profile.pgtable_walk_eagain_stops)
    ret = pgt.init()
    if ret:
        return ret
    pgt.tlbi = hyp_stage1_tlbi(h)
    pgt.changed = h.el2_tlb.mark_range  # EL2's TLB entries to walk again at next use
    h.pkvm_pgtable = pgt
    with h.pkvm_pgd_lock:
        for _name, pa, pages, prot in image_sections(h):
            ret = pkvm_create_mappings_locked(h, hyp_va(pa), hyp_va(pa + (pages << PAGE_SHIFT)), prot)
            if ret:
                return ret
        # The whole carve-out PAGE_HYP (its image pages are mapped above with their own prots).
        ret = pkvm_create_mappings_locked(h, hyp_va(c.base), hyp_va(c.image), PAGE_HYP)
        if ret:
            return ret
    return 0


def fix_hyp_pgtable_refcnt(h: HypState) -> int:
    pgt = h.pkvm_pgtable

    def visit(ctx: VisitCtx, _v: int) -> int:
        if pte_valid(ctx.old):
            pgt.mm_ops.get_page(ctx.ptep & ~(PAGE_SIZE - 1))
        return 0

    return pgt.walk(0, 1 << pgt.ia_bits, visit, KVM_PGTABLE_WALK_LEAF | KVM_PGTABLE_WALK_TABLE_POST)


def kvm_host_prepare_stage2(h: HypState) -> int:
    c = h.carve
    pool = HypPool("host_s2_pool", h.mem, h.vmemmap, h.locks, h.profile.attach_foreign_keeps_order)
    pool.init(c.host_s2_pgt >> PAGE_SHIFT, c.host_s2_pgt_pages, 0)
    h.host_s2_pool = pool
    pgt = KvmPgtable(h.mem, pool, stage=2, name="host stage-2", ia_bits=48,
                     eagain_stops=h.profile.pgtable_walk_eagain_stops,
                     force_pte_cb=host_stage2_force_pte_cb(h), normal_memattr=0xF)
    ret = pgt.init()
    if ret:
        return ret
    pgt.tlbi = h.host_s2_tlb.flush_range  # the stage-2 walker's `__kvm_tlb_flush_vmid_ipa`
    pgt.changed = h.host_s2_tlb.mark_range  # the host's TLB entries to walk again at next use
    h.host_mmu = HostMmu(pgt=pgt, lock=h.host_mmu_lock)
    return 0


def fix_host_ownership(h: HypState) -> int:
    """Hand every page the hyp stage-1 maps over to the hyp in the host stage-2."""
    pgt = h.pkvm_pgtable

    def visit(ctx: VisitCtx, _v: int) -> int:
        if not pte_valid(ctx.old):
            return 0
        if ctx.level != 3:
            return -EINVAL
        phys = pte_to_phys(ctx.old)
        if not addr_is_memory(h, phys):
            return -EINVAL
        return h.page_states.fix_host_ownership_page(
            h, phys, pkvm_getstate(hyp_pte_prot(ctx.old)))

    with h.host_mmu.lock:
        with h.pkvm_pgd_lock:
            for reg in h.hyp_memory:
                ret = pgt.walk(hyp_va(reg.base), reg.size, visit, KVM_PGTABLE_WALK_LEAF)
                if ret:
                    return ret
    return 0


def pkvm_init(h: HypState, phys: int, size: int) -> int:
    """`__pkvm_init` followed by `__pkvm_init_finalise` (their result reaches the host in x1)."""
    if phys & (PAGE_SIZE - 1) or size & (PAGE_SIZE - 1):
        return -EINVAL
    if not h.mem.range_is_ram(phys, size):
        return -ENOMEM
    ret = divide_memory_pool(h, phys, size)
    if ret:
        return ret
    early = _EarlyAlloc(h, h.carve.hyp_pgt, h.carve.hyp_pgt_pages)
    ret = recreate_hyp_mappings(h, early)
    if ret:
        return ret
    return pkvm_init_finalise(h, early)


def pkvm_init_finalise(h: HypState, early: _EarlyAlloc) -> int:
    c = h.carve
    hpool = HypPool("hpool", h.mem, h.vmemmap, h.locks, h.profile.attach_foreign_keeps_order)
    hpool.init(c.hyp_pgt >> PAGE_SHIFT, c.hyp_pgt_pages, early.used_pages)
    h.hpool = hpool
    ret = kvm_host_prepare_stage2(h)
    if ret:
        return ret
    h.pkvm_pgtable.mm_ops = hpool
    ret = fix_hyp_pgtable_refcnt(h)
    if ret:
        return ret
    ret = fix_host_ownership(h)
    if ret:
        return ret
    h.vm_table = [None] * sizes.KVM_MAX_PVMS
    h.life = VM_LIFECYCLES[h.profile.vm_lifecycle]
    return 0


def pkvm_prot_finalize(h: HypState) -> int:
    """`__pkvm_prot_finalize` on this CPU: turn the host stage-2 on."""
    el2 = h.el2[h.cpu]
    if el2.hcr_el2 & HCR_VM:
        return -EPERM
    el2.vttbr_el2 = h.host_mmu.pgt.pgd  # VMID 0
    el2.vtcr_el2 = 48
    el2.hcr_el2 |= HCR_VM | (HCR_FWB if h.profile.host_stage2_fwb else 0)
    if h.init_params:  # this CPU's kvm_init_params, for its next entry through the PSCI relay
        h.init_params[h.cpu] = (el2.hcr_el2, el2.vttbr_el2, el2.vtcr_el2)
    h.host_s2_tlb.flush_all()  # `__tlbi(vmalls12e1)`: nothing cached from before the switch
    return 0
