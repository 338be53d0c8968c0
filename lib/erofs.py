"""A metadata-only EROFS image writer (bytes in, bytes out): the directory tree of a version, with
every regular file's data left out and its content named by extended attributes instead.

The image is one half of the kernel mount (the composefs design, see docs/mount.md): overlayfs stacks
it over a directory of whole files named by SHA-256, and each file's ``trusted.overlay.redirect`` /
``trusted.overlay.metacopy`` xattrs make the kernel read its bytes from there. This module knows
nothing of versions, overlayfs or mounting: it lays out the on-disk format documented in the
kernel's ``Documentation/filesystems/erofs.rst`` (``include/erofs_fs.h`` in erofs-utils).

Why not ``mkfs.erofs``: erofs-utils 1.5 (Debian 12) needs a shadow tree of sparse files carrying the
xattrs and took 53-93 s for 100,000 files here (plus 7-10 s to write the shadow tree); this writer
lays out the same 100,000 files in about a second (figures in docs/benchmarks.md).

What is written (4 KiB blocks, little endian; the format tessera uses, versioned as ``IMAGE_FORMAT``):

- block 0: the superblock at byte 1024 (``CHUNKED_FILE`` feature, no checksum, ``epoch`` and
  ``fixed_nsec`` = the one mtime every compact inode shows);
- from block 1 (``meta_blkaddr``): inodes, 32-byte slots (nid = slot number), root first (nid 1;
  slot 0 is left empty because inode number 0 means "deleted entry" to readdir(3)),
  then breadth first; each inode is followed by its inline xattrs, then its chunk map (files) or
  its target (symlinks, ``FLAT_INLINE``); a record never straddles a block when it fits in one;
- after the inodes: directory blocks (``FLAT_PLAIN``), entries (``.`` and ``..`` included) sorted
  by name bytes, as the kernel's binary search expects;
- regular files with data are ``CHUNK_BASED`` with a single chunk covering the whole file whose
  block address is ``EROFS_NULL_ADDR``: a hole, so the image holds no file data at all; empty files
  are ``FLAT_PLAIN`` with size 0.

Compact (32-byte) inodes are used unless a file is 4 GiB or larger (then the 64-byte form).
"""
from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

logger = logging.getLogger(__name__)

IMAGE_FORMAT = 1  # bump when the layout tessera writes changes (the image cache is keyed by it)

BLOCK_BITS = 12
BLOCK = 1 << BLOCK_BITS
SUPER_OFFSET = 1024
MAGIC = 0xE0F5E1E2
FEATURE_INCOMPAT_CHUNKED_FILE = 0x00000004
NULL_ADDR32 = 0xFFFFFFFF
NAME_MAX = 255
SLOT = 32

FLAT_PLAIN, FLAT_INLINE, CHUNK_BASED = 0, 2, 4
FT_REG_FILE, FT_DIR, FT_SYMLINK = 1, 2, 7
S_IFREG, S_IFDIR, S_IFLNK = 0o100000, 0o040000, 0o120000

XATTR_PREFIXES = (("user.", 1), ("trusted.", 4), ("security.", 6))

_SUPER = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQB3xIQQQQ")
_COMPACT = struct.Struct("<HHHHIIIIHHI")
_EXTENDED = struct.Struct("<HHHHQIIIIQII16x")
_XATTR_HEADER = struct.Struct("<IB7x")
_XATTR_ENTRY = struct.Struct("<BBH")
_DIRENT = struct.Struct("<QHBB")


class ImageError(ValueError):
    """The tree cannot be written as an EROFS image (a name or value too long)."""


@dataclass
class Node:
    """One inode of the image. ``name`` is the entry's name in its parent (bytes, as on disk)."""

    name: bytes
    kind: str  # "file" | "dir" | "symlink"
    mode: int  # permission bits only
    size: int = 0
    target: bytes = b""
    xattrs: list[tuple[str, bytes]] = field(default_factory=list)
    children: list["Node"] = field(default_factory=list)
    nid: int = 0
    _xattr_body: bytes = b""


