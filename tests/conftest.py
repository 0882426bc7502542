import pytest

import pkvm
from pkvm import _compiled


def pytest_report_header(config):
    return f"pkvm: {_compiled.describe()}"  # compiled, or pure and why


@pytest.fixture(params=["latest", "6.12"])
def machine(request):
    """A small booted machine of each profile."""
    return pkvm.Machine(memory="256M", cpus=2, abi=request.param)


@pytest.fixture
def m72():
    return pkvm.Machine(memory="256M", cpus=2, abi="latest")


@pytest.fixture
def m612():
    return pkvm.Machine(memory="256M", cpus=2, abi="6.12")


# -- helpers shared by the behavioural suites (import with `from conftest import ...`) -------
EPERM, ENOENT, E2BIG, EAGAIN, ENOMEM, EFAULT, EBUSY = 1, 2, 7, 11, 12, 14, 16
EEXIST, ENODEV, EINVAL, ERANGE, EHWPOISON = 17, 19, 22, 34, 133
PAGE = 4096


def snapshot(m):
    """Everything a refused call must leave alone: page counts, host/hyp tables, the VM table."""
    return {
        "counts": m.inspect.page_counts(),
        "host": m.inspect.walk("host"),
        "hyp": m.inspect.walk("hyp"),
        "vms": m.inspect.vms(),
    }


def hyp_region(m):
    return next(r for r in m.memory_map() if r.kind == "hyp")


def ram_region(m):
    return next(r for r in m.memory_map() if r.kind == "ram")


def host_pfn(m, n=1):
    """pfn of `n` fresh host-owned pages."""
    return m.host.alloc_pages(n) >> 12


@pytest.fixture(params=["latest", "6.12"])
def machine1g(request):
    """The measured machine: 1 GiB RAM, 2 CPUs."""
    return pkvm.Machine(memory="1G", cpus=2, abi=request.param)


LINEAR_MAP = 0xFFFF_0000_0000_0000


def kva(pa):
    """The host kernel's linear-map VA of `pa` (the driver's convention, vm-state.md §0)."""
    return LINEAR_MAP + (pa - 0x4000_0000)


class RawVm:
    """A VM built by hand with raw hypercalls, for the edge cases the driver never takes."""

    def __init__(self, m, nr_vcpus=1, protected=False, share=True, id_regs=True):
        from pkvm.abi.host_structs import KVM, KVM_ARCH_FLAG_ID_REGS_INITIALIZED

        self.m = m
        self.nr_vcpus = nr_vcpus
        self.kvm_pages = -(-m.profile.sizeof_kvm // 4096)  # the real struct's length
        self.kvm_pa = m.host.alloc_pages(self.kvm_pages)
        self.handle = 0
        self._w(self.kvm_pa, KVM, "created_vcpus", nr_vcpus)
        self._w(self.kvm_pa, KVM, "arch.pkvm.is_protected", int(protected))
        if id_regs:
            self._w(self.kvm_pa, KVM, "arch.flags", KVM_ARCH_FLAG_ID_REGS_INITIALIZED)
        if share:
            for k in range(self.kvm_pages):
                assert m.hvc(0, "__pkvm_host_share_hyp", (self.kvm_pa >> 12) + k).x1 == 0
        self.vcpu_pa = {}

    def _w(self, base, layout, name, value):
        f = layout.field(name)
        self.m.host.write(base + f.offset, (value % (1 << (8 * f.size))).to_bytes(f.size, "little"))

    def set_handle(self, handle):
        from pkvm.abi.host_structs import KVM

        self.handle = handle
        self._w(self.kvm_pa, KVM, "arch.pkvm.handle", handle)

    def reserve(self, cpu=0):
        r = self.m.hvc(cpu, "__pkvm_reserve_vm")
        if r.x1 > 0:
            self.set_handle(r.x1)
        return r.x1

    def init_vm(self, vm_pa=None, pgd_pa=None, cpu=0):
        from pkvm.abi import sizes

        pages = sizes.page_align(sizes.pkvm_get_hyp_vm_size(self.nr_vcpus)) >> 12
        self.vm_pa = self.m.host.alloc_pages(pages) if vm_pa is None else vm_pa
        self.pgd_pa = self.m.host.alloc_pages(1) if pgd_pa is None else pgd_pa
        r = self.m.hvc(cpu, "__pkvm_init_vm", kva(self.kvm_pa), kva(self.vm_pa), kva(self.pgd_pa))
        if self.m.abi == "6.12" and r.x1 > 0:
            self.set_handle(r.x1)
        return r.x1

    def make_vcpu(self, idx, share=True):
        from pkvm.abi.host_structs import KVM_VCPU

        pages = -(-self.m.profile.sizeof_kvm_vcpu // 4096)
        pa = self.m.host.alloc_pages(pages)
        self._w(pa, KVM_VCPU, "kvm", kva(self.kvm_pa))
        self._w(pa, KVM_VCPU, "vcpu_id", idx)
        self._w(pa, KVM_VCPU, "vcpu_idx", idx)
        if share:
            for k in range(pages):
                assert self.m.hvc(0, "__pkvm_host_share_hyp", (pa >> 12) + k).x1 == 0
        self.vcpu_pa[idx] = pa
        return pa

    def init_vcpu(self, idx, handle=None, mem_pa=None, cpu=0):
        pa = self.vcpu_pa.get(idx) or self.make_vcpu(idx)
        mem = self.m.host.alloc_pages(2) if mem_pa is None else mem_pa
        h = self.handle if handle is None else handle
        return self.m.hvc(cpu, "__pkvm_init_vcpu", h, kva(pa), kva(mem)).x1

    def teardown(self, cpu=0):
        """The one (6.12) or two (7.2) teardown calls; returns the first non-zero x1 or 0."""
        if self.m.abi == "6.12":
            return self.m.hvc(cpu, "__pkvm_teardown_vm", self.handle).x1
        r = self.m.hvc(cpu, "__pkvm_start_teardown_vm", self.handle).x1
        return r or self.m.hvc(cpu, "__pkvm_finalize_teardown_vm", self.handle).x1

    def create(self):
        """reserve (7.2) + init_vm + every vCPU in order; returns the handle."""
        if self.m.abi != "6.12":
            assert self.reserve() >= 0x1000
        assert self.init_vm() >= 0
        for i in range(self.nr_vcpus):
            assert self.init_vcpu(i) == 0
        return self.handle
