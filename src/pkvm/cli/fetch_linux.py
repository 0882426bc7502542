"""`pkvm fetch-linux`: Debian's arm64 kernel and a busybox initramfs, into the cache."""

from __future__ import annotations

from pathlib import Path

import typer

from pkvm.cli.common import err_console


def fetch_linux(
    dest: Path = typer.Option(None, help="Where to put Image and initrd.cpio.gz "
                              "(default ~/.cache/pkvm/linux)."),
    force: bool = typer.Option(False, "--force", help="Fetch again even if cached."),
) -> None:
    """Download Debian's arm64 kernel (apt-get download, a private apt configuration using this
    machine's Debian mirror) and build a busybox initramfs; print the two paths."""
    from pkvm.linux_fetch import fetch

    try:
        image, initrd = fetch(dest, force=force, log=lambda s: err_console.print(s))
    except (RuntimeError, OSError) as e:
        err_console.print(f"[red]fetch-linux: {e}[/red]")
        raise typer.Exit(1) from None
    print(image)
    print(initrd)


def register(app: typer.Typer) -> None:
    app.command("fetch-linux")(fetch_linux)
