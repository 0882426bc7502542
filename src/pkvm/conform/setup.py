"""One-command set-up of the real-kernel side of ``pkvm conform``.

Everything lives in a cache outside the repository (``$PKVM_CACHE/conform``, default
``~/.cache/pkvm/conform``) and every stage is skipped when its output is already there, so
``ensure_setup`` is cheap to call before each use:

1. Debian packages the harness runs on this machine (the aarch64 cross compiler; QEMU only
   with ``PKVM_CONFORM_QEMU=system``) are installed with the machine's apt when absent (root
   only). The default QEMU is Debian trixie's, fetched and unpacked privately
   (:mod:`pkvm.conform.qemu`).
2. A *private* apt configuration per Debian suite (own sources.list, lists and cache, arm64 and
   amd64) pointing at the mirror the machine's apt already uses fetches, with ``apt-get
   download``: the kernel image, its headers and kbuild packages, busybox-static (arm64) and a
   newer amd64 glibc to run Debian's prebuilt kbuild host tools (they need glibc >= 2.38).
3. Our module (``module/``) is built against the unpacked headers with the cross compiler; the
   kernel's own ``enum __kvm_host_smccc_func`` (from its ``kvm_asm.h``) supplies the hypercall
   names, the compiler their numbers.
4. The userspace helper (``helper/``) is built static for aarch64.

Profiles: ``"6.12"`` is the newest 6.12.x arm64 kernel of Debian trixie, ``"7.2"`` (alias
``"latest"``) the 7.2.x of sid.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

_HERE = Path(__file__).resolve().parent

__all__ = ["KERNELS", "Kernel", "SetupError", "cache_root", "ensure_setup", "kernel_dir"]


class SetupError(RuntimeError):
    """The real-kernel harness cannot be set up here (the message says why and what to do)."""


@dataclass(frozen=True)
class Profile:
    """Where one ABI profile's kernel comes from."""

    name: str
    suite: str
    series: str  # "6.12": pick the newest 6.12.x release
    image_package: str  # format string over the release, e.g. "linux-image-{}-unsigned"
    image_path: str  # path of the image inside that package, over the release


PROFILES: dict[str, Profile] = {
    "6.12": Profile("6.12", "trixie", "6.12", "linux-image-{}-unsigned", "boot/vmlinuz-{}"),
    "7.2": Profile(
        "7.2", "sid", "7.2", "linux-binary-unsigned-{}", "usr/lib/modules/{}/vmlinuz.unsigned"
    ),
}
ALIASES = {"latest": "7.2"}
KERNELS = tuple(PROFILES)

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
        from pkvm.conform.qemu import load_qemu

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


