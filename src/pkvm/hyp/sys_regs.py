"""Protected-VM system registers (`nvhe/sys_regs.c`, Linux 7.2).

A protected guest never sees the CPU's ID registers directly: HCR_EL2.TID3 traps them and EL2
answers from the VM's own copy, computed once per VM (`kvm_init_pvm_id_regs`) from the
sanitised values the host handed EL2 at init (`id_aa64*_el1_sys_val`) and the per-field
ceilings of the `pvmid_*` tables: a field keeps the CPU's value capped at its ceiling (signed
fields the larger of the two when either is negative), a field gated on a VM feature the VM
lacks reads "not implemented", and a field absent from its table reads 0. Registers without
a table read the fixed values the kernel defines (the non-zero "not implemented" encodings of
ID_AA64DFR0 and ID_AA64MMFR4) or, for ISAR0, the CPU's own.

`kvm_handle_pvm_sysreg` then decides each trapped access by the kernel's table
(`pvm_sys_reg_descs`): ID registers read their copy (writes UNDEF), AArch32 ID registers read
as zero, debug and RAS error registers are RAZ/WI, a few are left to the host, and anything
else is UNDEF for the guest.

6.12 has the same mechanism in its `nvhe/sys_regs.c`, but the model's 6.12 host creates no
protected VMs (`Profile.protected_vms`), so only 7.2's tables are reachable here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from pkvm.machine.cpu_id import CPU_ID_REGS, ID_REG_ENC

if TYPE_CHECKING:
    from pkvm.hyp.pkvm_structs import PkvmHypVm

# `enum kvm_vcpu_features` bits in kvm->arch.vcpu_features.
KVM_ARM_VCPU_EL1_32BIT: Final = 1 << 1
KVM_ARM_VCPU_SVE: Final = 1 << 4
KVM_ARM_VCPU_PTRAUTH_ADDRESS: Final = 1 << 5
KVM_ARM_VCPU_PTRAUTH_GENERIC: Final = 1 << 6


@dataclass(frozen=True)
class FtrBits:
    """`struct pvm_ftr_bits`: one field of an ID register and its ceiling for protected VMs."""

    name: str
    shift: int
    max_val: int
    sign: bool = False
    vm_supported: str | None = None  # "ptrauth" / "sve": gated on a VM feature
    width: int = 4


F = FtrBits
PVMID_AA64PFR0: Final = (
    F("EL0", 0, 1), F("EL1", 4, 1), F("EL2", 8, 1), F("EL3", 12, 1),
    F("FP", 16, 1, sign=True), F("AdvSIMD", 20, 1, sign=True), F("GIC", 24, 1),
    F("SVE", 32, 1, vm_supported="sve"), F("RAS", 28, 1), F("DIT", 48, 1),
    F("CSV2", 56, 1), F("CSV3", 60, 1),
)
PVMID_AA64PFR1: Final = (F("BT", 0, 1), F("SSBS", 4, 2), F("MTE_frac", 40, 0xF))
PVMID_AA64PFR2: Final = (F("GCIE", 12, 0),)
PVMID_AA64MMFR0: Final = (
    F("PARANGE", 0, 2), F("ASIDBITS", 4, 2), F("BIGEND", 8, 1), F("SNSMEM", 12, 1),
    F("BIGENDEL0", 16, 1), F("EXS", 44, 1),
)
PVMID_AA64MMFR1: Final = (
    F("HAFDBS", 0, 2), F("VMIDBits", 4, 2), F("HPDS", 12, 2), F("PAN", 20, 3),
    F("SpecSEI", 24, 1), F("ETS", 36, 1), F("CMOW", 56, 1),
)
PVMID_AA64MMFR2: Final = (
    F("CnP", 0, 1), F("UAO", 4, 1), F("IESB", 12, 1), F("AT", 32, 1), F("IDS", 36, 1),
    F("TTL", 48, 1), F("BBM", 52, 2), F("E0PD", 60, 1),
)
PVMID_AA64ISAR1: Final = (
    F("DPB", 0, 2), F("APA", 4, 1, vm_supported="ptrauth"), F("API", 8, 1, vm_supported="ptrauth"),
    F("JSCVT", 12, 1), F("FCMA", 16, 1), F("LRCPC", 20, 3), F("GPA", 24, 1), F("GPI", 28, 1),
    F("FRINTTS", 32, 1), F("SB", 36, 1), F("SPECRES", 40, 2), F("BF16", 44, 2), F("DGH", 48, 1),
    F("I8MM", 52, 1),
)
PVMID_AA64ISAR2: Final = (
    F("GPA3", 8, 1, vm_supported="ptrauth"), F("APA3", 12, 1, vm_supported="ptrauth"),
    F("ATS1A", 60, 1),
)
del F

RESTRICTIONS: dict[str, tuple[FtrBits, ...]] = {
    "ID_AA64PFR0_EL1": PVMID_AA64PFR0,
    "ID_AA64PFR1_EL1": PVMID_AA64PFR1,
    "ID_AA64PFR2_EL1": PVMID_AA64PFR2,
    "ID_AA64ISAR1_EL1": PVMID_AA64ISAR1,
    "ID_AA64ISAR2_EL1": PVMID_AA64ISAR2,
    "ID_AA64MMFR0_EL1": PVMID_AA64MMFR0,
    "ID_AA64MMFR1_EL1": PVMID_AA64MMFR1,
    "ID_AA64MMFR2_EL1": PVMID_AA64MMFR2,
}
# The "not implemented" encodings that are not zero: DoubleLock and MTPMU (DFR0), E2H0 (MMFR4).
ID_AA64DFR0_EL1_NONZERO_NI: Final = (0xF << 36) | (0xF << 48)
ID_AA64MMFR4_EL1_NONZERO_NI: Final = 0xF << 24


def sys_reg(op0: int, op1: int, crn: int, crm: int, op2: int) -> int:
    """The kernel's `sys_reg()` packing of an encoding (for ordering and lookups)."""
    return (op0 << 19) | (op1 << 16) | (crn << 12) | (crm << 8) | (op2 << 5)


