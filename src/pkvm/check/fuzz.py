"""The hostile-host fuzzer: seeded random hypercall sequences against a checked machine.

A run is a list of `Step`s (`pkvm.check.fuzz_ops`) drawn from a seeded `random.Random`. Each
step runs on a machine built with `check=True`: after every hypercall the invariants, the ghost
specification and the registered oracles (`pkvm.check.invariants`, `pkvm.check.ghost`,
`pkvm.check.oracles`) judge the result.

A *failure* is an `InvariantViolation`, a `HypPanic` from a fired `WARN_ON` (fatal at EL2 as in
Linux; signature `invariant:no-warn`, except at the counted `KNOWN_KERNEL_WARNS` sites of
`pkvm.check.oracles`), any exception other than
`HostError`, `HostDataAbort` and `HypPanic` escaping the model, or a `HypPanic` on a machine
that has seen only the real host driver's own steps (`DRIVER_OPS`: allocating, creating,
mapping, destroying VMs, whole life cycles). A failure
is shrunk (delta debugging over the step list, each candidate replayed on a fresh machine) and
the minimal run is written as a scenario TOML of raw hypercalls and host memory writes. A
`HypPanic` after hostile steps (a raw call with a garbage pointer the hyp dereferences, as
Linux's does) is an availability finding: counted, reported, and the fuzzer carries on with a fresh
machine.
"""

from __future__ import annotations

import random
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pkvm import scenario
from pkvm.board import Machine
from pkvm.check.fuzz_gen import generate
from pkvm.check.fuzz_ops import DRIVER_OPS, FULL_EVERY, Step, World, run_op, run_step
from pkvm.check.host_pointers import HostPointerStore
from pkvm.check.invariants import InvariantViolation
from pkvm.check.oracles import NoWarn, excused_warns
from pkvm.check.racer import Racer
from pkvm.errors import HostDataAbort, HostError, HypPanic

__all__ = ["FULL_EVERY", "Campaign", "CampaignResult", "Failure", "RunResult", "Step", "World",
           "execute", "generate", "replay", "run_step", "shrink"]


@dataclass
class Failure:
    kind: str  # "invariant" | "exception" | "panic"
    signature: str  # what must recur for a shrunk run to count as the same failure
    message: str
    step_index: int

    def __str__(self) -> str:
        return f"[{self.kind}] {self.message}"


# --- one run -------------------------------------------------------------------------------------
@dataclass
class RunResult:
    failure: Failure | None = None
    panics: list[str] = field(default_factory=list)
    known_warns: Counter[Any] = field(default_factory=Counter)  # WARN panics at KNOWN_KERNEL_WARNS
    steps_run: int = 0
    calls: Counter[Any] = field(default_factory=Counter)
    transitions: Counter[Any] = field(default_factory=Counter)
    driver_errors: Counter[Any] = field(default_factory=Counter)
    driver_tracebacks: dict[str, str] = field(default_factory=dict)
    raced: int = 0  # ghost predictions skipped: a racing host store changed the call's inputs
    # pages a 7.2 guest still borrowed when `__pkvm_finalize_teardown_vm` freed its VM (left
    # SHARED_OWNED with no borrower): excused by guest-consistent and the FF-A owner rule
    orphan_borrowed: int = 0
    # stores into hyp memory through a raw host pointer (`pkvm.check.host_pointers`), by call
    host_pointer_stores: Counter[Any] = field(default_factory=Counter)
    log: list[tuple[Any, ...]] = field(default_factory=list)


def _from_hyp(tb: Any) -> bool:
    return any("/pkvm/hyp/" in fr.filename for fr in traceback.extract_tb(tb))


def _from_driver(tb: Any) -> bool:
    """Raised in the host driver's own code (not below it in the hyp)?"""
    frames = traceback.extract_tb(tb)
    return not _from_hyp(tb) and any("/pkvm/host/" in fr.filename for fr in frames)


