"""What the hardware does with a stage-2 table: translate an IPA, or fault to EL2.

This is the walker of the *hardware* (the MMU), separate from the hyp's software walker: it
reads descriptors from RAM exactly as a CPU would, so a host access is checked against whatever
the hyp actually wrote, not against the hyp's bookkeeping.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from pkvm.machine.memory import PhysMemory

HCR_VM: Final = 1 << 0
HCR_FWB: Final = 1 << 46

_ADDR: Final = ((1 << 48) - 1) & ~0xFFF
S2AP_R: Final = 1 << 6
S2AP_W: Final = 1 << 7

FAULT_TRANSLATION: Final = "translation"
FAULT_PERMISSION: Final = "permission"


@dataclass
class El2Regs:
    """A CPU's EL2 system registers the model uses (per CPU)."""

    hcr_el2: int = 0
    vttbr_el2: int = 0
    vtcr_el2: int = 0
    cntvoff_el2: int = 0
    # The host's general-purpose registers as EL2 sees them at an HVC (x0..x30).
    host_regs: list[int] = field(default_factory=lambda: [0] * 31)


@dataclass(frozen=True)
class S2Fault:
    kind: str
    level: int
    ipa: int
    write: bool


def s2_translate(mem: PhysMemory, root: int, ipa: int, write: bool) -> tuple[int, S2Fault | None]:
    """Walk a 4-level, 4 KiB-granule stage-2 from `root`: (pa, None) or (0, fault)."""
    out, fault, _shift = s2_walk(mem, root, ipa, write)
    return out, fault


def s2_walk(mem: PhysMemory, root: int, ipa: int, write: bool) -> tuple[int, S2Fault | None, int]:
    """`s2_translate`, and the log2 size of the leaf that translated (0 on a fault)."""
    out, shift, fault = _walk(mem, root, ipa, write)
    if not fault:
        return out, None, shift
    kind = FAULT_PERMISSION if fault & _FAULT_PERM else FAULT_TRANSLATION
    return 0, S2Fault(kind, (fault & 7) - 1, ipa, write), 0


_FAULT_PERM: Final = 8  # `_walk`'s fault code: 1 + level, | this for a permission fault


def _walk(mem: PhysMemory, root: int, ipa: int, write: bool) -> tuple[int, int, int]:
    """`s2_walk` without a fault object (the TLB's misses only ask whether it faults): (pa,
    log2 leaf size, 0), or (0, 0, 1 + level of the fault, | `_FAULT_PERM` for a permission
    fault). Each descriptor read is `PhysMemory.read_u64`'s native call."""
    table = root
    for level in range(4):
        shift = 39 - 9 * level
        pte = mem.read_u64(table + ((ipa >> shift) & 511) * 8)
        if not pte & 1:
            return 0, 0, 1 + level
        if level < 3 and pte & 2:
            table = pte & _ADDR
            continue
        if level == 3 and not pte & 2:
            return 0, 0, 1 + level
        if not pte & (S2AP_W if write else S2AP_R):
            return 0, 0, (1 + level) | _FAULT_PERM
        mask = (1 << shift) - 1
        return (pte & _ADDR & ~mask) | (ipa & mask), shift, 0
    raise AssertionError("unreachable")


class Tlb:
    """Translations an MMU cached for one translation regime, held until a TLBI drops them.

    An entry is keyed by input page and holds whatever the walk that filled it produced
    (`pa` page or -1 for a non-RAM output, writable) and a check mark: the EL2 stage-1's TLB
    keeps the table generation at which the entry was last known to agree with the table; the
    host stage-2's keeps 0 while nothing the entry's walk read has changed since, 1 once a
    descriptor covering it was replaced (`mark_range`, told by the table of every such
    store). A hit on a changed entry is walked again: if the fresh walk disagrees, the entry
    is stale and is still used (as hardware would use it), and the use is recorded in
    `stale_uses`. An unchanged entry costs nothing on a hit. Invalidation follows the TLBI
    forms the kernel issues: by address and leaf level (`vale2is`, `ipas2e1is`), by address
    with an unknown level (a table removed: every entry under it), and all (`vmalls12e1`,
    `vmalle2`)."""

    __slots__ = ("name", "entries", "stale_uses", "_max_log")

    def __init__(self, name: str, max_log: int = 64):
        self.name = name
        # key -> (pa page | -1, writable, mark): a tuple of ints, which the garbage collector
        # stops tracking (a host TLB holds an entry per page the host touched: 262,144 lists
        # for a 1 GiB guest's backing made every full collection walk them all).
        self.entries: dict[int, Sequence[int]] = {}
        self.stale_uses: list[str] = []
        self._max_log = max_log

    def __reduce__(self) -> tuple[Any, ...]:
        """Made again, then its attributes set back (compiled, a class whose `__init__` takes
        arguments does not unpickle by its attributes alone)."""
        return (Tlb, (self.name, self._max_log), self.__getstate__())

    def flush_all(self) -> None:
        self.entries.clear()

    def flush_va(self, addr: int, level: int) -> None:
        """Invalidate the translations of `addr` made by a leaf at `level` (its whole block)."""
        shift = 12 + 9 * (3 - level)
        self.flush_range(addr & ~((1 << shift) - 1), 1 << shift)

    def flush_range(self, start: int, size: int) -> None:
        entries = self.entries
        first, n = start >> 12, max(1, size >> 12)
        if n * 2 > len(entries):  # cheaper to look at every entry
            for key in [k for k in entries if first <= (k >> 1) < first + n]:
                del entries[key]
            return
        for page in range(first, first + n):  # (`in` and `del`: compiled, `pop` is a method call)
            key = page << 1
            if key in entries:
                del entries[key]
            if key | 1 in entries:
                del entries[key | 1]

    def mark_range(self, start: int, size: int) -> None:
        """A descriptor translating [start, start + size) was replaced: each entry of that range
        is walked again at its next use (mark 1)."""
        entries = self.entries
        first, n = start >> 12, max(1, size >> 12)
        if n * 2 > len(entries):  # cheaper to look at every entry
            for key in [k for k, e in entries.items() if first <= (k >> 1) < first + n and not e[2]]:
                e = entries[key]
                entries[key] = (e[0], e[1], 1)
            return
        for page in range(first, first + n):
            for key in (page << 1, page << 1 | 1):  # its read and its write translation
                hit = entries.get(key)
                if hit is not None and not hit[2]:
                    entries[key] = (hit[0], hit[1], 1)

    def record_stale(self, what: str) -> None:
        if len(self.stale_uses) < self._max_log:
            self.stale_uses.append(f"{self.name}: {what}")


