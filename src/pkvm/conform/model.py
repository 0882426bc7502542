"""The model side of `pkvm conform`: run `RawStep` sequences on `pkvm.Machine`.

The machine matches the real one booted by `pkvm.conform.real` (QEMU virt, 1 GiB of RAM, 2 CPUs,
48-bit PA). Symbolic arguments resolve to the model's own objects: `page:NAME` to the pfn of a
zeroed host page allocated on first use, `pa:NAME` to its physical address, `va:NAME` to its host
linear-map address, `vm:NAME` to the handle of a VM a `vmm:create` step made.

VMM steps drive the host driver (`pkvm.host`) as the real side's `/dev/kvm` helper drives KVM:
the same guest (a loop of stores to the UART) at the same IPA, one `KVM_RUN` per step.
"""

from __future__ import annotations

import re
import traceback
from dataclasses import dataclass, field
from typing import Any

import pkvm
from pkvm.abi.profiles import abi_name
from pkvm.conform.steps import HOST_READ, RawStep, RealResult, page_names
from pkvm.host.kvm import GUEST_RAM_IPA, host_va

MACHINE: dict[str, Any] = {"memory": "1G", "cpus": 2}
# The helper's guest (helper/pkvm_vmm.c): movz x1, #0x0900, lsl #16; 1: str w0, [x1];
# add w0, w0, #1; b 1b
GUEST_CODE = (0xD2A12001, 0xB9000020, 0x11000400, 0x17FFFFFE)
GUEST_MEMORY = 0x10000  # the helper's 64 KiB memslot
# struct kvm_run exit reasons (include/uapi/linux/kvm.h) of what the model's KVM_RUN returns
EXIT_REASONS = {"mmio": 6, "system_event": 24, "fail": 9}
ENOENT, EINVAL, EFAULT = 2, 22, 14
PAGE_SIZE = 4096
# A named page is the first of this many pages (the module's PKVMC_ORDER): a structure read or
# pinned from its VA on stays in memory both sides control.
NAMED_BLOCK_PAGES = 4
# The real helper is pinned to CPU 0 (`taskset 1` in the boot's init): every KVM ioctl of a VMM
# step, KVM_RUN included, enters the hyp there, so a hypercall step's vCPU loaded by hand on
# CPU 1 never meets it by the scheduler's chance.
HELPER_CPU = 0


@dataclass
class ModelRun:
    machine: Any
    pages: dict[str, int] = field(default_factory=dict)
    vms: dict[str, Any] = field(default_factory=dict)
    handles: dict[str, int] = field(default_factory=dict)  # kept after teardown: stale handles

    def resolve(self, a: int | str) -> int:
        if isinstance(a, int):
            return a
        kind, name = a.split(":", 1)
        if kind == "vm":
            return self.handles.get(name, 0)
        if name not in self.pages:  # the first of a block of ours, as the module allocates
            self.pages[name] = self.machine.host.alloc_pages(NAMED_BLOCK_PAGES) >> 12
        pfn = self.pages[name]
        return {"page": pfn, "pa": pfn << 12, "va": host_va(pfn << 12)}[kind]

    @property
    def vas(self) -> dict[str, int]:
        return {n: host_va(p << 12) for n, p in self.pages.items()}

    def result(self, x0: int, x1: int, x2: int, x3: int, **kw: Any) -> RealResult:
        return RealResult(x0, x1, x2, x3, pages=dict(self.pages), vas=self.vas, **kw)


def model_abi(kernel: str) -> str:
    """The model's ABI profile name for a real kernel ("7.2" -> "latest"), by the one alias
    table (`pkvm.abi.profiles.ABI_ALIASES`)."""
    return abi_name(kernel)


def new_machine(kernel: str) -> pkvm.Machine:
    return pkvm.Machine(abi=model_abi(kernel), trace=False, **MACHINE)


def run_sequences_on_model(kernel: str, seqs: list[list[RawStep]],
                           boots: list[int] | None = None) -> list[list[RealResult]]:
    """Run `seqs` as the real harness did: `boots[i]` sequences shared the i-th machine (the
    real side reuses one boot for many sequences, so page states carry over between them).
    Without `boots`, each sequence gets a fresh machine."""
    groups = boots or [1] * len(seqs)
    out: list[list[RealResult]] = []
    it = iter(seqs)
    for count in groups:
        m = new_machine(kernel)
        for j in range(count):
            seq = next(it, None)
            if seq is None:
                break
            out.append(run_sequence_on_model(kernel, seq, m, fresh=j == 0))
    for seq in it:  # sequences the boot records did not cover
        out.append(run_sequence_on_model(kernel, seq))
    return out


