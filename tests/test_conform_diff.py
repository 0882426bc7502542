"""Differential conformance: the model against Linux's own pKVM, step by step (`conform`).

The fixed set is every row of `test_conform_real.py` (the spec's measured tables, VM life cycles
driven through /dev/kvm, the panicking calls); the random set is `RANDOM_BUDGET` deep random
sequences of a fixed seed per kernel (live VMs, loaded vCPUs, pages in every state, page probes).
Each sequence runs on the real kernel under QEMU and on `Machine(abi=...)`; every executed step
must agree, or match an entry of `pkvm.conform.diff.KNOWN_DIFFERENCES` exactly. The same real
answers then judge each model mutant of `conform_mutants.py`: each must be detected.

The offline tests check the comparison, the generator and the reproducers without QEMU.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings

import pytest

import conform_mutants as CM
from pkvm.conform import diff as D
from pkvm.conform import sequences as S
from pkvm.conform.model import model_abi, run_sequence_on_model
from pkvm.conform.real import RawStep, RealResult, vm_create, vm_destroy, vm_run
from test_conform_real import ROWS, setup_or_skip

REAL_KERNELS = ["6.12", "7.2"]
RANDOM_BUDGET, RANDOM_SEED = 60, 7  # the default random budget of CI (per kernel)
_REAL: dict[str, tuple[list, list]] = {}
# The fixed set breaks VMs on purpose (teardown with a vCPU loaded, a forged handle): the model's
# host driver then WARNs when it tears them down at the end. These WARNs are expected, captured.
DRIVER_WARNS = {
    "6.12": ["the hyp VM leaks", "donated allocations never came back"],
    "7.2": ["__pkvm_start_teardown_vm(0x1000) = -22"],
}
DRIVER_WARN = re.compile(r"the hyp VM leaks|never came back|releasing gfn .* failed|"
                         r"__pkvm_start_teardown_vm\(|__pkvm_teardown_vm\(")


def _report(results: list[list[D.StepDiff]]) -> str:
    lines = []
    for si, diffs in enumerate(results):
        for d in diffs:
            if d.status == D.DIFFER:
                lines.append(f"seq {si} step {d.index} {d.step.call}{d.step.args}: model "
                             f"{d.model} {d.model.note!r} vs kernel {d.real} {d.real.note!r} "
                             f"(differs in {d.fields})")
    return "\n".join(lines)


def _random_run(kernel: str) -> tuple[list, list]:
    """The seeded deep random sequences and the real kernel's answers (run once)."""
    if kernel not in _REAL:
        setup_or_skip(kernel)
        from pkvm.conform.real import run_sequences

        seqs = S.random_sequences(kernel, RANDOM_BUDGET, RANDOM_SEED)
        _REAL[kernel] = (seqs, run_sequences(kernel, seqs, per_boot=1))
    return _REAL[kernel]


@pytest.mark.conform
@pytest.mark.parametrize("kernel", REAL_KERNELS)
def test_fixed_set_agrees(kernel):
    setup_or_skip(kernel)
    seqs = [list(r.steps) for r in ROWS if kernel in r.kernels]
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        results = D.run_both(kernel, seqs)
    driver = [str(w.message) for w in warned if DRIVER_WARN.search(str(w.message))]
    for w in warned:  # anything else is not ours to swallow: warn again
        if not DRIVER_WARN.search(str(w.message)):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    assert not any(D.diverges(r) for r in results), _report(results)
    s = D.summarize(results)
    assert s.steps == sum(len(q) for q in seqs) and s.executed > 0
    for want in DRIVER_WARNS[kernel]:
        assert any(want in m for m in driver), (want, driver)


@pytest.mark.conform
@pytest.mark.parametrize("kernel", REAL_KERNELS)
def test_deep_random_sequences_agree(kernel):
    seqs, real = _random_run(kernel)
    results = D.run_both(kernel, seqs, real=real)
    s = D.summarize(results)
    print(f"\n[conform] {kernel}: {s.agree}/{s.executed} executed steps agree, {s.not_run} not "
          f"run, known {dict(s.known)}; hypercalls reaching success "
          f"{S.succeeded(S.coverage(kernel, results))}")
    assert not any(D.diverges(r) for r in results), _report(results)
    # the sequences reach live state on the real kernel: VMs made, vCPUs loaded
    cov = S.coverage(kernel, results)
    assert cov["vmm:create"]["real"]["ok"] > RANDOM_BUDGET // 2
    if kernel == "7.2":
        assert cov["__pkvm_vcpu_load"]["real"]["ok"] > 0


