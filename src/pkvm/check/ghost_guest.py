"""The ghost of the 7.2 guest-memory hypercalls: result and post-state of each, predicted.

Written from the kernel's rules (`nvhe/mem_protect.c`: `__pkvm_host_share_guest`,
`__pkvm_host_unshare_guest`, `__pkvm_host_donate_guest`, `__pkvm_host_relax_perms_guest`,
`__pkvm_host_wrprotect_guest`, `__pkvm_host_test_clear_young_guest`,
`__pkvm_host_mkyoung_guest`, `__pkvm_host_reclaim_page_guest`,
`__pkvm_host_force_reclaim_page_guest`; `nvhe/hyp-main.c` for the handlers and
`pkvm_refill_memcache`), reading the machine only through `pkvm.inspect`.

At hypercall entry the ghost abstracts what the call may touch: the vCPU loaded on the calling
CPU, the host's memcache for that vCPU (head, count, and the chain of pages it links), the host
and hyp states and share counts of the pages the call names, the guest stage-2 leaf at the IPA
it names. After the call it predicts `x1` and the abstract post-state from that pre-state alone
and compares. What it compares, per call:

* the result (errno, 0 or the young bit);
* the pages the call names (host state, hyp state, share count), and for a guest leaf its state,
  level, output address and permission bits;
* the host-visible memcache bookkeeping the hyp writes back into the host's `struct kvm_vcpu`
  (`arch.pkvm_memcache.head` / `nr_pages`): head and count after a refill, success or failure,
  and the pages it took, now hyp-owned;
* confidentiality: a page a guest owned comes back to the host reading as zeros (reclaim of a
  dying guest's page, forced reclaim).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from pkvm.abi.host_structs import KVM, KVM_VCPU
from pkvm.abi.sizes import HANDLE_OFFSET
from pkvm.arch.pgtable import (
    KVM_PGTABLE_PROT_RWX,
    KVM_PGTABLE_PROT_W,
    KVM_PGTABLE_PROT_X,
    KVM_PTE_ADDR_MASK,
    pte_valid,
    stage2_pte_prot,
)
from pkvm.errors import E2BIG, EAGAIN, EBUSY, EFAULT, EHWPOISON, EINVAL, ENOENT, ENOMEM, EPERM
from pkvm.inspect import STATE_NAMES, Inspector, guest_state_of_pte
from pkvm.machine.memory import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from pkvm.abi.profiles import Profile
    from pkvm.board import TraceRecord

U64: Final = 0xFFFF_FFFF_FFFF_FFFF
U32_MAX: Final = 0xFFFF_FFFF
RWX: Final = KVM_PGTABLE_PROT_RWX
AF: Final = 1 << 10
MC_MIN: Final = 3  # KVM_MMU_CACHE_MIN_PAGES: a guest map may need this many table pages
BLOCK_PAGES: Final = 512
HEAD: Final = KVM_VCPU.offset("arch.pkvm_memcache.head")
NR: Final = KVM_VCPU.offset("arch.pkvm_memcache.nr_pages")

GUEST_CALLS: Final = frozenset({
    "__pkvm_host_share_guest", "__pkvm_host_donate_guest", "__pkvm_host_unshare_guest",
    "__pkvm_host_relax_perms_guest", "__pkvm_host_mkyoung_guest", "__pkvm_host_wrprotect_guest",
    "__pkvm_host_test_clear_young_guest", "__pkvm_reclaim_dying_guest_page",
    "__pkvm_force_reclaim_guest_page",
})


def range_errno(lo: int, hi: int, phys: int, size: int) -> int:
    """7.2's `check_range_allowed_memory` over [phys, phys + size) with RAM at [lo, hi): the
    range must lie in one region or gap (`find_mem_range`; the last gap ends at ULONG_MAX,
    exclusive), else -EINVAL; outside RAM, -EPERM."""
    last = (phys + size - 1) & U64
    if lo <= phys < hi:
        rs, re_ = lo, hi
    elif phys < lo:
        rs, re_ = 0, lo
    else:
        rs, re_ = hi, U64
    if not rs <= last < re_:
        return -EINVAL
    return 0 if lo <= phys < hi else -EPERM


def pin_errno(i: Inspector, pa: int, size: int) -> int:
    """`hyp_pin_shared_mem` over [pa, pa + size): the range in one memory region, every
    page host SHARED_OWNED and hyp SHARED_BORROWED (else -EPERM); 0 if it would pin."""
    start = pa & ~(PAGE_SIZE - 1)
    end = (pa + size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    lo, hi = i.ram_range()
    err = range_errno(lo, hi, start, end - start)
    if err:
        return err
    pages = [i.page_quick(pfn) for pfn in range(start >> PAGE_SHIFT, end >> PAGE_SHIFT)]
    if any(p is None or p[0] != "SHARED_OWNED" for p in pages):
        return -EPERM
    if any(p is None or p[1] != "SHARED_BORROWED" for p in pages):
        return -EPERM
    return 0


def host_u32(i: Inspector, pa: int) -> int:
    """The host's u32 at `pa` (0 outside RAM)."""
    lo, hi = i.ram_range()
    if not lo <= pa <= hi - 4:
        return 0
    return int.from_bytes(i.read(pa, 4), "little")


