"""The host's PSCI calls, relayed by EL2 (`nvhe/psci-relay.c`).

The host kernel probed the firmware before pKVM existed (`arch/arm64/kvm/arm.c:
init_psci_relay`) and handed EL2 the result, `kvm_host_psci_config`: the PSCI version, the
SMCCC version and the MPIDR of every CPU known then (`cpu_logical_map`). With PSCI >= 0.2 the
relay claims every ID of the two PSCI ranges (0x8400_0000-1F, 0xC400_0000-1F) and:

- forwards the harmless calls to the firmware (x0..x3, the 32-bit ID as the host wrote it);
- rewrites the entry point of CPU_ON (64-bit only), CPU_SUSPEND (64) and SYSTEM_SUSPEND (64)
  to EL2's own (`kvm_hyp_cpu_entry` / `kvm_hyp_cpu_resume`, with the CPU's init parameters as
  context), keeping the host's pc and context id in per-CPU boot arguments: a CPU the host turns
  on always enters EL2 first, which installs its EL2 state (host stage-2 included) and only
  then drops into the host at the host's pc with x0 = its context id;
- refuses CPU_ON of an MPIDR with bits outside the affinity fields or of a CPU unknown at init
  (INVALID_PARAMS) and of a CPU whose boot arguments are taken (ALREADY_ON), before the
  firmware hears of it;
- answers every other ID of the ranges NOT_SUPPORTED;

then zeroes x1..x3 whatever happened.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from pkvm.abi import psci
from pkvm.hyp.setup import image_sections
from pkvm.hyp.state import HypState

U64: Final = 0xFFFF_FFFF_FFFF_FFFF
# Return codes as the 64-bit registers the relay writes.
PSCI_RET_SUCCESS: Final = psci.PSCI_RET_SUCCESS
PSCI_RET_NOT_SUPPORTED: Final = psci.PSCI_RET_NOT_SUPPORTED & U64
PSCI_RET_INVALID_PARAMS: Final = psci.PSCI_RET_INVALID_PARAMS & U64
PSCI_RET_ALREADY_ON: Final = psci.PSCI_RET_ALREADY_ON & U64

PSCI_0_2_FN_BASE, PSCI_0_2_FN64_BASE = psci.PSCI_0_2_FN_BASE, psci.PSCI_0_2_FN64_BASE
FN_PSCI_VERSION, FN_CPU_OFF = psci.PSCI_0_2_FN_PSCI_VERSION, psci.PSCI_0_2_FN_CPU_OFF
FN_MIGRATE_INFO_TYPE: Final = psci.PSCI_0_2_FN_MIGRATE_INFO_TYPE
FN_SYSTEM_OFF, FN_SYSTEM_RESET = psci.PSCI_0_2_FN_SYSTEM_OFF, psci.PSCI_0_2_FN_SYSTEM_RESET
FN_PSCI_FEATURES: Final = psci.PSCI_1_0_FN_PSCI_FEATURES
FN_SET_SUSPEND_MODE, FN_SYSTEM_OFF2 = psci.PSCI_1_0_FN_SET_SUSPEND_MODE, psci.PSCI_1_3_FN_SYSTEM_OFF2
FN64_CPU_SUSPEND, FN64_CPU_ON = psci.PSCI_0_2_FN64_CPU_SUSPEND, psci.PSCI_0_2_FN64_CPU_ON
FN64_AFFINITY_INFO, FN64_MIGRATE = psci.PSCI_0_2_FN64_AFFINITY_INFO, psci.PSCI_0_2_FN64_MIGRATE
FN64_MIGRATE_INFO_UP_CPU: Final = psci.PSCI_0_2_FN64_MIGRATE_INFO_UP_CPU
FN64_SYSTEM_SUSPEND: Final = psci.PSCI_1_0_FN64_SYSTEM_SUSPEND
FN64_SYSTEM_RESET2, FN64_SYSTEM_OFF2 = psci.PSCI_1_1_FN64_SYSTEM_RESET2, psci.PSCI_1_3_FN64_SYSTEM_OFF2

MPIDR_HWID_BITMASK: Final = psci.MPIDR_HWID_BITMASK
PSCI_VERSION_0_2: Final = 0x2

# Where EL2's entry points sit in the hyp image (model addresses: offsets in the hyp text).
KVM_HYP_CPU_ENTRY_OFF: Final = 0x800
KVM_HYP_CPU_RESUME_OFF: Final = 0x900


@dataclass
class PsciBootArgs:
    """`struct psci_boot_args`: lock, host pc, host context id."""

    locked: bool = False
    pc: int = 0
    r0: int = 0


@dataclass
class HostPsciConfig:
    """`struct kvm_host_psci_config` and the per-CPU state of the relay."""

    version: int = 0
    smccc_version: int = 0x1_0000
    cpu_logical_map: list[int] = field(default_factory=list)
    cpu_on_args: list[PsciBootArgs] = field(default_factory=list)
    suspend_args: list[PsciBootArgs] = field(default_factory=list)


def init_psci_relay(h: HypState, version: int, smccc_version: int, mpidrs: list[int]) -> None:
    """What the host writes into EL2's data before init (`init_psci_relay`)."""
    n = h.nr_cpus
    h.psci = HostPsciConfig(version, smccc_version, list(mpidrs),
                            [PsciBootArgs() for _ in range(n)], [PsciBootArgs() for _ in range(n)])
    h.init_params = [(0, 0, 0)] * n


