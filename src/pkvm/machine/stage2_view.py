"""The stage-2 view of a guest CPU core: which IPA ranges the emulated CPU reaches, and where.

The core knows nothing of page tables at stage 2: its view is a list of IPA ranges, each
backed directly by host memory (`Stage2View.map`), kept in step with the guest's stage-2 by
whoever runs it (EL2). An access outside the view, or against its permissions, is a stage-2
fault reported to EL2.

What unicorn 2.1.4 does here (measured; the reasons for the code below):
* Mapping is costly: `mem_unmap` flushes the TLB page by page (O(size)) and every map or
  unmap rebuilds QEMU's flat view (O(regions): ~10 ms per call at 2000 regions). `map` keeps
  regions few and each page remapped O(1) times amortised: adjacent ranges merge only with
  their binary buddy (same power-of-two size, aligned), leftovers of a cut region are split
  into aligned blocks, and over shared host memory the pages are first aliased into a per-core
  window at their IPA offset (`mremap`), so scattered host pages still merge. Page by page:
  ~50-70 us per map or unmap, whatever the order (vs ~4 ms growing one region, ~2.4 ms with
  one region per page at 4096 pages).
* Code translated from guest memory is cached by address: memory written from outside the guest
  (loading an image into a page that ran) needs `flush_code()`.
* `mem_unmap` drops the code translated from the region it removes, but finds the region's
  RAM by looking its IPA up as a virtual address through the CPU's current stage 1: with the
  guest's MMU on that misses (or hits other memory), the stale code survives and runs again
  when a later region takes the same place in QEMU's RAM (tests/test_linux_fast.py shows it).
  Regions are therefore unmapped with stage 1 off (`_unmap_regions`), which makes that drop
  exact, instead of forgetting all translated code at every merge (~55 times while Linux
  boots, each followed by retranslating the kernel's hot code).
"""

from __future__ import annotations

import bisect
import ctypes
import weakref
from dataclasses import dataclass
from typing import Any, Final

from mypy_extensions import mypyc_attr
from unicorn.arm64_const import UC_ARM64_REG_CP_REG
from unicorn.unicorn_const import (
    UC_CTL_IO_WRITE,
    UC_CTL_TLB_FLUSH,
    UC_PROT_EXEC,
    UC_PROT_READ,
    UC_PROT_WRITE,
)

from pkvm.machine.context import MASK64
from pkvm.machine.memory import PAGE_SIZE

_libc: Final = ctypes.CDLL(None, use_errno=True)
_mremap: Final = _libc.mremap
_mremap.restype = ctypes.c_void_p
_mremap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_void_p,
]
_mmap: Final = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_munmap: Final = _libc.munmap
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MREMAP_MAYMOVE: Final = 1
MREMAP_FIXED: Final = 2
_U64: Final = ctypes.c_uint64
# unicorn's protection bits as ints (the build's type check may run without unicorn installed)
_PROT_READ: Final[int] = UC_PROT_READ
_PROT_WRITE: Final[int] = UC_PROT_WRITE
_PROT_EXEC: Final[int] = UC_PROT_EXEC
_SCTLR_EL1: Final = (1, 0, 3, 0, 0)  # (CRn, CRm, op0, op1, op2), as unicorn's CP_REG takes it
_SCTLR_M: Final = 1
MAP_PRIVATE: Final = 0x02
MAP_ANONYMOUS: Final = 0x20
MAP_NORESERVE: Final = 0x4000
PROT_NONE: Final = 0


def _blocks(m: Mapping, start: int, end: int) -> list[Mapping]:
    """[start, end) of mapping `m` as naturally aligned power-of-two blocks."""
    out = []
    while start < end:
        size = start & -start if start else 1 << 63
        while size > end - start:
            size >>= 1
        out.append(Mapping(start, start + size, m.host + start - m.start, m.writable, m.executable))
        start += size
    return out


@mypyc_attr(native_class=False)  # a Python class: `weakref.finalize` unmaps its range
class _Window:
    """A reserved address range where host pages are aliased at their IPA offset.

    `mremap(old, 0, size, MAYMOVE|FIXED, new)` makes a second mapping of the same pages of a
    shared mapping; IPAs below 2^38 are covered (256 GiB of address space reserved per core,
    nothing committed; higher IPAs are mapped where they are). The first refusal (private
    memory) turns the window off for good.
    """

    BITS = 38

    def __init__(self) -> None:
        self.base: int | None = None
        self.enabled = True

    def alias(self, ipa: int, size: int, host: int) -> int:
        if not self.enabled or ipa + size > 1 << self.BITS:
            return host
        if self.base is None:
            flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE
            base = _mmap(None, 1 << self.BITS, PROT_NONE, flags, -1, 0)
            if base is None or base == MASK64:
                self.enabled = False
                return host
            self.base = base
            weakref.finalize(self, _munmap, base, 1 << self.BITS)
        target = self.base + ipa
        if _mremap(host, 0, size, MREMAP_MAYMOVE | MREMAP_FIXED, target) != target:
            self.enabled = False  # not a shared mapping: map the pages where they are
            return host
        return target


