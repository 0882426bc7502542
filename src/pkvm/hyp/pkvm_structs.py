"""`struct pkvm_hyp_vm` and `struct pkvm_hyp_vcpu` (`include/nvhe/pkvm.h`) as bytes.

Both live in the memory the host donated (`__pkvm_init_vm`, `__pkvm_init_vcpu`), and what the
hyp keeps in them is kept there: a byte-backed attribute reads the donated page directly and
writes it with an EL2 store through the hyp stage-1. So a teardown that returns these pages
without the kernel's `memset` hands the host real state (registers, pointers, handles, the VM's
pgd), and a wipe the model forgot is a page that does not read as zeros.

The layouts (little-endian, C widths):

- `struct pkvm_hyp_vm`: the hyp's own `struct kvm` at offset 0, laid out as the host's
  (`pkvm.abi.host_structs.KVM`: `created_vcpus`, `arch.pkvm.handle`, `is_protected`,
  `is_dying`, `arch.flags`, `arch.vcpu_features`, `arch.mmu.{vmid,pgd_phys}`,
  `arch.id_regs[]`); then `host_kvm`, the guest stage-2's `struct kvm_pgtable`
  (`ia_bits`, `start_level`, `pgd`, `mmu`), the VM pool's range, 6.12's `nr_vcpus` (the
  lock and the allocator's free lists stay Python objects beside it); and `vcpus[]` (hyp
  VAs of the hyp vCPUs) from `sizeof(struct pkvm_hyp_vm)`, the flexible array that
  `pkvm_get_hyp_vm_size` counts.
- `struct pkvm_hyp_vcpu`: the hyp's `struct kvm_vcpu` at offset 0, laid out as the host's
  (`KVM_VCPU`: `kvm` pointer, `vcpu_id`, `vcpu_idx`, `arch.{cflags,hcr_el2,mdcr_el2,iflags}`,
  `arch.ctxt`, `arch.fault`, `arch.pkvm_memcache`); `host_vcpu` and `loaded_hyp_vcpu` in the
  last 16 bytes of the model's 6144-byte struct (the model's `kvm_vcpu` copy uses fewer bytes
  than Linux's, so the two back-pointers sit at the struct's end instead of after 7056/9024).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final, TypedDict

from mypy_extensions import mypyc_attr

from pkvm.abi import sizes
from pkvm.abi.host_structs import CTXT_END, CTXT_START, KVM, KVM_ARCH_FLAG_ID_REGS_INITIALIZED, KVM_VCPU
from pkvm.hyp.mm import U64, check_store, el2_translate, el2_write, el2_write_u64, hyp_pa, hyp_va

if TYPE_CHECKING:
    from pkvm.hyp.page_alloc import HypPool
    from pkvm.hyp.pgtable import KvmPgtable
    from pkvm.hyp.pkvm import GuestMmOps
    from pkvm.hyp.spinlock import HypSpinLock
    from pkvm.hyp.state import HypState
    from pkvm.hyp.switch import _Engine
    from pkvm.machine.cpu import Core

_AFTER_KVM: Final = (KVM.size + 7) & ~7
HYP_VM = {
    "host_kvm": (_AFTER_KVM, "Q"),
    "pgt.ia_bits": (_AFTER_KVM + 8, "I"),
    "pgt.start_level": (_AFTER_KVM + 12, "i"),
    "pgt.pgd": (_AFTER_KVM + 16, "Q"),
    "pgt.mmu": (_AFTER_KVM + 24, "Q"),
    "pool.range_start": (_AFTER_KVM + 32, "Q"),
    "pool.range_end": (_AFTER_KVM + 40, "Q"),
    "nr_vcpus": (_AFTER_KVM + 48, "I"),
}
HYP_VM_VCPUS: Final = sizes.PKVM_HYP_VM_SIZE  # vcpus[]: the flexible array after the struct
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
_VCPU_USED: Final = max(f.offset + f.size for f in KVM_VCPU.fields.values())
assert _VCPU_USED <= HYP_VCPU["host_vcpu"][0], "the model's kvm_vcpu copy overlaps host_vcpu"
assert HYP_VM["nr_vcpus"][0] + 4 <= HYP_VM_VCPUS
CTXT_OFF: Final = CTXT_START  # `vcpu.arch.ctxt` inside the hyp vCPU
CTXT_LEN: Final = CTXT_END - CTXT_START
ID_REGS: Final = KVM.field("arch.id_regs")
_ID_REGS_ST: Final = struct.Struct(f"<{ID_REGS.count}Q")
assert not ID_REGS.offset & 7  # `id_reg` reads a word of the page (the VM starts one)


# An unsigned field's width in bits by its format: read as bits of the aligned 64-bit word that
# holds it (a signed one is unpacked).
_UNSIGNED_BITS: Final = {"Q": 64, "I": 32, "H": 16, "B": 8}
Scalar = tuple[int, struct.Struct, int]  # offset, the C width's packer, unsigned bits or 0


def scalar(layout: dict[str, tuple[int, str]], name: str) -> Scalar:
    """A scalar field of a layout: its offset, its C width's packer and (unsigned) its width."""
    off, fmt = layout[name]
    return off, struct.Struct("<" + fmt), _UNSIGNED_BITS.get(fmt, 0)


