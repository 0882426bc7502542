"""The firmware at EL3: what an `smc #0` from EL2 (or from the host before pKVM) reaches.

Modelled on QEMU's built-in PSCI emulation for the `virt` board, which is the firmware of the
real kernels' conformance runs: PSCI 1.1's basic calls for the board's CPUs, x0 the only
register written, -1 (NOT_SUPPORTED) for every other function ID, no SMCCC architecture calls
(so the host kernel stays at SMCCC 1.0). Switched on (`ffa=`), a secure partition manager
(`pkvm.machine.spmc.Spmc`) answers the FF-A range and the firmware then reports SMCCC 1.2, as
an SPMD-carrying TF-A would.

A CPU the firmware powers on starts executing at the entry point it was given: the board
decides what runs there (`on_cpu_start`). The firmware knows neither the host nor the hyp.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from pkvm.abi import ffa, psci

if TYPE_CHECKING:
    from pkvm.machine.memory import PhysMemory

U64: Final = 0xFFFF_FFFF_FFFF_FFFF
# Return codes as the 64-bit x0 the firmware writes.
PSCI_RET_SUCCESS: Final = psci.PSCI_RET_SUCCESS
PSCI_RET_NOT_SUPPORTED: Final = psci.PSCI_RET_NOT_SUPPORTED & U64
PSCI_RET_INVALID_PARAMS: Final = psci.PSCI_RET_INVALID_PARAMS & U64
PSCI_RET_DENIED: Final = psci.PSCI_RET_DENIED & U64
PSCI_RET_ALREADY_ON: Final = psci.PSCI_RET_ALREADY_ON & U64

PSCI_0_2_FN_BASE, PSCI_0_2_FN64_BASE = psci.PSCI_0_2_FN_BASE, psci.PSCI_0_2_FN64_BASE
PSCI_VERSION: Final = psci.PSCI_0_2_FN_PSCI_VERSION
CPU_SUSPEND, CPU_SUSPEND64 = psci.PSCI_0_2_FN_CPU_SUSPEND, psci.PSCI_0_2_FN64_CPU_SUSPEND
CPU_OFF: Final = psci.PSCI_0_2_FN_CPU_OFF
CPU_ON, CPU_ON64 = psci.PSCI_0_2_FN_CPU_ON, psci.PSCI_0_2_FN64_CPU_ON
AFFINITY_INFO, AFFINITY_INFO64 = psci.PSCI_0_2_FN_AFFINITY_INFO, psci.PSCI_0_2_FN64_AFFINITY_INFO
MIGRATE_INFO_TYPE: Final = psci.PSCI_0_2_FN_MIGRATE_INFO_TYPE
SYSTEM_OFF, SYSTEM_RESET = psci.PSCI_0_2_FN_SYSTEM_OFF, psci.PSCI_0_2_FN_SYSTEM_RESET
PSCI_FEATURES: Final = psci.PSCI_1_0_FN_PSCI_FEATURES
SMCCC_VERSION, SMCCC_ARCH_FEATURES = 0x8000_0000, 0x8000_0001
SMCCC_VERSION_1_2: Final = 0x1_0002

PSCI_VERSION_1_1: Final = 0x1_0001
PSCI_TOS_NOT_PRESENT_MP: Final = 2  # MIGRATE_INFO_TYPE: no Trusted OS that needs migrating

# What QEMU's PSCI emulation implements (and so reports in PSCI_FEATURES).
QEMU_PSCI_CALLS: Final = frozenset({
    PSCI_VERSION, CPU_SUSPEND, CPU_SUSPEND64, CPU_OFF, CPU_ON, CPU_ON64, AFFINITY_INFO,
    AFFINITY_INFO64, MIGRATE_INFO_TYPE, SYSTEM_OFF, SYSTEM_RESET, PSCI_FEATURES,
})

ON, OFF = "on", "off"


def board_mpidr(cpu: int) -> int:
    """MPIDR_EL1 affinity of CPU `cpu` on a GICv3 `virt` board: 16 CPUs per cluster."""
    return ((cpu // 16) << 8) | (cpu % 16)


class Firmware:
    """EL3: PSCI for the board's CPUs, optionally an FF-A SPMC. `smc(cpu, regs)` takes and
    returns x0..x17 in `regs` (a list of at least 18 registers)."""

    def __init__(self, nr_cpus: int, mem: "PhysMemory", ffa: Any = None):
        self.nr_cpus = nr_cpus
        self.mem = mem
        self.power = [ON] + [OFF] * (nr_cpus - 1)
        self.spmc = ffa
        self.system_state = ON  # SYSTEM_OFF / SYSTEM_RESET switch the board off
        self.calls: list[int] = []  # every function ID that reached EL3, in order
        # Called with (cpu, entry pc, context id) when a CPU starts at an entry point.
        self.on_cpu_start: Callable[[int, int, int], None] | None = None
        self.on_cpu_off: Callable[[int], None] | None = None

    def __reduce__(self) -> tuple[Any, ...]:  # as `Tlb.__reduce__` (machine/mmu.py)
        return (Firmware, (self.nr_cpus, self.mem, self.spmc), self.__getstate__())

    @property
    def smccc_version(self) -> int | None:
        """SMCCC_VERSION's answer, or None when the firmware lacks the call (QEMU)."""
        return SMCCC_VERSION_1_2 if self.spmc is not None else None

    def cpu_of(self, mpidr: int) -> int | None:
        for cpu in range(self.nr_cpus):
            if board_mpidr(cpu) == mpidr:
                return cpu
        return None

    def smc(self, cpu: int, regs: list[int]) -> None:
        """One `smc #0` issued on `cpu` (the 32-bit function ID in w0)."""
        fid = regs[0] & 0xFFFF_FFFF
        self.calls.append(fid)
        if self.spmc is not None and self.spmc.claims(fid):
            self.spmc.smc(cpu, regs)
            return
        if fid == SMCCC_VERSION and self.smccc_version is not None:
            regs[0] = self.smccc_version
            return
        if fid == SMCCC_ARCH_FEATURES and self.smccc_version is not None:
            regs[0] = PSCI_RET_NOT_SUPPORTED
            return
        regs[0] = self._psci(cpu, fid, regs)

    # -- PSCI ---------------------------------------------------------------------------
    def _psci(self, cpu: int, fid: int, r: list[int]) -> int:
        if fid not in QEMU_PSCI_CALLS:
            return PSCI_RET_NOT_SUPPORTED
        smc32 = fid < PSCI_0_2_FN64_BASE
        a1, a2, a3 = (r[1] & 0xFFFF_FFFF, r[2] & 0xFFFF_FFFF, r[3] & 0xFFFF_FFFF) if smc32 else (
            r[1], r[2], r[3])
        if fid == PSCI_VERSION:
            return PSCI_VERSION_1_1
        if fid == PSCI_FEATURES:
            if (a1 & 0xFFFF_FFFF) in QEMU_PSCI_CALLS or (a1 & 0xFFFF_FFFF) == SMCCC_VERSION and (
                    self.smccc_version is not None):
                return PSCI_RET_SUCCESS
            return PSCI_RET_NOT_SUPPORTED
        if fid == MIGRATE_INFO_TYPE:
            return PSCI_TOS_NOT_PRESENT_MP
        if fid in (AFFINITY_INFO, AFFINITY_INFO64):
            if a2 != 0:  # QEMU: every affinity level above 0 is on (measured)
                return 0
            target = self.cpu_of(a1)
            if target is None:
                return PSCI_RET_INVALID_PARAMS
            return 0 if self.power[target] == ON else 1
        if fid in (CPU_ON, CPU_ON64):
            target = self.cpu_of(a1)
            if target is None:
                return PSCI_RET_INVALID_PARAMS
            if self.power[target] == ON:
                return PSCI_RET_ALREADY_ON
            self.power[target] = ON
            if self.on_cpu_start is not None:
                self.on_cpu_start(target, a2, a3)
            return PSCI_RET_SUCCESS
        if fid == CPU_OFF:
            self.power[cpu] = OFF
            if self.on_cpu_off is not None:
                self.on_cpu_off(cpu)
            return PSCI_RET_SUCCESS  # never seen: the CPU is off
        if fid in (CPU_SUSPEND, CPU_SUSPEND64):
            return PSCI_RET_SUCCESS  # QEMU: a standby state, woken at once
        if fid in (SYSTEM_OFF, SYSTEM_RESET):
            self.system_state = OFF
            return PSCI_RET_SUCCESS
        return PSCI_RET_NOT_SUPPORTED


