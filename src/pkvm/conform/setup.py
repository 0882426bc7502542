"""One-command set-up of the real-kernel side of ``pkvm conform``.

Everything lives in a cache outside the repository (``$PKVM_CACHE/conform``, default
``~/.cache/pkvm/conform``) and every stage is skipped when its output is already there, so
``ensure_setup`` is cheap to call before each use:

1. Debian packages the harness runs on this machine (the aarch64 cross compiler; QEMU only
   with ``PKVM_CONFORM_QEMU=system``) are installed with the machine's apt when absent (root
   only). The default QEMU is Debian trixie's, fetched and unpacked privately
   (:mod:`pkvm.conform.qemu`).
2. Through a private apt configuration of :mod:`pkvm.debian` per Debian suite (arm64 and
   amd64 lists; the mirror the machine's apt already uses): the kernel image, its headers and
   kbuild packages, busybox-static (arm64) and a newer amd64 glibc to run Debian's prebuilt
   kbuild host tools (they need glibc >= 2.38).
3. Our module (``module/``) is built against the unpacked headers with the cross compiler; the
   kernel's own ``enum __kvm_host_smccc_func`` (from its ``kvm_asm.h``) supplies the hypercall
   names, the compiler their numbers.
4. The userspace helper (``helper/``) is built static for aarch64.

Kernels: ``"6.12"`` is the newest 6.12.x arm64 kernel of Debian trixie, ``"7.2"`` (alias
``"latest"``) the 7.2.x of sid (:data:`pkvm.debian.KERNEL_PACKAGES`).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from pkvm.abi.profiles import ABI_ALIASES
from pkvm.conform.cache import SetupError, cache_root, private_apt
from pkvm.conform.qemu import SUITE, ensure_qemu, load_qemu, qemu_choice
from pkvm.debian import (
    KERNEL_PACKAGES,
    DebianError,
    KernelPackage,
    extract,
    fetch_busybox,
    newest_release,
    one,
    run,
)

_HERE = Path(__file__).resolve().parent

__all__ = ["REAL_KERNELS", "Kernel", "SetupError", "cache_root", "ensure_setup", "kernel_dir"]


# A profile name that is not itself a kernel's ("latest") -> that kernel ("7.2"): the one alias
# table of `pkvm.abi.profiles`, read backwards.
ALIASES = {abi: kernel for kernel, abi in ABI_ALIASES.items() if abi != kernel}
REAL_KERNELS = tuple(KERNEL_PACKAGES)  # the real kernels the harness boots ("6.12", "7.2")
BUSYBOX_SUITE = "trixie"

# Debian packages this machine needs, by the command that shows each is present.
# QEMU is Debian trixie's, unpacked privately (pkvm.conform.qemu), unless PKVM_CONFORM_QEMU=system.
HOST_TOOLS = {
    "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu",
    "make": "make",
    "dpkg-deb": "dpkg",
}
HOST_FILES = {"/usr/aarch64-linux-gnu/lib/libc.a": "libc6-dev-arm64-cross"}

CROSS = "aarch64-linux-gnu-"
# Flags Debian's kernels were built with that the cross gcc here may lack.
MAKE_COMPAT = [
    "CONFIG_CC_HAS_MIN_FUNCTION_ALIGNMENT=",
    "KCFLAGS=-Wno-attributes",
    "CONFIG_DEBUG_INFO_BTF_MODULES=",  # no pahole here; BTF is not needed to load
]


@dataclass(frozen=True)
class Kernel:
    """A set-up kernel: everything a boot needs."""

    profile: str
    release: str  # e.g. "6.12.117+deb13-arm64"
    dir: Path
    image: Path
    module: Path
    helper: Path | None
    busybox: Path
    ids: dict[str, int]  # host hypercall name -> index in this kernel's enum
    qemu: tuple[str, ...] = ("qemu-system-aarch64",)  # how to start QEMU (pkvm.conform.qemu)
    qemu_name: str = "system"

    @classmethod
    def load(cls, d: Path) -> Kernel:
        meta = json.loads((d / "kernel.json").read_text())
        helper = d / "helper"
        q = load_qemu()
        return cls(
            profile=meta["profile"],
            release=meta["release"],
            dir=d,
            image=d / "Image",
            module=d / "pkvm_conform.ko",
            helper=helper if helper.exists() else None,
            busybox=cache_root() / "busybox",
            ids={k: int(v) for k, v in meta["ids"].items()},
            qemu=q.argv,
            qemu_name=q.name,
        )


def kernel_name(kernel: str) -> str:
    """``"6.12"`` or ``"7.2"`` for a kernel name or alias; ValueError for anything else."""
    name = ALIASES.get(kernel, kernel)
    if name not in KERNEL_PACKAGES:
        raise ValueError(f"unknown kernel {kernel!r}: use one of {', '.join(REAL_KERNELS)} or 'latest'")
    return name


def kernel_dir(kernel: str) -> Path:
    return cache_root() / kernel_name(kernel)



# --- progress -----------------------------------------------------------------------------------


class _Steps:
    """Shows each set-up stage with rich (a spinner while it runs, its time when done)."""

    def __init__(self, show: bool) -> None:
        self.console = Console(stderr=True) if show else None

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        if self.console is None:
            yield
            return
        t0 = time.monotonic()
        with self.console.status(f"[bold]pkvm conform set-up:[/] {what}"):
            yield
        self.console.print(f"  [green]✓[/] {what} [dim]({time.monotonic() - t0:.1f} s)[/]")


# --- host packages ------------------------------------------------------------------------------


def missing_host_packages() -> list[str]:
    tools = dict(HOST_TOOLS)
    if qemu_choice() == "system":
        tools["qemu-system-aarch64"] = "qemu-system-arm"
    missing = [pkg for cmd, pkg in tools.items() if shutil.which(cmd) is None]
    missing += [pkg for f, pkg in HOST_FILES.items() if not Path(f).exists()]
    return sorted(set(missing))


def install_host_packages(steps: _Steps) -> None:
    missing = missing_host_packages()
    if not missing:
        return
    if os.geteuid() != 0:
        raise SetupError(
            f"missing Debian packages {' '.join(missing)}: run as root, or "
            f"`apt-get install -y {' '.join(missing)}` first"
        )
    if shutil.which("apt-get") is None:
        raise SetupError(f"missing packages {' '.join(missing)} and no apt-get to install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    with steps.step(f"installing {' '.join(missing)} (apt-get)"):
        run(["apt-get", "update"], env=env)
        run(["apt-get", "install", "-y", "--no-install-recommends", *missing], env=env)


# --- kbuild on this machine ---------------------------------------------------------------------


def wrap_host_tools(root: Path, kbuild: Path) -> None:
    """Run Debian's amd64 kbuild tools with the newer glibc unpacked under ``root``."""
    libdir = root / "usr/lib/x86_64-linux-gnu"
    loader = libdir / "ld-linux-x86-64.so.2"
    if not loader.exists():
        raise SetupError(f"no glibc loader at {loader}")
    for f in sorted(kbuild.rglob("*")):
        if not f.is_file() or f.is_symlink() or f.suffix == ".host":
            continue
        with f.open("rb") as fh:
            if fh.read(4) != b"\x7fELF":
                continue
        real = f.with_name(f.name + ".host")
        f.rename(real)
    for real in sorted(kbuild.rglob("*.host")):
        wrapper = real.with_name(real.name[: -len(".host")])
        target = real
        if wrapper.name == "modpost":  # Debian's dispatcher: arm64 is little-endian, 64-bit
            target = real.with_name("modpost.real-lsb-64.host")
        wrapper.write_text(
            f'#!/bin/sh\nexec "{loader}" --library-path "{libdir}" "{target}" "$@"\n'
        )
        wrapper.chmod(0o755)


