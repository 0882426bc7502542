"""HCR_EL2.TID3 on the guest core (`Core.trap_id_regs`): the fast path is the emulated CPU's own
trap; it must agree with the core without the trap everywhere but where the architecture says
they differ: an EL1 read of the ID-register group (op0 3, op1 0, CRn 0, CRm 1-7) exits to EL2
with EC 0x18 and PC on the MRS, with nothing after it run.

Each program: a few `add` on x0-x7, one MRS, a few more `add`, HVC #1. The reference runs the
same program on a core without the trap, and (for a trapped read) the program cut at the MRS.
"""

from __future__ import annotations

import functools

from hypothesis import given, settings
from hypothesis import strategies as st

from pkvm.machine.cpu import Core, ExitKind
from pkvm.machine.esr import EC, esr, sys64_iss
from test_cpu import CODE, MOV_X9_SP, RAM, VBAR, Platform, hvc

ID_GROUP = [(3, 0, 0, crm, op2) for crm in range(1, 8) for op2 in range(8)]
# Readable at EL1 and steady between two cores, next to the group or like it.
OTHERS = [
    (3, 0, 0, 0, 0),  # MIDR_EL1
    (3, 0, 0, 0, 5),  # MPIDR_EL1
    (3, 0, 0, 0, 6),  # REVIDR_EL1
    (3, 0, 1, 0, 0),  # SCTLR_EL1
    (3, 0, 2, 0, 2),  # TCR_EL1
    (3, 0, 4, 2, 2),  # CurrentEL
    (3, 0, 12, 0, 0),  # VBAR_EL1
    (3, 0, 13, 0, 4),  # TPIDR_EL1
    (3, 1, 0, 0, 1),  # CLIDR_EL1
    (3, 2, 0, 0, 0),  # CSSELR_EL1
    (3, 3, 0, 0, 1),  # CTR_EL0
    (3, 3, 0, 0, 7),  # DCZID_EL0
    (3, 3, 13, 0, 2),  # TPIDR_EL0
]


def mrs(enc: tuple[int, int, int, int, int], rt: int) -> int:
    op0, op1, crn, crm, op2 = enc
    return 0xD530_0000 | (op0 - 2) << 19 | op1 << 16 | crn << 12 | crm << 8 | op2 << 5 | rt


def add(rd: int, imm: int) -> int:
    """add xd, xd, #imm"""
    return 0x9100_0000 | imm << 10 | rd << 5 | rd


@functools.cache
def platform(tid3: bool) -> Platform:
    core = Core()
    if tid3:
        core.trap_id_regs()
    p = Platform(core=core)
    core.map(RAM, len(p.mem), p.addr)
    for slot in range(16):  # each vector reports its slot by HVC
        p.put(VBAR + slot * 0x80, [MOV_X9_SP, hvc(0x100 + slot)])
    return p


def run(tid3: bool, words: list[int], el: int, regs: dict[str, int]) -> tuple:
    p = platform(tid3)
    p.put(CODE, words)
    p.start(pstate=0x3C5 if el == 1 else 0x3C0, **regs)
    ex = p.core.run()
    return ex.kind, ex.esr, p.core.pc, [p.core.x(n) for n in range(10)]


adds = st.lists(st.tuples(st.integers(0, 7), st.integers(0, 4095)), max_size=3)


@settings(max_examples=300, deadline=None)
@given(enc=st.sampled_from(ID_GROUP + OTHERS), rt=st.integers(0, 31), el=st.sampled_from([0, 1]),
       before=adds, after=adds, values=st.lists(st.integers(0, 2**64 - 1), min_size=8,
                                                max_size=8))
def test_tid3_agrees_with_the_untrapped_core(enc, rt, el, before, after, values):
    regs = {f"x{n}": v for n, v in enumerate(values)}
    head = [add(rd, imm) for rd, imm in before]
    tail = [add(rd, imm) for rd, imm in after] + [hvc(1)]
    program = head + [mrs(enc, rt)] + tail
    trapped = run(True, program, el, regs)
    if el == 1 and enc in ID_GROUP:
        kind, esr_value, pc, xs = trapped
        op0, op1, crn, crm, op2 = enc
        assert kind is ExitKind.SYSREG
        assert esr_value == esr(EC.SYS64, sys64_iss(op0, op1, crn, crm, op2, rt, True))
        assert pc == CODE + 4 * len(head)  # on the MRS
        _, _, cut_pc, cut_xs = run(False, head + [hvc(1)], el, regs)
        assert cut_pc == pc + 4 and xs == cut_xs  # only the instructions before it ran
    else:
        assert trapped == run(False, program, el, regs)


def test_tid3_keeps_the_mrs_after_it_untouched():
    """The trap leaves every register as before the MRS, the one it targets included."""
    regs = {"x3": 0x1234, "x4": 7}
    kind, _, pc, xs = run(True, [add(4, 1), mrs((3, 0, 0, 4, 0), 3), add(4, 1), hvc(1)], 1, regs)
    assert (kind, pc, xs[3], xs[4]) == (ExitKind.SYSREG, CODE + 4, 0x1234, 8)
