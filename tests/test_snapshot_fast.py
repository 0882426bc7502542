"""The shortcuts of a snapshot load against the generic paths they replace: the literal table a
snapshot's loads share (`snapshot._share_literals`) against a plain pickle of the same objects,
and a recycled RAM set back by its stored pages only (`memory._reuse_stored`) against a fresh
RAM and against the full rewrite."""

import io
import pickle

from hypothesis import given, settings
from hypothesis import strategies as st

from pkvm import Machine, snapshot
from pkvm.check import fuzz_ops
from pkvm.machine import memory
from pkvm.machine.memory import PAGE_SIZE, RAM_BASE, _restore_ram, reuse_ram

# -- the literal table ----------------------------------------------------------------------

_leaves = st.one_of(st.text(max_size=8), st.binary(max_size=300), st.integers(), st.none(),
                    st.sampled_from(["hvc", "state", "pkvm.board", "a" * 300]))


def _graph(leaves):
    return st.recursive(leaves, lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.tuples(inner, inner),
        st.dictionaries(st.text(max_size=4), inner, max_size=4)), max_leaves=30)


def shape(obj, seen=None):
    """`obj` as nested tuples: values, and each list or dict by the order it was first met
    (so two loads alike in shape hold the same containers in the same places)."""
    seen = {} if seen is None else seen
    if isinstance(obj, (list, dict)):
        if id(obj) in seen:
            return ("again", seen[id(obj)])
        seen[id(obj)] = len(seen)
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        return (type(obj).__name__, tuple((shape(k, seen), shape(v, seen)) for k, v in items))
    if isinstance(obj, tuple):
        return ("tuple", tuple(shape(v, seen) for v in obj))
    return (type(obj).__name__, obj)


@settings(max_examples=150, deadline=None)
@given(_graph(_leaves), st.data())
def test_a_literal_table_loads_what_the_plain_pickle_loads(obj, data):
    """A pickle rewritten to take its strings and bytes from a literal table loads as the plain
    pickle does (the same values, the same lists and dicts held in several places), again and
    again from one table, each load's containers its own."""
    shared = [obj, obj] if data.draw(st.booleans()) else [obj, [obj]]  # held twice
    out = io.BytesIO()
    snapshot._Saver(out, {}).dump(shared)
    plain = out.getvalue()
    rewritten = snapshot._share_literals(plain)
    assert rewritten.startswith(snapshot._TAG)
    want = shape(pickle.loads(plain))
    first = snapshot._Loader(rewritten).load()
    again = snapshot._Loader(rewritten).load()
    assert shape(first) == want == shape(again)
    for a, b in ((first, again), (first[0], again[0])):
        assert not isinstance(a, (list, dict)) or a is not b


def test_a_snapshot_with_a_literal_table_is_the_plain_pickles_machine():
    """A machine's snapshot (with its literal table) and a plain pickle of the same machine
    load as machines that save alike; the snapshot takes its literals from the table (it
    holds no page of RAM itself) and a load builds none of them again."""
    key = ("64M", 2, "latest", (), False)
    data = fuzz_ops._BOOTED.get(key) or fuzz_ops.booted_machine(*key).snapshot()
    m = Machine.restore(data)
    out = io.BytesIO()
    snapshot._Saver(out, snapshot._module_globals()).dump(m)
    plain = snapshot._Loader(out.getvalue()).load()
    assert plain.snapshot() == data == m.snapshot()
    again = Machine.restore(data)
    assert [p for _, p in again.mem.nonzero_pages()] == [p for _, p in m.mem.nonzero_pages()]
    table, start = snapshot._table(data)
    loaded = set(map(id, table.copy().values()))
    names = [k for k in vars(again.host) if isinstance(k, str)]
    assert names and all(id(k) in loaded for k in names if k in vars(m.host))
    assert b"\x00" * 64 not in data[start:]  # the pages are in the table only


# -- a recycled RAM -------------------------------------------------------------------------

NR = 24  # pages of the RAM these tests make
_page = st.integers(0, NR - 1)
_store = st.one_of(
    st.tuples(st.just("write"), st.integers(0, NR * PAGE_SIZE - 1),
              st.binary(min_size=1, max_size=3 * PAGE_SIZE)),
    st.tuples(st.just("u64"), st.integers(0, NR * PAGE_SIZE // 8 - 1), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("zero"), _page, st.integers(1, 4)),
    st.tuples(st.just("cpu"), _page, st.binary(min_size=1, max_size=64)))  # a CPU run storing unseen
_pages = st.dictionaries(_page, st.binary(min_size=1, max_size=64), max_size=6).map(
    lambda d: sorted((k * PAGE_SIZE, v.ljust(PAGE_SIZE, b"\x07")) for k, v in d.items()))


def _apply(mem, stores) -> None:
    for kind, at, what in stores:
        if kind == "write":
            n = min(len(what), NR * PAGE_SIZE - at)
            mem.write(RAM_BASE + at, what[:n])
        elif kind == "u64":
            mem.write_u64(RAM_BASE + at * 8, what)
        elif kind == "zero":
            k = min(what, NR - at)
            mem.zero(RAM_BASE + at * PAGE_SIZE, k * PAGE_SIZE)
        else:
            memory.emulator_enter()
            mem._map[at * PAGE_SIZE : at * PAGE_SIZE + len(what)] = what
            memory.emulator_leave()


def _ram(mem) -> list[bytes]:
    return [bytes(mem._map[k * PAGE_SIZE : (k + 1) * PAGE_SIZE]) for k in range(NR)]


@settings(max_examples=120, deadline=None)
@given(_pages, st.lists(st.lists(_store, max_size=12), min_size=1, max_size=4), st.data())
def test_a_recycled_ram_is_a_fresh_one(pages, lives, data):
    """`reuse_ram` on a RAM that a load set to the snapshot's pages, then stored all over (the
    host's and hyp's stores, zeroing, a CPU's unseen stores), life after life, some of them
    loading another snapshot: every page as a fresh RAM of that snapshot holds, whether only
    the pages stored to were set back or every page."""
    size = NR * PAGE_SIZE
    mem = _restore_ram(size, pages)
    for stores in lives:
        _apply(mem, stores)
        if data.draw(st.booleans()):
            pages = data.draw(_pages)
        fast = (mem._base == pages and not any(s[0] == "cpu" for s in stores))
        assert reuse_ram(mem, size, pages) is mem
        assert _ram(mem) == _ram(_restore_ram(size, pages))
        assert not any(mem._stored) and mem._base is pages
        if fast:  # (the full rewrite would leave the same)
            full = _restore_ram(size, pages)
            _apply(full, stores)
            full._base = None
            reuse_ram(full, size, pages)
            assert _ram(full) == _ram(mem)