def hyp_cpu_entry_pa(h: HypState, resume: bool = False) -> int:
    return h.carve.image + (KVM_HYP_CPU_RESUME_OFF if resume else KVM_HYP_CPU_ENTRY_OFF)


def init_params_pa(h: HypState, cpu: int) -> int:
    """`kvm_init_params` of `cpu`: the model keeps it at the start of the CPU's per-CPU page."""
    for name, pa, _pages, _prot in image_sections(h):
        if name == "percpu":
            return pa + cpu * 4096
    raise AssertionError("hyp image without per-CPU pages")


def is_psci_0_2_call(fid: int) -> bool:
    return PSCI_0_2_FN_BASE <= fid <= PSCI_0_2_FN_BASE + 31 or (
        PSCI_0_2_FN64_BASE <= fid <= PSCI_0_2_FN64_BASE + 31)


def psci_call(h: HypState, fn: int, a0: int, a1: int, a2: int) -> int:
    """`hyp_smccc_1_1_smc`: an SMC from EL2 with w0 = the 32-bit ID; only x0 comes back."""
    regs = [fn & 0xFFFF_FFFF, a0 & U64, a1 & U64, a2 & U64] + [0] * 14
    h.smc_to_el3(h.cpu, regs)
    return regs[0] & U64


def psci_forward(h: HypState, regs: list[int]) -> int:
    return psci_call(h, regs[0], regs[1], regs[2], regs[3])


def find_cpu_id(h: HypState, mpidr: int) -> int | None:
    if mpidr & ~MPIDR_HWID_BITMASK:
        return None
    for i, m in enumerate(h.psci.cpu_logical_map):
        if m == mpidr:
            return i
    return None


def psci_cpu_on(h: HypState, fid: int, regs: list[int]) -> int:
    mpidr, pc, r0 = regs[1] & U64, regs[2] & U64, regs[3] & U64
    cpu_id = find_cpu_id(h, mpidr)
    if cpu_id is None:
        return PSCI_RET_INVALID_PARAMS
    args = h.psci.cpu_on_args[cpu_id]
    if args.locked:  # try_acquire_boot_args
        return PSCI_RET_ALREADY_ON
    args.locked = True
    args.pc, args.r0 = pc, r0
    ret = psci_call(h, fid, mpidr, hyp_cpu_entry_pa(h), init_params_pa(h, cpu_id))
    if ret != PSCI_RET_SUCCESS:
        args.locked = False  # on success the target CPU releases it
    return ret


