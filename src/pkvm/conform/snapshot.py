"""Boot once, restore many times: a QEMU snapshot of a booted kernel ready for commands.

Booting Debian's kernel under TCG costs 3-5 s; restoring a saved machine costs well under one.
The snapshot is taken when the initramfs ``/init`` has checked that pKVM is up, loaded the
module, started the VMM helper and printed READY; QEMU is stopped there and its state migrated
to a file (``exec:cat``). Each restored copy reads its commands from the serial console, so
every batch starts from the very same machine (same pfns for the same page names, an empty VM
table). Anything going wrong raises :class:`SnapshotError`; the caller then boots instead.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import select
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pkvm.conform.setup import Kernel

READY_TIMEOUT = 240.0  # seconds: boot to READY on a loaded machine


class SnapshotError(RuntimeError):
    """The snapshot could not be made or restored (the caller falls back to booting)."""


class _Qmp:
    """Just enough of the QEMU Machine Protocol: connect, negotiate, execute."""

    def __init__(self, path: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            if proc.poll() is not None:
                raise SnapshotError(f"QEMU exited ({proc.returncode}) before its QMP socket")
            if time.monotonic() > deadline:
                raise SnapshotError("no QMP socket")
            time.sleep(0.005)
        while True:  # the socket file appears at bind(), before QEMU listens
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(timeout)
            try:
                self.sock.connect(str(path))
                break
            except (ConnectionRefusedError, FileNotFoundError) as e:
                self.sock.close()
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SnapshotError(f"cannot reach QEMU's QMP socket: {e}") from e
                time.sleep(0.005)
        self.file = self.sock.makefile("rw")
        self.file.readline()  # greeting
        self.execute("qmp_capabilities")

    def execute(self, cmd: str, **args: Any) -> Any:
        msg: dict[str, Any] = {"execute": cmd}
        if args:
            msg["arguments"] = args
        self.file.write(json.dumps(msg) + "\n")
        self.file.flush()
        while True:
            line = self.file.readline()
            if not line:
                raise SnapshotError(f"QMP closed during {cmd}")
            reply = json.loads(line)
            if "error" in reply:
                raise SnapshotError(f"QMP {cmd}: {reply['error']}")
            if "return" in reply:
                return reply["return"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _key(k: Kernel, initrd: bytes, qemu: list[str]) -> str:
    h = hashlib.sha256(initrd)
    h.update(" ".join(qemu).encode())
    h.update(k.qemu_name.encode())
    qemu_bin = Path(shutil.which(k.qemu[-1]) or k.qemu[-1])
    for f in (k.image, qemu_bin):
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def snapshot_dir(k: Kernel) -> Path:
    """Snapshots are per QEMU (a migration stream only restores on the QEMU that wrote it)."""
    if k.qemu_name == "system":
        return k.dir / "snapshot"
    tag = hashlib.sha256(k.qemu_name.encode()).hexdigest()[:8]
    return k.dir / f"snapshot-qemu-{tag}"


def ensure_snapshot(
    k: Kernel,
    initramfs: Callable[[], bytes],
    qemu: Callable[[Path], list[str]],
    ready: str,
    check: Callable[[str], None],
) -> Path:
    """The snapshot directory of ``k`` (``initrd``, ``state``), made if missing or stale.

    ``check`` is given the console up to READY and raises if the boot is not usable.
    """
    d = snapshot_dir(k)
    d.mkdir(exist_ok=True)
    data = initramfs()
    key = _key(k, data, qemu(d / "initrd"))
    with (d / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (d / "key").exists() and (d / "key").read_text() == key and (d / "state").exists():
            return d
        (d / "key").unlink(missing_ok=True)
        (d / "initrd").write_bytes(data)
        _save(d, qemu(d / "initrd"), ready, check)
        (d / "key").write_text(key)
    return d


def _save(d: Path, cmd: list[str], ready: str, check: Callable[[str], None]) -> None:
    with tempfile.TemporaryDirectory(prefix="pkvm-snap-") as tmp:
        sock = Path(tmp) / "qmp"
        proc = subprocess.Popen(
            [*cmd, "-qmp", f"unix:{sock},server=on,wait=off"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            assert proc.stdout is not None
            out = b""
            deadline = time.monotonic() + READY_TIMEOUT
            fd = proc.stdout.fileno()
            while ready.encode() not in out:
                left = deadline - time.monotonic()
                chunk = os.read(fd, 65536) if select.select([fd], [], [], max(left, 0))[0] else b""
                if not chunk:
                    raise SnapshotError(f"no {ready} from the snapshot boot:\n{out[-3000:]!r}")
                out += chunk
            check(out.decode(errors="replace").replace("\r", ""))
            qmp = _Qmp(sock, proc, 30.0)
            qmp.execute("stop")
            part = d / "state.part"
            qmp.execute("migrate", uri=f"exec:cat > {shlex.quote(str(part))}")
            while True:
                status = qmp.execute("query-migrate").get("status")
                if status == "completed":
                    break
                if status in ("failed", "cancelled"):
                    raise SnapshotError(f"saving the snapshot {status}")
                time.sleep(0.02)
            os.replace(part, d / "state")
            qmp.close()
        finally:
            proc.kill()
            proc.wait()


class SnapshotTimeout(SnapshotError):
    """The restored machine stopped answering: ``console`` is what it printed until then."""

    def __init__(self, message: str, console: str):
        super().__init__(message)
        self.console = console


def restore_run(d: Path, cmd: list[str], commands: str, timeout: float) -> str:
    """Restore the snapshot, feed ``commands`` to its console, return what it printed."""
    with tempfile.TemporaryDirectory(prefix="pkvm-restore-") as tmp:
        sock = Path(tmp) / "qmp"
        state = shlex.quote(str(d / "state"))
        proc = subprocess.Popen(
            [*cmd, "-incoming", f"exec:cat {state}", "-qmp", f"unix:{sock},server=on,wait=off"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            qmp = _Qmp(sock, proc, 60.0)
            deadline = time.monotonic() + 60.0
            while (status := qmp.execute("query-status")["status"]) == "inmigrate":
                if time.monotonic() > deadline:
                    raise SnapshotError("restoring the snapshot took too long")
                time.sleep(0.005)
            if status != "running":
                qmp.execute("cont")
            qmp.close()
            out, _ = proc.communicate(commands.encode(), timeout=timeout)
        except subprocess.TimeoutExpired as e:
            proc.kill()
            out, _ = proc.communicate()
            raise SnapshotTimeout(f"restored machine timed out after {timeout} s",
                                  out.decode(errors="replace").replace("\r", "")) from e
        except OSError as e:
            raise SnapshotError(f"restoring the snapshot failed: {e}") from e
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    return out.decode(errors="replace").replace("\r", "")
