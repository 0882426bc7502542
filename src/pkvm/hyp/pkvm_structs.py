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
from typing import TYPE_CHECKING, Any, Final, TypedDict, overload

from mypy_extensions import mypyc_attr

from pkvm.abi import sizes
from pkvm.abi.host_structs import CTXT_END, CTXT_START, KVM, KVM_ARCH_FLAG_ID_REGS_INITIALIZED, KVM_VCPU
from pkvm.hyp.mm import check_store, el2_translate, el2_write, hyp_pa, hyp_va

if TYPE_CHECKING:
    from pkvm.hyp.page_alloc import HypPool
    from pkvm.hyp.pgtable import KvmPgtable
    from pkvm.hyp.pkvm import GuestMmOps
    from pkvm.hyp.spinlock import HypSpinLock
    from pkvm.hyp.state import HypState
    from pkvm.hyp.switch import _Engine
    from pkvm.machine.cpu import Core

_AFTER_KVM = (KVM.size + 7) & ~7
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
# Offsets of the hyp vCPU's fields the run path reads and stores by direct calls (`struct_u64`)
HOST_VCPU_OFF: Final = HYP_VCPU["host_vcpu"][0]
LOADED_OFF: Final = HYP_VCPU["loaded_hyp_vcpu"][0]
HCR_OFF: Final = HYP_VCPU["vcpu.arch.hcr_el2"][0]
MDCR_OFF: Final = HYP_VCPU["vcpu.arch.mdcr_el2"][0]
IFLAGS_OFF: Final = HYP_VCPU["vcpu.arch.iflags"][0]
FAULT_ESR_OFF: Final = HYP_VCPU["vcpu.arch.fault.esr_el2"][0]
IS_PROTECTED_OFF: Final = HYP_VM["kvm.arch.pkvm.is_protected"][0]
IS_DYING_OFF: Final = HYP_VM["kvm.arch.pkvm.is_dying"][0]
assert HYP_VM["kvm.arch.pkvm.is_protected"][1] == HYP_VM["kvm.arch.pkvm.is_dying"][1] == "B"
assert all(HYP_VCPU[n][1] == "Q" for n in ("host_vcpu", "loaded_hyp_vcpu", "vcpu.arch.hcr_el2",
                                           "vcpu.arch.mdcr_el2", "vcpu.arch.iflags"))
CTXT_LEN = CTXT_END - CTXT_START
_U64: Final = struct.Struct("<Q")
ID_REGS = KVM.field("arch.id_regs")


# The descriptors are Python classes too (methods compiled): mypyc's native classes give
# `__get__` its slot but not `__set__`.
@mypyc_attr(native_class=False)
class Field:
    """A scalar kept in the struct's bytes: read from the page, written by an EL2 store.

    A scalar is naturally aligned and the structs start on a page, so it never crosses a page:
    its store is one translation through the hyp stage-1. Storing the value already there is
    elided (it changes nothing a reader can see)."""

    __slots__ = ("off", "size", "unpack_from", "pack")

    def __init__(self, layout: dict[str, tuple[int, str]], name: str):
        off, fmt = layout[name]
        st = struct.Struct("<" + fmt)
        self.off = off
        self.size = st.size
        self.unpack_from = st.unpack_from
        self.pack = st.pack

    @overload
    def __get__(self, obj: None, owner: type) -> Field: ...
    @overload
    def __get__(self, obj: HypStruct, owner: type) -> int: ...
    def __get__(self, obj: HypStruct | None, owner: type) -> Field | int:
        if obj is None:
            return self
        value: int = self.unpack_from(obj._h.mem.bytes, obj._off + self.off)[0]
        return value

    def __set__(self, obj: HypStruct, value: int) -> None:
        store_scalar(obj, self.off, self.pack(int(value)))


@mypyc_attr(native_class=False)
class BoolField(Field):
    """A C `bool` kept in the struct's bytes."""

    __slots__ = ()

    @overload
    def __get__(self, obj: None, owner: type) -> BoolField: ...
    @overload
    def __get__(self, obj: HypStruct, owner: type) -> bool: ...
    def __get__(self, obj: HypStruct | None, owner: type) -> BoolField | bool:
        if obj is None:
            return self
        return bool(self.unpack_from(obj._h.mem.bytes, obj._off + self.off)[0])


