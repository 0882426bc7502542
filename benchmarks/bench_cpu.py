"""Guest CPU speed: a compute loop through `pkvm.machine.cpu.Core` vs bare unicorn in the same
process, and MMIO exit round trips per second.

    .venv/bin/python benchmarks/bench_cpu.py [--iterations N] [--exits N] [--repeat R]

Targets (issue 4): Core >= 0.8x bare unicorn and >= 200 MIPS; >= 20 000 MMIO exits/s.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import statistics
import time

from unicorn import UC_ARCH_ARM64, UC_HOOK_INTR, UC_MODE_ARM, UC_PROT_ALL, Uc
from unicorn import arm64_const as A

from pkvm import guests
from pkvm.machine.cpu import Core, CpuContext, ExitKind, complete_mmio_read

RAM = guests.RAM_BASE
RAM_SIZE = 16 << 20


def _ram(image: bytes) -> tuple[mmap.mmap, int]:
    mem = mmap.mmap(-1, RAM_SIZE)
    mem[: len(image)] = image
    return mem, ctypes.addressof(ctypes.c_char.from_buffer(mem))


def core_loop(iterations: int) -> float:
    """CPU seconds for the loop guest on a Core, from entry to its SYSTEM_OFF HVC."""
    _mem, addr = _ram(guests.patch(guests.image("loop"), iterations))
    core = Core()
    core.map(RAM, RAM_SIZE, addr)
    core.load_context(CpuContext.reset(pc=RAM))
    t = time.process_time()
    ex = core.run()
    dt = time.process_time() - t
    assert ex.kind is ExitKind.HVC and core.x(0) == guests.PSCI_SYSTEM_OFF, ex
    del core
    return dt


def bare_loop(iterations: int) -> float:
    """The same guest on a bare unicorn instance (same CPU model, one region, one INTR hook)."""
    _mem, addr = _ram(guests.patch(guests.image("loop"), iterations))
    uc = Uc(UC_ARCH_ARM64, UC_MODE_ARM)
    uc.ctl_set_cpu_model(A.UC_CPU_ARM64_MAX)
    uc.mem_map_ptr(RAM, RAM_SIZE, UC_PROT_ALL, addr)
    # firmware-like set-up so that HVC reaches EL2 (SCR_EL3.HCE, RW) and EL1 is AArch64
    uc.reg_write(A.UC_ARM64_REG_CP_REG, (1, 1, 3, 6, 0, 0x531))
    uc.reg_write(A.UC_ARM64_REG_CP_REG, (1, 1, 3, 4, 0, 1 << 31))
    uc.reg_write(A.UC_ARM64_REG_PSTATE, 0x3C5)
    uc.reg_write(A.UC_ARM64_REG_CP_REG, (1, 0, 3, 0, 0, 0x00C50078))
    uc.hook_add(UC_HOOK_INTR, lambda uc, intno, data: uc.emu_stop())
    t = time.process_time()
    uc.emu_start(RAM, (1 << 64) - 1)
    dt = time.process_time() - t
    assert uc.reg_read(A.UC_ARM64_REG_X0) == guests.PSCI_SYSTEM_OFF
    return dt


def mmio_exits(iterations: int, with_context: bool) -> tuple[int, float]:
    """(exits, seconds) for the mmio guest; `with_context` adds save/load per exit as the
    run path's sync/flush would."""
    _mem, addr = _ram(guests.patch(guests.image("mmio"), iterations))
    core = Core()
    core.map(RAM, RAM_SIZE, addr)
    core.load_context(CpuContext.reset(pc=RAM))
    exits = 0
    t = time.process_time()
    while True:
        ex = core.run()
        if ex.kind is ExitKind.HVC:
            break
        exits += 1
        assert ex.kind is ExitKind.DABT and ex.isv, ex
        if with_context:
            ctx = core.save_context()
            if ex.write:
                ctx.pc += 4
            else:
                complete_mmio_read(ctx, ex.esr, 41)
            core.load_context(ctx)
        elif ex.write:
            core.skip()
        else:
            complete_mmio_read(core, ex.esr, 41)
    return exits, time.process_time() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=50_000_000, help="loop iterations")
    ap.add_argument("--exits", type=int, default=20_000, help="mmio iterations (2 exits each)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    insns = 4 * args.iterations + 5
    core_ts, bare_ts = [], []
    for _ in range(args.repeat):  # interleaved, so that load from other processes hits both
        core_ts.append(core_loop(args.iterations))
        bare_ts.append(bare_loop(args.iterations))
    core_t, bare_t = statistics.median(core_ts), statistics.median(bare_ts)
    core_mips, bare_mips = insns / core_t / 1e6, insns / bare_t / 1e6
    print(f"compute loop, {insns:,} instructions (median of {args.repeat}):")
    print(f"  Core          {core_mips:8.0f} MIPS")
    print(f"  bare unicorn  {bare_mips:8.0f} MIPS")
    print(f"  ratio         {core_mips / bare_mips:8.2f}x   (target >= 0.8x, >= 200 MIPS)")
    n, dt = mmio_exits(args.exits, with_context=False)
    print(f"MMIO exits      {n / dt:8.0f} /s   (run + complete on the Core; target >= 20000)")
    n, dt = mmio_exits(args.exits, with_context=True)
    print(f"MMIO exits      {n / dt:8.0f} /s   (with save_context/load_context per exit)")


if __name__ == "__main__":
    main()
