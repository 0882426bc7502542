"""Scenario files: a machine and a list of steps in TOML, each with an optional expectation.

    [machine]
    memory = "256M"
    abi = "latest"

    [[step]]
    hvc = "__pkvm_host_share_hyp"
    args = ["page:a"]
    expect = { ok = true }

`load(path)` parses and checks a file (errors name `file:line`), `Scenario.run()` plays it on a
fresh machine (or the one given) and returns a `Result`; `dump(steps, path)` writes one (the
fuzzer writes its reproducers this way). The format reference is `docs/scenarios.md`.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pkvm.abi.profiles import ALL_HCALL_NAMES
from pkvm.errors import Errno, HostDataAbort, HostError, HypPanic, errno_name

PAGE_SHIFT = 12
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


@dataclass
class Scenario:
    machine: dict[str, Any]
    steps: list[Step]
    path: str = "<scenario>"

    def new_machine(self, **overrides: Any):
        import pkvm

        kw = dict(MACHINE_DEFAULTS)
        kw.update(self.machine)
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return pkvm.Machine(**kw)

    def run(self, machine: Any = None, on_step: Callable[[StepResult], None] | None = None,
            stop_on_failure: bool = False) -> Result:
        """Play every step on `machine` (a fresh one from `[machine]` if None)."""
        m = machine if machine is not None else self.new_machine()
        runner = _Runner(m, self.path)
        results: list[StepResult] = []
        for i, step in enumerate(self.steps):
            res = runner.step(i, step)
            results.append(res)
            if on_step is not None:
                on_step(res)
            if stop_on_failure and res.passed is False:
                break
        return Result(m, results)


# -- checking machine options (shared with the command line) ---------------------------------
def machine_value_error(key: str, value: Any) -> str | None:
    """What is wrong with `value` for the machine option `key` ("memory", "cpus", "abi",
    "check"), or None. The command line checks its options with this too."""
    from pkvm.abi.profiles import PROFILES
    from pkvm.machine.memory import parse_size

    if key == "abi":
        known = ", ".join(f"{k!r}" for k in PROFILES)
        if not isinstance(value, str):
            return (f"abi must be a string such as \"6.12\" (in quotes), not {value!r}; "
                    f"known: {known}")
        if value not in PROFILES:
            return f"unknown abi {value!r}: known {known}"
    elif key == "memory":
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            return f"memory must be bytes or a size such as \"256M\", not {value!r}"
        try:
            size = parse_size(value)
        except ValueError:
            return f"memory {value!r} is not a size: write bytes or a number with K, M or G"
        if size < MIN_MEMORY:
            return f"memory must be at least 64M, not {value!r}"
        if size % 4096:
            return f"memory must be a whole number of 4 KiB pages, not {value!r}"
    elif key == "cpus":
        if isinstance(value, bool) or not isinstance(value, int):
            return f"cpus must be an integer, not {value!r}"
        if not 1 <= value <= MAX_CPUS:
            return f"cpus must be between 1 and {MAX_CPUS}, not {value}"
    elif key == "check" and not isinstance(value, bool):
        return f"check must be true or false, not {value!r}"
    elif key == "ffa" and not isinstance(value, bool):
        return f"ffa (a secure world at EL3) must be true or false, not {value!r}"
    return None


# -- loading ---------------------------------------------------------------------------------
def _step_lines(text: str) -> list[int]:
    return [i + 1 for i, line in enumerate(text.splitlines())
            if re.match(r"^\s*\[\[\s*step\s*\]\]", line)]


def _table_line(text: str, name: str) -> int | None:
    for i, line in enumerate(text.splitlines()):
        if re.match(rf"^\s*\[\s*{name}\s*\]", line):
            return i + 1
    return None


def _key_line(text: str, start: int | None, key: str) -> int | None:
    """The line of `key = ...` inside the step starting at line `start`, else `start`."""
    if start is None:
        return None
    lines = text.splitlines()
    for n in range(start, len(lines)):
        if n > start - 1 and re.match(r"^\s*\[", lines[n]):
            break
        if re.match(rf"^\s*{re.escape(key)}\s*=", lines[n]):
            return n + 1
    return start


def loads(text: str, path: str = "<scenario>") -> Scenario:
    """Parse and check scenario text; raises ScenarioError naming the line at fault."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        raise ScenarioError(path, int(m.group(1)) if m else None, f"not valid TOML: {e}") from None
    machine = doc.pop("machine", {})
    raw_steps = doc.pop("step", [])
    if doc:
        raise ScenarioError(path, None, f"unknown top-level keys {sorted(doc)}: "
                            "expected only [machine] and [[step]] tables")
    if not isinstance(machine, dict):
        raise ScenarioError(path, None, "[machine] must be a table")
    mline = _table_line(text, "machine")
    bad = set(machine) - MACHINE_KEYS
    if bad:
        raise ScenarioError(path, _key_line(text, mline, min(bad)),
                            f"unknown [machine] key {min(bad)!r}: expected one of "
                            f"{sorted(MACHINE_KEYS)}")
    for key, value in machine.items():
        problem = machine_value_error(key, value)
        if problem:
            raise ScenarioError(path, _key_line(text, mline, key), f"[machine] {problem}")
    if not isinstance(raw_steps, list):
        raise ScenarioError(path, None, "steps must be written as [[step]] tables")
    lines = _step_lines(text)
    steps = [_parse_step(raw, path, text, lines[i] if i < len(lines) else None)
             for i, raw in enumerate(raw_steps)]
    if not steps:
        raise ScenarioError(path, None, "no steps: a scenario needs at least one [[step]] table "
                            "(docs/scenarios.md)")
    return Scenario(machine, steps, path)


