"""The hyp structs' fields agree with the generic reads and stores of their bytes (issue 17).

`PkvmHypVcpu` and `PkvmHypVm` are native classes whose fields are properties (compiled, an
access like `vcpu.hcr_el2` is a direct call): each must read what the struct's bytes hold in its
page, and a store must be the generic EL2 store (`pkvm.hyp.mm.el2_write`) through the hyp
stage-1 with its ownership check (a fault where `el2_write` faults, the same bad-store record
where the page is not the hyp's), elided only when the bytes are already there.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pkvm
from pkvm import guests, snapshot
from pkvm.hyp.mm import el2_write, hyp_pa, kern_hyp_va
from pkvm.hyp.panic import HypBug
from pkvm.hyp.pkvm_structs import CTXT_LEN, CTXT_OFF, HYP_VCPU, HYP_VM, loaded_slot

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
HCR_OFF = HYP_VCPU["vcpu.arch.hcr_el2"][0]  # the field the store test writes
u64 = st.integers(0, 2**64 - 1)
# property -> its layout entry
VCPU_FIELDS = {"host_vcpu": "host_vcpu", "vcpu_idx": "vcpu.vcpu_idx", "vcpu_id": "vcpu.vcpu_id",
               "hcr_el2": "vcpu.arch.hcr_el2", "mdcr_el2": "vcpu.arch.mdcr_el2",
               "hcrx_el2": "vcpu.arch.hcrx_el2", "cflags": "vcpu.arch.cflags",
               "iflags": "vcpu.arch.iflags", "fault_esr": "vcpu.arch.fault.esr_el2",
               "fault_far": "vcpu.arch.fault.far_el2", "fault_hpfar": "vcpu.arch.fault.hpfar_el2"}
VM_FIELDS = {"handle": "kvm.arch.pkvm.handle", "created_vcpus": "kvm.created_vcpus",
             "flags": "kvm.arch.flags", "vcpu_features": "kvm.arch.vcpu_features",
             "pgd_pa": "kvm.arch.mmu.pgd_phys", "host_kvm": "host_kvm", "nr_vcpus": "nr_vcpus"}
FIELDS = [("vcpu", n, HYP_VCPU[k]) for n, k in VCPU_FIELDS.items()] + [
    ("vm", n, HYP_VM[k]) for n, k in VM_FIELDS.items()]


@pytest.fixture(scope="module")
def machine_vcpu():
    m = pkvm.Machine(memory="64M", cpus=2, trace=False)
    vm = m.host.create_vm(vcpus=1, protected=True, memory=1 << 20)
    vm.map(guests.RAM_BASE >> 12, 1)  # the hyp VM and its vCPU exist
    hyp_vm = m._hyp.vm_table[0]
    return m, vm, hyp_vm.vcpus[0]


@SETTINGS
@given(field=st.sampled_from(FIELDS), a=st.binary(min_size=8, max_size=8),
       b=st.binary(min_size=8, max_size=8))
def test_a_field_is_its_bytes(machine_vcpu, field, a, b):
    """Every field: a store through the property puts its bytes in the page, and the property
    reads what a generic EL2 store put there."""
    m, _vm, vcpu = machine_vcpu
    which, name, (off, fmt) = field
    s = vcpu if which == "vcpu" else vcpu.vm
    layout = struct.Struct("<" + fmt)
    va, vb = (layout.unpack(x[: layout.size])[0] for x in (a, b))
    old = s.load(off, layout.size)
    try:
        setattr(s, name, va)
        assert s.load(off, layout.size) == layout.pack(va)
        el2_write(m._hyp, s.va + off, layout.pack(vb))
        assert getattr(s, name) == vb
    finally:
        el2_write(m._hyp, s.va + off, old)


def test_bools_loaded_cpu_and_context_are_their_bytes(machine_vcpu):
    m, _vm, vcpu = machine_vcpu
    h, hyp_vm = m._hyp, vcpu.vm
    for name in ("is_protected", "is_dying"):
        off = HYP_VM[f"kvm.arch.pkvm.{name}"][0]
        old = hyp_vm.load(off, 1)
        try:
            for value in (False, True, False):
                setattr(hyp_vm, name, value)
                assert hyp_vm.load(off, 1) == bytes([value])
                el2_write(h, hyp_vm.va + off, bytes([2 if value else 0]))  # any nonzero is true
                assert getattr(hyp_vm, name) is value
        finally:
            el2_write(h, hyp_vm.va + off, old)
    assert vcpu.loaded_on is None  # `vm.map` put it back
    off = HYP_VCPU["loaded_hyp_vcpu"][0]
    for cpu in (1, 0, None):
        vcpu.loaded_on = cpu
        want = 0 if cpu is None else loaded_slot(h, cpu)
        assert vcpu.load(off, 8) == want.to_bytes(8, "little")
        assert vcpu.loaded_on == cpu
    old = vcpu.ctxt
    try:
        raw = bytes(range(256)) * (CTXT_LEN // 256) + bytes(CTXT_LEN % 256)
        after = vcpu.load(CTXT_OFF + CTXT_LEN, 6)
        vcpu.ctxt = raw + b"beyond"  # only the context's bytes
        assert vcpu.load(CTXT_OFF, CTXT_LEN + 6) == raw + after
        assert vcpu.ctxt == raw
        el2_write(h, vcpu.va + CTXT_OFF, old)
        assert vcpu.ctxt == old
    finally:
        vcpu.ctxt = old


def test_a_snapshot_makes_the_structs_again(machine_vcpu):
    """A snapshot (`pkvm.snapshot`) pickles the structs by their attributes and makes them
    again without `__init__`: the copy reads its own machine's pages."""
    m, _vm, vcpu = machine_vcpu
    copy = snapshot.load(snapshot.save(m))
    vm2 = copy._hyp.vm_table[0]
    v2 = vm2.vcpus[0]
    assert v2.vm is vm2 and v2._h is copy._hyp is vm2._h is v2.memcache._h
    assert (v2.memcache._va, v2.memcache._off) == (v2.va, v2._off)
    assert vm2.mm_ops.pool is vm2.pool and vm2.pgt.mm_ops is vm2.mm_ops
    assert (v2.hcr_el2, v2.host_vcpu, v2.ctxt, v2.loaded_on, vm2.handle, vm2.is_protected) == (
        vcpu.hcr_el2, vcpu.host_vcpu, vcpu.ctxt, vcpu.loaded_on, vcpu.vm.handle, True)
    v2.hcr_el2 = vcpu.hcr_el2 ^ 1  # the copy's page, not the original's
    assert v2.hcr_el2 != vcpu.hcr_el2 and vm2.pgt.pgd == vcpu.vm.pgt.pgd


