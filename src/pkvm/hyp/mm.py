"""The hyp's own address space (`nvhe/mm.c`): linear map, EL2 accesses, memcaches.

EL2 reaches memory only through its stage-1 (`pkvm_pgtable`). `el2_read`/`el2_write` translate a
hyp VA through that table exactly as the MMU would; an unmapped VA is an EL2 data abort, i.e. a
hyp panic. This is how a host pointer the hyp has not pinned (or NULL) brings the real hyp down.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Sequence
from typing import Final, Protocol

from pkvm.hyp.memory import PageState
from pkvm.hyp.panic import HypBug
from pkvm.hyp.pgtable import (
    KVM_PTE_ADDR_MASK,
    KVM_PTE_LEAF_ATTR_LO_S1_AP_RO,
    KVM_PTE_LEAF_ATTR_LO_S1_AP_SHIFT,
    granule_shift,
    pte_valid,
)
from pkvm.hyp.state import HYP_LINEAR_OFFSET, HypState
from pkvm.machine.memory import PAGE_SHIFT, PAGE_SIZE, RAM_BASE

U64: Final = 0xFFFF_FFFF_FFFF_FFFF
# The largest int compiled code keeps unboxed (63-bit tagged): from 0 to it, `x & U64` is `x`,
# and testing that is two compares where the mask itself is a long-integer operation.
SHORT_MAX: Final = 0x3FFF_FFFF_FFFF_FFFF
PAGE_OFFSET_MASK: Final = PAGE_SIZE - 1
S1_AP_MASK: Final = 3  # AP[2:1]
MAX_BAD_STORES: Final = 64  # EL2 stores outside the hyp's pages kept for the report


def hyp_va(pa: int) -> int:
    """`__hyp_va`."""
    va = pa + HYP_LINEAR_OFFSET
    return va if 0 <= va <= SHORT_MAX else va & U64


def hyp_pa(va: int) -> int:
    """`__hyp_pa` of a linear-map VA."""
    pa = va - HYP_LINEAR_OFFSET
    return pa if 0 <= pa <= SHORT_MAX else pa & U64


def kern_hyp_va_to_pa(h: HypState, host_va: int) -> int:
    """A host kernel pointer as EL2 resolves it: `__hyp_pa(kern_hyp_va(va))`.

    With RAM at 0x4000_0000 this keeps the low `t` bits, `t` the bit length of (RAM size - 1),
    and lands in RAM whatever the host passed (NULL is the first RAM page)."""
    t = (h.mem.size - 1).bit_length()
    return RAM_BASE + (host_va & ((1 << t) - 1))


def kern_hyp_va(h: HypState, host_va: int) -> int:
    return hyp_va(kern_hyp_va_to_pa(h, host_va))


# -- EL2 memory accesses through the hyp stage-1 -------------------------------------------
def el2_translate(h: HypState, va: int, write: bool = False) -> int:
    """The PA an EL2 access to `va` reaches: through EL2's TLB, else a walk of the hyp stage-1
    (an unmapped VA is a data abort, a read-only one a permission fault: a hyp panic). An entry
    is (PA page, writable, mark): the hyp stage-1 tells the TLB the input range of every valid
    descriptor it replaces (`KvmPgtable.changed`: `Tlb.mark_range`), and a hit on a marked
    entry is walked again (`_recheck`); an unmarked one is one whose walk nothing changed."""
    entries = h.el2_tlb.entries
    key = (va >> PAGE_SHIFT) << 1
    e = entries.get(key)
    if e is not None and (e[1] or not write):
        if e[2]:
            _recheck(h, va, key, e, write)
        return e[0] | (va & PAGE_OFFSET_MASK)
    pa, writable = _walk(h, va, write)
    entries[key] = (pa & ~PAGE_OFFSET_MASK, writable, 0)
    return pa


def _walk(h: HypState, va: int, write: bool) -> tuple[int, bool]:
    ret, pte, level = h.pkvm_pgtable.get_leaf(va)
    if ret or not pte_valid(pte):
        raise HypBug(f"EL2 data abort: hyp VA {va:#x} is not mapped in the hyp stage-1")
    writable = _s1_writable(pte)
    if write and not writable:
        raise HypBug(f"EL2 permission fault: write to read-only hyp VA {va:#x}")
    mask = (1 << granule_shift(level)) - 1
    return (pte & KVM_PTE_ADDR_MASK & ~mask) | (va & mask), writable


def _s1_writable(pte: int) -> bool:
    ap = (pte >> KVM_PTE_LEAF_ATTR_LO_S1_AP_SHIFT) & S1_AP_MASK
    return ap != KVM_PTE_LEAF_ATTR_LO_S1_AP_RO


def _recheck(h: HypState, va: int, key: int, e: Sequence[int], write: bool) -> None:
    """A hit on an entry marked changed: does a fresh walk agree? (Agreeing, the mark is
    cleared; disagreeing, the stale use is recorded and the entry stays marked.)"""
    pgt = h.pkvm_pgtable
    ret, pte, level = pgt.get_leaf(va)
    if not ret and pte_valid(pte):
        mask = (1 << granule_shift(level)) - 1
        fresh = (pte & KVM_PTE_ADDR_MASK & ~mask) | (va & mask & ~PAGE_OFFSET_MASK)
        if fresh == e[0] and _s1_writable(pte) == e[1]:
            h.el2_tlb.entries[key] = (e[0], e[1], 0)
            return
        now = f"maps PA {fresh:#x}"
    else:
        now = "is unmapped"
    h.el2_tlb.record_stale(f"EL2 {'write' if write else 'read'} of hyp VA {va:#x} used the "
                           f"cached PA {e[0]:#x}; the hyp stage-1 {now}")


def hyp_stage1_tlbi(h: HypState) -> Callable[[int, int], None]:
    """EL2's `tlbi vale2is` as the hyp stage-1 walker issues it (`kvm_pgtable_hyp_unmap`); a
    partial of a module-level function, so a machine snapshot can pickle it."""
    return functools.partial(_hyp_stage1_tlbi, h)


def _hyp_stage1_tlbi(h: HypState, start: int, size: int) -> None:
    if h.bug("hyp-unmap-no-tlbi"):  # seeded: the unmap leaves EL2's TLB as it was
        # (The model's bookkeeping, not the kernel's: the store skipped marking the range for
        # the TLBI that would drop it; its entries, kept, are walked again at their next use.)
        h.el2_tlb.mark_range(start, size)
        return
    h.el2_tlb.flush_range(start, size)


def check_store(h: HypState, pa: int, fixmap: bool = False) -> None:
    """The rule every EL2 store keeps: the page is the hyp's own or shared with it (a fixmap
    store: a page no one but a guest owns, being wiped on its way out)."""
    if not h.mem.is_ram(pa):
        return
    store = h.page_states
    if store.hyp_may_write(h, pa):
        return
    if fixmap and store.get_host_state(h, pa) == PageState.NOPAGE:
        return
    if len(h.bad_stores) < MAX_BAD_STORES:
        what = "fixmap store" if fixmap else "store"
        h.bad_stores.append(f"EL2 {what} to PA {pa:#x}: hyp state "
                            f"{store.get_hyp_state(h, pa).name}, host state "
                            f"{store.get_host_state(h, pa).name}")


def el2_read(h: HypState, va: int, n: int) -> bytes:
    if 0 < n <= PAGE_SIZE - (va & (PAGE_SIZE - 1)):  # within one page: one translation
        pa = el2_translate(h, va)
        if h.locks.scheduler is not None:
            _host_read_point(h, pa, n)
        off = pa - h.mem.base
        return bytes(h.mem.bytes[off : off + n])
    out = bytearray()
    while n:
        chunk = min(n, PAGE_SIZE - (va & (PAGE_SIZE - 1)))
        pa = el2_translate(h, va)
        if h.locks.scheduler is not None:
            _host_read_point(h, pa, n)
        out += h.mem.read(pa, chunk)
        va += chunk
        n -= chunk
    return bytes(out)


def _host_read_point(h: HypState, pa: int, n: int) -> None:
    """A preemption point before EL2 reads memory the host shares with it (another host CPU
    may write it at any time)."""
    if h.page_states.get_hyp_state(h, pa & ~(PAGE_SIZE - 1)) == PageState.SHARED_BORROWED:
        h.locks.preempt("host-read", f"{n}@{pa:#x}")


def el2_write(h: HypState, va: int, data: bytes) -> None:
    n = len(data)
    if 0 < n <= PAGE_SIZE - (va & (PAGE_SIZE - 1)):  # within one page: one translation
        pa = el2_translate(h, va, write=True)
        check_store(h, pa)
        h.mem.write(pa, data)
        return
    pos = 0
    pas = []
    while pos < len(data):  # translate every page first: a fault changes nothing
        chunk = min(len(data) - pos, PAGE_SIZE - ((va + pos) & (PAGE_SIZE - 1)))
        pas.append((el2_translate(h, va + pos, write=True), pos, chunk))
        pos += chunk
    for pa, off, chunk in pas:
        check_store(h, pa)
        h.mem.write(pa, data[off : off + chunk])


def el2_zero(h: HypState, va: int, size: int) -> None:
    """`memset(va, 0, size)` at EL2 over whole pages, through the hyp stage-1."""
    pas = [el2_translate(h, v, write=True) for v in range(va, va + size, PAGE_SIZE)]
    for pa in pas:
        check_store(h, pa)
        h.mem.zero(pa, PAGE_SIZE)


def el2_fixmap_zero(h: HypState, pa: int) -> None:
    """Wipe one page through the per-CPU fixmap slot (`hyp_fixmap_map`, memset, unmap with a
    broadcast TLBI): the page need not be in the hyp's linear map."""
    check_store(h, pa, fixmap=True)
    h.mem.zero(pa, PAGE_SIZE)