def _mutant_cases() -> list:
    return [pytest.param(m, id=m.name, marks=pytest.mark.xfail(
        strict=True, reason=CM.UNDETECTED[m.name])) if m.name in CM.UNDETECTED else
        pytest.param(m, id=m.name) for m in CM.MUTANTS]


@pytest.mark.conform
@pytest.mark.parametrize("mutant", _mutant_cases())
def test_mutant_is_detected(mutant):
    """Each model mutant diverges from Linux somewhere in the default random budget."""
    if CM.model_is_compiled():  # the pure run of the suite (PKVM_PURE=1) runs each of them
        pytest.skip("a mutant rewrites the hyp's Python source: run pure (PKVM_PURE=1)")
    for kernel in mutant.kernels:
        seqs, real = _random_run(kernel)
        with CM.applied(mutant):
            results = D.run_both(kernel, seqs, real=real)
        assert any(D.diverges(r) for r in results), f"{mutant.name} passes on {kernel}"


# -- offline: the comparison ---------------------------------------------------------------------
def R(x0=0, x1=0, x2=0, x3=0, **kw) -> RealResult:  # noqa: N802
    return RealResult(x0, x1, x2, x3, **kw)


SHARE = "__pkvm_host_share_hyp"


def test_steps_after_a_panic_are_not_run_not_agreeing():
    st = RawStep(SHARE, (1,))
    d = D.compare_step("7.2", 0, st, R(panic=True, note="not run: x", not_run=True), R(0, -1))
    assert d.status == D.NOT_RUN and not d.agree
    s = D.summarize([[d]])
    assert (s.executed, s.not_run, s.agree) == (0, 1, 0)


def test_panics_compare_by_kind():
    st = RawStep("__kvm_adjust_pc", (0,))
    hyp = R(panic=True, note="hyp panic: EL2 data abort")
    oops = R(panic=True, note="host kernel panic (EL1): Oops")
    lock = R(panic=True, note="lockup: harness timeout")
    assert D.compare_step("6.12", 0, st, hyp, R(panic=True, note="hyp panic: HYP panic")).agree
    assert D.compare_step("6.12", 0, st, hyp, oops).fields == ("kind",)
    assert D.compare_step("6.12", 0, st, hyp, lock).status == D.DIFFER
    err = R(panic=True, note="model error: KeyError: 3")
    assert D.compare_step("6.12", 0, st, err, err).status == D.DIFFER


def test_every_register_is_compared_and_symbols_by_identity():
    st = RawStep("__kvm_vcpu_run", ("va:a",))
    mo = R(0, -22, pages={"a": 0x41000}, vas={"a": 0xFFFF_0000_0100_0000})
    re_ = R(0, -2, pages={"a": 0x52000}, vas={"a": 0xFFFF_8000_1234_0000})
    assert D.compare_step("7.2", 0, st, mo, re_).fields == ("x1",)
    # both left x1 as passed: each holds its own VA
    same = D.compare_step("7.2", 0, st, R(-1, 0xFFFF_0000_0100_0000 - 2**64, **_p(mo)),
                          R(-1, 0xFFFF_8000_1234_0000 - 2**64, **_p(re_)))
    assert same.agree
    # one left it, the other wrote a result there
    st2 = RawStep(SHARE, ("page:a",))
    assert not D.compare_step("7.2", 0, st2, R(0, 0x41000, **_p(mo)), R(0, 0, **_p(re_))).agree
    assert D.compare_step("7.2", 0, st2, R(0, 0, 0, 7, **_p(mo)), R(0, 0, 0, 8, **_p(re_))
                          ).fields == ("x3",)


def _p(r: RealResult) -> dict:
    return {"pages": r.pages, "vas": r.vas}


def test_vm_symbols_resolve_to_each_sides_handle():
    seq = [vm_create("vm:v"), RawStep("__pkvm_start_teardown_vm", ("vm:v",))]
    mo = [R(0, 0x1000, 6, 1), R(0, 0x1000)]
    re_ = [R(0, 0x1001, 6, 1), R(0, 0x1001)]  # x1 left as passed on both
    out = D.compare("7.2", seq, mo, re_)
    assert [d.status for d in out] == [D.DIFFER, D.AGREE]  # the handle itself: by value


