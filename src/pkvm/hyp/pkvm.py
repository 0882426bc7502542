"""Hyp VMs and vCPUs (`nvhe/pkvm.c`): the VM table, handles, init, teardown, load/put.

What both kernels share lives here; where the shape of the life cycle differs (how a VM gets its
handle, where a vCPU goes, who loads a vCPU, how teardown is split) the kernel's own functions
live in `pkvm_one_phase` (6.12) and `pkvm_two_phase` (7.2), and `HypState.life` is the one
`__pkvm_init` chose from `profile.vm_lifecycle` (`VmLife` says what each provides).

The host names a VM only by its handle (`idx + HANDLE_OFFSET`); every lookup checks range and
liveness under `vm_table_lock`. A hyp VM lives in memory the host donated (its size is the kernel's
`pkvm_get_hyp_vm_size`); its reference count is the `hyp_page` refcount of its first page, held by
each loaded vCPU (7.2) or for the length of a run (6.12), and teardown refuses while it is held.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, Protocol

from pkvm.abi import sizes
from pkvm.abi.host_structs import (
    KVM,
    KVM_VCPU,
    Layout,
)
from pkvm.arch.pgtable import MmOps
from pkvm.errors import EBUSY, EINVAL, ENOENT, ENOMEM
from pkvm.hyp.mem_protect import (
    __pkvm_host_donate_hyp,
    __pkvm_hyp_donate_host,
    _warn,
    hyp_pin_shared_mem,
    hyp_unpin_shared_mem,
)
from pkvm.hyp.mm import (
    el2_read_int,
    el2_read_u64,
    el2_read_u64_pair,
    el2_write_u64,
    el2_write_u64_pair,
    el2_zero,
    hyp_pa,
    hyp_va,
    memcache_pop,
    memcache_push,
)
from pkvm.hyp.page_alloc import HypPool
from pkvm.hyp.panic import HypBug
from pkvm.hyp.pgtable import KvmPgtable
from pkvm.hyp.pkvm_structs import PkvmHypVcpu, PkvmHypVm
from pkvm.hyp.spinlock import RANK_GUEST, HypSpinLock
from pkvm.hyp.state import HypState
from pkvm.machine.memory import PAGE_SHIFT, PAGE_SIZE

RESERVED_ENTRY: Final = object()  # `RESERVED_ENTRY` (0xa110ca7ed): occupied, invisible to lookup
# MAIR index of normal memory in a guest stage-2 the hyp builds (`KVM_S2_MEMATTR(NORMAL)`).
GUEST_S2_MEMATTR: Final = 0x6


class VmLife(Protocol):
    """The VM life-cycle functions whose shape differs between the kernels (a module each:
    `pkvm_one_phase` for 6.12, `pkvm_two_phase` for 7.2)."""

    # The host memcache that takes the guest stage-2's table pages at teardown.
    STAGE2_TEARDOWN_MC: str

    def init_vm_handle(self, h: HypState, host_kvm: int) -> int:
        """`__pkvm_init_vm`: the handle known before the VM is built (0: none yet), or -errno."""
        ...

    def init_vm_arch(self, h: HypState, host_kvm: int, is_protected: bool) -> tuple[int, int]:
        """`__pkvm_init_vm`: the hyp VM's `arch.flags` and `arch.vcpu_features`."""
        ...

    def insert_vm(self, h: HypState, handle: int, build: Callable[[int], PkvmHypVm],
                  undo: Callable[[int], int]) -> int:
        """`__pkvm_init_vm`: build the VM, put it in the table; x1 for the host (or `undo`)."""
        ...

    def init_vcpu_check(self, vm: PkvmHypVm) -> int:
        """`init_pkvm_hyp_vcpu`: the refusal before the host vCPU is pinned (0: none)."""
        ...

    def init_vcpu_slot(self, h: HypState, vm: PkvmHypVm, host_idx: int) -> int:
        """`init_pkvm_hyp_vcpu`: the slot of `vm.vcpus` the new vCPU takes, or -errno."""
        ...

    def init_vcpu_done(self, vm: PkvmHypVm) -> None:
        """`__pkvm_init_vcpu`: bookkeeping once the vCPU is in its slot."""
        ...

    def init_vcpu_traps(self, h: HypState, vcpu: PkvmHypVcpu) -> int:
        """`pkvm_vcpu_init_traps` (switch.py, which imports this module: reached through the
        kernel's module rather than a late import), where `profile.hyp_vcpu_init_traps`."""
        ...

    def handle_vcpu_run(self, h: HypState, host_vcpu: int) -> int:
        """`handle___kvm_vcpu_run` in pKVM mode (x1 = the host vCPU, hyp VA); returns x1."""
        ...


