"""Scalar FP, Advanced SIMD and SVE: the instructions that trap as EC 0x07 / 0x19."""

from __future__ import annotations

from typing import Final

from pkvm.machine.decode.loadstore import LDST_BITS, LDST_MASK, LDST_SIMD
from pkvm.machine.decode.system import decode_sys

SYS_FPCR: Final = (3, 3, 4, 4, 0)
SYS_FPSR: Final = (3, 3, 4, 4, 1)


def is_fp_simd(insn: int) -> bool:
    """Scalar FP / Advanced SIMD data processing or a SIMD&FP load/store (traps as EC 0x07)."""
    if (insn >> 25) & 7 == 0b111:
        return True
    if insn & LDST_MASK == LDST_BITS and insn & LDST_SIMD:
        return True
    sys = decode_sys(insn)
    return sys is not None and sys.key in (SYS_FPCR, SYS_FPSR)


def is_sve(insn: int) -> bool:
    """An SVE instruction (op0 = 0010 at bits [28:25]; traps as EC 0x19)."""
    return (insn >> 25) & 0xF == 0b0010
