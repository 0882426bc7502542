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


class _Loader(pickle.Unpickler):
    """The unpickler of a snapshot: its persistent objects and classes found by the compiled
    `LoadHooks` (`pkvm.snapshot_load`); a subclass's own `find_class` (or one a test sets on
    this class: pickle's, the generic lookup) is used instead where it has one."""

    def __init__(self, data: bytes, recycle: Machine | None = None):
        super().__init__(io.BytesIO(data))
        hooks = LoadHooks(self, recycle)
        self.persistent_load = hooks.persistent_load  # type: ignore[method-assign]
        if type(self).find_class is _FIND_CLASS:
            self.find_class = hooks.find_class  # type: ignore[method-assign]

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
    return out.getvalue()


def load(data: bytes, recycle: Machine | None = None) -> Machine:
    """A new, independent machine from `save`'s bytes. `recycle`: a machine its caller is done
    with (the fuzzer's, after a hyp panic), never to be used again: the new machine takes over
    its RAM file and its vmemmap arrays, each set back to the snapshot's contents
    (`pkvm.machine.memory.reuse_ram`), instead of new ones (new memory costs a page fault per
    page touched); it is the machine a load without `recycle` gives."""
    m: Machine = _Loader(data, recycle).load()
    return m
