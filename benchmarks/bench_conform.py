"""How fast the real-kernel side of ``pkvm conform`` runs hypercall sequences.

    python benchmarks/bench_conform.py [--kernels 6.12 7.2] [--sequences 256] [--jobs 1 2]

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
from pkvm.conform.setup import KERNELS, ensure_setup


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", nargs="*", default=list(KERNELS))
    ap.add_argument("--sequences", type=int, default=256)
    ap.add_argument("--panics", type=int, default=4)
    ap.add_argument("--jobs", type=int, nargs="*", default=[1, 2])
    a = ap.parse_args()
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
