"""Fast paths of a protected guest's page life (issue 17, round 3) against the generic code.

Each is a model speed-up, not kernel behaviour: Hypothesis draws the memblock map, the ranges and
the tables in place, and the fast answer must equal the generic one, errno for errno.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pkvm
from pkvm.hyp import memblock
from pkvm.hyp.memory import ComponentId
from pkvm.machine.memory import PAGE_SIZE
from test_fast_paths import MEM, SETTINGS, addresses, memblocks


@pytest.fixture(scope="module")
def m72() -> pkvm.Machine:
    return pkvm.Machine(memory=MEM, cpus=2, abi="latest", trace=False)


@SETTINGS
@given(start=addresses(), size=st.sampled_from([1, 8, PAGE_SIZE, 2 * PAGE_SIZE, 1 << 21, 2**64 - 1]),
       regions=memblocks())
def test_check_range_allowed_memory_agrees_with_the_region_lookup(m72, start, size, regions):
    h = m72._hyp
    saved = h.hyp_memory
    h.hyp_memory = regions
    try:
        end = (start + size) & (2**64 - 1)
        fast = memblock.check_range_allowed_memory(h, start, end)
        generic = memblock._check_range_allowed_memory(h, start, end)
    finally:
        h.hyp_memory = saved
    assert fast == generic


@settings(max_examples=1, deadline=None)
@given(st.just(0))
def test_the_generic_check_is_reached(m72, _):
    """The generic lookup still answers a range that crosses a region's end."""
    h = m72._hyp
    reg = h.hyp_memory[-1]
    assert memblock.check_range_allowed_memory(h, reg.end - PAGE_SIZE, reg.end + PAGE_SIZE) == -22


# -- the host driver's per-page loops (round 4) ------------------------------------------------
def _calls(m: pkvm.Machine, since: int) -> list[tuple]:
    return [(r.name, r.cpu, r.args, r.x0, r.x1) for r in list(m.trace)[since:]]


def _generic_map(vm, gfn: int, n: int, cpu: int) -> None:
    """`HostVm.map` spelled with the driver's generic steps: per page a `topup_memcache` (its
    count read, pages pushed when short) and one `HostVm.hvc`."""
    from pkvm.host.kvm import KVM_PGTABLE_PROT_RWX
    from pkvm.host.vcpu_run import HCR_HOST_VCPU

    vm._populate(gfn, n)
    vcpu = vm.vcpus[0]
    vm.ensure_hyp_vcpu(vcpu)
    vm.life.vcpu_load(vm, vcpu, HCR_HOST_VCPU, cpu)
    name = "__pkvm_host_donate_guest" if vm.protected else "__pkvm_host_share_guest"
    extra = () if vm.protected else (1, KVM_PGTABLE_PROT_RWX)  # nr_pages, prot
    for g in range(gfn, gfn + n):
        if g not in vm.mapped:
            pa = vm.backing(g)
            vm.topup_memcache(vcpu)
            assert vm.hvc(name, pa >> 12, g, *extra, cpu=cpu) == 0
            vm.mapped[g] = pa
    vm.life.vcpu_put(vm, cpu)


@settings(max_examples=12, deadline=None)
@given(protected=st.booleans(), runs=st.lists(st.tuples(st.integers(0, 471), st.integers(1, 40)),
                                              min_size=1, max_size=3),
       cpu=st.integers(0, 1))
def test_the_drivers_map_and_teardown_loops_make_the_generic_calls(protected, runs, cpu):
    """`HostVm.map`'s loop (the memcache count loaded in place, `topup_memcache` only when
    short, the port's HVC straight) issues the hypercalls the generic steps issue, in order,
    with the same results; the teardown reclaims (or unshares) each mapped page once, in the
    order they were mapped, and leaves nothing mapped."""
    fast = pkvm.Machine(memory="64M", cpus=2, trace=True)
    slow = pkvm.Machine(memory="64M", cpus=2, trace=True)
    vms = [m.host.create_vm(vcpus=1, protected=protected, memory=2 << 20) for m in (fast, slow)]
    since = [len(fast.trace), len(slow.trace)]
    assert _calls(fast, 0) == _calls(slow, 0)
    for gfn, n in runs:
        vms[0].map(0x40000 + gfn, n, cpu=cpu)
        _generic_map(vms[1], 0x40000 + gfn, n, cpu)
    assert _calls(fast, since[0]) == _calls(slow, since[1])
    assert vms[0].mapped == vms[1].mapped
    order = list(vms[0].mapped)
    start = len(fast.trace)
    vms[0].destroy()
    assert not vms[0].mapped
    page_calls = [c for c in _calls(fast, start) if c[0] in (
        "__pkvm_reclaim_dying_guest_page", "__pkvm_host_unshare_guest")]
    assert [c[2][1] for c in page_calls] == order and all(c[4] == 0 for c in page_calls)