def load(path: str | Path) -> Scenario:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ScenarioError(str(p), None, f"cannot read the scenario: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ScenarioError(str(p), line, "not a text file: a scenario is UTF-8 TOML (byte "
                            f"{e.start} is {raw[e.start]:#04x})") from None
    return loads(text, str(p))


def _parse_step(raw: dict[str, Any], path: str, text: str, line: int | None) -> Step:
    def err(key: str | None, msg: str) -> ScenarioError:
        return ScenarioError(path, _key_line(text, line, key) if key else line, msg)

    actions = [a for a in ACTIONS if a in raw]
    if len(actions) != 1:
        raise err(None, f"a step needs exactly one of {', '.join(ACTIONS)}"
                  + (f" (found {', '.join(actions)})" if actions else ""))
    action = actions[0]
    allowed = ACTION_KEYS[action] | COMMON_KEYS | {action}
    for k in raw:
        if k not in allowed:
            raise err(k, f"unknown key {k!r} in a {action} step: expected one of {sorted(allowed)}")
    target = raw[action]
    cpu = raw.get("cpu", 0)
    if not isinstance(cpu, int) or isinstance(cpu, bool) or cpu < 0:
        raise err("cpu", f"cpu must be a non-negative integer, not {cpu!r}")
    note = raw.get("note", "")
    fields = {k: v for k, v in raw.items() if k in ACTION_KEYS[action]}
    if action == "hvc":
        if not isinstance(target, (str, int)) or isinstance(target, bool):
            raise err(action, "hvc takes a hypercall name or a function ID (int)")
        if isinstance(target, str) and target not in ALL_HCALL_NAMES:
            close = [n for n in sorted(ALL_HCALL_NAMES) if target.strip("_") in n]
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise err(action, f"unknown hypercall {target!r}: expected a name of "
                      f"enum __kvm_host_smccc_func (6.12 or 7.2){hint}")
        args = fields.get("args", [])
        if not isinstance(args, list) or len(args) > 6:
            raise err("args", "args must be a list of at most 6 values (x1..x6)")
        for a in args:
            _check_value(a, err, "args")
    elif action == "smc":
        from pkvm.machine.firmware import SMC_NAMES

        if not isinstance(target, (str, int)) or isinstance(target, bool):
            raise err(action, "smc takes a PSCI / SMCCC / FF-A call name or a function ID (int)")
        if isinstance(target, str) and target not in SMC_NAMES:
            raise err(action, f"unknown SMC {target!r}: expected one of {', '.join(SMC_NAMES)} "
                      "or a function ID")
        args = fields.get("args", [])
        if not isinstance(args, list) or len(args) > 17:
            raise err("args", "args must be a list of at most 17 values (x1..x17)")
        for a in args:
            _check_value(a, err, "args")
        imm = fields.get("imm", 0)
        if not isinstance(imm, int) or isinstance(imm, bool) or not 0 <= imm <= 0xFFFF:
            raise err("imm", "imm (the SMC's immediate) must be an integer in 0..0xffff")
    elif action in ("host_read", "host_write"):
        if action == "host_write" and isinstance(target, dict):
            fields.update({k: v for k, v in target.items() if k != "addr"})
            target = target.get("addr")
        _check_value(target, err, action, symbolic=("page", "pa", "gfn"))
        if "size" in fields and (not isinstance(fields["size"], int) or fields["size"] < 1):
            raise err("size", "size must be a positive integer (bytes)")
        if action == "host_write":
            data = fields.setdefault("data", "a5" * 8)
            if not isinstance(data, str) or not re.fullmatch(r"(?:[0-9a-fA-F]{2})+", data):
                raise err("data", "data must be a hex string such as \"deadbeef\"")
    elif action == "alloc":
        _check_name(target, err, action)
        pages = fields.get("pages", 1)
        if not isinstance(pages, int) or isinstance(pages, bool) or pages < 1:
            raise err("pages", "pages must be a positive integer")
    elif action == "create_vm":
        _check_name(target, err, action)
        if not isinstance(fields.get("vcpus", 1), int) or fields.get("vcpus", 1) < 1:
            raise err("vcpus", "vcpus must be a positive integer")
        if not isinstance(fields.get("protected", False), bool):
            raise err("protected", "protected must be true or false")
        if not isinstance(fields.get("memory", "16M"), (str, int)):
            raise err("memory", "memory must be bytes or a size such as \"16M\"")
        code = fields.get("code", [])
        if not isinstance(code, list) or not all(
                isinstance(w, int) and not isinstance(w, bool) and 0 <= w < 1 << 32 for w in code):
            raise err("code", "code must be a list of 32-bit instruction words (loaded at the "
                      "guest's RAM base, where its vCPUs start)")
    elif action in ("run", "topup"):
        _check_name(target, err, action)
        for key in ("vcpu", "pages"):
            v = fields.get(key, 0)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise err(key, f"{key} must be a non-negative integer")
    elif action == "map":
        _check_name(target, err, action)
        if not isinstance(fields.get("gfn", 0x40000), int):
            raise err("gfn", "gfn must be an integer guest frame number (RAM starts at 0x40000)")
        if not isinstance(fields.get("n", 1), int) or fields.get("n", 1) < 1:
            raise err("n", "n must be a positive integer")
    elif action == "destroy":
        _check_name(target, err, action)
    expect = raw.get("expect")
    if expect is not None:
        if not isinstance(expect, dict):
            raise err("expect", "expect must be a table such as { errno = \"EPERM\" }")
        for k, v in expect.items():
            if k not in EXPECT_KEYS:
                raise err("expect", f"unknown expectation {k!r}: expected one of "
                          f"{sorted(EXPECT_KEYS)}")
            if k == "errno" and not (isinstance(v, str) and v.upper() in Errno.__members__
                                     or isinstance(v, int)):
                raise err("expect", f"errno must be a name such as \"EPERM\" (known: "
                          f"{', '.join(Errno.__members__)}) or a number, not {v!r}")
            if k in ("ok", "abort", "panic") and not isinstance(v, bool):
                raise err("expect", f"{k} must be true or false")
            if k.startswith("x") and not isinstance(v, int):
                raise err("expect", f"{k} must be an integer")
    return Step(action, target, fields, cpu, expect, note, line)


def _check_name(v: Any, err: Callable[[str | None, str], ScenarioError], key: str) -> None:
    if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z_][\w.-]*", v):
        raise err(key, f"{key} takes a name such as \"a\" or \"vm1\", not {v!r}")


