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


# WARN_ONs the kernel itself lets the host reach (the model mirrors them): each entry names the
# function and the exact WARN line, matches only that site, and counts what it excused. A WARN
# at EL2 is fatal (as in Linux), so reaching one of these is a hyp panic: an availability
# finding, as on the real kernel, not a `no-warn` finding.
KNOWN_KERNEL_WARNS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "ffa-frag-tx-reclaim": (
        ("do_ffa_mem_frag_tx",), "_warn(h, res[0] != FFA_SUCCESS)",
        "nvhe/ffa.c do_ffa_mem_frag_tx: when sharing the fragment's ranges fails, the proxy "
        "reclaims the transaction by the host's handle and WARNs if that fails; a host that "
        "passes a bogus handle with bad ranges reaches it (both kernels)"),
    "unshare-hyp-ffa-page": (
        ("host_unshare_hyp", "do_unshare"), "_warn(h, __do_unshare(h, share))",
        "6.12 nvhe/mem_protect.c do_unshare returns WARN_ON(__do_unshare()): host-initiated "
        "transitions skip the hyp-side state check (__hyp_ack_skip_pgtable_check without "
        "CONFIG_NVHE_EL2_DEBUG), so __pkvm_host_unshare_hyp of a page the host shared with "
        "FF-A (host SHARED_OWNED, nothing mapped at EL2) passes, gives the page back to the "
        "host and WARNs when hyp_complete_unshare unmaps nothing (found by pkvm fuzz --smc)"),
    "force-reclaim-reused-handle": (
        ("__pkvm_host_force_reclaim_page_guest",), "_warn(h, pa != phys)",
        "7.2 nvhe/mem_protect.c __pkvm_host_force_reclaim_page_guest: WARN_ON(pa != phys). "
        "__pkvm_finalize_teardown_vm does not reclaim the dying guest's data pages, whose host "
        "stage-2 annotations keep naming (handle, gfn); a host that finalizes without "
        "reclaiming them, creates a VM that gets the same handle and maps another page at that "
        "gfn, then force-reclaims an old page, reaches the WARN (found by pkvm fuzz; the real "
        "host driver reclaims every page before it finalizes)"),
}


def _known(stack: str) -> str | None:
    for name, (funcs, line, _why) in KNOWN_KERNEL_WARNS.items():
        if all(f"in {f}\n" in stack for f in funcs) and stack.rstrip().endswith(line):
            return name
    return None


def excused_warns(inspect: Any) -> dict[str, int]:
    """How many of the machine's WARNs each `KNOWN_KERNEL_WARNS` entry excused."""
    out: dict[str, int] = {}
    for stack in inspect.warnings():
        k = _known(stack)
        if k:
            out[k] = out.get(k, 0) + 1
    return out


class NoWarn:
    """No hyp `WARN_ON` fires on a host-reachable path. In Linux a WARN the host can provoke is
    a bug (fixed as one, e.g. "KVM: arm64: Don't WARN from __pkvm_host_share_guest()"): the
    host must get an errno, not a splat. A WARN at one of `KNOWN_KERNEL_WARNS` is the kernel's
    own behaviour: not reported here, counted by `excused_warns`.

    A fired WARN panics the hyp (`HypPanic.warn`), so after a call that WARNed this oracle is
    asked by whoever saw the panic (the fuzzer, the explorer), not by the per-call checker."""

    @staticmethod
    def violations(inspect: Any) -> list[str]:
        if not inspect.warning_count():
            return []
        bad = [w for w in inspect.warnings() if _known(w) is None]
        if not bad:
            return []
        return [f"hyp WARN_ON fired ({len(bad)} so far); first at:\n{bad[0].rstrip()}"]


ORACLES: dict[str, Oracle] = {
    "no-warn": NoWarn(),
}


ORACLES["hw"] = importlib.import_module("pkvm.check.hw_oracles")  # stray EL2 stores, stale TLBs


def run_all(inspect: Any) -> list[tuple[str, str]]:
    """(oracle, message) for every violation any registered oracle reports now."""
    out = []
    for name, o in ORACLES.items():
        for msg in o.violations(inspect):
            out.append((name, msg))
    return out
