"""EL2's globals: everything the hyp owns, in one place (Linux keeps them as nvhe globals).

Nothing outside `pkvm.hyp` may hold a reference to this object except the board that wires the
machine together and the read-only view (`pkvm.inspect`) that tests and tools use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from pkvm.abi.profiles import Profile
from pkvm.hyp.memory import HypVmemmap, PageStates, select_page_states
from pkvm.hyp.page_alloc import HypPool
from pkvm.hyp.panic import HypWarn
from pkvm.hyp.pgtable import KvmPgtable
from pkvm.hyp.spinlock import RANK_HOST, RANK_HYP, RANK_VM_TABLE, HypLocks, HypSpinLock
from pkvm.machine.cpu_id import CPU_ID_REGS
from pkvm.machine.memory import PhysMemory
from pkvm.machine.mmu import El2Regs, Tlb

if TYPE_CHECKING:
    from pkvm.hyp.ffa import FfaProxy
    from pkvm.hyp.pkvm import VmLife
    from pkvm.hyp.pkvm_structs import PkvmHypVcpu, PkvmHypVm
    from pkvm.hyp.psci_relay import HostPsciConfig

# hyp VA of the linear map: __hyp_va(pa) = pa + HYP_LINEAR_OFFSET (any fixed offset will do).
HYP_LINEAR_OFFSET: Final = 0x0000_8000_0000_0000
HYP_VA_BITS: Final = 48


@dataclass(frozen=True)
class MemblockRegion:
    base: int
    size: int
    nomap: bool = False

    @property
    def end(self) -> int:
        return self.base + self.size

    def __reduce__(self) -> tuple[Any, ...]:  # compiled: a frozen field cannot be set back
        return (MemblockRegion, (self.base, self.size, self.nomap))


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


SmcToEl3 = Callable[[int, list[int]], None]


class HypStateLate:
    """The fields of `HypState` that are set after it is made (see there).

    Declared on this plain base class rather than as dataclass fields: compiled with mypyc, a
    dataclass field's annotation loads its class when this module is imported, and the modules
    defining these classes (psci_relay, ffa, pkvm) import this one.
    """

    # -- wired before `__pkvm_init` -------------------------------------------------------
    # The `smc #0` EL2 issues to the firmware (the board) and the PSCI relay's config.
    smc_to_el3: SmcToEl3
    psci: HostPsciConfig
    # -- built by `__pkvm_init` (setup.py) --------------------------------------------------
    pkvm_pgtable: KvmPgtable
    hpool: HypPool
    host_s2_pool: HypPool
    host_mmu: HostMmu
    ffa: FfaProxy
    # What differs in shape between the kernels' VM life cycles (nvhe/pkvm.c), chosen from
    # `profile.vm_lifecycle`: `pkvm_one_phase` (6.12) or `pkvm_two_phase` (7.2).
    life: VmLife


@dataclass(repr=False, eq=False)
class HypState(HypStateLate):
    """EL2's globals, in two phases.

    At reset (`new_hyp_state`) the hyp has what the machine gives it: RAM, its CPUs' EL2
    registers, its locks and the hyp vmemmap. Before `__pkvm_init` the board wires the SMC door
    (`smc_to_el3`) and the host fills the PSCI relay's config (`psci`). `__pkvm_init` then
    builds the rest (`setup.py`, in the kernel's order): the hyp stage-1, the pools, the host
    stage-2, the VM table, the FF-A proxy and the VM life cycle of this kernel. These booted
    fields are not Optional: the board issues `__pkvm_init` while it boots, before the host can
    make any other call, so no code that reads them runs before they are set and nothing after
    boot tests for None. (`vm_table` is empty until then, as the kernel's is NULL, for the checks
    the kernel makes on it.)
    """

    mem: PhysMemory
    profile: Profile
    nr_cpus: int
    el2: list[El2Regs]
    locks: HypLocks
    hyp_memory: list[MemblockRegion]
    vmemmap: HypVmemmap
    pkvm_pgd_lock: HypSpinLock
    vm_table_lock: HypSpinLock
    host_mmu_lock: HypSpinLock
    carve: CarveOut = field(default_factory=CarveOut)
    # Where this kernel keeps page states (7.2: the vmemmap; 6.12: PTE software bits), chosen
    # from the profile when the state is made.
    page_states: PageStates = field(init=False)
    # `vm_table`: empty (the kernel's NULL) until `__pkvm_init` allocates it.
    vm_table: list[object | None] = field(default_factory=list)
    loaded_hyp_vcpu: list[PkvmHypVcpu | None] = field(default_factory=list)
    protected_mode_initialized: bool = False
    dead: str | None = None
    hyp_vms: dict[int, PkvmHypVm] = field(default_factory=dict)  # hyp VA of hyp_vm -> object
    seeded_bugs: frozenset[str] = frozenset()
    warnings: list[HypWarn] = field(default_factory=list)  # every WARN_ON fired
    # The physical timer that interrupts a guest (ARM_EXCEPTION_IRQ): after this many
    # instructions (int) or seconds of wall clock (float); None lets a guest run until it exits.
    guest_timeslice: int | float | None = None
    # `id_aa64*_el1_sys_val`: the sanitised ID registers the host hands EL2 before init.
    sys_vals: dict[str, int] = field(default_factory=lambda: dict(CPU_ID_REGS))
    # Each CPU's `kvm_init_params` (hcr, vttbr, vtcr) that a CPU entering EL2 through the PSCI
    # relay installs.
    init_params: list[tuple[int, int, int]] = field(default_factory=list)
    # EL2's TLB over its own stage-1, and the TLB of the host's stage-2 regime (the host's
    # CPUs fill it, the hyp invalidates it where Linux issues the TLBI).
    el2_tlb: Tlb = field(default_factory=lambda: Tlb("EL2 stage-1"))
    host_s2_tlb: Tlb = field(default_factory=lambda: Tlb("host stage-2"))
    # EL2 stores to a page the hyp neither owns nor borrows (found when the store is made);
    # pages handed back to the host by the current hypercall that the kernel wipes first.
    bad_stores: list[str] = field(default_factory=list)
    wiped_returns: list[int] = field(default_factory=list)
    store_ok: list[Any] = field(default_factory=lambda: [-1, set()])  # [gen, pages] (6.12 memo)
    # Read-only observers of the guest HVCs EL2 answers itself (`Inspector.watch_guest_hvcs`).
    guest_hvc_watchers: list[Callable[[str, dict[str, Any]], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.page_states = select_page_states(self.profile)

    @property
    def cpu(self) -> int:
        return self.locks.cpu

    def bug(self, name: str) -> bool:
        """Is the seeded bug `name` switched on (see `pkvm.check.bugs`)?"""
        return name in self.seeded_bugs


def new_hyp_state(mem: PhysMemory, profile: Profile, el2: list[El2Regs]) -> HypState:
    locks = HypLocks(len(el2))
    vmemmap = HypVmemmap.over(mem, profile.hyp_no_order)
    return HypState(
        mem=mem,
        profile=profile,
        nr_cpus=len(el2),
        el2=el2,
        locks=locks,
        hyp_memory=[MemblockRegion(mem.base, mem.size)],
        vmemmap=vmemmap,
        pkvm_pgd_lock=HypSpinLock(locks, "pkvm_pgd_lock", RANK_HYP),
        vm_table_lock=HypSpinLock(locks, "vm_table_lock", RANK_VM_TABLE),
        host_mmu_lock=HypSpinLock(locks, "host_mmu.lock", RANK_HOST),
        loaded_hyp_vcpu=[None] * len(el2),
    )
