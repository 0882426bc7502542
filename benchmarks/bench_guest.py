"""Guest execution through the whole pKVM run path (issue 4 figures).

    .venv/bin/python benchmarks/bench_guest.py [--quick]

- guest MIPS of the `loop` compute kernel in a protected VM (stage-2 enforced: the guest runs on
  the pages its hyp-owned stage-2 maps, entered through __pkvm_vcpu_load / __kvm_vcpu_run),
  against the same code on a bare unicorn instance in the same run;
- MMIO exit round trips per second (`mmio` guest: a load and a store per iteration, each a
  full exit to the host VMM and back);
- stage-2 fault + map + re-enter per second (`memwalk`: one fault per page).
"""

from __future__ import annotations

import io
import statistics
import sys
import time

sys.path.insert(0, __file__.rsplit("/", 1)[0])

import pkvm  # noqa: E402
from pkvm import guests  # noqa: E402
from pkvm.host.vmm import Vmm  # noqa: E402


def pkvm_loop(iterations: int) -> float:
    m = pkvm.Machine(memory="256M", cpus=2, trace=False)
    vmm = Vmm(m.host, guests.patch(guests.image("loop"), iterations), memory="16M",
              protected=True, out=io.StringIO())
    vcpu = vmm.vm.vcpus[0]
    vcpu.run  # noqa: B018
    # Warm: the first run faults the code page in and creates the hyp VM and vCPU.
    t = time.perf_counter()
    s = vmm.run()
    dt = time.perf_counter() - t
    assert s.reason == "shutdown", s
    vmm.destroy()
    return dt


def main() -> None:
    quick = "--quick" in sys.argv
    iters = 5_000_000 if quick else 50_000_000
    from bench_cpu import bare_loop  # the same bare-unicorn baseline as bench_cpu.py

    insns = 4 * iters + 5
    ours = [pkvm_loop(iters) for _ in range(3)]
    bare = [bare_loop(iters) for _ in range(3)]
    o, b = statistics.median(ours), statistics.median(bare)
    print(f"compute loop, {insns:,} instructions: pkvm protected VM {insns / o / 1e6:,.0f} MIPS, "
          f"bare unicorn {insns / b / 1e6:,.0f} MIPS, ratio {b / o:.2f}")

    n = 5_000 if quick else 50_000
    m = pkvm.Machine(memory="256M", cpus=2, trace=False)
    vmm = Vmm(m.host, guests.patch(guests.image("mmio"), n), memory="16M", protected=True,
              out=io.StringIO())
    t = time.perf_counter()
    s = vmm.run()
    dt = time.perf_counter() - t
    exits = s.mmio_reads + s.mmio_writes
    print(f"MMIO exit round trips: {exits / dt:,.0f}/s ({exits} exits in {dt:.2f} s)")
    vmm.destroy()

    mib = 8 if quick else 64
    m = pkvm.Machine(memory=f"{2 * mib + 128}M", cpus=2, trace=False)
    vmm = Vmm(m.host, guests.patch(guests.image("memwalk"), mib), memory=f"{mib + 2}M",
              protected=True, out=io.StringIO())
    t = time.perf_counter()
    s = vmm.run()
    dt = time.perf_counter() - t
    faults = s.exits.get("stage2_fault", 0)
    print(f"stage-2 fault + donate + re-enter: {faults / dt:,.0f}/s ({faults} faults in {dt:.2f} s)")
    vmm.destroy()


if __name__ == "__main__":
    main()
