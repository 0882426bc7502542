"""The real-kernel side of ``pkvm conform``: run hypercall sequences on Linux's own pKVM.

A sequence is a list of :class:`RawStep`. :func:`run_sequences` boots the chosen Debian kernel
(``kvm-arm.mode=protected``) under QEMU with a busybox initramfs holding our module
(``module/pkvm_conform.c``); the initramfs ``/init`` loads it, feeds it the steps one by one and
prints each step's x0..x3. Many sequences share one boot (each gets its own page names); a
hyp panic ends the boot, so the steps after it are reported as not run and the next sequence
starts on a fresh boot.

    >>> from pkvm.conform.real import RawStep, run_sequences
    >>> [[r]] = run_sequences("7.2", [[RawStep("__pkvm_host_share_hyp", ("page:a",))]])
    >>> (r.x0, r.x1)
    (0, 0)

Arguments are ints (reduced modulo 2^64) or symbolic strings the module resolves on the real
machine: ``"page:NAME"`` (pfn of a zeroed page the module allocates for the sequence),
``"pa:NAME"`` (its physical address), ``"va:NAME"`` (its kernel virtual address),
``"vm:NAME"`` (the hyp handle of a VM made by a :func:`vm_create` step of the sequence).
docs/conform.md has the whole story, timings included.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pkvm.conform import snapshot as _snapshot
from pkvm.conform.setup import Kernel, SetupError, ensure_setup, load_kernel

__all__ = [
    "BootLog",
    "RawStep",
    "RealError",
    "RealResult",
    "SetupError",
    "ensure_setup",
    "host_read",
    "hypercall_ids",
    "page_names",
    "prepare_snapshot",
    "run_sequences",
    "smccc_id",
    "vm_create",
    "vm_destroy",
    "vm_run",
    "vm_topup",
]

MASK64 = (1 << 64) - 1
_SYMBOL = re.compile(r"(page|pa|va|vm):[A-Za-z0-9_-]{1,20}")
VMM_CALLS = ("vmm:create", "vmm:run", "vmm:destroy", "vmm:topup")
HOST_READ = "host:read"  # the host kernel reads a page of ours (the module, linear map)
SMCCC_HOST_BASE = 0xC600_0000  # fast call, SMC64, owner "vendor hypervisor"
PKVM_UP = "Protected hVHE mode initialized successfully"
MARK = "@@PKVMC"
CPUS = 2  # -smp 2, as measured in the spec
BOOT_TIMEOUT = 240.0  # seconds, a whole batch at most; TCG on 2 cores boots in a few seconds
STEP_TIMEOUT = 1.0  # seconds per command added to a batch's allowance


class RealError(RuntimeError):
    """The harness itself failed (not the hypervisor): the message has the console's tail."""


@dataclass(frozen=True)
class RawStep:
    """One host hypercall: ``call`` a name of the kernel's enum or an int (the whole x0)."""

    call: str | int
    args: tuple[int | str, ...] = ()
    cpu: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.args, (str, int)):  # one argument given bare
            object.__setattr__(self, "args", (self.args,))
        elif not isinstance(self.args, tuple):
            object.__setattr__(self, "args", tuple(self.args))
        if not 0 <= self.cpu < CPUS:
            raise ValueError(f"cpu {self.cpu}: the QEMU machine has CPUs 0..{CPUS - 1}")
        if len(self.args) > 6:
            raise TypeError(f"at most 6 hypercall arguments (x1..x6), got {len(self.args)}")
        for a in self.args:
            if isinstance(a, str) and not _SYMBOL.fullmatch(a):
                raise ValueError(
                    f"symbolic argument {a!r}: use 'page:NAME', 'pa:NAME', 'va:NAME' or "
                    "'vm:NAME' (NAME: up to 20 letters, digits, '_', '-')"
                )
        if self.call == HOST_READ and not (
            len(self.args) == 1 and isinstance(self.args[0], str)
            and self.args[0].startswith("page:")
        ):
            raise ValueError(f"{HOST_READ} takes one 'page:NAME' argument")
        if isinstance(self.call, str) and self.call.startswith("vmm:"):
            if self.call not in VMM_CALLS:
                raise ValueError(f"{self.call!r}: VMM steps are {', '.join(VMM_CALLS)}")
            if not self.args or not (
                isinstance(self.args[0], str) and self.args[0].startswith("vm:")
            ):
                raise ValueError(f"{self.call} takes a 'vm:NAME' first argument")


