"""Physical memory of the simulated board (QEMU-virt-like).

RAM is one sparse, shared memory file (`memfd_create`; shared so that the CPU emulator can alias
scattered pages into one region): a page costs resident memory only once something writes it,
so a 16 GiB machine starts instantly. Everything that lives in RAM in the real system lives
here as bytes: page tables (as 64-bit descriptors), the host's `struct kvm`, guest memory.
The CPU emulator maps the same bytes directly (`host_address`).
"""

from __future__ import annotations

import ctypes
import mmap
import os
from dataclasses import dataclass
from typing import Any, Final

from mypy_extensions import mypyc_attr

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
_SEEK_DATA: Final = getattr(os, "SEEK_DATA", 3)

# The CPU emulator's runs, over every machine: [CPUs inside a run now, runs begun or ended so
# far]. A CPU writes RAM through its own mapping of it (`host_address`), which `PhysMemory`
# does not see; a run therefore drops every memory's known holes (`PhysMemory.zero`), and
# while a CPU is inside one (the hyp entered from a hook) none are kept.
_EMULATOR: Final = [0, 0]


def emulator_enter() -> None:
    """A CPU starts running (its writes to RAM are unseen until `emulator_leave`)."""
    _EMULATOR[0] += 1
    _EMULATOR[1] += 1