def test_no_difference_is_excused_and_an_entry_matches_only_its_state():
    st = RawStep("__kvm_adjust_pc", ("va:a",))
    marked = R(panic=True, note="hyp panic: EL2 data abort: hyp VA 0x8000 is not mapped in the "
                                "hyp stage-1 [mapped at EL2 after step 2]")
    assert D.KNOWN_DIFFERENCES == []
    assert D.compare_step("6.12", 0, st, marked, R()).status == D.DIFFER
    k = D.Known("example", "a model panic the kernel does not take, at this call only",
                lambda kernel, s_, mo, re_: s_.call == "__kvm_adjust_pc" and mo.panic)
    D.KNOWN_DIFFERENCES.append(k)
    try:
        d = D.compare_step("6.12", 0, st, marked, R())
        assert d.status == D.KNOWN and d.known == "example" and k.excused["6.12"] == 1
        other = RawStep("__kvm_flush_cpu_context", ("va:a",))
        assert D.compare_step("6.12", 0, other, marked, R()).status == D.DIFFER
    finally:
        D.KNOWN_DIFFERENCES.remove(k)


def test_model_marks_a_fault_on_a_page_it_unmapped_earlier():
    """The model notes when a fault is on a page EL2 had mapped earlier in the sequence."""
    seq = [RawStep(SHARE, ("page:a",)), RawStep("__pkvm_host_unshare_hyp", ("page:a",)),
           RawStep("__kvm_adjust_pc", ("va:a",))]
    out = run_sequence_on_model("6.12", seq)
    assert out[2].kind == "hyp panic"
    assert "[mapped at EL2 after step 0]" in out[2].note
    fresh = run_sequence_on_model("6.12", seq[2:])
    assert fresh[0].kind == "hyp panic" and "[mapped" not in fresh[0].note


def test_a_model_exception_is_a_result_and_the_run_goes_on(monkeypatch):
    from pkvm.hyp import hyp_main

    def broken(h, ctxt):
        raise KeyError("boom")

    # the handler table (a compiled hyp calls its functions directly: only a table entry swaps)
    monkeypatch.setitem(hyp_main.HANDLERS, SHARE, broken)
    monkeypatch.setattr(hyp_main, "_HOST_HCALL", {})  # per-profile tables rebuilt, then dropped
    from pkvm.conform.model import run_sequences_on_model

    out = run_sequences_on_model("7.2", [[RawStep(SHARE, ("page:a",)), RawStep(SHARE, (1,))],
                                         [RawStep("__pkvm_host_unshare_hyp", ("page:a",))]])
    assert out[0][0].kind == "model error" and "KeyError" in out[0][0].note
    assert out[0][1].not_run
    assert out[1][0].x0 == 0 and not out[1][0].panic


def test_model_vmm_steps_answer_as_the_helper():
    out = run_sequence_on_model("7.2", [vm_create("vm:a", 2), vm_run("vm:a", 1), vm_run("vm:a", 5),
                                        vm_destroy("vm:a"), vm_run("vm:a"), vm_run("vm:zz")])
    assert (out[0].x0, out[0].x1, out[0].x2, out[0].x3) == (0, 0x1000, 6, 2)  # MMIO exit
    assert (out[1].x0, out[1].x1, out[1].x2) == (0, 6, 0x0900_0000)  # the UART store
    assert out[2].x0 == -22
    assert [o.x0 for o in out[3:]] == [0, -2, -2]  # gone or never made: -ENOENT


def test_kvm_run_with_another_vcpu_loaded_by_hand_locks_up():
    """Linux 7.2 (seed 1, sequence 14, seen while the helper was not pinned and KVM_RUN ran on
    the CPU of the raw load): a raw `__pkvm_vcpu_load` of vCPU 0 stays loaded on the helper's
    CPU, so KVM_RUN of vCPU 1 there has `pkvm_load_hyp_vcpu` refuse the load and
    `__kvm_vcpu_run` run vCPU 0; KVM then reads vCPU 1's fault ESR (0: an unknown exception
    class), `kvm_handle_unknown_ec` injects an undef and re-enters, for ever: a lockup."""
    steps = [vm_create("vm:a", 2), RawStep("__pkvm_vcpu_load", ("vm:a", 0, 0x8800_6000), cpu=0),
             vm_run("vm:a", 1)]
    out = run_sequence_on_model("7.2", steps)
    assert (out[1].x0, out[1].panic) == (0, False)
    assert out[2].panic and out[2].kind == "lockup", out[2]


