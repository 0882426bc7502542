"""The board: RAM, CPUs, the hyp at EL2 and the host at EL1, wired as the hardware wires them.

`Machine` is the object a user holds. It owns the physical memory and each CPU's EL2 registers,
boots the hyp the way Linux does (the host reserves a carve-out, calls `__pkvm_init`, then
`__pkvm_prot_finalize` on every CPU) and offers the two doors between the worlds: the HVC
instruction (`hvc`) and the host's memory accesses, which the hardware checks against the host
stage-2 and, on a fault, hands to the hyp's abort handler.
"""

from __future__ import annotations

import collections
import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, Final

from pkvm import snapshot
from pkvm.abi import sizes
from pkvm.abi.profiles import Profile, get_profile
from pkvm.check import Checker
from pkvm.door import HvcDoor, _s64
from pkvm.door import HvcResult as HvcResult  # re-exported (users import them from here)
from pkvm.door import TraceRecord as TraceRecord
from pkvm.errors import EPERM, HostDataAbort, HypPanic
from pkvm.host import Host
from pkvm.hyp.hyp_main import handle_host_smc
from pkvm.hyp.mem_protect import handle_host_mem_abort
from pkvm.hyp.panic import HypBug
from pkvm.hyp.pkvm import drop_hyp_vcpus
from pkvm.hyp.psci_relay import init_psci_relay, kvm_hyp_cpu_start
from pkvm.hyp.setup import hyp_image_pages
from pkvm.hyp.state import HypState, new_hyp_state
from pkvm.inspect import Inspector
from pkvm.machine import preempt
from pkvm.machine.firmware import OFF, ON, Firmware, board_mpidr, smc_func_id
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
from pkvm.machine.mmu import (
    FAULT_PERMISSION,
    HCR_VM,
    S2_WALK_FAULT,
    El2Regs,
    tlb_s2_translate_fault,
)
from pkvm.machine.preempt import PreemptionPoints
from pkvm.machine.spmc import Spmc
from pkvm.port import HostPort

U64: Final = 0xFFFF_FFFF_FFFF_FFFF
MIN_MEMORY: Final = 64 << 20
HOST_SECONDARY_ENTRY: Final = 0x4000_0000 + 0x80  # the host kernel's secondary_entry (model address)
CARVEOUT_GAP_BELOW_END: Final = 6 << 20


@dataclass(frozen=True)
class SmcResult:
    """The host's x0..x17 after an SMC (`regs`, raw 64-bit), the path EL2 sent it down
    ("refused", "psci", "ffa", "el3") and whether the calling CPU is now off (CPU_OFF)."""

    regs: tuple[int, ...]
    path: str
    powered_off: bool = False

    @property
    def x0(self) -> int:
        return _s64(self.regs[0])

    @property
    def x1(self) -> int:
        return _s64(self.regs[1])

    @property
    def x2(self) -> int:
        return _s64(self.regs[2])

    @property
    def x3(self) -> int:
        return _s64(self.regs[3])


@dataclass(frozen=True)
class HostAbortRecord:
    """A host stage-2 fault the hyp handled (`handle_host_mem_abort`): `verdict` is "mapped"
    (the hyp mapped the page, the access retried), "refused" (a HostDataAbort) or "retry"."""

    cpu: int
    addr: int
    write: bool
    verdict: str
    ret: int
    ts_ns: int


def carveout_layout(mem_size: int, profile: Profile, nr_cpus: int) -> tuple[int, int]:
    """(base, size) of the hyp carve-out the host reserves (`kvm_hyp_reserve`, model placement).

    Size: the summed terms rounded up to 2 MiB (plus 2 MiB if the model's hyp image does not fit
    in the rounding slack); it ends 6 MiB below the end of RAM."""
    regions = [(RAM_BASE, mem_size)]
    pages = sizes.kvm_hyp_reserve_pages(regions, profile.hyp_page_size)
    size = (pages << PAGE_SHIFT) + sizes.SZ_2M - 1 & ~(sizes.SZ_2M - 1)
    if size - (pages << PAGE_SHIFT) < hyp_image_pages(nr_cpus) << PAGE_SHIFT:
        size += sizes.SZ_2M
    base = RAM_BASE + mem_size - CARVEOUT_GAP_BELOW_END - size
    return base, size