def vm_create(vm: str, vcpus: int = 1, protected: bool = False) -> RawStep:
    """A VMM step: create VM ``vm`` ("vm:NAME") with ``vcpus`` vCPUs, run vCPU 0 once.

    Its result: x0 = 0 or -errno (of the failing ioctl), x1 = the hyp handle (later steps may
    pass ``vm``: the module substitutes it), x2 = the first exit's reason, x3 = vcpus.
    """
    return RawStep("vmm:create", (vm, vcpus, int(protected)))


def vm_run(vm: str, vcpu: int = 0) -> RawStep:
    """A VMM step: one KVM_RUN; x0 = 0 or -errno, x1 = exit reason, x2 = MMIO address."""
    return RawStep("vmm:run", (vm, vcpu))


def vm_topup(vm: str, vcpu: int = 0, pages: int = 4) -> RawStep:
    """A VMM step: fill vCPU ``vcpu``'s pKVM memcache up to ``pages`` fresh pages (what KVM's
    ``topup_hyp_memcache`` does before a guest-memory call); x0 = 0 or -errno, x1 = pages held.
    7.2 only (6.12's vCPUs have no such memcache)."""
    return RawStep("vmm:topup", (vm, vcpu, pages))


def vm_destroy(vm: str) -> RawStep:
    """A VMM step: close the VM's fds (the host tears it down), then read its guest RAM back;
    x0 = 0 or -errno, x1 = non-zero 64-bit words read, x2 = pages whose read faulted."""
    return RawStep("vmm:destroy", (vm,))


def host_read(page: str, cpu: int = 0) -> RawStep:
    """The host kernel reads page ``page`` ("page:NAME") through its linear map on ``cpu``, with
    a fault-tolerant accessor; x0 = 0 or -EFAULT (the host stage-2 refused it), x1 = non-zero
    64-bit words of the page."""
    return RawStep(HOST_READ, (page,), cpu)


@dataclass
class RealResult:
    """What the real machine answered; x0/x1 signed, x2/x3 unsigned (as the model).

    ``panic``: the machine died at this step (``note`` says whether the hyp panicked, "hyp
    panic: ...", the host kernel did, "host kernel panic (EL1): ...", or a CPU locked up,
    "lockup: ..."); the steps after it in the sequence are not run (``not_run``, and ``panic``
    too). ``pages`` maps the sequence's page names to the pfns the module gave them and
    ``vas`` to their kernel VAs (the same dicts on every step of a sequence).
    """

    x0: int
    x1: int
    x2: int
    x3: int
    panic: bool = False
    note: str = ""
    pages: dict[str, int] = field(default_factory=dict, repr=False)  # the sequence's name -> pfn
    not_run: bool = False  # the machine died at an earlier step: this one never ran
    vas: dict[str, int] = field(default_factory=dict, repr=False)  # name -> kernel VA

    @property
    def kind(self) -> str:
        """How the machine died at this step: "hyp panic", "host oops", "lockup", "model
        error" (a Python exception in the model: never agrees), or "" (it did not)."""
        if not self.panic or self.not_run:
            return ""
        for k in ("hyp panic", "lockup", "model error"):
            if self.note.startswith(k):
                return k
        return "host oops"


@dataclass
class BootLog:
    """Timing and console of one boot (for benchmarks and debugging)."""

    kernel: str
    seconds: float
    sequences: int
    console: str = field(repr=False)


def _signed(v: int) -> int:
    v &= MASK64
    return v - (1 << 64) if v >> 63 else v


def _encode_call(k: Kernel, call: str | int) -> str | None:
    """The module's spelling of a call, or None when this kernel's enum lacks the name."""
    if isinstance(call, bool) or not isinstance(call, (str, int)):
        raise TypeError(f"call must be a hypercall name or an int, not {call!r}")
    if isinstance(call, int):
        return hex(call & MASK64)
    if call in k.ids:
        return call
    if not re.fullmatch(r"__\w+", call):
        raise ValueError(f"{call!r} is not a host hypercall name")
    return None


def _encode_arg(a: int | str, seq: int) -> str:
    if isinstance(a, bool) or not isinstance(a, (int, str)):
        raise TypeError(f"hypercall argument must be an int or a symbolic string, not {a!r}")
    if isinstance(a, int):
        return hex(a & MASK64)
    if a.startswith("vm:"):  # VMs outlive a sequence in the module: scope their names
        return f"vm:{seq}.{a[3:]}"
    return a


