// mmio: MMIO round trips for benchmarks. N iterations (u64 at image offset 8, default
// 100 000) of a 32-bit load from IPA 0x0A00_0000 and a 32-bit store of the value loaded plus
// one back to it: 2 N data-abort exits (ISV set), then SYSTEM_OFF.
    .section .text.start
    .global _start
_start:
    b       main
    .balign 8
iterations: .quad 100000             // image offset 8

main:
    ldr     x1, iterations
    mov     x2, #0x0a000000
1:  ldr     w3, [x2]
    add     w3, w3, #1
    str     w3, [x2]
    subs    x1, x1, #1
    b.ne    1b
    b       system_off
    .balign 4
    .include "lib.S"
