"""`pkvm conform`: the same host hypercalls on the model and on the real Linux pKVM."""

from __future__ import annotations

import json
from pathlib import Path

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


def _fmt(v: int) -> str:
    return str(v) if -4096 < v < 4096 else hex(v & (2**64 - 1))


def conform(
    scenario: Path = typer.Argument(None, help="A scenario file; its hvc steps are replayed."),
    kernel: str = typer.Option("7.2", help="The real kernel: 6.12 or 7.2."),
    random_n: int = typer.Option(0, "--random", help="Run N random hostile sequences instead."),
    seed: int = typer.Option(1, help="Seed of the random sequences."),
    length: int = typer.Option(8, help="Steps per random sequence."),
    jsonl: Path = typer.Option(None, help="Write every compared step as JSON Lines here."),
    reproducer: Path = typer.Option(Path("conform-divergence.toml"),
                                    help="Where to write a shrunk divergent sequence."),
    jobs: int = typer.Option(1, help="QEMU instances at once."),
    setup_only: bool = typer.Option(False, "--setup", help="Only set the real side up."),
) -> None:
    """Replay raw host hypercalls on `Machine(abi=…)` and on Linux booted under QEMU; diff them.

    Exit 0 only when every step agrees (known differences listed in
    `pkvm.conform.diff.KNOWN_DIFFERENCES` excepted), 1 on a divergence, 2 for set-up errors."""
    from pkvm.conform import diff as D
    from pkvm.conform.real import RawStep, RealError, SetupError, ensure_setup

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
    if setup_only:
        raise typer.Exit(0)
    if s is not None:
        seq = [RawStep(st.target, tuple(st.fields.get("args", [])), st.cpu)
               for st in s.steps if st.action == "hvc"]
        seqs = [seq]
    elif random_n:
        seqs = D.random_sequences(kernel, random_n, seed, length)
    else:
        fail("give a SCENARIO or --random N")
    try:
        results = D.run_both(kernel, seqs, progress=True, jobs=jobs)
    except RealError as e:
        fail(f"the real machine failed: {e}")
    t = Table(title=f"model vs Linux {kernel}")
    for col in ("seq", "step", "cpu", "call", "args", "model x0/x1", "kernel x0/x1", "agree?"):
        t.add_column(col)
    agree = total = 0
    first_bad = None
    out = open(jsonl, "w") if jsonl else None
    for si, diffs in enumerate(results):
        for d in diffs:
            total += 1
            ok = d.agree or d.known is not None
            agree += d.agree
            if out:
                out.write(json.dumps({"sequence": si, **d.as_dict()}) + "\n")
            mo = "panic" if d.model.panic else f"{_fmt(d.model.x0)}/{_fmt(d.model.x1)}"
            re_ = "panic" if d.real.panic else f"{_fmt(d.real.x0)}/{_fmt(d.real.x1)}"
            mark = "[green]yes[/green]" if d.agree else ("[yellow]known[/yellow]" if ok else "[red]NO[/red]")
            if not d.agree or len(seqs) == 1:
                t.add_row(str(si), str(d.index), str(d.step.cpu), escape(str(d.step.call)),
                          escape(", ".join(a if isinstance(a, str) else _fmt(a)
                                           for a in d.step.args)), mo, re_, mark)
            if not ok and first_bad is None:
                first_bad = si
    if out:
        out.close()
    console.print(t)
    console.print(f"{agree}/{total} steps agree ({100 * agree / max(total, 1):.1f} %) over "
                  f"{len(seqs)} sequence(s)")
    if first_bad is None:
        raise typer.Exit(0)
    seq = seqs[first_bad]
    alone = D.run_both(kernel, [seq])[0]
    if not D.diverges(alone):
        err_console.print("[red]divergence[/red] that needs the state earlier sequences left on "
                          "the shared boot; see the JSON Lines / table above")
        D.write_scenario(kernel, [st for s2 in seqs[: first_bad + 1] for st in s2], str(reproducer))
        raise typer.Exit(1)
    small = D.shrink(kernel, seq, lambda c: D.diverges(D.run_both(kernel, [c])[0]))
    D.write_scenario(kernel, small, str(reproducer))
    err_console.print(f"[red]divergence[/red]: shrunk to {len(small)} step(s), written to "
                      + escape(f"{reproducer} (`pkvm run {reproducer}` replays it on the model)"))
    raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command(short_help="Compare the model with the real Linux pKVM under QEMU.")(conform)
