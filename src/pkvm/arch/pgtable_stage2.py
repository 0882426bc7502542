"""The stage-2 operations of the page-table code (`hyp/pgtable.c`: `kvm_pgtable_stage2_map`,
`kvm_pgtable_stage2_unmap`, `stage2_update_leaf_attrs`), on a `KvmPgtable` of stage 2.

A stage-2 maps blocks where alignment and the force-PTE callback allow, and holds invalid
leaves carrying an owner annotation; every change is logged in `touched` for a consumer that
mirrors the table (the CPU emulator's view of a guest stage-2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pkvm.arch.pte import (
    KVM_PGTABLE_LAST_LEVEL,
    KVM_PGTABLE_MIN_BLOCK_LEVEL,
    KVM_PGTABLE_WALK_IGNORE_EAGAIN,
    KVM_PGTABLE_WALK_LEAF,
    KVM_PGTABLE_WALK_TABLE_POST,
    KVM_PGTABLE_WALK_TABLE_PRE,
    KVM_PTE_ADDR_MASK,
    KVM_PTE_LEAF_ATTR_S2_PERMS,
    PTE_INDEX_MASK,
    granule_shift,
    granule_size,
    init_table_pte,
    init_valid_leaf_pte,
    pte_table,
    pte_valid,
    stage2_set_prot_attr,
)
from pkvm.errors import E2BIG, EAGAIN, EINVAL, ENOMEM
from pkvm.machine.memory import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:  # for types only: the table's methods call these operations
    from pkvm.arch.pgtable import KvmPgtable, VisitCtx


def _stage2_map_page(pgt: KvmPgtable, addr: int, new: int, flags: int) -> int | None:
    """The map of one aligned page reached through tables to its level-3 entry, as the walk
    would make it; None where the walk must decide."""
    ptep = pgt.l3_ptep(addr)
    if ptep is None:
        return None
    old = pgt.read_pte(ptep)
    if pte_valid(old) and pte_valid(new) and not (old ^ new) & ~KVM_PTE_LEAF_ATTR_S2_PERMS:
        ret = -EAGAIN
        return 0 if pgt.walk_continues(ret, flags | KVM_PGTABLE_WALK_LEAF) else ret
    pgt.set_pte_invalidate(ptep, old, new, addr, KVM_PGTABLE_LAST_LEVEL)
    return 0


def kvm_pgtable_stage2_map(
    pgt: KvmPgtable, addr: int, size: int, phys: int | None, prot: int, annotation: int = 0,
    flags: int = 0,
) -> int:
    """`kvm_pgtable_stage2_map` (phys given) or an annotation (`phys` None: an invalid
    leaf `annotation`). Blocks where alignment and the force-PTE callback allow."""
    if pgt.touched is not None:
        pgt.touched.append((addr, size))
    if phys is not None:
        attr = stage2_set_prot_attr(prot, pgt.normal_memattr)
        if attr is None:
            return -EINVAL
        base = phys & ~(PAGE_SIZE - 1)
    else:
        attr, base = 0, 0
    if size == PAGE_SIZE and not addr & (PAGE_SIZE - 1):
        # One page to a level-3 entry: no block is possible, so the force-PTE answer (a pure
        # function of the range and prot) is asked only where the walk must decide.
        new = annotation if phys is None else init_valid_leaf_pte(base, attr, 3)
        ret = _stage2_map_page(pgt, addr, new, flags)
        if ret is not None:
            return ret
    if phys is None:
        ret = _stage2_annotate_pages(pgt, addr, size, annotation, flags)
        if ret is not None:
            return ret
        force_pte = True
    else:
        force_pte = pgt.force_pte_cb(addr, addr + size, prot) if pgt.force_pte_cb else False
    return _stage2_map_walk(pgt, addr, size, phys, annotation, flags, attr, base, force_pte)


def _stage2_annotate_pages(pgt: KvmPgtable, addr: int, size: int, annotation: int,
                           flags: int) -> int | None:
    """An annotation of aligned pages inside the input range of a table with a root: the walk
    of the range, a page at a time. An annotation forces level-3 entries, so the walk makes, for
    each page in order, exactly the stores a walk of that page alone would (an entry in the way
    above level 3 becomes a table that the later pages then walk through), and stops at the
    first error; no page is written before a range check fails. None: the walk must decide."""
    if (size <= PAGE_SIZE or addr & (PAGE_SIZE - 1) or size & (PAGE_SIZE - 1)
            or addr + size > 1 << pgt.ia_bits or not pgt.pgd):
        return None
    for page in range(addr, addr + size, PAGE_SIZE):
        ret = _stage2_map_page(pgt, page, annotation, flags)
        if ret is None:
            ret = _stage2_map_walk(pgt, page, PAGE_SIZE, None, annotation, flags, 0, 0, True)
        if ret:
            return ret
    return 0


class Stage2MapData:
    """`struct stage2_map_data`: what the map walker's callbacks read (the walk's `arg`; a
    plain object rather than a closure, so a walk leaves no reference cycle behind)."""

    def __init__(self, pgt: KvmPgtable, phys: int | None, annotation: int, attr: int, base: int,
                 force_pte: bool):
        self.pgt = pgt
        self.phys = phys
        self.annotation = annotation
        self.attr = attr
        self.base = base
        self.force_pte = force_pte


def stage2_leaf_mapping_allowed(ctx: VisitCtx, data: Stage2MapData) -> bool:
    if data.force_pte and ctx.level < 3:
        return False
    if data.phys is None:
        return True
    g = granule_size(ctx.level)
    if ctx.level < KVM_PGTABLE_MIN_BLOCK_LEVEL or g > ctx.end - ctx.addr:
        return False
    p = data.base + (ctx.addr - ctx.start)
    return not (p | ctx.addr) & (g - 1)


def stage2_map_walker_try_leaf(ctx: VisitCtx, data: Stage2MapData) -> int:
    if not stage2_leaf_mapping_allowed(ctx, data):
        return -E2BIG
    if data.phys is None:
        new = data.annotation
    else:
        new = init_valid_leaf_pte(data.base + (ctx.addr - ctx.start), data.attr, ctx.level)
    old = ctx.old
    if pte_valid(old) and pte_valid(new) and not (old ^ new) & ~KVM_PTE_LEAF_ATTR_S2_PERMS:
        return -EAGAIN  # the same mapping, or only its permissions: nothing to update
    data.pgt.set_pte_invalidate(ctx.ptep, old, new, ctx.addr, ctx.level)
    return 0


def stage2_map_walker(ctx: VisitCtx, v: int) -> int:
    """The map walk's visitor (`stage2_map_walker`: table-pre, then leaf)."""
    data: Stage2MapData = ctx.arg
    pgt = data.pgt
    if v == KVM_PGTABLE_WALK_TABLE_PRE:
        if not stage2_leaf_mapping_allowed(ctx, data):
            return 0
        child = ctx.old & KVM_PTE_ADDR_MASK
        # Detach the subtree, then install the block/annotation in its place.
        pgt.write_pte(ctx.ptep, 0)
        pgt.gen += 1
        pgt.note_change(ctx.addr, ctx.level)
        pgt.invalidate(ctx.addr, ctx.level)
        pgt.mm_ops.put_page(ctx.ptep & ~(PAGE_SIZE - 1))
        pgt.free_unlinked(child, ctx.level + 1)
        ctx.old = 0
        return stage2_map_walker_try_leaf(ctx, data)
    ret = stage2_map_walker_try_leaf(ctx, data)
    if ret != -E2BIG:
        return ret
    if ctx.level == KVM_PGTABLE_LAST_LEVEL:
        return -EINVAL
    # Break a block (its other pages fault back lazily) or an annotation into a table.
    new_table = pgt.mm_ops.zalloc_page()
    if new_table is None:
        return -ENOMEM
    pgt.set_pte_invalidate(ctx.ptep, ctx.old, init_table_pte(new_table), ctx.addr, ctx.level)
    return 0


