"""`pkvm fetch-linux`: Debian's arm64 kernel and a busybox initramfs, into the cache.

What only this command needs is imported inside it (start-up speed: see `pkvm.cli.common`).
"""

from __future__ import annotations

from pathlib import Path

import typer

from pkvm.cli.common import fail, note


def fetch_linux(
    dest: Path = typer.Option(None, help="Where to put Image and initrd.cpio.gz "
                              "(default ~/.cache/pkvm/linux)."),
    force: bool = typer.Option(False, "--force", help="Fetch again even if cached."),
) -> None:
    """Download Debian's arm64 kernel and build a busybox initramfs; print the two paths.

    The kernel comes with apt-get download through a private apt configuration that uses this
    machine's Debian mirror. Exit 1 when the download or the build fails."""
    from pkvm.linux_fetch import fetch

    try:
        image, initrd = fetch(dest, force=force, log=note)
    except (RuntimeError, OSError) as e:
        fail(f"fetch-linux: {e}", 1)
    print(image)
    print(initrd)


def register(app: typer.Typer) -> None:
    app.command("fetch-linux", short_help="Fetch Debian's arm64 kernel and an initramfs.")(
        fetch_linux)
