// Shared helpers for the guest programs, included at the end of each (`.include "lib.S"`).
// No stack: every helper is a leaf that clobbers only x9-x15 (and x0-x3 for PSCI calls).

.equ UART_BASE,        0x09000000   // PL011 data register (QEMU virt)
.equ UART_FR,          0x18         // flag register offset
.equ PSCI_CPU_OFF,     0x84000002
.equ PSCI_SYSTEM_OFF,  0x84000008
.equ PSCI_CPU_ON_64,   0xC4000003
.equ PKVM_HYP_MEMINFO, 0xC6000002
.equ PKVM_MEM_SHARE,   0xC6000003

// puts: print the NUL-terminated string at x1, one byte store per character.
puts:
    mov     x9, #UART_BASE
1:  ldrb    w10, [x1], #1
    cbz     w10, 2f
    strb    w10, [x9]
    b       1b
2:  ret

// puthex: print x1 as 0x followed by 16 hex digits.
puthex:
    mov     x9, #UART_BASE
    mov     w10, #'0'
    strb    w10, [x9]
    mov     w10, #'x'
    strb    w10, [x9]
    mov     x11, #60
1:  lsr     x10, x1, x11
    and     x10, x10, #0xf
    cmp     x10, #10
    add     x12, x10, #'0'
    add     x13, x10, #('a' - 10)
    csel    x10, x12, x13, lo
    strb    w10, [x9]
    subs    x11, x11, #4
    b.pl    1b
    ret

// system_off: PSCI SYSTEM_OFF; never returns.
system_off:
    mov     x0, #(PSCI_SYSTEM_OFF & 0xffff)
    movk    x0, #(PSCI_SYSTEM_OFF >> 16), lsl #16
    hvc     #0
1:  b       1b
