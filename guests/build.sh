#!/bin/sh
# Build the guest programs into raw binaries in src/pkvm/guests/images/ (committed, so
# running the model needs no cross tools). Needs Debian's binutils-aarch64-linux-gnu:
#     apt-get install -y binutils-aarch64-linux-gnu
#     guests/build.sh
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out="$here/../src/pkvm/guests/images"
cross=${CROSS_COMPILE:-aarch64-linux-gnu-}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out"
for src in "$here"/*.S; do
    name=$(basename "$src" .S)
    [ "$name" = lib ] && continue
    "${cross}as" -I "$here" -o "$tmp/$name.o" "$src"
    "${cross}ld" -T "$here/guest.ld" -o "$tmp/$name.elf" "$tmp/$name.o"
    "${cross}objcopy" -O binary "$tmp/$name.elf" "$out/$name.bin"
    echo "built $name.bin ($(wc -c < "$out/$name.bin") bytes)"
done
