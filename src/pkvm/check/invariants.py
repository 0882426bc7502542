"""Named invariants checked after every hypercall (`Machine(check=True)`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pkvm.board import Machine


class InvariantViolation(AssertionError):
    """A promise of pKVM no longer holds; the message says which and what differs."""


class Checker:
    def __init__(self, machine: "Machine"):
        self.machine = machine

    def after_call(self, rec: Any) -> None:
        pass
