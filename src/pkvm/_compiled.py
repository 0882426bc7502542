"""Which of pkvm's modules run compiled, and the switch that runs the Python source instead.

`pip install -e .` compiles the typed core with mypyc (`setup.py` lists it): each compiled
module's extension (`mm.cpython-311-x86_64-linux-gnu.so`) sits beside its source, and Python
imports an extension before a source file of the same name. The Python source stays the one
truth; two cases load it instead of every extension, for the whole package at once (compiled
modules call each other directly, so the package never runs half compiled):

- `PKVM_PURE=1` in the environment: the test suite runs once each way, and code that rewrites
  the model's source (the conformance mutants) runs on the pure model;
- in a source checkout, a source file newer than its extension (edited after the last build):
  a warning names it and says how to rebuild, so an old build never runs in place of an edit.

A checkout whose last build was meant to compile but fell back to pure Python (mypyc or the C
build failed; `setup.py` leaves the reason in `_build_failed`) also warns, at every import.

This module is never compiled itself: `pkvm/__init__.py` calls `choose()` before any other.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

PKG = Path(__file__).resolve().parent
_SUFFIXES = tuple(importlib.machinery.EXTENSION_SUFFIXES)

# Why this process runs the pure source ("" when it may load extensions).
pure_reason = ""


def extensions() -> dict[str, Path]:
    """Each pkvm module with a compiled extension beside its source: name -> extension file."""
    out: dict[str, Path] = {}
    for dirpath, _dirs, files in os.walk(PKG):
        for f in files:
            suffix = next((s for s in _SUFFIXES if f.endswith(s)), None)
            if suffix is None:
                continue
            src = Path(dirpath, f[: -len(suffix)] + ".py")
            if src.exists():  # mypyc's shared `*__mypyc` libraries have no source
                out[".".join(src.relative_to(PKG.parent).with_suffix("").parts)] = Path(dirpath, f)
    return out


def stale(exts: dict[str, Path]) -> list[str]:
    """The modules whose source changed after their extension was built (a source checkout)."""
    return sorted(m for m, so in exts.items()
                  if Path(str(so).rsplit(".", 1)[0].rsplit(".", 1)[0] + ".py").stat().st_mtime
                  > so.stat().st_mtime)


class _SourceFirst(importlib.abc.MetaPathFinder):
    """Finds a pkvm module's `.py` before its extension (packages are left to the usual finders:
    an `__init__.py` is never compiled)."""

    def find_spec(self, name: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if path is None or not name.startswith("pkvm."):
            return None
        leaf = name.rpartition(".")[2]
        for d in path:
            src = os.path.join(d, leaf + ".py")
            if os.path.isfile(src):
                return importlib.util.spec_from_file_location(name, src)
        return None


def choose() -> None:
    """Decide, before any other pkvm module is imported, whether this process runs compiled."""
    global pure_reason
    if os.environ.get("PKVM_PURE") == "1":
        pure_reason = "PKVM_PURE=1"
    elif (PKG.parent.parent / "setup.py").exists():  # a source checkout (editable install)
        failed = PKG / "_build_failed"
        if failed.exists() and not extensions():
            pure_reason = f"the last build fell back: {failed.read_text().strip()}"
            warnings.warn(f"pkvm runs pure Python: {pure_reason}; `pip install -v -e .` shows "
                          "the whole error", stacklevel=3)
        old = stale(extensions())
        if old:
            pure_reason = f"sources newer than their compiled modules: {', '.join(old[:3])}" + (
                f" and {len(old) - 3} more" if len(old) > 3 else "")
            warnings.warn(f"pkvm runs pure Python: {pure_reason}; rebuild with `pip install -e .` "
                          "(or set PKVM_PURE=1 to silence this)", stacklevel=3)
    if pure_reason and not any(isinstance(f, _SourceFirst) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceFirst())


def loaded() -> list[str]:
    """The pkvm modules this process has imported compiled."""
    return sorted(n for n, m in list(sys.modules.items())
                  if n.startswith("pkvm.") and not n.endswith("__mypyc")  # mypyc's shared code
                  and str(getattr(m, "__file__", "")).endswith(_SUFFIXES))


def describe() -> str:
    """One line: how this process runs the model (for test reports and benchmarks)."""
    n = len(loaded())
    if n:
        return f"compiled with mypyc ({n} modules loaded compiled)"
    if pure_reason:
        return f"pure Python ({pure_reason})"
    return "pure Python (no compiled build installed)"
