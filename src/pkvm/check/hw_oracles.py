"""Oracles on what the hardware saw: TLB use, EL2 stores, the bytes of pages given back.

`violations(inspect)` returns one line per finding (empty: all held), reading only through the
read-only `pkvm.inspect` view. The rules, each from Linux's pKVM:

- **stale TLB entry**: every EL2 access and every host access is translated through a TLB that
  holds entries until the kernel's TLBI (`kvm_pgtable_hyp_unmap`'s `tlbi vale2is`, the stage-2
  walker's `__kvm_tlb_flush_vmid_ipa` on a broken or cleared valid entry, `vmalls12e1` at
  `__pkvm_prot_finalize`). An access through an entry that a fresh walk contradicts means a
  TLBI was missing: the access reached memory the tables no longer allow.
- **EL2 store ownership**: EL2 writes only pages the hyp owns or has been shared (the hyp
  state OWNED, SHARED_OWNED or SHARED_BORROWED), or through the fixmap a guest's page it wipes
  on its way out (`hyp_poison_page`).
- **wiped on return**: memory the host donated for a hyp VM or vCPU comes back zeroed by
  `teardown_donated_memory` (its first word then links the host's teardown memcache).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from pkvm.machine.memory import PAGE_SIZE

if TYPE_CHECKING:
    from pkvm.inspect import Inspector

_LINK: Final = 8  # the memcache link the hyp writes in each page it pushes on a host memcache
_ZERO: Final = bytes(PAGE_SIZE - _LINK)


def violations(inspect: Inspector) -> list[str]:
    if not inspect.hw_event_count():  # (nothing in the three lists below)
        return []
    out = [f"stale TLB entry used: {u}" for u in inspect.tlb_stale_uses()]
    out += [f"EL2 store outside the hyp's pages: {s}" for s in inspect.el2_bad_stores()]
    for pa in inspect.wiped_returns():
        rest = inspect.read(pa + _LINK, PAGE_SIZE - _LINK)
        if rest != _ZERO:
            first = next(i for i, b in enumerate(rest) if b) + _LINK
            out.append(f"hyp VM/vCPU page {pa:#x} returned to the host unwiped "
                       f"(first non-zero byte at +{first:#x})")
    return out