def _page_by_page(m: pkvm.Machine, cpu: int, pa: int, n: int, write: bool) -> list:
    """The generic translation of a range: `host_translate` of one page after another."""
    if n <= 0:
        return []
    starts = [pa, *range((pa & ~(PAGE_SIZE - 1)) + PAGE_SIZE, pa + n, PAGE_SIZE)]
    return [(m.host_translate(cpu, start, write), end - start)
            for start, end in zip(starts, [*starts[1:], pa + n], strict=True)]


def _outcome(fn):
    try:
        return ("ok", fn())
    except Exception as e:  # noqa: BLE001 - the exception is the result compared
        return (type(e).__name__, str(e))


@settings(max_examples=25, deadline=None)
@given(abi=st.sampled_from(["latest", "6.12"]),
       where=st.sampled_from(["ram", "carveout", "mmio", "top", "beyond"]),
       off=st.integers(0, 40 * PAGE_SIZE), n=st.integers(-1, 24 * PAGE_SIZE),
       write=st.booleans(), warm=st.booleans())
def test_host_translate_range_agrees_with_page_by_page(abi, where, off, n, write, warm):
    """`Machine.host_translate_range` (the TLB's hits in compiled code, the rest through
    `host_translate`) against `host_translate` page by page on an identical machine: the same
    spans or the same exception, and afterwards the same host TLB, host aborts, host stage-2
    and hyp liveness."""
    ms = [pkvm.Machine(memory="64M", cpus=2, abi=abi) for _ in range(2)]
    # RAM is [0x4000_0000, 0x4400_0000); "top": ranges that run past its end
    base = {"ram": 0x4040_0000, "carveout": ms[0].carveout[0], "mmio": 0x0900_0000,
            "top": 0x4400_0000 - 32 * PAGE_SIZE, "beyond": (1 << 48) - 8 * PAGE_SIZE}[where]
    pa = base + off
    if warm:  # some of the range already in the TLB
        for m in ms:
            _outcome(lambda m=m: m.host_translate(0, pa, write))
    fast = _outcome(lambda: ms[0].host_translate_range(0, pa, n, write))
    slow = _outcome(lambda: _page_by_page(ms[1], 0, pa, n, write))
    assert fast == slow
    a, b = ms[0].inspect, ms[1].inspect
    assert ms[0]._hyp.host_s2_tlb.entries == ms[1]._hyp.host_s2_tlb.entries
    aborts = [[(r.cpu, r.addr, r.write, r.verdict, r.ret) for r in m.host_aborts] for m in ms]
    assert aborts[0] == aborts[1]
    assert a.table("host").leaves() == b.table("host").leaves()
    assert ms[0]._hyp.dead == ms[1]._hyp.dead


@settings(max_examples=25, deadline=None)
@given(where=st.sampled_from(["ram", "carveout", "mmio", "top", "beyond"]),
       off=st.integers(0, 4 * PAGE_SIZE), warm=st.booleans(), cpu=st.integers(-1, 2))
