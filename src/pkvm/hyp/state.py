"""EL2's globals: everything the hyp owns, in one place (Linux keeps them as nvhe globals).

Nothing outside `pkvm.hyp` may hold a reference to this object except the board that wires the
machine together and the read-only view (`pkvm.inspect`) that tests and tools use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pkvm.abi.profiles import Profile
from pkvm.hyp.memory import HypVmemmap
from pkvm.hyp.page_alloc import HypPool
from pkvm.hyp.pgtable import KvmPgtable
from pkvm.hyp.spinlock import RANK_HOST, RANK_HYP, RANK_VM_TABLE, HypLocks, HypSpinLock
from pkvm.machine.cpu_id import CPU_ID_REGS
from pkvm.machine.memory import PhysMemory
from pkvm.machine.mmu import El2Regs, Tlb

if TYPE_CHECKING:
    from pkvm.hyp.pkvm import PkvmHypVcpu, PkvmHypVm

# hyp VA of the linear map: __hyp_va(pa) = pa + HYP_LINEAR_OFFSET (any fixed offset will do).
HYP_LINEAR_OFFSET = 0x0000_8000_0000_0000
HYP_VA_BITS = 48


@dataclass(frozen=True)
class MemblockRegion:
    base: int
    size: int
    nomap: bool = False

    @property
    def end(self) -> int:
        return self.base + self.size


@dataclass
class CarveOut:
    """Where `__pkvm_init` put each part of the hyp's memory (physical addresses)."""

    base: int = 0
    size: int = 0
    selftest: int = 0
    vmemmap: int = 0
    vmemmap_pages: int = 0
    vm_table: int = 0
    hyp_pgt: int = 0
    hyp_pgt_pages: int = 0
    host_s2_pgt: int = 0
    host_s2_pgt_pages: int = 0
    ffa_proxy: int = 0
    ffa_proxy_pages: int = 0
    image: int = 0  # hyp text/data/bss/per-CPU/stacks: the model keeps them in the carve-out
    image_pages: int = 0


@dataclass
class HostMmu:
    pgt: KvmPgtable
    lock: HypSpinLock


@dataclass
class HypState:
    mem: PhysMemory
    profile: Profile
    nr_cpus: int
    el2: list[El2Regs]
    locks: HypLocks
    hyp_memory: list[MemblockRegion]
    vmemmap: HypVmemmap
    pkvm_pgd_lock: HypSpinLock
    carve: CarveOut = field(default_factory=CarveOut)
    pkvm_pgtable: KvmPgtable | None = None
    host_mmu: HostMmu | None = None
    hpool: HypPool | None = None
    host_s2_pool: HypPool | None = None
    vm_table: list[object | None] | None = None
    vm_table_lock: HypSpinLock | None = None
    host_mmu_lock: HypSpinLock | None = None
    loaded_hyp_vcpu: list["PkvmHypVcpu | None"] = field(default_factory=list)
    protected_mode_initialized: bool = False
    dead: str | None = None
    hyp_vms: dict[int, "PkvmHypVm"] = field(default_factory=dict)  # hyp VA of hyp_vm -> object
    seeded_bugs: frozenset[str] = frozenset()
    warnings: list[str] = field(default_factory=list)
    # `id_aa64*_el1_sys_val`: the sanitised ID registers the host hands EL2 before init.
    sys_vals: dict[str, int] = field(default_factory=lambda: dict(CPU_ID_REGS))
    # The SMC door (psci_relay.py, ffa.py): the relay's config, the FF-A proxy's state, the
    # `smc #0` EL2 issues to the firmware (wired by the board), each CPU's `kvm_init_params`
    # (hcr, vttbr, vtcr) that a CPU entering EL2 through the relay installs.
    psci: Any = None
    ffa: Any = None
    smc_to_el3: Any = None
    init_params: list[tuple[int, int, int]] = field(default_factory=list)
    # EL2's TLB over its own stage-1, and the TLB of the host's stage-2 regime (the host's
    # CPUs fill it, the hyp invalidates it where Linux issues the TLBI).
    el2_tlb: Tlb = field(default_factory=lambda: Tlb("EL2 stage-1"))
    host_s2_tlb: Tlb = field(default_factory=lambda: Tlb("host stage-2"))
    # EL2 stores to a page the hyp neither owns nor borrows (found when the store is made);
    # pages handed back to the host by the current hypercall that the kernel wipes first.
    bad_stores: list[str] = field(default_factory=list)
    wiped_returns: list[int] = field(default_factory=list)
    store_ok: list = field(default_factory=lambda: [-1, set()])  # [gen, pages] (6.12 memo)

    @property
    def cpu(self) -> int:
        return self.locks.cpu

    def bug(self, name: str) -> bool:
        """Is the seeded bug `name` switched on (see `pkvm.check.bugs`)?"""
        return name in self.seeded_bugs


def new_hyp_state(mem: PhysMemory, profile: Profile, el2: list[El2Regs]) -> HypState:
    locks = HypLocks(len(el2))
    vmemmap = HypVmemmap(mem, profile.hyp_no_order)
    h = HypState(
        mem=mem,
        profile=profile,
        nr_cpus=len(el2),
        el2=el2,
        locks=locks,
        hyp_memory=[MemblockRegion(mem.base, mem.size)],
        vmemmap=vmemmap,
        pkvm_pgd_lock=HypSpinLock(locks, "pkvm_pgd_lock", RANK_HYP),
    )
    h.vm_table_lock = HypSpinLock(locks, "vm_table_lock", RANK_VM_TABLE)
    h.host_mmu_lock = HypSpinLock(locks, "host_mmu.lock", RANK_HOST)
    h.loaded_hyp_vcpu = [None] * len(el2)
    return h
