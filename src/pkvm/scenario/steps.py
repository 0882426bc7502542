"""A scenario's steps and results: the actions, their keys, the symbols a value may name."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pkvm.host.kvm import GUEST_RAM_IPA
from pkvm.machine.memory import PAGE_SHIFT

ACTIONS = ("hvc", "host_read", "host_write", "alloc", "create_vm", "map", "run", "topup",
           "destroy", "smc")
# Keys each action accepts besides itself and the common ones.
ACTION_KEYS: dict[str, set[str]] = {
    "hvc": {"args"},
    "host_read": {"size"},
    "host_write": {"data"},
    "alloc": {"pages"},
    "create_vm": {"vcpus", "protected", "memory", "code"},
    "map": {"gfn", "n"},
    "run": {"vcpu"},
    "topup": {"vcpu", "pages"},
    "destroy": set(),
    "smc": {"args", "imm"},
}
COMMON_KEYS = {"cpu", "expect", "note"}
EXPECT_KEYS = {"x0", "x1", "x2", "x3", "errno", "ok", "abort", "panic", "data"}
MACHINE_KEYS = {"memory", "cpus", "abi", "check", "ffa"}
MACHINE_DEFAULTS: dict[str, Any] = {"memory": "256M", "cpus": 2, "abi": "latest"}
MIN_MEMORY = 64 << 20
MAX_HVC_ARGS = 6  # x1..x6
MAX_SMC_ARGS = 17  # x1..x17 (SMCCC 1.2)
MAX_SMC_IMM = 0xFFFF  # the SMC instruction's 16-bit immediate
DEFAULT_WRITE_DATA = "a5" * 8  # host_write without data
DEFAULT_VM_MEMORY = "16M"  # create_vm without memory
DEFAULT_GFN = GUEST_RAM_IPA >> PAGE_SHIFT  # map without gfn: the first page of guest RAM
DEFAULT_TOPUP_PAGES = 4  # topup without pages
MAX_CPUS = 64
SYMBOL = re.compile(r"^(page|pa|va|vm|vcpu|gfn):([A-Za-z_][\w.-]*)(?::(0x[0-9a-fA-F]+|\d+))?"
                    r"(?:\+(0x[0-9a-fA-F]+|\d+))?$")


class ScenarioError(Exception):
    """A mistake in the scenario itself (not a refused call): `file:line: what was expected`."""

    def __init__(self, path: str, line: int | None, message: str):
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line
        self.message = message


@dataclass
class Step:
    """One `[[step]]` table: `action` is its kind, `target` the action key's value."""

    action: str
    target: Any
    fields: dict[str, Any] = field(default_factory=dict)
    cpu: int = 0
    expect: dict[str, Any] | None = None
    note: str = ""
    line: int | None = None

    def as_table(self) -> dict[str, Any]:
        t: dict[str, Any] = {self.action: self.target}
        t.update(self.fields)
        if self.cpu:
            t["cpu"] = self.cpu
        if self.note:
            t["note"] = self.note
        if self.expect is not None:
            t["expect"] = dict(self.expect)
        return t

    def describe(self) -> str:
        if self.action in ("hvc", "smc"):
            args = ", ".join(_fmt_arg(a) for a in self.fields.get("args", []))
            return f"cpu{self.cpu}: {_fmt_arg(self.target)}({args})"
        extra = " ".join(f"{k}={_fmt_arg(v)}" for k, v in self.fields.items())
        return f"{self.action} {_fmt_arg(self.target)}" + (f" {extra}" if extra else "")


def _fmt_arg(a: Any) -> str:
    if isinstance(a, bool):
        return str(a).lower()
    if isinstance(a, int):
        return hex(a) if abs(a) > 9 else str(a)
    if isinstance(a, str):
        return a
    return repr(a)


@dataclass
class StepResult:
    index: int
    step: Step
    outcome: str  # "ok", "errno", "refused" (x0 = -1), "abort", "panic", "value"
    detail: str  # the result as text: registers, errno, exception message
    value: Any = None  # HvcResult, bytes, HostVm, pa, exception
    passed: bool | None = None  # None: no expectation
    expected: str = ""
    pages: list[Any] = field(default_factory=list)  # PageInfo of pages the step names, on failure


@dataclass
class Result:
    machine: Any
    steps: list[StepResult]

    @property
    def ok(self) -> bool:
        return all(s.passed is not False for s in self.steps)

    @property
    def failures(self) -> list[StepResult]:
        return [s for s in self.steps if s.passed is False]


