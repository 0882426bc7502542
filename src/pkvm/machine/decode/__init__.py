"""A64 instruction decoding the CPU model needs to report exceptions as hardware would.

unicorn reports a faulting access by address only (the physical address for stage-2 faults,
nothing at all for stage-1 faults) and an undefined instruction by a bare interrupt number. The
syndromes EL1 and EL2 expect are rebuilt from the instruction word, one module per class of the
A64 encoding:

* `loadstore`: `decode_mem(insn)` — every A64 load/store form (single register, pair, literal,
  exclusive, acquire/release, RCpc, atomics, memory tagging, SIMD&FP single and multiple
  structures, `DC ZVA`), giving the base-address computation (for FAR) and, for single
  general-purpose-register accesses without writeback, the ISS fields that make ISV = 1 (SAS,
  SSE, SRT, SF, AR).
* `system`: `decode_sys(insn)` — MRS / MSR (register) / SYS / SYSL: Op0, Op1, CRn, CRm, Op2,
  Rt, direction; the exception-generating instructions (HVC, SMC, SVC, BRK), WFI/WFE, ERET.
* `fpsimd`: `is_fp_simd(insn)`, `is_sve(insn)` — classes that trap as EC 0x07 / 0x19.

The decoder is hand-written from the A64 encoding tables (fast and exact on the fields the ISS
needs); tests cross-check it against capstone.
"""

from pkvm.machine.decode.fpsimd import is_fp_simd, is_sve
from pkvm.machine.decode.loadstore import MemAccess, decode_mem
from pkvm.machine.decode.system import (
    BRK_BITS,
    BRK_MASK,
    ERET,
    HVC_BITS,
    HVC_MASK,
    SMC_BITS,
    SVC_BITS,
    WFE,
    WFI,
    SysInsn,
    decode_sys,
    exception_imm16,
)

__all__ = [
    "BRK_BITS",
    "BRK_MASK",
    "ERET",
    "HVC_BITS",
    "HVC_MASK",
    "SMC_BITS",
    "SVC_BITS",
    "WFE",
    "WFI",
    "MemAccess",
    "SysInsn",
    "decode_mem",
    "decode_sys",
    "exception_imm16",
    "is_fp_simd",
    "is_sve",
]