# -- offline: the generator and reproducers --------------------------------------------------------
@pytest.mark.parametrize("kernel", REAL_KERNELS)
def test_generator_reaches_every_hypercall_and_live_state(kernel):
    from pkvm.abi.profiles import get_profile

    seqs = S.random_sequences(kernel, RANDOM_BUDGET, RANDOM_SEED)
    steps = [st for q in seqs for st in q]
    calls = {st.call for st in steps}
    names = set(get_profile(model_abi(kernel)).hcalls[1:])
    # every host hypercall but the pointer-following ones (one per sequence at most, 4 %)
    assert names - calls <= S.DEREF | {"__kvm_vcpu_run"}, sorted(names - calls)
    assert {"vmm:create", "vmm:run", "vmm:destroy"} <= calls
    assert {st.cpu for st in steps} == {0, 1}
    assert any(len(st.args) > 3 for st in steps)  # x4..x6
    args = {a for st in steps for a in st.args if isinstance(a, str)}
    assert {"vm:a", "vm:b", "vm:c", "page:s", "va:s"} <= args
    if kernel == "7.2":
        assert any(st.call == "__pkvm_host_share_guest" and st.args[2] in (2, 3, 512)
                   for st in steps)
        assert any(st.call == "vmm:create" and st.args[2] for st in steps)
    assert all(st.call == "__pkvm_host_unshare_hyp" for q in seqs for st in q[-1:]
               if q[-1].call not in S.DEREF | {"__kvm_vcpu_run"})


def test_only_our_own_memory_is_passed_as_a_pointer():
    for kernel in REAL_KERNELS:
        for q in S.random_sequences(kernel, 200, 3):
            for st in q:
                for kind, a in zip(S.SIGS.get(str(st.call), ()), st.args, strict=False):
                    if kind in ("va", "kva", "dva"):
                        assert isinstance(a, str) and a.startswith("va:"), st


@pytest.mark.parametrize("kernel", REAL_KERNELS)
def test_reproducers_round_trip_every_step_kind(kernel, tmp_path):
    from pkvm import scenario as sc

    for i, seq in enumerate(S.random_sequences(kernel, 30, 5)):
        seq = [*seq, RawStep(0xC600_0000 + 77, (2**64 - 1, "pa:p0", "va:p1"), 1)]
        p = tmp_path / f"r{i}.toml"
        D.write_scenario(kernel, seq, str(p))
        loaded = sc.load(p)
        assert D.from_scenario(loaded) == seq
        loaded.run()  # the model replays it (pkvm run)


def test_reproducer_carries_the_kernels_answers(tmp_path):
    from pkvm import scenario as sc

    seq = [RawStep(SHARE, (5,)), RawStep("__kvm_adjust_pc", (0,))]
    D.write_scenario("7.2", seq, str(tmp_path / "r.toml"),
                     [R(0, -22), R(panic=True, note="hyp panic: x")])
    s = sc.load(tmp_path / "r.toml")
    assert s.steps[0].expect == {"x0": 0, "x1": -22}
    assert s.steps[1].expect == {"panic": True}


def test_mutants_apply_and_restore():
    if CM.model_is_compiled():  # mutants rewrite the Python source: they apply to the pure model
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            f"{__file__}::test_mutants_apply_and_restore"],
                           env={**os.environ, "PKVM_PURE": "1"}, capture_output=True, text=True)
        assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout[-3000:]
        with pytest.raises(RuntimeError, match="is compiled"), CM.applied(CM.MUTANTS[0]):
            pass
        return
    from pkvm.hyp import mem_protect

    orig = mem_protect.host_share_hyp
    for m in CM.MUTANTS:
        with CM.applied(m):
            pass
    assert mem_protect.host_share_hyp is orig
    with CM.applied(CM.MUTANTS[0]):
        assert mem_protect.host_share_hyp is not orig


