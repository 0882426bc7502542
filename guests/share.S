// share (protected guest): HYP_MEMINFO (expects 4096), MEM_SHARE of the page `shared`, write a
// message into that page, print it and the page's IPA, then SYSTEM_OFF. Prints
// "share: FAIL <x0>" if a call fails.
    .section .text.start
    .global _start
_start:
    mov     x0, #(PKVM_HYP_MEMINFO & 0xffff)
    movk    x0, #(PKVM_HYP_MEMINFO >> 16), lsl #16
    mov     x1, #0
    mov     x2, #0
    mov     x3, #0
    hvc     #0
    cmp     x0, #4096
    b.ne    fail
    mov     x0, #(PKVM_MEM_SHARE & 0xffff)
    movk    x0, #(PKVM_MEM_SHARE >> 16), lsl #16
    adr     x1, shared
    mov     x2, #0
    mov     x3, #0
    hvc     #0
    cbnz    x0, fail
    adr     x4, shared               // copy the message into the shared page
    adr     x5, message
1:  ldrb    w6, [x5], #1
    strb    w6, [x4], #1
    cbnz    w6, 1b
    adr     x1, shared
    bl      puts
    adr     x1, msg_at
    bl      puts
    adr     x1, shared
    bl      puthex
    adr     x1, msg_nl
    bl      puts
    b       system_off
fail:
    mov     x20, x0
    adr     x1, msg_fail
    bl      puts
    mov     x1, x20
    bl      puthex
    adr     x1, msg_nl
    bl      puts
    b       system_off

message:  .asciz "share: hello through a shared page"
msg_at:   .asciz " at "
msg_fail: .asciz "share: FAIL "
msg_nl:   .asciz "\n"
    .balign 4
    .include "lib.S"
    .balign 4096
shared: .skip 4096
