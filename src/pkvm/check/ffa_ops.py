"""FF-A for the checkers: descriptors, a host-side driver, hostile operations, the FF-A owner.

- `mem_descriptor` builds an FF-A v1.1+ memory-transaction descriptor (header, one endpoint
  descriptor, composite region, constituents) with every offset and count overridable, so that
  tests and the fuzzer can send the proxy well-formed and hostile descriptors alike.
- `FfaHost` drives the proxy through `machine.smc` as Linux's FF-A driver would (version,
  mailbox, share / lend / reclaim, fragments).
- `hostile_ffa_op` is one random FF-A call with a hostile descriptor or argument (offsets,
  counts, fragment lengths, overlapping ranges, pages in every state) for the fuzzer and the
  explorer (registered by the lead; nothing here runs unless called).
- `check_ffa_owner` is the FF-A owner's invariant: every page of an open transaction in the
  secure world is host SHARED_OWNED (neither hyp- nor guest-owned), and every host
  SHARED_OWNED page with no other borrower belongs to one.

Only public doors are used: `machine.smc`, the host's memory accesses and `machine.inspect`.
"""

from __future__ import annotations

import random
import struct
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pkvm.abi import psci
from pkvm.abi.ffa import FFA_ERROR, FFA_MEM_FRAG_RX, FFA_SUCCESS
from pkvm.abi.ffa import ffa_emad_size as emad_size
from pkvm.machine.firmware import board_mpidr

SP_ID = 0x8001


def mem_descriptor(version: int, ranges: list[tuple[int, int]], *, receiver: int = SP_ID,
                   sender: int = 0, ep_count: int = 1, ep_mem_offset: int | None = None,
                   composite_off: int | None = None, total_pages: int | None = None,
                   range_count: int | None = None, handle: int = 0) -> bytes:
    """An FF-A v1.1+ memory-transaction descriptor for `ranges` [(address, 4K pages)]."""
    esize = emad_size(version)
    ep_off = 48 if ep_mem_offset is None else ep_mem_offset
    comp = 48 + esize if composite_off is None else composite_off
    total = sum(n for _, n in ranges) if total_pages is None else total_pages
    cnt = len(ranges) if range_count is None else range_count
    size = max(48 + esize, comp + 16 + 16 * len(ranges) if comp < 4096 else 0)
    if ep_off + esize <= 4096:
        size = max(size, ep_off + esize)
    buf = bytearray(size)
    struct.pack_into("<HHIQQIII", buf, 0, sender, 0x2F, 0, handle, 0, esize, ep_count, ep_off)
    emad_at = ep_off if ep_off + esize <= 4096 else 48  # a wild offset: the EMAD stays at 48
    struct.pack_into("<HBBI", buf, emad_at, receiver, 0x6, 0, comp)
    if comp + 16 <= size:
        struct.pack_into("<IIQ", buf, comp, total & 0xFFFF_FFFF, cnt & 0xFFFF_FFFF, 0)
        for i, (addr, n) in enumerate(ranges):
            struct.pack_into("<QII", buf, comp + 16 + 16 * i, addr, n, 0)
    return bytes(buf)


