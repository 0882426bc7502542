"""The fuzzer's and the host driver's short cuts agree with the generic code (issue 17, round 8).

A vCPU reset's packed `arch.ctxt` kept per (pc, x0, index, bytes before) (`VcpuRunner.reset`),
the fuzzer's interposer's arguments as registers written out for the usual counts
(`World._log_call`), its inner steps run without a `Step` (`run_op`), its results counted from
the kept records when read (`World.count_results`, no listener frame per call), and the port's
stores translated and logged inline (`HostPort.write` / `zero`): each gives what the generic
code gives.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from pkvm.abi.host_structs import CTXT_END, CTXT_START, ctxt_pack
from pkvm.board import Machine
from pkvm.check import fuzz_ops
from pkvm.check.ffa_ops import smc_result_label
from pkvm.check.fuzz_ops import Step, World, run_op, run_step
from pkvm.errors import HostDataAbort, HostError, HypPanic
from pkvm.host import vcpu_run
from pkvm.host.vcpu_run import reset_context
from pkvm.machine.memory import PAGE_SIZE

U64 = 0xFFFF_FFFF_FFFF_FFFF
_M = Machine(memory="64M", cpus=2, trace=False)
_VM = _M.host.create_vm(vcpus=3, memory="256K")


@settings(max_examples=60, deadline=None)
@given(base=st.binary(min_size=CTXT_END - CTXT_START, max_size=CTXT_END - CTXT_START),
       pc=st.sampled_from([0x4000_0000, 0x4008_0000, 0]), x0=st.sampled_from([0, 1, 0x4800_0000]),
       idx=st.integers(0, 2), again=st.booleans())
def test_reset_is_set_regs_of_reset_context(base: bytes, pc: int, x0: int, idx: int,
                                            again: bool) -> None:
    vcpu = _VM.vcpus[idx]
    want = ctxt_pack(reset_context(pc, x0, idx), base)
    for _ in range(2 if again else 1):  # (the second from `_RESET_PACKED`)
        _M.host.write(vcpu.pa + CTXT_START, base)
        vcpu.runner.reset(pc, x0)
        assert _M.host.read(vcpu.pa + CTXT_START, CTXT_END - CTXT_START) == want
    assert len(vcpu_run._RESET_PACKED) <= vcpu_run._RESET_PACKED_MAX


_ARG = st.one_of(st.integers(0, U64), st.integers(-(1 << 70), 1 << 70), st.booleans())


@settings(max_examples=40, deadline=None)
@given(args=st.lists(_ARG, max_size=6))
def test_log_call_masks_as_the_generic_tuple(args: list[int]) -> None:
    w = _WORLD
    del w.log[:]
    try:
        w.hvc(0, "__pkvm_host_share_hyp", *args)
    except (TypeError, ValueError, HypPanic):
        pass
    ev = w.log[0]
    assert ev[:3] == ["hvc", 0, "__pkvm_host_share_hyp"]
    assert ev[3] == tuple([a & U64 for a in args])
    assert [type(a) for a in ev[3]] == [int] * len(args)


_WORLD = World("64M", 2, "latest", (), check=False)


def test_run_op_is_run_step() -> None:
    """The same steps through `run_step` and `run_op` leave the same log and results."""
    steps = [Step("alloc", 0), Step("share", 3, (("special", 0),)), Step("create_vm", 1, (2, True)),
             Step("map", 0, (0, 3, 2)), Step("session", 1, (0, 1, 1, [("share_guest", (
                 ("shared", 0), 2, 1, 0xF)), ("put", ())])),
             Step("race", 0, (7, 1, ("share", (("edge", 1),)))), Step("destroy", 0, (0,))]
    worlds = [World("64M", 2, "latest", ()), World("64M", 2, "latest", ())]
    for s in steps:
        outcomes = []
        for k, w in enumerate(worlds):
            try:
                run_step(w, s) if k == 0 else run_op(w, s.cpu % 2, s.op, s.a)
                outcomes.append(None)
            except (HostError, HostDataAbort, MemoryError, HypPanic) as e:
                outcomes.append(type(e))
        assert outcomes[0] == outcomes[1]
    assert worlds[0].log == worlds[1].log and worlds[0].results == worlds[1].results


def test_port_stores_log_and_observe_as_before() -> None:
    m = Machine(memory="64M", cpus=2, trace=False)
    log: list[tuple[str, int, int, bytes | int]] = []
    seen: list[tuple[int, int, bytes | int]] = []
    m.host_port.log_stores(log)
    m.host_port.observe_stores(lambda cpu, pa, d: seen.append((cpu, pa, d)))
    pa = m.host.alloc_pages(2)
    m.host_port.write(1, pa + 8, b"abc")
    m.host_port.write(0, pa + PAGE_SIZE - 2, b"wxyz")  # two pages
    m.host_port.zero(0, pa + PAGE_SIZE, PAGE_SIZE)
    assert log == [("zero", 0, pa, 2 * PAGE_SIZE), ("write", 1, pa + 8, b"abc"),
                   ("write", 0, pa + PAGE_SIZE - 2, b"wxyz"), ("zero", 0, pa + PAGE_SIZE, PAGE_SIZE)]
    assert seen == [e[1:] for e in log] and type(log[1][3]) is bytes
    assert m.host.read(pa + 8, 3) == b"abc" and m.host.read(pa + PAGE_SIZE - 2, 2) == b"wx"


def _per_call_count(results: Counter[Any], rec: Any) -> None:
    """The listener the fuzzer had: each call's result counted as it returned."""
    if rec.panic is not None:
        return
    if rec.name.startswith("smc:"):
        key = (rec.name, smc_result_label(rec))
    else:
        key = (rec.name, fuzz_ops._result_label(rec.x0, rec.x1))
    results[key] += 1


def test_results_counted_from_records_as_per_call() -> None:
    """`count_results` (at any point, any number of times) gives the per-call listener's count."""
    w = World("64M", 2, "latest", ())
    want: Counter[Any] = Counter()
    w.m.listeners.append(lambda rec: _per_call_count(want, rec))
    steps = [Step("alloc", 0)] + [Step("share", 0, (("special", k),)) for k in range(14)] + [
        Step("create_vm", 1, (2, False)), Step("map", 0, (0, 3, 2)), Step("unshare", 1, (("edge", 2),)),
        Step("raw", 0, ("__pkvm_host_share_hyp", 1 << 60)), Step("reserve", 1), Step("put", 0),
        Step("load", 1, (("vm", 0), 0)), Step("destroy", 0, (0,))]
    for k, s in enumerate(steps):
        try:
            run_step(w, s)
        except (HostError, HostDataAbort, MemoryError):
            pass
        if k % 5 == 0:
            assert w.count_results() == want
    assert w.count_results() == want and not w.recs and sum(want.values()) > 20
