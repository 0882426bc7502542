"""How EL2 code dies: `BUG_ON`, a fired `WARN_ON` and EL2 aborts become `HypBug`, turned into
`HypPanic` by the dispatcher.

In the nVHE/pKVM hyp a `WARN_ON` is a `BRK` like `BUG_ON` (the hyp has no console to print a
splat on), and the host's `nvhe_hyp_panic_handler` (arch/arm64/kvm/handle_exit.c) treats every
hyp bug, warnings included, as fatal. So a fired WARN panics the machine here too; its reason
names the function, so a WARN panic can be told from a bad-pointer panic.
"""

from __future__ import annotations

import traceback
from typing import Any

from mypy_extensions import mypyc_attr

from pkvm.errors import WARN_PREFIX


# Python classes (methods compiled): a mypyc native exception class crashed in `__str__`.
@mypyc_attr(native_class=False)
class HypBug(Exception):
    """A `BUG_ON`, a fired `WARN_ON` (or an EL2 fault) inside the hyp; the dispatcher makes it a
    `HypPanic`."""


@mypyc_attr(native_class=False)
class HypWarn(HypBug):
    """A `WARN_ON` that fired: as fatal as a `BUG_ON` (see the module docstring).

    Its site is read from the exception's traceback once it has left the function holding the
    `WARN_ON` (`func`, `where`; `stack`: that frame and the one above, as `traceback` prints
    them): compiled with mypyc, the hyp's functions have no Python frames to look up while the
    WARN is raised, but each one the exception leaves is in its traceback."""

    def __init__(self, site: tuple[str, str, str] | None = None):
        super().__init__()
        self._site = site  # (func, where, stack) once known

    def _resolve(self) -> tuple[str, str, str]:
        if self._site is None:
            frames = traceback.extract_tb(self.__traceback__)[:-1]  # those above `_warn`
            if not frames:
                return ("?", "?", "")  # not raised yet, or caught inside `_warn`
            caller = frames[-1]
            where = f"pkvm/{caller.filename.rsplit('/pkvm/', 1)[-1]}:{caller.lineno}"
            stack = "".join(f'  File "{f.filename}", line {f.lineno}, in {f.name}\n    {f.line}\n'
                            for f in frames[-2:])  # as tracebacks print them, without carets
            self._site = (caller.name, where, stack)
        return self._site

    @property
    def func(self) -> str:
        return self._resolve()[0]

    @property
    def where(self) -> str:
        return self._resolve()[1]

    @property
    def stack(self) -> str:
        return self._resolve()[2]

    def __str__(self) -> str:
        return f"{WARN_PREFIX}{self.func} ({self.where})"

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled with its site (a traceback does not pickle)."""
        return (HypWarn, (self._resolve(),))


def BUG_ON(cond: object, reason: str) -> None:  # noqa: N802 - the kernel's name
    if cond:
        raise HypBug(reason)