def _check_value(v: Any, err: Callable[[str | None, str], ScenarioError], key: str,
                 symbolic: tuple[str, ...] = ("page", "pa", "va", "vm", "vcpu", "gfn")) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise err(key, f"a value is an integer or a symbol such as \"page:a\", not {v!r}")
    if isinstance(v, str):
        m = SYMBOL.match(v)
        if not m or m.group(1) not in symbolic:
            want = ", ".join(f'"{s}:NAME"' for s in symbolic)
            raise err(key, f"bad value {v!r}: expected an integer or {want}"
                      + (' or "vcpu:VM:IDX"' if "vcpu" in symbolic else "")
                      + (' or "gfn:VM:GFN"' if "gfn" in symbolic else "")
                      + " (optionally +OFFSET)")
        if m.group(1) == "vcpu" and m.group(3) is None:
            raise err(key, f"bad value {v!r}: a vCPU is named \"vcpu:VM:IDX\"")
        if m.group(1) == "gfn" and m.group(3) is None:
            raise err(key, f"bad value {v!r}: a guest page is named \"gfn:VM:GFN\"")


# -- running ----------------------------------------------------------------------------------
class _NotRun(Exception):
    """A step that names what an earlier, failed step should have made."""


class _Runner:
    def __init__(self, m: Any, path: str):
        self.m = m
        self.path = path
        self.pages: dict[str, tuple[int, int]] = {}  # name -> (pa, pages)
        self.vms: dict[str, Any] = {}
        self.backing: dict[tuple[str, int], int] = {}  # (vm, gfn) -> pa of its backing page
        self.failed_vms: dict[str, int] = {}  # name -> 1-based index of its failed create_vm

    def _no_vm(self, name: str, step: Step) -> Exception:
        if name in self.failed_vms:
            return _NotRun(f"VM {name!r} does not exist: its create_vm (step "
                           f"{self.failed_vms[name]}) failed")
        return ScenarioError(self.path, step.line, f"no VM named {name!r}: create it first "
                             f"with create_vm = \"{name}\"")

    def page(self, name: str, n: int = 1) -> int:
        if name not in self.pages:
            self.pages[name] = (self.m.host.alloc_pages(n), n)
        return self.pages[name][0]

    def resolve(self, v: Any, step: Step, address: bool = False) -> int:
        if isinstance(v, int):
            return v
        m = SYMBOL.match(v)
        assert m is not None
        kind, name, idx, off = m.group(1), m.group(2), m.group(3), m.group(4)
        offset = int(off, 0) if off else 0
        if kind == "page":
            pa = self.page(name)
            return pa + (offset << PAGE_SHIFT) if address else (pa >> PAGE_SHIFT) + offset
        if kind == "pa":
            return self.page(name) + offset
        if kind == "va":
            from pkvm.host.kvm import host_va

            return host_va(self.page(name)) + offset
        if name not in self.vms:
            raise self._no_vm(name, step)
        vm = self.vms[name]
        if kind == "vm":
            return vm.handle + offset
        if kind == "gfn":
            gfn = int(idx, 0)
            if gfn in vm.memslot:  # remembered: the page keeps its name after teardown
                self.backing[(name, gfn)] = vm.memslot[gfn]
            if (name, gfn) not in self.backing:
                raise ScenarioError(self.path, step.line, f"gfn {gfn:#x} of VM {name!r} has no "
                                    "backing page yet: map it first")
            pa = self.backing[(name, gfn)]
            return pa + offset if address else (pa >> PAGE_SHIFT) + offset
        i = int(idx, 0)
        if i >= len(vm.vcpus):
            raise ScenarioError(self.path, step.line, f"VM {name!r} has {len(vm.vcpus)} vCPUs, "
                                f"no vCPU {i}")
        return vm.vcpus[i].va + offset

    def vm(self, name: str, step: Step) -> Any:
        if name not in self.vms:
            raise self._no_vm(name, step)
        return self.vms[name]

    def step(self, i: int, step: Step) -> StepResult:
        m = self.m
        named: list[int] = []
        try:
            outcome, detail, value = self._do(step, named)
        except _NotRun as e:
            res = StepResult(i, step, "not run", str(e))
            if step.expect is not None:
                res.passed, res.expected = False, _check(step.expect, res)[1]
            return res
        except HostDataAbort as e:
            outcome, detail, value = "abort", str(e), e
        except HypPanic as e:
            outcome, detail, value = "panic", str(e), e
        except HostError as e:
            outcome, detail, value = "errno", f"-{errno_name(e.errno or 0)}: {e.strerror}", e
            if step.action == "create_vm":
                self.failed_vms.setdefault(step.target, i + 1)
        except MemoryError as e:
            outcome, detail, value = "errno", f"-ENOMEM: {e}", HostError(12, step.action)
            if step.action == "create_vm":
                self.failed_vms.setdefault(step.target, i + 1)
        except (ValueError, TypeError) as e:  # a caller mistake the model refuses to run
            raise ScenarioError(self.path, step.line, str(e)) from None
        res = StepResult(i, step, outcome, detail, value)
        if step.expect is not None:
            res.passed, res.expected = _check(step.expect, res)
            if not res.passed and not m.dead:
                res.pages = [m.inspect.page(p) for p in dict.fromkeys(named)]
        return res

    def _do(self, step: Step, named: list[int]) -> tuple[str, str, Any]:
        m = self.m
        a, f = step.action, step.fields
        if step.cpu >= m.nr_cpus:
            raise ScenarioError(self.path, step.line, f"cpu {step.cpu} does not exist: the "
                                f"machine has cpus 0..{m.nr_cpus - 1}")
        if a == "hvc":
            args = []
            for v in f.get("args", []):
                x = self.resolve(v, step)
                args.append(x)
                if isinstance(v, str) and v.startswith(("page:", "pa:", "gfn:")):
                    named.append(x >> PAGE_SHIFT if v.startswith("pa:") else x)
                elif isinstance(v, int) and m.mem.is_ram(v << PAGE_SHIFT):
                    named.append(v)
            r = m.hvc(step.cpu, step.target, *args)
            if r.x0 == 0 and r.x1 > 0 and args and r.x1 == args[0] % (1 << 64):
                # A handler without a result leaves x1 as the host passed it: not a value.
                return "ok", f"x0=0 (x1 left as passed, {_x1_text(r.x1)})", r
            regs = f"x0={r.x0} x1={r.x1} ({_x1_text(r.x1)})" if r.x0 == 0 else f"x0={r.x0}"
            return ("ok" if r.ok else "refused" if r.x0 else "errno" if r.x1 < 0 else "value",
                    regs, r)
        if a == "smc":
            args = [self.resolve(v, step) for v in f.get("args", [])]
            named += [x >> PAGE_SHIFT for x in args if m.mem.is_ram(x % (1 << 64))]
            r = m.smc(step.cpu, step.target, *args, imm=f.get("imm", 0))
            return "ok", (f"x0={r.regs[0]:#x} x1={r.regs[1]:#x} x2={r.regs[2]:#x} "
                          f"x3={r.regs[3]:#x} ({r.path})"), r
        if a == "alloc":
            if step.target in self.pages:
                raise ScenarioError(self.path, step.line, f"page {step.target!r} is already "
                                    "allocated: give each allocation its own name")
            pa = self.page(step.target, f.get("pages", 1))
            return "ok", f"{f.get('pages', 1)} page(s) at pfn {pa >> PAGE_SHIFT:#x}", pa
        if a in ("host_read", "host_write"):
            pa = self.resolve(step.target, step, address=True)
            named.append(pa >> PAGE_SHIFT)
            if a == "host_read":
                data = m.host.read(pa, f.get("size", 8), cpu=step.cpu)
                return "ok", f"read {data.hex()}", data
            m.host.write(pa, bytes.fromhex(f["data"]), cpu=step.cpu)
            return "ok", f"wrote {len(f['data']) // 2} byte(s)", None
        if a == "create_vm":
            if step.target in self.vms:
                raise ScenarioError(self.path, step.line, f"VM {step.target!r} already exists")
            vm = m.host.create_vm(vcpus=f.get("vcpus", 1), protected=f.get("protected", False),
                                  memory=f.get("memory", "16M"))
            self.vms[step.target] = vm
            if f.get("code"):
                from pkvm.host.kvm import GUEST_RAM_IPA

                vm.write(GUEST_RAM_IPA, b"".join(w.to_bytes(4, "little") for w in f["code"]))
                for vcpu in vm.vcpus:  # KVM_ARM_VCPU_INIT without POWER_OFF: all start
                    vcpu.runner.power_off = False
            return "ok", f"handle {vm.handle:#x}", vm
        vm = self.vm(step.target, step)
        if a == "map":
            gfn = f.get("gfn", 0x40000)
            n = f.get("n", 1)
            try:
                vm.map(gfn, n, cpu=step.cpu)
            finally:
                for g in range(gfn, gfn + n):
                    if g in vm.memslot:
                        self.backing[(step.target, g)] = vm.memslot[g]
                        named.append(vm.memslot[g] >> PAGE_SHIFT)
            return "ok", f"mapped gfn {gfn:#x}+{n}", None
        if a == "topup":
            idx = f.get("vcpu", 0)
            if idx >= len(vm.vcpus):
                raise HostError(22, "topup", None, f"VM {step.target!r} has no vCPU {idx}")
            vm.topup_memcache(vm.vcpus[idx], f.get("pages", 4))
            return "ok", f"vCPU {idx}'s memcache topped up to {f.get('pages', 4)} page(s)", None
        if a == "run":
            idx = f.get("vcpu", 0)
            if idx >= len(vm.vcpus):  # as a VMM without that vCPU fd answers
                raise HostError(22, "KVM_RUN", None, f"VM {step.target!r} has "
                                f"{len(vm.vcpus)} vCPUs, no vCPU {idx}")
            e = vm.vcpus[idx].run()
            where = f" at {e.addr:#x}" if e.kind == "mmio" else ""
            return "ok", f"exit {e.kind}{where}", e
        vm.destroy()
        return "ok", "destroyed", None


