"""`pkvm conform`: the same host hypercalls on the model and on the real Linux pKVM.

The real-kernel harness (`pkvm.conform`) is imported by the functions that use it, not on top,
so that every other `pkvm` command starts without it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from pkvm.cli.common import (
    check_count,
    check_output,
    console,
    err_console,
    fail,
    load_scenario,
)

DECIMAL_BELOW = 4096  # a register of smaller magnitude prints in decimal (an errno, a count)
U64_MASK = (1 << 64) - 1


def _fmt(v: int) -> str:
    return str(v) if -DECIMAL_BELOW < v < DECIMAL_BELOW else hex(v & U64_MASK)


def _side(r: Any) -> str:
    if r.not_run:
        return "not run"
    if r.panic:
        return str(r.kind)
    return f"{_fmt(r.x0)}/{_fmt(r.x1)}/{_fmt(r.x2)}/{_fmt(r.x3)}"


MARKS = {"agree": "[green]yes[/green]", "known": "[yellow]known[/yellow]",
         "differ": "[red]NO[/red]", "not run": "[dim]not run[/dim]"}


def conform(
    scenario: Path = typer.Argument(None, help="A scenario file; its hvc, create_vm, run and "
                                    "destroy steps are replayed."),
    kernel: str = typer.Option("7.2", help="The real kernel: 6.12 or 7.2."),
    random_n: int = typer.Option(0, "--random", help="Run N deep random sequences instead."),
    seed: int = typer.Option(1, help="Seed of the random sequences."),
    length: int = typer.Option(12, help="Attack steps per random sequence (plus set-up and "
                               "page probes)."),
    jsonl: Path = typer.Option(None, help="Write every compared step as JSON Lines here."),
    reproducer: Path = typer.Option(Path("conform-divergence.toml"),
                                    help="Where to write a shrunk divergent sequence."),
    guest: str = typer.Option(None, "--guest", help="Run a guest (a built-in name, probe, or "
                              "a raw image file) on both sides instead; compare its exits."),
    protected: bool = typer.Option(False, "--protected", help="--guest: a protected VM."),
    smc: bool = typer.Option(False, "--smc", help="Compare host SMCs (x0..x17): the measured "
                             "set plus --random N (default 40) seeded hostile ones."),
    jobs: int = typer.Option(1, help="QEMU instances at once."),
    coverage: bool = typer.Option(True, help="Print the per-hypercall outcome table."),
    setup_only: bool = typer.Option(False, "--setup", help="Only set the real side up."),
) -> None:
    """Replay raw host hypercalls and VMM steps on `Machine(abi=…)` and on Linux booted under
    QEMU; diff every step both executed, and the state of every page a sequence named.

    Exit 0 only when every executed step agrees (an entry of
    `pkvm.conform.diff.KNOWN_DIFFERENCES` matching the exact state excepted), 1 on a
    divergence, 2 for set-up errors."""
    from pkvm.conform.real import RealError, SetupError, ensure_setup

    if kernel not in ("6.12", "7.2"):
        fail(f"--kernel {kernel}: the real kernels are 6.12 and 7.2")
    check_count("--random", random_n, 0)
    check_count("--length", length)
    check_count("--jobs", jobs)
    check_output("--jsonl", jsonl)
    check_output("--reproducer", reproducer)
    s = load_scenario(scenario) if scenario is not None else None
    try:
        ensure_setup(kernel, progress=True)
    except (SetupError, RealError) as e:
        fail(f"the real side cannot be set up here: {e}")
    if guest is not None and not setup_only:
        _guest(guest, kernel, protected)
    if smc and not setup_only:
        _smc(kernel, random_n or 40, seed)
    if setup_only:
        raise typer.Exit(0)
    seqs = _sequences(s, kernel, random_n, seed, length)
    results = _run(kernel, seqs, jobs)
    first_bad = _report(kernel, seqs, results, jsonl, coverage)
    if first_bad is None:
        raise typer.Exit(0)
    _reproduce(kernel, seqs, first_bad, reproducer)
    raise typer.Exit(1)


def _sequences(s: Any, kernel: str, random_n: int, seed: int, length: int) -> list[list[Any]]:
    """The steps of a loaded scenario `s`, or `random_n` deep random sequences."""
    from pkvm.conform import diff as D
    from pkvm.conform.sequences import random_sequences

    if s is not None:
        try:
            return [D.from_scenario(s)]
        except ValueError as e:
            fail(str(e))
    if random_n:
        return random_sequences(kernel, random_n, seed, length)
    fail("give a SCENARIO or --random N")


def _run(kernel: str, seqs: list[list[Any]], jobs: int) -> list[list[Any]]:
    from pkvm.conform import diff as D
    from pkvm.conform.real import RealError

    try:
        return D.run_both(kernel, seqs, progress=True, jobs=jobs)
    except RealError as e:
        fail(f"the real machine failed: {e}")


def _report(kernel: str, seqs: list[list[Any]], results: list[list[Any]], jsonl: Path | None,
            show_coverage: bool) -> int | None:
    """Print the table, the counts and the known differences; the first divergent sequence."""
    from pkvm.conform import diff as D
    from pkvm.conform import sequences as S

    t = Table(title=f"model vs Linux {kernel}")
    for col in ("seq", "step", "cpu", "call", "args", "model x0/x1/x2/x3", "kernel x0/x1/x2/x3",
                "agree?"):
        t.add_column(col)
    first_bad = None
    out = open(jsonl, "w") if jsonl else None
    for si, diffs in enumerate(results):
        for d in diffs:
            if out:
                out.write(json.dumps({"sequence": si, **d.as_dict()}) + "\n")
            if d.status in ("differ", "known") or len(seqs) == 1:
                t.add_row(str(si), str(d.index), str(d.step.cpu), escape(str(d.step.call)),
                          escape(", ".join(a if isinstance(a, str) else _fmt(a)
                                           for a in d.step.args)),
                          _side(d.model), _side(d.real), MARKS[d.status])
            if d.status == "differ" and first_bad is None:
                first_bad = si
    if out:
        out.close()
    console.print(t)
    if show_coverage and len(seqs) > 1:
        _coverage(kernel, results)
    s = D.summarize(results)
    console.print(f"{s.agree}/{s.executed} executed steps agree ({s.percent:.2f} %) over "
                  f"{len(seqs)} sequence(s); {s.differ} differ; {s.not_run} step(s) not run "
                  f"on a side (after a panic), counted apart")
    for k in D.KNOWN_DIFFERENCES:
        console.print(f"known difference {k.name!r}: {s.known.get(k.name, 0)} step(s) excused "
                      f"— {k.reason}")
    ok, total = S.succeeded(S.coverage(kernel, results))
    console.print(f"host hypercalls reaching success on Linux {kernel}: {ok}/{total}")
    return first_bad


def _coverage(kernel: str, results: list[list[Any]]) -> None:
    from pkvm.conform import sequences as S

    cov = S.coverage(kernel, results)
    t = Table(title=f"outcomes per hypercall (model | Linux {kernel})")
    for col in ("call", "model", "kernel"):
        t.add_column(col)
    for call, sides in cov.items():
        cells = [", ".join(f"{k} {v}" for k, v in sorted(sides[s].items())) or "-"
                 for s in ("model", "real")]
        t.add_row(call, *cells)
    console.print(t)


def _reproduce(kernel: str, seqs: list[list[Any]], first_bad: int, reproducer: Path) -> None:
    from pkvm.conform import diff as D

    seq = seqs[first_bad]
    small = D.shrink(kernel, seq, lambda c: D.diverges(D.run_both(kernel, [c])[0]))
    real = [d.real for d in D.run_both(kernel, [small])[0]]
    D.write_scenario(kernel, small, str(reproducer), real)
    err_console.print(f"[red]divergence[/red]: sequence {first_bad} shrunk to {len(small)} "
                      + escape(f"step(s), written to {reproducer} (`pkvm run {reproducer}` "
                               f"replays it on the model with the kernel's answers as "
                               f"expectations; `pkvm conform {reproducer} --kernel {kernel}` on "
                               f"both)"))


def _guest(guest: str, kernel: str, protected: bool) -> None:
    """`--guest`: pkvm.conform.guest runs it on both sides and prints the exit streams."""
    from pkvm.conform.guest import show
    from pkvm.conform.real import RealError, SetupError

    try:
        code = show(guest, kernel, protected, console)
    except (ValueError, SetupError, RealError) as e:
        fail(str(e))
    raise typer.Exit(code)


def _smc(kernel: str, n: int, seed: int) -> None:
    """`--smc`: pkvm.conform.smc runs the SMCs on both sides and prints the differences."""
    from pkvm.conform import smc as S
    from pkvm.conform.real import RealError, SetupError

    try:
        rep = S.compare(kernel, S.fixed_calls() + S.random_calls(seed, n))
    except (SetupError, RealError) as e:
        fail(str(e))
    console.print(rep.summary(), markup=False, highlight=False)
    raise typer.Exit(1 if rep.differences else 0)


def register(app: typer.Typer) -> None:
    app.command(short_help="Compare the model with the real Linux pKVM under QEMU.")(conform)