def _vmm_command(st: RawStep, seq: int) -> str:
    name = f"{seq}.{str(st.args[0])[3:]}"
    rest = [str(int(x)) for x in st.args[1:]]
    op = str(st.call)[4:]
    return " ".join(["vmm", op, name, *rest])


# --- initramfs ----------------------------------------------------------------------------------


def _cpio_entry(name: str, data: bytes, mode: int, ino: int) -> bytes:
    namez = name.encode() + b"\0"
    hdr = "070701" + "".join(
        f"{v:08x}" for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(namez), 0)
    )
    out = hdr.encode() + namez
    out += b"\0" * (-len(out) % 4)
    out += data + b"\0" * (-len(data) % 4)
    return out


def _cpio(files: list[tuple[str, bytes, int]]) -> bytes:
    out = b"".join(_cpio_entry(n, d, m, i + 1) for i, (n, d, m) in enumerate(files))
    return out + _cpio_entry("TRAILER!!!", b"", 0, 0)


_PRELUDE = f"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox --install -s /bin
export PATH=/bin
if dmesg | grep -q "{PKVM_UP}"; then echo "{MARK}-PKVM-UP"; fi
insmod /pkvm_conform.ko || echo "{MARK}-INSMOD-FAILED"
echo "{MARK}-BEGIN"
echo ids > /proc/pkvm_conform && echo "{MARK}-IDS $(cat /proc/pkvm_conform)"
if [ -x /helper ]; then
  mkfifo /tmp/vmm.in /tmp/vmm.out
  taskset 1 /helper < /tmp/vmm.in > /tmp/vmm.out &
  exec 3> /tmp/vmm.in 4< /tmp/vmm.out
fi
"""
_STEP = f"""  ans=""
  case "$l" in
    "vmm "*) echo "${{l#vmm }}" >&3; read -r ans <&4 ;;
    *) echo "$l" > /proc/pkvm_conform; read -r ans < /proc/pkvm_conform ;;
  esac
  echo "{MARK} $ans"
