"""Fast paths of a protected guest's page life (issue 17, round 3) against the generic code.

Each is a model speed-up, not kernel behaviour: Hypothesis draws the memblock map, the ranges and
the tables in place, and the fast answer must equal the generic one, errno for errno.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pkvm
from pkvm.hyp import memblock
from pkvm.machine.memory import PAGE_SIZE
from test_fast_paths import MEM, SETTINGS, addresses, memblocks


@pytest.fixture(scope="module")
def m72() -> pkvm.Machine:
    return pkvm.Machine(memory=MEM, cpus=2, abi="latest", trace=False)


@SETTINGS
@given(start=addresses(), size=st.sampled_from([1, 8, PAGE_SIZE, 2 * PAGE_SIZE, 1 << 21, 2**64 - 1]),
       regions=memblocks())
def test_check_range_allowed_memory_agrees_with_the_region_lookup(m72, start, size, regions):
    h = m72._hyp
    saved = h.hyp_memory
    h.hyp_memory = regions
    try:
        end = (start + size) & (2**64 - 1)
        fast = memblock.check_range_allowed_memory(h, start, end)
        generic = memblock._check_range_allowed_memory(h, start, end)
    finally:
        h.hyp_memory = saved
    assert fast == generic


@settings(max_examples=1, deadline=None)
@given(st.just(0))
def test_the_generic_check_is_reached(m72, _):
    """The generic lookup still answers a range that crosses a region's end."""
    h = m72._hyp
    reg = h.hyp_memory[-1]
    assert memblock.check_range_allowed_memory(h, reg.end - PAGE_SIZE, reg.end + PAGE_SIZE) == -22
