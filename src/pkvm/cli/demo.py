"""`pkvm demo`: a guided tour of what pKVM guarantees, against a hostile host."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from pkvm.board import Machine
from pkvm.cli.common import (
    ABI_HELP,
    check_count,
    check_machine_options,
    check_output,
    console,
    fail,
    make_machine,
    memory_map_table,
    page_counts_table,
)
from pkvm.errors import HostDataAbort, HostError, HypPanic, errno_name
from pkvm.host.kvm import GUEST_RAM_IPA, HostVm
from pkvm.machine.memory import PAGE_SHIFT, UART_BASE

GUEST_RAM_GFN = GUEST_RAM_IPA >> PAGE_SHIFT
VM_MEMORY = 16 << 20  # each demo VM's memslot
FORGED_HANDLE_OFFSET = 0x100  # a handle no VM has, near a real one
PageCounts = dict[tuple[Any, str], int]  # m.inspect.page_counts()


@dataclass
class Attempt:
    what: str
    call: str
    result: str
    refused: bool


def _hvc_text(r: Any) -> str:
    if r.x0:
        return f"x0={r.x0} (not supported)"
    return f"x1={r.x1}" + (f" (-{errno_name(r.x1)})" if r.x1 < 0 else "")


def _try(fn: Callable[[], Any]) -> tuple[str, bool]:
    """Run one hostile action: (what happened, whether the hyp refused it)."""
    try:
        r = fn()
    except HostDataAbort as e:
        return f"HostDataAbort at PA {e.addr:#x}" + (" (fatal)" if e.fatal else ""), True
    except HostError as e:
        return f"HostError -{errno_name(e.errno or 0)}", True
    except HypPanic as e:
        return f"HypPanic: {e.reason}", False
    if r is None:
        return "allowed", False
    return _hvc_text(r), bool(r.x0 or r.x1 < 0)


def demo(
    abi: Annotated[str, typer.Option("--abi", help=ABI_HELP)] = "latest",
    memory: Annotated[str, typer.Option(help="RAM size (bytes or K/M/G).")] = "512M",
    cpus: Annotated[int, typer.Option(help="CPUs (at least 2: one loads a vCPU).")] = 2,
    pages: Annotated[int, typer.Option(help="Guest pages to map in each VM (1..4096).")] = 8,
    trace: Annotated[str | None, typer.Option("--jsonl",
                                              help="Also write the hypercall trace here.")] = None,
) -> None:
    """Boot a machine, run two VMs, attack them from the host, tear down, count every page.

    Exit code 0 when every hostile action was refused and every page came back, 1 otherwise.
    """
    check_machine_options(memory, cpus, abi, min_cpus=2,
                          why=" (the host loads a vCPU on one CPU and attacks from another)")
    check_count("--pages", pages)
    if pages > VM_MEMORY >> PAGE_SHIFT:
        fail(f"--pages {pages}: each demo VM has 16 MiB, at most {VM_MEMORY >> PAGE_SHIFT} pages")
    check_output("--jsonl", trace)
    m = make_machine(memory=memory, cpus=cpus, abi=abi)
    console.print(Panel.fit(
        f"[bold]pkvm demo[/bold]: Linux {m.profile.kernel} profile ([cyan]{m.abi}[/cyan]), "
        f"{memory} RAM, {m.nr_cpus} CPUs.\nThe machine is booted and finalised: the hyp runs at "
        "EL2 and the host at EL1 behind its stage-2.", border_style="blue"))
    console.print(memory_map_table(m))
    before = m.inspect.page_counts()
    console.rule("[bold]1. Guests")
    vms = _guests(m, pages, before)
    console.rule("[bold]2. A hostile host")
    attempts = _attacks(m, vms)
    console.print(attempts_table(attempts))
    console.rule("[bold]3. Teardown")
    same, fatal_note = _teardown(m, vms, before, attempts)
    refused = all(a.refused for a in attempts)
    if trace:
        m.write_trace(trace)
        console.print(escape(f"hypercall trace written to {trace} ({len(m.trace)} calls)"))
    console.print(Panel.fit(
        ("[green]Every hostile action was refused" if refused
         else "[red]Some hostile action was allowed") + "[/]; " +
        ("[green]page counts after teardown equal those after boot.[/]" if same
         else "[red]page counts differ after teardown.[/]") + fatal_note,
        border_style="green" if same and refused else "red"))
    raise typer.Exit(0 if same and refused else 1)


def _guests(m: Machine, pages: int, before: PageCounts) -> dict[str, HostVm]:
    """A protected and a normal VM, each with ``pages`` guest pages mapped (a kernel without
    protected VMs refuses the first)."""
    vms: dict[str, HostVm] = {}
    for label, protected in (("protected", True), ("normal", False)):
        try:
            vm = m.host.create_vm(vcpus=2, protected=protected, memory=VM_MEMORY)
        except HostError as e:
            console.print(f"create_vm(protected={protected}): refused with "
                          f"[yellow]-{errno_name(e.errno or 0)}[/yellow]"
                          + (f" (Linux {m.profile.kernel} has no protected VM type)" if protected
                             else ""))
            continue
        vm.map(GUEST_RAM_GFN, pages)
        vms[label] = vm
        console.print(f"created a [bold]{label}[/bold] VM, handle {vm.handle:#x}, and mapped "
                      f"{pages} guest pages (gfn {GUEST_RAM_GFN:#x}..)")
    t = Table(title="VMs the hyp knows (m.inspect.vms())")
    for c in ("handle", "state", "protected", "hyp vCPUs"):
        t.add_column(c)
    for v in m.inspect.vms():
        t.add_row(f"{v['handle']:#x}", v["state"], str(v["protected"]),
                  ", ".join(f"{i}: " + (f"loaded on cpu{c}" if c is not None else "idle")
                            for i, c in v["vcpus"].items()) or "-")
    console.print(t)
    console.print(page_counts_table({"boot": before, "now": m.inspect.page_counts()},
                                    "Pages per owner and state"))
    return vms


def _attacks(m: Machine, vms: dict[str, HostVm]) -> list[Attempt]:
    """What a hostile host tries against the guests and the hyp."""
    attempts: list[Attempt] = []

    def attempt(what: str, call: str, fn: Callable[[], Any]) -> None:
        attempts.append(Attempt(what, call, *_try(fn)))

    carve_pfn = m.carveout[0] >> PAGE_SHIFT
    victim = vms.get("protected") or vms.get("normal")
    if "protected" in vms:
        pa = vms["protected"].memslot[GUEST_RAM_GFN]
        attempt("read a protected guest's page", f"host.read({pa:#x}, 8)",
                lambda: m.host.read(pa, 8))
        attempt("share that guest page with the hyp", f"__pkvm_host_share_hyp({pa >> PAGE_SHIFT:#x})",
                lambda: m.hvc(0, "__pkvm_host_share_hyp", pa >> PAGE_SHIFT))
    attempt("share a page of the hyp's carve-out", f"__pkvm_host_share_hyp({carve_pfn:#x})",
            lambda: m.hvc(0, "__pkvm_host_share_hyp", carve_pfn))
    if victim is not None and m.profile.explicit_vcpu_load:
        h = victim.handle
        m.hvc(1, "__pkvm_vcpu_load", h, 0, 0)
        attempt("tear a VM down while its vCPU 0 is loaded on cpu 1",
                f"__pkvm_start_teardown_vm({h:#x})",
                lambda: m.hvc(0, "__pkvm_start_teardown_vm", h))
        m.hvc(1, "__pkvm_vcpu_put")
        forged = h + FORGED_HANDLE_OFFSET
        attempt("tear down a VM by a forged handle", f"__pkvm_start_teardown_vm({forged:#x})",
                lambda: m.hvc(0, "__pkvm_start_teardown_vm", forged))
    elif victim is not None:
        forged = victim.handle + FORGED_HANDLE_OFFSET
        attempt("tear down a VM by a forged handle", f"__pkvm_teardown_vm({forged:#x})",
                lambda: m.hvc(0, "__pkvm_teardown_vm", forged))
        console.print("[dim](6.12 has no vCPU load/put: the teardown-while-loaded attempt is a "
                      "7.2 one)[/dim]")
    uart_pfn = UART_BASE >> PAGE_SHIFT
    attempt("share an MMIO page (the UART)", f"__pkvm_host_share_hyp({uart_pfn:#x})",
            lambda: m.hvc(0, "__pkvm_host_share_hyp", uart_pfn))
    return attempts


def _teardown(m: Machine, vms: dict[str, HostVm], before: PageCounts,
              attempts: list[Attempt]) -> tuple[bool, str]:
    """Destroy the VMs and compare the page counts with boot's: (equal, a note on a last
    attempt that kills the machine)."""
    for label, vm in vms.items():
        vm.destroy()
        console.print(f"destroyed the {label} VM {vm.handle:#x}")
    after = m.inspect.page_counts()
    console.print(page_counts_table({"boot": before, "after teardown": after},
                                    "Every page back where it was?"))
    fatal_note = ""
    if m.profile.host_abort_fatal:
        res, ref = _try(lambda: m.host.read(m.carveout[0], 8))
        attempts.append(Attempt("read the hyp's carve-out", "host.read", res, ref))
        fatal_note = (f"\nLast, the host reads the carve-out: [bold]{res}[/bold] — in 6.12 "
                      "the hyp panics on such an access (BUG_ON), so the machine is now dead.")
    return before == after, fatal_note


def attempts_table(attempts: list[Attempt]) -> Table:
    """What the host tried (the call under it) and the hyp's answer (the verdict over it):
    two columns, readable at 80 columns with no word broken."""
    t = Table(title="Each attempt and what the hyp answered", show_lines=True)
    t.add_column("the host tries to (the call)")
    t.add_column("the hyp's answer")
    for a in attempts:
        verdict = "[green]refused ✓[/green]" if a.refused else "[red]ALLOWED ✗[/red]"
        t.add_row(f"{a.what}\n[dim]{a.call}[/dim]", f"{verdict}\n{a.result}")
    return t


def register(app: typer.Typer) -> None:
    app.command(short_help="The tour: two VMs, a hostile host, every page back.")(demo)
