"""What the hardware does with a stage-2 table: translate an IPA, or fault to EL2.

This is the walker of the *hardware* (the MMU), separate from the hyp's software walker: it
reads descriptors from RAM exactly as a CPU would, so a host access is checked against whatever
the hyp actually wrote, not against the hyp's bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pkvm.machine.memory import PhysMemory

HCR_VM = 1 << 0
HCR_FWB = 1 << 46

_ADDR = ((1 << 48) - 1) & ~0xFFF
S2AP_R = 1 << 6
S2AP_W = 1 << 7

FAULT_TRANSLATION = "translation"
FAULT_PERMISSION = "permission"


@dataclass
class El2Regs:
    """A CPU's EL2 system registers the model uses (per CPU)."""

    hcr_el2: int = 0
    vttbr_el2: int = 0
    vtcr_el2: int = 0
    cntvoff_el2: int = 0
    # The host's general-purpose registers as EL2 sees them at an HVC (x0..x30).
    host_regs: list[int] = field(default_factory=lambda: [0] * 31)


@dataclass(frozen=True)
class S2Fault:
    kind: str
    level: int
    ipa: int
    write: bool


def s2_translate(mem: PhysMemory, root: int, ipa: int, write: bool) -> tuple[int, S2Fault | None]:
    """Walk a 4-level, 4 KiB-granule stage-2 from `root`: (pa, None) or (0, fault)."""
    table = root
    read = mem.read_u64
    for level in range(4):
        shift = 39 - 9 * level
        pte = read(table + ((ipa >> shift) & 511) * 8)
        if not pte & 1:
            return 0, S2Fault(FAULT_TRANSLATION, level, ipa, write)
        if level < 3 and pte & 2:
            table = pte & _ADDR
            continue
        if level == 3 and not pte & 2:
            return 0, S2Fault(FAULT_TRANSLATION, level, ipa, write)
        if not pte & (S2AP_W if write else S2AP_R):
            return 0, S2Fault(FAULT_PERMISSION, level, ipa, write)
        mask = (1 << shift) - 1
        return (pte & _ADDR & ~mask) | (ipa & mask), None
    raise AssertionError("unreachable")
