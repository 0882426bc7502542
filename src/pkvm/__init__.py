"""pkvm: an executable model of Arm pKVM, the protected KVM hypervisor of Linux on arm64.

    m = pkvm.Machine(memory="2G", cpus=4, abi="latest")
    r = m.hvc(0, "__pkvm_host_share_hyp", pfn)       # r.x0 .. r.x3
    vm = m.host.create_vm(vcpus=2, protected=True, memory="64M")
"""

from pkvm import _compiled

_compiled.choose()  # compiled or the pure source, before any other module of the package loads

from pkvm.board import HvcResult, Machine  # noqa: E402
from pkvm.errors import Errno, HostDataAbort, HostError, HypPanic  # noqa: E402
from pkvm.machine.memory import Region  # noqa: E402

__all__ = ["Machine", "HvcResult", "Region", "Errno", "HostDataAbort", "HostError", "HypPanic"]
__version__ = "0.1.0"
