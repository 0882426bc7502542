"""The hostile-host fuzzer: seeded random hypercall sequences against a checked machine.

A run is a list of `Step`s drawn from a seeded `random.Random`. A step names its operands
*symbolically* (the k-th page the fuzzer allocated, the k-th VM it created, an interesting pfn
from a fixed list, a forged handle...), resolved when the step runs, so a step list stays
meaningful when the shrinker deletes steps from it. Each step runs on a machine built with
`check=True`: after every hypercall the invariants and the ghost (`pkvm.check.invariants`,
`pkvm.check.ghost`) judge the result.

A *failure* is an `InvariantViolation` or any exception other than `HostError`,
`HostDataAbort` and `HypPanic` escaping the model. A failure is shrunk (delta debugging over the
step list, each candidate replayed on a fresh machine) and the minimal run is written as a
scenario TOML of raw hypercalls and host memory writes. A `HypPanic` is an availability finding:
counted, reported, and the fuzzer carries on with a fresh machine.
"""

from __future__ import annotations

import random
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pkvm.abi.host_structs import KVM, KVM_VCPU
from pkvm.check.invariants import InvariantViolation
from pkvm.errors import HostDataAbort, HostError, HypPanic, errno_name
from pkvm.machine.memory import PAGE_SHIFT, PAGE_SIZE

U64 = 0xFFFF_FFFF_FFFF_FFFF
FULL_EVERY = 2048  # a full invariant check every this many hypercalls (and at the end)
HCR_HOST_VCPU = (1 << 31) | (1 << 27) | (1 << 13) | (1 << 14)


@dataclass(frozen=True)
class Step:
    """One fuzzer action: `op` with symbolic operands `a`, issued on `cpu`."""

    op: str
    cpu: int
    a: tuple[Any, ...] = ()

    def __str__(self) -> str:
        return f"{self.op}@cpu{self.cpu}{self.a}"


@dataclass
class Failure:
    kind: str  # "invariant" | "exception"
    signature: str  # what must recur for a shrunk run to count as the same failure
    message: str
    step_index: int

    def __str__(self) -> str:
        return f"[{self.kind}] {self.message}"


# --- the world a run builds up ---------------------------------------------------------------
class _RecordingPort:
    """Stands in for the host's port to the machine: forwards everything, logs writes."""

    def __init__(self, inner: Any, log: list[tuple]):
        self._inner = inner
        self._log = log

    def hvc(self, cpu: int, func: Any, *args: int) -> Any:
        return self._inner.hvc(cpu, func, *args)

    def read(self, cpu: int, pa: int, n: int) -> bytes:
        return self._inner.read(cpu, pa, n)

    def write(self, cpu: int, pa: int, data: bytes) -> None:
        self._inner.write(cpu, pa, data)
        self._log.append(("write", cpu, pa, bytes(data)))

    def zero(self, cpu: int, pa: int, n: int) -> None:
        self._inner.zero(cpu, pa, n)
        self._log.append(("zero", cpu, pa, n))


class Racer:
    """A scheduler hook that plays a second host CPU: at a hyp read of host-shared memory it may
    rewrite fields of the host structs the hyp is reading (what a real host can do at any time).
    The writes go straight to memory the host has mapped (pinned, shared pages)."""

    def __init__(self, world: World):
        self.world = world
        self.plan: list[tuple[int, bytes]] = []  # writes to perform at the next host read
        self.log: list[tuple[int, bytes]] = []

    def preempt(self, cpu: int, event: str, detail: str) -> None:
        if event != "host-read" or not self.plan:
            return
        mem = self.world.m.mem
        for pa, data in self.plan:
            mem.write(pa, data)
            self.log.append((pa, data))
        self.plan = []

    def wait_lock(self, cpu: int, lock: Any) -> None:  # never contended: one CPU at a time
        pass


