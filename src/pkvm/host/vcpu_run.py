"""`KVM_RUN` on the host side (`arm.c`, `handle_exit.c`, `mmu.c`, `mmio.c`, `psci.c`).

`HostVcpu.run()` loads the vCPU (7.2), issues `__kvm_vcpu_run` until an exit that userspace
must see, handling in the kernel what KVM handles there: stage-2 faults on guest RAM (map the
page by donation or sharing, with the running vCPU's memcache), PSCI and SMCCC calls, WFI, and
the PC increment / MMIO completion of the previous exit. Returns a `VcpuExit`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pkvm.abi.host_structs import (
    CTXT_END,
    CTXT_START,
    IFLAG_INCREMENT_PC,
    IFLAG_PENDING_EXCEPTION,
    KVM_VCPU,
    SYS_REGS,
    ctxt_pack,
    ctxt_unpack,
)
from pkvm.errors import EFAULT, EINVAL, HostError
from pkvm.host.psci import is_psci, kvm_psci_call
from pkvm.machine.cpu import CpuContext, mmio_read_value
from pkvm.machine.memory import PAGE_SHIFT

if TYPE_CHECKING:
    from pkvm.host.kvm import HostVcpu, HostVm

U64 = 0xFFFF_FFFF_FFFF_FFFF
ARM_EXCEPTION_IRQ, ARM_EXCEPTION_EL1_SERROR, ARM_EXCEPTION_TRAP, ARM_EXCEPTION_IL = 0, 1, 2, 3
EC_WFX, EC_HVC64, EC_SMC64, EC_SYS64, EC_IABT_LOW, EC_DABT_LOW = 0x01, 0x16, 0x17, 0x18, 0x20, 0x24
# Exception classes `arm_exit_handlers` (arch/arm64/kvm/handle_exit.c) gives a handler of their
# own; every other class (EC 0, "unknown", among them) goes to `kvm_handle_unknown_ec`, which
# injects an undefined-instruction exception and re-enters the guest.
EC_OWN_HANDLER = frozenset({
    0x01, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0C, 0x12, 0x13, 0x15, 0x16, 0x17,
    0x18, 0x19, 0x1A, 0x20, 0x24, 0x25, 0x2D, 0x30, 0x32, 0x34, 0x38, 0x3C,
})  # fmt: skip
# The model's KVM_RUN re-enters the guest at most this many times before giving up with a
# "hung" exit: Linux's run loop would go on for ever (a locked-up vCPU thread).
RUN_REENTRY_LIMIT = 2048
HPFAR_NS = 1 << 63
HCR_VI = 1 << 7  # the vCPU's virtual IRQ line (HCR_EL2.VI), driven by the host's emulated GIC
# The HCR_EL2 the host keeps in a new vCPU and hands `__pkvm_vcpu_load`.
HCR_HOST_VCPU = (1 << 31) | (1 << 27) | (1 << 13) | (1 << 14)  # RW, TGE-less guest flags, TWI, TWE

SMCCC_VERSION = 0x8000_0000
SMCCC_ARCH_FEATURES = 0x8000_0001
VENDOR_HYP_UID = 0x8600_FF01
VENDOR_HYP_FEATURES = 0x8600_0000
# kvm_arm_init_hypercalls: the default vendor_hyp_bmap, FUNC_FEAT (bit 0) and PTP (bit 1).
VENDOR_HYP_BMAP = 0b11
SMCCC_ARCH_WORKAROUND_RET_UNAFFECTED = 1
HV_PV_TIME_FEATURES = 0xC500_0020
# SMCCC_ARCH_FEATURES (hypercalls.c): the board's CPU, as QEMU's `-cpu max`, is unaffected by
# Spectre-v2 (CSV2) and Spectre-BHB (ECBHB) and has SSBS, so no firmware mitigation of
# Spectre-v4 is offered; PV time is in the default std_hyp_bmap.
ARCH_FEATURES = {
    0x8000_8000: SMCCC_ARCH_WORKAROUND_RET_UNAFFECTED,  # ARCH_WORKAROUND_1
    0x8000_3FFF: SMCCC_ARCH_WORKAROUND_RET_UNAFFECTED,  # ARCH_WORKAROUND_3
    HV_PV_TIME_FEATURES: 0,
}
KVM_UID = (0xB66F_B428, 0xE911_C52E, 0x564B_CAA9, 0x743A_004D)
SMCCC_RET_NOT_SUPPORTED = -1
SCTLR_EL1_RESET = 0x30D0_0800
_REGS_OFF = KVM_VCPU.offset("arch.ctxt.regs")
_FAULT_OFF = KVM_VCPU.offset("arch.fault.esr_el2")
_IFLAGS_OFF = KVM_VCPU.offset("arch.iflags")
assert KVM_VCPU.field("arch.iflags").size == 8
assert KVM_VCPU.offset("arch.fault.hpfar_el2") == _FAULT_OFF + 16
_FAULT = struct.Struct("<3Q")  # arch.fault.{esr,far,hpfar}_el2


@dataclass(slots=True)
class VcpuExit:
    """What `KVM_RUN` returns to userspace (`struct kvm_run`), plus the raw fault registers."""

    # "mmio", "system_event", "wfi", "preempted", "cpu_off", "sysreg", "fail", or "hung" (the
    # run loop re-entered the guest RUN_REENTRY_LIMIT times with nothing for userspace)
    kind: str
    addr: int = 0
    size: int = 0
    write: bool = False
    data: int = 0
    event: str = ""  # system_event: "shutdown" or "reset"
    esr: int = 0
    detail: str = ""
    stats: dict[str, int] = field(default_factory=dict)


def reset_context(pc: int, x0: int, mpidr: int) -> CpuContext:
    """`kvm_reset_vcpu`: GPRs zero, PSTATE EL1h with DAIF masked, MMU off, PC and x0."""
    ctx = CpuContext(pc=pc, pstate=0x3C5)
    ctx.x[0] = x0
    ctx.sys_regs = {name: 0 for name in SYS_REGS}
    ctx.sys_regs["SCTLR_EL1"] = SCTLR_EL1_RESET
    ctx.sys_regs["MPIDR_EL1"] = (1 << 31) | mpidr
    return ctx


# (pc, x0, vCPU index, the `arch.ctxt` bytes before) -> `arch.ctxt` after a reset (`reset`).
_RESET_PACKED: dict[tuple[int, int, int, bytes], bytes] = {}
_RESET_PACKED_MAX = 64


class VcpuRunner:
    """The in-kernel part of `KVM_RUN` for one host vCPU."""

    def __init__(self, vcpu: "HostVcpu"):
        self.vcpu = vcpu
        self.vm: HostVm = vcpu.vm
        self.power_off = vcpu.idx != 0
        self.pending_mmio: tuple[int, int] | None = None  # (esr, srt) of a read to complete
        self.exits: dict[str, int] = {}
        self._host = vcpu.vm.host
        self._pa, self._va = vcpu.pa, vcpu.va  # the host's struct kvm_vcpu (fixed)
        self._fault_pa = vcpu.pa + _FAULT_OFF  # &vcpu->arch.fault

    # -- the host struct kvm_vcpu ------------------------------------------------------
    def _ctxt_raw(self) -> bytes:
        return self.vm.host.read(self.vcpu.pa + CTXT_START, CTXT_END - CTXT_START)

    def get_regs(self) -> CpuContext:
        ctx: CpuContext = ctxt_unpack(self._ctxt_raw())
        return ctx

    def set_regs(self, ctx: CpuContext) -> None:
        self.vm.host.write(self.vcpu.pa + CTXT_START, ctxt_pack(ctx, self._ctxt_raw()))

    def _field(self, name: str) -> int:
        f = KVM_VCPU.field(name)
        return int.from_bytes(self.vm.host.read(self.vcpu.pa + f.offset, f.size), "little")

    def _set_field(self, name: str, value: int) -> None:
        f = KVM_VCPU.field(name)
        self.vm.host.write(self.vcpu.pa + f.offset, (value & U64).to_bytes(f.size, "little"))

    # The three accessors below are `Host.read_u64` / `write_u64` with the port's 8-byte
    # accessors called directly when it has them (one frame less each; `host.cpu` read at
    # each access, as `Host` reads it).
    def _xreg(self, n: int) -> int:
        """One general-purpose register from the host's saved context."""
        host = self._host
        rd = host._read_u64
        pa = self._pa + _REGS_OFF + 8 * n
        return host.read_u64(pa) if rd is None else rd(host.cpu, pa)

    def _set_xreg(self, n: int, value: int) -> None:
        host = self._host
        wr = host._write_u64
        pa = self._pa + _REGS_OFF + 8 * n
        if wr is None:
            host.write_u64(pa, value)
        else:
            wr(host.cpu, pa, value)

    def _set_iflag(self, flag: int) -> None:
        host, pa = self._host, self._pa + _IFLAGS_OFF
        rd, wr = host._read_u64, host._write_u64
        if rd is None or wr is None:
            host.write_u64(pa, host.read_u64(pa) | flag)
        else:
            cpu = host.cpu
            wr(cpu, pa, rd(cpu, pa) | flag)

    def reset(self, pc: int, x0: int) -> None:
        """`set_regs(reset_context(pc, x0, idx))`: the packed bytes are a function of those
        and of the `arch.ctxt` bytes they are packed over, kept (`_RESET_PACKED`): every new
        vCPU is reset over the same bytes (a campaign creates hundreds)."""
        idx, base = self.vcpu.idx, self._ctxt_raw()
        key = (pc, x0, idx, base)
        raw = _RESET_PACKED.get(key)
        if raw is None:
            if len(_RESET_PACKED) >= _RESET_PACKED_MAX:
                _RESET_PACKED.clear()
            raw = _RESET_PACKED[key] = ctxt_pack(reset_context(pc, x0, idx), base)
        self.vm.host.write(self.vcpu.pa + CTXT_START, raw)

    # -- KVM_RUN ------------------------------------------------------------------
    def complete_mmio(self, data: int) -> None:
        """Userspace's answer to an MMIO read exit (kvm_run->mmio.data)."""
        if self.pending_mmio is None:
            raise HostError(EINVAL, "complete_mmio", None, "the last exit was not an MMIO read")
        esr, srt = self.pending_mmio
        if srt != 31:
            self._set_xreg(srt, mmio_read_value(esr, data))
        self.pending_mmio = None

    def run(self, cpu: int | None = None) -> VcpuExit:
        vm = self.vm
        if self.power_off:
            return VcpuExit("cpu_off")
        vcpu, life = self.vcpu, vm.life
        cpu = vcpu.idx % vm.host.nr_cpus if cpu is None else cpu
        if not (vcpu.hyp_created and vm.is_created):
            vm.ensure_hyp_vcpu(vcpu)
        life.arch_vcpu_load(vm, vcpu, HCR_HOST_VCPU, cpu)
        hvc, va = vm.host.port.hvc, self._va  # `Host.hvc` on this CPU, without its wrapper
        try:
            for _ in range(RUN_REENTRY_LIMIT):
                r = hvc(cpu, "__kvm_vcpu_run", va)
                if r.x0:
                    return VcpuExit("fail", detail="__kvm_vcpu_run is not offered")
                if r.x1 < 0:
                    return VcpuExit("fail", detail=f"__kvm_vcpu_run = {r.x1}")
                out = self._handle_exit(r.x1 & 0x7FFF_FFFF, cpu)
                if out is not None:
                    self.exits[out.kind] = self.exits.get(out.kind, 0) + 1
                    return out
            self._count("hung")
            return VcpuExit("hung", detail=f"KVM_RUN re-entered the guest {RUN_REENTRY_LIMIT} "
                                           "times without an exit to userspace")
        finally:
            life.arch_vcpu_put(vm, vcpu, cpu)

    def _count(self, kind: str) -> None:
        self.exits[kind] = self.exits.get(kind, 0) + 1

    def _handle_exit(self, code: int, cpu: int) -> VcpuExit | None:
        if code == ARM_EXCEPTION_IRQ:
            return VcpuExit("preempted")
        if code != ARM_EXCEPTION_TRAP:
            return VcpuExit("fail", detail=f"exit code {code}")
        host = self._host
        esr, self._far, self._hpfar = _FAULT.unpack(host.port.read(host.cpu, self._fault_pa, 24))
        ec = esr >> 26
        if ec in (EC_DABT_LOW, EC_IABT_LOW):
            return self._abort(esr, cpu)
        if ec == EC_HVC64:
            self._count("hvc")
            return self._smccc(esr)
        if ec == EC_SMC64:
            self._count("smc")
            self._set_iflag(IFLAG_INCREMENT_PC)
            return self._smccc(esr, smc_imm=esr & 0xFFFF)
        if ec == EC_WFX:
            self._set_iflag(IFLAG_INCREMENT_PC)
            return VcpuExit("wfi", esr=esr)
        if ec == EC_SYS64:
            return VcpuExit("sysreg", esr=esr)
        if ec not in EC_OWN_HANDLER:  # kvm_handle_unknown_ec
            self._count("unknown_ec")
            self.inject_undef()
            return None
        return VcpuExit("fail", esr=esr, detail=f"unhandled exception class {ec:#x}")

    def _abort(self, esr: int, cpu: int) -> VcpuExit | None:
        hpfar, far = self._hpfar, self._far
        if self.vm.profile.fault_hpfar_ns_valid and not hpfar & HPFAR_NS:
            return VcpuExit("fail", esr=esr, detail="fault IPA not valid (HPFAR_EL2.NS clear)")
        ipa = (((hpfar & ~HPFAR_NS) >> 4) << PAGE_SHIFT) | (far & 0xFFF)
        gfn = ipa >> PAGE_SHIFT
        if self.vm.in_memslot(gfn):
            self._count("stage2_fault")
            try:
                self.vm.map_one(self.vcpu, gfn, cpu)
                # Fault-around (a VMM's choice, as KVM maps huge pages): the rest of
                # the aligned block of `vm.fault_around` pages, each donated/shared on its own.
                around = self.vm.fault_around
                if around > 1:
                    first = gfn & ~(around - 1)
                    for g in range(first, first + around):
                        if g not in self.vm.mapped and self.vm.in_memslot(g):
                            self.vm.map_one(self.vcpu, g, cpu)
            except HostError as e:
                if e.errno == EFAULT:
                    return VcpuExit("fail", esr=esr, addr=ipa, detail=str(e))
                raise
            return None
        if not esr & (1 << 24):
            return VcpuExit("fail", esr=esr, addr=ipa, detail="MMIO access without a valid ISS")
        write = bool(esr & (1 << 6))
        size = 1 << ((esr >> 22) & 3)
        srt = (esr >> 16) & 31
        self._set_iflag(IFLAG_INCREMENT_PC)
        if write:
            data = 0 if srt == 31 else self._xreg(srt) & ((1 << (8 * size)) - 1)
            return VcpuExit("mmio", addr=ipa, size=size, write=True, data=data, esr=esr)
        self.pending_mmio = (esr, srt)
        return VcpuExit("mmio", addr=ipa, size=size, write=False, esr=esr)

    # -- PSCI and SMCCC (psci.c, hypercalls.c) -------------------------------------------
    def _smccc(self, esr: int, smc_imm: int = 0) -> VcpuExit | None:
        """`kvm_smccc_call_handler` (no SMCCC filter, default firmware bitmaps)."""
        ctx = self.get_regs()
        fid = ctx.x[0] & 0xFFFF_FFFF
        res: list[int] = [SMCCC_RET_NOT_SUPPORTED, 0, 0, 0]
        out: VcpuExit | None = None
        if smc_imm:
            pass  # handle_smc: a non-zero immediate is not an SMCCC call
        elif is_psci(fid):
            res, out = kvm_psci_call(self, fid, ctx.x[1], ctx.x[2], ctx.x[3])
            if out is not None and out.kind == "system_event":
                for v in self.vm.vcpus:  # kvm_prepare_system_event: every vCPU stopped
                    v.runner.power_off = True
        elif fid == SMCCC_VERSION:
            res[0] = 0x10001
        elif fid == SMCCC_ARCH_FEATURES:
            res[0] = ARCH_FEATURES.get(ctx.x[1] & 0xFFFF_FFFF, SMCCC_RET_NOT_SUPPORTED)
        elif fid == VENDOR_HYP_UID:
            res = list(KVM_UID)
        elif fid == VENDOR_HYP_FEATURES:
            res = [VENDOR_HYP_BMAP, 0, 0, 0]
        for i in range(4):
            ctx.x[i] = res[i] & U64
        self.set_regs(ctx)
        return out

    # -- what an emulated interrupt controller and timer need ------------------
    def set_irq_line(self, level: bool) -> None:
        """Raise or lower the vCPU's virtual IRQ (HCR_EL2.VI): EL2 delivers it at entry
        when PSTATE.I is clear."""
        hcr = self._field("arch.hcr_el2")
        new = hcr | HCR_VI if level else hcr & ~HCR_VI
        if new != hcr:
            self._set_field("arch.hcr_el2", new)

    def complete_sysreg(self, esr: int, value: int | None = None) -> int:
        """Finish an emulated system-register exit: a read (ISS.Direction = 1) gets `value` in
        Rt; returns the value written by an MSR. PC moves past the instruction."""
        rt = (esr >> 5) & 31
        written = 0
        if esr & 1:
            if rt != 31:
                ctx = self.get_regs()
                ctx.x[rt] = (value or 0) & U64
                self.set_regs(ctx)
        elif rt != 31:
            written = self.get_regs().x[rt]
        self._set_iflag(IFLAG_INCREMENT_PC)
        return written

    def inject_undef(self) -> None:
        """`kvm_inject_undefined`: applied by EL2 at the next entry (`__kvm_adjust_pc`)."""
        self._set_iflag(IFLAG_PENDING_EXCEPTION)
