"""Errno values (Linux, arm64) and the exceptions pkvm raises.

The hyp returns errnos negated in x1, exactly as Linux does; the Python exceptions below are
how the *model* reports events that are not hypercall results: the hyp dying (`HypPanic`), the
host being stopped at its stage-2 (`HostDataAbort`), or the host driver giving up (`HostError`).
"""

from __future__ import annotations

import enum


class Errno(enum.IntEnum):
    """The errnos pKVM uses, with Linux's arm64 values."""

    EPERM = 1
    ENOENT = 2
    E2BIG = 7
    EAGAIN = 11
    ENOMEM = 12
    EFAULT = 14
    EBUSY = 16
    EEXIST = 17
    ENODEV = 19
    EINVAL = 22
    ERANGE = 34
    EHWPOISON = 133


EPERM = Errno.EPERM
ENOENT = Errno.ENOENT
E2BIG = Errno.E2BIG
EAGAIN = Errno.EAGAIN
ENOMEM = Errno.ENOMEM
EFAULT = Errno.EFAULT
EBUSY = Errno.EBUSY
EEXIST = Errno.EEXIST
ENODEV = Errno.ENODEV
EINVAL = Errno.EINVAL
ERANGE = Errno.ERANGE
EHWPOISON = Errno.EHWPOISON


def errno_name(value: int) -> str:
    """`-22` or `22` -> `"EINVAL"`; other values are returned as decimal text."""
    try:
        return Errno(abs(value)).name
    except ValueError:
        return str(value)


# How the reason of a panic caused by a fired `WARN_ON` begins (`pkvm.hyp.panic.HypWarn`).
WARN_PREFIX = "WARN_ON in "


class HypPanic(Exception):
    """The hypervisor died: a `BUG_ON`, a fired `WARN_ON` (fatal at EL2, as in Linux), or an EL2
    access to memory its stage-1 does not map.

    After a panic the machine is dead: every later `hvc` and host access raises it again.
    """

    def __init__(self, reason: str, cpu: int | None = None, call: str | None = None):
        super().__init__(f"hyp panic on cpu {cpu} in {call or 'EL2'}: {reason}")
        self.reason = reason
        self.cpu = cpu
        self.call = call

    @property
    def warn(self) -> bool:
        """Was it a fired `WARN_ON` (reason `WARN_ON in <function> (<file>:<line>)`)?"""
        return self.reason.startswith(WARN_PREFIX)


class HostDataAbort(Exception):
    """The host touched memory its stage-2 does not let it touch.

    `addr` is the first physical address refused, `write` whether it was a write. In the 6.12
    profile the real hyp panics (`fatal=True`, the machine is dead afterwards); in 7.2 an abort is
    injected into the host and the machine goes on.
    """

    def __init__(self, addr: int, write: bool, fatal: bool = False):
        kind = "write" if write else "read"
        tail = " (fatal: the 6.12 hyp panics)" if fatal else ""
        super().__init__(f"host {kind} of PA {addr:#x} refused by the host stage-2{tail}")
        self.addr = addr
        self.write = write
        self.fatal = fatal


class HostError(OSError):
    """A host-driver step (create_vm, map, destroy, run) was refused by the hyp or the host."""

    def __init__(self, errno: int, call: str, result: int | None = None, detail: str = ""):
        msg = f"{call} failed: {errno_name(errno)}"
        if detail:
            msg += f" ({detail})"
        super().__init__(abs(errno), msg)
        self.call = call
        self.result = result

    @classmethod
    def not_offered(cls, call: str, x0: int) -> HostError:
        """`call` came back with a nonzero x0: the hyp does not offer that hypercall."""
        return cls(EINVAL, call, x0, "the hyp does not offer this call")
