"""Hypercall traces as Perfetto / Chrome trace-event JSON (`{"traceEvents": [...]}`).

One track (tid) per CPU under one process, a complete event ("X") per hypercall with its
arguments and result, an instant event ("i") on the CPU's track for each host data abort the hyp
handled (address, read/write, verdict: mapped or refused), and counter events ("C") of pages per
owner. The counter series are disjoint, so Perfetto's stacked view adds up to all of RAM: "host"
is what the host owns alone, "host shared" what it owns and has shared (with the hyp or a
guest), "hyp" and "guest 0x…" what each owns. Every sample carries every series (a series that
falls to 0 is drawn at 0). Counters need the page counts *at the time*, so attach a
`PageCountSampler` before running:

    sampler = PageCountSampler(m)          # samples after calls that can move pages
    ... m.hvc(...) ...
    write_perfetto(m, "trace.json", sampler)   # open in https://ui.perfetto.dev

Timestamps are the model's own `perf_counter_ns` at each call, in microseconds from the first.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import IO, Any

from pkvm.errors import errno_name

PID = 1
# Calls after which ownership may have moved: sampled when they succeed.
OWNERSHIP_CALLS = frozenset({
    "__pkvm_host_share_hyp", "__pkvm_host_unshare_hyp", "__pkvm_init_vm", "__pkvm_init_vcpu",
    "__pkvm_teardown_vm", "__pkvm_start_teardown_vm", "__pkvm_finalize_teardown_vm",
    "__pkvm_host_share_guest", "__pkvm_host_unshare_guest", "__pkvm_host_donate_guest",
    "__pkvm_reclaim_dying_guest_page", "__pkvm_force_reclaim_guest_page",
    "__pkvm_host_relax_perms_guest", "__pkvm_host_wrprotect_guest", "__pkvm_vcpu_load",
    "__pkvm_vcpu_put", "__pkvm_reserve_vm", "__pkvm_unreserve_vm", "__kvm_vcpu_run",
})


def owner_counts(m: Any) -> dict[str, int]:
    """Pages per owner, disjoint: "host" (owned, not shared), "host shared" (owned by the host
    and shared out), "hyp", "guest 0x1000" (owned, shared or not)."""
    out: Counter[str] = Counter({"host": 0, "host shared": 0, "hyp": 0})
    for (owner, state), n in m.inspect.page_counts().items():
        if state not in ("OWNED", "SHARED_OWNED"):
            continue
        if owner == "host":
            out["host shared" if state == "SHARED_OWNED" else "host"] += n
        else:
            out[owner if isinstance(owner, str) else f"guest {owner[1]:#x}"] += n
    return dict(out)


class PageCountSampler:
    """A machine listener recording (seq, ts_ns, counts) after ownership-changing calls.

    `every`: sample at most once per that many such calls (page counts walk all of RAM)."""

    def __init__(self, m: Any, every: int = 1):
        self.m = m
        self.every = max(1, every)
        self.samples: list[tuple[int, int, dict[str, int]]] = []
        self._pending = 0
        self.samples.append((0, _now(m), owner_counts(m)))
        m.listeners.append(self)

    def __call__(self, rec: Any) -> None:
        if rec.panic or rec.name not in OWNERSHIP_CALLS or rec.x0 != 0:
            return
        self._pending += 1
        if self._pending >= self.every:
            self._pending = 0
            self.samples.append((rec.seq, rec.start_ns + rec.duration_ns, owner_counts(self.m)))


def _now(m: Any) -> int:
    return m.trace[-1].start_ns + m.trace[-1].duration_ns if m.trace else 0


def trace_events(m: Any, sampler: PageCountSampler | None = None) -> dict[str, Any]:
    """The trace-event document of the machine's recorded calls (and the sampler's counters)."""
    recs = list(m.trace)
    t0 = min([r.start_ns for r in recs] + [s[1] for s in (sampler.samples if sampler else [])
                                            if s[1]] or [0])
    ev: list[dict[str, Any]] = [
        {"ph": "M", "pid": PID, "name": "process_name", "args": {"name": f"pkvm ({m.abi})"}}]
    for cpu in range(m.nr_cpus):
        ev.append({"ph": "M", "pid": PID, "tid": cpu, "name": "thread_name",
                   "args": {"name": f"cpu{cpu}"}})
        ev.append({"ph": "M", "pid": PID, "tid": cpu, "name": "thread_sort_index",
                   "args": {"sort_index": cpu}})
    for r in recs:
        result = ("panic" if r.panic else "not supported" if r.x0 else
                  f"-{errno_name(r.x1)}" if r.x1 < 0 else "0" if r.x1 == 0 else hex(r.x1))
        ev.append({
            "ph": "X", "pid": PID, "tid": r.cpu, "name": r.name, "cat": "hvc",
            "ts": (r.start_ns - t0) / 1000, "dur": max(r.duration_ns, 1) / 1000,
            "args": {"seq": r.seq, "func_id": hex(r.func_id), "args": [hex(a) for a in r.args],
                     "x0": r.x0, "x1": r.x1, "x2": hex(r.x2), "x3": hex(r.x3),
                     "result": result, **({"panic": r.panic} if r.panic else {})},
        })
    for a in getattr(m, "host_aborts", ()):
        ev.append({"ph": "i", "s": "t", "pid": PID, "tid": a.cpu, "cat": "host abort",
                   "name": f"host data abort ({a.verdict})", "ts": max(a.ts_ns - t0, 0) / 1000,
                   "args": {"addr": hex(a.addr), "access": "write" if a.write else "read",
                            "verdict": a.verdict, "ret": a.ret}})
    if sampler is not None:
        series = sorted({k for _, _, counts in sampler.samples for k in counts})
        for _seq, ts, counts in sampler.samples:
            ev.append({"ph": "C", "pid": PID, "name": "pages per owner",
                       "ts": max(ts - t0, 0) / 1000,
                       "args": {k: counts.get(k, 0) for k in series}})
    return {"traceEvents": ev, "displayTimeUnit": "ns",
            "otherData": {"abi": m.abi, "cpus": m.nr_cpus, "calls": len(recs),
                          "host_aborts": len(getattr(m, "host_aborts", ()))}}


def write_perfetto(m: Any, out: IO[str] | str, sampler: PageCountSampler | None = None) -> None:
    doc = trace_events(m, sampler)
    if isinstance(out, str):
        with open(out, "w") as f:
            json.dump(doc, f)
    else:
        json.dump(doc, out)
