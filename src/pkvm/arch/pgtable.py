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
from typing import Any, Protocol

from pkvm.errors import E2BIG, EAGAIN, EINVAL, ENOMEM, ERANGE
from pkvm.machine.memory import PAGE_SHIFT, PAGE_SIZE

U64 = 0xFFFF_FFFF_FFFF_FFFF

# -- descriptor bits (arch/arm64/include/asm/kvm_pgtable.h) -------------------------------
KVM_PTE_VALID = 1 << 0
KVM_PTE_TYPE = 1 << 1  # 1: table (level < 3) or page (level 3); 0: block
KVM_PTE_ADDR_MASK = ((1 << 48) - 1) & ~(PAGE_SIZE - 1)

KVM_PTE_LEAF_ATTR_LO_S1_ATTRIDX_SHIFT = 2
KVM_PTE_LEAF_ATTR_LO_S1_AP_SHIFT = 6
KVM_PTE_LEAF_ATTR_LO_S1_AP_RW = 1
KVM_PTE_LEAF_ATTR_LO_S1_AP_RO = 3
KVM_PTE_LEAF_ATTR_LO_S1_SH_IS = 3 << 8
KVM_PTE_LEAF_ATTR_LO_S1_AF = 1 << 10
KVM_PTE_LEAF_ATTR_HI_S1_XN = 1 << 54
MT_NORMAL = 0
MT_DEVICE_NGNRE = 4

KVM_PTE_LEAF_ATTR_LO_S2_MEMATTR_SHIFT = 2
KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R = 1 << 6
KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W = 1 << 7
KVM_PTE_LEAF_ATTR_LO_S2_SH_IS = 3 << 8
KVM_PTE_LEAF_ATTR_LO_S2_AF = 1 << 10
KVM_PTE_LEAF_ATTR_HI_S2_XN_SHIFT = 53
KVM_PTE_LEAF_ATTR_HI_S2_XN = 3 << 53
KVM_PTE_LEAF_ATTR_S2_PERMS = (
    KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R | KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W | KVM_PTE_LEAF_ATTR_HI_S2_XN
)
KVM_PTE_LEAF_ATTR_HI_SW = 0xF << 55

# -- kvm_pgtable_prot (7.2 encoding) -------------------------------------------------------
KVM_PGTABLE_PROT_PX = 1 << 0
KVM_PGTABLE_PROT_UX = 1 << 1
KVM_PGTABLE_PROT_X = KVM_PGTABLE_PROT_PX | KVM_PGTABLE_PROT_UX
KVM_PGTABLE_PROT_W = 1 << 2
KVM_PGTABLE_PROT_R = 1 << 3
KVM_PGTABLE_PROT_DEVICE = 1 << 4
KVM_PGTABLE_PROT_NORMAL_NC = 1 << 5
KVM_PGTABLE_PROT_SW0 = 1 << 55
KVM_PGTABLE_PROT_SW1 = 1 << 56
KVM_PGTABLE_PROT_SW2 = 1 << 57
KVM_PGTABLE_PROT_SW3 = 1 << 58
KVM_PGTABLE_PROT_RW = KVM_PGTABLE_PROT_R | KVM_PGTABLE_PROT_W
KVM_PGTABLE_PROT_RWX = KVM_PGTABLE_PROT_RW | KVM_PGTABLE_PROT_X

PAGE_HYP = KVM_PGTABLE_PROT_RW
PAGE_HYP_EXEC = KVM_PGTABLE_PROT_R | KVM_PGTABLE_PROT_X
PAGE_HYP_RO = KVM_PGTABLE_PROT_R
PAGE_HYP_DEVICE = PAGE_HYP | KVM_PGTABLE_PROT_DEVICE

# -- walker flags ------------------------------------------------------------------------
KVM_PGTABLE_WALK_LEAF = 1 << 0
KVM_PGTABLE_WALK_TABLE_PRE = 1 << 1
KVM_PGTABLE_WALK_TABLE_POST = 1 << 2
KVM_PGTABLE_WALK_SHARED = 1 << 3
KVM_PGTABLE_WALK_IGNORE_EAGAIN = 1 << 4  # 6.12 calls this bit HANDLE_FAULT, with the opposite sense

