"""The fuzzer's world and operations: what a hostile host does, step by step.

A step names its operands *symbolically* (the k-th page the fuzzer allocated, the k-th VM it
created, an interesting pfn from a fixed list, a forged handle...), resolved when the step runs,
so a step list stays meaningful when the shrinker deletes steps from it.

The operations are what a host can do, never aimed at one place of the hyp: every hypercall
with operands from pools of pages in every state (host-owned, shared, donated to the hyp or a
guest, the first and last RAM pages, the carve-out's neighbours, MMIO, beyond the PA space);
the host driver's own life cycles (create, map, destroy) interleaved with hostile calls;
sessions with a vCPU loaded on a CPU; hostile memcache heads; writes to any field of the host
structs the hyp reads, up front or by a second host CPU at any EL2 read of host-shared memory
(the machine's preemption points); host memory exhaustion. Host stores go through the host
stage-2 (`HostPort`), like the host's own.
"""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pkvm.abi.host_structs import KVM, KVM_VCPU
from pkvm.abi.sizes import HANDLE_OFFSET
from pkvm.board import Machine
from pkvm.check.ffa_ops import run_smc_step, smc_result_label
from pkvm.check.invariants import Checker
from pkvm.check.racer import Racer
from pkvm.errors import HostDataAbort, HostError, errno_name
from pkvm.host.kvm import host_va
from pkvm.machine.memory import PAGE_SHIFT, PAGE_SIZE

U64 = 0xFFFF_FFFF_FFFF_FFFF
FULL_EVERY = 2048  # a full invariant check every this many hypercalls (and at the end)
HCR_HOST_VCPU = (1 << 31) | (1 << 27) | (1 << 13) | (1 << 14)
GFN0 = 0x40000  # the guests' memslot base gfn (256K of memory: 64 pages)
HEADER_FIELDS = 16  # a struct's leading fields (ids, indices, flags: what EL2 reads most)

# Steps the real host driver issues (the kernel's KVM code, not a hostile host): a hyp panic
# in one of them is a failure, not an availability finding.
DRIVER_OPS = frozenset({"alloc", "create_vm", "map", "destroy", "lifecycle"})


@dataclass(frozen=True)
class Step:
    """One fuzzer action: `op` with symbolic operands `a`, issued on `cpu`."""

    op: str
    cpu: int
    a: tuple[Any, ...] = ()

    def __str__(self) -> str:
        return f"{self.op}@cpu{self.cpu}{self.a}"


_BOOTED: dict[tuple[Any, ...], bytes] = {}  # a snapshot of each configuration, booted once


def booted_machine(memory: str, cpus: int, abi: str, bugs: tuple[str, ...],
                   smc: bool, recycle: Machine | None = None) -> Machine:
    """A freshly booted, untraced machine. The first of each configuration is booted and
    snapshotted; every one is loaded from that snapshot (`pkvm.snapshot`), which is ~100x
    faster than `__pkvm_init` and leaves the same machine: a campaign reboots after every hyp
    panic a hostile step causes, every few dozen steps. `recycle`: the machine a reboot
    replaces, whose RAM and vmemmap arrays the new one reuses (`pkvm.snapshot.load`)."""
    key = (memory, cpus, abi, tuple(bugs), smc)
    data = _BOOTED.get(key)
    if data is None:
        m = Machine(memory=memory, cpus=cpus, abi=abi, trace=False, bugs=bugs, ffa=smc)
        data = _BOOTED[key] = m.snapshot()
    # The collector paused while the snapshot's thousands of objects are built (a pass it
    # would start midway finds nothing to free among them), resumed as it was.
    paused = gc.isenabled()
    gc.disable()
    try:
        return Machine.restore(data, recycle)
    finally:
        if paused:
            gc.enable()


