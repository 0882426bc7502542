"""Descriptors, prot encodings, the walker and map/unmap (memory.md §2, pgtable.c)."""

import pytest

from pkvm.hyp import pgtable as pt
from pkvm.hyp.memory import HypVmemmap
from pkvm.hyp.page_alloc import HypPool
from pkvm.hyp.spinlock import HypLocks
from pkvm.machine.memory import PhysMemory

EINVAL, ERANGE, EAGAIN = 22, 34, 11
PAGE = 4096
R, W, X = pt.KVM_PGTABLE_PROT_R, pt.KVM_PGTABLE_PROT_W, pt.KVM_PGTABLE_PROT_X
PX, UX = pt.KVM_PGTABLE_PROT_PX, pt.KVM_PGTABLE_PROT_UX
DEV, NC = pt.KVM_PGTABLE_PROT_DEVICE, pt.KVM_PGTABLE_PROT_NORMAL_NC
SW0, SW1, SW2, SW3 = (1 << 55), (1 << 56), (1 << 57), (1 << 58)
POOL_BASE = 0x4000_0000 + (8 << 20)
POOL_PAGES = 256


class Env:
    def __init__(self, stage=2, eagain_stops=True, force_pte_cb=None):
        self.mem = PhysMemory(64 << 20)
        self.vmm = HypVmemmap.over(self.mem, 0xFF)
        self.pool = HypPool("pt", self.mem, self.vmm, HypLocks(1), False)
        self.pool.init(POOL_BASE >> 12, POOL_PAGES, 0)
        self.pgt = pt.KvmPgtable(self.mem, self.pool, stage=stage, name="t",
                                 eagain_stops=eagain_stops, force_pte_cb=force_pte_cb)
        assert self.pgt.init() == 0

    def rc(self, pa):
        return self.vmm.refcount[self.vmm.idx(pa)]


@pytest.fixture
def s2():
    return Env(stage=2)


@pytest.fixture
def s1():
    return Env(stage=1)