def cache_root() -> Path:
    base = os.environ.get("PKVM_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "pkvm"
    return root / "conform"


def profile_of(kernel: str) -> Profile:
    name = ALIASES.get(kernel, kernel)
    if name not in PROFILES:
        raise ValueError(f"unknown kernel {kernel!r}: use one of {', '.join(KERNELS)} or 'latest'")
    return PROFILES[name]


def kernel_dir(kernel: str) -> Path:
    return cache_root() / profile_of(kernel).name


# --- progress -----------------------------------------------------------------------------------


class _Steps:
    """Shows each set-up stage with rich (a spinner while it runs, its time when done)."""

    def __init__(self, show: bool) -> None:
        self.console = None
        if show:
            from rich.console import Console

            self.console = Console(stderr=True)

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        if self.console is None:
            yield
            return
        t0 = time.monotonic()
        with self.console.status(f"[bold]pkvm conform set-up:[/] {what}"):
            yield
        self.console.print(f"  [green]✓[/] {what} [dim]({time.monotonic() - t0:.1f} s)[/]")


def _run(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    try:
        p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise SetupError(f"{cmd[0]} is not installed: {e}") from e
    if p.returncode != 0:
        tail = "\n".join((p.stdout + p.stderr).splitlines()[-30:])
        raise SetupError(f"command failed ({p.returncode}): {' '.join(cmd)}\n{tail}")
    return p.stdout


# --- host packages ------------------------------------------------------------------------------


def missing_host_packages() -> list[str]:
    from pkvm.conform.qemu import qemu_choice

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
        _run(["apt-get", "update"], env=env)
        _run(["apt-get", "install", "-y", "--no-install-recommends", *missing], env=env)


# --- private apt --------------------------------------------------------------------------------


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (never hard-coded here)."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for line in sources.read_text().splitlines():
            m = re.match(r"^URIs:\s*(\S+/debian)/?\s*$", line)
            if m:
                return m.group(1)
    lst = Path("/etc/apt/sources.list")
    if lst.exists():
        for line in lst.read_text().splitlines():
            f = line.split()
            if len(f) >= 3 and f[0] == "deb":
                uri = next((x for x in f[1:] if not x.startswith("[") and "=" not in x), "")
                if uri.rstrip("/").endswith("/debian"):
                    return uri.rstrip("/")
    raise SetupError("no Debian mirror found in /etc/apt/sources.list{,.d/debian.sources}")


class PrivateApt:
    """apt-get / apt-cache with their own sources, lists and cache: the machine's apt untouched."""

    def __init__(self, suite: str, native: str = "arm64") -> None:
        self.suite = suite
        self.native = native  # the architecture a bare package name means
        self.dir = cache_root() / f"apt-{suite}"

    @property
    def options(self) -> list[str]:
        d = self.dir
        opts = {
            "APT::Sandbox::User": "root",
            "Dir::Etc::sourcelist": str(d / "sources.list"),
            "Dir::Etc::sourceparts": "-",
            "Dir::Etc::preferencesparts": "-",
            "Dir::State::Lists": str(d / "lists"),
            "Dir::State::status": str(d / "status"),
            "Dir::Cache": str(d / "cache"),
            "APT::Architecture": self.native,
        }
        out: list[str] = []
        for k, v in opts.items():
            out += ["-o", f"{k}={v}"]
        return out + ["-o", "APT::Architectures::=arm64", "-o", "APT::Architectures::=amd64"]

    def update(self) -> None:
        d = self.dir
        (d / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (d / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        (d / "status").touch()
        keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
        (d / "sources.list").write_text(
            f"deb [arch=arm64,amd64 signed-by={keyring}] {debian_mirror()} {self.suite} main\n"
        )
        _run(["apt-get", *self.options, "update"])

    def ensure_lists(self, max_age: float = 86400.0) -> None:
        stamp = self.dir / "updated"
        if stamp.exists() and time.time() - stamp.stat().st_mtime < max_age:
            return
        self.update()
        stamp.touch()

    def search(self, regex: str) -> list[str]:
        out = _run(["apt-cache", *self.options, "search", "--names-only", regex])
        return [line.split(" - ")[0].strip() for line in out.splitlines() if line.strip()]

    def download(self, dest: Path, packages: list[str]) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        _run(["apt-get", *self.options, "download", *packages], cwd=dest)


def _version_key(release: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", release))


def newest_release(apt: PrivateApt, profile: Profile) -> str:
    """The newest ``<series>.N+debM-arm64`` release whose image package the suite has."""
    series = re.escape(profile.series)
    pkg_re = profile.image_package.format(f"({series}\\.[0-9]+\\+deb[0-9]+-arm64)")
    releases = []
    for name in apt.search(f"^{pkg_re}$"):
        m = re.fullmatch(pkg_re, name)
        if m:
            releases.append(m.group(1))
    if not releases:
        raise SetupError(f"Debian {profile.suite} has no {profile.series}.x arm64 kernel image")
    return max(releases, key=_version_key)


def _extract(deb: Path, dest: Path, *members: str) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    if not members:
        _run(["dpkg-deb", "-x", str(deb), str(dest)])
        return
    tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    try:
        subprocess.run(
            ["tar", "-x", "-C", str(dest), "--wildcards", *members], stdin=tar.stdout, check=True
        )
    except subprocess.CalledProcessError as e:
        raise SetupError(f"extracting {members} from {deb.name} failed") from e
    finally:
        if tar.stdout:
            tar.stdout.close()
        tar.wait()


def _one(d: Path, pattern: str) -> Path:
    found = sorted(d.glob(pattern))
    if not found:
        raise SetupError(f"{pattern} was not downloaded into {d}")
    return found[-1]


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
    _run(cmd)
    shutil.copy(build / "pkvm_conform.ko", out / "pkvm_conform.ko")


def build_helper(out: Path) -> None:
    src = _HERE / "helper" / "pkvm_vmm.c"
    if not src.is_file():
        return
    for f in src.parent.glob("*.c"):  # pkvm_vmm.c includes guest.c
        (out / f.name).write_bytes(f.read_bytes())
    _run([f"{CROSS}gcc", "-static", "-O2", "-Wall", "-pthread", "-o", str(out / "helper"),
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
    apt = PrivateApt("trixie")
    with steps.step("busybox-static (arm64)"):
        apt.ensure_lists()
        debs = cache_root() / "debs-busybox"
        tmp = cache_root() / "busybox-root"
        shutil.rmtree(debs, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
        apt.download(debs, ["busybox-static:arm64"])
        _extract(_one(debs, "busybox-static_*_arm64.deb"), tmp)
        found = [p for p in (tmp / "usr/bin/busybox", tmp / "bin/busybox") if p.exists()]
        if not found:
            raise SetupError("busybox-static has no busybox binary where expected")
        shutil.copy(found[0], bb.with_suffix(".tmp"))
        bb.with_suffix(".tmp").rename(bb)
        shutil.rmtree(tmp)
        shutil.rmtree(debs)
    return bb


def _is_set_up(out: Path, digest: str) -> bool:
    from pkvm.conform.qemu import load_qemu

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
    profile = profile_of(kernel)
    out = cache_root() / profile.name
    digest = _sources_digest()
    if _is_set_up(out, digest):
        return out
    try:
        with _cache_lock():
            if not _is_set_up(out, digest):
                _set_up(profile, out, digest, _Steps(progress))
    except OSError as e:
        raise SetupError(f"cannot write the cache {cache_root()} (set PKVM_CACHE?): {e}") from e
    return out


def _set_up(profile: Profile, out: Path, digest: str, steps: _Steps) -> None:
    from pkvm.conform.qemu import SUITE, ensure_qemu, qemu_choice

    done = out / "kernel.json"
    install_host_packages(steps)
    ensure_busybox(steps)
    with steps.step(f"QEMU ({qemu_choice()}; Debian {SUITE}'s is fetched and unpacked once)"):
        ensure_qemu()
    if done.exists() and json.loads(done.read_text()).get("sources") == digest:
        return  # only the QEMU was missing
    apt = PrivateApt(profile.suite)
    out.mkdir(parents=True, exist_ok=True)
    root = out / "root"
    rel_file = out / "release"
    if not rel_file.exists() or not (root / ".done").exists():
        with steps.step(f"Debian {profile.suite} package lists (private apt)"):
            apt.ensure_lists()
            release = newest_release(apt, profile)
        debs = out / "debs"
        shutil.rmtree(debs, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        common = re.sub(r"-arm64$", "", release)
        pkgs = [
            profile.image_package.format(release),
            f"linux-headers-{release}",
            f"linux-headers-{common}-common",
            f"linux-kbuild-{common}:amd64",
            "libc6:amd64",
        ]
        with steps.step(f"downloading Linux {release} image, headers, kbuild"):
            apt.download(debs, pkgs)
        with steps.step("unpacking"):
            image_deb = _one(debs, f"{profile.image_package.format(release)}_*_arm64.deb")
            _extract(image_deb, root, "./" + profile.image_path.format(release))
            shutil.move(root / profile.image_path.format(release), out / "Image")
            for deb in sorted(debs.glob("*.deb")):
                if deb != image_deb:
                    _extract(deb, root)
            _fix_headers_makefiles(root)
            wrap_host_tools(root, _one(root / "usr/lib", f"linux-kbuild-{common}"))
            shutil.rmtree(debs)
            (root / ".done").touch()
        rel_file.write_text(release + "\n")
    release = rel_file.read_text().strip()
    kvm_asm = _one(root / "usr/src", "linux-headers-*-common") / "arch/arm64/include/asm/kvm_asm.h"
    names = host_hcall_names(kvm_asm)
    ids = host_hcall_ids(names, kvm_asm)
    with steps.step(f"building pkvm_conform.ko against {release}"):
        build_module(root, release, out, names)
    with steps.step("building the /dev/kvm helper (static aarch64)"):
        build_helper(out)
    meta = {"profile": profile.name, "release": release, "ids": ids, "sources": digest}
    done.write_text(json.dumps(meta, indent=1) + "\n")


def load_kernel(kernel: str, progress: bool = True) -> Kernel:
    return Kernel.load(ensure_setup(kernel, progress))


def main(argv: list[str] | None = None) -> int:
    """``python -m pkvm.conform.setup [6.12|7.2|latest|all]``: set up, print each directory."""
    import argparse

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
    wanted = list(KERNELS) if "all" in args.kernels else args.kernels
    try:
        for k in wanted:
            t0 = time.monotonic()
            d = ensure_setup(k, progress=not args.quiet)
            print(f"{profile_of(k).name}: {d} ({time.monotonic() - t0:.1f} s)")
            if not args.no_snapshot:
                from pkvm.conform.real import prepare_snapshot

                t0 = time.monotonic()
                snap = prepare_snapshot(k)
                print(f"{profile_of(k).name}: snapshot {snap} ({time.monotonic() - t0:.1f} s)")
    except (SetupError, ValueError, RuntimeError) as e:
        print(f"pkvm conform set-up failed: {e}")
        return 1
    return 0


if __name__ == "__main__":
    # Run the imported module's main: under -m this file is also __main__, and SetupError must
    # be one class for pkvm.conform.qemu and us.
    from pkvm.conform.setup import main as _main

    raise SystemExit(_main())