class World:
    """A machine plus what the fuzzer remembers about it (its operand pools)."""

    def __init__(self, memory: str, cpus: int, abi: str, bugs: tuple[str, ...], check: bool = True,
                 smc: bool = False, recycle: World | None = None):
        self.cfg: dict[str, Any] = {"memory": memory, "cpus": cpus, "abi": abi}
        if smc:  # a secure world at EL3 for the FF-A steps
            self.cfg["ffa"] = True
        self.log: list[Any] = []
        self.bugs, self.smc = bugs, smc
        # `recycle`: the world of a machine that died, never used again: its machine's memory
        # and its checker's copy of the vmemmap are reused.
        dead: Machine | None = recycle.m if recycle is not None else None
        self.m: Machine = booted_machine(memory, cpus, abi, bugs, smc, dead)
        if check:  # wired as Machine(check=True) does, with the fuzzer's pace of full checks
            self.m.checker = Checker(self.m, full_every=FULL_EVERY, initial_check=False,
                                     recycle=dead.checker if dead is not None else None)
            self.m.listeners.append(self.m.checker.after_call)
        self.recs: list[Any] = []  # each call's record, counted at `count_results`
        self.m.listeners.insert(0, self.recs.append)  # (a list's append: no Python frame)
        self.m.host_port.log_stores(self.log)  # ("write"/"zero", cpu, pa, data) per store
        self.racer = Racer(self.m, self.m.new_host_port())
        self.m.interpose_hvc(self._log_call)
        self.m.interpose_smc(self._log_smc)
        self.hvc: Callable[..., Any] = self.m.host_port.hvc  # `Machine.hvc`, compiled
        if self.m.checker is not None and self.m.checker.ghost is not None:
            # A racing store changed the call's host-shared inputs: the ghost's prediction from
            # the pre-state does not apply (counted in `ghost.guest.raced`).
            self.m.checker.ghost.guest.raced_now = lambda: bool(self.racer.log)
        self.hostile = False  # has any step but the host driver's own run on this machine?
        self.prof = self.m.profile
        self.pages: list[int] = []
        self.shared: list[int] = []
        # Page histories: pfns whose state a step just changed (newest last), pages shared
        # then unshared, pages a destroyed VM handed back (donated, then returned).
        self.recent: list[int] = []
        self.unshared: list[int] = []
        self.hoard: list[tuple[int, int]] = []  # (pfn, n) taken to exhaust the host's memory
        self.vms: list[Any] = []
        self.cur: Any = None  # the VM of the vCPU session in progress
        self.handles: list[int] = []
        self.results: Counter[Any] = Counter()
        ram_base, ram_end = self.m.inspect.ram_range()
        ram_lo, ram_hi = ram_base >> PAGE_SHIFT, ram_end >> PAGE_SHIFT
        cb, cs = self.m.carveout
        c_lo, c_hi = cb >> PAGE_SHIFT, (cb + cs) >> PAGE_SHIFT
        # The edges of every region: first/last RAM pages, the carve-out and its neighbours.
        self.edges = [ram_lo, ram_lo + 1, ram_hi - 1, ram_hi - 2, c_lo - 1, c_lo, c_hi - 1, c_hi]
        self.specials = self.edges + [
            ram_hi, (cb + cs // 2) >> PAGE_SHIFT, 0x9000, 0, 0xFFFFFFFFF, 0x1000000000,
            0xFFFFFFFFFFFFF, 0x10000000000000, 0xFFF0000000000000 | ram_lo, U64,
            0x8000000000000000,
        ]

    def retire(self) -> None:
        """A reboot recycled this world's dead machine (`World(recycle=...)`): drop it and its
        cycles (`Machine.discard`), so reference counting frees them now, not a collection."""
        self.m.discard()
        vars(self).clear()

    def _log_call(self, proceed: Any, cpu: int, func: Any, args: tuple[int, ...]) -> Any:
        """Log each hypercall as it is issued (a call that raises is logged too), with the
        stores a racing host CPU made during it."""
        n = len(args)  # the arguments as 64-bit registers (the usual counts written out)
        masked = ((args[0] & U64,) if n == 1 else (args[0] & U64, args[1] & U64) if n == 2
                  else (args[0] & U64, args[1] & U64, args[2] & U64) if n == 3
                  else () if not n else tuple([a & U64 for a in args]))
        ev: list[Any] = ["hvc", cpu, func, masked, ()]
        self.log.append(ev)
        try:
            return proceed(cpu, func, args)
        finally:
            racer = self.racer
            if racer.log:
                ev[4] = tuple(racer.log)
                racer.log = []

    def _log_smc(self, proceed: Any, cpu: int, func: Any, args: tuple[int, ...],
                 imm: int) -> Any:
        """Log each host SMC as it is issued (`--smc`)."""
        self.log.append(("smc", cpu, func, tuple(a & U64 for a in args), imm))
        return proceed(cpu, func, args, imm)

    def count_results(self) -> Counter[Any]:
        """`results`, with the calls made since the last count (`recs`) counted in."""
        counts: dict[tuple[str, str], int] = {}  # (a dict's get and set: not the Counter's)
        for rec in self.recs:
            if rec.panic is None:
                name = rec.name
                if name.startswith("smc:"):
                    key = (name, smc_result_label(rec))
                else:  # "0" or an errno met before, else labelled (and kept) now
                    label = _ERRNO_LABELS.get(rec.x1) if rec.x0 == 0 else None
                    key = (name, _result_label(rec.x0, rec.x1) if label is None else label)
                counts[key] = counts.get(key, 0) + 1
        self.recs.clear()
        self.results.update(counts)
        return self.results

    # -- operand resolution ----------------------------------------------------------------
    def page(self, k: int) -> int:
        if not self.pages:
            self.pages.append(self.m.host.alloc_pages(1))
        return self.pages[k % len(self.pages)]

    def vm(self, k: int) -> Any | None:
        return self.vms[k % len(self.vms)] if self.vms else None

    def vm_pages(self, vms: list[Any] | None = None) -> list[int]:
        out = []
        for vm in self.vms if vms is None else vms:
            out += [vm.kvm_pa & ~(PAGE_SIZE - 1), vm.pgd_pa, vm.hyp_vm_pa]
            out += [v.pa & ~(PAGE_SIZE - 1) for v in vm.vcpus] + [v.hyp_mem for v in vm.vcpus]
            out += [p for v in vm.vcpus for p in v.memcache_pages[-2:]]
        return [p for p in out if p]

    def touched(self, *pfns: int) -> None:
        """Note pages whose state a step (may have) just changed."""
        self.recent = (self.recent + [p for p in pfns if 0 <= p < 1 << 52])[-32:]

    def returned_pages(self) -> list[int]:
        return [p for vm in self.vms if vm.destroyed for p in self.vm_pages([vm])]

    def guest_pages(self) -> list[int]:
        return [pa for vm in self.vms for pa in list(vm.mapped.values())[:8]]

    def pfn(self, spec: tuple[Any, ...]) -> int:
        kind, k = spec
        pool = (self.shared if kind == "shared" else self.edges if kind == "edge"
                else self.specials if kind == "special"
                else [p >> PAGE_SHIFT for p in self.vm_pages()] if kind == "vmmem"
                else [p >> PAGE_SHIFT for p in self.guest_pages()] if kind == "guest" else [])
        if pool:
            return int(pool[k % len(pool)])
        return self.page(k) >> PAGE_SHIFT

    def handle(self, spec: tuple[Any, ...]) -> int:
        kind, k = spec
        if kind == "cur" and self.cur is not None:
            return self.cur.handle or HANDLE_OFFSET
        if kind == "vm" and self.vms:
            return self.vms[k % len(self.vms)].handle or HANDLE_OFFSET
        if kind == "seen" and self.handles:
            return int(self.handles[k % len(self.handles)])
        return int(FORGED_HANDLES[k % len(FORGED_HANDLES)])

    def gfn(self, spec: Any) -> int:
        """A guest frame: GFN0 + an offset, or ("mapped", k): one the current VM (any VM
        outside a session) has mapped."""
        if not isinstance(spec, tuple):
            return GFN0 + int(spec)
        vms = [self.cur] if self.cur is not None else self.vms
        mapped = [g for vm in vms for g in vm.mapped]
        return mapped[spec[1] % len(mapped)] if mapped else GFN0

    def load_image(self, vm: Any, gfn: int) -> None:
        """The VMM writes guest data into a page before the guest gets it (a loaded image)."""
        if gfn not in vm.mapped and vm.in_memslot(gfn):
            vm.write(gfn << PAGE_SHIFT, b"guest data %x " % gfn * 4)

    def host_ptr(self, spec: tuple[Any, ...]) -> int:
        """A host kernel VA (as the host driver forms them, `host_va`), with an offset: of a
        VM's struct kvm / kvm_vcpu, or into a page of any state and history: host-owned,
        shared, just changed ("recent", newest first), shared then unshared, donated and
        returned, hyp-owned (a live VM's), guest-owned, the region edges and beyond RAM."""
        kind, k, off = spec
        if kind == "kvm" and self.vms:
            return int(host_va(self.vms[k % len(self.vms)].kvm_pa) + off)
        if kind == "vcpu" and self.vms:
            vm = self.vms[k % len(self.vms)]
            if vm.vcpus:
                return int(host_va(vm.vcpus[off % len(vm.vcpus)].pa))
        if kind == "fresh":
            pa = self.m.host.alloc_pages(max(1, k))
            self.pages.append(pa)
            return host_va(pa)
        pool = (self.shared if kind == "shared" else self.unshared if kind == "unshared"
                else self.recent[::-1][:8] if kind == "recent" else self.specials if kind == "special"
                else [p >> PAGE_SHIFT for p in self.returned_pages()] if kind == "returned"
                else [p >> PAGE_SHIFT for p in self.vm_pages()] if kind == "vmmem"
                else [p >> PAGE_SHIFT for p in self.guest_pages()] if kind == "guest" else [])
        if pool:
            return int(host_va(pool[k % len(pool)] << PAGE_SHIFT) + off) & U64
        return int(host_va(self.page(k)) + off)


FORGED_HANDLES = [0, 0x1000, 0x1001, 0x1000 + 254, 0x1000 + 255, 0xFFF, 0xFFFF, 0x11000,
                  (1 << 32) + 0x1000, U64]
INTERESTING_U64 = [0, 1, 2, 3, 0xFF, 0x100, 0x1000, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF,
                   1 << 32, U64, U64 - 1, 1 << 63]


# A hypercall's x1 when x0 is 0 -> its label: 0, and each errno (its `errno_name`) once met.
_ERRNO_LABELS: dict[int, str] = {0: "0"}


def _result_label(x0: int, x1: int) -> str:
    """A hypercall's result for the coverage table (`World.results`)."""
    if x0 != 0:
        return "x0=-1 (unknown)"
    if x1 == 0:
        return "0"
    if -4096 < x1 < 0:
        label = _ERRNO_LABELS.get(x1)
        if label is None:
            label = _ERRNO_LABELS[x1] = errno_name(-x1)
        return label
    return "value"


# --- running steps -----------------------------------------------------------------------------
HANDLE_CALLS = {"unreserve": "__pkvm_unreserve_vm", "start_teardown": "__pkvm_start_teardown_vm",
                "finalize_teardown": "__pkvm_finalize_teardown_vm",
                "teardown": "__pkvm_teardown_vm", "tlb_flush": "__pkvm_tlb_flush_vmid"}


def run_step(w: World, s: Step) -> None:
    """Perform one step. Refusals (HostError, non-fatal HostDataAbort) are normal outcomes."""
    run_op(w, s.cpu % w.m.nr_cpus, s.op, s.a)


def run_op(w: World, cpu: int, op: str, a: tuple[Any, ...]) -> None:
    """`run_step` of `Step(op, cpu, a)`, `cpu` a CPU of the machine (no `Step` made: the
    inner steps of a session or a race, and `fuzz.execute`'s)."""
    fn = STEP_OPS.get(op)  # (disjoint from `HANDLE_CALLS` and `GUEST_OPS`)
    if fn is not None:
        fn(w, cpu, a)
    elif op in HANDLE_CALLS:
        _handle_call(w, cpu, op, a)
    elif op in GUEST_OPS:
        guest_call(w, cpu, op, a)
    elif op.startswith("smc_"):  # `--smc`: hostile FF-A and PSCI calls through machine.smc
        run_smc_step(w.m, cpu, op, a)
    else:
        raise ValueError(f"unknown fuzzer op {op!r}")


def _alloc(w: World, cpu: int, a: tuple[Any, ...]) -> None:
    w.pages.append(w.m.host.alloc_pages(1))


def _share(w: World, cpu: int, a: tuple[Any, ...]) -> None:
    pfn = w.pfn(a[0])
    if w.hvc(cpu, "__pkvm_host_share_hyp", pfn).x1 == 0:
        w.shared.append(pfn)
        w.touched(pfn)


def _unshare(w: World, cpu: int, a: tuple[Any, ...]) -> None:
    pfn = w.pfn(a[0])
    if w.hvc(cpu, "__pkvm_host_unshare_hyp", pfn).x1 == 0:
        if pfn in w.shared:
            w.shared.remove(pfn)
        w.unshared = (w.unshared + [pfn])[-32:]
        w.touched(pfn)


def _create_vm(w: World, cpu: int, a: tuple[Any, ...]) -> None:
    vm = w.m.host.create_vm(vcpus=a[0], protected=a[1] and w.prof.protected_vms, memory="256K")
    w.vms.append(vm)
    if vm.handle:
        w.handles.append(vm.handle)


def _map(w: World, cpu: int, a: tuple[Any, ...]) -> None:
    vm = w.vm(a[0])
    if vm is not None and not vm.destroyed:
        for g in range(GFN0 + a[1] % 64, GFN0 + a[1] % 64 + a[2]):
            w.load_image(vm, g)
        vm.map(GFN0 + a[1] % 64, a[2], cpu=cpu)


def _destroy(w: World, cpu: int, a: tuple[Any, ...]) -> None:
    vm = w.vm(a[0])
    if vm is not None:
        vm.destroy()
        w.touched(*(p >> PAGE_SHIFT for p in w.vm_pages([vm])))


def _reserve(w: World, cpu: int, a: tuple[Any, ...]) -> None:
    r = w.hvc(cpu, "__pkvm_reserve_vm")
    if r.x0 == 0 and r.x1 > 0:
        w.handles.append(r.x1)


def _handle_call(w: World, cpu: int, op: str, a: tuple[Any, ...]) -> None:
    handle = w.handle(a[0])
    if w.hvc(cpu, HANDLE_CALLS[op], handle).x1 == 0:
        w.touched(*(p >> PAGE_SHIFT for p in w.vm_pages([v for v in w.vms
                                                          if v.handle == handle])))


def _init_vm(w: World, cpu: int, a: tuple[Any, ...]) -> None:
    r = w.hvc(cpu, "__pkvm_init_vm", w.host_ptr(a[0]), w.host_ptr(a[1]), w.host_ptr(a[2]))
    if r.x0 == 0 and r.x1 > 0:
        w.handles.append(r.x1)


def _init_vcpu(w: World, cpu: int, a: tuple[Any, ...]) -> None:
    w.hvc(cpu, "__pkvm_init_vcpu", w.handle(a[0]), w.host_ptr(a[1]), w.host_ptr(a[2]))


def _load(w: World, cpu: int, a: tuple[Any, ...]) -> None:
    w.hvc(cpu, "__pkvm_vcpu_load", w.handle(a[0]), a[1], HCR_HOST_VCPU)


def _put(w: World, cpu: int, a: tuple[Any, ...]) -> None:
    w.hvc(cpu, "__pkvm_vcpu_put")


def _release(w: World, cpu: int, a: tuple[Any, ...]) -> None:
    while w.hoard:
        pfn, n = w.hoard.pop()
        w.m.host.pages.release(pfn, n)


def _raw(w: World, cpu: int, a: tuple[Any, ...]) -> None:
    w.hvc(cpu, a[0], *a[1:])


def _ptr_call(w: World, cpu: int, a: tuple[Any, ...]) -> None:
    """A handler taking a host pointer in x1, then plain arguments."""
    w.hvc(cpu, a[0], w.host_ptr(a[1]), *a[2])


GUEST_OPS = frozenset({"share_guest", "donate_guest", "unshare_guest", "reclaim_dying",
                       "force_reclaim", "relax_perms", "mkyoung", "wrprotect",
                       "test_clear_young"})


def guest_call(w: World, cpu: int, op: str, a: tuple[Any, ...]) -> None:
    """One of the 7.2 guest-memory hypercalls with symbolic operands."""
    hv = w.hvc
    if op == "share_guest":
        hv(cpu, "__pkvm_host_share_guest", pfn := w.pfn(a[0]), w.gfn(a[1]), a[2], a[3])
        w.touched(pfn)
    elif op == "donate_guest":
        hv(cpu, "__pkvm_host_donate_guest", pfn := w.pfn(a[0]), w.gfn(a[1]))
        w.touched(pfn)
    elif op == "unshare_guest":
        hv(cpu, "__pkvm_host_unshare_guest", w.handle(a[0]), w.gfn(a[1]), a[2])
    elif op == "reclaim_dying":
        hv(cpu, "__pkvm_reclaim_dying_guest_page", w.handle(a[0]), w.gfn(a[1]))
    elif op == "force_reclaim":
        hv(cpu, "__pkvm_force_reclaim_guest_page", (pfn := w.pfn(a[0])) << PAGE_SHIFT)
        w.touched(pfn)
    elif op in ("relax_perms", "mkyoung"):
        name = "__pkvm_host_relax_perms_guest" if op == "relax_perms" else "__pkvm_host_mkyoung_guest"
        hv(cpu, name, w.gfn(a[0]), a[1])
    else:
        name = "__pkvm_host_wrprotect_guest" if op == "wrprotect" else "__pkvm_host_test_clear_young_guest"
        hv(cpu, name, w.handle(a[0]), w.gfn(a[1]), a[2], a[3])


def _live_vcpu(w: World, a: tuple[Any, ...]) -> tuple[Any, Any] | None:
    """The a[1]-th vCPU of the a[0]-th VM the host has not destroyed."""
    live = [vm for vm in w.vms if not vm.destroyed and vm.handle and vm.vcpus]
    if not live:
        return None
    vm = live[a[0] % len(live)]
    return vm, vm.vcpus[a[1] % len(vm.vcpus)]


def _session(w: World, cpu: int, a: tuple[Any, ...]) -> None:
    """The host driver's vCPU session: hyp vCPU created, memcache topped up, vCPU loaded on
    `cpu`, then the inner steps (guest-memory calls, possibly hostile), then put."""
    got = _live_vcpu(w, a)
    if got is None:
        return
    vm, vcpu = got
    vm.ensure_hyp_vcpu(vcpu)
    if a[2]:
        vm.topup_memcache(vcpu)
    if w.m.inspect.loaded_vcpu(cpu) is not None:
        w.hvc(cpu, "__pkvm_vcpu_put")  # a hostile step left a vCPU loaded here
    w.hvc(cpu, "__pkvm_vcpu_load", vm.handle, vcpu.idx, HCR_HOST_VCPU)
    w.cur = vm
    try:
        for op, args in a[3]:  # (a finding propagates with the vCPU still loaded, as it was)
            try:
                run_op(w, cpu, op, args)
            except (HostError, HostDataAbort):
                if w.m.dead:
                    raise
    finally:
        w.cur = None
    w.hvc(cpu, "__pkvm_vcpu_put")


def _lifecycle(w: World, cpu: int, a: tuple[Any, ...]) -> None:
    """A whole legitimate VM life: create, map pages (first/last slot pages included), destroy."""
    _create_vm(w, cpu, a)
    vm = w.vms[-1]
    for g in a[2]:
        w.load_image(vm, GFN0 + g % 64)
        vm.map(GFN0 + g % 64, 1, cpu=cpu)
    if a[3]:
        vm.destroy()
        w.touched(*(p >> PAGE_SHIFT for p in w.vm_pages([vm])))


def _struct_field(w: World, a: tuple[Any, ...]) -> tuple[int, int] | None:
    """(pa, size) of field `a[2]` of the host struct kvm (a[1] == 0) or a kvm_vcpu of VM a[0]."""
    vm = w.vm(a[0])
    if vm is None:
        return None
    if a[1] == 0 or not vm.vcpus:
        layout, base = KVM, vm.kvm_pa
    else:
        layout, base = KVM_VCPU, vm.vcpus[a[1] % len(vm.vcpus)].pa
    # Not the teardown memcaches: the host driver trusts their counts when freeing them.
    fields = [f for f in layout.fields.values() if "_mc." not in f.name]
    f = fields[a[2] % len(fields)] if a[2] < 64 else fields[a[2] % min(HEADER_FIELDS, len(fields))]
    return base + f.offset, min(f.size, 8)


def _value(w: World, a: tuple[Any, ...], size: int, pa: int) -> bytes:
    """An interesting value, or ("rel", d): what is there now plus d (off-by-ones)."""
    v = a[3]
    if isinstance(v, tuple):
        v = int.from_bytes(w.m.host.read(pa, size), "little") + v[1]
    return int(v & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


def _scribble(w: World, cpu: int, a: tuple[Any, ...]) -> None:
    where = _struct_field(w, a)
    if where is not None:
        pa, size = where
        w.m.host.write(pa, _value(w, a, size, pa), cpu=cpu)


def _scribble_init(w: World, cpu: int, a: tuple[Any, ...]) -> None:
    """The host writes a field of a vCPU struct, then the driver creates the hyp vCPU."""
    got = _live_vcpu(w, a)
    if got is None:
        return
    vm, vcpu = got
    if vcpu.hyp_created:
        return
    fields = list(KVM_VCPU.fields.values())[:HEADER_FIELDS]
    f = fields[a[2] % len(fields)]
    size = min(f.size, 8)
    w.m.host.write(vcpu.pa + f.offset, _value(w, a, size, vcpu.pa + f.offset), cpu=cpu)
    vm.ensure_hyp_vcpu(vcpu)


def _race(w: World, cpu: int, a: tuple[Any, ...]) -> None:
    """Run step a[2] while a second host CPU overwrites, with value a[0], the host-shared bytes
    EL2 reads at its a[1]-th read of host-shared memory in that step."""
    w.racer.arm([], a[1], a[0])
    try:
        with w.m.preemption.scheduled(w.racer):
            run_op(w, cpu, a[2][0], a[2][1])
    finally:
        w.racer.arm([])


def _hostile_memcache(w: World, cpu: int, a: tuple[Any, ...]) -> None:
    """The host points a vCPU's memcache at a list of its choosing (unaligned head, pages in
    any state, a cycle, an overlong count), then asks for a guest mapping with it loaded."""
    got = _live_vcpu(w, a)
    if got is None:
        return
    vm, vcpu = got
    vm.ensure_hyp_vcpu(vcpu)
    host = w.m.host
    kind, spec, nr, off = a[2], a[3], a[4], a[5]
    head = (w.pfn(spec) << PAGE_SHIFT) & U64
    if kind == "unaligned":
        head |= off
    elif kind == "cycle":  # a host page linking to itself (or back to the first of two)
        p1, p2 = w.page(a[6]), w.page(a[6] + 1)
        host.write_u64(p1, p2 if off & 1 else p1)
        host.write_u64(p2, p1)
        head = p1
    elif kind == "chain":  # fresh host pages, linked, ending in the chosen page
        p1, p2 = host.alloc_pages(1), host.alloc_pages(1)
        w.pages += [p1, p2]
        host.write_u64(p1, p2)
        host.write_u64(p2, head)
        head = p1
    host.write_u64(vcpu.field_pa("arch.pkvm_memcache.head"), head)
    host.write_u64(vcpu.field_pa("arch.pkvm_memcache.nr_pages"), nr)
    hv = w.hvc
    hv(cpu, "__pkvm_vcpu_load", vm.handle, vcpu.idx, HCR_HOST_VCPU)
    if vm.protected:
        hv(cpu, "__pkvm_host_donate_guest", w.page(a[6]) >> PAGE_SHIFT, GFN0 + a[6] % 64)
    else:
        hv(cpu, "__pkvm_host_share_guest", w.page(a[6]) >> PAGE_SHIFT, GFN0 + a[6] % 64, 1, 0xF)
    hv(cpu, "__pkvm_vcpu_put")


def _exhaust_op(w: World, cpu: int, a: tuple[Any, ...]) -> None:
    """Take the host's free memory, leaving a[0] pages: the driver then runs short (the pages
    are only reserved in the host's allocator, never touched)."""
    alloc = w.m.host.pages
    want = alloc.free_pages() - a[0]
    while want > 0:
        n = want
        while n and (pfn := alloc.alloc(n)) is None:
            n //= 2
        if not n or pfn is None:
            break
        w.hoard.append((pfn, n))
        want -= n


# Every step op but the handle calls (`HANDLE_CALLS`) and the guest-memory calls (`GUEST_OPS`).
STEP_OPS: dict[str, Callable[[World, int, tuple[Any, ...]], None]] = {
    "alloc": _alloc, "share": _share, "unshare": _unshare, "create_vm": _create_vm,
    "map": _map, "destroy": _destroy, "lifecycle": _lifecycle, "reserve": _reserve,
    "init_vm": _init_vm, "init_vcpu": _init_vcpu, "load": _load, "put": _put,
    "session": _session, "scribble": _scribble, "scribble_init": _scribble_init,
    "race": _race, "memcache": _hostile_memcache, "exhaust": _exhaust_op,
    "release": _release, "raw": _raw, "ptr_call": _ptr_call,
}
