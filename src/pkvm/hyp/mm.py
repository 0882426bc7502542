"""The hyp's own address space (`nvhe/mm.c`): linear map, EL2 accesses, memcaches.

EL2 reaches memory only through its stage-1 (`pkvm_pgtable`). `el2_read`/`el2_write` translate a
hyp VA through that table exactly as the MMU would; an unmapped VA is an EL2 data abort, i.e. a
hyp panic. This is how a host pointer the hyp has not pinned (or NULL) brings the real hyp down.
"""

from __future__ import annotations

import struct

from pkvm.hyp.panic import HypBug
from pkvm.hyp.pgtable import KVM_PTE_ADDR_MASK, granule_shift, pte_valid
from pkvm.hyp.state import HYP_LINEAR_OFFSET, HypState
from pkvm.machine.memory import PAGE_SIZE, RAM_BASE

U64 = 0xFFFF_FFFF_FFFF_FFFF


def hyp_va(pa: int) -> int:
    """`__hyp_va`."""
    return (pa + HYP_LINEAR_OFFSET) & U64


def hyp_pa(va: int) -> int:
    """`__hyp_pa` of a linear-map VA."""
    return (va - HYP_LINEAR_OFFSET) & U64


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
    pgt = h.pkvm_pgtable
    assert pgt is not None
    tlb = h.el2_tlb
    if tlb.get(0) != pgt.gen:
        tlb.clear()
        tlb[0] = pgt.gen
    hit = tlb.get(va >> 12 | 1 << 60)
    if hit is not None and (hit[1] or not write):
        return hit[0] | (va & 0xFFF)
    ret, pte, level = pgt.get_leaf(va)
    if ret or not pte_valid(pte):
        raise HypBug(f"EL2 data abort: hyp VA {va:#x} is not mapped in the hyp stage-1")
    if write and (pte >> 6) & 3 == 3:
        raise HypBug(f"EL2 permission fault: write to read-only hyp VA {va:#x}")
    mask = (1 << granule_shift(level)) - 1
    pa = (pte & KVM_PTE_ADDR_MASK & ~mask) | (va & mask)
    tlb[va >> 12 | 1 << 60] = (pa & ~0xFFF, (pte >> 6) & 3 != 3)
    return pa


def el2_read(h: HypState, va: int, n: int) -> bytes:
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
    from pkvm.hyp.mem_protect import get_hyp_state
    from pkvm.hyp.memory import PageState

    if get_hyp_state(h, pa & ~(PAGE_SIZE - 1)) == PageState.SHARED_BORROWED:
        h.locks.preempt("host-read", f"{n}@{pa:#x}")


def el2_write(h: HypState, va: int, data: bytes) -> None:
    pos = 0
    pas = []
    while pos < len(data):  # translate every page first: a fault changes nothing
        chunk = min(len(data) - pos, PAGE_SIZE - ((va + pos) & (PAGE_SIZE - 1)))
        pas.append((el2_translate(h, va + pos, write=True), pos, chunk))
        pos += chunk
    for pa, off, chunk in pas:
        h.mem.write(pa, data[off : off + chunk])


def el2_read_u64(h: HypState, va: int) -> int:
    return int.from_bytes(el2_read(h, va, 8), "little")


def el2_write_u64(h: HypState, va: int, value: int) -> None:
    el2_write(h, va, (value & U64).to_bytes(8, "little"))


def el2_read_fmt(h: HypState, va: int, fmt: str) -> tuple:
    return struct.unpack("<" + fmt, el2_read(h, va, struct.calcsize("<" + fmt)))


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


def pkvm_create_mappings(h: HypState, start: int, end: int, prot: int) -> int:
    with h.pkvm_pgd_lock:
        return pkvm_create_mappings_locked(h, start, end, prot)


# -- struct kvm_hyp_memcache: a stack of pages linked through their first word --------------
def memcache_push(h: HypState, mc: list[int], pa: int) -> None:
    """Push `pa` on a hyp-side memcache [head, nr_pages] (EL2 writes the link in the page)."""
    el2_write_u64(h, hyp_va(pa), mc[0])
    mc[0] = pa
    mc[1] += 1


def memcache_pop(h: HypState, mc: list[int]) -> int | None:
    if not mc[1]:
        return None
    pa = mc[0] & ~(PAGE_SIZE - 1)
    mc[0] = el2_read_u64(h, hyp_va(pa))
    mc[1] -= 1
    return pa
