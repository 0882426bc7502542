"""Exception syndromes as the architecture encodes them (the kernel's `asm/esr.h`).

ESR_ELx = EC << 26 | IL << 25 | ISS. Only what the CPU model and the run path need: the
exception classes, the data/instruction-abort ISS fields, the fault status codes, and the
system-register (EC 0x18) ISS layout. Builders return plain ints; decoders read them back.
"""

from __future__ import annotations

import enum
from typing import Final

ESR_ELx_EC_SHIFT: Final = 26
ESR_ELx_IL: Final = 1 << 25
ESR_ELx_ISS_MASK: Final = (1 << 25) - 1


class EC(enum.IntEnum):
    """Exception classes (ESR_ELx_EC_*), ESR bits [31:26]."""

    UNKNOWN = 0x00
    WFx = 0x01
    FP_ASIMD = 0x07
    ILL = 0x0E
    SVC64 = 0x15
    HVC64 = 0x16
    SMC64 = 0x17
    SYS64 = 0x18
    SVE = 0x19
    IABT_LOW = 0x20
    IABT_CUR = 0x21
    PC_ALIGN = 0x22
    DABT_LOW = 0x24
    DABT_CUR = 0x25
    SP_ALIGN = 0x26
    SERROR = 0x2F
    BRK64 = 0x3C


# Data abort ISS (ESR_ELx_*).
ESR_ELx_ISV: Final = 1 << 24
ESR_ELx_SAS_SHIFT: Final = 22
ESR_ELx_SSE: Final = 1 << 21
ESR_ELx_SRT_SHIFT: Final = 16
ESR_ELx_SF: Final = 1 << 15
ESR_ELx_AR: Final = 1 << 14
ESR_ELx_FnV: Final = 1 << 10
ESR_ELx_EA: Final = 1 << 9
ESR_ELx_CM: Final = 1 << 8
ESR_ELx_S1PTW: Final = 1 << 7
ESR_ELx_WNR: Final = 1 << 6
ESR_ELx_FSC_MASK: Final = 0x3F

# WFx ISS bit 0: 0 WFI, 1 WFE.
ESR_ELx_WFx_ISS_WFE: Final = 1


class FSC(enum.IntEnum):
    """Fault status codes (ESR_ELx_FSC_*); add the level (0..3) where the name ends in a level."""

    ADDRSZ = 0x00
    FAULT = 0x04  # translation fault, + level
    ACCESS = 0x08  # access flag fault, + level
    PERM = 0x0C  # permission fault, + level
    EXTABT = 0x10
    SEA_TTW = 0x14  # synchronous external abort on a table walk, + level
    ALIGN = 0x21


# SYS64 ISS layout: Op0 [21:20], Op2 [19:17], Op1 [16:14], CRn [13:10], Rt [9:5], CRm [4:1],
# Direction [0] (1 = read, MRS).
def sys64_iss(op0: int, op1: int, crn: int, crm: int, op2: int, rt: int, read: bool) -> int:
    return (
        (op0 << 20) | (op2 << 17) | (op1 << 14) | (crn << 10) | (rt << 5) | (crm << 1) | int(read)
    )


def esr(ec: int, iss: int = 0, il: bool = True) -> int:
    """Compose an ESR value: EC << 26 | IL | ISS."""
    return (ec << ESR_ELx_EC_SHIFT) | (ESR_ELx_IL if il else 0) | (iss & ESR_ELx_ISS_MASK)


def esr_ec(value: int) -> int:
    return (value >> ESR_ELx_EC_SHIFT) & 0x3F


def abort_iss(
    fsc: int,
    *,
    write: bool = False,
    s1ptw: bool = False,
    fnv: bool = False,
    size: int | None = None,
    srt: int = 0,
    sign: bool = False,
    sf: bool = False,
    acqrel: bool = False,
) -> int:
    """ISS of a data abort; `size` (bytes, 1/2/4/8) given means ISV=1 with SAS/SSE/SRT/SF/AR."""
    iss = fsc & ESR_ELx_FSC_MASK
    if write:
        iss |= ESR_ELx_WNR
    if s1ptw:
        iss |= ESR_ELx_S1PTW
    if fnv:
        iss |= ESR_ELx_FnV
    if size is not None:
        iss |= ESR_ELx_ISV | (size.bit_length() - 1) << ESR_ELx_SAS_SHIFT
        iss |= srt << ESR_ELx_SRT_SHIFT
        if sign:
            iss |= ESR_ELx_SSE
        if sf:
            iss |= ESR_ELx_SF
        if acqrel:
            iss |= ESR_ELx_AR
    return iss


def hpfar_from_ipa(ipa: int) -> int:
    """HPFAR_EL2 as hardware reports it: IPA[51:12] in bits [43:4] (`(ipa >> 12) << 4`)."""
    return (ipa >> 12) << 4


def ipa_from_hpfar(hpfar: int) -> int:
    """The faulting IPA's page from HPFAR_EL2 (FIPA field, NS bit ignored)."""
    return ((hpfar >> 4) & ((1 << 40) - 1)) << 12
