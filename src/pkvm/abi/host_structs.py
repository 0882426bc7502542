"""The host's `struct kvm` and `struct kvm_vcpu` as bytes in host memory (a model choice).

Linux's layouts depend on its config, so the model fixes its own, here, once, for the host
driver (which writes them) and the hyp (which reads the fields Linux's hyp reads, where it reads
them). Little-endian, C widths. The host driver places a `kvm` across a page boundary
(multi-page pins). Their lengths are the real ones of each kernel (`Profile.sizeof_kvm`,
`sizeof_kvm_vcpu`: 3952 and 7056 bytes in 6.12, 4120 and 9024 in 7.2), so the hyp pins
exactly the pages Linux's would;
the layouts below are sized for the larger.

Field table (offsets are computed below; `KVM.describe()` prints them):

struct kvm: `created_vcpus` int; `arch.pkvm.handle` u32 (the hyp reads 16 bits in 7.2);
`arch.pkvm.is_protected`, `is_created`, `is_dying` u8; `arch.flags`, `arch.vcpu_features`,
`arch.ctr_el0`, `arch.midr_el1` u64; `arch.vgic.vgic_model` u32; `arch.id_regs[56]` u64;
`arch.mmu` (`kvm_s2_mmu`, laid out as both kernels lay it out: see `KVM_S2_MMU`); `arch.pkvm.teardown_mc` and
`arch.pkvm.stage2_teardown_mc` (`kvm_hyp_memcache`: `head`, `nr_pages`, `flags` u64).

struct kvm_vcpu: `kvm` pointer; `vcpu_id`, `vcpu_idx` int; `arch.cflags`, `arch.hcr_el2`,
`arch.hcrx_el2`, `arch.mdcr_el2`, `arch.iflags`, `arch.vsesr_el2` u64; `arch.sve_max_vl` u32,
`arch.sve_state` pointer; `arch.hw_mmu` pointer; `arch.fgt[8]` u64; `arch.ctxt` (`regs[31]`,
`sp_el0`, `pc`, `pstate`, `sp_el1`, `elr_el1`, `spsr_el1`, `fpsr`, `fpcr` u64, `vregs[32]` 16 bytes,
`sys_regs[64]` u64); `arch.fault` (`esr_el2`, `far_el2`, `hpfar_el2`, `disr_el1`); `arch.vgic_v3`
(`vgic_hcr`, `vgic_vmcr` u64, `used_lrs` u32, `lrs[16]` u64); `arch.pkvm_memcache` (`head`,
`nr_pages`, `flags`); `arch.mp_state` u32 and the model's `arch.power_off` u8 (host-only).
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import Final

from pkvm.machine.context import CpuContext


@dataclass(frozen=True)
class Field:
    name: str
    offset: int
    fmt: str  # struct format of one element
    count: int = 1

    @functools.cached_property
    def size(self) -> int:  # read on every host-struct access: computed once
        return struct.calcsize("<" + self.fmt) * self.count


class Layout:
    def __init__(self, name: str, size: int, fields: list[tuple[str, str, int]]):
        self.name = name
        self.size = size
        self.fields: dict[str, Field] = {}
        off = 0
        for fname, fmt, count in fields:
            align = struct.calcsize("<" + fmt) if fmt != "16s" else 16
            align = min(align, 8)
            off = (off + align - 1) & ~(align - 1)
            f = Field(fname, off, fmt, count)
            self.fields[fname] = f
            off += f.size
        if off > size:
            raise AssertionError(f"{name} fields take {off} bytes > {size}")

    def offset(self, name: str) -> int:
        return self.fields[name].offset

    def field(self, name: str) -> Field:
        return self.fields[name]

    def describe(self) -> str:
        lines = [f"struct {self.name} ({self.size} bytes)"]
        for f in self.fields.values():
            n = f"[{f.count}]" if f.count > 1 else ""
            lines.append(f"  {f.offset:#06x} {f.name}{n} ({f.fmt})")
        return "\n".join(lines)


NR_SYS_REGS: Final = 64
NR_ID_REGS: Final = 56
NR_LRS: Final = 16

KVM: Final = Layout(
    "kvm",
    4120,
    [
        ("created_vcpus", "i", 1),
        ("arch.pkvm.handle", "I", 1),
        ("arch.pkvm.is_protected", "B", 1),
        ("arch.pkvm.is_created", "B", 1),
        ("arch.pkvm.is_dying", "B", 1),
        ("arch.flags", "Q", 1),
        ("arch.vcpu_features", "Q", 1),
        ("arch.ctr_el0", "Q", 1),
        ("arch.midr_el1", "Q", 1),
        ("arch.vgic.vgic_model", "I", 1),
        ("arch.mmu.vmid", "Q", 1),
        ("arch.mmu.pgd_phys", "Q", 1),
        ("arch.mmu.pgt", "Q", 1),
        ("arch.mmu.vtcr", "Q", 1),
        ("arch.mmu.last_vcpu_ran", "Q", 1),
        ("arch.mmu.split_page_cache", "40s", 1),
        ("arch.mmu.split_page_chunk_size", "Q", 1),
        ("arch.mmu.arch", "Q", 1),
        ("arch.pkvm.teardown_mc.head", "Q", 1),
        ("arch.pkvm.teardown_mc.nr_pages", "Q", 1),
        ("arch.pkvm.teardown_mc.flags", "Q", 1),
        ("arch.pkvm.stage2_teardown_mc.head", "Q", 1),
        ("arch.pkvm.stage2_teardown_mc.nr_pages", "Q", 1),
        ("arch.pkvm.stage2_teardown_mc.flags", "Q", 1),
        ("arch.id_regs", "Q", NR_ID_REGS),
    ],
)

# `struct kvm_s2_mmu` at the kernel's own offsets (the same in 6.12 and 7.2, arm64 kvm_host.h:
# `kvm_vmid` is one atomic64, `kvm_mmu_memory_cache` is 40 bytes): a host pointer to one goes to
# EL2 with every `__kvm_tlb_flush_*` call, and the hyp reads these fields where Linux's does.
KVM_S2_MMU: Final = Layout(
    "kvm_s2_mmu",
    96,
    [
        ("vmid", "Q", 1),
        ("pgd_phys", "Q", 1),
        ("pgt", "Q", 1),
        ("vtcr", "Q", 1),
        ("last_vcpu_ran", "Q", 1),
        ("split_page_cache", "40s", 1),
        ("split_page_chunk_size", "Q", 1),
        ("arch", "Q", 1),
    ],
)
assert all(KVM.offset(f"arch.mmu.{n}") - KVM.offset("arch.mmu.vmid") == f.offset
           for n, f in KVM_S2_MMU.fields.items()), "struct kvm's arch.mmu is a kvm_s2_mmu"

KVM_VCPU: Final = Layout(
    "kvm_vcpu",
    9024,
    [
        ("kvm", "Q", 1),
        ("vcpu_id", "i", 1),
        ("vcpu_idx", "i", 1),
        ("arch.cflags", "Q", 1),
        ("arch.hcr_el2", "Q", 1),
        ("arch.hcrx_el2", "Q", 1),
        ("arch.mdcr_el2", "Q", 1),
        ("arch.iflags", "Q", 1),
        ("arch.vsesr_el2", "Q", 1),
        ("arch.sve_max_vl", "I", 1),
        ("arch.sve_state", "Q", 1),
        ("arch.hw_mmu", "Q", 1),
        ("arch.fgt", "Q", 8),
        ("arch.ctxt.regs", "Q", 31),
        ("arch.ctxt.sp_el0", "Q", 1),
        ("arch.ctxt.pc", "Q", 1),
        ("arch.ctxt.pstate", "Q", 1),
        ("arch.ctxt.sp_el1", "Q", 1),
        ("arch.ctxt.elr_el1", "Q", 1),
        ("arch.ctxt.spsr_el1", "Q", 1),
        ("arch.ctxt.fpsr", "Q", 1),
        ("arch.ctxt.fpcr", "Q", 1),
        ("arch.ctxt.vregs", "16s", 32),
        ("arch.ctxt.sys_regs", "Q", NR_SYS_REGS),
        ("arch.ctxt.__hyp_running_vcpu", "Q", 1),
        ("arch.fault.esr_el2", "Q", 1),
        ("arch.fault.far_el2", "Q", 1),
        ("arch.fault.hpfar_el2", "Q", 1),
        ("arch.fault.disr_el1", "Q", 1),
        ("arch.vgic_v3.vgic_hcr", "Q", 1),
        ("arch.vgic_v3.vgic_vmcr", "Q", 1),
        ("arch.vgic_v3.used_lrs", "I", 1),
        ("arch.vgic_v3.lrs", "Q", NR_LRS),
        ("arch.pkvm_memcache.head", "Q", 1),
        ("arch.pkvm_memcache.nr_pages", "Q", 1),
        ("arch.pkvm_memcache.flags", "Q", 1),
        ("arch.mp_state", "I", 1),
    ],
)

# The run-time context block copied whole between host and hyp on every run (flush/sync).
CTXT_START: Final = KVM_VCPU.offset("arch.ctxt.regs")
CTXT_END: Final = KVM_VCPU.offset("arch.ctxt.__hyp_running_vcpu") + 8

# `arch.flags` bits of struct kvm (arm64 kvm_host.h names).
KVM_ARCH_FLAG_MTE_ENABLED: Final = 1 << 1
KVM_ARCH_FLAG_ID_REGS_INITIALIZED: Final = 1 << 7
KVM_ARCH_FLAG_GUEST_HAS_SVE: Final = 1 << 9
# `vcpu_features` bits.
KVM_ARM_VCPU_PSCI_0_2: Final = 1 << 2
# `iflags` bits (the model's choice of positions).
IFLAG_INCREMENT_PC: Final = 1 << 1
IFLAG_PENDING_EXCEPTION: Final = 1 << 0
HYP_MEMCACHE_ACCOUNT_STAGE2: Final = 1 << 1

# Index of each EL1 system register in `arch.ctxt.sys_regs[]` (the model's numbering).
SYS_REGS: Final = (
    "SCTLR_EL1", "TTBR0_EL1", "TTBR1_EL1", "TCR_EL1", "MAIR_EL1", "AMAIR_EL1", "VBAR_EL1",
    "ESR_EL1", "FAR_EL1", "CONTEXTIDR_EL1", "TPIDR_EL0", "TPIDRRO_EL0", "TPIDR_EL1",
    "CPACR_EL1", "CNTKCTL_EL1", "PAR_EL1", "MPIDR_EL1", "CSSELR_EL1", "AFSR0_EL1",
    "AFSR1_EL1", "CNTV_CTL_EL0", "CNTV_CVAL_EL0", "CNTP_CTL_EL0", "CNTP_CVAL_EL0",
    "MDSCR_EL1", "ZCR_EL1", "TFSR_EL1", "ACTLR_EL1",
)
SYS_REG_INDEX: Final = {name: i for i, name in enumerate(SYS_REGS)}


# -- arch.ctxt <-> the CPU's register context ------------------------------------------------
def _ctxt_off(name: str) -> int:
    return KVM_VCPU.offset(name) - CTXT_START


_SCALARS: Final = ("sp_el0", "pc", "pstate", "sp_el1", "elr_el1", "spsr_el1", "fpsr", "fpcr")
# regs[31], the scalars, vregs (as 64 u64 halves) and sys_regs are contiguous u64s.
_NQ: Final = 31 + len(_SCALARS) + 64 + NR_SYS_REGS
_CTXT_FMT: Final = struct.Struct(f"<{_NQ}Q")
_NSYS: Final = len(SYS_REGS)
assert _ctxt_off("arch.ctxt.sys_regs") == 8 * (31 + len(_SCALARS) + 64)


def ctxt_words(raw: bytes) -> tuple[int, ...]:
    """`arch.ctxt` as u64 words: x0..x30, sp_el0, pc, pstate, ... (see `ctxt_unpack`)."""
    return _CTXT_FMT.unpack_from(raw, 0)


def ctxt_unpack(raw: bytes) -> CpuContext:
    """`arch.ctxt` bytes -> `pkvm.machine.cpu.CpuContext`."""
    q = _CTXT_FMT.unpack_from(raw, 0)
    v = [q[39 + 2 * i] | q[40 + 2 * i] << 64 for i in range(32)]
    return CpuContext(x=list(q[:31]), sp_el0=q[31], pc=q[32], pstate=q[33], sp_el1=q[34],
                      elr_el1=q[35], spsr_el1=q[36], fpsr=q[37], fpcr=q[38], v=v,
                      sys_regs=dict(zip(SYS_REGS, q[103 : 103 + _NSYS])))


def ctxt_pack(ctx: CpuContext, base: bytes) -> bytes:
    """A `CpuContext` written over `arch.ctxt` bytes `base` (fields the CPU lacks are kept)."""
    m = 2**64 - 1
    q = list(_CTXT_FMT.unpack_from(base, 0))
    q[:31] = [r & m for r in ctx.x]
    q[31:39] = [ctx.sp_el0 & m, ctx.pc & m, ctx.pstate & m, ctx.sp_el1 & m, ctx.elr_el1 & m,
                ctx.spsr_el1 & m, ctx.fpsr & m, ctx.fpcr & m]
    q[39:103] = [half for val in ctx.v for half in (val & m, (val >> 64) & m)]
    sysr = ctx.sys_regs
    q[103 : 103 + _NSYS] = [sysr.get(name, q[103 + i]) & m for i, name in enumerate(SYS_REGS)]
    raw = bytearray(base)
    _CTXT_FMT.pack_into(raw, 0, *q)
    return bytes(raw)


# The CPU's part of `arch.ctxt` as bytes (`pkvm.machine.context.RAW_SIZE`: regs, the scalars,
# vregs) and the `sys_regs[]` array after it.
CTXT_RAW_SIZE: Final = 8 * 39 + 16 * 32
CTXT_REGS_SIZE: Final = _CTXT_FMT.size  # up to the end of sys_regs[]
_SYS_FMT: Final = struct.Struct(f"<{NR_SYS_REGS}Q")
assert _ctxt_off("arch.ctxt.vregs") + 16 * 32 == CTXT_RAW_SIZE == 8 * 103
assert CTXT_RAW_SIZE + _SYS_FMT.size == CTXT_REGS_SIZE
_SYS_SLOTS: Final[dict[tuple[str, ...], tuple[tuple[int, int], ...]]] = {}


def _sys_slots(sys_names: list[str]) -> tuple[tuple[int, int], ...]:
    """(position in `sys_names`, index in sys_regs[]) of each name the ABI numbers."""
    key = tuple(sys_names)
    slots = _SYS_SLOTS.get(key)
    if slots is None:
        slots = _SYS_SLOTS[key] = tuple((k, SYS_REG_INDEX[n]) for k, n in enumerate(key)
                                        if n in SYS_REG_INDEX)
    return slots


def ctxt_pack_raw(raw: bytes, sys_names: list[str], sysvals: list[int], base: bytes) -> bytes:
    """`ctxt_pack` from a CPU's context as bytes (`Core.save_raw`), with no `CpuContext` in
    between: `raw` over the regs, scalars and vregs of `base`, `sysvals` (the values of
    `sys_names`) over its sys_regs[]; the registers the CPU lacks are kept."""
    q = list(_SYS_FMT.unpack_from(base, CTXT_RAW_SIZE))
    for k, i in _sys_slots(sys_names):
        q[i] = sysvals[k]
    return raw[:CTXT_RAW_SIZE] + _SYS_FMT.pack(*q) + base[CTXT_REGS_SIZE:]


def ctxt_sys_values(raw: bytes, sys_names: list[str]) -> list[int]:
    """The values of `sys_names` in `arch.ctxt` bytes `raw` (0 for a name the ABI lacks), as
    `Core.load_raw` takes them."""
    q = _SYS_FMT.unpack_from(raw, CTXT_RAW_SIZE)
    out = [0] * len(sys_names)
    for k, i in _sys_slots(sys_names):
        out[k] = q[i]
    return out