def struct_get(s: HypStruct, f: Scalar) -> int:
    """A scalar field of `s`, read from its page. An unsigned one (naturally aligned, as every
    field is) is its bits of the 64-bit word holding it: one load of the RAM's word view, no
    `unpack_from` method call and tuple."""
    off, st, bits = f
    pos = s._off + off
    if bits and (pos & 7) + (bits >> 3) <= 8:  # (always, aligned: checked all the same)
        word: int = s._h.mem.u64[pos >> 3]
        return word if bits == 64 else (word >> ((pos & 7) << 3)) & ((1 << bits) - 1)
    value: int = st.unpack_from(s._h.mem.bytes, pos)[0]
    return value


def struct_set(s: HypStruct, f: Scalar, value: int) -> None:
    """A scalar field's store, elided when the field holds `value` already (it changes nothing
    a reader can see). The fields' integer formats pack each value to one byte string, so the
    value read back equal means the bytes are equal: decided on the integer, with no bytes
    packed or sliced for a store that is elided."""
    if struct_get(s, f) != value:
        off, st, bits = f
        if bits == 64 and not (s._off + off) & 7 and 0 <= value <= U64:
            # An aligned u64 in range (what `pack` accepts): `store_scalar`'s translation and
            # store check, then a word store of the same 8 bytes, without packing them.
            h = s._h
            pa = el2_translate(h, s.va + off, True)
            check_store(h, pa)
            h.mem.write_u64(pa, int(value))
            return
        store_scalar(s, off, st.pack(int(value)))


def store_scalar(s: HypStruct, off: int, data: bytes) -> None:
    """A scalar's EL2 store through the hyp stage-1 (a scalar is naturally aligned and the
    structs start on a page, so it never crosses a page: one translation)."""
    h = s._h
    pa = el2_translate(h, s.va + off, True)
    check_store(h, pa)
    h.mem.write(pa, data)


def struct_load(s: HypStruct, off: int, n: int) -> bytes:
    """`s.load(off, n)`: `n` bytes of the struct from its page."""
    start = s._off + off
    return bytes(s._h.mem.bytes[start : start + n])


class VcpuExitData(TypedDict, total=False):
    """What the run path keeps beside a hyp vCPU between runs (switch.py)."""

    s2_pgd: int  # 6.12: the pgd of the host-managed stage-2, read at each flush
    synced: bytes  # the context the last sync copied out of the core (arch.ctxt bytes)
    synced_sys: list[int]  # the system registers packed into `synced` (set with it)
    hcr_vi: int  # the HCR_EL2.VI last written into the core


