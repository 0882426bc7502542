"""A GICv3 as the guest sees it: distributor, redistributors and the CPU interface.

The VMM owns it, as QEMU or kvmtool own an emulated GIC: distributor and redistributor
registers arrive as MMIO exits, the CPU interface (`ICC_*` system registers) as system-register
exits, and the devices drive interrupt lines with `set_level()` / `raise_edge()`. After any
change the VMM asks `irq_pending(cpu)` and raises or lowers that vCPU's virtual IRQ.

Modelled: SGIs (0-15, via ICC_SGI1R_EL1), PPIs (16-31) banked per vCPU, SPIs (32..), enable,
pending, active, priority with the running priority and PMR, level and edge triggers, affinity
routing (IROUTER, 1-of-N as "the first vCPU"), a single security state, group 1 only (group 0
reads as spurious), EOImode 0 and 1, no LPIs/ITS.

The VMM asks `irq_pending` after every exit (~46,000 times while Linux boots) and the answer
changes rarely, so the highest-priority pending interrupt of each vCPU is cached: every method
that changes an interrupt or a CPU interface (`set_level` when the line moves, `sysreg_write`,
an `ICC_IAR1_EL1` read, `mmio_write`) bumps `version`, which drops the cache. The Irq and
CpuIf objects are changed only through those methods.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

GICD_BASE = 0x0800_0000
GICD_SIZE = 0x1_0000
GICR_BASE = 0x080A_0000
GICR_STRIDE = 0x2_0000  # RD_base + SGI_base frames per vCPU
SGI_FRAME = 0x1_0000

INTID_SPURIOUS = 1023
NR_PRIVATE = 32
PRI_BITS = 5
PRI_MASK = (0xFF << (8 - PRI_BITS)) & 0xFF
IDLE_PRIORITY = 0x100

# Distributor / SGI-frame register offsets (GICD_*, GICR_* in the Linux header names).
GICD_CTLR, GICD_TYPER, GICD_IIDR, GICD_TYPER2, GICD_STATUSR = 0x0, 0x4, 0x8, 0xC, 0x10
GICD_IGROUPR, GICD_ISENABLER, GICD_ICENABLER = 0x080, 0x100, 0x180
GICD_ISPENDR, GICD_ICPENDR, GICD_ISACTIVER, GICD_ICACTIVER = 0x200, 0x280, 0x300, 0x380
GICD_IPRIORITYR, GICD_ICFGR, GICD_IGRPMODR, GICD_IROUTER = 0x400, 0xC00, 0xD00, 0x6000
GICD_PIDR2 = 0xFFE8
GICD_CTLR_RWP = 1 << 31
GICR_CTLR, GICR_IIDR, GICR_TYPER, GICR_WAKER = 0x0, 0x4, 0x8, 0x14
GICR_WAKER_ProcessorSleep, GICR_WAKER_ChildrenAsleep = 1 << 1, 1 << 2
GICR_TYPER_LAST = 1 << 4
PIDR2_ARCH_GICV3 = 0x3B
IIDR_ARM = 0x43B

# ICC_* system registers: (op0, op1, CRn, CRm, op2).
ICC_PMR_EL1 = (3, 0, 4, 6, 0)
ICC_IAR0_EL1, ICC_EOIR0_EL1, ICC_HPPIR0_EL1, ICC_BPR0_EL1 = ((3, 0, 12, 8, i) for i in range(4))
ICC_AP0R = {(3, 0, 12, 8, 4 + i) for i in range(4)}
ICC_AP1R = {(3, 0, 12, 9, i) for i in range(4)}
ICC_DIR_EL1, ICC_RPR_EL1 = (3, 0, 12, 11, 1), (3, 0, 12, 11, 3)
ICC_SGI1R_EL1, ICC_ASGI1R_EL1, ICC_SGI0R_EL1 = ((3, 0, 12, 11, i) for i in (5, 6, 7))
ICC_IAR1_EL1, ICC_EOIR1_EL1, ICC_HPPIR1_EL1, ICC_BPR1_EL1 = ((3, 0, 12, 12, i) for i in range(4))
ICC_CTLR_EL1, ICC_SRE_EL1, ICC_IGRPEN0_EL1, ICC_IGRPEN1_EL1 = (
    (3, 0, 12, 12, i) for i in range(4, 8)
)
ICC_CTLR_EOIMODE = 1 << 1
ICC_CTLR_RO = ((PRI_BITS - 1) << 8) | (1 << 15)  # PRIbits, A3V; IDbits 0 = 16 bits
ICC_SRE_VALUE = 0x7  # SRE, DFB, DIB


def is_gic_sysreg(enc: tuple[int, int, int, int, int]) -> bool:
    return enc == ICC_PMR_EL1 or (enc[0] == 3 and enc[1] == 0 and enc[2] == 12)


@dataclass(slots=True)
class Irq:
    intid: int
    enabled: bool = False
    latch: bool = False  # pending by edge / ISPENDR / SGI
    line: bool = False  # the input level (level-triggered)
    active: bool = False
    edge: bool = False
    priority: int = 0
    group1: bool = False
    route: int = 0  # SPIs: target vCPU index

    @property
    def pending(self) -> bool:
        return self.latch or (self.line and not self.edge)


@dataclass
class CpuIf:
    pmr: int = 0
    bpr1: int = 0
    ctlr: int = 0
    igrpen1: bool = False
    waker: int = GICR_WAKER_ProcessorSleep | GICR_WAKER_ChildrenAsleep
    ap: dict[tuple[int, int, int, int, int], int] = field(default_factory=dict)
    active: list[tuple[int, int]] = field(default_factory=list)  # (priority, intid) stack

    @property
    def running_priority(self) -> int:
        return min((p for p, _ in self.active), default=IDLE_PRIORITY)


class Gic:
    def __init__(self, nr_cpus: int, nr_irqs: int = 128):
        self.nr_cpus = nr_cpus
        self.nr_irqs = nr_irqs
        self.private = [[Irq(i, edge=i < 16) for i in range(NR_PRIVATE)] for _ in range(nr_cpus)]
        for bank in self.private:  # SGIs are always enabled-edge in GICv3; PPIs per ICFGR
            for irq in bank[:16]:
                irq.edge = True
        self.spis = [Irq(i) for i in range(NR_PRIVATE, nr_irqs)]
        self.cpus = [CpuIf() for _ in range(nr_cpus)]
        self.ctlr = 0
        self.stats: dict[str, int] = {}
        self.version = 0  # bumped by every change that can move an interrupt's delivery
        self._cached: list[tuple[int, Irq | None]] = [(-1, None)] * nr_cpus  # (version, best)

    # -- lines from devices --------------------------------------------------------------
    def irq(self, cpu: int, intid: int) -> Irq:
        return self.private[cpu][intid] if intid < NR_PRIVATE else self.spis[intid - NR_PRIVATE]

    def set_level(self, intid: int, level: bool, cpu: int = 0) -> None:
        irq = self.irq(cpu, intid)
        if irq.line == level:
            return  # no edge, no level change: nothing to deliver differently
        if irq.edge and level:
            irq.latch = True
        irq.line = level
        self.version += 1

    def _target(self, irq: Irq, cpu: int) -> bool:
        return irq.intid < NR_PRIVATE or irq.route == cpu

    def _best(self, cpu: int) -> Irq | None:
        """The highest-priority pending interrupt `cpu` could take (cached per `version`)."""
        version, best = self._cached[cpu]
        if version != self.version:
            best = self._find_best(cpu)
            self._cached[cpu] = (self.version, best)
        return best

    def _find_best(self, cpu: int) -> Irq | None:
        c = self.cpus[cpu]
        if not c.igrpen1 or not self.ctlr & 0x2:  # EnableGrp1NS
            return None
        best: Irq | None = None
        for irq in self.private[cpu]:
            if irq.enabled and irq.pending and not irq.active:
                if best is None or irq.priority < best.priority:
                    best = irq
        for irq in self.spis:
            if irq.enabled and irq.pending and not irq.active and irq.route == cpu:
                if best is None or irq.priority < best.priority:
                    best = irq
        return best

    def _deliverable(self, cpu: int) -> Irq | None:
        best = self._best(cpu)
        c = self.cpus[cpu]
        if best is None or best.priority >= (c.pmr & PRI_MASK) or (
            best.priority >= c.running_priority
        ):
            return None
        return best

    def irq_pending(self, cpu: int) -> bool:
        """Whether vCPU `cpu`'s IRQ line is asserted (what sets HCR_EL2.VI)."""
        return self._deliverable(cpu) is not None

    # -- the CPU interface ------------------------------------------------------------------
    def sysreg_read(self, cpu: int, enc: tuple[int, int, int, int, int]) -> int:
        c = self.cpus[cpu]
        if enc == ICC_IAR1_EL1:
            intid = self._acknowledge(cpu)
            self.version += 1  # after: the acknowledgement itself looked the cache up
            return intid
        if enc == ICC_HPPIR1_EL1:
            best = self._best(cpu)
            return INTID_SPURIOUS if best is None else best.intid
        if enc == ICC_PMR_EL1:
            return c.pmr
        if enc == ICC_CTLR_EL1:
            return ICC_CTLR_RO | (c.ctlr & (ICC_CTLR_EOIMODE | 1))
        if enc == ICC_SRE_EL1:
            return ICC_SRE_VALUE
        if enc == ICC_IGRPEN1_EL1:
            return int(c.igrpen1)
        if enc == ICC_BPR1_EL1:
            return c.bpr1
        if enc == ICC_RPR_EL1:
            rp = c.running_priority
            return 0xFF if rp == IDLE_PRIORITY else rp
        if enc in ICC_AP0R or enc in ICC_AP1R:
            return c.ap.get(enc, 0)
        if enc in (ICC_IAR0_EL1, ICC_HPPIR0_EL1):
            return INTID_SPURIOUS
        return 0

    def sysreg_write(self, cpu: int, enc: tuple[int, int, int, int, int], value: int) -> None:
        c = self.cpus[cpu]
        self.version += 1
        if enc == ICC_EOIR1_EL1:
            self._eoi(cpu, value & 0xFFFFFF)
        elif enc == ICC_DIR_EL1:
            self._deactivate(cpu, value & 0xFFFFFF)
        elif enc == ICC_PMR_EL1:
            c.pmr = value & PRI_MASK
        elif enc == ICC_CTLR_EL1:
            c.ctlr = value & (ICC_CTLR_EOIMODE | 1)
        elif enc == ICC_IGRPEN1_EL1:
            c.igrpen1 = bool(value & 1)
        elif enc == ICC_BPR1_EL1:
            c.bpr1 = value & 7
        elif enc in (ICC_SGI1R_EL1, ICC_ASGI1R_EL1):
            self._sgi(cpu, value)
        elif enc in ICC_AP0R or enc in ICC_AP1R:
            c.ap[enc] = value & 0xFFFF_FFFF
        # ICC_SRE_EL1 (fixed), group 0 registers, ICC_SGI0R_EL1: ignored

    def _acknowledge(self, cpu: int) -> int:
        irq = self._deliverable(cpu)
        if irq is None:
            return INTID_SPURIOUS
        irq.active = True
        if irq.edge or irq.latch:
            irq.latch = False
        self.cpus[cpu].active.append((irq.priority, irq.intid))
        self.stats["acks"] = self.stats.get("acks", 0) + 1
        return irq.intid

    def _eoi(self, cpu: int, intid: int) -> None:
        c = self.cpus[cpu]
        for i in range(len(c.active) - 1, -1, -1):  # priority drop
            if c.active[i][1] == intid:
                del c.active[i]
                break
        if not c.ctlr & ICC_CTLR_EOIMODE:
            self._deactivate(cpu, intid)

    def _deactivate(self, cpu: int, intid: int) -> None:
        if intid < self.nr_irqs:
            self.irq(cpu, intid).active = False

    def _sgi(self, cpu: int, value: int) -> None:
        intid = (value >> 24) & 0xF
        if value >> 40 & 1:  # IRM: every PE but this one
            targets = [t for t in range(self.nr_cpus) if t != cpu]
        else:
            aff1 = (value >> 16) & 0xFF
            rs = (value >> 44) & 0xF
            if aff1 or (value >> 32) & 0xFF or (value >> 48) & 0xFF:
                return  # our vCPUs all have Aff1-3 = 0
            targets = [16 * rs + b for b in range(16) if value >> b & 1]
        for t in targets:
            if t < self.nr_cpus:
                self.private[t][intid].latch = True

    # -- MMIO -------------------------------------------------------------------------------
    def handles(self, addr: int) -> bool:
        return (GICD_BASE <= addr < GICD_BASE + GICD_SIZE
                or GICR_BASE <= addr < GICR_BASE + GICR_STRIDE * self.nr_cpus)

    def mmio_read(self, addr: int, size: int) -> int:
        if addr < GICD_BASE + GICD_SIZE:
            return self._dist_read(addr - GICD_BASE, size)
        cpu, off = divmod(addr - GICR_BASE, GICR_STRIDE)
        if off >= SGI_FRAME:
            return self._bank_read(self.private[cpu], 0, off - SGI_FRAME, size)
        if off == GICR_TYPER or off == GICR_TYPER + 4:
            typer = (cpu << 32) | (cpu << 8) | (GICR_TYPER_LAST if cpu == self.nr_cpus - 1 else 0)
            val = typer >> (8 * (off - GICR_TYPER))
            return val & ((1 << (8 * size)) - 1)
        if off == GICR_WAKER:
            return self.cpus[cpu].waker
        if off == GICR_IIDR:
            return IIDR_ARM
        if off == GICD_PIDR2:
            return PIDR2_ARCH_GICV3
        return 0

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        self.version += 1
        if addr < GICD_BASE + GICD_SIZE:
            self._dist_write(addr - GICD_BASE, size, value)
            return
        cpu, off = divmod(addr - GICR_BASE, GICR_STRIDE)
        if off >= SGI_FRAME:
            self._bank_write(self.private[cpu], 0, off - SGI_FRAME, size, value)
        elif off == GICR_WAKER:
            sleep = value & GICR_WAKER_ProcessorSleep
            self.cpus[cpu].waker = sleep | (GICR_WAKER_ChildrenAsleep if sleep else 0)

    def _dist_read(self, off: int, size: int) -> int:
        if off == GICD_CTLR:
            return self.ctlr & ~GICD_CTLR_RWP
        if off == GICD_TYPER:
            return ((self.nr_irqs // 32) - 1) | (9 << 19)
        if off == GICD_IIDR:
            return IIDR_ARM
        if off == GICD_PIDR2:
            return PIDR2_ARCH_GICV3
        if GICD_IROUTER + 8 * NR_PRIVATE <= off < GICD_IROUTER + 8 * self.nr_irqs:
            n, part = divmod(off - GICD_IROUTER, 8)
            val = self.spis[n - NR_PRIVATE].route  # Aff0 = vCPU index
            return (val >> (8 * part)) & ((1 << (8 * size)) - 1)
        if off < GICD_IROUTER:
            return self._bank_read(self.spis, NR_PRIVATE, off, size)
        return 0

    def _dist_write(self, off: int, size: int, value: int) -> None:
        if off == GICD_CTLR:
            self.ctlr = value & ~GICD_CTLR_RWP
        elif GICD_IROUTER + 8 * NR_PRIVATE <= off < GICD_IROUTER + 8 * self.nr_irqs:
            n, part = divmod(off - GICD_IROUTER, 8)
            if part == 0:
                irm = (value >> 31) & 1 if size == 8 else 0
                aff0 = value & 0xFF
                self.spis[n - NR_PRIVATE].route = 0 if irm or aff0 >= self.nr_cpus else aff0
        elif off < GICD_IROUTER:
            self._bank_write(self.spis, NR_PRIVATE, off, size, value)

    # Registers with a bit (or 2 bits, or a byte) per interrupt, over a bank of interrupts
    # whose first INTID is `first` (the SGI frame: 0; the distributor: 32, RAZ/WI below).
    @staticmethod
    def _field(off: int) -> tuple[int, int, int] | None:
        """(register base, bits per irq, offset) for a per-irq register range."""
        for base, bits, span in ((GICD_IGROUPR, 1, 0x80), (GICD_ISENABLER, 1, 0x80),
                                 (GICD_ICENABLER, 1, 0x80), (GICD_ISPENDR, 1, 0x80),
                                 (GICD_ICPENDR, 1, 0x80), (GICD_ISACTIVER, 1, 0x80),
                                 (GICD_ICACTIVER, 1, 0x80), (GICD_IPRIORITYR, 8, 0x400),
                                 (GICD_ICFGR, 2, 0x100), (GICD_IGRPMODR, 1, 0x80)):
            if base <= off < base + span:
                return base, bits, off - base
        return None

    def _irqs_at(self, bank: list[Irq], first: int, rel: int, bits: int,
                 size: int) -> Iterator[tuple[int, Irq]]:
        start = rel * 8 // bits
        for k in range(size * 8 // bits):
            n = start + k - first
            if 0 <= n < len(bank):
                yield k, bank[n]

    def _bank_read(self, bank: list[Irq], first: int, off: int, size: int) -> int:
        f = self._field(off)
        if f is None:
            return 0
        base, bits, rel = f
        val = 0
        for k, irq in self._irqs_at(bank, first, rel, bits, size):
            if base == GICD_IPRIORITYR:
                v = irq.priority
            elif base == GICD_ICFGR:
                v = 2 if irq.edge else 0
            elif base == GICD_IGROUPR:
                v = int(irq.group1)
            elif base in (GICD_ISENABLER, GICD_ICENABLER):
                v = int(irq.enabled)
            elif base in (GICD_ISPENDR, GICD_ICPENDR):
                v = int(irq.pending)
            elif base in (GICD_ISACTIVER, GICD_ICACTIVER):
                v = int(irq.active)
            else:
                v = 0
            val |= v << (k * bits)
        return val

    def _bank_write(self, bank: list[Irq], first: int, off: int, size: int, value: int) -> None:
        f = self._field(off)
        if f is None:
            return
        base, bits, rel = f
        mask = (1 << bits) - 1
        for k, irq in self._irqs_at(bank, first, rel, bits, size):
            v = (value >> (k * bits)) & mask
            if base == GICD_IPRIORITYR:
                irq.priority = v & PRI_MASK
            elif base == GICD_ICFGR:
                if irq.intid >= 16:
                    irq.edge = bool(v & 2)
            elif base == GICD_IGROUPR:
                irq.group1 = bool(v)
            elif not v:
                continue
            elif base == GICD_ISENABLER:
                irq.enabled = True
            elif base == GICD_ICENABLER:
                irq.enabled = False
            elif base == GICD_ISPENDR:
                irq.latch = True
            elif base == GICD_ICPENDR:
                irq.latch = False
            elif base == GICD_ISACTIVER:
                irq.active = True
            elif base == GICD_ICACTIVER:
                irq.active = False