class GuestMmOps(MmOps):
    """Where a guest stage-2 gets table pages: the VM pool first, then the vCPU's memcache."""

    def __init__(self, h: HypState, pool: HypPool):
        """`pool`: the VM's (`PkvmHypVm.pool`), not the VM, which holds its stage-2 and so
        these operations: a reference back would be a cycle per VM."""
        self.h = h
        self.pool = pool
        self.vcpu: PkvmHypVcpu | None = None

    def __reduce__(self) -> tuple[Any, ...]:  # as `Tlb.__reduce__` (machine/mmu.py)
        return (GuestMmOps, (self.h, self.pool), self.__getstate__())

    def zalloc_page(self) -> int | None:
        pa = self.pool.alloc_pages(0)
        if pa is not None:
            return pa
        if self.vcpu is None:
            return None
        pa = memcache_pop(self.h, self.vcpu.memcache)
        if pa is None:
            return None
        el2_zero(self.h, hyp_va(pa), PAGE_SIZE)
        vmm = self.h.vmemmap
        if self.h.profile.teardown_clears_whole_hyp_page:
            vmm.clear(pa)
        vmm.touch(vmm.idx(pa))
        vmm.refcount[vmm.idx(pa)] = 1
        return pa

    def get_page(self, pa: int) -> None:
        self.pool.get_page(pa)

    def put_page(self, pa: int) -> None:
        self.pool.put_page(pa)

    def page_count(self, pa: int) -> int:
        return self.pool.page_count(pa)


def vm_page(vm: PkvmHypVm) -> int:
    return hyp_pa(vm.vm_va)


def vm_refcount(h: HypState, vm: PkvmHypVm) -> int:
    return h.vmemmap.page_count(vm_page(vm))


def live_vms(h: HypState) -> list[tuple[int, PkvmHypVm]]:
    return [(i + sizes.HANDLE_OFFSET, vm) for i, vm in enumerate(h.vm_table)
            if isinstance(vm, PkvmHypVm)]


def vm_snapshot(h: HypState, vm: PkvmHypVm, handle: int) -> dict[str, Any]:
    return {
        "handle": handle,
        "state": "dying" if vm.is_dying else "live",
        "protected": vm.is_protected,
        "vcpus": {v.vcpu_idx: v.loaded_on for v in vm.vcpus if v is not None},
        "refcount": vm_refcount(h, vm),
    }


# -- the VM table -----------------------------------------------------------------------------
def handle_to_idx(handle: int) -> int:
    return (handle - sizes.HANDLE_OFFSET) & 0xFFFF_FFFF


def get_vm_by_handle(h: HypState, handle: int) -> PkvmHypVm | None:
    idx = handle_to_idx(handle)
    if not h.vm_table:  # before `__pkvm_init`: the kernel's NULL vm_table
        return None
    if idx >= sizes.KVM_MAX_PVMS and not h.bug("handle-range"):
        return None  # seeded "handle-range" drops this check: the lookup reads past the table
    slot = h.vm_table[idx]
    return slot if isinstance(slot, PkvmHypVm) else None


def find_free_vm_table_entry(h: HypState) -> int:
    for i, slot in enumerate(h.vm_table):
        if slot is None:
            return i
    return -ENOMEM


def get_pkvm_hyp_vm(h: HypState, handle: int) -> PkvmHypVm | None:
    """Look up and take a reference (7.2 `get_pkvm_hyp_vm`)."""
    with h.vm_table_lock:
        vm = get_vm_by_handle(h, handle)
        if vm is not None:
            vm_ref_inc(h, vm)
        return vm


