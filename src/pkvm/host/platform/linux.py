"""A VMM for Linux guests: a QEMU-`virt`-like board on the pKVM run path.

    vmm = LinuxVmm(machine.host, kernel, initrd=cpio, memory="256M", vcpus=1, protected=True)
    result = vmm.run(until=lambda: "Run /init" in vmm.uart_text, timeout=120)
    vmm.destroy()

Guest physical map (as QEMU virt): GICv3 distributor 0x0800_0000, redistributors 0x080A_0000
(128 KiB per vCPU), PL011 0x0900_0000 (SPI 1), RAM from 0x4000_0000. The device tree sits at
the start of RAM, the kernel `Image` 2 MiB in (its header's text_offset added), the initramfs
after the kernel's image_size; vCPU 0 enters the Image at EL1h, MMU off, x0 = the DTB.

The run loop is the VMM's KVM_RUN loop: device MMIO and ICC_*/CNTP_* system-register exits
are emulated here, the GIC's output sets each vCPU's virtual IRQ (HCR_EL2.VI, which the hyp
puts in the CPU's HCR_EL2: the CPU takes the IRQ when the guest clears PSTATE.I), and a WFI
with nothing pending parks the vCPU until its timer deadline or console input. One vCPU runs
until it exits (Linux exits often); several are sliced by an instruction budget.
"""

from __future__ import annotations

import atexit
import os
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING

from pkvm.host.kvm import GUEST_RAM_IPA, HostVcpu, HostVm
from pkvm.host.platform import fdt
from pkvm.host.platform.gic import GICD_BASE, GICD_SIZE, GICR_BASE, GICR_STRIDE, Gic, is_gic_sysreg
from pkvm.host.platform.pl011 import (
    UART_BASE,
    UART_CLOCK_HZ,
    UART_INTID,
    UART_SIZE,
    UART_SPI,
    Pl011,
)
from pkvm.host.platform.timer import (
    INTID_PTIMER,
    PPI_PHYS_NS,
    PPI_PHYS_S,
    PhysTimer,
    counter,
    is_timer_sysreg,
)
from pkvm.host.vcpu_run import VcpuExit

if TYPE_CHECKING:
    from pkvm.host.host import Host

MiB = 1 << 20
TURN_SECONDS = 0.005  # several vCPUs: how long one keeps the (single) host thread
# arm64.nosve/nosme: the guest's SVE loads/stores cannot be decoded for a stage-1 fault's FAR
# yet (a fault would reach the guest as an external abort, SIGBUS); see docs/linux.md.
DEFAULT_APPEND = ("console=ttyAMA0 earlycon=pl011,0x09000000 nokaslr rdinit=/init "
                  "arm64.nosve arm64.nosme")
IMAGE_MAGIC = b"ARM\x64"
GIC_SPI, GIC_PPI = 0, 1
IRQ_TYPE_LEVEL_HIGH = 4
PHANDLE_GIC, PHANDLE_CLK = 1, 2


@dataclass(frozen=True)
class Layout:
    ram: int
    ram_size: int
    dtb: int
    kernel: int
    initrd: int
    initrd_size: int


def image_header(kernel: bytes) -> tuple[int, int]:
    """(text_offset, image_size) from an arm64 Image header; ValueError if it is not one."""
    if len(kernel) < 64 or kernel[0x38:0x3C] != IMAGE_MAGIC:
        raise ValueError("not an arm64 Linux Image (no 'ARM\\x64' magic at offset 0x38)")
    text_offset, image_size = struct.unpack_from("<QQ", kernel, 8)
    return text_offset, image_size or len(kernel)


def plan_layout(kernel: bytes, initrd_size: int, memory: int) -> Layout:
    text_offset, image_size = image_header(kernel)
    kernel_at = GUEST_RAM_IPA + 2 * MiB + text_offset
    initrd_at = (kernel_at + image_size + 2 * MiB - 1) & ~(2 * MiB - 1)
    if initrd_at + initrd_size > GUEST_RAM_IPA + memory - 16 * MiB:
        raise ValueError(f"{memory >> 20} MiB of guest RAM is too little for this kernel and "
                         "initramfs: give more with --memory")
    return Layout(GUEST_RAM_IPA, memory, GUEST_RAM_IPA, kernel_at, initrd_at, initrd_size)


