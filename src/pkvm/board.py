"""The board: RAM, CPUs, the hyp at EL2 and the host at EL1, wired as the hardware wires them.

`Machine` is the object a user holds. It owns the physical memory and each CPU's EL2 registers,
boots the hyp the way Linux does (the host reserves a carve-out, calls `__pkvm_init`, then
`__pkvm_prot_finalize` on every CPU) and offers the two doors between the worlds: the HVC
instruction (`hvc`) and the host's memory accesses, which the hardware checks against the host
stage-2 and, on a fault, hands to the hyp's abort handler.
"""

from __future__ import annotations

import collections
import json
import time
from dataclasses import dataclass
from typing import IO, Any

from pkvm.abi import sizes
from pkvm.abi.profiles import ALL_HCALL_NAMES, Profile, get_profile
from pkvm.errors import EPERM, HostDataAbort, HypPanic
from pkvm.host import Host
from pkvm.hyp.hyp_main import handle_host_hcall
from pkvm.hyp.mem_protect import handle_host_mem_abort
from pkvm.hyp.panic import HypBug
from pkvm.hyp.state import HypState, new_hyp_state
from pkvm.machine.memory import (
    MMIO_BASE,
    MMIO_END,
    PAGE_SHIFT,
    PAGE_SIZE,
    RAM_BASE,
    PhysMemory,
    Region,
    parse_size,
)
from pkvm.machine.mmu import FAULT_PERMISSION, HCR_VM, El2Regs, s2_translate

U64 = 0xFFFF_FFFF_FFFF_FFFF
MIN_MEMORY = 64 << 20
CARVEOUT_GAP_BELOW_END = 6 << 20


def _s64(v: int) -> int:
    v &= U64
    return v - (1 << 64) if v >> 63 else v


@dataclass(frozen=True)
class HvcResult:
    """The registers the host sees after an HVC: x0 (SMCCC status) and x1 signed, x2/x3 raw."""

    x0: int
    x1: int
    x2: int
    x3: int

    @property
    def ok(self) -> bool:
        return self.x0 == 0 and self.x1 == 0


@dataclass
class TraceRecord:
    seq: int
    cpu: int
    name: str
    func_id: int
    args: tuple[int, ...]
    x0: int
    x1: int
    x2: int
    x3: int
    start_ns: int
    duration_ns: int
    panic: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq, "cpu": self.cpu, "call": self.name, "func_id": self.func_id,
            "args": list(self.args), "x0": self.x0, "x1": self.x1, "x2": self.x2, "x3": self.x3,
            "start_ns": self.start_ns, "duration_ns": self.duration_ns, "panic": self.panic,
        }


def carveout_layout(mem_size: int, profile: Profile, nr_cpus: int) -> tuple[int, int]:
    """(base, size) of the hyp carve-out the host reserves (`kvm_hyp_reserve`, model placement).

    Size: the summed terms rounded up to 2 MiB (plus 2 MiB if the model's hyp image does not fit
    in the rounding slack); it ends 6 MiB below the end of RAM."""
    from pkvm.hyp.setup import hyp_image_pages

    regions = [(RAM_BASE, mem_size)]
    pages = sizes.kvm_hyp_reserve_pages(regions, profile.hyp_page_size)
    size = (pages << PAGE_SHIFT) + sizes.SZ_2M - 1 & ~(sizes.SZ_2M - 1)
    if size - (pages << PAGE_SHIFT) < hyp_image_pages(nr_cpus) << PAGE_SHIFT:
        size += sizes.SZ_2M
    base = RAM_BASE + mem_size - CARVEOUT_GAP_BELOW_END - size
    return base, size


class HostPort:
    """All the host (EL1) can do to the rest of the machine: HVC, and memory accesses that the
    hardware checks against the host stage-2. The host holds this, never the machine."""

    __slots__ = ("_m",)

    def __init__(self, machine: "Machine"):
        self._m = machine

    def hvc(self, cpu: int, func: str | int, *args: int) -> HvcResult:
        return self._m.hvc(cpu, func, *args)

    def read(self, cpu: int, pa: int, n: int) -> bytes:
        m = self._m
        spans = self._translate(cpu, pa, n, False)
        return b"".join(m.mem.read(out, k) if out is not None else bytes(k) for out, k in spans)

    def write(self, cpu: int, pa: int, data: bytes) -> None:
        m = self._m
        spans = self._translate(cpu, pa, len(data), True)
        pos = 0
        for out, k in spans:
            if out is not None:
                m.mem.write(out, data[pos : pos + k])
            pos += k

    def zero(self, cpu: int, pa: int, n: int) -> None:
        """memset(0) of whole host pages (pages already zero are left untouched)."""
        for out, k in self._translate(cpu, pa, n, True):
            if out is not None:
                self._m.mem.zero(out, k)

    def _translate(self, cpu: int, pa: int, n: int, write: bool) -> list[tuple[int | None, int]]:
        """Check every page of [pa, pa+n) first: a refused access changes nothing."""
        spans = []
        while n > 0:
            k = min(n, PAGE_SIZE - (pa & (PAGE_SIZE - 1)))
            spans.append((self._m.host_translate(cpu, pa, write), k))
            pa += k
            n -= k
        return spans