# The structs are native classes whose fields are properties: compiled, `vcpu.hcr_el2` is a
# direct call of the getter (a descriptor's `__get__` on a Python class is a type lookup and an
# argument parse per access). Serializable: a snapshot (`pkvm.snapshot`) pickles them by their
# attributes, made again without `__init__` (whose stores would write the pages).
@mypyc_attr(serializable=True)
class HypStruct:
    """A hyp structure at hyp VA `va` (donated memory mapped in the hyp stage-1)."""

    def __init__(self, h: HypState, va: int):
        self._h = h
        self.va = va
        self._off = hyp_pa(va) - h.mem.base

    def store(self, off: int, data: bytes) -> None:
        """An EL2 store through the hyp stage-1 (`pkvm.hyp.mm.el2_write`)."""
        el2_write(self._h, self.va + off, data)

    def load(self, off: int, n: int) -> bytes:
        return struct_load(self, off, n)


class Memcache:
    """`arch.pkvm_memcache` of a hyp vCPU: [head, nr_pages] as the memcache helpers use it."""

    __slots__ = ("_h", "_va", "_off")
    _HEAD = KVM_VCPU.offset("arch.pkvm_memcache.head")
    _NR = KVM_VCPU.offset("arch.pkvm_memcache.nr_pages")

    def __init__(self, h: HypState, va: int, off: int):
        """The struct's hyp VA and RAM offset (`HypStruct.va`, `_off`), not the struct: the
        struct holds its memcache, and a reference back would be a cycle per vCPU."""
        self._h = h
        self._va = va
        self._off = off

    def __reduce__(self) -> tuple[Any, ...]:  # as `Tlb.__reduce__` (machine/mmu.py)
        return (Memcache, (self._h, self._va, self._off), self.__getstate__())

    def __getitem__(self, i: int) -> int:
        """A word of the struct's page (both fields are aligned u64s: one load of the RAM's
        word view, no `unpack_from` and tuple)."""
        value: int = self._h.mem.u64[(self._off + (self._NR if i else self._HEAD)) >> 3]
        return value

    def __setitem__(self, i: int, value: int) -> None:
        """`store` of the 8 bytes of `value` (aligned: `el2_write_u64`, the same translation,
        store check and word store, without the bytes)."""
        el2_write_u64(self._h, self._va + (self._NR if i else self._HEAD), value)

    def __iter__(self) -> Iterator[int]:
        return iter((self[0], self[1]))

    def __repr__(self) -> str:
        return f"[{self[0]:#x}, {self[1]}]"


# `Memcache`'s fields are aligned words (the struct starts a page): a word load, a word store.
assert not KVM_VCPU.offset("arch.pkvm_memcache.head") & 7
assert not KVM_VCPU.offset("arch.pkvm_memcache.nr_pages") & 7


def vcpus_slot(idx: int) -> int:
    """Offset of `vcpus[idx]` in the hyp VM."""
    return HYP_VM_VCPUS + 8 * idx


_HOST_VCPU: Final = scalar(HYP_VCPU, "host_vcpu")
_LOADED: Final = scalar(HYP_VCPU, "loaded_hyp_vcpu")
_HCR_EL2: Final = scalar(HYP_VCPU, "vcpu.arch.hcr_el2")
_MDCR_EL2: Final = scalar(HYP_VCPU, "vcpu.arch.mdcr_el2")
_IFLAGS: Final = scalar(HYP_VCPU, "vcpu.arch.iflags")
_FAULT_ESR: Final = scalar(HYP_VCPU, "vcpu.arch.fault.esr_el2")
_VCPU_IDX: Final = scalar(HYP_VCPU, "vcpu.vcpu_idx")
_VCPU_ID: Final = scalar(HYP_VCPU, "vcpu.vcpu_id")
_HCRX_EL2: Final = scalar(HYP_VCPU, "vcpu.arch.hcrx_el2")
_CFLAGS: Final = scalar(HYP_VCPU, "vcpu.arch.cflags")
_FAULT_FAR: Final = scalar(HYP_VCPU, "vcpu.arch.fault.far_el2")
_FAULT_HPFAR: Final = scalar(HYP_VCPU, "vcpu.arch.fault.hpfar_el2")
_KVM: Final = scalar(HYP_VCPU, "vcpu.kvm")


