"""The host's PSCI for guests (`arch/arm64/kvm/psci.c`), seen by a guest that calls it.

The guest issues each call with `hvc #0` and writes the low byte of x0 to the UART; the
expected answers are read off `kvm_psci_1_x_call` / `kvm_psci_0_2_call` of each kernel.
"""

from __future__ import annotations

import io
import struct

import pytest

import pkvm
from pkvm.host.vmm import Vmm

UART = 0x0900_0000
HVC = 0xD400_0002
STRB_W0_X9 = 0x3900_0120  # strb w0, [x9]


def _mov(rd: int, value: int) -> list[int]:
    """movz/movk sequence loading a 64-bit constant."""
    value &= (1 << 64) - 1
    out = [0xD280_0000 | ((value & 0xFFFF) << 5) | rd]
    for hw in range(1, 4):
        part = (value >> (16 * hw)) & 0xFFFF
        if part:
            out.append(0xF280_0000 | (hw << 21) | (part << 5) | rd)
    return out


def psci_guest(calls: list[tuple[int, ...]]) -> bytes:
    code = _mov(9, UART)
    for fid, *args in calls:
        code += _mov(0, fid)
        for i, a in enumerate(args, start=1):
            code += _mov(i, a)
        code += [HVC, STRB_W0_X9]
    code += _mov(0, 0x8400_0008) + [HVC]  # SYSTEM_OFF
    return struct.pack(f"<{len(code)}I", *code)


PSCI_VERSION, AFFINITY_INFO64, CPU_ON64, FEATURES = 0x8400_0000, 0xC400_0004, 0xC400_0003, \
    0x8400_000A
SYSTEM_RESET2, SYSTEM_OFF2, SYSTEM_SUSPEND, MIGRATE = 0x8400_0012, 0x8400_0015, 0x8400_000E, \
    0x8400_0005
CALLS = [
    (PSCI_VERSION,),
    (AFFINITY_INFO64, 1, 0),            # vCPU 1 is off: OFF (1)
    (AFFINITY_INFO64, 0, 0),            # the caller: ON (0)
    (AFFINITY_INFO64, 5, 0),            # no vCPU matches: INVALID_PARAMS
    (AFFINITY_INFO64, 0, 4),            # no level 4: INVALID_PARAMS
    (AFFINITY_INFO64, 1, 1),            # level 1 ignores Aff0: matches vCPU 0 too: ON
    (AFFINITY_INFO64, 1 << 40, 0),      # bits outside MPIDR_HWID_BITMASK: INVALID_PARAMS
    (CPU_ON64, 1 << 40, 0x4000_0000, 0),  # likewise for CPU_ON
    (CPU_ON64, 0, 0x4000_0000, 0),      # already on: ALREADY_ON
    (FEATURES, SYSTEM_RESET2),          # 0 from PSCI 1.1
    (FEATURES, SYSTEM_OFF2),            # PSCI 1.3: HIBERNATE_OFF (1); before: NOT_SUPPORTED
    (FEATURES, SYSTEM_SUSPEND),         # not enabled by the VMM: NOT_SUPPORTED
    (FEATURES, 0xC400_0003),            # CPU_ON64: 0
    (SYSTEM_RESET2, 5),                 # neither warm reset nor vendor: INVALID_PARAMS
    (SYSTEM_OFF2, 2, 0),                # 1.3: bad type, INVALID_PARAMS; 1.1: NOT_SUPPORTED
    (MIGRATE, 0),                       # not implemented: NOT_SUPPORTED
    (0x8400_0006,),                     # MIGRATE_INFO_TYPE: TOS_MP (2)
]
B = lambda v: v & 0xFF  # noqa: E731
EXPECTED = {
    "latest": [3, 1, 0, B(-2), B(-2), 0, B(-2), B(-2), B(-4), 0, 1, B(-1), 0, B(-2), B(-2),
               B(-1), 2],
    "6.12": [1, 1, 0, B(-2), B(-2), 0, B(-2), B(-2), B(-4), 0, B(-1), B(-1), 0, B(-2), B(-1),
             B(-1), 2],
}


@pytest.mark.parametrize("abi, protected", [("latest", True), ("latest", False), ("6.12", False)])
def test_psci_answers_as_kvm_psci_c(abi, protected):
    m = pkvm.Machine(memory="256M", cpus=2, abi=abi)
    vmm = Vmm(m.host, psci_guest(CALLS), memory="16M", vcpus=2, protected=protected,
              out=io.StringIO())
    try:
        s = vmm.run(max_exits=200)
    finally:
        vmm.destroy()
    assert s.reason == "shutdown"
    assert list(vmm.uart.buffer) == EXPECTED[abi]
    # SYSTEM_OFF stops every vCPU (kvm_prepare_system_event); vCPU 1 never ran.
    assert all(v.powered_off for v in vmm.vm.vcpus)


def test_cpu_suspend_waits_like_wfi_and_returns_success():
    m = pkvm.Machine(memory="256M", cpus=2)
    image = psci_guest([(0xC400_0001, 0, 0, 0)])
    vmm = Vmm(m.host, image, memory="16M", vcpus=1, protected=True, out=io.StringIO())
    try:
        ex = vmm.vm.vcpus[0].run()
        while ex.kind == "mmio":  # (none before the call)
            ex = vmm.vm.vcpus[0].run()
        assert ex.kind == "wfi"  # kvm_psci_vcpu_suspend -> kvm_vcpu_wfi
        ex = vmm.vm.vcpus[0].run()
        assert ex.kind == "mmio" and ex.write and ex.data == 0  # PSCI_RET_SUCCESS
    finally:
        vmm.destroy()
