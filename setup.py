"""The build: the typed core compiled with mypyc, or pure Python where it cannot be.

`pip install -e .` (and `pip install .`) compiles the modules of CORE with mypyc (the `mypy`
of `[build-system] requires`) into C extensions, in place beside their sources for an editable
install. It installs pure Python instead, and says why (pip shows it with `-v`; `pkvm --version`
and the test report say how the model runs), when `PKVM_PURE=1` is set, when no C compiler is
found, or when mypyc or the C build fails; a failure is also written to `src/pkvm/_build_failed`,
which makes every import of a checkout warn until a build succeeds. Each build gives mypyc a
fresh directory for its C (`build/mypyc`): C left by an earlier run, whose tables of exported
functions no longer fit the modules, never mixes with the new, so installing again after an edit
always compiles (a full rebuild, a few minutes). The Python source is the one truth either way: every
module is importable uncompiled, and `PKVM_PURE=1` at run time loads the source of every module
even where extensions are installed (`pkvm/_compiled.py`; an extension older than its source in
a checkout is not used either).
"""

import os
import shlex
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

# The typed core: every module of these packages is compiled but those in PURE. Pure because
# mypyc cannot take them as they are: machine/uc_cp (a ctypes.Structure subclass, for which
# mypyc emits C that does not compile: the register file's one structure lives there, so
# machine/context is compiled) and hyp/pgtable (a star re-export of arch/pgtable). A class
# that must stay a Python class inside a compiled module says so with
# `@mypyc_attr(native_class=False)` (stage2_view's _Window, weakly referenced by its
# finalizer; memory's _RamFile; the hyp's exceptions). Of the
# package's top level, door.py (the HVC door's per-call path) is compiled: nothing replaces a
# Machine's doors on the instance (checkers use the declared seams, `interpose_hvc`,
# `interpose_smc` and `listeners`); board.py (the Machine) stays a Python class that passes its
# calls to the door (tools hold machines weakly and set their `tracing`). The host driver
# (host/) and port.py stay pure for now: a conformance test swaps host/psci's CPU_ON by module
# attribute, which compiled callers would not see. The checker's per-call readings are compiled
# too: inspect.py (the read-only view; HypView in inspect_hyp.py) and the check/ modules a checked
# call runs through (the invariants, the ghost and the oracles); check/violations stays pure (InvariantViolation subclasses
# AssertionError), and the fuzzer and explorer (which import board.py: board imports pkvm.check)
# stay pure. In a compiled import cycle no dataclass field may be typed with a class of a module
# that imports this one: mypyc reads the field types when the module starts, before the other
# module has the class (ghost.Ghost.checker is Any for this; typed Checker, the import
# segfaulted).
CORE = ["machine", "machine/decode", "arch", "abi", "hyp"]
CORE_FILES = ["door.py", "inspect.py", "inspect_hyp.py", "snapshot_load.py",
              "check/invariants.py",
              "check/page_invariants.py",
              "check/global_invariants.py", "check/ghost.py", "check/ghost_guest.py",
              "check/ghost_calls.py", "check/ghost_pvm.py", "check/ghost_ffa.py",
              "check/oracles.py", "check/hw_oracles.py"]
PURE = {"machine/uc_cp.py", "hyp/pgtable.py"}

ROOT = Path(__file__).resolve().parent
SRC = ROOT / "src/pkvm"
# mypyc's C sources, removed before each build (relative: setuptools wants relative sources).
MYPYC_DIR = "build/mypyc"
FAILED = SRC / "_build_failed"  # the reason the last build fell back to pure Python
# Absolute paths: a compiled function's traceback entries name its source file by the path
# given here, and the hyp's WARN sites are read from tracebacks (`pkvm.hyp.panic.HypWarn`).
COMPILED = sorted([str(p) for d in CORE for p in (SRC / d).glob("*.py")
                   if p.name != "__init__.py" and str(p.relative_to(SRC)) not in PURE]
                  + [str(SRC / f) for f in CORE_FILES])


def say(msg: str) -> None:
    print(f"pkvm setup: {msg}", file=sys.stderr, flush=True)


def remove_inplace_extensions() -> None:
    """Extensions of an earlier in-place build would be imported before the sources."""
    for suffix in (".so", ".pyd"):
        for p in SRC.rglob(f"*{suffix}"):
            p.unlink()


def fell_back(reason: str) -> None:
    """A build that was meant to compile installs pure: say so, and leave the reason for import."""
    say(f"WARNING: installing pure Python: {reason}")
    FAILED.write_text(reason + "\n")


def pure_reason() -> str:
    """Why this build is pure Python ("" to compile)."""
    if os.environ.get("PKVM_PURE") == "1":
        return "PKVM_PURE=1"
    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    if not cc or shutil.which(cc[0]) is None:
        return f"no C compiler ({' '.join(cc) or 'CC unset'} not found)"
    try:
        import mypyc.build  # noqa: F401
    except ImportError as e:
        return f"mypyc is not installed ({e})"
    return ""


class BuildExt(build_ext):
    """Builds the extensions; a failure falls back to pure Python instead of failing the install."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - any C build failure: install pure
            fell_back(f"the C build failed ({type(e).__name__}: {e})")
            self.extensions = []
            remove_inplace_extensions()
            return
        # Mark each in-place extension as built now: setuptools copies an unchanged one with the
        # old time, which would look older than a source edited without changing its C code.
        for ext in self.extensions:
            out = Path(self.get_ext_fullpath(ext.name))
            if self.inplace and out.exists():
                out.touch()

    def get_outputs(self) -> list[str]:
        return super().get_outputs() if self.extensions else []


def ext_modules() -> list:
    reason = pure_reason()
    FAILED.unlink(missing_ok=True)
    if not reason:
        try:
            from mypyc.build import mypycify

            shutil.rmtree(ROOT / MYPYC_DIR, ignore_errors=True)
            # Only the listed modules are compiled and must type-check; the rest of the
            # package (and the dependencies, absent from an isolated build) are seen as Any.
            exts = mypycify(["--follow-imports=silent", "--ignore-missing-imports", *COMPILED],
                            opt_level="3", separate=True, target_dir=MYPYC_DIR)
            say(f"compiling {len(COMPILED)} modules with mypyc")
            return exts
        except (Exception, SystemExit) as e:  # noqa: BLE001 - mypyc refused: install pure
            fell_back(f"mypyc failed ({type(e).__name__}: {e})")
            remove_inplace_extensions()
            return []
    say(f"installing pure Python: {reason}")
    remove_inplace_extensions()
    return []


# Only a build compiles (pip also runs this file to read the metadata: nothing to build then).
BUILDING = bool({"build", "build_ext", "bdist_wheel", "editable_wheel", "install", "develop"}
                & set(sys.argv[1:]))
setup(ext_modules=ext_modules() if BUILDING else [], cmdclass={"build_ext": BuildExt})