@dataclass(frozen=True)
class ImageStats:
    inodes: int
    bytes: int
    meta_blocks: int
    dir_blocks: int


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def encode_xattrs(xattrs: list[tuple[str, bytes]]) -> bytes:
    """The inline xattr body (header + entries), or b"" when there are none."""
    if not xattrs:
        return b""
    out = bytearray(_XATTR_HEADER.pack(0, 0))
    for name, value in xattrs:
        for prefix, index in XATTR_PREFIXES:
            if name.startswith(prefix):
                suffix = name[len(prefix):].encode()
                break
        else:
            raise ImageError(f"xattr {name!r} has no EROFS name index (user., trusted., security.)")
        if not suffix or len(suffix) > 255 or len(value) > 0xFFFF:
            raise ImageError(f"xattr {name!r} name or value too long")
        entry = _XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
        out += entry + b"\0" * (_align(len(entry), 4) - len(entry))
    return bytes(out)


def _record_size(node: Node, extended: bool) -> int:
    size = (64 if extended else 32) + len(node._xattr_body)
    if node.kind == "file" and node.size:
        size = _align(size, 4) + 4  # one block-map entry
    elif node.kind == "symlink":
        size += len(node.target)
    return size


def _walk(root: Node) -> Iterator[Node]:
    queue = [root]
    i = 0
    while i < len(queue):
        node = queue[i]
        i += 1
        yield node
        if node.kind == "dir":
            queue.extend(node.children)


def _dir_blocks(entries: list[tuple[bytes, int, int]]) -> list[bytes]:
    """Pack sorted (name, nid, file type) into directory blocks."""
    blocks: list[bytes] = []
    cur: list[tuple[bytes, int, int]] = []
    used = 0
    for e in entries:
        need = _DIRENT.size + len(e[0])
        if cur and used + need > BLOCK:
            blocks.append(_dir_block(cur, pad=True))
            cur, used = [], 0
        cur.append(e)
        used += need
    blocks.append(_dir_block(cur, pad=False))
    return blocks


def _dir_block(entries: list[tuple[bytes, int, int]], pad: bool) -> bytes:
    head = bytearray()
    names = bytearray()
    base = _DIRENT.size * len(entries)
    for name, nid, ftype in entries:
        head += _DIRENT.pack(nid, base + len(names), ftype, 0)
        names += name
    out = bytes(head + names)
    return out + b"\0" * (BLOCK - len(out)) if pad else out


