"""Hypercall traces as Perfetto / Chrome trace-event JSON (`{"traceEvents": [...]}`).

One track (tid) per CPU under one process, a complete event ("X") per hypercall with its
arguments and result, and counter events ("C") of pages per owner. Counters need the page counts
*at the time*, so attach a `PageCountSampler` before running:

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
    """Pages per owner ("host", "hyp", "guest 0x1000", and "shared" for host pages shared out)."""
    out: Counter = Counter()
    for (owner, state), n in m.inspect.page_counts().items():
        name = owner if isinstance(owner, str) else f"guest {owner[1]:#x}"
        if state in ("OWNED", "SHARED_OWNED"):
            out[name] += n
        if owner == "host" and state == "SHARED_OWNED":
            out["host shared"] += n
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

    def detach(self) -> None:
        if self in self.m.listeners:
            self.m.listeners.remove(self)


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
    if sampler is not None:
        for _seq, ts, counts in sampler.samples:
            ev.append({"ph": "C", "pid": PID, "name": "pages per owner",
                       "ts": max(ts - t0, 0) / 1000, "args": dict(counts)})
    return {"traceEvents": ev, "displayTimeUnit": "ns",
            "otherData": {"abi": m.abi, "cpus": m.nr_cpus, "calls": len(recs)}}


def write_perfetto(m: Any, out: IO[str] | str, sampler: PageCountSampler | None = None) -> None:
    doc = trace_events(m, sampler)
    if isinstance(out, str):
        with open(out, "w") as f:
            json.dump(doc, f)
    else:
        json.dump(doc, out)
