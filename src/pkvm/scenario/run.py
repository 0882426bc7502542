"""Playing a scenario on a machine: resolving symbols, running each step, checking its
expectation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pkvm.board import Machine
from pkvm.errors import EINVAL, ENOMEM, Errno, HostDataAbort, HostError, HypPanic, errno_name
from pkvm.host.kvm import GUEST_RAM_IPA, HostVm, host_va
from pkvm.machine.memory import PAGE_SHIFT
from pkvm.scenario.steps import (
    DEFAULT_GFN,
    DEFAULT_TOPUP_PAGES,
    DEFAULT_VM_MEMORY,
    MACHINE_DEFAULTS,
    SYMBOL,
    Result,
    ScenarioError,
    Step,
    StepResult,
)


@dataclass
class Scenario:
    machine: dict[str, Any]
    steps: list[Step]
    path: str = "<scenario>"

    def new_machine(self, **overrides: Any) -> Machine:
        kw = dict(MACHINE_DEFAULTS)
        kw.update(self.machine)
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return Machine(**kw)

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


class _NotRun(Exception):
    """A step that names what an earlier, failed step should have made."""


class _Runner:
    def __init__(self, m: Machine, path: str) -> None:
        self.m = m
        self.path = path
        self.pages: dict[str, tuple[int, int]] = {}  # name -> (pa, pages)
        self.vms: dict[str, HostVm] = {}
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

    def vm(self, name: str, step: Step) -> HostVm:
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
            outcome, detail, value = "errno", f"-ENOMEM: {e}", HostError(ENOMEM, step.action)
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

    def _do_smc(self, step: Step, named: list[int]) -> tuple[str, str, Any]:
        """A host SMC (to EL2's PSCI relay and FF-A proxy, then EL3)."""
        args = [self.resolve(v, step) for v in step.fields.get("args", [])]
        named += [x >> PAGE_SHIFT for x in args if self.m.mem.is_ram(x % (1 << 64))]
        r = self.m.smc(step.cpu, step.target, *args, imm=step.fields.get("imm", 0))
        return "ok", (f"x0={r.regs[0]:#x} x1={r.regs[1]:#x} x2={r.regs[2]:#x} "
                      f"x3={r.regs[3]:#x} ({r.path})"), r

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
            return self._do_smc(step, named)
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
                                  memory=f.get("memory", DEFAULT_VM_MEMORY))
            self.vms[step.target] = vm
            if f.get("code"):
                vm.write(GUEST_RAM_IPA, b"".join(w.to_bytes(4, "little") for w in f["code"]))
                for vcpu in vm.vcpus:  # KVM_ARM_VCPU_INIT without POWER_OFF: all start
                    vcpu.runner.power_off = False
            return "ok", f"handle {vm.handle:#x}", vm
        vm = self.vm(step.target, step)
        if a == "map":
            gfn = f.get("gfn", DEFAULT_GFN)
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
                raise HostError(EINVAL, "topup", None, f"VM {step.target!r} has no vCPU {idx}")
            vm.topup_memcache(vm.vcpus[idx], f.get("pages", DEFAULT_TOPUP_PAGES))
            return "ok", f"vCPU {idx}'s memcache topped up to {f.get('pages', 4)} page(s)", None
        if a == "run":
            idx = f.get("vcpu", 0)
            if idx >= len(vm.vcpus):  # as a VMM without that vCPU fd answers
                raise HostError(EINVAL, "KVM_RUN", None, f"VM {step.target!r} has "
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


