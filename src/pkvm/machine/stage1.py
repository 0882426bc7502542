"""The guest's stage-1 translation (EL1&0 regime), walked in Python as the CPU walks it.

unicorn reports a stage-1 fault by a bare interrupt number, without the level or kind of the
fault, and a table walk that reads an IPA stage-2 does not map as such an abort too: the core
walks the guest's tables again here to rebuild the syndrome (FSC, FAR) and to tell the second
case (a stage-2 fault on the walk, S1PTW) from the first. 4K, 16K and 64K granules; the tests
check the walk against the CPU's own AT S1E1R/W.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from pkvm.machine.context import PSR_PAN_BIT, SCTLR_ELx_M, SCTLR_ELx_WXN
from pkvm.machine.esr import FSC

OA_MASK: Final = (1 << 48) - 1  # 48-bit output and intermediate addresses
TTBR_BADDR_MASK: Final = 0x0000_FFFF_FFFF_FFFE  # TTBRn_EL1.BADDR (bit 0 is CnP)

# Descriptor bits (VMSAv8-64).
DESC_VALID: Final = 1 << 0
DESC_TABLE: Final = 1 << 1  # table (levels 0-2) or page (level 3)
DESC_AP_SHIFT: Final = 6  # AP[2:1]: bit 0 EL0 access, bit 1 read-only
DESC_AF: Final = 1 << 10
DESC_PXN_SHIFT: Final = 53
DESC_UXN_SHIFT: Final = 54
TABLE_PXN_SHIFT: Final = 59
TABLE_UXN_SHIFT: Final = 60
TABLE_AP_SHIFT: Final = 61
AP_EL0: Final = 1
AP_RO: Final = 2


@dataclass(frozen=True, slots=True)
class Walk:
    """Result of a stage-1 translation: `ipa`, or a fault at `level`.

    `fsc` is None on success; `s2_ipa` is set when the walk itself read an IPA that stage-2
    does not map (a stage-2 fault on a stage-1 walk, S1PTW).
    """

    ipa: int | None
    fsc: int | None = None
    s2_ipa: int | None = None


@dataclass(frozen=True, slots=True)
class _Half:
    """Where TCR_EL1 keeps one half of the address space's fields."""

    tsz_shift: int
    epd_bit: int
    tg_shift: int
    tbi_bit: int
    hpd_bit: int
    granules: dict[int, int]  # TGn -> granule shift
    ttbr: str


_LOWER: Final = _Half(0, 7, 14, 37, 41, {0: 12, 1: 16, 2: 14}, "TTBR0_EL1")
_UPPER: Final = _Half(16, 23, 30, 38, 42, {1: 14, 2: 12, 3: 16}, "TTBR1_EL1")
# TxSZ out of its architectural range [16, 39] is IMPLEMENTATION DEFINED: a level-0 fault, or
# the walk as if the field held the nearest bound. The CPU (unicorn 2, QEMU 5.0's
# `aa64_va_parameters`, without FEAT_LVA or FEAT_TTST) takes the bound, so the walk does too.
_TSZ_MIN: Final = 16
_TSZ_MAX: Final = 39


@dataclass(slots=True)
class _Regime:
    """The translation regime's shape for one VA: input size, granule, first table, level."""

    insize: int
    granule: int
    table: int
    level: int
    hpd: bool