"""
# A boot: the commands are in the initramfs.
INIT = f"""{_PRELUDE}while IFS= read -r l; do
{_STEP}done < /cmds
echo "{MARK}-END"
poweroff -f
"""
# A snapshot: QEMU saves the machine at READY; each restored copy reads its commands from the
# serial console (echo off) up to an END line.
SNAPSHOT_INIT = f"""{_PRELUDE}stty -echo
echo "{MARK}-READY"
while IFS= read -r l; do
  [ "$l" = "{MARK}-END" ] && break
{_STEP}done
echo "{MARK}-END"
poweroff -f
"""


def _initramfs(k: Kernel, cmds: list[str] | None) -> bytes:
    """The boot's initramfs; ``cmds`` None: the snapshot's (commands come by the console)."""
    files = [
        ("bin", b"", 0o040755),
        ("bin/busybox", k.busybox.read_bytes(), 0o100755),
        ("init", (INIT if cmds is not None else SNAPSHOT_INIT).encode(), 0o100755),
        ("pkvm_conform.ko", k.module.read_bytes(), 0o100644),
    ]
    if cmds is not None:
        files.append(("cmds", "".join(c + "\n" for c in cmds).encode(), 0o100644))
    if k.helper is not None:
        files.append(("helper", k.helper.read_bytes(), 0o100755))
    return _cpio(files)


# --- one boot -----------------------------------------------------------------------------------


def qemu_command(k: Kernel, initrd: Path) -> list[str]:
    cmdline = "console=ttyAMA0 kvm-arm.mode=protected panic=-1 loglevel=4 rdinit=/init"
    return [
        *k.qemu,  # pkvm.conform.qemu: Debian trixie's QEMU 10 by default
        "-M", "virt,virtualization=on,gic-version=3",
        # pauth-impdef: QEMU's cheap pointer-auth algorithm (boots ~3x faster under TCG than
        # the architected QARMA; nothing a hypercall observes depends on it).
        "-cpu", "max,lpa2=off,pauth-impdef=on",
        "-smp", str(CPUS),
        "-m", "1G",
        "-display", "none", "-serial", "stdio", "-monitor", "none",
        "-no-reboot", "-nic", "none",
        "-kernel", str(k.image),
        "-initrd", str(initrd),
        "-append", cmdline,
    ]  # fmt: skip


def _batch_timeout(cmds: list[str], boot: bool) -> float:
    """How long a machine may take for ``cmds`` before it counts as hung (a CPU locked up in
    the hyp answers nothing: that is a result, "lockup", not a harness failure)."""
    return min(BOOT_TIMEOUT, (90.0 if boot else 60.0) + STEP_TIMEOUT * len(cmds))


def _hang_note(timeout: float) -> str:
    return f"\n{MARK}-HANG harness timeout: no answer within {timeout:.0f} s\n"


def _boot(k: Kernel, cmds: list[str]) -> tuple[str, float]:
    timeout = _batch_timeout(cmds, boot=True)
    with tempfile.TemporaryDirectory(prefix="pkvm-conform-") as tmp:
        initrd = Path(tmp) / "initrd.cpio"
        initrd.write_bytes(_initramfs(k, cmds))
        t0 = time.monotonic()
        try:
            p = subprocess.run(
                qemu_command(k, initrd),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode(errors="replace").replace("\r", "")
            if f"{MARK} " not in out and f"{MARK}-BEGIN" not in out:
                raise RealError(f"QEMU timed out after {timeout} s:\n{out[-3000:]}") from e
            return out + _hang_note(timeout), time.monotonic() - t0
        console = (p.stdout + p.stderr).decode(errors="replace").replace("\r", "")
        return console, time.monotonic() - t0


def _check_boot(k: Kernel, console: str) -> None:
    """The boot reached our commands with pKVM up and the module loaded, with the same table."""
    if f"{MARK}-PKVM-UP" not in console:
        raise RealError(f"pKVM did not come up on {k.release} (no {PKVM_UP!r}):\n{console[-3000:]}")
    if f"{MARK}-INSMOD-FAILED" in console:
        raise RealError(f"insmod pkvm_conform.ko failed on {k.release}:\n{console[-3000:]}")
    _check_ids(k, console)


_NO_SNAPSHOT: set[str] = set()  # profiles whose snapshot cannot be made in this process
_RESTORE_FAILURES: dict[str, int] = {}
MAX_RESTORE_FAILURES = 3  # then boot for the rest of the process


def _run_machine(k: Kernel, cmds: list[str], use_snapshot: bool) -> tuple[str, float]:
    """Run ``cmds`` on a fresh machine: a restored snapshot if possible, else a boot."""
    if use_snapshot and k.profile not in _NO_SNAPSHOT:
        try:
            d = prepare_snapshot(k.profile)
        except (_snapshot.SnapshotError, RealError) as e:
            warnings.warn(f"pkvm conform: no {k.profile} snapshot, booting: {e}", stacklevel=2)
            _NO_SNAPSHOT.add(k.profile)
        else:
            try:
                t0 = time.monotonic()
                feed = "".join(c + "\n" for c in cmds) + f"{MARK}-END\n"
                timeout = _batch_timeout(cmds, boot=False)
                try:
                    console = _snapshot.restore_run(
                        d, qemu_command(k, d / "initrd"), feed, timeout
                    )
                except _snapshot.SnapshotTimeout as e:  # restored and running, then hung
                    return e.console + _hang_note(timeout), time.monotonic() - t0
                if f"{MARK} " in console or _PANIC_RE.search(console):
                    return console, time.monotonic() - t0
                raise _snapshot.SnapshotError(
                    f"restored machine answered nothing:\n{console[-2000:]}"
                )
            except _snapshot.SnapshotError as e:
                n = _RESTORE_FAILURES[k.profile] = _RESTORE_FAILURES.get(k.profile, 0) + 1
                if n >= MAX_RESTORE_FAILURES:
                    _NO_SNAPSHOT.add(k.profile)
                warnings.warn(
                    f"pkvm conform: {k.profile} restore failed, booting: {e}", stacklevel=2
                )
    console, secs = _boot(k, cmds)
    _check_boot(k, console)
    return console, secs


_PANIC_RE = re.compile(r"(HYP panic|hyp panic|Kernel panic - not syncing.*)")
_HYP_PANIC_RE = re.compile(r"(HYP panic|nVHE hyp panic|hVHE hyp panic)")


def _check_ids(k: Kernel, console: str) -> None:
    m = re.search(rf"^{MARK}-IDS (.*)$", console, re.MULTILINE)
    if not m:
        return
    ids = json.loads(m.group(1))["ids"]
    if ids != k.ids:
        raise RealError(f"module's hypercall table differs from the set-up's for {k.release}")


@dataclass
class _Pending:
    seq: int  # index into the caller's list
    steps: list[RawStep]


SEQ_STEP = -1  # owner codes of the commands that answer no step
PAGE_STEP = -2


def page_names(steps: list[RawStep]) -> list[str]:
    """The page names a sequence's hypercalls pass, in order of first use: the module
    allocates them all before the sequence's first step."""
    names: dict[str, None] = {}
    for st in steps:
        if isinstance(st.call, str) and st.call.startswith("vmm:"):
            continue
        for a in st.args:
            if isinstance(a, str) and a.split(":", 1)[0] in ("page", "pa", "va"):
                names[a.split(":", 1)[1]] = None
    return list(names)


