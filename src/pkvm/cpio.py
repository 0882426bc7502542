"""The "newc" cpio archive Linux unpacks as its initramfs (``init/initramfs.c``).

Each entry is a 110-byte ASCII header (the magic ``070701`` and thirteen 8-digit hex fields),
the NUL-terminated name padded to 4 bytes, then the data padded to 4 bytes; a ``TRAILER!!!``
entry ends the archive. Owners, times and device numbers of the archive itself are 0; inode
numbers count from 1 in entry order.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["NEWC_MAGIC", "TRAILER", "CpioEntry", "newc"]

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"
ALIGN = 4

S_IFDIR, S_IFCHR, S_IFREG, S_IFLNK = 0o040000, 0o020000, 0o100000, 0o120000


@dataclass(frozen=True)
class CpioEntry:
    """One file: ``mode`` holds the type bits (``S_IF*``) and the permissions; a symlink's
    data is its target; ``rdev`` (major, minor) is a device node's number."""

    name: str
    mode: int
    data: bytes = b""
    nlink: int = 1
    rdev: tuple[int, int] = (0, 0)


def _pad(n: int) -> bytes:
    return b"\0" * (-n % ALIGN)


def _entry(e: CpioEntry, ino: int) -> bytes:
    name = e.name.encode() + b"\0"
    fields = (ino, e.mode, 0, 0, e.nlink, 0, len(e.data), 0, 0, *e.rdev, len(name), 0)
    head = NEWC_MAGIC + "".join(f"{v:08x}" for v in fields).encode() + name
    return head + _pad(len(head)) + e.data + _pad(len(e.data))


def newc(entries: Iterable[CpioEntry]) -> bytes:
    """The archive of ``entries`` (in order), with its trailer. An entry named like the trailer
    is refused (ValueError): the kernel's unpacker (``init/initramfs.c``, ``do_name``) would end
    the archive there and drop what follows."""
    out = []
    for ino, e in enumerate(entries, start=1):
        if e.name == TRAILER:
            raise ValueError(f"entry {ino} is named {TRAILER}, which ends a newc archive")
        out.append(_entry(e, ino))
    return b"".join(out) + _entry(CpioEntry(TRAILER, 0), 0)
