"""`pkvm run-guest IMAGE`: boot a guest image in a pKVM VM and show its life.

IMAGE is a raw AArch64 image or a built-in guest, or a Linux arm64 `Image` (recognised by its
header, or by `--initrd`): Linux boots on the `virt`-like board of `pkvm.host.platform.linux`
with a generated device tree, GICv3, timer and an interrupt-driven PL011 console.

What only this command needs is imported inside it (start-up speed: see `pkvm.cli.common`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import IO, Annotated, Any, cast

import typer
from rich.markup import escape
from rich.table import Table

import pkvm
from pkvm import guests
from pkvm.abi.profiles import get_profile
from pkvm.board import machine_for
from pkvm.cli.common import (
    ABI_HELP,
    check_count,
    check_input,
    check_machine_options,
    check_output,
    err_console,
    fail,
    make_machine,
    memory_problem,
    note,
    progress,
)
from pkvm.host.vmm import Vmm
from pkvm.machine.memory import PAGE_SIZE, parse_size

PARAM_GUESTS = ("memwalk", "loop", "mmio")


class _Stdout:
    """Writes to whatever `sys.stdout` is now (a live progress display swaps it)."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


def _size(option: str, value: str) -> int:
    try:
        size = parse_size(value)
    except ValueError:
        fail(f"{option} {value}: not a size (bytes, or a number with K, M or G)")
    if size <= 0 or size % PAGE_SIZE:
        fail(f"{option} {value}: must be a positive whole number of 4 KiB pages")
    return size


def run_guest(
    image: Annotated[str, typer.Argument(
        metavar="IMAGE", help="A raw AArch64 image, a Linux arm64 Image, or a built-in guest: "
        "hello, memwalk, share, oob, smp, loop, mmio.")],
    memory: Annotated[str | None, typer.Option(
        metavar="SIZE", help="The guest's RAM (default 64M; 256M for Linux). The machine is "
        "sized to fit.")] = None,
    vcpus: Annotated[int | None, typer.Option(
        metavar="N", help="Number of vCPUs (default 1; 2 for smp); the others wait for PSCI "
        "CPU_ON.")] = None,
    protected: Annotated[bool | None, typer.Option(
        "--protected/--no-protected", help="A protected VM (7.2 only; the default for "
        "share).", show_default=False)] = None,
    abi: Annotated[str, typer.Option(metavar="ABI", help=ABI_HELP)] = "latest",
    timeslice: Annotated[int, typer.Option(
        metavar="N", help="Guest instructions per timer slice (0: 200000 with several vCPUs, "
        "else none).")] = 0,
    param: Annotated[int | None, typer.Option(
        metavar="N", help="Patch the built-in guest's parameter (memwalk MiB, loop/mmio "
        "iterations).")] = None,
    initrd: Annotated[Path | None, typer.Option(
        metavar="FILE", help="Linux: an initramfs (newc cpio, gzip ok).")] = None,
    append: Annotated[str | None, typer.Option(
        metavar="TEXT", help="Linux: the kernel command line (default: console on ttyAMA0, "
        "earlycon, nokaslr, rdinit=/init, arm64.nosve).")] = None,
    dtb_out: Annotated[Path | None, typer.Option(
        metavar="FILE", help="Linux: also write the generated device tree here.")] = None,
    timeout: Annotated[float | None, typer.Option(
        metavar="SECONDS", help="Linux: stop after this many seconds.")] = None,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="No live count of exits on the terminal.")] = False,
) -> None:
    """Boot IMAGE in a VM: the UART on stdout, exits and a summary on stderr.

    Exit 0 when the guest powers off (PSCI SYSTEM_OFF or SYSTEM_RESET) without printing FAIL,
    1 otherwise, 2 for a usage error (an option, or an image that cannot be a guest).
    """
    check_machine_options(abi=abi)
    prof = get_profile(abi)
    if vcpus is not None and not 1 <= vcpus <= 64:
        fail(f"--vcpus {vcpus}: must be between 1 and 64")
    check_count("--timeslice", timeslice, 0)
    check_input("--initrd", initrd)
    check_output("--dtb-out", dtb_out)
    if timeout is not None and timeout <= 0:
        fail(f"--timeout {timeout}: must be a positive number of seconds")
    builtin = image in guests.NAMES
    if param is not None and not (builtin and image in PARAM_GUESTS):
        fail(f"--param: only the built-in guests {', '.join(PARAM_GUESTS)} take a parameter")
    check_count("--param", param, 1)
    if builtin:
        data = guests.image(image)
        if param is not None:
            data = guests.patch(data, param)
    else:
        if not Path(image).exists():
            fail(f"{image}: no such file and not a built-in guest ({', '.join(guests.NAMES)})")
        check_input("IMAGE", image)
        data = Path(image).read_bytes()
    linux = initrd is not None or data[0x38:0x3C] == b"ARM\x64"
    if not linux:
        problem = guests.image_problem(data)
        if problem:
            fail(f"{image}: {problem}")
    about = guests.ABOUT.get(image) if builtin else None
    if about is not None:
        vcpus, protected = _builtin_needs(image, about, vcpus, protected, prof)
    if protected and not prof.protected_vms:
        fail(f"--protected: Linux {prof.kernel} (abi {abi}) has no protected VMs")
    if linux:
        _run_linux(data, initrd, memory or "256M", vcpus or 1, bool(protected), abi, append,
                   dtb_out, timeout, timeslice)
        return
    _run_image(image, data, _size("--memory", memory or "64M"), vcpus or 1, bool(protected),
               abi, timeslice, about, quiet)


