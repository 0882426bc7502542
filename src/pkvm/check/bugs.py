"""Seeded bugs: switches in the hyp code (`if h.bug("name")`) that a checker must catch.

`Machine(bugs=("load-no-pin",))` turns one on. Each entry says what the hyp then gets wrong and
which oracle finds it; `tests/test_fuzz.py` shows each being found and the clean model not.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SeededBug:
    name: str
    where: str
    description: str
    caught_by: str


BUGS: dict[str, SeededBug] = {b.name: b for b in [
    SeededBug("load-no-pin", "hyp/pkvm.py: pkvm_load_hyp_vcpu / pkvm_put_hyp_vcpu",
              "vCPU load does not take a reference on the hyp VM (put does not drop it), so "
              "the VM can be torn down under a loaded vCPU",
              "invariant vm-refcount at the load; the ghost at a start_teardown while loaded"),
    SeededBug("donate-nomap", "hyp/mem_protect.py: _host_donate_hyp_locked",
              "a host->hyp donation skips the is-memory check, so a host-chosen MMIO / no-map "
              "pfn (e.g. a forged memcache head) is taken by the hyp",
              "an EL2 data abort on the pfn's hyp_vmemmap entry (a hyp panic a correct hyp "
              "never takes; the fuzzer with stop_on_panic)"),
    SeededBug("teardown-keeps-stage2", "hyp/pkvm.py: _teardown_hyp_memory",
              "teardown does not destroy the guest stage-2: its table pages stay hyp-owned "
              "but belong to no VM (and pages it maps keep being mapped)",
              "invariant hyp-accounting after the teardown"),
    SeededBug("teardown-no-wipe", "hyp/mem_protect_guest.py: __pkvm_host_reclaim_page_guest",
              "a reclaimed protected-guest page goes back to the host without being wiped",
              "not an invariant of this checker (guest data confidentiality; see test_vm_lifecycle)"),
    SeededBug("double-fetch", "hyp/pkvm.py: _init_vcpu_locked",
              "init_vcpu reads the host's vcpu_idx again after range-checking it: a host CPU "
              "racing the call slips an out-of-range index past the check",
              "the fuzzer's race steps (a rewrite at the hyp's host-read point): an exception "
              "escaping the hyp, or the ghost's init_vcpu index check"),
    SeededBug("vcpu-index-range", "hyp/pkvm.py: _init_vcpu_locked",
              "off-by-one range check on the host's vCPU index: idx == created_vcpus passes",
              "an exception escaping the hyp (the slot array) / the ghost's index check"),
    SeededBug("unpin-underflow", "hyp/pkvm.py: __pkvm_init_vm",
              "the created_vcpus < 1 error path unpins the host struct kvm twice: a pin held by a "
              "live VM on the same struct is dropped (and later unpins underflow)",
              "invariant pin-refcount"),
    SeededBug("handle-range", "hyp/pkvm.py: get_vm_by_handle",
              "a handle's index is not checked against the table's 255 slots: a forged handle "
              "reads past the VM table",
              "exception in the hyp (out-of-range table read)"),
    SeededBug("hyp-unmap-no-tlbi", "hyp/mm.py: hyp_stage1_tlbi (kvm_pgtable_hyp_unmap)",
              "the hyp stage-1 unmap clears the entry but skips the `tlbi vale2is`: EL2 keeps "
              "reaching a page it gave back to the host (modelled on intel-staging/pKVM-IA#18 "
              "\"pkvm: x86: Fix missed TLB flushing in pgtable_unmap_leaf\": an unmap of a "
              "present leaf without the flush)",
              "hw_oracles: stale TLB entry used (an EL2 access through the cached translation "
              "a fresh walk of the hyp stage-1 refuses), where Linux would take an EL2 fault"),
    SeededBug("hyp-vm-no-wipe", "hyp/pkvm.py: _teardown_donated",
              "teardown returns the hyp VM and vCPU pages without `memset`: the host reads the "
              "hyp's copy of its VM (handle, pgd, vCPU registers, back-pointers)",
              "hw_oracles: wiped on return (the returned page is not zero past its memcache "
              "link)"),
    SeededBug("poison-after-return", "hyp/mem_protect_guest.py: __pkvm_host_reclaim_page_guest",
              "a reclaimed protected-guest page is wiped after the host stage-2 gives it back, "
              "not before: the host can read the guest's data in between, and the wipe is an "
              "EL2 store to a host page",
              "hw_oracles: EL2 store outside the hyp's pages (a fixmap store to a host-owned "
              "page)"),
]}


def describe(name: str) -> str:
    b = BUGS[name]
    return f"{b.name}: {b.description} [{b.where}] -- caught by {b.caught_by}"
