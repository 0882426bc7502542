"""Physical memory of the simulated board (QEMU-virt-like).

RAM is one anonymous, shared, sparse mapping (shared so that the CPU emulator can alias
scattered pages into one region): a page costs resident memory only once something writes
it, so a 16 GiB machine starts instantly.  Everything that lives in RAM in the real system lives
here as bytes: page tables (as 64-bit descriptors), the host's `struct kvm`, guest memory.
The CPU emulator maps the same bytes directly (`host_address`).
"""

from __future__ import annotations

import ctypes
import mmap
from dataclasses import dataclass
from typing import Any, Final

PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 1 << PAGE_SHIFT
PAGE_MASK: Final = ~(PAGE_SIZE - 1) & 0xFFFF_FFFF_FFFF_FFFF

RAM_BASE: Final = 0x4000_0000
MMIO_BASE: Final = 0x0
MMIO_END: Final = 0x4000_0000
UART_BASE: Final = 0x0900_0000
GIC_DIST_BASE: Final = 0x0800_0000
GIC_REDIST_BASE: Final = 0x080A_0000

ZERO_PAGE: Final = bytes(PAGE_SIZE)
_MADV_REMOVE: Final = getattr(mmap, "MADV_REMOVE", 9)  # Linux: free a shared mapping's backing
_LOW_BIT: Final = bytes(i & 1 for i in range(256))  # mincore: bit 0 of each byte, the page resident

_mincore: Any
try:
    _mincore = ctypes.CDLL(None, use_errno=True).mincore
    _mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    _mincore.restype = ctypes.c_int
except (OSError, AttributeError):  # not Linux: compare every page
    _mincore = None


@dataclass(frozen=True)
class Region:
    """One range of the physical map; `end` is exclusive."""

    kind: str
    start: int
    end: int
    size: int


def parse_size(value: int | str) -> int:
    """`"2G"`, `"64M"`, `"512K"` or a number of bytes."""
    if isinstance(value, int):
        return value
    text = value.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


class PhysMemory:
    """RAM from `RAM_BASE`, byte- and u64-addressable by physical address."""

    def __init__(self, size: int):
        if size % PAGE_SIZE:
            raise ValueError("memory size must be a multiple of 4 KiB")
        self.base = RAM_BASE
        self.size = size
        self.end = RAM_BASE + size
        self.base_pfn = RAM_BASE >> PAGE_SHIFT
        self.nr_pages = size >> PAGE_SHIFT
        flags = mmap.MAP_SHARED | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        self._map = mmap.mmap(-1, size, flags=flags)
        self.bytes = memoryview(self._map)
        self.u64 = self.bytes.cast("Q")
        self._address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        self._vec1 = (ctypes.c_ubyte * 1)()
        # 1 for each page `zero` found resident: it stays backed (a page once written keeps its
        # memory; were it swapped out, comparing it reads it back), so it is compared without
        # asking mincore again.
        self._backed = bytearray(self.nr_pages)

    # -- physical map ------------------------------------------------------------------
    def is_ram(self, pa: int) -> bool:
        return self.base <= pa < self.end

    def range_is_ram(self, pa: int, size: int) -> bool:
        return self.base <= pa and pa + size <= self.end

    def host_address(self, pa: int) -> int:
        """Address of the byte backing `pa` in this process (for the CPU emulator)."""
        return self._address + (pa - self.base)

    # -- access ------------------------------------------------------------------------
    def read(self, pa: int, n: int) -> bytes:
        off = pa - self.base
        return bytes(self.bytes[off : off + n])

    def write(self, pa: int, data: bytes) -> None:
        off = pa - self.base
        self.bytes[off : off + len(data)] = data

    def read_u64(self, pa: int) -> int:
        return self.u64[(pa - self.base) >> 3]

    def write_u64(self, pa: int, value: int) -> None:
        self.u64[(pa - self.base) >> 3] = value

    def page_is_zero(self, pa: int) -> bool:
        off = pa - self.base
        return self._map[off : off + PAGE_SIZE] == ZERO_PAGE

    def zero(self, pa: int, size: int) -> None:
        """Zero whole pages. Pages that are not resident (asking the kernel with mincore) are
        dropped from the mapping instead of written, so zeroing keeps RAM sparse."""
        off = pa - self.base
        ram = self._map  # slices of the mmap are bytes: comparing them is ~15x a memoryview's
        n = size >> PAGE_SHIFT
        backed = self._backed
        first = off >> PAGE_SHIFT
        if n == 1 and backed[first]:  # the common case: a hyp page zeroed before
            if ram[off : off + PAGE_SIZE] != ZERO_PAGE:
                ram[off : off + PAGE_SIZE] = ZERO_PAGE
            return
        resident = self._resident(off, n)
        gone = -1  # the first page of a run of pages that are not resident
        for k in range(n):
            page = off + (k << PAGE_SHIFT)
            if resident is not None and not resident[k]:
                if gone < 0:
                    gone = k
                continue
            if gone >= 0:
                self._remove(off + (gone << PAGE_SHIFT), k - gone)
                gone = -1
            backed[first + k] = 1
            if ram[page : page + PAGE_SIZE] != ZERO_PAGE:
                ram[page : page + PAGE_SIZE] = ZERO_PAGE
        if gone >= 0:
            self._remove(off + (gone << PAGE_SHIFT), n - gone)

    def _remove(self, off: int, n: int) -> None:
        """Zero n pages that are not resident: never touched, or swapped out. Dropping them from
        the shared anonymous mapping's backing makes them read as zeros either way (swap
        included) without taking memory; where the kernel refuses, zeros are written."""
        size = n << PAGE_SHIFT
        try:
            self._map.madvise(_MADV_REMOVE, off, size)
        except (OSError, ValueError):
            self._map[off : off + size] = bytes(size)

    def _resident(self, off: int, n: int) -> ctypes.Array[ctypes.c_ubyte] | None:
        if _mincore is None:
            return None
        if n == 1:  # the common case: one page, one preallocated byte
            vec = self._vec1
        else:
            vec = (ctypes.c_ubyte * n)()
        if _mincore(self._address + off, n << PAGE_SHIFT, vec):
            return None
        return vec

    # -- snapshots ---------------------------------------------------------------------
    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle as the size and the pages that hold anything but zeros (a machine snapshot):
        the unpickled RAM is a fresh sparse mapping with those pages written back."""
        return (_restore_ram, (self.size, self.nonzero_pages()))

    def nonzero_pages(self) -> list[tuple[int, bytes]]:
        """(offset, contents) of every page that is not all zeros, lowest first."""
        ram = self._map
        n = self.nr_pages
        resident = self._resident(0, n)
        flags = bytes(resident).translate(_LOW_BIT) if resident is not None else b"\x01" * n
        out = []
        k = flags.find(1)
        while k >= 0:
            off = k << PAGE_SHIFT
            page = ram[off : off + PAGE_SIZE]
            if page != ZERO_PAGE:
                out.append((off, page))
            k = flags.find(1, k + 1)
        return out


def _restore_ram(size: int, pages: list[tuple[int, bytes]]) -> PhysMemory:
    mem = PhysMemory(size)
    ram = mem._map
    for off, page in pages:
        ram[off : off + PAGE_SIZE] = page
    return mem