def init_vm_checks(i: Inspector, prof: Profile, host_kvm: int) -> int:
    """7.2 `__pkvm_init_vm`'s first checks, on the pre-state: `hyp_pin_shared_mem` of the
    host's struct kvm (the range in one memory region, every page host SHARED_OWNED and hyp
    SHARED_BORROWED, else -EPERM), `created_vcpus` (as unsigned) at least 1 and the handle
    the host reserved at least `HANDLE_OFFSET`, else -EINVAL; 0 when all pass."""
    pa = i.host_ptr_pa(host_kvm)
    err = pin_errno(i, pa, prof.sizeof_kvm)
    if err:
        return err
    if not host_u32(i, pa + KVM.offset("created_vcpus")):
        return -EINVAL
    handle = prof.handle(host_u32(i, pa + KVM.offset("arch.pkvm.handle")))
    return -EINVAL if handle < HANDLE_OFFSET else 0



@dataclass(frozen=True)
class Leaf:
    """A guest stage-2 leaf, abstracted: what the guest may do with which page."""

    ret: int  # kvm_pgtable_get_leaf's result (-ERANGE past the IPA space)
    state: str  # PageState name (NOPAGE for an empty leaf, POISON for a poisoned one)
    level: int
    pa: int | None
    prot: int  # R/W/X of stage2_pte_prot
    young: bool

    @staticmethod
    def of(found: tuple[int, int, int] | None) -> Leaf | None:
        if found is None:
            return None
        leaf = _LEAVES.get(found)  # (a function of `found` alone: kept for the next lookup)
        if leaf is None:
            if len(_LEAVES) >= 4096:
                _LEAVES.clear()
            ret, level, pte = found
            valid = pte_valid(pte)
            leaf = _LEAVES[found] = Leaf(
                ret, STATE_NAMES[guest_state_of_pte(pte)], level,
                pte & KVM_PTE_ADDR_MASK if valid else None,
                stage2_pte_prot(pte) & RWX if valid else 0, bool(valid and pte & AF))
        return leaf


_LEAVES: Final[dict[tuple[int, int, int], Leaf]] = {}  # Leaf.of's answers (immutable), by its argument


def _mapped_pages(pages: list[tuple[str, str, int, int] | None],
                  share: bool) -> list[tuple[str, str, int, int]]:
    """The pages a share (`share`) or donation to a guest leaves, from their pre-states: a
    share adds one to each page's share count and leaves it host SHARED_OWNED, a donation
    leaves it host and hyp NOPAGE (refcounts unchanged)."""
    out: list[tuple[str, str, int, int]] = []
    for p0 in pages:
        assert p0 is not None
        out.append(("SHARED_OWNED", p0[1], p0[2], p0[3] + 1) if share else
                   ("NOPAGE", "NOPAGE", p0[2], p0[3]))
    return out


_PREDICT: Final[dict[str, Any]] = {}  # a guest-memory call's name -> its GuestGhost method


