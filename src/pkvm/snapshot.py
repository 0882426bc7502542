"""Machine snapshots: a whole machine saved as bytes between two calls and loaded again as an
independent machine, as QEMU's `savevm`/`loadvm` do for a VM.

A snapshot holds the RAM (only the pages that are not all zeros), EL2's registers, the hyp's
state, the firmware (PSCI, the FF-A secure world) and the host driver; loading it gives a machine
that continues exactly as the saved one would have. The fuzzer boots a machine once and loads its
snapshot every time a hostile step has panicked the hyp, instead of booting again
(`pkvm.check.fuzz_ops.World`).

What a snapshot does not hold: the observers a user attached (a checker, listeners, interposers,
store observers: callables that belong to the caller; attach them again after `load`), and a CPU
core that has run guest code (the emulator's internal state is not saved): `save` refuses such
a machine with `ValueError`. Objects the package keeps at module level (the ABI profiles, the
sentinels the hyp compares by identity, the modules a profile selects) are saved by name and
loaded as the same objects."""

from __future__ import annotations

import io
import pickle
import pickletools
import struct
import sys
import types
from array import array
from collections import Counter
from typing import TYPE_CHECKING, Any, Final

from pkvm.abi.profiles import Profile
from pkvm.machine.memory import _restore_ram
from pkvm.snapshot_load import BYTEARRAY, LoadHooks, find_class

if TYPE_CHECKING:
    from pkvm.board import Machine

_SCALARS = (int, str, bytes, float, bool, type(None), types.FunctionType, type)


def _module_globals() -> dict[int, tuple[str, str]]:
    """Every object a `pkvm` module holds by name (but scalars, functions and classes, which
    pickle saves by value or by name anyway), and the modules themselves."""
    index: dict[int, tuple[str, str]] = {}
    for modname, mod in list(sys.modules.items()):
        if mod is None or not (modname == "pkvm" or modname.startswith("pkvm.")):
            continue
        index[id(mod)] = (modname, "")
        for name, value in list(vars(mod).items()):
            if not isinstance(value, _SCALARS):
                index.setdefault(id(value), (modname, name))
    return index


# A typed array or a bytearray of at least this many entries (the vmemmap's arrays and the host
# allocator's map: one entry per RAM page) is saved as the value most of its entries hold and
# the runs of entries that hold another (`_sparse`): a few KiB rather than its whole bytes,
# which a load would first copy out of the snapshot.
_SPARSE_MIN: Final = 4096


def _sparse(a: array[Any] | bytearray) -> tuple[int, list[tuple[int, bytes]]]:
    """(fill, [(first index, the bytes of the entries from there), ...]) of `a`."""
    fill = Counter(a).most_common(1)[0][0]
    runs: list[tuple[int, bytes]] = []
    i, n = 0, len(a)
    while i < n:
        if a[i] == fill:
            i += 1
            continue
        j = i
        while j < n and a[j] != fill:
            j += 1
        runs.append((i, bytes(memoryview(a)[i:j])))
        i = j
    return fill, runs


class _Saver(pickle.Pickler):
    def __init__(self, out: io.BytesIO, index: dict[int, tuple[str, str]]):
        super().__init__(out, protocol=pickle.HIGHEST_PROTOCOL)
        self._index = index
        self._arrays: dict[int, tuple[int, array[Any]]] = {}  # id -> (serial, the array)

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, Profile):
            return ("profile", obj.name)
        if obj is _restore_ram:
            return ("ram",)
        if type(obj) in (array, bytearray) and len(obj) >= _SPARSE_MIN:
            # (its serial: an array held in two places is loaded as one)
            serial = self._arrays.setdefault(id(obj), (len(self._arrays), obj))[0]
            code = obj.typecode if isinstance(obj, array) else BYTEARRAY
            return ("array", serial, code, len(obj), *_sparse(obj))
        ref = self._index.get(id(obj))
        if ref is not None:
            return ("global", *ref)
        if isinstance(obj, types.ModuleType):
            raise ValueError(f"cannot snapshot a reference to module {obj.__name__}")
        return None


# -- the literals a snapshot's loads share -----------------------------------------------
# A snapshot is two pickles: a table of its literals (every string and bytes object it holds:
# attribute names, the RAM's pages, the large arrays' runs), then the machine, which names
# each of them by its index in the unpickler's memo (`LONG_BINGET`). A load takes the memo
# of the table's one load (`_table`) instead of building the literals again: no string to
# allocate, hash and intern (every attribute a load sets is named by one), no page to copy
# out of the snapshot. They are immutable, so loads sharing them share nothing they change.
_TAG: Final = b"\x80\x05\x8c\x15pkvm.snapshot.shared1"  # how a snapshot with a table begins
_LITERALS: Final = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8",
                              "SHORT_BINBYTES", "BINBYTES", "BINBYTES8"})
_GETS: Final = frozenset({"GET", "BINGET", "LONG_BINGET"})


def _u32(op: bytes, n: int) -> bytes:
    return op + struct.pack("<I", n)


def _literal_table(values: list[str | bytes]) -> bytes:
    """The first pickle: each of `values` memoized at its index (each string interned), then
    None."""
    out = [_TAG, b"0"]  # (the tag's string popped)
    for v in values:
        if isinstance(v, str):
            raw = v.encode("utf-8", "surrogatepass")
            out.append(b"\x8c\x03sys\x8c\x06intern\x93" + _u32(b"X", len(raw)) + raw + b"\x85R")
        else:
            out.append(_u32(b"B", len(v)) + v)
        out.append(b"\x940")  # MEMOIZE, POP
    out.append(b"N.")
    return b"".join(out)