def el2_read_int(h: HypState, va: int, n: int, signed: bool = False) -> int:
    """`int.from_bytes(el2_read(h, va, n), "little", signed=signed)`. Up to 8 bytes within
    one page (every scalar field of a struct, aligned or not) is one `el2_read` of one page: the
    same translation and preemption point, then the bits of the RAM's word view holding them
    (one word, or two where they straddle a word boundary), without the bytes copied and
    converted."""
    if 0 < n <= 8 and (va & PAGE_OFFSET_MASK) + n <= PAGE_SIZE:
        pa = el2_translate(h, va)
        if h.locks.scheduler is not None:
            _host_read_point(h, pa, n)
        mem = h.mem
        pos = pa - mem.base
        u64 = mem.u64
        shift = (pos & 7) << 3
        word: int = u64[pos >> 3]
        if shift + (n << 3) > 64:  # the next word is in the same page
            word |= u64[(pos >> 3) + 1] << 64
        if shift or n != 8:
            word = (word >> shift) & ((1 << (n << 3)) - 1)
        if signed and word >> ((n << 3) - 1):
            word -= 1 << (n << 3)
        return word
    return int.from_bytes(el2_read(h, va, n), "little", signed=signed)


def el2_read_u64(h: HypState, va: int) -> int:
    """`el2_read_int(h, va, 8)`; aligned: one translation, the preemption point, a word load."""
    if not va & 7:
        pa = el2_translate(h, va)
        if h.locks.scheduler is not None:
            _host_read_point(h, pa, 8)
        return h.mem.read_u64(pa)
    return el2_read_int(h, va, 8)


