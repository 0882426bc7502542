"""`pkvm run-guest IMAGE`: boot a guest image in a pKVM VM and show its life."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.table import Table

from pkvm.cli.common import ABI_HELP, err_console
from pkvm.machine.memory import parse_size


def run_guest(
    image: str = typer.Argument(..., help="A raw AArch64 image, or a built-in guest: hello, "
                                "memwalk, share, oob, smp, loop, mmio."),
    memory: str = typer.Option("64M", help="The guest's RAM (the machine is sized to fit)."),
    vcpus: int = typer.Option(1, help="Number of vCPUs (the others wait for PSCI CPU_ON)."),
    protected: bool = typer.Option(False, "--protected", help="A protected VM (7.2 only)."),
    abi: str = typer.Option("latest", help=ABI_HELP),
    timeslice: int = typer.Option(0, help="Guest instructions per timer slice (0: 200000 with "
                                  "several vCPUs, else none)."),
    param: int = typer.Option(None, help="Patch the built-in guest's parameter (memwalk MiB, "
                              "loop/mmio iterations)."),
) -> None:
    """Boot IMAGE in a VM: the UART on stdout, exits and a summary on stderr.

    Exit 0 when the guest powers off (PSCI SYSTEM_OFF or SYSTEM_RESET), 1 otherwise."""
    import pkvm
    from pkvm import guests
    from pkvm.host.vmm import Vmm

    if image in guests.NAMES:
        data = guests.image(image)
        if param is not None:
            data = guests.patch(data, param)
    else:
        path = Path(image)
        if not path.is_file():
            err_console.print(f"[red]{image}: no such file and not a built-in guest "
                              f"({', '.join(guests.NAMES)})[/red]")
            raise typer.Exit(2)
        data = path.read_bytes()
    guest_mem = parse_size(memory)
    machine_mem = max(256 << 20, 2 * guest_mem + (128 << 20))
    slice_ = timeslice or (200_000 if vcpus > 1 else None)
    try:
        m = pkvm.Machine(memory=machine_mem, cpus=max(2, vcpus), abi=abi, trace=False,
                         timeslice=slice_)
        before = m.inspect.page_counts()
        vmm = Vmm(m.host, data, memory=guest_mem, vcpus=vcpus, protected=protected,
                  out=sys.stdout)
    except (pkvm.HostError, ValueError) as e:
        err_console.print(f"[red]cannot create the VM: {e}[/red]")
        raise typer.Exit(2) from None
    try:
        s = vmm.run()
    finally:
        sys.stdout.flush()
        vmm.destroy()
    after = m.inspect.page_counts()
    t = Table(title=f"guest {image}: {s.reason}", show_header=False)
    t.add_row("wall time", f"{s.seconds:.3f} s")
    t.add_row("exits", ", ".join(f"{k} {v}" for k, v in sorted(s.exits.items())))
    t.add_row("MMIO reads / writes", f"{s.mmio_reads} / {s.mmio_writes}")
    t.add_row("guest pages mapped", str(s.pages_mapped))
    t.add_row("pages back with the host after teardown", "yes" if after == before else "NO")
    err_console.print(t)
    raise typer.Exit(0 if s.ok else 1)


def register(app: typer.Typer) -> None:
    app.command("run-guest")(run_guest)