def _stage2_map_walk(pgt: KvmPgtable, addr: int, size: int, phys: int | None, annotation: int,
                     flags: int, attr: int, base: int, force_pte: bool) -> int:
    """`kvm_pgtable_stage2_map` through the generic walker (a function of its own, so the
    page-sized path makes no walk data)."""
    data = Stage2MapData(pgt, phys, annotation, attr, base, force_pte)
    return pgt.walk(addr, size, stage2_map_walker,
                    KVM_PGTABLE_WALK_LEAF | KVM_PGTABLE_WALK_TABLE_PRE | flags, data)


def kvm_pgtable_stage2_unmap(pgt: KvmPgtable, addr: int, size: int) -> int:
    """`kvm_pgtable_stage2_unmap`: clear leaves (whole blocks) and free emptied tables."""
    if pgt.touched is not None:
        pgt.touched.append((addr, size))
    if size == PAGE_SIZE and not addr & (PAGE_SIZE - 1) and _stage2_unmap_page(pgt, addr):
        return 0
    return _stage2_unmap_walk(pgt, addr, size)


def _stage2_unmap_walk(pgt: KvmPgtable, addr: int, size: int) -> int:
    """`kvm_pgtable_stage2_unmap` through the generic walker (a function of its own, so the
    page-sized path makes no closure)."""

    def visit(ctx: VisitCtx, v: int) -> int:
        if not pte_valid(ctx.old):
            if ctx.old:
                pgt.set_pte(ctx.ptep, ctx.old, 0, ctx.addr, ctx.level)
            return 0
        if pte_table(ctx.old, ctx.level):
            pgt.free_empty_table(ctx)
            return 0
        pgt.set_pte_invalidate(ctx.ptep, ctx.old, 0, ctx.addr, ctx.level)
        return 0

    return pgt.walk(addr, size, visit, KVM_PGTABLE_WALK_LEAF | KVM_PGTABLE_WALK_TABLE_POST)