def run_sequence_on_model(kernel: str, steps: list[RawStep],
                          machine: pkvm.Machine | None = None,
                          fresh: bool = False) -> list[RealResult]:
    """Each step's x0..x3 (or how the machine died), on `machine` or a fresh model.

    A Python exception raised by the model is a result too (kind "model error", which never
    agrees with the kernel): the run goes on with the next sequence."""
    fresh = fresh or machine is None
    m = machine if machine is not None else new_machine(kernel)
    run = ModelRun(m)
    out: list[RealResult] = []
    if m.dead:
        return [run.result(0, 0, 0, 0, panic=True, note="not run: machine dead", not_run=True)
                for _ in steps]
    for name in page_names(steps):  # as the module does, before the first step
        run.resolve(f"page:{name}")
    dead = ""
    for st in steps:
        if dead:
            out.append(run.result(0, 0, 0, 0, panic=True, note=f"not run: {dead}",
                                  not_run=True))
            continue
        try:
            out.append(_step(run, st))
        except pkvm.HypPanic as e:
            dead = f"hyp panic: {e.reason}"
            note = dead + (_mapped_earlier(kernel, steps[: len(out)], e.reason) if fresh else "")
            out.append(run.result(0, 0, 0, 0, panic=True, note=note))
        except _HostSError as e:
            dead = str(e)
            out.append(run.result(0, 0, 0, 0, panic=True, note=dead))
        except pkvm.HostDataAbort as e:
            # 6.12's hyp panics on a refused host access; 7.2 injects an abort the host
            # kernel cannot handle (an oops in kernel code)
            dead = f"hyp panic: {e}" if e.fatal else f"host oops: {e}"
            out.append(run.result(0, 0, 0, 0, panic=True, note=dead))
        except Exception as e:  # noqa: BLE001 - a model bug is a result, not the run's end
            tb = traceback.format_exception_only(type(e), e)[-1].strip()
            dead = f"model error: {tb}"
            out.append(run.result(0, 0, 0, 0, panic=True, note=dead))
    return out


_EL2_ABORT = re.compile(r"EL2 data abort: hyp VA (0x[0-9a-f]+) is not mapped")


def _mapped_earlier(kernel: str, before: list[RawStep], reason: str) -> str:
    """For an EL2 data abort: replay the steps before it on a fresh model and say whether the
    faulting hyp VA was mapped at EL2 after one of them (" [mapped at EL2 after step N]")."""
    m = _EL2_ABORT.search(reason)
    if not m:
        return ""
    va = int(m.group(1), 16)
    run = ModelRun(new_machine(kernel))
    for i, st in enumerate(before):
        try:
            _step(run, st)
        except Exception:  # noqa: BLE001 - the original run got past this step
            return ""
        _, pte, _ = run.machine.inspect.table("hyp").get_leaf(va & ~0xFFF)
        if pte & 1:
            return f" [mapped at EL2 after step {i}]"
    return ""


def _step(run: ModelRun, st: RawStep) -> RealResult:
    m = run.machine
    if isinstance(st.call, str) and st.call.startswith("vmm:"):
        return _vmm_step(run, st)
    if st.call == HOST_READ:
        nonzero, faulted = _read_back(m, [run.resolve(st.args[0]) << 12], st.cpu)
        return run.result(-EFAULT if faulted else 0, nonzero, 0, 0)
    args = [run.resolve(a) for a in st.args]
    r = m.hvc(st.cpu, st.call, *args)
    return run.result(r.x0, r.x1, r.x2, r.x3)


def _read_back(m: Any, pages: list[int], cpu: int) -> tuple[int, int]:
    """(non-zero 64-bit words, pages whose read the host stage-2 refused) of a host read of
    each page at `pages`, as kernel code reads with a fault-tolerant accessor: 7.2's hyp
    injects the abort back and the accessor's fixup answers -EFAULT; 6.12's hyp panics (the
    `HostDataAbort` is fatal and ends the sequence)."""
    nonzero = faulted = 0
    for pa in pages:
        try:
            data = m.host.read(pa, PAGE_SIZE, cpu=cpu)
        except pkvm.HostDataAbort as e:
            if e.fatal:
                raise
            faulted += 1
            continue
        nonzero += sum(1 for i in range(0, PAGE_SIZE, 8) if data[i : i + 8] != bytes(8))
    return nonzero, faulted


