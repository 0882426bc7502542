"""Compare the model with the real Linux pKVM, step by step (`pkvm conform`).

A step is compared only when both machines executed it; a step after a panic is "not run" on
that side and counted apart. Both panicked at the step: they agree when the kind of death is
the same (hyp panic / host oops / lockup; a Python exception in the model, "model error", never
agrees). Neither panicked: x0..x3 are all compared. A register whose argument was symbolic
(`page:`, `pa:`, `va:`, `vm:`) agrees when both sides hold their own resolution of the symbol
(the call left it as passed), or both hold the same other value. VMM steps compare x0..x3 too.

A divergence may stand only if an entry of `KNOWN_DIFFERENCES` matches the exact state it
explains; each entry counts the steps it excused.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pkvm import scenario
from pkvm.conform.model import GUEST_CODE, GUEST_MEMORY, model_abi, run_sequences_on_model
from pkvm.conform.real import BootLog, run_sequences
from pkvm.conform.steps import (
    HOST_READ,
    RawStep,
    RealResult,
    host_read,
    vm_create,
    vm_destroy,
    vm_run,
    vm_topup,
)

AGREE, DIFFER, KNOWN, NOT_RUN = "agree", "differ", "known", "not run"


@dataclass
class Known:
    """One known difference: `matches(kernel, step, model, real)` is true only in the exact
    state the reason explains; `excused` counts the steps it excused in this process."""

    name: str
    reason: str
    matches: Callable[[str, RawStep, RealResult, RealResult], bool]
    excused: Counter[str] = field(default_factory=Counter)  # kernel -> steps


# Each entry matches only the exact state its reason explains. Empty since the real side runs on
# QEMU 10: QEMU 7.2 kept a stale EL2 TLB entry after the hyp unmapped a page (the only entry
# there was), and on QEMU 10 the real hyp panics at the same step as the model.
KNOWN_DIFFERENCES: list[Known] = []


@dataclass
class StepDiff:
    index: int
    step: RawStep
    model: RealResult
    real: RealResult
    status: str  # AGREE, DIFFER, KNOWN or NOT_RUN
    fields: tuple[str, ...]  # what differs: registers, "panic" or "kind"
    known: str | None = None  # the known difference's name

    @property
    def agree(self) -> bool:
        return self.status == AGREE

    @property
    def executed(self) -> bool:
        return self.status != NOT_RUN

    def as_dict(self) -> dict[str, Any]:
        def regs(r: RealResult) -> dict[str, Any]:
            return {"x0": r.x0, "x1": r.x1, "x2": r.x2, "x3": r.x3, "panic": r.panic,
                    "kind": r.kind, "not_run": r.not_run, "note": r.note}

        return {"index": self.index, "call": self.step.call, "args": list(self.step.args),
                "cpu": self.step.cpu, "model": regs(self.model), "real": regs(self.real),
                "status": self.status, "differs": list(self.fields), "known": self.known}


def _resolution(arg: int | str, r: RealResult, handles: dict[str, int]) -> int | None:
    """What a symbolic argument was on the machine that answered `r` (None: an int)."""
    if isinstance(arg, int):
        return None
    kind, name = arg.split(":", 1)
    if kind == "vm":
        return handles.get(name, 0)
    pfn = r.pages.get(name)
    if pfn is None:
        return 0
    return {"page": pfn, "pa": pfn << 12, "va": r.vas.get(name, 0)}[kind]


def _reg_agrees(st: RawStep, n: int, mo: RealResult, re_: RealResult,
                handles: tuple[dict[str, int], dict[str, int]]) -> bool:
    mv, rv = int(getattr(mo, f"x{n}")) & (2**64 - 1), int(getattr(re_, f"x{n}")) & (2**64 - 1)
    arg = st.args[n - 1] if n - 1 < len(st.args) else None
    is_vmm = isinstance(st.call, str) and st.call.startswith(("vmm:", "host:"))
    if arg is None or is_vmm or isinstance(arg, int):
        return mv == rv
    m_sym = mv == (_resolution(arg, mo, handles[0]) or 0) & (2**64 - 1)
    r_sym = rv == (_resolution(arg, re_, handles[1]) or 0) & (2**64 - 1)
    return m_sym == r_sym and (m_sym or bool(mv == rv))


def compare_step(kernel: str, i: int, st: RawStep, mo: RealResult, re_: RealResult,
                 handles: tuple[dict[str, int], dict[str, int]] = ({}, {})) -> StepDiff:
    if mo.not_run or re_.not_run:
        return StepDiff(i, st, mo, re_, NOT_RUN, ())
    if mo.panic or re_.panic:
        fields: tuple[str, ...] = ()
        if mo.panic != re_.panic:
            fields = ("panic",)
        elif mo.kind != re_.kind or mo.kind == "model error":
            fields = ("kind",)
    else:
        fields = tuple(f"x{n}" for n in range(4)
                       if not (_reg_agrees(st, n, mo, re_, handles) if n else mo.x0 == re_.x0))
    if not fields:
        return StepDiff(i, st, mo, re_, AGREE, ())
    for k in KNOWN_DIFFERENCES:
        if k.matches(kernel, st, mo, re_):
            k.excused[kernel] += 1
            return StepDiff(i, st, mo, re_, KNOWN, fields, k.name)
    return StepDiff(i, st, mo, re_, DIFFER, fields)


def compare(kernel: str, seq: list[RawStep], model: list[RealResult],
            real: list[RealResult]) -> list[StepDiff]:
    out: list[StepDiff] = []
    handles: tuple[dict[str, int], dict[str, int]] = ({}, {})
    for i, (st, mo, re_) in enumerate(zip(seq, model, real, strict=True)):
        out.append(compare_step(kernel, i, st, mo, re_, handles))
        if st.call == "vmm:create":
            name = str(st.args[0]).split(":", 1)[1]
            for side, r in zip(handles, (mo, re_)):
                if not r.panic and r.x0 == 0:
                    side[name] = r.x1 & (2**64 - 1)
    return out


def run_both(kernel: str, seqs: list[list[RawStep]], progress: bool = False,
             jobs: int = 1, per_boot: int = 1,
             real: list[list[RealResult]] | None = None) -> list[list[StepDiff]]:
    """Run on Linux, then on the model with the same grouping of sequences into machines.

    By default every sequence gets a fresh machine on both sides (the real one restored from
    its QEMU snapshot), so no state carries over between sequences; with `per_boot` > 1 the
    real harness shares boots and the model mirrors the grouping it reports. `real`: results
    of an earlier real run of the same sequences (one fresh machine each) to compare again."""

    if real is None:
        logs: list[BootLog] = []
        real = run_sequences(kernel, seqs, progress=progress, jobs=jobs, per_boot=per_boot,
                             logs=logs)
        groups = boot_groups(real, [lg.sequences for lg in logs])
    else:
        groups = [1] * len(seqs)
    model = run_sequences_on_model(kernel, seqs, groups)
    return [compare(kernel, s, mo, r) for s, mo, r in zip(seqs, model, real, strict=True)]


def boot_groups(real: list[list[RealResult]], batches: list[int]) -> list[int]:
    """How many sequences each real boot completed: a boot given a batch stops after the
    sequence in which the machine died (the rest of its batch went to the next boot)."""
    groups, pos = [], 0
    for size in batches:
        done = 0
        for seq in real[pos : pos + size]:
            done += 1
            if any(r.panic for r in seq):
                break
        groups.append(done)
        pos += done
    return groups


def diverges(diffs: list[StepDiff]) -> bool:
    return any(d.status == DIFFER for d in diffs)


@dataclass
class Summary:
    """Counts over a run: agreement is over steps both sides executed."""

    steps: int = 0
    agree: int = 0
    differ: int = 0
    known: Counter[str] = field(default_factory=Counter)  # known-difference name -> steps
    not_run: int = 0

    @property
    def executed(self) -> int:
        return self.agree + self.differ + sum(self.known.values())

    @property
    def percent(self) -> float:
        return 100.0 * self.agree / max(self.executed, 1)


def summarize(results: list[list[StepDiff]]) -> Summary:
    s = Summary()
    for diffs in results:
        for d in diffs:
            s.steps += 1
            if d.status == AGREE:
                s.agree += 1
            elif d.status == DIFFER:
                s.differ += 1
            elif d.status == KNOWN:
                s.known[d.known or ""] += 1
            else:
                s.not_run += 1
    return s


def shrink(kernel: str, seq: list[RawStep],
           still_diverges: Callable[[list[RawStep]], bool]) -> list[RawStep]:
    """Delta-debugging: the shortest sub-sequence (by removing chunks) that still diverges."""
    n = 2
    cur = list(seq)
    while len(cur) >= 2:
        chunk = max(1, len(cur) // n)
        removed = False
        for start in range(0, len(cur), chunk):
            cand = cur[:start] + cur[start + chunk:]
            if cand and still_diverges(cand):
                cur = cand
                n = max(n - 1, 2)
                removed = True
                break
        if not removed:
            if chunk == 1:
                break
            n = min(len(cur), n * 2)
    return cur


# -- reproducers -----------------------------------------------------------------------------
def scenario_tables(seq: list[RawStep],
                    real: list[RealResult] | None = None) -> list[dict[str, Any]]:
    """The scenario steps (`pkvm.scenario` tables) of a sequence; `real`: the kernel's answers,
    written as each hvc step's expectation (x0, and x1 unless a symbol was passed in x1)."""
    out: list[dict[str, Any]] = []
    for i, st in enumerate(seq):
        cpu = {"cpu": st.cpu} if st.cpu else {}
        if isinstance(st.call, str) and st.call.startswith("vmm:"):
            name = str(st.args[0]).split(":", 1)[1]
            if st.call == "vmm:create":
                vcpus = int(st.args[1]) if len(st.args) > 1 else 1
                protected = bool(st.args[2]) if len(st.args) > 2 else False
                out.append({"create_vm": name, "vcpus": vcpus, "protected": protected,
                            "memory": GUEST_MEMORY, "code": list(GUEST_CODE)})
                out.append({"run": name, "vcpu": 0})
            elif st.call == "vmm:run":
                out.append({"run": name, "vcpu": int(st.args[1]) if len(st.args) > 1 else 0})
            elif st.call == "vmm:topup":
                out.append({"topup": name, "vcpu": int(st.args[1]) if len(st.args) > 1 else 0,
                            "pages": int(st.args[2]) if len(st.args) > 2 else 4})
            else:
                out.append({"destroy": name})
            continue
        if st.call == HOST_READ:
            out.append({"host_read": st.args[0], "size": PAGE_SIZE, **cpu})
            continue
        t: dict[str, Any] = {"hvc": st.call, "args": list(st.args), **cpu}
        r = real[i] if real is not None else None
        if r is not None and not r.not_run:
            expect: dict[str, Any] = {"panic": r.kind == "hyp panic"} if r.panic else {"x0": r.x0}
            if not r.panic and not (st.args and isinstance(st.args[0], str)):
                expect["x1"] = r.x1
            t["expect"] = expect
        out.append(t)
    return out


