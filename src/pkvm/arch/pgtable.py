"""The shared page-table code (`arch/arm64/kvm/hyp/pgtable.c`): descriptors and the walker.

Tables are real ARMv8 translation tables with a 4 KiB granule, kept as 64-bit little-endian
descriptors in pages of simulated RAM; a table pointer is a physical address. Levels 0..3 (the
model is a 48-bit, non-LPA2 machine, so both the hyp stage-1 and every stage-2 start at level 0
with one root page). Blocks are allowed at levels 1 and 2.

Table pages are reference-counted in the hyp vmemmap exactly as in Linux: a table page holds one
reference for itself plus one per *counted* entry (stage-1: valid entries; stage-2: non-zero
entries, so owner annotations count too). The put that drops a table page to zero frees it to
its pool.

`kvm_pgtable_prot` is kept in the 7.2 encoding throughout the model (PX=0, UX=1, W=2, R=3,
DEVICE=4, NORMAL_NC=5; SW0..3 = bits 55..58); only 7.2 exposes a prot value to the host
(`__pkvm_host_share_guest`), so the 6.12 encoding never crosses the ABI.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from pkvm.arch.pgtable_hyp import hyp_unmap_walk, kvm_pgtable_hyp_map, kvm_pgtable_hyp_unmap
from pkvm.arch.pgtable_stage2 import (
    kvm_pgtable_stage2_map,
    kvm_pgtable_stage2_unmap,
    stage2_update_leaf_attrs,
)
from pkvm.arch.pte import (  # every descriptor name, as `kvm_pgtable.h` gives them
    CPU_HAS_XNX,
    KVM_PGTABLE_LAST_LEVEL,
    KVM_PGTABLE_MIN_BLOCK_LEVEL,
    KVM_PGTABLE_PROT_DEVICE,
    KVM_PGTABLE_PROT_NORMAL_NC,
    KVM_PGTABLE_PROT_PX,
    KVM_PGTABLE_PROT_R,
    KVM_PGTABLE_PROT_RW,
    KVM_PGTABLE_PROT_RWX,
    KVM_PGTABLE_PROT_SW0,
    KVM_PGTABLE_PROT_SW1,
    KVM_PGTABLE_PROT_SW2,
    KVM_PGTABLE_PROT_SW3,
    KVM_PGTABLE_PROT_UX,
    KVM_PGTABLE_PROT_W,
    KVM_PGTABLE_PROT_X,
    KVM_PGTABLE_WALK_IGNORE_EAGAIN,
    KVM_PGTABLE_WALK_LEAF,
    KVM_PGTABLE_WALK_SHARED,
    KVM_PGTABLE_WALK_TABLE_POST,
    KVM_PGTABLE_WALK_TABLE_PRE,
    KVM_PTE_ADDR_MASK,
    KVM_PTE_LEAF_ATTR_HI_S1_XN,
    KVM_PTE_LEAF_ATTR_HI_S2_XN,
    KVM_PTE_LEAF_ATTR_HI_S2_XN_SHIFT,
    KVM_PTE_LEAF_ATTR_HI_SW,
    KVM_PTE_LEAF_ATTR_LO_S1_AF,
    KVM_PTE_LEAF_ATTR_LO_S1_AP_RO,
    KVM_PTE_LEAF_ATTR_LO_S1_AP_RW,
    KVM_PTE_LEAF_ATTR_LO_S1_AP_SHIFT,
    KVM_PTE_LEAF_ATTR_LO_S1_ATTRIDX_SHIFT,
    KVM_PTE_LEAF_ATTR_LO_S1_SH_IS,
    KVM_PTE_LEAF_ATTR_LO_S2_AF,
    KVM_PTE_LEAF_ATTR_LO_S2_MEMATTR_SHIFT,
    KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R,
    KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W,
    KVM_PTE_LEAF_ATTR_LO_S2_SH_IS,
    KVM_PTE_LEAF_ATTR_S2_PERMS,
    KVM_PTE_TABLE_BITS,
    KVM_PTE_TYPE,
    KVM_PTE_VALID,
    MT_DEVICE_NGNRE,
    MT_NORMAL,
    MT_S2_NORMAL,
    MT_S2_NORMAL_NC,
    PAGE_HYP,
    PAGE_HYP_DEVICE,
    PAGE_HYP_EXEC,
    PAGE_HYP_RO,
    PTE_INDEX_MASK,
    PTRS_PER_PTE,
    U64,
    MT_S2_DEVICE_nGnRE,
    granule_shift,
    granule_size,
    hyp_pte_prot,
    hyp_set_prot_attr,
    init_table_pte,
    init_valid_leaf_pte,
    pte_table,
    pte_to_phys,
    pte_valid,
    stage2_pte_prot,
    stage2_set_prot_attr,
)
from pkvm.errors import EAGAIN, EINVAL, ENOMEM, ERANGE
from pkvm.machine.memory import PAGE_SHIFT, PAGE_SIZE, PhysMemory

_SHORT_MAX: Final = 0x3FFF_FFFF_FFFF_FFFF  # (compiled, the largest int kept unboxed)

__all__ = [
    "CPU_HAS_XNX",
    "KVM_PGTABLE_LAST_LEVEL",
    "KVM_PGTABLE_MIN_BLOCK_LEVEL",
    "KVM_PGTABLE_PROT_DEVICE",
    "KVM_PGTABLE_PROT_NORMAL_NC",
    "KVM_PGTABLE_PROT_PX",
    "KVM_PGTABLE_PROT_R",
    "KVM_PGTABLE_PROT_RW",
    "KVM_PGTABLE_PROT_RWX",
    "KVM_PGTABLE_PROT_SW0",
    "KVM_PGTABLE_PROT_SW1",
    "KVM_PGTABLE_PROT_SW2",
    "KVM_PGTABLE_PROT_SW3",
    "KVM_PGTABLE_PROT_UX",
    "KVM_PGTABLE_PROT_W",
    "KVM_PGTABLE_PROT_X",
    "KVM_PGTABLE_WALK_IGNORE_EAGAIN",
    "KVM_PGTABLE_WALK_LEAF",
    "KVM_PGTABLE_WALK_SHARED",
    "KVM_PGTABLE_WALK_TABLE_POST",
    "KVM_PGTABLE_WALK_TABLE_PRE",
    "KVM_PTE_ADDR_MASK",
    "KVM_PTE_LEAF_ATTR_HI_S1_XN",
    "KVM_PTE_LEAF_ATTR_HI_S2_XN",
    "KVM_PTE_LEAF_ATTR_HI_S2_XN_SHIFT",
    "KVM_PTE_LEAF_ATTR_HI_SW",
    "KVM_PTE_LEAF_ATTR_LO_S1_AF",
    "KVM_PTE_LEAF_ATTR_LO_S1_AP_RO",
    "KVM_PTE_LEAF_ATTR_LO_S1_AP_RW",
    "KVM_PTE_LEAF_ATTR_LO_S1_AP_SHIFT",
    "KVM_PTE_LEAF_ATTR_LO_S1_ATTRIDX_SHIFT",
    "KVM_PTE_LEAF_ATTR_LO_S1_SH_IS",
    "KVM_PTE_LEAF_ATTR_LO_S2_AF",
    "KVM_PTE_LEAF_ATTR_LO_S2_MEMATTR_SHIFT",
    "KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R",
    "KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W",
    "KVM_PTE_LEAF_ATTR_LO_S2_SH_IS",
    "KVM_PTE_LEAF_ATTR_S2_PERMS",
    "KVM_PTE_TABLE_BITS",
    "KVM_PTE_TYPE",
    "KVM_PTE_VALID",
    "KvmPgtable",
    "MT_DEVICE_NGNRE",
    "MT_NORMAL",
    "MT_S2_DEVICE_nGnRE",
    "MT_S2_NORMAL",
    "MT_S2_NORMAL_NC",
    "MmOps",
    "PAGE_HYP",
    "PAGE_HYP_DEVICE",
    "PAGE_HYP_EXEC",
    "PAGE_HYP_RO",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "PTE_INDEX_MASK",
    "PTRS_PER_PTE",
    "TableMemory",
    "U64",
    "VisitCtx",
    "Visitor",
    "granule_shift",
    "granule_size",
    "hyp_pte_prot",
    "hyp_set_prot_attr",
    "init_table_pte",
    "init_valid_leaf_pte",
    "pte_table",
    "pte_to_phys",
    "pte_valid",
    "stage2_pte_prot",
    "stage2_set_prot_attr",
]

# -- memory operations a table is built from ------------------------------------------
class TableMemory(Protocol):
    """Where a table's descriptors live: RAM itself (`PhysMemory`) for the hyp, RAM as the
    host kernel reaches it (through its stage-2) for the host's own tables."""

    def read_u64(self, pa: int) -> int: ...
    def write_u64(self, pa: int, value: int) -> None: ...


