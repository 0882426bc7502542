"""`hyp_spinlock_t`, with the kernel's lock order asserted and a hook for the explorer.

The order is `vm_table_lock` -> `host_mmu.lock` -> `pkvm_pgd_lock` -> a VM's guest lock, with
page-pool locks innermost (`enum pkvm_component_id` and nvhe/pkvm.c). Taking a lock out of order,
twice, or releasing one that is not held is a hyp bug: `LockOrderError`.

Every acquire and release is a preemption point: when an interleaving explorer installs a
scheduler (`HypLocks.scheduler`), it is called there and may switch to another CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from mypy_extensions import mypyc_attr

from pkvm.machine.preempt import PreemptionPoints, Scheduler

RANK_VM_TABLE: Final = 10
RANK_HOST: Final = 20
RANK_HYP: Final = 30
RANK_GUEST: Final = 40
RANK_POOL: Final = 50


@mypyc_attr(native_class=False)  # a compiled class cannot subclass AssertionError
class LockOrderError(AssertionError):
    """The hyp took its locks in an order Linux forbids (an inversion is a deadlock waiting)."""


__all__ = ["HypLocks", "HypSpinLock", "LockOrderError", "Scheduler"]


class HypLocks(PreemptionPoints):
    """Per-machine lock bookkeeping: which CPU runs EL2 code and what each CPU holds; the
    machine's preemption points (`pkvm.machine.preempt`)."""

    def __init__(self, nr_cpus: int):
        super().__init__()
        self.held: list[list[HypSpinLock]] = [[] for _ in range(nr_cpus)]
        self.on_event: Callable[[int, str, str], None] | None = None

    def __reduce__(self) -> tuple[Any, ...]:  # as `Tlb.__reduce__` (machine/mmu.py)
        return (HypLocks, (len(self.held),), self.__getstate__())


class HypSpinLock:
    def __init__(self, locks: HypLocks, name: str, rank: int):
        self.locks = locks
        self.name = name
        self.rank = rank
        self.owner: int | None = None

    def __reduce__(self) -> tuple[Any, ...]:  # as `Tlb.__reduce__` (machine/mmu.py)
        return (HypSpinLock, (self.locks, self.name, self.rank), self.__getstate__())

    def __repr__(self) -> str:
        return f"<lock {self.name} held by {self.owner}>"

    def acquire(self) -> None:
        locks = self.locks
        cpu = locks.cpu
        if locks.scheduler is not None:
            locks.scheduler.preempt(cpu, "acquire", self.name)
            cpu = locks.cpu
        held = locks.held[cpu]
        owner = self.owner  # (narrowed to an int below: compiled, compared unboxed)
        if owner is not None and owner == cpu:
            raise LockOrderError(f"cpu {cpu} takes {self.name} twice")
        if held and held[-1].rank >= self.rank:
            raise LockOrderError(
                f"cpu {cpu} takes {self.name} while holding {held[-1].name}: "
                f"order is vm_table -> host -> hyp -> guest -> pool"
            )
        if owner is not None:
            if locks.scheduler is None:
                raise LockOrderError(f"cpu {cpu} spins on {self.name} held by cpu {self.owner}")
            locks.scheduler.wait_lock(cpu, self)
        self.owner = cpu
        held.append(self)

    def release(self) -> None:
        locks = self.locks
        cpu = locks.cpu
        owner = self.owner
        if owner is None or owner != cpu:
            raise LockOrderError(f"cpu {cpu} releases {self.name} it does not hold")
        held = locks.held[cpu]
        if held[-1] is self:  # the innermost lock, as the kernel's nesting releases them
            held.pop()
        else:
            held.remove(self)
        self.owner = None
        if locks.scheduler is not None:
            locks.scheduler.preempt(cpu, "release", self.name)

    def assert_held(self) -> None:
        owner = self.owner
        if owner is None or owner != self.locks.cpu:
            raise LockOrderError(f"{self.name} must be held here")

    def __enter__(self) -> "HypSpinLock":
        self.acquire()
        return self

    # Three parameters, not `*exc`: compiled, a `with` block calls this directly, and a star
    # parameter would cost it a tuple of three Nones at every exit.
    def __exit__(self, typ: object, value: object, tb: object) -> None:
        self.release()
