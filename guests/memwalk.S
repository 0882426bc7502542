// memwalk: write then read back one word in every 4 KiB page of N MiB starting 1 MiB into
// RAM (IPA 0x4010_0000); prints "memwalk: OK" or "memwalk: FAIL at <addr>", then SYSTEM_OFF.
// N is the 64-bit word at image offset 8 (default 16); a loader may patch it.
    .section .text.start
    .global _start
_start:
    b       main
    .balign 8
mib:    .quad 16                     // image offset 8: MiB to touch

main:
    ldr     x2, mib
    lsl     x2, x2, #20              // bytes
    mov     x3, #0x40100000          // first page
    add     x4, x3, x2               // end
    ldr     x5, =0x9e3779b97f4a7c15  // pattern key
    mov     x6, x3
1:  cmp     x6, x4
    b.hs    2f
    eor     x7, x6, x5
    str     x7, [x6]
    add     x6, x6, #4096
    b       1b
2:  mov     x6, x3
3:  cmp     x6, x4
    b.hs    ok
    ldr     x7, [x6]
    eor     x8, x6, x5
    cmp     x7, x8
    b.ne    fail
    add     x6, x6, #4096
    b       3b
ok:
    adr     x1, msg_ok
    bl      puts
    b       system_off
fail:
    adr     x1, msg_fail
    bl      puts
    mov     x1, x6
    bl      puthex
    adr     x1, msg_nl
    bl      puts
    b       system_off

msg_ok:   .asciz "memwalk: OK\n"
msg_fail: .asciz "memwalk: FAIL at "
msg_nl:   .asciz "\n"
    .balign 4
    .include "lib.S"
