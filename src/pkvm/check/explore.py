"""`pkvm explore`: systematic interleavings of hypercalls on several CPUs.

One Python thread per CPU runs that CPU's program (hypercalls, or host stores for a racing host
CPU, made through the host stage-2 like the host's own), but only the thread holding the baton
runs. The machine's preemption points (`pkvm.machine.preempt`: every lock acquire and release,
every EL2 read of host-shared memory) call the installed scheduler; there, and before each
program step, the baton may pass to another runnable CPU. A CPU spinning
on a lock another holds is not runnable. Each execution is fully determined by its list of
choices, so the explorer enumerates them depth-first (stateless model checking) with a bound on
preemptions (switching away from a CPU that could have continued).

Oracles per execution: no exception but `HypPanic` escapes (and no WARN_ON panics the hyp
but a counted `KNOWN_KERNEL_WARNS` one), no deadlock, every invariant holds
at the end, and the outcome (each CPU's results and the final abstract state) equals the outcome
of some serial order of the same calls (linearizability at hypercall granularity).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pkvm import scenario as sc
from pkvm.abi import sizes
from pkvm.board import Machine
from pkvm.check.invariants import Checker, InvariantViolation
from pkvm.check.oracles import NoWarn
from pkvm.errors import HostDataAbort, HypPanic
from pkvm.host.kvm import host_va
from pkvm.machine.memory import PAGE_SHIFT

Op = tuple[Any, ...]  # ("hvc", name, *args) | ("smc", func, *args) | ("store", pa, bytes)
Setup = Callable[[Any], dict[int, list[Op]]]


class Deadlock(Exception):
    pass


@dataclass
class Execution:
    choices: list[tuple[int, int]] = field(default_factory=list)  # (chosen, options)
    trace: list[str] = field(default_factory=list)  # "cpu1 acquire host_mmu.lock", ...
    results: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    finding: str | None = None


class BatonScheduler:
    """Runs `programs` on machine `m` under the choice list `prefix` (then: no preemption)."""

    def __init__(self, m: Any, programs: dict[int, list[Op]], prefix: list[int], bound: int):
        self.m = m
        self.pts = m.preemption
        self.programs = programs
        self.prefix = prefix
        self.bound = bound
        self.cpus = sorted(programs)
        self.cond = threading.Condition()
        self.turn: int | None = None
        self.done = {c: False for c in self.cpus}
        self.blocked: dict[int, Any] = {c: None for c in self.cpus}
        self.preemptions = 0
        self.ex = Execution(results={c: [] for c in self.cpus})
        self.aborted = False
        self.in_call = {c: False for c in self.cpus}
        # Checked at quiescent points only (no CPU inside the hyp): mid-call states of other
        # CPUs may legitimately break invariants the locks are protecting.
        self.checker = Checker(m, ghost=False, initial_check=False, full_every=0)

    # -- choice points -----------------------------------------------------------------
    def _runnable(self) -> list[int]:
        return [c for c in self.cpus if not self.done[c]
                and (self.blocked[c] is None or self.blocked[c].owner is None)]

    def _choose(self, cur: int | None, options: list[int]) -> int:
        if cur in options:  # continuing is option 0; the rest are preemptions
            options = [cur] + [c for c in options if c != cur]
            if self.preemptions >= self.bound:
                options = [cur]
        if len(options) == 1:
            return options[0]
        k = len(self.ex.choices)
        i = self.prefix[k] if k < len(self.prefix) else 0
        self.ex.choices.append((i, len(options)))
        nxt = options[i]
        if cur in options and nxt != cur:
            self.preemptions += 1
        return nxt

    def _switch(self, cpu: int, finished: bool = False) -> None:
        """Called by the thread holding the baton: pick who runs next, wait for our turn."""
        runnable = self._runnable()
        if not runnable:
            if finished or all(self.done.values()):
                with self.cond:
                    self.turn = None
                    self.cond.notify_all()
                return
            self.aborted = True
            with self.cond:
                self.turn = None
                self.cond.notify_all()
            raise Deadlock(f"every CPU left spins on a lock: {self.blocked}")
        nxt = self._choose(None if finished else cpu, runnable)
        if nxt == cpu:
            return
        with self.cond:
            self.turn = nxt
            self.pts.switch_to(nxt)
            self.cond.notify_all()
            if finished:
                return
            while self.turn != cpu:
                if self.aborted:
                    raise Deadlock("aborted")
                self.cond.wait()
        self.pts.switch_to(cpu)

    # -- the machine's scheduling hooks (pkvm.machine.preempt.Scheduler) ---------------------
    def preempt(self, cpu: int, event: str, detail: str) -> None:
        self.ex.trace.append(f"cpu{cpu} {event} {detail}")
        self._switch(cpu)

    def wait_lock(self, cpu: int, lock: Any) -> None:
        self.ex.trace.append(f"cpu{cpu} spins on {lock.name}")
        self.blocked[cpu] = lock
        while lock.owner is not None:
            self._switch(cpu)
        self.blocked[cpu] = None

    # -- threads ------------------------------------------------------------------------
    def _body(self, cpu: int) -> None:
        with self.cond:
            while self.turn != cpu:
                if self.aborted:
                    return
                self.cond.wait()
        self.pts.switch_to(cpu)
        try:
            for op in self.programs[cpu]:
                self.ex.trace.append(f"cpu{cpu} step {op[:2]}")
                self._quiescent_check()
                self._switch(cpu)
                if op[0] == "store":
                    self.ex.results[cpu].append(host_store(self.m, cpu, op[1], op[2]))
                else:
                    self.in_call[cpu] = True
                    res = call(self.m, cpu, op)
                    self.in_call[cpu] = False
                    self.ex.results[cpu].append(res)
            self._quiescent_check()
        except HypPanic as e:
            self.ex.errors[cpu] = f"HypPanic: {e}"
        except Deadlock as e:
            self.ex.errors[cpu] = f"Deadlock: {e}"
        except Exception as e:  # noqa: BLE001 - what we look for
            self.ex.errors[cpu] = f"{type(e).__name__}: {e}"
        finally:
            self.done[cpu] = True
            try:
                self._switch(cpu, finished=True)
            except Deadlock as e:
                self.ex.errors[cpu] = f"Deadlock: {e}"

    def _quiescent_check(self) -> None:
        if any(self.in_call.values()) or self.m.dead:
            return
        self.checker.check_changed()

    def run(self) -> Execution:
        with self.pts.scheduled(self):
            return self._run()

    def _run(self) -> Execution:
        threads = [threading.Thread(target=self._body, args=(c,), daemon=True) for c in self.cpus]
        for t in threads:
            t.start()
        first = self._choose(None, self.cpus)
        with self.cond:
            self.turn = first
            self.cond.notify_all()
        for t in threads:
            t.join(timeout=30)
            if t.is_alive():
                self.aborted = True
                self.ex.errors[-1] = "an execution did not finish (scheduler hang)"
        return self.ex


# --- exploring ---------------------------------------------------------------------------------
def _outcome(m: Any, ex: Execution) -> tuple[Any, ...]:
    return (tuple(tuple(ex.results[c]) for c in sorted(ex.results)),
            tuple(sorted(m.inspect.page_counts().items(), key=repr)),
            tuple(repr(v) for v in m.inspect.vms()))


def host_store(m: Any, cpu: int, pa: int, data: bytes) -> tuple[int, int]:
    """A host CPU's store, through the host stage-2: (0, 0), or (-1, 0) where it aborts."""
    try:
        m.host.write(pa, data, cpu=cpu)
        return (0, 0)
    except HostDataAbort:
        if m.dead:
            raise HypPanic(m.dead, cpu, "host abort") from None
        return (-1, 0)


