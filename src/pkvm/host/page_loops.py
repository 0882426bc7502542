"""The host driver's per-page hypercall loops (compiled with the typed core, `setup.py`).

A 1 GiB guest is 262,144 pages, each mapped with one donate (or share) and reclaimed with one
call at teardown: these two loops are all the host does per page, so they are compiled rather
than interpreted. Each page is still its own hypercall through the port's HVC (the machine's
door, its interposers, trace and checker: nothing is batched), with the host's own steps
around it as `HostVm.map` and the lifecycle's `destroy` spell them (arch/arm64/kvm/pkvm.c:
`pkvm_pgtable_stage2_map`'s `topup_hyp_memcache` then `__pkvm_host_donate_guest`;
`__pkvm_pgtable_stage2_unmap`'s reclaim of each mapping of a dying VM). The callables come in
as arguments (the port's bound `hvc`, its 8-byte load, the VM's `backing` and top-up): the
host's objects stay pure Python, reached through the ordinary call path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pkvm.errors import HostError

PAGE_SHIFT = 12


def map_pages(hvc: Callable[..., Any], load: Callable[[int, int], int], hcpu: int,
              nr_pa: int, low: int, topup: Callable[[], None], backing: Callable[[int], int],
              slot: dict[int, int], mapped: dict[int, int], cpu: int, name: str, gfn: int,
              n: int, share_prot: int) -> None:
    """Map each frame of [gfn, gfn+n) not in `mapped`, in order: the backing page (`slot`'s,
    else `backing`'s), the vCPU memcache's count loaded at `nr_pa` through `load` (`topup`
    when it is below `low`), then `name` through `hvc` on `cpu`: a donate (`share_prot` < 0)
    or a share of one page with that prot."""
    for g in range(gfn, gfn + n):
        if g in mapped:
            continue
        page = slot.get(g)
        if page is None:
            page = backing(g)
        if load(hcpu, nr_pa) < low:  # `topup_hyp_memcache`: pushed only when short
            topup()
        if share_prot < 0:
            r = hvc(cpu, name, page >> PAGE_SHIFT, g)
        else:
            r = hvc(cpu, name, page >> PAGE_SHIFT, g, 1, share_prot)
        x0: int = r.x0  # an `HvcAnswer`
        x1: int = r.x1
        if x0:
            raise HostError.not_offered(name, x0)
        if x1:
            raise HostError(-x1, name, x1)
        mapped[g] = page


def reclaim_pages(hvc: Callable[..., Any], name: str, handle: int, mapped: dict[int, int],
                  unshare: bool) -> list[tuple[int, int]]:
    """Give back every page of `mapped` in order, one `name` call each on CPU 0 (a dying
    VM's reclaim, or `unshare` of one page). A page whose call fails stays in `mapped`, as the
    kernel's teardown leaves it: returns those (gfn, error), for the caller to warn of."""
    failed: list[tuple[int, int]] = []
    for gfn in list(mapped):
        r = hvc(0, name, handle, gfn, 1) if unshare else hvc(0, name, handle, gfn)
        x0: int = r.x0  # an `HvcAnswer`
        x1: int = r.x1
        if x0:
            raise HostError.not_offered(name, x0)
        if x1:
            failed.append((gfn, x1))
        else:
            del mapped[gfn]
    return failed
