"""One real machine for `pkvm conform`: the initramfs, the QEMU command line, a boot or a
restored snapshot, and the checks that the boot is usable (pKVM up, our module loaded with the
set-up's hypercall table).
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from pkvm.conform import snapshot as _snapshot
from pkvm.conform.setup import Kernel, load_kernel
from pkvm.conform.steps import CPUS
from pkvm.cpio import CpioEntry, newc

PKVM_UP = "Protected hVHE mode initialized successfully"
MARK = "@@PKVMC"
BOOT_TIMEOUT = 240.0  # seconds, a whole batch at most; TCG on 2 cores boots in a few seconds
STEP_TIMEOUT = 1.0  # seconds per command added to a batch's allowance


class RealError(RuntimeError):
    """The harness itself failed (not the hypervisor): the message has the console's tail."""


@dataclass
class BootLog:
    """Timing and console of one boot (for benchmarks and debugging)."""

    kernel: str
    seconds: float
    sequences: int
    console: str = field(repr=False)


# --- initramfs ----------------------------------------------------------------------------------


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


def initramfs(k: Kernel, cmds: list[str] | None) -> bytes:
    """The boot's initramfs; ``cmds`` None: the snapshot's (commands come by the console)."""
    files = [
        CpioEntry("bin", 0o040755),
        CpioEntry("bin/busybox", 0o100755, k.busybox.read_bytes()),
        CpioEntry("init", 0o100755, (INIT if cmds is not None else SNAPSHOT_INIT).encode()),
        CpioEntry("pkvm_conform.ko", 0o100644, k.module.read_bytes()),
    ]
    if cmds is not None:
        files.append(CpioEntry("cmds", 0o100644, "".join(c + "\n" for c in cmds).encode()))
    if k.helper is not None:
        files.append(CpioEntry("helper", 0o100755, k.helper.read_bytes()))
    return newc(files)


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


def hang_note(timeout: float) -> str:
    return f"\n{MARK}-HANG harness timeout: no answer within {timeout:.0f} s\n"


def _boot(k: Kernel, cmds: list[str]) -> tuple[str, float]:
    timeout = _batch_timeout(cmds, boot=True)
    with tempfile.TemporaryDirectory(prefix="pkvm-conform-") as tmp:
        initrd = Path(tmp) / "initrd.cpio"
        initrd.write_bytes(initramfs(k, cmds))
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
            return out + hang_note(timeout), time.monotonic() - t0
        console = (p.stdout + p.stderr).decode(errors="replace").replace("\r", "")
        return console, time.monotonic() - t0


def check_boot(k: Kernel, console: str) -> None:
    """The boot reached our commands with pKVM up and the module loaded, with the same table."""
    if f"{MARK}-PKVM-UP" not in console:
        raise RealError(f"pKVM did not come up on {k.release} (no {PKVM_UP!r}):\n{console[-3000:]}")
    if f"{MARK}-INSMOD-FAILED" in console:
        raise RealError(f"insmod pkvm_conform.ko failed on {k.release}:\n{console[-3000:]}")
    _check_ids(k, console)


_NO_SNAPSHOT: set[str] = set()  # profiles whose snapshot cannot be made in this process
_RESTORE_FAILURES: dict[str, int] = {}
MAX_RESTORE_FAILURES = 3  # then boot for the rest of the process


def run_machine(k: Kernel, cmds: list[str], use_snapshot: bool) -> tuple[str, float]:
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
                    return e.console + hang_note(timeout), time.monotonic() - t0
                if f"{MARK} " in console or PANIC_RE.search(console):
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
    check_boot(k, console)
    return console, secs


PANIC_RE = re.compile(r"(HYP panic|hyp panic|Kernel panic - not syncing.*)")
HYP_PANIC_RE = re.compile(r"(HYP panic|nVHE hyp panic|hVHE hyp panic)")


def _check_ids(k: Kernel, console: str) -> None:
    m = re.search(rf"^{MARK}-IDS (.*)$", console, re.MULTILINE)
    if not m:
        return
    ids = json.loads(m.group(1))["ids"]
    if ids != k.ids:
        raise RealError(f"module's hypercall table differs from the set-up's for {k.release}")


def prepare_snapshot(kernel: str, progress: bool = False) -> Path:
    """Make (or check) ``kernel``'s QEMU snapshot now rather than at the first run."""
    k = load_kernel(kernel, progress)
    return _snapshot.ensure_snapshot(
        k,
        lambda: initramfs(k, None),
        lambda initrd: qemu_command(k, initrd),
        f"{MARK}-READY",
        lambda console: check_boot(k, console),
    )