@dataclass
class FfaHost:
    """The host's FF-A driver over `machine.smc` (on `cpu`): the mailbox, the handles of
    complete transactions and of fragmented ones still open (`pending`)."""

    m: Any
    version: int = 0
    tx: int = 0
    rx: int = 0
    handles: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    cpu: int = 0
    pool: list[int] = field(default_factory=list)  # host pages the hostile calls name

    def negotiate(self, version: int = 0x1_0001) -> int:
        r = self.m.smc(self.cpu, "FFA_VERSION", version)
        if r.x0 > 0:
            self.version = r.regs[0]
        return int(r.x0)

    def map_mailbox(self) -> Any:
        self.tx = self.m.host.alloc_pages(1)
        self.rx = self.m.host.alloc_pages(1)
        return self.m.smc(self.cpu, "FFA_RXTX_MAP", self.tx, self.rx, 1)

    def send(self, fid: str, desc: bytes, length: int | None = None,
             fraglen: int | None = None) -> Any:
        self.m.host.write(self.tx, desc[:4096])
        n = len(desc) if length is None else length
        f = min(len(desc), 4096) if fraglen is None else fraglen
        r = self.m.smc(self.cpu, fid, n, f, 0, 0)
        if r.regs[0] == FFA_SUCCESS:
            self.handles.append(r.regs[2] | r.regs[3] << 32)
        elif r.regs[0] == FFA_MEM_FRAG_RX:
            self.pending.append(r.regs[1] & 0xFFFF_FFFF | (r.regs[2] & 0xFFFF_FFFF) << 32)
        return r

    def share(self, ranges: list[tuple[int, int]], lend: bool = False, **kw: Any) -> Any:
        return self.send("FFA_MEM_LEND" if lend else "FFA_MEM_SHARE",
                         mem_descriptor(self.version, ranges, **kw))

    def frag_tx(self, handle: int, data: bytes, fraglen: int | None = None) -> Any:
        self.m.host.write(self.tx, data[:4096])
        f = len(data) if fraglen is None else fraglen
        r = self.m.smc(self.cpu, "FFA_MEM_FRAG_TX", handle & 0xFFFF_FFFF, handle >> 32, f, 0)
        if r.regs[0] == FFA_SUCCESS:
            self.handles.append(handle)
        if r.regs[0] != FFA_MEM_FRAG_RX and handle in self.pending:
            self.pending.remove(handle)
        return r

    def reclaim(self, handle: int, flags: int = 0) -> Any:
        r = self.m.smc(self.cpu, "FFA_MEM_RECLAIM", handle & 0xFFFF_FFFF, handle >> 32, flags)
        if r.regs[0] == FFA_SUCCESS and handle in self.handles:
            self.handles.remove(handle)
        return r

    def page(self, rng: random.Random) -> int:
        """A host page from a small pool (new ones now and then; the pool is reused so that
        pages go through every state: shared, lent, reclaimed, shared again)."""
        if len(self.pool) < 4 or (len(self.pool) < 24 and rng.random() < 0.25):
            self.pool.append(self.m.host.alloc_pages(1))
        return rng.choice(self.pool)


# -- hostile operations ------------------------------------------------------------------------
def _page_in_some_state(m: Any, rng: random.Random, host: FfaHost | None = None) -> int:
    """A page address: host-owned (fresh or from the host's pool: maybe shared or lent with the
    secure world already), hyp-owned (carve-out), outside RAM, below RAM, unaligned, any RAM
    page, or the mailbox itself (shared with the hyp and pinned)."""
    ram = next(r for r in m.memory_map() if r.kind == "ram")
    hyp = next(r for r in m.memory_map() if r.kind == "hyp")
    choice = rng.randrange(8 if host is not None else 6)
    if choice == 0:
        return host.page(rng) if host is not None else int(m.host.alloc_pages(1))
    if choice == 1:
        return int(hyp.start) + rng.randrange(hyp.size >> 12) * 4096
    if choice == 2:
        return int(ram.end) + 4096 * rng.randrange(16)
    if choice == 3:
        return rng.randrange(ram.start >> 12) << 12
    if choice == 4:
        page = host.page(rng) if host is not None else m.host.alloc_pages(1)
        return page + rng.choice((1, 8, 0x800))
    if choice == 5:
        return int(ram.start) + rng.randrange(ram.size >> 12) * 4096
    if choice == 6 and host is not None:
        return host.page(rng)
    return rng.choice((host.tx, host.rx)) if host is not None and host.tx else ram.start


def _ranges(m: Any, host: FfaHost, rng: random.Random) -> list[tuple[int, int]]:
    """1-3 constituents: mostly one page of the host's pool (which may be shared already),
    else pages in every state, of 0, 1, 2 or 2^32-1 pages; sometimes one named twice
    (overlapping ranges)."""
    ranges = [(host.page(rng), 1) if rng.random() < 0.6 else
              (_page_in_some_state(m, rng, host), rng.choice((1, 1, 1, 2, 0, 0xFFFF_FFFF)))
              for _ in range(rng.randrange(1, 4))]
    if rng.random() < 0.2:
        ranges.append(ranges[0])
    return ranges