def _commands(k: Kernel, batch: list[_Pending]) -> tuple[list[str], list[tuple[int, int]]]:
    """The module commands of a batch, and for each the (sequence, step) it answers.

    Each sequence starts with ``seq`` and one ``page NAME`` per page it names (so its name ->
    pfn map is known even if a step panics). Steps whose call this kernel lacks are not sent:
    they answer as unknown calls without a boot.
    """
    cmds: list[str] = []
    owners: list[tuple[int, int]] = []
    for b, pend in enumerate(batch):
        cmds.append(f"seq {pend.seq}")
        owners.append((b, SEQ_STEP))
        for name in page_names(pend.steps):
            cmds.append(f"page {name}")
            owners.append((b, PAGE_STEP))
        for j, st in enumerate(pend.steps):
            if isinstance(st.call, str) and st.call.startswith("vmm:"):
                if k.helper is None:
                    raise RealError("this set-up has no VMM helper: VMM steps cannot run")
                cmds.append(_vmm_command(st, pend.seq))
                owners.append((b, j))
                continue
            if st.call == HOST_READ:
                cmds.append(f"read {int(st.cpu)} {str(st.args[0])[5:]}")
                owners.append((b, j))
                continue
            func = _encode_call(k, st.call)
            if func is None:
                continue
            args = " ".join(_encode_arg(a, pend.seq) for a in st.args)
            cmds.append(f"hvc {int(st.cpu)} {func} {args}".rstrip())
            owners.append((b, j))
    return cmds, owners


def _answer(line: str, console: str) -> dict[str, Any]:
    """One answer line; a kernel message printed into its middle is cut out."""
    if not line.strip():
        return {}
    m = re.search(r"\{.*\}", line)
    try:
        return dict(json.loads(m.group(0) if m else line))
    except json.JSONDecodeError as e:
        raise RealError(f"unreadable answer {line!r}:\n{console[-3000:]}") from e


def _regs(msg: dict[str, str], pages: dict[str, int], vas: dict[str, int]) -> RealResult:
    return RealResult(
        _signed(int(msg["x0"], 16)),
        _signed(int(msg["x1"], 16)),
        int(msg["x2"], 16) & MASK64,
        int(msg["x3"], 16) & MASK64,
        pages=pages,
        vas=vas,
    )


def _not_issued(k: Kernel, st: RawStep, pages: dict[str, int],
                vas: dict[str, int] | None = None) -> RealResult:
    """A name this kernel's enum lacks answers as an unknown call: x0 = -1, x1..x3 as passed."""
    vas = vas or {}
    regs = [a if isinstance(a, int) else _resolve(a, pages, vas)
            for a in (*st.args, 0, 0, 0)][:3]
    return RealResult(
        -1,
        _signed(regs[0]),
        regs[1] & MASK64,
        regs[2] & MASK64,
        note=f"{st.call} is not a host hypercall of {k.release}: not issued",
        pages=pages,
        vas=vas,
    )


