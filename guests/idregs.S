// idregs: read the AArch64 ID registers a protected guest can see and print each as
// "NAME=0x...", one per line, then one AArch32 ID register and a write to an ID register
// (UNDEF: the guest's exception vector prints "undef" and powers off).
    .section .text.start
    .global _start
_start:
    adr     x0, vectors
    msr     vbar_el1, x0
    isb
    adr     x1, n_pfr0
    bl      puts
    mrs     x1, id_aa64pfr0_el1
    bl      line
    adr     x1, n_pfr1
    bl      puts
    mrs     x1, id_aa64pfr1_el1
    bl      line
    adr     x1, n_dfr0
    bl      puts
    mrs     x1, id_aa64dfr0_el1
    bl      line
    adr     x1, n_isar0
    bl      puts
    mrs     x1, id_aa64isar0_el1
    bl      line
    adr     x1, n_isar1
    bl      puts
    mrs     x1, id_aa64isar1_el1
    bl      line
    adr     x1, n_isar2
    bl      puts
    mrs     x1, id_aa64isar2_el1
    bl      line
    adr     x1, n_mmfr0
    bl      puts
    mrs     x1, id_aa64mmfr0_el1
    bl      line
    adr     x1, n_mmfr1
    bl      puts
    mrs     x1, id_aa64mmfr1_el1
    bl      line
    adr     x1, n_mmfr2
    bl      puts
    mrs     x1, id_aa64mmfr2_el1
    bl      line
    adr     x1, n_zfr0
    bl      puts
    mrs     x1, s3_0_c0_c4_4
    bl      line
    adr     x1, n_pfr0_32
    bl      puts
    mrs     x1, id_pfr0_el1
    bl      line
    // a write to an ID register: UNDEF at EL2 for a protected guest
    msr     s3_0_c0_c4_0, xzr
    adr     x1, n_nofault
    bl      puts
    b       system_off

// line: print x1 in hex and a newline (clobbers x9-x15, keeps x30 in x16)
line:
    mov     x16, x30
    bl      puthex
    mov     x9, #UART_BASE
    mov     w10, #'\n'
    strb    w10, [x9]
    mov     x30, x16
    ret

n_pfr0:    .asciz "ID_AA64PFR0_EL1="
n_pfr1:    .asciz "ID_AA64PFR1_EL1="
n_dfr0:    .asciz "ID_AA64DFR0_EL1="
n_isar0:   .asciz "ID_AA64ISAR0_EL1="
n_isar1:   .asciz "ID_AA64ISAR1_EL1="
n_isar2:   .asciz "ID_AA64ISAR2_EL1="
n_mmfr0:   .asciz "ID_AA64MMFR0_EL1="
n_mmfr1:   .asciz "ID_AA64MMFR1_EL1="
n_mmfr2:   .asciz "ID_AA64MMFR2_EL1="
n_zfr0:    .asciz "ID_AA64ZFR0_EL1="
n_pfr0_32: .asciz "ID_PFR0_EL1="
n_nofault: .asciz "write: no fault\n"
n_undef:   .asciz "write: undef\n"
    .balign 4

// The exception vector: any synchronous exception from EL1 is the UNDEF of the write.
    .balign 2048
vectors:
    .skip 0x200
    adr     x1, n_undef
    bl      puts
    b       system_off

    .balign 4
    .include "lib.S"
