"""Get a Linux kernel and a busybox initramfs for `pkvm run-guest` (issue 9), from Debian.

    python -m pkvm.linux_fetch          # or: pkvm fetch-linux
    -> ~/.cache/pkvm/linux/Image, ~/.cache/pkvm/linux/initrd.cpio.gz

Only the package registry is used: `apt-get download` of Debian's arm64 kernel image package
(suite trixie) and of `busybox-static`, through a private apt configuration (its own
sources.list, lists and cache under the cache directory) whose mirror is read from this
machine's apt sources. No mirror host is written anywhere in the repository. The kernel
package's `vmlinuz` for arm64 is a raw `Image` (gzip-compressed on some releases: unpacked here).
The initramfs is a newc cpio (gzip) with busybox, its applet links and an /init script.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

SUITE = "trixie"
ARCH = "arm64"
KERNEL_PACKAGE_RE = r"^linux-image-6\.12\.(\d+)\+deb\d+-arm64-unsigned$"  # not rt/16k/cloud

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


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pkvm" / "linux"


def find_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 .sources first, then sources.list)."""
    deb822 = Path("/etc/apt/sources.list.d/debian.sources")
    if deb822.is_file():
        for line in deb822.read_text().splitlines():
            m = re.match(r"^URIs:\s*(\S+/debian)\s*$", line)
            if m:
                return m.group(1)
    legacy = Path("/etc/apt/sources.list")
    if legacy.is_file():
        for line in legacy.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb":
                url = next((p for p in parts[1:] if "://" in p), "")
                if url.rstrip("/").endswith("/debian"):
                    return url.rstrip("/")
    raise RuntimeError("no Debian mirror found in /etc/apt/sources.list.d/debian.sources "
                       "or /etc/apt/sources.list")


class PrivateApt:
    """apt-get / apt-cache with their own sources.list, lists and cache (arm64, one suite)."""

    def __init__(self, root: Path, mirror: str, suite: str = SUITE):
        self.root = root
        for d in ("lists/partial", "cache/archives/partial", "debs"):
            (root / d).mkdir(parents=True, exist_ok=True)
        keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
        signed = f" signed-by={keyring}" if Path(keyring).is_file() else " trusted=yes"
        (root / "sources.list").write_text(f"deb [arch={ARCH}{signed}] {mirror} {suite} main\n")
        self.opts = [
            "-o", f"Dir::Etc::sourcelist={root / 'sources.list'}",
            "-o", "Dir::Etc::sourceparts=-",
            "-o", f"Dir::State::Lists={root / 'lists'}",
            "-o", f"Dir::Cache={root / 'cache'}",
            "-o", f"APT::Architecture={ARCH}",
            "-o", f"APT::Architectures={ARCH}",
            "-o", "APT::Sandbox::User=root",
            "-o", "Dir::State::status=/dev/null",
        ]

    def _run(self, tool: str, *args: str, cwd: Path | None = None) -> str:
        r = subprocess.run([tool, *self.opts, *args], cwd=cwd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"{tool} {' '.join(args)} failed: {r.stderr.strip()[-800:]}")
        return r.stdout

    def update(self) -> None:
        self._run("apt-get", "update")

    def package_names(self, pattern: str) -> list[str]:
        out = self._run("apt-cache", "pkgnames", "linux-image-")
        found = [(m, n) for n in out.split() if (m := re.match(pattern, n))]
        return [n for m, n in sorted(found, key=lambda mn: int(mn[0].group(1)))]

    def download(self, package: str) -> Path:
        debs = self.root / "debs"
        self._run("apt-get", "download", package, cwd=debs)
        found = sorted(debs.glob(f"{package}_*_{ARCH}.deb"))
        if not found:
            raise RuntimeError(f"apt-get download {package}: no .deb appeared in {debs}")
        return found[-1]


def _deb_members(deb: Path) -> tarfile.TarFile:
    """The data tarball of a .deb (dpkg-deb does the ar/compression work)."""
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True,
                          check=True).stdout
    return tarfile.open(fileobj=io.BytesIO(data))


def extract_image(deb: Path, out: Path) -> str:
    """Write the kernel Image from the package's /boot/vmlinuz-*; returns the version."""
    with _deb_members(deb) as tf:
        for m in tf.getmembers():
            name = m.name.lstrip("./")
            if name.startswith("boot/vmlinuz-") and m.isfile():
                f = tf.extractfile(m)
                assert f is not None
                raw = f.read()
                if raw[:2] == b"\x1f\x8b":
                    raw = gzip.decompress(raw)
                if raw[0x38:0x3C] != b"ARM\x64":
                    raise RuntimeError(f"{name} is not an arm64 Image (no ARM\\x64 magic)")
                out.write_bytes(raw)
                return name.removeprefix("boot/vmlinuz-")
    raise RuntimeError(f"{deb.name}: no boot/vmlinuz-* inside")