def test_the_ports_8_byte_load_agrees_with_the_generic_load(where, off, warm, cpu):
    """`HostPort.read_u64` (an aligned TLB hit on RAM answered by `HvcDoor.host_load_u64` in
    one call) against the same load made the generic way (`host_translate`, then RAM) on an
    identical machine: the same value or exception, and the same host TLB, aborts and hyp
    liveness afterwards."""
    ms = [pkvm.Machine(memory="64M", cpus=2) for _ in range(2)]
    base = {"ram": 0x4040_0000, "carveout": ms[0].carveout[0], "mmio": 0x0900_0000,
            "top": 0x4400_0000 - 2 * PAGE_SIZE, "beyond": (1 << 48) - 2 * PAGE_SIZE}[where]
    pa = base + off
    for m in ms:
        m.mem.write(0x4040_0000, bytes(range(1, 256)) * 17)  # something other than zeros there
        if warm:
            _outcome(lambda m=m: m.host_translate(0, pa, False))

    def generic(m: pkvm.Machine) -> int:
        if pa & 0xFFF > PAGE_SIZE - 8:
            return int.from_bytes(m.host_port.read(cpu, pa, 8), "little")
        out = m.host_translate(cpu, pa, False)
        return 0 if out is None or out < 0 else int.from_bytes(m.mem.read(out, 8), "little")

    fast = _outcome(lambda: ms[0].host_port.read_u64(cpu, pa))
    assert fast == _outcome(lambda: generic(ms[1]))
    assert ms[0]._hyp.host_s2_tlb.entries == ms[1]._hyp.host_s2_tlb.entries
    aborts = [[(r.cpu, r.addr, r.write, r.verdict, r.ret) for r in m.host_aborts] for m in ms]
    assert aborts[0] == aborts[1]
    assert ms[0]._hyp.dead == ms[1]._hyp.dead


@settings(max_examples=40, deadline=None)
@given(func=st.one_of(st.sampled_from(["__pkvm_host_share_hyp", "__pkvm_host_unshare_hyp",
                                       "__pkvm_vcpu_put", "__pkvm_init", "no such call"]),
                      st.integers(-1, 2**64)),
       args=st.lists(st.one_of(st.integers(-(2**65), 2**65), st.booleans(), st.just("x")),
                     max_size=7),
       cpu=st.integers(-1, 2), interposed=st.booleans())
def test_the_ports_hvc_is_machine_hvc(func, args, cpu, interposed):
    """The host port's `hvc` (`HvcDoor.hvc`, compiled) against `Machine.hvc` on an identical
    machine: the same result or exception, the same trace records and the same calls seen by
    an interposer installed after the port was made."""
    ms = [pkvm.Machine(memory="64M", cpus=2) for _ in range(2)]
    seen: list[list[tuple]] = [[], []]
    for m, log in zip(ms, seen, strict=True):
        if interposed:
            m.interpose_hvc(lambda proceed, c, f, a, log=log: log.append((c, f, a)) or
                            proceed(c, f, a))
    fast = _outcome(lambda: ms[0].host.port.hvc(cpu, func, *args))
    assert fast == _outcome(lambda: ms[1].hvc(cpu, func, *args))
    assert seen[0] == seen[1] and len(seen[0]) == (1 if interposed else 0)
    recs = [[(r.seq, r.cpu, r.name, r.func_id, r.args, r.x0, r.x1, r.x2, r.x3, r.panic)
             for r in m.trace] for m in ms]
    assert recs[0] == recs[1]


@settings(max_examples=60, deadline=None)
@given(args=st.lists(st.one_of(st.integers(0, 2**64 - 1), st.integers(-(2**70), 2**70),
                               st.booleans(), st.sampled_from(list(ComponentId))), max_size=6),
       cpu=st.integers(0, 1))
def test_the_door_hands_each_argument_over_as_a_64_bit_register(m72, args, cpu):
    """`HvcDoor.call` keeps the caller's argument tuple when every argument is already a
    plain 64-bit int (no copy) and masks them otherwise (negative, wider, a bool, an IntEnum):
    either way x1..x6 and the trace record hold `a & (2**64 - 1)` of each as a plain int, and
    0 in the registers past them."""
    unknown = 0xC600_0000 + 0xFFFF  # no such hypercall: the hyp answers without a handler
    m72.tracing = True
    try:
        m72.hvc(cpu, unknown, *args)
    finally:
        m72.tracing = False
    want = tuple(a & (2**64 - 1) for a in args)
    rec = m72.trace[-1]
    assert rec.args == want and all(type(a) is int for a in rec.args)
    assert m72.el2[cpu].host_regs[1:7] == [*want, *[0] * (6 - len(args))]


