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

import functools
import io
import pickle
import sys
import types
from array import array
from collections import Counter
from typing import TYPE_CHECKING, Any, Final

from pkvm.abi.profiles import Profile, get_profile
from pkvm.machine.memory import PhysMemory, _restore_ram, reuse_ram

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
_BYTEARRAY: Final = "bytearray"  # a sparse bytearray's typecode in the snapshot


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


# (typecode, length, fill) -> an array (bytes for a bytearray) of that many `fill`s, the start of
# every array loaded so.
_FILLED: dict[tuple[str, int, int], array[Any] | bytes] = {}


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
            code = obj.typecode if isinstance(obj, array) else _BYTEARRAY
            return ("array", serial, code, len(obj), *_sparse(obj))
        ref = self._index.get(id(obj))
        if ref is not None:
            return ("global", *ref)
        if isinstance(obj, types.ModuleType):
            raise ValueError(f"cannot snapshot a reference to module {obj.__name__}")
        return None


class _Loader(pickle.Unpickler):
    def __init__(self, data: bytes, recycle: Machine | None = None):
        super().__init__(io.BytesIO(data))
        self._ram: PhysMemory | None = None
        self._spare: dict[tuple[str, int], list[array[Any] | bytearray]] = {}
        # serial -> array (`_Saver.persistent_id`)
        self._loaded: dict[int, array[Any] | bytearray] = {}
        if recycle is not None:
            self._ram = recycle.mem
            for a in recycle.spare_arrays():
                code = a.typecode if isinstance(a, array) else _BYTEARRAY
                self._spare.setdefault((code, len(a)), []).append(a)

    def _array(self, pid: tuple[Any, ...]) -> array[Any] | bytearray:
        """The array (or bytearray) `_Saver` saved as `pid`: its fills and runs, written into a
        spare one of the same type and length where the recycled machine has one."""
        _, serial, typecode, n, fill, runs = pid
        out = self._loaded.get(serial)
        if out is not None:
            return out
        filled = _FILLED.get((typecode, n, fill))
        if filled is None:
            filled = _FILLED[(typecode, n, fill)] = (
                bytes([fill]) * n if typecode == _BYTEARRAY else array(typecode, [fill]) * n)
        spare = self._spare.get((typecode, n))
        if spare:
            out = spare.pop()
            memoryview(out)[:] = filled
        else:
            out = bytearray(filled) if typecode == _BYTEARRAY else array(typecode, filled)
        raw = memoryview(out).cast("B")
        size = raw.nbytes // n
        for first, data in runs:
            raw[first * size : first * size + len(data)] = data
        self._loaded[serial] = out
        return out

    def find_class(self, module: str, name: str) -> Any:
        """`pickle.Unpickler.find_class` for a module already imported (every class a
        snapshot names is in a loaded module): its attribute, without the import machinery
        the generic lookup goes through for each of a load's classes."""
        mod = sys.modules.get(module)
        if mod is None or "." in name:
            return super().find_class(module, name)
        sys.audit("pickle.find_class", module, name)
        return getattr(mod, name)

    def persistent_load(self, pid: Any) -> Any:
        if pid[0] == "profile":
            return get_profile(pid[1])
        if pid[0] == "array":
            return self._array(pid)
        if pid[0] == "ram":  # the RAM's constructor: from the recycled machine's RAM if any
            return _restore_ram if self._ram is None else functools.partial(reuse_ram, self._ram)
        _, modname, name = pid
        mod = sys.modules[modname]
        return getattr(mod, name) if name else mod


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
    return out.getvalue()


def load(data: bytes, recycle: Machine | None = None) -> Machine:
    """A new, independent machine from `save`'s bytes. `recycle`: a machine its caller is done
    with (the fuzzer's, after a hyp panic), never to be used again: the new machine takes over
    its RAM file and its vmemmap arrays, each set back to the snapshot's contents
    (`pkvm.machine.memory.reuse_ram`), instead of new ones (new memory costs a page fault per
    page touched); it is the machine a load without `recycle` gives."""
    m: Machine = _Loader(data, recycle).load()
    return m
