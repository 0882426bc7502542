"""Stores into the hyp's own memory through a raw host pointer: a property of both kernels.

Some host hypercalls take a host kernel pointer in x1 and dereference it at EL2 as
`kern_hyp_va(ptr)` with no check of whose memory it is (`nvhe/hyp-main.c`:
`handle___kvm_adjust_pc`, `handle___kvm_tlb_flush_vmid*`, `handle___kvm_flush_cpu_context`,
`handle___vgic_v3_*`; in 6.12 also `handle___pkvm_vcpu_init_traps` and `handle___kvm_vcpu_run`).
The hyp maps its own pages, so a pointer into one of them (a hyp VM's donated struct, the
carve-out) makes the hyp read, and for the handlers that store, write, its own memory on the
host's behalf; a pointer to memory the hyp does not map is an EL2 data abort (an availability
finding, as on the real kernel).

`HostPointerWatch` keeps, before such a call, the bytes of every hyp-private page (hyp state
OWNED) the pointed structure can span, and after it reports any that changed: the hyp's own
memory was written through a host pointer. The fuzzer counts it as a finding of the kernel, not
of the model (the hyp's state is corrupt from then on, so the fuzzer reboots the machine); a
checked machine raises `HostPointerStore`.
"""

from __future__ import annotations

from typing import Any

from pkvm.machine.memory import PAGE_SHIFT, PAGE_SIZE

# The handlers whose kernel code stores through the raw host pointer in x1, and the structure
# the host driver passes there (how far from the pointer the stores can reach): `__kvm_adjust_pc`
# (the vCPU's pc and iflags), 6.12's `__pkvm_vcpu_init_traps` (its trap registers), the vGIC
# saves (`struct vgic_v3_cpu_if`'s VMCR and APRs). The other pointer handlers only read through
# it: a change of hyp memory in one of them is the model's bug, left to the invariants.
STORES_THROUGH_HOST_POINTER: dict[str, str] = {
    "__kvm_adjust_pc": "vcpu", "__pkvm_vcpu_init_traps": "vcpu",
    "__vgic_v3_save_vmcr_aprs": "cpu_if", "__vgic_v3_save_aprs": "cpu_if",
}


class HostPointerStore(Exception):
    """The hyp wrote its own memory through a raw host pointer (see the module)."""

    def __init__(self, call: str, pfns: list[int]):
        self.call = call
        self.pfns = pfns
        super().__init__(f"{call} stored through the host's pointer into hyp-owned page(s) "
                         f"{', '.join(hex(p) for p in pfns)}: Linux's raw-pointer handler "
                         "trusts kern_hyp_va() of the host's pointer")


def _watched(prof: Any) -> tuple[dict[str, int], dict[str, str]]:
    """How far from the pointer each structure reaches (a vCPU: all of struct kvm_vcpu; struct
    vgic_v3_cpu_if: less than a page), and the calls of `STORES_THROUGH_HOST_POINTER` that
    `prof` has."""
    span = {"vcpu": prof.sizeof_kvm_vcpu, "cpu_if": PAGE_SIZE}
    return span, {n: k for n, k in STORES_THROUGH_HOST_POINTER.items() if n in prof.hcalls}


# id(profile) -> (the profile, `_watched(profile)`): made once per profile (the ABI profiles are
# immutable), not at every checker a fuzzer's reboot makes; read only.
_WATCHED: dict[int, tuple[Any, tuple[dict[str, int], dict[str, str]]]] = {}


class HostPointerWatch:
    def __init__(self, inspect: Any):
        self._ins = inspect
        prof = inspect.profile
        known = _WATCHED.get(id(prof))
        if known is None or known[0] is not prof:
            known = _WATCHED[id(prof)] = (prof, _watched(prof))
        self._span, self._calls = known[1]
        self._call: str | None = None
        self._kept: dict[int, bytes] = {}

    def before(self, func: Any, args: tuple[int, ...]) -> None:
        self._call = None
        if func not in self._calls or not args:
            return
        span = self._span[self._calls[func]]
        pa = self._ins.host_ptr_pa(args[0])
        kept = {}
        for pfn in range(pa >> PAGE_SHIFT, ((pa + span - 1) >> PAGE_SHIFT) + 1):
            q = self._ins.page_quick(pfn)
            if q is not None and q[1] == "OWNED":
                kept[pfn] = self._ins.read(pfn << PAGE_SHIFT, PAGE_SIZE)
        if kept:
            self._call, self._kept = str(func), kept

    def after(self) -> None:
        """Raise `HostPointerStore` if the call just made wrote a hyp-owned page it pointed at."""
        if self._call is None:
            return
        call, self._call = self._call, None
        changed = [p for p, b in self._kept.items() if self._ins.read(p << PAGE_SHIFT, PAGE_SIZE) != b]
        if changed:
            raise HostPointerStore(call, changed)
