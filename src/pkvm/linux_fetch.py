"""Get a Linux kernel and a busybox initramfs for `pkvm run-guest`, from Debian.

    python -m pkvm.linux_fetch          # or: pkvm fetch-linux
    -> ~/.cache/pkvm/linux/Image, ~/.cache/pkvm/linux/initrd.cpio.gz

Only the package registry is used: `apt-get download` of Debian's arm64 6.12 kernel image
package (suite trixie) and of `busybox-static`, through a private apt configuration
(:mod:`pkvm.debian`: its own sources.list, lists and cache under the cache directory) whose
mirror is read from this machine's apt sources. The kernel package's `vmlinuz` for arm64 is a
raw `Image` (gzip-compressed on some releases: unpacked here). The initramfs is a newc cpio
(:mod:`pkvm.cpio`, gzip) with busybox, its applet links and an /init script.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from pkvm.cpio import S_IFCHR, S_IFDIR, S_IFLNK, S_IFREG, CpioEntry, newc
from pkvm.debian import (
    KERNEL_PACKAGES,
    DebianError,
    PrivateApt,
    extract,
    fetch_busybox,
    newest_release,
    one,
)

SUITE = "trixie"
KERNEL = KERNEL_PACKAGES["6.12"]  # Debian trixie's; the plain flavour (not rt/16k/cloud)
ARM64_MAGIC_OFFSET = 0x38  # struct arm64_image_header.magic (Documentation/arch/arm64/booting)
ARM64_MAGIC = b"ARM\x64"
GZIP_MAGIC = b"\x1f\x8b"
GZIP_LEVEL = 6
CONSOLE_RDEV = (5, 1)  # /dev/console: TTYAUX_MAJOR, minor 1

INIT_SCRIPT = """#!/bin/sh
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo
echo "pkvm: busybox initramfs up ($(uname -r)). Try: uname -a; cat /proc/cpuinfo; poweroff -f"
export PS1='pkvm# '
exec /bin/busybox setsid /bin/busybox cttyhack /bin/sh
"""
# `poweroff` in busybox without an init daemon: poweroff -f calls reboot(2) directly.


DIRS = ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "etc", "root")
APPLETS = ("sh", "ash", "ls", "cat", "echo", "mount", "umount", "uname", "mkdir", "ps", "dmesg",
           "free", "top", "vi", "grep", "sed", "awk", "sleep", "date", "poweroff", "reboot",
           "halt", "hostname", "head", "tail", "wc", "rm", "cp", "mv", "ln", "chmod", "df", "du",
           "find", "env", "id", "kill", "less", "more", "touch", "true", "false", "test", "[",
           "printf", "uptime", "nproc", "stty", "setsid", "cttyhack", "md5sum", "sha256sum", "dd",
           "hexdump", "xxd", "sync")  # each a symlink /bin/<applet> -> /bin/busybox


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pkvm" / "linux"


def extract_image(deb: Path, release: str, out: Path) -> None:
    """Write the kernel Image of the image package ``deb`` (gunzipped when compressed)."""
    member = KERNEL.path(release)
    with tempfile.TemporaryDirectory() as tmp:
        extract(deb, Path(tmp), "./" + member)
        raw = (Path(tmp) / member).read_bytes()
    if raw[: len(GZIP_MAGIC)] == GZIP_MAGIC:
        raw = gzip.decompress(raw)
    if raw[ARM64_MAGIC_OFFSET : ARM64_MAGIC_OFFSET + len(ARM64_MAGIC)] != ARM64_MAGIC:
        raise DebianError(f"{member} is not an arm64 Image (no ARM\\x64 magic)")
    out.write_bytes(raw)


def build_initramfs(busybox: bytes, out: Path) -> None:
    """A newc cpio (gzip): the directories, /dev/console, /bin/busybox and its applet links,
    /init."""
    entries = [CpioEntry(d, S_IFDIR | 0o755, nlink=2) for d in DIRS]
    entries.append(CpioEntry("dev/console", S_IFCHR | 0o600, rdev=CONSOLE_RDEV))
    entries.append(CpioEntry("bin/busybox", S_IFREG | 0o755, busybox))
    entries += [CpioEntry(f"bin/{a}", S_IFLNK | 0o777, b"/bin/busybox") for a in APPLETS]
    entries.append(CpioEntry("init", S_IFREG | 0o755, INIT_SCRIPT.encode()))
    out.write_bytes(gzip.compress(newc(entries), GZIP_LEVEL))


def fetch(dest: Path | None = None, *, force: bool = False,
          log: Callable[[str], object] = print) -> tuple[Path, Path]:
    """Make sure `Image` and `initrd.cpio.gz` are in `dest` (the cache); return their paths."""
    dest = dest or cache_dir()
    dest.mkdir(parents=True, exist_ok=True)
    image, initrd = dest / "Image", dest / "initrd.cpio.gz"
    stamp = dest / "initrd.stamp"  # which /init the cached initramfs has
    want = hashlib.sha256(INIT_SCRIPT.encode()).hexdigest()[:16]
    cached = image.is_file() and initrd.is_file() and not force
    if cached and stamp.is_file() and stamp.read_text().strip() == want:
        return image, initrd
    for tool in ("apt-get", "apt-cache", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise DebianError(f"{tool} is needed to fetch Debian's packages")
    apt = PrivateApt(dest / "apt", SUITE)
    log(f"fetch-linux: apt-get update (arm64, {SUITE}, private lists in {apt.root})")
    apt.update()
    if not cached:
        _fetch_image(apt, dest, image, log)
    else:  # the kernel is cached; the initramfs is from an older /init
        log("fetch-linux: rebuilding the initramfs")
    log("fetch-linux: apt-get download busybox-static")
    build_initramfs(fetch_busybox(apt, dest / "busybox-work"), initrd)
    stamp.write_text(want + "\n")
    log(f"fetch-linux: {initrd} ({initrd.stat().st_size >> 10} KiB)")
    return image, initrd


def _fetch_image(apt: PrivateApt, dest: Path, image: Path, log: Callable[[str], object]) -> None:
    release = newest_release(apt, KERNEL)
    pkg = KERNEL.package(release)
    log(f"fetch-linux: apt-get download {pkg}")
    debs = apt.root / "debs"
    apt.download(debs, [pkg])
    deb = one(debs, f"{pkg}_*_arm64.deb")
    extract_image(deb, release, image)
    deb.unlink()
    (dest / "VERSION").write_text(release + "\n")
    log(f"fetch-linux: {image} (Linux {release}, {image.stat().st_size >> 20} MiB)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pkvm.linux_fetch",
                                description=(__doc__ or "").split("\n")[0])
    p.add_argument("--dest", type=Path, default=None, help=f"default {cache_dir()}")
    p.add_argument("--force", action="store_true", help="fetch again even if cached")
    a = p.parse_args(argv)
    try:
        image, initrd = fetch(a.dest, force=a.force, log=lambda s: print(s, file=sys.stderr))
    except (RuntimeError, OSError) as e:
        print(f"fetch-linux: {e}", file=sys.stderr)
        return 1
    print(image)
    print(initrd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
