"""The board a VMM gives its guest (QEMU `virt`-like): device tree, GICv3, generic timer,
PL011; and the Linux VMM built on them (`pkvm.host.platform.linux`)."""
