"""Deep random sequences for `pkvm conform --random`, and the coverage table of a run.

A sequence first builds live state on both machines, then attacks it, then reports the state
of every page it named:

1. set-up: VMs made through the VMM (`vmm:create`: on the real side `/dev/kvm` from the
   helper, on the model the host driver), normal and (7.2) protected, one of them destroyed at
   once so its handle is stale; a page shared with the hyp;
2. attack: hostile host hypercalls, every one of the kernel's (the tracing calls included),
   whose arguments are drawn by kind: handles (live, stale, reserved-range, another VM's,
   random), pfns (the sequence's own pages in every state it put them in, the UART's MMIO page,
   past RAM, random), gfns, `nr_pages` > 1, protections, x4..x6; on 7.2 blocks that load a vCPU
   on a CPU, make guest-memory calls on that CPU and put it again; on either CPU; guest runs;
3. probes: for each page named, a host read from the module (`host:read`: refused by the host
   stage-2 or not, and how many words are not zero), then `__pkvm_host_share_hyp` and
   `__pkvm_host_unshare_hyp`: both succeed only on a page the host owns alone, so the answers
   compare the page's state without changing it. A `vmm:destroy` reads the guest's RAM back
   after the teardown: pages given back must read as zeros.

Only memory both sides control is ever passed as a pointer (`va:`/`pa:` of the sequence's own
pages). Calls that dereference a host pointer to a structure the hyp trusts end the sequence
(a panic leaves nothing else observable).
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from typing import TYPE_CHECKING

from pkvm.abi.profiles import get_profile
from pkvm.conform.model import model_abi
from pkvm.conform.steps import RawStep, RealResult, host_read, vm_create, vm_destroy, vm_run, vm_topup
from pkvm.errors import errno_name

if TYPE_CHECKING:
    from pkvm.conform.diff import StepDiff

U64 = (1 << 64) - 1
HCR_GUEST = 0x8800_6000  # a plausible HCR_EL2 for __pkvm_vcpu_load's third argument
RAM_END_PFN = 0x80000  # 1 GiB at 0x4000_0000
UART_PFN = 0x9000  # QEMU virt's PL011
GUEST_GFN = 0x40000  # the helper's guest RAM base (IPA 0x4000_0000)

# Calls that follow a host pointer to a structure the hyp trusts (a vCPU, an MMU, a GIC
# interface): given a page of ours they read garbage and usually panic.
DEREF = {"__kvm_adjust_pc", "__kvm_tlb_flush_vmid_ipa", "__kvm_tlb_flush_vmid_ipa_nsh",
         "__kvm_tlb_flush_vmid", "__kvm_tlb_flush_vmid_range", "__kvm_flush_cpu_context",
         "__vgic_v3_save_vmcr_aprs", "__vgic_v3_save_aprs", "__vgic_v3_restore_vmcr_aprs",
         "__pkvm_vcpu_init_traps", "__vgic_v5_save_apr", "__vgic_v5_restore_vmcr_apr"}
# Argument kinds per call (the hyp-main.c handler's DECLARE_REG list); unknown: random words.
SIGS: dict[str, tuple[str, ...]] = {
    "__pkvm_host_share_hyp": ("pfn",), "__pkvm_host_unshare_hyp": ("pfn",),
    "__pkvm_host_donate_guest": ("pfn", "gfn"),
    "__pkvm_host_share_guest": ("pfn", "gfn", "nr", "prot"),
    "__pkvm_host_unshare_guest": ("handle", "gfn", "nr"),
    "__pkvm_host_relax_perms_guest": ("gfn", "prot"),
    "__pkvm_host_wrprotect_guest": ("handle", "gfn", "nr"),
    "__pkvm_host_test_clear_young_guest": ("handle", "gfn", "nr", "bool"),
    "__pkvm_host_mkyoung_guest": ("gfn",),
    "__pkvm_reserve_vm": (), "__pkvm_unreserve_vm": ("handle",),
    "__pkvm_init_vm": ("kva", "dva", "dva"), "__pkvm_init_vcpu": ("handle", "kva", "dva"),
    "__pkvm_vcpu_in_poison_fault": (), "__pkvm_force_reclaim_guest_page": ("pa",),
    "__pkvm_reclaim_dying_guest_page": ("handle", "gfn"),
    "__pkvm_start_teardown_vm": ("handle",), "__pkvm_finalize_teardown_vm": ("handle",),
    "__pkvm_teardown_vm": ("handle",),
    "__pkvm_vcpu_load": ("handle", "vcpu", "hcr"), "__pkvm_vcpu_put": (),
    "__pkvm_tlb_flush_vmid": ("handle",),
    "__tracing_load": ("va", "size"), "__tracing_unload": (), "__tracing_enable": ("bool",),
    "__tracing_swap_reader": ("cpu",), "__tracing_reset": ("cpu",),
    "__tracing_update_clock": ("u32", "u32", "word", "word"),
    "__tracing_enable_event": ("u16", "bool"), "__tracing_write_event": ("word",),
    "__kvm_flush_vm_context": (), "__kvm_timer_set_cntvoff": ("word",),
    "__kvm_vcpu_run": ("va",),
}
# Calls of a loaded vCPU (7.2): made inside a load/put block on the vCPU's CPU.
VCPU_CALLS = ("__pkvm_host_donate_guest", "__pkvm_host_share_guest",
              "__pkvm_host_relax_perms_guest", "__pkvm_host_mkyoung_guest",
              "__pkvm_vcpu_in_poison_fault", "__pkvm_host_unshare_guest",
              "__pkvm_host_wrprotect_guest", "__pkvm_host_test_clear_young_guest")


class _Gen:
    def __init__(self, kernel: str, rng: random.Random):
        self.prof = get_profile(model_abi(kernel))
        self.rng = rng
        self.names = list(self.prof.hcalls)
        prof = self.prof
        self.protected_vms = prof.protected_vms  # a VM may be made protected
        self.guest_memory_calls = prof.hyp_owned_guest_stage2  # VCPU_CALLS on a loaded vCPU
        self.two_phase_teardown = prof.two_phase_teardown
        # without an explicit vCPU load, __kvm_vcpu_run runs the host vCPU its pointer names
        deref = DEREF | ({"__kvm_vcpu_run"} if not prof.explicit_vcpu_load else set())
        self.pkvm_calls = [c for c in self.names[self.prof.min_pkvm:] if c not in deref]
        self.deref = sorted(deref & set(self.names))
        self.robin = [c for c in self.names[1:] if c not in deref]
        self.vms: list[str] = []
        self.protected: dict[str, bool] = {}  # the VMs made live, protected or not
        self.pages = ["page:p0", "page:p1", "page:p2", "page:s", "page:g"]

    def arg(self, kind: str) -> int | str:
        r, rng = self.rng.random(), self.rng
        if kind == "pfn":
            if r < 0.75:
                return rng.choice(self.pages)
            return rng.choice([UART_PFN, RAM_END_PFN, RAM_END_PFN + 1, 0, rng.getrandbits(64)])
        if kind == "handle":
            if r < 0.75 and self.vms:
                return rng.choice(self.vms)
            return rng.choice([0, 0x1000, 0x1001, 0x1002, 0x1003, 0xFFFF, rng.getrandbits(64)])
        if kind == "gfn":
            if r < 0.8:
                return GUEST_GFN + rng.choice([0, 1, 2, 0x10, 0x1FF])
            return rng.choice([0, 0xFFFFFFFFF, rng.getrandbits(64)])
        if kind == "nr":
            return rng.choice([1, 1, 2, 3, 512, 0, rng.getrandbits(64)])
        if kind == "prot":
            return rng.choice([1, 3, 5, 7, 2, 0, 8, 0xF, 0x17, rng.getrandbits(64)])
        if kind == "va":  # a page of ours only: the hyp may take it for a while
            return rng.choice(["va:p0", "va:s", "va:p1"])
        if kind == "kva":  # a struct kvm / kvm_vcpu to pin: ours, shared or not
            return rng.choice(["va:s", "va:p0"])
        if kind == "dva":  # memory to donate for a multi-page hyp structure: the shared page
            return "va:s"  # (refused whole); a page of ours would donate its neighbours too
        if kind == "pa":
            return rng.choice(["pa:p0", "pa:g", "pa:s"]) if r < 0.8 else rng.getrandbits(64)
        if kind == "vcpu":
            return rng.choice([0, 0, 1, 2, 8, rng.getrandbits(64)])
        if kind == "hcr":
            return HCR_GUEST if r < 0.7 else rng.getrandbits(64)
        if kind in ("cpu", "bool"):
            return rng.choice([0, 1, 2, rng.getrandbits(64)])
        if kind == "size":
            return rng.choice([0, 64, 4095, 4096, rng.getrandbits(64)])
        if kind == "u32":
            return rng.getrandbits(32)
        if kind == "u16":
            return rng.choice([0, 1, 2, rng.getrandbits(16)])
        return rng.getrandbits(64)

    def good(self, kind: str) -> int | str:
        """A value a well-behaved host would pass for an argument of this kind."""
        rng = self.rng
        live: list[int | str] = [v for v in self.vms if v != "vm:c"]
        table: dict[str, list[int | str]] = {
            "pfn": ["page:p0", "page:p1", "page:g"], "handle": live or [0x1000],
            "gfn": [GUEST_GFN, GUEST_GFN + 1, GUEST_GFN + 2], "nr": [1], "prot": [7, 3, 1, 5],
            "vcpu": [0], "hcr": [HCR_GUEST], "bool": [0, 1], "cpu": [0, 1], "size": [4096],
        }
        if kind in table:
            return rng.choice(table[kind])
        return self.arg(kind)

    def call(self, name: str, cpu: int) -> RawStep:
        sig = SIGS.get(name)
        if sig is None:
            sig = ("word",) * self.rng.randrange(4)
        if self.rng.random() < 0.4:  # plausible values, one of them perhaps hostile
            args = [self.good(k) for k in sig]
            if args and self.rng.random() < 0.3:
                i = self.rng.randrange(len(args))
                args[i] = self.arg(sig[i])
        else:
            args = [self.arg(k) for k in sig]
        if self.rng.random() < 0.15:  # garbage in the registers the call does not read
            args += [self.rng.getrandbits(64) for _ in range(self.rng.randrange(1, 7 - len(sig)))
                     ] if len(sig) < 6 else []
        return RawStep(name, tuple(args), cpu)

    def spoil(self, st: RawStep) -> RawStep:
        """A well-formed call with one argument redrawn from its kind's hostile values."""
        sig = SIGS[str(st.call)]
        i = self.rng.randrange(len(st.args))
        args = list(st.args)
        args[i] = self.arg(sig[i])
        return RawStep(st.call, tuple(args), st.cpu)

    def spoil_each(self, st: RawStep) -> list[RawStep]:
        """One spoiled copy of a well-formed call per argument (a copy equal to it left out)."""
        sig = SIGS[str(st.call)]
        out = []
        for i in range(len(st.args)):
            args = list(st.args)
            args[i] = self.arg(sig[i])
            if args[i] != st.args[i]:
                out.append(RawStep(st.call, tuple(args), st.cpu))
        return out

    def setup(self) -> list[RawStep]:
        rng, out = self.rng, []
        if rng.random() < 0.85:
            prot = self.protected_vms and rng.random() < 0.3
            out.append(vm_create("vm:a", rng.choice([1, 1, 2]), prot))
            self.vms.append("vm:a")
            self.protected["vm:a"] = prot
        if rng.random() < 0.35:
            prot = self.protected_vms and rng.random() < 0.5
            out.append(vm_create("vm:b", 1, prot))
            self.vms.append("vm:b")
            self.protected["vm:b"] = prot
        if rng.random() < 0.3:  # a VM already gone: its handle is stale
            out += [vm_create("vm:c", 1), vm_destroy("vm:c")]
            self.vms.append("vm:c")
        out.append(RawStep("__pkvm_host_share_hyp", ("page:s",), rng.randrange(2)))
        return out

    def block(self, cpu: int) -> list[RawStep]:
        """Load a vCPU on `cpu`, make guest-memory calls there, put it."""
        rng = self.rng
        live = list(self.protected)  # made at set-up (perhaps destroyed since)
        if live and rng.random() < 0.85:  # mostly what KVM would load: a vCPU of a live VM
            vm: int | str = rng.choice(live)
        else:
            vm = rng.choice(self.vms) if self.vms else 0
        idx = 0 if rng.random() < 0.7 else rng.choice([1, 1, 2, 8])  # vCPU 0 has run: it exists
        out = []
        if vm and rng.random() < 0.85:  # KVM tops the memcache up before such calls
            out.append(vm_topup(str(vm), idx, rng.choice([1, 2, 4, 8, 8])))
        out.append(RawStep("__pkvm_vcpu_load", (vm, idx, HCR_GUEST), cpu))
        for _ in range(rng.randrange(1, 5)):
            if rng.random() < 0.4 and vm in self.protected:  # a well-formed transfer
                page = rng.choice(["page:p0", "page:p1", "page:g"])
                gfn = GUEST_GFN + rng.choice([1, 2, 3, 0x10])
                if self.protected[vm]:
                    st = RawStep("__pkvm_host_donate_guest", (page, gfn), cpu)
                else:
                    prot = self.good("prot")
                    st = RawStep("__pkvm_host_share_guest", (page, gfn, 1, prot), cpu)
                # its refusal boundary first: the call with each argument in turn redrawn
                # from its kind's hostile values while the others stay valid (a refused call
                # changes nothing), then the call itself
                if rng.random() < 0.6:
                    out += self.spoil_each(st)
                out.append(st)
                if not self.protected[vm] and rng.random() < 0.5:
                    out.append(self.follow_up(vm, gfn, cpu))
            else:
                out.append(self.call(rng.choice(VCPU_CALLS), cpu))
        out.append(RawStep("__pkvm_vcpu_put", (), cpu))
        return out

    def follow_up(self, vm: str, gfn: int, cpu: int) -> RawStep:
        """A guest-memory call on the gfn a transfer just mapped (well-formed or spoiled)."""
        rng = self.rng
        name = rng.choice(["__pkvm_host_relax_perms_guest", "__pkvm_host_mkyoung_guest",
                           "__pkvm_host_wrprotect_guest", "__pkvm_host_test_clear_young_guest",
                           "__pkvm_host_unshare_guest"])
        given: dict[str, int | str] = {"handle": vm, "gfn": gfn, "nr": 1}
        st = RawStep(name, tuple(given.get(k, self.good(k)) for k in SIGS[name]), cpu)
        return self.spoil(st) if rng.random() < 0.3 else st

    def teardown(self, cpu: int) -> list[RawStep]:
        """A VM's two-phase teardown calls (start, reclaim a page, finalize) on one handle,
        drawn with repeats and out of order."""
        rng = self.rng
        vm = rng.choice(self.vms) if self.vms else self.arg("handle")
        calls = [RawStep("__pkvm_start_teardown_vm", (vm,), cpu)]
        for _ in range(rng.randrange(1, 4)):
            name = rng.choice(["__pkvm_start_teardown_vm", "__pkvm_finalize_teardown_vm",
                               "__pkvm_reclaim_dying_guest_page"])
            args = (vm, self.good("gfn")) if name.endswith("page") else (vm,)
            calls.append(RawStep(name, args, rng.randrange(2)))
        return calls

    def sequence(self, length: int, index: int) -> list[RawStep]:
        rng = self.rng
        seq = self.setup()
        # round robin: sequence i makes call i (mod their number), so a budget of as many
        # sequences as the kernel has calls makes each at least once
        seq.append(self.call(self.robin[index % len(self.robin)], rng.randrange(2)))
        while len(seq) < length:
            cpu, r = rng.randrange(2), rng.random()
            if self.guest_memory_calls and r < 0.3:
                seq += self.block(cpu)
            elif r < 0.38 and self.vms:
                live = [v for v in self.vms if v != "vm:c"]
                if live:
                    seq.append(vm_run(rng.choice(live), rng.choice([0, 0, 1])))
            elif r < 0.42 and "vm:a" in self.vms:
                seq.append(vm_destroy("vm:a"))
            elif self.two_phase_teardown and r < 0.45:
                seq += self.teardown(cpu)
            elif r < 0.47:
                seq.append(RawStep(rng.choice(self.names[1 : self.prof.min_pkvm]), (), cpu))
            elif r < 0.5:
                seq.append(RawStep(rng.choice([0xC600_0000 + len(self.names) + rng.randrange(4),
                                               0x8400_0000, rng.getrandbits(64)]), (), cpu))
            elif r < 0.62 and seq[-1].call in self.names:  # the same call again, maybe elsewhere
                seq.append(RawStep(seq[-1].call, seq[-1].args, rng.randrange(2)))
            else:
                seq.append(self.call(rng.choice(self.pkvm_calls), cpu))
        if rng.random() < 0.04 and self.deref:
            arg = rng.choice(["va:s", "va:p0"])  # NULL would name Linux's first RAM page
            return seq + [RawStep(rng.choice(self.deref), (arg,), rng.randrange(2))]
        return seq + probes(seq)


