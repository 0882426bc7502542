"""Page-ownership invariants: each RAM page's states against every table that maps it.

`PageInvariants` is the part of the `Checker` (`pkvm.check.invariants`) that checks one page at
a time: its (host, hyp) state pair, the guest stage-2 mappings of it, the host stage-2 leaf
(annotation or identity map) and the hyp stage-1 leaf.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any, Final

from pkvm.abi.sizes import HANDLE_OFFSET
from pkvm.arch.pgtable import KVM_PTE_ADDR_MASK, pte_valid
from pkvm.check.violations import InvariantViolation
from pkvm.inspect import (
    ComponentId,
    HypView,
    PageState,
    PkvmHypVm,
    decode_host_annotation,
    guest_state_of_pte,
    hyp_state_of_pte,
    hyp_va,
)
from pkvm.machine.memory import PAGE_SHIFT

OWNED: Final = PageState.OWNED
SO: Final = PageState.SHARED_OWNED
SB: Final = PageState.SHARED_BORROWED
NOPAGE: Final = PageState.NOPAGE
_STATE_OF: Final[dict[int, PageState]] = {int(s): s for s in PageState}  # a state byte's member

# (host, hyp, guest states) a RAM page may be in after any of nvhe/mem_protect.c's
# transitions; "*" = N >= 1 guests.
ALLOWED_PAIRS_7_2: dict[tuple[PageState, PageState], str] = {
    (OWNED, NOPAGE): "ordinary host memory",
    (SO, SB): "shared with the hyp",
    (NOPAGE, OWNED): "hyp-owned (carve-out or donated)",
    (SO, NOPAGE): "shared with FF-A or with N non-protected guests",
    (NOPAGE, NOPAGE): "donated to a protected guest",
    (SB, NOPAGE): "a protected guest shared it back",
}
ALLOWED_PAIRS_6_12: dict[tuple[PageState, PageState], str] = {
    (OWNED, NOPAGE): "ordinary host memory",
    (SO, SB): "shared with the hyp",
    (NOPAGE, OWNED): "hyp-owned (carve-out or donated)",
    (SB, SO): "kvm_vgic_global_state page",
    (SO, NOPAGE): "shared with FF-A",
}


def _valid_leaves(mem: Any, pgd: int, start_level: int,
                  tables: list[tuple[int, bytes]] | None = None) -> list[tuple[int, int]]:
    """(level, pte) of every valid leaf under `pgd`: whole tables read at once (fast). With
    `tables`, each table page read is appended to it as (word offset, its bytes)."""
    out: list[tuple[int, int]] = []
    u64, base = mem.u64, mem.base
    stack = [(pgd, start_level)]
    while stack:
        table, level = stack.pop()
        off = (table - base) >> 3
        words = u64[off:off + 512]
        if tables is not None:
            tables.append((off, words.tobytes()))
        for pte in filter(None, words.tolist()):  # (most entries are 0: skipped at C speed)
            if not pte & 1:
                continue
            if level < 3 and pte & 2:
                stack.append((pte & KVM_PTE_ADDR_MASK, level + 1))
            else:
                out.append((level, pte))
    return out


# One table page of a guest stage-2 as `guest_leaves` read it: (word offset in RAM, its bytes,
# its level, the pages its own valid leaves map as [(pfn, state)], the next-level tables its
# valid table entries point to as [(PA, level)]), each list in entry order.
TablePage = tuple[int, bytes, int, list[tuple[int, PageState]], list[tuple[int, int]]]
# A guest stage-2's leaves as `guest_map` lists them, and the table pages they were read from.
GuestLeaves = tuple[list[TablePage], list[tuple[int, PageState]]]


def _parse_table(words: list[int], level: int) -> tuple[list[tuple[int, PageState]],
                                                        list[tuple[int, int]]]:
    """The pages mapped by the valid leaves of one table page at `level` (its 512 entries),
    and the next-level tables it points to, in entry order (as `_valid_leaves` meets them)."""
    pages: list[tuple[int, PageState]] = []
    children: list[tuple[int, int]] = []
    for pte in filter(None, words):  # (most entries are 0: skipped at C speed)
        if not pte & 1:
            continue
        if level < 3 and pte & 2:
            children.append((pte & KVM_PTE_ADDR_MASK, level + 1))
        else:
            pfn = (pte & KVM_PTE_ADDR_MASK) >> PAGE_SHIFT
            st = guest_state_of_pte(pte)
            pages += [(pfn + k, st) for k in range(1 << (9 * (3 - level)))]
    return pages, children


def guest_leaves(mem: Any, pgd: int, start_level: int, handle: int,
                 last: GuestLeaves | None) -> GuestLeaves:
    """[(pfn, state)] of every page a guest stage-2's valid leaves map, with the table pages
    read. `last` (an earlier answer for the same root) is reused when every table page it read
    holds the same bytes now: the walk would read the same tables and find the same leaves.
    Else the walk reads every table page again, and parses (`_parse_table`) only those whose
    bytes differ from what `last` read at the same place and level: a table page's own leaves
    and next-level pointers are a function of its bytes and level alone."""
    u64 = mem.u64
    kept: dict[tuple[int, int], TablePage] = {}
    if last is not None:
        if all(u64[t[0]:t[0] + 512].tobytes() == t[1] for t in last[0]):
            return last
        kept = {(t[0], t[2]): t for t in last[0]}
    tables: list[TablePage] = []
    pages: list[tuple[int, PageState]] = []
    base = mem.base
    stack = [(pgd, start_level)]
    while stack:  # depth first, as `_valid_leaves` walks
        table, level = stack.pop()
        off = (table - base) >> 3
        words = u64[off:off + 512]
        raw = words.tobytes()
        t = kept.get((off, level))
        if t is None or t[1] != raw:
            here, children = _parse_table(words.tolist(), level)
            t = (off, raw, level, here, children)
        tables.append(t)
        pages += t[3]
        stack += t[4]
    return tables, pages


def plain_page(host: int, hyp: int, share_count: int, hpte: int, ypte: int, pa: int,
               guests: list[tuple[int, PageState]]) -> bool:
    """7.2 (states in `hyp_vmemmap`): a page for which every check of
    `PageInvariants._check_page` holds, of the two kinds most pages are: ordinary host memory
    nothing else maps (host OWNED, hyp NOPAGE, host leaf empty or valid, no valid hyp leaf),
    or a page the hyp owns (host NOPAGE with a host annotation naming the hyp, hyp OWNED and
    mapped at EL2 at its own address); in both, no guest shares or maps it. The checks' fast
    path."""
    if share_count or guests:
        return False
    if host == OWNED and hyp == NOPAGE:
        return (hpte == 0 or hpte & 1 == 1) and not ypte & 1
    if host == NOPAGE and hyp == OWNED and ypte & 1 and (ypte & KVM_PTE_ADDR_MASK) == pa:
        ann = decode_host_annotation(hpte)
        return ann is not None and ann[0] == ComponentId.HYP
    return False


def plain_page_6_12(host: int, hyp: int) -> bool:
    """6.12 (states in the page tables, no guest stage-2 at EL2): host OWNED and hyp NOPAGE,
    for which every check of `PageInvariants._check_page` holds whatever the leaves: the
    checks' fast path."""
    return host == OWNED and hyp == NOPAGE