@settings(max_examples=100, deadline=None)
@given(regs=st.lists(st.integers(-(2**70), 2**70), min_size=7, max_size=7), n=st.integers(0, 6))
def test_declare_reg_u64_is_the_register_masked(m72, regs, n):
    """`HostCtxt.u64` (the register itself when it already holds 64 bits) is `x & (2**64-1)`."""
    from pkvm.hyp.hyp_main import HostCtxt

    assert HostCtxt(m72._hyp, regs).u64(n) == regs[n] & (2**64 - 1)


# -- the wipe's known holes (round 5) ------------------------------------------------------------
_HOLES_PAGES = 24


_mem_ops = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, _HOLES_PAGES * PAGE_SIZE - 16),
              st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("write_u64"), st.integers(0, _HOLES_PAGES * PAGE_SIZE // 8 - 1),
              st.integers(0, 2**64 - 1)),
    st.tuples(st.just("cpu"), st.integers(0, _HOLES_PAGES * PAGE_SIZE - 16),
              st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("zero"), st.integers(0, _HOLES_PAGES - 1), st.integers(1, 4)),
), max_size=40)


@SETTINGS
@given(ops=_mem_ops)
def test_zero_with_known_holes_agrees_with_asking_the_ram_file_each_time(ops):
    """`PhysMemory.zero` answers a page from the last `SEEK_DATA` that found holes; the same
    stores and wipes on a memory that forgets them before every wipe (the generic path) leave
    the same bytes and the same pages holding data. A store through `write`, `write_u64` or a
    CPU's own mapping of RAM (between `emulator_enter` and `emulator_leave`, as `Core.run`)
    into the known holes must be seen by the next wipe."""
    import ctypes

    from pkvm.machine.memory import PhysMemory, emulator_enter, emulator_leave

    size = (_HOLES_PAGES + 8) * PAGE_SIZE
    fast, generic = PhysMemory(size), PhysMemory(size)
    base = fast.base
    for op, a, b in ops:
        for mem in (fast, generic):
            if op == "write":
                mem.write(base + a, b)
            elif op == "write_u64":
                mem.write_u64(base + 8 * a, b)
            elif op == "cpu":
                emulator_enter()
                try:
                    ctypes.memmove(mem.host_address(base + a), b, len(b))
                finally:
                    emulator_leave()
            else:
                if mem is generic:
                    mem.forget_holes()  # the generic path: every page asked of the file
                n = min(b, _HOLES_PAGES - a)
                mem.zero(base + a * PAGE_SIZE, n * PAGE_SIZE)
                assert mem.read(base + a * PAGE_SIZE, n * PAGE_SIZE) == bytes(n * PAGE_SIZE)
        assert fast.read(base, size) == generic.read(base, size)
    assert [fast.next_data(p * PAGE_SIZE) for p in range(_HOLES_PAGES)] == \
        [generic.next_data(p * PAGE_SIZE) for p in range(_HOLES_PAGES)]


def test_the_known_holes_are_used_and_ram_has_no_other_writer():
    """One `SEEK_DATA` covers the pages up to the next data (the second wipe asks nothing of
    the file: the known holes still start at the first page); RAM's public views are
    read-only, so every store is one `PhysMemory` sees."""
    from pkvm.machine.memory import PhysMemory

    mem = PhysMemory(64 * PAGE_SIZE)
    mem.zero(mem.base, PAGE_SIZE)
    assert (mem._holes_lo, mem._holes_hi) == (0, 64 * PAGE_SIZE)  # the data page past RAM
    mem.zero(mem.base + PAGE_SIZE, PAGE_SIZE)
    assert (mem._holes_lo, mem._holes_hi) == (0, 64 * PAGE_SIZE)  # answered from them
    mem.write_u64(mem.base + 5 * PAGE_SIZE + 8, 1)
    assert (mem._holes_lo, mem._holes_hi) == (0, 5 * PAGE_SIZE)  # cut at the page stored to
    mem.zero(mem.base + 5 * PAGE_SIZE, PAGE_SIZE)
    assert mem.page_is_zero(mem.base + 5 * PAGE_SIZE)
    with pytest.raises(TypeError):
        mem.bytes[0:1] = b"x"  # type: ignore[index]
    with pytest.raises(TypeError):
        mem.u64[0] = 1  # type: ignore[index]