def put_pkvm_hyp_vm(h: HypState, vm: PkvmHypVm) -> None:
    with h.vm_table_lock:
        vm_ref_dec(h, vm)


def vm_ref_dec(h: HypState, vm: PkvmHypVm) -> None:
    i = h.vmemmap.idx(vm_page(vm))
    if h.vmemmap.refcount[i] == 0:
        raise HypBug("hyp_page_ref_dec: VM refcount underflow")
    h.vmemmap.touch(i)
    h.vmemmap.refcount[i] -= 1


# -- donated memory -------------------------------------------------------------------------
def map_donated_memory_noclear(h: HypState, va: int, size: int) -> int | None:
    if va & (PAGE_SIZE - 1):
        return None
    pages = sizes.page_align(size) >> PAGE_SHIFT
    if __pkvm_host_donate_hyp(h, hyp_pa(va) >> PAGE_SHIFT, pages):
        return None
    return va


def map_donated_memory(h: HypState, va: int, size: int) -> int | None:
    out = map_donated_memory_noclear(h, va, size)
    if out is not None:
        el2_zero(h, va, sizes.page_align(size))
    return out


def unmap_donated_memory(h: HypState, va: int | None, size: int) -> None:
    if va is None:
        return
    el2_zero(h, va, sizes.page_align(size))
    _warn(h, __pkvm_hyp_donate_host(h, hyp_pa(va) >> PAGE_SHIFT, sizes.page_align(size) >> PAGE_SHIFT))


# -- host struct fields, read through EL2's stage-1 ----------------------------------------
def _field_table(layout: Layout) -> dict[str, tuple[int, int, bool]]:
    """Each field of a host struct as (offset, size, signed), looked up once per read."""
    return {name: (f.offset, f.size, f.fmt in "iqhb") for name, f in layout.fields.items()}


_KVM_FIELDS: Final = _field_table(KVM)
_VCPU_FIELDS: Final = _field_table(KVM_VCPU)


def kvm_field(h: HypState, host_kvm: int, name: str) -> int:
    off, size, signed = _KVM_FIELDS[name]
    return el2_read_int(h, host_kvm + off, size, signed)


def vcpu_field(h: HypState, host_vcpu: int, name: str) -> int:
    off, size, signed = _VCPU_FIELDS[name]
    return el2_read_int(h, host_vcpu + off, size, signed)


# The teardown memcaches in the host's struct kvm: the offsets of `head` and `nr_pages`.
_HOST_MCS: Final = {mc: (KVM.offset(f"arch.pkvm.{mc}.head"), KVM.offset(f"arch.pkvm.{mc}.nr_pages"))
                    for mc in ("teardown_mc", "stage2_teardown_mc")}


def host_mc_push(h: HypState, host_kvm: int, mc_name: str, pa: int) -> None:
    """Push a page on a teardown memcache kept in the host's struct kvm."""
    head, nr = _HOST_MCS[mc_name]
    head_off = host_kvm + head
    nr_off = host_kvm + nr
    el2_write_u64(h, hyp_va(pa), el2_read_u64(h, head_off))
    el2_write_u64(h, head_off, pa)
    el2_write_u64(h, nr_off, el2_read_u64(h, nr_off) + 1)


# -- init ------------------------------------------------------------------------------------
def kvm_guest_prepare_stage2(h: HypState, handle: int, pgd_pa: int, pgd_size: int) -> HypPool:
    pool = HypPool(f"vm{handle:#x}.pool", h.mem, h.vmemmap, h.locks,
                   h.profile.attach_foreign_keeps_order)
    pool.init(pgd_pa >> PAGE_SHIFT, pgd_size >> PAGE_SHIFT, 0)
    return pool


