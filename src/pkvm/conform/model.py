"""The model side of `pkvm conform`: run `RawStep` sequences on `pkvm.Machine`.

The machine matches the real one booted by `pkvm.conform.real` (QEMU virt, 1 GiB of RAM, 2 CPUs,
48-bit PA). Symbolic arguments resolve to the model's own objects: `page:NAME` to the pfn of a
zeroed host page allocated on first use, `pa:NAME` to its physical address, `va:NAME` to its host
linear-map address, `vm:NAME` to the handle of a VM a `vmm:create` step made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pkvm
from pkvm.conform.real import RawStep, RealResult
from pkvm.host.kvm import host_va

MACHINE = {"memory": "1G", "cpus": 2}
KERNELS = {"6.12": "6.12", "7.2": "latest", "latest": "latest"}


def _signed(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >> 63 else v


@dataclass
class ModelRun:
    machine: Any
    pages: dict[str, int] = field(default_factory=dict)
    vms: dict[str, Any] = field(default_factory=dict)

    def resolve(self, a: int | str) -> int:
        if isinstance(a, int):
            return a
        kind, name = a.split(":", 1)
        if kind == "vm":
            vm = self.vms.get(name)
            return vm.handle if vm is not None else 0
        if name not in self.pages:
            self.pages[name] = self.machine.host.alloc_pages(1) >> 12
        pfn = self.pages[name]
        return {"page": pfn, "pa": pfn << 12, "va": host_va(pfn << 12)}[kind]


def new_machine(kernel: str):
    return pkvm.Machine(abi=KERNELS[kernel], trace=False, **MACHINE)


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
        for _ in range(count):
            seq = next(it, None)
            if seq is None:
                break
            out.append(run_sequence_on_model(kernel, seq, m))
    for seq in it:  # sequences the boot records did not cover
        out.append(run_sequence_on_model(kernel, seq))
    return out


def run_sequence_on_model(kernel: str, steps: list[RawStep], machine=None) -> list[RealResult]:
    """Each step's x0..x3 (or panic), on `machine` or a fresh model of `kernel`'s profile."""
    m = machine if machine is not None else new_machine(kernel)
    run = ModelRun(m)
    out: list[RealResult] = []
    if m.dead:
        return [RealResult(0, 0, 0, 0, panic=True, note="machine dead", pages={}) for _ in steps]
    dead = ""
    for st in steps:
        if dead:
            out.append(RealResult(0, 0, 0, 0, panic=True, note=dead, pages=run.pages))
            continue
        try:
            out.append(_step(run, st))
        except pkvm.HypPanic as e:
            dead = f"hyp panic: {e.reason}"
            out.append(RealResult(0, 0, 0, 0, panic=True, note=dead, pages=run.pages))
        except pkvm.HostDataAbort as e:
            dead = "host data abort" if e.fatal else ""
            out.append(RealResult(0, 0, 0, 0, panic=e.fatal, note=str(e), pages=run.pages))
    return out


def _step(run: ModelRun, st: RawStep) -> RealResult:
    m = run.machine
    if isinstance(st.call, str) and st.call.startswith("vmm:"):
        return _vmm_step(run, st)
    args = [run.resolve(a) for a in st.args]
    r = m.hvc(st.cpu, st.call, *args)
    return RealResult(r.x0, r.x1, r.x2, r.x3, pages=run.pages)


def _vmm_step(run: ModelRun, st: RawStep) -> RealResult:
    """`vmm:create/run/destroy`: the host driver as the real side's /dev/kvm helper drives it."""
    name = str(st.args[0]).split(":", 1)[1]
    m = run.machine
    if st.call == "vmm:create":
        vcpus = int(st.args[1]) if len(st.args) > 1 else 1
        protected = bool(st.args[2]) if len(st.args) > 2 else False
        try:
            vm = m.host.create_vm(vcpus=vcpus, protected=protected, memory="2M")
        except pkvm.HostError as e:
            return RealResult(-e.errno, 0, 0, vcpus, pages=run.pages)
        run.vms[name] = vm
        vm.vcpus[0].run()  # the first KVM_RUN creates the hyp VM and vCPU 0
        return RealResult(0, vm.handle, 0, vcpus, pages=run.pages)
    vm = run.vms.get(name)
    if vm is None:
        return RealResult(-9, 0, 0, 0, pages=run.pages)  # -EBADF: no such VM fd
    if st.call == "vmm:run":
        vcpu = int(st.args[1]) if len(st.args) > 1 else 0
        vm.vcpus[vcpu].run()
        return RealResult(0, 0, 0, 0, pages=run.pages)
    vm.destroy()
    del run.vms[name]
    return RealResult(0, 0, 0, 0, pages=run.pages)
