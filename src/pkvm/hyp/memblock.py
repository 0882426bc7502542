"""The hyp's view of the memblock map (`hyp_memory[]`, the host's memblock regions copied at
`__pkvm_init`): which physical ranges are memory and which of them are mapped (`nvhe/
mem_protect.c`'s `find_mem_range`, `addr_is_memory`, `range_is_memory`, ...; `pkvm.hyp.mem_protect`
re-exports them under those names)."""

from __future__ import annotations

from typing import Final

from pkvm.errors import EINVAL, EPERM
from pkvm.hyp.state import HypState
from pkvm.machine.memory import PAGE_SHIFT

U64: Final = 0xFFFF_FFFF_FFFF_FFFF
ULONG_MAX: Final = U64


# -- the memblock map ----------------------------------------------------------------------
def find_mem_range(h: HypState, addr: int) -> tuple[bool, int, int]:
    """(is memory, start, end) of the region or gap around `addr` (`find_mem_range`)."""
    start = 0
    for reg in h.hyp_memory:
        if addr < reg.base:
            return False, start, reg.base
        if addr < reg.end:
            return True, reg.base, reg.end
        start = reg.end
    return False, start, ULONG_MAX


def addr_is_memory(h: HypState, addr: int) -> bool:
    return find_mem_range(h, addr)[0]


def addr_is_allowed_memory(h: HypState, addr: int) -> bool:
    for reg in h.hyp_memory:
        if reg.base <= addr < reg.end:
            return not reg.nomap
    return False


def range_is_memory(h: HypState, start: int, end: int) -> bool:
    hit, rs, re_ = find_mem_range(h, start)
    return hit and rs <= ((end - 1) & U64) < re_


def check_range_allowed_memory(h: HypState, start: int, end: int) -> int:
    """7.2: the range lies in one region or gap (-EINVAL) and is allowed memory (-EPERM)."""
    for reg in h.hyp_memory:  # a range inside one region: that region answers alone
        if reg.base <= start < end <= reg.end:  # (tests/test_fast_paths_guest1g.py)
            return -EPERM if reg.nomap else 0
    return _check_range_allowed_memory(h, start, end)


def _check_range_allowed_memory(h: HypState, start: int, end: int) -> int:
    """`check_range_allowed_memory` for any range (the region or gap around `start`)."""
    hit, rs, re_ = find_mem_range(h, start)
    last = (end - 1) & U64
    if not rs <= last < re_:
        return -EINVAL
    if not hit or not addr_is_allowed_memory(h, start):
        return -EPERM
    return 0


def pfn_range_is_valid(h: HypState, pfn: int, nr_pages: int) -> bool:
    limit = 1 << (h.host_mmu.pgt.ia_bits - PAGE_SHIFT)
    return pfn < limit and nr_pages <= limit - pfn
