"""Oracles over the read-only view: invariants, the ghost specification, fuzzing, exploration."""

from pkvm.check.invariants import Checker, InvariantViolation

__all__ = ["Checker", "InvariantViolation"]