def emulator_leave() -> None:
    _EMULATOR[0] -= 1
    _EMULATOR[1] += 1


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
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_NORESERVE", 0)
        self._file: _RamFile | None = _ram_file(size)
        if self._file is not None:
            self._map = mmap.mmap(self._file.fd, size, flags=flags)
        else:  # no memory files (not Linux): an anonymous mapping, every page compared
            self._map = mmap.mmap(-1, size, flags=flags | mmap.MAP_ANONYMOUS)
        # Read-only views (a store goes through `write`, `write_u64` or `zero`, which keep the
        # known holes below true); `_bytes` is the writable one.
        self._bytes = memoryview(self._map)
        self._u64 = self._bytes.cast("Q")
        self.bytes = self._bytes.toreadonly()
        self.u64 = self._u64.toreadonly()
        self._address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        # 1 for each page `zero` found holding data: it holds data for good (nothing punches
        # holes in RAM), so it is compared without asking the file again.
        self._backed = bytearray(self.nr_pages)
        # The last `SEEK_DATA` answer that found holes: offsets [_holes_lo, _holes_hi) held no
        # data at emulator generation `_holes_gen` (`_EMULATOR[1]`). Holes only turn into data
        # by a store: `write` and `write_u64` cut the run short at the page they store to, a
        # CPU run drops it (the generation moves), and `zero` stores only to pages holding data.
        self._holes_lo = 0
        self._holes_hi = 0
        self._holes_gen = -1
        # What RAM holds, for a reboot that reuses it (`reuse_ram`): the snapshot pages it was
        # set to (`_base`, or None: not known) at emulator generation `_base_gen`, since when
        # `write`, `write_u64` and `zero` have stored to the pages marked 1 in `_stored` (the
        # last page `write_u64` marked: `_stored_last`) and nothing else to any page but a
        # CPU run (which moves the generation).
        self._stored = bytearray(self.nr_pages)
        self._stored_last = -1
        self._base: list[tuple[int, bytes]] | None = None
        self._base_gen = -1

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
        if off < self._holes_hi and off + len(data) > self._holes_lo:
            self._stored_in_holes(off)
        self._bytes[off : off + len(data)] = data
        first = off >> PAGE_SHIFT
        last = (off + len(data) - 1) >> PAGE_SHIFT
        if last == first:
            self._stored[first] = 1
        elif last > first:
            self._stored[first : last + 1] = b"\x01" * (last + 1 - first)

    def read_u64(self, pa: int) -> int:
        return self.u64[(pa - self.base) >> 3]

    def read_table(self, pa: int) -> list[int]:
        """The 512 descriptors of the page-table page at `pa` (`read_u64` of each, in one)."""
        i = (pa - self.base) >> 3
        words: list[int] = self.u64[i : i + PAGE_SIZE // 8].tolist()
        return words

    def write_u64(self, pa: int, value: int) -> None:
        off = pa - self.base
        if off < self._holes_hi and off + 8 > self._holes_lo:
            self._stored_in_holes(off)
        self._u64[off >> 3] = value
        page = off >> PAGE_SHIFT
        if page != self._stored_last:
            self._stored[page] = 1
            self._stored_last = page

    def _stored_in_holes(self, off: int) -> None:
        """A store from `off` on, into the known holes: those from its page on are no more."""
        self._holes_hi = max(self._holes_lo, off & ~(PAGE_SIZE - 1))

    def _set_base(self, pages: list[tuple[int, bytes]]) -> None:
        """RAM holds `pages` and zeros (a snapshot's load): no page stored to since."""
        self._stored = bytearray(self.nr_pages)
        self._stored_last = -1
        self._base = pages
        self._base_gen = _EMULATOR[1] if not _EMULATOR[0] else -1

    def forget_holes(self) -> None:
        """Keep no holes: RAM was stored to behind `write` and `write_u64` (`reuse_ram`)."""
        self._holes_lo = self._holes_hi = 0

    def page_is_zero(self, pa: int) -> bool:
        off = pa - self.base
        return self._map[off : off + PAGE_SIZE] == ZERO_PAGE

    def zero(self, pa: int, size: int) -> None:
        """Zero whole pages. A page that holds no data in the RAM file (a hole: never written)
        already reads as zeros and is left as it is, so zeroing keeps RAM sparse; a page that
        holds data (resident or swapped out) is compared and, unless all zeros, overwritten."""
        off = pa - self.base
        ram = self._map  # slices of the mmap are bytes: comparing them is ~15x a memoryview's
        n = size >> PAGE_SHIFT
        backed = self._backed
        first = off >> PAGE_SHIFT
        k = 0
        while k < n:
            page = off + (k << PAGE_SHIFT)
            if not backed[first + k]:
                data = self.holes_end(page)
                if data > page:  # [page, data) are holes
                    k += (data - page + PAGE_SIZE - 1) >> PAGE_SHIFT
                    continue
                backed[first + k] = 1
            if ram[page : page + PAGE_SIZE] != ZERO_PAGE:
                ram[page : page + PAGE_SIZE] = ZERO_PAGE
                self._stored[first + k] = 1
            k += 1

    def holes_end(self, off: int) -> int:
        """`next_data(off)` for a page-aligned `off`, answered from the last answer that found
        holes when `off` lies in them and no store or CPU run has touched them since (one
        `lseek` then covers every page up to the next that holds data: a VM's pages reclaimed
        one hypercall at a time, each wiped)."""
        emu = _EMULATOR
        if self._holes_lo <= off < self._holes_hi and self._holes_gen == emu[1] and not emu[0]:
            return self._holes_hi
        data = self.next_data(off)
        if data > off and not emu[0]:
            self._holes_lo, self._holes_hi, self._holes_gen = off, data, emu[1]
        return data

    def next_data(self, off: int) -> int:
        """The offset in RAM of the first byte at or after `off` that lies in a page holding
        data (`lseek(SEEK_DATA)`; pages before it are holes and read as zeros); `off` itself
        where the RAM file cannot tell (every page then counts as holding data). A page past
        the end of RAM holds data, so the search always ends."""
        f = self._file
        if f is None:
            return off
        try:
            return os.lseek(f.fd, off, _SEEK_DATA)
        except OSError:  # SEEK_DATA unsupported here: assume data
            return off

    def next_hole(self, off: int) -> int:
        """The offset in RAM of the first page at or after `off` that is a hole
        (`lseek(SEEK_HOLE)`); the end of RAM where the RAM file cannot tell."""
        f = self._file
        if f is None:
            return self.size
        try:
            return os.lseek(f.fd, off, os.SEEK_HOLE)
        except OSError:
            return self.size

    # -- snapshots ---------------------------------------------------------------------
    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle as the size and the pages that hold anything but zeros (a machine snapshot):
        the unpickled RAM is a fresh sparse mapping with those pages written back."""
        return (_restore_ram, (self.size, self.nonzero_pages()))

    def nonzero_pages(self) -> list[tuple[int, bytes]]:
        """(offset, contents) of every page that is not all zeros, lowest first (only the pages
        holding data in the RAM file are read)."""
        ram = self._map
        out = []
        off = self.next_data(0)
        while off < self.size:
            off &= ~(PAGE_SIZE - 1)
            page = ram[off : off + PAGE_SIZE]
            if page != ZERO_PAGE:
                out.append((off, page))
            off = self.next_data(off + PAGE_SIZE)
        return out


@mypyc_attr(native_class=False)  # a Python class: `__del__` closes the descriptor
class _RamFile:
    """The RAM file's descriptor, closed when the memory holding it goes."""

    def __init__(self, fd: int):
        self.fd = fd

    def __del__(self) -> None:
        try:
            os.close(self.fd)
        except (OSError, TypeError):  # already closed, or the interpreter is shutting down
            pass


def _ram_file(size: int) -> _RamFile | None:
    """A sparse memory file of `size` bytes of RAM and one page past it that holds data (so
    that `SEEK_DATA` from any RAM offset finds data, never the end of the file); None where
    the system has no memory files."""
    create = getattr(os, "memfd_create", None)
    if create is None:
        return None
    try:
        fd = create("pkvm-ram", getattr(os, "MFD_CLOEXEC", 1))
    except OSError:
        return None
    f = _RamFile(fd)
    os.ftruncate(fd, size + PAGE_SIZE)
    os.pwrite(fd, b"\x01", size)
    return f


def _restore_ram(size: int, pages: list[tuple[int, bytes]]) -> PhysMemory:
    mem = PhysMemory(size)
    ram = mem._map
    for off, page in pages:
        ram[off : off + PAGE_SIZE] = page
    mem._set_base(pages)
    return mem


def zero_runs(mem: PhysMemory, spans: list[tuple[int | None, int]]) -> None:
    """`mem.zero` of each run of adjacent RAM among `spans` ((PA, bytes) in order; None where
    no RAM answers, which ends a run): a host range's zeroing once its pages are translated
    (`HostPort.zero`), its loop compiled."""
    start, size = 0, 0  # the run of adjacent RAM being gathered
    for out, k in spans:
        if out is not None and size and out == start + size:
            size += k
            continue
        if size:
            mem.zero(start, size)
        start, size = (out, k) if out is not None else (0, 0)
    if size:
        mem.zero(start, size)


_ZEROS: Final = bytes(1 << 20)  # zeros to write over RAM, up to 1 MiB at a time


def reuse_ram(mem: PhysMemory, size: int, pages: list[tuple[int, bytes]]) -> PhysMemory:
    """`_restore_ram(size, pages)` made of `mem`, a RAM its machine is done with (a fuzzer's
    reboot after a hyp panic): the same contents as a fresh one. Where `mem` was itself set
    to `pages` and no CPU has run since, only the pages stored to since are set back
    (`_reuse_stored`); else every page that holds data in the RAM file (whoever wrote it: the
    hyp, the host, the emulator; holes read as zeros) is zeroed, then the snapshot's `pages`
    written: a copy of memory per page, no comparison. Pages stay resident (a page punched
    back into a hole would cost a page fault at its next store, ~4 us, and the next machine
    stores to the same pages: it starts from the same snapshot). A fresh RAM where `mem` has
    no file (every page would count as holding data) or another size."""
    if mem._file is None or mem.size != size:
        return _restore_ram(size, pages)
    if (mem._base is not None and mem._base_gen == _EMULATOR[1] and not _EMULATOR[0]
            and mem._base == pages):
        _reuse_stored(mem, pages)
        mem._base = pages
        return mem
    ram = mem._map
    zeros = memoryview(_ZEROS)
    off = mem.next_data(0)
    while off < size:
        end = min(mem.next_hole(off), size)
        off &= ~(PAGE_SIZE - 1)
        while off < end:
            n = min(end - off, len(_ZEROS))
            ram[off : off + n] = zeros[:n]
            off += n
        off = mem.next_data(off)
    for off, page in pages:
        ram[off : off + PAGE_SIZE] = page
    mem.forget_holes()  # stored behind `write`: the holes it knew may hold data
    mem._set_base(pages)
    return mem


def _reuse_stored(mem: PhysMemory, pages: list[tuple[int, bytes]]) -> None:
    """`reuse_ram`'s RAM set back to `pages` where it holds them but for the pages stored to
    since (`PhysMemory._stored`): each of those written again, from `pages` or zeros."""
    want = dict(pages)
    ram = mem._map
    stored = mem._stored
    k = stored.find(1)
    while k >= 0:
        off = k << PAGE_SHIFT
        page = want.get(off)
        ram[off : off + PAGE_SIZE] = ZERO_PAGE if page is None else page
        stored[k] = 0
        k = stored.find(1, k + 1)
    mem._stored_last = -1
    mem.forget_holes()
