"""Debian's arm64 Linux as a pkvm guest (issue 9, 14 and 17 figures).

    .venv/bin/python benchmarks/bench_linux.py [--quick] [--rounds N] [--vcpus 1,2] [--append ARGS]

For a protected VM with each number of vCPUs of `--vcpus` (default 1 and 2) and a
non-protected one (1 vCPU), 256 MiB: time to the console's `Run /init as init process` and to
the busybox prompt, then `nproc` and `poweroff -f`; exits by kind. Times are wall clock and
process CPU time (the guest's clock is the host's wall clock, so a loaded machine makes the
guest do more timer work; CPU time is the steadier figure). Baseline: the same kernel,
initramfs, device tree and devices (`pkvm.host.platform`) on a bare unicorn core, 1 CPU (all RAM
mapped up front, devices answered straight from the core's exits, no hyp, no host kernel, no
stage-2 faults): the speed ratio is bare / pkvm time to the prompt, 1 vCPU, protected. The
sides run interleaved, `--rounds` times each (default 1), with `gc.collect()` before each run
and set-up (machine, VM, loading the image) outside the timed region; medians are reported.
`--quick` leaves out the non-protected VM.

Guest MIPS are not reported: unicorn 2.1.4 counts instructions only with a per-instruction
hook, which would change what is measured.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import io
import mmap
import statistics
import sys
import time

import pkvm  # noqa: F401
from pkvm.board import machine_for
from pkvm.host.kvm import GUEST_RAM_IPA
from pkvm.host.platform.gic import Gic, is_gic_sysreg
from pkvm.host.platform.linux import DEFAULT_APPEND, LinuxVmm, build_dtb, plan_layout
from pkvm.host.platform.pl011 import UART_BASE, UART_INTID, UART_SIZE, Pl011
from pkvm.host.platform.timer import INTID_PTIMER, PhysTimer, counter, is_timer_sysreg
from pkvm.linux_fetch import fetch

MiB = 1 << 20
PROMPT = "pkvm# "
PSCI_SYSTEM_OFF = 0x8400_0008


def boot_pkvm(kernel: bytes, initrd: bytes, protected: bool, append: str, vcpus: int = 1) -> dict:
    m = machine_for(256 * MiB, vcpus)
    before = m.inspect.page_counts()
    vmm = LinuxVmm(m.host, kernel, initrd, memory=256 * MiB, vcpus=vcpus, protected=protected,
                   append=append, out=io.StringIO())
    vmm.input_lines = ["nproc", "poweroff -f"]
    r = vmm.run(timeout=900)
    vmm.destroy()
    nproc = r.console.split("nproc", 1)[-1].split()[:1]
    return {"reason": r.reason, "init": r.milestones.get("Run /init"),
            "prompt": r.milestones.get(PROMPT), "total": r.seconds, "exits": r.exits,
            "cpu_init": r.cpu_milestones.get("Run /init"),
            "cpu_prompt": r.cpu_milestones.get(PROMPT),
            "nproc": nproc[0] if nproc else "?",
            "pages": r.pages_mapped, "pages_back": m.inspect.page_counts() == before}


def boot_bare(kernel: bytes, initrd: bytes, append: str) -> dict:
    """The same boot on a bare unicorn core and the same devices: the baseline."""
    from pkvm.hyp.switch import configure_guest_core
    from pkvm.machine.cpu import (
        HCR_VI,
        SYS_HCR_EL2,
        Core,
        CpuContext,
        ExitKind,
        complete_mmio_read,
    )

    memory = 256 * MiB
    layout = plan_layout(kernel, len(initrd), memory)
    ram = mmap.mmap(-1, memory)
    base = ctypes.addressof(ctypes.c_char.from_buffer(ram))
    dtb = build_dtb(layout, 1, append)
    for at, blob in ((layout.dtb, dtb), (layout.kernel, kernel), (layout.initrd, initrd)):
        ram[at - GUEST_RAM_IPA : at - GUEST_RAM_IPA + len(blob)] = blob
    core = Core()
    configure_guest_core(core)  # the timer trapped, pointer authentication, as the hyp does
    core.map(GUEST_RAM_IPA, memory, base)
    core.load_context(CpuContext.reset(pc=layout.kernel, x0=layout.dtb))
    gic, timer, uart = Gic(1), PhysTimer(), Pl011(None)
    exits: dict[str, int] = {}
    seen: dict[str, float] = {}
    fed = False
    vi = False
    t0 = time.perf_counter()
    c0 = time.process_time()
    reason = "timeout"
    while time.perf_counter() - t0 < 300:
        gic.set_level(INTID_PTIMER, timer.line(counter()))
        gic.set_level(UART_INTID, uart.line)
        pend = gic.irq_pending(0)
        if pend != vi:  # HCR_EL2.VI: the CPU takes the IRQ when the guest unmasks
            vi = pend
            hcr = core.read_sysreg(SYS_HCR_EL2)
            core.write_sysreg(SYS_HCR_EL2, hcr & ~HCR_VI | (HCR_VI if vi else 0))
        ex = core.run()
        k = ex.kind.value
        exits[k] = exits.get(k, 0) + 1
        if ex.kind is ExitKind.DABT:
            addr = ex.ipa
            if UART_BASE <= addr < UART_BASE + UART_SIZE:
                if ex.write:
                    uart.write(addr - UART_BASE, core.x(ex.srt) if ex.srt != 31 else 0)
                    core.skip()
                    tail = uart.buffer[-80:].decode(errors="replace")
                    if "Run /init" not in seen and "Run /init" in tail:
                        seen["Run /init"] = time.perf_counter() - t0
                        seen["cpu_init"] = time.process_time() - c0
                    if not fed and tail.endswith(PROMPT):
                        seen[PROMPT] = time.perf_counter() - t0
                        seen["cpu_prompt"] = time.process_time() - c0
                        uart.feed(b"poweroff -f\n")
                        fed = True
                else:
                    complete_mmio_read(core, ex.esr, uart.read(addr - UART_BASE))
            elif gic.handles(addr):
                if ex.write:
                    gic.mmio_write(addr, ex.access_size, core.x(ex.srt) if ex.srt != 31 else 0)
                    core.skip()
                else:
                    complete_mmio_read(core, ex.esr, gic.mmio_read(addr, ex.access_size))
            elif ex.write:
                core.skip()
            else:
                complete_mmio_read(core, ex.esr, 0)
        elif ex.kind is ExitKind.SYSREG:
            e = ex.esr
            enc = ((e >> 20) & 3, (e >> 14) & 7, (e >> 10) & 15, (e >> 1) & 15, (e >> 17) & 7)
            rt, read = (e >> 5) & 31, e & 1
            dev = gic if is_gic_sysreg(enc) else timer if is_timer_sysreg(enc) else None
            if dev is None:
                core.inject_undef()
                continue
            if read:
                val = dev.sysreg_read(0, enc) if dev is gic else timer.read(enc)
                core.set_x(rt, val)
            else:
                val = core.x(rt)
                gic.sysreg_write(0, enc, val) if dev is gic else timer.write(enc, val)
            core.skip()
        elif ex.kind is ExitKind.HVC:
            fid = core.x(0) & 0xFFFF_FFFF
            if fid == PSCI_SYSTEM_OFF:
                reason = "shutdown"
                break
            core.set_x(0, {0x8400_0000: 0x10001, 0x8000_0000: 0x10001}.get(fid, 2**64 - 1))
        elif ex.kind is ExitKind.WFX:
            core.skip()
            if not gic.irq_pending(0):
                d = timer.deadline_ns()
                if d is not None:
                    time.sleep(max(0.0, min(0.25, (d - time.monotonic_ns()) / 1e9)))
        elif ex.kind is ExitKind.SMC:
            core.skip()
    return {"reason": reason, "init": seen.get("Run /init"), "prompt": seen.get(PROMPT),
            "cpu_init": seen.get("cpu_init"), "cpu_prompt": seen.get("cpu_prompt"),
            "total": time.perf_counter() - t0, "exits": exits}


def _median(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--vcpus", default="1,2", help="vCPU counts of the protected boots")
    p.add_argument("--append", default=DEFAULT_APPEND)
    a = p.parse_args()
    image, initrd_path = fetch(log=lambda s: print(s, file=sys.stderr))
    kernel, initrd = image.read_bytes(), initrd_path.read_bytes()
    counts = [int(x) for x in a.vcpus.split(",")]
    sides: list[tuple[str, object]] = []
    for n in counts:
        sides.append((f"pkvm, protected, {n} vCPU{'s' if n > 1 else ''}",
                      lambda n=n: boot_pkvm(kernel, initrd, True, a.append, n)))
    if not a.quick:
        sides.append(("pkvm, non-protected, 1 vCPU",
                      lambda: boot_pkvm(kernel, initrd, False, a.append)))
    sides.append(("bare unicorn, same devices", lambda: boot_bare(kernel, initrd, a.append)))
    results: dict[str, list[dict]] = {name: [] for name, _ in sides}
    f = lambda x: "-" if x is None else f"{x:6.1f} s"  # noqa: E731
    for rnd in range(a.rounds):
        for name, fn in sides:  # interleaved: one run of each side per round
            gc.collect()
            r = fn()  # type: ignore[operator]
            results[name].append(r)
            print(f"[{rnd + 1}/{a.rounds}] {name:32s} Run /init {f(r['init'])}  prompt "
                  f"{f(r['prompt'])} (CPU {f(r['cpu_prompt'])})  total {f(r['total'])}  "
                  f"[{r['reason']}]" + (f"  nproc {r['nproc']}" if "nproc" in r else ""),
                  flush=True)
            print(f"{'':8s} exits: " + ", ".join(f"{k} {v}" for k, v in sorted(r["exits"].items())))
            if "pages" in r:
                print(f"{'':8s} guest pages mapped {r['pages']}, back with the host after "
                      f"teardown: {'yes' if r['pages_back'] else 'NO'}")
    print(f"\nmedians over {a.rounds} interleaved round(s):")
    for name, rows in results.items():
        print(f"  {name:32s} Run /init {f(_median(rows, 'init'))}  prompt "
              f"{f(_median(rows, 'prompt'))}  CPU to the prompt {f(_median(rows, 'cpu_prompt'))}")
    bare = results[sides[-1][0]]
    one = results[sides[0][0]]
    for key, what in (("prompt", "wall"), ("cpu_prompt", "CPU")):
        b, p1 = _median(bare, key), _median(one, key)
        if b and p1:
            print(f"speed vs bare unicorn ({sides[0][0]}, {what} time to the prompt): "
                  f"{b / p1:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
