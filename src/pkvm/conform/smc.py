"""Host SMC conformance: the same `smc #imm` on the real kernels and on the model, x0..x17 compared.

The real side is the conformance module's `smc CPU IMM X0 .. X17` command (EL1 `smc #0`, `#1` or
`#0xffff` with x0..x17 loaded, every register read back). The model side is `Machine.smc` on a
machine shaped like the QEMU one (1 GiB, 2 CPUs) with no FF-A firmware: QEMU has none, so the
real FF-A proxy only negotiates versions and refuses. The host passes marker values in x8..x17
(and, in the rows that ask for it, x1..x7) so a register the hyp or firmware writes or leaves
shows; every one of x0..x17 is compared, none exempt.

Two sets: `fixed_calls()`, one call per measured case of the host-SMC tables (PSCI relay,
SMCCC, FF-A proxy, immediates and bits 63:32), and `random_calls(seed, n)`, seeded hostile
calls (PSCI, SMCCC, FF-A, OEM and SiP IDs with random arguments, immediates and upper bits).
Calls that power a CPU or the machine down (CPU_OFF, CPU_SUSPEND, SYSTEM_SUSPEND, SYSTEM_OFF,
SYSTEM_OFF2, SYSTEM_RESET, SYSTEM_RESET2) are in neither: each would end the shared boot
(`NOT_RUN` lists them with the reason, and `compare` prints it).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

import pkvm
from pkvm.abi import ffa, psci
from pkvm.conform.model import MACHINE, model_abi
from pkvm.conform.real import RealError, run_module_commands

U64 = (1 << 64) - 1
NREGS = 18
MARKERS = tuple(0x5EC0_0000_0000_0000 | (i << 8) | i for i in range(8, NREGS))
ARGS_11_77 = (0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77)

# IDs that power a CPU or the machine down, never sent (they would end the shared boot).
POWER_DOWN = frozenset({
    0x8400_0001, 0xC400_0001,  # CPU_SUSPEND
    0x8400_0002,  # CPU_OFF
    0x8400_0008, 0x8400_0009,  # SYSTEM_OFF, SYSTEM_RESET
    0x8400_000E, 0xC400_000E,  # SYSTEM_SUSPEND
    0x8400_0012, 0xC400_0012,  # SYSTEM_RESET2
    0x8400_0015, 0xC400_0015,  # SYSTEM_OFF2
})
NOT_RUN = ("CPU_OFF, CPU_SUSPEND, SYSTEM_SUSPEND, SYSTEM_OFF, SYSTEM_OFF2, SYSTEM_RESET and "
           "SYSTEM_RESET2 are not sent: each powers a CPU or the machine down and would end "
           "the boot the other calls share")


@dataclass(frozen=True)
class SmcCall:
    """One host SMC: x0..x17 as loaded (`regs`), the immediate and the calling CPU."""

    regs: tuple[int, ...]
    imm: int = 0
    cpu: int = 0
    label: str = ""

    def __post_init__(self) -> None:
        if len(self.regs) != NREGS:
            raise ValueError(f"an SMC call loads {NREGS} registers, not {len(self.regs)}")
        if self.imm not in (0, 1, 0xFFFF):
            raise ValueError("the module issues smc #0, #1 or #0xffff")
        if (self.regs[0] & 0xFFFF_FFFF) in POWER_DOWN:
            raise ValueError(f"{self.regs[0]:#x} powers down: {NOT_RUN}")

    def command(self) -> str:
        return " ".join(["smc", str(self.cpu), hex(self.imm), *(hex(r & U64) for r in self.regs)])


def call(x0: int, *args: int, imm: int = 0, cpu: int = 0, label: str = "") -> SmcCall:
    """x0, x1..x7 = `args` (0 when not given), x8..x17 = the markers."""
    if len(args) > 7:
        raise TypeError("x1..x7 at most; x8..x17 carry the markers")
    low = [x0 & U64, *(a & U64 for a in args)] + [0] * (7 - len(args))
    return SmcCall(tuple(low) + MARKERS, imm, cpu, label or f"{x0:#x}")


PSCI_VERSION, PSCI_FEATURES = psci.PSCI_0_2_FN_PSCI_VERSION, psci.PSCI_1_0_FN_PSCI_FEATURES
MIGRATE_INFO_TYPE = psci.PSCI_0_2_FN_MIGRATE_INFO_TYPE
CPU_ON32, CPU_ON64 = psci.PSCI_0_2_FN_CPU_ON, psci.PSCI_0_2_FN64_CPU_ON
AFF32, AFF64 = psci.PSCI_0_2_FN_AFFINITY_INFO, psci.PSCI_0_2_FN64_AFFINITY_INFO
FFA_ID_GET, FFA_FEATURES, FFA_VERSION = ffa.FFA_ID_GET, ffa.FFA_FEATURES, ffa.FFA_VERSION
FFA_RXTX_MAP32, FFA_RXTX_MAP64 = ffa.FFA_RXTX_MAP, ffa.FFA_FN64_RXTX_MAP
FFA_RXTX_UNMAP = ffa.FFA_RXTX_UNMAP
FFA_MEM_SHARE32, FFA_MEM_SHARE64 = ffa.FFA_MEM_SHARE, ffa.FFA_FN64_MEM_SHARE
FFA_MEM_LEND32, FFA_MEM_LEND64 = ffa.FFA_MEM_LEND, ffa.FFA_FN64_MEM_LEND
FFA_MEM_DONATE64 = ffa.FFA_FN64_MEM_DONATE
FFA_MEM_RECLAIM, FFA_PARTITION_INFO_GET = ffa.FFA_MEM_RECLAIM, ffa.FFA_PARTITION_INFO_GET
RAM_PAGE = 0x4800_0000  # a RAM page the host owns on both sides (never negotiated: not read)


def fixed_calls() -> list[SmcCall]:
    """One call per measured case of the host-SMC tables."""
    c = [
        call(PSCI_VERSION, label="PSCI_VERSION"),
        call(PSCI_VERSION, *ARGS_11_77, label="PSCI_VERSION x1..x7 set"),
        *(call(PSCI_FEATURES, f, label=f"PSCI_FEATURES {f:#x}") for f in (
            PSCI_VERSION, CPU_ON64, 0xC400_000E, 0xC400_0012, 0x8000_0000, FFA_VERSION)),
        call(MIGRATE_INFO_TYPE, label="MIGRATE_INFO_TYPE"),
        call(CPU_ON64, 1, 0, 0, 0x44, 0x55, 0x66, 0x77, label="CPU_ON64 cpu1 (on)"),
        call(CPU_ON64, 0, 0, 0, 0x44, 0x55, 0x66, 0x77, cpu=1, label="CPU_ON64 cpu0 (on)"),
        *(call(CPU_ON64, t, label=f"CPU_ON64 {t:#x}") for t in (2, 0x100, 0x100_0000_0000)),
        call(CPU_ON32, 1, label="CPU_ON32"),
        call(AFF32, 1, 0, label="AFFINITY_INFO32"),
        call(AFF64, 1, 0, label="AFFINITY_INFO64 cpu1"),
        call(AFF64, 2, 0, label="AFFINITY_INFO64 cpu2"),
        call(AFF64, 2, 1, label="AFFINITY_INFO64 cpu2 level 1"),  # found by the random set
        call(0xC400_0007, label="MIGRATE_INFO_UP_CPU64"),
        call(0x8400_001F, label="PSCI unassigned 32"),
        call(0xC400_001F, label="PSCI unassigned 64"),
        call(0x8401_0000, label="PSCI_VERSION + SVE hint"),
        call(0x1_8400_0000, label="PSCI_VERSION bit 32"),
        call(PSCI_VERSION, imm=1, label="smc #1 PSCI_VERSION"),
        call(FFA_ID_GET, imm=0xFFFF, label="smc #0xffff FFA_ID_GET"),
        call(0x8000_0000, label="SMCCC_VERSION"),
        *(call(0x8000_0001, w, label=f"SMCCC_ARCH_FEATURES {w:#x}")
          for w in (0x8000_8000, 0x8000_7FFF, 0x8000_3FFF)),
        call(0xC300_0000, *ARGS_11_77, label="OEM"),
        call(0x8200_0000, label="SiP"),
        call(FFA_ID_GET, *ARGS_11_77, label="FFA_ID_GET x1..x7 set"),
        *(call(FFA_FEATURES, f, label=f"FFA_FEATURES {f:#x}") for f in (
            FFA_MEM_SHARE64, FFA_MEM_LEND32, FFA_RXTX_MAP64, FFA_RXTX_MAP32, FFA_ID_GET)),
        call(FFA_RXTX_MAP64, RAM_PAGE, RAM_PAGE + 0x1000, 1, label="FFA_RXTX_MAP64 pages"),
        call(FFA_RXTX_MAP64, RAM_PAGE, RAM_PAGE, 1, label="FFA_RXTX_MAP64 same page"),
        call(FFA_RXTX_MAP64, 1, 2, 1, label="FFA_RXTX_MAP64 unaligned"),
        call(FFA_RXTX_MAP64, 0x1000_0000_0000, 0x1000_0000_1000, 1, label="RXTX_MAP no RAM"),
        call(FFA_RXTX_MAP64, RAM_PAGE + 0x2000, RAM_PAGE + 0x3000, 2, label="RXTX_MAP 2 pages"),
        call(FFA_RXTX_MAP32, RAM_PAGE + 0x2000, RAM_PAGE + 0x3000, 1, label="FFA_RXTX_MAP32"),
        call(FFA_RXTX_UNMAP, 0, label="FFA_RXTX_UNMAP"),
        *(call(f, 0x30, 0x30, 0, 0, label=f"FFA mem xfer {f:#x}") for f in (
            FFA_MEM_SHARE32, FFA_MEM_SHARE64, FFA_MEM_LEND32, FFA_MEM_LEND64, FFA_MEM_DONATE64)),
        call(FFA_MEM_SHARE64, 0x30, 0x30, RAM_PAGE + 0x4000, 1, label="FFA_MEM_SHARE64 buffer"),
        call(FFA_MEM_RECLAIM, 1, 0, 0, label="FFA_MEM_RECLAIM 1"),
        call(FFA_MEM_RECLAIM, 0xFFFF_FFFF, 0xFFFF_FFFF, 0, label="FFA_MEM_RECLAIM ~0"),
        call(FFA_PARTITION_INFO_GET, 0, 0, 0, 0, 0, label="FFA_PARTITION_INFO_GET"),
        *(call(f, 1, 0, 0x10, 0, label=f"FF-A range {f:#x}") for f in (
            ffa.FFA_MEM_FRAG_TX, ffa.FFA_RX_RELEASE, ffa.FFA_ERROR, ffa.FFA_SUCCESS, 0x8400_00FF,
            0xC400_00FF)),
        call(0x1_8400_0069, label="FFA_ID_GET bit 32"),
        call(0x8401_0069, label="FFA_ID_GET + SVE hint"),
        call(FFA_VERSION, 0x20000, label="FFA_VERSION 2.0"),
        call(FFA_VERSION, 0, label="FFA_VERSION 0.0"),
        call(FFA_VERSION, 0x10000, label="FFA_VERSION 1.0"),
        call(FFA_VERSION, 0x10000, label="FFA_VERSION 1.0 again"),
        call(FFA_VERSION, 0x10001, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, label="FFA_VERSION 1.1"),
        call(FFA_VERSION, 0x10002, label="FFA_VERSION 1.2"),
        call(FFA_ID_GET, label="FFA_ID_GET after versions"),
        call(FFA_RXTX_MAP64, RAM_PAGE, RAM_PAGE + 0x1000, 1, label="RXTX_MAP after versions"),
    ]
    return c


_RANGES = (
    ("psci", 0x8400_0000, 0x8400_001F), ("psci64", 0xC400_0000, 0xC400_001F),
    ("smccc", 0x8000_0000, 0x8000_0001), ("smccc-arch", 0x8000_3FFF, 0x8000_8000),
    ("ffa", 0x8400_0060, 0x8400_00FF), ("ffa64", 0xC400_0060, 0xC400_00FF),
    ("oem", 0xC300_0000, 0xC300_0001), ("sip", 0x8200_0000, 0x8200_0001),
)
_HOSTILE = (0, 1, 0xFFF, 0x1000, RAM_PAGE, 0x4000_0000, 0x7FFF_F000, 0xFFFF_FFFF,
            0x1_0000_0000, 0x8000_0000_0000_0000, U64)


def random_calls(seed: int, n: int) -> list[SmcCall]:
    """`n` seeded hostile SMCs: an ID from a PSCI, SMCCC, FF-A, OEM or SiP range (never one
    that powers down), arguments mixing hostile constants and random words, sometimes an
    immediate of 1 or 0xffff, bits 63:32 of x0 or the SVE hint set, either CPU."""
    rng = random.Random(seed)
    out: list[SmcCall] = []
    while len(out) < n:
        kind, lo, hi = rng.choice(_RANGES)
        fid = rng.randint(lo, hi)
        if fid in POWER_DOWN:
            continue
        x0 = fid
        r = rng.random()
        if r < 0.1:
            x0 |= rng.randint(1, 0xFFFF_FFFF) << 32
        elif r < 0.2:
            x0 |= 1 << 16
        args = [rng.choice(_HOSTILE) if rng.random() < 0.6 else rng.getrandbits(64)
                for _ in range(rng.randint(0, 7))]
        imm = rng.choices((0, 1, 0xFFFF), (8, 1, 1))[0]
        out.append(call(x0, *args, imm=imm, cpu=rng.randint(0, 1),
                        label=f"random {seed}/{len(out)} {kind}"))
    return out


# -- the two sides -----------------------------------------------------------------------------
def run_model(kernel: str, calls: list[SmcCall]) -> list[tuple[int, ...] | str]:
    """Each call's x0..x17 on one model machine (a hyp panic: its reason, and the rest not run)."""

    m = pkvm.Machine(abi=model_abi(kernel), trace=False, **MACHINE)  # no FF-A firmware
    out: list[tuple[int, ...] | str] = []
    for c in calls:
        if m.dead:
            out.append("not run: machine dead")
            continue
        try:
            out.append(tuple(m.smc(c.cpu, c.regs[0], *c.regs[1:], imm=c.imm).regs))
        except pkvm.HypPanic as e:
            out.append(f"hyp panic: {e.reason}")
    return out