SMC_NAMES: dict[str, int] = {
    "PSCI_VERSION": PSCI_VERSION, "CPU_SUSPEND": CPU_SUSPEND64, "CPU_OFF": CPU_OFF,
    "CPU_ON": CPU_ON64, "AFFINITY_INFO": AFFINITY_INFO64, "MIGRATE_INFO_TYPE": MIGRATE_INFO_TYPE,
    "SYSTEM_OFF": SYSTEM_OFF, "SYSTEM_RESET": SYSTEM_RESET, "PSCI_FEATURES": PSCI_FEATURES,
    "SMCCC_VERSION": SMCCC_VERSION, "SMCCC_ARCH_FEATURES": SMCCC_ARCH_FEATURES,
    "FFA_ERROR": ffa.FFA_ERROR, "FFA_SUCCESS": ffa.FFA_SUCCESS, "FFA_VERSION": ffa.FFA_VERSION,
    "FFA_FEATURES": ffa.FFA_FEATURES, "FFA_RX_RELEASE": ffa.FFA_RX_RELEASE,
    "FFA_RXTX_MAP": ffa.FFA_FN64_RXTX_MAP, "FFA_RXTX_UNMAP": ffa.FFA_RXTX_UNMAP,
    "FFA_PARTITION_INFO_GET": ffa.FFA_PARTITION_INFO_GET, "FFA_ID_GET": ffa.FFA_ID_GET,
    "FFA_MEM_LEND": ffa.FFA_FN64_MEM_LEND, "FFA_MEM_SHARE": ffa.FFA_FN64_MEM_SHARE,
    "FFA_MEM_RECLAIM": ffa.FFA_MEM_RECLAIM, "FFA_MEM_FRAG_RX": ffa.FFA_MEM_FRAG_RX,
    "FFA_MEM_FRAG_TX": ffa.FFA_MEM_FRAG_TX,
}


def smc_func_id(name: str) -> int:
    """The function ID of a PSCI / SMCCC / FF-A call by name (64-bit forms where both exist)."""
    try:
        return SMC_NAMES[name]
    except KeyError:
        raise ValueError(f"{name!r} is not a known SMC; pass the function ID") from None
