// smp (2 vCPUs): vCPU 0 starts vCPU 1 (MPIDR 1) with PSCI CPU_ON at `secondary`, context
// 0x5ec0; the secondary prints a line with its context, sets `flag` and calls CPU_OFF;
// vCPU 0 spins on `flag`, prints its own line and powers the system off.
    .section .text.start
    .global _start
_start:
    mov     x0, #(PSCI_CPU_ON_64 & 0xffff)
    movk    x0, #(PSCI_CPU_ON_64 >> 16), lsl #16
    mov     x1, #1
    adr     x2, secondary
    mov     x3, #0x5ec0
    hvc     #0
    cbnz    x0, fail
    adr     x4, flag
1:  ldr     w5, [x4]
    cbz     w5, 1b
    adr     x1, msg_primary
    bl      puts
    b       system_off
fail:
    adr     x1, msg_fail
    bl      puts
    b       system_off

secondary:                           // x0 = context
    mov     x20, x0
    adr     x1, msg_secondary
    bl      puts
    mov     x1, x20
    bl      puthex
    adr     x1, msg_nl
    bl      puts
    adr     x4, flag
    mov     w5, #1
    stlr    w5, [x4]
    mov     x0, #(PSCI_CPU_OFF & 0xffff)
    movk    x0, #(PSCI_CPU_OFF >> 16), lsl #16
    hvc     #0
2:  b       2b

msg_primary:   .asciz "smp: vCPU 0 saw vCPU 1 report\n"
msg_secondary: .asciz "smp: vCPU 1 up, context "
msg_fail:      .asciz "smp: FAIL CPU_ON\n"
msg_nl:        .asciz "\n"
    .balign 8
flag:   .word 0
    .balign 4
    .include "lib.S"
