"""Model mutants: small wrong changes to the model's hyp, one at a time, for the conformance
tool's mutation score (`tests/test_conform_diff.py`, `benchmarks/bench_conform.py`).

A mutant rewrites one snippet of one function's source (an errno, a check removed, a state
change skipped, an off-by-one) and swaps the rewritten function in everywhere the model holds
the original. `pkvm conform`'s default random budget against the real kernels must tell each
one apart from Linux: a step that differs.
"""

from __future__ import annotations

import inspect
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    module: str  # where the function lives
    function: str
    old: str  # a snippet of its source (its first occurrence is replaced)
    new: str
    kernels: tuple[str, ...]  # the kernels whose code path runs the snippet
    what: str


BOTH, V72, V612 = ("6.12", "7.2"), ("7.2",), ("6.12",)
MP, MP612 = "pkvm.hyp.mem_protect", "pkvm.hyp.mem_protect_6_12"
MPG, PKVM = "pkvm.hyp.mem_protect_guest", "pkvm.hyp.pkvm"
PKVM_72 = "pkvm.hyp.pkvm_two_phase"  # the 7.2 VM life cycle

MUTANTS = [
    Mutant("share-hyp-errno", MP, "host_share_hyp",
           "if ret:\n            return ret", "if ret:\n            return -EBUSY", V72,
           "an errno: share_hyp of a page the host does not own alone answers -EBUSY"),
    Mutant("share-hyp-errno-6.12", MP612, "check_share",
           "if ret:\n        return ret", "if ret:\n        return -EBUSY", V612,
           "an errno: share_hyp of a page the host does not own alone answers -EBUSY"),
    Mutant("unshare-hyp-no-host-check", MP612, "check_unshare",
           "ret = host_request_unshare(h, tx)", "ret = 0", V612,
           # 7.2 checks the hyp's side too: the same answers
           "a missing check: unshare_hyp does not check the host shares the page"),
    Mutant("share-hyp-no-hyp-state", MP, "host_share_hyp",
           "set_hyp_state_range(h, phys, PAGE_SIZE, PageState.SHARED_BORROWED)", "pass", V72,
           "a skipped state change: share_hyp leaves the hyp's side of the page NOPAGE"),
    Mutant("unshare-hyp-stays-shared", MP612, "__do_unshare",
           "ret = host_initiate_unshare(h, tx)", "ret = 0", V612,
           "a page left shared: 6.12's unshare_hyp unmaps it at EL2 but the host keeps it "
           "SHARED_OWNED"),
    Mutant("reserve-vm-off-by-one", PKVM_72, "__pkvm_reserve_vm",
           "return idx + sizes.HANDLE_OFFSET", "return idx + sizes.HANDLE_OFFSET + 1", V72,
           "an off-by-one: reserved handles start at 0x1001"),
    Mutant("vcpu-load-off-by-one", PKVM_72, "pkvm_load_hyp_vcpu",
           "vcpu_idx >= vm.created_vcpus", "vcpu_idx > vm.created_vcpus", V72,
           "an off-by-one in a range: vcpu_load accepts index created_vcpus"),
    Mutant("start-teardown-twice", PKVM_72, "__pkvm_start_teardown_vm",
           "if vm.is_dying:\n            return -EINVAL\n        vm.is_dying = True",
           "vm.is_dying = True", V72,
           "a missing check: a dying VM can start its teardown again"),
    Mutant("share-guest-prot", MPG, "__pkvm_host_share_guest",
           "if prot & ~KVM_PGTABLE_PROT_RWX:\n        return -EINVAL",
           "if prot & ~KVM_PGTABLE_PROT_RWX:\n        prot &= KVM_PGTABLE_PROT_RWX", V72,
           "a missing check: share_guest drops unknown protection bits instead of refusing"),
    Mutant("clear-young-always-old", MPG, "__pkvm_host_test_clear_young_guest",
           "return 1 if acc & KVM_PTE_LEAF_ATTR_LO_S2_AF else 0", "return 0", V72,
           "a wrong result: test_clear_young never reports a young page"),
    Mutant("init-vm-zero-vcpus", PKVM, "__pkvm_init_vm",
           "if nr_vcpus < 1:", "if nr_vcpus < 0:", V612,  # 7.2 then refuses handle 0 alike
           "an off-by-one: init_vm accepts a struct kvm with no vCPUs"),
]

# Mutants the CI budget does not detect yet (measured against the real kernels; each is counted
# in the score and its test is a strict xfail, so detecting it turns the test red to update this)
UNDETECTED: dict[str, str] = {}


def model_is_compiled() -> bool:
    """Whether this process runs the hyp compiled (`pkvm._compiled`): the mutants cannot apply."""
    import pkvm.hyp.mem_protect as mp

    return not inspect.isfunction(mp.host_share_hyp)


def _replace_everywhere(orig, new) -> list[tuple[object, str]]:
    swapped = []
    for mod in list(sys.modules.values()):
        if not getattr(mod, "__name__", "").startswith("pkvm."):
            continue
        for attr, val in list(vars(mod).items()):
            if val is orig:
                setattr(mod, attr, new)
                swapped.append((mod, attr))
    return swapped


@contextmanager
def applied(m: Mutant) -> Iterator[None]:
    """The model with mutant `m` in place, for the duration of the block."""
    import importlib

    mod = importlib.import_module(m.module)
    orig = getattr(mod, m.function)
    if not inspect.isfunction(orig):
        raise RuntimeError(f"mutant {m.name}: {m.module} is compiled; a mutant rewrites the "
                           "Python source, so it runs on the pure model (PKVM_PURE=1)")
    src = textwrap.dedent(inspect.getsource(orig))
    if m.old not in src:
        raise ValueError(f"mutant {m.name}: {m.old!r} is not in {m.module}.{m.function}")
    code = compile(src.replace(m.old, m.new, 1), f"<mutant {m.name}>", "exec")
    scope = dict(vars(mod))
    exec(code, scope)  # noqa: S102 - our own source, one snippet changed
    new = scope[m.function]
    swapped = _replace_everywhere(orig, new)
    try:
        yield
    finally:
        for owner, attr in swapped:
            setattr(owner, attr, orig)
