"""`pkvm`: the command-line entry point (Typer + rich)."""

from __future__ import annotations

import typer

app = typer.Typer(help="pkvm: an executable model of Arm pKVM.", no_args_is_help=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
