"""The machine's public doors for checkers: hypercall and SMC interposers, host-store observers,
a host port of one's own, and the read-only hyp view."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pkvm
from pkvm.board import HvcResult, Interposer, Proceed, SmcProceed, SmcResult


def _machine(abi: str = "latest") -> pkvm.Machine:
    return pkvm.Machine(memory="64M", cpus=2, abi=abi, trace=False)


def test_interposers_nest_last_outermost_and_see_every_call() -> None:
    m = _machine()
    order: list[str] = []

    def wrap(tag: str) -> Interposer:
        def fn(proceed: Proceed, cpu: int, func: str | int, args: tuple[int, ...]) -> HvcResult:
            order.append(f"{tag} before {func}")
            r: HvcResult = proceed(cpu, func, args)
            order.append(f"{tag} after x1={r.x1}")
            return r
        return fn

    m.interpose_hvc(wrap("inner"))
    m.interpose_hvc(wrap("outer"))
    pa = m.host.alloc_pages(1)
    m.host.hvc("__pkvm_host_share_hyp", pa >> 12)  # the host driver's own call goes through too
    assert order == ["outer before __pkvm_host_share_hyp", "inner before __pkvm_host_share_hyp",
                     "inner after x1=0", "outer after x1=0"]


def test_smc_interposer_sees_the_call_and_its_result() -> None:
    m = _machine()
    seen: list[tuple[int, int]] = []

    def fn(proceed: SmcProceed, cpu: int, func: str | int, args: tuple[int, ...],
           imm: int) -> SmcResult:
        r = proceed(cpu, func, args, imm)
        seen.append((int(func), r.regs[0]))
        return r

    m.interpose_smc(fn)
    r = m.smc(0, 0x8400_0000)  # PSCI_VERSION
    assert seen == [(0x8400_0000, r.regs[0])] and r.path == "psci"


@pytest.mark.parametrize("abi", ["latest", "6.12"])
def test_store_observers_see_only_stores_the_stage2_let_through(abi: str) -> None:
    m = _machine(abi)
    stores: list[tuple[int, int, bytes | int]] = []
    m.host_port.observe_stores(lambda cpu, pa, data: stores.append((cpu, pa, data)))
    assert m.host.port is m.host_port
    pa = m.host.alloc_pages(1)
    m.host.write(pa + 8, b"abc")
    m.host.write_u64(pa, 7)
    assert stores == [(0, pa, 4096), (0, pa + 8, b"abc"), (0, pa, (7).to_bytes(8, "little"))]
    other = m.new_host_port()
    other.write(1, pa, b"z")  # a second door: its own observers, none here
    assert len(stores) == 3 and m.host.read(pa, 1) == b"z"
    with pytest.raises(pkvm.HostDataAbort) as abort:
        other.write(1, m.carveout[0], b"x")  # hyp memory: refused by the host stage-2
    assert abort.value.fatal == (abi == "6.12")  # 6.12's handle_host_mem_abort BUG_ONs
    assert (m.dead is not None) == (abi == "6.12")
    assert len(stores) == 3


def test_hyp_view_is_read_only() -> None:
    m = _machine()
    view = m.inspect.hyp_view()
    for arr in (view.vmemmap.refcount, view.vmemmap.host_state, view.vmemmap.hyp_state,
                view.vmemmap.host_share_guest_count, view.mem.u64):
        with pytest.raises(TypeError):
            arr[0] = 1
    assert isinstance(view.vm_table, tuple) and isinstance(view.loaded_hyp_vcpu, tuple)
    vm = m.host.create_vm(vcpus=1, memory="256K")
    vm.ensure_hyp_vcpu(vm.vcpus[0])  # the hyp VM exists from the first hyp vCPU on
    assert [hd for hd, _ in view.live_vms()] == [vm.handle]
    assert view.hyp_state(m.carveout[0]).name == "OWNED"


def _recording(tag: str, events: list[tuple]) -> Interposer:
    def fn(proceed: Proceed, cpu: int, func: str | int, args: tuple[int, ...]) -> HvcResult:
        events.append((tag, "before", func, args))
        r: HvcResult = proceed(cpu, func, args)
        events.append((tag, "after", r.x0, r.x1))
        return r
    return fn


@settings(max_examples=15, deadline=None)
@given(st.lists(st.one_of(st.just("install"), st.tuples(st.integers(0, 1), st.integers(0, 7),
                                                          st.booleans())), max_size=12))
def test_the_composed_chain_is_the_generic_way_through_the_interposers(plan: list) -> None:
    """`interpose_hvc` composes the chain once (`Machine.hvc` and the host port's compiled
    `hvc` run it); `Machine._interpose` is the generic way, the interposers looked up at each
    call: installs and calls in any order give the same calls, order, results and state."""
    fast, generic = _machine(), _machine()
    seen: dict[int, list[tuple]] = {id(fast): [], id(generic): []}
    results: dict[int, list[tuple]] = {id(fast): [], id(generic): []}
    for m in (fast, generic):
        pfns = [m.host.alloc_pages(1) >> 12 for _ in range(4)]
        n = 0
        for item in plan:
            if item == "install":
                m.interpose_hvc(_recording(f"i{n}", seen[id(m)]))
                n += 1
                continue
            cpu, k, share = item
            func = "__pkvm_host_share_hyp" if share else "__pkvm_host_unshare_hyp"
            if m is generic and n:
                r = m._interpose(cpu, func, (pfns[k % 4],))
            elif k & 4:  # the host's own door
                r = m.host_port.hvc(cpu, func, pfns[k % 4])
            else:
                r = m.hvc(cpu, func, pfns[k % 4])
            results[id(m)].append((r.x0, r.x1, r.x2, r.x3))
    assert seen[id(fast)] == seen[id(generic)]
    assert results[id(fast)] == results[id(generic)]
    assert fast.inspect.page_states() == generic.inspect.page_states()


def test_the_composed_smc_chain_is_the_generic_way() -> None:
    """As above, for `interpose_smc` and `Machine._smc_interposed`."""
    fast, generic = _machine(), _machine()
    seen: dict[int, list[tuple]] = {id(fast): [], id(generic): []}
    for m in (fast, generic):
        for tag in ("inner", "outer"):
            def fn(proceed: SmcProceed, cpu: int, func: str | int, args: tuple[int, ...],
                   imm: int, tag: str = tag, out: list = seen[id(m)]) -> SmcResult:
                out.append((tag, func, args))
                r = proceed(cpu, func, args, imm)
                out.append((tag, r.regs[:4]))
                return r
            m.interpose_smc(fn)
    for func in (0x8400_0000, 0x8400_000A):
        a = fast.smc(0, func, 0x8000_0000)
        b = generic._smc_interposed(1, 0, func, (0x8000_0000,), 0)
        assert a == b
    assert seen[id(fast)] == seen[id(generic)] and len(seen[id(fast)]) == 8
