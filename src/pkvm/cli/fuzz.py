"""`pkvm fuzz`: the hostile-host fuzzer from the command line (registered by `pkvm.cli.main`)."""

from __future__ import annotations

from collections import Counter
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


def coverage_tables(calls: Counter, transitions: Counter) -> list[Table]:
    """(hypercall x result) and (page-state transition) coverage as rich tables."""
    results = sorted({res for _, res in calls})
    t1 = Table(title="hypercall x result (x1 errno, 0, value, or x0=-1)")
    t1.add_column("hypercall")
    for res in results:
        t1.add_column(res, justify="right")
    for name in sorted({n for n, _ in calls}):
        t1.add_row(name, *[str(calls.get((name, r), "")) for r in results])
    t2 = Table(title="page-state transitions (host/hyp before -> after)")
    t2.add_column("before")
    t2.add_column("after")
    t2.add_column("pages", justify="right")
    for (a, b), n in sorted(transitions.items(), key=lambda kv: -kv[1]):
        t2.add_row("/".join(a), "/".join(b), str(n))
    return [t1, t2]


def register(app: typer.Typer) -> None:
    @app.command()
    def fuzz(
        steps: int = typer.Option(2000, help="hostile steps to run"),
        seed: int = typer.Option(0, help="seed of the step generator"),
        cpus: int = typer.Option(2, help="CPUs of the machine"),
        abi: str = typer.Option("latest", help='ABI profile: "latest" (7.2) or "6.12"'),
        memory: str = typer.Option("64M", help="RAM of the machine"),
        bug: Optional[list[str]] = typer.Option(None, help="seeded bug to switch on (repeatable)"),
        out: str = typer.Option("fuzz-repro.toml", help="where to write a minimal reproducer"),
        coverage: bool = typer.Option(True, help="print the coverage tables"),
    ) -> None:
        """Hostile host against a checked machine: shrink and save any failure; exit 1 if found."""
        from pkvm.check.bugs import BUGS
        from pkvm.check.fuzz import Campaign

        console = Console()
        bugs = tuple(bug or ())
        for b in bugs:
            if b not in BUGS:
                raise typer.BadParameter(f"unknown seeded bug {b!r}; known: {', '.join(BUGS)}")
        camp = Campaign(seed=seed, steps=steps, cpus=cpus, abi=abi, memory=memory, bugs=bugs,
                        out=out)
        with Progress(TextColumn("fuzz"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as prog:
            task = prog.add_task("steps", total=steps)
            res = camp.run(progress=lambda n: prog.update(task, completed=n))
        r = res.run
        ncalls = sum(r.calls.values())
        console.print(f"{r.steps_run} steps, {ncalls} hypercalls in {res.seconds:.1f}s "
                      f"({ncalls / max(res.seconds, 1e-9):.0f} checked calls/s), seed {seed}, "
                      f"abi {abi}" + (f", bugs {','.join(bugs)}" if bugs else ""))
        for p in r.panics:
            console.print(f"[yellow]availability finding (hyp panic):[/] {p}")
        if r.driver_errors:
            console.print(f"host driver refusals under hostile state: {dict(r.driver_errors)}")
        if coverage:
            for t in coverage_tables(r.calls, r.transitions):
                console.print(t)
        if res.found:
            console.print(f"[red]FOUND[/] {res.minimal_failure or r.failure}")
            if res.minimal is not None:
                console.print(f"shrunk to {len(res.minimal)} steps: "
                              + "; ".join(str(s) for s in res.minimal))
                console.print(f"reproducer: {out} ({len(res.raw_steps or [])} raw steps)")
            raise typer.Exit(1)
        console.print("[green]clean[/]")
