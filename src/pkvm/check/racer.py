"""A second host CPU that races the hyp: it stores into host-shared memory at one of the
machine's preemption points (an EL2 read of host memory, a lock release), as another CPU of the
host could while the hyp works on the first. Its stores go through its own host port, so the
host stage-2 checks them like any other host store.
"""

from __future__ import annotations

from typing import Any

from pkvm.errors import HostDataAbort


class RaceBlocked(Exception):
    """The racing host CPU's store would need a lock the interrupted CPU holds."""


class Racer:
    """A `Scheduler` (`pkvm.machine.preempt`) playing a second host CPU: at the `fire_at`-th EL2
    read of host-shared memory during a hypercall it stores, through the host stage-2 on its own
    CPU, as a real host CPU can at any time: either planned (pa, bytes) stores (a replay), or a
    `value` written over the very bytes EL2 is about to read (an int, or ("rel", d): what is
    there now plus d)."""

    def __init__(self, m: Any, port: Any):
        self.m = m
        self.store_port = port
        self.plan: list[tuple[int, bytes]] = []
        self.value: Any = None
        self.fire_at = 0
        self.seen = 0
        self.log: list[tuple[int, bytes, int]] = []  # (pa, data, at which host read)

    def arm(self, plan: list[tuple[int, bytes]], fire_at: int = 0, value: Any = None) -> None:
        self.plan, self.value, self.fire_at, self.seen = plan, value, fire_at, 0

    def _stores(self, detail: str) -> list[tuple[int, bytes]]:
        if self.value is None:
            return self.plan
        n, at, pa_s = detail.partition("@")
        if not at:  # a read EL2 names but does not place (a whole struct): nothing to overwrite
            return []
        pa, size = int(pa_s, 0), min(int(n), 8)
        v = self.value
        if isinstance(v, tuple):
            v = int.from_bytes(self.store_port.read(0, pa, size), "little") + v[1]
        return [(pa, (v & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))]

    def preempt(self, cpu: int, event: str, detail: str) -> None:
        if event != "host-read" or not (self.plan or self.value is not None):
            return
        self.seen += 1
        if self.seen <= self.fire_at:
            return
        pts = self.m.preemption
        racer_cpu = (cpu + 1) % self.m.nr_cpus
        try:
            stores = self._stores(detail)
        except HostDataAbort:
            stores = []
        finally:
            pts.switch_to(cpu)
        self.plan, self.value = [], None
        for pa, data in stores:
            try:
                self.store_port.write(racer_cpu, pa, data)
            except (HostDataAbort, RaceBlocked):
                continue  # the store did not happen (refused, or would deadlock here)
            finally:
                pts.switch_to(cpu)
            self.log.append((pa, data, self.seen - 1))

    def wait_lock(self, cpu: int, lock: Any) -> None:
        raise RaceBlocked(lock)
