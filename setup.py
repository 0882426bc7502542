"""Optional compiled build: `PKVM_MYPYC=1 pip install --no-build-isolation .` compiles
the leaf modules below with mypyc (needs mypy, from the `dev` extra, and a C compiler). Without
PKVM_MYPYC the package is pure Python, the default: the Python source is the one truth either way
and every module is importable uncompiled."""

import os

from setuptools import setup

COMPILED = [
    "src/pkvm/arch/pte.py",
    "src/pkvm/arch/pgtable.py",
    "src/pkvm/arch/pgtable_hyp.py",
    "src/pkvm/arch/pgtable_stage2.py",
    "src/pkvm/machine/memory.py",
]

ext_modules = []
if os.environ.get("PKVM_MYPYC") == "1":
    from mypyc.build import mypycify

    # Only the listed modules are compiled and must type-check; the rest of the package is
    # imported as plain Python.
    ext_modules = mypycify(["--follow-imports=silent", "--ignore-missing-imports", *COMPILED],
                           opt_level="3", separate=True)

setup(ext_modules=ext_modules)
