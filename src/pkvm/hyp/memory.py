"""`hyp_vmemmap` and page states (`include/nvhe/memory.h`, `include/nvhe/mem_protect.h`).

One `struct hyp_page` per RAM page: refcount, buddy order and, in 7.2, the host and hyp page
states and the non-protected-guest share count. Its pages are reserved in the hyp carve-out
(sized by `sizeof(struct hyp_page)`, 4 or 8 bytes) and mapped in the hyp stage-1 like Linux's;
the field values are kept in typed arrays beside them for speed (a model choice: nothing but
EL2 can reach either).

`HypVmemmap.dirty` is model bookkeeping with no kernel counterpart: when a checker records
(`pkvm.inspect.VmemmapView.record_dirty`), every store to an entry's refcount, states or share
count notes the entry (`touch`), so the checker learns which pages a call changed without
comparing the whole vmemmap.

`PageStates` is where a kernel keeps each page's host and hyp states: 7.2 in these fields
(`pkvm.hyp.mem_protect.VmemmapPageStates`), 6.12 in the software bits of the host stage-2 and
hyp stage-1 leaves (`pkvm.hyp.mem_protect_6_12.PtePageStates`); `HypState.page_states` is the
one of the kernel `h` runs, chosen by `Profile.page_state_in_vmemmap`.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from array import array
from typing import TYPE_CHECKING, Any, ClassVar, Final, Protocol

from pkvm.hyp.panic import HypBug
from pkvm.machine.memory import PAGE_SHIFT, PhysMemory

if TYPE_CHECKING:
    from pkvm.abi.profiles import Profile
    from pkvm.hyp.state import HypState


class PageState(enum.IntEnum):
    """`enum pkvm_page_state` (7.2 values; 6.12 stores the first three in PTE software bits)."""

    OWNED = 0
    SHARED_OWNED = 1
    SHARED_BORROWED = 2
    NOPAGE = 3
    POISON = 4


class ComponentId(enum.IntEnum):
    """`enum pkvm_component_id`: also the page-table locking order."""

    HOST = 0
    HYP = 1
    GUEST = 2


class HypVmemmap:
    """`struct hyp_page hyp_vmemmap[]` over all of RAM, indexed by physical address."""

    def __init__(self, base_pfn: int, nr: int, hyp_no_order: int):
        n = nr
        self.base_pfn = base_pfn
        self.nr = n
        self.hyp_no_order = hyp_no_order
        self.refcount = array("H", bytes(2 * n))
        self.order = array("H", bytes(2 * n))
        # 7.2 only (6.12 keeps states in the page tables): a zeroed vmemmap reads host OWNED,
        # hyp NOPAGE, as Linux's XOR-complemented hyp field does.
        self.host_state = array("B", bytes(n))
        self.hyp_state = array("B", [PageState.NOPAGE]) * n
        self.host_share_guest_count = array("I", bytes(4 * n))
        # Entries (indices) whose refcount, states or share count were stored to since a checker
        # last drained them; None while nothing records.
        self.dirty: set[int] | None = None

    @classmethod
    def over(cls, mem: PhysMemory, hyp_no_order: int) -> HypVmemmap:
        """The vmemmap of all of `mem`'s RAM."""
        return cls(mem.base_pfn, mem.nr_pages, hyp_no_order)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled (a machine snapshot) as its extent and its arrays: a load builds it with no
        entries (not arrays its state then replaces), then sets its length and arrays."""
        return (HypVmemmap, (self.base_pfn, 0, self.hyp_no_order),
                (self.nr, self.refcount, self.order, self.host_state, self.hyp_state,
                 self.host_share_guest_count, self.dirty))

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        (self.nr, self.refcount, self.order, self.host_state, self.hyp_state,
         self.host_share_guest_count, self.dirty) = state

    def touch(self, i: int) -> None:
        """Note that entry `i`'s refcount, states or share count was stored to (see `dirty`)."""
        d = self.dirty
        if d is not None:
            d.add(i)

    def touch_range(self, i: int, n: int) -> None:
        """`touch` of entries [i, i + n)."""
        d = self.dirty
        if d is not None:
            if n == 1:  # (a page: `add`, without the range object and the update's iteration)
                d.add(i)
            else:
                d.update(range(i, i + n))

    def idx(self, pa: int) -> int:
        """`hyp_phys_to_page`: the entry of `pa`. Outside RAM the kernel's pointer lands outside
        the mapped vmemmap and EL2 takes a data abort (hyp panic); never a wrapped index."""
        i = (pa >> PAGE_SHIFT) - self.base_pfn
        if not 0 <= i < self.nr:
            raise HypBug(f"EL2 data abort: hyp_vmemmap entry of PA {pa:#x} is not mapped")
        return i

    def covers(self, pa: int) -> bool:
        return 0 <= (pa >> PAGE_SHIFT) - self.base_pfn < self.nr

    def page_count(self, pa: int) -> int:
        return self.refcount[self.idx(pa)]

    def clear(self, pa: int) -> None:
        """`memset(hyp_page, 0, ...)` (6.12 drains): every field back to zero."""
        i = self.idx(pa)
        self.touch(i)
        self.refcount[i] = 0
        self.order[i] = 0
        self.host_state[i] = PageState.OWNED
        self.hyp_state[i] = PageState.NOPAGE
        self.host_share_guest_count[i] = 0


