"""Stateful property tests: random host<->hyp traffic and a hostile host juggling many VMs.

Each machine is checked against a tiny abstract model after every step (memory.md §6,
vm-state.md §3-§5). Budgets are small so that the file runs in well under a minute.
"""

import re
import warnings

from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import pkvm
from conftest import EBUSY, EINVAL, EPERM, PAGE, hyp_region
from pkvm.abi.host_structs import KVM
from pkvm.hyp import mem_protect as mp
from pkvm.hyp.mm import hyp_va

U64 = (1 << 64) - 1
HCR = (1 << 31) | (1 << 27)
SETTINGS = dict(
    max_examples=8,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # no shrinking: keep the run short
)

def donate_hyp(m, pfn, n):
    return getattr(mp, "__pkvm_host_donate_hyp")(m._hyp, pfn, n)


def hyp_donate_host(m, pfn, n):
    return getattr(mp, "__pkvm_hyp_donate_host")(m._hyp, pfn, n)


OWNED, SHARED, DONATED, FOREIGN = "owned", "shared", "donated", "foreign"
EXPECT_STATES = {
    OWNED: ("OWNED", "NOPAGE"),
    SHARED: ("SHARED_OWNED", "SHARED_BORROWED"),
    DONATED: ("NOPAGE", "OWNED"),
}


# -- 1: host <-> hyp transitions on a handful of pages ----------------------------------------
# What the host driver WARNs when a hostile host broke its VM first (pkvm.host.kvm).
DRIVER_WARNS = re.compile(r"the hyp VM leaks|never came back|releasing gfn .* failed|"
                          r"__pkvm_start_teardown_vm\(|__pkvm_teardown_vm\(")

