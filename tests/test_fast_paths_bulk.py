"""Fast paths of the 1 GiB guest figure (issue 17) against the generic code they short-cut:

- a page table whose descriptors live in RAM itself reads and writes them through `PhysMemory`
  directly (`KvmPgtable.ram`); the same table over any other `TableMemory` goes through that
  object's methods: both must make the same descriptor writes, references and answers;
- `Host.alloc_pages_bulk(n)` hands out exactly the pages `n` calls of `alloc_pages(1)` would,
  zeroed, whatever was written in them before.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

import pkvm
from pkvm.hyp.pgtable import KVM_PGTABLE_PROT_RWX, KvmPgtable
from pkvm.machine.memory import PAGE_SIZE, RAM_BASE, PhysMemory
from test_fast_paths import _S1, VA, maps, va_pages
from test_fast_paths_map import _mapped


class _Indirect:
    """RAM behind a plain Python object: a table over it cannot take the direct path."""

    def __init__(self, mem: PhysMemory):
        self.mem = mem

    def read_u64(self, pa: int) -> int:
        return self.mem.read_u64(pa)

    def write_u64(self, pa: int, value: int) -> None:
        self.mem.write_u64(pa, value)


def _pair(stage: int) -> tuple[_S1, _S1]:
    a, b = _S1(), _S1()  # each a root already taken from its pool: both take a second one
    a.pgt = KvmPgtable(a.mem, a.pool, stage=stage, name="t")
    b.pgt = KvmPgtable(_Indirect(b.mem), b.pool, stage=stage, name="t")
    assert a.pgt.init() == 0 and b.pgt.init() == 0
    assert a.pgt.ram is a.mem and b.pgt.ram is None
    return a, b


ops_s2 = st.lists(st.tuples(st.sampled_from(["map", "unmap", "annotate"]), va_pages,
                            st.sampled_from([1, 1, 2, 512])), min_size=1, max_size=14)


@settings(max_examples=60, deadline=None)
@given(ops=ops_s2)
def test_stage2_table_in_ram_agrees_with_table_behind_an_object(ops):
    a, b = _pair(2)
    for op, ipa, n in ops:
        base = ipa & ~(n * PAGE_SIZE - 1) if n == 512 else ipa
        size = n * PAGE_SIZE
        out = []
        for env in (a, b):
            if op == "map":
                out.append(env.pgt.stage2_map(base, size, base - VA + RAM_BASE,
                                              KVM_PGTABLE_PROT_RWX))
            elif op == "unmap":
                out.append(env.pgt.stage2_unmap(base, size))
            else:
                out.append(env.pgt.stage2_map(base, size, None, 0, annotation=0x2 << 60))
            out.append(env.pgt.get_leaf(base))
        assert out[:2] == out[2:]
        assert a.state() == b.state()


@settings(max_examples=40, deadline=None)
@given(ops=maps, unmaps=st.lists(va_pages, max_size=6))
def test_hyp_table_in_ram_agrees_with_table_behind_an_object(ops, unmaps):
    a, b = _pair(1)
    _mapped(a, ops)
    _mapped(b, ops)
    assert a.state() == b.state()
    for va in unmaps:
        assert a.pgt.hyp_unmap(va, PAGE_SIZE) == b.pgt.hyp_unmap(va, PAGE_SIZE)
        assert a.state() == b.state()
    assert a.pgt.table_pages() == b.pgt.table_pages()


@settings(max_examples=25, deadline=None)
@given(before=st.lists(st.tuples(st.integers(1, 4), st.booleans(), st.booleans()), max_size=8),
       n=st.integers(1, 40), back=st.lists(st.integers(0, 39), max_size=40))
def test_alloc_pages_bulk_is_n_single_allocations(before, n, back):
    """... and `free_pages_bulk` of some of them frees as `free_pages` of each would."""
    sides = []
    for bulk in (True, False):
        m = pkvm.Machine(memory="64M", cpus=1, trace=False)
        host = m.host
        for k, free_it, dirty in before:  # fragment the allocator, leave data in free pages
            pa = host.alloc_pages(k)
            if dirty:
                host.write(pa, b"\xa5" * (k * PAGE_SIZE))
            if free_it:
                host.free_pages(pa, k)
        pages = host.alloc_pages_bulk(n) if bulk else [host.alloc_pages(1) for _ in range(n)]
        assert all(host.read(pa, PAGE_SIZE) == bytes(PAGE_SIZE) for pa in pages)
        state = (pages, bytes(host.pages.used), host.pages.hint)
        freed = list(dict.fromkeys(pages[k] for k in back if k < n))
        if bulk:
            host.free_pages_bulk(freed)
        else:
            for pa in freed:
                host.free_pages(pa)
        sides.append((state, bytes(host.pages.used), host.pages.hint))
    assert sides[0] == sides[1]


@settings(max_examples=300, deadline=None)
@given(marks=st.lists(st.sampled_from([0, 0, 1, 2]), min_size=1, max_size=24),
       hint=st.integers(0, 24), n=st.integers(1, 30))
def test_alloc_each_is_n_single_allocs_of_a_small_allocator(marks, hint, n):
    """Runs, reserved pages, the hint's wrap to the start and too few free pages included."""
    from pkvm.host.host import PageAllocator

    sides = []
    for each in (True, False):
        a = PageAllocator(0x100, len(marks), [])
        a.used[:] = bytes(marks)
        a.hint = min(hint, len(marks))
        if each:
            got = a.alloc_each(n)
        else:
            singles = [a.alloc(1) for _ in range(n)]
            got = None if None in singles else singles
            for pfn in singles:  # as alloc_pages_bulk's caller sees a failure: nothing taken
                if got is None and pfn is not None:
                    a.release(pfn, 1)
        sides.append((got, bytes(a.used), a.hint if got is not None else None))
    assert sides[0] == sides[1]