# -- the page-state store: one per kernel, chosen by the profile -----------------------------
class HostHypTransitions(Protocol):
    """A kernel's `__pkvm_host_share_hyp`, `__pkvm_host_unshare_hyp`, `__pkvm_host_donate_hyp`
    and `__pkvm_hyp_donate_host` (the module that defines them)."""

    def host_share_hyp(self, h: HypState, pfn: int) -> int: ...

    def host_unshare_hyp(self, h: HypState, pfn: int) -> int: ...

    def host_donate_hyp(self, h: HypState, pfn: int, nr_pages: int) -> int: ...

    def hyp_donate_host(self, h: HypState, pfn: int, nr_pages: int) -> int: ...


class PageStates(ABC):
    """Where a kernel keeps each page's host and hyp states, and (`transitions`) the host <-> hyp
    transitions whose shape follows from it. Every method runs with the locks its kernel
    function takes."""

    transitions: ClassVar[HostHypTransitions]

    @abstractmethod
    def get_host_state(self, h: HypState, pa: int) -> PageState: ...

    @abstractmethod
    def get_hyp_state(self, h: HypState, pa: int) -> PageState: ...

    @abstractmethod
    def host_check_page_state_range(self, h: HypState, addr: int, size: int,
                                    state: PageState) -> int:
        """`__host_check_page_state_range`: 0, or the errno of the first page not in `state`."""

    @abstractmethod
    def hyp_check_page_state_range(self, h: HypState, phys: int, size: int,
                                   state: PageState) -> int:
        """`__hyp_check_page_state_range` of the hyp's linear map of [phys, phys + size)."""

    @abstractmethod
    def host_set_page_state_range(self, h: HypState, addr: int, size: int,
                                  state: PageState) -> int:
        """`__host_set_page_state_range`: the host keeps the pages, in `state`."""

    @abstractmethod
    def host_stage2_set_owner_locked(self, h: HypState, addr: int, size: int, owner: int) -> int:
        """`host_stage2_set_owner_locked`: the pages leave the host (or come back to it)."""

    @abstractmethod
    def hyp_may_write(self, h: HypState, pa: int) -> bool:
        """Is the RAM page at `pa` one the hyp owns or borrows (so EL2 may store to it)?"""

    @abstractmethod
    def fix_host_ownership_page(self, h: HypState, phys: int, state: PageState) -> int:
        """`fix_host_ownership_walker` for one page the hyp stage-1 maps in `state`: the host
        stage-2 (and, where the kernel keeps them, the page's states) made to agree."""

    @abstractmethod
    def pin_first(self, h: HypState, va: int) -> None:
        """`hyp_pin_shared_mem` took the first reference on the page at hyp VA `va`."""

    @abstractmethod
    def unpin_last(self, h: HypState, va: int) -> None:
        """`hyp_unpin_shared_mem` is about to drop the last reference on the page at `va`."""


_STORES: Final[dict[bool, PageStates]] = {}


def select_page_states(profile: Profile) -> PageStates:
    """The page-state store of `profile`'s kernel (one object per kernel, made once)."""
    if not _STORES:
        # The stores are written on top of this module (they use the vmemmap and the page
        # tables): imported here, a cycle broken on purpose.
        from pkvm.hyp.mem_protect import VmemmapPageStates
        from pkvm.hyp.mem_protect_6_12 import PtePageStates

        _STORES.update({True: VmemmapPageStates(), False: PtePageStates()})
    return _STORES[profile.page_state_in_vmemmap]
