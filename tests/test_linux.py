"""Debian's arm64 Linux kernel, unmodified, as a pkvm guest.

The boot tests need the kernel and initramfs (`pkvm fetch-linux`, cached in ~/.cache/pkvm/linux;
fetched here on first use through the package registry); a fetch that fails fails them, as
any set-up failure does (the offline subset, `-m "not conform and not linux"`, leaves them
out). The device-tree and device tests run everywhere.
"""

from __future__ import annotations

import io
import re

import pytest

import pkvm
from pkvm.board import machine_for
from pkvm.host.platform import fdt
from pkvm.host.platform.gic import ICC_EOIR1_EL1, ICC_IAR1_EL1, ICC_IGRPEN1_EL1, ICC_PMR_EL1, Gic
from pkvm.host.platform.linux import Layout, LinuxVmm, build_dtb
from pkvm.host.platform.pl011 import FR, FR_RXFE, IMSC, INT_RX, Pl011
from pkvm.host.platform.timer import CNTP_CTL_EL0, CNTP_CVAL_EL0, PhysTimer, counter

MiB = 1 << 20


# -- the board, without Linux ----------------------------------------------------------------
def test_dtb_round_trips_with_the_board():
    layout = Layout(0x4000_0000, 256 * MiB, 0x4000_0000, 0x4020_0000, 0x4400_0000, 0x1000)
    blob = build_dtb(layout, 2, "console=ttyAMA0")
    root = fdt.from_dtb(blob)
    assert root.find("chosen").get("bootargs") == b"console=ttyAMA0\0"
    assert root.find("chosen").get("linux,initrd-start") == fdt.u64(0x4400_0000)
    assert root.find("memory@40000000").get("reg") == fdt.cells(0, 0x4000_0000, 0, 256 * MiB)
    assert root.find("psci").get("method") == b"hvc\0"
    assert root.find("cpus/cpu@1") is not None
    gic = root.find("intc@8000000")
    assert gic.get("reg") == fdt.cells(0, 0x0800_0000, 0, 0x1_0000, 0, 0x080A_0000, 0, 0x4_0000)
    assert root.find("pl011@9000000").get("interrupts") == fdt.cells(0, 1, 4)


def test_gic_delivers_an_enabled_ppi_and_honours_pmr_and_eoi():
    g = Gic(1)
    g.mmio_write(0x0800_0000, 4, 0x12)  # GICD_CTLR: ARE, EnableGrp1
    g.mmio_write(0x080A_0000 + 0x1_0000 + 0x100, 4, 1 << 30)  # ISENABLER0: INTID 30
    g.sysreg_write(0, ICC_IGRPEN1_EL1, 1)
    g.set_level(30, True)
    assert not g.irq_pending(0)  # PMR 0 masks everything
    g.sysreg_write(0, ICC_PMR_EL1, 0xF0)
    assert g.irq_pending(0)
    assert g.sysreg_read(0, ICC_IAR1_EL1) == 30
    assert not g.irq_pending(0)  # active
    g.set_level(30, False)
    g.sysreg_write(0, ICC_EOIR1_EL1, 30)
    assert not g.irq_pending(0) and g.sysreg_read(0, ICC_IAR1_EL1) == 1023


def test_timer_fires_at_cval_and_pl011_receive_raises_its_line():
    t = PhysTimer()
    t.write(CNTP_CVAL_EL0, counter() - 1)
    t.write(CNTP_CTL_EL0, 1)
    assert t.read(CNTP_CTL_EL0) == 0b101 and t.line()
    t.write(CNTP_CTL_EL0, 0b11)
    assert not t.line()
    u = Pl011(io.StringIO())
    u.write(IMSC, INT_RX)
    assert u.read(FR) & FR_RXFE and not u.line
    u.feed(b"a")
    assert u.line and u.read(0) == ord("a") and not u.line


# -- Linux ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def linux_files():
    from pkvm.linux_fetch import fetch

    try:
        image, initrd = fetch(log=lambda s: None)
    except Exception as e:  # no apt, no mirror, no network: the set-up failed, and so do we
        pytest.fail(f"cannot fetch Debian's arm64 kernel and busybox: {e}")
    return image.read_bytes(), initrd.read_bytes()


@pytest.mark.linux
def test_protected_linux_boots_to_init_isolated_and_every_page_comes_back(linux_files):
    kernel, initrd = linux_files
    m = machine_for(256 * MiB, 1)
    before = m.inspect.page_counts()
    vmm = LinuxVmm(m.host, kernel, initrd, memory=256 * MiB, vcpus=1, protected=True,
                   out=io.StringIO())
    try:
        r = vmm.run(until=lambda v: "Run /init" in v.seen, timeout=240)
        assert r.reason == "until", r.console[-2000:]
        assert "Booting Linux" in r.console and "GICv3" in r.console
        # While it runs, every page it was given is out of the host's reach.
        pages = sorted(vmm.vm.mapped.values())
        assert len(pages) > 1000
        for pa in pages:
            with pytest.raises(pkvm.HostDataAbort):
                m.host.read(pa, 8)
        with pytest.raises(pkvm.HostDataAbort):
            m.host.write(pages[0], b"x")
        # The shell comes up; typed input reaches it through the PL011 receive interrupt.
        vmm.input_lines = ["uname -a", "poweroff -f"]
        r = vmm.run(timeout=240)
        assert r.reason == "shutdown", r.console[-2000:]
        assert "Linux (none) 6.12" in r.console and "aarch64" in r.console
    finally:
        vmm.destroy()
    for pa in pages:
        assert m.host.read(pa, 4096) == bytes(4096)
    assert m.inspect.page_counts() == before


@pytest.mark.linux
def test_protected_linux_with_two_vcpus_reaches_the_shell_and_counts_two_cpus(linux_files):
    """vCPU 1 starts off; Linux brings it up with PSCI CPU_ON (the host's psci.c), each vCPU is
    loaded on its own host CPU, and they share the host thread in preempted turns."""
    kernel, initrd = linux_files
    m = machine_for(256 * MiB, 2)
    before = m.inspect.page_counts()
    loads: dict[int, set[int]] = {}

    def on_call(rec) -> None:  # the HVC door, as the hyp saw each __pkvm_vcpu_load
        if rec.name == "__pkvm_vcpu_load" and rec.x0 == 0:  # dispatched (it returns nothing)
            loads.setdefault(rec.args[1], set()).add(rec.cpu)

    m.listeners.append(on_call)
    vmm = LinuxVmm(m.host, kernel, initrd, memory=256 * MiB, vcpus=2, protected=True,
                   out=io.StringIO())
    assert vmm.vm.vcpus[1].powered_off
    try:
        vmm.input_lines = ["nproc", "poweroff -f"]
        r = vmm.run(timeout=900)
        assert r.reason == "shutdown", r.console[-2000:]
        assert "smp: Brought up 1 node, 2 CPUs" in r.console
        assert re.search(r"nproc\s+2\s", r.console), r.console[-500:]
        assert loads == {0: {0}, 1: {1}}
    finally:
        vmm.destroy()
    assert m.inspect.page_counts() == before
