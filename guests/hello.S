// hello: print one line on the UART with byte stores, then PSCI SYSTEM_OFF.
    .section .text.start
    .global _start
_start:
    adr     x1, msg
    bl      puts
    b       system_off

msg: .asciz "Hello from a pKVM guest!\n"
    .balign 4
    .include "lib.S"