def hostile_ffa_op(m: Any, host: FfaHost, rng: random.Random) -> Any:
    """One FF-A call with hostile contents; returns the SMC's result."""
    v = host.version or 0x1_0001
    op = rng.choices(range(10), (6, 3, 2, 2, 1, 1, 2, 1, 1, 2))[0]
    if op == 0:  # ranges in every state, sometimes overlapping
        return host.share(_ranges(m, host, rng), lend=rng.random() < 0.5)
    if op == 1:  # hostile offsets and counts in a well-placed descriptor
        page = host.page(rng)
        kw: dict[str, Any] = rng.choice([
            {"ep_mem_offset": rng.choice((0, 4000, 4090, 0xFFFF_FFF0, 47))},
            {"composite_off": rng.choice((0, 4090, 0xFFFF_FFF8, 12))},
            {"ep_count": rng.choice((0, 2, 0xFFFF_FFFF))},
            {"sender": rng.choice((1, 0x8001))},
            {"range_count": rng.choice((0, 300, 0xFFFF_FFFF))},
            {"total_pages": rng.choice((0, 2, 0xFFFF_FFFF))},
            {"receiver": rng.choice((0, 0x8002, 0xFFFF))},
        ])
        return host.share([(page, 1)], **kw)
    if op == 2:  # fragment lengths against the announced length
        desc = mem_descriptor(v, [(host.page(rng), 1)])
        return host.send("FFA_MEM_SHARE", desc, length=rng.choice((len(desc) - 16, len(desc) + 16,
                                                                   0xFFFF_FFFF)),
                         fraglen=rng.choice((len(desc), 63, 4097, len(desc) + 1)))
    if op == 3:  # a fragmented transaction: the first fragment, the rest announced
        ranges = _ranges(m, host, rng)
        desc = mem_descriptor(v, ranges)
        more = 16 * rng.choice((1, 1, 2))
        return host.send(rng.choice(("FFA_MEM_SHARE", "FFA_MEM_LEND")), desc,
                         length=len(desc) + more, fraglen=len(desc))
    if op == 4 and host.pending:  # the next fragment of an open transaction, maybe hostile
        data = b"".join(struct.pack("<QII", a, n, 0) for a, n in _ranges(m, host, rng)[:2])
        return host.frag_tx(rng.choice(host.pending), data,
                            fraglen=rng.choice((len(data), len(data), 16, 15, 4112)))
    if op in (3, 4, 5) and host.handles:  # reclaim (maybe twice)
        return host.reclaim(rng.choice(host.handles), flags=rng.choice((0, 0, 1, 0xFFFF_FFFF)))
    if op == 6:  # reclaim of a made-up handle
        return host.reclaim(rng.choice((rng.getrandbits(64), rng.randrange(64))))
    if op == 7:  # FRAG_TX without a transaction, or with garbage
        data = struct.pack("<QII", _page_in_some_state(m, rng, host), 1, 0)
        return host.frag_tx(rng.getrandbits(64), data, fraglen=rng.choice((16, 15, 4112)))
    if op == 8:  # mailbox games
        a, b = _page_in_some_state(m, rng, host), _page_in_some_state(m, rng, host)
        return m.smc(host.cpu, rng.choice(("FFA_RXTX_MAP", "FFA_RXTX_UNMAP")), a, b,
                     rng.choice((1, 0, 2)))
    return m.smc(host.cpu, rng.choice((0x8400_0068, 0x8400_0064, 0x8400_0065, 0x8400_0063,
                                       0x8400_0069, 0x8400_0066, 0xC400_0074, 0x8400_007A,
                                       0x8400_0060 + rng.randrange(0xA0))),
                 *(rng.choice((0, 1, rng.getrandbits(32), 0x8400_0073, 0x1_0000, 0x1_0002))
                   for _ in range(5)))


# -- the FF-A owner ----------------------------------------------------------------------------
class FfaOwnerViolation(AssertionError):
    pass


def check_ffa_owner(m: Any) -> None:
    """Pages the secure world holds are host SHARED_OWNED; host SHARED_OWNED pages with no
    hyp or guest borrower are held by the secure world."""
    spmc = m.firmware.spmc
    held = spmc.pages_in_use() if spmc is not None else set()
    for pfn in held:
        info = m.inspect.page(pfn)
        if info.host != "SHARED_OWNED":
            raise FfaOwnerViolation(f"pfn {pfn:#x} is in an FF-A transaction but host {info.host}")
        if info.hyp != "NOPAGE":
            raise FfaOwnerViolation(f"pfn {pfn:#x} shared with FF-A is also the hyp's ({info.hyp})")
    # Host SHARED_OWNED pages beyond those lent to the hyp (hyp SHARED_BORROWED) belong to the
    # secure world when no guest borrows any page; with guest shares, look page by page.
    counts = m.inspect.page_counts()
    free = counts.get(("host", "SHARED_OWNED"), 0) - counts.get(("hyp", "SHARED_BORROWED"), 0)
    guest_borrowed = any(k[1] == "SHARED_BORROWED" for k in counts if k[0] not in ("host", "hyp"))
    if not guest_borrowed:
        if free != len(held):
            raise FfaOwnerViolation(f"{free} host SHARED_OWNED pages without a hyp borrower, "
                                    f"{len(held)} held by the secure world")
        return
    ram = next(r for r in m.memory_map() if r.kind == "ram")
    for pfn in range(ram.start >> 12, ram.end >> 12):
        info = m.inspect.page(pfn)
        if info.host == "SHARED_OWNED" and info.hyp == "NOPAGE" and not info.guests \
                and not info.share_count and pfn not in held:
            raise FfaOwnerViolation(f"pfn {pfn:#x} host SHARED_OWNED with no borrower")