class _HostSError(Exception):
    """Linux's KVM_RUN would have panicked the host kernel, or never returned (a lockup)."""


def _exit(e: Any) -> tuple[int, int]:
    """(kvm_run exit reason, MMIO address) of a model `VcpuExit`; an exit userspace never
    sees from Linux's KVM_RUN (a WFI, an IRQ) is reported as reason -1.

    A negative `__kvm_vcpu_run` return (the hyp found no hyp vCPU to run) has bit 31 set:
    Linux's `handle_exit_early` takes it for a pending SError and, on a CPU with RAS (QEMU's
    `-cpu max`), `kvm_handle_guest_serror` finds the SError fatal and panics the host. The
    model's host driver returns a "fail" exit instead; the VMM step reports what Linux does.
    A "hung" exit (the run loop kept re-entering the guest with nothing for userspace, where
    Linux's loop goes on for ever) is the lockup the real harness times out on."""
    if e.kind == "fail" and e.detail.startswith("__kvm_vcpu_run = -"):
        raise _HostSError(f"host oops: {e.detail}: KVM takes it for a pending SError "
                          "(handle_exit_early) and panics (kvm_handle_guest_serror)")
    if e.kind == "hung":  # Linux's KVM_RUN never returns: the harness sees a lockup
        raise _HostSError(f"lockup: {e.detail}")
    reason = EXIT_REASONS.get(e.kind, -1)
    return reason, e.addr if e.kind == "mmio" else 0


def _vmm_step(run: ModelRun, st: RawStep) -> RealResult:
    """`vmm:create/run/destroy`: the host driver as the real side's /dev/kvm helper drives it."""
    name = str(st.args[0]).split(":", 1)[1]
    m = run.machine
    if st.call == "vmm:create":
        vcpus = int(st.args[1]) if len(st.args) > 1 else 1
        protected = bool(st.args[2]) if len(st.args) > 2 else False
        if name in run.vms or not 1 <= vcpus <= 8:
            return run.result(-EINVAL, 0, 0, 0)  # the helper refuses these itself
        try:
            vm = m.host.create_vm(vcpus=vcpus, protected=protected, memory=GUEST_MEMORY)
        except pkvm.HostError as e:
            return run.result(-(e.errno or EINVAL), 0, 0, 0)
        vm.write(GUEST_RAM_IPA, b"".join(w.to_bytes(4, "little") for w in GUEST_CODE))
        for vcpu in vm.vcpus:  # KVM_ARM_VCPU_INIT without POWER_OFF: every vCPU runs
            vcpu.runner.power_off = False
        run.vms[name] = vm
        run.handles[name] = vm.handle
        # the first KVM_RUN creates the hyp VM
        reason, _ = _exit(vm.vcpus[0].run(cpu=HELPER_CPU))
        return run.result(0, vm.handle, reason, vcpus)
    vm = run.vms.get(name)
    if vm is None:
        return run.result(-ENOENT, 0, 0, 0)  # the helper: no VM of that name
    if st.call in ("vmm:run", "vmm:topup"):
        vcpu = int(st.args[1]) if len(st.args) > 1 else 0
        if not 0 <= vcpu < len(vm.vcpus):
            return run.result(-EINVAL, 0, 0, 0)
        if st.call == "vmm:topup":
            n = int(st.args[2]) if len(st.args) > 2 else 4
            if not 0 <= n <= 64:
                return run.result(-EINVAL, 0, 0, 0)
            v = vm.vcpus[vcpu]
            vm.topup_memcache(v, n)
            return run.result(0, m.host.read_u64(v.field_pa("arch.pkvm_memcache.nr_pages")),
                              0, 0)
        reason, addr = _exit(vm.vcpus[vcpu].run(cpu=HELPER_CPU))
        return run.result(0, reason, addr, 0)
    slots = dict(vm.memslot)  # the VMM's memory: the pages outlive the VM
    vm.destroy()
    del run.vms[name]
    nonzero, faulted = _read_back(m, list(slots.values()), HELPER_CPU)
    return run.result(0, nonzero, faulted, 0)