@mypyc_attr(serializable=True)
class PkvmHypVcpu(HypStruct):
    """`struct pkvm_hyp_vcpu`, in the pages donated for it (`pkvm_structs`)."""

    def __init__(self, vm: PkvmHypVm, host_vcpu: int, vcpu_idx: int, vcpu_id: int,
                 mem_va: int, cflags: int = 0):
        super().__init__(vm._h, mem_va)
        self.vm = vm
        self.mem_va = mem_va  # the donated pages holding this struct
        self.engine: Core | None = None  # the CPU the guest runs on (switch.py)
        self.exit_data: VcpuExitData = {}
        self.memcache = Memcache(self._h, self.va, self._off)  # arch.pkvm_memcache
        struct_set(self, _KVM, vm.va)  # vcpu.kvm
        self.host_vcpu = host_vcpu
        self.vcpu_idx = vcpu_idx
        self.vcpu_id = vcpu_id
        self.cflags = cflags

    @property
    def host_vcpu(self) -> int:  # hyp VA of the host's struct kvm_vcpu (pinned)
        return struct_get(self, _HOST_VCPU)

    @host_vcpu.setter
    def host_vcpu(self, value: int) -> None:
        struct_set(self, _HOST_VCPU, value)

    @property
    def hcr_el2(self) -> int:
        return struct_get(self, _HCR_EL2)

    @hcr_el2.setter
    def hcr_el2(self, value: int) -> None:
        struct_set(self, _HCR_EL2, value)

    @property
    def mdcr_el2(self) -> int:
        return struct_get(self, _MDCR_EL2)

    @mdcr_el2.setter
    def mdcr_el2(self, value: int) -> None:
        struct_set(self, _MDCR_EL2, value)

    @property
    def iflags(self) -> int:
        return struct_get(self, _IFLAGS)

    @iflags.setter
    def iflags(self, value: int) -> None:
        struct_set(self, _IFLAGS, value)

    @property
    def fault_esr(self) -> int:
        return struct_get(self, _FAULT_ESR)

    @fault_esr.setter
    def fault_esr(self, value: int) -> None:
        struct_set(self, _FAULT_ESR, value)

    @property
    def vcpu_idx(self) -> int:
        return struct_get(self, _VCPU_IDX)

    @vcpu_idx.setter
    def vcpu_idx(self, value: int) -> None:
        struct_set(self, _VCPU_IDX, value)

    @property
    def vcpu_id(self) -> int:
        return struct_get(self, _VCPU_ID)

    @vcpu_id.setter
    def vcpu_id(self, value: int) -> None:
        struct_set(self, _VCPU_ID, value)

    @property
    def hcrx_el2(self) -> int:
        return struct_get(self, _HCRX_EL2)

    @hcrx_el2.setter
    def hcrx_el2(self, value: int) -> None:
        struct_set(self, _HCRX_EL2, value)

    @property
    def cflags(self) -> int:
        return struct_get(self, _CFLAGS)

    @cflags.setter
    def cflags(self, value: int) -> None:
        struct_set(self, _CFLAGS, value)

    @property
    def fault_far(self) -> int:
        return struct_get(self, _FAULT_FAR)

    @fault_far.setter
    def fault_far(self, value: int) -> None:
        struct_set(self, _FAULT_FAR, value)

    @property
    def fault_hpfar(self) -> int:
        return struct_get(self, _FAULT_HPFAR)

    @fault_hpfar.setter
    def fault_hpfar(self, value: int) -> None:
        struct_set(self, _FAULT_HPFAR, value)

    @property
    def ctxt(self) -> bytes:
        """`vcpu.arch.ctxt` as the hyp keeps it between flush and sync."""
        return struct_load(self, CTXT_OFF, CTXT_LEN)

    @ctxt.setter
    def ctxt(self, value: bytes) -> None:
        data = value if len(value) == CTXT_LEN else value[:CTXT_LEN]
        el2_write(self._h, self.va + CTXT_OFF, data)  # one EL2 store

    @property
    def loaded_on(self) -> int | None:
        """`loaded_hyp_vcpu`: the per-CPU slot holding the vCPU (the model's per-CPU slots sit
        in the hyp image, 8 bytes each), read back as the CPU it is loaded on."""
        ptr = struct_get(self, _LOADED)
        return None if not ptr else (ptr - loaded_slot(self._h, 0)) >> 3

    @loaded_on.setter
    def loaded_on(self, cpu: int | None) -> None:
        struct_set(self, _LOADED, 0 if cpu is None else loaded_slot(self._h, cpu))


