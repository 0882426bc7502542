"""Hyp VMs and vCPUs (`nvhe/pkvm.c`): the VM table, handles, init, teardown, load/put.

The host names a VM only by its handle (`idx + 0x1000`); every lookup checks range and liveness
under `vm_table_lock`. A hyp VM lives in memory the host donated (its size is the kernel's
`pkvm_get_hyp_vm_size`); its reference count is the `hyp_page` refcount of its first page, held by
each loaded vCPU (7.2) or for the length of a run (6.12), and teardown refuses while it is held.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pkvm.abi import sizes
from pkvm.abi.host_structs import (
    KVM,
    KVM_ARCH_FLAG_ID_REGS_INITIALIZED,
    KVM_ARM_VCPU_PSCI_0_2,
    KVM_VCPU,
)
from pkvm.errors import EBUSY, EINVAL, ENOENT, ENOMEM
from pkvm.hyp.mem_protect import (
    __pkvm_host_donate_hyp,
    __pkvm_hyp_donate_host,
    _warn,
    hyp_pin_shared_mem,
    hyp_unpin_shared_mem,
)
from pkvm.hyp.mm import (
    el2_read,
    el2_read_u64,
    el2_write_u64,
    hyp_pa,
    hyp_va,
)
from pkvm.hyp.page_alloc import HypPool
from pkvm.hyp.panic import HypBug
from pkvm.hyp.pgtable import KvmPgtable
from pkvm.hyp.spinlock import RANK_GUEST, HypSpinLock
from pkvm.hyp.state import HypState
from pkvm.machine.memory import PAGE_SHIFT, PAGE_SIZE

RESERVED_ENTRY = object()  # `RESERVED_ENTRY` (0xa110ca7ed): occupied, invisible to lookup
U64 = 0xFFFF_FFFF_FFFF_FFFF


class GuestMmOps:
    """Where a guest stage-2 gets table pages: the VM pool first, then the vCPU's memcache."""

    def __init__(self, h: HypState, vm: "PkvmHypVm"):
        self.h = h
        self.vm = vm
        self.vcpu: PkvmHypVcpu | None = None

    def zalloc_page(self) -> int | None:
        pa = self.vm.pool.alloc_pages(0)
        if pa is not None:
            return pa
        if self.vcpu is None:
            return None
        from pkvm.hyp.mm import memcache_pop

        pa = memcache_pop(self.h, self.vcpu.memcache)
        if pa is None:
            return None
        self.h.mem.zero(pa, PAGE_SIZE)
        vmm = self.h.vmemmap
        if self.h.profile.teardown_clears_whole_hyp_page:
            vmm.clear(pa)
        vmm.refcount[vmm.idx(pa)] = 1
        return pa

    def get_page(self, pa: int) -> None:
        self.vm.pool.get_page(pa)

    def put_page(self, pa: int) -> None:
        self.vm.pool.put_page(pa)

    def page_count(self, pa: int) -> int:
        return self.vm.pool.page_count(pa)


@dataclass
class PkvmHypVcpu:
    """`struct pkvm_hyp_vcpu`."""

    vm: "PkvmHypVm"
    host_vcpu: int  # hyp VA of the host's struct kvm_vcpu (pinned)
    vcpu_idx: int
    vcpu_id: int
    mem_va: int  # the donated pages holding this struct
    loaded_on: int | None = None  # `loaded_hyp_vcpu`: the CPU it is loaded on
    memcache: list[int] = field(default_factory=lambda: [0, 0])  # arch.pkvm_memcache head, nr
    hcr_el2: int = 0
    mdcr_el2: int = 0
    cflags: int = 0
    ctxt: bytes = b""  # arch.ctxt as the hyp keeps it between flush and sync
    iflags: int = 0
    fault_esr: int = 0
    fault_far: int = 0
    fault_hpfar: int = 0
    engine: Any = None  # the CPU the guest runs on (switch.py)
    exit_data: dict[str, Any] = field(default_factory=dict)


