"""`__kvm_tlb_flush_*` read the host's `struct kvm_s2_mmu` as Linux's hyp does (`nvhe/tlb.c`).

From the host, `enter_vmid_context` -> `__load_stage2` reads, in order: `mmu->arch` (6.12 only,
the argument `kern_hyp_va(mmu->arch)`), `mmu->vtcr`, then `kvm_get_vttbr`'s `mmu->pgd_phys` and
`mmu->vmid.id`, each 8 bytes. The offsets below are the kernel's (arm64 kvm_host.h, the same in
6.12 and 7.2), written here independently of the model's layout table. A struct placed across
the hyp-mapped page P and its unmapped neighbours faults at the first of those reads that touches
an unmapped byte, and nowhere if none does.
"""

import re

import pytest

import pkvm
from conftest import kva

P = 0x40001  # shared with the hyp; 0x40000 (the first RAM page) and 0x40002 are not
# 6.12 maps a page shared with the hyp in its stage-1; 7.2 maps only what it pins, so there
# every struct faults at its first read (`vtcr`, not the struct's first byte).
MAPPED = {"6.12": {P}, "latest": set()}
OFF = {"vmid": 0, "pgd_phys": 8, "vtcr": 24, "arch": 88}
CALLS = [("__kvm_tlb_flush_vmid_ipa", (0x11000, 0)), ("__kvm_tlb_flush_vmid_ipa_nsh", (0x11000, 0)),
         ("__kvm_tlb_flush_vmid_range", (0x11000, 1)), ("__kvm_tlb_flush_vmid", ()),
         ("__kvm_flush_cpu_context", ())]


def expected_fault(abi: str, mmu_pa: int) -> int | None:
    """The PA of the first unmapped byte the kernel's read sequence touches, or None."""
    order = (["arch"] if abi == "6.12" else []) + ["vtcr", "pgd_phys", "vmid"]
    for name in order:
        for pa in range(mmu_pa + OFF[name], mmu_pa + OFF[name] + 8):
            if pa >> 12 not in MAPPED[abi]:
                return pa
    return None


def fault_pa_low(reason: str) -> int:
    va = int(re.search(r"hyp VA (0x[0-9a-f]+)", reason).group(1), 16)
    return va & 0xFFF


# struct starts: the issue's 4095 (all but vmid mapped), pgd_phys and vtcr straddling the start,
# arch straddling the end (6.12 faults, 7.2 never reads it), and wholly inside P.
STARTS = [0x4000_0FFF, 0x4000_0FEC, 0x4000_0FE6, 0x4000_1FA6, 0x4000_1F00]


@pytest.mark.parametrize("mmu_pa", STARTS, ids=hex)
@pytest.mark.parametrize("call,args", CALLS, ids=[c for c, _ in CALLS])
def test_fault_where_the_kernel_reads(machine, mmu_pa, call, args):
    m = machine
    assert m.hvc(1, "__pkvm_host_share_hyp", P).x1 == 0
    m.host.write(P << 12, bytes(range(256)) * 16)  # Linux's own data in the shared page
    want = expected_fault(m.abi, mmu_pa)
    if want is None:
        r = m.hvc(1, call, kva(mmu_pa), *args)
        assert r.x0 == 0 and not m.dead
        return
    with pytest.raises(pkvm.HypPanic) as ei:
        m.hvc(1, call, kva(mmu_pa), *args)
    assert ei.value.cpu == 1 and ei.value.call == call
    assert "EL2 data abort" in ei.value.reason
    assert fault_pa_low(ei.value.reason) == want & 0xFFF, ei.value.reason


def test_issue_pointer_4095(m612):
    """The divergence as found: `__kvm_tlb_flush_vmid_ipa(4095, 0x11000, 0)` on CPU 1 reads
    the fields in page P first and faults on `vmid.id` at byte 0xfff of the first RAM page."""
    m = m612
    assert m.hvc(1, "__pkvm_host_share_hyp", P).x1 == 0
    with pytest.raises(pkvm.HypPanic) as ei:
        m.hvc(1, "__kvm_tlb_flush_vmid_ipa", 4095, 0x11000, 0)
    assert fault_pa_low(ei.value.reason) == 0xFFF


def test_layout_is_the_kernels():
    from pkvm.abi.host_structs import KVM_S2_MMU

    assert {n: KVM_S2_MMU.offset(n) for n in OFF} == OFF
