"""The HVC door: the `hvc #0` instruction from the host to EL2, as the board wires it.

`HvcDoor` does the per-call work of `Machine.hvc` (compiled with the typed core): it checks the
calling CPU and the arguments, loads the host's x0..x6, enters the hyp's `handle_host_hcall`, and
keeps the call's `TraceRecord` (when tracing) and hands it to the listeners. `Machine` (a Python
class, so that tools may hold it weakly and snapshots pickle it) owns one and passes its calls
through, after the interposers.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from mypy_extensions import mypyc_attr

from pkvm.abi.profiles import ALL_HCALL_NAMES, Profile, func_ids
from pkvm.errors import HypPanic
from pkvm.hyp.hyp_main import handle_host_hcall
from pkvm.hyp.panic import HypBug
from pkvm.hyp.state import HypState
from pkvm.machine.firmware import OFF, Firmware
from pkvm.machine.memory import PAGE_SIZE
from pkvm.machine.mmu import (
    HCR_VM,
    S2_WALK_FAULT,
    El2Regs,
    tlb_s2_translate,
    tlb_s2_translate_in,
)

U64: Final = 0xFFFF_FFFF_FFFF_FFFF


def _s64(v: int) -> int:
    v &= U64
    return v - (1 << 64) if v >> 63 else v


class HvcResult(NamedTuple):
    """The registers the host sees after an HVC: x0 (SMCCC status) and x1 signed, x2/x3 raw.
    (A named tuple: immutable and cheap to make, one per hypercall.)"""

    x0: int
    x1: int
    x2: int
    x3: int

    @property
    def ok(self) -> bool:
        return self.x0 == 0 and self.x1 == 0


# An HvcResult made straight from its tuple by `tuple.__new__` (the named tuple's own `__new__`
# is interpreted Python, a frame per hypercall; a `functools.partial` of it joined the argument
# tuples at every call).
_tuple_new: Final = tuple.__new__
_HVC_RESULT: Final = HvcResult  # (a module constant: compiled, read without a dict lookup)
# `Machine`'s way through its interposers: (cpu, func, args) -> the result.
Interposed = Callable[[int, "str | int", tuple[int, ...]], HvcResult]
_now: Final = time.perf_counter_ns


# Built natively when compiled (its `__init__` written out: the dataclass-generated one is
# interpreted Python), outside the cycle collector (it holds only numbers and strings), pickled
# through `__reduce__` (a snapshot's trace).
@mypyc_attr(acyclic=True)
@dataclass(init=False)
class TraceRecord:
    """One hypercall as the trace keeps it; `start_ns`/`duration_ns` are 0 when tracing is off
    (the record then only goes to the listeners)."""

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
    panic: str | None

    def __init__(self, seq: int, cpu: int, name: str, func_id: int, args: tuple[int, ...],
                 x0: int, x1: int, x2: int, x3: int, start_ns: int, duration_ns: int,
                 panic: str | None = None) -> None:
        self.seq, self.cpu, self.name, self.func_id, self.args = seq, cpu, name, func_id, args
        self.x0, self.x1, self.x2, self.x3 = x0, x1, x2, x3
        self.start_ns, self.duration_ns, self.panic = start_ns, duration_ns, panic

    def __reduce__(self) -> tuple[Any, ...]:
        return (TraceRecord, (self.seq, self.cpu, self.name, self.func_id, self.args, self.x0,
                              self.x1, self.x2, self.x3, self.start_ns, self.duration_ns,
                              self.panic))

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq, "cpu": self.cpu, "call": self.name, "func_id": self.func_id,
            "args": list(self.args), "x0": self.x0, "x1": self.x1, "x2": self.x2, "x3": self.x3,
            "start_ns": self.start_ns, "duration_ns": self.duration_ns, "panic": self.panic,
        }


class HvcDoor:
    """The per-call path of the HVC instruction (and the trace both doors keep)."""

    def __init__(self, hyp: HypState, el2: list[El2Regs], firmware: Firmware, profile: Profile,
                 nr_cpus: int, trace: collections.deque[TraceRecord],
                 listeners: list[Callable[[TraceRecord], None]], tracing: bool, seq: int,
                 interposers: list[Any], interposed: Interposed):
        self.hyp, self.el2, self.firmware, self.profile = hyp, el2, firmware, profile
        self.nr_cpus, self.trace, self.listeners = nr_cpus, trace, listeners
        self.tracing, self.seq = tracing, seq
        # The trace's `append`, bound once: compiled, `self.trace.append(rec)` looks the method
        # up by name on every call.
        self.trace_append: Callable[[TraceRecord], None] = trace.append
        self.func_ids = func_ids(profile)
        # The machine's interposers (the same list) and its way through them: the chain
        # `Machine.interpose_hvc` composes (the generic `Machine._interpose` until then), which
        # `Machine.hvc` and `hvc` take while there are interposers.
        self.interposers = interposers
        self.interposed = interposed

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled (a machine snapshot) as its parts; the same objects as the machine's."""
        return (HvcDoor, (self.hyp, self.el2, self.firmware, self.profile, self.nr_cpus,
                          self.trace, self.listeners, self.tracing, self.seq, self.interposers,
                          self.interposed))

    def hvc(self, cpu: int, func: str | int, *args: Any) -> HvcResult:
        """`Machine.hvc` as one compiled call (the host port's `hvc`): through the machine's
        interposers when it has some, else straight to `call`."""
        if self.interposers:
            return self.interposed(cpu, func, args)
        return self.call(cpu, func, args)

    def func_id(self, func: str | int) -> int:
        if isinstance(func, str):
            n = self.func_ids.get(func)
            if n is not None:
                return n
            if func not in ALL_HCALL_NAMES:
                raise ValueError(f"{func!r} is not a host hypercall of Linux 6.12 or 7.2")
            return 0xC600_0000 + 0xFFFF  # named in the other profile only: unknown here
        if not isinstance(func, int):
            raise TypeError("func must be a hypercall name or a function ID")
        return func & U64

    def check_cpu(self, cpu: int) -> None:
        if not isinstance(cpu, int) or not 0 <= cpu < self.nr_cpus:
            raise ValueError(f"cpu must be in 0..{self.nr_cpus - 1}")
        if self.firmware.power[cpu] == OFF:
            raise ValueError(f"cpu {cpu} is powered off (bring it up with PSCI CPU_ON)")

    def call(self, cpu: int, func: str | int, args: tuple[int, ...]) -> HvcResult:
        """`hvc #0` on `cpu`: x0 = func, x1.. = args."""
        self.check_cpu(cpu)
        n = len(args)
        if n > 6:
            raise TypeError("at most 6 arguments (x1..x6)")
        wide = False  # an argument that is not already a 64-bit register value
        for a in args:
            if not isinstance(a, int):
                raise TypeError(f"hypercall arguments are integers, not {type(a).__name__}")
            if a >> 64:  # negative (>> 64 is -1) or wider than a register
                wide = True
        if not wide:
            objs: tuple[object, ...] = args  # as the caller passed them (compiled: not unboxed)
            for o in objs:
                if type(o) is not int:  # a bool or an IntEnum: recorded as its plain int
                    wide = True
        h = self.hyp
        if h.dead:
            raise HypPanic(h.dead, cpu, None)
        x0 = self.func_id(func)
        regs = self.el2[cpu].host_regs
        regs[0] = x0
        masked = tuple([a & U64 for a in args]) if wide else args  # (no copy when all fit)
        for i in range(6):
            regs[i + 1] = masked[i] if i < n else 0
        h.locks.cpu = cpu
        if h.wiped_returns:
            h.wiped_returns.clear()
        tracing = self.tracing
        t0 = _now() if tracing else 0
        try:
            name = handle_host_hcall(h, regs)
        except HypBug as bug:
            nr = self.profile.decode(x0)
            cname = self.profile.hcalls[nr] if nr is not None else hex(x0)
            h.dead = str(bug)
            self.notify(self.record(cpu, cname, x0, masked, regs, t0, str(bug)))
            raise HypPanic(str(bug), cpu, cname) from None
        r0, r1, r2, r3 = regs[0], regs[1], regs[2], regs[3]
        if r0 >> 63:
            r0 -= 1 << 64
        if r1 >> 63:
            r1 -= 1 << 64
        result: HvcResult = _tuple_new(_HVC_RESULT, (r0, r1, r2, r3))
        if tracing or self.listeners:
            rec = self.keep(cpu, name or hex(x0), x0, masked, r0, r1, r2, r3, t0, None)
            if self.listeners:
                self.notify(rec)
        return result

    def host_hit(self, cpu: int, pa: int, write: bool) -> int:
        """A host access at `pa` (its IPA) that needs no step into the hyp, as
        `Machine.host_translate` takes it (compiled, for the host's loads and stores): the PA,
        -1 where no RAM answers (MMIO), or `S2_WALK_FAULT` where `host_translate` must take the
        access itself (a stage-2 fault, stage-2 off, a dead hyp, a bad CPU or address)."""
        h = self.hyp
        if h.dead or not 0 <= cpu < self.nr_cpus or not 0 <= pa < 1 << 48:
            return S2_WALK_FAULT
        el2 = self.el2[cpu]
        if not el2.hcr_el2 & HCR_VM:
            return S2_WALK_FAULT
        return tlb_s2_translate(h.host_s2_tlb, h.mem, el2.vttbr_el2, pa, write)

    def host_load_u64(self, cpu: int, pa: int) -> int:
        """The host's 8-byte load at `pa` where `host_hit` answers with RAM and the load is
        aligned (one compiled call for `HostPort.read_u64`'s common case: a count or a link the
        host reads once a page); -1 where `HostPort.read_u64` must take it the generic way."""
        if pa & 7:
            return -1
        out = self.host_hit(cpu, pa, False)
        if out < 0:  # S2_WALK_FAULT or no RAM (MMIO)
            return -1
        return self.hyp.mem.read_u64(out)

    def host_spans(self, cpu: int, pa: int, n: int, write: bool,
                   spans: list[tuple[int | None, int]]) -> tuple[int, int]:
        """`host_hit` of each page of [pa, pa + n) in order, each appended to `spans` as (PA or
        None where no RAM answers, bytes of that page in the range), up to the first page that
        `Machine.host_translate` must take itself: returns the (pa, n) left from there."""
        h = self.hyp
        if h.dead or not 0 <= cpu < self.nr_cpus or not self.el2[cpu].hcr_el2 & HCR_VM:
            return pa, n  # `host_hit`'s generic cases, the same for every page
        tlb, mem, root = h.host_s2_tlb, h.mem, self.el2[cpu].vttbr_el2
        leaf = [0, 0, 0]  # the block the last walk ended at (`tlb_s2_translate_in`)
        while n > 0:
            k = min(n, PAGE_SIZE - (pa & (PAGE_SIZE - 1)))
            if not 0 <= pa < 1 << 48:
                break
            out = tlb_s2_translate_in(tlb, mem, root, pa, write, leaf)
            if out == S2_WALK_FAULT:
                break
            spans.append((out if out >= 0 else None, k))
            pa += k
            n -= k
        return pa, n

    def record(self, cpu: int, name: str, x0: int, args: tuple[int, ...], regs: list[int],
               t0: int, panic: str | None) -> TraceRecord:
        """The call's trace record (`args` already 64-bit), kept when tracing."""
        return self.keep(cpu, name, x0, args, _s64(regs[0]), _s64(regs[1]), regs[2], regs[3],
                         t0, panic)

    def keep(self, cpu: int, name: str, x0: int, args: tuple[int, ...], r0: int, r1: int,
             r2: int, r3: int, t0: int, panic: str | None) -> TraceRecord:
        """`record` from the host's x0..x3 after the call as it sees them (x0, x1 signed)."""
        self.seq += 1
        tracing = self.tracing
        rec = TraceRecord(self.seq, cpu, name, x0, args, r0, r1, r2, r3, t0,
                          _now() - t0 if tracing else 0, panic)
        if tracing:
            self.trace_append(rec)
        return rec

    def notify(self, rec: TraceRecord) -> None:
        for fn in self.listeners:
            fn(rec)
