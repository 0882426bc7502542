// oob: load from IPA 0x1_0000_0000, beyond guest RAM (an MMIO read exit to the VMM), print the
// value it got ("oob: read 0x..."), then SYSTEM_OFF.
    .section .text.start
    .global _start
_start:
    mov     x5, #0x100000000
    ldr     x6, [x5]
    adr     x1, msg
    bl      puts
    mov     x1, x6
    bl      puthex
    adr     x1, msg_nl
    bl      puts
    b       system_off

msg:    .asciz "oob: read "
msg_nl: .asciz "\n"
    .balign 4
    .include "lib.S"