def _cpio_entry(name: str, mode: int, data: bytes = b"", ino: int = 1, nlink: int = 1) -> bytes:
    fields = [ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
    head = b"070701" + b"".join(f"{v:08X}".encode() for v in fields)
    buf = head + name.encode() + b"\0"
    buf += b"\0" * (-len(buf) % 4)
    buf += data
    buf += b"\0" * (-len(buf) % 4)
    return buf


def build_initramfs(busybox_deb: Path, out: Path) -> None:
    """A newc cpio (gzip): /bin/busybox, /bin/sh and the applet links, /init, a few dirs."""
    with _deb_members(busybox_deb) as tf:
        wanted = ("bin/busybox", "usr/bin/busybox")
        member = next(m for m in tf.getmembers() if m.name.lstrip("./") in wanted)
        f = tf.extractfile(member)
        assert f is not None
        busybox = f.read()
    entries: list[bytes] = []
    ino = 1
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "etc",
              "root"):
        entries.append(_cpio_entry(d, 0o040755, ino=ino, nlink=2))
        ino += 1
    entries.append(_cpio_entry("dev/console", 0o020600, ino=ino))  # char 5:1 fixed below
    console_index = len(entries) - 1
    ino += 1
    entries.append(_cpio_entry("bin/busybox", 0o100755, busybox, ino=ino))
    ino += 1
    applets = ["sh", "ash", "ls", "cat", "echo", "mount", "umount", "uname", "mkdir", "ps",
               "dmesg", "free", "top", "vi", "grep", "sed", "awk", "sleep", "date", "poweroff",
               "reboot", "halt", "hostname", "head", "tail", "wc", "rm", "cp", "mv", "ln",
               "chmod", "df", "du", "find", "env", "id", "kill", "less", "more", "touch",
               "true", "false", "test", "[", "printf", "uptime", "busybox", "nproc", "stty",
               "setsid", "cttyhack", "md5sum", "sha256sum", "dd", "hexdump", "xxd", "sync"]
    for a in applets:
        if a == "busybox":
            continue
        target = "/bin/busybox"
        entries.append(_cpio_entry(f"bin/{a}", 0o120777, target.encode(), ino=ino))
        ino += 1
    entries.append(_cpio_entry("init", 0o100755, INIT_SCRIPT.encode(), ino=ino))
    ino += 1
    # /dev/console as a character device 5:1 (rdevmajor/rdevminor fields).
    c = bytearray(entries[console_index])
    c[6 + 8 * 9 : 6 + 8 * 10] = b"00000005"
    c[6 + 8 * 10 : 6 + 8 * 11] = b"00000001"
    entries[console_index] = bytes(c)
    entries.append(_cpio_entry("TRAILER!!!", 0, ino=0))
    blob = b"".join(entries)
    blob += b"\0" * (-len(blob) % 512)
    out.write_bytes(gzip.compress(blob, 6))


def fetch(dest: Path | None = None, *, force: bool = False, log=print) -> tuple[Path, Path]:
    """Make sure `Image` and `initrd.cpio.gz` are in `dest` (the cache); return their paths."""
    dest = dest or cache_dir()
    dest.mkdir(parents=True, exist_ok=True)
    image, initrd = dest / "Image", dest / "initrd.cpio.gz"
    stamp = dest / "initrd.stamp"  # which /init the cached initramfs has
    want = hashlib.sha256(INIT_SCRIPT.encode()).hexdigest()[:16]
    if image.is_file() and initrd.is_file() and not force:
        if stamp.is_file() and stamp.read_text().strip() == want:
            return image, initrd
        force_initrd_only = True
    else:
        force_initrd_only = False
    for tool in ("apt-get", "apt-cache", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is needed to fetch Debian's packages")
    mirror = find_mirror()
    apt = PrivateApt(dest / "apt", mirror)
    log(f"fetch-linux: apt-get update (arm64, {SUITE}, private lists in {apt.root})")
    apt.update()
    if force_initrd_only:  # the kernel is cached; the initramfs is from an older /init
        log("fetch-linux: apt-get download busybox-static (rebuilding the initramfs)")
        bdeb = apt.download("busybox-static")
        build_initramfs(bdeb, initrd)
        stamp.write_text(want + "\n")
        bdeb.unlink(missing_ok=True)
        return image, initrd
    names = apt.package_names(KERNEL_PACKAGE_RE)
    if not names:
        raise RuntimeError(f"no package matching {KERNEL_PACKAGE_RE} in {SUITE}")
    kpkg = names[-1]
    log(f"fetch-linux: apt-get download {kpkg}")
    kdeb = apt.download(kpkg)
    version = extract_image(kdeb, image)
    log(f"fetch-linux: {image} (Linux {version}, {image.stat().st_size >> 20} MiB)")
    log("fetch-linux: apt-get download busybox-static")
    bdeb = apt.download("busybox-static")
    build_initramfs(bdeb, initrd)
    stamp.write_text(want + "\n")
    (dest / "VERSION").write_text(version + "\n")
    log(f"fetch-linux: {initrd} ({initrd.stat().st_size >> 10} KiB)")
    for deb in (kdeb, bdeb):
        deb.unlink(missing_ok=True)
    return image, initrd


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m pkvm.linux_fetch",
                                description=(__doc__ or "").split("\n")[0])
    p.add_argument("--dest", type=Path, default=None, help=f"default {cache_dir()}")
    p.add_argument("--force", action="store_true", help="fetch again even if cached")
    a = p.parse_args(argv)
    try:
        image, initrd = fetch(a.dest, force=a.force, log=lambda s: print(s, file=sys.stderr))
    except (RuntimeError, subprocess.CalledProcessError, OSError) as e:
        print(f"fetch-linux: {e}", file=sys.stderr)
        return 1
    print(image)
    print(initrd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
