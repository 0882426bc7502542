"""The hardware both worlds run on: RAM, the MMU's stage-2 walk, the CPU emulator."""