def _builtin_needs(image: str, about: Any, vcpus: int | None, protected: bool | None,
                   prof: Any) -> tuple[int, bool]:
    """The options a built-in guest needs: chosen when not given, refused when contradicted."""
    if about.vcpus > 1:
        if vcpus is None:
            vcpus = about.vcpus
        elif vcpus < about.vcpus:
            fail(f"--vcpus {vcpus}: the {image} guest needs {about.vcpus} vCPUs")
    if about.protected:
        if protected is False:
            fail(f"--no-protected: the {image} guest needs a protected VM (pKVM's guest calls "
                 "are answered only for protected VMs)")
        if not prof.protected_vms:
            fail(f"the {image} guest needs a protected VM, which Linux {prof.kernel} lacks: "
                 "run it with --abi latest")
        protected = True
    return vcpus or 1, bool(protected)


def _run_image(image: str, data: bytes, guest_mem: int, vcpus: int, protected: bool, abi: str,
               timeslice: int, about: Any, quiet: bool) -> None:
    """Boot a raw image in a VM; the summary (and what a built-in's output shows) on stderr."""
    if len(data) > guest_mem:
        fail(f"{image}: the image ({len(data)} bytes) does not fit in the guest's "
             f"{guest_mem >> 10} KiB: raise --memory")
    machine_mem = max(256 << 20, 2 * guest_mem + (128 << 20))
    slice_ = timeslice or (200_000 if vcpus > 1 else None)
    m = make_machine(memory=machine_mem, cpus=max(2, vcpus), abi=abi, trace=False,
                     timeslice=slice_)
    before = m.inspect.page_counts()
    try:
        vmm = Vmm(m.host, data, memory=guest_mem, vcpus=vcpus, protected=protected,
                  out=cast(IO[str], _Stdout()))  # Vmm only writes and flushes
    except (pkvm.HostError, ValueError) as e:
        fail(f"cannot create the VM: {e}")
    except (MemoryError, OSError) as e:
        fail(memory_problem(guest_mem, e))
    try:
        with progress(f"guest {image}: exits", None, quiet) as update:
            s = vmm.run(progress=update)
    finally:
        sys.stdout.flush()
        vmm.destroy()
    after = m.inspect.page_counts()
    t = Table(title=escape(f"guest {image}: {s.reason}"), show_header=False)
    t.add_column(no_wrap=True)
    t.add_column()
    t.add_row("wall time", f"{s.seconds:.3f} s")
    t.add_row("exits", ", ".join(f"{k} {v}" for k, v in sorted(s.exits.items())))
    t.add_row("MMIO reads / writes", f"{s.mmio_reads} / {s.mmio_writes}")
    t.add_row("guest pages mapped", str(s.pages_mapped))
    t.add_row("pages back with the host after teardown", "yes" if after == before else "NO")
    err_console.print(t)
    failed = "FAIL" in s.console
    if not s.ok:
        why = guests.explain_failure(s.reason)
        if why:
            note(why)
    elif failed:
        note("the guest reported a failure (FAIL on its console): exit 1")
    elif about is not None and about.shows:
        note(f"{image}: {about.shows}.")
    raise typer.Exit(0 if s.ok and not failed and after == before else 1)


def _run_linux(kernel: bytes, initrd: Path | None, memory: str, vcpus: int, protected: bool,
               abi: str, append: str | None, dtb_out: Path | None, timeout: float | None,
               timeslice: int) -> None:
    """Boot a Linux Image on the Linux board; the console is live, stdin is its input."""
    from pkvm.host.platform.linux import DEFAULT_APPEND, LinuxVmm, stdin_feeder

    guest_mem = _size("--memory", memory)
    cpio = initrd.read_bytes() if initrd is not None else None
    try:
        m = machine_for(guest_mem, vcpus, abi=abi, timeslice=timeslice or None)
        before = m.inspect.page_counts()
        vmm = LinuxVmm(m.host, kernel, cpio, memory=guest_mem, vcpus=vcpus,
                       protected=protected, append=append or DEFAULT_APPEND, out=sys.stdout)
    except (pkvm.HostError, ValueError) as e:
        fail(f"cannot create the VM: {e}")
    except (MemoryError, OSError) as e:
        fail(memory_problem(guest_mem, e))
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
    t = Table(title=escape(f"Linux guest: {r.reason}"), show_header=False)
    t.add_column(no_wrap=True)
    t.add_column()
    t.add_row("wall time", f"{r.seconds:.2f} s")
    for name, sec in r.milestones.items():
        t.add_row(escape(f"console shows {name.strip()!r} at"), f"{sec:.2f} s")
    t.add_row("exits", ", ".join(f"{k} {v}" for k, v in sorted(r.exits.items())))
    t.add_row("guest pages mapped", str(r.pages_mapped))
    t.add_row("pages back with the host after teardown", "yes" if after == before else "NO")
    err_console.print(t)
    raise typer.Exit(0 if r.reason in ("shutdown", "reset") else 1)


def register(app: typer.Typer) -> None:
    app.command("run-guest", short_help="Boot a guest image in a VM.")(run_guest)
