"""How EL2 code dies: `BUG_ON`, a fired `WARN_ON` and EL2 aborts become `HypBug`, turned into
`HypPanic` by the dispatcher.

In the nVHE/pKVM hyp a `WARN_ON` is a `BRK` like `BUG_ON` (the hyp has no console to print a
splat on), and the host's `nvhe_hyp_panic_handler` (arch/arm64/kvm/handle_exit.c) treats every
hyp bug, warnings included, as fatal. So a fired WARN panics the machine here too; its reason
names the function, so a WARN panic can be told from a bad-pointer panic.
"""

from __future__ import annotations

from pkvm.errors import WARN_PREFIX


class HypBug(Exception):
    """A `BUG_ON`, a fired `WARN_ON` (or an EL2 fault) inside the hyp; the dispatcher makes it a
    `HypPanic`."""


class HypWarn(HypBug):
    """A `WARN_ON` that fired: as fatal as a `BUG_ON` (see the module docstring)."""

    def __init__(self, func: str, where: str):
        super().__init__(f"{WARN_PREFIX}{func} ({where})")
        self.func = func
        self.where = where


def BUG_ON(cond: object, reason: str) -> None:  # noqa: N802 - the kernel's name
    if cond:
        raise HypBug(reason)

