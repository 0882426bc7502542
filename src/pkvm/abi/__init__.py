"""What host and hyp share by construction, as the kernel's shared headers do.

`profiles` (`asm/kvm_asm.h` per kernel), `sizes` (`asm/kvm_pkvm.h`), `host_structs` (the layout of
the host's `struct kvm` / `struct kvm_vcpu` in host memory). Both `pkvm.host` and `pkvm.hyp`
import these; neither imports the other.
"""
