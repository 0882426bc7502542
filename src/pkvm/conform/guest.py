"""Guest conformance: the same guest image under the real KVM and in the model, exit by exit.

The real side is the VMM helper in the initramfs (``helper/guest.c``): it loads the image at
the start of guest RAM (IPA 0x4000_0000), runs every vCPU in its own thread looping on
``KVM_RUN`` and records every exit userspace sees. The model side runs the same image on
``pkvm.Machine``'s host driver (:class:`pkvm.host.vmm.Vmm` loads it; the loop here runs the
vCPUs round-robin). Both answer MMIO reads alike (PL011 at 0x0900_0000: flag register 0x90,
PrimeCell ids; zero elsewhere) and stop at the first system event, failure or exit limit.

    >>> from pkvm.conform.guest import run_model
    >>> r = run_model("7.2", "hello")
    >>> r.stop, r.console
    ('shutdown', 'Hello from a pKVM guest!\\n')

An exit is a short string, the same on both sides (numbers in hex):
``mw ADDR LEN DATA`` / ``mr ADDR LEN DATA`` (an MMIO write with the data written / a read with
the data the VMM answered), ``e TYPE`` (``KVM_EXIT_SYSTEM_EVENT``: 1 shutdown, 2 reset),
``r REASON`` (any other exit reason), ``x ERRNO`` (``KVM_RUN`` failed). What the guest
reports of its own pKVM calls reaches the comparison as its UART bytes (``mw 9000000 1 ..``).
Streams are compared per vCPU: the order between vCPUs is the scheduler's, not the guest's.

What is not a userspace exit in KVM and so is not recorded in the model either: stage-2
faults, PSCI calls other than SYSTEM_OFF/RESET, WFI, a vCPU's power-off, host-interrupt
returns (``preempted``) and trapped system registers (KVM injects an UNDEF itself); the model
counts them in ``internal``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from itertools import zip_longest
from pathlib import Path

from rich.console import Console
from rich.table import Table

import pkvm
from pkvm import guests
from pkvm.conform import boot
from pkvm.conform.model import MACHINE, model_abi
from pkvm.conform.real import RealError, parse_answer, signed
from pkvm.conform.setup import load_kernel
from pkvm.host.vmm import Vmm

__all__ = ["KNOWN_GUEST_DIFFERENCES", "GuestRun", "GuestSpec", "compare", "diverges",
           "guest_spec", "known_counts", "run_model", "run_real", "run_real_many"]

# Parameters the built-in guests run with here (the real side runs under TCG: the defaults of
# memwalk, loop and mmio would take minutes there). vCPUs: smp needs 2; an image file gets 2
# (the second stays off unless the guest calls CPU_ON).
CONFORM_PARAMS = {"memwalk": 2, "loop": 10_000, "mmio": 100}
MEMORY = 64 << 20
MAX_EXITS = 4096
TIMEOUT_MS = 10_000
MODEL_MAX_INTERNAL = 200_000  # model-side exits that are no userspace exit: the timeout
UART_BASE, UART_SIZE, UART_FR = 0x0900_0000, 0x1000, 0x18
PL011_IDS = (0x11, 0x10, 0x14, 0x00, 0x0D, 0xF0, 0x05, 0xB1)
CHUNK = 1024  # image bytes per console line
PER_MACHINE = 4  # guests per real machine


@dataclass(frozen=True)
class GuestSpec:
    name: str
    image: bytes
    vcpus: int
    memory: int = MEMORY
    timeout_ms: int = TIMEOUT_MS  # the real side's wall-clock limit


def probe_image() -> bytes:
    """``probe`` (``helper/probe.S``): asks the hypervisor what a guest can ask, prints it."""

    return resources.files("pkvm.conform").joinpath("helper", "probe.bin").read_bytes()


def guest_spec(name_or_path: str) -> GuestSpec:
    """A built-in guest (with :data:`CONFORM_PARAMS`), ``probe``, or a raw image file."""
    if name_or_path == "probe":
        return GuestSpec("probe", probe_image(), 2, timeout_ms=3000)  # see NISV_SEA
    if name_or_path in guests.NAMES:
        data = guests.image(name_or_path)
        if name_or_path in CONFORM_PARAMS:
            data = guests.patch(data, CONFORM_PARAMS[name_or_path])
        return GuestSpec(name_or_path, data, 2 if name_or_path == "smp" else 1)
    p = Path(name_or_path)
    if not p.is_file():
        raise ValueError(f"{name_or_path}: no such file and not a built-in guest "
                         f"({', '.join(guests.NAMES)})")
    return GuestSpec(p.name, p.read_bytes(), 2)


@dataclass
class GuestRun:
    """One side's run: x0 = 0 or -errno of the set-up step that failed (``at``)."""

    x0: int = 0
    at: str = ""
    stop: str = ""  # shutdown, reset, event, exit, error, limit, timeout; panic, hang (real)
    exits: list[list[str]] = field(default_factory=list)  # per vCPU
    internal: dict[str, int] = field(default_factory=dict)  # model only: not userspace exits
    note: str = ""

    @property
    def console(self) -> str:
        """The UART bytes the guest wrote (all vCPUs, each vCPU's in order)."""
        out = bytearray()
        for stream in self.exits:
            for e in stream:
                f = e.split()
                if f[0] == "mw" and int(f[1], 16) == UART_BASE:
                    out.append(int(f[3], 16) & 0xFF)
        return out.decode(errors="replace")


