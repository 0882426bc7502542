"""The invariants' catalog (`INVARIANTS`: each promise by name) and the violation they raise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pkvm.machine.memory import PAGE_SHIFT


@dataclass(frozen=True)
class Invariant:
    name: str
    doc: str


INVARIANTS: dict[str, Invariant] = {i.name: i for i in [
    Invariant("state-pair", "each RAM page's (host, hyp, guest) states are a combination the "
              "kernel's transitions produce (nvhe/mem_protect.c), so it has exactly one owner"),
    Invariant("guest-consistent", "a guest stage-2 mapping agrees with the host and hyp states: "
              "guest OWNED needs host/hyp NOPAGE, guest SHARED_BORROWED needs host SHARED_OWNED "
              "and host_share_guest_count = number of such mappings; one guest owner at most"),
    Invariant("host-s2-agrees", "the host stage-2 tells the same story: host NOPAGE <=> an "
              "ownership annotation (owner hyp for hyp pages, a guest for guest pages)"),
    Invariant("hyp-s1-agrees", "hyp OWNED pages are mapped in the hyp stage-1; a SHARED_BORROWED "
              "page is mapped exactly while pinned (7.2); NOPAGE pages are not mapped"),
    Invariant("no-host-access", "every valid host stage-2 leaf is an identity map of memory the "
              "host owns or shares; never a hyp or guest-private page"),
    Invariant("pin-refcount", "a host page shared with the hyp has refcount = its users (pins "
              "by live hyp VMs' struct kvm and hyp vCPUs' struct kvm_vcpu)"),
    Invariant("vm-refcount", "a hyp VM page's refcount = CPUs with one of its vCPUs loaded "
              "(7.2); 0 between calls (6.12)"),
    Invariant("vm-table", "the VM table holds only free, reserved or hyp VMs whose handle "
              "matches their slot; loaded vCPUs belong to live VMs and are loaded where the "
              "per-CPU pointer says"),
    Invariant("table-pages", "every page-table page is hyp-owned, in one table only, with "
              "refcount 1 + counted entries"),
    Invariant("hyp-accounting", "every hyp-owned page outside the carve-out belongs to a live "
              "VM: its hyp VM or vCPU structs, stage-2 pool or tables, or a vCPU memcache"),
    Invariant("pool-free-lists", "free pool blocks have refcount 0, are zero and sit on one "
              "free list"),
    Invariant("ghost", "the model's result and abstract post-state equal the ghost "
              "specification's (pkvm.check.ghost)"),
    Invariant("no-warn", "no hyp WARN_ON fires on a path the host can reach (a WARN the host can "
              "provoke is a kernel bug: the host gets an errno instead)"),
    Invariant("noted-stores", "every store the hyp makes to a hyp_vmemmap entry is noted for "
              "the incremental check (HypVmemmap.touch); an unnoted one escapes the per-call "
              "checks until the next full check (a model fault, not a kernel rule)"),
    Invariant("no-exception", "nothing a host passes makes the hyp raise anything but HypPanic"),
    Invariant("ffa-owner", "every RAM page the secure world holds is host SHARED_OWNED and not "
              "the hyp's; every host SHARED_OWNED page no hyp or guest borrows is held by the "
              "secure world (pkvm.check.ghost_ffa)"),
]}


class InvariantViolation(AssertionError):
    """A promise of pKVM no longer holds; the message says which and what differs."""

    def __init__(self, invariant: str, detail: str, pfn: int | None = None,
                 expected: Any = None, found: Any = None, call: str | None = None):
        self.invariant = invariant
        self.detail = detail
        self.pfn = pfn
        self.expected = expected
        self.found = found
        self.call = call
        super().__init__(self._render())

    def _render(self) -> str:
        inv = INVARIANTS.get(self.invariant)
        lines = [f"invariant {self.invariant!r} violated" + (f" after {self.call}" if self.call else "")]
        if inv is not None:
            lines.append(f"  promise : {inv.doc}")
        if self.pfn is not None:
            lines.append(f"  page    : pfn {self.pfn:#x} (pa {self.pfn << PAGE_SHIFT:#x})")
        lines.append(f"  what    : {self.detail}")
        if self.expected is not None or self.found is not None:
            lines.append(f"  expected: {self.expected}")
            lines.append(f"  found   : {self.found}")
        return "\n".join(lines)