@pytest.mark.parametrize("kernel", REAL_KERNELS)
def test_run_after_the_hyp_vm_is_gone_panics_the_host(kernel):
    """handle_exit_early: a negative __kvm_vcpu_run return reads as a pending SError, fatal."""
    teardown = "__pkvm_teardown_vm" if kernel == "6.12" else "__pkvm_start_teardown_vm"
    out = run_sequence_on_model(kernel, [vm_create("vm:a"), RawStep(teardown, ("vm:a",)),
                                         vm_run("vm:a"), vm_run("vm:a")])
    assert out[1].x1 == 0
    assert out[2].kind == "host oops" and "__kvm_vcpu_run = -22" in out[2].note
    assert out[3].not_run


def test_run_after_a_finalized_teardown_is_a_hyp_panic():
    """7.2's kvm_arch_vcpu_load hands the hyp the host vCPU's vGIC state; once the hyp VM is
    gone the hyp no longer maps that vCPU and the access panics it (Linux, measured)."""
    out = run_sequence_on_model("7.2", [vm_create("vm:a", 2),
                                        RawStep("__pkvm_start_teardown_vm", ("vm:a",)),
                                        RawStep("__pkvm_finalize_teardown_vm", ("vm:a",)),
                                        vm_run("vm:a")])
    assert [o.x1 for o in out[1:3]] == [0, 0]
    assert out[3].kind == "hyp panic" and "EL2 data abort" in out[3].note


def test_docs_comparison_snippet_runs():
    """docs/conform.md's offline example (the others need QEMU: the `conform` tests run them)."""
    import re
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "conform.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "compare_step" in b]
    assert blocks
    for b in blocks:
        exec(compile(b, "docs/conform.md", "exec"), {})  # noqa: S102


# -- divergences the deep random sequences found (fixed in the model) ----------------------------
@pytest.mark.parametrize("gfn,panics", [(1 << 40, True), (0x8458_6557_D99D_5D90, True),
                                        (0x1004_0000, False), (0x40000, False)])
def test_test_clear_young_past_the_ipa_range_is_a_hyp_bug(gfn, panics):
    """7.2: kvm_pgtable_stage2_test_clear_young WARNs when the walk fails (an IPA past the
    guest's range); at EL2 a WARN is fatal. Linux 7.2.13 under QEMU: nVHE hyp BUG."""
    out = run_sequence_on_model("7.2", [vm_create("vm:a"), RawStep(
        "__pkvm_host_test_clear_young_guest", ("vm:a", gfn, 1, 1))])
    assert (out[1].kind == "hyp panic") == panics
    if panics:
        assert "kvm_pgtable_stage2_test_clear_young" in out[1].note


def test_topup_fills_the_vcpu_memcache_as_the_helper_does():
    from pkvm.conform.real import vm_topup

    out = run_sequence_on_model("7.2", [vm_create("vm:a"), vm_topup("vm:a", 0, 4),
                                        vm_topup("vm:a", 0, 2), vm_topup("vm:a", 3, 1),
                                        vm_destroy("vm:a"), vm_topup("vm:a", 0, 1)])
    # the destroy reads the guest RAM back: the guest's code (two 64-bit words) is still there
    assert [(o.x0, o.x1) for o in out[1:]] == [(0, 4), (0, 4), (-22, 0), (0, 2), (-2, 0)]


@pytest.mark.parametrize("protected, words", [(False, 2), (True, 0)])
def test_destroy_reads_the_guest_ram_back(protected, words):
    """A protected guest's pages come back wiped; a normal guest's were only shared."""
    out = run_sequence_on_model("7.2", [vm_create("vm:a", 1, protected), vm_destroy("vm:a")])
    assert (out[1].x0, out[1].x1, out[1].x2) == (0, words, 0)


def test_host_read_probe_faults_on_a_page_the_host_gave_away():
    from pkvm.conform.real import host_read, vm_topup

    load = RawStep("__pkvm_vcpu_load", ("vm:a", 0, S.HCR_GUEST))
    seq = [host_read("page:p"), vm_create("vm:a", 1, True), vm_topup("vm:a", 0, 4), load,
           RawStep("__pkvm_host_donate_guest", ("page:p", S.GUEST_GFN + 3)),
           RawStep("__pkvm_vcpu_put", ()), host_read("page:p"), host_read("page:q")]
    out = run_sequence_on_model("7.2", seq)
    assert out[4].x1 == 0  # donated
    assert [(o.x0, o.x1) for o in (out[0], out[6], out[7])] == [(0, 0), (-14, 0), (0, 0)]
    assert all(S.probes(seq)[i].call == "host:read" for i in (0, 3))
