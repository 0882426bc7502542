"""The hyp buddy allocator (memory.md §3.1-§3.3, nvhe/page_alloc.c)."""

import pytest

import pkvm
from pkvm.hyp.memory import HypVmemmap
from pkvm.hyp.page_alloc import MAX_PAGE_ORDER, HypPool, get_order
from pkvm.hyp.panic import HypBug
from pkvm.hyp.spinlock import HypLocks
from pkvm.machine.memory import PhysMemory

PAGE = 4096
BASE = 0x4000_0000 + (1 << 20)  # 1 MiB into RAM: aligned for every order used here


def make_pool(nr, reserved=0, base=BASE, keeps_order=False, mem_size=64 << 20):
    mem = PhysMemory(mem_size)
    vmm = HypVmemmap.over(mem, 0xFF if not keeps_order else 0xFFFF)
    pool = HypPool("test", mem, vmm, HypLocks(1), keeps_order)
    assert pool.init(base >> 12, nr, reserved) == 0
    return pool


def rc(pool, pa):
    return pool.vmemmap.refcount[pool.vmemmap.idx(pa)]


def order(pool, pa):
    return pool.vmemmap.order[pool.vmemmap.idx(pa)]


class TestInit:
    def test_get_order(self):
        assert [get_order(n) for n in (1, PAGE, PAGE + 1, 2 * PAGE, 3 * PAGE, 1 << 22)] == [
            0, 0, 1, 1, 2, 10]

    def test_whole_pool_coalesces(self):
        pool = make_pool(16)
        assert pool.max_order == 4
        assert pool.free_blocks() == [(BASE, 4)]
        assert pool.free_pages() == 16
        assert all(rc(pool, BASE + k * PAGE) == 0 for k in range(16))

    def test_max_order_capped(self):
        base = 0x4000_0000 + (4 << 20)
        pool = make_pool(4096, base=base)
        assert pool.max_order == MAX_PAGE_ORDER == 10
        assert pool.free_blocks() == [(base + k * (PAGE << 10), 10) for k in range(4)]

    def test_unaligned_pool_start(self):
        pool = make_pool(1024)  # 1 MiB-aligned start: blocks follow the alignment
        assert pool.max_order == 10
        assert sorted(pool.free_blocks()) == [(BASE, 8), (BASE + (1 << 20), 9),
                                              (BASE + (3 << 20), 8)]
        assert pool.free_pages() == 1024

    def test_reserved_pages_stay_allocated(self):
        pool = make_pool(16, reserved=3)
        assert pool.free_pages() == 13
        assert [rc(pool, BASE + k * PAGE) for k in range(4)] == [1, 1, 1, 0]
        # pages 3, 4-7, 8-15 (put one by one in ascending order, merging as they go)
        assert sorted(pool.free_blocks()) == [(BASE + 3 * PAGE, 0), (BASE + 4 * PAGE, 2),
                                              (BASE + 8 * PAGE, 3)]

    def test_odd_size_does_not_merge_out_of_range(self):
        pool = make_pool(13)
        assert pool.max_order == 4
        assert pool.free_pages() == 13
        assert sorted(pool.free_blocks()) == [(BASE, 3), (BASE + 8 * PAGE, 2),
                                              (BASE + 12 * PAGE, 0)]


