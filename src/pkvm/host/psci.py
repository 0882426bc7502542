"""The host's PSCI for guests (`arch/arm64/kvm/psci.c`), both profiles.

Every guest reaches it, protected ones included: pKVM's EL2 answers only its own vendor calls
(`nvhe/pkvm.c: kvm_handle_pvm_hvc64`) and hands the rest to the host. `kvm_psci_call` takes the
calling vCPU's runner, the function ID (low 32 bits of x0) and x1..x3, and returns the four
result registers (`smccc_set_retval`) and, for the calls that leave the kernel, the exit
(`KVM_EXIT_SYSTEM_EVENT`), or a `wfi` exit for CPU_SUSPEND (`kvm_vcpu_wfi`: the VMM, which
owns the interrupt controller here, parks the vCPU until an interrupt is pending).

The PSCI version is the profile's (6.12: 1.1, 7.2: 1.3); what depends on it is decided here
from the minor version, as `kvm_psci_1_x_call` does. The guests are AArch64, so
`kvm_psci_check_allowed_function` (no 64-bit calls from AArch32) never refuses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pkvm.abi.psci import (
    MPIDR_HWID_BITMASK,
    PSCI_0_2_FN64_AFFINITY_INFO,
    PSCI_0_2_FN64_CPU_ON,
    PSCI_0_2_FN64_CPU_SUSPEND,
    PSCI_0_2_FN_AFFINITY_INFO,
    PSCI_0_2_FN_CPU_OFF,
    PSCI_0_2_FN_CPU_ON,
    PSCI_0_2_FN_CPU_SUSPEND,
    PSCI_0_2_FN_MIGRATE_INFO_TYPE,
    PSCI_0_2_FN_PSCI_VERSION,
    PSCI_0_2_FN_SYSTEM_OFF,
    PSCI_0_2_FN_SYSTEM_RESET,
    PSCI_1_0_FN64_SYSTEM_SUSPEND,
    PSCI_1_0_FN_PSCI_FEATURES,
    PSCI_1_0_FN_SYSTEM_SUSPEND,
    PSCI_1_1_FN64_SYSTEM_RESET2,
    PSCI_1_1_FN_SYSTEM_RESET2,
    PSCI_1_3_FN64_SYSTEM_OFF2,
    PSCI_1_3_FN_SYSTEM_OFF2,
    PSCI_RET_ALREADY_ON,
    PSCI_RET_INTERNAL_FAILURE,
    PSCI_RET_INVALID_PARAMS,
    PSCI_RET_NOT_SUPPORTED,
    PSCI_RET_SUCCESS,
)

if TYPE_CHECKING:
    from pkvm.host.vcpu_run import VcpuExit, VcpuRunner

U32 = 0xFFFF_FFFF
MPIDR_LEVEL_BITS = 8
ARM_SMCCC_VERSION_FUNC_ID = 0x8000_0000
PSCI_0_2_AFFINITY_LEVEL_ON, PSCI_0_2_AFFINITY_LEVEL_OFF = 0, 1
PSCI_0_2_TOS_MP = 2
PSCI_1_1_RESET_TYPE_SYSTEM_WARM_RESET = 0
PSCI_1_1_RESET_TYPE_VENDOR_START = 0x8000_0000
PSCI_1_3_OFF_TYPE_HIBERNATE_OFF = 1

_FEATURES_ALWAYS = frozenset({
    PSCI_0_2_FN_PSCI_VERSION, PSCI_0_2_FN_CPU_SUSPEND, PSCI_0_2_FN64_CPU_SUSPEND,
    PSCI_0_2_FN_CPU_OFF, PSCI_0_2_FN_CPU_ON, PSCI_0_2_FN64_CPU_ON, PSCI_0_2_FN_AFFINITY_INFO,
    PSCI_0_2_FN64_AFFINITY_INFO, PSCI_0_2_FN_MIGRATE_INFO_TYPE, PSCI_0_2_FN_SYSTEM_OFF,
    PSCI_0_2_FN_SYSTEM_RESET, PSCI_1_0_FN_PSCI_FEATURES, ARM_SMCCC_VERSION_FUNC_ID,
})
_NARROWED = frozenset({PSCI_0_2_FN_CPU_ON, PSCI_0_2_FN_AFFINITY_INFO, PSCI_1_0_FN_SYSTEM_SUSPEND,
                       PSCI_1_1_FN_SYSTEM_RESET2, PSCI_1_3_FN_SYSTEM_OFF2})


def is_psci(fid: int) -> bool:
    """The function IDs `kvm_smccc_call_handler` sends to `kvm_psci_call`: owner STANDARD,
    function numbers 0-0x1F, either calling convention."""
    return fid & 0xBFFF_FFE0 == 0x8400_0000


def _valid_affinity(aff: int) -> bool:
    return not aff & ~MPIDR_HWID_BITMASK


def _affinity_mask(level: int) -> int:
    if level <= 3:
        return MPIDR_HWID_BITMASK & ~((1 << (level * MPIDR_LEVEL_BITS)) - 1)
    return 0


def kvm_psci_vcpu_on(runner: "VcpuRunner", cpu_id: int, entry: int, context: int) -> int:
    vm = runner.vm
    if not _valid_affinity(cpu_id):
        return PSCI_RET_INVALID_PARAMS
    target = vm.vcpu_by_mpidr(cpu_id)
    if target is None:
        return PSCI_RET_INVALID_PARAMS
    if not target.runner.power_off:
        return PSCI_RET_ALREADY_ON  # (INVALID_PARAMS under PSCI 0.1, which is not offered)
    # reset_state = {pc, r0}; KVM_REQ_VCPU_RESET: kvm_reset_vcpu before its next run.
    target.runner.reset(entry, context)
    target.runner.power_off = False  # mp_state = KVM_MP_STATE_RUNNABLE
    return PSCI_RET_SUCCESS


def kvm_psci_vcpu_affinity_info(runner: "VcpuRunner", target: int, lowest_level: int) -> int:
    if not _valid_affinity(target):
        return PSCI_RET_INVALID_PARAMS
    mask = _affinity_mask(lowest_level)
    if not mask:
        return PSCI_RET_INVALID_PARAMS
    target &= mask
    matching = 0
    for v in runner.vm.vcpus:
        if (v.idx & MPIDR_HWID_BITMASK) & mask == target:  # MPIDR affinity = the vCPU index
            matching += 1
            if not v.runner.power_off:
                return PSCI_0_2_AFFINITY_LEVEL_ON
    return PSCI_0_2_AFFINITY_LEVEL_OFF if matching else PSCI_RET_INVALID_PARAMS


def kvm_psci_call(runner: "VcpuRunner", fid: int, a1: int, a2: int, a3: int,
                  ) -> tuple[list[int], "VcpuExit | None"]:
    """`kvm_psci_call` for PSCI 1.x: ([x0..x3], exit or None to re-enter the guest)."""
    from pkvm.host.vcpu_run import VcpuExit  # late: vcpu_run imports this module

    minor = runner.vm.profile.psci_version & 0xFFFF
    if fid in _NARROWED:  # kvm_psci_narrow_to_32bit
        a1, a2, a3 = a1 & U32, a2 & U32, a3 & U32
    val = PSCI_RET_NOT_SUPPORTED
    out: VcpuExit | None = None
    if fid == PSCI_0_2_FN_PSCI_VERSION:
        val = (1 << 16) | minor
    elif fid == PSCI_1_0_FN_PSCI_FEATURES:
        arg = a1 & U32
        if arg in _FEATURES_ALWAYS:
            val = 0
        elif arg in (PSCI_1_1_FN_SYSTEM_RESET2, PSCI_1_1_FN64_SYSTEM_RESET2) and minor >= 1:
            val = 0
        elif arg in (PSCI_1_3_FN_SYSTEM_OFF2, PSCI_1_3_FN64_SYSTEM_OFF2) and minor >= 3:
            val = PSCI_1_3_OFF_TYPE_HIBERNATE_OFF
        # SYSTEM_SUSPEND: only when userspace enabled it (KVM_CAP_ARM_SYSTEM_SUSPEND): not here
    elif fid in (PSCI_1_0_FN_SYSTEM_SUSPEND, PSCI_1_0_FN64_SYSTEM_SUSPEND):
        pass  # not enabled: NOT_SUPPORTED
    elif fid in (PSCI_1_1_FN_SYSTEM_RESET2, PSCI_1_1_FN64_SYSTEM_RESET2):
        if minor >= 1:
            arg = a1 & U32
            if (arg <= PSCI_1_1_RESET_TYPE_SYSTEM_WARM_RESET
                    or arg >= PSCI_1_1_RESET_TYPE_VENDOR_START):
                val = PSCI_RET_INTERNAL_FAILURE
                out = VcpuExit("system_event", event="reset")
            else:
                val = PSCI_RET_INVALID_PARAMS
    elif fid in (PSCI_1_3_FN_SYSTEM_OFF2, PSCI_1_3_FN64_SYSTEM_OFF2):
        if minor >= 3:
            if (a1 and a1 != PSCI_1_3_OFF_TYPE_HIBERNATE_OFF) or a2 != 0:
                val = PSCI_RET_INVALID_PARAMS
            else:
                val = PSCI_RET_INTERNAL_FAILURE
                out = VcpuExit("system_event", event="shutdown")
    else:
        val, out = _psci_0_2_call(runner, fid, a1, a2, a3)
    return [val, 0, 0, 0], out


def _psci_0_2_call(runner: "VcpuRunner", fid: int, a1: int, a2: int, a3: int,
                   ) -> tuple[int, "VcpuExit | None"]:
    from pkvm.host.vcpu_run import VcpuExit  # late: vcpu_run imports this module

    if fid in (PSCI_0_2_FN_CPU_SUSPEND, PSCI_0_2_FN64_CPU_SUSPEND):
        return PSCI_RET_SUCCESS, VcpuExit("wfi")  # kvm_psci_vcpu_suspend: kvm_vcpu_wfi
    if fid == PSCI_0_2_FN_CPU_OFF:
        runner.power_off = True  # kvm_arm_vcpu_power_off
        return PSCI_RET_SUCCESS, VcpuExit("cpu_off")
    if fid in (PSCI_0_2_FN_CPU_ON, PSCI_0_2_FN64_CPU_ON):
        return kvm_psci_vcpu_on(runner, a1, a2, a3), None
    if fid in (PSCI_0_2_FN_AFFINITY_INFO, PSCI_0_2_FN64_AFFINITY_INFO):
        return kvm_psci_vcpu_affinity_info(runner, a1, a2), None
    if fid == PSCI_0_2_FN_MIGRATE_INFO_TYPE:
        return PSCI_0_2_TOS_MP, None
    if fid == PSCI_0_2_FN_SYSTEM_OFF:
        return PSCI_RET_INTERNAL_FAILURE, VcpuExit("system_event", event="shutdown")
    if fid == PSCI_0_2_FN_SYSTEM_RESET:
        return PSCI_RET_INTERNAL_FAILURE, VcpuExit("system_event", event="reset")
    return PSCI_RET_NOT_SUPPORTED, None