def _x1_text(x1: int) -> str:
    if x1 < 0:
        return "-" + errno_name(x1)
    return "0" if x1 == 0 else hex(x1)


def _check(expect: dict[str, Any], res: StepResult) -> tuple[bool, str]:
    """(passed, expected-as-text) of one step's expectation against its outcome."""
    parts = []
    ok = True
    r = res.value
    for k, v in expect.items():
        if k == "abort":
            parts.append(f"abort={str(v).lower()}")
            ok &= (res.outcome == "abort") == v
        elif k == "panic":
            parts.append(f"panic={str(v).lower()}")
            ok &= (res.outcome == "panic") == v
        elif k == "ok":
            parts.append(f"ok={str(v).lower()}")
            good = res.outcome == "ok" or (res.outcome == "value" and res.step.action != "hvc")
            ok &= good == v
        elif k == "errno":
            want = Errno[v.upper()] if isinstance(v, str) else abs(v)
            parts.append(f"-{errno_name(want)}")
            if res.step.action == "hvc":
                ok &= res.outcome == "errno" and r.x1 == -want
            else:
                ok &= res.outcome == "errno" and isinstance(r, HostError) and r.errno == want
        elif k.startswith("x"):
            parts.append(f"{k}={v}")
            ok &= res.step.action in ("hvc", "smc") and res.outcome not in ("abort", "panic") \
                and getattr(r, k) == v
        elif k == "data":
            parts.append(f"data={v}")
            ok &= isinstance(r, bytes) and r.hex() == str(v).lower()
    return bool(ok), " ".join(parts)


