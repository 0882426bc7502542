// loop: a compute kernel for benchmarks. Runs N iterations of a 4-instruction loop body
// (N = the 64-bit word at image offset 8, default 100_000_000), leaves the checksum in x2,
// then SYSTEM_OFF. Instructions executed: 4 * N + 5 up to the HVC.
    .section .text.start
    .global _start
_start:
    b       main
    .balign 8
iterations: .quad 100000000          // image offset 8

main:
    ldr     x1, iterations
    mov     x2, #0
1:  add     x2, x2, x1
    eor     x3, x2, x1, lsl #3
    subs    x1, x1, #1
    b.ne    1b
    b       system_off
    .balign 4
    .include "lib.S"