def _share_literals(body: bytes) -> bytes:
    """`body` (a protocol-5 pickle) as a literal table and the pickle rewritten to name each
    literal from the table: a memoized literal becomes a `LONG_BINGET` of its table index
    (equal literals: one entry), every other memoized object a `LONG_BINPUT` after the table,
    every get the index its object now has; one frame holds the whole pickle."""
    ops = list(pickletools.genops(body))
    values: list[str | bytes] = []
    index: dict[tuple[type, str | bytes], int] = {}
    dropped: set[int] = set()  # the positions in `ops` of the literals taken from the table
    memo: dict[int, int] = {}  # memo index in `body` -> in the snapshot
    n, literal = 0, -1  # MEMOIZEs so far; the position of the last op but a FRAME
    for k, (op, _, _) in enumerate(ops):
        if op.name == "MEMOIZE":
            if literal >= 0 and ops[literal][0].name in _LITERALS:
                value: Any = ops[literal][1]  # (a str or bytes: its op's argument)
                memo[n] = index.setdefault((type(value), value), len(values))
                if memo[n] == len(values):
                    values.append(value)
                dropped.add(literal)
            n += 1
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            raise ValueError("a snapshot pickle memoizes with MEMOIZE")
        if op.name != "FRAME":
            literal = k
    out: list[bytes] = []
    n, nxt = 0, len(values)
    for k, (op, arg, pos) in enumerate(ops):
        if op.name in ("PROTO", "FRAME") or k in dropped:
            continue
        if op.name == "MEMOIZE":
            if n in memo:  # the literal: from the table
                out.append(_u32(b"j", memo[n]))
            else:
                memo[n] = nxt
                out.append(_u32(b"r", nxt))
                nxt += 1
            n += 1
        elif op.name in _GETS:
            out.append(_u32(b"j", memo[int(arg or 0)]))
        else:
            out.append(body[pos : ops[k + 1][2] if k + 1 < len(ops) else len(body)])
    rest = b"".join(out)
    return _literal_table(values) + b"\x80\x05\x95" + struct.pack("<Q", len(rest)) + rest


# snapshot -> (the memo of its literal table's load, where its machine's pickle begins), for
# the last few snapshots loaded
_TABLES: Final[dict[bytes, tuple[Any, int]]] = {}
_TABLES_KEPT: Final = 8


def _table(data: bytes) -> tuple[Any, int]:
    """The memo (an `UnpicklerMemoProxy`) holding `data`'s literal table, and the offset of
    its machine's pickle: loaded once per snapshot."""
    found = _TABLES.get(data)
    if found is None:
        f = io.BytesIO(data)
        first = pickle.Unpickler(f)
        if first.load() is not None:
            raise ValueError("not a snapshot: its literal table is not one")
        found = (first.memo, f.tell())
        if len(_TABLES) >= _TABLES_KEPT:
            del _TABLES[next(iter(_TABLES))]
        _TABLES[data] = found
    return found


class _Loader(pickle.Unpickler):
    """The unpickler of a snapshot: its persistent objects and classes found by the compiled
    `LoadHooks` (`pkvm.snapshot_load`); a subclass's own `find_class` (or one a test sets on
    this class: pickle's, the generic lookup) is used instead where it has one. A snapshot
    with a literal table (`_share_literals`) is read from its machine's pickle on, with the
    table's memo."""

    def __init__(self, data: bytes, recycle: Machine | None = None):
        f = io.BytesIO(data)
        super().__init__(f)
        hooks = LoadHooks(self, recycle)
        self.persistent_load = hooks.persistent_load  # type: ignore[method-assign]
        if type(self).find_class is _FIND_CLASS:
            self.find_class = hooks.find_class  # type: ignore[method-assign]
        if data.startswith(_TAG):
            memo, start = _table(data)
            f.seek(start)
            self.memo = memo

    def find_class(self, module: str, name: str) -> Any:
        """`pkvm.snapshot_load.find_class` (a load installs the compiled `LoadHooks.find_class`,
        the same, in its place)."""
        return find_class(self, module, name)


_FIND_CLASS: Final = _Loader.find_class


def save(m: Machine) -> bytes:
    """The machine `m` as bytes (see the module's docstring for what is left out)."""
    if m.checker is not None or m.listeners or m.has_observers():
        raise ValueError("cannot snapshot a machine with a checker, listeners, interposers or "
                         "store observers attached: snapshot it before attaching them")
    out = io.BytesIO()
    try:
        _Saver(out, _module_globals()).dump(m)
    except (TypeError, ValueError, pickle.PicklingError) as e:  # pickle on ctypes and handles
        raise ValueError(f"cannot snapshot this machine: {e} (a CPU that has run guest code "
                         "keeps emulator state a snapshot does not hold)") from e
    return _share_literals(out.getvalue())


def load(data: bytes, recycle: Machine | None = None) -> Machine:
    """A new, independent machine from `save`'s bytes. `recycle`: a machine its caller is done
    with (the fuzzer's, after a hyp panic), never to be used again: the new machine takes over
    its RAM file and its vmemmap arrays, each set back to the snapshot's contents
    (`pkvm.machine.memory.reuse_ram`), instead of new ones (new memory costs a page fault per
    page touched); it is the machine a load without `recycle` gives."""
    m: Machine = _Loader(data, recycle).load()
    return m