def el2_read_u64s(h: HypState, va: int, count: int) -> list[int]:
    """`[el2_read_u64(h, va + 8 * i) for i in range(count)]` (an array of a host struct read
    one element at a time): where the words lie in one page, no scheduler listens and the first
    read leaves the page's TLB entry unmarked (every later read of the page is then a plain hit:
    the same PA, nothing recorded), one translation and one unpacking of the bytes (aligned or
    not: `el2_read_int`'s words are the little-endian bytes)."""
    if count > 0 and (va & PAGE_OFFSET_MASK) + 8 * count <= PAGE_SIZE and h.locks.scheduler is None:
        pa = el2_translate(h, va)
        mem = h.mem
        e = h.el2_tlb.entries.get((va >> PAGE_SHIFT) << 1)
        if e is not None and not e[2]:
            words: list[int] = list(struct.unpack_from(f"<{count}Q", mem.bytes, pa - mem.base))
            return words
        out = [int.from_bytes(mem.read(pa, 8), "little")]  # the first read, translated
        return out + [el2_read_u64(h, va + 8 * k) for k in range(1, count)]
    return [el2_read_u64(h, va + 8 * k) for k in range(count)]


def el2_write_u64(h: HypState, va: int, value: int) -> None:
    """`el2_write` of the 8 bytes of `value`; aligned (within one page): one translation, one
    `check_store` and a word store, without the bytes."""
    if not va & 7:
        pa = el2_translate(h, va, write=True)
        check_store(h, pa)
        h.mem.write_u64(pa, value if 0 <= value <= SHORT_MAX else value & U64)
        return
    el2_write(h, va, (value & U64).to_bytes(8, "little"))


