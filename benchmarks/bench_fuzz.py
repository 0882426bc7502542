"""Checked hostile hypercalls per second: the fuzzer on `Machine(check=True)`, 1 vs 2 processes.

    .venv/bin/python benchmarks/bench_fuzz.py [--steps N] [--abi latest|6.12] [--full-every K]

Also measures the raw model (check=False) and the checker's cost on a share/unshare loop.
Target (issue 5): >= 20 000 checked hostile hypercalls/s per core.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import time

import pkvm
from pkvm.check.fuzz import execute, generate


def _fuzz(args: tuple[str, int, int]) -> tuple[int, float]:
    abi, seed, steps = args
    prof = pkvm.Machine(memory="64M", cpus=2, abi=abi, trace=False).profile
    plan = generate(random.Random(seed), prof, 2, steps)
    t0 = time.perf_counter()
    r = execute(plan, "64M", 2, abi)
    return sum(r.calls.values()), time.perf_counter() - t0


def share_loop(abi: str, check: bool, n: int = 5000) -> float:
    m = pkvm.Machine(memory="64M", cpus=2, abi=abi, trace=False, check=check)
    pfn = m.host.alloc_pages(1) >> 12
    t0 = time.perf_counter()
    for _ in range(n):
        m.hvc(0, "__pkvm_host_share_hyp", pfn)
        m.hvc(1, "__pkvm_host_unshare_hyp", pfn)
    return 2 * n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--abi", default="latest")
    a = ap.parse_args()
    for check in (False, True):
        rate = share_loop(a.abi, check)
        print(f"share/unshare loop, check={check}: {rate:,.0f} calls/s")
    calls, secs = _fuzz((a.abi, 0, a.steps))
    print(f"fuzz, 1 process : {calls} checked calls in {secs:.2f}s = {calls / secs:,.0f} calls/s")
    t0 = time.perf_counter()
    with mp.Pool(2) as pool:
        out = pool.map(_fuzz, [(a.abi, 0, a.steps), (a.abi, 1, a.steps)])
    wall = time.perf_counter() - t0
    total = sum(c for c, _ in out)
    print(f"fuzz, 2 processes: {total} checked calls in {wall:.2f}s wall = {total / wall:,.0f} "
          f"calls/s ({total / wall / 2:,.0f} per process)")


if __name__ == "__main__":
    main()
