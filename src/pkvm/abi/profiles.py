"""ABI profiles: every difference between Linux 6.12.117 and 7.2.13 that the model knows of.

Like QEMU's versioned machine types, the newest behaviour is written once in the hyp modules and
each kernel is a small record of differences that the code consults where the kernels part ways.
A reader finds every 6.12-vs-7.2 difference here (names, numbers, gating, widths, errnos), and
the hyp code asks `profile.<feature>` instead of comparing version strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

# `enum __kvm_host_smccc_func` of Linux 6.12.117 (arch/arm64/include/asm/kvm_asm.h).
HCALLS_6_12: tuple[str, ...] = (
    "__kvm_hyp_init",
    "__kvm_get_mdcr_el2",
    "__pkvm_init",
    "__pkvm_create_private_mapping",
    "__pkvm_cpu_set_vector",
    "__kvm_enable_ssbs",
    "__vgic_v3_init_lrs",
    "__vgic_v3_get_gic_config",
    "__pkvm_prot_finalize",
    "__pkvm_host_share_hyp",
    "__pkvm_host_unshare_hyp",
    "__kvm_adjust_pc",
    "__kvm_vcpu_run",
    "__kvm_flush_vm_context",
    "__kvm_tlb_flush_vmid_ipa",
    "__kvm_tlb_flush_vmid_ipa_nsh",
    "__kvm_tlb_flush_vmid",
    "__kvm_tlb_flush_vmid_range",
    "__kvm_flush_cpu_context",
    "__kvm_timer_set_cntvoff",
    "__vgic_v3_save_vmcr_aprs",
    "__vgic_v3_restore_vmcr_aprs",
    "__pkvm_vcpu_init_traps",
    "__pkvm_init_vm",
    "__pkvm_init_vcpu",
    "__pkvm_teardown_vm",
)

# `enum __kvm_host_smccc_func` of Linux 7.2.13; its MARKER() entries take no number.
HCALLS_7_2: tuple[str, ...] = (
    "__kvm_hyp_init",
    "__pkvm_init",
    "__pkvm_create_private_mapping",
    "__pkvm_cpu_set_vector",
    "__kvm_enable_ssbs",
    "__vgic_v3_init_lrs",
    "__vgic_v3_get_gic_config",
    "__pkvm_prot_finalize",
    "__kvm_adjust_pc",
    "__kvm_vcpu_run",
    "__kvm_flush_vm_context",
    "__kvm_tlb_flush_vmid_ipa",
    "__kvm_tlb_flush_vmid_ipa_nsh",
    "__kvm_tlb_flush_vmid",
    "__kvm_tlb_flush_vmid_range",
    "__kvm_flush_cpu_context",
    "__kvm_timer_set_cntvoff",
    "__tracing_load",
    "__tracing_unload",
    "__tracing_enable",
    "__tracing_swap_reader",
    "__tracing_update_clock",
    "__tracing_reset",
    "__tracing_enable_event",
    "__tracing_write_event",
    "__vgic_v3_save_aprs",
    "__vgic_v3_restore_vmcr_aprs",
    "__vgic_v5_save_apr",
    "__vgic_v5_restore_vmcr_apr",
    "__pkvm_host_share_hyp",
    "__pkvm_host_unshare_hyp",
    "__pkvm_host_donate_guest",
    "__pkvm_host_share_guest",
    "__pkvm_host_unshare_guest",
    "__pkvm_host_relax_perms_guest",
    "__pkvm_host_wrprotect_guest",
    "__pkvm_host_test_clear_young_guest",
    "__pkvm_host_mkyoung_guest",
    "__pkvm_reserve_vm",
    "__pkvm_unreserve_vm",
    "__pkvm_init_vm",
    "__pkvm_init_vcpu",
    "__pkvm_vcpu_in_poison_fault",
    "__pkvm_force_reclaim_guest_page",
    "__pkvm_reclaim_dying_guest_page",
    "__pkvm_start_teardown_vm",
    "__pkvm_finalize_teardown_vm",
    "__pkvm_vcpu_load",
    "__pkvm_vcpu_put",
    "__pkvm_tlb_flush_vmid",
)

ALL_HCALL_NAMES: Final = frozenset(HCALLS_6_12) | frozenset(HCALLS_7_2)

# SMCCC: fast call, 64-bit, owner "vendor hypervisor" (6), function number 0.
KVM_HOST_SMCCC_ID_BASE: Final = 0xC600_0000
ARM_SMCCC_CALL_HINTS: Final = 1 << 16


@dataclass(frozen=True)
class Profile:
    """One kernel's host ABI and the behaviours where it differs from the other."""

    name: str
    kernel: str
    hcalls: tuple[str, ...]
    # Gate of handle_host_hcall: [0, pkvm_only) before finalise, [min_pkvm, len) after.
    min_pkvm: int
    pkvm_only: int
    # pkvm_handle_t width.
    handle_bits: int
    # sizeof(struct hyp_page); HYP_NO_ORDER.
    hyp_page_size: int
    hyp_no_order: int
    # Where host and hyp page states live: host S2 / hyp S1 software bits (6.12) or vmemmap;
    # it picks the hyp's page-state store (`HypState.page_states`, `pkvm.hyp.memory.select_page_states`).
    page_state_in_vmemmap: bool
    # `kvm_pgtable_walk_continue` on a visitor's -EAGAIN: 7.2 stops unless the walk has
    # KVM_PGTABLE_WALK_IGNORE_EAGAIN; 6.12 goes on (unless it handles a fault).
    pgtable_walk_eagain_stops: bool
    # Protected VMs, hyp-owned guest stage-2, guest-memory hypercalls, guest calls at EL2.
    protected_vms: bool
    hyp_owned_guest_stage2: bool
    # The shape of the VM life cycle in nvhe/pkvm.c, chosen once at boot (`hyp/vm_life.py`,
    # `host/kvm_life.py`): "one-phase" (6.12: `__pkvm_init_vm` allocates the handle, vCPUs are
    # made in order, each run loads its vCPU, one teardown call) or "two-phase" (7.2: the handle
    # is reserved first, vCPUs go to the slot of their host index, the host loads and puts a
    # vCPU explicitly, teardown starts and then finalises).
    vm_lifecycle: Literal["one-phase", "two-phase"]
    # The hypercalls of that life cycle, as features: handle reserved first, two-phase
    # teardown, explicit vCPU load/put. (`teardown_refusal_errno_busy`, below: the errno of a
    # teardown refused because the VM's refcount is held, 6.12 -EBUSY after a WARN, 7.2 -EINVAL.)
    reserve_vm: bool
    two_phase_teardown: bool
    explicit_vcpu_load: bool
    # 6.12: hyp vCPUs initialised strictly 0, 1, 2...; 7.2: any order, slot = host vcpu_idx.
    vcpu_init_in_order: bool
    # errnos where the kernels differ.
    host_idmap_exists_errno: int  # host_stage2_adjust_range on a valid leaf
    teardown_refusal_errno_busy: int
    # host access to memory it may not touch: 6.12 BUG_ON (fatal), 7.2 injects an abort.
    host_abort_fatal: bool
    # level 0 granule usable for the host idmap (6.12 does not skip it).
    host_idmap_skip_level0: bool
    # PSCI version the host's psci.c reports.
    psci_version: int
    # hyp vmemmap drain on teardown clears the whole hyp_page (6.12) or only refcount (7.2).
    teardown_clears_whole_hyp_page: bool
    # pages attached outside a pool's range: keep recorded order (6.12) or force order 0.
    attach_foreign_keeps_order: bool
    # sizeof(struct kvm) / sizeof(struct kvm_vcpu) of the Debian arm64 build (measured by
    # compiling against its headers): what the hyp pins and the host shares for them.
    sizeof_kvm: int
    sizeof_kvm_vcpu: int
    # 7.2 initialises each hyp vCPU's HCR/MDCR/HCRX (`pkvm_vcpu_init_traps`) and its flush takes
    # only TWI/TWE/VSE from the host; 6.12's flush copies the host's whole HCR_EL2.
    hyp_vcpu_init_traps: bool = False
    # `enter_vmid_context` loads the host's kvm_s2_mmu with `__load_stage2`, whose 6.12 form
    # also takes `kern_hyp_va(mmu->arch)`: 6.12 reads `mmu->arch` first, 7.2 never reads it.
    load_stage2_reads_mmu_arch: bool = False
    # handle_host_smc: 7.2 refuses (x0 = -1, nothing else written) an SMC with a non-zero
    # immediate or bits 63:32 of x0 set; 6.12 ignores both.
    smc_refuses_imm_and_upper: bool = False
    # The PSCI relay forwards SYSTEM_OFF2 (PSCI 1.3; 7.2 only).
    psci_relay_system_off2: bool = False
    # ffa_set_retval writes x0..x3 (6.12) or x0..x17 (7.2).
    ffa_retval_regs: int = 4
    # The FF-A proxy (nvhe/ffa.c): the version EL2 asks the firmware for (1.1 / 1.2); a
    # negotiated FFA_VERSION asking for a lower minor is refused (7.2); the FF-A 1.1/1.2
    # notification, direct-request-2, console-log and PARTITION_INFO_GET_REGS calls are refused
    # (7.2) rather than passed through; the RXTX_MAP granule is read masked (7.2).
    ffa_hyp_version: int = 0x1_0001
    ffa_refuses_downgrade_after_negotiation: bool = False
    ffa_refuses_1_2_calls: bool = False
    ffa_rxtx_min_sz_masked: bool = False
    # 7.2 takes the endpoint-descriptor offset from the descriptor (v1.1+) and bounds-checks it,
    # sizes the header and EMAD by the negotiated version, bounds-checks the retrieved
    # descriptor's ranges on reclaim and requires page-aligned range addresses; 6.12 uses the
    # fixed v1.1 offset and sizes and WARNs on a bad retrieved offset.
    ffa_strict_descriptors: bool = False
    # `__pkvm_host_share_ffa` / `__pkvm_host_unshare_ffa` refuse (-EINVAL) a pfn range beyond
    # the physical address space (`pfn_range_is_valid`, 7.2); 6.12 has no such check.
    ffa_share_checks_pfn_range: bool = False
    # `__pkvm_prot_finalize` also sets HCR_EL2.FWB for the host stage-2 (7.2); 6.12 never does.
    host_stage2_fwb: bool = False
    # `__get_fault_info` sets HPFAR_EL2.NS to mark the fault IPA it reports valid and the host's
    # `kvm_vcpu_get_fault_ipa` refuses a fault without it (7.2); 6.12 ignores the bit.
    fault_hpfar_ns_valid: bool = False
    # Host <-> hyp transitions check the hyp's side of the page too (7.2: `__pkvm_host_share_hyp`
    # wants hyp NOPAGE, unshare hyp SHARED_BORROWED); 6.12 skips it for host-initiated
    # transitions (`__hyp_ack_skip_pgtable_check` without CONFIG_NVHE_EL2_DEBUG).
    host_transitions_check_hyp_state: bool = False
    # `__pkvm_host_share_hyp` / unshare refuse a page outside the memory regions by
    # `check_range_allowed_memory` (7.2); 6.12 refuses an address past 48 bits with -ERANGE and
    # a page that is not memory with -EPERM (its state reads NOPAGE).
    share_hyp_checks_allowed_memory: bool = False
    # The hyp maps a page the host shares with it only while it is pinned (7.2), so a share or
    # unshare touches no page but the one it names; 6.12 maps it at EL2 when shared (tables
    # come and go with it).
    hyp_maps_shared_only_while_pinned: bool = False

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled by name: the profile of that kernel (compiled, a frozen dataclass's fields
        cannot be set back one by one)."""
        return (profile_for, (self.name,))

    @property
    def nr_hcalls(self) -> int:
        return len(self.hcalls)

    def number(self, name: str) -> int | None:
        try:
            return self.hcalls.index(name)
        except ValueError:
            return None

    def func_id(self, name: str) -> int | None:
        n = self.number(name)
        return None if n is None else KVM_HOST_SMCCC_ID_BASE + n

    def decode(self, x0: int) -> int | None:
        """x0 -> index of the host hypercall, or None (unknown: SMCCC NOT_SUPPORTED)."""
        n = ((x0 & ~ARM_SMCCC_CALL_HINTS) - KVM_HOST_SMCCC_ID_BASE) & 0xFFFF_FFFF_FFFF_FFFF
        if n >= len(self.hcalls):
            return None
        return n

    def gate(self, n: int, finalised: bool) -> bool:
        """Is call `n` reachable in this phase (handle_host_hcall's bounds)?"""
        if finalised:
            return self.min_pkvm <= n < len(self.hcalls)
        return 0 <= n < self.pkvm_only

    def handle(self, reg: int) -> int:
        return reg & ((1 << self.handle_bits) - 1)


PROFILE_6_12: Final = Profile(
    name="6.12",
    kernel="6.12.117",
    hcalls=HCALLS_6_12,
    min_pkvm=HCALLS_6_12.index("__pkvm_prot_finalize"),
    pkvm_only=len(HCALLS_6_12),
    handle_bits=32,
    hyp_page_size=4,
    hyp_no_order=0xFFFF,
    page_state_in_vmemmap=False,
    pgtable_walk_eagain_stops=False,
    protected_vms=False,
    hyp_owned_guest_stage2=False,
    vm_lifecycle="one-phase",
    reserve_vm=False,
    two_phase_teardown=False,
    explicit_vcpu_load=False,
    vcpu_init_in_order=True,
    host_idmap_exists_errno=-11,  # -EAGAIN
    teardown_refusal_errno_busy=-16,
    host_abort_fatal=True,
    host_idmap_skip_level0=False,
    psci_version=0x10001,
    teardown_clears_whole_hyp_page=True,
    attach_foreign_keeps_order=True,
    sizeof_kvm=3952,
    sizeof_kvm_vcpu=7056,
    load_stage2_reads_mmu_arch=True,
)

PROFILE_7_2: Final = Profile(
    name="latest",
    kernel="7.2.13",
    hcalls=HCALLS_7_2,
    min_pkvm=HCALLS_7_2.index("__pkvm_prot_finalize"),
    pkvm_only=HCALLS_7_2.index("__pkvm_host_share_hyp"),
    handle_bits=16,
    hyp_page_size=8,
    hyp_no_order=0xFF,
    page_state_in_vmemmap=True,
    pgtable_walk_eagain_stops=True,
    protected_vms=True,
    hyp_owned_guest_stage2=True,
    vm_lifecycle="two-phase",
    reserve_vm=True,
    two_phase_teardown=True,
    explicit_vcpu_load=True,
    vcpu_init_in_order=False,
    host_idmap_exists_errno=-17,  # -EEXIST
    teardown_refusal_errno_busy=-22,
    host_abort_fatal=False,
    host_idmap_skip_level0=True,
    psci_version=0x10003,
    teardown_clears_whole_hyp_page=False,
    attach_foreign_keeps_order=False,
    sizeof_kvm=4120,
    sizeof_kvm_vcpu=9024,
    hyp_vcpu_init_traps=True,
    smc_refuses_imm_and_upper=True,
    psci_relay_system_off2=True,
    ffa_retval_regs=18,
    ffa_hyp_version=0x1_0002,
    ffa_refuses_downgrade_after_negotiation=True,
    ffa_refuses_1_2_calls=True,
    ffa_rxtx_min_sz_masked=True,
    ffa_strict_descriptors=True,
    ffa_share_checks_pfn_range=True,
    host_stage2_fwb=True,
    fault_hpfar_ns_valid=True,
    host_transitions_check_hyp_state=True,
    share_hyp_checks_allowed_memory=True,
    hyp_maps_shared_only_while_pinned=True,
)

# Every name a user may give for a kernel's ABI -> the profile's own name. The one alias table:
# the board, scenarios, the CLI and the conformance harness all resolve names through it.
ABI_ALIASES: dict[str, str] = {"6.12": "6.12", "7.2": "latest", "latest": "latest"}
_BY_NAME = {p.name: p for p in (PROFILE_6_12, PROFILE_7_2)}
PROFILES: dict[str, Profile] = {alias: _BY_NAME[name] for alias, name in ABI_ALIASES.items()}


def abi_name(name: str) -> str:
    """The canonical ABI name ("6.12" or "latest") of a kernel or ABI name ("7.2" = "latest")."""
    try:
        return ABI_ALIASES[name]
    except KeyError:
        raise ValueError(f"unknown abi {name!r}: use '6.12' or 'latest' (7.2)") from None



# Each profile's hypercall names -> function IDs, built once per profile (by name) rather than
# by every HVC door or ghost (a snapshot load, each reboot of a fuzzing campaign); never
# written after.
_FUNC_IDS: Final[dict[str, dict[str, int | None]]] = {}


def func_ids(profile: Profile) -> dict[str, int | None]:
    """`profile.func_id` of each of its hypercalls (do not modify the dict)."""
    ids = _FUNC_IDS.get(profile.name)
    if ids is None:
        ids = _FUNC_IDS[profile.name] = {name: profile.func_id(name) for name in profile.hcalls}
    return ids

def profile_for(name: str) -> Profile:
    """The profile of a kernel or ABI name: "6.12", "7.2" or its alias "latest"."""
    return _BY_NAME[abi_name(name)]


get_profile = profile_for