def idreg_idx(enc: tuple[int, int, int, int, int]) -> int:
    """`IDREG_IDX`: the slot of an ID register (op0 3, op1 0, CRn 0, CRm 1-7) in `id_regs`."""
    _op0, _op1, _crn, crm, op2 = enc
    return ((crm - 1) << 3) | op2


def vm_has_feature(vm: "PkvmHypVm", bit: int) -> bool:
    return bool(vm.vcpu_features & bit)


def _vm_supported(vm: "PkvmHypVm", what: str, sys_vals: dict[str, int]) -> bool:
    if what == "sve":  # system_supports_sve() && the VM asked for SVE
        return ((sys_vals["ID_AA64PFR0_EL1"] >> 32) & 0xF) != 0 and vm_has_feature(vm, KVM_ARM_VCPU_SVE)
    isar1 = sys_vals["ID_AA64ISAR1_EL1"]
    has_auth = bool(isar1 & (0xFF << 4)) or bool(isar1 & (0xFF << 24))
    return has_auth and vm_has_feature(vm, KVM_ARM_VCPU_PTRAUTH_GENERIC)


def get_restricted_features(vm: "PkvmHypVm", sys_reg_val: int, restrictions: tuple[FtrBits, ...],
                            sys_vals: dict[str, int]) -> int:
    """`get_restricted_features`: the guest's value of one ID register."""
    supported = {what: _vm_supported(vm, what, sys_vals) for what in ("sve", "ptrauth")
                 if any(r.vm_supported == what for r in restrictions)}
    return _restricted(sys_reg_val, restrictions, supported)


def _restricted(sys_reg_val: int, restrictions: tuple[FtrBits, ...],
                supported: dict[str, bool]) -> int:
    """`get_restricted_features` with the VM's gates (`_vm_supported`) decided beforehand:
    they depend on the VM and `sys_vals` only, not on the register."""
    val = 0
    for r in restrictions:
        min_signed = (1 << r.width) - 1
        sign_bit = 1 << (r.width - 1)
        sys_val = (sys_reg_val >> r.shift) & ((1 << r.width) - 1)
        if r.vm_supported is not None and not supported[r.vm_supported]:
            val |= (min_signed if r.sign else 0) << r.shift
        elif r.sign and (sys_val >= sign_bit or r.max_val >= sign_bit):
            val |= max(sys_val, r.max_val) << r.shift
        else:
            val |= min(sys_val, r.max_val) << r.shift
    return val