def el2_read_u64_pair(h: HypState, va: int) -> tuple[int, int]:
    """Two consecutive 8-byte words at `va` (`el2_read` of 16 bytes, as two integers: a
    struct's pair of fields copied in). Aligned within one page: one translation and two word
    loads, without the bytes and their unpacking."""
    if not va & 7 and (va & (PAGE_SIZE - 1)) <= PAGE_SIZE - 16:
        pa = el2_translate(h, va)
        if h.locks.scheduler is not None:
            _host_read_point(h, pa, 16)
        mem = h.mem
        return mem.read_u64(pa), mem.read_u64(pa + 8)
    data = el2_read(h, va, 16)
    return int.from_bytes(data[:8], "little"), int.from_bytes(data[8:], "little")


def el2_write_u64_pair(h: HypState, va: int, lo: int, hi: int) -> None:
    """`el2_write` of 16 bytes holding `lo` then `hi`; aligned within one page: one
    translation, one `check_store` and two word stores, elided where memory holds the two
    words already (a struct copied back unchanged: no reader can tell)."""
    if not va & 7 and (va & (PAGE_SIZE - 1)) <= PAGE_SIZE - 16:
        pa = el2_translate(h, va, write=True)
        check_store(h, pa)
        mem = h.mem
        lo &= U64
        hi &= U64
        if mem.read_u64(pa) != lo or mem.read_u64(pa + 8) != hi:
            mem.write_u64(pa, lo)
            mem.write_u64(pa + 8, hi)
        return
    el2_write(h, va, (lo & U64).to_bytes(8, "little") + (hi & U64).to_bytes(8, "little"))


# -- linear mappings -------------------------------------------------------------------
def pkvm_create_mappings_locked(h: HypState, start: int, end: int, prot: int) -> int:
    """Map hyp VAs [start, end) onto their linear-map PAs, one page at a time."""
    h.pkvm_pgd_lock.assert_held()
    pgt = h.pkvm_pgtable
    assert pgt is not None
    va = start & ~(PAGE_SIZE - 1)
    end = (end + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    while va < end:
        err = pgt.hyp_map(va, PAGE_SIZE, hyp_pa(va), prot)
        if err:
            return err
        va += PAGE_SIZE
    return 0


# -- struct kvm_hyp_memcache: a stack of pages linked through their first word --------------
class MemcacheSlots(Protocol):
    """A memcache as the helpers see it: slot 0 the head's physical address, slot 1 the number
    of pages (a hyp vCPU's `arch.pkvm_memcache` in its struct, or a list)."""

    def __getitem__(self, i: int, /) -> int: ...

    def __setitem__(self, i: int, value: int, /) -> None: ...


def memcache_push(h: HypState, mc: MemcacheSlots, pa: int) -> None:
    """Push `pa` on a hyp-side memcache [head, nr_pages] (EL2 writes the link in the page)."""
    el2_write_u64(h, hyp_va(pa), mc[0])
    mc[0] = pa
    mc[1] += 1


def memcache_pop(h: HypState, mc: MemcacheSlots) -> int | None:
    if not mc[1]:
        return None
    pa = mc[0] & ~(PAGE_SIZE - 1)
    mc[0] = el2_read_u64(h, hyp_va(pa))
    mc[1] -= 1
    return pa