def build_dtb(layout: Layout, nr_cpus: int, bootargs: str) -> bytes:
    """The board's device tree (QEMU virt's shape, the devices this VMM emulates)."""
    c = fdt.cells
    root = fdt.Node("")
    root.prop("#address-cells", 2).prop("#size-cells", 2)
    root.prop("compatible", ["linux,dummy-virt"]).prop("model", "pkvm virt")
    root.prop("interrupt-parent", PHANDLE_GIC)
    chosen = root.child("chosen")
    chosen.prop("bootargs", bootargs)
    chosen.prop("stdout-path", f"/pl011@{UART_BASE:x}")
    if layout.initrd_size:
        chosen.prop("linux,initrd-start", fdt.u64(layout.initrd))
        chosen.prop("linux,initrd-end", fdt.u64(layout.initrd + layout.initrd_size))
    mem = root.child(f"memory@{layout.ram:x}")
    mem.prop("device_type", "memory")
    mem.prop("reg", c(layout.ram >> 32, layout.ram, layout.ram_size >> 32, layout.ram_size))
    cpus = root.child("cpus")
    cpus.prop("#address-cells", 1).prop("#size-cells", 0)
    for i in range(nr_cpus):
        cpu = cpus.child(f"cpu@{i}")
        cpu.prop("device_type", "cpu").prop("compatible", ["arm,arm-v8"]).prop("reg", i)
        cpu.prop("enable-method", "psci")
    psci = root.child("psci")
    psci.prop("compatible", ["arm,psci-1.0", "arm,psci-0.2", "arm,psci"]).prop("method", "hvc")
    gic = root.child(f"intc@{GICD_BASE:x}")
    gic.prop("compatible", ["arm,gic-v3"]).prop("#interrupt-cells", 3)
    gic.prop("interrupt-controller").prop("#redistributor-regions", 1)
    gic.prop("reg", c(0, GICD_BASE, 0, GICD_SIZE, 0, GICR_BASE, 0, GICR_STRIDE * nr_cpus))
    gic.prop("phandle", PHANDLE_GIC)
    timer = root.child("timer")
    timer.prop("compatible", ["arm,armv8-timer"])
    # Only the physical timers: unicorn cannot trap the virtual one (see timer.py).
    timer.prop("interrupts", c(GIC_PPI, PPI_PHYS_S, IRQ_TYPE_LEVEL_HIGH,
                               GIC_PPI, PPI_PHYS_NS, IRQ_TYPE_LEVEL_HIGH))
    clk = root.child("apb-pclk")
    clk.prop("compatible", ["fixed-clock"]).prop("#clock-cells", 0)
    clk.prop("clock-frequency", UART_CLOCK_HZ).prop("clock-output-names", ["clk24mhz"])
    clk.prop("phandle", PHANDLE_CLK)
    uart = root.child(f"pl011@{UART_BASE:x}")
    uart.prop("compatible", ["arm,pl011", "arm,primecell"])
    uart.prop("reg", c(0, UART_BASE, 0, UART_SIZE))
    uart.prop("interrupts", c(GIC_SPI, UART_SPI, IRQ_TYPE_LEVEL_HIGH))
    uart.prop("clocks", c(PHANDLE_CLK, PHANDLE_CLK))
    uart.prop("clock-names", ["uartclk", "apb_pclk"])
    return fdt.to_dtb(root)


@dataclass
class LinuxRun:
    """How a run went: why it stopped, times of console milestones, exits by kind."""

    reason: str
    seconds: float = 0.0
    milestones: dict[str, float] = field(default_factory=dict)
    cpu_milestones: dict[str, float] = field(default_factory=dict)  # process CPU time
    exits: dict[str, int] = field(default_factory=dict)
    pages_mapped: int = 0
    console: str = ""

    @property
    def ok(self) -> bool:
        return self.reason in ("shutdown", "reset", "until")


def _sysreg_enc(esr: int) -> tuple[int, int, int, int, int]:
    return ((esr >> 20) & 3, (esr >> 14) & 7, (esr >> 10) & 15, (esr >> 1) & 15, (esr >> 17) & 7)


