"""The host kernel: its memory, its page allocator, its KVM driver."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from pkvm.host.kvm import HostVm
from pkvm.machine.memory import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from pkvm.abi.profiles import Profile


class HvcAnswer(Protocol):
    """x0..x3 of the calling CPU after an HVC (the board's `HvcResult`)."""

    @property
    def x0(self) -> int: ...
    @property
    def x1(self) -> int: ...
    @property
    def x2(self) -> int: ...
    @property
    def x3(self) -> int: ...


class HostPort(Protocol):
    """What the board hands the host: HVC and stage-2-checked memory accesses."""

    def hvc(self, cpu: int, func: str | int, *args: int) -> HvcAnswer: ...
    def read(self, cpu: int, pa: int, n: int) -> bytes: ...
    def write(self, cpu: int, pa: int, data: bytes) -> None: ...
    def zero(self, cpu: int, pa: int, n: int) -> None: ...
    # optional, used when present: `read_u64(cpu, pa)`, `write_u64(cpu, pa, value)`

RESERVED_LOW_PAGES = 2  # the first two RAM pages are never handed out


class PageAllocator:
    """The host's page allocator: a byte per page, first fit for contiguous runs."""

    def __init__(self, base_pfn: int, nr_pages: int, reserved: list[tuple[int, int]]):
        self.base_pfn = base_pfn
        self.used = bytearray(nr_pages)
        for start, n in reserved:
            self.used[start - base_pfn : start - base_pfn + n] = b"\x02" * n  # never handed out
        self.hint = 0

    def alloc(self, n: int) -> int | None:
        want = bytes(n)
        i = self.used.find(want, self.hint)
        if i < 0:
            i = self.used.find(want)
            if i < 0:
                return None
        self.used[i : i + n] = b"\x01" * n
        self.hint = i + n
        return self.base_pfn + i

    def alloc_each(self, n: int) -> list[int] | None:
        """`n` single pages, exactly as `n` calls of `alloc(1)` take them (the free pages from the
        hint on, then from the start), a run of free pages at a time; None (nothing taken)
        when fewer than `n` are free."""
        used = self.used
        out: list[int] = []
        while len(out) < n:
            i = used.find(0, self.hint)
            if i < 0:
                i = used.find(0)
                if i < 0:
                    for pfn in out:
                        self.release(pfn, 1)
                    return None
            want = n - len(out)
            ends = [j for j in (used.find(1, i, i + want), used.find(2, i, i + want)) if j >= 0]
            k = min(ends) - i if ends else min(want, len(used) - i)
            used[i : i + k] = b"\x01" * k
            out.extend(range(self.base_pfn + i, self.base_pfn + i + k))
            self.hint = i + k
        return out

    def release(self, pfn: int, n: int) -> None:
        i = pfn - self.base_pfn
        if i < 0 or i + n > len(self.used) or self.used[i : i + n] != b"\x01" * n:
            raise ValueError(f"pages {pfn:#x}+{n} were not handed out by alloc_pages")
        self.used[i : i + n] = bytes(n)
        self.hint = min(self.hint, i)

    def free_pages(self) -> int:
        return self.used.count(0)


class Host:
    """The host as a user scripts it: `machine.host`."""

    def __init__(self, port: "HostPort", profile: "Profile", nr_cpus: int, ram_base: int,
                 ram_size: int, carveout: tuple[int, int]):
        self.port = port
        # The port's optional 8-byte accessors, looked up once.
        self._read_u64: Callable[[int, int], int] | None = getattr(port, "read_u64", None)
        self._write_u64: Callable[[int, int, int], None] | None = getattr(port, "write_u64", None)
        self.profile = profile
        self.nr_cpus = nr_cpus
        base_pfn = ram_base >> PAGE_SHIFT
        end_pfn = (ram_base + ram_size) >> PAGE_SHIFT
        cb, cs = carveout[0] >> PAGE_SHIFT, carveout[1] >> PAGE_SHIFT
        self.pages = PageAllocator(base_pfn, end_pfn - base_pfn,
                                   [(base_pfn, RESERVED_LOW_PAGES), (cb, cs)])
        self.vms: list["HostVm"] = []  # live VMs, oldest first
        self.cpu = 0  # the CPU host code runs on unless told otherwise
        self._shared: dict[int, int] = {}  # pfn -> users (kvm_share_hyp refcounts)
        self.vmids = 0  # 6.12: the host allocates VMIDs for the stage-2s it manages

    # -- memory, through the host stage-2 ---------------------------------------------
    def read(self, pa: int, n: int, cpu: int | None = None) -> bytes:
        return self.port.read(self.cpu if cpu is None else cpu, pa, n)

    def write(self, pa: int, data: bytes, cpu: int | None = None) -> None:
        self.port.write(self.cpu if cpu is None else cpu, pa, bytes(data))

    def read_u64(self, pa: int) -> int:
        fast = self._read_u64  # optional in a port (one translation)
        if fast is None:
            return int.from_bytes(self.read(pa, 8), "little")
        value: int = fast(self.cpu, pa)
        return value

    def write_u64(self, pa: int, value: int) -> None:
        fast = self._write_u64
        if fast is None:
            self.write(pa, (value & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little"))
        else:
            fast(self.cpu, pa, value)

    # -- pages ---------------------------------------------------------------------
    def alloc_pages(self, n: int = 1) -> int:
        """Physical address of `n` contiguous, zeroed, host-owned pages."""
        if n < 1:
            raise ValueError("alloc_pages needs n >= 1")
        pfn = self.pages.alloc(n)
        if pfn is None:
            raise MemoryError(f"the host has no {n} contiguous free pages")
        self.port.zero(self.cpu, pfn << PAGE_SHIFT, n * PAGE_SIZE)
        return pfn << PAGE_SHIFT

    def alloc_pages_bulk(self, n: int) -> list[int]:
        """Physical addresses of `n` single zeroed host-owned pages (Linux's `alloc_pages_bulk`:
        as many `alloc_pages(1)`, the same pages in the same order), zeroed a run of adjacent
        pages at a time. Where zeroing is refused (a page the host no longer owns) every page
        of the call goes back to the allocator and the abort is raised."""
        pfns = self.pages.alloc_each(n)
        if pfns is None:
            raise MemoryError(f"the host has no {n} free pages")
        try:
            k = 0
            while k < n:  # one zero per run of adjacent pages
                run = 1
                while k + run < n and pfns[k + run] == pfns[k] + run:
                    run += 1
                self.port.zero(self.cpu, pfns[k] << PAGE_SHIFT, run * PAGE_SIZE)
                k += run
        except BaseException:
            for p in pfns:
                self.pages.release(p, 1)
            raise
        return [pfn << PAGE_SHIFT for pfn in pfns]

    def free_pages(self, pa: int, n: int = 1) -> None:
        self.pages.release(pa >> PAGE_SHIFT, n)

    def free_pages_bulk(self, pas: list[int]) -> None:
        """`free_pages` of each single page of `pas`, in order (a run of adjacent pages freed at
        once where each of its pages was handed out; otherwise page by page, so that a page
        that was not stops the loop exactly there)."""
        k = 0
        while k < len(pas):
            run = 1
            while k + run < len(pas) and pas[k + run] == pas[k] + run * PAGE_SIZE:
                run += 1
            try:
                self.pages.release(pas[k] >> PAGE_SHIFT, run)
            except ValueError:
                for pa in pas[k : k + run]:
                    self.free_pages(pa)
            k += run

    # -- the hypercalls the host kernel itself makes -------------------------------------
    def hvc(self, func: str | int, *args: int, cpu: int | None = None) -> HvcAnswer:
        return self.port.hvc(self.cpu if cpu is None else cpu, func, *args)

    def share_hyp(self, pa: int, size: int) -> int:
        """`kvm_share_hyp`: share every page of [pa, pa+size) once, counting users per pfn."""
        first, last = pa >> PAGE_SHIFT, (pa + size - 1) >> PAGE_SHIFT
        done: list[int] = []
        shared, hvc = self._shared, self.port.hvc  # (`Host.hvc` on this CPU, a frame less)
        for pfn in range(first, last + 1):
            users = shared.get(pfn, 0)
            if users == 0:
                r = hvc(self.cpu, "__pkvm_host_share_hyp", pfn)
                if r.x0 or r.x1:
                    for p in done:
                        self.unshare_hyp(p << PAGE_SHIFT, PAGE_SIZE)
                    return r.x1 if r.x0 == 0 else -22
            shared[pfn] = users + 1
            done.append(pfn)
        return 0

    def unshare_hyp(self, pa: int, size: int) -> int:
        first, last = pa >> PAGE_SHIFT, (pa + size - 1) >> PAGE_SHIFT
        ret = 0
        for pfn in range(first, last + 1):
            users = self._shared.get(pfn, 0)
            if users == 0:
                continue
            if users == 1:
                r = self.hvc("__pkvm_host_unshare_hyp", pfn)
                if r.x1:
                    ret = r.x1
                    continue
                del self._shared[pfn]
            else:
                self._shared[pfn] = users - 1
        return ret

    # -- KVM ----------------------------------------------------------------------
    def create_vm(self, vcpus: int = 1, protected: bool = False, memory: int | str = "64M") -> HostVm:
        return HostVm.create(self, vcpus=vcpus, protected=protected, memory=memory)
