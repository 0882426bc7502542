"""The ID registers of the board's CPU (the emulated core's own values, unicorn 2.1.4 `max`).

These are what the CPU reports at EL1 without traps; the host's cpufeature code sanitises them
across CPUs (all equal here) and hands the result to EL2 before `__pkvm_init`
(`id_aa64*_el1_sys_val`, `arch/arm64/kvm/arm.c: kvm_hyp_init_symbols`). A test reads them from a
live core so the table cannot drift from the CPU that runs guests.
"""

from __future__ import annotations

from typing import Final

# (op0, op1, CRn, CRm, op2) of each ID register.
ID_REG_ENC: dict[str, tuple[int, int, int, int, int]] = {
    "ID_AA64PFR0_EL1": (3, 0, 0, 4, 0),
    "ID_AA64PFR1_EL1": (3, 0, 0, 4, 1),
    "ID_AA64PFR2_EL1": (3, 0, 0, 4, 2),
    "ID_AA64ZFR0_EL1": (3, 0, 0, 4, 4),
    "ID_AA64SMFR0_EL1": (3, 0, 0, 4, 5),
    "ID_AA64DFR0_EL1": (3, 0, 0, 5, 0),
    "ID_AA64DFR1_EL1": (3, 0, 0, 5, 1),
    "ID_AA64AFR0_EL1": (3, 0, 0, 5, 4),
    "ID_AA64AFR1_EL1": (3, 0, 0, 5, 5),
    "ID_AA64ISAR0_EL1": (3, 0, 0, 6, 0),
    "ID_AA64ISAR1_EL1": (3, 0, 0, 6, 1),
    "ID_AA64ISAR2_EL1": (3, 0, 0, 6, 2),
    "ID_AA64MMFR0_EL1": (3, 0, 0, 7, 0),
    "ID_AA64MMFR1_EL1": (3, 0, 0, 7, 1),
    "ID_AA64MMFR2_EL1": (3, 0, 0, 7, 2),
    "ID_AA64MMFR3_EL1": (3, 0, 0, 7, 3),
    "ID_AA64MMFR4_EL1": (3, 0, 0, 7, 4),
}

CPU_ID_REGS: dict[str, int] = {
    "ID_AA64PFR0_EL1": 0x0000_0001_0011_2222,
    "ID_AA64PFR1_EL1": 0x1,
    "ID_AA64PFR2_EL1": 0x0,
    "ID_AA64ZFR0_EL1": 0x0,
    "ID_AA64SMFR0_EL1": 0x0,
    "ID_AA64DFR0_EL1": 0x1030_5506,
    "ID_AA64DFR1_EL1": 0x0,
    "ID_AA64AFR0_EL1": 0x0,
    "ID_AA64AFR1_EL1": 0x0,
    "ID_AA64ISAR0_EL1": 0x1021_1111_1021_2120,
    "ID_AA64ISAR1_EL1": 0x0000_0111_0121_1012,
    "ID_AA64ISAR2_EL1": 0x0,
    "ID_AA64MMFR0_EL1": 0x1124,
    "ID_AA64MMFR1_EL1": 0x21_1120,
    "ID_AA64MMFR2_EL1": 0x11,
    "ID_AA64MMFR3_EL1": 0x0,
    "ID_AA64MMFR4_EL1": 0x0,
}

CTR_EL0: Final = 0x8444_C004
MIDR_EL1: Final = 0x000F_0510


def field(value: int, shift: int, width: int = 4) -> int:
    return (value >> shift) & ((1 << width) - 1)
