"""`pkvm fuzz`: the hostile-host fuzzer from the command line (registered by `pkvm.cli.main`).

The checkers (`pkvm.check`: fuzzer, explorer, campaigns, seeded bugs) are imported by the
commands that use them, not on top, so that every other `pkvm` command starts without them.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import pkvm
from pkvm.cli.common import (
    ABI_HELP,
    check_count,
    check_machine_options,
    check_output,
    fail,
    progress,
)
from pkvm.cli.common import console as _console

if TYPE_CHECKING:
    from pkvm.check.fuzz import Campaign


def coverage_tables(calls: Counter[Any], transitions: Counter[Any]) -> list[Table]:
    """(hypercall x result) and (page-state transition) coverage as rich tables, one row per
    hypercall with its results listed (readable at 80 columns and when piped)."""
    t1 = Table(title="hypercall x result (x1: 0, an errno or a value; or x0=-1)")
    t1.add_column("hypercall", no_wrap=True)
    t1.add_column("results (count)")
    t1.add_column("calls", justify="right")
    for name in sorted({n for n, _ in calls}):
        mine = sorted(((r, n) for (c, r), n in calls.items() if c == name), key=lambda x: -x[1])
        t1.add_row(escape(str(name)), escape(", ".join(f"{r}={n}" for r, n in mine)),
                   str(sum(n for _, n in mine)))
    t2 = Table(title="page-state transitions (host/hyp before -> after)")
    t2.add_column("before")
    t2.add_column("after")
    t2.add_column("pages", justify="right")
    for (a, b), n in sorted(transitions.items(), key=lambda kv: -kv[1]):
        t2.add_row("/".join(a), "/".join(b), str(n))
    return [t1, t2]


def register(app: typer.Typer) -> None:
    """Add `fuzz` and `explore` to the `pkvm` app."""
    register_explore(app)

    @app.command(short_help="Fuzz the hyp with a hostile host; shrink what it finds.")
    def fuzz(
        steps: Annotated[int, typer.Option(help="hostile steps to run")] = 2000,
        seed: Annotated[int, typer.Option(help="seed of the step generator")] = 0,
        cpus: Annotated[int, typer.Option(help="CPUs of the machine")] = 2,
        abi: Annotated[str, typer.Option(help=ABI_HELP)] = "latest",
        memory: Annotated[str, typer.Option(help="RAM of the machine")] = "64M",
        bug: Annotated[list[str] | None,
                       typer.Option(help="seeded bug to switch on (repeatable)")] = None,
        out: Annotated[str, typer.Option(help="where to write a minimal reproducer")]
        = "fuzz-repro.toml",
        coverage: Annotated[bool, typer.Option(help="print the coverage tables")] = True,
        jobs: Annotated[int, typer.Option(help="local worker processes (campaigns seed, "
                                          "seed+1, ... share the steps)")] = 1,
        ray: Annotated[str | None, typer.Option(help="run the campaigns as Ray tasks on this "
                                                "cluster address ('local': a private one)")]
        = None,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
        smc: Annotated[bool, typer.Option("--smc", "--ffa", help="mix host SMCs into the hostile "
                                          "stream: FF-A calls with hostile descriptors (a secure "
                                          "world at EL3) and PSCI calls")] = False,
    ) -> None:
        """Hostile host against a checked machine: shrink and save any failure; exit 1 if found."""
        from pkvm.check.bugs import BUGS
        from pkvm.check.fuzz import Campaign

        console = _console
        check_machine_options(memory, cpus, abi)
        check_count("--steps", steps)
        check_count("--jobs", jobs)
        check_output("--out", out)
        bugs = tuple(bug or ())
        for b in bugs:
            if b not in BUGS:
                fail(f"--bug {b}: unknown seeded bug; known: {', '.join(BUGS)}")
        camp = Campaign(seed=seed, steps=steps, cpus=cpus, abi=abi, memory=memory, bugs=bugs,
                        out=out, smc=smc)
        if jobs > 1 or ray:
            _scale_out(console, camp, max(jobs, 1), ray, coverage)
            return
        with progress("fuzz", steps, quiet) as update:
            res = camp.run(progress=update)
        r = res.run
        ncalls = sum(r.calls.values())
        console.print(f"{r.steps_run} steps, {ncalls} hypercalls in {res.seconds:.1f}s "
                      f"({ncalls / max(res.seconds, 1e-9):.0f} checked calls/s), seed {seed}, "
                      f"abi {abi}" + (f", bugs {','.join(bugs)}" if bugs else "")
                      + (f", {_smc_calls(r.calls)} of them host SMCs" if smc else ""))
        for p in r.panics:
            console.print(f"[yellow]availability finding (hyp panic):[/] {escape(str(p))}")
        _print_counted(console, len(r.panics), r.known_warns, r.host_pointer_stores, r.raced,
                       r.driver_errors, r.orphan_borrowed)
        if coverage:
            for t in coverage_tables(r.calls, r.transitions):
                console.print(t)
        if res.found:
            console.print(f"[red]FOUND[/] {escape(str(res.minimal_failure or r.failure))}")
            if res.minimal is not None:
                console.print(escape(f"shrunk to {len(res.minimal)} steps: "
                                     + "; ".join(str(s) for s in res.minimal)))
                console.print(escape(f"reproducer: {out} ({len(res.raw_steps or [])} raw steps)"))
            raise typer.Exit(1)
        console.print("[green]clean[/]")


def _print_counted(console: Console, panics: int, known_warns: Counter[Any],
                   pointer_stores: Counter[Any], raced: int, driver_errors: Counter[Any],
                   orphan_borrowed: int) -> None:
    """What a campaign saw and did not count as a failure, each kind counted."""
    console.print(f"availability findings (hyp panics after hostile steps): {panics}")
    if known_warns:
        console.print(escape(f"of which WARN panics the kernel also lets a host reach "
                             f"(KNOWN_KERNEL_WARNS): {dict(known_warns)}"))
    if pointer_stores:
        console.print(escape(f"stores into hyp memory through a raw host pointer (both kernels' "
                             f"raw-pointer handlers; machine rebooted): {dict(pointer_stores)}"))
    console.print(f"ghost predictions skipped (a racing host store changed the call's "
                  f"inputs): {raced}")
    console.print(f"pages a 7.2 guest still borrowed at its VM's finalise (excused by "
                  f"guest-consistent and the FF-A owner): {orphan_borrowed}")
    if driver_errors:
        console.print(escape(f"host driver refusals under hostile state: {dict(driver_errors)}"))


def _smc_calls(calls: Counter[tuple[str, str]]) -> int:
    return sum(n for (name, _), n in calls.items() if str(name).startswith("smc:"))


def _scale_out(console: Console, camp: Campaign, jobs: int, ray: str | None, coverage: bool) -> None:
    """`--jobs K` / `--ray ADDRESS`: K campaigns (or one per Ray task), results merged."""
    from pkvm.check.campaigns import run_campaigns, split

    parts = split(camp, jobs)
    t0 = time.perf_counter()
    with console.status(f"{len(parts)} campaigns on "
                        + (f"Ray ({ray})" if ray else f"{jobs} processes")):
        merged = run_campaigns(parts, jobs=jobs, ray_address=ray)
    wall = time.perf_counter() - t0
    ncalls = sum(merged.calls.values())
    console.print(f"{merged.steps_run} steps, {ncalls} hypercalls in {wall:.1f}s wall "
                  f"({ncalls / max(wall, 1e-9):.0f} checked calls/s over {len(parts)} campaigns, "
                  f"seeds {parts[0].seed}..{parts[-1].seed})")
    _print_counted(console, merged.panics, merged.known_warns, merged.host_pointer_stores,
                   merged.raced, merged.driver_errors, merged.orphan_borrowed)
    if coverage:
        for t in coverage_tables(merged.calls, merged.transitions):
            console.print(t)
    for r in merged.found:
        console.print(f"[red]FOUND[/] seed {r.campaign.seed}: "
                      + escape(f"{r.minimal_failure or r.run.failure} — reproducer "
                               f"{r.campaign.out}"))
    if merged.found:
        raise typer.Exit(1)
    console.print("[green]clean[/]")


def register_explore(app: typer.Typer) -> None:
    @app.command(short_help="Every interleaving of a two-CPU scenario, up to a bound.")
    def explore(
        scenario: Annotated[str, typer.Argument(help="built-in scenario (see --list) or a "
                                                "scenario file (FILE.toml)")] = "",
        abi: Annotated[str, typer.Option(help=ABI_HELP)] = "latest",
        bound: Annotated[int, typer.Option(help="preemption bound")] = 2,
        max_runs: Annotated[int, typer.Option(help="executions at most")] = 2000,
        bug: Annotated[list[str] | None,
                       typer.Option(help="seeded bug to switch on (repeatable)")] = None,
        list_: Annotated[bool, typer.Option("--list", help="list the scenarios")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no live count")] = False,
    ) -> None:
        """Every interleaving (up to a preemption bound) of a multi-CPU scenario; exit 1 if found."""
        from pkvm.check.explore import SCENARIOS, from_file
        from pkvm.check.explore import explore as run_explore

        console = _console
        if list_ or not scenario:
            for name, (doc, _, abis) in SCENARIOS.items():
                console.print(escape(f"{name:18} {doc} ({', '.join(abis)})"))
            return
        check_count("--bound", bound, 0)
        check_count("--max-runs", max_runs)
        bugs = tuple(bug or ())
        from pkvm.check.bugs import BUGS

        for b in bugs:
            if b not in BUGS:
                fail(f"--bug {b}: unknown seeded bug; known: {', '.join(BUGS)}")
        if scenario.endswith(".toml"):
            from pkvm.scenario import ScenarioError

            try:
                make, setup, _ = from_file(scenario, bugs)
            except (ScenarioError, OSError) as e:
                fail(str(e))
        else:
            check_machine_options(abi=abi)
            if scenario not in SCENARIOS:
                fail(f"unknown scenario {scenario!r}; `pkvm explore --list` lists them")
            doc, setup, abis = SCENARIOS[scenario]
            if abi not in abis:
                fail(f"--abi {abi}: scenario {scenario} runs on abi {', '.join(abis)}")

            def make() -> pkvm.Machine:
                return pkvm.Machine(memory="64M", cpus=2, abi=abi, trace=False, bugs=bugs)

        with progress(f"exploring {scenario}", max_runs, quiet) as update:
            r = run_explore(make, setup, bound=bound, max_runs=max_runs, progress=update)
        console.print(f"{scenario}: {r.executions} executions"
                      + (" (all schedules within the bound)" if r.exhausted else ""))
        if r.findings:
            ex = r.findings[0]
            console.print(f"[red]FOUND[/] {escape(str(ex.finding))}")
            console.print(escape(f"schedule (choice, options): {ex.choices}"))
            console.print(escape("trace tail: " + "; ".join(ex.trace[-12:])))
            raise typer.Exit(1)
        console.print("[green]clean[/]")