def device_read(addr: int) -> int:
    """What both VMMs answer an MMIO read with."""
    off = addr - UART_BASE
    if not 0 <= off < UART_SIZE:
        return 0
    if off == UART_FR:
        return 0x90
    if off >= 0xFE0 and off % 4 == 0:
        return PL011_IDS[(off - 0xFE0) // 4]
    return 0


# --- the model ----------------------------------------------------------------------------------


def run_model(kernel: str, guest: str | GuestSpec, protected: bool = False,
              max_exits: int = MAX_EXITS) -> GuestRun:
    """Run ``guest`` on a fresh model machine of ``kernel`` (as ``pkvm conform`` builds it)."""

    spec = guest if isinstance(guest, GuestSpec) else guest_spec(guest)
    m = pkvm.Machine(abi=model_abi(kernel), trace=False,
                     timeslice=200_000 if spec.vcpus > 1 else None, **MACHINE)
    run = GuestRun()
    try:
        vmm = Vmm(m.host, spec.image, memory=spec.memory, vcpus=spec.vcpus,
                  protected=protected)
    except pkvm.HostError as e:
        run.x0, run.at = -(e.errno or 0), e.call
        return run
    try:
        _model_loop(vmm, run, max_exits)
    finally:
        vmm.destroy()
    return run


def _model_loop(vmm: Vmm, run: GuestRun, max_exits: int) -> None:
    vcpus = vmm.vm.vcpus
    run.exits = [[] for _ in vcpus]
    count = internal = 0
    while not run.stop:
        runnable = [v for v in vcpus if not v.powered_off]
        if not runnable:  # KVM would sleep in every KVM_RUN: only the timeout ends that
            run.stop = "timeout"
            break
        for v in runnable:
            ex = v.run()
            rec = run.exits[v.idx]
            if ex.kind in ("wfi", "preempted", "cpu_off", "sysreg"):
                if ex.kind == "sysreg":
                    v.runner.inject_undef()
                run.internal[ex.kind] = run.internal.get(ex.kind, 0) + 1
                internal += 1
                if internal >= MODEL_MAX_INTERNAL:
                    run.stop = "timeout"
                    break
                continue
            count += 1
            if ex.kind == "mmio":
                data = ex.data
                if not ex.write:
                    data = device_read(ex.addr) & ((1 << (8 * ex.size)) - 1)
                    v.complete_mmio(data)
                rec.append(f"m{'w' if ex.write else 'r'} {ex.addr:x} {ex.size:x} {data:x}")
            elif ex.kind == "system_event":
                rec.append(f"e {1 if ex.event == 'shutdown' else 2:x}")
                run.stop = ex.event
                break
            else:  # "fail": KVM_RUN returned an error in KVM's place
                rec.append(f"fail {ex.detail}")
                run.stop = "error"
                break
            if count >= max_exits:
                run.stop = "limit"
                break
    for v in vcpus:
        for k, n in v.runner.exits.items():
            if k in ("stage2_fault", "hvc", "smc"):
                run.internal[k] = run.internal.get(k, 0) + n


# --- the real kernel ----------------------------------------------------------------------------


def _image_commands(image: bytes) -> list[str]:
    cmds = []
    for off in range(0, len(image), CHUNK):
        part = image[off : off + CHUNK]
        if any(part):
            cmds.append(f"vmm img {off} {part.hex()}")
    return cmds


def run_real(kernel: str, guest: str | GuestSpec, protected: bool = False,
             max_exits: int = MAX_EXITS, timeout_ms: int | None = None) -> GuestRun:
    """Run ``guest`` under ``kernel``'s real KVM (a fresh, snapshot-restored machine)."""
    return run_real_many(kernel, [(guest, protected)], max_exits, timeout_ms)[0]


def run_real_many(kernel: str, runs: list[tuple[str | GuestSpec, bool]],
                  max_exits: int = MAX_EXITS, timeout_ms: int | None = None) -> list[GuestRun]:
    """Run several (guest, protected), up to :data:`PER_MACHINE` one after the other on each
    real machine (a machine's allowance of time grows with its commands, not with its guests).

    Each guest gets its own VM, closed before the next starts. A panic ends the machine: the
    guests after it on that machine are not run (stop "not run")."""
    out: list[GuestRun] = []
    for i in range(0, len(runs), PER_MACHINE):
        out += _run_real_machine(kernel, runs[i : i + PER_MACHINE], max_exits, timeout_ms)
    return out


def _run_real_machine(kernel: str, runs: list[tuple[str | GuestSpec, bool]], max_exits: int,
                      timeout_ms: int | None) -> list[GuestRun]:

    k = load_kernel(kernel, progress=False)
    if k.helper is None:
        raise RealError("this set-up has no VMM helper")
    cmds: list[str] = []
    owner: list[int] = []  # the run each command belongs to
    for i, (guest, protected) in enumerate(runs):
        spec = guest if isinstance(guest, GuestSpec) else guest_spec(guest)
        cmds += _image_commands(spec.image)
        cmds.append(f"vmm guest {spec.vcpus} {int(protected)} {spec.memory // 1024} "
                    f"{max_exits} {timeout_ms or spec.timeout_ms}")
        owner += [i] * (len(cmds) - len(owner))
    console, _ = boot.run_machine(k, cmds, True)
    answers = re.findall(rf"^{boot.MARK} (.*)$", console, re.MULTILINE)
    out = [GuestRun(stop="not run", note="not run: machine dead after panic") for _ in runs]
    for line, cmd, i in zip(answers, cmds, owner, strict=False):
        ans = parse_answer(line, console)
        x0 = signed(int(ans["x0"], 16))
        if cmd.startswith("vmm img") and x0:
            raise RealError(f"the helper refused the image ({x0}): {line}")
        if cmd.startswith("vmm guest"):
            out[i] = GuestRun(x0, ans["at"], ans["stop"], [list(v) for v in ans["vcpus"]])
    if len(answers) < len(cmds):
        i = owner[len(answers)]
        m = boot.PANIC_RE.search(console)
        if m:
            out[i] = GuestRun(stop="panic", note=console[m.start() :].splitlines()[0])
        elif f"{boot.MARK}-HANG" in console:  # the harness gave up on a silent machine
            out[i] = GuestRun(stop="hang", note="no answer: the machine hung")
        else:
            raise RealError(f"the machine answered {len(answers)} of {len(cmds)} "
                                 f"commands:\n{console[-3000:]}")
    return out


# --- comparing ----------------------------------------------------------------------------------


@dataclass
class Row:
    vcpu: int  # -1: the x0 and stop rows
    index: int
    model: str | None
    real: str | None
    model_line: str = ""  # the UART line the exit belongs to (or the last one before it)
    real_line: str = ""
    known: str | None = None  # the known difference that explains a disagreeing row

    @property
    def agree(self) -> bool:
        return self.model == self.real


def _lines(stream: list[str]) -> list[str]:
    """For each exit of a vCPU's stream, the UART line it is part of (or the last one printed
    before it, for other exits)."""
    out: list[str] = []
    text, start = bytearray(), 0
    for i, e in enumerate(stream):
        f = e.split()
        if f[0] == "mw" and int(f[1], 16) == UART_BASE:
            text.append(int(f[3], 16) & 0xFF)
            if text.endswith(b"\n"):
                line = text.decode(errors="replace").rstrip("\n")
                out[start:] = [line] * (i + 1 - start)
                text, start = bytearray(), i + 1
                continue
        out.append("")
    tail = text.decode(errors="replace")
    last = next((x for x in reversed(out[:start]) if x), "")
    out[start:] = [tail or last] * (len(out) - start)
    return out


# The ID registers the probe and idregs guests print: their values come from the CPU (the
# model's emulated core is not QEMU's `-cpu max`), sanitised by KVM or, for a protected VM, by
# the hyp (`pkvm.hyp.sys_regs`, which follows the kernel's masks over the CPU the model has).
PROBE_SYSREGS = ("midr_el1", "mpidr_el1", "id_aa64pfr0_el1", "id_aa64pfr1_el1",
                 "id_aa64dfr0_el1", "id_aa64isar0_el1", "id_aa64isar1_el1",
                 "id_aa64mmfr0_el1", "id_aa64mmfr1_el1", "id_aa64mmfr2_el1", "ctr_el0")
IDREGS_SYSREGS = ("id_aa64pfr0_el1", "id_aa64pfr1_el1", "id_aa64zfr0_el1", "id_aa64dfr0_el1",
                  "id_aa64isar0_el1", "id_aa64isar1_el1", "id_aa64isar2_el1",
                  "id_aa64mmfr0_el1", "id_aa64mmfr1_el1", "id_aa64mmfr2_el1", "id_pfr0_el1")
SYSREGS_PRINTED = {"probe": PROBE_SYSREGS, "idregs": IDREGS_SYSREGS}
NISV_ROW = "fail MMIO access without a valid ISS"


def _sysreg_value(ctx: tuple[str, str, bool], row: Row, excused: set[str]) -> bool:
    names = SYSREGS_PRINTED.get(ctx[1])
    if names is None or row.model is None or row.real is None:
        return False
    name_m, eq_m, _ = row.model_line.partition("=")
    name_r, eq_r, _ = row.real_line.partition("=")
    return bool(eq_m and eq_r) and name_m == name_r and name_m.strip().lower() in names


def _nisv_sea(ctx: tuple[str, str, bool], row: Row, excused: set[str]) -> bool:
    kernel, guest, protected = ctx
    if kernel not in ("7.2", "latest") or not protected or guest != "probe":
        return False
    if row.vcpu == -1:  # the stop row, only after the exit below was excused
        return NISV_SEA in excused and (row.model, row.real) == ("stop error", "stop timeout")
    return (row.model, row.real) == (NISV_ROW, None) and row.model_line.startswith(
        "mem_share(outside memory)=")


NISV_SEA = ("a protected guest's data abort without a valid syndrome outside every memslot "
            "(here the abort pKVM fakes for MEM_SHARE of an IPA outside memory): the kernel "
            "injects an external abort into the guest (mmio.c io_mem_abort, "
            "kvm_inject_sea_dabt); the model's KVM_RUN fails instead")
SYSREG_VALUE = ("ID registers, MIDR/MPIDR and CTR_EL0 as the probe and idregs guests print "
                "them: the real side's CPU is QEMU's -cpu max, the model's its emulated core; "
                "both sanitised as KVM (sys_regs.c) or, for a protected VM, the hyp does it; "
                "same register, value differs")

# (predicate over ((kernel, guest, protected), row, reasons excused so far), reason)
KNOWN_GUEST_DIFFERENCES = [(_sysreg_value, SYSREG_VALUE), (_nisv_sea, NISV_SEA)]


def compare(model: GuestRun, real: GuestRun,
            ctx: tuple[str, str, bool] | None = None) -> list[Row]:
    """Every exit of every vCPU, side by side; then x0 and the stop reason as rows.

    With ``ctx`` = (kernel, guest name, protected), a disagreeing row that an entry of
    :data:`KNOWN_GUEST_DIFFERENCES` explains is marked with its reason."""
    rows = [Row(-1, 0, f"x0 {model.x0}", f"x0 {real.x0}")]
    for vcpu in range(max(len(model.exits), len(real.exits))):
        ms = model.exits[vcpu] if vcpu < len(model.exits) else []
        rs = real.exits[vcpu] if vcpu < len(real.exits) else []
        ml, rl = _lines(ms), _lines(rs)
        for i, (a, b) in enumerate(zip_longest(ms, rs)):
            rows.append(Row(vcpu, i, a, b, ml[i] if i < len(ml) else (ml[-1] if ml else ""),
                            rl[i] if i < len(rl) else (rl[-1] if rl else "")))
    rows.append(Row(-1, 1, f"stop {model.stop}", f"stop {real.stop}"))
    if ctx is not None:
        excused: set[str] = set()
        for r in rows:
            if r.agree:
                continue
            for pred, reason in KNOWN_GUEST_DIFFERENCES:
                if pred(ctx, r, excused):
                    r.known = reason
                    excused.add(reason)
                    break
    return rows


def diverges(rows: list[Row]) -> bool:
    """A row disagrees that no known difference explains."""
    return any(not r.agree and r.known is None for r in rows)


def known_counts(rows: list[Row]) -> dict[str, int]:
    """How many rows each known difference excused."""
    out: dict[str, int] = {}
    for r in rows:
        if not r.agree and r.known is not None:
            out[r.known] = out.get(r.known, 0) + 1
    return out


# --- `pkvm conform --guest` ---------------------------------------------------------------------


def show(guest: str, kernel: str, protected: bool, console: Console) -> int:
    """Run ``guest`` on both sides and print the streams side by side: 0 agree, 1 diverge."""

    spec = guest_spec(guest)
    real = run_real(kernel, spec, protected)
    model = run_model(kernel, spec, protected)
    rows = compare(model, real, (kernel, spec.name, protected))
    kind = "protected" if protected else "normal"
    t = Table(title=f"guest {spec.name} ({kind} VM, {spec.vcpus} vCPU): model vs Linux {kernel}")
    for col in ("vCPU", "#", "model", "kernel", "agree?"):
        t.add_column(col)
    for r in rows:
        mark = ("[green]yes[/green]" if r.agree else
                "[yellow]known[/yellow]" if r.known else "[red]NO[/red]")
        t.add_row("-" if r.vcpu < 0 else str(r.vcpu), "" if r.vcpu < 0 else str(r.index),
                  r.model or "—", r.real or "—", mark)
    console.print(t)
    for side, run in (("model", model), ("kernel", real)):
        console.print(f"{side} console: {run.console!r}" + (f"  ({run.note})" if run.note else ""))
    if model.internal:
        console.print("model, not userspace exits: "
                      + ", ".join(f"{k} {v}" for k, v in sorted(model.internal.items())))
    agree = sum(r.agree for r in rows)
    console.print(f"{agree}/{len(rows)} rows agree")
    for reason, n in known_counts(rows).items():
        console.print(f"[yellow]known difference[/yellow], {n} row(s): {reason}")
    return 1 if diverges(rows) else 0