# -- encodings ------------------------------------------------------------------------------
class TestEncodings:
    def test_prot_bits(self):
        assert (PX, UX, W, R, DEV, NC) == (1, 2, 4, 8, 16, 32)
        assert pt.KVM_PGTABLE_PROT_RWX == 0xF
        assert pt.PAGE_HYP == R | W and pt.PAGE_HYP_EXEC == R | X and pt.PAGE_HYP_RO == R
        assert pt.PAGE_HYP_DEVICE == R | W | DEV

    def test_descriptor_helpers(self):
        assert pt.init_table_pte(0x1234_5000) == 0x1234_5003
        assert pt.init_valid_leaf_pte(0x4000_0000, 0, 3) == 0x4000_0003
        assert pt.init_valid_leaf_pte(0x4000_0000, 0, 2) == 0x4000_0001  # block: type 0
        assert pt.pte_table(3, 2) and not pt.pte_table(3, 3) and not pt.pte_table(1, 1)
        assert pt.pte_to_phys(0xFFFF_FFFF_FFFF_FFFF) == 0xFFFF_FFFF_F000
        assert [pt.granule_size(lv) for lv in range(4)] == [1 << 39, 1 << 30, 1 << 21, 1 << 12]

    @pytest.mark.parametrize("prot, attr", [
        (pt.PAGE_HYP, (1 << 6) | (3 << 8) | (1 << 10) | (1 << 54)),
        (pt.PAGE_HYP_RO, (3 << 6) | (3 << 8) | (1 << 10) | (1 << 54)),
        (pt.PAGE_HYP_EXEC, (3 << 6) | (3 << 8) | (1 << 10)),
        (pt.PAGE_HYP_DEVICE, (4 << 2) | (1 << 6) | (3 << 8) | (1 << 10) | (1 << 54)),
        (pt.PAGE_HYP | NC, (1 << 6) | (3 << 8) | (1 << 10) | (1 << 54)),  # NC ignored at EL2
        (pt.PAGE_HYP | SW0 | SW3, (1 << 6) | (3 << 8) | (1 << 10) | (1 << 54) | SW0 | SW3),
    ])
    def test_hyp_stage1_attrs(self, prot, attr):
        assert pt.hyp_set_prot_attr(prot) == attr
        leaf = pt.init_valid_leaf_pte(0x4000_0000, attr, 3)
        want = prot & ~(DEV | NC)
        assert pt.hyp_pte_prot(leaf) == want

    @pytest.mark.parametrize("prot", [W, X, W | X, R | W | X, R | X | DEV, 0])
    def test_hyp_stage1_invalid(self, prot):
        assert pt.hyp_set_prot_attr(prot) is None

    def test_hyp_decode_invalid_pte_keeps_sw_only(self):
        assert pt.hyp_pte_prot(SW1 | 0x700) == SW1

    @pytest.mark.parametrize("prot, attr", [
        (R | W | X, (0xF << 2) | (1 << 6) | (1 << 7) | (3 << 8) | (1 << 10)),
        (R | W, (0xF << 2) | (1 << 6) | (1 << 7) | (3 << 8) | (1 << 10) | (1 << 54)),
        (R, (0xF << 2) | (1 << 6) | (3 << 8) | (1 << 10) | (1 << 54)),
        (R | W | DEV, (0x1 << 2) | (1 << 6) | (1 << 7) | (3 << 8) | (1 << 10) | (1 << 54)),
        (R | W | NC, (0x5 << 2) | (1 << 6) | (1 << 7) | (3 << 8) | (1 << 10) | (1 << 54)),
        (R | W | X | SW0 | SW1, (0xF << 2) | 0xC0 | (3 << 8) | (1 << 10) | SW0 | SW1),
        (0, (0xF << 2) | (3 << 8) | (1 << 10) | (1 << 54)),
    ])
    def test_stage2_attrs(self, prot, attr):
        assert pt.stage2_set_prot_attr(prot, 0xF) == attr
        leaf = pt.init_valid_leaf_pte(0x4000_0000, attr, 3)
        assert pt.stage2_pte_prot(leaf) == prot & ~(DEV | NC)

    def test_stage2_guest_memattr(self):
        assert (pt.stage2_set_prot_attr(R | W, 0x6) >> 2) & 0xF == 6

    @pytest.mark.parametrize("prot", [DEV | NC, R | DEV | X, R | NC | X, R | DEV | PX])
    def test_stage2_invalid(self, prot):
        assert pt.stage2_set_prot_attr(prot, 0xF) is None

    @pytest.mark.parametrize("prot, xn", [(R | UX, 0b01), (R | PX, 0b11)])
    def test_stage2_xnx(self, prot, xn):
        """The model's CPU has FEAT_XNX (like QEMU's -cpu max): EL0/EL1 execute differ."""
        attr = pt.stage2_set_prot_attr(prot, 0xF)
        assert (attr >> 53) & 3 == xn
        assert pt.stage2_pte_prot(pt.init_valid_leaf_pte(0x4000_0000, attr, 3)) == prot

    def test_stage2_decode_xn_field(self):
        base = pt.KVM_PTE_VALID | 0x40
        assert pt.stage2_pte_prot(base | (0b00 << 53)) == R | X
        assert pt.stage2_pte_prot(base | (0b01 << 53)) == R | UX
        assert pt.stage2_pte_prot(base | (0b10 << 53)) == R
        assert pt.stage2_pte_prot(base | (0b11 << 53)) == R | PX
        assert pt.stage2_pte_prot(SW2 | 0xC0) == SW2  # invalid: SW bits only