def host_hcall_names(kvm_asm_h: Path) -> list[str]:
    """Entries of ``enum __kvm_host_smccc_func``, in order; ``MARKER()`` lines skipped."""
    text = kvm_asm_h.read_text()
    m = re.search(r"enum\s+__kvm_host_smccc_func\s*\{(.*?)\};", text, re.DOTALL)
    if not m:
        raise SetupError(f"no enum __kvm_host_smccc_func in {kvm_asm_h}")
    body = re.sub(r"/\*.*?\*/", "", m.group(1), flags=re.DOTALL)
    names = []
    for line in body.splitlines():
        e = re.match(r"\s*__KVM_HOST_SMCCC_FUNC_(\w+)\s*(=[^,]*)?,?\s*$", line)
        if e:
            names.append(e.group(1))
    return names


def host_hcall_ids(names: list[str], kvm_asm_h: Path) -> dict[str, int]:
    """Number the enum as the compiler does: the first entry's ``= ... + 1``, markers take none.

    The module gets its numbers from the compiler; this copy serves the Python side and is
    checked against the module's own table at every boot.
    """
    ids = {"__kvm_hyp_init": 0}
    for n, name in enumerate(names, start=1):
        ids[name] = n
    if not names or not re.search(
        rf"__KVM_HOST_SMCCC_FUNC_{names[0]}\s*=\s*__KVM_HOST_SMCCC_FUNC___kvm_hyp_init\s*\+\s*1",
        kvm_asm_h.read_text(),
    ):
        raise SetupError(f"unexpected start of enum __kvm_host_smccc_func in {kvm_asm_h}")
    return ids


