"""Page-table descriptors and their attributes (`asm/kvm_pgtable.h`, the attribute half of
`arch/arm64/kvm/hyp/pgtable.c`).

Tables are real ARMv8 translation tables with a 4 KiB granule, kept as 64-bit little-endian
descriptors; levels 0..3, blocks at levels 1 and 2. `kvm_pgtable_prot` is kept in the 7.2
encoding throughout the model (PX=0, UX=1, W=2, R=3, DEVICE=4, NORMAL_NC=5; SW0..3 = bits
55..58); only 7.2 exposes a prot value to the host (`__pkvm_host_share_guest`), so the 6.12
encoding never crosses the ABI.
"""

from __future__ import annotations

from typing import Final

from pkvm.machine.memory import PAGE_SHIFT, PAGE_SIZE

U64: Final = 0xFFFF_FFFF_FFFF_FFFF

# -- descriptor bits (arch/arm64/include/asm/kvm_pgtable.h) -------------------------------
KVM_PTE_VALID: Final = 1 << 0
KVM_PTE_TYPE: Final = 1 << 1  # 1: table (level < 3) or page (level 3); 0: block
KVM_PTE_TABLE_BITS: Final = KVM_PTE_VALID | KVM_PTE_TYPE
KVM_PTE_ADDR_MASK: Final = ((1 << 48) - 1) & ~(PAGE_SIZE - 1)

KVM_PTE_LEAF_ATTR_LO_S1_ATTRIDX_SHIFT: Final = 2
KVM_PTE_LEAF_ATTR_LO_S1_AP_SHIFT: Final = 6
KVM_PTE_LEAF_ATTR_LO_S1_AP_RW: Final = 1
KVM_PTE_LEAF_ATTR_LO_S1_AP_RO: Final = 3
KVM_PTE_LEAF_ATTR_LO_S1_SH_IS: Final = 3 << 8
KVM_PTE_LEAF_ATTR_LO_S1_AF: Final = 1 << 10
KVM_PTE_LEAF_ATTR_HI_S1_XN: Final = 1 << 54
MT_NORMAL: Final = 0
MT_DEVICE_NGNRE: Final = 4
MT_S2_NORMAL: Final = 0xF  # stage-2 MemAttr
MT_S2_DEVICE_nGnRE: Final = 0x1
MT_S2_NORMAL_NC: Final = 0x5

KVM_PTE_LEAF_ATTR_LO_S2_MEMATTR_SHIFT: Final = 2
KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R: Final = 1 << 6
KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W: Final = 1 << 7
KVM_PTE_LEAF_ATTR_LO_S2_SH_IS: Final = 3 << 8
KVM_PTE_LEAF_ATTR_LO_S2_AF: Final = 1 << 10
KVM_PTE_LEAF_ATTR_HI_S2_XN_SHIFT: Final = 53
KVM_PTE_LEAF_ATTR_HI_S2_XN: Final = 3 << 53
KVM_PTE_LEAF_ATTR_S2_PERMS: Final = (
    KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R | KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W | KVM_PTE_LEAF_ATTR_HI_S2_XN
)
KVM_PTE_LEAF_ATTR_HI_SW: Final = 0xF << 55

# -- kvm_pgtable_prot (7.2 encoding) -------------------------------------------------------
KVM_PGTABLE_PROT_PX: Final = 1 << 0
KVM_PGTABLE_PROT_UX: Final = 1 << 1
KVM_PGTABLE_PROT_X: Final = KVM_PGTABLE_PROT_PX | KVM_PGTABLE_PROT_UX
KVM_PGTABLE_PROT_W: Final = 1 << 2
KVM_PGTABLE_PROT_R: Final = 1 << 3
KVM_PGTABLE_PROT_DEVICE: Final = 1 << 4
KVM_PGTABLE_PROT_NORMAL_NC: Final = 1 << 5
KVM_PGTABLE_PROT_SW0: Final = 1 << 55
KVM_PGTABLE_PROT_SW1: Final = 1 << 56
KVM_PGTABLE_PROT_SW2: Final = 1 << 57
KVM_PGTABLE_PROT_SW3: Final = 1 << 58
KVM_PGTABLE_PROT_RW: Final = KVM_PGTABLE_PROT_R | KVM_PGTABLE_PROT_W
KVM_PGTABLE_PROT_RWX: Final = KVM_PGTABLE_PROT_RW | KVM_PGTABLE_PROT_X

PAGE_HYP: Final = KVM_PGTABLE_PROT_RW
PAGE_HYP_EXEC: Final = KVM_PGTABLE_PROT_R | KVM_PGTABLE_PROT_X
PAGE_HYP_RO: Final = KVM_PGTABLE_PROT_R
PAGE_HYP_DEVICE: Final = PAGE_HYP | KVM_PGTABLE_PROT_DEVICE

# -- walker flags ------------------------------------------------------------------------
KVM_PGTABLE_WALK_LEAF: Final = 1 << 0
KVM_PGTABLE_WALK_TABLE_PRE: Final = 1 << 1
KVM_PGTABLE_WALK_TABLE_POST: Final = 1 << 2
KVM_PGTABLE_WALK_SHARED: Final = 1 << 3
KVM_PGTABLE_WALK_IGNORE_EAGAIN: Final = 1 << 4  # 6.12 calls this bit HANDLE_FAULT, with the opposite sense

# The model's CPU has FEAT_XNX (as QEMU's `-cpu max` that the conformance runs use): stage-2
# execute permission can differ between EL0 (UX) and EL1 (PX).
CPU_HAS_XNX: Final = True

KVM_PGTABLE_MIN_BLOCK_LEVEL: Final = 1
KVM_PGTABLE_LAST_LEVEL: Final = 3
PTRS_PER_PTE: Final = 512
PTE_INDEX_MASK: Final = PTRS_PER_PTE - 1


