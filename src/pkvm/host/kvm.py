"""The host's KVM driver for pKVM (`arch/arm64/kvm/pkvm.c`, `arm.c`, `mmu.c`), as a user scripts it.

    vm = machine.host.create_vm(vcpus=2, protected=True, memory="64M")
    vm.map(0x40000, 16); vm.destroy()

What each step issues, per profile (arch/arm64/kvm/pkvm.c):
* create: allocate and share the host `struct kvm` and each `struct kvm_vcpu`. 7.2 reserves the
  handle (`__pkvm_reserve_vm`); the hyp VM and each hyp vCPU are made at the first run of that
  vCPU or the first `map()`. 6.12 (no protected VMs) makes the hyp VM and all vCPUs at once, as
  its first `KVM_RUN` would, so that `.handle` is known.
* map (7.2): load vCPU 0 on CPU 0, then per page top up the vCPU memcache and donate (protected)
  or share (non-protected) the page backing the gfn; put. 6.12 guests run on the host-managed
  stage-2, so map records the page for the host's own table and makes no hypercall.
* destroy: 7.2 start teardown, reclaim (protected) or unshare every mapping, finalize (or
  unreserve a never-created VM); 6.12 `__pkvm_teardown_vm`. Then the host frees what came back
  in the teardown memcaches, unshares its structs and frees the guest's backing pages.
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pkvm.abi import sizes
from pkvm.abi.host_structs import KVM, KVM_ARM_VCPU_PSCI_0_2, KVM_VCPU, Layout
from pkvm.arch.pgtable import KvmPgtable
from pkvm.errors import EFAULT, EINVAL, ENOMEM, HostDataAbort, HostError
from pkvm.host.kvm_life import HOST_VM_LIFECYCLES
from pkvm.host.vcpu_run import HCR_HOST_VCPU, VcpuExit, VcpuRunner
from pkvm.machine.cpu import CpuContext
from pkvm.machine.memory import PAGE_SHIFT, PAGE_SIZE, RAM_BASE, parse_size

if TYPE_CHECKING:
    from pkvm.host.host import Host

LINEAR_MAP_BASE = 0xFFFF_0000_0000_0000
GUEST_RAM_IPA = 0x4000_0000
KVM_PGTABLE_PROT_RWX = 0xF
U64 = 0xFFFF_FFFF_FFFF_FFFF
_MC_HEAD = KVM_VCPU.offset("arch.pkvm_memcache.head")  # head, then nr_pages
assert KVM_VCPU.offset("arch.pkvm_memcache.nr_pages") == _MC_HEAD + 8
_HEAD_NR = struct.Struct("<QQ")
_TABLE = struct.Struct(f"<{PAGE_SIZE // 8}Q")  # one page-table page


def host_va(pa: int) -> int:
    """The host kernel's linear-map VA of a PA (the model's choice)."""
    return LINEAR_MAP_BASE + (pa - RAM_BASE)


class _HostMem:
    """RAM as the host kernel's own page-table code touches it: through its stage-2."""

    def __init__(self, host: "Host"):
        self.host = host

    def read_u64(self, pa: int) -> int:
        return self.host.read_u64(pa)

    def write_u64(self, pa: int, value: int) -> None:
        self.host.write_u64(pa, value)

    def read_table(self, pa: int) -> list[int]:
        """The 512 entries of the table page at `pa`, read at once (one access of the page)."""
        return list(_TABLE.unpack(self.host.read(pa, PAGE_SIZE)))


class _HostTablePages:
    """The host's `kvm_pgtable_mm_ops`: table pages from its page allocator, refcounted."""

    def __init__(self, host: "Host"):
        self.host = host
        self.refs: dict[int, int] = {}

    def zalloc_page(self) -> int | None:
        try:
            pa = self.host.alloc_pages(1)
        except MemoryError:
            return None
        self.refs[pa] = 1
        return pa

    def get_page(self, pa: int) -> None:
        page = pa & ~(PAGE_SIZE - 1)
        if page in self.refs:
            self.refs[page] += 1

    def put_page(self, pa: int) -> None:
        """Drop a reference; a page this allocator never gave (a table entry something else
        scribbled) is left alone rather than freed."""
        page = pa & ~(PAGE_SIZE - 1)
        if page not in self.refs:
            return
        self.refs[page] -= 1
        if not self.refs[page]:
            del self.refs[page]
            self.host.free_pages(page)

    def page_count(self, pa: int) -> int:
        return self.refs.get(pa & ~(PAGE_SIZE - 1), 0)