def pvm_calc_id_reg(vm: "PkvmHypVm", name: str, sys_vals: dict[str, int]) -> int:
    """`pvm_calc_id_reg`: the protected guest's value of ID register `name`."""
    if name in RESTRICTIONS:
        return get_restricted_features(vm, sys_vals[name], RESTRICTIONS[name], sys_vals)
    return _unrestricted_id_reg(name, sys_vals)


def _unrestricted_id_reg(name: str, sys_vals: dict[str, int]) -> int:
    """`pvm_calc_id_reg` of a register without a `pvmid_*` table."""
    if name == "ID_AA64ISAR0_EL1":
        return sys_vals[name]
    if name == "ID_AA64DFR0_EL1":
        return ID_AA64DFR0_EL1_NONZERO_NI
    if name == "ID_AA64MMFR4_EL1":
        return ID_AA64MMFR4_EL1_NONZERO_NI
    return 0  # unhandled ID register: RAZ


_ID_NAMES: Final = {idreg_idx(enc): name for name, enc in ID_REG_ENC.items()}
_ID_IDX: Final = {name: idreg_idx(enc) for name, enc in ID_REG_ENC.items()}
# The AArch64 ID registers (CRm 4-7) as (slot, name or None), in slot order.
_AARCH64_SLOTS: Final = tuple((idx, _ID_NAMES.get(idx)) for idx in range(
    idreg_idx((3, 0, 0, 4, 0)), idreg_idx((3, 0, 0, 7, 7)) + 1))


def kvm_init_pvm_id_regs(vm: "PkvmHypVm", sys_vals: dict[str, int]) -> None:
    """Once per VM: every AArch64 ID register (CRm 4-7) of the protected guest (each as
    `pvm_calc_id_reg` computes it, the VM's feature gates decided once for all)."""
    if vm.id_regs_initialized:
        return
    supported = {"sve": _vm_supported(vm, "sve", sys_vals),
                 "ptrauth": _vm_supported(vm, "ptrauth", sys_vals)}
    regs = [0] * 56
    for idx, name in _AARCH64_SLOTS:
        if name is None:
            continue
        table = RESTRICTIONS.get(name)
        regs[idx] = (_restricted(sys_vals[name], table, supported) if table is not None
                     else _unrestricted_id_reg(name, sys_vals))
    vm.set_id_regs(tuple(regs))  # stored in the hyp VM's `arch.id_regs`, flag set


def read_vm_id_reg(vm: "PkvmHypVm", name: str) -> int:
    """`kvm_read_vm_id_reg` for an AArch64 ID register of the VM (0 before they exist)."""
    return vm.id_reg(_ID_IDX[name])


def kvm_has_feat(vm: "PkvmHypVm", name: str, shift: int, limit: int, signed: bool = False) -> bool:
    """`kvm_has_feat(kvm, reg, field, limit)`: the VM's field >= limit (signed fields signed)."""
    v = (read_vm_id_reg(vm, name) >> shift) & 0xF
    if signed:
        v = v - 16 if v & 8 else v
        limit = limit - 16 if limit & 8 else limit
    return v >= limit


def host_sys_vals() -> dict[str, int]:
    """The sanitised ID register values the host hands EL2 (the board's CPU: all CPUs equal)."""
    return dict(CPU_ID_REGS)


# -- the trapped accesses of a protected guest (`pvm_sys_reg_descs`) ----------------------------
RAZ_WI: Final = "raz_wi"
AARCH32: Final = "aarch32"
AARCH64: Final = "aarch64"
HOST: Final = "host"
GIC_SRE: Final = "gic_sre"
IDST: Final = "idst"
UNDEF: Final = "undef"


