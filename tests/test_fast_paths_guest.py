"""Fast paths of the guest transitions agree with the generic code they short-cut (issue 17).

Each is a model speed-up, not kernel behaviour: Hypothesis draws the inputs and the fast answer
must equal the generic one.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pkvm.hyp.mem_protect import pkvm_getstate
from pkvm.hyp.mem_protect_guest import guest_state_of_pte
from pkvm.hyp.memory import PageState
from pkvm.hyp.pgtable import pte_valid, stage2_pte_prot


def generic_guest_state(pte: int) -> PageState:
    """`guest_get_page_state` as the kernel writes it: poisoned, invalid, else the state the
    leaf's prot carries."""
    if not pte_valid(pte) and pte >> 60 == 3:  # KVM_GUEST_INVALID_PTE_TYPE_POISONED
        return PageState.POISON
    if not pte_valid(pte):
        return PageState.NOPAGE
    return pkvm_getstate(stage2_pte_prot(pte))


def ptes() -> st.SearchStrategy[int]:
    """Any 64-bit descriptor, and ones built from the bits that matter: valid, the software
    bits, the XN and S2AP fields, the invalid-PTE type."""
    built = st.builds(lambda valid, sw, hi, lo: valid | sw << 55 | hi << 59 | lo,
                      st.integers(0, 1), st.integers(0, 15), st.integers(0, 31),
                      st.integers(0, (1 << 55) - 1))
    return st.one_of(st.integers(0, 2**64 - 1), built)


@settings(max_examples=2000, deadline=None)
@given(ptes())
def test_guest_state_of_pte_agrees_with_the_prot_of_the_leaf(pte):
    fast = guest_state_of_pte(pte)
    assert fast == generic_guest_state(pte)
    assert type(fast) is PageState


def test_every_state_a_guest_leaf_holds_is_reached():
    assert {guest_state_of_pte(p) for p in (0, 3 << 60, 1, 1 | 1 << 55, 1 | 2 << 55, 1 | 3 << 55)} \
        == set(PageState)
