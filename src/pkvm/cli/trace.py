"""`pkvm trace SCENARIO`: run a scenario and write its hypercall trace.

What only this command needs is imported inside it (start-up speed: see `pkvm.cli.common`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from pkvm.cli.common import (
    ABI_HELP,
    check_count,
    check_output,
    console,
    fail,
    load_scenario,
    new_machine,
    note,
)
from pkvm.trace_export import PageCountSampler, write_perfetto


def trace(
    scenario: Annotated[Path, typer.Argument(help="Scenario file (TOML, docs/scenarios.md).")],
    jsonl: Annotated[Path | None, typer.Option(
        "--jsonl", help="JSON Lines: one object per hypercall.")] = None,
    perfetto: Annotated[Path | None, typer.Option(
        "--perfetto", help="Chrome trace-event JSON for ui.perfetto.dev: one track per CPU, "
        "a slice per hypercall, host data aborts, page counters per owner.")] = None,
    every: Annotated[int, typer.Option(
        help="Sample page counts after every N-th call that can move pages (counts walk all "
        "of RAM: raise N for long traces).")] = 1,
    abi: Annotated[str | None, typer.Option(
        "--abi", help=ABI_HELP + " Overrides [machine] abi.")] = None,
) -> None:
    """Run a scenario and write its trace (JSON Lines and/or Perfetto).

    Expectations are checked but do not change the exit code: 0 when the trace was written,
    2 for a scenario error. Without --jsonl/--perfetto, the trace goes to stdout as JSON Lines.
    """
    from pkvm.scenario import ScenarioError

    check_count("--every", every)
    check_output("--jsonl", jsonl)
    check_output("--perfetto", perfetto)
    scn = load_scenario(scenario)
    m = new_machine(scn, None, None, abi)
    sampler = PageCountSampler(m, every) if perfetto else None
    try:
        result = scn.run(m)
    except ScenarioError as e:
        fail(str(e))
    if jsonl:
        m.write_trace(str(jsonl))
        console.print(escape(f"{jsonl}: {len(m.trace)} hypercalls (JSON Lines)"), soft_wrap=True)
    if perfetto:
        write_perfetto(m, str(perfetto), sampler)
        n = len(sampler.samples) if sampler else 0
        console.print(escape(f"{perfetto}: {len(m.trace)} slices on {m.nr_cpus} CPU tracks, "
                             f"{len(m.host_aborts)} host data abort{_s(len(m.host_aborts))}, "
                             f"{n} page-count samples (open in https://ui.perfetto.dev)"),
                      soft_wrap=True)
    if not jsonl and not perfetto:
        m.write_trace(sys.stdout)
    if result.failures:
        note(f"note: {len(result.failures)} expectation(s) failed; "
             f"`pkvm run {scenario}` shows them")
    if m.dead:
        note(f"note: the hyp panicked ({m.dead}); the trace ends there")


def _s(n: int) -> str:
    return "" if n == 1 else "s"


def register(app: typer.Typer) -> None:
    app.command(short_help="Write a scenario's trace (JSON Lines, Perfetto).")(trace)
