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
from typing import TYPE_CHECKING, Any

from pkvm.abi.profiles import Profile, get_profile

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


class _Saver(pickle.Pickler):
    def __init__(self, out: io.BytesIO, index: dict[int, tuple[str, str]]):
        super().__init__(out, protocol=pickle.HIGHEST_PROTOCOL)
        self._index = index

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, Profile):
            return ("profile", obj.name)
        ref = self._index.get(id(obj))
        if ref is not None:
            return ("global", *ref)
        if isinstance(obj, types.ModuleType):
            raise ValueError(f"cannot snapshot a reference to module {obj.__name__}")
        return None


class _Loader(pickle.Unpickler):
    def persistent_load(self, pid: Any) -> Any:
        if pid[0] == "profile":
            return get_profile(pid[1])
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


def load(data: bytes) -> Machine:
    """A new, independent machine from `save`'s bytes."""
    m: Machine = _Loader(io.BytesIO(data)).load()
    return m