def granule_shift(level: int) -> int:
    return PAGE_SHIFT + 9 * (KVM_PGTABLE_LAST_LEVEL - level)


def granule_size(level: int) -> int:
    return 1 << granule_shift(level)


def pte_valid(pte: int) -> bool:
    return bool(pte & KVM_PTE_VALID)


def pte_table(pte: int, level: int) -> bool:
    return level < KVM_PGTABLE_LAST_LEVEL and pte & KVM_PTE_TABLE_BITS == KVM_PTE_TABLE_BITS


def pte_to_phys(pte: int) -> int:
    return pte & KVM_PTE_ADDR_MASK


def init_table_pte(child: int) -> int:
    return (child & KVM_PTE_ADDR_MASK) | KVM_PTE_TYPE | KVM_PTE_VALID


def init_valid_leaf_pte(phys: int, attr: int, level: int) -> int:
    pte = (phys & KVM_PTE_ADDR_MASK) | attr | KVM_PTE_VALID
    if level == KVM_PGTABLE_LAST_LEVEL:
        pte |= KVM_PTE_TYPE
    return pte


# -- attribute encodings ----------------------------------------------------------------
def hyp_set_prot_attr(prot: int) -> int | None:
    """Stage-1 (EL2) leaf attributes for `prot`, or None where Linux says -EINVAL."""
    device = bool(prot & KVM_PGTABLE_PROT_DEVICE)
    attr = (MT_DEVICE_NGNRE if device else MT_NORMAL) << KVM_PTE_LEAF_ATTR_LO_S1_ATTRIDX_SHIFT
    if not prot & KVM_PGTABLE_PROT_R:
        return None
    if prot & KVM_PGTABLE_PROT_X:
        if prot & KVM_PGTABLE_PROT_W or device:
            return None
    else:
        attr |= KVM_PTE_LEAF_ATTR_HI_S1_XN
    ap = KVM_PTE_LEAF_ATTR_LO_S1_AP_RW if prot & KVM_PGTABLE_PROT_W else KVM_PTE_LEAF_ATTR_LO_S1_AP_RO
    attr |= ap << KVM_PTE_LEAF_ATTR_LO_S1_AP_SHIFT
    attr |= KVM_PTE_LEAF_ATTR_LO_S1_SH_IS | KVM_PTE_LEAF_ATTR_LO_S1_AF
    attr |= prot & KVM_PTE_LEAF_ATTR_HI_SW
    return attr


def hyp_pte_prot(pte: int) -> int:
    prot = pte & KVM_PTE_LEAF_ATTR_HI_SW
    if not pte_valid(pte):
        return prot
    if not pte & KVM_PTE_LEAF_ATTR_HI_S1_XN:
        prot |= KVM_PGTABLE_PROT_X
    ap = (pte >> KVM_PTE_LEAF_ATTR_LO_S1_AP_SHIFT) & 3
    if ap == KVM_PTE_LEAF_ATTR_LO_S1_AP_RO:
        prot |= KVM_PGTABLE_PROT_R
    elif ap == KVM_PTE_LEAF_ATTR_LO_S1_AP_RW:
        prot |= KVM_PGTABLE_PROT_RW
    return prot


def stage2_set_prot_attr(
    prot: int, normal_memattr: int, device_memattr: int = MT_S2_DEVICE_nGnRE
) -> int | None:
    """Stage-2 leaf attributes for `prot`, or None where Linux says -EINVAL."""
    device = bool(prot & KVM_PGTABLE_PROT_DEVICE)
    nc = bool(prot & KVM_PGTABLE_PROT_NORMAL_NC)
    x = prot & KVM_PGTABLE_PROT_X
    if device and nc:
        return None
    if (device or nc) and x:
        return None
    if device:
        memattr = device_memattr
    elif nc:
        memattr = MT_S2_NORMAL_NC
    else:
        memattr = normal_memattr
    attr = memattr << KVM_PTE_LEAF_ATTR_LO_S2_MEMATTR_SHIFT
    px, ux = bool(x & KVM_PGTABLE_PROT_PX), bool(x & KVM_PGTABLE_PROT_UX)
    if px != ux and not CPU_HAS_XNX:
        return None
    # XN[1:0]: 0b00 both may execute, 0b01 EL1 may not, 0b10 neither, 0b11 EL0 may not
    xn = (0b00 if ux else 0b11) if px else (0b01 if ux else 0b10)
    attr |= xn << KVM_PTE_LEAF_ATTR_HI_S2_XN_SHIFT
    if prot & KVM_PGTABLE_PROT_R:
        attr |= KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R
    if prot & KVM_PGTABLE_PROT_W:
        attr |= KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W
    attr |= KVM_PTE_LEAF_ATTR_LO_S2_SH_IS | KVM_PTE_LEAF_ATTR_LO_S2_AF
    attr |= prot & KVM_PTE_LEAF_ATTR_HI_SW
    return attr


# The execute permissions each stage-2 XN[1:0] value grants (0b10: none).
_XN_PROT: Final = (KVM_PGTABLE_PROT_X, KVM_PGTABLE_PROT_UX, 0, KVM_PGTABLE_PROT_PX)


def stage2_pte_prot(pte: int) -> int:
    prot = pte & KVM_PTE_LEAF_ATTR_HI_SW
    if not pte_valid(pte):
        return prot
    if pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R:
        prot |= KVM_PGTABLE_PROT_R
    if pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W:
        prot |= KVM_PGTABLE_PROT_W
    xn = (pte >> KVM_PTE_LEAF_ATTR_HI_S2_XN_SHIFT) & 3
    prot |= _XN_PROT[xn]
    return prot
