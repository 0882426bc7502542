"""Loads and stores: how each A64 load/store forms its address, and the ISS it reports.

`decode_mem(insn)` dispatches on the encoding group (bits [29:24] and friends, as the A64
"Loads and Stores" table lays them out) to one decoder per class: exclusive / ordered /
compare-and-swap, memory tagging, RCpc unscaled, literal, pair, single register (unsigned
immediate, imm9, register offset, atomics, pointer-authenticated), SIMD multiple and single
structures; and `DC ZVA`, a store of a whole block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Final

MASK64: Final = (1 << 64) - 1
DC_ZVA_MASK: Final = 0xFFFFFFE0  # DC ZVA, Xt
DC_ZVA_BITS: Final = 0xD50B7420
DC_ZVA_BLOCK: Final = 64  # bytes zeroed by DC ZVA on this CPU (DCZID_EL0.BS = 4)
LDST_MASK: Final = 0x0A000000  # op0 = x1x0: the loads and stores
LDST_BITS: Final = 0x08000000
LDST_SIMD: Final = 1 << 26  # the V bit: a SIMD&FP register
EXT_UXTW: Final = 0b010  # register-offset option
EXT_LSL: Final = 0b011
EXT_SXTW: Final = 0b110


def _sext(value: int, bits: int) -> int:
    sign = 1 << (bits - 1)
    return (value & (sign - 1)) - (value & sign)


@dataclass(frozen=True, slots=True)
class MemAccess:
    """One decoded memory access: how its address is formed and what ISS it would report.

    The first byte accessed is `pc + offset` for literals, else `Xn|SP` (`rn`, 31 = SP) plus
    `offset` plus the extended, shifted `rm` (31 = XZR) when `rm` is not None. Post-indexed
    forms access at the base (offset 0 here); writeback is recorded in `writeback`.
    """

    rn: int
    offset: int
    size: int  # bytes per register (SAS for ISV accesses)
    total: int  # bytes touched by the whole instruction
    load: bool
    store: bool
    rt: int
    rm: int | None = None
    extend: int = EXT_LSL  # register-offset option: UXTW 010, LSL/UXTX 011, SXTW 110, SXTX 111
    shift: int = 0
    literal: bool = False
    writeback: bool = False
    sign: bool = False  # SSE: sign-extending load
    sf: bool = False  # the register is 64-bit
    acqrel: bool = False  # AR
    iss_valid: bool = False  # single GPR load/store without writeback: ISV = 1
    exclusive: bool = False  # exclusive, atomic or compare-and-swap: must be aligned
    align: int = 0  # required alignment in bytes (0 = none beyond the memory type's)
    zva: bool = False  # DC ZVA: the address is Xt aligned down to the block size

    def address(self, pc: int, read_x: Callable[[int], int]) -> int:
        """The virtual address of the first byte; `read_x(n)` returns Xn, or SP for n = 31."""
        if self.literal:
            return (pc + self.offset) & MASK64
        base = read_x(self.rn)
        if self.zva:
            return base & ~(self.total - 1) & MASK64
        addr = base + self.offset
        if self.rm is not None:
            index = 0 if self.rm == 31 else read_x(self.rm)
            if self.extend == EXT_UXTW:
                index &= 0xFFFF_FFFF
            elif self.extend == EXT_SXTW:
                index = _sext(index, 32)
            addr += index << self.shift
        return addr & MASK64


def _gpr(
    size_log2: int,
    opc: int,
    rn: int,
    rt: int,
    offset: int,
    *,
    iss: bool,
    wb: bool = False,
    rm: int | None = None,
    extend: int = EXT_LSL,
    shift: int = 0,
) -> MemAccess | None:
    """Single-register GPR load/store from its size and opc fields (the LDR/STR families)."""
    size = 1 << size_log2
    if opc == 0:
        load, sign, sf = False, False, size_log2 == 3
    elif opc == 1:
        load, sign, sf = True, False, size_log2 == 3
    elif opc == 2:
        if size_log2 == 3:
            return None  # PRFM: never faults
        load, sign, sf = True, True, True
    else:
        if size_log2 >= 2:
            return None  # unallocated (size 10/11 with opc 11)
        load, sign, sf = True, True, False
    return MemAccess(
        rn=rn,
        offset=offset,
        size=size,
        total=size,
        load=load,
        store=not load,
        rt=rt,
        rm=rm,
        extend=extend,
        shift=shift,
        writeback=wb,
        sign=sign,
        sf=sf,
        iss_valid=iss and not wb,
    )


def _access(rn: int, rt: int, size: int, load: bool, **fields: Any) -> MemAccess:
    """A `MemAccess` of one `size`-byte register at [Xn], a load or a store unless `fields`
    say otherwise (`total`, `store`, `offset` and the rest of `MemAccess`'s fields)."""
    fields.setdefault("offset", 0)
    fields.setdefault("total", size)
    fields.setdefault("store", not load)
    return MemAccess(rn=rn, size=size, load=load, rt=rt, **fields)


def _read_modify_write(rn: int, rt: int, size: int) -> MemAccess:
    """An atomic read-modify-write of `size` bytes at [Xn] (CAS, LDADD, SWP ...): no ISS."""
    return _access(rn, rt, size, True, store=True, exclusive=True, align=size)


def _fp_size(size: int, opc: int) -> int:
    return 16 if (opc & 2) and size == 0 else 1 << size


def _exclusive(insn: int, rn: int, rt: int, size_log2: int) -> MemAccess | None:
    """Load/store exclusive, ordered (LDAR/STLR), compare-and-swap."""
    o2, load, o1 = (insn >> 23) & 1, bool(insn & (1 << 22)), (insn >> 21) & 1
    size = 1 << size_log2
    if o2 == 1 and o1 == 0:  # LDAR/STLR/LDLAR/STLLR: a single register, ISV valid
        return _access(rn, rt, size, load, sf=size_log2 == 3, acqrel=True, iss_valid=True,
                       align=size)
    if o1 == 1 and o2 == 0 and size_log2 < 2:  # CASP: pair of 32/64-bit registers
        size = 4 << size_log2
        return _access(rn, rt, size, True, total=2 * size, store=True, exclusive=True,
                       align=2 * size)
    if o1 == 1 and o2 == 1:  # CAS{A,L,B,H}
        return _read_modify_write(rn, rt, size)
    total = 2 * size if o1 == 1 else size  # LDXP/STXP (o2 = 0, size 1x)
    return _access(rn, rt, size, load, total=total, exclusive=True, align=total)


def _tagging(insn: int, rn: int, rt: int) -> MemAccess:
    """STG/STZG/ST2G/STZ2G (imm9 scaled by 16), LDG, STZGM/STGM/LDGM."""
    op1, op2 = (insn >> 22) & 3, (insn >> 10) & 3
    imm = _sext((insn >> 12) & 0x1FF, 9) * 16
    if op2 == 0:  # LDG (op1 01) has an offset; the *GM forms use Xn alone
        return _access(rn, rt, 16, op1 in (1, 3), offset=imm if op1 == 1 else 0)
    size = 32 if op1 & 2 else 16
    return _access(rn, rt, size, False, offset=0 if op2 == 1 else imm, writeback=op2 != 2)


def _literal(insn: int, rt: int, v: bool) -> MemAccess | None:
    """Load register (literal): PC-relative."""
    opc = insn >> 30
    offset = _sext((insn >> 5) & 0x7FFFF, 19) * 4
    if v:
        return _access(0, rt, 4 << opc, True, offset=offset, literal=True)
    if opc == 3:
        return None  # PRFM literal
    return _access(0, rt, 8 if opc == 1 else 4, True, offset=offset, literal=True,
                   sign=opc == 2, sf=opc != 0, iss_valid=True)


def _pair(insn: int, rn: int, rt: int, v: bool) -> MemAccess:
    """Load/store pair (no-allocate, post-index, offset, pre-index)."""
    opc = insn >> 30
    index = (insn >> 23) & 3
    load = bool(insn & (1 << 22))
    stgp = not v and opc == 1 and not load
    if v:
        size = 4 << opc
    else:
        size = 8 if opc == 2 or stgp else 4
    imm = _sext((insn >> 15) & 0x7F, 7) * (16 if stgp else size)
    return _access(rn, rt, size, load, offset=0 if index == 1 else imm, total=2 * size,
                   writeback=index in (1, 3), sign=not v and opc == 1 and load)


def _fp_single(rn: int, rt: int, size_log2: int, opc: int, **fields: Any) -> MemAccess:
    """A SIMD&FP single-register load/store (no ISS)."""
    return _access(rn, rt, _fp_size(size_log2, opc), bool(opc & 1), **fields)


def _register(insn: int, rn: int, rt: int, size_log2: int, v: bool) -> MemAccess | None:
    """Load/store register: unsigned immediate, imm9 forms, register offset, atomics."""
    opc = (insn >> 22) & 3
    if insn & (1 << 24):  # unsigned immediate
        imm12 = (insn >> 10) & 0xFFF
        if v:
            return _fp_single(rn, rt, size_log2, opc,
                              offset=imm12 * _fp_size(size_log2, opc))
        return _gpr(size_log2, opc, rn, rt, imm12 << size_log2, iss=True)
    op4 = (insn >> 10) & 3
    if not insn & (1 << 21):  # imm9: unscaled (00), post (01), unprivileged (10), pre (11)
        imm = _sext((insn >> 12) & 0x1FF, 9)
        wb = op4 in (1, 3)
        offset = 0 if op4 == 1 else imm
        if v:
            return _fp_single(rn, rt, size_log2, opc, offset=offset, writeback=wb)
        return _gpr(size_log2, opc, rn, rt, offset, iss=True, wb=wb)
    if op4 == 2:  # register offset
        rm = (insn >> 16) & 31
        option = (insn >> 13) & 7
        s = bool(insn & (1 << 12))
        if v:
            size = _fp_size(size_log2, opc)
            return _fp_single(rn, rt, size_log2, opc, rm=rm, extend=option,
                              shift=(size.bit_length() - 1) if s else 0)
        return _gpr(size_log2, opc, rn, rt, 0, iss=True, rm=rm, extend=option,
                    shift=size_log2 if s else 0)
    if op4 == 0 and not v:  # atomic memory operations (LDADD.., SWP, LDAPR)
        size = 1 << size_log2
        if (insn >> 15) & 1 and (insn >> 12) & 7 == 0b100:  # LDAPR{B,H}: RCpc load
            return _access(rn, rt, size, True, sf=size_log2 == 3, acqrel=True, iss_valid=True)
        return _read_modify_write(rn, rt, size)
    if op4 & 1 and not v and size_log2 == 3:  # LDRAA/LDRAB (pointer authentication)
        imm = _sext(((insn >> 22) & 1) << 9 | (insn >> 12) & 0x1FF, 10) * 8
        return _access(rn, rt, 8, True, offset=imm, writeback=op4 == 3)
    return None


# SIMD load/store multiple structures: opcode -> registers.
_MULTIPLE_REGS = {0b0000: 4, 0b0010: 4, 0b0100: 3, 0b0110: 3, 0b0111: 1, 0b1000: 2, 0b1010: 2}


def _simd_multiple(insn: int, rn: int, rt: int) -> MemAccess | None:
    """SIMD load/store multiple structures (with or without post-index)."""
    n = _MULTIPLE_REGS.get((insn >> 12) & 0xF)
    if n is None:
        return None
    per = 16 if insn & (1 << 30) else 8
    return _access(rn, rt, per, bool(insn & (1 << 22)), total=n * per,
                   writeback=bool(insn & (1 << 23)))


def _simd_single(insn: int, rn: int, rt: int) -> MemAccess:
    """SIMD load/store single structure (and replicate)."""
    selem = ((((insn >> 13) & 1) << 1) | ((insn >> 21) & 1)) + 1
    scale = ((insn >> 13) & 7) >> 1
    if scale == 3:  # LDnR: element size from the size field
        scale = (insn >> 10) & 3
    elif scale == 2 and (insn >> 10) & 1:
        scale = 3
    esize = 1 << scale
    return _access(rn, rt, esize, bool(insn & (1 << 22)), total=selem * esize,
                   writeback=bool(insn & (1 << 23)))


def decode_mem(insn: int) -> MemAccess | None:
    """Decode a load/store (or DC ZVA); None if `insn` accesses no memory."""
    rt = insn & 31
    rn = (insn >> 5) & 31
    if insn & DC_ZVA_MASK == DC_ZVA_BITS:
        return _access(rt, rt, DC_ZVA_BLOCK, False, zva=True)
    if insn & LDST_MASK != LDST_BITS:
        return None
    size_log2 = insn >> 30
    v = bool(insn & LDST_SIMD)
    if insn & 0x3F000000 == 0x08000000:
        return _exclusive(insn, rn, rt, size_log2)
    if insn & 0xFF200000 == 0xD9200000:
        return _tagging(insn, rn, rt)
    if insn & 0x3F200C00 == 0x19000000:  # RCpc unscaled: STLUR/LDAPUR/LDAPURS
        acc = _gpr(size_log2, (insn >> 22) & 3, rn, rt, _sext((insn >> 12) & 0x1FF, 9), iss=True)
        return None if acc is None else replace(acc, acqrel=True)
    if insn & 0x3B000000 == 0x18000000:
        return _literal(insn, rt, v)
    if insn & 0x3A000000 == 0x28000000:
        return _pair(insn, rn, rt, v)
    if insn & 0x3A000000 == 0x38000000:
        return _register(insn, rn, rt, size_log2, v)
    if insn & 0xBFBF0000 == 0x0C000000 or insn & 0xBFA00000 == 0x0C800000:
        return _simd_multiple(insn, rn, rt)
    if insn & 0xBF9F0000 == 0x0D000000 or insn & 0xBF800000 == 0x0D800000:
        return _simd_single(insn, rn, rt)
    return None