# -- writing -----------------------------------------------------------------------------------
def dump(steps: Iterable[Any], path: str | Path, machine: dict[str, Any] | None = None) -> None:
    """Write a scenario file. A step is a `Step`, a step table (dict as in the file), or a call
    `(cpu, name, args)` / `(cpu, name, args, expect)` as the fuzzer records it."""
    import tomli_w

    tables = []
    for s in steps:
        if isinstance(s, Step):
            tables.append(s.as_table())
        elif isinstance(s, dict):
            tables.append(dict(s))
        else:
            cpu, name, args, *rest = s
            t: dict[str, Any] = {"hvc": name, "args": [int(a) for a in args]}
            if cpu:
                t["cpu"] = cpu
            if rest and rest[0] is not None:
                t["expect"] = rest[0]
            tables.append(t)
    doc: dict[str, Any] = {"machine": dict(MACHINE_DEFAULTS, **(machine or {})), "step": tables}
    text = tomli_w.dumps(_u64_safe(doc))
    Path(path).write_text(text)


def _u64_safe(v: Any) -> Any:
    """TOML integers are signed 64-bit: write larger register values as their signed twin."""
    if isinstance(v, dict):
        return {k: _u64_safe(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_u64_safe(x) for x in v]
    if isinstance(v, int) and not isinstance(v, bool) and v >= 1 << 63:
        return v - (1 << 64)
    return v