def probes(seq: list[RawStep]) -> list[RawStep]:
    """For every page the sequence named: a host read (refused or not, and how much of the page
    is not zero), then share and unshare it with the hyp (both answer 0 only for a page the host
    owns alone; a page in any other state is refused and left as it is)."""
    names = dict.fromkeys(a.split(":", 1)[1] for st in seq for a in st.args
                          if isinstance(a, str) and a.split(":", 1)[0] in ("page", "pa", "va"))
    out = []
    for n in names:
        out += [host_read(f"page:{n}"),
                RawStep("__pkvm_host_share_hyp", (f"page:{n}",)),
                RawStep("__pkvm_host_unshare_hyp", (f"page:{n}",))]
    return out


def random_sequences(kernel: str, n: int, seed: int, length: int = 12) -> list[list[RawStep]]:
    """`n` deep hostile sequences of about `length` steps (plus set-up and probes)."""
    rng = random.Random(seed)
    return [_Gen(kernel, rng).sequence(length, i) for i in range(n)]


# -- coverage --------------------------------------------------------------------------------
def outcome(r: RealResult) -> str:
    """A step's outcome for the coverage table: "ok", an errno name, "unsupported", a panic."""
    if r.not_run:
        return "not run"
    if r.panic:
        return r.kind
    if r.x0 != 0:
        return str(errno_name(-r.x0)) if -4096 < r.x0 < -1 else "unsupported"
    return str(errno_name(-r.x1)) if -4096 < r.x1 < 0 else "ok"


def coverage(kernel: str, results: list[list[StepDiff]]) -> dict[str, dict[str, Counter[str]]]:
    """For every host hypercall of `kernel`: outcome -> count, per side ("model", "real")."""
    names = list(get_profile(model_abi(kernel)).hcalls)[1:]
    cov: dict[str, dict[str, Counter[str]]] = {n: {"model": Counter(), "real": Counter()}
                                          for n in names}
    extra: dict[str, dict[str, Counter[str]]] = defaultdict(lambda: {"model": Counter(),
                                                                "real": Counter()})
    for diffs in results:
        for d in diffs:
            if not isinstance(d.step.call, str) or d.status == "not run":
                continue
            row = cov.get(d.step.call) or extra[d.step.call]
            row["model"][outcome(d.model)] += 1
            row["real"][outcome(d.real)] += 1
    return {**cov, **dict(extra)}


def succeeded(cov: dict[str, dict[str, Counter[str]]]) -> tuple[int, int]:
    """(host hypercalls that reached success on the real side at least once, all of them)."""
    calls = [c for c in cov if not c.startswith(("vmm:", "host:"))]
    return sum(1 for c in calls if cov[c]["real"]["ok"]), len(calls)
