"""`pkvm run-guest IMAGE`: boot a guest image in a pKVM VM and show its life.

IMAGE is a raw AArch64 image or a built-in guest, or a Linux arm64 `Image` (recognised by its
header, or by `--initrd`): Linux boots on the `virt`-like board of `pkvm.host.platform.linux`
with a generated device tree, GICv3, timer and an interrupt-driven PL011 console.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.table import Table

from pkvm.cli.common import ABI_HELP, err_console
from pkvm.machine.memory import parse_size


def run_guest(
    image: str = typer.Argument(..., help="A raw AArch64 image, a Linux arm64 Image, or a "
                                "built-in guest: hello, memwalk, share, oob, smp, loop, mmio."),
    memory: str = typer.Option(None, help="The guest's RAM (default 64M; 256M for Linux). The "
                               "machine is sized to fit."),
    vcpus: int = typer.Option(1, help="Number of vCPUs (the others wait for PSCI CPU_ON)."),
    protected: bool = typer.Option(False, "--protected", help="A protected VM (7.2 only)."),
    abi: str = typer.Option("latest", help=ABI_HELP),
    timeslice: int = typer.Option(0, help="Guest instructions per timer slice (0: 200000 with "
                                  "several vCPUs, else none)."),
    param: int = typer.Option(None, help="Patch the built-in guest's parameter (memwalk MiB, "
                              "loop/mmio iterations)."),
    initrd: Path = typer.Option(None, help="Linux: an initramfs (newc cpio, gzip ok)."),
    append: str = typer.Option(None, help="Linux: the kernel command line (default: console "
                               "on ttyAMA0, earlycon, nokaslr, rdinit=/init, arm64.nosve)."),
    dtb_out: Path = typer.Option(None, help="Linux: also write the generated device tree here."),
    timeout: float = typer.Option(None, help="Linux: stop after this many seconds."),
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
    if initrd is not None or data[0x38:0x3C] == b"ARM\x64":
        _run_linux(data, initrd, memory or "256M", vcpus, protected, abi, append, dtb_out,
                   timeout, timeslice)
        return
    guest_mem = parse_size(memory or "64M")
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


def _run_linux(kernel: bytes, initrd: Path | None, memory: str, vcpus: int, protected: bool,
               abi: str, append: str | None, dtb_out: Path | None, timeout: float | None,
               timeslice: int) -> None:
    """Boot a Linux Image on the Linux board; the console is live, stdin is its input."""
    import pkvm
    from pkvm.board import machine_for
    from pkvm.host.platform.linux import DEFAULT_APPEND, LinuxVmm, stdin_feeder

    guest_mem = parse_size(memory)
    cpio = initrd.read_bytes() if initrd is not None else None
    try:
        m = machine_for(guest_mem, vcpus, abi=abi, timeslice=timeslice or None)
        before = m.inspect.page_counts()
        vmm = LinuxVmm(m.host, kernel, cpio, memory=guest_mem, vcpus=vcpus,
                       protected=protected, append=append or DEFAULT_APPEND, out=sys.stdout)
    except (pkvm.HostError, ValueError) as e:
        err_console.print(f"[red]cannot create the VM: {e}[/red]")
        raise typer.Exit(2) from None
    if dtb_out is not None:
        dtb_out.write_bytes(vmm.dtb)
    stdin_feeder(vmm)
    try:
        r = vmm.run(timeout=timeout)
    except KeyboardInterrupt:
        r = None
    finally:
        sys.stdout.flush()
        vmm.destroy()
    after = m.inspect.page_counts()
    if r is None:
        err_console.print("interrupted")
        raise typer.Exit(1)
    t = Table(title=f"Linux guest: {r.reason}", show_header=False)
    t.add_row("wall time", f"{r.seconds:.2f} s")
    for name, sec in r.milestones.items():
        t.add_row(f"console shows {name.strip()!r} at", f"{sec:.2f} s")
    t.add_row("exits", ", ".join(f"{k} {v}" for k, v in sorted(r.exits.items())))
    t.add_row("guest pages mapped", str(r.pages_mapped))
    t.add_row("pages back with the host after teardown", "yes" if after == before else "NO")
    err_console.print(t)
    raise typer.Exit(0 if r.reason in ("shutdown", "reset") else 1)


def register(app: typer.Typer) -> None:
    app.command("run-guest")(run_guest)
    from pkvm.cli import fetch_linux  # issue 9: `pkvm fetch-linux` registers with run-guest

    fetch_linux.register(app)
