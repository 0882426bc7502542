"""How EL2 code dies: `BUG_ON` and EL2 aborts become `HypBug`, turned into `HypPanic`."""

from __future__ import annotations


class HypBug(Exception):
    """A `BUG_ON` (or an EL2 fault) inside the hyp; the dispatcher makes it a `HypPanic`."""


def BUG_ON(cond: object, reason: str) -> None:  # noqa: N802 - the kernel's name
    if cond:
        raise HypBug(reason)