class PageInvariants:
    """Per-page checks; the `Checker` supplies the state below."""

    h: HypView
    _ram_lo: int
    _ram_hi: int
    _in_vmemmap: bool
    _live: list[tuple[int, PkvmHypVm]] | None
    _gmap: dict[int, list[tuple[int, PageState]]] | None
    _leaf_cache: dict[tuple[int, int, int], GuestLeaves]  # (handle, pgd, start level) -> leaves
    _gmap_built: dict[int, list[tuple[int, PageState]]] | None  # the map built from them
    orphan_owned: set[int]
    orphan_borrowed: Counter[int]

    def page_states(self, pfn: int) -> tuple[PageState, PageState]:
        """(host, hyp) states of RAM page `pfn`, as `host_state` / `hyp_state` read them; in
        7.2 straight from the vmemmap's state bytes (tests/test_checker_fast.py compares)."""
        if self._in_vmemmap and self._ram_lo <= pfn < self._ram_hi:
            vmm = self.h.vmemmap
            i = pfn - self._ram_lo
            host, hyp = _STATE_OF.get(vmm.host_state[i]), _STATE_OF.get(vmm.hyp_state[i])
            if host is not None and hyp is not None:
                return host, hyp
        pa = pfn << PAGE_SHIFT
        return self.h.host_state(pa), self.h.hyp_state(pa)

    _live_of: object = None  # the `vm_slots` answer `_live` was taken from

    def live_vms(self) -> list[tuple[int, PkvmHypVm]]:
        """(handle, VM) of every hyp VM in the table (do not modify the list; cached for one
        check): taken from the used slots (`HypView.vm_slots`, one reading per held state)
        rather than a scan of the table's 255 slots (`HypView.live_vms`, which
        tests/test_checker_fast.py compares), and only while `vm_slots` answers the same list
        (it answers a new one when any slot changed)."""
        slots = self.h.vm_slots()
        if self._live is not None and slots is self._live_of:
            return self._live
        out = [(i + HANDLE_OFFSET, s) for i, s in slots if isinstance(s, PkvmHypVm)]
        self._live, self._live_of = out, slots
        return out

    def guest_map(self) -> dict[int, list[tuple[int, PageState]]]:
        """pfn -> [(handle, guest state)] over every valid leaf of every hyp-owned guest stage-2.

        Cached between calls that cannot change a guest stage-2 (`_GUEST_S2_STILL`); each
        stage-2's leaves are read again only when one of its table pages changed
        (`guest_leaves`)."""
        if self._gmap is not None:
            return self._gmap
        last, cache = self._leaf_cache, {}
        for handle, vm in self.live_vms():
            if vm.pgt is None or not vm.pgt.pgd:
                continue
            key = (handle, vm.pgt.pgd, vm.pgt.start_level)
            cache[key] = guest_leaves(self.h.mem, key[1], key[2], handle, last.get(key))
        self._leaf_cache = cache
        if self._gmap_built is not None and list(cache) == list(last) and all(
                a[1] is b[1] for a, b in zip(cache.values(), last.values())):
            self._gmap = self._gmap_built  # every guest's leaves as the last map had them
            return self._gmap
        out: dict[int, list[tuple[int, PageState]]] = {}
        for (handle, _, _), (_, pages) in self._leaf_cache.items():
            for pfn, st in pages:
                out.setdefault(pfn, []).append((handle, st))
        self._gmap = self._gmap_built = out
        return out

    def _guest_pages_of(self, raw_handle: int) -> list[tuple[int, PageState]]:
        handle = self.h.profile.handle(raw_handle)
        return [(pfn, st) for pfn, lst in self.guest_map().items() for hd, st in lst
                if hd == handle]

    def check_pages(self, pfns: Iterable[int], call: str = "",
                    gmap: dict[int, list[tuple[int, PageState]]] | None = None) -> None:
        pfns = [p for p in pfns if self._ram_lo <= p < self._ram_hi]
        if not pfns:
            return
        h = self.h
        if gmap is None:
            gmap = self.guest_map() if h.profile.hyp_owned_guest_stage2 else {}
        host_pgt = h.host_pgt
        hyp_pgt = h.hyp_pgt
        in_vmemmap = self._in_vmemmap
        vmm = h.vmemmap
        hs, ys, sc, lo = vmm.host_state, vmm.hyp_state, vmm.host_share_guest_count, self._ram_lo
        for pfn in pfns:
            pa = pfn << PAGE_SHIFT
            _, hpte, _ = host_pgt.get_leaf(pa)
            ret, ypte, _ = hyp_pgt.get_leaf(hyp_va(pa))
            ypte = 0 if ret else ypte
            guests = gmap.get(pfn, [])
            if in_vmemmap:
                i: Any = pfn - lo  # (boxed once for the three reads)
                if plain_page(hs[i], ys[i], sc[i], hpte, ypte, pa, guests):
                    continue  # every check of `_check_page` holds (test_checker_fast.py)
                states = self.page_states(pfn)
            else:  # 6.12 keeps the states in these same two leaves: read from them
                states = (h.host_state_of_pte(hpte, pa), hyp_state_of_pte(ypte))
                if plain_page_6_12(*states):
                    continue
            self._check_page(pfn, states, hpte, ypte, guests)

    def _check_page(self, pfn: int, states: tuple[PageState, PageState], hpte: int, ypte: int,
                    guests: list[tuple[int, PageState]]) -> None:
        h = self.h
        host, hyp = states
        i = pfn - self._ram_lo
        vmm = h.vmemmap
        pa = pfn << PAGE_SHIFT
        allowed = ALLOWED_PAIRS_7_2 if self._in_vmemmap else ALLOWED_PAIRS_6_12
        pair = (host, hyp)
        if pair not in allowed:
            raise InvariantViolation("state-pair", "(host, hyp) is not a pair any transition leaves",
                                     pfn, "one of " + ", ".join(f"{a.name}/{b.name}" for a, b in allowed),
                                     f"{host.name}/{hyp.name}")
        # guests (the hyp keeps their stage-2s and the host shares pages with them: 7.2)
        if self.h.profile.hyp_owned_guest_stage2:
            gstates = [s for _, s in guests]
            owners = [g for g, s in guests if s in (OWNED, SO)]
            borrowed = gstates.count(SB)
            if len(owners) > 1:
                raise InvariantViolation("guest-consistent", "two guests own one page", pfn,
                                         "at most one guest owner", owners)
            want: str | None = None
            orphan = pfn in self.orphan_owned and not gstates
            obor = self.orphan_borrowed.get(pfn, 0)
            if pair == (NOPAGE, NOPAGE) and gstates != [OWNED] and not orphan:
                want = "exactly one guest mapping, OWNED"
            elif pair == (SB, NOPAGE) and gstates != [SO] and not orphan:
                want = "exactly one guest mapping, SHARED_OWNED"
            elif pair == (SO, NOPAGE):
                if any(s != SB for s in gstates) or borrowed + obor != vmm.host_share_guest_count[i]:
                    want = f"{vmm.host_share_guest_count[i]} SHARED_BORROWED guest mappings " \
                           f"(host_share_guest_count; {obor} of them orphaned by a teardown)"
            elif pair not in ((NOPAGE, NOPAGE), (SB, NOPAGE)) and gstates:
                want = f"no guest mapping for a {host.name}/{hyp.name} page"
            if want is None and pair != (SO, NOPAGE) and vmm.host_share_guest_count[i]:
                want = "host_share_guest_count 0"
            if want is not None:
                raise InvariantViolation(
                    "guest-consistent", "guest stage-2 mappings disagree with host/hyp states",
                    pfn, want, f"host {host.name}, hyp {hyp.name}, guests "
                    f"{[(hex(g), s.name) for g, s in guests]}, share count "
                    f"{vmm.host_share_guest_count[i]}")
            # host stage-2
            ann = decode_host_annotation(hpte)
            if (host == NOPAGE) != (ann is not None):
                raise InvariantViolation("host-s2-agrees", "host NOPAGE <=> annotated host leaf",
                                         pfn, f"annotation iff host NOPAGE (host {host.name})",
                                         f"host leaf {hpte:#x}")
            if ann is not None:
                want_owner = ComponentId.HYP if hyp == OWNED else ComponentId.GUEST
                if ann[0] != want_owner:
                    raise InvariantViolation("host-s2-agrees", "annotation names the wrong owner",
                                             pfn, ComponentId(want_owner).name, ann)
            # hyp stage-1
            mapped = pte_valid(ypte) and (ypte & KVM_PTE_ADDR_MASK) == pa
            rc = vmm.refcount[i]
            if hyp == OWNED and not mapped:
                raise InvariantViolation("hyp-s1-agrees", "hyp-owned page not mapped at EL2", pfn,
                                         "a valid hyp stage-1 leaf", f"{ypte:#x}")
            if hyp == SB and mapped != (rc > 0):
                raise InvariantViolation("hyp-s1-agrees", "shared page mapped at EL2 <=> pinned",
                                         pfn, f"mapped={rc > 0} (refcount {rc})", f"mapped={mapped}")
            if hyp == NOPAGE and pte_valid(ypte):
                raise InvariantViolation("hyp-s1-agrees", "page the hyp does not have is mapped "
                                         "at EL2", pfn, "no hyp stage-1 leaf", f"{ypte:#x}")
        else:
            ann = decode_host_annotation(hpte)
            if host == NOPAGE and (ann is None or ann[0] != ComponentId.HYP) and hyp == OWNED:
                raise InvariantViolation("host-s2-agrees", "hyp page without hyp annotation",
                                         pfn, "owner HYP annotation", f"host leaf {hpte:#x}")
        # host access
        if pte_valid(hpte) and host not in (OWNED, SO, SB):
            raise InvariantViolation("no-host-access", "the host stage-2 maps a page it may not "
                                     "touch", pfn, f"no valid host leaf ({host.name}/{hyp.name})",
                                     f"host leaf {hpte:#x}")
