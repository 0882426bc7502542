"""The Debian fetcher's offline pieces (mirror, private apt, release choice) and the newc cpio
writer. The downloads themselves run in the `conform` and `linux` tests, which boot what was
fetched."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pkvm import debian
from pkvm.cpio import S_IFCHR, S_IFDIR, S_IFLNK, S_IFREG, TRAILER, CpioEntry, newc
from pkvm.debian import KERNEL_PACKAGES, DebianError, PrivateApt, newest_release
from pkvm.linux_fetch import APPLETS, INIT_SCRIPT, build_initramfs

HEADER = 110  # "070701" and thirteen 8-digit hex fields (init/initramfs.c: parse_header)


def read_newc(blob: bytes) -> list[dict[str, object]]:
    """Parse a newc archive as the kernel's unpacker reads it, up to the trailer."""
    out: list[dict[str, object]] = []
    pos = 0
    while True:
        assert blob[pos : pos + 6] == b"070701", pos
        f = [int(blob[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        ino, mode, _, _, nlink, _, size, _, _, rmaj, rmin, namesize, _ = f
        name = blob[pos + HEADER : pos + HEADER + namesize - 1].decode()
        assert blob[pos + HEADER + namesize - 1] == 0
        pos += HEADER + namesize
        pos += -pos % 4
        data = blob[pos : pos + size]
        pos += size
        pos += -pos % 4
        if name == "TRAILER!!!":
            assert pos == len(blob)
            return out
        out.append({"ino": ino, "name": name, "mode": mode, "nlink": nlink, "data": data,
                    "rdev": (rmaj, rmin)})


names = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1,
                max_size=40).filter(lambda n: n != TRAILER)


@given(st.lists(st.tuples(names, st.binary(max_size=70), st.sampled_from([S_IFREG | 0o644,
                                                                           S_IFDIR | 0o755])),
                max_size=6))
def test_newc_round_trips(files: list[tuple[str, bytes, int]]) -> None:
    blob = newc(CpioEntry(n, m, d) for n, d, m in files)
    assert len(blob) % 4 == 0
    back = read_newc(blob)
    assert [(e["name"], e["data"], e["mode"]) for e in back] == files
    assert [e["ino"] for e in back] == list(range(1, len(files) + 1))


def test_newc_refuses_an_entry_named_like_the_trailer() -> None:
    """The kernel's unpacker stops at a name equal to the trailer's: such an entry would end
    the archive early, so the writer refuses it."""
    with pytest.raises(ValueError, match="TRAILER"):
        newc([CpioEntry("a", S_IFREG | 0o644), CpioEntry(TRAILER, S_IFREG | 0o644)])


def test_linux_initramfs_has_init_console_and_applets(tmp_path: Path) -> None:
    out = tmp_path / "initrd.cpio.gz"
    build_initramfs(b"\x7fELF busybox", out)
    entries = {e["name"]: e for e in read_newc(gzip.decompress(out.read_bytes()))}
    assert entries["init"]["data"] == INIT_SCRIPT.encode()
    assert entries["init"]["mode"] == S_IFREG | 0o755
    assert entries["dev/console"]["mode"] == S_IFCHR | 0o600
    assert entries["dev/console"]["rdev"] == (5, 1)
    assert entries["bin"]["mode"] == S_IFDIR | 0o755 and entries["bin"]["nlink"] == 2
    assert entries["bin/busybox"]["data"] == b"\x7fELF busybox"
    for a in APPLETS:
        assert entries[f"bin/{a}"]["mode"] == S_IFLNK | 0o777
        assert entries[f"bin/{a}"]["data"] == b"/bin/busybox"


def test_mirror_from_deb822_then_sources_list(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    deb822, legacy = tmp_path / "debian.sources", tmp_path / "sources.list"
    monkeypatch.setattr(debian, "DEB822_SOURCES", deb822)
    monkeypatch.setattr(debian, "LEGACY_SOURCES", legacy)
    with pytest.raises(DebianError):
        debian.mirror()
    legacy.write_text("# comment\ndeb [ arch=amd64 ] http://m.example/debian/ trixie main\n")
    assert debian.mirror() == "http://m.example/debian"
    deb822.write_text("Types: deb\nURIs: http://d.example/debian\nSuites: trixie\n")
    assert debian.mirror() == "http://d.example/debian"


def test_private_apt_keeps_its_state_in_its_root(tmp_path: Path) -> None:
    apt = PrivateApt(tmp_path, "trixie", native="amd64", archs=("arm64", "amd64"))
    opts = dict(o.split("=", 1) for o in apt.options[1::2])
    for key in ("Dir::Etc::sourcelist", "Dir::State::Lists", "Dir::State::status", "Dir::Cache"):
        assert opts[key].startswith(str(tmp_path)), key
    assert opts["Dir::Etc::sourceparts"] == "-"
    assert opts["APT::Architecture"] == "amd64"
    assert apt.options.count("APT::Architectures::=arm64") == 1


class _Listing(PrivateApt):
    """A private apt whose search answers from a fixed package list (no apt-cache run)."""

    def __init__(self, packages: list[str]) -> None:
        super().__init__(Path("/nonexistent"), "trixie")
        self.packages = packages

    def search(self, regex: str) -> list[str]:
        return self.packages


def test_newest_release_compares_versions_and_skips_other_flavours() -> None:
    apt = _Listing([
        "linux-image-6.12.9+deb13-arm64-unsigned",
        "linux-image-6.12.117+deb13-arm64-unsigned",
        "linux-image-6.12.200+deb13-rt-arm64-unsigned",
        "linux-image-6.12.300+deb13-arm64-16k-unsigned",
        "linux-image-6.13.1+deb13-arm64-unsigned",
    ])
    assert newest_release(apt, KERNEL_PACKAGES["6.12"]) == "6.12.117+deb13-arm64"
    with pytest.raises(DebianError):
        newest_release(_Listing([]), KERNEL_PACKAGES["7.2"])