class Machine:
    """A booted, finalised pKVM machine: `Machine(memory="2G", cpus=4, abi="latest")`.

    `check=True` runs the invariant checker after every hypercall; `trace` keeps every hypercall
    (True), the last N (an int) or none (False); `bugs` switches seeded bugs on
    (`pkvm.check.bugs`); `timeslice` is the number of guest instructions after which the
    physical timer interrupts a running guest (None: run until it exits)."""

    def __init__(
        self,
        memory: int | str = "2G",
        cpus: int = 4,
        abi: str = "latest",
        check: bool = False,
        trace: bool | int = True,
        bugs: tuple[str, ...] | frozenset[str] = (),
        timeslice: int | None = None,
    ):
        size = parse_size(memory)
        if size < MIN_MEMORY or size % PAGE_SIZE:
            raise ValueError(f"memory must be at least 64 MiB and page-aligned, not {memory!r}")
        if not 1 <= cpus <= 64:
            raise ValueError("cpus must be between 1 and 64")
        self.profile = get_profile(abi)
        self.abi = self.profile.name
        self.nr_cpus = cpus
        self.mem = PhysMemory(size)
        self.el2 = [El2Regs() for _ in range(cpus)]
        self._hyp: HypState = new_hyp_state(self.mem, self.profile, self.el2)
        self._hyp.seeded_bugs = frozenset(bugs)
        # The physical timer: a guest is interrupted (ARM_EXCEPTION_IRQ) after this many
        # instructions; None lets it run until it exits by itself.
        self._hyp.guest_timeslice = timeslice  # type: ignore[attr-defined]
        self.carveout = carveout_layout(size, self.profile, cpus)
        if self.carveout[0] < RAM_BASE + (4 << 20):
            raise ValueError(f"memory={memory!r} leaves no room for the hyp carve-out")
        maxlen = None if trace is True else (int(trace) or None)
        self.tracing = bool(trace)
        self.trace: collections.deque[TraceRecord] = collections.deque(maxlen=maxlen)
        self._seq = 0
        self._tlb: dict[tuple[int, int, bool], int] = {}
        self._tlb_gen = -1
        self.listeners: list[Any] = []  # called with each TraceRecord (checkers, UIs)
        self.host = Host(HostPort(self), self.profile, self.nr_cpus, self.mem.base, self.mem.size,
                         self.carveout)
        self._boot()
        from pkvm.inspect import Inspector

        self.inspect = Inspector(self._hyp, self)
        self.checker = None
        if check:
            from pkvm.check import Checker

            self.checker = Checker(self)
            self.listeners.append(self.checker.after_call)

    # -- boot -----------------------------------------------------------------------
    def _boot(self) -> None:
        base, size = self.carveout
        r = self.hvc(0, "__pkvm_init", base, size, self.nr_cpus, 0, 48)
        if r.x0 or r.x1:
            raise RuntimeError(f"__pkvm_init failed: {r}")
        for cpu in range(self.nr_cpus):
            r = self.hvc(cpu, "__pkvm_prot_finalize")
            if r.x0 or r.x1:
                raise RuntimeError(f"__pkvm_prot_finalize failed on cpu {cpu}: {r}")

    # -- the HVC instruction ---------------------------------------------------------
    def func_id(self, func: str | int) -> int:
        if isinstance(func, str):
            n = self.profile.func_id(func)
            if n is not None:
                return n
            if func not in ALL_HCALL_NAMES:
                raise ValueError(f"{func!r} is not a host hypercall of Linux 6.12 or 7.2")
            return 0xC600_0000 + 0xFFFF  # named in the other profile only: unknown here
        if not isinstance(func, int):
            raise TypeError("func must be a hypercall name or a function ID")
        return func & U64

    def hvc(self, cpu: int, func: str | int, *args: int) -> HvcResult:
        """Issue `hvc #0` on `cpu` with x0 = func and x1.. = args (each a 64-bit register)."""
        if not isinstance(cpu, int) or not 0 <= cpu < self.nr_cpus:
            raise ValueError(f"cpu must be in 0..{self.nr_cpus - 1}")
        if len(args) > 6:
            raise TypeError("at most 6 arguments (x1..x6)")
        for a in args:
            if not isinstance(a, int):
                raise TypeError(f"hypercall arguments are integers, not {type(a).__name__}")
        h = self._hyp
        if h.dead:
            raise HypPanic(h.dead, cpu, None)
        x0 = self.func_id(func)
        regs = self.el2[cpu].host_regs
        regs[0] = x0
        for i in range(1, 7):
            regs[i] = args[i - 1] & U64 if i <= len(args) else 0
        h.locks.cpu = cpu
        t0 = time.perf_counter_ns()
        name: str | None = None
        try:
            name = handle_host_hcall(h, regs)
        except HypBug as bug:
            n = self.profile.decode(x0)
            cname = self.profile.hcalls[n] if n is not None else hex(x0)
            h.dead = str(bug)
            rec = self._record(cpu, cname, x0, args, regs, t0, str(bug))
            self._notify(rec)
            raise HypPanic(str(bug), cpu, cname) from None
        result = HvcResult(_s64(regs[0]), _s64(regs[1]), regs[2], regs[3])
        if self.tracing or self.listeners:
            rec = self._record(cpu, name or hex(x0), x0, args, regs, t0, None)
            self._notify(rec)
        return result

    def _record(self, cpu: int, name: str, x0: int, args: tuple[int, ...], regs: list[int],
                t0: int, panic: str | None) -> TraceRecord:
        self._seq += 1
        rec = TraceRecord(self._seq, cpu, name, x0, tuple(a & U64 for a in args),
                          _s64(regs[0]), _s64(regs[1]), regs[2], regs[3], t0,
                          time.perf_counter_ns() - t0, panic)
        if self.tracing:
            self.trace.append(rec)
        return rec

    def _notify(self, rec: TraceRecord) -> None:
        for fn in self.listeners:
            fn(rec)

    def write_trace(self, out: IO[str] | str) -> None:
        """Write the hypercall trace as JSON Lines."""
        if isinstance(out, str):
            with open(out, "w") as f:
                self.write_trace(f)
            return
        for rec in self.trace:
            out.write(json.dumps(rec.as_dict()) + "\n")

    # -- the host's memory accesses, through the host stage-2 --------------------------
    def host_translate(self, cpu: int, pa: int, write: bool) -> int | None:
        """PA the host reaches at `pa` (its IPA), faulting into the hyp as needed.

        Returns None for MMIO (no device answers), raises HostDataAbort where the hyp refuses."""
        h = self._hyp
        if h.dead:
            raise HypPanic(h.dead, cpu, None)
        if not 0 <= pa < 1 << 48:
            raise ValueError(f"host address {pa:#x} is beyond the 48-bit physical address space")
        el2 = self.el2[cpu]
        # The host's TLB: translations stay valid until the hyp writes the host stage-2 (it
        # invalidates after every change). It only holds what a walk succeeded on.
        gen = h.host_mmu.pgt.gen if h.host_mmu is not None else -1
        if self._tlb_gen != gen:
            self._tlb.clear()
            self._tlb_gen = gen
        key = (cpu, pa >> 12, write)
        hit = self._tlb.get(key)
        if hit is not None:
            return hit + (pa & 0xFFF) if hit >= 0 else None
        for _attempt in range(4):
            if not el2.hcr_el2 & HCR_VM:
                out = pa
                break
            out, fault = s2_translate(self.mem, el2.vttbr_el2, pa, write)
            if fault is None:
                if el2.hcr_el2 & HCR_VM:
                    ram = self.mem.is_ram(out)
                    self._tlb[key] = (out & ~0xFFF) if ram else -1
                break
            h.locks.cpu = cpu
            try:
                ret = handle_host_mem_abort(h, pa & ~(PAGE_SIZE - 1))
            except HypBug as bug:
                h.dead = str(bug)
                raise HypPanic(str(bug), cpu, "host abort") from None
            if ret == -EPERM or (ret and fault.kind == FAULT_PERMISSION):
                self._host_abort(pa, write)
        else:
            raise HypPanic("host stage-2 fault does not resolve", cpu, "host abort")
        return out if self.mem.is_ram(out) else None

    def _host_abort(self, pa: int, write: bool) -> None:
        fatal = self.profile.host_abort_fatal
        if fatal:
            self._hyp.dead = f"BUG: host access to {pa:#x} refused by the host stage-2"
        raise HostDataAbort(pa, write, fatal)

    # -- the physical map ----------------------------------------------------------------
    def memory_map(self) -> list[Region]:
        base, size = self.carveout
        return [
            Region("mmio", MMIO_BASE, MMIO_END, MMIO_END - MMIO_BASE),
            Region("ram", RAM_BASE, self.mem.end, self.mem.size),
            Region("hyp", base, base + size, size),
        ]

    @property
    def dead(self) -> str | None:
        return self._hyp.dead


def machine_for(guest_memory: int, vcpus: int, abi: str = "latest",
                timeslice: int | float | None = None) -> Machine:
    """A machine sized for a Linux guest of `guest_memory` bytes and `vcpus` vCPUs.

    One vCPU runs until it exits (Linux exits often: console, timer, GIC, WFI). Several need
    the host's timer to preempt a vCPU that spins waiting for another: by default a wall-clock
    slice of `LINUX_SLICE` seconds (`pkvm.machine.preempt`, free per instruction), or, where
    this unicorn build cannot stop precisely, 2,000,000 instructions (unicorn counts every
    instruction then, ~4x slower). `timeslice` overrides either (an int: instructions)."""
    if vcpus > 1 and not timeslice:
        from pkvm.machine import preempt

        timeslice = LINUX_SLICE if preempt.available() else 2_000_000
    machine_mem = 2 * guest_memory + (256 << 20)
    return Machine(memory=machine_mem, cpus=max(2, vcpus), abi=abi, trace=False,
                   timeslice=timeslice)  # type: ignore[arg-type]


LINUX_SLICE = 0.005  # issue 14: seconds a vCPU runs before the host's timer preempts it