class HostHyp(RuleBasedStateMachine):
    abi = "latest"
    NPAGES = 6

    @initialize()
    def boot(self):
        self.m = pkvm.Machine(memory="64M", cpus=2, abi=self.abi)
        base = self.m.host.alloc_pages(self.NPAGES)
        self.pfns = [(base >> 12) + k for k in range(self.NPAGES)]
        self.carve = hyp_region(self.m).start >> 12
        self.state = {p: OWNED for p in self.pfns}
        self.state[self.carve] = FOREIGN
        self.state[0x9000] = FOREIGN  # MMIO
        self.pins = {p: 0 for p in self.state}
        self.data = {p: bytes(8) for p in self.pfns}
        self.initial = self.m.inspect.page_counts()

    def all_pfns(self):
        return sorted(self.state)

    # -- hypercalls -------------------------------------------------------------------
    @rule(i=st.integers(0, 7), cpu=st.integers(0, 1))
    def share(self, i, cpu):
        pfn = self.all_pfns()[i % len(self.state)]
        r = self.m.hvc(cpu, "__pkvm_host_share_hyp", pfn)
        if self.state[pfn] == OWNED:
            assert (r.x0, r.x1) == (0, 0)
            self.state[pfn] = SHARED
        else:
            assert (r.x0, r.x1) == (0, -EPERM)

    @rule(i=st.integers(0, 7), cpu=st.integers(0, 1))
    def unshare(self, i, cpu):
        pfn = self.all_pfns()[i % len(self.state)]
        r = self.m.hvc(cpu, "__pkvm_host_unshare_hyp", pfn)
        if self.state[pfn] == SHARED and self.pins[pfn]:
            assert r.x1 == -EBUSY
        elif self.state[pfn] == SHARED:
            assert r.x1 == 0
            self.state[pfn] = OWNED
        else:
            assert r.x1 == -EPERM

    @rule(pfn=st.sampled_from([U64, 1 << 36, 0x80000000, 0xFFF0000000000000 | 0x3FF00]))
    def odd_pfn(self, pfn):
        before = self.m.inspect.page_counts()
        r = self.m.hvc(0, "__pkvm_host_share_hyp", pfn)
        assert r.x0 == 0 and r.x1 < 0
        assert self.m.inspect.page_counts() == before

    # -- EL2-internal ---------------------------------------------------------------------
    @rule(i=st.integers(0, 7))
    def pin(self, i):
        pfn = self.all_pfns()[i % len(self.state)]
        ret = mp.hyp_pin_shared_mem(self.m._hyp, hyp_va(pfn << 12), hyp_va(pfn << 12) + PAGE)
        if self.state[pfn] == SHARED:
            assert ret == 0
            self.pins[pfn] += 1
        else:
            assert ret == -EPERM

    @precondition(lambda self: any(self.pins.values()))
    @rule(i=st.integers(0, 7))
    def unpin(self, i):
        pinned = [p for p, n in self.pins.items() if n]
        pfn = pinned[i % len(pinned)]
        mp.hyp_unpin_shared_mem(self.m._hyp, hyp_va(pfn << 12), hyp_va(pfn << 12) + PAGE)
        self.pins[pfn] -= 1

    @rule(i=st.integers(0, 7), n=st.integers(1, 2))
    def donate(self, i, n):
        pfn = self.all_pfns()[i % len(self.state)]
        if pfn + 1 not in self.state:
            n = 1  # keep the range on pages the model tracks
        rng = [pfn + k for k in range(n)]
        before = self.m.inspect.page_counts()
        ret = donate_hyp(self.m, pfn, n)
        if all(self.state[p] == OWNED for p in rng):
            assert ret == 0
            for p in rng:
                self.state[p] = DONATED
        else:
            assert ret == -EPERM
            assert self.m.inspect.page_counts() == before

    @rule(i=st.integers(0, 7))
    def reclaim(self, i):
        pfn = self.all_pfns()[i % len(self.state)]
        if pfn == self.carve:
            return  # hyp memory in use (tables, vmemmap): never handed out, even internally
        ret = hyp_donate_host(self.m, pfn, 1)
        if self.state[pfn] == DONATED:
            assert ret == 0
            self.state[pfn] = OWNED
        else:
            assert ret == -EPERM

    # -- host accesses -----------------------------------------------------------------
    @rule(i=st.integers(0, 7), payload=st.binary(min_size=1, max_size=8), write=st.booleans())
    def access(self, i, payload, write):
        pfn = self.all_pfns()[i % len(self.state)]
        st_ = self.state[pfn]
        if pfn == 0x9000:
            return
        may = st_ in (OWNED, SHARED)
        if not may and self.m.abi == "6.12":
            return  # fatal in 6.12: covered by test_memory
        before = self.m.inspect.page_counts()
        try:
            if write:
                self.m.host.write(pfn << 12, payload)
                self.data[pfn] = payload + (self.data[pfn] or bytes(8))[len(payload):]
            else:
                got = self.m.host.read(pfn << 12, 8)
                if self.data.get(pfn) is not None:
                    assert got == self.data[pfn]
            assert may
        except pkvm.HostDataAbort as e:
            assert not may and not e.fatal and e.addr >> 12 == pfn
            assert self.m.inspect.page_counts() == before

    # -- checks ---------------------------------------------------------------------------
    @invariant()
    def agrees(self):
        if not hasattr(self, "m"):
            return
        m = self.m
        assert not m.dead
        for pfn, s in self.state.items():
            p = m.inspect.page(pfn)
            if pfn == 0x9000:
                assert p.owner is None
                continue
            if s != FOREIGN:
                assert (p.host, p.hyp) == EXPECT_STATES[s], (hex(pfn), s, p)
            assert p.refcount == self.pins[pfn] or s in (FOREIGN, DONATED)
            # no page reachable by two exclusive owners
            assert not (p.host == "OWNED" and p.hyp in ("OWNED", "SHARED_OWNED"))
            assert not (p.hyp == "OWNED" and p.host in ("OWNED", "SHARED_OWNED"))
            # the hyp stage-1 maps what the hyp may touch
            mapped = m._hyp.pkvm_pgtable.get_leaf(hyp_va(pfn << 12))[1] & 1
            if s == DONATED:
                assert mapped
            elif s == SHARED:
                assert mapped == (1 if (self.pins[pfn] or m.abi == "6.12") else 0)
            elif s == OWNED:
                assert not mapped
            # the host stage-2 marks donated pages
            ann = m.inspect.host_annotation(pfn << 12)
            if s == DONATED:
                assert ann is not None and ann[0] == 1
            elif s in (OWNED, SHARED):
                assert ann is None
        self.checks = getattr(self, "checks", 0) + 1
        if m.abi == "6.12" and self.checks % 6:
            return  # 6.12 counts by walking the host stage-2: sample them
        counts = m.inspect.page_counts()
        nd = sum(1 for s in self.state.values() if s == DONATED)
        ns = sum(1 for s in self.state.values() if s == SHARED)
        carve_back = 0
        assert counts.get(("host", "SHARED_OWNED"), 0) == ns
        assert counts.get(("hyp", "SHARED_BORROWED"), 0) == ns
        assert counts[("hyp", "OWNED")] == self.initial[("hyp", "OWNED")] + nd - carve_back
        assert counts[("host", "OWNED")] == self.initial[("host", "OWNED")] - nd - ns + carve_back

    def teardown(self):
        if not hasattr(self, "m"):
            return
        m = self.m
        for pfn, n in self.pins.items():
            for _ in range(n):
                mp.hyp_unpin_shared_mem(m._hyp, hyp_va(pfn << 12), hyp_va(pfn << 12) + PAGE)
        for pfn, s in self.state.items():
            if s == SHARED:
                assert m.hvc(0, "__pkvm_host_unshare_hyp", pfn).x1 == 0
            elif s == DONATED:
                assert hyp_donate_host(m, pfn, 1) == 0
        assert m.inspect.page_counts() == self.initial