def __pkvm_init_vm(h: HypState, host_kvm: int, vm_hva: int, pgd_hva: int) -> int:
    """x1 = host struct kvm, x2/x3 = memory donated for the hyp VM and the guest pgd."""
    prof = h.profile
    kvm_end = host_kvm + prof.sizeof_kvm
    ret = hyp_pin_shared_mem(h, host_kvm, kvm_end)
    if ret:
        return ret
    # The hyp reads the host's `int created_vcpus` into an `unsigned int`: a negative count is
    # huge, passes the check and fails the donation of a hyp VM sized for it (-ENOMEM).
    nr_vcpus = kvm_field(h, host_kvm, "created_vcpus") & 0xFFFF_FFFF
    if nr_vcpus < 1:
        hyp_unpin_shared_mem(h, host_kvm, kvm_end)
        if h.bug("unpin-underflow"):  # seeded: the error path unpins twice
            hyp_unpin_shared_mem(h, host_kvm, kvm_end)
        return -EINVAL
    handle = h.life.init_vm_handle(h, host_kvm)
    if handle < 0:
        hyp_unpin_shared_mem(h, host_kvm, kvm_end)
        return handle
    vm_size = sizes.pkvm_get_hyp_vm_size(nr_vcpus)
    pgd_size = sizes.KVM_PGTABLE_STAGE2_PGD_SIZE
    vm_va = map_donated_memory(h, vm_hva, vm_size)
    pgd_va = map_donated_memory_noclear(h, pgd_hva, pgd_size) if vm_va is not None else None

    init = _VmInit(h, host_kvm, nr_vcpus, vm_va, vm_size, pgd_va, pgd_size)
    if vm_va is None or pgd_va is None:
        return init.undo(-ENOMEM)
    is_protected = bool(kvm_field(h, host_kvm, "arch.pkvm.is_protected")) if prof.protected_vms else False
    init.is_protected = is_protected
    init.flags, init.features = h.life.init_vm_arch(h, host_kvm, is_protected)
    return h.life.insert_vm(h, handle, init.build, init.undo)


class _VmInit:
    """What `__pkvm_init_vm` hands its life cycle's `insert_vm`: how to build the VM under its
    handle and how to undo the donations. An object whose bound methods are passed, not
    closures: a compiled closure's environment holds its nested functions, a reference cycle
    per call that only a collection would free."""

    def __init__(self, h: HypState, host_kvm: int, nr_vcpus: int, vm_va: int | None,
                 vm_size: int, pgd_va: int | None, pgd_size: int):
        self.h = h
        self.host_kvm = host_kvm
        self.nr_vcpus = nr_vcpus
        self.vm_va = vm_va
        self.vm_size = vm_size
        self.pgd_va = pgd_va
        self.pgd_size = pgd_size
        self.is_protected = False
        self.flags = 0
        self.features = 0

    def undo(self, err: int) -> int:
        """Give the donations back and unpin the host kvm: a refusal leaves nothing behind."""
        h = self.h
        unmap_donated_memory(h, self.vm_va, self.vm_size)
        unmap_donated_memory(h, self.pgd_va, self.pgd_size)
        hyp_unpin_shared_mem(h, self.host_kvm, self.host_kvm + h.profile.sizeof_kvm)
        return err

    def build(self, hd: int) -> PkvmHypVm:
        h = self.h
        vm_va, pgd_va = self.vm_va, self.pgd_va
        assert vm_va is not None and pgd_va is not None
        pgd_pa, pgd_size = hyp_pa(pgd_va), self.pgd_size
        lock = HypSpinLock(h.locks, f"vm{hd:#x}.lock", RANK_GUEST)
        pool = kvm_guest_prepare_stage2(h, hd, pgd_pa, pgd_size)
        vm = PkvmHypVm(h, hd, self.host_kvm, self.nr_vcpus, self.is_protected, vm_va,
                       self.vm_size, pgd_pa, pgd_size, lock, flags=self.flags,
                       vcpu_features=self.features)
        vm.set_pool(pool)
        vm.mm_ops = GuestMmOps(h, pool)
        pgt = KvmPgtable(h.mem, vm.mm_ops, stage=2, name=f"guest {hd:#x} stage-2",
                         eagain_stops=h.profile.pgtable_walk_eagain_stops,
                         normal_memattr=GUEST_S2_MEMATTR)
        with lock:
            pgt.init()
        vm.set_pgt(pgt)
        return vm


