"""`struct pkvm_hyp_vm` and `struct pkvm_hyp_vcpu` (`include/nvhe/pkvm.h`) as bytes.

Both live in the memory the host donated (`__pkvm_init_vm`, `__pkvm_init_vcpu`), and what the
hyp keeps in them is kept there: a byte-backed attribute reads the donated page directly and
writes it with an EL2 store through the hyp stage-1. So a teardown that returns these pages
without the kernel's `memset` hands the host real state (registers, pointers, handles, the VM's
pgd), and a wipe the model forgot is a page that does not read as zeros.

The layouts (little-endian, C widths):

- `struct pkvm_hyp_vm`: the hyp's own `struct kvm` at offset 0, laid out as the host's
  (`pkvm.abi.host_structs.KVM`: `created_vcpus`, `arch.pkvm.handle`, `is_protected`,
  `is_dying`, `arch.flags`, `arch.vcpu_features`, `arch.mmu.{vmid,pgd_phys,vtcr}`,
  `arch.id_regs[]`); then `host_kvm`, the guest stage-2's `struct kvm_pgtable`
  (`ia_bits`, `start_level`, `pgd`, `mmu`), the pool's range, the lock word, 6.12's
  `nr_vcpus`; and `vcpus[]` (hyp VAs of the hyp vCPUs) from `sizeof(struct pkvm_hyp_vm)`,
  the flexible array `pkvm_get_hyp_vm_size` counts.
- `struct pkvm_hyp_vcpu`: the hyp's `struct kvm_vcpu` at offset 0, laid out as the host's
  (`KVM_VCPU`: `kvm` pointer, `vcpu_id`, `vcpu_idx`, `arch.{cflags,hcr_el2,mdcr_el2,iflags}`,
  `arch.ctxt`, `arch.fault`, `arch.pkvm_memcache`); `host_vcpu` and `loaded_hyp_vcpu` in the
  last 16 bytes of the model's 6144-byte struct (the model's `kvm_vcpu` copy uses fewer bytes
  than Linux's, so the two back-pointers sit at the struct's end instead of after 7056/9024).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from pkvm.abi import sizes
from pkvm.abi.host_structs import CTXT_END, CTXT_START, KVM, KVM_VCPU
from pkvm.hyp.mm import check_store, el2_store_in_page, el2_translate, el2_write, hyp_pa

if TYPE_CHECKING:
    from pkvm.hyp.state import HypState

_AFTER_KVM = (KVM.size + 7) & ~7
HYP_VM = {
    "host_kvm": (_AFTER_KVM, "Q"),
    "pgt.ia_bits": (_AFTER_KVM + 8, "I"),
    "pgt.start_level": (_AFTER_KVM + 12, "i"),
    "pgt.pgd": (_AFTER_KVM + 16, "Q"),
    "pgt.mmu": (_AFTER_KVM + 24, "Q"),
    "pool.range_start": (_AFTER_KVM + 32, "Q"),
    "pool.range_end": (_AFTER_KVM + 40, "Q"),
    "lock": (_AFTER_KVM + 48, "I"),
    "nr_vcpus": (_AFTER_KVM + 52, "I"),
}
HYP_VM_VCPUS = sizes.PKVM_HYP_VM_SIZE  # vcpus[]: the flexible array after the struct
HYP_VCPU = {
    "host_vcpu": (sizes.PKVM_HYP_VCPU_SIZE - 16, "Q"),
    "loaded_hyp_vcpu": (sizes.PKVM_HYP_VCPU_SIZE - 8, "Q"),
}
for _name, _f in KVM.fields.items():
    if _f.count == 1:
        HYP_VM[f"kvm.{_name}"] = (_f.offset, _f.fmt)
for _name, _f in KVM_VCPU.fields.items():
    if _f.count == 1:
        HYP_VCPU[f"vcpu.{_name}"] = (_f.offset, _f.fmt)
_VCPU_USED = max(f.offset + f.size for f in KVM_VCPU.fields.values())
assert _VCPU_USED <= HYP_VCPU["host_vcpu"][0], "the model's kvm_vcpu copy overlaps host_vcpu"
assert HYP_VM["nr_vcpus"][0] + 4 <= HYP_VM_VCPUS
CTXT_OFF = CTXT_START  # `vcpu.arch.ctxt` inside the hyp vCPU
CTXT_LEN = CTXT_END - CTXT_START
ID_REGS = KVM.field("arch.id_regs")


class Field:
    """A scalar kept in the struct's bytes: read from the page, written by an EL2 store.

    A scalar is naturally aligned and the structs start on a page, so it never crosses a page:
    its store is one translation through the hyp stage-1. Storing the value already there is
    elided (it changes nothing a reader can see)."""

    __slots__ = ("off", "size", "unpack_from", "pack", "as_bool")

    def __init__(self, layout: dict[str, tuple[int, str]], name: str, as_bool: bool = False):
        off, fmt = layout[name]
        st = struct.Struct("<" + fmt)
        self.off = off
        self.size = st.size
        self.unpack_from = st.unpack_from
        self.pack = st.pack
        self.as_bool = as_bool

    def __get__(self, obj: HypStruct | None, owner: type) -> object:
        if obj is None:
            return self
        value = self.unpack_from(obj._h.mem.bytes, obj._off + self.off)[0]
        return bool(value) if self.as_bool else value

    def __set__(self, obj: HypStruct, value: int) -> None:
        data = self.pack(int(value))
        h = obj._h
        mem = h.mem.bytes
        start = obj._off + self.off
        if mem[start : start + self.size] != data:
            pa = el2_translate(h, obj.va + self.off, True)
            check_store(h, pa)
            off = pa - h.mem.base
            mem[off : off + self.size] = data


class HypStruct:
    """A hyp structure at hyp VA `va` (donated memory mapped in the hyp stage-1)."""

    def __init__(self, h: HypState, va: int):
        self._h = h
        self.va = va
        self._off = hyp_pa(va) - h.mem.base

    def store(self, off: int, data: bytes) -> None:
        """An EL2 store through the hyp stage-1 (`pkvm.hyp.mm.el2_write`, one page at once)."""
        va = self.va + off
        if (va & 0xFFF) + len(data) <= 0x1000:
            el2_store_in_page(self._h, va, data)
        else:
            el2_write(self._h, va, data)

    def load(self, off: int, n: int) -> bytes:
        start = self._off + off
        return bytes(self._h.mem.bytes[start : start + n])


class Memcache:
    """`arch.pkvm_memcache` of a hyp vCPU: [head, nr_pages] as the memcache helpers use it."""

    __slots__ = ("_s",)
    _HEAD = KVM_VCPU.offset("arch.pkvm_memcache.head")
    _NR = KVM_VCPU.offset("arch.pkvm_memcache.nr_pages")

    def __init__(self, s: HypStruct):
        self._s = s

    def __getitem__(self, i: int) -> int:
        return int.from_bytes(self._s.load(self._NR if i else self._HEAD, 8), "little")

    def __setitem__(self, i: int, value: int) -> None:
        self._s.store(self._NR if i else self._HEAD, (value & (2**64 - 1)).to_bytes(8, "little"))

    def __iter__(self):
        return iter((self[0], self[1]))

    def __repr__(self) -> str:
        return f"[{self[0]:#x}, {self[1]}]"


def vcpus_slot(idx: int) -> int:
    """Offset of `vcpus[idx]` in the hyp VM."""
    return HYP_VM_VCPUS + 8 * idx
