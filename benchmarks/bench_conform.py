"""How fast the real-kernel side of ``pkvm conform`` runs hypercall sequences, and the tool's
own figures.

    python benchmarks/bench_conform.py [--kernels 6.12 7.2] [--sequences 256] [--jobs 1 2]
    python benchmarks/bench_conform.py --figures [--random 1000] [--seed 1] [--jobs 2]
    python benchmarks/bench_conform.py --mutants

``--figures``: deep random sequences of a fixed seed per kernel, run in chunks of 50 that
alternate the real side and the model: agreement over executed steps (each known difference's
excused steps apart), hypercalls reaching success on the real kernel, sequences per minute
(both sides, set-up excluded). ``--mutants``: the mutation score, each model mutant of
``tests/conform_mutants.py`` against the real answers to the default random budget of the
tests (``tests/test_conform_diff.py``: RANDOM_BUDGET sequences of RANDOM_SEED).

Prints, per kernel: set-up time (warm: everything cached), one boot with an empty sequence,
sequences per minute for 4-step sequences that do not panic (they share a machine, 256 per
machine), and for sequences that end in a hyp panic (one machine each). Machines are restored
from a QEMU snapshot (the default) unless PKVM_CONFORM_SNAPSHOT=0. Needs the set-up
(``python -m pkvm.conform.setup``), which this runs first.
"""

from __future__ import annotations

import argparse
import time

from pkvm.conform.real import BootLog, RawStep, run_sequences
from pkvm.conform.setup import REAL_KERNELS, ensure_setup, profile_of


def plain_sequence(i: int) -> list[RawStep]:
    page = f"page:p{i}"
    return [
        RawStep("__pkvm_host_share_hyp", (page,)),
        RawStep("__pkvm_host_share_hyp", (page,)),
        RawStep("__pkvm_host_unshare_hyp", (page,)),
        RawStep("__kvm_flush_vm_context"),
    ]


def panic_sequence(i: int) -> list[RawStep]:
    return [RawStep("__kvm_flush_vm_context"), RawStep("__kvm_adjust_pc")]


def rate(kernel: str, seqs: list[list[RawStep]], jobs: int) -> tuple[float, list[BootLog]]:
    logs: list[BootLog] = []
    t0 = time.monotonic()
    run_sequences(kernel, seqs, jobs=jobs, logs=logs)
    return len(seqs) / (time.monotonic() - t0) * 60.0, logs


def figures(kernel: str, n: int, seed: int, jobs: int) -> None:
    from pkvm.conform import diff as D
    from pkvm.conform import sequences as S
    from pkvm.conform.model import run_sequences_on_model

    ensure_setup(kernel, progress=True)  # outside the timed region
    seqs = S.random_sequences(kernel, n, seed)
    results: list = []
    t_real = t_model = 0.0
    for i in range(0, n, 50):  # interleave the two sides
        chunk = seqs[i : i + 50]
        t0 = time.monotonic()
        real = run_sequences(kernel, chunk, per_boot=1, jobs=jobs)
        t1 = time.monotonic()
        model = run_sequences_on_model(kernel, chunk)
        t_model += time.monotonic() - t1
        t_real += t1 - t0
        done = [D.compare(kernel, q, mo, r) for q, mo, r in zip(chunk, model, real)]
        for si, diffs in enumerate(done, start=i):
            _print_divergences(si, diffs)
        results += done
        s = D.summarize(results)
        ok, total = S.succeeded(S.coverage(kernel, results))
        print(f"{kernel}: after {len(results)} sequences: {s.agree}/{s.executed} agree, "
              f"{s.differ} differ, {s.not_run} not run, {ok}/{total} hypercalls reached "
              f"success ({(t_real + t_model) / 60:.1f} min)", flush=True)
    s = D.summarize(results)
    ok, total = S.succeeded(S.coverage(kernel, results))
    print(f"{kernel}: {n} deep random sequences (seed {seed}): {s.agree}/{s.executed} executed "
          f"steps agree ({s.percent:.2f} %), {s.differ} differ, known {dict(s.known)}, "
          f"{s.not_run} not run after a panic")
    print(f"{kernel}: host hypercalls reaching success on Linux: {ok}/{total}")
    print(f"{kernel}: {n / (t_real + t_model) * 60:.0f} sequences/min both sides (real "
          f"{n / t_real * 60:.0f}/min with jobs={jobs}, model {n / t_model * 60:.0f}/min)")


