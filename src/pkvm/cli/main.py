"""`pkvm`: the command-line entry point (Typer + rich).

Each command lives in its own module of `pkvm.cli` with a `register(app)` function that adds its
command(s) to the shared `app`. To add one (fuzz, explore, run-guest, conform...), write
`pkvm/cli/<name>.py` with `def register(app: typer.Typer) -> None` and list the module in
`COMMAND_MODULES`; a module that fails to import is skipped (the rest of the CLI still works) and
named by `pkvm --help`'s epilog.

Exit codes (every command): 0 success; 1 an expectation or check failed; 2 a usage or scenario
error (bad option, unreadable or malformed file). See docs/cli.md.
"""

from __future__ import annotations

import importlib

import typer

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

COMMAND_MODULES = ("demo", "run", "map", "trace", "fuzz", "explore", "run_guest", "conform")

app = typer.Typer(
    help="pkvm: an executable model of Arm pKVM, the protected KVM hypervisor at EL2.\n\n"
    "Start with `pkvm demo`. Exit codes: 0 ok, 1 an expectation failed, 2 a usage or "
    "scenario error.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)

SKIPPED: dict[str, str] = {}


@app.callback()
def _root() -> None:
    """pkvm: an executable model of Arm pKVM, the protected KVM hypervisor at EL2."""


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
    app()


if __name__ == "__main__":
    main()
