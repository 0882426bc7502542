"""EL2's own stage-1 operations of the page-table code (`hyp/pgtable.c`: `kvm_pgtable_hyp_map`,
`kvm_pgtable_hyp_unmap` and their walkers), on a `KvmPgtable` of stage 1.

Each operation is a visitor run by the shared walker, with a page-sized fast path that makes
the same descriptor writes in the same order as the walk would.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pkvm.arch.pte import (
    KVM_PGTABLE_LAST_LEVEL,
    KVM_PGTABLE_MIN_BLOCK_LEVEL,
    KVM_PGTABLE_WALK_LEAF,
    KVM_PGTABLE_WALK_TABLE_POST,
    KVM_PTE_ADDR_MASK,
    KVM_PTE_LEAF_ATTR_HI_SW,
    KVM_PTE_VALID,
    PTE_INDEX_MASK,
    granule_shift,
    granule_size,
    hyp_set_prot_attr,
    init_valid_leaf_pte,
    pte_table,
    pte_valid,
)
from pkvm.errors import EINVAL
from pkvm.machine.memory import PAGE_SIZE

if TYPE_CHECKING:  # for types only: the table's methods call these operations
    from pkvm.arch.pgtable import KvmPgtable, VisitCtx


def kvm_pgtable_hyp_map(pgt: KvmPgtable, addr: int, size: int, phys: int, prot: int) -> int:
    """`kvm_pgtable_hyp_map`."""
    attr = hyp_set_prot_attr(prot)
    if attr is None:
        return -EINVAL
    base = phys & ~(PAGE_SIZE - 1)
    if size == PAGE_SIZE and not addr & (PAGE_SIZE - 1):
        ptep = pgt.l3_ptep(addr)
        if ptep is not None:
            old = pgt.read_pte(ptep)
            new = init_valid_leaf_pte(base, attr, 3)
            if old == new:
                return 0
            if pte_valid(old) and (old ^ new) & ~KVM_PTE_LEAF_ATTR_HI_SW:
                return -EINVAL
            pgt.set_pte(ptep, old, new, addr, 3)
            return 0
    return hyp_map_walk(pgt, addr, size, base, attr)


def hyp_map_walk(pgt: KvmPgtable, addr: int, size: int, base: int, attr: int) -> int:
    """`kvm_pgtable_hyp_map` through the generic walker (any range; a function of its own, so
    the page-sized path makes no closure)."""

    def visit(ctx: VisitCtx, _v: int) -> int:
        level = ctx.level
        p = base + (ctx.addr - ctx.start)
        g = granule_size(level)
        fits = g <= ctx.end - ctx.addr and not (p | ctx.addr) & (g - 1)
        if level >= KVM_PGTABLE_MIN_BLOCK_LEVEL and fits:
            new = init_valid_leaf_pte(p, attr, level)
            if ctx.old == new:
                return 0
            if pte_valid(ctx.old) and (ctx.old ^ new) & ~KVM_PTE_LEAF_ATTR_HI_SW:
                return -EINVAL
            pgt.set_pte(ctx.ptep, ctx.old, new, ctx.addr, level)
            return 0
        if level == KVM_PGTABLE_LAST_LEVEL:
            return -EINVAL
        # Like Linux, a block in the way is replaced by an empty table (taking a
        # reference for the entry even where the block already held one).
        was_valid = pte_valid(ctx.old)
        ret = pgt.new_table(ctx.ptep, ctx.old, ctx.addr, level)
        if not ret and was_valid:
            pgt.mm_ops.get_page(ctx.ptep & ~(PAGE_SIZE - 1))
        return ret

    return pgt.walk(addr, size, visit, KVM_PGTABLE_WALK_LEAF)


def kvm_pgtable_hyp_unmap(pgt: KvmPgtable, addr: int, size: int) -> int:
    """`kvm_pgtable_hyp_unmap`: returns the number of bytes unmapped."""
    if size == PAGE_SIZE and not addr & (PAGE_SIZE - 1) and not addr >> pgt.ia_bits \
            and pgt.pgd:
        return hyp_unmap_page(pgt, addr)
    return hyp_unmap_walk(pgt, addr, size)


def hyp_unmap_page(pgt: KvmPgtable, addr: int) -> int:
    """`hyp_unmap` of one aligned page without the generic walker: the same descriptor
    writes in the same order (the leaf, then each table left empty, bottom up)."""
    tables: list[tuple[int, int, int]] = []
    table = pgt.pgd
    for level in range(pgt.start_level, 4):
        ptep = table + ((addr >> granule_shift(level)) & PTE_INDEX_MASK) * 8
        old = pgt.read_pte(ptep)
        if pte_table(old, level):
            tables.append((ptep, old, level))
            table = old & KVM_PTE_ADDR_MASK
            continue
        if level < 3 or not old & KVM_PTE_VALID:  # a block, or nothing: -EINVAL, stop
            return 0
        pgt.set_pte_invalidate(ptep, old, 0, addr, level)  # (valid: `set_pte`, `invalidate`)
        break
    mm_ops = pgt.mm_ops
    for ptep, old, level in reversed(tables):  # the TABLE_POST visits
        child = old & KVM_PTE_ADDR_MASK
        if mm_ops.page_count(child) == 1:
            pgt.set_pte_invalidate(ptep, old, 0, addr, level)  # (a table: valid)
            mm_ops.put_page(child)
    return PAGE_SIZE


def hyp_unmap_walk(pgt: KvmPgtable, addr: int, size: int) -> int:
    """`hyp_unmap` through the generic walker (any range)."""
    unmapped = [0]

    def visit(ctx: VisitCtx, v: int) -> int:
        g = granule_size(ctx.level)
        if not pte_valid(ctx.old):
            return -EINVAL
        if pte_table(ctx.old, ctx.level):
            pgt.free_empty_table(ctx)
            return 0
        if ctx.end - ctx.addr < g:
            return -EINVAL
        pgt.set_pte_invalidate(ctx.ptep, ctx.old, 0, ctx.addr, ctx.level)  # (valid)
        unmapped[0] += g
        return 0

    pgt.walk(addr, size, visit, KVM_PGTABLE_WALK_LEAF | KVM_PGTABLE_WALK_TABLE_POST)
    return unmapped[0]