class GuestGhost:
    """Predicts and checks the guest-memory calls; `fail(what, expected, found)` reports."""

    def __init__(self, inspect: Inspector, fail: Any):
        self.i = inspect  # (typed: native calls, not attribute lookups by name)
        self.fail = fail
        self.pre: dict[str, Any] | None = None
        self.raced_now: Any = lambda: False  # set by a fuzzer whose racing CPU may store
        self.raced = 0  # calls not judged: a racing host CPU changed their inputs
        self.judged: Counter[str] = Counter()  # calls judged, by name (shared with the ghost)

    # -- abstraction ------------------------------------------------------------------------
    def _pages(self, pfn: int, n: int) -> list[tuple[str, str, int, int] | None]:
        """(host, hyp, refcount, share count) of each page; the refcount of a hyp-owned page
        (table pages, the hyp VM: the hyp's own business) abstracts to -1."""
        i: Inspector = self.i  # (typed: native calls)
        return [p if p is None or p[1] != "OWNED" else (p[0], p[1], -1, p[3])
                for p in i.pages_quick(pfn, n)]

    def _leaf(self, handle: int | None, ipa: int) -> Leaf | None:
        i: Inspector = self.i
        return None if handle is None else Leaf.of(i.guest_leaf(handle, ipa))

    def _leaves(self, handle: int, ipa: int, n: int) -> list[Leaf | None]:
        """`_leaf` of the n pages from `ipa` (wrapping at 2^64), in order."""
        i: Inspector = self.i
        out: list[Leaf | None] = []
        last: tuple[int, int, int] | None = None
        leaf: Leaf | None = None  # (Leaf.of(None): a run's equal leaves built once)
        for f in i.guest_leaves(handle, ipa, n):
            if f is not last and f != last:
                leaf, last = Leaf.of(f), f
            out.append(leaf)
        return out

    def _u64(self, pa: int) -> int:
        return int.from_bytes(self.i.read(pa, 8), "little")

    def _refill(self, vcpu: dict[str, Any]) -> dict[str, Any]:
        """`pkvm_refill_memcache` on the pre-state: moves pages from the host's list to the hyp's
        until the hyp holds as many as the host's count said."""
        hv = vcpu["host_vcpu_pa"]
        head, nr = self._u64(hv + HEAD), self._u64(hv + NR)
        target, have, ret, taken = nr, vcpu["memcache"][1], 0, []
        while have < target:
            if nr == 0:
                ret = -ENOMEM
                break
            pfn = (head & ~(PAGE_SIZE - 1)) >> PAGE_SHIFT
            pg = self.i.page_quick(pfn)
            if pfn in taken or pg is None or pg[:2] != ("OWNED", "NOPAGE"):
                ret = -ENOMEM
                break
            taken.append(pfn)
            head = self._u64(pfn << PAGE_SHIFT)
            nr -= 1
            have += 1
        return {"ret": ret, "head": head, "nr": nr, "taken": taken, "have": have, "hv": hv}

    def _range_errno(self, phys: int, size: int) -> int:
        lo, hi = self.i.ram_range()
        return range_errno(lo, hi, phys, size)

    # -- hooks -------------------------------------------------------------------------------
    def before(self, cpu: int, name: str, args: tuple[int, ...], handle_of: Any) -> None:
        self.pre = None
        if name not in GUEST_CALLS:
            return
        a = [x & U64 for x in args] + [0] * 6
        vcpu = self.i.loaded_vcpu(cpu)
        pre: dict[str, Any] = {"name": name, "a": a, "vcpu": vcpu}
        if name in ("__pkvm_host_share_guest", "__pkvm_host_donate_guest"):
            want_prot = name == "__pkvm_host_donate_guest"
            if vcpu is not None and vcpu["protected"] == want_prot:
                pre["refill"] = self._refill(vcpu)
                n = a[2] if name == "__pkvm_host_share_guest" and a[2] == BLOCK_PAGES else 1
                taken = set(pre["refill"]["taken"])  # the refill runs first
                pfn = ((a[0] << PAGE_SHIFT) & U64) >> PAGE_SHIFT  # hyp_pfn_to_phys wraps
                pages = self._pages(pfn, n)
                pre["pages"] = [("NOPAGE", "OWNED", -1, p[3]) if p and pfn + k in taken else p
                                for k, p in enumerate(pages)] if taken else pages
                pre["leaves"] = self._leaves(vcpu["handle"], (a[1] << PAGE_SHIFT) & U64, n)
        elif name in ("__pkvm_host_relax_perms_guest", "__pkvm_host_mkyoung_guest"):
            if vcpu is not None:
                pre["leaf"] = self._leaf(vcpu["handle"], (a[0] << PAGE_SHIFT) & U64)
        elif name == "__pkvm_force_reclaim_guest_page":
            phys = a[0] & ~(PAGE_SIZE - 1)
            pre["page"] = self.i.page_quick(phys >> PAGE_SHIFT)
            pre["owner"] = self.i.host_annotation(phys) if pre["page"] else None
            if pre["owner"] is not None and pre["owner"][0] == 2:  # PKVM_ID_GUEST
                meta = pre["owner"][1]
                pre["vm"] = self.i.vm(meta & 0xFFFF)
                pre["gipa"] = ((meta >> 16) << PAGE_SHIFT) & U64
                if pre["vm"] is not None:
                    pre["leaf"] = self._leaf(meta & 0xFFFF, pre["gipa"])
        else:  # the calls naming a VM by handle and a gfn
            handle = handle_of(a[0])
            pre["handle"] = handle
            pre["vm"] = self.i.vm(handle)
            ipa = (a[1] << PAGE_SHIFT) & U64
            pre["leaf"] = self._leaf(handle, ipa)
            if pre["leaf"] is not None and pre["leaf"].pa is not None:
                pre["leaf_pages"] = self._pages(pre["leaf"].pa >> PAGE_SHIFT, 1 << (
                    9 * (3 - pre["leaf"].level)))
        self.pre = pre

    def after(self, rec: TraceRecord) -> None:
        pre, self.pre = self.pre, None
        if pre is None or rec.name != pre["name"]:
            return
        if self.raced_now():
            self.raced += 1
            return
        fn = _PREDICT.get(rec.name)
        if fn is None:  # (a method per call name, looked up once)
            fn = _PREDICT[rec.name] = getattr(GuestGhost, "_" + rec.name.removeprefix("__pkvm_"))
        self.judged[rec.name] += 1
        fn(self, rec, pre, pre["a"])

    # -- comparisons ---------------------------------------------------------------------------
    def _result(self, rec: Any, pre: dict[str, Any], want: int) -> None:
        if rec.x1 != want:
            self.fail(f"{rec.name} result", want, rec.x1)

    def _same(self, what: str, want: Any, found: Any) -> None:
        if want == found:
            return
        if isinstance(want, list) and isinstance(found, list) and len(want) == len(found):
            k = next(i for i, (x, y) in enumerate(zip(want, found)) if x != y)
            self.fail(f"{what} (element {k} of {len(want)})", want[k], found[k])
        self.fail(what, want, found)

    def _memcache_after(self, rec: Any, pre: dict[str, Any]) -> None:
        """The host's memcache bookkeeping after a refill, and where the taken pages went."""
        r = pre["refill"]
        self._same(f"{rec.name}: host memcache head/nr the hyp wrote back",
                   (hex(r["head"]), r["nr"]),
                   (hex(self._u64(r["hv"] + HEAD)), self._u64(r["hv"] + NR)))
        for pfn in r["taken"]:
            pg = self.i.page_quick(pfn)
            if pg is None or pg[:2] != ("NOPAGE", "OWNED"):
                self.fail(f"{rec.name}: page {pfn:#x} taken from the host memcache is hyp-owned",
                          "NOPAGE/OWNED", pg)

    def _host_share_guest(self, rec: Any, pre: dict[str, Any], a: list[int]) -> None:
        self._map_call(rec, pre, a, share=True)

    def _host_donate_guest(self, rec: Any, pre: dict[str, Any], a: list[int]) -> None:
        self._map_call(rec, pre, a, share=False)

    def _map_call(self, rec: Any, pre: dict[str, Any], a: list[int], share: bool) -> None:
        if "refill" not in pre:
            return self._result(rec, pre, -EINVAL)
        pfn, gfn = a[0], a[1]
        nr, prot = (a[2], a[3]) if share else (1, RWX)
        phys, ipa = (pfn << PAGE_SHIFT) & U64, (gfn << PAGE_SHIFT) & U64
        want = self._predict_map(pre, share, pfn, phys, ipa, nr, prot)
        self._result(rec, pre, want)
        self._memcache_after(rec, pre)
        n = len(pre["pages"])
        posts = self._pages(phys >> PAGE_SHIFT, n)
        # (a mapped call is judged on its first leaf alone: the others are not read)
        leaves = self._leaves(pre["vcpu"]["handle"], ipa, n if want else 1)
        if want:
            self._same(f"{rec.name} refused: the pages it names", pre["pages"], posts)
            self._same(f"{rec.name} refused: the guest leaves", pre["leaves"], leaves)
            return
        exps = _mapped_pages(pre["pages"], share)
        if exps != posts:  # (compared as lists; the first page that differs is reported)
            for k, (exp, p1) in enumerate(zip(exps, posts)):
                self._same(f"{rec.name}: page {(phys >> PAGE_SHIFT) + k:#x} after", exp, p1)
        level = 2 if n == BLOCK_PAGES else 3
        want_leaf = Leaf(0, "SHARED_BORROWED" if share else "OWNED", level, phys, prot,
                         leaves[0].young if leaves[0] else False)
        self._same(f"{rec.name}: the guest leaf at ipa {ipa:#x}", want_leaf, leaves[0])

    def _predict_map(self, pre: dict[str, Any], share: bool, pfn: int, phys: int, ipa: int,
                     nr: int, prot: int) -> int:
        r = pre["refill"]
        if r["ret"]:
            return int(r["ret"])
        if share:
            if prot & ~RWX:
                return -EINVAL
            limit = 1 << (48 - PAGE_SHIFT)
            if not (pfn < limit and nr <= limit - pfn):
                return -EINVAL
            size = PAGE_SIZE
            if nr != 1:
                block = PAGE_SIZE * BLOCK_PAGES
                if nr != BLOCK_PAGES or (phys | ipa) & (block - 1):
                    return -EINVAL
                size = block
            err = self._range_errno(phys, size)
            if err:
                return err
            err = self._guest_free(pre["leaves"])
            if err:
                return err
            for p in pre["pages"]:
                assert p is not None
                if p[0] == "OWNED":
                    continue
                if p[0] == "SHARED_OWNED" and p[3]:
                    if p[3] == U32_MAX:
                        return -EBUSY
                    continue
                return -EPERM
        else:
            err = self._range_errno(phys, PAGE_SIZE)
            if err:
                return err
            p = pre["pages"][0]
            if p is None or p[0] != "OWNED":
                return -EPERM
            err = self._guest_free(pre["leaves"])
            if err:
                return err
        if r["have"] < MC_MIN:
            return -ENOMEM
        return 0

    @staticmethod
    def _guest_free(leaves: list[Leaf | None]) -> int:
        for leaf in leaves:
            if leaf is None:
                return -EINVAL
            if leaf.ret:
                return leaf.ret
            if leaf.state != "NOPAGE":
                return -EPERM
        return 0

    def _np_vm(self, pre: dict[str, Any]) -> bool:
        vm = pre["vm"]
        return vm is not None and not vm["protected"]

    @staticmethod
    def _size_ok(ipa: int, nr: int) -> int:
        if nr == 1:
            return PAGE_SIZE
        block = PAGE_SIZE * BLOCK_PAGES
        return block if nr == BLOCK_PAGES and not ipa & (block - 1) else 0

    def _host_unshare_guest(self, rec: Any, pre: dict[str, Any], a: list[int]) -> None:
        ipa = (a[1] << PAGE_SHIFT) & U64
        leaf = pre["leaf"]
        size = self._size_ok(ipa, a[2])
        if not self._np_vm(pre) or not size:
            return self._result(rec, pre, -EINVAL)
        assert leaf is not None
        pages = pre.get("leaf_pages", [])
        if leaf.ret:
            want = leaf.ret
        elif leaf.pa is None:
            want = -ENOENT
        elif PAGE_SIZE << (9 * (3 - leaf.level)) != size:
            want = -E2BIG
        elif leaf.state != "SHARED_BORROWED":
            want = -EPERM
        elif any(p is None or p[0] != "SHARED_OWNED" for p in pages):
            want = -EPERM
        else:
            want = 0
        self._result(rec, pre, want)
        post = self._leaf(pre["handle"], ipa)
        if want:
            self._same("unshare_guest refused: the guest leaf", leaf, post)
            return
        assert leaf.pa is not None
        self._same("unshare_guest: the guest leaf after", "NOPAGE", post.state if post else None)
        for k, p0 in enumerate(pages):
            assert p0 is not None
            exp = (p0[0] if p0[3] > 1 else "OWNED", p0[1], p0[2], p0[3] - 1)
            self._same(f"unshare_guest: page {(leaf.pa >> PAGE_SHIFT) + k:#x} after", exp,
                       self.i.page_quick((leaf.pa >> PAGE_SHIFT) + k))

    def _attr_call(self, rec: Any, leaf: Leaf | None, post: Leaf | None, prot: int | None,
                   young: bool | None) -> None:
        """An attribute update on one valid leaf: state, level and page unchanged; permissions
        become `prot` (None: unchanged), the access flag `young` (None: unchanged)."""
        if leaf is None or leaf.pa is None:
            self._same(f"{rec.name}: the (invalid) guest leaf", leaf, post)
            return
        want = Leaf(leaf.ret, leaf.state, leaf.level, leaf.pa,
                    leaf.prot if prot is None else prot, leaf.young if young is None else young)
        self._same(f"{rec.name}: the guest leaf after", want, post)

    def _host_relax_perms_guest(self, rec: Any, pre: dict[str, Any], a: list[int]) -> None:
        vcpu, prot = pre["vcpu"], a[1]
        if vcpu is None or vcpu["protected"] or prot & ~RWX:
            return self._result(rec, pre, -EINVAL)
        leaf = pre["leaf"]
        ipa = (a[0] << PAGE_SHIFT) & U64
        if leaf is None or leaf.ret:
            return self._result(rec, pre, leaf.ret if leaf else -EINVAL)
        self._result(rec, pre, -EAGAIN if leaf.pa is None else 0)
        # kvm_pgtable_stage2_relax_perms: R and W only added; X, when asked, set as asked
        new = leaf.prot | (prot & ~KVM_PGTABLE_PROT_X)
        if prot & KVM_PGTABLE_PROT_X:
            new = (new & ~KVM_PGTABLE_PROT_X) | (prot & KVM_PGTABLE_PROT_X)
        post = self._leaf(vcpu["handle"], ipa)
        self._attr_call(rec, leaf, post, new, post.young if post else None)

    def _host_mkyoung_guest(self, rec: Any, pre: dict[str, Any], a: list[int]) -> None:
        vcpu = pre["vcpu"]
        if vcpu is None or vcpu["protected"]:
            return self._result(rec, pre, -EINVAL)
        self._result(rec, pre, 0)
        ipa = (a[0] << PAGE_SHIFT) & U64
        self._attr_call(rec, pre["leaf"], self._leaf(vcpu["handle"], ipa), None, True)

    def _host_wrprotect_guest(self, rec: Any, pre: dict[str, Any], a: list[int]) -> None:
        ipa = (a[1] << PAGE_SHIFT) & U64
        if not self._np_vm(pre) or not self._size_ok(ipa, a[2]):
            return self._result(rec, pre, -EINVAL)
        leaf = pre["leaf"]
        self._result(rec, pre, leaf.ret if leaf is not None and leaf.ret else 0)
        if a[2] == 1:
            self._attr_call(rec, leaf, self._leaf(pre["handle"], ipa),
                            leaf.prot & ~KVM_PGTABLE_PROT_W if leaf else None, None)

    def _host_test_clear_young_guest(self, rec: Any, pre: dict[str, Any], a: list[int]) -> None:
        ipa = (a[1] << PAGE_SHIFT) & U64
        if not self._np_vm(pre) or not self._size_ok(ipa, a[2]):
            return self._result(rec, pre, -EINVAL)
        leaf = pre["leaf"]
        if a[2] != 1:
            return
        self._result(rec, pre, 1 if leaf is not None and leaf.young else 0)
        self._attr_call(rec, leaf, self._leaf(pre["handle"], ipa), None,
                        None if not a[3] & 1 else False)

    def _reclaim_dying_guest_page(self, rec: Any, pre: dict[str, Any], a: list[int]) -> None:
        vm, leaf = pre["vm"], pre["leaf"]
        ipa = (a[1] << PAGE_SHIFT) & U64
        if vm is None or not vm["dying"]:
            return self._result(rec, pre, -EINVAL)
        if leaf is None:
            return self._result(rec, pre, -EINVAL)
        if leaf.ret:
            want = leaf.ret
        elif leaf.state == "POISON":
            want = 0
        elif leaf.pa is None:
            want = -ENOENT
        elif leaf.level != 3:
            want = -E2BIG
        elif leaf.state not in ("OWNED", "SHARED_OWNED"):
            want = -EPERM
        else:
            want = 0
        self._result(rec, pre, want)
        post = self._leaf(pre["handle"], ipa)
        if want or leaf.pa is None:
            self._same("reclaim_dying refused: the guest leaf", leaf, post)
            return
        pfn = leaf.pa >> PAGE_SHIFT
        p1 = self.i.page_quick(pfn)
        self._same(f"reclaim_dying: page {pfn:#x} back with the host", "OWNED",
                   p1[0] if p1 else None)
        self._same("reclaim_dying: the guest leaf after", "NOPAGE", post.state if post else None)
        if leaf.state == "OWNED":
            self._wiped(rec, pfn)

    def _wiped(self, rec: Any, pfn: int) -> None:
        """Confidentiality: a guest-private page reaches the host only wiped."""
        if self.i.read(pfn << PAGE_SHIFT, PAGE_SIZE).count(0) != PAGE_SIZE:
            self.fail(f"{rec.name}: guest page {pfn:#x} returned to the host unwiped",
                      "a page of zeros", "guest data left in it")

    def _force_reclaim_guest_page(self, rec: Any, pre: dict[str, Any], a: list[int]) -> None:
        p0, owner = pre["page"], pre["owner"]
        phys = a[0] & ~(PAGE_SIZE - 1)
        if p0 is None:
            want = -EFAULT
        elif p0[0] in ("OWNED", "SHARED_OWNED", "SHARED_BORROWED"):
            want = -EAGAIN
        elif p0[0] != "NOPAGE" or owner is None:
            want = -EPERM if p0[0] != "NOPAGE" else -EINVAL
        elif owner[0] != 2:
            want = -EPERM
        elif pre.get("vm") is None:
            want = -EAGAIN
        else:
            leaf = pre.get("leaf")
            if leaf is None or leaf.ret:
                want = leaf.ret if leaf else -EINVAL
            elif leaf.state == "POISON":
                want = -EHWPOISON
            elif leaf.pa is None:
                want = -ENOENT
            elif leaf.level != 3:
                want = -E2BIG
            elif leaf.state != "OWNED":
                want = -EPERM
            else:
                want = 0
        self._result(rec, pre, want)
        p1 = self.i.page_quick(phys >> PAGE_SHIFT)
        if want:
            self._same("force_reclaim refused: the page", p0, p1)
            return
        self._same(f"force_reclaim: page {phys >> PAGE_SHIFT:#x} back with the host", "OWNED",
                   p1[0] if p1 else None)
        post = self._leaf(owner[1] & 0xFFFF, pre["gipa"])
        self._same("force_reclaim: the guest leaf is poisoned", "POISON",
                   post.state if post else None)
        self._wiped(rec, phys >> PAGE_SHIFT)