# -- the walker -----------------------------------------------------------------------------
class TestWalker:
    def test_erange(self, s2):
        noop = lambda ctx, v: 0  # noqa: E731
        lim = 1 << 48
        assert s2.pgt.walk(lim, PAGE, noop, pt.KVM_PGTABLE_WALK_LEAF) == -ERANGE
        assert s2.pgt.walk(lim - PAGE, 2 * PAGE, noop, pt.KVM_PGTABLE_WALK_LEAF) == -ERANGE
        assert s2.pgt.walk(lim - PAGE, PAGE, noop, pt.KVM_PGTABLE_WALK_LEAF) == 0
        assert s2.pgt.walk((1 << 64) - PAGE, PAGE, noop, pt.KVM_PGTABLE_WALK_LEAF) == -ERANGE
        assert s2.pgt.get_leaf(lim)[0] == -ERANGE

    def test_end_wraps(self, s2):
        seen = []
        # start + size = 2^64: end wraps to 0, below the limit: nothing visited, 0
        ret = s2.pgt.walk(PAGE, (1 << 64) - PAGE, lambda c, v: seen.append(c.addr) or 0,
                          pt.KVM_PGTABLE_WALK_LEAF)
        assert (ret, seen) == (0, [])

    def test_no_root(self):
        env = Env()
        env.pgt.pgd = 0
        assert env.pgt.walk(0, PAGE, lambda c, v: 0, pt.KVM_PGTABLE_WALK_LEAF) == -EINVAL
        assert env.pgt.get_leaf(0)[0] == -EINVAL

    def test_empty_table_leaf_visits(self, s2):
        seen = []
        s2.pgt.walk(0, 3 << 39, lambda c, v: seen.append((c.addr, c.level)) or 0,
                    pt.KVM_PGTABLE_WALK_LEAF)
        assert seen == [(0, 0), (1 << 39, 0), (2 << 39, 0)]  # invalid entries are leaves

    def test_unaligned_range_widened(self, s2):
        seen = []
        s2.pgt.walk(5, 1, lambda c, v: seen.append((c.start, c.end)) or 0,
                    pt.KVM_PGTABLE_WALK_LEAF)
        assert seen == [(0, PAGE)]

    def test_order_and_flags(self, s2):
        assert s2.pgt.stage2_map(0x4000_0000, PAGE, 0x4000_0000, R | W) == 0
        assert s2.pgt.stage2_map(0x4000_2000, PAGE, 0x4000_2000, R | W) == 0
        ev = []

        def cb(ctx, v):
            ev.append((v, ctx.level, ctx.addr))
            return 0

        flags = pt.KVM_PGTABLE_WALK_LEAF | pt.KVM_PGTABLE_WALK_TABLE_PRE | pt.KVM_PGTABLE_WALK_TABLE_POST
        s2.pgt.walk(0x4000_0000, 3 * PAGE, cb, flags)
        kinds = [e[0] for e in ev]
        assert kinds[:3] == [pt.KVM_PGTABLE_WALK_TABLE_PRE] * 3
        leaves = [e for e in ev if e[0] == pt.KVM_PGTABLE_WALK_LEAF]
        assert [e[2] for e in leaves] == [0x4000_0000, 0x4000_1000, 0x4000_2000]
        assert all(e[1] == 3 for e in leaves)
        assert kinds[-3:] == [pt.KVM_PGTABLE_WALK_TABLE_POST] * 3

    def test_visitor_error_stops(self, s2):
        seen = []

        def cb(ctx, v):
            seen.append(ctx.addr)
            return -7 if len(seen) == 2 else 0

        assert s2.pgt.walk(0, 4 << 39, cb, pt.KVM_PGTABLE_WALK_LEAF) == -7
        assert len(seen) == 2

    @pytest.mark.parametrize("stops, flag, ret, visits", [
        (True, 0, -EAGAIN, 1),  # 7.2: -EAGAIN stops the walk
        (True, pt.KVM_PGTABLE_WALK_IGNORE_EAGAIN, 0, 3),  # unless IGNORE_EAGAIN
        (False, 0, 0, 3),  # 6.12: swallowed
        (False, pt.KVM_PGTABLE_WALK_IGNORE_EAGAIN, -EAGAIN, 1),  # unless HANDLE_FAULT (bit 4)
    ])
    def test_eagain(self, stops, flag, ret, visits):
        env = Env(eagain_stops=stops)
        seen = []

        def cb(ctx, v):
            seen.append(ctx.addr)
            return -EAGAIN

        assert env.pgt.walk(0, 3 << 39, cb, pt.KVM_PGTABLE_WALK_LEAF | flag) == ret
        assert len(seen) == visits


