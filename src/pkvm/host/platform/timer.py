"""The Arm generic timer as a vCPU sees it: the counter runs on the host clock, the EL1
physical timer (CNTP_CTL/CVAL/TVAL_EL0) is emulated here and drives PPI 14 (INTID 30).

unicorn 2.1.4 implements the counters (CNTPCT/CNTVCT_EL0 = host monotonic time at CNTFRQ_EL0 =
62.5 MHz, CNTVOFF 0) but its timers are stubs: CNTV_* and CNTP_* registers read as zero and
ignore writes. The hyp therefore traps the EL1 physical timer (CNTHCTL_EL2.EL1PCEN = 0, as KVM
does when it emulates the physical timer) and the device tree offers the guest only the
physical timer's interrupts, so Linux picks it. The virtual timer is not offered.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

CNTFRQ_HZ = 62_500_000
NS_PER_TICK = 16  # 1e9 / CNTFRQ_HZ
CNTP_TVAL_EL0 = (3, 3, 14, 2, 0)
CNTP_CTL_EL0 = (3, 3, 14, 2, 1)
CNTP_CVAL_EL0 = (3, 3, 14, 2, 2)
CTL_ENABLE, CTL_IMASK, CTL_ISTATUS = 1, 2, 4
PPI_PHYS_NS = 14  # INTID 30
PPI_PHYS_S = 13  # INTID 29 (listed in the device tree, never raised)
INTID_PTIMER = 16 + PPI_PHYS_NS
MASK64 = (1 << 64) - 1


def counter() -> int:
    """CNTPCT_EL0 now (what the guest reads)."""
    return time.monotonic_ns() // NS_PER_TICK


def is_timer_sysreg(enc: tuple[int, int, int, int, int]) -> bool:
    return enc in (CNTP_TVAL_EL0, CNTP_CTL_EL0, CNTP_CVAL_EL0)


@dataclass
class PhysTimer:
    ctl: int = 0
    cval: int = 0

    def fired(self, now: int | None = None) -> bool:
        """ISTATUS: enabled and the counter reached CVAL."""
        if not self.ctl & CTL_ENABLE:
            return False
        return (counter() if now is None else now) >= self.cval

    def line(self, now: int | None = None) -> bool:
        """The interrupt output: ISTATUS and not IMASK."""
        return not self.ctl & CTL_IMASK and self.fired(now)

    def deadline_ns(self) -> int | None:
        """Host monotonic ns at which the line rises (None: never, while programmed so)."""
        if not self.ctl & CTL_ENABLE or self.ctl & CTL_IMASK:
            return None
        return self.cval * NS_PER_TICK

    def read(self, enc: tuple[int, int, int, int, int]) -> int:
        now = counter()
        if enc == CNTP_CTL_EL0:
            return (self.ctl & 3) | (CTL_ISTATUS if self.fired(now) else 0)
        if enc == CNTP_CVAL_EL0:
            return self.cval
        tval = (self.cval - now) & 0xFFFF_FFFF
        return tval

    def write(self, enc: tuple[int, int, int, int, int], value: int) -> None:
        if enc == CNTP_CTL_EL0:
            self.ctl = value & 3
        elif enc == CNTP_CVAL_EL0:
            self.cval = value & MASK64
        else:
            tval = value & 0xFFFF_FFFF
            if tval >> 31:
                tval -= 1 << 32
            self.cval = (counter() + tval) & MASK64
