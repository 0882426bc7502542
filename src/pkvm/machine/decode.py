"""A64 instruction decoding the CPU model needs to report exceptions as hardware would.

unicorn reports a faulting access by address only (the physical address for stage-2 faults,
nothing at all for stage-1 faults) and an undefined instruction by a bare interrupt number. The
syndromes EL1 and EL2 expect are rebuilt from the instruction word:

* `decode_mem(insn)` — every A64 load/store form (single register, pair, literal, exclusive,
  acquire/release, RCpc, atomics, SIMD&FP single and multiple structures, `DC ZVA`), giving the
  base-address computation (for FAR) and, for single general-purpose-register accesses without
  writeback, the ISS fields that make ISV = 1 (SAS, SSE, SRT, SF, AR).
* `decode_sys(insn)` — MRS / MSR (register) / SYS / SYSL: Op0, Op1, CRn, CRm, Op2, Rt, direction.
* `is_fp_simd(insn)`, `is_sve(insn)` — classes that trap as EC 0x07 / 0x19.

The decoder is hand-written from the A64 encoding tables (fast and exact on the fields the ISS
needs); tests cross-check it against capstone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

MASK64 = (1 << 64) - 1


def _read_modify_write(rn: int, rt: int, size: int) -> "MemAccess":
    """An atomic read-modify-write of `size` bytes at [Xn] (CAS, LDADD, SWP ...): no ISS."""
    return MemAccess(rn=rn, offset=0, size=size, total=size, load=True, store=True, rt=rt,
                     exclusive=True, align=size)


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
    extend: int = 0b011  # register-offset option: UXTW 010, LSL/UXTX 011, SXTW 110, SXTX 111
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
            if self.extend == 0b010:
                index &= 0xFFFF_FFFF
            elif self.extend == 0b110:
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
    extend: int = 0b011,
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


def _fp_size(size: int, opc: int) -> int:
    return 16 if (opc & 2) and size == 0 else 1 << size


def decode_mem(insn: int) -> MemAccess | None:
    """Decode a load/store (or DC ZVA); None if `insn` accesses no memory."""
    rt = insn & 31
    rn = (insn >> 5) & 31
    if insn & 0xFFFFFFE0 == 0xD50B7420:  # DC ZVA, Xt (block size 64 bytes on this CPU)
        return MemAccess(
            rn=rt, offset=0, size=64, total=64, load=False, store=True, rt=rt, zva=True
        )
    if insn & 0x0A000000 != 0x08000000:
        return None
    size_log2 = insn >> 30
    v = bool(insn & (1 << 26))

    # Load/store exclusive, ordered (LDAR/STLR), compare-and-swap.
    if insn & 0x3F000000 == 0x08000000:
        o2, load, o1 = (insn >> 23) & 1, bool(insn & (1 << 22)), (insn >> 21) & 1
        size = 1 << size_log2
        if o2 == 1 and o1 == 0:  # LDAR/STLR/LDLAR/STLLR: a single register, ISV valid
            return MemAccess(
                rn=rn,
                offset=0,
                size=size,
                total=size,
                load=load,
                store=not load,
                rt=rt,
                sf=size_log2 == 3,
                acqrel=True,
                iss_valid=True,
                align=size,
            )
        if o1 == 1 and o2 == 0 and size_log2 < 2:  # CASP: pair of 32/64-bit registers
            size = 4 << size_log2
            return MemAccess(
                rn=rn,
                offset=0,
                size=size,
                total=2 * size,
                load=True,
                store=True,
                rt=rt,
                exclusive=True,
                align=2 * size,
            )
        if o1 == 1 and o2 == 1:  # CAS{A,L,B,H}
            return _read_modify_write(rn, rt, size)
        pair = o1 == 1  # LDXP/STXP (o2 = 0, size 1x)
        total = 2 * size if pair else size
        return MemAccess(
            rn=rn,
            offset=0,
            size=size,
            total=total,
            load=load,
            store=not load,
            rt=rt,
            exclusive=True,
            align=total,
        )

    # Memory tagging: STG/STZG/ST2G/STZ2G (imm9 scaled by 16), LDG, STZGM/STGM/LDGM.
    if insn & 0xFF200000 == 0xD9200000:
        op1, op2 = (insn >> 22) & 3, (insn >> 10) & 3
        imm = _sext((insn >> 12) & 0x1FF, 9) * 16
        if op2 == 0:  # LDG (op1 01) has an offset; the *GM forms use Xn alone
            load = op1 in (1, 3)
            return MemAccess(
                rn=rn,
                offset=imm if op1 == 1 else 0,
                size=16,
                total=16,
                load=load,
                store=not load,
                rt=rt,
            )
        size = 32 if op1 & 2 else 16
        return MemAccess(
            rn=rn,
            offset=0 if op2 == 1 else imm,
            size=size,
            total=size,
            load=False,
            store=True,
            rt=rt,
            writeback=op2 != 2,
        )

    # RCpc unscaled: STLUR/LDAPUR/LDAPURS.
    if insn & 0x3F200C00 == 0x19000000:
        opc = (insn >> 22) & 3
        acc = _gpr(size_log2, opc, rn, rt, _sext((insn >> 12) & 0x1FF, 9), iss=True)
        if acc is None:
            return None
        return replace(acc, acqrel=True)

    # Load register (literal).
    if insn & 0x3B000000 == 0x18000000:
        opc = insn >> 30
        offset = _sext((insn >> 5) & 0x7FFFF, 19) * 4
        if v:
            size = 4 << opc
            return MemAccess(
                rn=0,
                offset=offset,
                size=size,
                total=size,
                load=True,
                store=False,
                rt=rt,
                literal=True,
            )
        if opc == 3:
            return None  # PRFM literal
        size = 8 if opc == 1 else 4
        return MemAccess(
            rn=0,
            offset=offset,
            size=size,
            total=size,
            load=True,
            store=False,
            rt=rt,
            literal=True,
            sign=opc == 2,
            sf=opc != 0,
            iss_valid=True,
        )

    # Load/store pair (no-allocate, post-index, offset, pre-index).
    if insn & 0x3A000000 == 0x28000000:
        opc = insn >> 30
        index = (insn >> 23) & 3
        load = bool(insn & (1 << 22))
        if v:
            size = 4 << opc
        else:
            size = 8 if opc == 2 or (opc == 1 and not load) else 4  # opc 01 store: STGP
        imm = _sext((insn >> 15) & 0x7F, 7) * (16 if (not v and opc == 1 and not load) else size)
        return MemAccess(
            rn=rn,
            offset=0 if index == 1 else imm,
            size=size,
            total=2 * size,
            load=load,
            store=not load,
            rt=rt,
            writeback=index in (1, 3),
            sign=not v and opc == 1 and load,
        )

    # Load/store register: unsigned immediate, imm9 forms, register offset, atomics.
    if insn & 0x3A000000 == 0x38000000:
        opc = (insn >> 22) & 3
        if insn & (1 << 24):  # unsigned immediate
            if v:
                size = _fp_size(size_log2, opc)
                return MemAccess(
                    rn=rn,
                    offset=((insn >> 10) & 0xFFF) * size,
                    size=size,
                    total=size,
                    load=bool(opc & 1),
                    store=not opc & 1,
                    rt=rt,
                )
            return _gpr(size_log2, opc, rn, rt, ((insn >> 10) & 0xFFF) << size_log2, iss=True)
        op4 = (insn >> 10) & 3
        if not insn & (1 << 21):  # imm9: unscaled (00), post (01), unprivileged (10), pre (11)
            imm = _sext((insn >> 12) & 0x1FF, 9)
            wb = op4 in (1, 3)
            offset = 0 if op4 == 1 else imm
            if v:
                size = _fp_size(size_log2, opc)
                return MemAccess(
                    rn=rn,
                    offset=offset,
                    size=size,
                    total=size,
                    load=bool(opc & 1),
                    store=not opc & 1,
                    rt=rt,
                    writeback=wb,
                )
            return _gpr(size_log2, opc, rn, rt, offset, iss=True, wb=wb)
        if op4 == 2:  # register offset
            rm = (insn >> 16) & 31
            option = (insn >> 13) & 7
            s = bool(insn & (1 << 12))
            if v:
                size = _fp_size(size_log2, opc)
                return MemAccess(
                    rn=rn,
                    offset=0,
                    size=size,
                    total=size,
                    load=bool(opc & 1),
                    store=not opc & 1,
                    rt=rt,
                    rm=rm,
                    extend=option,
                    shift=(size.bit_length() - 1) if s else 0,
                )
            return _gpr(
                size_log2,
                opc,
                rn,
                rt,
                0,
                iss=True,
                rm=rm,
                extend=option,
                shift=size_log2 if s else 0,
            )
        if op4 == 0 and not v:  # atomic memory operations (LDADD.., SWP, LDAPR)
            size = 1 << size_log2
            if (insn >> 15) & 1 and (insn >> 12) & 7 == 0b100:  # LDAPR{B,H}: RCpc load
                return MemAccess(
                    rn=rn,
                    offset=0,
                    size=size,
                    total=size,
                    load=True,
                    store=False,
                    rt=rt,
                    sf=size_log2 == 3,
                    acqrel=True,
                    iss_valid=True,
                )
            return _read_modify_write(rn, rt, size)
        if op4 & 1 and not v and size_log2 == 3:  # LDRAA/LDRAB (pointer authentication)
            imm = _sext(((insn >> 22) & 1) << 9 | (insn >> 12) & 0x1FF, 10) * 8
            return MemAccess(
                rn=rn,
                offset=imm,
                size=8,
                total=8,
                load=True,
                store=False,
                rt=rt,
                writeback=op4 == 3,
            )
        return None

    # SIMD load/store multiple structures (with or without post-index).
    if insn & 0xBFBF0000 == 0x0C000000 or insn & 0xBFA00000 == 0x0C800000:
        regs = {0b0000: 4, 0b0010: 4, 0b0100: 3, 0b0110: 3, 0b0111: 1, 0b1000: 2, 0b1010: 2}
        n = regs.get((insn >> 12) & 0xF)
        if n is None:
            return None
        per = 16 if insn & (1 << 30) else 8
        load = bool(insn & (1 << 22))
        return MemAccess(
            rn=rn,
            offset=0,
            size=per,
            total=n * per,
            load=load,
            store=not load,
            rt=rt,
            writeback=bool(insn & (1 << 23)),
        )

    # SIMD load/store single structure (and replicate).
    if insn & 0xBF9F0000 == 0x0D000000 or insn & 0xBF800000 == 0x0D800000:
        load = bool(insn & (1 << 22))
        selem = ((((insn >> 13) & 1) << 1) | ((insn >> 21) & 1)) + 1
        opcode = (insn >> 13) & 7
        scale = opcode >> 1
        if scale == 3:  # LDnR: element size from the size field
            scale = (insn >> 10) & 3
        elif scale == 2 and (insn >> 10) & 1:
            scale = 3
        esize = 1 << scale
        return MemAccess(
            rn=rn,
            offset=0,
            size=esize,
            total=selem * esize,
            load=load,
            store=not load,
            rt=rt,
            writeback=bool(insn & (1 << 23)),
        )
    return None


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
    if insn & 0xFFC00000 != 0xD5000000:
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


def is_fp_simd(insn: int) -> bool:
    """Scalar FP / Advanced SIMD data processing or a SIMD&FP load/store (traps as EC 0x07)."""
    if (insn >> 25) & 7 == 0b111:
        return True
    if insn & 0x0A000000 == 0x08000000 and insn & (1 << 26):
        return True
    sys = decode_sys(insn)  # FPCR / FPSR
    return sys is not None and sys.key in ((3, 3, 4, 4, 0), (3, 3, 4, 4, 1))


def is_sve(insn: int) -> bool:
    """An SVE instruction (op0 = 0010 at bits [28:25]; traps as EC 0x19)."""
    return (insn >> 25) & 0xF == 0b0010


HVC_MASK, HVC_BITS = 0xFFE0001F, 0xD4000002
SMC_BITS = 0xD4000003
SVC_BITS = 0xD4000001
BRK_MASK, BRK_BITS = 0xFFE0001F, 0xD4200000
WFI, WFE = 0xD503207F, 0xD503205F
ERET = 0xD69F03E0


def exception_imm16(insn: int) -> int:
    """The imm16 of SVC/HVC/SMC/BRK (bits [20:5])."""
    return (insn >> 5) & 0xFFFF