@dataclass
class HostVcpu:
    vm: "HostVm"
    idx: int
    pa: int  # the host struct kvm_vcpu
    hyp_created: bool = False
    hyp_mem: int = 0
    memcache_pages: list[int] = field(default_factory=list)
    _runner: VcpuRunner | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def va(self) -> int:
        return host_va(self.pa)

    @property
    def runner(self) -> VcpuRunner:
        if self._runner is None:
            self._runner = VcpuRunner(self)
        return self._runner

    def run(self, cpu: int | None = None) -> VcpuExit:
        """`KVM_RUN`: run until an exit userspace must handle; returns a `VcpuExit`."""
        return self.runner.run(cpu)

    def complete_mmio(self, data: int) -> None:
        self.runner.complete_mmio(data)

    @property
    def regs(self) -> CpuContext:
        """The vCPU's registers as the host holds them (a `CpuContext`; assign to change)."""
        return self.runner.get_regs()

    @regs.setter
    def regs(self, ctx: CpuContext) -> None:
        self.runner.set_regs(ctx)

    @property
    def powered_off(self) -> bool:
        return self.runner.power_off

    def field_pa(self, name: str) -> int:
        return self.pa + KVM_VCPU.offset(name)


class HostVm:
    """A VM as the host kernel sees it: its `struct kvm`, vCPUs, memslot and mappings."""

    def __init__(self, host: "Host", nr_vcpus: int, protected: bool, memory: int):
        self.host = host
        self.profile = host.profile
        self.life = HOST_VM_LIFECYCLES[self.profile.vm_lifecycle]
        self.nr_vcpus = nr_vcpus
        self.protected = protected
        self.memory = memory
        self.nr_guest_pages = memory >> PAGE_SHIFT
        self.handle = 0
        self.is_created = False
        self.destroyed = False
        self.vcpus: list[HostVcpu] = []
        # Fault-around (a VMM's choice, as KVM maps huge pages): a stage-2 fault maps the
        # aligned block of this many pages, each donated or shared on its own.
        self.fault_around = 1
        self.memslot: dict[int, int] = {}  # gfn -> host pa backing it
        self.mapped: dict[int, int] = {}  # gfn -> pa mapped in the guest stage-2
        self._allocs: list[tuple[int, int]] = []  # (pa, pages) of driver allocations
        self._kvm_pages = 0
        self.kvm_pa = 0
        self.pgd_pa = 0
        self.hyp_vm_pa = 0
        self.hyp_vm_pages = 0
        self.s2: KvmPgtable | None = None  # 6.12: the guest stage-2 the host manages itself
        self._shared: list[tuple[int, int]] = []  # (pa, size) the host shared with the hyp
        self._returned: set[int] = set()  # pages the hyp gave back in teardown memcaches

    # -- helpers -------------------------------------------------------------------
    def hvc(self, name: str, *args: int, cpu: int = 0) -> int:
        r = self.host.port.hvc(cpu, name, *args)  # `Host.hvc` on a given CPU
        if r.x0:
            raise HostError.not_offered(name, r.x0)
        return r.x1

    def _alloc(self, n: int) -> int:
        pa = self.host.alloc_pages(n)
        self._allocs.append((pa, n))
        return pa

    def kvm_field_pa(self, name: str) -> int:
        return self.kvm_pa + KVM.offset(name)

    def _write_field(self, base: int, layout: Layout, name: str, value: int) -> None:
        f = layout.field(name)
        host = self.host  # `Host.write` on its CPU, a frame less (`to_bytes` makes new bytes)
        host.port.write(host.cpu, base + f.offset,
                        (value & ((1 << (8 * f.size)) - 1)).to_bytes(f.size, "little"))

    def write_kvm_field(self, name: str, value: int) -> None:
        """A store to a field of the VM's `struct kvm` (through the host's stage-2)."""
        self._write_field(self.kvm_pa, KVM, name, value)

    # -- create --------------------------------------------------------------------
    @classmethod
    def create(cls, host: "Host", vcpus: int, protected: bool, memory: int | str) -> "HostVm":
        if vcpus < 1:
            raise ValueError("a VM needs at least one vCPU")
        size = parse_size(memory)
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError("guest memory must be a positive multiple of 4 KiB")
        if protected and not host.profile.protected_vms:
            raise HostError(EINVAL, "KVM_CREATE_VM", None,
                            f"Linux {host.profile.kernel} has no protected VM type")
        vm = cls(host, vcpus, protected, size)
        try:
            vm._create()
        except BaseException:
            vm._undo_create()
            raise
        host.vms.append(vm)
        return vm

    def _create(self) -> None:
        # struct kvm straddles a page boundary: the hyp pins both pages.
        size = self.profile.sizeof_kvm
        base = self._alloc(sizes.page_align(size) // PAGE_SIZE + 1)
        self.kvm_pa = base + PAGE_SIZE - size // 2
        w = self._write_field
        w(self.kvm_pa, KVM, "created_vcpus", self.nr_vcpus)
        w(self.kvm_pa, KVM, "arch.vcpu_features", KVM_ARM_VCPU_PSCI_0_2)
        self.life.init_kvm(self)
        self._share(self.kvm_pa, size)
        self.life.init_host_vm(self)
        for i in range(self.nr_vcpus):
            pa = self._alloc(sizes.page_align(self.profile.sizeof_kvm_vcpu) // PAGE_SIZE)
            vcpu = HostVcpu(self, i, pa)
            w(pa, KVM_VCPU, "kvm", host_va(self.kvm_pa))
            w(pa, KVM_VCPU, "vcpu_id", i)
            w(pa, KVM_VCPU, "vcpu_idx", i)
            w(pa, KVM_VCPU, "arch.ctxt.pstate", 0x3C5)
            w(pa, KVM_VCPU, "arch.hcr_el2", HCR_HOST_VCPU)
            self._share(pa, self.profile.sizeof_kvm_vcpu)
            self.vcpus.append(vcpu)
            vcpu.runner.reset(GUEST_RAM_IPA, 0)
        if not self.profile.hyp_owned_guest_stage2:
            self._create_host_stage2()
        self.life.vcpus_created(self)

    def _create_host_stage2(self) -> None:
        """6.12: the host builds and owns the guest's stage-2 (`kvm_init_stage2_mmu`); each
        vCPU's `hw_mmu` points at the VM's `arch.mmu`, which EL2 loads on every run."""
        s2 = self.s2 = KvmPgtable(_HostMem(self.host), _HostTablePages(self.host), stage=2,
                                  name=f"host-managed stage-2 of VM {id(self):#x}",
                                  normal_memattr=0xF)
        if s2.init():
            raise HostError(ENOMEM, "kvm_init_stage2_mmu")
        self.host.vmids += 1
        w = self._write_field
        w(self.kvm_pa, KVM, "arch.mmu.pgd_phys", s2.pgd)
        w(self.kvm_pa, KVM, "arch.mmu.vmid", self.host.vmids)
        mmu_va = host_va(self.kvm_pa + KVM.offset("arch.mmu.vmid"))
        for vcpu in self.vcpus:
            w(vcpu.pa, KVM_VCPU, "arch.hw_mmu", mmu_va)

    def _share(self, pa: int, size: int) -> None:
        ret = self.host.share_hyp(pa, size)
        if ret:
            raise HostError(-ret, "__pkvm_host_share_hyp", ret)
        self._shared.append((pa, size))

    def create_hyp_vm(self) -> None:
        """`__pkvm_create_hyp_vm`: donate the pgd and the hyp VM, `__pkvm_init_vm`."""
        self.pgd_pa = self._alloc(sizes.KVM_PGTABLE_STAGE2_PGD_SIZE >> PAGE_SHIFT)
        self.hyp_vm_pages = sizes.page_align(sizes.pkvm_get_hyp_vm_size(self.nr_vcpus)) >> PAGE_SHIFT
        self.hyp_vm_pa = self._alloc(self.hyp_vm_pages)
        ret = self.hvc("__pkvm_init_vm", host_va(self.kvm_pa), host_va(self.hyp_vm_pa),
                        host_va(self.pgd_pa))
        if ret < 0:
            self._free_run(self.pgd_pa, 1)
            self._free_run(self.hyp_vm_pa, self.hyp_vm_pages)
            self.pgd_pa = self.hyp_vm_pa = 0
            raise HostError(-ret, "__pkvm_init_vm", ret)
        self.life.hyp_vm_created(self, ret)
        self.is_created = True

    def create_hyp_vcpu(self, vcpu: HostVcpu) -> None:
        pages = sizes.page_align(sizes.PKVM_HYP_VCPU_SIZE) >> PAGE_SHIFT
        mem = self._alloc(pages)
        ret = self.hvc("__pkvm_init_vcpu", self.handle, vcpu.va, host_va(mem))
        if ret:
            self._free_run(mem, pages)
            raise HostError(-ret, "__pkvm_init_vcpu", ret)
        vcpu.hyp_created = True
        vcpu.hyp_mem = mem

    def ensure_hyp_vcpu(self, vcpu: HostVcpu) -> None:
        """What the first `KVM_RUN` of a vCPU does (`kvm_arch_vcpu_run_pid_change`)."""
        if not self.is_created:
            self.create_hyp_vm()
        if not vcpu.hyp_created:
            self.create_hyp_vcpu(vcpu)

    def _free_run(self, pa: int, n: int) -> None:
        self.host.free_pages(pa, n)
        self._allocs.remove((pa, n))

    def _undo_create(self) -> None:
        for pa, size in reversed(self._shared):
            self.host.unshare_hyp(pa, size)
        for pa, n in self._allocs:
            self.host.free_pages(pa, n)
        self._allocs.clear()

    # -- guest memory ------------------------------------------------------------------
    def in_memslot(self, gfn: int) -> bool:
        first = GUEST_RAM_IPA >> PAGE_SHIFT
        return first <= gfn < first + self.nr_guest_pages

    def vcpu_by_mpidr(self, mpidr: int) -> "HostVcpu | None":
        aff = mpidr & 0xFF_00FF_FFFF
        return self.vcpus[aff] if aff < len(self.vcpus) else None

    def backing(self, gfn: int) -> int:
        """The host page backing `gfn` (allocated on first touch, like a memslot)."""
        pa = self.memslot.get(gfn)
        if pa is None:
            if not GUEST_RAM_IPA >> PAGE_SHIFT <= gfn < (GUEST_RAM_IPA >> PAGE_SHIFT) + self.nr_guest_pages:
                raise HostError(EFAULT, "memslot", None, f"gfn {gfn:#x} is outside guest RAM")
            pa = self.host.alloc_pages(1)
            self.memslot[gfn] = pa
        return pa

    def _populate(self, gfn: int, n: int) -> None:
        """`backing` of every frame of [gfn, gfn+n) (the pages allocated together, in order)."""
        slot = self.memslot
        missing = [g for g in range(gfn, gfn + n) if g not in slot]
        if not missing:
            return
        if not self.in_memslot(missing[0]) or not self.in_memslot(missing[-1]):
            bad = next(g for g in missing if not self.in_memslot(g))
            raise HostError(EFAULT, "memslot", None, f"gfn {bad:#x} is outside guest RAM")
        for g, pa in zip(missing, self.host.alloc_pages_bulk(len(missing)), strict=True):
            slot[g] = pa

    def write(self, ipa: int, data: bytes) -> None:
        """The VMM writes guest memory through the memslot (before the guest owns the pages)."""
        pos = 0
        while pos < len(data):
            gfn = (ipa + pos) >> PAGE_SHIFT
            off = (ipa + pos) & (PAGE_SIZE - 1)
            k = min(len(data) - pos, PAGE_SIZE - off)
            self.host.write(self.backing(gfn) + off, data[pos : pos + k])
            pos += k

    def read(self, ipa: int, n: int) -> bytes:
        out = bytearray()
        while n:
            gfn, off = ipa >> PAGE_SHIFT, ipa & (PAGE_SIZE - 1)
            k = min(n, PAGE_SIZE - off)
            out += self.host.read(self.backing(gfn) + off, k)
            ipa += k
            n -= k
        return bytes(out)

    def topup_memcache(self, vcpu: HostVcpu, min_pages: int = sizes.KVM_MMU_CACHE_MIN_PAGES) -> None:
        """`topup_hyp_memcache`: push host pages on the vCPU's memcache (a list through page
        first words, head and count in the host struct kvm_vcpu). As `push_hyp_memcache`, each
        page pushed takes one store (its link); the head and count are read and written once."""
        host = self.host
        head_pa = vcpu.pa + _MC_HEAD
        nr = host.read_u64(head_pa + 8)
        if nr >= min_pages:  # full enough: nothing to push, nothing written
            return
        head = host.read_u64(head_pa)
        while nr < min_pages:
            page = host.alloc_pages(1)
            vcpu.memcache_pages.append(page)
            host.write_u64(page, head)
            head = page
            nr += 1
        host.write(head_pa, _HEAD_NR.pack(head & U64, nr))

    def map(self, gfn: int, n: int = 1, cpu: int = 0) -> None:
        """Map guest frames [gfn, gfn+n) as a guest fault would (donate or share)."""
        if self.destroyed:
            raise HostError(EINVAL, "map", None, "the VM was destroyed")
        self._populate(gfn, n)
        vcpu = self.vcpus[0]
        if not self.profile.hyp_owned_guest_stage2:
            self._map_pages(vcpu, gfn, n, cpu)
            return
        self.ensure_hyp_vcpu(vcpu)
        self.life.vcpu_load(self, vcpu, HCR_HOST_VCPU, cpu)
        try:
            self._map_pages(vcpu, gfn, n, cpu)
        finally:
            self.life.vcpu_put(self, cpu)

    def map_one(self, vcpu: HostVcpu, gfn: int, cpu: int) -> None:
        """Map one page with `vcpu` loaded on `cpu` (the stage-2 fault path)."""
        self._map_pages(vcpu, gfn, 1, cpu)

    def _map_pages(self, vcpu: HostVcpu, gfn: int, n: int, cpu: int) -> None:
        """Map each frame of [gfn, gfn+n) not mapped yet, in order, with `vcpu` loaded on
        `cpu`: 6.12 in the host's own table; 7.2 a memcache top-up (its count read, pages
        pushed when short) and one donate or share per page (the loop's lookups made once)."""
        mapped, backing = self.mapped, self.backing
        if self.s2 is not None:  # 6.12: the host maps the page in its own table
            for g in range(gfn, gfn + n):
                if g not in mapped:
                    pa = backing(g)
                    ret = self.s2.stage2_map(g << PAGE_SHIFT, PAGE_SIZE, pa, KVM_PGTABLE_PROT_RWX)
                    if ret:
                        raise HostError(-ret, "kvm_pgtable_stage2_map", ret)
                    mapped[g] = pa
            return
        name = "__pkvm_host_donate_guest" if self.protected else "__pkvm_host_share_guest"
        extra = () if self.protected else (1, KVM_PGTABLE_PROT_RWX)  # nr_pages, prot
        host = self.host
        hvc = host.port.hvc
        nr_pa = vcpu.pa + _MC_HEAD + 8  # the vCPU memcache's nr_pages
        load, hcpu = host._read_u64, host.cpu  # `Host.read_u64`'s port accessor, a frame less
        slot = self.memslot  # `backing`'s lookup (it allocates a page missing there)
        low = sizes.KVM_MMU_CACHE_MIN_PAGES
        for g in range(gfn, gfn + n):
            if g in mapped:
                continue
            page = slot.get(g)
            if page is None:
                page = backing(g)
            # `topup_hyp_memcache`: its count loaded; the pages pushed only when it is short.
            if (load(hcpu, nr_pa) if load is not None else host.read_u64(nr_pa)) < low:
                self.topup_memcache(vcpu)
            # `HostVm.hvc`, a frame less (no `*extra` for a protected VM: no tuple unpacked)
            r = hvc(cpu, name, page >> PAGE_SHIFT, g, *extra) if extra else \
                hvc(cpu, name, page >> PAGE_SHIFT, g)
            if r.x0:
                raise HostError.not_offered(name, r.x0)
            if r.x1:
                raise HostError(-r.x1, name, r.x1)
            mapped[g] = page

    # -- destroy -------------------------------------------------------------------
    def destroy(self) -> None:
        """Tear the VM down and give the host back every page it gave."""
        if self.destroyed:
            return
        self.life.destroy(self)
        self._release_host_side()
        self.destroyed = True
        if self in self.host.vms:
            self.host.vms.remove(self)

    def free_teardown_mc(self, name: str) -> None:
        """`free_hyp_memcache`: pop every page the hyp pushed and free it."""
        head_pa = self.kvm_field_pa(f"arch.pkvm.{name}.head")
        nr_pa = self.kvm_field_pa(f"arch.pkvm.{name}.nr_pages")
        head, nr = self.host.read_u64(head_pa), self.host.read_u64(nr_pa)
        returned = set(self._walk_memcache(head, nr))
        self.host.write_u64(head_pa, 0)
        self.host.write_u64(nr_pa, 0)
        self._returned |= returned

    def _host_memcache(self, vcpu: HostVcpu) -> list[int]:
        head = self.host.read_u64(vcpu.field_pa("arch.pkvm_memcache.head"))
        nr = self.host.read_u64(vcpu.field_pa("arch.pkvm_memcache.nr_pages"))
        return self._walk_memcache(head, nr)

    def _walk_memcache(self, head: int, nr: int) -> list[int]:
        """The pages of a memcache list. The count and links live in memory anyone could have
        scribbled on: stop at a repeated page, a page the host cannot read, or the end of RAM."""
        out: list[int] = []
        seen: set[int] = set()
        host = self.host
        limit = len(host.pages.used)
        load, cpu = host._read_u64, host.cpu  # `Host.read_u64`'s port accessor, a frame less
        while nr and len(out) < limit:
            page = head & ~(PAGE_SIZE - 1)
            if page in seen:
                break
            try:
                head = load(cpu, page) if load is not None else host.read_u64(page)
            except (HostDataAbort, ValueError):
                break
            seen.add(page)
            out.append(page)
            nr -= 1
        return out

    def _release_host_side(self) -> None:
        if self.s2 is not None:
            self.s2.destroy()  # 6.12: the host frees its own stage-2
            self.s2 = None
            self.mapped.clear()  # guest pages never left the host
        returned = self._returned
        leaked = []
        for pa, n in list(self._allocs):
            pages = [pa + (k << PAGE_SHIFT) for k in range(n)]
            donated = pa in (self.pgd_pa, self.hyp_vm_pa) or any(
                v.hyp_mem == pa for v in self.vcpus)
            if donated and not all(p in returned for p in pages):
                leaked.append(pa)
                continue
            if pa == self.kvm_pa & ~(PAGE_SIZE - 1):
                continue  # freed after the unshare below
            self.host.free_pages(pa, n)
            self._allocs.remove((pa, n))
        for vcpu in self.vcpus:
            still_host = set(self._host_memcache(vcpu))
            for page in vcpu.memcache_pages:
                if page in returned or page in still_host:
                    self.host.free_pages(page)
                else:
                    leaked.append(page)
            vcpu.memcache_pages.clear()
        for pa, size in reversed(self._shared):
            self.host.unshare_hyp(pa, size)
        for pa, n in list(self._allocs):
            if pa not in leaked:
                self.host.free_pages(pa, n)
                self._allocs.remove((pa, n))
        back = [gfn for gfn in self.memslot if gfn not in self.mapped]
        self.host.free_pages_bulk([self.memslot[gfn] for gfn in back])
        for gfn in back:
            del self.memslot[gfn]
        if leaked:
            warnings.warn(f"VM {self.handle:#x}: {len(leaked)} donated allocations never came "
                          "back", stacklevel=2)