def psci_cpu_suspend(h: HypState, fid: int, regs: list[int]) -> int:
    args = h.psci.suspend_args[h.cpu]
    args.pc, args.r0 = regs[2] & U64, regs[3] & U64
    return psci_call(h, fid, regs[1], hyp_cpu_entry_pa(h, resume=True), init_params_pa(h, h.cpu))


def psci_system_suspend(h: HypState, fid: int, regs: list[int]) -> int:
    args = h.psci.suspend_args[h.cpu]
    args.pc, args.r0 = regs[1] & U64, regs[2] & U64
    return psci_call(h, fid, hyp_cpu_entry_pa(h, resume=True), init_params_pa(h, h.cpu), 0)


def psci_0_2_handler(h: HypState, fid: int, regs: list[int]) -> int:
    if fid in (FN_PSCI_VERSION, FN_CPU_OFF, FN64_AFFINITY_INFO, FN64_MIGRATE,
               FN_MIGRATE_INFO_TYPE, FN64_MIGRATE_INFO_UP_CPU, FN_SYSTEM_OFF, FN_SYSTEM_RESET):
        return psci_forward(h, regs)
    if fid == FN64_CPU_SUSPEND:
        return psci_cpu_suspend(h, fid, regs)
    if fid == FN64_CPU_ON:
        return psci_cpu_on(h, fid, regs)
    return PSCI_RET_NOT_SUPPORTED


def psci_1_0_handler(h: HypState, fid: int, regs: list[int]) -> int:
    forwarded = {FN_PSCI_FEATURES, FN_SET_SUSPEND_MODE, FN64_SYSTEM_RESET2}
    if h.profile.psci_relay_system_off2:
        forwarded |= {FN_SYSTEM_OFF2, FN64_SYSTEM_OFF2}
    if fid in forwarded:
        return psci_forward(h, regs)
    if fid == FN64_SYSTEM_SUSPEND:
        return psci_system_suspend(h, fid, regs)
    return psci_0_2_handler(h, fid, regs)


def kvm_host_psci_handler(h: HypState, regs: list[int], fid: int) -> bool:
    """Claim (True) and answer the host's PSCI call `fid` (32 bits, hint cleared)."""
    cfg = getattr(h, "psci", None)
    if cfg is None or cfg.version < PSCI_VERSION_0_2 or not is_psci_0_2_call(fid):
        return False  # PSCI 0.1's firmware-specific IDs: not on this board
    if cfg.version == PSCI_VERSION_0_2:
        ret = psci_0_2_handler(h, fid, regs)
    else:
        ret = psci_1_0_handler(h, fid, regs)
    regs[0] = ret & U64
    regs[1] = regs[2] = regs[3] = 0
    return True


# -- a CPU the firmware started at EL2's entry point ---------------------------------------
def kvm_hyp_cpu_start(h: HypState, cpu: int, pc: int, ctx: int) -> tuple[int, int] | None:
    """The firmware started `cpu` at `pc` with context `ctx`. If that is EL2's entry, run the
    per-CPU init from the CPU's init parameters and return where the host resumes: (pc, x0).
    None: not EL2's entry (a CPU started straight into the host, as before pKVM)."""
    cfg = getattr(h, "psci", None)
    if cfg is None:
        return None
    entry, resume = hyp_cpu_entry_pa(h), hyp_cpu_entry_pa(h, resume=True)
    if pc not in (entry, resume) or ctx != init_params_pa(h, cpu):
        return None
    el2 = h.el2[cpu]
    el2.hcr_el2, el2.vttbr_el2, el2.vtcr_el2 = h.init_params[cpu]
    if pc == entry:  # __kvm_host_psci_cpu_on_entry
        args = cfg.cpu_on_args[cpu]
        host_pc, r0 = args.pc, args.r0
        args.locked = False
    else:  # __kvm_host_psci_cpu_resume_entry
        args = cfg.suspend_args[cpu]
        host_pc, r0 = args.pc, args.r0
    el2.host_regs[0] = r0
    return host_pc, r0
