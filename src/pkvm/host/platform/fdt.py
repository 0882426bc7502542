"""A flattened device tree (DTB, version 17) writer: the board description a VMM hands Linux.

    root = Node("")
    root.prop("#address-cells", 2)
    mem = root.child("memory@40000000")
    mem.prop("device_type", "memory")
    mem.prop("reg", cells(0, 0x4000_0000, 0, 256 << 20))
    blob = to_dtb(root, boot_cpuid=0)

Property values: `int` (one u32 cell), `str` (NUL-terminated), `list[str]` (a string list),
`bytes` (raw; build cell arrays with `cells()` and `u64()`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

FDT_MAGIC = 0xD00DFEED
FDT_BEGIN_NODE, FDT_END_NODE, FDT_PROP, FDT_END = 1, 2, 3, 9
FDT_VERSION, FDT_LAST_COMP_VERSION = 17, 16
_HEADER = struct.Struct(">10I")

PropValue = int | str | list[str] | bytes


def cells(*values: int) -> bytes:
    """Big-endian u32 cells."""
    return b"".join(struct.pack(">I", v & 0xFFFF_FFFF) for v in values)


def u64(value: int) -> bytes:
    return struct.pack(">Q", value)


def _encode(value: PropValue) -> bytes:
    if isinstance(value, bool):
        raise TypeError("use b'' for an empty (boolean) property")
    if isinstance(value, int):
        return cells(value)
    if isinstance(value, str):
        return value.encode() + b"\0"
    if isinstance(value, list):
        return b"".join(s.encode() + b"\0" for s in value)
    return bytes(value)


@dataclass
class Node:
    name: str
    props: list[tuple[str, bytes]] = field(default_factory=list)
    children: list[Node] = field(default_factory=list)

    def prop(self, name: str, value: PropValue = b"") -> Node:
        self.props.append((name, _encode(value)))
        return self

    def child(self, name: str) -> Node:
        node = Node(name)
        self.children.append(node)
        return node

    def find(self, path: str) -> Node | None:
        node: Node | None = self
        for part in [p for p in path.split("/") if p]:
            assert node is not None
            node = next((c for c in node.children if c.name == part), None)
            if node is None:
                return None
        return node

    def get(self, name: str) -> bytes | None:
        return next((v for n, v in self.props if n == name), None)


def to_dtb(root: Node, boot_cpuid: int = 0, reserve: list[tuple[int, int]] = ()) -> bytes:  # type: ignore[assignment]
    """Serialise a tree: header, memory reservation map, structure block, strings block."""
    strings = bytearray()
    offsets: dict[str, int] = {}
    struct_blk = bytearray()

    def string_off(name: str) -> int:
        if name not in offsets:
            offsets[name] = len(strings)
            strings.extend(name.encode() + b"\0")
        return offsets[name]

    def emit(node: Node) -> None:
        struct_blk.extend(struct.pack(">I", FDT_BEGIN_NODE))
        name = node.name.encode() + b"\0"
        struct_blk.extend(name + b"\0" * (-len(name) % 4))
        for pname, value in node.props:
            struct_blk.extend(struct.pack(">III", FDT_PROP, len(value), string_off(pname)))
            struct_blk.extend(value + b"\0" * (-len(value) % 4))
        for c in node.children:
            emit(c)
        struct_blk.extend(struct.pack(">I", FDT_END_NODE))

    emit(root)
    struct_blk.extend(struct.pack(">I", FDT_END))
    rsv = b"".join(struct.pack(">QQ", a, s) for a, s in reserve) + bytes(16)
    off_rsv = (_HEADER.size + 7) & ~7
    off_struct = off_rsv + len(rsv)
    off_strings = off_struct + len(struct_blk)
    total = off_strings + len(strings)
    header = _HEADER.pack(FDT_MAGIC, total, off_struct, off_strings, off_rsv, FDT_VERSION,
                          FDT_LAST_COMP_VERSION, boot_cpuid, len(strings), len(struct_blk))
    blob = header + bytes(off_rsv - _HEADER.size) + rsv + bytes(struct_blk) + bytes(strings)
    assert len(blob) == total
    return blob


def from_dtb(blob: bytes) -> Node:
    """Parse a DTB back into nodes (for tests and `--dtb-out` checks)."""
    magic, total, off_struct, off_strings, _rsv, _ver, _lc, _cpu, size_str, size_struct = (
        _HEADER.unpack_from(blob, 0))
    if magic != FDT_MAGIC:
        raise ValueError("not a flattened device tree (bad magic)")
    strings = blob[off_strings : off_strings + size_str]
    pos = off_struct
    stack: list[Node] = []
    root: Node | None = None
    while True:
        (tok,) = struct.unpack_from(">I", blob, pos)
        pos += 4
        if tok == FDT_BEGIN_NODE:
            end = blob.index(b"\0", pos)
            node = Node(blob[pos:end].decode())
            pos = (end + 1 + 3) & ~3
            if stack:
                stack[-1].children.append(node)
            else:
                root = node
            stack.append(node)
        elif tok == FDT_END_NODE:
            stack.pop()
        elif tok == FDT_PROP:
            length, nameoff = struct.unpack_from(">II", blob, pos)
            pos += 8
            name = strings[nameoff : strings.index(b"\0", nameoff)].decode()
            stack[-1].props.append((name, blob[pos : pos + length]))
            pos = (pos + length + 3) & ~3
        elif tok == FDT_END:
            break
        elif tok != 4:  # FDT_NOP
            raise ValueError(f"bad FDT token {tok} at {pos - 4}")
    assert root is not None
    return root