# The model's CPU has FEAT_XNX (as QEMU's `-cpu max` that the conformance runs use): stage-2
# execute permission can differ between EL0 (UX) and EL1 (PX).
CPU_HAS_XNX = True

KVM_PGTABLE_MIN_BLOCK_LEVEL = 1
KVM_PGTABLE_LAST_LEVEL = 3
PTRS_PER_PTE = 512


def granule_shift(level: int) -> int:
    return PAGE_SHIFT + 9 * (KVM_PGTABLE_LAST_LEVEL - level)


def granule_size(level: int) -> int:
    return 1 << granule_shift(level)


def pte_valid(pte: int) -> bool:
    return bool(pte & KVM_PTE_VALID)


def pte_table(pte: int, level: int) -> bool:
    return level < KVM_PGTABLE_LAST_LEVEL and (pte & 3) == 3


def pte_to_phys(pte: int) -> int:
    return pte & KVM_PTE_ADDR_MASK


def init_table_pte(child: int) -> int:
    return (child & KVM_PTE_ADDR_MASK) | KVM_PTE_TYPE | KVM_PTE_VALID


def init_valid_leaf_pte(phys: int, attr: int, level: int) -> int:
    pte = (phys & KVM_PTE_ADDR_MASK) | attr | KVM_PTE_VALID
    if level == KVM_PGTABLE_LAST_LEVEL:
        pte |= KVM_PTE_TYPE
    return pte


# -- attribute encodings ----------------------------------------------------------------
def hyp_set_prot_attr(prot: int) -> int | None:
    """Stage-1 (EL2) leaf attributes for `prot`, or None where Linux says -EINVAL."""
    device = bool(prot & KVM_PGTABLE_PROT_DEVICE)
    attr = (MT_DEVICE_NGNRE if device else MT_NORMAL) << KVM_PTE_LEAF_ATTR_LO_S1_ATTRIDX_SHIFT
    if not prot & KVM_PGTABLE_PROT_R:
        return None
    if prot & KVM_PGTABLE_PROT_X:
        if prot & KVM_PGTABLE_PROT_W or device:
            return None
    else:
        attr |= KVM_PTE_LEAF_ATTR_HI_S1_XN
    ap = KVM_PTE_LEAF_ATTR_LO_S1_AP_RW if prot & KVM_PGTABLE_PROT_W else KVM_PTE_LEAF_ATTR_LO_S1_AP_RO
    attr |= ap << KVM_PTE_LEAF_ATTR_LO_S1_AP_SHIFT
    attr |= KVM_PTE_LEAF_ATTR_LO_S1_SH_IS | KVM_PTE_LEAF_ATTR_LO_S1_AF
    attr |= prot & KVM_PTE_LEAF_ATTR_HI_SW
    return attr


def hyp_pte_prot(pte: int) -> int:
    prot = pte & KVM_PTE_LEAF_ATTR_HI_SW
    if not pte_valid(pte):
        return prot
    if not pte & KVM_PTE_LEAF_ATTR_HI_S1_XN:
        prot |= KVM_PGTABLE_PROT_X
    ap = (pte >> KVM_PTE_LEAF_ATTR_LO_S1_AP_SHIFT) & 3
    if ap == KVM_PTE_LEAF_ATTR_LO_S1_AP_RO:
        prot |= KVM_PGTABLE_PROT_R
    elif ap == KVM_PTE_LEAF_ATTR_LO_S1_AP_RW:
        prot |= KVM_PGTABLE_PROT_RW
    return prot


