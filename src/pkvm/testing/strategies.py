"""Hypothesis strategies for hostile hosts.

    from hypothesis import given
    from pkvm.testing import strategies as pst

    @given(calls=pst.call_sequences(abi="latest", max_size=20))
    def test_no_model_bug(calls):
        m = pkvm.Machine(memory="256M", cpus=2)
        for cpu, name, args in calls:
            try:
                m.hvc(cpu, name, *args)
            except pkvm.HypPanic:
                break           # an availability finding, not a model bug

Everything here draws plain ints and strings, so failing examples shrink and print as code.
"""

from __future__ import annotations

from hypothesis import strategies as st

from pkvm.abi.profiles import get_profile
from pkvm.board import carveout_layout
from pkvm.machine.memory import GIC_DIST_BASE, MMIO_END, PAGE_SHIFT, RAM_BASE, UART_BASE, parse_size

U64 = (1 << 64) - 1
RAM_BASE_PFN = RAM_BASE >> PAGE_SHIFT

# Values a careless hyp gets wrong: zero, all ones, sign bits, widths of handles and PAs, and the
# wraps measured on the real kernels (a pfn whose PA wraps back into RAM, past 2^36 and 2^48).
SPECIAL_U64: tuple[int, ...] = (
    0, 1, 2, 0xFFF, 0x1000, 0x1001, 0xFFFF, 0x10000, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF,
    1 << 32, 1 << 36, (1 << 36) - 1, 1 << 48, (1 << 48) - 1, 0xF_FFFF_FFFF_FFFF,
    0x10_0000_0000_0000, 0xFFF0_0000_0004_0000, 1 << 63, (1 << 63) - 1, U64, U64 - 1,
    0x8400_0000, 0x8600_0000, 0xC600_0000,
)


def u64s() -> st.SearchStrategy[int]:
    """Hostile 64-bit register values: the special values above, small ints, anything."""
    return st.one_of(st.sampled_from(SPECIAL_U64), st.integers(0, 0x2000),
                     st.integers(0, U64))


def handles() -> st.SearchStrategy[int]:
    """VM handles: the first few valid ones (0x1000...), 0, and values that overflow 16/32 bits."""
    return st.one_of(st.integers(0x1000, 0x1008), st.sampled_from(
        (0, 0xFFF, 0xFFFF, 0x10000, 0x1_0000_1000, 0xFFFF_FFFF, U64)), u64s())


def interesting_pfns(memory: int | str = "256M", cpus: int = 2, abi: str = "latest") -> list[int]:
    """Pfns at the boundaries of a machine of that size: RAM edges, carve-out edges, MMIO, wraps."""
    size = parse_size(memory)
    end_pfn = (RAM_BASE + size) >> PAGE_SHIFT
    base, csize = carveout_layout(size, get_profile(abi), cpus)
    cb, ce = base >> PAGE_SHIFT, (base + csize) >> PAGE_SHIFT
    uart, gic = UART_BASE >> PAGE_SHIFT, GIC_DIST_BASE >> PAGE_SHIFT
    out = [
        0, 1, uart, gic, (MMIO_END >> PAGE_SHIFT) - 1,
        RAM_BASE_PFN, RAM_BASE_PFN + 1, RAM_BASE_PFN + 2,
        cb - 1, cb, cb + 1, ce - 1, ce, end_pfn - 1, end_pfn, end_pfn + 1,
        (1 << 36) - 1, 1 << 36, (1 << 48) - 1, 0xF_FFFF_FFFF_FFFF, 0x10_0000_0000_0000,
        0xFFF0_0000_0000_0000 | RAM_BASE_PFN, U64,
    ]
    return sorted(set(out))


def pfns(memory: int | str = "256M", cpus: int = 2, abi: str = "latest") -> st.SearchStrategy[int]:
    """Pfns: near the boundaries of a machine of that shape, anywhere in its RAM, or any u64."""
    size = parse_size(memory)
    end_pfn = (RAM_BASE + size) >> PAGE_SHIFT
    edges = interesting_pfns(memory, cpus, abi)
    near = st.builds(lambda p, d: (p + d) & U64, st.sampled_from(edges), st.integers(-2, 2))
    return st.one_of(st.sampled_from(edges), near, st.integers(RAM_BASE_PFN, end_pfn - 1),
                     st.integers(0, U64))


def hcall_names(abi: str = "latest", exclude_boot: bool = False) -> st.SearchStrategy[str]:
    """Names of the profile's host hypercalls (optionally without the boot-time ones)."""
    prof = get_profile(abi)
    names = list(prof.hcalls)
    if exclude_boot:
        names = [n for i, n in enumerate(names) if i >= prof.min_pkvm]
    return st.sampled_from(names)


def calls(abi: str = "latest", cpus: int = 2, memory: int | str = "256M"
          ) -> st.SearchStrategy[tuple[int, str, tuple[int, ...]]]:
    """One call `(cpu, name, args)`; args mix pfns, handles and hostile u64s."""
    arg = st.one_of(pfns(memory, cpus, abi), handles(), u64s())
    return st.tuples(st.integers(0, cpus - 1), hcall_names(abi),
                     st.lists(arg, max_size=4).map(tuple))


def call_sequences(abi: str = "latest", cpus: int = 2, memory: int | str = "256M",
                   max_size: int = 20) -> st.SearchStrategy[list[tuple[int, str, tuple[int, ...]]]]:
    """Lists of calls to replay on one machine in order."""
    return st.lists(calls(abi, cpus, memory), max_size=max_size)