@dataclass(slots=True)
class Mapping:
    """One stage-2 range: IPA [start, end) backed by host memory at `host`."""

    start: int
    end: int
    host: int
    writable: bool
    executable: bool

    @property
    def perms(self) -> int:
        return (
            _PROT_READ
            | (_PROT_WRITE if self.writable else 0)
            | (_PROT_EXEC if self.executable else 0)
        )


class Stage2View:
    """The IPA ranges unicorn `uc` maps, merged into as few regions as the rules above allow;
    with `alias_window`, shared host memory is first aliased at its IPA offset."""

    def __init__(self, uc: Any, alias_window: bool = True) -> None:
        self.uc = uc
        self._window = _Window() if alias_window else None
        self._maps: list[Mapping] = []
        self._starts: list[int] = []
        # The region the last `host_of` found, as (start, end, host - start); every map or
        # unmap (`_update`) drops it. A stage-1 walk reads its descriptors from few regions.
        self._hit = (0, 0, 0)

    def mappings(self) -> list[Mapping]:
        """The stage-2 ranges as mapped in unicorn (merged), sorted by IPA."""
        return [Mapping(m.start, m.end, m.host, m.writable, m.executable) for m in self._maps]

    def map(
        self, ipa: int, size: int, host_address: int, writable: bool = True, executable: bool = True
    ) -> None:
        """Map IPA [ipa, ipa+size) to host memory at `host_address` (page-aligned), replacing
        whatever was there. Adjacent ranges contiguous in host memory with the same
        permissions become one unicorn region.

        When the host memory is a shared mapping (MAP_SHARED), the pages are first aliased
        into a per-core window at their IPA offset (`mremap`), so that IPA-contiguous guest
        memory is host-contiguous whatever pages back it and merges into few regions; over
        private memory `mremap` refuses and the pages are mapped where they are."""
        self._check_range(ipa, size)
        if host_address % PAGE_SIZE:
            raise ValueError(f"host address {host_address:#x} is not page-aligned")
        if self._window is not None:
            host_address = self._window.alias(ipa, size, host_address)
        self._place(Mapping(ipa, ipa + size, host_address, writable, executable))

    def _place(self, m: Mapping) -> None:
        """Map `m` as naturally aligned power-of-two blocks, each merged with its buddies:
        a range that is not such a block would never merge with anything (a stage-2 fault
        whose fault-around maps the faulting page first and the rest of its block after left
        three regions behind; Linux's boot ended with 372 regions, and unicorn looks a host
        address up by a linear scan of its regions on every translation-cache miss)."""
        for block in _blocks(m, m.start, m.end):
            self._update(block.start, block.end, block)

    def unmap(self, ipa: int, size: int) -> None:
        self._check_range(ipa, size)
        self._update(ipa, ipa + size, None)

    def protect(self, ipa: int, size: int, writable: bool, executable: bool) -> None:
        """Change permissions of the mapped parts of [ipa, ipa+size)."""
        self._check_range(ipa, size)
        start, end = ipa, ipa + size
        pieces = []
        for m in self._overlapping(start, end):
            lo, hi = max(m.start, start), min(m.end, end)
            pieces.append(Mapping(lo, hi, m.host + lo - m.start, writable, executable))
        for p in pieces:
            self._place(p)

    @staticmethod
    def _check_range(ipa: int, size: int) -> None:
        if ipa % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
            raise ValueError(f"range {ipa:#x}+{size:#x} is not a non-empty page-aligned range")

    def _overlapping(self, start: int, end: int) -> list[Mapping]:
        i = bisect.bisect_right(self._starts, start) - 1
        out = []
        for m in self._maps[max(i, 0) :]:
            if m.start >= end:
                break
            if m.end > start:
                out.append(m)
        return out

    def _update(self, start: int, end: int, new: Mapping | None) -> None:
        # Regions overlapping or adjacent to [start, end) leave unicorn and come back rebuilt.
        inside = self._overlapping(start, end)
        if new is None and not inside:
            return  # nothing mapped there
        if new is not None and len(inside) == 1:
            m = inside[0]
            if (
                m.start <= start
                and end <= m.end
                and m.host + (start - m.start) == new.host
                and (m.writable, m.executable) == (new.writable, new.executable)
            ):
                return  # already mapped exactly so
        touched = list(inside)
        merged: list[Mapping] = []
        for m in inside:  # what is left of the regions the new range cuts through, in aligned
            # power-of-two blocks (so that unmapping page after page stays O(n log n))
            if m.start < start:
                merged += _blocks(m, m.start, start)
            if m.end > end:
                merged += _blocks(m, end, m.end)
        if new is not None:
            cur = new
            while (buddy := self._buddy(cur)) is not None:
                touched.append(buddy)
                lo, hi = (cur, buddy) if cur.start < buddy.start else (buddy, cur)
                cur = Mapping(lo.start, hi.end, lo.host, lo.writable, lo.executable)
            merged.append(cur)
        # A region that leaves unicorn takes the code translated from it along
        # (`_unmap_regions`); one mapped comes back as a new RAM block without any.
        self._hit = (0, 0, 0)
        if touched:
            self._unmap_regions(touched)
        for m in touched:
            i = self._maps.index(m)
            del self._maps[i]
            del self._starts[i]
        for m in merged:
            self.uc.mem_map_ptr(m.start, m.end - m.start, m.perms, m.host)
            i = bisect.bisect_left(self._starts, m.start)
            self._maps.insert(i, m)
            self._starts.insert(i, m.start)

    def _unmap_regions(self, regions: list[Mapping]) -> None:
        """Unmap whole regions, each dropping the code translated from it: unicorn looks a
        region's RAM up by translating its IPA through the current stage 1, so SCTLR_EL1.M is
        clear meanwhile (the guest's TLB entries emptied before, the flat ones after; a raw
        SCTLR write flushes nothing itself). Above EL1 stage 1 is already off."""
        uc = self.uc
        sctlr = uc.reg_read(UC_ARM64_REG_CP_REG, _SCTLR_EL1)
        if sctlr & _SCTLR_M:
            uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
            uc.reg_write(UC_ARM64_REG_CP_REG, (*_SCTLR_EL1, sctlr & ~_SCTLR_M))
        try:
            for m in regions:
                uc.mem_unmap(m.start, m.end - m.start)
        finally:
            if sctlr & _SCTLR_M:
                uc.reg_write(UC_ARM64_REG_CP_REG, (*_SCTLR_EL1, sctlr))
                uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)

    def flush_code(self) -> None:
        """Forget all translated code (as IC IALLU): call after writing guest memory that
        may already have run (loading a new image, reusing a page) from outside the guest."""
        self.uc.ctl_flush_tb()

    def _buddy(self, m: Mapping) -> Mapping | None:
        """The mapped region `m` may merge with: its binary buddy (same power-of-two size,
        aligned pair), contiguous in host memory, same permissions. Merging only buddies keeps
        a range mapped page by page at O(log n) regions while each page is remapped O(1) times
        amortised (unicorn's unmap costs a TLB flush per page, and every map or unmap is
        linear in the number of regions)."""
        size = m.end - m.start
        if size & (size - 1) or m.start % size:
            return None
        lo = m.start + size if (m.start // size) % 2 == 0 else m.start - size
        i = bisect.bisect_left(self._starts, lo)
        if i == len(self._maps) or self._starts[i] != lo:
            return None
        b = self._maps[i]
        if b.end - b.start != size or (b.writable, b.executable) != (m.writable, m.executable):
            return None
        if b.host - m.host != b.start - m.start:
            return None
        return b

    def host_of(self, ipa: int) -> int | None:
        start, end, delta = self._hit
        if start <= ipa < end:
            return ipa + delta
        i = bisect.bisect_right(self._starts, ipa) - 1
        if i >= 0:
            m = self._maps[i]
            if ipa < m.end:
                self._hit = (m.start, m.end, m.host - m.start)
                return m.host + ipa - m.start
        return None

    # ---- guest memory (model-side reads, no stage-2 permission checks) -------------------
    def read_ipa(self, ipa: int, size: int) -> bytes | None:
        host = self.host_of(ipa)
        if host is None or self.host_of(ipa + size - 1) is None:
            return None
        return ctypes.string_at(host, size)

    def read_u64(self, ipa: int) -> int | None:
        """The u64 at `ipa` (8-aligned: it never straddles two regions), None if unmapped."""
        start, end, delta = self._hit
        if start <= ipa < end:
            return _U64.from_address(ipa + delta).value
        host = self.host_of(ipa)
        return None if host is None else _U64.from_address(host).value