# -- map / unmap ----------------------------------------------------------------------------
class TestStage2Map:
    def test_page_map_refcounts(self, s2):
        free0 = s2.pool.free_pages()
        assert s2.pgt.stage2_map(0x4000_3000, PAGE, 0x5000_3000, R | W | X) == 0
        ret, pte, level = s2.pgt.get_leaf(0x4000_3000)
        assert (ret, level) == (0, 3) and pt.pte_to_phys(pte) == 0x5000_3000
        tables = s2.pgt.table_pages()
        assert len(tables) == 4 and free0 - s2.pool.free_pages() == 3
        assert [s2.rc(t) for t in tables] == [2, 2, 2, 2]
        assert s2.pgt.stage2_map(0x4000_4000, PAGE, 0x5000_4000, R) == 0
        assert s2.rc(tables[-1]) == 3
        assert s2.pgt.stage2_unmap(0x4000_3000, PAGE) == 0
        assert s2.rc(tables[-1]) == 2
        assert s2.pgt.stage2_unmap(0x4000_4000, PAGE) == 0
        assert s2.pgt.table_pages() == [s2.pgt.pgd]  # emptied tables freed
        assert s2.rc(s2.pgt.pgd) == 1 and s2.pool.free_pages() == free0

    def test_blocks(self, s2):
        assert s2.pgt.stage2_map(0x4000_0000, 2 << 20, 0x4000_0000, R | W | X) == 0
        assert s2.pgt.get_leaf(0x4010_0000)[2] == 2
        assert s2.pgt.stage2_map(0x8000_0000, 1 << 30, 0x8000_0000, R | W) == 0
        assert s2.pgt.get_leaf(0xA000_0000)[2] == 1
        # a block needs IPA and PA aligned
        assert s2.pgt.stage2_map(0x4020_0000, 2 << 20, 0x4020_1000, R) == 0
        assert s2.pgt.get_leaf(0x4020_0000)[2] == 3
        leaves = s2.pgt.leaves(0x4020_0000, 2 << 20)
        assert len(leaves) == 512
        # a 1 GiB-aligned 2 GiB range: two level-1 blocks
        assert s2.pgt.stage2_map(0x1_0000_0000, 2 << 30, 0x1_0000_0000, R) == 0
        assert [lv for _, lv, _ in s2.pgt.leaves(0x1_0000_0000, 2 << 30)] == [1, 1]

    def test_level0_never_a_block(self, s2):
        assert s2.pgt.stage2_map(0, 1 << 39, 0, R) == 0
        assert {lv for _, lv, _ in s2.pgt.leaves(0, 1 << 39)} == {1}

    def test_page_inside_block_breaks_it(self, s2):
        assert s2.pgt.stage2_map(0x4000_0000, 2 << 20, 0x4000_0000, R | W | X) == 0
        assert s2.pgt.stage2_map(0x4000_5000, PAGE, 0x9000_0000, R) == 0
        _, pte, level = s2.pgt.get_leaf(0x4000_5000)
        assert level == 3 and pt.pte_to_phys(pte) == 0x9000_0000
        # the other pages of the old block are gone (they fault back lazily)
        assert s2.pgt.get_leaf(0x4000_6000)[1] == 0

    def test_block_over_table_frees_subtree(self, s2):
        free0 = s2.pool.free_pages()
        for k in range(4):
            assert s2.pgt.stage2_map(0x4000_0000 + k * PAGE, PAGE, 0x4000_0000 + k * PAGE, R) == 0
        assert s2.pgt.stage2_map(0x4000_0000, 2 << 20, 0x4000_0000, R | W) == 0
        assert s2.pgt.get_leaf(0x4000_0000)[2] == 2
        assert free0 - s2.pool.free_pages() == 2  # the level-3 table went back

    def test_remap_same_is_eagain_and_harmless(self, s2):
        assert s2.pgt.stage2_map(0x4000_0000, PAGE, 0x4000_0000, R | W) == 0
        before = s2.pgt.leaves()
        assert s2.pgt.stage2_map(0x4000_0000, PAGE, 0x4000_0000, R | W) == -EAGAIN
        flags = pt.KVM_PGTABLE_WALK_IGNORE_EAGAIN
        assert s2.pgt.stage2_map(0x4000_0000, PAGE, 0x4000_0000, R | W, flags=flags) == 0
        assert s2.pgt.leaves() == before

    def test_invalid_prot(self, s2):
        assert s2.pgt.stage2_map(0x4000_0000, PAGE, 0x4000_0000, R | DEV | X) == -EINVAL
        assert s2.pgt.leaves() == []

    def test_annotation_counted_and_page_granular(self, s2):
        ann = 0x2000_0000_0000_0002
        assert s2.pgt.stage2_map(0x4000_0000, 4 * PAGE, None, 0, annotation=ann) == 0
        leaves = s2.pgt.leaves()
        assert [(a, lv, p) for a, lv, p in leaves] == [
            (0x4000_0000 + k * PAGE, 3, ann) for k in range(4)]
        assert s2.pgt.leaves(valid_only=True) == []
        last = s2.pgt.table_pages()[-1]
        assert s2.rc(last) == 5  # invalid but non-zero entries hold a reference
        assert s2.pgt.stage2_unmap(0x4000_0000, 4 * PAGE) == 0
        assert s2.pgt.table_pages() == [s2.pgt.pgd]

    def test_force_pte(self):
        env = Env(force_pte_cb=lambda a, e, prot: prot != 0xF)
        assert env.pgt.stage2_map(0x4000_0000, 2 << 20, 0x4000_0000, 0xF) == 0
        assert env.pgt.get_leaf(0x4000_0000)[2] == 2
        assert env.pgt.stage2_map(0x4020_0000, 2 << 20, 0x4020_0000, R | W) == 0
        assert env.pgt.get_leaf(0x4020_0000)[2] == 3

    def test_destroy_returns_everything(self, s2):
        free0 = s2.pool.free_pages()
        for k in range(0, 64, 7):
            s2.pgt.stage2_map(0x4000_0000 + k * (3 << 20), PAGE, 0x4000_0000, R)
        s2.pgt.stage2_map(0x1_0000_0000, 1 << 30, 0x1_0000_0000, R)
        s2.pgt.destroy()
        assert s2.pgt.pgd == 0
        assert s2.pool.free_pages() == free0 + 1  # the root too

    def test_update_leaf(self, s2):
        s2.pgt.stage2_map(0x4000_0000, 2 * PAGE, 0x4000_0000, R | W)
        ret, acc = s2.pgt.stage2_update_leaf(0x4000_0000, 3 * PAGE, 0, pt.KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W)
        assert ret == 0 and acc & pt.KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W
        assert pt.stage2_pte_prot(s2.pgt.get_leaf(0x4000_1000)[1]) == R


