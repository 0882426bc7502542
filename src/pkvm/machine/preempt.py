"""Preemption on the machine: scheduling hooks for checkers, and the host's physical timer.

**Scheduling hooks** (`PreemptionPoints`, the machine's `m.preemption`): EL2 code calls
`preempt(event, detail)` at every point where another CPU could run between two of its steps:
before each EL2 read of host-shared memory ("host-read"), at each lock acquire and release
("acquire" / "release"). A checker installs a `Scheduler` (`with m.preemption.scheduled(s):`)
which is called there and may run another CPU (the explorer) or perform a racing host CPU's
stores (the fuzzer). With no scheduler installed a point costs one attribute test.
`wait_lock(cpu, lock)` is called where a CPU would spin on a lock another CPU holds.

**The host's physical timer while a guest runs**: stop a `Core` after a wall-clock slice.

`run_for(core, seconds)` runs the core like `Core.run()`; a watchdog thread, waking every
quarter slice, asks a run that has lasted `seconds` to stop, and the run reports a BUDGET exit,
as an instruction budget would. It costs nothing per guest instruction, unlike
`Core.run(max_insns)` (unicorn's instruction counter, ~4x slower), and nothing per run (no
thread hand-off): the run only publishes (core, start, seconds) and the watchdog samples it.

**Where a run stops.** `uc.emu_stop()` from another thread is not usable: unicorn 2.1.4 checks
for it at the start of every translation block *and after every guest load or store*, and a
stop taken after a load or store puts PC back on that instruction although it has already run,
so the guest executes it twice (`ldr x0, [x0]` then loads through the value it loaded; a
pointer-chasing loop stopped ~500 times ended with wrong registers in every trial). The
watchdog therefore only raises unicorn's `stop_request` flag, without `cpu_exit`: unicorn acts
on it when its execution loop returns, which happens only between instructions, with PC exact
— at a YIELD or WFE (QEMU leaves the loop for them: Linux's busy-waits, `cpu_relax()` and
`smp_cond_load_*()`, always contain one), at an exception the core delivers to the guest (a
system call, a page fault) and at every exit to EL2. A vCPU that computes without any of these
runs on until it does: it delays the others but cannot be cut mid-instruction.

The flag's place in unicorn's private engine struct is found, not assumed, on a scratch engine
(`available()`): it follows `emu_count` (the count `uc_emu_start` was given) and
`size_recur_mem`/`init_tcg`; `uc_emu_stop()` called from a hook must set that byte, and setting
it from another thread must end a YIELD loop at the instruction after the YIELD. Where any check
fails (another unicorn build), `available()` is False and callers use an instruction budget.
"""

from __future__ import annotations

import ctypes
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final, Protocol

from unicorn import UC_ARCH_ARM64, UC_HOOK_CODE, UC_MODE_ARM
from unicorn import arm64_const as A
from unicorn.unicorn_py3.unicorn import Uc


class Scheduler(Protocol):
    def preempt(self, cpu: int, event: str, detail: str) -> None: ...
    def wait_lock(self, cpu: int, lock: Any) -> None: ...


class PreemptionPoints:
    """The scheduling interface of a machine: which CPU runs EL2 code now (`cpu`), and the
    installed `Scheduler`, if any."""

    def __init__(self) -> None:
        self.cpu = 0
        self.scheduler: Scheduler | None = None

    def preempt(self, event: str, detail: str) -> None:
        """A preemption point of the code running on `self.cpu`."""
        if self.scheduler is not None:
            self.scheduler.preempt(self.cpu, event, detail)

    def switch_to(self, cpu: int) -> None:
        """The scheduler hands EL2 to `cpu` (its code continues from its last point)."""
        self.cpu = cpu

    @contextmanager
    def scheduled(self, scheduler: Scheduler) -> Iterator[None]:
        """Install `scheduler` for the duration of the block."""
        prev, self.scheduler = self.scheduler, scheduler
        try:
            yield
        finally:
            self.scheduler = prev


_current: tuple[Any, float, float, int] | None = None  # (core, start, seconds, serial)
_serial = 0
_thread: threading.Thread | None = None
stats = {"slices": 0, "preempted": 0}