def _sources_digest() -> str:
    h = hashlib.sha256()
    for sub in ("module", "helper"):
        d = _HERE / sub
        for f in sorted(d.iterdir(), key=lambda p: p.name):
            if f.is_file():
                h.update(f.name.encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


def build_module(root: Path, release: str, out: Path, names: list[str]) -> None:
    headers = root / "usr/src" / f"linux-headers-{release}"
    build = out / "module-build"
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    src = _HERE / "module"
    for f in src.iterdir():
        if f.is_file():
            (build / f.name).write_bytes(f.read_bytes())
    entries = "".join(f" \\\n\tX({n})" for n in names)
    (build / "hcall_ids.h").write_text(
        "/* SPDX-License-Identifier: GPL-2.0 */\n"
        "/* Generated by pkvm.conform.setup from this kernel's enum __kvm_host_smccc_func. */\n"
        f"#define PKVMC_HCALLS(X){entries}\n"
    )
    cmd = [
        "make", "-C", str(headers), f"M={build}", "ARCH=arm64", f"CROSS_COMPILE={CROSS}",
        f"CC={CROSS}gcc", f"LD={CROSS}ld", "HOSTCC=gcc", *MAKE_COMPAT, "modules",
    ]  # fmt: skip
    run(cmd)
    shutil.copy(build / "pkvm_conform.ko", out / "pkvm_conform.ko")


def build_helper(out: Path) -> None:
    src = _HERE / "helper" / "pkvm_vmm.c"
    if not src.is_file():
        return
    for f in src.parent.glob("*.c"):  # pkvm_vmm.c includes guest.c
        (out / f.name).write_bytes(f.read_bytes())
    run([f"{CROSS}gcc", "-static", "-O2", "-Wall", "-pthread", "-o", str(out / "helper"),
          str(out / src.name)])


def _fix_headers_makefiles(root: Path) -> None:
    """Debian's headers Makefiles name /usr/src absolutely: point them into our tree."""
    for mk in (root / "usr/src").glob("linux-headers-*-arm64/Makefile"):
        text = mk.read_text()
        fixed = re.sub(r"(?<![\w/])/usr/src/", f"{root}/usr/src/", text)
        if fixed != text:
            mk.write_text(fixed)


# --- the whole set-up ---------------------------------------------------------------------------


def ensure_busybox(steps: _Steps) -> Path:
    bb = cache_root() / "busybox"
    if bb.exists():
        return bb
    apt = private_apt(BUSYBOX_SUITE)
    with steps.step("busybox-static (arm64)"):
        apt.ensure_lists()
        tmp = bb.with_suffix(".tmp")
        tmp.write_bytes(fetch_busybox(apt, cache_root() / "busybox-work"))
        tmp.rename(bb)
    return bb


def _is_set_up(out: Path, digest: str) -> bool:
    done = out / "kernel.json"
    if not done.exists() or not (cache_root() / "busybox").exists():
        return False
    try:
        load_qemu()
    except SetupError:
        return False
    return bool(json.loads(done.read_text()).get("sources") == digest)


@contextmanager
def _cache_lock() -> Iterator[None]:
    """One set-up at a time per cache (pytest-xdist workers, parallel CI steps)."""
    cache_root().mkdir(parents=True, exist_ok=True)
    with (cache_root() / ".lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_setup(kernel: str = "latest", progress: bool = True) -> Path:
    """Set up one kernel (idempotent) and return its directory in the cache."""
    name = kernel_name(kernel)
    out = cache_root() / name
    digest = _sources_digest()
    if _is_set_up(out, digest):
        return out
    try:
        with _cache_lock():
            if not _is_set_up(out, digest):
                _set_up(name, out, digest, _Steps(progress))
    except DebianError as e:
        raise SetupError(str(e)) from e
    except OSError as e:
        raise SetupError(f"cannot write the cache {cache_root()} (set PKVM_CACHE?): {e}") from e
    return out


def _set_up(name: str, out: Path, digest: str, steps: _Steps) -> None:
    done = out / "kernel.json"
    install_host_packages(steps)
    ensure_busybox(steps)
    with steps.step(f"QEMU ({qemu_choice()}; Debian {SUITE}'s is fetched and unpacked once)"):
        ensure_qemu()
    if done.exists() and json.loads(done.read_text()).get("sources") == digest:
        return  # only the QEMU was missing
    out.mkdir(parents=True, exist_ok=True)
    root = out / "root"
    rel_file = out / "release"
    if not rel_file.exists() or not (root / ".done").exists():
        rel_file.write_text(_fetch_kernel(KERNEL_PACKAGES[name], out, root, steps) + "\n")
    release = rel_file.read_text().strip()
    kvm_asm = one(root / "usr/src", "linux-headers-*-common") / "arch/arm64/include/asm/kvm_asm.h"
    names = host_hcall_names(kvm_asm)
    ids = host_hcall_ids(names, kvm_asm)
    with steps.step(f"building pkvm_conform.ko against {release}"):
        build_module(root, release, out, names)
    with steps.step("building the /dev/kvm helper (static aarch64)"):
        build_helper(out)
    meta = {"profile": name, "release": release, "ids": ids, "sources": digest}
    done.write_text(json.dumps(meta, indent=1) + "\n")


def _fetch_kernel(source: KernelPackage, out: Path, root: Path, steps: _Steps) -> str:
    """Download the newest release's image, headers and kbuild (and an amd64 glibc for the
    kbuild tools); unpack the image to ``out/Image``, the rest under ``root``."""
    apt = private_apt(source.suite)
    with steps.step(f"Debian {source.suite} package lists (private apt)"):
        apt.ensure_lists()
        release = newest_release(apt, source)
    debs = out / "debs"
    shutil.rmtree(debs, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    common = re.sub(r"-arm64$", "", release)
    pkgs = [
        source.package(release),
        f"linux-headers-{release}",
        f"linux-headers-{common}-common",
        f"linux-kbuild-{common}:amd64",
        "libc6:amd64",
    ]
    with steps.step(f"downloading Linux {release} image, headers, kbuild"):
        apt.download(debs, pkgs)
    with steps.step("unpacking"):
        image_deb = one(debs, f"{source.package(release)}_*_arm64.deb")
        extract(image_deb, root, "./" + source.path(release))
        shutil.move(root / source.path(release), out / "Image")
        for deb in sorted(debs.glob("*.deb")):
            if deb != image_deb:
                extract(deb, root)
        _fix_headers_makefiles(root)
        wrap_host_tools(root, one(root / "usr/lib", f"linux-kbuild-{common}"))
        shutil.rmtree(debs)
        (root / ".done").touch()
    return release


def load_kernel(kernel: str, progress: bool = True) -> Kernel:
    return Kernel.load(ensure_setup(kernel, progress))


def main(argv: list[str] | None = None) -> int:
    """``python -m pkvm.conform.setup [6.12|7.2|latest|all]``: set up, print each directory."""
    # pkvm.conform.real imports this module: imported here, not on top.
    from pkvm.conform.real import prepare_snapshot

    ap = argparse.ArgumentParser(
        prog="python -m pkvm.conform.setup",
        description="Fetch and build the real-kernel harness of `pkvm conform` (idempotent).",
    )
    ap.add_argument("kernels", nargs="*", default=["all"], help="6.12, 7.2, latest or all")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    ap.add_argument(
        "--no-snapshot", action="store_true", help="do not boot once to save the QEMU snapshot"
    )
    args = ap.parse_args(argv)
    wanted = list(REAL_KERNELS) if "all" in args.kernels else args.kernels
    try:
        for k in wanted:
            t0 = time.monotonic()
            d = ensure_setup(k, progress=not args.quiet)
            print(f"{kernel_name(k)}: {d} ({time.monotonic() - t0:.1f} s)")
            if not args.no_snapshot:
                t0 = time.monotonic()
                snap = prepare_snapshot(k)
                print(f"{kernel_name(k)}: snapshot {snap} ({time.monotonic() - t0:.1f} s)")
    except (SetupError, ValueError, RuntimeError) as e:
        print(f"pkvm conform set-up failed: {e}")
        return 1
    return 0


if __name__ == "__main__":
    # Run the imported module's main: under -m this file is also __main__, and its classes
    # (Kernel) must be the ones pkvm.conform.real imports.
    from pkvm.conform.setup import main as _main

    raise SystemExit(_main())
