"""The fuzzer's step generator: `generate(r, prof, cpus, n)` draws n hostile steps.

Operations and their operands are described in `pkvm.check.fuzz_ops`; here are their weights
and the distributions of their symbolic operands (pools of pages in every state, handles live,
stale and forged, values interesting or relative to what is there, race points).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from pkvm.check.ffa_ops import smc_ops
from pkvm.check.fuzz_ops import GFN0, INTERESTING_U64, U64, Step
from pkvm.machine.memory import PAGE_SHIFT, PAGE_SIZE

GFN0_IPA = GFN0 << PAGE_SHIFT


# --- generating steps ----------------------------------------------------------------------------
def _pfn_spec(r: random.Random) -> tuple[Any, ...]:
    kind = r.choice(["page", "page", "shared", "vmmem", "guest", "edge", "special"])
    return (kind, r.randrange(64))


def _handle_spec(r: random.Random) -> tuple[Any, ...]:
    return (r.choice(["vm", "vm", "vm", "cur", "seen", "forged"]), r.randrange(16))


# Where a host pointer argument points: pages in every state and history (`World.host_ptr`),
# "recent" (pages whose state a step just changed) drawn most.
PTR_POOL = ["recent", "recent", "recent", "shared", "unshared", "returned", "vmmem", "guest",
            "page", "special"]
# Offsets into the page: its start, fields inside, and structs straddling into the next page.
PTR_OFFSETS = [0, 0, 8, 0x40, 1, PAGE_SIZE - 8, PAGE_SIZE - 4, PAGE_SIZE - 0x10]


def _ptr_spec(r: random.Random, kind: str | None = None) -> tuple[Any, ...]:
    """A host pointer: to a struct of the `kind` the handler expects (when it has one), or
    into the pointer pool."""
    k = r.choice(([kind] * 3 if kind else []) + ["fresh"] + PTR_POOL)
    off = r.choice(PTR_OFFSETS)
    n = r.choice([1, 2, 3]) if k == "fresh" else r.randrange(16)
    return (k, n, off)


# Handlers taking a host kernel pointer in x1 (a struct kvm_s2_mmu, kvm_vcpu or vgic_v3_cpu_if),
# with the kind of struct the host driver passes there, and how many plain arguments follow.
PTR_HANDLERS = [
    ("__kvm_tlb_flush_vmid_ipa", "kvm", 2), ("__kvm_tlb_flush_vmid_ipa_nsh", "kvm", 2),
    ("__kvm_tlb_flush_vmid_range", "kvm", 2), ("__kvm_tlb_flush_vmid", "kvm", 0),
    ("__kvm_flush_cpu_context", "kvm", 0), ("__kvm_adjust_pc", "vcpu", 0),
    ("__kvm_vcpu_run", "vcpu", 0), ("__pkvm_vcpu_init_traps", "vcpu", 0),
    ("__vgic_v3_save_vmcr_aprs", None, 0), ("__vgic_v3_save_aprs", None, 0),
    ("__vgic_v3_restore_vmcr_aprs", None, 0),
]


def _ptr_handlers(prof: Any) -> list[tuple[str, str | None, int]]:
    """The pointer-taking handlers of `prof`'s ABI (with an explicit vCPU load, vcpu_run runs
    the loaded vCPU and takes no pointer)."""
    return [h for h in PTR_HANDLERS if h[0] in prof.hcalls
            and not (h[0] == "__kvm_vcpu_run" and prof.explicit_vcpu_load)]


def _ptr_call(r: random.Random, handlers: list[tuple[str, str | None, int]]) -> tuple[Any, ...]:
    name, kind, nargs = r.choice(handlers)
    extra = tuple(r.choice([0, 1, 3, GFN0_IPA, r.getrandbits(48), U64]) for _ in range(nargs))
    return (name, _ptr_spec(r, kind), extra)


def _scribble_value(r: random.Random) -> Any:
    if r.random() < 0.4:
        return ("rel", r.choice([-1, 1, 1, 2, 64]))
    return r.choice(INTERESTING_U64 + [r.getrandbits(64)])


def _race_value(r: random.Random) -> Any:
    return _scribble_value(r)


def _gfn(r: random.Random) -> Any:
    return r.choice([0, 63, r.randrange(64), 64, 1 << 20, ("mapped", r.randrange(64)),
                     ("mapped", r.randrange(64))])


def _guest_ops(r: random.Random) -> list[tuple[str, int, Callable[[], tuple[Any, ...]]]]:
    return [
        ("share_guest", 4, lambda: (_pfn_spec(r), _gfn(r), r.choice([1, 1, 2, 512]),
                                    r.choice([0xF, 0xF, 0xC, 0x3, 0x1, 0x10, 0]))),
        ("donate_guest", 4, lambda: (_pfn_spec(r), _gfn(r))),
        ("unshare_guest", 3, lambda: (_handle_spec(r), _gfn(r), r.choice([1, 1, 2, 512]))),
        ("reclaim_dying", 3, lambda: (_handle_spec(r), _gfn(r))),
        ("force_reclaim", 2, lambda: (_pfn_spec(r),)),
        ("relax_perms", 2, lambda: (_gfn(r), r.choice([0xF, 0xC, 0x8, 0x3, 0x1, 0x10]))),
        ("mkyoung", 1, lambda: (_gfn(r), 0)),
        ("wrprotect", 1, lambda: (_handle_spec(r), _gfn(r), r.choice([1, 1, 512]), 0)),
        ("test_clear_young", 1, lambda: (_handle_spec(r), _gfn(r), 1, r.randrange(2))),
    ]


def generate(r: random.Random, prof: Any, cpus: int, n: int, smc: bool = False) -> list[Step]:
    """n hostile steps for profile `prof`; with `smc`, host SMCs too (hostile FF-A calls and
    PSCI calls, `pkvm.check.ffa_ops.smc_ops`), drawn after the others so that runs without them
    stay what they were."""
    ptr_handlers = _ptr_handlers(prof)
    ops: list[tuple[str, int, Callable[[], tuple[Any, ...]]]] = [
        ("alloc", 3, lambda: ()),
        ("share", 8, lambda: (_pfn_spec(r),)),
        ("unshare", 6, lambda: (_pfn_spec(r),)),
        ("create_vm", 4, lambda: (r.randint(1, 3), r.random() < 0.5)),
        ("map", 6, lambda: (r.randrange(8), r.choice([0, 63, r.randrange(64)]), r.randint(1, 3))),
        ("destroy", 2, lambda: (r.randrange(8),)),
        ("lifecycle", 1, lambda: (r.randint(1, 3), r.random() < 0.5,
                                  tuple(r.choice([0, 63, r.randrange(64)])
                                        for _ in range(r.randint(1, 4))), r.random() < 0.7)),
        ("init_vm", 2, lambda: (_ptr_spec(r, "kvm"), _ptr_spec(r, "fresh"), _ptr_spec(r, "fresh"))),
        ("init_vcpu", 3, lambda: (_handle_spec(r), _ptr_spec(r, "vcpu"), _ptr_spec(r, "fresh"))),
        ("scribble", 4, lambda: (r.randrange(8), r.randrange(3), r.randrange(128),
                                 _scribble_value(r))),
        ("scribble_init", 4, lambda: (r.randrange(8), r.randrange(4), r.randrange(64),
                                      _scribble_value(r))),
        ("exhaust", 1 if r.random() < 0.5 else 0, lambda: (r.choice([0, 1, 2, 3, 8, 64]),)),
        ("release", 1, lambda: ()),
        ("ptr_call", 4, lambda: _ptr_call(r, ptr_handlers)),
        ("raw", 1, lambda: (r.choice([0xC6000000 + r.randrange(64), 0x84000000,
                                      r.getrandbits(64)]), r.getrandbits(64))),
    ]
    if prof.reserve_vm:
        ops += [("reserve", 3, lambda: ()), ("unreserve", 2, lambda: (_handle_spec(r),)),
                ("start_teardown", 3, lambda: (_handle_spec(r),)),
                ("finalize_teardown", 3, lambda: (_handle_spec(r),))]
    else:
        ops += [("teardown", 3, lambda: (_handle_spec(r),))]
    guest: list[tuple[str, int, Callable[[], tuple[Any, ...]]]] = []
    if prof.hyp_owned_guest_stage2:  # the guest-memory hypercalls
        guest = _guest_ops(r)
        ops += guest
    if prof.explicit_vcpu_load:
        ops += [
            ("load", 6, lambda: (_handle_spec(r), r.choice([0, 0, 1, 2, 3, 255, 0xFFFFFFFF]))),
            ("put", 5, lambda: ()),
        ]
    if "__pkvm_tlb_flush_vmid" in prof.hcalls:
        ops += [("tlb_flush", 1, lambda: (_handle_spec(r),))]
    if prof.explicit_vcpu_load and guest:  # sessions: guest-memory calls with a vCPU loaded
        g_names, g_weights = [o[0] for o in guest], [o[1] for o in guest]
        g_gens = {o[0]: o[2] for o in guest}

        def inner() -> tuple[Any, ...]:
            return tuple((op, g_gens[op]()) for op in r.choices(g_names, g_weights,
                                                                  k=r.randint(1, 4)))

        ops += [
            ("session", 10, lambda: (r.randrange(8), r.randrange(4), r.random() < 0.8, inner())),
            ("memcache", 3, lambda: (r.randrange(8), r.randrange(4),
                                     r.choice(["plain", "unaligned", "cycle", "chain"]),
                                     _pfn_spec(r), r.choice([0, 1, 2, 3, 5, 64, U64]),
                                     r.choice([8, 0x800, 0xFFF]), r.randrange(64))),
        ]
    if smc:
        ops += smc_ops(r)
    raceable = [o for o in ops if o[0] in ("init_vcpu", "init_vm", "session", "load",
                                           "scribble_init", "map", "ptr_call")]
    names = [o[0] for o in ops]
    weights = [o[1] for o in ops]
    gens = {o[0]: o[2] for o in ops}
    steps = []
    for _ in range(n):
        cpu = r.randrange(cpus)
        if r.random() < 0.12:
            inner_op = r.choice(raceable)
            steps.append(Step("race", cpu, (_race_value(r), r.randrange(8),
                                            (inner_op[0], inner_op[2]()))))
            continue
        op = r.choices(names, weights)[0]
        steps.append(Step(op, cpu, gens[op]()))
    return steps
