"""The hyp's buddy allocator (`nvhe/page_alloc.c`).

A `hyp_pool` hands out zeroed, power-of-two blocks of pages from a fixed range. Free blocks sit on
per-order lists (appended at the tail, taken from the head, so which page the next table uses is
the same as in Linux); a freed block merges with its buddy while the buddy is free at the same
order and inside the range. Pages attached from outside the range (vCPU memcache pages freed into
a VM pool) are zeroed and listed without merging.
"""

from __future__ import annotations

from typing import Any, Final

from pkvm.arch.pgtable import MmOps
from pkvm.hyp.memory import HypVmemmap
from pkvm.hyp.panic import HypBug
from pkvm.hyp.spinlock import RANK_POOL, HypLocks, HypSpinLock
from pkvm.machine.memory import PAGE_SHIFT, PAGE_SIZE, PhysMemory

MAX_PAGE_ORDER: Final = 10


def get_order(size: int) -> int:
    order = 0
    while (PAGE_SIZE << order) < size:
        order += 1
    return order


class HypPool(MmOps):
    """`struct hyp_pool` (a table's `MmOps` named as its base: compiled, the table's calls
    into it are direct)."""

    def __init__(
        self, name: str, mem: PhysMemory, vmemmap: HypVmemmap, locks: HypLocks,
        attach_foreign_keeps_order: bool,
    ):
        self.name = name
        self.mem = mem
        self.vmemmap = vmemmap
        self.lock = HypSpinLock(locks, f"{name}.lock", RANK_POOL)
        self.free_area: list[dict[int, None]] = []
        self.range_start = 0
        self.range_end = 0
        self.max_order = 0
        self.keeps_order = attach_foreign_keeps_order

    def __reduce__(self) -> tuple[Any, ...]:  # as `Tlb.__reduce__` (machine/mmu.py)
        return (HypPool, (self.name, self.mem, self.vmemmap, self.lock.locks, self.keeps_order),
                self.__getstate__())

    # -- init --------------------------------------------------------------------
    def init(self, pfn: int, nr_pages: int, reserved: int) -> int:
        """`hyp_pool_init`: pages [pfn, pfn+nr) with the first `reserved` kept allocated."""
        vm = self.vmemmap
        self.max_order = min(MAX_PAGE_ORDER, get_order(nr_pages << PAGE_SHIFT))
        self.free_area = [dict() for _ in range(self.max_order + 1)]
        self.range_start = pfn << PAGE_SHIFT
        self.range_end = self.range_start + (nr_pages << PAGE_SHIFT)
        base = vm.idx(self.range_start)
        vm.touch_range(base, nr_pages)
        for i in range(nr_pages):
            vm.refcount[base + i] = 1
            vm.order[base + i] = 0
        for i in range(reserved, nr_pages):
            self._put_locked(self.range_start + (i << PAGE_SHIFT))
        return 0

    @property
    def nr_pages(self) -> int:
        return (self.range_end - self.range_start) >> PAGE_SHIFT

    def free_pages(self) -> int:
        return sum(len(lst) << o for o, lst in enumerate(self.free_area))

    def free_blocks(self) -> list[tuple[int, int]]:
        """(pa, order) of every free block, by order then list position."""
        return [(pa, o) for o, lst in enumerate(self.free_area) for pa in lst]

    # -- buddy helpers -------------------------------------------------------------
    def _buddy(self, pa: int, order: int) -> int | None:
        addr = pa ^ (PAGE_SIZE << order)
        if not self.range_start <= addr < self.range_end:
            return None
        vm = self.vmemmap
        i = vm.idx(addr)
        if vm.order[i] != order or vm.refcount[i] != 0:
            return None
        return addr

    def _attach(self, pa: int) -> None:
        """`__hyp_attach_page`: zero, merge with free buddies, append to the list."""
        vm = self.vmemmap
        i = vm.idx(pa)
        order = vm.order[i]
        if not self.range_start <= pa < self.range_end:
            if not self.keeps_order:
                order = 0
                vm.order[i] = 0
            self.mem.zero(pa, PAGE_SIZE << order)
            self._list(order)[pa] = None
            return
        self.mem.zero(pa, PAGE_SIZE << order)
        vm.order[i] = vm.hyp_no_order
        while order + 1 <= self.max_order:
            buddy = self._buddy(pa, order)
            if buddy is None:
                break
            del self.free_area[order][buddy]
            vm.order[vm.idx(buddy)] = vm.hyp_no_order
            pa = min(pa, buddy)
            order += 1
        vm.order[vm.idx(pa)] = order
        self.free_area[order][pa] = None

    def _list(self, order: int) -> dict[int, None]:
        while len(self.free_area) <= order:
            self.free_area.append(dict())
        return self.free_area[order]

    def _put_locked(self, pa: int) -> None:
        vm = self.vmemmap
        i = vm.idx(pa)
        if vm.refcount[i] == 0:
            raise HypBug(f"{self.name}: refcount underflow on {pa:#x}")
        vm.touch(i)
        vm.refcount[i] -= 1
        if vm.refcount[i] == 0:
            self._attach(pa)

    # -- the API ---------------------------------------------------------------
    def alloc_pages(self, order: int) -> int | None:
        """`hyp_alloc_pages`: a zeroed block of 2^order pages, refcount 1, or None."""
        with self.lock:
            i = order
            while i < len(self.free_area) and i <= self.max_order and not self.free_area[i]:
                i += 1
            if i > self.max_order or i >= len(self.free_area):
                return None
            lst = self.free_area[i]
            pa = next(iter(lst))
            del lst[pa]
            vm = self.vmemmap
            while i > order:
                i -= 1
                vm.order[vm.idx(pa)] = i
                buddy = pa + (PAGE_SIZE << i)
                vm.order[vm.idx(buddy)] = i
                self.free_area[i][buddy] = None
            idx = vm.idx(pa)
            vm.order[idx] = order
            if vm.refcount[idx] != 0:
                raise HypBug(f"{self.name}: allocated page {pa:#x} has refcount")
            vm.touch(idx)
            vm.refcount[idx] = 1
            return pa

    def zalloc_page(self) -> int | None:
        return self.alloc_pages(0)

    def get_page(self, pa: int) -> None:
        with self.lock:
            vm = self.vmemmap
            i = vm.idx(pa & ~(PAGE_SIZE - 1))
            if vm.refcount[i] == 0xFFFF:
                raise HypBug(f"{self.name}: refcount overflow on {pa:#x}")
            vm.touch(i)
            vm.refcount[i] += 1

    def put_page(self, pa: int) -> None:
        with self.lock:
            self._put_locked(pa & ~(PAGE_SIZE - 1))

    def page_count(self, pa: int) -> int:
        return self.vmemmap.refcount[self.vmemmap.idx(pa & ~(PAGE_SIZE - 1))]

    def split_page(self, pa: int) -> None:
        """`hyp_split_page`: an allocated high-order block becomes order-0 pages."""
        vm = self.vmemmap
        i = vm.idx(pa)
        order = vm.order[i]
        vm.order[i] = 0
        vm.touch_range(i + 1, (1 << order) - 1)
        for k in range(1, 1 << order):
            vm.order[i + k] = 0
            vm.refcount[i + k] = 1