Proceed = Callable[[int, str | int, tuple[int, ...]], HvcResult]
Interposer = Callable[[Proceed, int, str | int, tuple[int, ...]], HvcResult]
SmcProceed = Callable[[int, str | int, tuple[int, ...], int], SmcResult]
SmcInterposer = Callable[[SmcProceed, int, str | int, tuple[int, ...], int], SmcResult]


class Machine:
    """A booted, finalised pKVM machine: `Machine(memory="2G", cpus=4, abi="latest")`.

    `check=True` runs the invariant checker after every hypercall; `trace` keeps every hypercall
    (True), the last N (an int) or none (False); `bugs` switches seeded bugs on
    (`pkvm.check.bugs`); `timeslice` is the number of guest instructions (an int) or the seconds
    of wall-clock time (a float, `pkvm.machine.preempt.run_for`) after which the physical timer
    interrupts a running guest (None: run until it exits)."""

    def __init__(
        self,
        memory: int | str = "2G",
        cpus: int = 4,
        abi: str = "latest",
        check: bool = False,
        trace: bool | int = True,
        bugs: tuple[str, ...] | frozenset[str] = (),
        timeslice: int | float | None = None,
        ffa: bool = False,
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
        # EL3: PSCI for the CPUs (only CPU 0 runs at reset), FF-A when `ffa` (an SPMC).
        spmc = None
        if ffa:
            spmc = Spmc(self.mem)
        self.firmware = Firmware(cpus, self.mem, ffa=spmc)
        self.firmware.on_cpu_start = self._cpu_start
        self.firmware.on_cpu_off = self._cpu_off
        self.host_entry: dict[int, tuple[int, int]] = {}  # where each CPU entered the host
        self._hyp.smc_to_el3 = self.firmware.smc
        # The physical timer: a guest is interrupted (ARM_EXCEPTION_IRQ) after this many
        # instructions; None lets it run until it exits by itself.
        self._hyp.guest_timeslice = timeslice
        self.carveout = carveout_layout(size, self.profile, cpus)
        if self.carveout[0] < RAM_BASE + (4 << 20):
            raise ValueError(f"memory={memory!r} leaves no room for the hyp carve-out")
        maxlen = None if trace is True else (int(trace) or None)
        self.trace: collections.deque[TraceRecord] = collections.deque(maxlen=maxlen)
        self.host_aborts: collections.deque[HostAbortRecord] = collections.deque(maxlen=maxlen)
        self.listeners: list[Callable[[TraceRecord], None]] = []  # after each call (checkers, UIs)
        self._interposers: list[Interposer] = []
        self._door = HvcDoor(self._hyp, self.el2, self.firmware, self.profile, cpus, self.trace,
                             self.listeners, bool(trace), 0, self._interposers, self._interpose)
        self._smc_interposers: list[SmcInterposer] = []
        self._smc_chain: SmcProceed = self._smc
        self.host_port = HostPort(self)  # the host kernel's (`m.host.port`)
        self.host = Host(self.host_port, self.profile, self.nr_cpus, self.mem.base, self.mem.size,
                         self.carveout)
        self._boot()
        self.inspect = Inspector(self._hyp, self)
        self.preemption: PreemptionPoints = self._hyp.locks  # scheduling hooks (checkers)
        self.checker = None
        if check:
            self.checker = Checker(self)
            self.listeners.append(self.checker.after_call)

    # -- boot -----------------------------------------------------------------------
    def _boot(self) -> None:
        """Linux's boot, as far as EL2 sees it: the host probes the firmware (PSCI and SMCCC
        versions, before pKVM traps SMCs) and hands the PSCI relay its config; `__pkvm_init`
        and `__pkvm_prot_finalize` on CPU 0; then each secondary CPU is brought up with a
        PSCI CPU_ON through the relay (it enters EL2 first) and finalised in turn."""
        fw = self.firmware
        probe = [0] * 18
        probe[0] = 0x8400_0000  # PSCI_VERSION
        fw.smc(0, probe)
        psci_version = probe[0]
        probe = [0x8400_000A, 0x8000_0000] + [0] * 16  # PSCI_FEATURES(SMCCC_VERSION)
        fw.smc(0, probe)
        smccc = 0x1_0000
        if probe[0] == 0:
            probe = [0x8000_0000] + [0] * 17
            fw.smc(0, probe)
            smccc = probe[0]
        init_psci_relay(self._hyp, psci_version, smccc,
                        [board_mpidr(c) for c in range(self.nr_cpus)])
        base, size = self.carveout
        r = self.hvc(0, "__pkvm_init", base, size, self.nr_cpus, 0, 48)
        if r.x0 or r.x1:
            raise RuntimeError(f"__pkvm_init failed: {r}")
        self._finalize(0)
        for cpu in range(1, self.nr_cpus):
            s = self.smc(0, 0xC400_0003, board_mpidr(cpu), HOST_SECONDARY_ENTRY, cpu)
            if s.x0 or fw.power[cpu] != ON:
                raise RuntimeError(f"PSCI CPU_ON of cpu {cpu} failed: {s}")
            self._finalize(cpu)

    def _finalize(self, cpu: int) -> None:
        r = self.hvc(cpu, "__pkvm_prot_finalize")
        if r.x0 or r.x1:
            raise RuntimeError(f"__pkvm_prot_finalize failed on cpu {cpu}: {r}")

    # -- CPUs powered on and off by the firmware -----------------------------------------
    def _cpu_start(self, cpu: int, pc: int, ctx: int) -> None:
        """The firmware started `cpu` at `pc`: EL2's entry (through the relay) or the host's."""
        self.el2[cpu].hcr_el2 = self.el2[cpu].vttbr_el2 = self.el2[cpu].vtcr_el2 = 0
        entered = kvm_hyp_cpu_start(self._hyp, cpu, pc, ctx)
        self.host_entry[cpu] = entered if entered is not None else (pc, ctx)

    def _cpu_off(self, cpu: int) -> None:
        """A powered-down CPU loses its EL2 state; it comes back only through CPU_ON."""
        el2 = self.el2[cpu]
        el2.hcr_el2 = el2.vttbr_el2 = el2.vtcr_el2 = 0
        self.host_entry.pop(cpu, None)

    # -- the HVC instruction ---------------------------------------------------------
    @property
    def tracing(self) -> bool:
        """Does the trace keep each call (with its timestamps)?"""
        return self._door.tracing

    @tracing.setter
    def tracing(self, on: bool) -> None:
        self._door.tracing = on

    def func_id(self, func: str | int) -> int:
        return self._door.func_id(func)

    def hvc(self, cpu: int, func: str | int, *args: int) -> HvcResult:
        """Issue `hvc #0` on `cpu` with x0 = func and x1.. = args (each a 64-bit register).

        The call passes through the installed interposers (`interpose_hvc`), outermost first."""
        if self._interposers:
            return self._door.interposed(cpu, func, args)
        return self._door.call(cpu, func, args)  # `_hvc`, one frame less

    def interpose_hvc(self, fn: Interposer) -> None:
        """Wrap every later hypercall in `fn(proceed, cpu, func, args)`, which must return
        `proceed(cpu, func, args)` (it may look at the call before and after, never change
        it): how a checker sees a call's pre-state and a fuzzer logs the calls it issues.
        The last installed runs outermost. The host's own calls go through it too."""
        self._interposers.append(fn)
        # The chain is composed here, the one place the list is written: each interposer
        # bound once to the `proceed` of the ones inside it (the door's call innermost), kept
        # by the door, whose `interposed` both `hvc` and the host port's `hvc` take.
        self._door.interposed = _compose(self._interposers, self._door.call)

    def _interpose(self, cpu: int, func: str | int, args: tuple[int, ...]) -> HvcResult:
        """The installed interposers, outermost first, then the door (the generic way through
        them, as `interpose_hvc`'s composed chain takes it: tests/test_doors.py)."""
        return self._interposed(len(self._interposers) - 1, cpu, func, args)

    def _interposed(self, k: int, cpu: int, func: str | int, args: tuple[int, ...]) -> HvcResult:
        if k < 0:
            return self._hvc(cpu, func, args)
        return self._interposers[k](functools.partial(self._interposed, k - 1), cpu, func, args)

    def _hvc(self, cpu: int, func: str | int, args: tuple[int, ...]) -> HvcResult:
        return self._door.call(cpu, func, args)

    def _check_cpu(self, cpu: int) -> None:
        self._door.check_cpu(cpu)

    # -- the SMC instruction ------------------------------------------------------------
    def smc(self, cpu: int, func: str | int, *args: int, imm: int = 0) -> SmcResult:
        """Issue `smc #imm` on `cpu` from the host: x0 = func (a PSCI/SMCCC/FF-A name or a
        raw function ID), x1.. = args (up to x17). EL2 traps it (HCR_EL2.TSC) and routes it
        as the profile's `handle_host_smc` does; returns the host's x0..x17 afterwards.

        The call passes through the installed interposers (`interpose_smc`), outermost first."""
        if self._smc_interposers:
            return self._smc_chain(cpu, func, args, imm)
        return self._smc(cpu, func, args, imm)

    def interpose_smc(self, fn: SmcInterposer) -> None:
        """As `interpose_hvc`, for the SMC instruction: `fn(proceed, cpu, func, args, imm)`
        must return `proceed(cpu, func, args, imm)`."""
        self._smc_interposers.append(fn)
        self._smc_chain = _compose(self._smc_interposers, self._smc)

    def _smc_interposed(self, k: int, cpu: int, func: str | int, args: tuple[int, ...],
                        imm: int) -> SmcResult:
        if k < 0:
            return self._smc(cpu, func, args, imm)
        return self._smc_interposers[k](functools.partial(self._smc_interposed, k - 1), cpu, func,
                                        args, imm)

    def _smc(self, cpu: int, func: str | int, args: tuple[int, ...], imm: int) -> SmcResult:
        self._check_cpu(cpu)
        if len(args) > 17:
            raise TypeError("at most 17 arguments (x1..x17)")
        if not 0 <= imm <= 0xFFFF:
            raise ValueError("the SMC immediate is 16 bits")
        for a in args:
            if not isinstance(a, int):
                raise TypeError(f"SMC arguments are integers, not {type(a).__name__}")
        h = self._hyp
        if h.dead:
            raise HypPanic(h.dead, cpu, None)
        x0 = smc_func_id(func) if isinstance(func, str) else func & U64
        masked = tuple([a & U64 for a in args])
        regs = [x0, *masked] + [0] * (17 - len(args))
        h.locks.cpu = cpu
        t0 = time.perf_counter_ns()
        try:
            path = handle_host_smc(h, regs, imm)
        except HypBug as bug:
            h.dead = str(bug)
            self._notify(self._record(cpu, f"smc {x0:#x}", x0, masked, regs, t0, str(bug)))
            raise HypPanic(str(bug), cpu, f"smc {x0:#x}") from None
        host = self.el2[cpu].host_regs
        for i in range(18):
            host[i] = regs[i]
        off = self.firmware.power[cpu] == OFF
        if self.tracing or self.listeners:
            self._notify(self._record(cpu, f"smc:{path}:{x0:#x}", x0, masked, regs, t0, None))
        return SmcResult(tuple(regs), path, off)

    def _record(self, cpu: int, name: str, x0: int, args: tuple[int, ...], regs: list[int],
                t0: int, panic: str | None) -> TraceRecord:
        return self._door.record(cpu, name, x0, args, regs, t0, panic)

    def _notify(self, rec: TraceRecord) -> None:
        self._door.notify(rec)

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
        out = self._door.host_hit(cpu, pa, write)  # the TLB's hit or a walk, compiled
        if out != S2_WALK_FAULT:
            return out if out >= 0 else None
        return self.host_translate_slow(cpu, pa, write)

    def host_translate_slow(self, cpu: int, pa: int, write: bool) -> int | None:
        """`host_translate` where the door's `host_hit` said `S2_WALK_FAULT` (the caller asked
        it): the whole generic path, which owes `host_hit` nothing (its own TLB access)."""
        h = self._hyp
        if h.dead:
            raise HypPanic(h.dead, cpu, None)
        if not 0 <= pa < 1 << 48:
            raise ValueError(f"host address {pa:#x} is beyond the 48-bit physical address space")
        el2 = self.el2[cpu]
        if not el2.hcr_el2 & HCR_VM:
            return pa if self.mem.is_ram(pa) else None
        # The host's TLB (the hyp's `host_s2_tlb`): an entry stays until the TLBI the hyp
        # issues; a hit on an entry whose walk the table changed since is checked again.
        tlb, mem, root = h.host_s2_tlb, self.mem, el2.vttbr_el2
        for _attempt in range(4):
            out, kind = tlb_s2_translate_fault(tlb, mem, root, pa, write)  # (one walk)
            if kind is None:
                return out if out >= 0 else None
            h.locks.cpu = cpu
            try:
                ret = handle_host_mem_abort(h, pa & ~(PAGE_SIZE - 1))
            except HypBug as bug:
                h.dead = str(bug)
                raise HypPanic(str(bug), cpu, "host abort") from None
            refused = ret == -EPERM or (ret and kind == FAULT_PERMISSION)
            if self._door.tracing:  # (`self.tracing`)
                verdict = "refused" if refused else "mapped" if ret == 0 else "retry"
                self.host_aborts.append(HostAbortRecord(cpu, pa, write, verdict, ret,
                                                        time.perf_counter_ns()))
            if refused:
                self._host_abort(pa, write)
        raise HypPanic("host stage-2 fault does not resolve", cpu, "host abort")

    def host_translate_range(self, cpu: int, pa: int, n: int,
                             write: bool) -> list[tuple[int | None, int]]:
        """`host_translate` of each page of [pa, pa + n), in order: (PA or None for MMIO,
        bytes of that page in the range). The TLB's hits are taken in compiled code
        (`HvcDoor.host_spans`); a page that needs the hyp (a stage-2 fault, a bad address, a
        dead hyp) goes through `host_translate_slow`, as it would page by page."""
        spans: list[tuple[int | None, int]] = []
        while n > 0:
            pa, n = self._door.host_spans(cpu, pa, n, write, spans)
            if n > 0:
                k = min(n, PAGE_SIZE - (pa & (PAGE_SIZE - 1)))
                spans.append((self.host_translate_slow(cpu, pa, write), k))  # (not a hit)
                pa += k
                n -= k
        return spans

    def _host_abort(self, pa: int, write: bool) -> None:
        fatal = self.profile.host_abort_fatal
        if fatal:
            self._hyp.dead = f"BUG: host access to {pa:#x} refused by the host stage-2"
        raise HostDataAbort(pa, write, fatal)

    # -- the physical map ----------------------------------------------------------------
    def has_observers(self) -> bool:
        """Is anything interposed on the doors, observing the host's stores or scheduling the
        hyp's preemption points?"""
        return bool(self._interposers or self._smc_interposers or self.host_port.observed()
                    or self.preemption.scheduler is not None)

    def snapshot(self) -> bytes:
        """This machine saved as bytes, between two calls (`pkvm.snapshot`: what it holds and
        what it leaves out); `Machine.restore` loads it as a new, independent machine."""
        return snapshot.save(self)

    @staticmethod
    def restore(data: bytes, recycle: Machine | None = None) -> Machine:
        """A machine from `snapshot()`'s bytes; it continues as the saved one would have.
        `recycle`: a machine never to be used again, whose memory the new one reuses
        (`pkvm.snapshot.load`); its hyp is marked dead, so a hypercall on it raises `HypPanic`
        rather than reading the new machine's memory."""
        m = snapshot.load(data, recycle)
        if recycle is not None:
            recycle._hyp.dead = recycle._hyp.dead or "machine recycled by a snapshot load"
        return m

    def discard(self) -> None:
        """Drop this machine's objects, never to be used again (a fuzzer's dead machine once
        `restore` recycled it). First the cycles: its checker's (`Checker.retire`), its hyp
        state's (the hyp stage-1's TLB invalidation and the host stage-2's force-PTE callback,
        partials of the state; the guest-HVC watchers) and its HVC door's (the interposer
        chain, down to the door's own `call`), so reference counting frees the machine now
        rather than a collection; and its hyp VMs' (`drop_hyp_vcpus`, the VM table emptied)."""
        if self.checker is not None:
            self.checker.retire()
        h = self._hyp
        h.guest_hvc_watchers.clear()
        for vm in h.hyp_vms.values():  # its VMs (each holds the state, the state them)
            drop_hyp_vcpus(vm)
        h.hyp_vms.clear()
        h.vm_table.clear()
        h.loaded_hyp_vcpu[:] = [None] * len(h.loaded_hyp_vcpu)
        h.pkvm_pgtable.tlbi = None
        h.host_mmu.pgt.force_pte_cb = None
        self._door.interposed = _discarded
        # The host's VMs (live or destroyed) and their vCPUs point at each other and at the
        # host, a collection's to free: let them hold an empty host, not the machine's port.
        vars(self.host).clear()
        vars(self).clear()

    def spare_arrays(self) -> list[Any]:
        """The typed arrays and bytearrays a snapshot load may reuse once this machine is done
        with (the vmemmap's, the host allocator's map: `pkvm.snapshot.load`'s `recycle`)."""
        v = self._hyp.vmemmap
        return [v.refcount, v.order, v.host_state, v.hyp_state, v.host_share_guest_count,
                self.host.pages.used]

    def new_host_port(self) -> HostPort:
        """A new door to the machine for a tool that plays another host CPU (its stores go
        through the host stage-2 like the host's own; it has observers of its own)."""
        return HostPort(self)

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


def _discarded(cpu: int, func: str | int, args: tuple[int, ...]) -> Any:
    """A discarded machine's HVC door (`Machine.discard`)."""
    raise HypPanic("machine discarded", cpu, str(func))


def _compose(interposers: list[Any], proceed: Any) -> Any:
    """`proceed` wrapped in each of `interposers`, the last outermost: a callable that runs
    the outermost with, as its `proceed`, the next one in, down to `proceed` itself."""
    for fn in interposers:
        proceed = functools.partial(fn, proceed)
    return proceed


def machine_for(guest_memory: int, vcpus: int, abi: str = "latest",
                timeslice: int | float | None = None) -> Machine:
    """A machine sized for a Linux guest of `guest_memory` bytes and `vcpus` vCPUs.

    One vCPU runs until it exits (Linux exits often: console, timer, GIC, WFI). Several need
    the host's timer to preempt a vCPU that spins waiting for another: by default a wall-clock
    slice of `LINUX_SLICE` seconds (`pkvm.machine.preempt`, free per instruction), or, where
    this unicorn build cannot stop precisely, 2,000,000 instructions (unicorn counts every
    instruction then, ~4x slower). `timeslice` overrides either (an int: instructions)."""
    if vcpus > 1 and not timeslice:
        timeslice = LINUX_SLICE if preempt.available() else 2_000_000
    machine_mem = 2 * guest_memory + (256 << 20)
    return Machine(memory=machine_mem, cpus=max(2, vcpus), abi=abi, trace=False,
                   timeslice=timeslice)


LINUX_SLICE: Final = 0.005  # seconds a vCPU of a Linux guest runs before the host's timer preempts it