def loaded_slot(h: HypState, cpu: int) -> int:
    return hyp_va(h.carve.image) + 8 * cpu


_VM_HANDLE: Final = scalar(HYP_VM, "kvm.arch.pkvm.handle")
_VM_IS_PROTECTED: Final = scalar(HYP_VM, "kvm.arch.pkvm.is_protected")  # C bools
_VM_IS_DYING: Final = scalar(HYP_VM, "kvm.arch.pkvm.is_dying")
_VM_CREATED_VCPUS: Final = scalar(HYP_VM, "kvm.created_vcpus")
_VM_FLAGS: Final = scalar(HYP_VM, "kvm.arch.flags")
_VM_VCPU_FEATURES: Final = scalar(HYP_VM, "kvm.arch.vcpu_features")
_VM_PGD_PA: Final = scalar(HYP_VM, "kvm.arch.mmu.pgd_phys")
_VM_HOST_KVM: Final = scalar(HYP_VM, "host_kvm")
_VM_NR_VCPUS: Final = scalar(HYP_VM, "nr_vcpus")
_VM_VMID: Final = scalar(HYP_VM, "kvm.arch.mmu.vmid")
_VM_PGT_PGD: Final = scalar(HYP_VM, "pgt.pgd")
_VM_PGT_IA_BITS: Final = scalar(HYP_VM, "pgt.ia_bits")
_VM_PGT_START_LEVEL: Final = scalar(HYP_VM, "pgt.start_level")
_VM_PGT_MMU: Final = scalar(HYP_VM, "pgt.mmu")
_VM_POOL_START: Final = scalar(HYP_VM, "pool.range_start")
_VM_POOL_END: Final = scalar(HYP_VM, "pool.range_end")