def _run_batch(
    k: Kernel, batch: list[_Pending], logs: list[BootLog], use_snapshot: bool
) -> tuple[dict[int, list[RealResult]], list[_Pending]]:
    """One fresh machine for ``batch``: results by sequence index, and the sequences left."""
    cmds, owners = _commands(k, batch)
    console, secs = _run_machine(k, cmds, use_snapshot)
    logs.append(BootLog(k.profile, secs, len(batch), console))
    answers = [m.group(1) for m in re.finditer(rf"^{MARK} (.*)$", console, re.MULTILINE)]
    finished = f"{MARK}-END" in console

    results: dict[int, dict[int, RealResult]] = {b: {} for b in range(len(batch))}
    pages: dict[int, dict[str, int]] = {b: {} for b in range(len(batch))}
    vas: dict[int, dict[str, int]] = {b: {} for b in range(len(batch))}
    for (b, j), ans in zip(owners, answers, strict=False):
        if j == SEQ_STEP:
            continue
        msg = _answer(ans, console)
        if "error" in msg:
            raise RealError(f"module refused step {j} of sequence {batch[b].seq}: {msg['error']}")
        if not msg:
            raise RealError(f"no answer to step {j} of sequence {batch[b].seq}:\n{console[-3000:]}")
        if j == PAGE_STEP:
            pages[b].update({n: int(v, 16) for n, v in msg["pages"].items()})
            vas[b].update({n: int(v, 16) for n, v in msg.get("vas", {}).items()})
        else:
            results[b][j] = _regs(msg, pages[b], vas[b])

    dead_at: tuple[int, int] | None = None
    reason = ""
    if not finished:
        dead_at, reason = _death(k, batch, owners, answers, console)

    done: dict[int, list[RealResult]] = {}
    remaining: list[_Pending] = []
    for b, pend in enumerate(batch):
        if dead_at is not None and b > dead_at[0]:
            remaining.append(pend)
            continue
        seq_out: list[RealResult] = []
        for j, st in enumerate(pend.steps):
            if j in results[b]:
                seq_out.append(results[b][j])
            elif dead_at is not None and b == dead_at[0] and j == dead_at[1]:
                seq_out.append(RealResult(0, 0, 0, 0, panic=True, note=reason, pages=pages[b],
                                          vas=vas[b]))
            elif dead_at is not None and b == dead_at[0] and j > dead_at[1]:
                note = "not run: machine dead after panic"
                seq_out.append(RealResult(0, 0, 0, 0, panic=True, note=note, pages=pages[b],
                                          vas=vas[b], not_run=True))
            else:
                seq_out.append(_not_issued(k, st, pages[b], vas[b]))
        done[pend.seq] = seq_out
    return done, remaining


_LOCKUP_RE = re.compile(r"(hard LOCKUP|soft lockup|self-detected stall|rcu_preempt detected stalls"
                        r"|rcu_sched detected stalls|harness timeout)", re.IGNORECASE)


def _death(k: Kernel, batch: list[_Pending], owners: list[tuple[int, int]], answers: list[str],
           console: str) -> tuple[tuple[int, int], str]:
    """Where a batch that did not finish died, and how (the first step left unanswered)."""
    if len(answers) >= len(owners):
        raise RealError(f"boot ended before its end marker:\n{console[-3000:]}")
    dead_at = owners[len(answers)]
    if dead_at[1] < 0:
        raise RealError(f"boot died outside any step:\n{console[-3000:]}")
    panic = _PANIC_RE.search(console)
    lockup = _LOCKUP_RE.search(console)
    if not panic and not lockup:
        raise RealError(
            f"boot of {k.release} died without a panic at sequence {batch[dead_at[0]].seq} "
            f"step {dead_at[1]}:\n{console[-3000:]}"
        )
    if panic:
        lines = [ln.strip() for ln in console.splitlines() if _PANIC_RE.search(ln)]
        who = "hyp panic" if _HYP_PANIC_RE.search(console) else "host kernel panic (EL1)"
    else:
        lines = [ln.strip() for ln in console.splitlines() if _LOCKUP_RE.search(ln)]
        who = "lockup"
    return dead_at, f"{who}: " + "; ".join(dict.fromkeys(lines))[:300]


def _resolve(a: str, pages: dict[str, int], vas: dict[str, int]) -> int:
    kind, name = a.split(":", 1)
    pfn = pages.get(name)
    if pfn is None:
        return 0
    if kind == "page":
        return pfn
    if kind == "va":
        return vas.get(name, 0)
    return pfn << 12 if kind == "pa" else 0  # vm: values are not reported back