def call(m: Any, cpu: int, op: tuple[Any, ...]) -> tuple[int, int]:
    """A program's hypercall (x0, x1) or host SMC (x0, x2: FF-A's status and error code)."""
    if op[0] == "smc":
        s = m.smc(cpu, op[1], *op[2:])
        return (s.x0, s.x2)
    r = m.hvc(cpu, op[1], *op[2:])
    return (r.x0, r.x1)


class _Fresh:
    """Fresh, set-up machines for one exploration: the first is made and set up, every later
    one is loaded from its snapshot (`Machine.snapshot`), which is the same machine at a
    fraction of the cost. A set-up a snapshot cannot hold (one that ran guest code) is made
    and set up afresh every time."""

    def __init__(self, make: Callable[[], Any], setup: Setup):
        self._make, self._setup = make, setup
        self._saved: tuple[bytes, dict[int, list[Op]]] | None = None
        self._snapshots = True

    def __call__(self) -> tuple[Any, dict[int, list[Op]]]:
        if self._saved is not None:
            data, programs = self._saved
            return Machine.restore(data), {c: list(p) for c, p in programs.items()}
        m = self._make()
        programs = self._setup(m)
        if self._snapshots:
            try:
                self._saved = (m.snapshot(), {c: list(p) for c, p in programs.items()})
            except ValueError:
                self._snapshots = False
        return m, programs


