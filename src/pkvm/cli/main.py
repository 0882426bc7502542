"""`pkvm`: the command-line entry point (Typer + rich).

Each command lives in its own module of `pkvm.cli` with a `register(app)` function that adds its
command(s) to the shared `app`. To add one (fuzz, explore, run-guest, conform...), write
`pkvm/cli/<name>.py` with `def register(app: typer.Typer) -> None` and list the module in
`COMMAND_MODULES`; a module that fails to import is skipped (the rest of the CLI still works) and
named by `pkvm --help`'s epilog.

Exit codes (every command): 0 success; 1 an expectation or check failed; 2 a usage or scenario
error (bad option, unreadable or malformed file); 141 the output pipe was closed early (as a
Unix tool killed by SIGPIPE: `pkvm demo | head -1`). See docs/cli.md.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer
import typer.core

import pkvm
from pkvm.cli.common import EXIT_PIPE

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

COMMAND_MODULES = ("demo", "run", "map", "trace", "fuzz", "run_guest", "fetch_linux", "conform")

app = typer.Typer(
    help="pkvm: an executable model of Arm pKVM, the protected KVM hypervisor at EL2.\n\n"
    "Start with `pkvm demo`. Exit codes: 0 ok, 1 an expectation failed, 2 a usage or "
    "scenario error.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)

SKIPPED: dict[str, str] = {}


def _version(value: bool) -> None:
    if value:
        from pkvm import _compiled  # imported here: only --version asks how the model runs

        print(f"pkvm {pkvm.__version__}, {_compiled.describe()}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """pkvm: an executable model of Arm pKVM, the protected KVM hypervisor at EL2."""


def _usage_name(self: typer.core.TyperArgument) -> str:
    """An argument in the usage line as IMAGE / [SCENARIO] (not typer's {image})."""
    name = (self.metavar or self.name or "").upper()
    if not self.required:
        name = f"[{name}]"
    return name + ("..." if self.nargs != 1 else "")


typer.core.TyperArgument._usage_display_name = _usage_name  # type: ignore[method-assign]


def _register_all() -> None:
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"pkvm.cli.{name}")
        except ImportError as e:
            if e.name != f"pkvm.cli.{name}":  # the module exists but is broken: say so
                SKIPPED[name] = f"{type(e).__name__}: {e}"
            continue
        except Exception as e:  # noqa: BLE001 (a broken optional command must not break others)
            SKIPPED[name] = f"{type(e).__name__}: {e}"
            continue
        register = getattr(mod, "register", None)
        if register is not None:
            register(app)
    if SKIPPED:
        app.info.epilog = "Commands not loaded: " + "; ".join(
            f"{k} ({v})" for k, v in SKIPPED.items())


_register_all()


def main() -> None:
    """The `pkvm` console script (and `python -m pkvm`)."""
    try:
        app()
    except SystemExit as e:
        # After a write to a closed pipe (EPIPE), the CLI library wraps stdout and exits 1.
        if type(sys.stdout).__name__ == "PacifyFlushWrapper":
            _quiet_exit(EXIT_PIPE)
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _quiet_exit(EXIT_PIPE)
        raise SystemExit(e.code) from None


def _quiet_exit(code: int) -> None:
    """Exit without Python complaining that it cannot flush a closed stdout."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os._exit(code)


if __name__ == "__main__":
    main()