def _print_divergences(si: int, diffs: list) -> None:
    for d in diffs:
        if d.status == "differ":
            print(f"  differs: seq {si} step {d.index} {d.step.call}{d.step.args}: model "
                  f"{d.model.x0}/{d.model.x1} {d.model.kind} vs kernel {d.real.x0}/"
                  f"{d.real.x1} {d.real.kind} {d.real.note[:80]}", flush=True)


def mutation_score(kernels: list[str]) -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import conform_mutants as CM  # noqa: E402
    from pkvm.conform import diff as D
    from pkvm.conform import sequences as S
    from test_conform_diff import RANDOM_BUDGET, RANDOM_SEED  # noqa: E402

    real = {}
    base = {}  # the unmutated model's verdict per step: a mutant counts only where it agreed
    for k in kernels:
        ensure_setup(k, progress=True)
        seqs = S.random_sequences(k, RANDOM_BUDGET, RANDOM_SEED)
        real[k] = (seqs, run_sequences(k, seqs, per_boot=1))
        res = D.run_both(k, seqs, real=real[k][1])
        base[k] = [[d.status for d in r] for r in res]
        s = D.summarize(res)
        print(f"unmutated model {k:5}: {s.agree}/{s.executed} executed steps agree")
    detected = total = 0
    for m in CM.MUTANTS:
        for k in m.kernels:
            if k not in real:
                continue
            seqs, answers = real[k]
            with CM.applied(m):
                res = D.run_both(k, seqs, real=answers)
            hit = [d for r, b in zip(res, base[k]) for d, was in zip(r, b)
                   if d.status == "differ" and was == "agree"]
            total += 1
            detected += bool(hit)
            where = f"first at {hit[0].step.call}" if hit else "NOT detected"
            print(f"mutant {m.name:28} {k:5}: {len(hit):4} differing steps, {where}")
    print(f"mutation score: {detected}/{total} (budget {RANDOM_BUDGET} sequences, seed "
          f"{RANDOM_SEED}, per kernel)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--figures", action="store_true")
    ap.add_argument("--mutants", action="store_true")
    ap.add_argument("--random", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--kernels", nargs="*", default=list(REAL_KERNELS))
    ap.add_argument("--sequences", type=int, default=256)
    ap.add_argument("--panics", type=int, default=4)
    ap.add_argument("--jobs", type=int, nargs="*", default=[1, 2])
    a = ap.parse_args()
    if a.figures or a.mutants:
        kernels = [profile_of(k).name for k in a.kernels]  # "latest" -> "7.2"
        for k in kernels if a.figures else []:
            figures(k, a.random, a.seed, max(a.jobs))
        if a.mutants:
            mutation_score(kernels)
        return
    for k in a.kernels:
        t0 = time.monotonic()
        ensure_setup(k, progress=True)
        print(f"{k}: set-up (warm) {time.monotonic() - t0:.2f} s")
        logs: list[BootLog] = []
        run_sequences(k, [[]], logs=logs, snapshot=False)
        print(f"{k}: one boot (module load, empty sequence) {logs[0].seconds:.1f} s")
        logs = []
        run_sequences(k, [[]], logs=logs)
        print(f"{k}: one snapshot restore (empty sequence) {logs[0].seconds:.1f} s")
        for jobs in a.jobs:
            per_min, logs = rate(k, [plain_sequence(i) for i in range(a.sequences)], jobs)
            print(
                f"{k}: {per_min:7.0f} sequences/min  ({a.sequences} x 4 steps, {len(logs)} "
                f"machines, jobs={jobs})"
            )
            per_min, logs = rate(k, [panic_sequence(i) for i in range(a.panics)], jobs)
            print(
                f"{k}: {per_min:7.0f} panicking sequences/min  ({a.panics}, one machine each, "
                f"jobs={jobs})"
            )


if __name__ == "__main__":
    main()