def execute(steps: list[Step], memory: str, cpus: int, abi: str, bugs: tuple[str, ...] = (),
            progress: Callable[[int], None] | None = None, stop_on_panic: bool = False,
            smc: bool = False) -> RunResult:
    """Run `steps` on fresh checked machines (with a secure world when `smc`); the first
    failure ends the run."""
    res = RunResult()
    w = World(memory, cpus, abi, bugs, smc=smc)
    warnings.simplefilter("ignore")
    for i, s in enumerate(steps):
        res.steps_run = i + 1
        if s.op not in DRIVER_OPS:
            w.hostile = True
        try:
            run_op(w, s.cpu % w.m.nr_cpus, s.op, s.a)  # (`run_step(w, s)`, a frame less)
        except (HostError, MemoryError):
            pass
        except HostDataAbort:
            if w.m.dead:  # 6.12: the hyp's BUG_ON on a refused host access
                res.panics.append(f"step {i}: fatal host abort ({s})")
                if not w.hostile:
                    res.failure = Failure("panic", f"panic@{s.op}", "fatal host abort in a call "
                                          f"sequence the host driver issues ({s})", i)
                    break
                w = _reboot(res, w)
        except HypPanic as e:
            res.failure = _panic_failure(res, e, w, i, s, stop_on_panic)
            if res.failure is not None:
                break
            w = _reboot(res, w)
        except HostPointerStore as e:
            res.host_pointer_stores[e.call] += 1
            if not w.hostile:
                res.failure = Failure("invariant", "host-pointer-store", f"{e} in a call "
                                      f"sequence the host driver issues ({s})", i)
                break
            w = _reboot(res, w)
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


def _reboot(res: RunResult, w: World) -> World:
    """The machine is dead (or its hyp state corrupt): keep what it counted, boot a new one."""
    _absorb(res, w)
    new = World(w.cfg["memory"], w.cfg["cpus"], w.cfg["abi"], w.bugs, smc=w.smc, recycle=w)
    w.retire()
    return new


def _panic_failure(res: RunResult, e: HypPanic, w: World, i: int, s: Step,
                   stop_on_panic: bool) -> Failure | None:
    """A hyp panic: a failure (a WARN the host reached, or a panic on the host driver's own
    call sequence), else an availability finding, counted."""
    warn = _warn_failure(e, w.m, i)
    if warn is not None:
        return warn
    if e.warn:
        res.known_warns.update(excused_warns(w.m.inspect))
    res.panics.append(f"step {i}: {e} ({s})")
    if not w.hostile:
        return Failure("panic", f"panic@{s.op}", f"hyp panic in a call sequence the host "
                       f"driver issues ({s}): {e}", i)
    if stop_on_panic:
        return Failure("panic", "HypPanic", str(e), i)
    return None


def _warn_failure(e: HypPanic, m: Any, i: int) -> Failure | None:
    """A panic from a fired `WARN_ON` the host reached: the `no-warn` finding (a WARN at EL2 is
    fatal, as in Linux, so the oracle can no longer see it after the call). A WARN at one of
    `KNOWN_KERNEL_WARNS` is the kernel's own behaviour: None, an availability finding."""
    if not e.warn:
        return None
    bad = NoWarn.violations(m.inspect)
    if not bad:
        return None
    return Failure("invariant", "invariant:no-warn", f"no-warn: {bad[0]}\n({e})", i)


def _absorb(res: RunResult, w: World) -> None:
    res.calls.update(w.count_results())
    w.results = Counter()
    if w.m.checker is not None:
        res.transitions.update(w.m.checker.transitions)
        w.m.checker.transitions = Counter()
        if w.m.checker.ghost is not None:
            ghost = w.m.checker.ghost
            res.raced += ghost.guest.raced + ghost.calls.skipped
            ghost.guest.raced = ghost.calls.skipped = 0
        res.orphan_borrowed += sum(w.m.checker.orphan_borrowed.values())  # (once per machine)


