"""TLB maintenance by VMID for the host (`nvhe/tlb.c`).

Each `__kvm_tlb_flush_*` call takes a host pointer to a `struct kvm_s2_mmu` (turned into a hyp
VA by `kern_hyp_va`) and switches to that stage-2 around its TLBIs (`enter_vmid_context`). From
the host (no `__hyp_running_vcpu`) the switch is `__load_stage2`, which reads the struct through
EL2's stage-1, one field at a time, in this order and at these widths (`KVM_S2_MMU` holds the
kernel's offsets):

- 6.12 only: `mmu->arch` (8 bytes at +88), the argument `kern_hyp_va(mmu->arch)`;
- `mmu->vtcr` (8 bytes at +24), written to VTCR_EL2;
- `kvm_get_vttbr`: `mmu->pgd_phys` (8 bytes at +8), then `mmu->vmid.id` (8 bytes at +0).

The first read that touches a page EL2 has not mapped is the hyp's data abort (a hyp panic),
so a pointer whose struct straddles a mapped and an unmapped page faults exactly where Linux's
hyp faults. The model's TLBs of guest stage-2s are not VMID-tagged, so the invalidation itself
and `exit_vmid_context`'s reload of the host stage-2 leave the machine as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

from pkvm.abi.host_structs import KVM_S2_MMU
from pkvm.hyp.mm import el2_read_u64
from pkvm.hyp.state import HypState


@dataclass(frozen=True)
class LoadedStage2:
    """What `__load_stage2` would write: VTCR_EL2 and VTTBR_EL2's base address and VMID."""

    vtcr: int
    pgd_phys: int
    vmid: int


def _field(h: HypState, mmu: int, name: str) -> int:
    return el2_read_u64(h, mmu + KVM_S2_MMU.offset(name))


def enter_vmid_context(h: HypState, mmu: int) -> LoadedStage2:
    """Switch to the stage-2 of the host's `kvm_s2_mmu` at hyp VA `mmu` (host context)."""
    if h.profile.load_stage2_reads_mmu_arch:
        _field(h, mmu, "arch")
    vtcr = _field(h, mmu, "vtcr")
    pgd_phys = _field(h, mmu, "pgd_phys")
    vmid = _field(h, mmu, "vmid")
    return LoadedStage2(vtcr, pgd_phys, vmid)


def __kvm_tlb_flush_vmid_ipa(h: HypState, mmu: int, ipa: int, level: int) -> None:
    enter_vmid_context(h, mmu)


def __kvm_tlb_flush_vmid_ipa_nsh(h: HypState, mmu: int, ipa: int, level: int) -> None:
    enter_vmid_context(h, mmu)


def __kvm_tlb_flush_vmid_range(h: HypState, mmu: int, start: int, pages: int) -> None:
    enter_vmid_context(h, mmu)


def __kvm_tlb_flush_vmid(h: HypState, mmu: int) -> None:
    enter_vmid_context(h, mmu)


def __kvm_flush_cpu_context(h: HypState, mmu: int) -> None:
    enter_vmid_context(h, mmu)