S2_WALK_FAULT: Final = -2  # `tlb_s2_translate`: nothing cached and the walk faults


def tlb_s2_translate_in(tlb: Tlb, mem: PhysMemory, root: int, ipa: int, write: bool,
                        leaf: list[int]) -> int:
    """`tlb_s2_translate` of one of a range's consecutive accesses, with nothing stored to
    memory between them (a host range access, `HvcDoor.host_spans`): `leaf` ([first IPA, end
    IPA, PA of the first], [0, 0, 0] at the range's start) holds the block the range's last
    walk ended at. A miss inside it is filled from it: a walk of that page would read the same
    descriptors and give the same entry (mark 0), so none is made; a hit, or a miss outside
    it, is `tlb_s2_translate`'s (a miss's walk then records its leaf)."""
    key = (ipa >> 12) << 1 | write
    entries = tlb.entries
    if key in entries:
        return tlb_s2_translate(tlb, mem, root, ipa, write)
    if leaf[0] <= ipa < leaf[1]:
        out = leaf[2] + (ipa - leaf[0])
    else:
        out, shift, code = _walk(mem, root, ipa, write)
        if code:
            return S2_WALK_FAULT
        first = ipa & ~((1 << shift) - 1)
        leaf[0], leaf[1], leaf[2] = first, first + (1 << shift), out - (ipa - first)
    page = (out & ~0xFFF) if mem.is_ram(out) else -1
    entries[key] = (page, write, 0)
    return out if page >= 0 else -1


def tlb_s2_translate(tlb: Tlb, mem: PhysMemory, root: int, ipa: int, write: bool) -> int:
    """An access to `ipa` through a stage-2 TLB (the host's): the PA it reaches, -1 where that
    is not RAM, or `S2_WALK_FAULT` where nothing is cached and the walk from `root` faults (the
    caller takes the fault and asks again). A miss that walks fills the TLB (mark 0); a hit on
    an entry marked changed (`Tlb.mark_range`) is walked again: a fresh walk that agrees clears
    the mark, one that disagrees is recorded as a stale use and the cached output still used,
    as hardware would."""
    key = (ipa >> 12) << 1 | write
    entries = tlb.entries
    hit = entries.get(key)
    if hit is None:
        out, _shift, code = _walk(mem, root, ipa, write)
        if code:
            return S2_WALK_FAULT
        return _fill(tlb, mem, key, out, write)
    if hit[2]:
        out, fault = s2_translate(mem, root, ipa, write)
        fresh = -1 if fault is not None else ((out & ~0xFFF) if mem.is_ram(out) else -1)
        if fault is None and fresh == hit[0]:
            entries[key] = (hit[0], hit[1], 0)
        else:
            now = f"a {fault.kind} fault" if fault is not None else f"PA {fresh:#x}"
            tlb.record_stale(f"host {'write' if write else 'read'} of IPA {ipa:#x} used the "
                             f"cached PA {hit[0]:#x}; the host stage-2 gives {now}")
    return hit[0] + (ipa & 0xFFF) if hit[0] >= 0 else -1


def _fill(tlb: Tlb, mem: PhysMemory, key: int, out: int, write: bool) -> int:
    """A miss's walk reached `out`: the TLB entry it fills (mark 0), and the access's answer."""
    page = (out & ~0xFFF) if mem.is_ram(out) else -1
    tlb.entries[key] = (page, write, 0)
    return out if page >= 0 else -1


def tlb_s2_translate_fault(tlb: Tlb, mem: PhysMemory, root: int, ipa: int,
                           write: bool) -> tuple[int, str | None]:
    """`tlb_s2_translate`, with the kind of the fault where it answers `S2_WALK_FAULT` (that of
    `s2_translate` of the same access: `FAULT_TRANSLATION` or `FAULT_PERMISSION`), from the
    same single walk: the host stage-2 abort path (`Machine.host_translate`), which needs the
    kind to judge the hyp's answer."""
    key = (ipa >> 12) << 1 | write
    if key in tlb.entries:  # a hit never faults
        return tlb_s2_translate(tlb, mem, root, ipa, write), None
    out, _shift, code = _walk(mem, root, ipa, write)
    if code:
        return S2_WALK_FAULT, FAULT_PERMISSION if code & _FAULT_PERM else FAULT_TRANSLATION
    return _fill(tlb, mem, key, out, write), None
