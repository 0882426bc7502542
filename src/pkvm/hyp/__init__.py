"""EL2: the pKVM hypervisor. Nothing outside this package (but the board and the read-only
view) touches its state; the host reaches it only through the hypercall entry point."""
