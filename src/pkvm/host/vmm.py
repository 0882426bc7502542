"""A small VMM (the userspace side, like kvmtool or QEMU): loads an image, runs the vCPUs,
emulates a PL011-like UART, and reports what happened.

    vmm = Vmm(machine.host, image, memory="64M", vcpus=2, protected=True)
    summary = vmm.run(out=sys.stdout)

Guest map (QEMU virt): RAM from IPA 0x4000_0000 (the image at its start, entered at its first
byte at EL1h with the MMU off, x0 = 0), PL011 at 0x0900_0000 (data register at +0, flag register
at +0x18 reading 0x90: transmit FIFO empty, receive FIFO empty; PrimeCell IDs at +0xFE0).
Other MMIO reads give 0 and writes are dropped. vCPU 0 starts; the others wait for PSCI CPU_ON.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from pkvm.host.kvm import GUEST_RAM_IPA, HostVcpu, HostVm
from pkvm.host.vcpu_run import VcpuExit, VcpuRunner

if TYPE_CHECKING:
    from pkvm.host.host import Host

UART_BASE = 0x0900_0000
UART_SIZE = 0x1000
UART_DR = 0x00
UART_FR = 0x18
UART_FR_IDLE = 0x90
PL011_IDS = {0xFE0: 0x11, 0xFE4: 0x10, 0xFE8: 0x14, 0xFEC: 0x00,
             0xFF0: 0x0D, 0xFF4: 0xF0, 0xFF8: 0x05, 0xFFC: 0xB1}


@dataclass
class RunSummary:
    """How a guest's run went."""

    reason: str  # "shutdown", "reset", "all vCPUs off", "fail: …", "limit"
    exits: dict[str, int] = field(default_factory=dict)
    pages_mapped: int = 0
    seconds: float = 0.0
    console: str = ""
    mmio_reads: int = 0
    mmio_writes: int = 0

    @property
    def ok(self) -> bool:
        return self.reason in ("shutdown", "reset")


class Pl011:
    """Enough of a PL011 for a guest that polls: a byte per data-register write."""

    def __init__(self, out: IO[str] | None):
        self.out = out
        self.buffer = bytearray()

    def write(self, offset: int, data: int) -> None:
        if offset == UART_DR:
            self.buffer.append(data & 0xFF)
            if self.out is not None:
                self.out.write(chr(data & 0xFF))
                if data & 0xFF == 0x0A:
                    self.out.flush()

    def read(self, offset: int) -> int:
        if offset == UART_FR:
            return UART_FR_IDLE
        return PL011_IDS.get(offset, 0)


class Vmm:
    def __init__(self, host: "Host", image: bytes, memory: int | str = "64M", vcpus: int = 1,
                 protected: bool = False, out: IO[str] | None = None):
        self.host = host
        self.vm: HostVm = host.create_vm(vcpus=vcpus, protected=protected, memory=memory)
        if len(image) > self.vm.memory:
            raise ValueError(f"the image ({len(image)} bytes) does not fit in guest RAM")
        self.vm.write(GUEST_RAM_IPA, image)
        self.uart = Pl011(out)
        self.summary = RunSummary("running")

    def _mmio(self, vcpu: HostVcpu | VcpuRunner, ex: VcpuExit) -> None:
        s = self.summary
        if UART_BASE <= ex.addr < UART_BASE + UART_SIZE:
            off = ex.addr - UART_BASE
            if ex.write:
                self.uart.write(off, ex.data)
            else:
                vcpu.complete_mmio(self.uart.read(off))
        elif not ex.write:
            vcpu.complete_mmio(0)
        if ex.write:
            s.mmio_writes += 1
        else:
            s.mmio_reads += 1

    def run(self, max_exits: int | None = None,
            progress: Callable[[int], None] | None = None) -> RunSummary:
        """Run the vCPUs round-robin until the guest powers off (or fails); `progress(exits)`
        is called every 256 exits (a display's live count)."""
        s = self.summary
        t0 = time.perf_counter()
        exits = 0
        vcpus = self.vm.vcpus
        runners = [v.runner for v in vcpus]
        counts = s.exits
        try:
            while True:
                # each vCPU's KVM_RUN (`HostVcpu.run` is its runner's `run`)
                runnable = [r for r in runners if not r.power_off]
                if not runnable:
                    s.reason = "all vCPUs off"
                    break
                stop = None
                for runner in runnable:
                    ex = runner.run()
                    exits += 1
                    if progress is not None and not exits & 0xFF:
                        progress(exits)
                    kind = ex.kind
                    counts[kind] = counts.get(kind, 0) + 1
                    if kind == "mmio":
                        self._mmio(runner, ex)
                    elif kind == "system_event":
                        stop = ex.event
                    elif kind == "sysreg":
                        runner.inject_undef()
                    elif kind == "hung":
                        stop = f"hung: {ex.detail}"
                    elif kind == "fail":
                        stop = f"fail: {ex.detail} (esr {ex.esr:#x}, addr {ex.addr:#x})"
                    if stop:
                        break
                if stop:
                    s.reason = stop
                    break
                if max_exits is not None and exits >= max_exits:
                    s.reason = "limit"
                    break
        finally:
            s.seconds = time.perf_counter() - t0
            s.console = self.uart.buffer.decode(errors="replace")
            s.pages_mapped = len(self.vm.mapped)
            for v in vcpus:
                for k, n in v.runner.exits.items():
                    if k in ("stage2_fault", "hvc", "smc"):
                        s.exits[k] = s.exits.get(k, 0) + n
        return s

    def destroy(self) -> None:
        self.vm.destroy()


def run_image(host: Host, image: bytes, out: IO[str] | None = sys.stdout,
              **kw: Any) -> RunSummary:
    vmm = Vmm(host, image, out=out, **kw)
    try:
        return vmm.run()
    finally:
        vmm.destroy()