def write_scenario(kernel: str, seq: list[RawStep], path: str,
                   real: list[RealResult] | None = None) -> None:
    """Write `seq` as a scenario file (`pkvm run PATH` replays it on the model, with the
    kernel's answers as expectations; `pkvm conform PATH` on both)."""
    scenario.dump(scenario_tables(seq, real), path,
                  machine={"memory": "1G", "cpus": 2, "abi": model_abi(kernel)})


def from_scenario(sc: scenario.Scenario) -> list[RawStep]:
    """The `RawStep`s of a loaded scenario (the inverse of `scenario_tables`). A `create_vm`
    with guest `code` and the `run` of its vCPU 0 right after it are one `vmm:create`."""
    out: list[RawStep] = []
    steps = list(sc.steps)
    i = 0
    while i < len(steps):
        st = steps[i]
        f = st.fields
        if st.action == "hvc":
            args = tuple(a & (2**64 - 1) if isinstance(a, int) else a for a in f.get("args", []))
            call = st.target & (2**64 - 1) if isinstance(st.target, int) else st.target
            out.append(RawStep(call, args, st.cpu))
        elif st.action == "create_vm":
            out.append(vm_create(f"vm:{st.target}", f.get("vcpus", 1), f.get("protected", False)))
            nxt = steps[i + 1] if i + 1 < len(steps) else None
            if (f.get("code") and nxt is not None and nxt.action == "run"
                    and nxt.target == st.target and nxt.fields.get("vcpu", 0) == 0):
                i += 1  # the helper's create runs vCPU 0 once
        elif st.action == "run":
            out.append(vm_run(f"vm:{st.target}", st.fields.get("vcpu", 0)))
        elif st.action == "topup":
            out.append(vm_topup(f"vm:{st.target}", st.fields.get("vcpu", 0),
                                st.fields.get("pages", 4)))
        elif st.action == "destroy":
            out.append(vm_destroy(f"vm:{st.target}"))
        elif st.action == "host_read" and (page := _page_symbol(st.target)):
            out.append(host_read(page, st.cpu))
        else:
            raise ValueError(f"step {i} ({st.action}): the real side replays only hvc, "
                             "create_vm, run, topup and destroy steps, and host_read of a "
                             "whole page by name")
        i += 1
    return out


PAGE_SIZE = 4096


def _page_symbol(target: object) -> str | None:
    """A host_read target naming a whole page ("page:NAME" or "pa:NAME"): as "page:NAME"."""
    if isinstance(target, str) and re.fullmatch(r"(page|pa):[A-Za-z0-9_-]{1,20}", target):
        return "page:" + target.split(":", 1)[1]
    return None