def _stage2_unmap_page(pgt: KvmPgtable, addr: int) -> bool:
    """The generic unmap of one page reached through tables to a level-3 entry: clear it,
    then free every table it leaves empty, bottom up. False where the walk must decide."""
    if addr >> pgt.ia_bits or not pgt.pgd:
        return False
    table = pgt.pgd
    for level in range(pgt.start_level, 3):
        pte = pgt.read_pte(table + ((addr >> granule_shift(level)) & PTE_INDEX_MASK) * 8)
        if not pte_table(pte, level):
            return False
        table = pte & KVM_PTE_ADDR_MASK
    ptep = table + ((addr >> PAGE_SHIFT) & PTE_INDEX_MASK) * 8
    old = pgt.read_pte(ptep)
    if old:
        pgt.set_pte_invalidate(ptep, old, 0, addr, KVM_PGTABLE_LAST_LEVEL)
    if pgt.mm_ops.page_count(table) != 1:  # the last-level table still holds other entries
        return True
    _free_emptied_tables(pgt, addr)
    return True


def _free_emptied_tables(pgt: KvmPgtable, addr: int) -> None:
    """The unmap's table walk back up from the page at `addr`: unlink and free each table
    left with only its own reference, bottom up, stopping at the first one still in use."""
    path = []  # (ptep of the table entry, child table) from the top
    table = pgt.pgd
    for level in range(pgt.start_level, 3):
        ptep = table + ((addr >> granule_shift(level)) & PTE_INDEX_MASK) * 8
        table = pgt.read_pte(ptep) & KVM_PTE_ADDR_MASK
        path.append((ptep, table))
    for depth in range(len(path) - 1, -1, -1):
        tptep, child = path[depth]
        if pgt.mm_ops.page_count(child) != 1:
            break
        pgt.set_pte_invalidate(tptep, pgt.read_pte(tptep), 0, addr, pgt.start_level + depth)
        pgt.mm_ops.put_page(child)


def stage2_update_leaf_attrs(pgt: KvmPgtable, addr: int, size: int, set_bits: int, clr_bits: int,
                       flags: int = KVM_PGTABLE_WALK_IGNORE_EAGAIN) -> tuple[int, int]:
    """Change attribute bits of valid leaves (`stage2_update_leaf_attrs`).

    Returns (ret, OR of the old descriptors): the latter serves test_clear_young."""
    if pgt.touched is not None:
        pgt.touched.append((addr, size))
    acc = [0]

    def visit(ctx: VisitCtx, _v: int) -> int:
        if not pte_valid(ctx.old):
            return -EAGAIN
        acc[0] |= ctx.old
        new = (ctx.old & ~clr_bits) | set_bits
        if new != ctx.old:
            pgt.write_pte(ctx.ptep, new)
            pgt.gen += 1
            pgt.note_change(ctx.addr, ctx.level)
        return 0

    ret = pgt.walk(addr, size, visit, KVM_PGTABLE_WALK_LEAF | flags)
    return ret, acc[0]
