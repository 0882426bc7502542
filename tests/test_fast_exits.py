"""Fast paths of the MMIO exit round trip agree with the generic code they short-cut (issue 17).

Each is a model speed-up, not kernel behaviour: flush's one read of `hcr_el2 .. iflags`
(`switch._host_trap_regs`), the MMU-off answers of the exit's instruction fetch and access check
(`CpuExceptions._fetch`, `_target_va`), a run started at a given PC (`Core.run(pc=...)`), and the
whole round trip with the fast paths on against the same guest with them off.
"""

from __future__ import annotations

import ctypes
import io
import mmap
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from unicorn import arm64_const as A

import pkvm
from pkvm import guests
from pkvm.abi.host_structs import CTXT_END, CTXT_START, KVM_VCPU
from pkvm.errors import HypPanic
from pkvm.host.kvm import HostVcpu, HostVm
from pkvm.host.kvm_life import HostVmLife
from pkvm.hyp.mm import check_store, el2_read, el2_translate, el2_write, kern_hyp_va
from pkvm.hyp.panic import HypBug
from pkvm.hyp.pkvm import vcpu_field
from pkvm.hyp.switch import _host_trap_regs, _load_changed_xregs
from pkvm.machine.cpu import Core, CpuContext, ExitKind
from pkvm.machine.decode import decode_mem
from pkvm.machine.exceptions import _far
from pkvm.machine.mmu import S2_WALK_FAULT
from pkvm.machine.stage1 import OA_MASK