def _store_outcome(h, vcpu, va, store):
    """What a store at `va` did: the fault or the bytes there after it, and the bad-store
    records it added; memory, the records and the vCPU are put back afterwards."""
    pos = hyp_pa(va) - h.mem.base
    before = bytes(h.mem.bytes[pos : pos + 8])
    n_bad = len(h.bad_stores)
    saved = vcpu.va, vcpu._off
    vcpu.va, vcpu._off = va - HCR_OFF, pos - HCR_OFF  # the vCPU's hcr_el2 is the word at va
    try:
        store(vcpu)
        out: object = bytes(h.mem.bytes[pos : pos + 8])
    except HypBug as bug:
        out = ("fault", str(bug))
    finally:
        vcpu.va, vcpu._off = saved
    records = h.bad_stores[n_bad:]
    del h.bad_stores[n_bad:]
    h.mem.write(h.mem.base + pos, before)
    return out, records


@SETTINGS
@given(page=st.sampled_from([-2, -1, 0, 1, 2, 64]), slot=st.integers(0, 511), value=u64,
       same=st.booleans())
def test_a_field_store_is_the_generic_el2_store(machine_vcpu, page, slot, value, same):
    """In the host vCPU's page (shared with EL2), the pages around it (some neither mapped at
    EL2 nor the hyp's) and further away: the property's store and `el2_write` fault alike, or
    store the same bytes with the same ownership records (an equal store elided: `same` stores
    the word already there)."""
    m, vm, vcpu = machine_vcpu
    h = m._hyp
    va = kern_hyp_va(h, (vm.vcpus[0].pa & ~0xFFF) + page * 4096) + 8 * slot
    if same:
        pos = hyp_pa(va) - h.mem.base
        if 0 <= pos <= len(h.mem.bytes) - 8:
            value = int.from_bytes(h.mem.bytes[pos : pos + 8], "little")

    def field(s):
        s.hcr_el2 = value

    def generic(s):
        if s.load(HCR_OFF, 8) != value.to_bytes(8, "little"):  # an equal store is elided
            el2_write(h, s.va + HCR_OFF, value.to_bytes(8, "little"))

    assert _store_outcome(h, vcpu, va, field) == _store_outcome(h, vcpu, va, generic)
