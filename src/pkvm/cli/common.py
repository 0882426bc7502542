"""Shared pieces of the CLI commands: the console, common options, tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

console = Console(highlight=False, emoji=False)
err_console = Console(stderr=True, highlight=False, emoji=False)

ABI_HELP = "ABI profile: 'latest' (Linux 7.2.13) or '6.12' (Linux 6.12.117)."


def owner_text(owner: Any) -> str:
    if isinstance(owner, tuple):
        return f"guest {owner[1]:#x}"
    return str(owner)


def size_text(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n:#x} bytes"


def memory_map_table(m: Any) -> Table:
    t = Table(title=f"Physical memory map ({m.abi}, {m.nr_cpus} CPUs)")
    t.add_column("kind")
    t.add_column("start", justify="right")
    t.add_column("end", justify="right")
    t.add_column("size", justify="right")
    t.add_column("pfns", justify="right")
    for r in m.memory_map():
        t.add_row(r.kind, f"{r.start:#x}", f"{r.end:#x}", size_text(r.size),
                  f"{r.start >> 12:#x}..{(r.end >> 12) - 1:#x}")
    return t


def _sort_key(k: tuple[Any, str]) -> tuple[int, int, str]:
    owner, state = k
    if owner == "host":
        return (0, 0, state)
    if owner == "hyp":
        return (1, 0, state)
    return (2, owner[1], state)


def page_counts_table(columns: dict[str, dict[tuple[Any, str], int]], title: str) -> Table:
    t = Table(title=title)
    t.add_column("owner")
    t.add_column("state")
    for name in columns:
        t.add_column(name, justify="right")
    keys = sorted({k for c in columns.values() for k in c}, key=_sort_key)
    for k in keys:
        t.add_row(owner_text(k[0]), k[1], *(str(c.get(k, 0)) for c in columns.values()))
    return t


def load_scenario(path: Path):
    """Load a scenario or exit 2 with `file:line: message`."""
    from pkvm.scenario import ScenarioError, load

    try:
        return load(path)
    except ScenarioError as e:
        err_console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None


def new_machine(scn: Any, memory: str | None, cpus: int | None, abi: str | None) -> Any:
    """The scenario's machine (or a default one), with command-line overrides; exit 2 if bad."""
    import pkvm

    try:
        if scn is not None:
            return scn.new_machine(memory=memory, cpus=cpus, abi=abi)
        return pkvm.Machine(memory=memory or "256M", cpus=cpus or 2, abi=abi or "latest")
    except (ValueError, TypeError) as e:
        where = f"{scn.path}: [machine]: " if scn is not None else ""
        err_console.print(f"[red]error:[/red] {where}{e}")
        raise typer.Exit(2) from None