def _run_chunk(
    k: Kernel, todo: list[_Pending], per_boot: int, use_snapshot: bool
) -> tuple[dict[int, list[RealResult]], list[BootLog]]:
    out: dict[int, list[RealResult]] = {}
    logs: list[BootLog] = []
    while todo:
        batch, todo = todo[:per_boot], todo[per_boot:]
        done, rest = _run_batch(k, batch, logs, use_snapshot)
        out.update(done)
        todo = rest + todo
    return out, logs


def run_sequences(
    kernel: str,
    seqs: list[list[RawStep]],
    *,
    per_boot: int = 256,
    jobs: int = 1,
    snapshot: bool = True,
    progress: bool = False,
    logs: list[BootLog] | None = None,
) -> list[list[RealResult]]:
    """Run each sequence on the real ``kernel`` ("6.12" | "7.2" | "latest"), in order.

    Sequences share boots (``per_boot`` at most; ``per_boot=1`` gives each a fresh machine);
    after a panic the rest start on a new boot. ``jobs`` > 1 splits the list into that many
    contiguous parts, each booted by its own QEMU at the same time. ``snapshot`` (default; env
    ``PKVM_CONFORM_SNAPSHOT=0`` turns it off): instead of booting, restore a QEMU snapshot
    taken once the kernel is up and the module loaded (made on first use, ~5x faster; any
    failure falls back to booting). Raises :class:`SetupError` when the
    harness cannot be set up here and :class:`RealError` when a boot fails for another reason.
    """
    k = load_kernel(kernel, progress)
    if os.environ.get("PKVM_CONFORM_SNAPSHOT", "1") == "0":
        snapshot = False
    for s in seqs:
        for st in s:
            if not isinstance(st, RawStep):
                raise TypeError(f"sequences hold RawStep, not {st!r}")
    if per_boot < 1 or jobs < 1:
        raise ValueError("per_boot and jobs must be at least 1")
    todo = [_Pending(i, list(s)) for i, s in enumerate(seqs)]
    n = max(1, min(jobs, len(todo)))
    size = -(-len(todo) // n) if todo else 0
    chunks = [todo[i : i + size] for i in range(0, len(todo), size)] if todo else []
    out: dict[int, list[RealResult]] = {}
    boot_logs = logs if logs is not None else []
    if len(chunks) <= 1:
        for chunk in chunks:
            done, chunk_logs = _run_chunk(k, chunk, per_boot, snapshot)
            out.update(done)
            boot_logs.extend(chunk_logs)
    else:
        with ThreadPoolExecutor(max_workers=len(chunks)) as pool:
            work = pool.map(lambda c: _run_chunk(k, c, per_boot, snapshot), chunks)
            for done, chunk_logs in work:
                out.update(done)
                boot_logs.extend(chunk_logs)
    return [out[i] for i in range(len(seqs))]


def prepare_snapshot(kernel: str, progress: bool = False) -> Path:
    """Make (or check) ``kernel``'s QEMU snapshot now rather than at the first run."""
    k = load_kernel(kernel, progress)
    return _snapshot.ensure_snapshot(
        k,
        lambda: _initramfs(k, None),
        lambda initrd: qemu_command(k, initrd),
        f"{MARK}-READY",
        lambda console: _check_boot(k, console),
    )


def hypercall_ids(kernel: str) -> dict[str, int]:
    """Host hypercall name -> index, from ``kernel``'s own ``enum __kvm_host_smccc_func``."""
    return dict(load_kernel(kernel, progress=False).ids)


def smccc_id(kernel: str, name: str) -> int:
    """The whole x0 of host hypercall ``name`` on ``kernel`` (from its own enum)."""
    k = load_kernel(kernel, progress=False)
    return SMCCC_HOST_BASE + k.ids[name]


# --- SMC conformance (pkvm.conform.smc): raw module commands on one fresh machine ------------
def run_module_commands(kernel: str, cmds: list[str], snapshot: bool = True) -> tuple[list[str], str]:
    """Send the module commands ``cmds`` (e.g. ``smc CPU IMM X0 .. X17``) to one fresh machine
    of ``kernel``: the answer lines in order (fewer than ``cmds`` if the machine died) and the
    console."""
    k = load_kernel(kernel, progress=False)
    use = snapshot and os.environ.get("PKVM_CONFORM_SNAPSHOT", "1") != "0"
    console, _ = _run_machine(k, cmds, use)
    answers = [m.group(1) for m in re.finditer(rf"^{MARK} (.*)$", console, re.MULTILINE)]
    return answers, console