class TestAllocFree:
    def test_split_order(self):
        pool = make_pool(16)
        pa = pool.alloc_pages(0)
        assert pa == BASE and rc(pool, pa) == 1 and order(pool, pa) == 0
        # the upper buddies were appended at each order
        assert pool.free_blocks() == [(BASE + PAGE, 0), (BASE + 2 * PAGE, 1),
                                      (BASE + 4 * PAGE, 2), (BASE + 8 * PAGE, 3)]
        pool.put_page(pa)
        assert pool.free_blocks() == [(BASE, 4)]

    def test_smallest_fitting_order_first(self):
        pool = make_pool(16)
        a = pool.alloc_pages(0)
        b = pool.alloc_pages(1)
        assert b == BASE + 2 * PAGE  # the order-1 block, not a split of order 2
        c = pool.alloc_pages(2)
        assert c == BASE + 4 * PAGE
        d = pool.alloc_pages(3)
        assert d == BASE + 8 * PAGE
        assert pool.alloc_pages(1) is None
        assert pool.alloc_pages(0) == BASE + PAGE
        assert pool.alloc_pages(0) is None
        assert pool.alloc_pages(5) is None  # above max_order
        for pa in (a, b, c, d, BASE + PAGE):
            pool.put_page(pa)
        assert pool.free_blocks() == [(BASE, 4)]

    def test_list_order_tail_append_head_take(self):
        pool = make_pool(16)
        pages = [pool.alloc_pages(0) for _ in range(16)]
        assert sorted(pages) == [BASE + k * PAGE for k in range(16)]
        assert pool.alloc_pages(0) is None
        for k in (9, 3, 5):  # buddies (8, 2, 4) still allocated: no merging
            pool.put_page(BASE + k * PAGE)
        assert pool.free_blocks() == [(BASE + 9 * PAGE, 0), (BASE + 3 * PAGE, 0),
                                      (BASE + 5 * PAGE, 0)]
        assert pool.alloc_pages(0) == BASE + 9 * PAGE  # head
        pool.put_page(BASE + 9 * PAGE)  # back at the tail
        assert [pa for pa, _ in pool.free_blocks()] == [BASE + 3 * PAGE, BASE + 5 * PAGE,
                                                      BASE + 9 * PAGE]
        # freeing a buddy merges and moves the block to the next order's tail
        pool.put_page(BASE + 2 * PAGE)
        assert pool.free_blocks() == [(BASE + 5 * PAGE, 0), (BASE + 9 * PAGE, 0),
                                      (BASE + 2 * PAGE, 1)]
        assert order(pool, BASE + 3 * PAGE) == pool.vmemmap.hyp_no_order

    def test_pages_zeroed(self):
        pool = make_pool(4)
        pa = pool.alloc_pages(1)
        pool.mem.write(pa, b"\xff" * (2 * PAGE))
        pool.put_page(pa)
        pa2 = pool.alloc_pages(2)
        assert pool.mem.read(pa2, 4 * PAGE) == bytes(4 * PAGE)

    def test_get_put_refcount(self):
        pool = make_pool(4)
        pa = pool.alloc_pages(0)
        pool.get_page(pa)
        assert pool.page_count(pa) == 2
        pool.put_page(pa)
        assert pool.free_pages() == 3
        pool.put_page(pa)
        assert pool.free_pages() == 4

    def test_split_page(self):
        pool = make_pool(8)
        pa = pool.alloc_pages(2)
        pool.split_page(pa)
        assert [rc(pool, pa + k * PAGE) for k in range(4)] == [1, 1, 1, 1]
        assert [order(pool, pa + k * PAGE) for k in range(4)] == [0, 0, 0, 0]
        for k in (2, 0, 3, 1):
            pool.put_page(pa + k * PAGE)
        assert pool.free_blocks() == [(BASE, 3)]

    @pytest.mark.parametrize("keeps", [False, True])
    def test_foreign_page_attach(self, keeps):
        pool = make_pool(4, keeps_order=keeps)
        foreign = BASE + (1 << 20)
        vmm = pool.vmemmap
        vmm.refcount[vmm.idx(foreign)] = 1
        vmm.order[vmm.idx(foreign)] = 1
        pool.mem.write(foreign, b"junk")
        pool.put_page(foreign)
        want = 1 if keeps else 0  # 6.12 keeps the recorded order, 7.2 forces order 0
        assert (foreign, want) in pool.free_blocks()
        assert pool.mem.read(foreign, 4) == bytes(4)
        # and it is handed out again
        got = [pool.alloc_pages(want) for _ in range(1 + (4 >> want))]
        assert foreign in got


class TestBugs:
    def test_put_free_page(self):
        pool = make_pool(4)
        with pytest.raises(HypBug):
            pool.put_page(BASE)

    def test_get_overflow(self):
        pool = make_pool(4)
        pa = pool.alloc_pages(0)
        pool.vmemmap.refcount[pool.vmemmap.idx(pa)] = 0xFFFF
        with pytest.raises(HypBug):
            pool.get_page(pa)

    def test_alloc_of_refcounted_free_page(self):
        pool = make_pool(4)
        pool.vmemmap.refcount[pool.vmemmap.idx(BASE)] = 3  # corrupted free page
        with pytest.raises(HypBug):
            pool.alloc_pages(2)

    def test_bug_is_a_hyp_panic_through_the_machine(self):
        assert issubclass(pkvm.HypPanic, Exception)
        assert not issubclass(HypBug, pkvm.HypPanic)


class TestMachinePools:
    def test_pools_present(self, machine):
        for name in ("hpool", "host_s2_pool"):
            p = machine.inspect.pool(name)
            assert 0 < p["free"] <= p["pages"]
            hyp = [r for r in machine.memory_map() if r.kind == "hyp"][0]
            assert hyp.start <= p["start"] < hyp.end

    def test_host_s2_tables_come_from_pool(self, machine):
        before = machine.inspect.pool("host_s2_pool")["free"]
        machine.host.read(0x4000_0000 + (40 << 20), 1)  # new 2 MiB block: no new table
        pa = machine.host.alloc_pages(1)
        machine.hvc(0, "__pkvm_host_share_hyp", pa >> 12)
        after = machine.inspect.pool("host_s2_pool")["free"]
        assert after <= before
