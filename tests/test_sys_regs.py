"""Protected-VM system registers (`nvhe/sys_regs.c`): what a protected guest reads.

The expected values are worked out by hand from the board CPU's ID registers
(`pkvm.machine.cpu_id`, checked against a live core below) and the kernel's `pvmid_*` ceilings.
"""

import re

import pytest

import pkvm
from pkvm import guests
from pkvm.host.vmm import Vmm
from pkvm.machine.cpu_id import CPU_ID_REGS, ID_REG_ENC

# Protected guest, no SVE / pointer-authentication features requested (the VMM's defaults):
PROTECTED = {
    # EL0..EL3 capped at IMP (1: AArch64 only); FP/AdvSIMD keep FP16 (1); GIC, SVE (not asked
    # for), RAS, DIT, CSV2/3 are 0 on the CPU or gated.
    "ID_AA64PFR0_EL1": 0x11_1111,
    "ID_AA64PFR1_EL1": 0x1,  # BT 1; SSBS, MTE_frac 0 on the CPU
    "ID_AA64DFR0_EL1": 0xF << 36 | 0xF << 48,  # only the non-zero "not implemented" values
    "ID_AA64ISAR0_EL1": CPU_ID_REGS["ID_AA64ISAR0_EL1"],  # the CPU's own
    # DPB 2, APA/API 0 (no ptrauth for this VM), JSCVT, FCMA 1, LRCPC 2, GPA 1, FRINTTS, SB,
    # SPECRES 1
    "ID_AA64ISAR1_EL1": 0x111_0121_1002,
    "ID_AA64ISAR2_EL1": 0,
    "ID_AA64MMFR0_EL1": 0x1122,  # PARANGE 44 bits -> 40 (2), ASIDBITS 16, BIGEND, SNSMEM
    "ID_AA64MMFR1_EL1": 0x20_1020,  # VMIDBits 16, HPDS 1, PAN 2; VH and LO dropped
    "ID_AA64MMFR2_EL1": 0x11,  # CnP, UAO
    "ID_AA64ZFR0_EL1": 0,
    "ID_PFR0_EL1": 0,  # AArch32 ID registers read as zero
}


def _run(protected):
    m = pkvm.Machine(memory="256M")
    vmm = Vmm(m.host, guests.image("idregs"), memory="8M", protected=protected)
    s = vmm.run()
    vmm.destroy()
    return s, {k: int(v, 16) for k, v in re.findall(r"(\w+)=0x([0-9a-f]+)", s.console)}


def test_cpu_table_is_the_cores():
    from pkvm.machine.cpu import Core

    core = Core()
    for name, enc in ID_REG_ENC.items():
        assert core.read_sysreg(enc) == CPU_ID_REGS[name], name


def test_protected_guest_reads_sanitised_id_registers():
    s, seen = _run(True)
    assert seen == PROTECTED
    assert "write: undef" in s.console  # MSR to an ID register: UNDEF injected at EL2
    assert "sysreg" not in s.exits  # every access was answered at EL2


def test_non_protected_guest_reads_the_cpu():
    s, seen = _run(False)
    for name, value in seen.items():
        if name in CPU_ID_REGS:
            assert value == CPU_ID_REGS[name], name


@pytest.mark.parametrize("enc,write,want", [
    ((2, 0, 0, 2, 2), False, ("emulated", 0)),  # MDSCR_EL1: RAZ
    ((2, 0, 0, 2, 2), True, ("emulated", 5)),  # ... WI
    ((3, 0, 5, 3, 0), False, ("emulated", 0)),  # ERRIDR_EL1: RAZ
    ((3, 0, 12, 12, 5), False, ("emulated", 0x7)),  # ICC_SRE_EL1: SRE|DFB|DIB
    ((3, 0, 0, 1, 0), True, ("undef", 0)),  # ID_PFR0_EL1 write: UNDEF
    ((3, 3, 0, 0, 1), False, ("host", 0)),  # CTR_EL0: the host answers
    ((3, 3, 14, 2, 1), True, ("host", 0)),  # CNTP_CTL_EL0
    ((3, 1, 0, 0, 2), False, ("undef", 0)),  # CCSIDR2_EL1 without FEAT_IDST
    ((3, 0, 9, 14, 1), False, ("undef", 0)),  # PMINTENSET_EL1: restricted
    ((3, 0, 10, 4, 0), False, ("undef", 0)),  # LORSA_EL1: restricted
])
def test_trap_table(trap_vm, enc, write, want):
    from pkvm.hyp.sys_regs import pvm_sysreg_access

    assert pvm_sysreg_access(trap_vm, enc, write, 5) == want


@pytest.fixture(scope="module")
def trap_vm():
    """A protected hyp VM without vCPU features, its ID registers made again from the CPU's."""
    from pkvm.abi.host_structs import KVM_ARCH_FLAG_ID_REGS_INITIALIZED
    from pkvm.hyp.sys_regs import kvm_init_pvm_id_regs

    m = pkvm.Machine(memory="64M", cpus=1, trace=False)
    m.host.create_vm(vcpus=1, protected=True, memory=1 << 20).map(guests.RAM_BASE >> 12, 1)
    vm = m._hyp.vm_table[0]
    vm.vcpu_features = 0
    vm.flags = vm.flags & ~KVM_ARCH_FLAG_ID_REGS_INITIALIZED
    kvm_init_pvm_id_regs(vm, dict(CPU_ID_REGS))
    return vm