@mypyc_attr(native_class=False)
class CtxtField:
    """`vcpu.arch.ctxt` as the hyp keeps it between flush and sync (a descriptor, as `Field`:
    a Python class compiled with mypyc takes no property setter)."""

    @overload
    def __get__(self, obj: None, owner: type) -> CtxtField: ...
    @overload
    def __get__(self, obj: HypStruct, owner: type) -> bytes: ...
    def __get__(self, obj: HypStruct | None, owner: type) -> CtxtField | bytes:
        return self if obj is None else hyp_vcpu_ctxt(obj)

    def __set__(self, obj: HypStruct, raw: bytes) -> None:
        set_hyp_vcpu_ctxt(obj, raw)


@mypyc_attr(native_class=False)
class LoadedOnField:
    """`loaded_hyp_vcpu`: the per-CPU slot holding the vCPU (the model's per-CPU slots sit in
    the hyp image, 8 bytes each), read back as the CPU it is loaded on."""

    @overload
    def __get__(self, obj: None, owner: type) -> LoadedOnField: ...
    @overload
    def __get__(self, obj: PkvmHypVcpu, owner: type) -> int | None: ...
    def __get__(self, obj: PkvmHypVcpu | None, owner: type) -> LoadedOnField | int | None:
        if obj is None:
            return self
        return hyp_vcpu_loaded_on(obj)

    def __set__(self, obj: PkvmHypVcpu, cpu: int | None) -> None:
        set_hyp_vcpu_loaded_on(obj, cpu)


# The same reads and stores as direct calls, for the compiled run path (`switch.py`): a call of
# a module function from compiled code skips the descriptor protocol (a type lookup and an
# argument parse per access), and does exactly what the field's descriptor does.
def struct_u64(s: HypStruct, off: int) -> int:
    """The 8-byte field at `off` of `s`, read from its page as `Field.__get__` reads it."""
    value: int = _U64.unpack_from(s._h.mem.bytes, s._off + off)[0]
    return value


def struct_bool(s: HypStruct, off: int) -> bool:
    """The C `bool` at `off` of `s` (`BoolField.__get__`)."""
    return s._h.mem.bytes[s._off + off] != 0


def set_struct_u64(s: HypStruct, off: int, value: int) -> None:
    """`Field.__set__` of an 8-byte field."""
    store_scalar(s, off, _U64.pack(value))


def store_scalar(s: HypStruct, off: int, data: bytes) -> None:
    """A scalar's EL2 store through the hyp stage-1 (a scalar is naturally aligned: one page,
    one translation), elided when the bytes there are `data` already."""
    h = s._h
    mem = h.mem.bytes
    start = s._off + off
    n = len(data)
    if mem[start : start + n] != data:
        pa = el2_translate(h, s.va + off, True)
        check_store(h, pa)
        pos = pa - h.mem.base
        mem[pos : pos + n] = data


def hyp_vcpu_loaded_on(s: HypStruct) -> int | None:
    """`PkvmHypVcpu.loaded_on`: the CPU whose per-CPU slot `loaded_hyp_vcpu` points at."""
    ptr = struct_u64(s, LOADED_OFF)
    return None if not ptr else (ptr - loaded_slot(s._h, 0)) >> 3


def set_hyp_vcpu_loaded_on(s: HypStruct, cpu: int | None) -> None:
    """`PkvmHypVcpu.loaded_on = cpu`."""
    set_struct_u64(s, LOADED_OFF, 0 if cpu is None else loaded_slot(s._h, cpu))


def struct_load(s: HypStruct, off: int, n: int) -> bytes:
    """`s.load(off, n)`: `n` bytes of the struct from its page."""
    start = s._off + off
    return bytes(s._h.mem.bytes[start : start + n])


