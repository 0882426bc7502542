"""The scenario file: reading and checking it (errors name `file:line`), and writing one."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import tomli_w

from pkvm.abi.profiles import ALL_HCALL_NAMES, PROFILES
from pkvm.errors import Errno
from pkvm.machine.firmware import SMC_NAMES
from pkvm.machine.memory import PAGE_SIZE, parse_size
from pkvm.scenario.run import Scenario
from pkvm.scenario.steps import (
    ACTION_KEYS,
    ACTIONS,
    COMMON_KEYS,
    DEFAULT_GFN,
    DEFAULT_VM_MEMORY,
    DEFAULT_WRITE_DATA,
    EXPECT_KEYS,
    MACHINE_DEFAULTS,
    MACHINE_KEYS,
    MAX_CPUS,
    MAX_HVC_ARGS,
    MAX_SMC_ARGS,
    MAX_SMC_IMM,
    MIN_MEMORY,
    SYMBOL,
    ScenarioError,
    Step,
)


def machine_value_error(key: str, value: Any) -> str | None:
    """What is wrong with `value` for the machine option `key` ("memory", "cpus", "abi",
    "check"), or None. The command line checks its options with this too."""
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
        if size % PAGE_SIZE:
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


Err = Callable[[str | None, str], ScenarioError]  # makes the error of one key of a step


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
    cpu = raw.get("cpu", 0)
    if not isinstance(cpu, int) or isinstance(cpu, bool) or cpu < 0:
        raise err("cpu", f"cpu must be a non-negative integer, not {cpu!r}")
    fields = {k: v for k, v in raw.items() if k in ACTION_KEYS[action]}
    target = _CHECK_ACTION[action](action, raw[action], fields, err)
    expect = raw.get("expect")
    if expect is not None:
        _check_expect(expect, err)
    return Step(action, target, fields, cpu, expect, raw.get("note", ""), line)


def _check_hvc(action: str, target: Any, fields: dict[str, Any], err: Err) -> Any:
    if not isinstance(target, (str, int)) or isinstance(target, bool):
        raise err(action, "hvc takes a hypercall name or a function ID (int)")
    if isinstance(target, str) and target not in ALL_HCALL_NAMES:
        close = [n for n in sorted(ALL_HCALL_NAMES) if target.strip("_") in n]
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise err(action, f"unknown hypercall {target!r}: expected a name of "
                  f"enum __kvm_host_smccc_func (6.12 or 7.2){hint}")
    args = fields.get("args", [])
    if not isinstance(args, list) or len(args) > MAX_HVC_ARGS:
        raise err("args", f"args must be a list of at most {MAX_HVC_ARGS} values (x1..x6)")
    for a in args:
        _check_value(a, err, "args")
    return target


def _check_smc(action: str, target: Any, fields: dict[str, Any], err: Err) -> Any:
    if not isinstance(target, (str, int)) or isinstance(target, bool):
        raise err(action, "smc takes a PSCI / SMCCC / FF-A call name or a function ID (int)")
    if isinstance(target, str) and target not in SMC_NAMES:
        raise err(action, f"unknown SMC {target!r}: expected one of {', '.join(SMC_NAMES)} "
                  "or a function ID")
    args = fields.get("args", [])
    if not isinstance(args, list) or len(args) > MAX_SMC_ARGS:
        raise err("args", f"args must be a list of at most {MAX_SMC_ARGS} values (x1..x17)")
    for a in args:
        _check_value(a, err, "args")
    imm = fields.get("imm", 0)
    if not isinstance(imm, int) or isinstance(imm, bool) or not 0 <= imm <= MAX_SMC_IMM:
        raise err("imm", "imm (the SMC's immediate) must be an integer in 0..0xffff")
    return target


def _check_host_access(action: str, target: Any, fields: dict[str, Any], err: Err) -> Any:
    """host_read / host_write; a host_write target may be a table { addr = ..., data = ... }."""
    if action == "host_write" and isinstance(target, dict):
        fields.update({k: v for k, v in target.items() if k != "addr"})
        target = target.get("addr")
    _check_value(target, err, action, symbolic=("page", "pa", "gfn"))
    if "size" in fields and (not isinstance(fields["size"], int) or fields["size"] < 1):
        raise err("size", "size must be a positive integer (bytes)")
    if action == "host_write":
        data = fields.setdefault("data", DEFAULT_WRITE_DATA)
        if not isinstance(data, str) or not re.fullmatch(r"(?:[0-9a-fA-F]{2})+", data):
            raise err("data", "data must be a hex string such as \"deadbeef\"")
    return target


def _check_alloc(action: str, target: Any, fields: dict[str, Any], err: Err) -> Any:
    _check_name(target, err, action)
    pages = fields.get("pages", 1)
    if not isinstance(pages, int) or isinstance(pages, bool) or pages < 1:
        raise err("pages", "pages must be a positive integer")
    return target


def _check_create_vm(action: str, target: Any, fields: dict[str, Any], err: Err) -> Any:
    _check_name(target, err, action)
    if not isinstance(fields.get("vcpus", 1), int) or fields.get("vcpus", 1) < 1:
        raise err("vcpus", "vcpus must be a positive integer")
    if not isinstance(fields.get("protected", False), bool):
        raise err("protected", "protected must be true or false")
    if not isinstance(fields.get("memory", DEFAULT_VM_MEMORY), (str, int)):
        raise err("memory", "memory must be bytes or a size such as \"16M\"")
    code = fields.get("code", [])
    if not isinstance(code, list) or not all(
            isinstance(w, int) and not isinstance(w, bool) and 0 <= w < 1 << 32 for w in code):
        raise err("code", "code must be a list of 32-bit instruction words (loaded at the "
                  "guest's RAM base, where its vCPUs start)")
    return target


def _check_vcpu_op(action: str, target: Any, fields: dict[str, Any], err: Err) -> Any:
    """run / topup."""
    _check_name(target, err, action)
    for key in ("vcpu", "pages"):
        v = fields.get(key, 0)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise err(key, f"{key} must be a non-negative integer")
    return target


def _check_map(action: str, target: Any, fields: dict[str, Any], err: Err) -> Any:
    _check_name(target, err, action)
    if not isinstance(fields.get("gfn", DEFAULT_GFN), int):
        raise err("gfn", "gfn must be an integer guest frame number (RAM starts at 0x40000)")
    if not isinstance(fields.get("n", 1), int) or fields.get("n", 1) < 1:
        raise err("n", "n must be a positive integer")
    return target


def _check_destroy(action: str, target: Any, fields: dict[str, Any], err: Err) -> Any:
    _check_name(target, err, action)
    return target


_CHECK_ACTION: dict[str, Callable[[str, Any, dict[str, Any], Err], Any]] = {
    "hvc": _check_hvc,
    "host_read": _check_host_access,
    "host_write": _check_host_access,
    "alloc": _check_alloc,
    "create_vm": _check_create_vm,
    "run": _check_vcpu_op,
    "topup": _check_vcpu_op,
    "map": _check_map,
    "destroy": _check_destroy,
    "smc": _check_smc,
}


def _check_expect(expect: Any, err: Err) -> None:
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


def _check_name(v: Any, err: Err, key: str) -> None:
    if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z_][\w.-]*", v):
        raise err(key, f"{key} takes a name such as \"a\" or \"vm1\", not {v!r}")


def _check_value(v: Any, err: Err, key: str,
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


# -- writing -----------------------------------------------------------------------------------
def dump(steps: Iterable[Any], path: str | Path, machine: dict[str, Any] | None = None) -> None:
    """Write a scenario file. A step is a `Step`, a step table (dict as in the file), or a call
    `(cpu, name, args)` / `(cpu, name, args, expect)` as the fuzzer records it."""

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
