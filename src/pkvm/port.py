"""The host's door to the machine (`HostPort`): HVC, SMC and memory accesses that the hardware
checks against the host stage-2. `pkvm.board.Machine` makes them; the host holds one."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pkvm.machine.memory import PAGE_SIZE, zero_runs
from pkvm.machine.mmu import S2_WALK_FAULT

if TYPE_CHECKING:
    from pkvm.board import HvcResult, Machine, SmcResult

U64 = 0xFFFF_FFFF_FFFF_FFFF

StoreObserver = Callable[[int, int, bytes | int], None]


class HostPort:
    """All the host (EL1) can do to the rest of the machine: HVC, and memory accesses that the
    hardware checks against the host stage-2. The host holds one (`m.host.port`), never the
    machine (`m.host_port` is that one); a tool playing another host CPU takes its own
    (`Machine.new_host_port()`).

    `observe_stores(fn)` calls `fn(cpu, pa, data)` after every store through this port that
    the host stage-2 let through: `data` is the bytes stored, or, for `zero`, the number of
    bytes zeroed. A refused store raises `HostDataAbort` and is not observed. `log_stores(log)`
    appends `("write", cpu, pa, data)` or `("zero", cpu, pa, n)` to `log` for each, as the
    observer `lambda cpu, pa, d: log.append(("zero" if isinstance(d, int) else "write", cpu,
    pa, d))` would, without a call per store (the fuzzer's log), before the observers.

    `hvc(cpu, func, *args)` is `Machine.hvc` (interposers and all) as its door's compiled
    `HvcDoor.hvc`, bound here rather than wrapped: the run path issues five hypercalls per
    exit. The loads and stores within one page ask the machine's door for the host TLB's hit
    first, as `Machine.host_translate` does, and go to `host_translate_slow` for everything
    else (a fault, stage-2 off, a dead hyp)."""

    __slots__ = ("_m", "_observers", "_logs", "_watched", "hvc")

    def __init__(self, machine: "Machine"):
        self._m = machine
        self._observers: list[StoreObserver] = []
        self._logs: list[list[tuple[str, int, int, bytes | int]]] = []
        self._watched = False  # any observer or log
        self.hvc: Callable[..., HvcResult] = machine._door.hvc  # `Machine.hvc`, compiled

    def observe_stores(self, fn: StoreObserver) -> None:
        self._observers.append(fn)
        self._watched = True

    def log_stores(self, log: list[tuple[str, int, int, bytes | int]]) -> None:
        self._logs.append(log)
        self._watched = True

    def observed(self) -> bool:
        return self._watched

    def _stored(self, cpu: int, pa: int, data: bytes | int) -> None:
        if self._logs:
            entry = ("zero" if isinstance(data, int) else "write", cpu, pa, data)
            for log in self._logs:
                log.append(entry)
        for fn in self._observers:
            fn(cpu, pa, data)

    def smc(self, cpu: int, func: str | int, *args: int, imm: int = 0) -> SmcResult:
        return self._m.smc(cpu, func, *args, imm=imm)

    def read(self, cpu: int, pa: int, n: int) -> bytes:
        m = self._m
        if 0 < n <= PAGE_SIZE - (pa & 0xFFF):  # within one page: one translation
            hit = self._m._door.host_hit(cpu, pa, False)
            out = hit if hit != S2_WALK_FAULT else m.host_translate_slow(cpu, pa, False)
            return m.mem.read(out, n) if out is not None and out >= 0 else bytes(n)
        spans = self._translate(cpu, pa, n, False)
        return b"".join(m.mem.read(out, k) if out is not None else bytes(k) for out, k in spans)

    def write(self, cpu: int, pa: int, data: bytes) -> None:
        m = self._m
        if 0 < len(data) <= PAGE_SIZE - (pa & 0xFFF):  # within one page: `_write`, inlined
            hit = m._door.host_hit(cpu, pa, True)  # `host_translate`, inlined
            out = hit if hit != S2_WALK_FAULT else m.host_translate_slow(cpu, pa, True)
            if out is not None and out >= 0:
                m.mem.write(out, data)
        else:
            self._write(cpu, pa, data)
        if self._watched:  # `_stored`, inlined
            entry = ("write", cpu, pa, bytes(data))
            for log in self._logs:
                log.append(entry)
            for fn in self._observers:
                fn(cpu, pa, entry[3])

    def _write(self, cpu: int, pa: int, data: bytes) -> None:
        m = self._m
        if 0 < len(data) <= PAGE_SIZE - (pa & 0xFFF):
            out = m.host_translate(cpu, pa, True)
            if out is not None:
                m.mem.write(out, data)
            return
        spans = self._translate(cpu, pa, len(data), True)
        pos = 0
        for out, k in spans:
            if out is not None:
                m.mem.write(out, data[pos : pos + k])
            pos += k

    def read_u64(self, cpu: int, pa: int) -> int:
        """An 8-byte load: one translation (the TLB's, on a hit) and one read of RAM."""
        v = self._m._door.host_load_u64(cpu, pa)  # an aligned TLB hit on RAM, one call
        if v >= 0:
            return v
        if pa & 0xFFF > PAGE_SIZE - 8:  # straddles two pages
            return int.from_bytes(self.read(cpu, pa, 8), "little")
        hit = self._m._door.host_hit(cpu, pa, False)  # `host_translate`'s first step
        out = hit if hit != S2_WALK_FAULT else self._m.host_translate_slow(cpu, pa, False)
        if out is None or out < 0:
            return 0
        mem = self._m.mem
        return mem.read_u64(out) if not out & 7 else int.from_bytes(mem.read(out, 8), "little")

    def write_u64(self, cpu: int, pa: int, value: int) -> None:
        raw = (value & U64).to_bytes(8, "little")
        if pa & 0xFFF > PAGE_SIZE - 8:
            self.write(cpu, pa, raw)
            return
        hit = self._m._door.host_hit(cpu, pa, True)
        out = hit if hit != S2_WALK_FAULT else self._m.host_translate_slow(cpu, pa, True)
        if out is not None and out >= 0:
            mem = self._m.mem
            if out & 7:
                mem.write(out, raw)
            else:
                mem.write_u64(out, value & U64)
        if self._watched:
            self._stored(cpu, pa, raw)

    def zero(self, cpu: int, pa: int, n: int) -> None:
        """memset(0) of whole host pages (pages already zero are left untouched). Every page is
        translated first; RAM that comes out adjacent is zeroed in one go (`zero_runs`)."""
        m = self._m
        if n == PAGE_SIZE and not pa & 0xFFF:  # one page (the host's `alloc_pages(1)`)
            hit = m._door.host_hit(cpu, pa, True)  # `host_translate`, inlined
            out = hit if hit != S2_WALK_FAULT else m.host_translate_slow(cpu, pa, True)
            if out is not None and out >= 0:
                m.mem.zero(out, n)
        else:
            zero_runs(m.mem, self._translate(cpu, pa, n, True))
        if self._watched:  # `_stored`, inlined
            entry = ("zero", cpu, pa, n)
            for log in self._logs:
                log.append(entry)
            for fn in self._observers:
                fn(cpu, pa, n)

    def _translate(self, cpu: int, pa: int, n: int, write: bool) -> list[tuple[int | None, int]]:
        """Check every page of [pa, pa+n) first: a refused access changes nothing."""
        return self._m.host_translate_range(cpu, pa, n, write)
