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

Rebuild with `guests/build.sh` (Debian `binutils-aarch64-linux-gnu`).
"""

from __future__ import annotations

import struct
from importlib import resources

RAM_BASE = 0x4000_0000
UART_BASE = 0x0900_0000
UART_FR = UART_BASE + 0x18
UART_FR_VALUE = 0x90  # TXFE | RXFE: transmit FIFO empty, nothing to receive
PSCI_SYSTEM_OFF = 0x8400_0008

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