class TestHypMap:
    def test_map_unmap(self, s1):
        va = 0x8000_4000_0000
        assert s1.pgt.hyp_map(va, 3 * PAGE, 0x4000_0000, pt.PAGE_HYP) == 0
        _, pte, level = s1.pgt.get_leaf(va + PAGE)
        assert level == 3 and pt.pte_to_phys(pte) == 0x4000_1000
        assert pt.hyp_pte_prot(pte) == R | W
        tables = s1.pgt.table_pages()
        assert s1.rc(tables[-1]) == 4
        assert s1.pgt.hyp_unmap(va, 3 * PAGE) == 3 * PAGE
        assert s1.pgt.table_pages() == [s1.pgt.pgd]
        assert s1.pgt.hyp_unmap(va, PAGE) == 0

    def test_block_and_short_unmap(self, s1):
        va = 0x8000_4000_0000
        assert s1.pgt.hyp_map(va, 2 << 20, 0x4000_0000, pt.PAGE_HYP) == 0
        assert s1.pgt.get_leaf(va)[2] == 2
        assert s1.pgt.hyp_unmap(va, PAGE) == 0  # leaf larger than the range: stop
        assert s1.pgt.hyp_unmap(va, 2 << 20) == 2 << 20

    def test_remap_rules(self, s1):
        va = 0x8000_4000_0000
        assert s1.pgt.hyp_map(va, PAGE, 0x4000_0000, pt.PAGE_HYP) == 0
        assert s1.pgt.hyp_map(va, PAGE, 0x4000_0000, pt.PAGE_HYP) == 0  # identical
        assert s1.pgt.hyp_map(va, PAGE, 0x4000_0000, pt.PAGE_HYP | SW1) == 0  # SW bits only
        assert s1.pgt.get_leaf(va)[1] & SW1
        assert s1.pgt.hyp_map(va, PAGE, 0x4000_0000, pt.PAGE_HYP_RO) == -EINVAL
        assert s1.pgt.hyp_map(va, PAGE, 0x5000_0000, pt.PAGE_HYP) == -EINVAL
        assert s1.pgt.hyp_map(va, PAGE, 0x4000_0000, W) == -EINVAL

    def test_page_inside_valid_block(self, s1):
        va = 0x8000_4000_0000
        assert s1.pgt.hyp_map(va, 2 << 20, 0x4000_0000, pt.PAGE_HYP) == 0
        assert s1.pgt.hyp_map(va + PAGE, PAGE, 0x4000_1000, pt.PAGE_HYP) == 0
        ret, pte, level = s1.pgt.get_leaf(va + PAGE)
        assert level == 3 and pt.pte_to_phys(pte) == 0x4000_1000

    def test_stage1_counts_only_valid(self, s1):
        va = 0x8000_4000_0000
        s1.pgt.hyp_map(va, PAGE, 0x4000_0000, pt.PAGE_HYP)
        last = s1.pgt.table_pages()[-1]
        s1.mem.write_u64(last + 8, 0x700)  # an invalid non-zero entry is not counted
        assert s1.rc(last) == 2
        assert s1.pgt.hyp_unmap(va, PAGE) == PAGE


class TestMachineTables:
    def test_hyp_stage1_maps_carveout(self, machine):
        from pkvm.hyp.mm import hyp_va

        hyp = [r for r in machine.memory_map() if r.kind == "hyp"][0]
        walk = machine.inspect.walk("hyp")
        covered = 0
        for e in walk:
            if e["valid"] and hyp.start <= e["out"] < hyp.end:
                covered += e["size"]
                assert e["addr"] - e["out"] == hyp_va(0) - 0
        assert covered >= hyp.size

    def test_host_stage2_identity(self, machine):
        m = machine
        for a in (0x4000_0000, 0x4800_0000, 0x0800_0000):
            m.host.read(a, 8)
        for e in m.inspect.walk("host"):
            if e["valid"]:
                assert e["out"] == e["addr"]