def run_real(kernel: str, calls: list[SmcCall]) -> list[tuple[int, ...] | str]:
    """Each call's x0..x17 on one fresh real machine (a call the machine died at, and those
    after it, carry the console's last line)."""

    answers, console = run_module_commands(kernel, [c.command() for c in calls])
    out: list[tuple[int, ...] | str] = []
    for i in range(len(calls)):
        if i >= len(answers):
            tail = console.strip().splitlines()[-1:] or [""]
            out.append(f"machine died: {tail[0][:200]}")
            continue
        msg = json.loads(answers[i][answers[i].index("{"):])
        if "error" in msg:
            raise RealError(f"module refused {calls[i].command()!r}: {msg['error']}")
        out.append(tuple(int(v, 16) for v in msg["smc"]))
    return out


@dataclass
class SmcReport:
    kernel: str
    calls: list[SmcCall]
    real: list[tuple[int, ...] | str]
    model: list[tuple[int, ...] | str]
    differences: list[str] = field(default_factory=list)

    @property
    def agree(self) -> int:
        return len(self.calls) - len(self.differences)

    def summary(self) -> str:
        lines = [f"{self.kernel}: {self.agree}/{len(self.calls)} SMCs agree on x0..x17",
                 f"  not sent: {NOT_RUN}"]
        lines += [f"  DIFF {d}" for d in self.differences]
        return "\n".join(lines)


def _diff(c: SmcCall, real: tuple[int, ...] | str, model: tuple[int, ...] | str) -> str | None:
    if real == model:
        return None
    if isinstance(real, str) or isinstance(model, str):
        return f"{c.label} ({c.command()}): real {real!r}, model {model!r}"
    regs = [f"x{i} real {r:#x} model {m:#x}" for i, (r, m) in enumerate(zip(real, model))
            if r != m]
    return f"{c.label} ({c.command()}): " + "; ".join(regs)


def compare(kernel: str, calls: list[SmcCall],
            real: list[tuple[int, ...] | str] | None = None) -> SmcReport:
    """Run `calls` on both sides (the real side's answers may be passed in) and compare."""
    real = real if real is not None else run_real(kernel, calls)
    model = run_model(kernel, calls)
    rep = SmcReport(kernel, calls, real, model)
    for c, r, m in zip(calls, real, model, strict=True):
        d = _diff(c, r, m)
        if d:
            rep.differences.append(d)
    return rep
