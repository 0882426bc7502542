"""The untrusted host kernel at EL1 (`arch/arm64/kvm/pkvm.c`, `arm.c`, `mmu.c`).

It reaches the hyp only through `HostPort.hvc`, and memory only through `HostPort.read/write`,
which the hardware checks against the host stage-2. It never imports `pkvm.hyp`.
"""

from pkvm.host.host import Host

__all__ = ["Host"]