SETTINGS = settings(max_examples=80, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
u64 = st.integers(0, 2**64 - 1)
RAM = guests.RAM_BASE
HCR_OFF = KVM_VCPU.offset("arch.hcr_el2")


# -- flush: hcr_el2, mdcr_el2, iflags in one read -------------------------------------------
@pytest.fixture(scope="module")
def machine_vcpu():
    m = pkvm.Machine(memory="64M", cpus=2, trace=False)
    vm = m.host.create_vm(vcpus=1, protected=True, memory=1 << 20)
    vm.map(RAM >> 12, 1)  # the hyp VM and vCPU exist: the host vCPU is shared with EL2
    return m, vm.vcpus[0]


def _outcome(fn):
    try:
        return fn()
    except HypBug as bug:  # the same fault, at the same address, is the same message
        return ("fault", str(bug))


@SETTINGS
@given(off=st.integers(0, 511).map(lambda k: 8 * k), words=st.lists(u64, min_size=4, max_size=4))
def test_one_read_of_the_trap_registers_is_the_three_field_reads(machine_vcpu, off, words):
    """Anywhere in the host vCPU's page (the span crossing into the next page included, where
    the next page may not be mapped at EL2), with any values there, `_host_trap_regs` gives the
    three `vcpu_field` reads' values, or the same fault."""
    m, vcpu = machine_vcpu
    h = m._hyp
    page_pa = vcpu.pa & ~0xFFF
    data = b"".join(w.to_bytes(8, "little") for w in words)
    room = 4096 - off
    m.host.write(page_pa + off, data[:room])
    hv = kern_hyp_va(h, page_pa + off) - HCR_OFF  # a host vCPU whose hcr_el2 is at `off`
    fast = _outcome(lambda: _host_trap_regs(h, hv))
    generic = _outcome(lambda: tuple(vcpu_field(h, hv, f) for f in
                                     ("arch.hcr_el2", "arch.mdcr_el2", "arch.iflags")))
    assert fast == generic
    if off <= 4096 - 32:
        assert fast == (words[0], words[2], words[3])


def _read_page_by_page(h, va, n):
    """EL2's read as a loop over the pages it touches (a translation each)."""
    out = b""
    while n:
        chunk = min(n, 4096 - (va & 0xFFF))
        out += h.mem.read(el2_translate(h, va), chunk)
        va, n = va + chunk, n - chunk
    return out


def _write_page_by_page(h, va, data):
    """EL2's write as a loop: every page translated first, then each checked and stored."""
    pas, pos = [], 0
    while pos < len(data):
        chunk = min(len(data) - pos, 4096 - ((va + pos) & 0xFFF))
        pas.append((el2_translate(h, va + pos, write=True), pos, chunk))
        pos += chunk
    for pa, off, chunk in pas:
        check_store(h, pa)
        h.mem.write(pa, data[off : off + chunk])


@SETTINGS
@given(off=st.integers(0, 4095), n=st.integers(1, 2048), page=st.sampled_from([0, 1, -1]))
def test_el2_reads_and_writes_within_a_page_are_the_page_loop(machine_vcpu, off, n, page):
    """`el2_read` / `el2_write` of a span within one page (their one-translation form) read
    and store what the page-by-page loop does, or fault as it does (in the host vCPU's page,
    spans running into the next page, and in pages around it)."""
    m, vcpu = machine_vcpu
    h = m._hyp
    va = kern_hyp_va(h, (vcpu.pa & ~0xFFF) + page * 4096) + off
    assert _outcome(lambda: el2_read(h, va, n)) == _outcome(lambda: _read_page_by_page(h, va, n))
    before = _outcome(lambda: el2_read(h, va, n))
    data = bytes((off + i) & 0xFF for i in range(n))
    assert _outcome(lambda: el2_write(h, va, data)) == _outcome(
        lambda: _write_page_by_page(h, va, data))
    if not isinstance(before, tuple):
        assert el2_read(h, va, n) == data
        el2_write(h, va, before)  # the host vCPU as it was


# -- the exit's instruction fetch and access check with the MMU off --------------------------
@pytest.fixture(scope="module")
def core() -> Core:
    c = Core()
    mem = mmap.mmap(-1, 1 << 20)
    _KEEP.append(mem)
    c.map(RAM, 1 << 20, ctypes.addressof(ctypes.c_char.from_buffer(mem)))
    return c


_KEEP: list[object] = []
# Loads and stores of each addressing form (register, immediate, pair, literal, SIMD).
INSNS = [0xB9400001, 0xB9000001, 0xF8616800, 0xA9400401, 0x58000041, 0x3DC00020, 0x38401420,
         0xB8008401, 0x78C02020, 0x29410402]


@SETTINGS
@given(va=st.one_of(u64, st.integers(RAM - 0x2000, RAM + (1 << 20) + 0x2000)),
       word=st.sampled_from(INSNS), regs=st.lists(u64, min_size=3, max_size=3),
       address=st.one_of(u64.map(lambda a: a & OA_MASK), st.integers(RAM, RAM + (1 << 20))),
       msr_since=st.booleans())
def test_mmu_off_fetch_and_target_check_are_the_walks(core, va, word, regs, address, msr_since):
    """With the MMU off (as the shadow knows, or not trusted after an MSR), `_fetch` and
    `_target_va` answer as the stage-1 walk (`translate`) makes them answer."""
    ctx = CpuContext.reset(pc=RAM)
    ctx.x[0], ctx.x[1], ctx.x[2] = regs
    core.load_context(ctx)
    if msr_since:
        core.write_sysreg((3, 0, 1, 0, 0), core.read_sysreg((3, 0, 1, 0, 0)))
    else:
        core.save_raw()  # the shadow is current
    w = core.translate(va, fetch=True)
    host = None if w.ipa is None else core._view.host_of(w.ipa)
    want = None if host is None or va & 3 else ctypes.c_uint32.from_address(host).value
    assert core._fetch(va) == want

    acc = decode_mem(word)
    assert acc is not None
    pc = RAM + 0x100
    start = acc.address(pc, core._x_or_sp) & (2**64 - 1)
    far = _far(start, address)
    if far >= start + max(acc.total, 1):
        want_va = None
    else:
        wt = core.translate(far, write=acc.store)
        ipa = wt.ipa if wt.ipa is not None else wt.s2_ipa
        want_va = start if ipa is not None and ipa >> 12 == address >> 12 else None
    assert core._target_va(acc, pc, address) == want_va


# -- a run started at a given PC ------------------------------------------------------------
LDR_W1_X0 = 0xB9400001  # ldr w1, [x0]
STR_W1_X0 = 0xB9000001  # str w1, [x0]


@SETTINGS
@given(first=st.sampled_from([LDR_W1_X0, STR_W1_X0]), at=st.integers(0, 63),
       target=st.sampled_from([0x0A00_0000, 0x0900_0018, RAM - 8]))
def test_a_run_from_a_given_pc_is_writing_pc_then_running(core, first, at, target):
    """`Core.run(pc=p)` stops where `core.pc = p; core.run()` stops, with the same exit and
    the same registers after."""
    code = RAM + 0x4000
    _poke(core, code + 4 * at, first)
    for k in range(at):
        _poke(core, code + 4 * k, 0xD503201F)  # nop
    results = []
    for given_pc in (False, True):
        _reset_with_x0(core, target)
        if given_pc:
            ex = core.run(1000, code)
        else:
            core.pc = code
            ex = core.run(1000)
        results.append((ex, core.pc, core.save_raw()))
    assert results[0] == results[1]
    assert results[0][0].kind is ExitKind.DABT


def _reset_with_x0(core: Core, x0: int) -> None:
    """A reset context (PC 0, EL1h) with `x0`, loaded on the core."""
    ctx = CpuContext.reset(pc=0)
    ctx.x[0] = x0
    core.load_context(ctx)


def _poke(core: Core, ipa: int, word: int) -> None:
    host = core._view.host_of(ipa)
    assert host is not None
    ctypes.c_uint32.from_address(host).value = word
    core.flush_code()


# -- the whole round trip: fast paths on, and off ---------------------------------------------
class _NeverPreempts:
    """A scheduler that lets the running CPU go on: installed, it turns the run path's
    no-preemption fast paths off and changes nothing else."""

    def preempt(self, cpu: int, event: str, detail: str) -> None:
        pass

    def wait_lock(self, cpu: int, lock: object) -> None:
        pass


def _round_trips(fast: bool, n: int) -> list[tuple[object, ...]]:
    from pkvm.host.vmm import Vmm

    m = pkvm.Machine(memory="256M", cpus=2, trace=False)
    vmm = Vmm(m.host, guests.patch(guests.image("mmio"), n), memory="16M", protected=True,
              out=io.StringIO())
    runner = vmm.vm.vcpus[0].runner
    seen = []
    try:
        with m.preemption.scheduled(_NeverPreempts()) if not fast else _nothing():
            while not runner.power_off:
                ex = runner.run()
                host_ctxt = m.host.read(runner.vcpu.pa + CTXT_START, CTXT_END - CTXT_START)
                seen.append((ex.kind, ex.addr, ex.write, ex.data, ex.esr, host_ctxt))
                if ex.kind == "mmio" and not ex.write:
                    runner.complete_mmio(0x41 + len(seen))
    except HypPanic as e:  # pragma: no cover - reported as a difference below
        seen.append(("panic", str(e)))
    vmm.destroy()
    return seen


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


@settings(max_examples=4, deadline=None)
@given(n=st.integers(1, 12))
def test_the_round_trip_with_fast_paths_is_the_generic_one(n):
    """The `mmio` guest's exits, and the host's copy of its registers after each, are the same
    with the no-preemption fast paths and with them off (a scheduler installed)."""
    fast, generic = _round_trips(True, n), _round_trips(False, n)
    assert len(fast) == 2 * n + 1  # a load and a store an iteration, then the power-off
    assert fast == generic


# -- the stage-2 fault hook, called by unicorn without the binding's wrapper ----------------------
def test_an_exception_in_the_fault_hook_stops_the_run_and_is_raised_by_it():
    """As with the binding's own hook wrapper: the exception `_on_mem` raised is the one
    `Core.run` raises, and the core runs normally afterwards."""

    class Broken(Exception):
        pass

    c = Core()
    mem = mmap.mmap(-1, 1 << 16)
    _KEEP.append(mem)
    c.map(RAM, 1 << 16, ctypes.addressof(ctypes.c_char.from_buffer(mem)))
    _poke(c, RAM, LDR_W1_X0)

    class BrokenCache(dict):  # the decoded-instruction cache, whose lookup raises
        def __getitem__(self, insn: int) -> object:
            raise Broken(hex(insn))

    ctx = CpuContext.reset(pc=RAM)
    ctx.x[0] = 0x0A00_0000
    c.load_context(ctx)
    good_cache = c._decoded
    c._decoded = BrokenCache()  # the decoding of the faulting instruction raises
    with pytest.raises(Broken):
        c.run(100)
    c._decoded = good_cache
    ex = c.run(100, RAM)
    assert ex.kind is ExitKind.DABT and ex.ipa == 0x0A00_0000


# -- the host driver's side: kvm_arch_vcpu_load / put, each one life-cycle call --------------------
class _GenericLife:
    """The life cycle's `arch_vcpu_load` / `arch_vcpu_put` as their four generic steps."""

    def __init__(self, life: HostVmLife):
        self.life = life

    def __getattr__(self, name: str) -> object:
        return getattr(self.life, name)

    def arch_vcpu_load(self, vm: HostVm, vcpu: HostVcpu, hcr: int, cpu: int) -> None:
        self.life.vcpu_load(vm, vcpu, hcr, cpu)
        self.life.vgic_load(vm, vcpu, cpu)

    def arch_vcpu_put(self, vm: HostVm, vcpu: HostVcpu, cpu: int) -> None:
        self.life.vgic_put(vm, vcpu, cpu)
        self.life.vcpu_put(vm, cpu)


def _hypercalls(generic: bool, abi: str,
                n: int) -> tuple[list[tuple[object, ...]], str, int, str]:
    from pkvm.host.vmm import Vmm

    m = pkvm.Machine(memory="256M", cpus=2, abi=abi, trace=False)
    seen: list[tuple[object, ...]] = []
    m.listeners.append(lambda r: seen.append((r.cpu, r.name, r.args, r.x0, r.x1, r.x2, r.x3)))
    vmm = Vmm(m.host, guests.patch(guests.image("mmio"), n), memory="16M",
              protected=m.profile.protected_vms, out=io.StringIO())
    if generic:  # the four generic steps, and every call through an interposer
        vmm.vm.life = _GenericLife(vmm.vm.life)  # type: ignore[assignment]
        m.interpose_hvc(lambda proceed, cpu, func, args: proceed(cpu, func, args))
        # the runner's 8-byte loads and stores of `struct kvm_vcpu` as `Host.read` / `write`
        m.host._read_u64 = m.host._write_u64 = None
    s = vmm.run()
    vmm.destroy()
    return seen, s.reason, s.mmio_reads + s.mmio_writes, s.console


@settings(max_examples=4, deadline=None)
@given(n=st.integers(1, 12), abi=st.sampled_from(["6.12", "latest"]))
def test_the_host_drivers_fast_calls_are_the_generic_ones(n, abi):
    """A whole `mmio` guest's run makes the same hypercalls, on the same CPUs with the same
    arguments and answers, with `arch_vcpu_load` / `arch_vcpu_put` as with the four generic
    life-cycle steps in `arm.c`'s order, every call through an interposer, and the runner's
    accesses to its `struct kvm_vcpu` through `Host.read` / `write` (the same UART output)."""
    fast, generic = _hypercalls(False, abi, n), _hypercalls(True, abi, n)
    assert fast[1:3] == ("shutdown", 2 * n)
    names = {c[1] for c in fast[0]}
    if abi == "latest":
        assert {"__pkvm_vcpu_load", "__vgic_v3_save_aprs", "__pkvm_vcpu_put"} <= names
    assert fast == generic


# -- the host's loads and stores: `Machine.host_translate`'s compiled TLB hit ------------------
class _NoHit:
    """A machine's HVC door whose `host_hit` always sends the access down the generic path."""

    def __init__(self, door: object) -> None:
        self.door = door

    def host_hit(self, cpu: int, pa: int, write: bool) -> int:
        return S2_WALK_FAULT

    def __getattr__(self, name: str) -> object:
        return getattr(self.door, name)


def _host_machine(abi: str, generic: bool) -> tuple[pkvm.Machine, dict[str, int]]:
    # Traced: `Machine.host_aborts` records the host stage-2 faults the two sides compare.
    m = pkvm.Machine(memory="64M", cpus=2, abi=abi, trace=True)
    vm = m.host.create_vm(vcpus=1, protected=abi != "6.12", memory=1 << 20)
    vm.map(RAM >> 12, 1)
    if generic:
        m._door = _NoHit(m._door)  # type: ignore[assignment]
    bases = {"host": m.host.alloc_pages(4), "hyp": m.carveout[0], "mmio": 0x0900_0000,
             "guest": vm.mapped[RAM >> 12],  # donated to the guest (shared, unprotected)
             "far": 1 << 48}
    return m, bases


def _aborts(m: pkvm.Machine) -> list[tuple[int, int, bool, str, int]]:
    return [(a.cpu, a.addr, a.write, a.verdict, a.ret) for a in m.host_aborts]


def test_the_host_abort_records_the_fast_path_tests_compare_are_kept():
    """The comparisons above are of something: a refused host access leaves its record, alike
    on both sides."""
    sides = [_host_machine("latest", generic) for generic in (False, True)]
    for m, bases in sides:
        before = len(m.host_aborts)
        with pytest.raises(pkvm.HostDataAbort):
            m.host_translate(1, bases["hyp"] + 8, False)
        new = list(m.host_aborts)[before:]
        assert [(a.cpu, a.addr, a.write, a.verdict) for a in new] == \
            [(1, bases["hyp"] + 8, False, "refused")]
    assert _aborts(sides[0][0]) == _aborts(sides[1][0])


_ACCESS = st.tuples(st.sampled_from(["host", "hyp", "mmio", "guest", "far"]),
                    st.integers(0, 4 * 4096 - 1), st.booleans(), st.sampled_from([0, 1, 2, -1]))


@settings(max_examples=12, deadline=None)
@given(accesses=st.lists(_ACCESS, min_size=1, max_size=12))
@pytest.mark.parametrize("abi", ["latest", "6.12"])
def test_the_host_translations_tlb_hit_is_the_generic_walk(abi, accesses):
    """The same accesses on two machines, one with `HvcDoor.host_hit` and one without: the same
    answers (PA, MMIO, HostDataAbort, HypPanic, ValueError), TLB, host aborts and hyp state."""
    sides = [_host_machine(abi, generic) for generic in (False, True)]
    for region, off, write, cpu in accesses:
        outs = []
        for m, bases in sides:
            pa = bases[region] + off
            try:
                outs.append(m.host_translate(cpu, pa, write))
            except (pkvm.HostDataAbort, HypPanic, ValueError, IndexError) as e:
                outs.append((type(e).__name__, str(e)))
        assert outs[0] == outs[1], (region, hex(off), write, cpu)
    (fast, _), (gen, _) = sides
    assert fast._hyp.host_s2_tlb.entries == gen._hyp.host_s2_tlb.entries
    assert _aborts(fast) == _aborts(gen)
    assert fast._hyp.dead == gen._hyp.dead


def test_a_host_access_to_its_mapped_ram_takes_the_compiled_hit():
    m, bases = _host_machine("latest", False)
    pa = bases["host"]
    m.host_translate(0, pa, True)  # mapped (and cached) by the first access
    assert m._door.host_hit(0, pa, True) == pa
    assert m._door.host_hit(0, 0x0900_0000, False) in (-1, S2_WALK_FAULT)
    assert m._door.host_hit(5, pa, True) == S2_WALK_FAULT  # a bad CPU: the generic path says why


_PORT_OP = st.tuples(st.sampled_from(["read", "read_u64", "write_u64", "write"]),
                     st.sampled_from(["host", "hyp", "mmio", "guest", "far"]),
                     st.integers(0, 4 * 4096 - 1), st.integers(1, 24), u64,
                     st.sampled_from([0, 1, 2, -1]))


@settings(max_examples=12, deadline=None)
@given(ops=st.lists(_PORT_OP, min_size=1, max_size=12))
@pytest.mark.parametrize("abi", ["latest", "6.12"])
def test_the_host_ports_loads_and_stores_take_the_hit_as_host_translate(abi, ops):
    """`HostPort.read`, `read_u64` and `write_u64` ask the door's `host_hit` themselves before
    `Machine.host_translate`: the same loads, stores, faults, RAM, TLB and host aborts as a
    machine whose door never hits (every access down `host_translate`'s generic path)."""
    sides = [_host_machine(abi, generic) for generic in (False, True)]
    for op, region, off, n, value, cpu in ops:
        outs = []
        for m, bases in sides:
            port, pa = m.host.port, bases[region] + off
            try:
                if op == "read":
                    outs.append(port.read(cpu, pa, n))
                elif op == "read_u64":
                    outs.append(port.read_u64(cpu, pa))
                elif op == "write_u64":
                    outs.append(port.write_u64(cpu, pa, value))
                else:
                    outs.append(port.write(cpu, pa, value.to_bytes(8, "little")[: n % 8 + 1]))
            except (pkvm.HostDataAbort, HypPanic, ValueError, IndexError) as e:
                outs.append((type(e).__name__, str(e)))
        assert outs[0] == outs[1], (op, region, hex(off), cpu)
    (fast, fb), (gen, gb) = sides
    for region in ("host", "hyp", "guest"):
        assert fast.mem.read(fb[region], 4 * 4096) == gen.mem.read(gb[region], 4 * 4096), region
    assert fast._hyp.host_s2_tlb.entries == gen._hyp.host_s2_tlb.entries
    assert _aborts(fast) == _aborts(gen)
    assert fast._hyp.dead == gen._hyp.dead


# -- unicorn's run-path entry points without the binding's argument conversion -----------------
REG_IDS = [*range(A.UC_ARM64_REG_X0, A.UC_ARM64_REG_X0 + 29), A.UC_ARM64_REG_X29,
           A.UC_ARM64_REG_X30, A.UC_ARM64_REG_SP, A.UC_ARM64_REG_PC]


@SETTINGS
@given(writes=st.lists(st.tuples(st.sampled_from(REG_IDS), u64, st.booleans()), min_size=1,
                       max_size=8))
def test_direct_register_calls_are_the_bindings(core, writes):
    """`_rd` / `_wr` (`uc_reg_read_direct` / `uc_reg_write_direct`) and the binding's
    `reg_read` / `reg_write` see and make the same register values, 64 bits wide."""
    for reg, value, direct in writes:
        if direct:
            core._wr(reg, value)
        else:
            core.uc.reg_write(reg, value)
        assert core._rd(reg) == core.uc.reg_read(reg) == value


ADD_X0_1 = 0x91000400  # add x0, x0, #1


@SETTINGS
@given(count=st.integers(0, 40), at=st.integers(0, 31), x0=u64)
def test_a_direct_emu_start_is_the_bindings(core, count, at, x0):
    """`Core.run(count, pc)` (`uc_emu_start_direct`, 64-bit arguments as C values) runs what
    the binding's `emu_start(pc, until, 0, count)` runs: the same registers after."""
    code = RAM + 0x8000
    for k in range(32):
        _poke(core, code + 4 * k, ADD_X0_1)
    _poke(core, code + 4 * 32, 0xD4000002)  # hvc #0: the run ends there without a budget
    results = []
    for direct in (True, False):
        _reset_with_x0(core, x0)
        if direct:
            core.run(count or None, code + 4 * at)
        else:
            core._clear_exit()
            core.uc.emu_start(code + 4 * at, 2**64 - 1, 0, count)
        results.append((core._rd(A.UC_ARM64_REG_X0), core._rd(A.UC_ARM64_REG_PC)))
    assert results[0] == results[1]
    assert results[0][0] == (x0 + min(count or 32, 32 - at)) % 2**64


# -- the run's reload of the general registers the host changed --------------------------------
@SETTINGS
@given(old=st.lists(u64, min_size=31, max_size=31),
       changes=st.dictionaries(st.integers(0, 30), u64, max_size=31),
       live=st.lists(u64, min_size=31, max_size=31), tail=st.binary(min_size=0, max_size=64))
def test_the_changed_registers_are_the_register_by_register_compare(core, old, changes, live,
                                                                     tail):
    """`_load_changed_xregs` writes exactly the registers x0..x30 whose bytes differ, with
    their new values, and leaves the others as the CPU holds them (`live`): what comparing the
    31 registers one by one and writing each that differs does."""
    new = list(old)
    for i, v in changes.items():
        new[i] = v
    pack = struct.Struct("<31Q").pack
    for i, v in enumerate(live):
        core.set_x(i, v)
    _load_changed_xregs(core, pack(*new) + tail, pack(*old) + tail)
    assert [core.x(i) for i in range(31)] == [new[i] if new[i] != old[i] else live[i]
                                               for i in range(31)]