_SCAN: Final = 8192  # bytes of the engine struct searched (emu_count sits ~1.4 KiB in)
_COUNT: Final = 0x5A5A5A  # a recognisable instruction count for the probe
_offset: int | None | bool = False  # of stop_request; False: not probed yet, None: not found
# nop; nop; yield; b <the yield>
_PROBE_CODE: Final = struct.pack("<4I", 0xD503201F, 0xD503201F, 0xD503203F, 0x17FFFFFF)


def _engine_addr(uc: Any) -> int:
    h = uc._uch
    return int(h.value if hasattr(h, "value") else h)


def _find_stop_request() -> int | None:
    """Offset of `stop_request` in unicorn's engine struct (checked by behaviour), or None."""
    uc: Any = Uc(UC_ARCH_ARM64, UC_MODE_ARM)
    uc.mem_map(0x1000, 0x1000)
    uc.mem_write(0x1000, _PROBE_CODE)
    uc.emu_start(0x1000, 0x1004, 0, _COUNT)
    base = _engine_addr(uc)
    raw = ctypes.string_at(base, _SCAN)
    hits = [o for o in range(0, _SCAN - 24, 8) if struct.unpack_from("<Q", raw, o)[0] == _COUNT]
    # emu_count; int size_recur_mem; bool init_tcg, stop_request, quit_request, emulation_done
    hits = [o for o in hits if raw[o + 15] == 1]
    if len(hits) != 1:
        return None
    off = hits[0] + 13
    seen: list[int] = []

    def stop_in_hook(uc: Any, _addr: int, _size: int, _data: object) -> None:
        uc.emu_stop()
        seen.append(ctypes.c_ubyte.from_address(base + off).value)

    h = uc.hook_add(UC_HOOK_CODE, stop_in_hook)
    uc.emu_start(0x1000, 0x2000)
    uc.hook_del(h)
    if seen != [1]:
        return None
    timer = threading.Timer(0.02, lambda: _raise(base, off))
    timer.start()
    uc.emu_start(0x1008, 0x2000, 2_000_000, 0)  # the timeout only bounds a failed probe
    timer.join()
    pc = uc.reg_read(A.UC_ARM64_REG_PC)
    return off if pc == 0x100C and not _timed_out(uc) else None


def _timed_out(uc: Any) -> bool:
    try:
        return bool(uc.query(4))  # UC_QUERY_TIMEOUT
    except Exception:
        return False


def _raise(base: int, off: int) -> None:
    ctypes.c_bool.from_address(base + off).value = True


def available() -> bool:
    """Whether runs can be stopped from the watchdog with this unicorn build."""
    global _offset
    if _offset is False:
        try:
            _offset = _find_stop_request()
        except Exception:  # an unexpected binding: not available, callers fall back
            _offset = None
    return _offset is not None


def request_stop(core: Any) -> None:
    """Ask `core`'s current run to stop at its next instruction boundary that leaves
    unicorn's loop (see above); a request made between runs is dropped by the next run."""
    assert isinstance(_offset, int)
    _raise(_engine_addr(core.uc), _offset)


def _watchdog() -> None:
    while True:
        cur = _current
        if cur is None:
            time.sleep(0.002)
            continue
        core, start, seconds, serial = cur
        left = start + seconds - time.monotonic()
        if left > 0:
            time.sleep(min(left, seconds / 4) + 0.0002)
            continue
        now = _current
        if now is not None and now[3] == serial:
            request_stop(core)
            stats["preempted"] += 1
        time.sleep(seconds / 4)


def run_for(core: Any, seconds: float) -> Any:
    """`core.run()` bounded by `seconds` of wall-clock time (a BUDGET exit when it elapses)."""
    global _thread, _current, _serial
    if not available():
        raise RuntimeError("this unicorn build cannot be stopped from the watchdog")
    if _thread is None:
        _thread = threading.Thread(target=_watchdog, name="pkvm-preempt", daemon=True)
        _thread.start()
    _serial += 1
    _current = (core, time.monotonic(), seconds, _serial)
    stats["slices"] += 1
    try:
        return core.run()
    finally:
        _current = None