def stage2_set_prot_attr(prot: int, normal_memattr: int, device_memattr: int = 0x1) -> int | None:
    """Stage-2 leaf attributes for `prot`, or None where Linux says -EINVAL."""
    device = bool(prot & KVM_PGTABLE_PROT_DEVICE)
    nc = bool(prot & KVM_PGTABLE_PROT_NORMAL_NC)
    x = prot & KVM_PGTABLE_PROT_X
    if device and nc:
        return None
    if (device or nc) and x:
        return None
    if device:
        memattr = device_memattr
    elif nc:
        memattr = 0x5
    else:
        memattr = normal_memattr
    attr = memattr << KVM_PTE_LEAF_ATTR_LO_S2_MEMATTR_SHIFT
    px, ux = bool(x & KVM_PGTABLE_PROT_PX), bool(x & KVM_PGTABLE_PROT_UX)
    if px != ux and not CPU_HAS_XNX:
        return None
    xn = {(True, True): 0b00, (False, True): 0b01, (False, False): 0b10, (True, False): 0b11}
    attr |= xn[(px, ux)] << KVM_PTE_LEAF_ATTR_HI_S2_XN_SHIFT
    if prot & KVM_PGTABLE_PROT_R:
        attr |= KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R
    if prot & KVM_PGTABLE_PROT_W:
        attr |= KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W
    attr |= KVM_PTE_LEAF_ATTR_LO_S2_SH_IS | KVM_PTE_LEAF_ATTR_LO_S2_AF
    attr |= prot & KVM_PTE_LEAF_ATTR_HI_SW
    return attr


def stage2_pte_prot(pte: int) -> int:
    prot = pte & KVM_PTE_LEAF_ATTR_HI_SW
    if not pte_valid(pte):
        return prot
    if pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R:
        prot |= KVM_PGTABLE_PROT_R
    if pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W:
        prot |= KVM_PGTABLE_PROT_W
    xn = (pte >> KVM_PTE_LEAF_ATTR_HI_S2_XN_SHIFT) & 3
    prot |= {0b00: KVM_PGTABLE_PROT_X, 0b01: KVM_PGTABLE_PROT_UX, 0b11: KVM_PGTABLE_PROT_PX}.get(xn, 0)
    return prot


