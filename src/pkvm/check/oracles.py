"""Per-hypercall oracles over the read-only view, registered by name.

An oracle is a module (or object) with `violations(inspect) -> list[str]`: after every hypercall
the `Checker` calls each registered oracle with the machine's `pkvm.inspect` view, and a
non-empty list is an `InvariantViolation` named after the oracle (shrunk like any other
finding). Registering one is one line in `ORACLES`:

    ORACLES["stale-tlb"] = importlib.import_module("pkvm.check.hw_oracles")

The invariants of `pkvm.check.invariants` and the ghost specification stay where they are (they
need the call's pre-state); these oracles judge the state after the call alone.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol


class Oracle(Protocol):
    def violations(self, inspect: Any) -> list[str]: ...


class NoWarn:
    """No hyp `WARN_ON` fires on a host-reachable path. In Linux a WARN the host can provoke is
    a bug (fixed as one, e.g. "KVM: arm64: Don't WARN from __pkvm_host_share_guest()"): the
    host must get an errno, not a splat."""

    @staticmethod
    def violations(inspect: Any) -> list[str]:
        if not inspect.warning_count():
            return []
        w = inspect.warnings()
        return [f"hyp WARN_ON fired ({len(w)} so far); first at:\n{w[0].rstrip()}"]


ORACLES: dict[str, Oracle] = {
    "no-warn": NoWarn(),
}


def _optional(name: str, module: str) -> None:
    """Register `module` as oracle `name` if it exists in this checkout."""
    try:
        ORACLES[name] = importlib.import_module(module)  # type: ignore[assignment]
    except ModuleNotFoundError as e:
        if e.name != module:
            raise


_optional("hw", "pkvm.check.hw_oracles")  # stray EL2 stores, stale-TLB use (issue 12, item 2)


def run_all(inspect: Any) -> list[tuple[str, str]]:
    """(oracle, message) for every violation any registered oracle reports now."""
    out = []
    for name, o in ORACLES.items():
        for msg in o.violations(inspect):
            out.append((name, msg))
    return out
