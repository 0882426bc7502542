// probe: a conformance guest that asks the hypervisor what a guest can ask and prints every
// answer ("name=0x...", one line each), then powers off. Only `pkvm conform --guest probe`
// runs it; its UART output is what the comparison sees of each call's result.
// Build (Debian binutils-aarch64-linux-gnu), from the repository root:
//   src/pkvm/conform/helper/build_probe.sh
    .section .text.start
    .global _start

// call FID, A1, A2, A3, NAME: print NAME, hvc #0 with x0..x3, print x0
.macro call fid, a1, a2, a3, name
    adr     x1, \name
    bl      puts
    ldr     x0, =\fid
    ldr     x1, =\a1
    ldr     x2, =\a2
    ldr     x3, =\a3
    hvc     #0
    mov     x1, x0
    bl      puthex
    adr     x1, nl
    bl      puts
.endm

// sysreg REG, NAME: print NAME=REG
.macro sysreg reg, name
    mrs     x20, \reg
    adr     x1, \name
    bl      puts
    mov     x1, x20
    bl      puthex
    adr     x1, nl
    bl      puts
.endm

_start:
    call    0x84000000, 0, 0, 0, n_psci_version
    call    0x80000000, 0, 0, 0, n_smccc_version
    call    0x8400000a, 0xc4000003, 0, 0, n_features_cpu_on
    call    0x8400000a, 0x84000012, 0, 0, n_features_reset2
    call    0x8400000a, 0x84000015, 0, 0, n_features_off2
    call    0x8400000a, 0xc4000001, 0, 0, n_features_suspend
    call    0x80000001, 0x80008000, 0, 0, n_arch_wa1
    call    0x80000001, 0x80007fff, 0, 0, n_arch_wa2
    call    0x80000001, 0x80003fff, 0, 0, n_arch_wa3
    call    0x80000001, 0xc5000020, 0, 0, n_arch_pv_time
    call    0xc5000020, 0xc5000021, 0, 0, n_pv_time_features
    call    0x8600ff01, 0, 0, 0, n_hyp_uid
    call    0x86000000, 0, 0, 0, n_hyp_features
    call    0xc6000002, 0, 0, 0, n_meminfo
    call    0xc6000003, 0x40002000, 0, 0, n_share
    call    0xc6000003, 0x40002000, 0, 0, n_share_again
    call    0xc6000004, 0x40002000, 0, 0, n_unshare
    call    0xc6000004, 0x40002000, 0, 0, n_unshare_again
    call    0xc6000003, 0x40002001, 0, 0, n_share_unaligned
    call    0xc6000005, 0x09000000, 0, 0, n_mmio_guard
    call    0xc4000004, 1, 0, 0, n_affinity
    call    0xc6000063, 0, 0, 0, n_vendor_unknown
    call    0x12345678, 0, 0, 0, n_unknown
    ldr     x0, =0x84000000
    smc     #0
    mov     x20, x0
    adr     x1, n_smc_psci
    bl      puts
    mov     x1, x20
    bl      puthex
    adr     x1, nl
    bl      puts
    sysreg  midr_el1, n_midr
    sysreg  mpidr_el1, n_mpidr
    sysreg  id_aa64pfr0_el1, n_pfr0
    sysreg  id_aa64pfr1_el1, n_pfr1
    sysreg  id_aa64dfr0_el1, n_dfr0
    sysreg  id_aa64isar0_el1, n_isar0
    sysreg  id_aa64isar1_el1, n_isar1
    sysreg  id_aa64mmfr0_el1, n_mmfr0
    sysreg  id_aa64mmfr1_el1, n_mmfr1
    sysreg  id_aa64mmfr2_el1, n_mmfr2
    sysreg  ctr_el0, n_ctr
    // last: a protected VM's share of an IPA outside memory takes the guest to its (absent)
    // vectors, as the kernel injects an abort; a normal VM's host says NOT_SUPPORTED
    call    0xc6000003, 0x100000000, 0, 0, n_share_outside
    b       system_off
    .ltorg

n_psci_version:    .asciz "psci_version="
n_smccc_version:   .asciz "smccc_version="
n_features_cpu_on: .asciz "psci_features(cpu_on)="
n_features_reset2: .asciz "psci_features(system_reset2)="
n_arch_wa1:        .asciz "arch_features(workaround_1)="
n_arch_wa2:        .asciz "arch_features(workaround_2)="
n_arch_wa3:        .asciz "arch_features(workaround_3)="
n_arch_pv_time:    .asciz "arch_features(pv_time_features)="
n_pv_time_features: .asciz "pv_time_features(pv_time_st)="
n_features_off2:   .asciz "psci_features(system_off2)="
n_features_suspend: .asciz "psci_features(cpu_suspend)="
n_hyp_uid:         .asciz "vendor_hyp_uid="
n_hyp_features:    .asciz "vendor_hyp_features="
n_meminfo:         .asciz "hyp_meminfo="
n_share:           .asciz "mem_share="
n_share_again:     .asciz "mem_share(again)="
n_unshare:         .asciz "mem_unshare="
n_unshare_again:   .asciz "mem_unshare(again)="
n_share_outside:   .asciz "mem_share(outside memory)="
n_share_unaligned: .asciz "mem_share(unaligned)="
n_mmio_guard:      .asciz "mmio_guard="
n_affinity:        .asciz "affinity_info(1)="
n_vendor_unknown:  .asciz "vendor_hyp(0x63)="
n_unknown:         .asciz "unknown(0x12345678)="
n_smc_psci:        .asciz "smc psci_version="
n_midr:            .asciz "midr_el1="
n_mpidr:           .asciz "mpidr_el1="
n_pfr0:            .asciz "id_aa64pfr0_el1="
n_pfr1:            .asciz "id_aa64pfr1_el1="
n_dfr0:            .asciz "id_aa64dfr0_el1="
n_isar0:           .asciz "id_aa64isar0_el1="
n_isar1:           .asciz "id_aa64isar1_el1="
n_mmfr0:           .asciz "id_aa64mmfr0_el1="
n_mmfr1:           .asciz "id_aa64mmfr1_el1="
n_mmfr2:           .asciz "id_aa64mmfr2_el1="
n_ctr:             .asciz "ctr_el0="
nl:                .asciz "\n"
    .balign 4
    .include "lib.S"
    .balign 8192
shared: .skip 4096
