"""`pkvm run SCENARIO`: play a scenario file step by step and check its expectations.

What only this command needs is imported inside it (start-up speed: see `pkvm.cli.common`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from pkvm.cli.common import (
    ABI_HELP,
    check_output,
    console,
    fail,
    load_scenario,
    new_machine,
    owner_text,
)
from pkvm.trace_export import PageCountSampler, write_perfetto


def print_step(res: Any, verbose: bool = True) -> None:
    step = res.step
    mark = {True: "[green]✓[/green]", False: "[red]✗[/red]", None: "[dim]·[/dim]"}[res.passed]
    where = f"[dim]line {step.line}[/dim] " if step.line else ""
    colour = {"ok": "green", "abort": "magenta", "panic": "red bold", "refused": "yellow",
              "errno": "yellow", "not run": "red"}.get(res.outcome, "white")
    console.print(f"{mark} {res.index + 1:>3} {where}{escape(step.describe())} → "
                  f"[{colour}]{res.outcome}[/{colour}] {escape(res.detail)}", soft_wrap=True)
    if step.note and verbose:
        console.print(f"        [dim]{escape(step.note)}[/dim]")
    if res.passed is False:
        console.print(f"        [red]expected[/red] {escape(res.expected)}   [red]got[/red] "
                      f"{res.outcome}: {escape(res.detail)}", soft_wrap=True)
        if res.pages:
            t = Table(title="pages named by this step (m.inspect.page)", title_justify="left")
            for c in ("pfn", "owner", "host", "hyp", "guests", "refcount", "shares"):
                t.add_column(c)
            for p in res.pages:
                t.add_row(f"{p.pfn:#x}", owner_text(p.owner), p.host, p.hyp,
                          ", ".join(f"{h:#x}: {s}" for h, s in p.guests.items()) or "-",
                          str(p.refcount), str(p.share_count))
            console.print(t)


def run(
    scenario: Annotated[Path, typer.Argument(help="Scenario file (TOML, docs/scenarios.md).")],
    abi: Annotated[str | None, typer.Option(
        "--abi", help=ABI_HELP + " Overrides the file's [machine] abi.")] = None,
    jsonl: Annotated[Path | None, typer.Option(
        "--jsonl", help="Write the hypercall trace (JSON Lines).")] = None,
    perfetto: Annotated[Path | None, typer.Option(
        "--perfetto", help="Write a Perfetto / Chrome trace-event JSON.")] = None,
    stop: Annotated[bool, typer.Option(
        "--stop-on-failure", "-x", help="Stop at the first failed expectation.")] = False,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="Print only failures and the verdict.")] = False,
) -> None:
    """Run a scenario: print each step with its result and check every `expect`.

    Exit code: 0 every expectation held; 1 one failed; 2 the scenario has an error (the message
    names file:line).
    """
    from pkvm.scenario import ScenarioError

    check_output("--jsonl", jsonl)
    check_output("--perfetto", perfetto)
    scn = load_scenario(scenario)
    m = new_machine(scn, None, None, abi)
    console.print(f"[bold]{escape(str(scenario))}[/bold]: {len(scn.steps)} steps on a {m.abi} "
                  f"machine, {m.mem.size >> 20} MiB, {m.nr_cpus} CPUs")
    sampler = None
    if perfetto:
        sampler = PageCountSampler(m)
    try:
        result = scn.run(m, on_step=lambda r: (print_step(r, True) if not quiet or r.passed is
                                               False else None), stop_on_failure=stop)
    except ScenarioError as e:
        fail(str(e))
    write_traces(m, jsonl, perfetto, sampler)
    checked = [s for s in result.steps if s.passed is not None]
    failed = result.failures
    if failed:
        console.print(f"[red bold]FAILED[/red bold]: {len(failed)} of {len(checked)} "
                      f"expectations did not hold (steps "
                      f"{', '.join(str(f.index + 1) for f in failed)})")
        raise typer.Exit(1)
    console.print(f"[green bold]OK[/green bold]: {len(checked)} expectations held "
                  f"({len(result.steps)} steps)")


def write_traces(m: Any, jsonl: Path | None, perfetto: Path | None, sampler: Any = None) -> None:
    if jsonl:
        m.write_trace(str(jsonl))
        console.print(escape(f"trace: {len(m.trace)} calls written to {jsonl} (JSON Lines)"), soft_wrap=True)
    if perfetto:
        write_perfetto(m, str(perfetto), sampler)
        console.print(escape(f"trace: {perfetto} (open in https://ui.perfetto.dev)"), soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command(short_help="Play a scenario file and check its expectations.")(run)
