"""Debian packages fetched without touching this machine's apt: kernels, QEMU, busybox.

One module serves every download of the project: the conformance set-up (arm64 kernel images,
headers and kbuild, an amd64 glibc and QEMU 10 from trixie, busybox; :mod:`pkvm.conform.setup`,
:mod:`pkvm.conform.qemu`) and ``pkvm fetch-linux`` (an arm64 kernel and busybox for a guest;
:mod:`pkvm.linux_fetch`).

:class:`PrivateApt` runs ``apt-get`` / ``apt-cache`` with its own sources.list, lists, package
cache and (empty) dpkg status under a directory of the caller's cache, so nothing is installed
and the machine's apt is left as it was. Its mirror is the one this machine's apt already uses
(:func:`mirror`); no mirror host is written in the repository. Packages are unpacked with
``dpkg-deb``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "KERNEL_PACKAGES",
    "DebianError",
    "KernelPackage",
    "PrivateApt",
    "extract",
    "fetch_busybox",
    "mirror",
    "newest_release",
    "one",
    "run",
]

KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
DEB822_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
LEGACY_SOURCES = Path("/etc/apt/sources.list")
LISTS_MAX_AGE = 86400.0  # seconds a private apt's package lists are used before an update
ERROR_TAIL_LINES = 30  # lines of a failed command's output an error quotes
BUSYBOX_PACKAGE = "busybox-static"
BUSYBOX_PATHS = ("usr/bin/busybox", "bin/busybox")  # where the package has put it, by release


class DebianError(RuntimeError):
    """A Debian package could not be found, fetched or unpacked (the message says why)."""


def run(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run ``cmd``; its stdout, or :class:`DebianError` with the tail of its output."""
    try:
        p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise DebianError(f"{cmd[0]} is not installed: {e}") from e
    if p.returncode != 0:
        tail = "\n".join((p.stdout + p.stderr).splitlines()[-ERROR_TAIL_LINES:])
        raise DebianError(f"command failed ({p.returncode}): {' '.join(cmd)}\n{tail}")
    return p.stdout


def mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 ``debian.sources``, then
    ``sources.list``)."""
    if DEB822_SOURCES.is_file():
        for line in DEB822_SOURCES.read_text().splitlines():
            m = re.match(r"^URIs:\s*(\S+/debian)/?\s*$", line)
            if m:
                return m.group(1)
    if LEGACY_SOURCES.is_file():
        for line in LEGACY_SOURCES.read_text().splitlines():
            f = line.split()
            if len(f) >= 3 and f[0] == "deb":
                uri = next((x for x in f[1:] if "://" in x), "").rstrip("/")
                if uri.endswith("/debian"):
                    return uri
    raise DebianError(f"no Debian mirror found in {DEB822_SOURCES} or {LEGACY_SOURCES}")


class PrivateApt:
    """apt-get / apt-cache for one suite with their own sources, lists, cache and status in
    ``root``. ``archs``: the architectures whose lists are fetched; ``native``: the one a bare
    package name means."""

    def __init__(self, root: Path, suite: str, native: str = "arm64",
                 archs: Sequence[str] = ("arm64",)) -> None:
        self.root = root
        self.suite = suite
        self.native = native
        self.archs = tuple(archs)

    @property
    def options(self) -> list[str]:
        d = self.root
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
        for a in self.archs:
            out += ["-o", f"APT::Architectures::={a}"]
        return out

    def update(self) -> None:
        """Write the sources.list (this machine's mirror) and fetch the package lists."""
        d = self.root
        (d / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (d / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        (d / "status").touch()
        # Without Debian's keyring file apt checks the lists against its own trusted keys.
        signed = f" signed-by={KEYRING}" if KEYRING.is_file() else ""
        (d / "sources.list").write_text(
            f"deb [arch={','.join(self.archs)}{signed}] {mirror()} {self.suite} main\n"
        )
        run(["apt-get", *self.options, "update"])
        (d / "updated").touch()

    def ensure_lists(self, max_age: float = LISTS_MAX_AGE) -> None:
        """Update unless the lists are younger than ``max_age`` seconds."""
        stamp = self.root / "updated"
        if stamp.exists() and time.time() - stamp.stat().st_mtime < max_age:
            return
        self.update()

    def search(self, regex: str) -> list[str]:
        """Names of the packages whose name matches ``regex``."""
        out = run(["apt-cache", *self.options, "search", "--names-only", regex])
        return [line.split(" - ")[0].strip() for line in out.splitlines() if line.strip()]

    def closure(self, packages: list[str]) -> list[str]:
        """``packages`` and everything they depend on (no recommends), against the empty
        status, as ``name:arch``."""
        out = run(["apt-get", *self.options, "-s", "install", "--no-install-recommends",
                   *packages])
        names = [line.split()[1] for line in out.splitlines() if line.startswith("Inst ")]
        if not names:
            raise DebianError(f"apt found nothing to fetch for {' '.join(packages)}")
        return names

    def download(self, dest: Path, packages: list[str]) -> None:
        """``apt-get download`` the packages' .deb files into ``dest``."""
        dest.mkdir(parents=True, exist_ok=True)
        run(["apt-get", *self.options, "download", *packages], cwd=dest)


@dataclass(frozen=True)
class KernelPackage:
    """Where Debian ships one kernel series for arm64: its suite, and the image package's name
    and the image's path inside it, as format strings over the release."""

    suite: str
    series: str  # "6.12": the newest 6.12.x release is taken
    image_package: str  # e.g. "linux-image-{}-unsigned"
    image_path: str  # e.g. "boot/vmlinuz-{}"

    def package(self, release: str) -> str:
        return self.image_package.format(release)

    def path(self, release: str) -> str:
        return self.image_path.format(release)


def _version_key(release: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", release))


def newest_release(apt: PrivateApt, kernel: KernelPackage) -> str:
    """The newest ``<series>.N+debM-arm64`` release whose image package the suite has (the
    plain flavour: no rt, 16k or cloud)."""
    series = re.escape(kernel.series)
    pkg_re = kernel.image_package.format(f"({series}\\.[0-9]+\\+deb[0-9]+-arm64)")
    releases = []
    for name in apt.search(f"^{pkg_re}$"):
        m = re.fullmatch(pkg_re, name)
        if m:
            releases.append(m.group(1))
    if not releases:
        raise DebianError(f"Debian {kernel.suite} has no {kernel.series}.x arm64 kernel image")
    return max(releases, key=_version_key)


def extract(deb: Path, dest: Path, *members: str) -> None:
    """Unpack the .deb into ``dest``: all of it, or only the ``members`` (tar wildcards)."""
    dest.mkdir(parents=True, exist_ok=True)
    if not members:
        run(["dpkg-deb", "-x", str(deb), str(dest)])
        return
    tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    try:
        subprocess.run(
            ["tar", "-x", "-C", str(dest), "--wildcards", *members], stdin=tar.stdout, check=True
        )
    except subprocess.CalledProcessError as e:
        raise DebianError(f"extracting {members} from {deb.name} failed") from e
    finally:
        if tar.stdout:
            tar.stdout.close()
        tar.wait()


def one(d: Path, pattern: str) -> Path:
    """The (last-sorting) file of ``d`` matching ``pattern``: what a download left there."""
    found = sorted(d.glob(pattern))
    if not found:
        raise DebianError(f"{pattern} was not downloaded into {d}")
    return found[-1]


def fetch_busybox(apt: PrivateApt, work: Path) -> bytes:
    """The arm64 static busybox binary of ``apt``'s suite (``work``: a scratch directory,
    removed afterwards)."""
    shutil.rmtree(work, ignore_errors=True)
    debs, root = work / "debs", work / "root"
    try:
        apt.download(debs, [f"{BUSYBOX_PACKAGE}:arm64"])
        extract(one(debs, f"{BUSYBOX_PACKAGE}_*_arm64.deb"), root)
        found = [root / p for p in BUSYBOX_PATHS if (root / p).is_file()]
        if not found:
            raise DebianError(f"{BUSYBOX_PACKAGE} has no busybox binary where expected")
        return found[0].read_bytes()
    finally:
        shutil.rmtree(work, ignore_errors=True)


# Debian's arm64 kernels of the model's two ABI profiles.
KERNEL_PACKAGES: dict[str, KernelPackage] = {
    "6.12": KernelPackage("trixie", "6.12", "linux-image-{}-unsigned", "boot/vmlinuz-{}"),
    "7.2": KernelPackage(
        "sid", "7.2", "linux-binary-unsigned-{}", "usr/lib/modules/{}/vmlinuz.unsigned"
    ),
}