@mypyc_attr(serializable=True)
class PkvmHypVm(HypStruct):
    """`struct pkvm_hyp_vm`, in the pages donated for it (`pkvm_structs`)."""

    # Set by `__pkvm_init_vm` before the VM enters the table (`set_pool`, `set_pgt`).
    pool: HypPool
    pgt: KvmPgtable
    mm_ops: GuestMmOps

    def __init__(self, h: HypState, handle: int, host_kvm: int, created_vcpus: int,
                 is_protected: bool, vm_va: int, vm_size: int, pgd_pa: int, pgd_size: int,
                 lock: HypSpinLock, flags: int = 0, vcpu_features: int = 0):
        super().__init__(h, vm_va)
        self.vm_va = vm_va  # its first page's refcount is the VM's
        self.vm_size = vm_size
        self.pgd_size = pgd_size
        self.lock = lock
        self.vcpus: list[PkvmHypVcpu | None] = [None] * created_vcpus
        self.engine: _Engine | None = None  # the CPU emulator its vCPUs run on (switch.py)
        self.handle = handle
        self.host_kvm = host_kvm
        self.created_vcpus = created_vcpus
        self.is_protected = is_protected
        self.pgd_pa = pgd_pa
        self.flags = flags
        self.vcpu_features = vcpu_features
        struct_set(self, _VM_VMID, self.vmid)

    @property
    def handle(self) -> int:
        return struct_get(self, _VM_HANDLE)

    @handle.setter
    def handle(self, value: int) -> None:
        struct_set(self, _VM_HANDLE, value)

    @property
    def created_vcpus(self) -> int:
        return struct_get(self, _VM_CREATED_VCPUS)

    @created_vcpus.setter
    def created_vcpus(self, value: int) -> None:
        struct_set(self, _VM_CREATED_VCPUS, value)

    @property
    def flags(self) -> int:
        return struct_get(self, _VM_FLAGS)

    @flags.setter
    def flags(self, value: int) -> None:
        struct_set(self, _VM_FLAGS, value)

    @property
    def vcpu_features(self) -> int:
        return struct_get(self, _VM_VCPU_FEATURES)

    @vcpu_features.setter
    def vcpu_features(self, value: int) -> None:
        struct_set(self, _VM_VCPU_FEATURES, value)

    @property
    def pgd_pa(self) -> int:
        return struct_get(self, _VM_PGD_PA)

    @pgd_pa.setter
    def pgd_pa(self, value: int) -> None:
        struct_set(self, _VM_PGD_PA, value)

    @property
    def host_kvm(self) -> int:  # hyp VA of the host's struct kvm (pinned)
        return struct_get(self, _VM_HOST_KVM)

    @host_kvm.setter
    def host_kvm(self, value: int) -> None:
        struct_set(self, _VM_HOST_KVM, value)

    @property
    def nr_vcpus(self) -> int:  # 6.12
        return struct_get(self, _VM_NR_VCPUS)

    @nr_vcpus.setter
    def nr_vcpus(self, value: int) -> None:
        struct_set(self, _VM_NR_VCPUS, value)

    @property
    def is_protected(self) -> bool:
        return struct_get(self, _VM_IS_PROTECTED) != 0

    @is_protected.setter
    def is_protected(self, value: bool) -> None:
        struct_set(self, _VM_IS_PROTECTED, 1 if value else 0)

    @property
    def is_dying(self) -> bool:
        return struct_get(self, _VM_IS_DYING) != 0

    @is_dying.setter
    def is_dying(self, value: bool) -> None:
        struct_set(self, _VM_IS_DYING, 1 if value else 0)

    @property
    def vmid(self) -> int:
        return self.handle - sizes.HANDLE_OFFSET + 1

    def store_vcpu_ptr(self, idx: int, vcpu: PkvmHypVcpu) -> None:
        """The bytes of `hyp_vm->vcpus[idx] = hyp_vcpu` (after the slot list took it)."""
        self.store(vcpus_slot(idx), vcpu.va.to_bytes(8, "little"))

    def set_pool(self, pool: HypPool) -> None:
        self.pool = pool
        struct_set(self, _VM_POOL_START, pool.range_start)
        struct_set(self, _VM_POOL_END, pool.range_end)

    def set_pgt(self, pgt: KvmPgtable) -> None:
        """The guest stage-2 (`hyp_vm->pgt`, whose `mmu` is `&hyp_vm->kvm.arch.mmu`)."""
        self.pgt = pgt
        struct_set(self, _VM_PGT_PGD, hyp_va(pgt.pgd) if pgt.pgd else 0)
        struct_set(self, _VM_PGT_IA_BITS, pgt.ia_bits)
        struct_set(self, _VM_PGT_START_LEVEL, pgt.start_level)
        struct_set(self, _VM_PGT_MMU, self.va + _VM_VMID[0])

    @property
    def id_regs_initialized(self) -> bool:
        return bool(self.flags & KVM_ARCH_FLAG_ID_REGS_INITIALIZED)

    @property
    def id_regs(self) -> tuple[int, ...]:
        raw = self.load(ID_REGS.offset, ID_REGS.size)
        return _ID_REGS_ST.unpack(raw)

    def id_reg(self, i: int) -> int:
        """`id_regs[i]` (0 past the array): one word of the struct's page."""
        if not 0 <= i < ID_REGS.count:
            return 0
        word: int = self._h.mem.u64[((self._off + ID_REGS.offset) >> 3) + i]
        return word

    def set_id_regs(self, regs: tuple[int, ...]) -> None:
        """Copy the host's ID registers once (`pkvm_init_features_from_host`'s sysregs)."""
        data = _ID_REGS_ST.pack(*regs) if len(regs) == ID_REGS.count else struct.pack(
            f"<{len(regs)}Q", *regs)
        self.store(ID_REGS.offset, data)
        self.flags = self.flags | KVM_ARCH_FLAG_ID_REGS_INITIALIZED
