"""Round 7's fast paths of the hyp's VM / vCPU init and teardown (issue 17) against the generic
code they replace.

Each is a model speed-up, not kernel behaviour: a scalar of a host struct read through EL2 as
one word of RAM (`el2_read_int`, `kvm_field`, `vcpu_field` against `int.from_bytes` of
`el2_read`), a word stored as one (`el2_write_u64` against `el2_write` of its bytes), one of
the hyp VM's ID registers read alone (`PkvmHypVm.id_reg` against the `id_regs` tuple), the
protected VM's ID registers computed with the VM's feature gates decided once
(`kvm_init_pvm_id_regs` against `pvm_calc_id_reg` of each), and a table page's descriptors in
one read (`PhysMemory.read_table` against `read_u64` of each).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pkvm
from pkvm import guests
from pkvm.abi.host_structs import KVM, KVM_ARCH_FLAG_ID_REGS_INITIALIZED, KVM_VCPU
from pkvm.hyp.memory import PageState
from pkvm.hyp.mm import (
    el2_read,
    el2_read_int,
    el2_read_u64,
    el2_write,
    el2_write_u64,
    hyp_pa,
    kern_hyp_va,
)
from pkvm.hyp.pkvm import kvm_field, vcpu_field
from pkvm.hyp.sys_regs import (
    _ID_NAMES,
    KVM_ARM_VCPU_PTRAUTH_GENERIC,
    KVM_ARM_VCPU_SVE,
    kvm_has_feat,
    kvm_init_pvm_id_regs,
    pvm_calc_id_reg,
)
from pkvm.machine.cpu_id import CPU_ID_REGS, ID_REG_ENC
from pkvm.machine.memory import PAGE_SIZE, PhysMemory
from test_fast_paths_g1g import _outcome

SETTINGS = settings(max_examples=120, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def machine_vcpu():
    m = pkvm.Machine(memory="64M", cpus=2, trace=False)
    vm = m.host.create_vm(vcpus=1, protected=True, memory=1 << 20)
    vm.map(guests.RAM_BASE >> 12, 1)  # the hyp VM and its vCPU exist
    return m, vm


def _va(m, vm, mine: bool, page: int, off: int) -> int:
    h = m._hyp
    if mine:
        return (h.vm_table[0].vcpus[0].va & ~0xFFF) + page * PAGE_SIZE + off
    return kern_hyp_va(h, (vm.vcpus[0].pa & ~0xFFF) + page * PAGE_SIZE) + off


# -- a host struct's scalar, read and stored as a word ------------------------------------------
@SETTINGS
@given(page=st.sampled_from([-2, -1, 0, 1, 64]), off=st.integers(0, 4095),
       n=st.sampled_from([1, 2, 4, 8, 3, 16]), signed=st.booleans(), mine=st.booleans())
def test_the_word_read_is_the_generic_el2_read(machine_vcpu, page, off, n, signed, mine):
    """At every offset (aligned or not, across a page, pages not mapped at EL2): the same value
    or fault as `int.from_bytes` of `el2_read`."""
    m, vm = machine_vcpu
    h = m._hyp
    va = _va(m, vm, mine, page, off)
    assert _outcome(h, va, lambda: el2_read_int(h, va, n, signed)) == \
        _outcome(h, va, lambda: int.from_bytes(el2_read(h, va, n), "little", signed=signed))
    if n == 8 and not signed:
        assert _outcome(h, va, lambda: el2_read_u64(h, va)) == \
            _outcome(h, va, lambda: int.from_bytes(el2_read(h, va, 8), "little"))


@SETTINGS
@given(page=st.sampled_from([-2, -1, 0, 1, 64]), off=st.integers(0, 4095),
       value=st.integers(-1, 2**64 + 5), mine=st.booleans(), disown=st.booleans())
def test_the_word_store_is_the_generic_el2_write(machine_vcpu, page, off, value, mine, disown):
    """The same bytes, fault and bad-store records as `el2_write` of the value's 8 bytes
    (`disown`: the hyp's state of the pages made NOPAGE meanwhile)."""
    m, vm = machine_vcpu
    h = m._hyp
    va = _va(m, vm, mine, page, off)
    states = h.vmemmap.hyp_state
    i0 = (hyp_pa(va) >> 12) - h.vmemmap.base_pfn
    kept = [(i, states[i]) for i in (i0, i0 + 1) if 0 <= i < len(states)]
    if disown:
        for i, _ in kept:
            states[i] = PageState.NOPAGE
    try:
        data = (value & (2**64 - 1)).to_bytes(8, "little")
        assert _outcome(h, va, lambda: el2_write_u64(h, va, value)) == \
            _outcome(h, va, lambda: el2_write(h, va, data))
    finally:
        for i, state in kept:
            states[i] = state


def _generic_field(h, layout, base: int, name: str) -> int:
    f = layout.field(name)
    return int.from_bytes(el2_read(h, base + f.offset, f.size), "little", signed=f.fmt in "iqhb")


def test_every_host_field_reads_as_the_generic_read(machine_vcpu):
    """Every field of the host's `struct kvm` and `struct kvm_vcpu` (arrays and byte strings
    too, read generically)."""
    m, _ = machine_vcpu
    h = m._hyp
    hvm = h.vm_table[0]
    for read, layout, base in ((kvm_field, KVM, hvm.host_kvm),
                               (vcpu_field, KVM_VCPU, hvm.vcpus[0].host_vcpu)):
        for name in layout.fields:
            assert read(h, base, name) == _generic_field(h, layout, base, name), name


# -- the hyp VM's ID registers -------------------------------------------------------------------
@SETTINGS
@given(regs=st.lists(st.integers(0, 2**64 - 1), min_size=56, max_size=56),
       i=st.integers(-3, 60))
def test_one_id_register_is_the_tuples(machine_vcpu, regs, i):
    m, _ = machine_vcpu
    hvm = m._hyp.vm_table[0]
    kept, flags = hvm.id_regs, hvm.flags
    try:
        hvm.set_id_regs(tuple(regs))
        whole = hvm.id_regs
        assert whole == tuple(regs)
        assert hvm.id_reg(i) == (whole[i] if 0 <= i < len(whole) else 0)
        for name in ID_REG_ENC:
            for shift in (0, 4, 28, 36, 60):
                for limit in (0, 1, 2, 6, 0xF):
                    for signed in (False, True):
                        v = (whole[((ID_REG_ENC[name][3] - 1) << 3) | ID_REG_ENC[name][4]]
                             >> shift) & 0xF
                        lim = limit
                        if signed:
                            v = v - 16 if v & 8 else v
                            lim = lim - 16 if lim & 8 else lim
                        assert kvm_has_feat(hvm, name, shift, limit, signed) == (v >= lim)
    finally:
        hvm.set_id_regs(kept)
        hvm.flags = flags


@SETTINGS
@given(vals=st.fixed_dictionaries({k: st.integers(0, 2**64 - 1) for k in CPU_ID_REGS}),
       features=st.integers(0, 0xFF) | st.sampled_from(
           [KVM_ARM_VCPU_SVE, KVM_ARM_VCPU_PTRAUTH_GENERIC, 0]))
def test_the_protected_id_registers_are_pvm_calc_id_reg_of_each(machine_vcpu, vals, features):
    """Any sanitised values and VM features: each register as `pvm_calc_id_reg` computes it."""
    m, _ = machine_vcpu
    hvm = m._hyp.vm_table[0]
    kept, flags, kept_features = hvm.id_regs, hvm.flags, hvm.vcpu_features
    try:
        hvm.vcpu_features = features
        hvm.flags = flags & ~KVM_ARCH_FLAG_ID_REGS_INITIALIZED
        want = [0] * 56
        for idx in range(24, 56):  # CRm 4-7
            name = _ID_NAMES.get(idx)
            want[idx] = pvm_calc_id_reg(hvm, name, vals) if name is not None else 0
        kvm_init_pvm_id_regs(hvm, vals)
        assert hvm.id_regs == tuple(want) and hvm.id_regs_initialized
    finally:
        hvm.set_id_regs(kept)
        hvm.flags = flags
        hvm.vcpu_features = kept_features


# -- a table page in one read --------------------------------------------------------------------
@settings(max_examples=50, deadline=None)
@given(words=st.dictionaries(st.integers(0, 1023), st.integers(0, 2**64 - 1), max_size=40),
       page=st.integers(0, 1))
def test_read_table_is_read_u64_of_each(words, page):
    mem = PhysMemory(2 * PAGE_SIZE)
    for k, v in words.items():
        mem.write_u64(mem.base + 8 * k, v)
    pa = mem.base + page * PAGE_SIZE
    assert mem.read_table(pa) == [mem.read_u64(pa + 8 * i) for i in range(PAGE_SIZE // 8)]