def _descs() -> dict[tuple[int, int, int, int, int], str]:
    d: dict[tuple[int, int, int, int, int], str] = {}
    for n in range(16):  # DBGBVR/BCR/WVR/WCR<n>_EL1: op0 2, op1 0, CRn 0, CRm n, op2 4..7
        for op2 in (4, 5, 6, 7):
            d[(2, 0, 0, n, op2)] = RAZ_WI
    for enc in ((2, 0, 0, 2, 2), (2, 0, 1, 0, 4), (2, 0, 1, 1, 4), (2, 0, 1, 3, 4)):
        d[enc] = RAZ_WI  # MDSCR, OSLAR, OSLSR, OSDLR
    d[(3, 0, 0, 0, 6)] = HOST  # REVIDR_EL1
    for crm in (1, 2, 3):
        for op2 in range(8):
            d[(3, 0, 0, crm, op2)] = AARCH32
    d[(3, 0, 0, 3, 3)] = AARCH64  # ID_UNALLOCATED(3,3) and (3,7)
    d[(3, 0, 0, 3, 7)] = AARCH64
    for crm in (4, 5, 6, 7):
        for op2 in range(8):
            d[(3, 0, 0, crm, op2)] = AARCH64
    d[(3, 0, 4, 6, 0)] = HOST  # ICC_PMR_EL1
    for enc in ((3, 0, 5, 3, 0), (3, 0, 5, 3, 1), (3, 0, 5, 4, 0), (3, 0, 5, 4, 1),
                (3, 0, 5, 4, 2), (3, 0, 5, 4, 3), (3, 0, 5, 5, 0), (3, 0, 5, 5, 1)):
        d[enc] = RAZ_WI  # ERRIDR, ERRSELR, ERXFR, ERXCTLR, ERXSTATUS, ERXADDR, ERXMISC0/1
    for enc in ((3, 0, 12, 11, 1), (3, 0, 12, 11, 3), (3, 0, 12, 11, 5), (3, 0, 12, 11, 6),
                (3, 0, 12, 11, 7), (3, 0, 12, 12, 4)):
        d[enc] = HOST  # ICC_DIR, RPR, SGI1R, ASGI1R, SGI0R, CTLR
    d[(3, 0, 12, 12, 5)] = GIC_SRE
    d[(3, 1, 0, 0, 0)] = HOST  # CCSIDR_EL1
    d[(3, 1, 0, 0, 1)] = HOST  # CLIDR_EL1
    d[(3, 1, 0, 0, 2)] = IDST  # CCSIDR2_EL1
    d[(3, 1, 0, 0, 4)] = IDST  # GMID_EL1
    d[(3, 1, 0, 0, 6)] = IDST  # SMIDR_EL1
    d[(3, 1, 0, 0, 7)] = HOST  # AIDR_EL1
    d[(3, 2, 0, 0, 0)] = HOST  # CSSELR_EL1
    d[(3, 3, 0, 0, 1)] = HOST  # CTR_EL0
    for op2 in (0, 1, 2):
        d[(3, 3, 14, 2, op2)] = HOST  # CNTP_TVAL, CTL, CVAL
    return d


PVM_SYS_REG_DESCS: Final = _descs()
ICC_SRE_EL1_VALUE: Final = 0x7  # SRE | DFB | DIB: protected VMs have GICv3 only


def pvm_sysreg_access(vm: "PkvmHypVm", enc: tuple[int, int, int, int, int], is_write: bool,
                      regval: int) -> tuple[str, int]:
    """`kvm_handle_pvm_sysreg` for one access: ("emulated", value read), ("host", 0) or
    ("undef", 0). `enc` is (op0, op1, CRn, CRm, op2)."""
    kind = PVM_SYS_REG_DESCS.get(enc, UNDEF)
    if kind == UNDEF:
        return UNDEF, 0
    if kind == HOST:
        return HOST, 0
    if kind == RAZ_WI:
        return "emulated", regval if is_write else 0
    if kind == GIC_SRE:
        return "emulated", regval if is_write else ICC_SRE_EL1_VALUE
    if kind == IDST:
        # FEAT_IDST: the guest takes the trap itself as a sync exception; else UNDEF.
        return ("idst" if kvm_has_feat(vm, "ID_AA64MMFR2_EL1", 36, 1) else UNDEF), 0
    if is_write:
        return UNDEF, 0
    if kind == AARCH32:
        return "emulated", 0
    if not vm.id_regs_initialized:  # read_id_reg's WARN_ON_ONCE (the caller records it)
        return "warn", 0
    return "emulated", vm.id_reg(idreg_idx(enc))