def prot_name(prot: int) -> str:
    s = ("R" if prot & KVM_PGTABLE_PROT_R else "-") + ("W" if prot & KVM_PGTABLE_PROT_W else "-")
    s += "X" if prot & KVM_PGTABLE_PROT_X else "-"
    if prot & KVM_PGTABLE_PROT_DEVICE:
        s += " dev"
    return s


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
        normal_memattr: int = 0xF,
    ):
        self.mem = mem
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
    def walk(self, addr: int, size: int, cb: Visitor, flags: int, arg: Any = None) -> int:
        """`kvm_pgtable_walk`: visit entries covering [addr, addr+size) depth-first."""
        start = addr & ~(PAGE_SIZE - 1) & U64
        end = (start + size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1) & U64
        limit = 1 << self.ia_bits
        if start > limit or end > limit:
            return -ERANGE
        if not self.pgd:
            return -EINVAL
        ctx = VisitCtx(0, 0, start, start, end, 0, flags, arg, self)
        state = [start]
        ret = self._walk_table(state, end, self.pgd, self.start_level, cb, flags, ctx)
        return ret

    def _continue(self, ret: int, flags: int) -> bool:
        if ret == -EAGAIN:
            if self.eagain_stops:
                return bool(flags & KVM_PGTABLE_WALK_IGNORE_EAGAIN)
            return not flags & KVM_PGTABLE_WALK_IGNORE_EAGAIN
        return ret == 0

    def _walk_table(
        self, state: list[int], end: int, table: int, level: int, cb: Visitor, flags: int,
        ctx: VisitCtx,
    ) -> int:
        mem = self.mem
        shift = granule_shift(level)
        gsize = 1 << shift
        idx = (state[0] >> shift) & (PTRS_PER_PTE - 1)
        while idx < PTRS_PER_PTE and state[0] < end:
            ptep = table + idx * 8
            old = mem.read_u64(ptep)
            is_table = level < 3 and (old & 3) == 3
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
                old = mem.read_u64(ptep)
                is_table = level < 3 and (old & 3) == 3
            if not self._continue(ret, flags):
                return ret
            if not is_table:
                state[0] = ((state[0] & ~(gsize - 1)) + gsize) & U64
                if state[0] == 0:
                    return 0
                idx += 1
                continue
            ret = self._walk_table(state, end, old & KVM_PTE_ADDR_MASK, level + 1, cb, flags, ctx)
            if not self._continue(ret, flags):
                return ret
            if flags & KVM_PGTABLE_WALK_TABLE_POST:
                ctx.ptep, ctx.old, ctx.addr, ctx.level = ptep, old, state[0], level
                ret = cb(ctx, KVM_PGTABLE_WALK_TABLE_POST)
                if not self._continue(ret, flags):
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
        read = self.mem.read_u64
        for level in range(self.start_level, 4):
            pte = read(table + ((addr >> granule_shift(level)) & 511) * 8)
            if level == 3 or (pte & 3) != 3:
                return 0, pte, level
            table = pte & KVM_PTE_ADDR_MASK
        raise AssertionError("unreachable")

    def leaves(self, addr: int = 0, size: int | None = None, valid_only: bool = False):
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
        """Every table page of this tree, the root first."""
        if not self.pgd:
            return []
        pages = [self.pgd]

        def visit(ctx: VisitCtx, _visit: int) -> int:
            pages.append(ctx.old & KVM_PTE_ADDR_MASK)
            return 0

        self.walk(0, 1 << self.ia_bits, visit, KVM_PGTABLE_WALK_TABLE_PRE)
        return pages

    # -- entry helpers ---------------------------------------------------------------
    def _counted(self, pte: int) -> bool:
        return bool(pte & KVM_PTE_VALID) if self.stage == 1 else pte != 0

    def _set(self, ptep: int, old: int, new: int) -> None:
        """Replace an entry, keeping the table page's reference count in step."""
        mem = self.mem
        mem.write_u64(ptep, new)
        self.gen += 1
        was, now = self._counted(old), self._counted(new)
        if now and not was:
            self.mm_ops.get_page(ptep & ~(PAGE_SIZE - 1))
        elif was and not now:
            self.mm_ops.put_page(ptep & ~(PAGE_SIZE - 1))

    def _tlbi(self, addr: int, level: int) -> None:
        """Invalidate what an entry at `level` translated (a leaf's block, a table's span)."""
        if self.tlbi is not None:
            g = granule_size(level)
            self.tlbi(addr & ~(g - 1), g)

    def _new_table(self, ptep: int, old: int) -> int:
        child = self.mm_ops.zalloc_page()
        if child is None:
            return -ENOMEM
        self._set(ptep, old, init_table_pte(child))
        return 0

    def free_unlinked(self, table: int, level: int) -> None:
        """Free a detached subtree: drop every counted entry, then the table itself."""
        read = self.mem.read_u64
        for i in range(PTRS_PER_PTE):
            pte = read(table + i * 8)
            if pte_table(pte, level):
                self.free_unlinked(pte & KVM_PTE_ADDR_MASK, level + 1)
            if self._counted(pte):
                self.mm_ops.put_page(table)
        self.mm_ops.put_page(table)

    # -- the page-sized fast path ---------------------------------------------------
    def _l3_ptep(self, addr: int) -> int | None:
        """The level-3 entry for `addr`, creating zeroed tables on the way down.

        Returns None where the generic walk must decide (a block, an annotation or a leaf at a
        higher level, an address out of range, or no page for a new table): for a single page
        the generic walker would end in exactly the level-3 entry this returns otherwise."""
        if addr >> self.ia_bits or not self.pgd:
            return None
        read = self.mem.read_u64
        table = self.pgd
        for level in range(self.start_level, 3):
            ptep = table + ((addr >> (39 - 9 * level)) & 511) * 8
            pte = read(ptep)
            if pte & 3 == 3:
                table = pte & KVM_PTE_ADDR_MASK
                continue
            if pte:
                return None
            child = self.mm_ops.zalloc_page()
            if child is None:
                return None
            self._set(ptep, 0, init_table_pte(child))
            table = child
        return table + ((addr >> 12) & 511) * 8

    # -- hyp stage-1 ops --------------------------------------------------------
    def hyp_map(self, addr: int, size: int, phys: int, prot: int) -> int:
        """`kvm_pgtable_hyp_map`."""
        attr = hyp_set_prot_attr(prot)
        if attr is None:
            return -EINVAL
        base = phys & ~(PAGE_SIZE - 1)
        if size == PAGE_SIZE and not addr & (PAGE_SIZE - 1):
            ptep = self._l3_ptep(addr)
            if ptep is not None:
                old = self.mem.read_u64(ptep)
                new = init_valid_leaf_pte(base, attr, 3)
                if old == new:
                    return 0
                if pte_valid(old) and (old ^ new) & ~KVM_PTE_LEAF_ATTR_HI_SW:
                    return -EINVAL
                self._set(ptep, old, new)
                return 0

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
                self._set(ctx.ptep, ctx.old, new)
                return 0
            if level == KVM_PGTABLE_LAST_LEVEL:
                return -EINVAL
            # Like Linux, a block in the way is replaced by an empty table (taking a
            # reference for the entry even where the block already held one).
            was_valid = pte_valid(ctx.old)
            ret = self._new_table(ctx.ptep, ctx.old)
            if not ret and was_valid:
                self.mm_ops.get_page(ctx.ptep & ~(PAGE_SIZE - 1))
            return ret

        return self.walk(addr, size, visit, KVM_PGTABLE_WALK_LEAF)

    def hyp_unmap(self, addr: int, size: int) -> int:
        """`kvm_pgtable_hyp_unmap`: returns the number of bytes unmapped."""
        if size == PAGE_SIZE and not addr & (PAGE_SIZE - 1) and not addr >> self.ia_bits \
                and self.pgd:
            return self._hyp_unmap_page(addr)
        return self.hyp_unmap_walk(addr, size)

    def _hyp_unmap_page(self, addr: int) -> int:
        """`hyp_unmap` of one aligned page without the generic walker: the same descriptor
        writes in the same order (the leaf, then each table left empty, bottom up)."""
        read = self.mem.read_u64
        tables: list[tuple[int, int, int]] = []
        table = self.pgd
        for level in range(self.start_level, 4):
            ptep = table + ((addr >> (39 - 9 * level)) & 511) * 8
            old = read(ptep)
            if level < 3 and old & 3 == 3:
                tables.append((ptep, old, level))
                table = old & KVM_PTE_ADDR_MASK
                continue
            if level < 3 or not old & KVM_PTE_VALID:  # a block, or nothing: -EINVAL, stop
                return 0
            self._set(ptep, old, 0)
            self._tlbi(addr, level)
            break
        mm_ops = self.mm_ops
        for ptep, old, level in reversed(tables):  # the TABLE_POST visits
            child = old & KVM_PTE_ADDR_MASK
            if mm_ops.page_count(child) == 1:
                self._set(ptep, old, 0)
                self._tlbi(addr, level)
                mm_ops.put_page(child)
        return PAGE_SIZE

    def hyp_unmap_walk(self, addr: int, size: int) -> int:
        """`hyp_unmap` through the generic walker (any range)."""
        unmapped = [0]

        def visit(ctx: VisitCtx, v: int) -> int:
            g = granule_size(ctx.level)
            if not pte_valid(ctx.old):
                return -EINVAL
            if pte_table(ctx.old, ctx.level):
                child = ctx.old & KVM_PTE_ADDR_MASK
                if self.mm_ops.page_count(child) != 1:
                    return 0
                self._set(ctx.ptep, ctx.old, 0)
                self._tlbi(ctx.addr, ctx.level)
                self.mm_ops.put_page(child)
                return 0
            if ctx.end - ctx.addr < g:
                return -EINVAL
            self._set(ctx.ptep, ctx.old, 0)
            self._tlbi(ctx.addr, ctx.level)
            unmapped[0] += g
            return 0

        self.walk(addr, size, visit, KVM_PGTABLE_WALK_LEAF | KVM_PGTABLE_WALK_TABLE_POST)
        return unmapped[0]

    # -- stage-2 ops -------------------------------------------------------------
    def stage2_map(
        self, addr: int, size: int, phys: int | None, prot: int, annotation: int = 0,
        flags: int = 0,
    ) -> int:
        """`kvm_pgtable_stage2_map` (phys given) or an annotation (`phys` None: an invalid
        leaf `annotation`). Blocks where alignment and the force-PTE callback allow."""
        if self.touched is not None:
            self.touched.append((addr, size))
        if phys is not None:
            attr = stage2_set_prot_attr(prot, self.normal_memattr)
            if attr is None:
                return -EINVAL
            base = phys & ~(PAGE_SIZE - 1)
        else:
            attr, base = 0, 0
        if phys is None:
            force_pte = True
        else:
            force_pte = self.force_pte_cb(addr, addr + size, prot) if self.force_pte_cb else False
        if size == PAGE_SIZE and not addr & (PAGE_SIZE - 1):
            ptep = self._l3_ptep(addr)
            if ptep is not None:
                old = self.mem.read_u64(ptep)
                new = annotation if phys is None else init_valid_leaf_pte(base, attr, 3)
                if pte_valid(old) and pte_valid(new) and not (old ^ new) & ~KVM_PTE_LEAF_ATTR_S2_PERMS:
                    ret = -EAGAIN
                    return 0 if self._continue(ret, flags | KVM_PGTABLE_WALK_LEAF) else ret
                self._set(ptep, old, new)
                if pte_valid(old):
                    self._tlbi(addr, 3)
                return 0

        def leaf_allowed(ctx: VisitCtx) -> bool:
            if force_pte and ctx.level < 3:
                return False
            if phys is None:
                return True
            g = granule_size(ctx.level)
            if ctx.level < KVM_PGTABLE_MIN_BLOCK_LEVEL or g > ctx.end - ctx.addr:
                return False
            p = base + (ctx.addr - ctx.start)
            return not (p | ctx.addr) & (g - 1)

        def try_leaf(ctx: VisitCtx) -> int:
            if not leaf_allowed(ctx):
                return -E2BIG
            if phys is None:
                new = annotation
            else:
                new = init_valid_leaf_pte(base + (ctx.addr - ctx.start), attr, ctx.level)
            old = ctx.old
            if pte_valid(old) and pte_valid(new) and not (old ^ new) & ~KVM_PTE_LEAF_ATTR_S2_PERMS:
                return -EAGAIN  # the same mapping, or only its permissions: nothing to update
            self._set(ctx.ptep, old, new)
            if pte_valid(old):
                self._tlbi(ctx.addr, ctx.level)
            return 0

        def visit(ctx: VisitCtx, v: int) -> int:
            if v == KVM_PGTABLE_WALK_TABLE_PRE:
                if not leaf_allowed(ctx):
                    return 0
                child = ctx.old & KVM_PTE_ADDR_MASK
                # Detach the subtree, then install the block/annotation in its place.
                self.mem.write_u64(ctx.ptep, 0)
                self.gen += 1
                self._tlbi(ctx.addr, ctx.level)
                self.mm_ops.put_page(ctx.ptep & ~(PAGE_SIZE - 1))
                self.free_unlinked(child, ctx.level + 1)
                ctx.old = 0
                return try_leaf(ctx)
            ret = try_leaf(ctx)
            if ret != -E2BIG:
                return ret
            if ctx.level == KVM_PGTABLE_LAST_LEVEL:
                return -EINVAL
            # Break a block (its other pages fault back lazily) or an annotation into a table.
            new_table = self.mm_ops.zalloc_page()
            if new_table is None:
                return -ENOMEM
            self._set(ctx.ptep, ctx.old, init_table_pte(new_table))
            if pte_valid(ctx.old):
                self._tlbi(ctx.addr, ctx.level)
            return 0

        return self.walk(addr, size, visit, KVM_PGTABLE_WALK_LEAF | KVM_PGTABLE_WALK_TABLE_PRE | flags)

    def stage2_unmap(self, addr: int, size: int) -> int:
        """`kvm_pgtable_stage2_unmap`: clear leaves (whole blocks) and free emptied tables."""
        if self.touched is not None:
            self.touched.append((addr, size))
        if size == PAGE_SIZE and not addr & (PAGE_SIZE - 1) and self._unmap_page(addr):
            return 0

        def visit(ctx: VisitCtx, v: int) -> int:
            if not pte_valid(ctx.old):
                if ctx.old:
                    self._set(ctx.ptep, ctx.old, 0)
                return 0
            if pte_table(ctx.old, ctx.level):
                child = ctx.old & KVM_PTE_ADDR_MASK
                if self.mm_ops.page_count(child) != 1:
                    return 0
                self._set(ctx.ptep, ctx.old, 0)
                self._tlbi(ctx.addr, ctx.level)
                self.mm_ops.put_page(child)
                return 0
            self._set(ctx.ptep, ctx.old, 0)
            self._tlbi(ctx.addr, ctx.level)
            return 0

        return self.walk(addr, size, visit, KVM_PGTABLE_WALK_LEAF | KVM_PGTABLE_WALK_TABLE_POST)

    def _unmap_page(self, addr: int) -> bool:
        """The generic unmap of one page reached through tables to a level-3 entry: clear it,
        then free every table it leaves empty, bottom up. False where the walk must decide."""
        if addr >> self.ia_bits or not self.pgd:
            return False
        read = self.mem.read_u64
        path = []  # (ptep of the table entry, child table) from the top
        table = self.pgd
        for level in range(self.start_level, 3):
            ptep = table + ((addr >> (39 - 9 * level)) & 511) * 8
            pte = read(ptep)
            if pte & 3 != 3:
                return False
            table = pte & KVM_PTE_ADDR_MASK
            path.append((ptep, table))
        ptep = table + ((addr >> 12) & 511) * 8
        old = read(ptep)
        if old:
            self._set(ptep, old, 0)
            if pte_valid(old):
                self._tlbi(addr, 3)
        for depth in range(len(path) - 1, -1, -1):
            tptep, child = path[depth]
            if self.mm_ops.page_count(child) != 1:
                break
            self._set(tptep, read(tptep), 0)
            self._tlbi(addr, self.start_level + depth)
            self.mm_ops.put_page(child)
        return True

    def stage2_update_leaf(self, addr: int, size: int, set_bits: int, clr_bits: int,
                           flags: int = KVM_PGTABLE_WALK_IGNORE_EAGAIN) -> tuple[int, int]:
        """Change attribute bits of valid leaves (`stage2_update_leaf_attrs`).

        Returns (ret, OR of the old descriptors): the latter serves test_clear_young."""
        if self.touched is not None:
            self.touched.append((addr, size))
        acc = [0]

        def visit(ctx: VisitCtx, _v: int) -> int:
            if not pte_valid(ctx.old):
                return -EAGAIN
            acc[0] |= ctx.old
            new = (ctx.old & ~clr_bits) | set_bits
            if new != ctx.old:
                self.mem.write_u64(ctx.ptep, new)
                self.gen += 1
            return 0

        ret = self.walk(addr, size, visit, KVM_PGTABLE_WALK_LEAF | flags)
        return ret, acc[0]

    def destroy(self) -> None:
        """`kvm_pgtable_stage2_destroy` / `hyp_destroy`: free every table page, the root last."""
        if not self.pgd:
            return
        read = self.mem.read_u64

        def free_tree(table: int, level: int) -> None:
            for i in range(PTRS_PER_PTE):
                pte = read(table + i * 8)
                if pte_table(pte, level):
                    free_tree(pte & KVM_PTE_ADDR_MASK, level + 1)
                if self._counted(pte):
                    self.mm_ops.put_page(table)
            self.mm_ops.put_page(table)

        free_tree(self.pgd, self.start_level)
        self.pgd = 0