class World:
    """A machine plus what the fuzzer remembers about it (its operand pools)."""

    def __init__(self, memory: str, cpus: int, abi: str, bugs: tuple[str, ...], check: bool = True):
        import pkvm

        self.cfg = {"memory": memory, "cpus": cpus, "abi": abi}
        self.log: list[Any] = []
        self.m = pkvm.Machine(memory=memory, cpus=cpus, abi=abi, trace=False, bugs=bugs)
        if check:  # wired as Machine(check=True) does, with the fuzzer's pace of full checks
            from pkvm.check.invariants import Checker

            self.m.checker = Checker(self.m, full_every=FULL_EVERY, initial_check=False)
            self.m.listeners.append(self.m.checker.after_call)
        self.m.listeners.insert(0, self._on_call)
        self.m.host.port = _RecordingPort(self.m.host.port, self.log)
        inner = self.m.hvc

        def hvc(cpu: int, func: Any, *args: int) -> Any:
            """Log each hypercall as it is issued (a call that raises is logged too)."""
            ev: list[Any] = ["hvc", cpu, func, tuple(a & U64 for a in args), ()]
            self.log.append(ev)
            try:
                return inner(cpu, func, *args)
            finally:
                ev[4] = tuple(self.racer.log)
                self.racer.log = []

        self.m.hvc = hvc  # type: ignore[method-assign]
        self.racer = Racer(self)
        self.prof = self.m.profile
        self.pages: list[int] = []
        self.shared: list[int] = []
        self.vms: list[Any] = []
        self.handles: list[int] = []
        self.results: Counter = Counter()
        ram_lo = self.m.mem.base >> PAGE_SHIFT
        ram_hi = self.m.mem.end >> PAGE_SHIFT
        cb, cs = self.m.carveout
        self.specials = [
            ram_lo, ram_lo + 1, ram_hi - 1, ram_hi, cb >> PAGE_SHIFT, (cb + cs // 2) >> PAGE_SHIFT,
            (cb + cs) >> PAGE_SHIFT, 0x9000, 0, 0xFFFFFFFFF, 0x1000000000, 0xFFFFFFFFFFFFF,
            0x10000000000000, 0xFFF0000000000000 | ram_lo, U64, 0x8000000000000000,
        ]

    def _on_call(self, rec: Any) -> None:
        if rec.panic is None:
            self.results[(rec.name, _result_label(rec.x0, rec.x1))] += 1

    # -- operand resolution ----------------------------------------------------------------
    def page(self, k: int) -> int:
        if not self.pages:
            self.pages.append(self.m.host.alloc_pages(1))
        return self.pages[k % len(self.pages)]

    def vm(self, k: int) -> Any | None:
        return self.vms[k % len(self.vms)] if self.vms else None

    def vm_pages(self) -> list[int]:
        out = []
        for vm in self.vms:
            out += [vm.kvm_pa & ~(PAGE_SIZE - 1), vm.pgd_pa, vm.hyp_vm_pa]
            out += [v.pa & ~(PAGE_SIZE - 1) for v in vm.vcpus] + [v.hyp_mem for v in vm.vcpus]
            out += list(vm.memslot.values())[:4]
        return [p for p in out if p]

    def pfn(self, spec: tuple) -> int:
        kind, k = spec
        if kind == "page":
            return self.page(k) >> PAGE_SHIFT
        if kind == "shared" and self.shared:
            return self.shared[k % len(self.shared)]
        if kind == "vmmem":
            pages = self.vm_pages()
            if pages:
                return pages[k % len(pages)] >> PAGE_SHIFT
        if kind == "special":
            return self.specials[k % len(self.specials)]
        return self.page(k) >> PAGE_SHIFT

    def handle(self, spec: tuple) -> int:
        kind, k = spec
        if kind == "vm" and self.vms:
            return self.vm(k).handle or 0x1000  # type: ignore[union-attr]
        if kind == "seen" and self.handles:
            return self.handles[k % len(self.handles)]
        return FORGED_HANDLES[k % len(FORGED_HANDLES)]

    def host_ptr(self, spec: tuple) -> int:
        """A host kernel VA: of a VM's struct kvm / kvm_vcpu, of a page, with an offset."""
        from pkvm.host.kvm import host_va

        kind, k, off = spec
        if kind == "kvm" and self.vms:
            return host_va(self.vm(k).kvm_pa) + off  # type: ignore[union-attr]
        if kind == "vcpu" and self.vms:
            vm = self.vm(k)
            if vm.vcpus:  # type: ignore[union-attr]
                return host_va(vm.vcpus[off % len(vm.vcpus)].pa)  # type: ignore[union-attr]
        if kind == "shared" and self.shared:
            return host_va(self.shared[k % len(self.shared)] << PAGE_SHIFT) + off
        if kind == "fresh":
            pa = self.m.host.alloc_pages(max(1, k))
            self.pages.append(pa)
            return host_va(pa)
        return host_va(self.page(k)) + off


FORGED_HANDLES = [0, 0x1000, 0x1001, 0x1000 + 254, 0x1000 + 255, 0xFFF, 0xFFFF, 0x11000,
                  (1 << 32) + 0x1000, U64]
INTERESTING_U64 = [0, 1, 2, 3, 0xFF, 0x100, 0x1000, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF,
                   1 << 32, U64, U64 - 1, 1 << 63]


def _result_label(x0: int, x1: int) -> str:
    if x0 != 0:
        return "x0=-1 (unknown)"
    if x1 == 0:
        return "0"
    if -4096 < x1 < 0:
        return errno_name(-x1)
    return "value"


# --- running steps -----------------------------------------------------------------------------
def run_step(w: World, s: Step) -> None:
    """Perform one step. Refusals (HostError, non-fatal HostDataAbort) are normal outcomes."""
    m, host, cpu = w.m, w.m.host, s.cpu % w.m.nr_cpus
    op, a = s.op, s.a
    hv = m.hvc
    if op == "alloc":
        w.pages.append(host.alloc_pages(1))
    elif op == "share":
        pfn = w.pfn(a[0])
        if hv(cpu, "__pkvm_host_share_hyp", pfn).x1 == 0:
            w.shared.append(pfn)
    elif op == "unshare":
        pfn = w.pfn(a[0])
        if hv(cpu, "__pkvm_host_unshare_hyp", pfn).x1 == 0 and pfn in w.shared:
            w.shared.remove(pfn)
    elif op == "create_vm":
        vm = host.create_vm(vcpus=a[0], protected=a[1] and w.prof.protected_vms, memory="256K")
        w.vms.append(vm)
        if vm.handle:
            w.handles.append(vm.handle)
    elif op == "map":
        vm = w.vm(a[0])
        if vm is not None and not vm.destroyed:
            vm.map(0x40000 + a[1] % 64, a[2], cpu=cpu)
    elif op == "destroy":
        vm = w.vm(a[0])
        if vm is not None:
            vm.destroy()
    elif op == "reserve":
        r = hv(cpu, "__pkvm_reserve_vm")
        if r.x0 == 0 and r.x1 > 0:
            w.handles.append(r.x1)
    elif op in ("unreserve", "start_teardown", "finalize_teardown", "teardown", "tlb_flush"):
        name = {"unreserve": "__pkvm_unreserve_vm", "start_teardown": "__pkvm_start_teardown_vm",
                "finalize_teardown": "__pkvm_finalize_teardown_vm",
                "teardown": "__pkvm_teardown_vm", "tlb_flush": "__pkvm_tlb_flush_vmid"}[op]
        hv(cpu, name, w.handle(a[0]))
    elif op == "init_vm":
        r = hv(cpu, "__pkvm_init_vm", w.host_ptr(a[0]), w.host_ptr(a[1]), w.host_ptr(a[2]))
        if r.x0 == 0 and r.x1 > 0:
            w.handles.append(r.x1)
    elif op == "init_vcpu":
        hv(cpu, "__pkvm_init_vcpu", w.handle(a[0]), w.host_ptr(a[1]), w.host_ptr(a[2]))
    elif op == "load":
        hv(cpu, "__pkvm_vcpu_load", w.handle(a[0]), a[1], HCR_HOST_VCPU)
    elif op == "put":
        hv(cpu, "__pkvm_vcpu_put")
    elif op == "share_guest":
        hv(cpu, "__pkvm_host_share_guest", w.pfn(a[0]), 0x40000 + a[1], a[2], a[3])
    elif op == "donate_guest":
        hv(cpu, "__pkvm_host_donate_guest", w.pfn(a[0]), 0x40000 + a[1])
    elif op == "unshare_guest":
        hv(cpu, "__pkvm_host_unshare_guest", w.handle(a[0]), 0x40000 + a[1], a[2])
    elif op == "reclaim_dying":
        hv(cpu, "__pkvm_reclaim_dying_guest_page", w.handle(a[0]), 0x40000 + a[1])
    elif op == "force_reclaim":
        hv(cpu, "__pkvm_force_reclaim_guest_page", w.pfn(a[0]) << PAGE_SHIFT)
    elif op in ("relax_perms", "mkyoung"):
        name = "__pkvm_host_relax_perms_guest" if op == "relax_perms" else "__pkvm_host_mkyoung_guest"
        hv(cpu, name, 0x40000 + a[0], a[1])
    elif op in ("wrprotect", "test_clear_young"):
        name = "__pkvm_host_wrprotect_guest" if op == "wrprotect" else "__pkvm_host_test_clear_young_guest"
        hv(cpu, name, w.handle(a[0]), 0x40000 + a[1], a[2], a[3])
    elif op == "scribble":
        _scribble(w, cpu, a)
    elif op == "race":
        _race(w, cpu, a)
    elif op == "forge_vcpu_idx":
        _forge_vcpu_idx(w, cpu, a, race=False)
    elif op == "race_vcpu_idx":
        _forge_vcpu_idx(w, cpu, a, race=True)
    elif op == "forge_memcache":
        _forge_memcache(w, cpu, a)
    elif op == "raw":
        hv(cpu, a[0], *a[1:])
    else:
        raise ValueError(f"unknown fuzzer op {op!r}")


def _struct_field(w: World, a: tuple) -> tuple[int, int] | None:
    """(pa, size) of field `a[2]` of the host struct kvm (a[1] == 0) or a kvm_vcpu of VM a[0]."""
    vm = w.vm(a[0])
    if vm is None:
        return None
    if a[1] == 0 or not vm.vcpus:
        layout, base = KVM, vm.kvm_pa
    else:
        layout, base = KVM_VCPU, vm.vcpus[a[1] % len(vm.vcpus)].pa
    # Not the teardown memcaches: the host driver trusts their counts when freeing them.
    fields = [f for f in layout.fields.values() if "_mc." not in f.name][:16]
    f = fields[a[2] % len(fields)]
    return base + f.offset, min(f.size, 8)


def _scribble(w: World, cpu: int, a: tuple) -> None:
    where = _struct_field(w, a)
    if where is not None:
        pa, size = where
        w.m.host.write(pa, (a[3] & ((1 << (8 * size)) - 1)).to_bytes(size, "little"), cpu=cpu)


def _forge_vcpu_idx(w: World, cpu: int, a: tuple, race: bool) -> None:
    """The host lies about a vCPU's index when the hyp vCPU is created (up front, or by
    rewriting it while the hyp reads the struct)."""
    vm = w.vm(a[0])
    if vm is None or vm.destroyed or not vm.vcpus:
        return
    vcpu = vm.vcpus[a[1] % len(vm.vcpus)]
    if vcpu.hyp_created:
        return
    pa = vcpu.field_pa("vcpu_idx")
    value = (vm.nr_vcpus + a[2]) & 0xFFFF_FFFF
    if race:
        w.racer.plan = [(pa, value.to_bytes(4, "little"))]
        w.m._hyp.locks.scheduler = w.racer
    else:
        w.m.host.write(pa, value.to_bytes(4, "little"), cpu=cpu)
    try:
        vm.ensure_hyp_vcpu(vcpu)
    finally:
        w.racer.plan = []
        w.m._hyp.locks.scheduler = None


def _forge_memcache(w: World, cpu: int, a: tuple) -> None:
    """The host points its vCPU memcache at a page of its choosing, then asks for a guest
    mapping (7.2 refills the hyp's memcache from the host's before share/donate_guest)."""
    vm = w.vm(a[0])
    if vm is None or vm.destroyed or not vm.vcpus:
        return
    vcpu = vm.vcpus[0]
    vm.ensure_hyp_vcpu(vcpu)
    host = w.m.host
    host.write_u64(vcpu.field_pa("arch.pkvm_memcache.head"), w.pfn(a[1]) << PAGE_SHIFT)
    host.write_u64(vcpu.field_pa("arch.pkvm_memcache.nr_pages"), a[2])
    hv = w.m.hvc
    hv(cpu, "__pkvm_vcpu_load", vm.handle, 0, HCR_HOST_VCPU)
    name = "__pkvm_host_donate_guest" if vm.protected else "__pkvm_host_share_guest"
    hv(cpu, name, w.page(a[3]) >> PAGE_SHIFT, 0x40000 + a[3] % 64, 1, 0xF)
    hv(cpu, "__pkvm_vcpu_put")


def _race(w: World, cpu: int, a: tuple) -> None:
    """Run a hypercall while 'another host CPU' rewrites a host-struct field at its first read
    of host-shared memory: a[0..3] name the field and value, a[4] the step that follows."""
    where = _struct_field(w, a)
    if where is not None:
        pa, size = where
        w.racer.plan = [(pa, (a[3] & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))]
    locks = w.m._hyp.locks
    locks.scheduler = w.racer
    try:
        run_step(w, Step(a[4][0], cpu, a[4][1]))
    finally:
        w.racer.plan = []
        locks.scheduler = None


# --- generating steps ----------------------------------------------------------------------------
def _pfn_spec(r: random.Random) -> tuple:
    return (r.choice(["page", "page", "shared", "vmmem", "special"]), r.randrange(64))


def _handle_spec(r: random.Random) -> tuple:
    return (r.choice(["vm", "vm", "vm", "seen", "forged"]), r.randrange(16))


def _ptr_spec(r: random.Random, kind: str) -> tuple:
    k = r.choice([kind, kind, "shared", "page", "fresh"])
    off = r.choice([0, 0, 8, PAGE_SIZE - 8, 1])
    n = r.choice([1, 2, 3]) if k == "fresh" else r.randrange(16)
    return (k, n, off)


def generate(r: random.Random, prof: Any, cpus: int, n: int) -> list[Step]:
    """n hostile steps for profile `prof`."""
    v72 = prof.explicit_vcpu_load
    ops: list[tuple[str, int, Callable[[], tuple]]] = [
        ("alloc", 3, lambda: ()),
        ("share", 8, lambda: (_pfn_spec(r),)),
        ("unshare", 6, lambda: (_pfn_spec(r),)),
        ("create_vm", 4, lambda: (r.randint(1, 3), r.random() < 0.5)),
        ("map", 6, lambda: (r.randrange(8), r.randrange(64), r.randint(1, 3))),
        ("destroy", 2, lambda: (r.randrange(8),)),
        ("init_vm", 2, lambda: (_ptr_spec(r, "kvm"), _ptr_spec(r, "fresh"), _ptr_spec(r, "fresh"))),
        ("init_vcpu", 3, lambda: (_handle_spec(r), _ptr_spec(r, "vcpu"), _ptr_spec(r, "fresh"))),
        ("scribble", 4, lambda: (r.randrange(8), r.randrange(3), r.randrange(16),
                                 r.choice(INTERESTING_U64 + [r.getrandbits(64)]))),
        ("forge_vcpu_idx", 2, lambda: (r.randrange(8), r.randrange(4),
                                       r.choice([-1, 0, 1, 2, 1 << 31, -(1 << 31)]))),
        ("race_vcpu_idx", 2, lambda: (r.randrange(8), r.randrange(4),
                                      r.choice([0, 1, 2, 64, 1 << 31]))),
        ("raw", 1, lambda: (r.choice([0xC6000000 + r.randrange(64), 0x84000000,
                                      r.getrandbits(64)]), r.getrandbits(64))),
    ]
    if prof.reserve_vm:
        ops += [("reserve", 3, lambda: ()), ("unreserve", 2, lambda: (_handle_spec(r),)),
                ("start_teardown", 3, lambda: (_handle_spec(r),)),
                ("finalize_teardown", 3, lambda: (_handle_spec(r),))]
    else:
        ops += [("teardown", 3, lambda: (_handle_spec(r),))]
    if v72:
        ops += [
            ("load", 6, lambda: (_handle_spec(r), r.choice([0, 0, 1, 2, 3, 255, 0xFFFFFFFF]))),
            ("put", 5, lambda: ()),
            ("share_guest", 4, lambda: (_pfn_spec(r), r.randrange(64), r.choice([1, 1, 2, 512]),
                                        r.choice([0xF, 0x3, 0x1, 0x10, 0]))),
            ("donate_guest", 4, lambda: (_pfn_spec(r), r.randrange(64))),
            ("unshare_guest", 3, lambda: (_handle_spec(r), r.randrange(64), r.choice([1, 2, 512]))),
            ("reclaim_dying", 3, lambda: (_handle_spec(r), r.randrange(64))),
            ("force_reclaim", 2, lambda: (_pfn_spec(r),)),
            ("relax_perms", 1, lambda: (r.randrange(64), r.choice([0xF, 0x3, 0x1, 0x10]))),
            ("mkyoung", 1, lambda: (r.randrange(64), 0)),
            ("wrprotect", 1, lambda: (_handle_spec(r), r.randrange(64), 1, 0)),
            ("test_clear_young", 1, lambda: (_handle_spec(r), r.randrange(64), 1, r.randrange(2))),
            ("tlb_flush", 1, lambda: (_handle_spec(r),)),
            ("forge_memcache", 2, lambda: (r.randrange(8), _pfn_spec(r), r.choice([1, 2, 5]),
                                           r.randrange(64))),
        ]
    raceable = [o for o in ops if o[0] in ("init_vcpu", "init_vm", "share_guest", "donate_guest")]
    names = [o[0] for o in ops]
    weights = [o[1] for o in ops]
    gens = {o[0]: o[2] for o in ops}
    steps = []
    for _ in range(n):
        cpu = r.randrange(cpus)
        if r.random() < 0.04:
            inner = r.choice(raceable)
            steps.append(Step("race", cpu, (r.randrange(8), r.randrange(3), r.randrange(16),
                                             r.choice(INTERESTING_U64), (inner[0], inner[2]()))))
            continue
        op = r.choices(names, weights)[0]
        steps.append(Step(op, cpu, gens[op]()))
    return steps


# --- one run -------------------------------------------------------------------------------------
@dataclass
class RunResult:
    failure: Failure | None = None
    panics: list[str] = field(default_factory=list)
    steps_run: int = 0
    calls: Counter = field(default_factory=Counter)
    transitions: Counter = field(default_factory=Counter)
    driver_errors: Counter = field(default_factory=Counter)
    driver_tracebacks: dict[str, str] = field(default_factory=dict)
    log: list[tuple] = field(default_factory=list)


def _from_hyp(tb: Any) -> bool:
    return any("/pkvm/hyp/" in fr.filename for fr in traceback.extract_tb(tb))


def _from_driver(tb: Any) -> bool:
    """Raised in the host driver's own code (not below it in the hyp)?"""
    frames = traceback.extract_tb(tb)
    return not _from_hyp(tb) and any("/pkvm/host/" in fr.filename for fr in frames)


def execute(steps: list[Step], memory: str, cpus: int, abi: str, bugs: tuple[str, ...] = (),
            progress: Callable[[int], None] | None = None, stop_on_panic: bool = False) -> RunResult:
    """Run `steps` on fresh checked machines; the first failure ends the run."""
    res = RunResult()
    w = World(memory, cpus, abi, bugs)
    warnings.simplefilter("ignore")
    for i, s in enumerate(steps):
        res.steps_run = i + 1
        try:
            run_step(w, s)
        except (HostError, MemoryError):
            pass
        except HostDataAbort:
            if w.m.dead:
                res.panics.append(f"step {i}: fatal host abort ({s})")
                _absorb(res, w)
                w = World(memory, cpus, abi, bugs)
        except HypPanic as e:
            res.panics.append(f"step {i}: {e} ({s})")
            if stop_on_panic:
                res.failure = Failure("panic", "HypPanic", str(e), i)
                break
            _absorb(res, w)
            w = World(memory, cpus, abi, bugs)
        except InvariantViolation as v:
            res.failure = Failure("invariant", f"invariant:{v.invariant}", str(v), i)
            break
        except Exception as e:
            tb = e.__traceback__
            if _from_driver(tb):
                # the driver tripped over state a hostile step left behind: not a model finding
                key = f"{type(e).__name__} in {traceback.extract_tb(tb)[-1].name}"
                res.driver_errors[key] += 1
                res.driver_tracebacks.setdefault(key, f"step {i} {s}: " + "".join(
                    traceback.format_exception(type(e), e, tb)[-6:]))
                continue
            if not _from_hyp(tb):
                raise  # a fuzzer bug: do not disguise it as a finding
            where = "hyp"
            last = traceback.extract_tb(tb)[-1]
            res.failure = Failure("exception", f"exception:{type(e).__name__}@{last.name}",
                                  f"{type(e).__name__}: {e} (raised in {where} at "
                                  f"{last.filename.split('/src/')[-1]}:{last.lineno} {last.name})"
                                  f"\n{''.join(traceback.format_tb(tb)[-4:])}", i)
            break
        finally:
            if progress is not None:
                progress(i + 1)
    if res.failure is None and w.m.checker is not None and not w.m.dead:
        try:
            w.m.checker.check_all()
        except InvariantViolation as v:
            res.failure = Failure("invariant", f"invariant:{v.invariant}", str(v), len(steps) - 1)
    _absorb(res, w)
    res.log = w.log
    return res


def _absorb(res: RunResult, w: World) -> None:
    res.calls.update(w.results)
    w.results = Counter()
    if w.m.checker is not None:
        res.transitions.update(w.m.checker.transitions)
        w.m.checker.transitions = Counter()


# --- shrinking -----------------------------------------------------------------------------------
def shrink(steps: list[Step], failure: Failure, memory: str, cpus: int, abi: str,
           bugs: tuple[str, ...] = (), max_runs: int = 400, max_seconds: float = 120.0
           ) -> tuple[list[Step], RunResult]:
    """ddmin: the smallest step list (1-minimal within the budget) failing with the same signature."""
    t0 = time.monotonic()
    runs = 0

    def fails(cand: list[Step]) -> RunResult | None:
        nonlocal runs
        runs += 1
        r = execute(cand, memory, cpus, abi, bugs)
        if r.failure is not None and r.failure.signature == failure.signature:
            return r
        return None

    cur = steps[: failure.step_index + 1]
    best = fails(cur)
    if best is None:  # not reproducible from a fresh machine (should not happen: all seeded)
        return cur, execute(cur, memory, cpus, abi, bugs)
    cur = cur[: best.failure.step_index + 1]  # type: ignore[union-attr]
    n = 2
    while len(cur) >= 2 and runs < max_runs and time.monotonic() - t0 < max_seconds:
        chunk = max(1, len(cur) // n)
        reduced = False
        for start in range(0, len(cur), chunk):
            cand = cur[:start] + cur[start + chunk:]
            r = fails(cand) if cand else None
            if r is not None:
                cur, best = cand[: r.failure.step_index + 1], r  # type: ignore[union-attr]
                n = max(n - 1, 2)
                reduced = True
                break
            if runs >= max_runs:
                break
        if not reduced:
            if chunk == 1:
                break
            n = min(len(cur), n * 2)
    return cur, best


# --- reproducers ---------------------------------------------------------------------------------
RACE_NOTE = "race_writes:"


def log_to_steps(log: list[Any]) -> list[dict[str, Any]]:
    """The raw events of a run as scenario steps (`docs/scenarios.md`): `hvc` steps and
    `host_write` steps. A write a racing host CPU made during a hypercall has no step of its
    own: the hypercall's `note` lists it ("race_writes: PA=HEX ...") for `replay`."""
    out: list[dict[str, Any]] = []
    for ev in log:
        if ev[0] == "hvc":
            _, cpu, func, args, race = ev
            st: dict[str, Any] = {"hvc": func, "cpu": cpu, "args": list(args)}
            if race:
                st["note"] = RACE_NOTE + " " + " ".join(f"{pa:#x}={d.hex()}" for pa, d in race)
            out.append(st)
        elif ev[0] == "write":
            _, cpu, pa, data = ev
            out.append({"host_write": pa, "cpu": cpu, "data": data.hex()})
        elif ev[0] == "zero":
            _, cpu, pa, n = ev
            out.append({"host_write": pa, "cpu": cpu, "data": "00" * n,
                        "note": "the host zeroes pages it allocates"})
    return out


def dump_toml(cfg: dict[str, Any], steps: list[dict[str, Any]], path: str,
              comment: str = "") -> None:
    """Write a scenario TOML through `pkvm.scenario.dump`, with `comment` as a header."""
    from pathlib import Path

    from pkvm import scenario

    scenario.dump(steps, path, machine=dict(cfg, check=True))
    body = Path(path).read_text()
    head = "".join(f"# {ln}\n" for ln in comment.splitlines())
    Path(path).write_text(head + body)


def replay(cfg: dict[str, Any], steps: list[dict[str, Any]], bugs: tuple[str, ...] = ()) -> Failure | None:
    """Run raw scenario steps on a fresh checked machine; the failure they cause, if any."""
    import pkvm

    m = pkvm.Machine(memory=cfg["memory"], cpus=cfg["cpus"], abi=cfg["abi"], check=True,
                     trace=False, bugs=bugs)
    racer = Racer(None)  # type: ignore[arg-type]
    racer.world = type("W", (), {"m": m})()  # type: ignore[assignment]
    for i, st in enumerate(steps):
        cpu = st.get("cpu", 0)
        try:
            if "hvc" in st:
                note = st.get("note", "")
                racer.plan = []
                if note.startswith(RACE_NOTE):
                    for item in note[len(RACE_NOTE):].split():
                        pa, d = item.split("=")
                        racer.plan.append((int(pa, 0), bytes.fromhex(d)))
                m._hyp.locks.scheduler = racer if racer.plan else None
                m.hvc(cpu, st["hvc"], *st.get("args", []))
            elif "host_write" in st:
                m.host.port.write(cpu, st["host_write"], bytes.fromhex(st["data"]))
        except (HostDataAbort, HypPanic) as e:
            if m.dead:
                return Failure("panic", "HypPanic", str(e), i)
        except InvariantViolation as v:
            return Failure("invariant", f"invariant:{v.invariant}", str(v), i)
        except Exception as e:  # noqa: BLE001
            last = traceback.extract_tb(e.__traceback__)[-1]
            return Failure("exception", f"exception:{type(e).__name__}@{last.name}", repr(e), i)
        finally:
            m._hyp.locks.scheduler = None
    return None


# --- the whole campaign ------------------------------------------------------------------------
@dataclass
class Campaign:
    seed: int
    steps: int
    cpus: int = 2
    abi: str = "latest"
    memory: str = "64M"
    bugs: tuple[str, ...] = ()
    out: str | None = None  # where to write the reproducer TOML

    def run(self, progress: Callable[[int], None] | None = None) -> CampaignResult:
        import pkvm

        prof = pkvm.Machine(memory=self.memory, cpus=self.cpus, abi=self.abi, trace=False).profile
        steps = generate(random.Random(self.seed), prof, self.cpus, self.steps)
        t0 = time.perf_counter()
        res = execute(steps, self.memory, self.cpus, self.abi, self.bugs, progress)
        elapsed = time.perf_counter() - t0
        out = CampaignResult(self, res, elapsed)
        if res.failure is not None:
            small, sres = shrink(steps, res.failure, self.memory, self.cpus, self.abi, self.bugs)
            out.minimal = small
            out.minimal_failure = sres.failure
            out.raw_steps = log_to_steps(sres.log)
            if self.out:
                cfg = {"memory": self.memory, "cpus": self.cpus, "abi": self.abi}
                comment = (f"pkvm fuzz --seed {self.seed} --steps {self.steps} --abi {self.abi}"
                           + "".join(f" --bug {b}" for b in self.bugs)
                           + ("\nseeded bugs are not part of [machine]: replay with "
                              "pkvm.check.fuzz.replay(machine, steps, bugs=...)" if self.bugs else "")
                           + f"\nminimal fuzzer steps: {[str(s) for s in small]}\n"
                           + str(sres.failure))
                dump_toml(cfg, out.raw_steps, self.out, comment)
        return out


@dataclass
class CampaignResult:
    campaign: Campaign
    run: RunResult
    seconds: float
    minimal: list[Step] | None = None
    minimal_failure: Failure | None = None
    raw_steps: list[dict[str, Any]] | None = None

    @property
    def found(self) -> bool:
        return self.run.failure is not None
