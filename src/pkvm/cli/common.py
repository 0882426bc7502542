"""Shared pieces of the CLI commands: the console, errors, option checks, tables.

Every command checks its options here before any work (`check_machine_options`, `check_count`,
`check_output`, `check_input`) and reports a mistake with `fail()`: one line on stderr, the
option and value named, exit 2. Text that comes from outside (file names, messages, values) is
escaped so that square brackets print as written.

The CLI's modules import the model on top; what only some commands need (scenario files, the
ownership map, the Linux board and its Debian fetcher, rich's progress bars, the checkers, the
real-kernel harness) is imported inside the functions that use it, so that `pkvm --help` and
every other command start without it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import pkvm
from pkvm.machine.memory import PAGE_SHIFT, parse_size

if TYPE_CHECKING:
    from pkvm.scenario import Scenario

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a tool whose reader went away


class PkvmConsole(Console):
    """A rich console whose closed output pipe (`pkvm demo | head -1`) ends the command with
    141, as for a Unix tool killed by SIGPIPE, not with 1 ("a check failed")."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise SystemExit(EXIT_PIPE)


console = PkvmConsole(highlight=False, emoji=False)
err_console = PkvmConsole(stderr=True, highlight=False, emoji=False)


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print `error: message` as one line on stderr and exit (2: a usage error)."""
    err_console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


def note(message: str) -> None:
    """One line on stderr (escaped)."""
    err_console.print(escape(message), soft_wrap=True)


def check_machine_options(memory: Any = None, cpus: int | None = None, abi: str | None = None,
                          min_cpus: int = 1, why: str = "") -> None:
    """The machine options every command shares, checked as a scenario's [machine] is."""
    from pkvm.scenario import machine_value_error

    for key, value in (("abi", abi), ("memory", memory), ("cpus", cpus)):
        if value is None:
            continue
        problem = machine_value_error(key, value)
        if problem:
            fail(f"--{key} {value}: {problem}")
    if cpus is not None and cpus < min_cpus:
        fail(f"--cpus {cpus}: this command needs at least {min_cpus} CPUs{why}")


def check_count(option: str, value: int | None, minimum: int = 1) -> None:
    """A count option (steps, pages, bound...) must be at least `minimum`."""
    if value is not None and value < minimum:
        fail(f"{option} {value}: must be at least {minimum}")


def check_output(option: str, path: Path | str | None) -> None:
    """A file the command will write: its directory must exist and it must not be a directory."""
    if path is None:
        return
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        fail(f"{option} {p}: is a directory, not a file")
    if not parent.is_dir():
        fail(f"{option} {p}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        fail(f"{option} {p}: cannot write in directory {parent}")


def check_input(option: str, path: Path | str | None) -> None:
    """A file the command will read: it must exist and be readable."""
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        fail(f"{option} {p}: no such file")
    if not p.is_file():
        fail(f"{option} {p}: not a regular file")
    if not os.access(p, os.R_OK):
        fail(f"{option} {p}: not readable")


def host_memory() -> int | None:
    """This host's physical memory in bytes, if known."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def make_machine(**kw: Any) -> Any:
    """`pkvm.Machine(**kw)`, or exit 2 with one line saying why it cannot be built."""
    try:
        return pkvm.Machine(**kw)
    except ValueError as e:
        fail(str(e))
    except (MemoryError, OSError) as e:
        fail(memory_problem(kw.get("memory", "2G"), e))


def memory_problem(memory: Any, e: BaseException) -> str:
    have = host_memory()
    text = f"cannot reserve {size_text(parse_size(memory))} of RAM for the machine"
    if have:
        text += f" (this host has {size_text(have, round_down=True)})"
    reason = getattr(e, "strerror", None) or type(e).__name__
    return f"{text}: {reason}; ask for less with --memory"

ABI_HELP = "ABI profile: 'latest' (Linux 7.2.13) or '6.12' (Linux 6.12.117)."


def owner_text(owner: Any) -> str:
    if isinstance(owner, tuple):
        return f"guest {owner[1]:#x}"
    return str(owner)


def size_text(n: int, round_down: bool = False) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and (round_down or n % (1 << shift) == 0):
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
                  f"{r.start >> PAGE_SHIFT:#x}..{(r.end >> PAGE_SHIFT) - 1:#x}")
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


def load_scenario(path: Path) -> Scenario:
    """Load a scenario or exit 2 with `file:line: message`."""
    from pkvm.scenario import ScenarioError, load

    try:
        return load(path)
    except ScenarioError as e:
        fail(str(e))


def new_machine(scn: Any, memory: str | None, cpus: int | None, abi: str | None) -> Any:
    """The scenario's machine (or a default one), with command-line overrides; exit 2 if bad.

    The options are checked first, so that a bad `--abi` is blamed on the option."""
    check_machine_options(memory, cpus, abi)
    if scn is None:
        return make_machine(memory=memory or "256M", cpus=cpus or 2, abi=abi or "latest")
    from pkvm.scenario import MACHINE_DEFAULTS

    kw = dict(MACHINE_DEFAULTS)
    kw.update(scn.machine)
    kw.update({k: v for k, v in (("memory", memory), ("cpus", cpus), ("abi", abi))
               if v is not None})
    return make_machine(**kw)


@contextmanager
def progress(label: str, total: int | None, quiet: bool = False) -> Iterator[Callable[[int], None]]:
    """A live bar (or count, when `total` is None) on stderr while long work runs; yields
    `update(done)`. Shown only on a terminal and without `--quiet`: piped output stays clean."""
    if quiet or not err_console.is_terminal:
        yield lambda n: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    cols = [TextColumn(escape(label)), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    if total is None:
        cols = [TextColumn(escape(label)), TextColumn("{task.completed}"), TimeElapsedColumn()]
    with Progress(*cols, console=err_console, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.update(task, completed=n)
