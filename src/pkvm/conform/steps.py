"""The steps `pkvm conform` runs on both sides and what each side answers.

A sequence is a list of :class:`RawStep`: a host hypercall (a name of the kernel's enum or an
int, the whole x0), a VMM step (``vmm:create``, ``vmm:run``, ``vmm:topup``, ``vmm:destroy``:
the real side's ``/dev/kvm`` helper, the model's host driver) or a host read of a page of ours
(``host:read``). Each answers a :class:`RealResult`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["CPUS", "HOST_READ", "MASK64", "VMM_CALLS", "RawStep", "RealResult", "host_read",
           "page_names", "vm_create", "vm_destroy", "vm_run", "vm_topup"]

MASK64 = (1 << 64) - 1
_SYMBOL = re.compile(r"(page|pa|va|vm):[A-Za-z0-9_-]{1,20}")
VMM_CALLS = ("vmm:create", "vmm:run", "vmm:destroy", "vmm:topup")
HOST_READ = "host:read"  # the host kernel reads a page of ours (the module, linear map)
CPUS = 2  # -smp 2, as the harness boots both kernels


@dataclass(frozen=True)
class RawStep:
    """One host hypercall: ``call`` a name of the kernel's enum or an int (the whole x0)."""

    call: str | int
    args: tuple[int | str, ...] = ()
    cpu: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.args, (str, int)):  # one argument given bare
            object.__setattr__(self, "args", (self.args,))
        elif not isinstance(self.args, tuple):
            object.__setattr__(self, "args", tuple(self.args))
        if not 0 <= self.cpu < CPUS:
            raise ValueError(f"cpu {self.cpu}: the QEMU machine has CPUs 0..{CPUS - 1}")
        if len(self.args) > 6:
            raise TypeError(f"at most 6 hypercall arguments (x1..x6), got {len(self.args)}")
        for a in self.args:
            if isinstance(a, str) and not _SYMBOL.fullmatch(a):
                raise ValueError(
                    f"symbolic argument {a!r}: use 'page:NAME', 'pa:NAME', 'va:NAME' or "
                    "'vm:NAME' (NAME: up to 20 letters, digits, '_', '-')"
                )
        if self.call == HOST_READ and not (
            len(self.args) == 1 and isinstance(self.args[0], str)
            and self.args[0].startswith("page:")
        ):
            raise ValueError(f"{HOST_READ} takes one 'page:NAME' argument")
        if isinstance(self.call, str) and self.call.startswith("vmm:"):
            if self.call not in VMM_CALLS:
                raise ValueError(f"{self.call!r}: VMM steps are {', '.join(VMM_CALLS)}")
            if not self.args or not (
                isinstance(self.args[0], str) and self.args[0].startswith("vm:")
            ):
                raise ValueError(f"{self.call} takes a 'vm:NAME' first argument")


def vm_create(vm: str, vcpus: int = 1, protected: bool = False) -> RawStep:
    """A VMM step: create VM ``vm`` ("vm:NAME") with ``vcpus`` vCPUs, run vCPU 0 once.

    Its result: x0 = 0 or -errno (of the failing ioctl), x1 = the hyp handle (later steps may
    pass ``vm``: the module substitutes it), x2 = the first exit's reason, x3 = vcpus.
    """
    return RawStep("vmm:create", (vm, vcpus, int(protected)))


def vm_run(vm: str, vcpu: int = 0) -> RawStep:
    """A VMM step: one KVM_RUN; x0 = 0 or -errno, x1 = exit reason, x2 = MMIO address."""
    return RawStep("vmm:run", (vm, vcpu))


def vm_topup(vm: str, vcpu: int = 0, pages: int = 4) -> RawStep:
    """A VMM step: fill vCPU ``vcpu``'s pKVM memcache up to ``pages`` fresh pages (what KVM's
    ``topup_hyp_memcache`` does before a guest-memory call); x0 = 0 or -errno, x1 = pages held.
    7.2 only (6.12's vCPUs have no such memcache)."""
    return RawStep("vmm:topup", (vm, vcpu, pages))


def vm_destroy(vm: str) -> RawStep:
    """A VMM step: close the VM's fds (the host tears it down), then read its guest RAM back;
    x0 = 0 or -errno, x1 = non-zero 64-bit words read, x2 = pages whose read faulted."""
    return RawStep("vmm:destroy", (vm,))


def host_read(page: str, cpu: int = 0) -> RawStep:
    """The host kernel reads page ``page`` ("page:NAME") through its linear map on ``cpu``, with
    a fault-tolerant accessor; x0 = 0 or -EFAULT (the host stage-2 refused it), x1 = non-zero
    64-bit words of the page."""
    return RawStep(HOST_READ, (page,), cpu)


@dataclass
class RealResult:
    """What the real machine answered; x0/x1 signed, x2/x3 unsigned (as the model).

    ``panic``: the machine died at this step (``note`` says whether the hyp panicked, "hyp
    panic: ...", the host kernel did, "host kernel panic (EL1): ...", or a CPU locked up,
    "lockup: ..."); the steps after it in the sequence are not run (``not_run``, and ``panic``
    too). ``pages`` maps the sequence's page names to the pfns the module gave them and
    ``vas`` to their kernel VAs (the same dicts on every step of a sequence).
    """

    x0: int
    x1: int
    x2: int
    x3: int
    panic: bool = False
    note: str = ""
    pages: dict[str, int] = field(default_factory=dict, repr=False)  # the sequence's name -> pfn
    not_run: bool = False  # the machine died at an earlier step: this one never ran
    vas: dict[str, int] = field(default_factory=dict, repr=False)  # name -> kernel VA

    @property
    def kind(self) -> str:
        """How the machine died at this step: "hyp panic", "host oops", "lockup", "model
        error" (a Python exception in the model: never agrees), or "" (it did not)."""
        if not self.panic or self.not_run:
            return ""
        for k in ("hyp panic", "lockup", "model error"):
            if self.note.startswith(k):
                return k
        return "host oops"


def page_names(steps: list[RawStep]) -> list[str]:
    """The page names a sequence's hypercalls pass, in order of first use: the module
    allocates them all before the sequence's first step."""
    names: dict[str, None] = {}
    for st in steps:
        if isinstance(st.call, str) and st.call.startswith("vmm:"):
            continue
        for a in st.args:
            if isinstance(a, str) and a.split(":", 1)[0] in ("page", "pa", "va"):
                names[a.split(":", 1)[1]] = None
    return list(names)