def test_a_cpu_store_into_known_holes_is_wiped():
    """A real CPU run (`Core.run`) stores into a page the memory last found a hole; the next
    wipe of that page leaves it zeros."""
    from pkvm.machine.cpu import Core, CpuContext
    from pkvm.machine.memory import PhysMemory

    mem = PhysMemory(64 * PAGE_SIZE)
    base = mem.base
    mem.write(base, (0xF9000001).to_bytes(4, "little"))  # str x1, [x0]
    mem.zero(base + PAGE_SIZE, PAGE_SIZE)  # a hole: the pages after it are known holes
    assert mem._holes_hi > 2 * PAGE_SIZE
    core = Core()
    core.map(base, mem.size, mem.host_address(base))
    ctx = CpuContext.reset(pc=base)
    ctx.x[0], ctx.x[1] = base + 2 * PAGE_SIZE + 8, 0x1122_3344_5566_7788
    core.load_context(ctx)
    core.run(max_insns=1)
    assert mem.read_u64(base + 2 * PAGE_SIZE + 8) == 0x1122_3344_5566_7788
    mem.zero(base + 2 * PAGE_SIZE, PAGE_SIZE)
    assert mem.page_is_zero(base + 2 * PAGE_SIZE)


def test_a_protected_guests_pages_read_as_zeros_after_teardown():
    """Backing pages that hold data among never-written ones: after the teardown every one
    reads as zeros, and those that were holes are holes still (RAM stays sparse)."""
    m = pkvm.Machine(memory="256M", cpus=2, abi="latest", trace=False)  # 6.12: no pVMs
    vm = m.host.create_vm(vcpus=1, protected=True, memory=48 * PAGE_SIZE)
    gfn = 0x40000
    vm.map(gfn, 1)  # populated: the backing pages exist
    written = {gfn + 5, gfn + 6, gfn + 30}
    for g in written:
        vm.write(g << 12, b"\xa5" * 64)  # the host's own writes, before the page is mapped
    vm.map(gfn, 40)
    mem = m.mem
    pages = {g: vm.mapped[g] for g in range(gfn, gfn + 40)}
    holes = {g for g, pa in pages.items() if mem.next_data(pa - mem.base) > pa - mem.base}
    assert len(holes) > 20 and not holes & written
    vm.destroy()
    for g, pa in pages.items():
        if g in holes:  # asked first: reading a hole through the mapping fills it
            assert mem.next_data(pa - mem.base) > pa - mem.base, hex(g)  # still a hole
        assert mem.page_is_zero(pa), hex(g)


def test_a_reused_ram_forgets_its_known_holes():
    """A fuzzer's reboot reuses the dead machine's RAM (`reuse_ram`), storing the snapshot's
    pages behind `PhysMemory.write`: a page it stores into what the dead machine knew as holes
    holds data afterwards, and the next wipe zeroes it."""
    from pkvm.machine.memory import PhysMemory, reuse_ram

    mem = PhysMemory(64 * PAGE_SIZE)
    mem.write(mem.base, b"\x01")  # page 0 holds data, so the pages after it are holes
    mem.zero(mem.base + PAGE_SIZE, PAGE_SIZE)  # a hole: the pages after it are known holes
    assert mem._holes_hi > 5 * PAGE_SIZE
    page = b"\x07" * PAGE_SIZE
    assert reuse_ram(mem, mem.size, [(5 * PAGE_SIZE, page)]) is mem  # reused, not fresh
    assert mem.read(mem.base, 1) == b"\x00" and mem.read(mem.base + 5 * PAGE_SIZE, 8) == page[:8]
    mem.zero(mem.base + 5 * PAGE_SIZE, PAGE_SIZE)
    assert mem.page_is_zero(mem.base + 5 * PAGE_SIZE)