class MmOps(Protocol):
    def zalloc_page(self) -> int | None: ...
    def get_page(self, pa: int) -> None: ...
    def put_page(self, pa: int) -> None: ...
    def page_count(self, pa: int) -> int: ...


@dataclass
class VisitCtx:
    """What a visitor sees (`struct kvm_pgtable_visit_ctx`)."""

    ptep: int
    old: int
    addr: int
    start: int
    end: int
    level: int
    flags: int
    arg: Any  # opaque to the walker (mypyc: Any, not object, in a compiled dataclass)
    pgt: "KvmPgtable"


Visitor = Callable[[VisitCtx, int], int]


class KvmPgtable:
    """`struct kvm_pgtable`: a root, its geometry and the operations that feed it pages.

    `stage` is 1 (EL2 stage-1) or 2. `eagain_stops` picks the profile's walk semantics for a
    visitor's -EAGAIN (7.2 stops unless IGNORE_EAGAIN; 6.12 swallows it).
    """

    def __init__(
        self,
        mem: TableMemory,
        mm_ops: MmOps,
        stage: int,
        name: str,
        ia_bits: int = 48,
        start_level: int = 0,
        eagain_stops: bool = True,
        force_pte_cb: Callable[[int, int, int], bool] | None = None,
        normal_memattr: int = MT_S2_NORMAL,
    ):
        self.mem = mem
        # The same object when the table lives in RAM itself (every hyp-owned table): typed as
        # the compiled class, its accesses are direct calls rather than method lookups.
        self.ram: PhysMemory | None = mem if isinstance(mem, PhysMemory) else None
        self.mm_ops = mm_ops
        self.stage = stage
        self.name = name
        self.ia_bits = ia_bits
        self.start_level = start_level
        self.eagain_stops = eagain_stops
        self.force_pte_cb = force_pte_cb
        self.normal_memattr = normal_memattr
        self.pgd = 0
        # Ranges (addr, size) changed since the last look, for a consumer that mirrors this
        # table (the CPU emulator's view of a guest stage-2); None when nobody listens.
        self.touched: list[tuple[int, int]] | None = None
        # Bumped by every descriptor write: a TLB entry filled at an older generation is
        # walked again when hit, to tell whether it went stale.
        self.gen = 0
        # The TLB invalidation of this table's translation regime, `tlbi(start, size)`, called
        # where Linux's pgtable.c invalidates (a valid entry broken or cleared); None: no TLB.
        self.tlbi: Callable[[int, int], None] | None = None
        # Told of every store that replaces a valid descriptor, with the input range that
        # descriptor translated (`changed(start, size)`), whether or not the kernel invalidates
        # there: the cached translations under it are walked again when next used, to tell a
        # stale one (the host stage-2's TLB); None: nobody asks.
        self.changed: Callable[[int, int], None] | None = None

    def __reduce__(self) -> tuple[Any, ...]:  # as `Tlb.__reduce__` (machine/mmu.py)
        return (KvmPgtable, (self.mem, self.mm_ops, self.stage, self.name), self.__getstate__())

    # -- set-up ----------------------------------------------------------------------
    def init(self, pgd: int | None = None) -> int:
        """Install a root: the given zeroed page, or one from `mm_ops`."""
        if pgd is None:
            pgd = self.mm_ops.zalloc_page()
            if pgd is None:
                return -ENOMEM
        self.pgd = pgd
        return 0

    # -- the walker ----------------------------------------------------------------
    def read_pte(self, ptep: int) -> int:
        """The descriptor at `ptep` (a load from the table's memory)."""
        ram = self.ram
        if ram is not None:
            return ram.read_u64(ptep)
        return self.mem.read_u64(ptep)

    def write_pte(self, ptep: int, value: int) -> None:
        """A store of descriptor `value` at `ptep` (no reference count or generation: see
        `set_pte`)."""
        ram = self.ram
        if ram is not None:
            ram.write_u64(ptep, value)
        else:
            self.mem.write_u64(ptep, value)

    def walk(self, addr: int, size: int, cb: Visitor, flags: int, arg: Any = None) -> int:
        """`kvm_pgtable_walk`: visit entries covering [addr, addr+size) depth-first."""
        start = addr & ~(PAGE_SIZE - 1)
        start = start if 0 <= start <= _SHORT_MAX else start & U64  # (`& U64`: a long op)
        end = (start + size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        end = end if 0 <= end <= _SHORT_MAX else end & U64
        limit = 1 << self.ia_bits
        if start > limit or end > limit:
            return -ERANGE
        if not self.pgd:
            return -EINVAL
        ctx = VisitCtx(0, 0, start, start, end, 0, flags, arg, self)
        state = [start]
        ret = self._walk_table(state, end, self.pgd, self.start_level, cb, flags, ctx)
        return ret

    def walk_continues(self, ret: int, flags: int) -> bool:
        if ret == -EAGAIN:
            if self.eagain_stops:
                return bool(flags & KVM_PGTABLE_WALK_IGNORE_EAGAIN)
            return not flags & KVM_PGTABLE_WALK_IGNORE_EAGAIN
        return ret == 0

    def _walk_table(
        self, state: list[int], end: int, table: int, level: int, cb: Visitor, flags: int,
        ctx: VisitCtx,
    ) -> int:
        shift = granule_shift(level)
        gsize = 1 << shift
        idx = (state[0] >> shift) & (PTRS_PER_PTE - 1)
        ram = self.ram
        while idx < PTRS_PER_PTE and state[0] < end:
            ptep = table + idx * 8
            addr = state[0]  # the visit's address, as every callback of this entry sees it
            old = ram.read_u64(ptep) if ram is not None else self.mem.read_u64(ptep)  # read_pte
            is_table = pte_table(old, level)
            ret = 0
            reload = False
            if is_table and flags & KVM_PGTABLE_WALK_TABLE_PRE:
                ctx.ptep, ctx.old, ctx.addr, ctx.level = ptep, old, state[0], level
                ret = cb(ctx, KVM_PGTABLE_WALK_TABLE_PRE)
                reload = True
            if not is_table and flags & KVM_PGTABLE_WALK_LEAF:
                ctx.ptep, ctx.old, ctx.addr, ctx.level = ptep, old, state[0], level
                ret = cb(ctx, KVM_PGTABLE_WALK_LEAF)
                reload = True
            if reload:
                old = ram.read_u64(ptep) if ram is not None else self.mem.read_u64(ptep)
                is_table = pte_table(old, level)
            if not self.walk_continues(ret, flags):
                return ret
            if not is_table:
                nxt = (state[0] & ~(gsize - 1)) + gsize
                state[0] = nxt if 0 <= nxt <= _SHORT_MAX else nxt & U64
                if state[0] == 0:
                    return 0
                idx += 1
                continue
            ret = self._walk_table(state, end, old & KVM_PTE_ADDR_MASK, level + 1, cb, flags, ctx)
            if not self.walk_continues(ret, flags):
                return ret
            if flags & KVM_PGTABLE_WALK_TABLE_POST:  # (not where the children left the walk)
                ctx.ptep, ctx.old, ctx.addr, ctx.level = ptep, old, addr, level
                ret = cb(ctx, KVM_PGTABLE_WALK_TABLE_POST)
                if not self.walk_continues(ret, flags):
                    return ret
            idx += 1
        return 0

    # -- lookups -------------------------------------------------------------------
    def get_leaf(self, addr: int) -> tuple[int, int, int]:
        """`kvm_pgtable_get_leaf`: (ret, pte, level) of the leaf covering `addr`."""
        if addr >= 1 << self.ia_bits:
            return -ERANGE, 0, 0
        if not self.pgd:
            return -EINVAL, 0, 0
        table = self.pgd
        ram = self.ram
        for level in range(self.start_level, 4):
            ptep = table + ((addr >> granule_shift(level)) & PTE_INDEX_MASK) * 8
            pte = ram.read_u64(ptep) if ram is not None else self.mem.read_u64(ptep)  # read_pte
            if not pte_table(pte, level):
                return 0, pte, level
            table = pte & KVM_PTE_ADDR_MASK
        raise AssertionError("unreachable")

    def leaves(
        self, addr: int = 0, size: int | None = None, valid_only: bool = False
    ) -> list[tuple[int, int, int]]:
        """Yield (addr, level, pte) for every non-zero leaf in range, ascending."""
        if size is None:
            size = (1 << self.ia_bits) - addr
        out: list[tuple[int, int, int]] = []

        def visit(ctx: VisitCtx, _visit: int) -> int:
            if ctx.old and (pte_valid(ctx.old) or not valid_only):
                out.append((ctx.addr & ~(granule_size(ctx.level) - 1), ctx.level, ctx.old))
            return 0

        self.walk(addr, size, visit, KVM_PGTABLE_WALK_LEAF)
        return out

    def table_pages(self) -> list[int]:
        """Every table page of this tree, the root first, in the order a table-visiting walk
        meets them (`table_pages_walk`, which tests/test_checker_fast.py compares): read a table
        page at a time while the tree lies in RAM."""
        if not self.pgd:
            return []
        ram = self.ram
        if ram is not None:
            pages = [self.pgd]
            if self._tables_under(ram.u64, ram.base, self.pgd, self.start_level, 0,
                                  1 << self.ia_bits, pages):
                return pages
        return self.table_pages_walk()

    def _tables_under(self, u64: Any, base: int, table: int, level: int, addr: int, end: int,
                      pages: list[int]) -> bool:
        """Append the table pages under `table` (at `level`, translating from `addr`) as the
        walk visits them: the entries below `end`, depth first. False if a table page lies
        outside RAM (the caller walks instead)."""
        off = (table - base) >> 3
        if table & 7 or not 0 <= off <= len(u64) - PTRS_PER_PTE:
            return False
        if level >= KVM_PGTABLE_LAST_LEVEL:
            return True
        shift = granule_shift(level)
        n = min(PTRS_PER_PTE, (end - addr + (1 << shift) - 1) >> shift)
        words = u64[off:off + n].tolist()
        for idx in range(n):
            pte = words[idx]
            if pte & KVM_PTE_TABLE_BITS == KVM_PTE_TABLE_BITS:
                child = pte & KVM_PTE_ADDR_MASK
                pages.append(child)
                if not self._tables_under(u64, base, child, level + 1, addr + (idx << shift),
                                          end, pages):
                    return False
        return True

    def table_pages_walk(self) -> list[int]:
        """`table_pages` by the walker (the generic reading)."""
        if not self.pgd:
            return []
        pages = [self.pgd]

        def visit(ctx: VisitCtx, _visit: int) -> int:
            pages.append(ctx.old & KVM_PTE_ADDR_MASK)
            return 0

        self.walk(0, 1 << self.ia_bits, visit, KVM_PGTABLE_WALK_TABLE_PRE)
        return pages

    # -- entry helpers ---------------------------------------------------------------
    def counted(self, pte: int) -> bool:
        return bool(pte & KVM_PTE_VALID) if self.stage == 1 else pte != 0

    def set_pte(self, ptep: int, old: int, new: int, addr: int = -1, level: int = 0,
                mark: bool = True) -> None:
        """Replace an entry, keeping the table page's reference count in step. `addr` and
        `level` place the entry (any address it translates; -1: unknown, then a valid `old`
        counts as covering the whole input range). `mark` False: `changed` is not told (only
        `set_pte_invalidate`, whose TLBI follows)."""
        self.write_pte(ptep, new)
        self.gen += 1
        if mark and old & KVM_PTE_VALID and self.changed is not None:
            self.note_change(addr, level)
        if self.stage == 1:  # `counted` of both, written out (one test per store)
            was, now = old & KVM_PTE_VALID, new & KVM_PTE_VALID
        else:
            was, now = old, new
        if now and not was:
            self.mm_ops.get_page(ptep & ~(PAGE_SIZE - 1))
        elif was and not now:
            self.mm_ops.put_page(ptep & ~(PAGE_SIZE - 1))

    def set_pte_invalidate(self, ptep: int, old: int, new: int, addr: int, level: int) -> None:
        """`set_pte`, then `invalidate` of what a valid `old` translated (the TLBI the kernel
        issues after replacing a valid entry). Where there is a TLBI, the store tells `changed`
        nothing first: the TLBI drops every entry of the range the mark would have marked, and
        no access runs between the two (a host stage-2 block broken into a table marked its
        512 pages' entries, each a new tuple, and then dropped them)."""
        valid = bool(old & KVM_PTE_VALID)
        self.set_pte(ptep, old, new, addr, level, not (valid and self.tlbi is not None))
        if valid:
            self.invalidate(addr, level)

    def note_change(self, addr: int, level: int) -> None:
        """A valid entry at `level` translating `addr` was replaced: tell `changed` the input
        range it covered (the whole range where `addr` is -1)."""
        changed = self.changed
        if changed is not None:
            if addr < 0:
                changed(0, 1 << self.ia_bits)
            else:
                g = granule_size(level)
                changed(addr & ~(g - 1), g)

    def invalidate(self, addr: int, level: int) -> None:
        """Invalidate what an entry at `level` translated (a leaf's block, a table's span)."""
        if self.tlbi is not None:
            g = granule_size(level)
            self.tlbi(addr & ~(g - 1), g)

    def new_table(self, ptep: int, old: int, addr: int = -1, level: int = 0) -> int:
        child = self.mm_ops.zalloc_page()
        if child is None:
            return -ENOMEM
        self.set_pte(ptep, old, init_table_pte(child), addr, level)
        return 0

    def free_empty_table(self, ctx: VisitCtx) -> None:
        """An unmap's TABLE_POST visit: unlink and free the child table when its only
        reference left is its own (every entry below it gone)."""
        child = ctx.old & KVM_PTE_ADDR_MASK
        if self.mm_ops.page_count(child) != 1:
            return
        self.set_pte_invalidate(ctx.ptep, ctx.old, 0, ctx.addr, ctx.level)
        self.mm_ops.put_page(child)

    def free_unlinked(self, table: int, level: int) -> None:
        """Free a detached subtree: drop every counted entry, then the table itself."""
        for pte in self._entries(table):
            if not pte:
                continue  # neither a table nor counted
            if pte_table(pte, level):
                self.free_unlinked(pte & KVM_PTE_ADDR_MASK, level + 1)
            if self.counted(pte):
                self.mm_ops.put_page(table)
        self.mm_ops.put_page(table)

    # -- the page-sized fast path ---------------------------------------------------
    def l3_ptep(self, addr: int) -> int | None:
        """The level-3 entry for `addr`, creating zeroed tables on the way down.

        Returns None where the generic walk must decide (a block, an annotation or a leaf at a
        higher level, an address out of range, or no page for a new table): for a single page
        the generic walker would end in exactly the level-3 entry this returns otherwise."""
        if addr >> self.ia_bits or not self.pgd:
            return None
        table = self.pgd
        ram = self.ram
        for level in range(self.start_level, 3):
            ptep = table + ((addr >> granule_shift(level)) & PTE_INDEX_MASK) * 8
            pte = ram.read_u64(ptep) if ram is not None else self.mem.read_u64(ptep)  # read_pte
            if pte_table(pte, level):
                table = pte & KVM_PTE_ADDR_MASK
                continue
            if pte:
                return None
            child = self.mm_ops.zalloc_page()
            if child is None:
                return None
            self.set_pte(ptep, 0, init_table_pte(child))
            table = child
        return table + ((addr >> PAGE_SHIFT) & PTE_INDEX_MASK) * 8

    def _entries(self, table: int) -> list[int]:
        """The entries of a table page, in one read where the memory offers it (the host's
        memory: one translation for the page)."""
        ram = self.ram
        if ram is not None:
            return ram.read_table(table)
        read_table = getattr(self.mem, "read_table", None)
        if read_table is not None:
            entries: list[int] = read_table(table)
            return entries
        return [self.read_pte(table + i * 8) for i in range(PTRS_PER_PTE)]

    def destroy(self) -> None:
        """`kvm_pgtable_stage2_destroy` / `hyp_destroy`: free every table page, the root last."""
        if not self.pgd:
            return
        self.free_unlinked(self.pgd, self.start_level)
        self.pgd = 0

    # -- the operations (`pgtable_hyp`, `pgtable_stage2`) ---------------------------------
    def hyp_map(self, addr: int, size: int, phys: int, prot: int) -> int:
        """`kvm_pgtable_hyp_map`."""
        return kvm_pgtable_hyp_map(self, addr, size, phys, prot)

    def hyp_unmap(self, addr: int, size: int) -> int:
        """`kvm_pgtable_hyp_unmap`: returns the number of bytes unmapped."""
        return kvm_pgtable_hyp_unmap(self, addr, size)

    def hyp_unmap_walk(self, addr: int, size: int) -> int:
        """`hyp_unmap` through the generic walker (any range)."""
        return hyp_unmap_walk(self, addr, size)

    def stage2_map(
        self, addr: int, size: int, phys: int | None, prot: int, annotation: int = 0,
        flags: int = 0,
    ) -> int:
        """`kvm_pgtable_stage2_map` (phys given) or an annotation (`phys` None)."""
        return kvm_pgtable_stage2_map(self, addr, size, phys, prot, annotation, flags)

    def stage2_unmap(self, addr: int, size: int) -> int:
        """`kvm_pgtable_stage2_unmap`: clear leaves (whole blocks) and free emptied tables."""
        return kvm_pgtable_stage2_unmap(self, addr, size)

    def stage2_update_leaf(self, addr: int, size: int, set_bits: int, clr_bits: int,
                           flags: int = KVM_PGTABLE_WALK_IGNORE_EAGAIN) -> tuple[int, int]:
        """`stage2_update_leaf_attrs`: (ret, OR of the old descriptors)."""
        return stage2_update_leaf_attrs(self, addr, size, set_bits, clr_bits, flags)
