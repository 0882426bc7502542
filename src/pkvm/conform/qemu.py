"""The QEMU the real side of ``pkvm conform`` runs on: Debian trixie's, unpacked privately.

Debian bookworm's QEMU 7.2 mis-emulates ``TLBI VALE2IS`` under pKVM's hVHE mode (E2H=1): a hyp
that unmaps a page keeps reading it through a stale EL2 TLB entry, and some pages come back
unwiped after a VM's teardown. Trixie's QEMU 10 does not. It is fetched with ``apt-get
download`` through the private trixie apt of :mod:`pkvm.debian` (its whole dependency
closure, amd64, computed against an empty package status), unpacked with ``dpkg-deb -x`` into
``$PKVM_CACHE/conform/qemu-trixie/root`` (nothing is installed on the machine) and run through
the unpacked glibc's loader, ``ld-linux-x86-64.so.2 --library-path ...``, because it needs a
newer glibc than bookworm's. QEMU finds its modules in a ``qemu-bundle`` directory beside its
executable, which under the loader is the loader's directory: a symlink there to the unpacked
root does it.

``PKVM_CONFORM_QEMU`` picks another QEMU: ``system`` (the machine's ``qemu-system-aarch64``,
installed with apt when missing) or the path of a ``qemu-system-aarch64`` binary.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pkvm.conform.cache import SetupError, cache_root, private_apt
from pkvm.debian import extract, run

__all__ = ["Qemu", "ensure_qemu", "load_qemu", "qemu_choice"]

SUITE = "trixie"
PACKAGE = "qemu-system-arm"
LIBDIR = "usr/lib/x86_64-linux-gnu"


@dataclass(frozen=True)
class Qemu:
    """How to start one QEMU: ``argv`` replaces the ``qemu-system-aarch64`` of a command."""

    name: str  # "trixie 1:10.0.13+ds-0+deb13u1", "system", or a path
    argv: tuple[str, ...]
    binary: Path  # the qemu-system-aarch64 executable itself (snapshot keys stat it)


def qemu_choice() -> str:
    """``trixie`` (the default), ``system`` or a binary's path, from ``PKVM_CONFORM_QEMU``."""
    return os.environ.get("PKVM_CONFORM_QEMU", "").strip() or SUITE


def qemu_dir() -> Path:
    return cache_root() / f"qemu-{SUITE}"


def _unpacked(d: Path) -> Qemu | None:
    done = d / "root" / ".done"
    if not done.exists():
        return None
    root = d / "root"
    lib = root / LIBDIR
    binary = root / "usr/bin/qemu-system-aarch64"
    argv = (str(lib / "ld-linux-x86-64.so.2"), "--library-path",
            f"{lib}:{root / 'lib/x86_64-linux-gnu'}", str(binary))  # fmt: skip
    return Qemu(f"{SUITE} {done.read_text().strip()}", argv, binary)


def load_qemu() -> Qemu:
    """The chosen QEMU, already set up (no download): :func:`ensure_qemu` makes it so."""
    choice = qemu_choice()
    if choice == "system":
        found = shutil.which("qemu-system-aarch64")
        if found is None:
            raise SetupError("PKVM_CONFORM_QEMU=system but no qemu-system-aarch64 on PATH")
        return Qemu("system", ("qemu-system-aarch64",), Path(found))
    if choice != SUITE:
        p = Path(choice)
        if not p.is_file():
            raise SetupError(f"PKVM_CONFORM_QEMU={choice}: no such QEMU binary")
        return Qemu(str(p), (str(p),), p)
    q = _unpacked(qemu_dir())
    if q is None:
        raise SetupError(f"QEMU of Debian {SUITE} is not set up: python -m pkvm.conform.setup")
    return q


def ensure_qemu() -> Qemu:
    """Fetch and unpack trixie's QEMU once (idempotent; the caller holds the cache lock)."""
    if qemu_choice() != SUITE or _unpacked(qemu_dir()) is not None:
        return load_qemu()
    d = qemu_dir()
    apt = private_apt(SUITE, native="amd64")
    apt.ensure_lists()
    debs, root = d / "debs", d / "root"
    shutil.rmtree(debs, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    apt.download(debs, apt.closure([PACKAGE]))
    version = ""
    for deb in sorted(debs.glob("*.deb")):
        extract(deb, root)
        if deb.name.startswith(f"{PACKAGE}_"):
            version = run(["dpkg-deb", "-f", str(deb), "Version"]).strip()
    lib = root / LIBDIR
    if not (lib / "ld-linux-x86-64.so.2").exists() or not version:
        raise SetupError(f"{PACKAGE} or glibc missing from the packages fetched into {debs}")
    (lib / "qemu-bundle").symlink_to(root)
    # The loader runs QEMU: check it starts before calling the set-up done.
    (root / ".done").write_text("probe\n")
    probe = _unpacked(d)
    assert probe is not None
    run([*probe.argv, "--version"])
    shutil.rmtree(debs)
    (root / ".done").write_text(version + "\n")
    return load_qemu()