def serial_outcomes(make: Callable[[], Any], setup: Setup,
                    fresh: _Fresh | None = None) -> set[tuple[Any, ...]]:
    """Outcomes of every interleaving at step granularity (each step runs alone); `fresh`: the
    exploration's own machines, so its set-up runs once."""
    fresh = fresh or _Fresh(make, setup)
    m, programs = fresh()
    cpus = sorted(programs)
    seq = [c for c in cpus for _ in programs[c]]
    out = set()
    for order in set(itertools.permutations(seq)):
        m, programs = fresh()
        pos = {c: 0 for c in cpus}
        ex = Execution(results={c: [] for c in cpus})
        for c in order:
            op = programs[c][pos[c]]
            pos[c] += 1
            if op[0] == "store":
                ex.results[c].append(host_store(m, c, op[1], op[2]))
            else:
                try:
                    ex.results[c].append(call(m, c, op))
                except HypPanic:
                    ex.results[c].append((-1, -1))
        out.add(_outcome(m, ex))
    return out


@dataclass
class ExploreResult:
    executions: int
    findings: list[Execution]
    exhausted: bool


def explore(make: Callable[[], Any], setup: Setup, bound: int = 2, max_runs: int = 2000,
            stop_at_first: bool = True,
            progress: Callable[[int], None] | None = None) -> ExploreResult:
    """`progress(runs)` is called after each execution (a display's live count)."""
    fresh = _Fresh(make, setup)
    serial = serial_outcomes(make, setup, fresh)
    findings: list[Execution] = []
    prefix: list[int] = []
    runs = 0
    exhausted = False
    while runs < max_runs:
        m, programs = fresh()
        ex = BatonScheduler(m, programs, prefix, bound).run()
        runs += 1
        if progress is not None:
            progress(runs)
        bad = [e for e in ex.errors.values() if not e.startswith("HypPanic")]
        if m.dead:  # a fired WARN_ON panics the hyp: still the no-warn oracle's finding
            bad += [f"no-warn: {w}" for w in NoWarn.violations(m.inspect)]
        if bad:
            ex.finding = bad[0]
        elif not m.dead:
            try:
                Checker(m, ghost=False)  # everything, at the end
            except InvariantViolation as v:
                ex.finding = str(v)
            if ex.finding is None and _outcome(m, ex) not in serial:
                ex.finding = ("not linearizable: results " + repr(ex.results)
                              + " match no serial order of the same calls")
        if ex.finding is not None:
            findings.append(ex)
            if stop_at_first:
                break
        # next schedule: bump the last choice that has an untried alternative
        ch = ex.choices
        i = len(ch) - 1
        while i >= 0 and ch[i][0] + 1 >= ch[i][1]:
            i -= 1
        if i < 0:
            exhausted = True
            break
        prefix = [c for c, _ in ch[:i]] + [ch[i][0] + 1]
    return ExploreResult(runs, findings, exhausted)


# --- built-in scenarios --------------------------------------------------------------------------
def _vm(m: Any, vcpus: int = 2) -> Any:
    """A VM whose hyp VM and hyp vCPU 0 exist, with no guest memory mapped yet."""
    vm = m.host.create_vm(vcpus=vcpus, memory="256K")
    vm.ensure_hyp_vcpu(vm.vcpus[0])
    return vm


def _share_share(m: Any) -> dict[int, list[Op]]:
    pfn = m.host.alloc_pages(1) >> PAGE_SHIFT
    return {0: [("hvc", "__pkvm_host_share_hyp", pfn)], 1: [("hvc", "__pkvm_host_share_hyp", pfn)]}


def _share_unshare(m: Any) -> dict[int, list[Op]]:
    pfn = m.host.alloc_pages(1) >> PAGE_SHIFT
    return {0: [("hvc", "__pkvm_host_share_hyp", pfn), ("hvc", "__pkvm_host_unshare_hyp", pfn)],
            1: [("hvc", "__pkvm_host_unshare_hyp", pfn), ("hvc", "__pkvm_host_share_hyp", pfn)]}


def _reserve_reserve(m: Any) -> dict[int, list[Op]]:
    return {0: [("hvc", "__pkvm_reserve_vm")], 1: [("hvc", "__pkvm_reserve_vm")]}


