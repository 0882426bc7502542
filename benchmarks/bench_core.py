"""Figures for the foundation and VM-state issues (prints them; not a test).

    .venv/bin/python benchmarks/bench_core.py [--quick]

- share+unshare round trips per second (one hypercall = half a round trip), both profiles
- boot time and resident memory of a 2 GiB and a 16 GiB machine (each in a fresh process)
- VM create+teardown per second (1 and 8 vCPUs)
- a protected VM with 1 GiB of guest memory: create -> map all -> teardown -> reclaim, and RSS
"""

from __future__ import annotations

import json
import subprocess
import sys
import time


def child(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


BOOT = """
import json, resource, time
t = time.perf_counter()
import pkvm
t_import = time.perf_counter() - t
t = time.perf_counter()
m = pkvm.Machine(memory="{mem}", cpus=4, abi="{abi}")
dt = time.perf_counter() - t
print(json.dumps({{"boot_s": dt, "import_s": t_import,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

VM1G = """
import json, resource, time
import pkvm
m = pkvm.Machine(memory="2G", cpus=2)
pages = {pages}
t = time.perf_counter()
vm = m.host.create_vm(vcpus=1, protected=True, memory=pages * 4096)
t1 = time.perf_counter()
vm.map(0x40000, pages)
t2 = time.perf_counter()
vm.destroy()
t3 = time.perf_counter()
print(json.dumps({{"create_s": t1 - t, "map_s": t2 - t1, "teardown_s": t3 - t2, "total_s": t3 - t,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def share_unshare(abi: str, n: int) -> float:
    import pkvm

    m = pkvm.Machine(memory="1G", cpus=2, abi=abi, trace=False)
    pfn = m.host.alloc_pages(1) >> 12
    hvc = m.hvc
    t = time.perf_counter()
    for _ in range(n):
        hvc(0, "__pkvm_host_share_hyp", pfn)
        hvc(0, "__pkvm_host_unshare_hyp", pfn)
    return n / (time.perf_counter() - t)


def vm_cycles(vcpus: int, n: int) -> float:
    import pkvm

    m = pkvm.Machine(memory="1G", cpus=2, trace=False)
    t = time.perf_counter()
    for _ in range(n):
        vm = m.host.create_vm(vcpus=vcpus, memory="16M")
        vm.map(0x40000, 1)  # creates the hyp VM and vCPU 0 (7.2 creates them lazily)
        vm.destroy()
    return n / (time.perf_counter() - t)


def main() -> None:
    quick = "--quick" in sys.argv
    n = 2000 if quick else 20000
    print("# pkvm core benchmarks")
    for abi in ("latest", "6.12"):
        rt = share_unshare(abi, n)
        print(f"share+unshare round trips/s ({abi}): {rt:,.0f}  -> {1e6 / (2 * rt):.1f} us per hypercall")
    for mem in ("2G", "16G"):
        for abi in ("latest", "6.12"):
            r = child(BOOT.format(mem=mem, abi=abi))
            print(f"boot {mem} ({abi}): {r['boot_s']:.3f} s, peak RSS {r['rss_mb']:.0f} MB "
                  f"(import {r['import_s']:.2f} s)")
    for vcpus in (1, 8):
        print(f"VM create+map 1 page+teardown/s, {vcpus} vCPU: {vm_cycles(vcpus, 20 if quick else 100):.1f}")
    pages = 16384 if quick else 262144
    r = child(VM1G.format(pages=pages))
    print(f"protected VM, {pages * 4 // 1024} MiB: create {r['create_s']:.3f} s, map all "
          f"{r['map_s']:.2f} s, teardown+reclaim {r['teardown_s']:.2f} s, total {r['total_s']:.2f} s, "
          f"peak RSS {r['rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
