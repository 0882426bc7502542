#!/bin/sh
# Build the conformance-only guests (probe.S) into raw images beside them (committed). Needs
# Debian's binutils-aarch64-linux-gnu; the printing helpers come from guests/lib.S.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
lib="$here/../../../../guests"
cross=${CROSS_COMPILE:-aarch64-linux-gnu-}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for src in "$here"/probe.S; do
    name=$(basename "$src" .S)
    "${cross}as" -I "$lib" -o "$tmp/$name.o" "$src"
    "${cross}ld" -T "$lib/guest.ld" -o "$tmp/$name.elf" "$tmp/$name.o"
    "${cross}objcopy" -O binary "$tmp/$name.elf" "$here/$name.bin"
    echo "built $name.bin ($(wc -c < "$here/$name.bin") bytes)"
done
