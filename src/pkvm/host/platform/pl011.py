"""A PL011 UART with its receive path and interrupts (SPI 1 = INTID 33 on this board).

Transmit: each data-register write goes out at once (the FIFO never fills; FR.TXFE stays set).
Receive: `feed(bytes)` queues input; FR.RXFE clears, RXRIS rises while the FIFO holds data.
TXRIS rises with each transmitted byte and is cleared through ICR (QEMU's behaviour, which
Linux's driver is written against). The interrupt line is (RIS & IMSC) != 0.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import IO

UART_BASE = 0x0900_0000
UART_SIZE = 0x1000
UART_SPI = 1
UART_INTID = 32 + UART_SPI
UART_CLOCK_HZ = 24_000_000

DR, RSR, FR, ILPR, IBRD = 0x00, 0x04, 0x18, 0x20, 0x24
FBRD, LCR_H, CR, IFLS = 0x28, 0x2C, 0x30, 0x34
IMSC, RIS, MIS, ICR, DMACR = 0x38, 0x3C, 0x40, 0x44, 0x48
FR_RXFE, FR_TXFF, FR_RXFF, FR_TXFE = 1 << 4, 1 << 5, 1 << 6, 1 << 7
INT_RX, INT_TX, INT_RT = 1 << 4, 1 << 5, 1 << 6
RX_FIFO = 32
PRIMECELL_ID = {0xFE0: 0x11, 0xFE4: 0x10, 0xFE8: 0x14, 0xFEC: 0x00,
                0xFF0: 0x0D, 0xFF4: 0xF0, 0xFF8: 0x05, 0xFFC: 0xB1}


class Pl011:
    def __init__(self, out: IO[str] | None = None, echo_raw: IO[bytes] | None = None):
        self.out = out
        self.raw = echo_raw
        self.buffer = bytearray()
        self.rx: deque[int] = deque()
        self.pending_input: deque[int] = deque()  # beyond the FIFO
        self.tx_raised = False
        self.regs = {IBRD: 0, FBRD: 0, LCR_H: 0, CR: 0x300, IFLS: 0x12, IMSC: 0, DMACR: 0}
        self.listeners: list[Callable[[str], object]] = []  # called with each output line
        self._line = bytearray()

    # -- the host side ------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        self.pending_input.extend(data)
        self._refill()

    def _refill(self) -> None:
        while self.pending_input and len(self.rx) < RX_FIFO:
            self.rx.append(self.pending_input.popleft())

    @property
    def ris(self) -> int:
        return (INT_RX if self.rx else 0) | (INT_TX if self.tx_raised else 0)

    @property
    def line(self) -> bool:
        return bool(self.ris & self.regs[IMSC])

    # -- MMIO --------------------------------------------------------------------------
    def read(self, offset: int) -> int:
        if offset == DR:
            if not self.rx:
                return 0
            b = self.rx.popleft()
            self._refill()
            return b
        if offset == FR:
            full = FR_RXFF if len(self.rx) >= RX_FIFO else 0
            return FR_TXFE | (0 if self.rx else FR_RXFE) | full
        if offset == RIS:
            return self.ris
        if offset == MIS:
            return self.ris & self.regs[IMSC]
        if offset in self.regs:
            return self.regs[offset]
        return PRIMECELL_ID.get(offset, 0)

    def write(self, offset: int, data: int) -> None:
        if offset == DR:
            b = data & 0xFF
            self.buffer.append(b)
            self.tx_raised = True
            if self.out is not None:
                self.out.write(chr(b))
                if b == 0x0A:
                    self.out.flush()
            if b == 0x0A:
                line = self._line.decode(errors="replace")
                self._line.clear()
                for f in self.listeners:
                    f(line)
            else:
                self._line.append(b)
        elif offset == ICR:
            if data & INT_TX:
                self.tx_raised = False
        elif offset in self.regs:
            self.regs[offset] = data & 0xFFFF

    def partial_line(self) -> str:
        return self._line.decode(errors="replace")
