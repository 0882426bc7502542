"""Branches, exception generation and system instructions: the fields of their syndromes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

SYS_MASK: Final = 0xFFC00000  # MRS, MSR (register), SYS, SYSL, hints, barriers
SYS_BITS: Final = 0xD5000000


@dataclass(frozen=True, slots=True)
class SysInsn:
    """MRS / MSR (register) / SYS / SYSL: the fields of an EC 0x18 syndrome."""

    op0: int
    op1: int
    crn: int
    crm: int
    op2: int
    rt: int
    read: bool  # MRS / SYSL (ISS Direction = 1)

    @property
    def key(self) -> tuple[int, int, int, int, int]:
        """(op0, op1, crn, crm, op2): the register's encoding."""
        return (self.op0, self.op1, self.crn, self.crm, self.op2)


def decode_sys(insn: int) -> SysInsn | None:
    """Decode MRS/MSR(register)/SYS/SYSL; None for anything else (hints, barriers, MSR imm)."""
    if insn & SYS_MASK != SYS_BITS:
        return None
    op0 = (insn >> 19) & 3
    if op0 == 0:
        return None
    return SysInsn(
        op0=op0,
        op1=(insn >> 16) & 7,
        crn=(insn >> 12) & 15,
        crm=(insn >> 8) & 15,
        op2=(insn >> 5) & 7,
        rt=insn & 31,
        read=bool(insn & (1 << 21)),
    )


HVC_MASK: Final = 0xFFE0001F
HVC_BITS: Final = 0xD4000002
SMC_BITS: Final = 0xD4000003
SVC_BITS: Final = 0xD4000001
BRK_MASK: Final = 0xFFE0001F
BRK_BITS: Final = 0xD4200000
WFI: Final = 0xD503207F
WFE: Final = 0xD503205F
ERET: Final = 0xD69F03E0


def exception_imm16(insn: int) -> int:
    """The imm16 of SVC/HVC/SMC/BRK (bits [20:5])."""
    return (insn >> 5) & 0xFFFF