def hyp_vcpu_ctxt(s: HypStruct) -> bytes:
    """`vcpu.arch.ctxt` of a hyp vCPU (`PkvmHypVcpu.ctxt`)."""
    return struct_load(s, CTXT_OFF, CTXT_LEN)


def set_hyp_vcpu_ctxt(s: HypStruct, raw: bytes) -> None:
    """`PkvmHypVcpu.ctxt = raw`: one EL2 store of the context's bytes."""
    el2_write(s._h, s.va + CTXT_OFF, raw[:CTXT_LEN])


class VcpuExitData(TypedDict, total=False):
    """What the run path keeps beside a hyp vCPU between runs (switch.py)."""

    s2_pgd: int  # 6.12: the pgd of the host-managed stage-2, read at each flush
    synced: bytes  # the context the last sync copied out of the core (arch.ctxt bytes)
    hcr_vi: int  # the HCR_EL2.VI last written into the core


# A struct's fields are descriptors (`Field`) on its class, which a mypyc native class would take
# for instance attributes' defaults: the structs stay Python classes (their methods compiled).
@mypyc_attr(native_class=False)
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

    __slots__ = ("_s",)
    _HEAD = KVM_VCPU.offset("arch.pkvm_memcache.head")
    _NR = KVM_VCPU.offset("arch.pkvm_memcache.nr_pages")

    def __init__(self, s: HypStruct):
        self._s = s

    def __reduce__(self) -> tuple[Any, ...]:  # as `Tlb.__reduce__` (machine/mmu.py)
        return (Memcache, (self._s,), self.__getstate__())

    def __getitem__(self, i: int) -> int:
        s = self._s
        value: int = _U64.unpack_from(s._h.mem.bytes, s._off + (self._NR if i else self._HEAD))[0]
        return value

    def __setitem__(self, i: int, value: int) -> None:
        self._s.store(self._NR if i else self._HEAD, (value & (2**64 - 1)).to_bytes(8, "little"))

    def __iter__(self) -> Iterator[int]:
        return iter((self[0], self[1]))

    def __repr__(self) -> str:
        return f"[{self[0]:#x}, {self[1]}]"


def vcpus_slot(idx: int) -> int:
    """Offset of `vcpus[idx]` in the hyp VM."""
    return HYP_VM_VCPUS + 8 * idx


@mypyc_attr(native_class=False)
class PkvmHypVcpu(HypStruct):
    """`struct pkvm_hyp_vcpu`, in the pages donated for it (`pkvm_structs`)."""

    host_vcpu = Field(HYP_VCPU, "host_vcpu")  # hyp VA of the host's struct kvm_vcpu (pinned)
    vcpu_idx = Field(HYP_VCPU, "vcpu.vcpu_idx")
    vcpu_id = Field(HYP_VCPU, "vcpu.vcpu_id")
    hcr_el2 = Field(HYP_VCPU, "vcpu.arch.hcr_el2")
    mdcr_el2 = Field(HYP_VCPU, "vcpu.arch.mdcr_el2")
    hcrx_el2 = Field(HYP_VCPU, "vcpu.arch.hcrx_el2")
    cflags = Field(HYP_VCPU, "vcpu.arch.cflags")
    iflags = Field(HYP_VCPU, "vcpu.arch.iflags")
    fault_esr = Field(HYP_VCPU, "vcpu.arch.fault.esr_el2")
    fault_far = Field(HYP_VCPU, "vcpu.arch.fault.far_el2")
    fault_hpfar = Field(HYP_VCPU, "vcpu.arch.fault.hpfar_el2")
    _kvm = Field(HYP_VCPU, "vcpu.kvm")
    _loaded = Field(HYP_VCPU, "loaded_hyp_vcpu")
    ctxt = CtxtField()
    loaded_on = LoadedOnField()

    def __init__(self, vm: "PkvmHypVm", host_vcpu: int, vcpu_idx: int, vcpu_id: int,
                 mem_va: int, cflags: int = 0):
        super().__init__(vm._h, mem_va)
        self.vm = vm
        self.mem_va = mem_va  # the donated pages holding this struct
        self.engine: Core | None = None  # the CPU the guest runs on (switch.py)
        self.exit_data: VcpuExitData = {}
        self.memcache = Memcache(self)  # arch.pkvm_memcache: head, nr_pages
        self._kvm = vm.va
        self.host_vcpu = host_vcpu
        self.vcpu_idx = vcpu_idx
        self.vcpu_id = vcpu_id
        self.cflags = cflags



