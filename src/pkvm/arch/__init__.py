"""Code Linux builds into both the host kernel and EL2 (`arch/arm64/kvm/hyp/pgtable.c` is
linked into each): neither world owns it, both import it."""
