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
quarter slice, interrupts a run that has lasted `seconds` (`uc.emu_stop()`, which takes effect at
the next translation-block boundary) and the run reports a BUDGET exit, as an instruction budget
would. It costs nothing per guest instruction, unlike `Core.run(max_insns)` (unicorn's
instruction counter, ~4x slower), and nothing per run (no thread hand-off): the run only
publishes (core, start, seconds) and the watchdog samples it.

A stop that lands after its run ended is dropped by unicorn (emulation done) or, at worst,
ends the next run early: a spurious, harmless preemption.

(Added for issue 9, Linux guests.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol


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


def _watchdog() -> None:
    stopped = -1
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
        if serial != stopped:
            stopped = serial
            core.uc.emu_stop()
            stats["preempted"] += 1
        time.sleep(seconds / 4)


def run_for(core: Any, seconds: float) -> Any:
    """`core.run()` bounded by `seconds` of wall-clock time (a BUDGET exit when it elapses)."""
    global _thread, _current, _serial
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
