"""Seeded bugs: switches in the hyp code (`if h.bug("name")`) that a checker must catch.

`Machine(bugs=("load-no-pin",))` turns one on. Each entry says what the hyp then gets wrong, the
kernel rule it breaks, the upstream fix or rule it is modelled on, and which oracle finds it;
`tests/test_fuzz.py` shows each found by `pkvm fuzz` (or `pkvm explore`) alone from a fixed seed,
with no test written for it, and the clean model not.

`upstream` names the fix: a Linux commit subject, or a line of the KVM/arm64 pull request that
carried it. Where no single upstream fix is known, it names the kernel function whose check the
bug removes ("rule: ...").
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SeededBug:
    name: str
    where: str
    description: str
    caught_by: str
    upstream: str = ""


BUGS: dict[str, SeededBug] = {b.name: b for b in [
    SeededBug("load-no-pin", "hyp/pkvm_*_phase.py: pkvm_load_hyp_vcpu / pkvm_put_hyp_vcpu",
              "vCPU load does not take a reference on the hyp VM (put does not drop it), so "
              "the VM can be torn down under a loaded vCPU",
              "invariant vm-refcount at the load",
              "KVM: arm64: Refactor the guest teardown path (the dying state: no teardown while "
              "a vCPU is loaded)"),
    SeededBug("donate-nomap", "hyp/mem_protect.py: host_donate_hyp, "
              "hyp/mem_protect_6_12.py: check_donation",
              "a host->hyp donation skips the is-memory check, so a host-chosen MMIO / no-map "
              "pfn (e.g. a forged memcache head) is taken by the hyp",
              "an EL2 data abort on the pfn's hyp_vmemmap entry (a hyp panic a correct hyp "
              "never takes; the fuzzer with stop_on_panic)",
              "KVM: arm64: Prevent unconditional donation of unmapped regions from the host "
              "(KVM/arm64 fixes for 6.4, take #2: \"Check that a given PA donated to the guest "
              "is actually memory\")"),
    SeededBug("teardown-keeps-stage2", "hyp/pkvm.py: _teardown_hyp_memory",
              "teardown does not destroy the guest stage-2: its table pages stay hyp-owned "
              "but belong to no VM (and pages it maps keep being mapped)",
              "invariant hyp-accounting after the teardown",
              "rule: nvhe/pkvm.c teardown frees the guest stage-2 (kvm_pgtable_stage2_destroy)"),
    SeededBug("teardown-no-wipe", "hyp/mem_protect_guest.py: __pkvm_host_reclaim_page_guest",
              "a reclaimed protected-guest page goes back to the host without being wiped",
              "the ghost's confidentiality check (the page must read as zeros)",
              "rule: nvhe/mem_protect.c __pkvm_host_reclaim_page_guest poisons the page"),
    SeededBug("double-fetch", "hyp/pkvm.py: _init_vcpu_locked",
              "init_vcpu reads the host's vcpu_idx again after range-checking it: a host CPU "
              "racing the call slips an out-of-range index past the check",
              "a racing host CPU at an EL2 read of host-shared memory: an exception escaping "
              "the hyp, or the ghost's init_vcpu index check",
              "rule: nvhe/pkvm.c init_pkvm_hyp_vcpu reads each host field once"),
    SeededBug("vcpu-index-range", "hyp/pkvm_two_phase.py: init_vcpu_slot",
              "off-by-one range check on the host's vCPU index: idx == created_vcpus passes",
              "an exception escaping the hyp (the slot array) / the ghost's index check",
              "rule: nvhe/pkvm.c __pkvm_init_vcpu (idx >= created_vcpus -> -EINVAL)"),
    SeededBug("unpin-underflow", "hyp/pkvm.py: __pkvm_init_vm",
              "the created_vcpus < 1 error path unpins the host struct kvm twice: a pin held by a "
              "live VM on the same struct is dropped (and later unpins underflow)",
              "invariant pin-refcount",
              "rule: nvhe/pkvm.c __pkvm_init_vm error path (one unpin per pin)"),
    SeededBug("handle-range", "hyp/pkvm.py: get_vm_by_handle",
              "a handle's index is not checked against the table's 255 slots: a forged handle "
              "reads past the VM table",
              "exception in the hyp (out-of-range table read)",
              "rule: nvhe/pkvm.c get_vm_by_handle (idx >= KVM_MAX_PVMS -> NULL)"),
    # -- 7.2 guest memory, memcaches, teardown ----------------------------------------------------
    SeededBug("share-guest-warn", "hyp/mem_protect_guest.py: __pkvm_host_share_guest",
              "a host page in the wrong state is refused with a WARN_ON splat as well as -EPERM",
              "oracle no-warn",
              "KVM: arm64: Don't WARN from __pkvm_host_share_guest()"),
    SeededBug("memcache-capacity", "hyp/mem_protect_guest.py: guest_check_pgtable_memcache",
              "share/donate to a guest starts without checking that the vCPU memcache can pay "
              "for the stage-2 table pages; the map fails half-way",
              "oracle no-warn (the half-way map WARNs, fatal at EL2), else the ghost (-ENOMEM)",
              "KVM/arm64 fixes for 7.1, take #2: \"Check that the memcache has enough capacity "
              "before engaging on the share/donate path\""),
    SeededBug("refill-no-writeback", "hyp/pkvm.py: pkvm_refill_memcache",
              "when a donation from the host's memcache fails half-way, the hyp does not write "
              "the host's memcache head/count back: the host still lists pages the hyp took",
              "the ghost's memcache bookkeeping check",
              "KVM/arm64 updates for 7.2: \"pKVM fixes, mostly addressing recurring issues "
              "around hypervisor tracking of donated pages in obscure cases where the donation "
              "could fail\""),
    SeededBug("load-dying", "hyp/pkvm_two_phase.py: pkvm_load_hyp_vcpu",
              "a vCPU of a dying VM can be loaded",
              "the ghost's VM table (load of a dying VM)",
              "KVM: arm64: Refactor the guest teardown path (a dying VM's vCPUs cannot be "
              "loaded)"),
    SeededBug("reclaim-live", "hyp/pkvm_two_phase.py: __pkvm_reclaim_dying_guest_page",
              "pages can be reclaimed from a VM that is not dying: a live guest loses memory",
              "the ghost (reclaim_dying result)",
              "KVM: arm64: Refactor the guest teardown path (reclaim only once dying)"),
    SeededBug("range-args", "hyp/mem_protect_guest.py: __pkvm_host_share_guest",
              "share_guest does not check that pfn + nr_pages stays inside the PA space",
              "the ghost (-EINVAL expected) / an exception escaping the hyp",
              "KVM: arm64: Check range args for pKVM mem transitions"),
    SeededBug("unshare-pinned", "hyp/mem_protect.py: host_unshare_hyp, "
              "hyp/mem_protect_6_12.py: hyp_ack_unshare",
              "a host page the hyp has pinned (a live VM's struct kvm / kvm_vcpu) can be "
              "unshared",
              "the ghost (-EBUSY expected)",
              "rule: nvhe/mem_protect.c __pkvm_host_unshare_hyp (hyp_page_count -> -EBUSY)"),
    SeededBug("teardown-keeps-pin", "hyp/pkvm.py: _teardown_hyp_memory",
              "teardown does not unpin the host's struct kvm: the page stays pinned by no VM, "
              "and the host can never unshare it",
              "invariant pin-refcount (full check: pins = users of live VMs)",
              "rule: nvhe/pkvm.c teardown unpins the host struct kvm (hyp_unpin_shared_mem)"),
    SeededBug("donate-guest-keeps-host", "hyp/mem_protect_guest.py: __pkvm_host_donate_guest",
              "a page donated to a protected guest keeps its host stage-2 mapping and state",
              "the ghost (post-state of the page) / invariant host-s2-agrees",
              "rule: nvhe/mem_protect.c __pkvm_host_donate_guest (host owner set to the guest)"),
    SeededBug("unshare-guest-count", "hyp/mem_protect_guest.py: __pkvm_host_unshare_guest",
              "unsharing a page from one guest gives it back to the host although other guests "
              "still share it",
              "the ghost (share count and host state) / invariant guest-consistent",
              "rule: nvhe/mem_protect.c __pkvm_host_unshare_guest (host_share_guest_count)"),
    SeededBug("young-not-cleared", "hyp/mem_protect_guest.py: __pkvm_host_test_clear_young_guest",
              "test_clear_young with mkold reports the access flag but does not clear it",
              "the ghost (the leaf's access flag after the call)",
              "rule: hyp/pgtable.c kvm_pgtable_stage2_test_clear_young"),
    SeededBug("force-reclaim-no-wipe",
              "hyp/mem_protect_guest.py: __pkvm_host_force_reclaim_page_guest",
              "a forcibly reclaimed guest page goes back to the host without being wiped",
              "the ghost's confidentiality check",
              "rule: nvhe/mem_protect.c __pkvm_host_force_reclaim_page_guest (poisons the "
              "page)"),
    SeededBug("hyp-unmap-no-tlbi", "hyp/mm.py: hyp_stage1_tlbi (kvm_pgtable_hyp_unmap)",
              "the hyp stage-1 unmap clears the entry but skips the `tlbi vale2is`: EL2 keeps "
              "reaching a page it gave back to the host (modelled on intel-staging/pKVM-IA#18 "
              "\"pkvm: x86: Fix missed TLB flushing in pgtable_unmap_leaf\": an unmap of a "
              "present leaf without the flush)",
              "hw_oracles: stale TLB entry used (an EL2 access through the cached translation "
              "a fresh walk of the hyp stage-1 refuses), where Linux would take an EL2 fault",
              "rule: hyp/pgtable.c hyp_unmap_walker (tlbi vale2is after clearing a leaf)"),
    SeededBug("hyp-vm-no-wipe", "hyp/pkvm.py: _teardown_donated",
              "teardown returns the hyp VM and vCPU pages without `memset`: the host reads the "
              "hyp's copy of its VM (handle, pgd, vCPU registers, back-pointers)",
              "hw_oracles: wiped on return (the returned page is not zero past its memcache "
              "link)",
              "rule: nvhe/pkvm.c teardown_donated_memory (memset before the pages go back)"),
    SeededBug("poison-after-return", "hyp/mem_protect_guest.py: __pkvm_host_reclaim_page_guest",
              "a reclaimed protected-guest page is wiped after the host stage-2 gives it back, "
              "not before: the host can read the guest's data in between, and the wipe is an "
              "EL2 store to a host page",
              "hw_oracles: EL2 store outside the hyp's pages (a fixmap store to a host-owned "
              "page)",
              "rule: nvhe/mem_protect.c __pkvm_host_reclaim_page_guest (hyp_poison_page "
              "before the host owns the page again)"),
    # -- the FF-A proxy (found by `pkvm fuzz --smc`) -------------------------------------------
    SeededBug("ffa-unaligned-range", "hyp/ffa_mem.py: _share_ranges (__ffa_host_share_ranges)",
              "7.2's proxy checks only a constituent's size for page alignment, not its "
              "address (6.12's check): a descriptor naming an unaligned address shares the page "
              "that contains it with the secure world instead of being DENIED",
              "the ghost's FF-A prediction (FFA_ERROR DENIED expected, the pages unchanged)",
              "rule: nvhe/ffa.c __ffa_host_share_ranges (7.2 tests PAGE_ALIGNED(sz | "
              "range->address); 6.12 tests the size alone)"),
]}


def describe(name: str) -> str:
    b = BUGS[name]
    return (f"{b.name}: {b.description} [{b.where}] -- caught by {b.caught_by}; "
            f"upstream: {b.upstream}")
