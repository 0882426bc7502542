"""The ghost of every host hypercall the page, VM-table and guest-memory ghosts do not cover.

Written from `nvhe/hyp-main.c` (`handle_host_hcall` and each `handle___*`), reading the machine
only through `pkvm.inspect`. For every HVC the host makes it predicts x0 (`SMCCC_RET_SUCCESS` for
a call the gate lets through to a handler, `SMCCC_RET_NOT_SUPPORTED` otherwise) and that x2, x3
come back as the host passed them (no handler writes them). For the calls listed in `RULES` it
also predicts x1 (the errno, or "unchanged": the handler writes no result) and, for the calls
that must not change the abstract state, that nothing in it changed: no `hyp_vmemmap` entry
(page states in 7.2, refcounts, share counts), no descriptor of the host stage-2, the hyp
stage-1 or any guest stage-2, and the VM table equal to the ghost's.

`LEFT_TO_INVARIANTS` lists the (few) parts the ghost deliberately does not predict, each with
its reason; docs/checking.md prints it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from pkvm.abi.host_structs import IFLAG_INCREMENT_PC, KVM, KVM_VCPU
from pkvm.abi.profiles import Profile
from pkvm.check.ghost_guest import Leaf
from pkvm.errors import EINVAL, ENODEV, EPERM
from pkvm.inspect import Inspector

if TYPE_CHECKING:
    from pkvm.board import TraceRecord

U64: Final = 0xFFFF_FFFF_FFFF_FFFF
NOT_SUPPORTED: Final = -1  # SMCCC_RET_NOT_SUPPORTED, as the signed x0 of a record
UNCHANGED: Final = "unchanged"  # the handler writes no result: x1 is what the host passed
EXIT_CODES: Final = frozenset({0, 1, 2, 3})  # ARM_EXCEPTION_IRQ, _EL1_SERROR, _TRAP, _IL
EC_DABT_LOW: Final = 0x24
EC_IABT_LOW: Final = 0x20
ESR_FSC_TYPE: Final = 0x3C
ESR_FSC_FAULT: Final = 0x04
HPFAR_FIPA: Final = ((1 << 44) - 1) & ~0xF  # HPFAR_EL2.FIPA, bits [43:4]


@dataclass(frozen=True)
class Rule:
    """What the ghost predicts for one hypercall: x1 (an errno, 0, UNCHANGED, or a callable
    of (ghost, pre, rec) giving it), whether the abstract state must stay unchanged, and the
    kernel function the prediction follows."""

    x1: Any
    frame: bool
    kernel: str


def _s64(v: int) -> int:
    v &= U64
    return v - (1 << 64) if v >> 63 else v


# The handlers that only flush, read or write EL2 registers, or refuse: no result, no change.
_FLUSH = {
    "__kvm_flush_vm_context": "handle___kvm_flush_vm_context",
    "__kvm_tlb_flush_vmid_ipa": "handle___kvm_tlb_flush_vmid_ipa",
    "__kvm_tlb_flush_vmid_ipa_nsh": "handle___kvm_tlb_flush_vmid_ipa_nsh",
    "__kvm_tlb_flush_vmid": "handle___kvm_tlb_flush_vmid",
    "__kvm_tlb_flush_vmid_range": "handle___kvm_tlb_flush_vmid_range",
    "__kvm_flush_cpu_context": "handle___kvm_flush_cpu_context",
    "__pkvm_tlb_flush_vmid": "handle___pkvm_tlb_flush_vmid (get_np_pkvm_hyp_vm, then put)",
    "__vgic_v3_save_vmcr_aprs": "handle___vgic_v3_save_vmcr_aprs",
    "__kvm_vcpu_run": "which exit code, and the guest context synced back into the host's "
                      "struct kvm_vcpu: they follow the guest's own execution (its pKVM calls "
                      "answered at EL2 are predicted one by one)",
    "__vgic_v3_save_aprs": "handle___vgic_v3_save_aprs",
    "__vgic_v3_restore_vmcr_aprs": "handle___vgic_v3_restore_vmcr_aprs",
    "__pkvm_vcpu_init_traps": "handle___pkvm_vcpu_init_traps (6.12)",
    "__tracing_unload": "handle___tracing_unload (nvhe/trace.h without tracing)",
    "__tracing_update_clock": "handle___tracing_update_clock",
    "__tracing_write_event": "handle___tracing_write_event",
}

RULES: Final[dict[str, Rule]] = {name: Rule(UNCHANGED, True, fn) for name, fn in _FLUSH.items()}
RULES.update({
    name: Rule(-ENODEV, True, f"handle_{name}: the nvhe/trace.h stub without tracing")
    for name in ("__tracing_load", "__tracing_enable", "__tracing_swap_reader",
                 "__tracing_reset", "__tracing_enable_event")})
RULES.update({
    "__kvm_timer_set_cntvoff": Rule(UNCHANGED, True, "handle___kvm_timer_set_cntvoff: "
                                    "CNTVOFF_EL2 of the calling CPU = x1"),
    "__kvm_adjust_pc": Rule(UNCHANGED, True, "handle___kvm_adjust_pc / __kvm_adjust_pc: "
                            "PC += 4 and INCREMENT_PC cleared if it was set"),
    "__pkvm_prot_finalize": Rule(-EPERM, True, "__pkvm_prot_finalize: HCR_EL2.VM already set"),
    "__pkvm_vcpu_in_poison_fault": Rule(
        lambda g, pre, rec: pre["want"], True,
        "handle___pkvm_vcpu_in_poison_fault / __pkvm_vcpu_in_poison_fault"),
    "__kvm_vcpu_run": Rule(
        lambda g, pre, rec: pre["want"], False,
        "handle___kvm_vcpu_run (7.2: the loaded vCPU, else -EINVAL; 6.12: "
        "pkvm_load_hyp_vcpu of the host vCPU's handle and index, else -EINVAL)"),
    "__vgic_v5_save_apr": Rule("panic", True, "a GICv5 instruction on a GICv3 CPU: undefined"),
    "__vgic_v5_restore_vmcr_apr": Rule("panic", True, "as __vgic_v5_save_apr"),
})

# What the ghost deliberately leaves to the invariants (name -> reason), printed in
# docs/checking.md. Every other part of every host hypercall's result and abstract post-state
# (page states, guest leaves, VM table, memcache bookkeeping) is predicted.
LEFT_TO_INVARIANTS: dict[str, str] = {
    "__pkvm_init_vm": "the errno of a refusal past its first checks (7.2 predicts the pin of "
                      "struct kvm, created_vcpus and the handle; 6.12 none): the donations "
                      "and the stage-2 set-up; the VM table is compared, the pages by the "
                      "invariants",
    "__pkvm_init_vcpu": "6.12: the errno of a refusal on a live VM; 7.2: whether a good "
                        "index is refused because the host never set up the VM's ID registers "
                        "(either 0 or -EINVAL is accepted there); the VM table is compared",
    "__pkvm_vcpu_init_traps": "(6.12) the trap values it computes into the host's struct "
                              "kvm_vcpu from the ID registers; x1 and the frame are compared",
    "__vgic_v3_save_vmcr_aprs": "the APRs it stores into the host's vgic_v3_cpu_if (the "
                                "model has no GIC list registers); x1 and the frame compared",
    "__kvm_vcpu_run": "which exit code, and the guest context synced back into the host's "
                      "struct kvm_vcpu: they follow the guest's own execution (its pKVM calls "
                      "answered at EL2 are predicted one by one)",
    "__vgic_v3_save_aprs": "the APRs it stores into the host's vgic_v3_cpu_if, as above",
}


class CallsGhost:
    """Predicts `RULES` and the gate for every host HVC; `fail(what, expected, found)` reports."""

    def __init__(self, inspect: Inspector, profile: Profile,
                 fail: Callable[[str, Any, Any], None],
                 frame_of: Callable[[], tuple[int, ...]], raced: Callable[[], bool]):
        self.i = inspect  # (typed: native calls, not attribute lookups by name)
        self.prof = profile
        self.fail = fail
        self.frame_of = frame_of  # the page-table generations (host s2, hyp s1, guests)
        self.raced = raced
        self.skipped = 0  # calls not judged: a racing host CPU changed their inputs
        self.pre: dict[str, Any] | None = None
        self.judged: Counter[str] = Counter()  # calls judged, by name
        self.guest_pages: set[int] | None = None  # set by the guest-HVC ghost during a run

    def name_of(self, func_id: int) -> tuple[str | None, bool]:
        """(name, dispatched): the call `func_id` names and whether the gate lets it through
        to a handler (`handle_host_hcall`)."""
        n = self.prof.decode(func_id)
        if n is None:
            return None, False
        name = self.prof.hcalls[n]
        return name, self.prof.gate(n, self.i.finalised()) and name != "__kvm_hyp_init"

    # -- pre-state -------------------------------------------------------------------------
    def before(self, cpu: int, func_id: int, args: tuple[int, ...]) -> None:
        name, ok = self.name_of(func_id)
        self.guest_pages = None
        a = [x & U64 for x in args] + [0] * 6
        pre: dict[str, Any] = {"name": name, "ok": ok, "cpu": cpu, "a": a, "fid": func_id,
                               "frame": self.frame_of() if not ok or name in RULES else None}
        if ok and name == "__kvm_adjust_pc":
            pa = self.i.host_ptr_pa(a[0])
            pre["vcpu_pa"] = pa
            pre["pc_iflags"] = self._pc_iflags(pa)
        elif ok and name in ("__pkvm_vcpu_in_poison_fault", "__kvm_vcpu_run"):
            pre["vcpu"] = self.i.loaded_vcpu(cpu)
            pre["fault"] = self.i.vcpu_fault(cpu)
            if name == "__kvm_vcpu_run" and not self.prof.explicit_vcpu_load:
                pre["lookup"] = self._run_lookup(a[0])
            # predicted from the pre-state alone
            pre["want"] = self.poison_fault(pre) if name == "__pkvm_vcpu_in_poison_fault" \
                else self.vcpu_run(pre)
        self.pre = pre

    def _u64(self, pa: int) -> int | None:
        lo, hi = self.i.ram_range()
        if not lo <= pa <= hi - 8:
            return None
        return int.from_bytes(self.i.read(pa, 8), "little")

    def _pc_iflags(self, pa: int) -> tuple[int | None, int | None]:
        return (self._u64(pa + KVM_VCPU.offset("arch.ctxt.pc")),
                self._u64(pa + KVM_VCPU.offset("arch.iflags")))

    def _run_lookup(self, host_vcpu: int) -> tuple[int, int] | None:
        """6.12: the (handle, vcpu_idx) the hyp reads from the host's vCPU and its kvm."""
        pa = self.i.host_ptr_pa(host_vcpu)
        kvm = self._u64(pa + KVM_VCPU.offset("kvm"))
        idx = self._u64(pa + KVM_VCPU.offset("vcpu_idx"))
        if kvm is None or idx is None:
            return None
        handle = self._u64(self.i.host_ptr_pa(kvm) + KVM.offset("arch.pkvm.handle"))
        return None if handle is None else (self.prof.handle(handle), idx & 0xFFFF_FFFF)

    # -- predictions ------------------------------------------------------------------------
    def panicked(self, rec: Any) -> None:
        """A call that brought the hyp down: counted as judged when its rule predicts it."""
        pre, self.pre = self.pre, None
        if pre is not None and pre["ok"] and pre["name"] in RULES and \
                RULES[pre["name"]].x1 == "panic":
            self.judged[pre["name"]] += 1

    def after(self, rec: TraceRecord, changed: set[int], table_same: Callable[[], None]) -> bool:
        """Judge `rec`; True when the call is one the other ghosts do not see (refused by the
        gate, or in `RULES`)."""
        pre, self.pre = self.pre, None
        if pre is None or rec.func_id != pre["fid"] or rec.cpu != pre["cpu"] or \
                rec.name.startswith("smc"):
            return False  # an SMC, or a call that never reached EL2 (its pre-state is stale)
        name, ok, a = pre["name"], pre["ok"], pre["a"]
        if rec.x2 != a[1] or rec.x3 != a[2]:
            self.fail(f"{rec.name}: x2, x3 come back as the host passed them",
                      (hex(a[1]), hex(a[2])), (hex(rec.x2), hex(rec.x3)))
        want_x0 = 0 if ok else NOT_SUPPORTED
        if rec.x0 != want_x0:
            self.fail(f"{rec.name}: x0 (gate: {'a handler' if ok else 'refused'})", want_x0,
                      rec.x0)
        rule = RULES.get(name) if ok and name else None
        if ok and rule is None:
            return False  # another ghost predicts it
        if rule is not None and self.raced():
            # A racing host store changed what the handler read (a host struct, a pointer):
            # its result follows from inputs the pre-state does not hold. Counted as skipped.
            self.skipped += 1
            return True
        key = name or "unknown function ID"
        self.judged[key if ok else f"{key} (refused by the gate)"] += 1
        if rule is None:  # refused by the gate: the handler never ran
            want: Any = UNCHANGED
            frame = True
        else:
            want = rule.x1(self, pre, rec) if callable(rule.x1) else rule.x1
            frame = rule.frame or want in (-EINVAL, UNCHANGED) and name == "__kvm_vcpu_run"
        if want == "panic":
            self.fail(f"{name}: the hyp survived", "a hyp panic", "returned")
        if want == UNCHANGED:
            want = _s64(a[0])
        if isinstance(want, frozenset):
            if rec.x1 not in want:
                self.fail(f"{name} result", sorted(want), rec.x1)
        elif rec.x1 != want:
            self.fail(f"{name} result", want, rec.x1)
        if frame:
            self._frame(rec, pre, changed, table_same)
        elif name == "__kvm_vcpu_run":
            self._run_frame(rec, pre, changed, table_same)
        self._effects(name, pre, rec)
        return True

    def _frame(self, rec: Any, pre: dict[str, Any], changed: set[int],
               table_same: Callable[[], None]) -> None:
        if changed:
            self.fail(f"{rec.name} changes no page (hyp_vmemmap entries)", "none",
                      sorted(hex(p) for p in changed)[:8])
        now = self.frame_of()
        if now != pre["frame"]:
            self.fail(f"{rec.name} writes no page-table descriptor (host s2, hyp s1, guests)",
                      pre["frame"], now)
        table_same()

    def _run_frame(self, rec: Any, pre: dict[str, Any], changed: set[int],
                   table_same: Callable[[], None]) -> None:
        """A run changes only the pages of the guest HVCs EL2 handled during it."""
        allowed = self.guest_pages or set()
        self.guest_pages = None
        extra = changed - allowed
        if allowed:  # a guest share/unshare may also split a host stage-2 block: table pages
            extra = {p for p in extra if (self.i.page_quick(p) or ("",))[:2] != ("NOPAGE", "OWNED")}
        if extra:
            self.fail(f"{rec.name}: pages changed outside the guest's own share/unshare calls",
                      sorted(hex(p) for p in allowed)[:8], sorted(hex(p) for p in extra)[:8])
        table_same()

    def _effects(self, name: str | None, pre: dict[str, Any], rec: Any) -> None:
        if name == "__kvm_timer_set_cntvoff":
            voff = self.i.cntvoff(pre["cpu"])
            if voff != pre["a"][0]:
                self.fail("__kvm_timer_set_cntvoff: CNTVOFF_EL2", hex(pre["a"][0]), hex(voff))
        elif name == "__kvm_adjust_pc":
            pc, iflags = pre["pc_iflags"]
            if pc is None or iflags is None:
                return
            if iflags & IFLAG_INCREMENT_PC:
                want = ((pc + 4) & U64, iflags & ~IFLAG_INCREMENT_PC)
            else:
                want = (pc, iflags)
            got = self._pc_iflags(pre["vcpu_pa"])
            if got != want:
                self.fail("__kvm_adjust_pc: the host vCPU's (pc, iflags) after",
                          tuple(map(hex, want)), tuple(hex(x or 0) for x in got))

    def poison_fault(self, pre: dict[str, Any]) -> int:
        """`__pkvm_vcpu_in_poison_fault` on the loaded vCPU's last fault."""
        vcpu, fault = pre["vcpu"], pre["fault"]
        if vcpu is None or fault is None:
            return -EINVAL
        esr, hpfar = fault
        if (esr >> 26) & 0x3F not in (EC_DABT_LOW, EC_IABT_LOW) or \
                esr & ESR_FSC_TYPE != ESR_FSC_FAULT:
            return -EINVAL
        ipa = ((hpfar & HPFAR_FIPA) >> 4) << 12
        leaf = Leaf.of(self.i.guest_leaf(vcpu["handle"], ipa))
        if leaf is None:
            return -EINVAL
        if leaf.ret:
            return leaf.ret
        if leaf.level != 3:
            return -EINVAL
        return 1 if leaf.state == "POISON" else 0

    def vcpu_run(self, pre: dict[str, Any]) -> Any:
        """The result of a run: -EINVAL with no vCPU to run, else an exit code."""
        if self.prof.explicit_vcpu_load:
            runs = pre["vcpu"] is not None
        else:
            got = pre.get("lookup")
            vm = self.i.vm(got[0]) if got is not None else None
            runs = vm is not None and got is not None and got[1] in vm["vcpus"] and \
                got[1] < len(vm["vcpus"])
        return EXIT_CODES if runs else -EINVAL