def __pkvm_init_vcpu(h: HypState, handle: int, host_vcpu: int, vcpu_hva: int) -> int:
    size = sizes.PKVM_HYP_VCPU_SIZE
    mem_va = map_donated_memory(h, vcpu_hva, size)
    if mem_va is None:
        return -ENOMEM
    ret = 0
    with h.vm_table_lock:
        vm = get_vm_by_handle(h, handle)
        if vm is None:
            ret = -ENOENT
        else:
            ret = _init_vcpu_locked(h, vm, host_vcpu, mem_va)
    if ret:
        unmap_donated_memory(h, mem_va, size)
    return ret


def _init_vcpu_locked(h: HypState, vm: PkvmHypVm, host_vcpu: int, mem_va: int) -> int:
    ret = h.life.init_vcpu_check(vm)
    if ret:
        return ret
    host_vcpu_end = host_vcpu + h.profile.sizeof_kvm_vcpu
    if hyp_pin_shared_mem(h, host_vcpu, host_vcpu_end):
        return -EBUSY
    host_idx = vcpu_field(h, host_vcpu, "vcpu_idx")
    vcpu_id = vcpu_field(h, host_vcpu, "vcpu_id")
    cflags = vcpu_field(h, host_vcpu, "arch.cflags")
    idx = h.life.init_vcpu_slot(h, vm, host_idx)
    if idx < 0:
        hyp_unpin_shared_mem(h, host_vcpu, host_vcpu_end)
        return idx
    if h.bug("double-fetch"):  # seeded: read the host's vcpu_idx again after checking it
        idx = _refetch_vcpu_idx(h, host_vcpu)
    vcpu = PkvmHypVcpu(vm, host_vcpu, idx, vcpu_id, mem_va, cflags=cflags)
    if h.profile.hyp_vcpu_init_traps:
        ret = h.life.init_vcpu_traps(h, vcpu)
        if ret:
            hyp_unpin_shared_mem(h, host_vcpu, host_vcpu_end)
            return ret
    vm.vcpus[idx] = vcpu
    vm.store_vcpu_ptr(idx, vcpu)
    h.life.init_vcpu_done(vm)
    return 0


def _refetch_vcpu_idx(h: HypState, host_vcpu: int) -> int:
    """Seeded bug "double-fetch" only: a second read of a host-shared field."""
    return vcpu_field(h, host_vcpu, "vcpu_idx")


# -- load / put (the parts both kernels share) --------------------------------------------------
def vm_ref_inc(h: HypState, vm: PkvmHypVm) -> None:
    """`hyp_page_ref_inc` of the hyp VM's first page (under `vm_table_lock`)."""
    i = h.vmemmap.idx(vm_page(vm))
    h.vmemmap.touch(i)
    h.vmemmap.refcount[i] += 1


def pkvm_get_loaded_hyp_vcpu(h: HypState) -> PkvmHypVcpu | None:
    return h.loaded_hyp_vcpu[h.cpu]


# -- teardown ----------------------------------------------------------------------------------
def _teardown_hyp_memory(h: HypState, vm: PkvmHypVm) -> None:
    """Everything after the VM left the table: stage-2, pins, hyp vCPUs, the hyp VM itself."""
    prof = h.profile
    host_kvm = vm.host_kvm  # kept aside: the hyp VM's own bytes are wiped below
    mc = "teardown_mc"
    s2mc = h.life.STAGE2_TEARDOWN_MC
    # Destroy the guest stage-2 and return every table page of the VM pool.
    with vm.lock:
        if not h.bug("teardown-keeps-stage2"):
            vm.pgt.destroy()
        vm.pgd_pa = 0
        vm.set_pgt(vm.pgt)
    while True:
        pa = vm.pool.alloc_pages(0)
        if pa is None:
            break
        if prof.teardown_clears_whole_hyp_page:
            h.vmemmap.clear(pa)
        else:
            h.vmemmap.touch(h.vmemmap.idx(pa))
            h.vmemmap.refcount[h.vmemmap.idx(pa)] = 0
        host_mc_push(h, host_kvm, s2mc, pa)
        _warn(h, __pkvm_hyp_donate_host(h, pa >> PAGE_SHIFT, 1))
    # Unpin the host vCPUs.
    for vcpu in vm.vcpus:
        if vcpu is not None:
            hyp_unpin_shared_mem(h, vcpu.host_vcpu, vcpu.host_vcpu + h.profile.sizeof_kvm_vcpu)
    # Return each hyp vCPU (and, 7.2, the pages left in its memcache), then the hyp VM.
    for vcpu in vm.vcpus:
        if vcpu is None:
            continue
        while True:
            pa = memcache_pop(h, vcpu.memcache)
            if pa is None:
                break
            host_mc_push(h, host_kvm, s2mc, pa)
            _warn(h, __pkvm_hyp_donate_host(h, pa >> PAGE_SHIFT, 1))
        _teardown_donated(h, host_kvm, vcpu.mem_va, sizes.PKVM_HYP_VCPU_SIZE, mc)
    drop_hyp_vcpus(vm)
    h.hyp_vms.pop(vm.vm_va, None)
    _teardown_donated(h, host_kvm, vm.vm_va, vm.vm_size, mc)
    if not h.bug("teardown-keeps-pin"):  # seeded: the host's struct kvm stays pinned
        hyp_unpin_shared_mem(h, host_kvm, host_kvm + h.profile.sizeof_kvm)