def _regime(va: int, tcr: int, ttbr_of: Callable[[str], int], fetch: bool) -> _Regime | None:
    """The regime `va` translates in (TTBR0 or TTBR1 half), None for a level-0 fault (VA
    outside the half's range, or walks disabled by EPDn)."""
    upper = bool(va >> 55 & 1)
    half = _UPPER if upper else _LOWER
    tsz = (tcr >> half.tsz_shift) & 63
    epd = tcr >> half.epd_bit & 1
    granule = half.granules.get((tcr >> half.tg_shift) & 3, 12)
    tbi = 0 if fetch else tcr >> half.tbi_bit & 1
    insize = 64 - min(max(tsz, _TSZ_MIN), _TSZ_MAX)
    top = 56 if tbi else 64
    hi = (va & ((1 << top) - 1)) >> insize
    if hi != ((1 << (top - insize)) - 1 if upper else 0) or epd:
        return None
    stride = granule - 3
    level = 4 - -(-(insize - granule) // stride)
    table = ttbr_of(half.ttbr) & TTBR_BADDR_MASK
    table &= ~((1 << granule) - 1) if level > 0 else ~0
    return _Regime(insize, granule, table, level, bool(tcr >> half.hpd_bit & 1))


def _permission_fault(
    desc: int, ap_table: int, xn_table: tuple[int, int], *, write: bool, fetch: bool, el: int,
    sctlr: int, pstate: int,
) -> bool:
    """Whether a leaf's permissions (with the tables' limits) refuse this access."""
    ap = (desc >> DESC_AP_SHIFT) & 3
    el0_ok = bool(ap & AP_EL0) and not ap_table & AP_EL0
    ro = bool(ap & AP_RO) or bool(ap_table & AP_RO)
    if el == 0 and not el0_ok:
        return True
    if fetch:
        pxn_table, uxn_table = xn_table
        if el == 0:
            xn = (desc >> DESC_UXN_SHIFT & 1) | uxn_table
        else:
            xn = (desc >> DESC_PXN_SHIFT & 1) | pxn_table
        writable_el0 = el0_ok and not ro
        return bool(xn or (el == 1 and writable_el0) or (sctlr & SCTLR_ELx_WXN and not ro))
    if write and ro:
        return True
    return bool(el == 1 and el0_ok and pstate & PSR_PAN_BIT)


def walk_stage1(
    va: int,
    *,
    sctlr: int,
    pstate: int,
    el: int,
    read_sysreg: Callable[[str], int],
    read_u64: Callable[[int], int | None],
    write: bool = False,
    fetch: bool = False,
) -> Walk:
    """Translate VA as the MMU would: `read_sysreg(name)` gives TCR_EL1 / TTBRn_EL1,
    `read_u64(ipa)` a descriptor (None where stage-2 maps nothing)."""
    if not sctlr & SCTLR_ELx_M:
        return Walk(ipa=va & OA_MASK) if va <= OA_MASK else Walk(None, FSC.ADDRSZ)
    r = _regime(va, read_sysreg("TCR_EL1"), read_sysreg, fetch)
    if r is None:
        return Walk(None, FSC.FAULT + 0)
    stride = r.granule - 3
    level, table = r.level, r.table
    ap_table, pxn_table, uxn_table = 0, 0, 0
    oa_mask = OA_MASK & ~((1 << r.granule) - 1)
    while True:
        shift = r.granule + (3 - level) * stride
        bits = min(stride, r.insize - shift)
        desc_ipa = table + ((va >> shift) & ((1 << bits) - 1)) * 8
        desc = read_u64(desc_ipa)
        if desc is None:
            return Walk(None, FSC.SEA_TTW + max(level, 0), s2_ipa=desc_ipa)
        if not desc & DESC_VALID:
            return Walk(None, FSC.FAULT + level)
        if level < 3 and desc & DESC_TABLE:
            if not r.hpd:
                ap_table |= (desc >> TABLE_AP_SHIFT) & 3
                pxn_table |= (desc >> TABLE_PXN_SHIFT) & 1
                uxn_table |= (desc >> TABLE_UXN_SHIFT) & 1
            table = desc & oa_mask
            level += 1
            continue
        if level == 3 and not desc & DESC_TABLE:
            return Walk(None, FSC.FAULT + level)
        # (a block at level 0, or level 1 with 16K/64K granules, is architecturally a
        # translation fault; QEMU 5 takes it as a block, and the walk follows the CPU)
        block = 1 << shift
        if not desc & DESC_AF:
            return Walk(None, FSC.ACCESS + level)
        if _permission_fault(desc, ap_table, (pxn_table, uxn_table), write=write, fetch=fetch,
                             el=el, sctlr=sctlr, pstate=pstate):
            return Walk(None, FSC.PERM + level)
        return Walk(ipa=(desc & OA_MASK & ~(block - 1)) | (va & (block - 1)))
