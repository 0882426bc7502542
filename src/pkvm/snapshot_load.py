"""A snapshot load's hooks, compiled (`pkvm.snapshot._Loader`): the persistent objects a snapshot
names (the ABI profiles, the RAM's constructor, the large arrays, the package's module-level
objects) and the classes it names, found by a compiled function where pickle would call the
loader's Python methods.

A fuzzer loads the same snapshot after every hyp panic (~140 times in a 3,000-step campaign):
each load calls these ~40 times, which in Python frames was about a tenth of the load.
"""

from __future__ import annotations

import functools
import pickle
import sys
import weakref
from array import array
from typing import Any, Final

from pkvm.abi.profiles import get_profile
from pkvm.machine.memory import _restore_ram, reuse_ram

BYTEARRAY: Final = "bytearray"  # a sparse bytearray's typecode in the snapshot

# (typecode, length, fill) -> an array (bytes for a bytearray) of that many `fill`s, the start of
# every array loaded so.
_FILLED: Final[dict[tuple[str, int, int], Any]] = {}


class LoadHooks:
    """One load's `persistent_load` and `find_class` (see the module). `recycle`: the machine a
    load may take the RAM and the spare arrays of (`pkvm.snapshot.load`), or None. `loader`:
    the unpickler, whose own `find_class` (pickle's) finds what `find_class` here does not
    (weakly held: the loader holds these hooks)."""

    def __init__(self, loader: pickle.Unpickler, recycle: Any) -> None:
        self._loader: weakref.ref[pickle.Unpickler] = weakref.ref(loader)
        self._ram: Any = None
        self._spare: dict[tuple[str, int], list[Any]] = {}
        self._loaded: dict[int, Any] = {}  # serial -> array (`_Saver.persistent_id`)
        if recycle is not None:
            self._ram = recycle.mem
            for a in recycle.spare_arrays():
                code = a.typecode if isinstance(a, array) else BYTEARRAY
                self._spare.setdefault((code, len(a)), []).append(a)

    def persistent_load(self, pid: Any) -> Any:
        kind = pid[0]
        if kind == "array":
            return self._array(pid)
        if kind == "global":
            mod = sys.modules[pid[1]]
            return getattr(mod, pid[2]) if pid[2] else mod
        if kind == "profile":
            return get_profile(pid[1])
        if kind == "ram":  # the RAM's constructor: from the recycled machine's RAM if any
            return _restore_ram if self._ram is None else functools.partial(reuse_ram, self._ram)
        raise ValueError(f"unknown persistent id {pid!r}")

    def _array(self, pid: Any) -> Any:
        """The array (or bytearray) `_Saver` saved as `pid`: its fills and runs, written into a
        spare one of the same type and length where the recycled machine has one."""
        serial: int = pid[1]
        typecode: str = pid[2]
        n: int = pid[3]
        fill: int = pid[4]
        runs: list[tuple[int, bytes]] = pid[5]
        out = self._loaded.get(serial)
        if out is not None:
            return out
        key = (typecode, n, fill)
        filled = _FILLED.get(key)
        if filled is None:
            filled = bytes([fill]) * n if typecode == BYTEARRAY else array(typecode, [fill]) * n
            _FILLED[key] = filled
        spare = self._spare.get((typecode, n))
        if spare:
            out = spare.pop()
            memoryview(out)[:] = filled
        else:
            out = bytearray(filled) if typecode == BYTEARRAY else array(typecode, filled)
        raw = memoryview(out).cast("B")
        size = raw.nbytes // n
        for first, data in runs:
            raw[first * size : first * size + len(data)] = data
        self._loaded[serial] = out
        return out

    def find_class(self, module: str, name: str) -> Any:
        loader = self._loader()
        assert loader is not None
        return find_class(loader, module, name)


def find_class(loader: pickle.Unpickler, module: str, name: str) -> Any:
    """`pickle.Unpickler.find_class` for a module already imported (every class a snapshot
    names is in a loaded module): its attribute, without the import machinery the generic
    lookup goes through for each of a load's classes; pickle's own (`loader`'s) for the rest."""
    mod = sys.modules.get(module)
    if mod is None or "." in name:
        return pickle.Unpickler.find_class(loader, module, name)
    sys.audit("pickle.find_class", module, name)
    return getattr(mod, name)