def drop_hyp_vcpus(vm: PkvmHypVm) -> None:
    """The hyp vCPUs are gone with their pages (returned above, or the machine is discarded):
    empty the VM's slots, so reference counting frees the vCPUs and the VM (each vCPU points
    back at its VM: a cycle while the slots hold them)."""
    vm.vcpus[:] = [None] * len(vm.vcpus)


def _teardown_donated(h: HypState, host_kvm: int, va: int, size: int, mc: str) -> None:
    pa = hyp_pa(va)
    size = sizes.page_align(size)
    if not h.bug("hyp-vm-no-wipe"):  # seeded: the hyp VM/vCPU goes back with its contents
        el2_zero(h, va, size)
    for p in range(pa, pa + size, PAGE_SIZE):
        h.wiped_returns.append(p)
        host_mc_push(h, host_kvm, mc, p)
        _warn(h, __pkvm_hyp_donate_host(h, p >> PAGE_SHIFT, 1))


def remove_vm_table_entry(h: HypState, handle: int) -> None:
    """Empty the VM's slot (under `vm_table_lock`): the handle is free for the next VM."""
    h.vm_table[handle_to_idx(handle)] = None


def get_np_pkvm_hyp_vm(h: HypState, handle: int) -> PkvmHypVm | None:
    vm = get_pkvm_hyp_vm(h, handle)
    if vm is not None and vm.is_protected:
        put_pkvm_hyp_vm(h, vm)
        return None
    return vm


# -- 7.2 memcache refill ---------------------------------------------------------------------
_HOST_MC: Final = KVM_VCPU.offset("arch.pkvm_memcache.head")
assert KVM_VCPU.offset("arch.pkvm_memcache.nr_pages") == _HOST_MC + 8


def pkvm_refill_memcache(h: HypState, vcpu: PkvmHypVcpu) -> int:
    """Move pages from the host vCPU's memcache to the hyp vCPU's until it holds as many
    (`refill_memcache`: the host's struct is copied in, topped up from, and copied back)."""
    mc_va = vcpu.host_vcpu + _HOST_MC
    host_head, host_nr = el2_read_u64_pair(h, mc_va)  # tmp = *host_mc
    target = host_nr
    ret = 0
    while vcpu.memcache[1] < target:
        if host_nr == 0:
            ret = -ENOMEM
            break
        pa = host_head & ~(PAGE_SIZE - 1)
        if __pkvm_host_donate_hyp(h, pa >> PAGE_SHIFT, 1):
            ret = -ENOMEM
            break
        host_head = el2_read_u64(h, hyp_va(pa))
        host_nr -= 1
        memcache_push(h, vcpu.memcache, pa)
    if ret and h.bug("refill-no-writeback"):  # seeded: the host keeps listing taken pages
        return ret
    el2_write_u64_pair(h, mc_va, host_head, host_nr)  # *host_mc = tmp
    return ret