def attach_ffa_owner_check(m: Any) -> None:
    """Run `check_ffa_owner` after every SMC the FF-A proxy handled (a machine listener)."""

    def after(rec: Any) -> None:
        if rec.panic is None and rec.name.startswith("smc:ffa:"):
            check_ffa_owner(m)

    m.listeners.append(after)


# -- for the fuzzer (`pkvm fuzz --smc`) -------------------------------------------------------
# A step is ("smc_ffa", seed) or ("smc_psci", seed), drawn by `smc_ops`: replayable, since what
# it allocates and sends depends only on the seed and the machine's history. The fuzzer's
# machine has a secure world (`Machine(ffa=True)`), so the steps reach the proxy's memory paths.
_HOSTS: "weakref.WeakKeyDictionary[Any, FfaHost]" = weakref.WeakKeyDictionary()
# Host PSCI calls the fuzzer makes: all but those that end a CPU or the machine (CPU_OFF,
# SYSTEM_OFF/RESET/RESET2/OFF2, SYSTEM_SUSPEND), which leave nothing for later steps to do.
PSCI_FUZZ_CALLS = (
    psci.PSCI_0_2_FN_PSCI_VERSION, psci.PSCI_1_0_FN_PSCI_FEATURES, psci.PSCI_0_2_FN_CPU_ON,
    psci.PSCI_0_2_FN64_CPU_ON, psci.PSCI_0_2_FN_CPU_SUSPEND, psci.PSCI_0_2_FN64_CPU_SUSPEND,
    psci.PSCI_0_2_FN_AFFINITY_INFO, psci.PSCI_0_2_FN64_AFFINITY_INFO, psci.PSCI_0_2_FN64_MIGRATE,
    psci.PSCI_0_2_FN_MIGRATE_INFO_TYPE, psci.PSCI_0_2_FN64_MIGRATE_INFO_UP_CPU,
    psci.PSCI_1_0_FN_SET_SUSPEND_MODE, 0x8000_0000, 0x8000_0001, 0x8000_7FFF)


def smc_result_label(rec: Any) -> str:
    """A host SMC's result for the coverage table: FF-A's status (and error code), or x0."""
    x0 = rec.x0 & 0xFFFF_FFFF_FFFF_FFFF
    if x0 == FFA_ERROR:
        code = rec.x2 & 0xFFFF_FFFF
        return f"FFA_ERROR {code - (1 << 32) if code >> 31 else code}"
    names = {FFA_SUCCESS: "FFA_SUCCESS", FFA_MEM_FRAG_RX: "FFA_MEM_FRAG_RX"}
    return names.get(x0, f"x0={rec.x0}")


def smc_ops(r: random.Random) -> list[tuple[str, int, Callable[[], tuple[int]]]]:
    """The fuzzer's SMC operations and their weights (`pkvm.check.fuzz_gen.generate`)."""
    return [("smc_ffa", 20, lambda: (r.getrandbits(32),)),
            ("smc_psci", 2, lambda: (r.getrandbits(32),))]


def run_smc_step(m: Any, cpu: int, op: str, a: tuple[int, ...]) -> Any:
    """Perform one fuzzer SMC step on `cpu` (`pkvm.check.fuzz_ops.run_step`)."""
    if op == "smc_psci":
        return psci_step(m, cpu, a[0])
    return ffa_step(m, a[0], cpu)


def ffa_step(m: Any, seed: int, cpu: int = 0) -> Any:
    """One hostile FF-A call: negotiate and map a mailbox on first use, then `hostile_ffa_op`."""
    host = _HOSTS.get(m)
    if host is None:
        host = _HOSTS[m] = FfaHost(m)
        if host.negotiate(m.profile.ffa_hyp_version) > 0:
            host.map_mailbox()
    host.cpu = cpu
    return hostile_ffa_op(m, host, random.Random(seed))


def psci_step(m: Any, cpu: int, seed: int) -> Any:
    """One host PSCI call with hostile arguments: MPIDRs of CPUs that exist or not, entry
    points and context IDs anywhere (RAM, the carve-out, MMIO, unaligned), any power state."""
    rng = random.Random(seed)
    hyp = next(r for r in m.memory_map() if r.kind == "hyp")

    def arg() -> int:
        return rng.choice((board_mpidr(rng.randrange(m.nr_cpus)), board_mpidr(m.nr_cpus + 3),
                           m.host.alloc_pages(1) + rng.choice((0, 2)), hyp.start, 0, 1,
                           rng.getrandbits(32), rng.getrandbits(64)))

    return m.smc(cpu, rng.choice(PSCI_FUZZ_CALLS), arg(), arg(), arg())
