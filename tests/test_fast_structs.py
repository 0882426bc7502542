"""The run path's direct reads and stores of hyp struct fields agree with the fields (issue 17).

`switch.py` and `hyp_main.py` read and store the hyp vCPU's fields by direct calls
(`pkvm_structs.struct_u64`, `set_struct_u64`, `struct_bool`, `hyp_vcpu_ctxt`,
`set_hyp_vcpu_ctxt`) instead of the descriptors (`Field`, `BoolField`, `CtxtField`): a model
speed-up. Each must give what the descriptor gives, and a store must stay a real EL2 store
through the hyp stage-1 with its ownership check (a fault where the descriptor's store faults,
the same bad-store record where the page is not the hyp's).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pkvm
from pkvm import guests
from pkvm.hyp.mm import el2_write, kern_hyp_va
from pkvm.hyp.panic import HypBug
from pkvm.hyp.pkvm_structs import (
    CTXT_LEN,
    FAULT_ESR_OFF,
    HCR_OFF,
    HOST_VCPU_OFF,
    IFLAGS_OFF,
    IS_DYING_OFF,
    IS_PROTECTED_OFF,
    LOADED_OFF,
    MDCR_OFF,
    Field,
    HypStruct,
    hyp_vcpu_ctxt,
    hyp_vcpu_loaded_on,
    set_hyp_vcpu_ctxt,
    set_hyp_vcpu_loaded_on,
    set_struct_u64,
    struct_bool,
    struct_u64,
)

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
u64 = st.integers(0, 2**64 - 1)
# The fields the run path reaches directly: descriptor name -> offset
FIELDS = {"hcr_el2": HCR_OFF, "mdcr_el2": MDCR_OFF, "iflags": IFLAGS_OFF,
          "fault_esr": FAULT_ESR_OFF, "host_vcpu": HOST_VCPU_OFF, "_loaded": LOADED_OFF}


@pytest.fixture(scope="module")
def machine_vcpu():
    m = pkvm.Machine(memory="64M", cpus=2, trace=False)
    vm = m.host.create_vm(vcpus=1, protected=True, memory=1 << 20)
    vm.map(guests.RAM_BASE >> 12, 1)  # the hyp VM and its vCPU exist
    hyp_vm = m._hyp.vm_table[0]
    return m, vm, hyp_vm.vcpus[0]


@SETTINGS
@given(name=st.sampled_from(sorted(FIELDS)), a=u64, b=u64)
def test_direct_field_access_is_the_descriptor(machine_vcpu, name, a, b):
    _m, _vm, vcpu = machine_vcpu
    off = FIELDS[name]
    old = getattr(vcpu, name)
    try:
        setattr(vcpu, name, a)
        assert struct_u64(vcpu, off) == a
        set_struct_u64(vcpu, off, b)
        assert getattr(vcpu, name) == b
    finally:
        setattr(vcpu, name, old)


def test_direct_bools_loaded_cpu_and_context_are_the_descriptors(machine_vcpu):
    _m, _vm, vcpu = machine_vcpu
    hyp_vm = vcpu.vm
    assert struct_bool(hyp_vm, IS_PROTECTED_OFF) is hyp_vm.is_protected is True
    hyp_vm.is_protected = False
    try:
        assert struct_bool(hyp_vm, IS_PROTECTED_OFF) is False
    finally:
        hyp_vm.is_protected = True
    assert struct_bool(hyp_vm, IS_DYING_OFF) is hyp_vm.is_dying is False
    assert hyp_vcpu_loaded_on(vcpu) is vcpu.loaded_on is None  # `vm.map` put it back
    for cpu in (1, 0, None):
        set_hyp_vcpu_loaded_on(vcpu, cpu)
        assert vcpu.loaded_on == cpu
        vcpu.loaded_on = cpu
        assert hyp_vcpu_loaded_on(vcpu) == cpu
    old = vcpu.ctxt
    try:
        raw = bytes(range(256)) * (CTXT_LEN // 256) + bytes(CTXT_LEN % 256)
        set_hyp_vcpu_ctxt(vcpu, raw + b"beyond")  # only the context's bytes, as the field
        assert vcpu.ctxt == hyp_vcpu_ctxt(vcpu) == raw
        vcpu.ctxt = old
        assert hyp_vcpu_ctxt(vcpu) == old
    finally:
        vcpu.ctxt = old


class _Probe(HypStruct):
    """A one-word struct anywhere at EL2, to store through the descriptor."""

    word = Field({"word": (0, "Q")}, "word")


def _store_outcome(h, va, store):
    """What a store at `va` did: the fault or the bytes there after it, and the bad-store
    records it added; memory and the records are put back afterwards."""
    s = _Probe(h, va)
    before = bytes(h.mem.bytes[s._off : s._off + 8])
    n_bad = len(h.bad_stores)
    try:
        store(s)
        out: object = bytes(h.mem.bytes[s._off : s._off + 8])
    except HypBug as bug:
        out = ("fault", str(bug))
    records = h.bad_stores[n_bad:]
    del h.bad_stores[n_bad:]
    h.mem.bytes[s._off : s._off + 8] = before
    return out, records


@SETTINGS
@given(page=st.sampled_from([-2, -1, 0, 1, 2, 64]), slot=st.integers(0, 511), value=u64)
def test_a_direct_store_is_the_descriptors_el2_store(machine_vcpu, page, slot, value):
    """In the host vCPU's page (shared with EL2), the pages around it (some neither mapped at
    EL2 nor the hyp's) and further away: the direct store and the descriptor's store fault
    alike, or store the same bytes with the same ownership records; a store that changes the
    word is `el2_write`'s."""
    m, vm, _vcpu = machine_vcpu
    h = m._hyp
    va = kern_hyp_va(h, (vm.vcpus[0].pa & ~0xFFF) + page * 4096) + 8 * slot

    def field(s):
        s.word = value

    def direct(s):
        set_struct_u64(s, 0, value)

    def generic(s):
        if s.load(0, 8) != value.to_bytes(8, "little"):  # an equal store is elided
            el2_write(h, s.va, value.to_bytes(8, "little"))

    want = _store_outcome(h, va, field)
    assert _store_outcome(h, va, direct) == want
    assert _store_outcome(h, va, generic) == want