class LinuxVmm:
    def __init__(self, host: "Host", kernel: bytes, initrd: bytes | None = None, *,
                 memory: int = 256 * MiB, vcpus: int = 1, protected: bool = False,
                 append: str = DEFAULT_APPEND, out: IO[str] | None = None,
                 milestones: tuple[str, ...] = ("Run /init", "pkvm# "), fault_around: int = 64):
        self.layout = plan_layout(kernel, len(initrd or b""), memory)
        self.dtb = build_dtb(self.layout, vcpus, append)
        self.vm: HostVm = host.create_vm(vcpus=vcpus, protected=protected, memory=memory)
        self.vm.fault_around = fault_around
        try:
            self.vm.write(self.layout.dtb, self.dtb)
            self.vm.write(self.layout.kernel, kernel)
            if initrd:
                self.vm.write(self.layout.initrd, initrd)
            boot = self.vm.vcpus[0]
            boot.runner.reset(self.layout.kernel, self.layout.dtb)
        except BaseException:
            self.vm.destroy()
            raise
        self.gic = Gic(vcpus)
        # The host CPU each vCPU's thread runs on (vCPU i on CPU i, as a VMM pins them).
        self.cpu_of = [i % host.nr_cpus for i in range(vcpus)]
        self.timers = [PhysTimer() for _ in range(vcpus)]
        self.uart = Pl011(out)
        self.exits: dict[str, int] = {}
        self.wake = threading.Event()
        self.milestones = milestones
        self.seen: dict[str, float] = {}
        self.seen_cpu: dict[str, float] = {}
        self._t0 = self._c0 = 0.0
        self._scan = ""
        self.input_lines: list[str] = []  # fed one per prompt (non-tty input)
        self.prompt = "# "
        self._fed_at = ""
        self.buffer_mark = 0

    # -- console ------------------------------------------------------------------------
    @property
    def uart_text(self) -> str:
        return self.uart.buffer.decode(errors="replace")

    def _watch_console(self) -> None:
        """Record milestone times; feed the next queued input line at a shell prompt."""
        buf = self.uart.buffer
        tail = buf[-64:].decode(errors="replace")
        for m in self.milestones:
            if m not in self.seen and m in tail:
                self.seen[m] = time.perf_counter() - self._t0
                self.seen_cpu[m] = time.process_time() - self._c0
        last = tail.rsplit("\n", 1)[-1]
        if self.input_lines and self.prompt in last and last != self._fed_at:
            self._fed_at = last
            self.buffer_mark = len(buf)
            self.feed(self.input_lines.pop(0).encode() + b"\n")

    def feed(self, data: bytes) -> None:
        """Console input (from another thread too): wakes a vCPU parked in WFI."""
        self.uart.feed(data)
        self.wake.set()

    # -- exits --------------------------------------------------------------------------
    def _count(self, kind: str) -> None:
        self.exits[kind] = self.exits.get(kind, 0) + 1

    def _mmio(self, vcpu: HostVcpu, ex: VcpuExit) -> None:
        addr = ex.addr
        if UART_BASE <= addr < UART_BASE + UART_SIZE:
            self._count("mmio_uart")
            if ex.write:
                self.uart.write(addr - UART_BASE, ex.data)
                if ex.data in (0x0A, 0x20, 0x6E):  # newline, space, 'n' (ends ESC[6n)
                    self._watch_console()
            else:
                vcpu.complete_mmio(self.uart.read(addr - UART_BASE))
        elif self.gic.handles(addr):
            self._count("mmio_gic")
            if ex.write:
                self.gic.mmio_write(addr, ex.size, ex.data)
            else:
                vcpu.complete_mmio(self.gic.mmio_read(addr, ex.size))
        else:
            self._count("mmio_other")
            if not ex.write:
                vcpu.complete_mmio(0)

    def _sysreg(self, i: int, vcpu: HostVcpu, esr: int) -> None:
        enc = _sysreg_enc(esr)
        r = vcpu.runner
        read = bool(esr & 1)
        if is_gic_sysreg(enc):
            self._count("sysreg_icc")
            if read:
                r.complete_sysreg(esr, self.gic.sysreg_read(i, enc))
            else:
                self.gic.sysreg_write(i, enc, r.complete_sysreg(esr))
        elif is_timer_sysreg(enc):
            self._count("sysreg_timer")
            t = self.timers[i]
            if read:
                r.complete_sysreg(esr, t.read(enc))
            else:
                t.write(enc, r.complete_sysreg(esr))
        else:
            self._count("sysreg_undef")
            r.inject_undef()

    def _update_lines(self) -> None:
        now = counter()
        gic = self.gic
        for i, t in enumerate(self.timers):
            gic.set_level(INTID_PTIMER, t.line(now), cpu=i)
        gic.set_level(UART_INTID, self.uart.line)

    def _turn(self, i: int, parked: list[bool], line: list[bool], n: int) -> str:
        """Run vCPU `i` until it is preempted, waits or stops; with several vCPUs, also until
        its turn (TURN_SECONDS) is over or another vCPU waiting for an interrupt has one
        (an IPI, its timer): that one runs next. Device exits are answered in between."""
        vcpu = self.vm.vcpus[i]
        gic = self.gic
        end = time.perf_counter() + TURN_SECONDS
        cpu = self.cpu_of[i]
        while True:
            pend = gic.irq_pending(i)
            if pend != line[i]:
                vcpu.runner.set_irq_line(pend)
                line[i] = pend
            ex = vcpu.run(cpu)
            kind = ex.kind
            self._count(kind)
            if kind == "mmio":
                self._mmio(vcpu, ex)
            elif kind == "sysreg":
                self._sysreg(i, vcpu, ex.esr)
            elif kind == "wfi":
                self._update_lines()
                if not gic.irq_pending(i):
                    parked[i] = True
                return "running"
            elif kind == "system_event":
                return ex.event
            elif kind == "hung":
                return f"hung: {ex.detail}"
            elif kind == "fail":
                return f"fail: {ex.detail} (esr {ex.esr:#x}, addr {ex.addr:#x})"
            else:  # preempted, cpu_off
                self._update_lines()
                return "running"
            self._update_lines()
            if n == 1:
                return "running"
            if time.perf_counter() > end:
                return "running"
            for j in range(n):
                if j != i and parked[j] and gic.irq_pending(j):
                    self._count("yields")
                    return "running"

    def _sleep(self, active: list[int]) -> None:
        """Every running vCPU waits for an interrupt: sleep until a timer fires or input."""
        deadlines = [d for i in active if (d := self.timers[i].deadline_ns()) is not None]
        wait = 0.25
        if deadlines:
            wait = min(wait, max(0.0, (min(deadlines) - time.monotonic_ns()) / 1e9))
        if wait > 0:
            self._count("sleeps")
            self.wake.wait(wait)
        self.wake.clear()

    # -- the loop -----------------------------------------------------------------------
    def run(self, until: Callable[["LinuxVmm"], bool] | None = None,
            timeout: float | None = None) -> LinuxRun:
        vcpus = self.vm.vcpus
        n = len(vcpus)
        parked = [False] * n
        line = [False] * n
        self._t0 = time.perf_counter()
        self._c0 = time.process_time()
        reason = "running"
        gic = self.gic
        try:
            self._update_lines()  # then after every exit (`_turn`) and every sleep
            while reason == "running":
                on = [i for i in range(n) if not vcpus[i].runner.power_off]
                if not on:
                    reason = "all vCPUs off"
                    break
                ran = False
                for i in on:
                    if parked[i]:
                        if not gic.irq_pending(i):
                            continue
                        parked[i] = False
                    ran = True
                    reason = self._turn(i, parked, line, n)
                    if reason != "running":
                        break
                if reason != "running":
                    break
                if not ran:
                    self._sleep(on)
                    self._update_lines()
                if until is not None and until(self):
                    reason = "until"
                elif timeout is not None and time.perf_counter() - self._t0 > timeout:
                    reason = "timeout"
        finally:
            seconds = time.perf_counter() - self._t0
            self._watch_console()
            for v in vcpus:
                for k, c in v.runner.exits.items():
                    if k in ("stage2_fault", "hvc", "smc"):
                        self.exits[k] = self.exits.get(k, 0) + c
                v.runner.exits.clear()
        return LinuxRun(reason, seconds, dict(self.seen), dict(self.seen_cpu), dict(self.exits),
                        len(self.vm.mapped), self.uart_text)

    def destroy(self) -> None:
        self.vm.destroy()


def stdin_feeder(vmm: LinuxVmm, stream: IO[str] | None = None) -> threading.Thread | None:
    """Console input: a tty is read raw, byte by byte (cbreak); otherwise lines are queued and
    typed one per shell prompt. Returns the reader thread (daemon), if any."""
    stream = stream or sys.stdin
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    if os.isatty(fd):
        import termios  # POSIX only: imported when there is a terminal to put in cbreak mode
        import tty

        old = termios.tcgetattr(fd)
        tty.setcbreak(fd)
        atexit.register(termios.tcsetattr, fd, termios.TCSADRAIN, old)

        def pump() -> None:
            while True:
                b = os.read(fd, 64)
                if not b:
                    return
                vmm.feed(b.replace(b"\n", b"\r"))

        t = threading.Thread(target=pump, daemon=True, name="pkvm-console-in")
        t.start()
        return t
    vmm.input_lines.extend(line.rstrip("\n") for line in stream.readlines())
    return None