def _load_load(m: Any) -> dict[int, list[Op]]:
    vm = _vm(m)
    return {c: [("hvc", "__pkvm_vcpu_load", vm.handle, 0, 0), ("hvc", "__pkvm_vcpu_put")]
            for c in (0, 1)}


def _load_teardown(m: Any) -> dict[int, list[Op]]:
    vm = _vm(m)
    return {0: [("hvc", "__pkvm_vcpu_load", vm.handle, 0, 0), ("hvc", "__pkvm_vcpu_put")],
            1: [("hvc", "__pkvm_start_teardown_vm", vm.handle),
                ("hvc", "__pkvm_finalize_teardown_vm", vm.handle)]}


def _init_vcpu_unshare(m: Any) -> dict[int, list[Op]]:
    """cpu0 creates hyp vCPU 1 (pinning its host struct) while cpu1 unshares that struct."""

    vm = _vm(m)
    v1 = vm.vcpus[1]
    mem = m.host.alloc_pages(sizes.page_align(sizes.PKVM_HYP_VCPU_SIZE) >> PAGE_SHIFT)
    return {0: [("hvc", "__pkvm_init_vcpu", vm.handle, host_va(v1.pa), host_va(mem))],
            1: [("hvc", "__pkvm_host_unshare_hyp", v1.pa >> PAGE_SHIFT)]}


# --- a user's scenario file ------------------------------------------------------------------------
SETUP_ACTIONS = ("alloc", "create_vm", "map", "host_read")


def from_file(path: str, bugs: tuple[str, ...] = ()
              ) -> tuple[Callable[[], Any], Setup, dict[str, Any]]:
    """(make, setup, machine table) exploring a scenario file (`docs/scenarios.md`).

    Its `alloc`, `create_vm`, `map` and `host_read` steps are the set-up, played in file order
    on a fresh machine; its `hvc`, `smc` and `host_write` steps are the concurrent part: each goes to
    the program of the CPU its `cpu` key names (0 by default), in file order. Symbols
    (`page:`, `vm:`, `vcpu:`, `gfn:`) are resolved after the set-up."""
    scen = sc.load(path)
    for st in scen.steps:
        if st.action not in SETUP_ACTIONS + ("hvc", "smc", "host_write"):
            raise sc.ScenarioError(path, st.line, f"`pkvm explore` cannot interleave a "
                                   f"{st.action!r} step: only hvc, smc and host_write run "
                                   "concurrently")
        if st.action == "smc" and st.fields.get("imm"):
            raise sc.ScenarioError(path, st.line, "`pkvm explore` issues smc steps with "
                                   "immediate 0 (`imm` is for `pkvm run`)")

    def make() -> Any:
        return scen.new_machine(trace=False, check=False, bugs=bugs)

    def setup(m: Any) -> dict[int, list[Op]]:
        runner = sc._Runner(m, path)
        programs: dict[int, list[Op]] = {}
        for i, st in enumerate(scen.steps):
            if st.action in SETUP_ACTIONS:
                res = runner.step(i, st)
                if res.outcome in ("abort", "panic", "errno"):
                    raise sc.ScenarioError(path, st.line, f"set-up step failed: {res.detail}")
        for st in scen.steps:
            if st.action in ("hvc", "smc"):
                args = [runner.resolve(v, st) for v in st.fields.get("args", [])]
                programs.setdefault(st.cpu, []).append((st.action, st.target, *args))
            elif st.action == "host_write":
                pa = runner.resolve(st.target, st, address=True)
                programs.setdefault(st.cpu, []).append(
                    ("store", pa, bytes.fromhex(st.fields["data"])))
        return programs

    return make, setup, dict(scen.machine)


SCENARIOS: dict[str, tuple[str, Setup, tuple[str, ...]]] = {
    "share-share": ("two CPUs share the same page", _share_share, ("latest", "6.12")),
    "share-unshare": ("share/unshare crossing on two CPUs", _share_unshare, ("latest", "6.12")),
    "reserve-reserve": ("two CPUs reserve a VM handle", _reserve_reserve, ("latest",)),
    "load-load": ("two CPUs load the same vCPU", _load_load, ("latest",)),
    "load-teardown": ("load/put against start/finalize teardown", _load_teardown, ("latest",)),
    "init-vcpu-unshare": ("init_vcpu against the host unsharing the vCPU's struct",
                          _init_vcpu_unshare, ("latest",)),
}