@dataclass
class PkvmHypVm:
    """`struct pkvm_hyp_vm`."""

    handle: int
    host_kvm: int  # hyp VA of the host's struct kvm (pinned)
    created_vcpus: int
    is_protected: bool
    vm_va: int  # donated memory holding this struct; its first page's refcount is the VM's
    vm_size: int
    pgd_pa: int
    pgd_size: int
    pool: HypPool
    pgt: KvmPgtable
    lock: HypSpinLock
    mm_ops: GuestMmOps
    vcpus: list[PkvmHypVcpu | None]
    nr_vcpus: int = 0  # 6.12
    is_dying: bool = False
    flags: int = 0
    vcpu_features: int = 0
    id_regs: tuple[int, ...] = ()
    id_regs_initialized: bool = False
    engine: Any = None  # issue 14: the CPU emulator its vCPUs run on (switch.py: _Engine)

    @property
    def vmid(self) -> int:
        return self.handle - sizes.HANDLE_OFFSET + 1


def vm_page(vm: PkvmHypVm) -> int:
    return hyp_pa(vm.vm_va)


def vm_refcount(h: HypState, vm: PkvmHypVm) -> int:
    return h.vmemmap.page_count(vm_page(vm))


def live_vms(h: HypState) -> list[tuple[int, PkvmHypVm]]:
    return [(i + sizes.HANDLE_OFFSET, vm) for i, vm in enumerate(h.vm_table or [])
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
    if h.vm_table is None:
        return None
    if idx >= sizes.KVM_MAX_PVMS and not h.bug("handle-range"):
        return None  # seeded "handle-range" drops this check: the lookup reads past the table
    slot = h.vm_table[idx]
    return slot if isinstance(slot, PkvmHypVm) else None


def find_free_vm_table_entry(h: HypState) -> int:
    assert h.vm_table is not None
    for i, slot in enumerate(h.vm_table):
        if slot is None:
            return i
    return -ENOMEM


def get_pkvm_hyp_vm(h: HypState, handle: int) -> PkvmHypVm | None:
    """Look up and take a reference (7.2 `get_pkvm_hyp_vm`)."""
    assert h.vm_table_lock is not None
    with h.vm_table_lock:
        vm = get_vm_by_handle(h, handle)
        if vm is not None:
            h.vmemmap.refcount[h.vmemmap.idx(vm_page(vm))] += 1
        return vm


def put_pkvm_hyp_vm(h: HypState, vm: PkvmHypVm) -> None:
    assert h.vm_table_lock is not None
    with h.vm_table_lock:
        _vm_ref_dec(h, vm)


def _vm_ref_dec(h: HypState, vm: PkvmHypVm) -> None:
    i = h.vmemmap.idx(vm_page(vm))
    if h.vmemmap.refcount[i] == 0:
        raise HypBug("hyp_page_ref_dec: VM refcount underflow")
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
        h.mem.zero(hyp_pa(va), sizes.page_align(size))
    return out


def unmap_donated_memory(h: HypState, va: int | None, size: int) -> None:
    if va is None:
        return
    h.mem.zero(hyp_pa(va), sizes.page_align(size))
    _warn(h, __pkvm_hyp_donate_host(h, hyp_pa(va) >> PAGE_SHIFT, sizes.page_align(size) >> PAGE_SHIFT))


# -- host struct fields, read through EL2's stage-1 ----------------------------------------
def kvm_field(h: HypState, host_kvm: int, name: str) -> int:
    f = KVM.field(name)
    raw = el2_read(h, host_kvm + f.offset, f.size)
    return int.from_bytes(raw, "little", signed=f.fmt in "iqhb")


def vcpu_field(h: HypState, host_vcpu: int, name: str) -> int:
    f = KVM_VCPU.field(name)
    raw = el2_read(h, host_vcpu + f.offset, f.size)
    return int.from_bytes(raw, "little", signed=f.fmt in "iqhb")


def host_mc_push(h: HypState, host_kvm: int, mc_name: str, pa: int) -> None:
    """Push a page on a teardown memcache kept in the host's struct kvm."""
    head_off = host_kvm + KVM.offset(f"arch.pkvm.{mc_name}.head")
    nr_off = host_kvm + KVM.offset(f"arch.pkvm.{mc_name}.nr_pages")
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
    nr_vcpus = kvm_field(h, host_kvm, "created_vcpus")
    if nr_vcpus < 1:
        hyp_unpin_shared_mem(h, host_kvm, kvm_end)
        if h.bug("unpin-underflow"):  # seeded: the error path unpins twice
            hyp_unpin_shared_mem(h, host_kvm, kvm_end)
        return -EINVAL
    handle = 0
    if prof.reserve_vm:
        handle = prof.handle(kvm_field(h, host_kvm, "arch.pkvm.handle"))
        if handle < sizes.HANDLE_OFFSET:
            hyp_unpin_shared_mem(h, host_kvm, kvm_end)
            return -EINVAL
    vm_size = sizes.pkvm_get_hyp_vm_size(nr_vcpus)
    pgd_size = sizes.KVM_PGTABLE_STAGE2_PGD_SIZE
    vm_va = map_donated_memory(h, vm_hva, vm_size)
    pgd_va = map_donated_memory_noclear(h, pgd_hva, pgd_size) if vm_va is not None else None

    def undo(err: int) -> int:
        """Give the donations back and unpin the host kvm: a refusal leaves nothing behind."""
        unmap_donated_memory(h, vm_va, vm_size)
        unmap_donated_memory(h, pgd_va, pgd_size)
        hyp_unpin_shared_mem(h, host_kvm, kvm_end)
        return err

    if vm_va is None or pgd_va is None:
        return undo(-ENOMEM)
    is_protected = bool(kvm_field(h, host_kvm, "arch.pkvm.is_protected")) if prof.protected_vms else False
    flags = features = 0
    if prof.reserve_vm:
        host_flags = kvm_field(h, host_kvm, "arch.flags")
        host_features = kvm_field(h, host_kvm, "arch.vcpu_features")
        if is_protected:
            features = host_features & KVM_ARM_VCPU_PSCI_0_2
        else:
            flags = host_flags & ~KVM_ARCH_FLAG_ID_REGS_INITIALIZED
            features = host_features
    assert h.vm_table_lock is not None and h.vm_table is not None

    def build(hd: int) -> PkvmHypVm:
        lock = HypSpinLock(h.locks, f"vm{hd:#x}.lock", RANK_GUEST)
        pgd_pa = hyp_pa(pgd_va)  # type: ignore[arg-type]
        pool = kvm_guest_prepare_stage2(h, hd, pgd_pa, pgd_size)
        vm = PkvmHypVm(hd, host_kvm, nr_vcpus, is_protected, vm_va, vm_size, pgd_pa, pgd_size,
                       pool, None, lock, None, [None] * nr_vcpus, flags=flags,  # type: ignore[arg-type]
                       vcpu_features=features)
        vm.mm_ops = GuestMmOps(h, vm)
        vm.pgt = KvmPgtable(h.mem, vm.mm_ops, stage=2, name=f"guest {hd:#x} stage-2",
                            eagain_stops=prof.page_state_in_vmemmap, normal_memattr=0x6)
        with lock:
            vm.pgt.init()
        return vm

    if prof.reserve_vm:
        vm = build(handle)
        ret = insert_vm_table_entry(h, handle, vm)
        if ret:
            vm.pgt.destroy()
            return undo(ret)
        h.hyp_vms[vm_va] = vm
        return 0
    with h.vm_table_lock:
        idx = find_free_vm_table_entry(h)
        if idx >= 0:
            handle = idx + sizes.HANDLE_OFFSET
            vm = build(handle)
            h.vm_table[idx] = vm
    if idx < 0:
        return undo(idx)  # after the table lock, as Linux gives the donations back
    h.hyp_vms[vm_va] = vm
    return handle


def insert_vm_table_entry(h: HypState, handle: int, vm: PkvmHypVm) -> int:
    assert h.vm_table_lock is not None
    with h.vm_table_lock:
        idx = handle_to_idx(handle)
        if h.vm_table is None or idx >= sizes.KVM_MAX_PVMS or h.vm_table[idx] is not RESERVED_ENTRY:
            return -EINVAL
        h.vm_table[idx] = vm
        return 0


def __pkvm_reserve_vm(h: HypState) -> int:
    assert h.vm_table_lock is not None
    with h.vm_table_lock:
        if h.vm_table is None:
            return -EINVAL
        idx = find_free_vm_table_entry(h)
        if idx < 0:
            return idx
        h.vm_table[idx] = RESERVED_ENTRY
        return idx + sizes.HANDLE_OFFSET


def __pkvm_unreserve_vm(h: HypState, handle: int) -> None:
    if h.vm_table is None:
        return
    assert h.vm_table_lock is not None
    with h.vm_table_lock:
        idx = handle_to_idx(handle)
        if idx < sizes.KVM_MAX_PVMS and h.vm_table[idx] is RESERVED_ENTRY:
            h.vm_table[idx] = None


def __pkvm_init_vcpu(h: HypState, handle: int, host_vcpu: int, vcpu_hva: int) -> int:
    size = sizes.PKVM_HYP_VCPU_SIZE
    mem_va = map_donated_memory(h, vcpu_hva, size)
    if mem_va is None:
        return -ENOMEM
    assert h.vm_table_lock is not None
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
    prof = h.profile
    idx = vm.nr_vcpus
    if prof.vcpu_init_in_order and idx >= vm.created_vcpus:
        return -EINVAL
    if hyp_pin_shared_mem(h, host_vcpu, host_vcpu + h.profile.sizeof_kvm_vcpu):
        return -EBUSY
    host_idx = vcpu_field(h, host_vcpu, "vcpu_idx")
    vcpu_id = vcpu_field(h, host_vcpu, "vcpu_id")
    cflags = vcpu_field(h, host_vcpu, "arch.cflags")

    def fail(err: int) -> int:
        hyp_unpin_shared_mem(h, host_vcpu, host_vcpu + h.profile.sizeof_kvm_vcpu)
        return err

    if prof.vcpu_init_in_order:
        if host_idx != idx:
            return fail(-EINVAL)
    else:
        idx = host_idx
        if not vm.is_protected:
            host_flags = kvm_field(h, vm.host_kvm, "arch.flags")
            if not host_flags & KVM_ARCH_FLAG_ID_REGS_INITIALIZED:
                return fail(-EINVAL)
            if not vm.id_regs_initialized:
                f = KVM.field("arch.id_regs")
                vm.id_regs = tuple(
                    int.from_bytes(el2_read(h, vm.host_kvm + f.offset + 8 * i, 8), "little")
                    for i in range(f.count))
                vm.id_regs_initialized = True
        bad_idx = idx < 0 or idx >= vm.created_vcpus
        if h.bug("vcpu-index-range") and idx >= 0:
            bad_idx = idx > len(vm.vcpus)  # seeded: off by one, idx == created_vcpus passes
        if bad_idx or vm.vcpus[idx] is not None:
            return fail(-EINVAL)
    if h.bug("double-fetch"):  # seeded: read the host's vcpu_idx again after checking it
        idx = _refetch_vcpu_idx(h, host_vcpu)
    vcpu = PkvmHypVcpu(vm, host_vcpu, idx, vcpu_id, mem_va, cflags=cflags)
    vm.vcpus[idx] = vcpu
    if prof.vcpu_init_in_order:
        vm.nr_vcpus += 1
    return 0


def _refetch_vcpu_idx(h: HypState, host_vcpu: int) -> int:
    """Seeded bug "double-fetch" only: a second read of a host-shared field."""
    h.locks.preempt("host-read", "vcpu_idx")
    return vcpu_field(h, host_vcpu, "vcpu_idx")


# -- load / put --------------------------------------------------------------------------
def pkvm_load_hyp_vcpu(h: HypState, handle: int, vcpu_idx: int) -> PkvmHypVcpu | None:
    prof = h.profile
    cpu = h.cpu
    if prof.explicit_vcpu_load and h.loaded_hyp_vcpu[cpu] is not None:
        return None
    assert h.vm_table_lock is not None
    vcpu = None
    with h.vm_table_lock:
        vm = get_vm_by_handle(h, handle)
        if vm is None:
            return None
        if prof.explicit_vcpu_load:
            if vm.is_dying or vcpu_idx >= vm.created_vcpus:
                return None
            vcpu = vm.vcpus[vcpu_idx]
            if vcpu is None or vcpu.loaded_on is not None:
                return None
            vcpu.loaded_on = cpu
        else:
            if vcpu_idx >= vm.nr_vcpus:
                return None
            vcpu = vm.vcpus[vcpu_idx]
        if not h.bug("load-no-pin"):
            h.vmemmap.refcount[h.vmemmap.idx(vm_page(vm))] += 1
    if prof.explicit_vcpu_load:
        h.loaded_hyp_vcpu[cpu] = vcpu
    return vcpu


def pkvm_put_hyp_vcpu(h: HypState, vcpu: PkvmHypVcpu) -> None:
    assert h.vm_table_lock is not None
    with h.vm_table_lock:
        if h.profile.explicit_vcpu_load:
            vcpu.loaded_on = None
            h.loaded_hyp_vcpu[h.cpu] = None
        if not h.bug("load-no-pin"):
            _vm_ref_dec(h, vcpu.vm)


def pkvm_get_loaded_hyp_vcpu(h: HypState) -> PkvmHypVcpu | None:
    return h.loaded_hyp_vcpu[h.cpu]


# -- teardown ----------------------------------------------------------------------------------
def _teardown_hyp_memory(h: HypState, vm: PkvmHypVm) -> None:
    """Everything after the VM left the table: stage-2, pins, hyp vCPUs, the hyp VM itself."""
    prof = h.profile
    mc = "teardown_mc"
    s2mc = "stage2_teardown_mc" if prof.two_phase_teardown else "teardown_mc"
    # Destroy the guest stage-2 and return every table page of the VM pool.
    with vm.lock:
        if not h.bug("teardown-keeps-stage2"):
            vm.pgt.destroy()
        vm.pgd_pa = 0
    while True:
        pa = vm.pool.alloc_pages(0)
        if pa is None:
            break
        if prof.teardown_clears_whole_hyp_page:
            h.vmemmap.clear(pa)
        else:
            h.vmemmap.refcount[h.vmemmap.idx(pa)] = 0
        host_mc_push(h, vm.host_kvm, s2mc, pa)
        _warn(h, __pkvm_hyp_donate_host(h, pa >> PAGE_SHIFT, 1))
    # Unpin the host vCPUs.
    for vcpu in vm.vcpus:
        if vcpu is not None:
            hyp_unpin_shared_mem(h, vcpu.host_vcpu, vcpu.host_vcpu + h.profile.sizeof_kvm_vcpu)
    # Return each hyp vCPU (and, 7.2, the pages left in its memcache), then the hyp VM.
    from pkvm.hyp.mm import memcache_pop

    for vcpu in vm.vcpus:
        if vcpu is None:
            continue
        while True:
            pa = memcache_pop(h, vcpu.memcache)
            if pa is None:
                break
            host_mc_push(h, vm.host_kvm, s2mc, pa)
            _warn(h, __pkvm_hyp_donate_host(h, pa >> PAGE_SHIFT, 1))
        _teardown_donated(h, vm, vcpu.mem_va, sizes.PKVM_HYP_VCPU_SIZE, mc)
    h.hyp_vms.pop(vm.vm_va, None)
    _teardown_donated(h, vm, vm.vm_va, vm.vm_size, mc)
    hyp_unpin_shared_mem(h, vm.host_kvm, vm.host_kvm + h.profile.sizeof_kvm)


def _teardown_donated(h: HypState, vm: PkvmHypVm, va: int, size: int, mc: str) -> None:
    pa = hyp_pa(va)
    size = sizes.page_align(size)
    h.mem.zero(pa, size)
    for p in range(pa, pa + size, PAGE_SIZE):
        host_mc_push(h, vm.host_kvm, mc, p)
        _warn(h, __pkvm_hyp_donate_host(h, p >> PAGE_SHIFT, 1))


def __pkvm_teardown_vm(h: HypState, handle: int) -> int:
    """6.12: one call."""
    assert h.vm_table_lock is not None and h.vm_table is not None
    with h.vm_table_lock:
        vm = get_vm_by_handle(h, handle)
        if vm is None:
            return -ENOENT
        if vm_refcount(h, vm):
            _warn(h, 1)
            return -EBUSY
        h.vm_table[handle_to_idx(handle)] = None
    _teardown_hyp_memory(h, vm)
    return 0


def __pkvm_start_teardown_vm(h: HypState, handle: int) -> int:
    assert h.vm_table_lock is not None
    with h.vm_table_lock:
        vm = get_vm_by_handle(h, handle)
        if vm is None or vm_refcount(h, vm) or vm.is_dying:
            return -EINVAL
        vm.is_dying = True
        return 0


def __pkvm_finalize_teardown_vm(h: HypState, handle: int) -> int:
    assert h.vm_table_lock is not None and h.vm_table is not None
    with h.vm_table_lock:
        vm = get_vm_by_handle(h, handle)
        if vm is None or vm_refcount(h, vm) or not vm.is_dying:
            return -EINVAL
        h.vm_table[handle_to_idx(handle)] = None
    _teardown_hyp_memory(h, vm)
    return 0


def __pkvm_reclaim_dying_guest_page(h: HypState, handle: int, gfn: int) -> int:
    from pkvm.hyp.mem_protect_guest import __pkvm_host_reclaim_page_guest

    vm = get_pkvm_hyp_vm(h, handle)
    if vm is None:
        return -EINVAL
    try:
        if not vm.is_dying:
            return -EINVAL
        return __pkvm_host_reclaim_page_guest(h, gfn, vm)
    finally:
        put_pkvm_hyp_vm(h, vm)


def get_np_pkvm_hyp_vm(h: HypState, handle: int) -> PkvmHypVm | None:
    vm = get_pkvm_hyp_vm(h, handle)
    if vm is not None and vm.is_protected:
        put_pkvm_hyp_vm(h, vm)
        return None
    return vm


# -- 7.2 memcache refill ---------------------------------------------------------------------
def pkvm_refill_memcache(h: HypState, vcpu: PkvmHypVcpu) -> int:
    """Move pages from the host vCPU's memcache to the hyp vCPU's until it holds as many."""
    hv = vcpu.host_vcpu
    head_va = hv + KVM_VCPU.offset("arch.pkvm_memcache.head")
    nr_va = hv + KVM_VCPU.offset("arch.pkvm_memcache.nr_pages")
    host_head = el2_read_u64(h, head_va)
    host_nr = el2_read_u64(h, nr_va)
    h.locks.preempt("host-read", "arch.pkvm_memcache")
    target = host_nr
    ret = 0
    from pkvm.hyp.mm import memcache_push

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
    el2_write_u64(h, head_va, host_head)
    el2_write_u64(h, nr_va, host_nr)
    return ret