def loaded_slot(h: HypState, cpu: int) -> int:
    return hyp_va(h.carve.image) + 8 * cpu


@mypyc_attr(native_class=False)
class PkvmHypVm(HypStruct):
    """`struct pkvm_hyp_vm`, in the pages donated for it (`pkvm_structs`)."""

    handle = Field(HYP_VM, "kvm.arch.pkvm.handle")
    created_vcpus = Field(HYP_VM, "kvm.created_vcpus")
    is_protected = BoolField(HYP_VM, "kvm.arch.pkvm.is_protected")
    is_dying = BoolField(HYP_VM, "kvm.arch.pkvm.is_dying")
    flags = Field(HYP_VM, "kvm.arch.flags")
    vcpu_features = Field(HYP_VM, "kvm.arch.vcpu_features")
    pgd_pa = Field(HYP_VM, "kvm.arch.mmu.pgd_phys")
    host_kvm = Field(HYP_VM, "host_kvm")  # hyp VA of the host's struct kvm (pinned)
    nr_vcpus = Field(HYP_VM, "nr_vcpus")  # 6.12
    _vmid = Field(HYP_VM, "kvm.arch.mmu.vmid")
    _pgt_pgd = Field(HYP_VM, "pgt.pgd")
    _pgt_ia_bits = Field(HYP_VM, "pgt.ia_bits")
    _pgt_start_level = Field(HYP_VM, "pgt.start_level")
    _pgt_mmu = Field(HYP_VM, "pgt.mmu")
    _pool_start = Field(HYP_VM, "pool.range_start")
    _pool_end = Field(HYP_VM, "pool.range_end")
    # Set by `__pkvm_init_vm` before the VM enters the table (`set_pool`, `set_pgt`).
    pool: HypPool
    pgt: KvmPgtable
    mm_ops: "GuestMmOps"  # quoted: compiled, a class-body annotation loads its class at import

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
        self._vmid = self.vmid

    @property
    def vmid(self) -> int:
        return self.handle - sizes.HANDLE_OFFSET + 1

    def store_vcpu_ptr(self, idx: int, vcpu: PkvmHypVcpu) -> None:
        """The bytes of `hyp_vm->vcpus[idx] = hyp_vcpu` (after the slot list took it)."""
        self.store(vcpus_slot(idx), vcpu.va.to_bytes(8, "little"))

    def set_pool(self, pool: HypPool) -> None:
        self.pool = pool
        self._pool_start = pool.range_start
        self._pool_end = pool.range_end

    def set_pgt(self, pgt: KvmPgtable) -> None:
        """The guest stage-2 (`hyp_vm->pgt`, whose `mmu` is `&hyp_vm->kvm.arch.mmu`)."""
        self.pgt = pgt
        self._pgt_pgd = hyp_va(pgt.pgd) if pgt.pgd else 0
        self._pgt_ia_bits = pgt.ia_bits
        self._pgt_start_level = pgt.start_level
        self._pgt_mmu = self.va + HYP_VM["kvm.arch.mmu.vmid"][0]

    @property
    def id_regs_initialized(self) -> bool:
        return bool(self.flags & KVM_ARCH_FLAG_ID_REGS_INITIALIZED)

    @property
    def id_regs(self) -> tuple[int, ...]:
        raw = self.load(ID_REGS.offset, ID_REGS.size)
        return tuple(struct.unpack(f"<{ID_REGS.count}Q", raw))

    def set_id_regs(self, regs: tuple[int, ...]) -> None:
        """Copy the host's ID registers once (`pkvm_init_features_from_host`'s sysregs)."""
        self.store(ID_REGS.offset, struct.pack(f"<{len(regs)}Q", *regs))
        self.flags = self.flags | KVM_ARCH_FLAG_ID_REGS_INITIALIZED
