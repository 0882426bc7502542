"""Guest programs: small AArch64 images of our own, built from `guests/*.S`.

Each image is a raw binary loaded at the start of guest RAM (IPA 0x4000_0000) and entered at
its first byte at EL1h with the MMU off (PSTATE 0x3C5, x0 = 0). The guest sees the QEMU virt
map: PL011 data register at IPA 0x0900_0000 (one byte store per character), flag register at
0x0900_0018; it powers off with PSCI SYSTEM_OFF (`hvc #0`, x0 = 0x8400_0008).

| name | what it does | output (UART) |
|---|---|---|
| `hello` | prints one line with byte stores, SYSTEM_OFF | `Hello from a pKVM guest!` |
| `memwalk` | writes then reads back a word in every page of N MiB from IPA 0x4010_0000; N is the u64 at image offset 8 (default 16, `patch()` it) | `memwalk: OK` or `memwalk: FAIL at 0x…` |
| `share` | protected guest: HYP_MEMINFO (0xC600_0002, expects 4096), MEM_SHARE (0xC600_0003, x1 = IPA of its page at image offset 0x1000), writes a message into that page and prints it | `share: hello through a shared page at 0x0000000040001000` |
| `oob` | loads 8 bytes from IPA 0x1_0000_0000 (past RAM: an MMIO read exit) and prints the value | `oob: read 0x…` |
| `smp` | 2 vCPUs: vCPU 0 calls PSCI CPU_ON (0xC400_0003, x1 = MPIDR 1, x2 = entry, x3 = 0x5ec0); vCPU 1 prints, sets a flag and calls CPU_OFF (0x8400_0002); vCPU 0 waits for the flag, prints, SYSTEM_OFF | `smp: vCPU 1 up, context 0x…5ec0`, `smp: vCPU 0 saw vCPU 1 report` |
| `mmio` | benchmark: N iterations (u64 at offset 8, default 100 000) of a 32-bit load from IPA 0x0A00_0000 and a store of that value + 1 back: 2N MMIO exits | – |
| `idregs` | reads ten AArch64 ID registers and ID_PFR0_EL1 and prints them, then writes ID_AA64PFR0_EL1 (its exception vector reports the UNDEF) | `ID_AA64PFR0_EL1=0x…` … `write: undef` |
| `loop` | compute kernel: N iterations of a 4-instruction body (N = u64 at offset 8, default 100 000 000), 4N + 5 instructions up to the HVC | – |

Rebuild with `guests/build.sh` (Debian `binutils-aarch64-linux-gnu`); docs/guests.md says how
to write your own. `image_problem(data)` tells an image that cannot be a raw AArch64 guest (empty,
ELF, gzip, text, a first word that no instruction encodes) and `explain_failure(reason)` puts a
guest's failed run (an exception to a vector it never set up) in words.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from importlib import resources

from pkvm.abi.psci import PSCI_0_2_FN_SYSTEM_OFF
from pkvm.host.kvm import GUEST_RAM_IPA
from pkvm.host.platform.pl011 import FR, FR_RXFE, FR_TXFE, UART_BASE

RAM_BASE = GUEST_RAM_IPA  # where a guest image is loaded and entered
UART_FR = UART_BASE + FR
UART_FR_VALUE = FR_TXFE | FR_RXFE  # transmit FIFO empty, nothing to receive
PSCI_SYSTEM_OFF = PSCI_0_2_FN_SYSTEM_OFF

PARAM_OFFSET = 8  # memwalk (MiB), loop and mmio (iterations): a u64 at this image offset
SHARE_PAGE_OFFSET = 0x1000  # share: the page it shares, relative to the image start
OOB_IPA = 0x1_0000_0000
SMP_CONTEXT = 0x5EC0

NAMES = ("hello", "memwalk", "share", "oob", "smp", "loop", "mmio", "idregs")
MMIO_BENCH_IPA = 0x0A00_0000


def image(name: str) -> bytes:
    """The raw image of the guest program `name` (one of `NAMES`)."""
    if name not in NAMES:
        raise ValueError(f"unknown guest {name!r}; choose one of {', '.join(NAMES)}")
    return resources.files(__package__).joinpath("images", f"{name}.bin").read_bytes()


def patch(data: bytes, value: int, offset: int = PARAM_OFFSET) -> bytes:
    """`data` with the u64 at `offset` replaced (memwalk's MiB, loop's and mmio's iterations)."""
    return data[:offset] + struct.pack("<Q", value) + data[offset + 8 :]


@dataclass(frozen=True)
class About:
    """What a built-in guest needs to run as intended, and what its output shows."""

    protected: bool = False  # needs a protected VM (pKVM's guest calls at EL2: 7.2 only)
    vcpus: int = 1  # needs at least this many vCPUs
    shows: str = ""


ABOUT: dict[str, About] = {
    "hello": About(shows="the guest printed through the UART (MMIO exits the VMM completed) and "
                   "powered off with PSCI SYSTEM_OFF"),
    "memwalk": About(shows="the guest wrote and read back every page of its memory: each first "
                     "touch was a stage-2 fault the host answered by mapping a page"),
    "share": About(protected=True, shows="the protected guest asked the hyp (MEM_SHARE) to "
                   "share one of its pages with the host, and the host read its message there"),
    "oob": About(shows="the guest loaded from IPA 0x1_0000_0000, past its RAM: no memory is "
                 "there, so the load became an MMIO exit and the VMM (no device at that "
                 "address) answered 0, which the guest printed"),
    "smp": About(vcpus=2, shows="vCPU 0 started vCPU 1 with PSCI CPU_ON (handled by the host), "
                 "and the two vCPUs talked through guest memory"),
    "loop": About(shows="the guest ran its compute loop (4 instructions an iteration, nothing "
                  "printed) and powered off: the run's wall time is the measure"),
    "mmio": About(shows="the guest made two MMIO exits an iteration (a load and a store at IPA "
                  "0x0A00_0000), each a full KVM_RUN round trip through the hyp"),
}

VECTOR_NAMES = ("synchronous", "IRQ", "FIQ", "SError")
VECTOR_FROM = ("the current EL with SP_EL0", "the current EL with SP_ELx",
               "a lower EL (AArch64)", "a lower EL (AArch32)")


def image_problem(data: bytes) -> str | None:
    """Why `data` cannot be a raw AArch64 guest image, or None when it may be one."""
    if not data:
        return "the image is empty (0 bytes)"
    if data[:4] == b"\x7fELF":
        return ("this is an ELF file, not a raw image: convert it with "
                "`aarch64-linux-gnu-objcopy -O binary IN.elf OUT.bin` (linked at 0x40000000; "
                "see docs/guests.md)")
    if data[:2] == b"\x1f\x8b":
        return "this is gzip-compressed: decompress it first (gunzip) and give the raw image"
    head = data[:512]
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head)
    if printable == len(head):
        return "this looks like text, not AArch64 machine code"
    if len(data) < 4:
        return f"the image has {len(data)} bytes: not even one AArch64 instruction"
    word = struct.unpack_from("<I", data)[0]
    op0 = (word >> 25) & 0xF
    if op0 in (0b0000, 0b0001, 0b0011):  # UDF / unallocated encodings of the A64 top level
        return (f"its first word {word:#010x} is no AArch64 instruction (the guest is entered at "
                "its first byte)")
    return None


def explain_failure(reason: str) -> str | None:
    """Words for a run that failed on an instruction fetch from a vector the guest never set
    up (VBAR_EL1 is 0 at reset: the exception vectors sit at IPA 0x0..0x800, outside RAM)."""
    m = re.search(r"addr (0x[0-9a-f]+)", reason)
    if not reason.startswith("fail") or m is None:
        return None
    addr = int(m.group(1), 16)
    if addr >= 0x800 or addr % 0x80:
        return None
    kind = VECTOR_NAMES[(addr >> 7) & 3]
    origin = VECTOR_FROM[addr >> 9]
    return (f"the guest took a {kind} exception from {origin} and jumped to its vector at "
            f"VBAR_EL1 + {addr:#x}, but it never set VBAR_EL1 (0 at reset, outside its RAM): "
            "its code hit an undefined instruction or a fault. Is the image raw AArch64 code "
            "built to run at 0x40000000 (docs/guests.md)?")