# --- shrinking -----------------------------------------------------------------------------------
def shrink(steps: list[Step], failure: Failure, memory: str, cpus: int, abi: str,
           bugs: tuple[str, ...] = (), max_runs: int = 400, max_seconds: float = 120.0,
           smc: bool = False) -> tuple[list[Step], RunResult]:
    """ddmin: the smallest step list (1-minimal within the budget) failing with the same signature."""
    t0 = time.monotonic()
    runs = 0

    def fails(cand: list[Step]) -> RunResult | None:
        nonlocal runs
        runs += 1
        r = execute(cand, memory, cpus, abi, bugs, smc=smc)
        if r.failure is not None and r.failure.signature == failure.signature:
            return r
        return None

    cur = steps[: failure.step_index + 1]
    best = fails(cur)
    if best is None:  # not reproducible from a fresh machine (should not happen: all seeded)
        return cur, execute(cur, memory, cpus, abi, bugs, smc=smc)
    assert best.failure is not None  # `fails` returns only failed runs
    cur = cur[: best.failure.step_index + 1]
    n = 2
    while len(cur) >= 2 and runs < max_runs and time.monotonic() - t0 < max_seconds:
        chunk = max(1, len(cur) // n)
        reduced = False
        for start in range(0, len(cur), chunk):
            cand = cur[:start] + cur[start + chunk:]
            r = fails(cand) if cand else None
            if r is not None and r.failure is not None:
                cur, best = cand[: r.failure.step_index + 1], r
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
    own: the hypercall's `note` lists it ("race_writes: at=K PA=HEX ...": at the K-th EL2 read of
    host-shared memory, counted from 0) for `replay`."""
    out: list[dict[str, Any]] = []
    for ev in log:
        if ev[0] == "hvc":
            _, cpu, func, args, race = ev
            st: dict[str, Any] = {"hvc": func, "cpu": cpu, "args": list(args)}
            if race:
                st["note"] = (RACE_NOTE + f" at={race[0][2]} "
                              + " ".join(f"{pa:#x}={d.hex()}" for pa, d, _ in race))
            out.append(st)
        elif ev[0] == "smc":
            _, cpu, func, args, imm = ev
            st = {"smc": func, "cpu": cpu, "args": list(args)}
            if imm:
                st["imm"] = imm
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
    scenario.dump(steps, path, machine=dict(cfg, check=True))
    body = Path(path).read_text()
    head = "".join(f"# {ln}\n" for ln in comment.splitlines())
    Path(path).write_text(head + body)


def replay(cfg: dict[str, Any], steps: list[dict[str, Any]], bugs: tuple[str, ...] = ()) -> Failure | None:
    """Run raw scenario steps on a fresh checked machine; the failure they cause, if any."""
    m = Machine(memory=cfg["memory"], cpus=cfg["cpus"], abi=cfg["abi"], check=True,
                trace=False, bugs=bugs, ffa=cfg.get("ffa", False))
    racer = Racer(m, m.host.port)
    for i, st in enumerate(steps):
        cpu = st.get("cpu", 0)
        try:
            if "hvc" in st:
                note = st.get("note", "")
                plan, at = [], 0
                if note.startswith(RACE_NOTE):
                    for item in note[len(RACE_NOTE):].split():
                        k, v = item.split("=")
                        if k == "at":
                            at = int(v)
                        else:
                            plan.append((int(k, 0), bytes.fromhex(v)))
                racer.arm(plan, at)
                with m.preemption.scheduled(racer):
                    m.hvc(cpu, st["hvc"], *st.get("args", []))
            elif "host_write" in st:
                m.host.port.write(cpu, st["host_write"], bytes.fromhex(st["data"]))
            elif "smc" in st:
                m.smc(cpu, st["smc"], *st.get("args", []), imm=st.get("imm", 0))
        except (HostDataAbort, HypPanic) as e:
            if isinstance(e, HypPanic) and (warn := _warn_failure(e, m, i)) is not None:
                return warn
            if m.dead:
                return Failure("panic", "HypPanic", str(e), i)
        except InvariantViolation as v:
            return Failure("invariant", f"invariant:{v.invariant}", str(v), i)
        except Exception as e:  # noqa: BLE001
            last = traceback.extract_tb(e.__traceback__)[-1]
            return Failure("exception", f"exception:{type(e).__name__}@{last.name}", repr(e), i)
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
    smc: bool = False  # host SMCs too: hostile FF-A (a secure world at EL3) and PSCI calls

    def run(self, progress: Callable[[int], None] | None = None) -> CampaignResult:
        prof = Machine(memory=self.memory, cpus=self.cpus, abi=self.abi, trace=False).profile
        steps = generate(random.Random(self.seed), prof, self.cpus, self.steps, smc=self.smc)
        t0 = time.perf_counter()
        res = execute(steps, self.memory, self.cpus, self.abi, self.bugs, progress, smc=self.smc)
        elapsed = time.perf_counter() - t0
        out = CampaignResult(self, res, elapsed)
        if res.failure is not None:
            small, sres = shrink(steps, res.failure, self.memory, self.cpus, self.abi, self.bugs,
                                 smc=self.smc)
            out.minimal = small
            out.minimal_failure = sres.failure
            out.raw_steps = log_to_steps(sres.log)
            if self.out:
                cfg: dict[str, Any] = {"memory": self.memory, "cpus": self.cpus, "abi": self.abi}
                if self.smc:
                    cfg["ffa"] = True
                comment = (f"pkvm fuzz --seed {self.seed} --steps {self.steps} --abi {self.abi}"
                           + (" --smc" if self.smc else "")
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