class HostHyp612(HostHyp):
    abi = "6.12"


# -- 2: many VMs, vCPUs and CPUs with a hostile host -------------------------------------------
SCRIBBLE_FIELDS = ["created_vcpus", "arch.pkvm.handle", "arch.pkvm.is_protected", "arch.flags",
                   "arch.vcpu_features", "arch.id_regs"]


class HostileVms(RuleBasedStateMachine):
    abi = "latest"
    CPUS = 3

    @initialize()
    def boot(self):
        self.m = pkvm.Machine(memory="64M", cpus=self.CPUS, abi=self.abi)
        self.v72 = self.m.abi == "latest"
        self.vms = {}  # handle -> record
        self.loaded = {}  # cpu -> (handle, idx)
        self.used_handles = set()
        self.initial = self.m.inspect.page_counts()
        # The hostile host makes the driver's own teardown fail on purpose: its WARNs are
        # captured here and checked in teardown() (only the driver's known WARNs may appear).
        self._warnings = warnings.catch_warnings(record=True)
        self.warned = self._warnings.__enter__()
        warnings.simplefilter("always")
        # start with VMs in every state so that every rule has something to chew on
        self.create(2, False)
        self.create(1, True)
        self.create(3, False)
        self.map(0, 0, 0)
        self.map(1, 1, 1)
        self.hyp_vcpu(0, 1)

    # -- helpers -----------------------------------------------------------------------
    def pick_handle(self, sel, raw):
        live = sorted(self.vms)
        if sel == 0 and live:
            return live[raw % len(live)]
        if sel == 1 and live:
            return live[raw % len(live)] + (0x10000 if self.v72 else 0)  # truncation (7.2)
        if sel == 2:
            stale = sorted(self.used_handles - set(self.vms))
            if stale:
                return stale[raw % len(stale)]
        return raw

    def lookup(self, handle):
        h = handle & (0xFFFF if self.v72 else 0xFFFF_FFFF)
        return self.vms.get(h), h

    def restore(self, rec):
        for off, data in rec["saved"].items():
            self.m.host.write(rec["vm"].kvm_pa + off, data)
        rec["saved"].clear()

    def vm_loaded(self, handle):
        return [c for c, (hd, _) in self.loaded.items() if hd == handle]

    # -- driver --------------------------------------------------------------------------
    @precondition(lambda self: len(self.vms) < 5)
    @rule(nvcpus=st.integers(1, 3), protected=st.booleans())
    def create(self, nvcpus, protected):
        protected = protected and self.v72
        vm = self.m.host.create_vm(vcpus=nvcpus, protected=protected, memory="256K")
        assert vm.handle not in self.vms
        assert vm.handle == min(set(range(0x1000, 0x1100)) - set(self.vms))  # lowest free
        self.vms[vm.handle] = {
            "vm": vm, "state": "reserved" if self.v72 else "live", "n": nvcpus,
            "hyp_vcpus": set() if self.v72 else set(range(nvcpus)),
            "protected": protected, "saved": {},
        }
        self.used_handles.add(vm.handle)

    @precondition(lambda self: self.vms)
    @rule(i=st.integers(0, 10), gfn=st.integers(0, 7), cpu=st.integers(0, 2))
    def map(self, i, gfn, cpu):
        handle = sorted(self.vms)[i % len(self.vms)]
        rec = self.vms[handle]
        if self.v72 and (rec["state"] == "dying" or cpu in self.loaded
                         or any(x == (handle, 0) for x in self.loaded.values())):
            return
        self.restore(rec)
        rec["vm"].map(0x40000 + gfn, cpu=cpu)
        event("mapped")
        if self.v72:
            rec["state"] = "live"
            rec["hyp_vcpus"].add(0)

    @precondition(lambda self: self.vms)
    @rule(i=st.integers(0, 10), k=st.integers(0, 2))
    def hyp_vcpu(self, i, k):
        """What the first KVM_RUN of vCPU k does: the hyp VM (if needed), then the hyp vCPU."""
        if not self.v72:
            return
        handle = sorted(self.vms)[i % len(self.vms)]
        rec = self.vms[handle]
        k %= rec["n"]
        self.restore(rec)
        rec["vm"].ensure_hyp_vcpu(rec["vm"].vcpus[k])
        if rec["state"] == "reserved":
            rec["state"] = "live"
        rec["hyp_vcpus"].add(k)
        event("hyp vcpu made")

    @precondition(lambda self: self.vms)
    @rule(i=st.integers(0, 10))
    def destroy(self, i):
        handle = sorted(self.vms)[i % len(self.vms)]
        if self.vm_loaded(handle):
            return
        rec = self.vms.pop(handle)
        self.restore(rec)
        rec["vm"].destroy()

    # -- the hostile host ---------------------------------------------------------------------
    @rule(cpu=st.integers(0, 2), sel=st.integers(0, 3), raw=st.integers(0, U64),
          idx=st.sampled_from([0, 0, 1, 1, 2, 3, 1 << 32, (1 << 32) | 1, U64]))
    def load(self, cpu, sel, raw, idx):
        handle = self.pick_handle(sel, raw)
        r = self.m.hvc(cpu, "__pkvm_vcpu_load", handle, idx, HCR)
        if not self.v72:
            assert r.x0 == -1
            return
        assert r.x1 == (handle if handle < 1 << 63 else handle - (1 << 64))
        rec, h = self.lookup(handle)
        i32 = idx & 0xFFFF_FFFF
        ok = (rec is not None and rec["state"] == "live" and cpu not in self.loaded
              and i32 in rec["hyp_vcpus"] and (h, i32) not in self.loaded.values())
        if ok:
            self.loaded[cpu] = (h, i32)
            event("vcpu loaded")

    @rule(cpu=st.integers(0, 2))
    def put(self, cpu):
        r = self.m.hvc(cpu, "__pkvm_vcpu_put")
        if self.v72:
            self.loaded.pop(cpu, None)
        else:
            assert r.x0 == -1

    @rule(sel=st.integers(0, 3), raw=st.integers(0, U64), cpu=st.integers(0, 2))
    def start_teardown(self, sel, raw, cpu):
        handle = self.pick_handle(sel, raw)
        rec, h = self.lookup(handle)
        if not self.v72:
            if rec is not None:
                return  # 6.12 teardown is one call: the driver keeps its VMs
            assert self.m.hvc(cpu, "__pkvm_teardown_vm", handle).x1 == -2  # -ENOENT
            return
        r = self.m.hvc(cpu, "__pkvm_start_teardown_vm", handle)
        if rec is not None and rec["state"] == "live" and not self.vm_loaded(h):
            assert r.x1 == 0
            rec["state"] = "dying"
            event("hostile start_teardown")
        else:
            assert r.x1 == -EINVAL

    @rule(sel=st.integers(0, 3), raw=st.integers(0, U64))
    def finalize_refused(self, sel, raw):
        if not self.v72:
            return
        handle = self.pick_handle(sel, raw)
        rec, h = self.lookup(handle)
        if rec is not None and rec["state"] == "dying" and not self.vm_loaded(h):
            return  # would succeed: the driver does this itself
        assert self.m.hvc(0, "__pkvm_finalize_teardown_vm", handle).x1 == -EINVAL

    @rule(sel=st.integers(0, 3), raw=st.integers(0, U64))
    def unreserve(self, sel, raw):
        if not self.v72:
            return
        handle = self.pick_handle(sel, raw)
        rec, h = self.lookup(handle)
        if rec is not None and rec["state"] == "reserved":
            return  # frees the slot under the driver's feet: not modelled here
        r = self.m.hvc(0, "__pkvm_unreserve_vm", handle)
        assert r.x0 == 0

    @precondition(lambda self: self.vms)
    @rule(i=st.integers(0, 10), field=st.sampled_from(SCRIBBLE_FIELDS),
          junk=st.binary(min_size=1, max_size=8))
    def scribble(self, i, field, junk):
        rec = self.vms[sorted(self.vms)[i % len(self.vms)]]
        off = KVM.offset(field)
        kvm_pa = rec["vm"].kvm_pa
        if not rec["saved"]:
            rec["saved"][0] = self.m.host.read(kvm_pa, self.m.profile.sizeof_kvm)  # the whole struct, once
        self.m.host.write(kvm_pa + off, junk)

    @precondition(lambda self: self.vms)
    @rule(i=st.integers(0, 10), page=st.integers(0, 1))
    def unshare_pinned_kvm(self, i, page):
        rec = self.vms[sorted(self.vms)[i % len(self.vms)]]
        if rec["state"] == "reserved":
            return
        pfn = (rec["vm"].kvm_pa >> 12) + page
        before = self.m.inspect.page(pfn)
        assert self.m.hvc(0, "__pkvm_host_unshare_hyp", pfn).x1 == -EBUSY
        assert self.m.inspect.page(pfn) == before

    @rule(cpu=st.integers(0, 2), call=st.sampled_from([
        "__pkvm_host_unshare_guest", "__pkvm_host_wrprotect_guest",
        "__pkvm_host_test_clear_young_guest", "__pkvm_host_relax_perms_guest",
        "__pkvm_host_mkyoung_guest", "__pkvm_vcpu_in_poison_fault", "__pkvm_tlb_flush_vmid",
        "__pkvm_reclaim_dying_guest_page", "__pkvm_host_share_guest",
        "__pkvm_host_donate_guest", "__pkvm_force_reclaim_guest_page", "__kvm_vcpu_run",
        "__pkvm_host_share_hyp", "__pkvm_init_vcpu"]),
        sel=st.integers(0, 3), raw=st.integers(0, U64), a2=st.integers(0, 12),
        a3=st.sampled_from([0, 1, 2, 512, U64]), a4=st.integers(0, 0x3F))
    def garbage(self, cpu, call, sel, raw, a2, a3, a4):
        handle = self.pick_handle(sel, raw)
        gfn = 0x40000 + a2 if a2 < 10 else raw
        if call in ("__pkvm_host_share_guest", "__pkvm_host_donate_guest"):
            # pfns no driver page lives at: the carve-out, MMIO, past RAM, garbage
            args = (sel and [hyp_region(self.m).start >> 12, 0x9000, 1 << 30][sel - 1] or raw,
                    gfn, a3, a4)
        elif call == "__pkvm_force_reclaim_guest_page":
            pages = [pa for rec in self.vms.values() for pa in rec["vm"].memslot.values()]
            args = (pages[raw % len(pages)] if pages and sel < 2 else raw,)
        elif call in ("__pkvm_host_relax_perms_guest", "__pkvm_host_mkyoung_guest"):
            args = (gfn, a4)
        elif call == "__kvm_vcpu_run":
            if not self.v72 or cpu in self.loaded:
                return  # 6.12: a host pointer (panics on garbage); 7.2 loaded: runs the guest
            args = ()
        elif call == "__pkvm_host_share_hyp":
            args = (raw,) if raw >> 36 else (0x9000,)
        elif call == "__pkvm_init_vcpu":
            if not self.v72 and handle in self.vms:
                return  # 6.12: would try vCPU index nr_vcpus with a NULL host vCPU
            args = (handle, 0, 0)  # NULL host vCPU: -ENOENT or refused, never a panic
            rec, _ = self.lookup(handle)
            if rec is not None:
                return  # found VM + NULL vCPU pointer: EL2 would fault (a panic, by design)
        else:
            args = (handle, gfn, a3, a4)
        try:
            r = self.m.hvc(cpu, call, *args)
        except pkvm.HypPanic as e:  # pragma: no cover - reported as a finding
            raise AssertionError(f"{call}{args}: unexpected hyp panic {e}") from None
        if r.x0 == -1:
            assert not self.v72 and call not in self.m.profile.hcalls
        event(f"garbage {call}: {'refused' if r.x0 else 'ok' if r.x1 == 0 else 'errno'}")
        if call == "__kvm_vcpu_run" and cpu not in self.loaded:
            assert r.x1 == -EINVAL

    @precondition(lambda self: self.vms)
    @rule(i=st.integers(0, 10), gfn=st.integers(0, 7), write=st.booleans())
    def host_touch(self, i, gfn, write):
        rec = self.vms[sorted(self.vms)[i % len(self.vms)]]
        pa = rec["vm"].memslot.get(0x40000 + gfn)
        if pa is None:
            return
        p = self.m.inspect.page(pa >> 12)
        allowed = p.host in ("OWNED", "SHARED_OWNED", "SHARED_BORROWED")
        try:
            if write:
                self.m.host.write(pa, b"hostile")
            else:
                self.m.host.read(pa, 8)
            assert allowed, p
        except pkvm.HostDataAbort as e:
            assert not allowed and not e.fatal
            event("host abort on a guest page")
            assert self.m.inspect.page(pa >> 12) == p

    # -- checks ----------------------------------------------------------------------------
    @invariant()
    def table_agrees(self):
        if not hasattr(self, "m"):
            return
        m = self.m
        assert not m.dead
        seen = {v["handle"]: v for v in m.inspect.vms()}
        assert set(seen) == set(self.vms)
        for handle, rec in self.vms.items():
            v = seen[handle]
            assert v["state"] == rec["state"], (hex(handle), v, rec["state"])
            if rec["state"] == "reserved":
                continue
            assert set(v["vcpus"]) == rec["hyp_vcpus"]
            assert v["protected"] == rec["protected"]
            want = {i: None for i in rec["hyp_vcpus"]}
            for cpu, (hd, idx) in self.loaded.items():
                if hd == handle:
                    want[idx] = cpu
            assert v["vcpus"] == want
            # refcount of the hyp VM == loaded vCPUs
            assert v["refcount"] == len(self.vm_loaded(handle))
        if self.v72:
            for cpu in range(self.CPUS):
                got = m._hyp.loaded_hyp_vcpu[cpu]
                want = self.loaded.get(cpu)
                assert (got is None) == (want is None)
                if got is not None:
                    assert (got.vm.handle, got.vcpu_idx) == want

    @invariant()
    def exclusive_pages(self):
        if not hasattr(self, "m"):
            return
        m = self.m
        h = m._hyp
        guests = m.inspect.guest_states()  # handle -> {pa: state}, walked once
        for rec in self.vms.values():
            vm = rec["vm"]
            pas = list(vm.memslot.values()) + [vm.kvm_pa & ~0xFFF, (vm.kvm_pa & ~0xFFF) + PAGE]
            pas += [v.pa for v in vm.vcpus]
            for pa in pas:
                host, hyp = mp.get_host_state(h, pa).name, mp.get_hyp_state(h, pa).name
                gs = [st_[pa].name for st_ in guests.values() if pa in st_]
                owners = [host == "OWNED", hyp == "OWNED", "OWNED" in gs]
                assert sum(owners) <= 1, (hex(pa), host, hyp, gs)
                if "OWNED" in gs:
                    assert (host, hyp) == ("NOPAGE", "NOPAGE"), (hex(pa), host, hyp, gs)
                if self.v72 and host == "SHARED_OWNED" and gs:
                    assert h.vmemmap.host_share_guest_count[h.vmemmap.idx(pa)] == gs.count(
                        "SHARED_BORROWED")

    def teardown(self):
        if not hasattr(self, "m"):
            return
        m = self.m
        for cpu in list(self.loaded):
            m.hvc(cpu, "__pkvm_vcpu_put")
        self.loaded.clear()
        for handle in sorted(self.vms):
            rec = self.vms.pop(handle)
            self.restore(rec)
            rec["vm"].destroy()
        assert m.inspect.vms() == []
        assert m.inspect.page_counts() == self.initial
        self._warnings.__exit__(None, None, None)
        for w in self.warned:  # each one a WARN of the host driver a hostile step provoked
            assert issubclass(w.category, UserWarning), w
            assert DRIVER_WARNS.search(str(w.message)), w.message


class HostileVms612(HostileVms):
    abi = "6.12"


TestHostHyp = HostHyp.TestCase
TestHostHyp.settings = settings(**SETTINGS)
TestHostHyp612 = HostHyp612.TestCase
TestHostHyp612.settings = settings(**SETTINGS)
TestHostileVms = HostileVms.TestCase
TestHostileVms.settings = settings(**{**SETTINGS, "max_examples": 25, "stateful_step_count": 40})
TestHostileVms612 = HostileVms612.TestCase
TestHostileVms612.settings = settings(**{**SETTINGS, "max_examples": 6})


def test_budget_is_small():
    assert SETTINGS["max_examples"] * SETTINGS["stateful_step_count"] <= 400