def write_image(out: BinaryIO, root: Node, *, mtime_ns: int, uuid: bytes = b"\0" * 16,
                volume_name: bytes = b"tessera") -> ImageStats:
    """Write ``root`` (a "dir" Node) as an EROFS image to ``out`` (positioned at 0). Every inode shows
    ``mtime_ns``, owner 0:0. Deterministic: the same tree gives the same bytes."""
    if root.kind != "dir":
        raise ImageError("the image root must be a directory")
    nodes = list(_walk(root))
    # 1. inode records in the metadata area: nids. Slot 0 stays unused: nid 0 would show as inode
    #    number 0, which readdir(3) takes for a deleted entry (it would hide "." and "..").
    pos = SLOT
    for node in nodes:
        if len(node.name) > NAME_MAX:
            raise ImageError(f"name too long for EROFS ({len(node.name)} bytes): {node.name[:40]!r}...")
        node._xattr_body = encode_xattrs(node.xattrs)
        size = _record_size(node, node.size >= 1 << 32)
        pos = _align(pos, SLOT)
        if size <= BLOCK and pos // BLOCK != (pos + size - 1) // BLOCK:
            pos = _align(pos, BLOCK)
        if node.kind == "symlink" and size > BLOCK:
            raise ImageError(f"symlink target too long: {node.name!r}")
        node.nid = pos // SLOT
        pos += size
    meta_blocks = max(1, _align(pos, BLOCK) // BLOCK)
    if nodes[0].nid != 1:
        raise AssertionError("the root must be nid 1")
    # 2. directory blocks after the metadata area
    dir_data: dict[int, list[bytes]] = {}
    parents: dict[int, int] = {id(root): root.nid}
    next_block = 1 + meta_blocks
    dir_start: dict[int, int] = {}
    for node in nodes:
        if node.kind != "dir":
            continue
        for child in node.children:
            parents[id(child)] = node.nid
        ents = [(b".", node.nid, FT_DIR), (b"..", parents[id(node)], FT_DIR)]
        ents += [(c.name, c.nid, {"file": FT_REG_FILE, "dir": FT_DIR, "symlink": FT_SYMLINK}[c.kind])
                 for c in node.children]
        ents.sort(key=lambda e: e[0])
        for a, b in zip(ents, ents[1:]):
            if a[0] == b[0]:
                raise ImageError(f"duplicate name {a[0]!r} in a directory")
        blocks = _dir_blocks(ents)
        dir_data[node.nid] = blocks
        dir_start[node.nid] = next_block
        node.size = (len(blocks) - 1) * BLOCK + len(blocks[-1])
        next_block += len(blocks)
    total_blocks = next_block
    # 3. the metadata area
    meta = bytearray(meta_blocks * BLOCK)
    sec, nsec = divmod(mtime_ns, 10**9)
    for node in nodes:
        _put_inode(meta, node, dir_start.get(node.nid, 0), sec, nsec)
    # 4. superblock, then everything in order
    sb = _SUPER.pack(MAGIC, 0, 0, BLOCK_BITS, 0, root.nid, len(nodes), sec, nsec, total_blocks, 1, 0,
                     uuid[:16].ljust(16, b"\0"), volume_name[:16].ljust(16, b"\0"), FEATURE_INCOMPAT_CHUNKED_FILE,
                     0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    block0 = bytearray(BLOCK)
    block0[SUPER_OFFSET:SUPER_OFFSET + len(sb)] = sb
    out.write(block0)
    out.write(meta)
    for node in nodes:
        if node.kind == "dir":
            blocks = dir_data[node.nid]
            out.write(b"".join(blocks[:-1]) + blocks[-1] + b"\0" * (BLOCK - len(blocks[-1])))
    return ImageStats(len(nodes), total_blocks * BLOCK, meta_blocks, total_blocks - 1 - meta_blocks)


def _put_inode(meta: bytearray, node: Node, dir_block: int, sec: int, nsec: int) -> None:
    xbody = node._xattr_body
    icount = (len(xbody) - _XATTR_HEADER.size) // 4 + 1 if xbody else 0
    extended = node.size >= 1 << 32
    tail = b""
    if node.kind == "dir":
        layout, i_u, kind_bits = FLAT_PLAIN, dir_block, S_IFDIR
        nlink = 2 + sum(1 for c in node.children if c.kind == "dir")
    elif node.kind == "symlink":
        layout, i_u, kind_bits, nlink = FLAT_INLINE, 0, S_IFLNK, 1
        tail = node.target
        node.size = len(node.target)
    elif node.size:
        chunkbits = max(BLOCK_BITS, (node.size - 1).bit_length())
        if chunkbits - BLOCK_BITS > 31:
            raise ImageError(f"file too large for one EROFS chunk: {node.name!r}")
        layout, i_u, kind_bits, nlink = CHUNK_BASED, chunkbits - BLOCK_BITS, S_IFREG, 1
    else:
        layout, i_u, kind_bits, nlink = FLAT_PLAIN, 0, S_IFREG, 1
    mode = kind_bits | (node.mode & 0o7777)
    ino = node.nid & 0xFFFFFFFF
    if extended:
        raw = _EXTENDED.pack(1 | layout << 1, icount, mode, 0, node.size, i_u, ino, 0, 0, sec, nsec, nlink)
    else:
        raw = _COMPACT.pack(layout << 1, icount, mode, nlink, node.size, 0, i_u, ino, 0, 0, 0)
    at = node.nid * SLOT
    rec = raw + xbody
    if layout == CHUNK_BASED:
        rec += b"\0" * (_align(len(rec), 4) - len(rec)) + struct.pack("<I", NULL_ADDR32)
    rec += tail
    meta[at:at + len(rec)] = rec


def read_superblock(data: bytes) -> dict[str, int]:
    """The superblock fields tessera checks (magic, block size, root nid, inode count, epoch)."""
    if len(data) < SUPER_OFFSET + _SUPER.size:
        raise ImageError("not an EROFS image: too short")
    f = _SUPER.unpack_from(data, SUPER_OFFSET)
    if f[0] != MAGIC:
        raise ImageError("not an EROFS image: bad magic")
    return {"blkszbits": f[3], "root_nid": f[5], "inos": f[6], "epoch": f[7], "fixed_nsec": f[8],
            "blocks": f[9], "meta_blkaddr": f[10], "feature_incompat": f[14]}


__all__ = ["IMAGE_FORMAT", "ImageError", "ImageStats", "Node", "write_image", "encode_xattrs", "read_superblock"]
