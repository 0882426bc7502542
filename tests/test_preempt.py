"""Wall-clock preemption of a guest core (`pkvm.machine.preempt`): stops land between
instructions, so a run cut into many slices ends exactly as an uninterrupted one."""

from __future__ import annotations

import ctypes
import mmap
import struct

import pytest

from pkvm.machine import preempt
from pkvm.machine.cpu import Core, CpuContext, ExitKind

BASE = 0x4000_0000
DATA = 0x1_0000
NODES = 4099
# 1: ldr x0, [x0]        chase the ring (the destination is the base: a replay would skip)
#    add x1, x1, #1
#    ldr x2, [x0, #8]
#    add x3, x3, x2
#    str x3, [x0, #8]    (a replay would add twice further on)
#    tst x1, #0xff
#    b.ne 1b
#    yield               (every 256 rounds, a busy-wait's cpu_relax(): where a stop may land)
#    cmp x1, x7
#    b.ne 1b
#    hvc #0
LOOP = [0xF940_0000, 0x9100_0421, 0xF940_0402, 0x8B02_0063, 0xF900_0403, 0xF240_1C3F,
        0x5400_0000 | (((-6) & 0x7FFFF) << 5) | 1, 0xD503_203F, 0xEB07_003F,
        0x5400_0000 | (((-9) & 0x7FFFF) << 5) | 1, 0xD400_0002]


def _core(iterations: int) -> tuple[Core, mmap.mmap]:
    ram = mmap.mmap(-1, 1 << 22)
    code = struct.pack(f"<{len(LOOP)}I", *LOOP)
    ram[: len(code)] = code
    for i in range(NODES):
        struct.pack_into("<QQ", ram, DATA + 16 * i, BASE + DATA + 16 * ((7 * i + 1) % NODES), i)
    core = Core()
    core.map(BASE, 1 << 22, ctypes.addressof(ctypes.c_char.from_buffer(ram)))
    ctx = CpuContext.reset(pc=BASE)
    ctx.x[0], ctx.x[7] = BASE + DATA, iterations
    core.load_context(ctx)
    return core, ram


def _state(core: Core, ram: mmap.mmap) -> tuple:
    return core.x(0), core.x(1), core.x(3), core.pc, bytes(ram[DATA : DATA + 16 * NODES])


@pytest.mark.skipif(not preempt.available(), reason="this unicorn build cannot be stopped")
def test_sliced_run_ends_exactly_as_an_uninterrupted_one():
    iterations = 256 * 800  # a multiple of the inner round
    core, ram = _core(iterations)
    assert core.run().kind is ExitKind.HVC
    expected = _state(core, ram)
    core, ram = _core(iterations)
    slices = 0
    while (ex := preempt.run_for(core, 0.0005)).kind is ExitKind.BUDGET and slices < 20_000:
        slices += 1
    assert ex.kind is ExitKind.HVC, "the loop overran its count: an instruction ran twice"
    assert slices >= 5  # it really was cut, many times
    assert _state(core, ram) == expected
