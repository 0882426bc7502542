"""Optional compiled build: `PKVM_MYPYC=1 pip install --no-build-isolation .` compiles
the typed core below with mypyc (needs mypy, from the `dev` extra, and a C compiler). Without
PKVM_MYPYC the package is pure Python, the default: the Python source is the one truth either way
and every module is importable uncompiled."""

import os
from pathlib import Path

from setuptools import setup

# The typed core: every module of these packages is compiled but those in PURE. Pure because
# mypyc cannot take them as they are: machine/context (its ctypes structure makes mypyc emit C
# that does not compile), machine/preempt (hyp/spinlock's HypLocks, interpreted, subclasses
# its PreemptionPoints) and machine/stage2_view (its _Window is weakly referenced, which a
# compiled class does not allow). pkvm.hyp stays pure: compiled, the package segfaulted on import (in
# hyp/state's module init, not diagnosed yet), hyp/pgtable is a star re-export, spinlock's
# LockOrderError subclasses AssertionError, and the conformance mutants
# (tests/conform_mutants.py) rewrite hyp functions' source and swap them in by module attribute.
CORE = ["machine", "machine/decode", "arch", "abi"]
PURE = {"machine/context.py", "machine/preempt.py", "machine/stage2_view.py"}

SRC = Path("src/pkvm")
COMPILED = sorted(str(p) for d in CORE for p in (SRC / d).glob("*.py")
                  if p.name != "__init__.py" and str(p.relative_to(SRC)) not in PURE)

ext_modules = []
if os.environ.get("PKVM_MYPYC") == "1":
    from mypyc.build import mypycify

    # Only the listed modules are compiled and must type-check; the rest of the package is
    # imported as plain Python.
    ext_modules = mypycify(["--follow-imports=silent", "--ignore-missing-imports", *COMPILED],
                           opt_level="3", separate=True)

setup(ext_modules=ext_modules)
