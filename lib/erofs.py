"""An EROFS image writer (bytes in, bytes out): the directory tree of a version, with every regular
file's data either left out and named by extended attributes, or (small files) inline in the image.

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
  block address is ``EROFS_NULL_ADDR``: a hole, so the image holds none of their data; empty files
  are ``FLAT_PLAIN`` with size 0; a file the caller marks ``inline`` is ``FLAT_INLINE``: its bytes
  follow its inode and xattrs in the same metadata block (`fits_inline` says whether they can).

Compact (32-byte) inodes are used unless a file is 4 GiB or larger (then the 64-byte form).

The writer streams: it lists the tree twice through a `DirSource` (once to place every inode and
directory block, once to write them), holding one directory's entries and one small record per
directory, never the whole tree, so a million-file image costs the memory of its largest directory.
"""
from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterator, Protocol

logger = logging.getLogger(__name__)

IMAGE_FORMAT = 2  # bump when the layout tessera writes changes (the image cache is keyed by it)

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
_PREFIX_LEN = {prefix: len(prefix) for prefix, _ in XATTR_PREFIXES}

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
    inline: bool = False  # a file whose bytes the image holds (`DirSource.fill` gives them as ``data``)
    data: bytes | None = None
    ref: object = None  # the source's handle of a directory (what `DirSource.children` is given)
    nid: int = 0
    _xattr_len: int = 0


class DirSource(Protocol):
    """What the writer lists: a directory's entries (grandchildren not needed), and inline files' bytes."""

    def children(self, directory: Node) -> list[Node]:
        """The entries of ``directory``; the same list each time it is asked."""

    def fill(self, files: list[Node]) -> None:
        """Set ``data`` of these ``inline`` files (their bytes, checked by the source)."""


class _TreeSource:
    """A tree of `Node` held in memory as a `DirSource`."""

    def children(self, directory: Node) -> list[Node]:
        return directory.children

    def fill(self, files: list[Node]) -> None:
        for f in files:
            if f.data is None:
                raise ImageError(f"inline file {f.name!r} has no data")


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


def xattrs_size(xattrs: list[tuple[str, bytes]]) -> int:
    """``len(encode_xattrs(xattrs))``, without encoding them."""
    if not xattrs:
        return 0
    n = _XATTR_HEADER.size
    for name, value in xattrs:
        cut = _PREFIX_LEN.get(name[:name.find(".") + 1])
        if cut is None:
            raise ImageError(f"xattr {name!r} has no EROFS name index (user., trusted., security.)")
        n += (_XATTR_ENTRY.size + len(name) - cut + len(value) + 3) & ~3
    return n


def _record_size(node: Node, extended: bool) -> int:
    size = (64 if extended else 32) + node._xattr_len
    if node.kind == "file" and node.inline:
        size += node.size
    elif node.kind == "file" and node.size:
        size = _align(size, 4) + 4  # one block-map entry
    elif node.kind == "symlink":
        size += len(node.target)
    return size


def fits_inline(size: int, xattrs: list[tuple[str, bytes]]) -> bool:
    """Whether a file of ``size`` bytes with these xattrs can keep its bytes in its inode's block."""
    return 0 < size < BLOCK and 32 + xattrs_size(xattrs) + size <= BLOCK


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
                volume_name: bytes = b"tessera", source: DirSource | None = None) -> ImageStats:
    """Write ``root`` (a "dir" Node) as an EROFS image to ``out`` (positioned at 0). Every inode shows
    ``mtime_ns``, owner 0:0. Deterministic: the same tree gives the same bytes. Directories are listed
    through ``source`` (default: each Node's ``children``), twice."""
    if root.kind != "dir":
        raise ImageError("the image root must be a directory")
    src: DirSource = source or _TreeSource()
    layout = _Layout()
    layout.place(root)
    if root.nid != 1:
        raise AssertionError("the root must be nid 1")
    # 1. place every inode (nids, breadth first) and size every directory, one directory at a time
    dirs = [_Dir(root, root.nid)]
    i = 0
    while i < len(dirs):
        d = dirs[i]
        i += 1
        kids = src.children(d.node)
        for child in kids:
            layout.place(child)
        d.nlink = 2 + sum(1 for c in kids if c.kind == "dir")
        blocks = _dir_blocks(_dirents(d, kids))  # only the size is kept: they are made again when written
        d.size = (len(blocks) - 1) * BLOCK + len(blocks[-1])
        dirs += [_Dir(c, d.node.nid) for c in kids if c.kind == "dir"]
    meta_blocks = max(1, _align(layout.pos, BLOCK) // BLOCK)
    start = 1 + meta_blocks
    for d in dirs:
        d.start = start
        start += (d.size + BLOCK - 1) // BLOCK
    total_blocks = start
    # 2. write: superblock, then the metadata area and the directory blocks as two sequential streams
    sec, nsec = divmod(mtime_ns, 10**9)
    sb = _SUPER.pack(MAGIC, 0, 0, BLOCK_BITS, 0, root.nid, layout.count, sec, nsec, total_blocks, 1, 0,
                     uuid[:16].ljust(16, b"\0"), volume_name[:16].ljust(16, b"\0"), FEATURE_INCOMPAT_CHUNKED_FILE,
                     0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    block0 = bytearray(BLOCK)
    block0[SUPER_OFFSET:SUPER_OFFSET + len(sb)] = sb
    out.write(block0)
    meta = _Stream(out, BLOCK)
    dir_out = _Stream(out, (1 + meta_blocks) * BLOCK)
    by_nid = {d.node.nid: d for d in dirs}
    again = _Layout()
    again.place(root)
    meta.put(root.nid * SLOT, _inode(root, dirs[0], sec, nsec))
    for d in dirs:
        kids = src.children(d.node)
        inline = [c for c in kids if c.kind == "file" and c.inline]
        if inline:
            src.fill(inline)
        for child in kids:
            again.place(child)
            d_child = by_nid.get(child.nid)
            if (child.kind == "dir") != (d_child is not None and d_child.node.name == child.name):
                raise ImageError("the tree changed while its image was written")
            meta.put(child.nid * SLOT, _inode(child, d_child, sec, nsec))
            child.data = None
        blocks = _dir_blocks(_dirents(d, kids))
        dir_out.put((d.start - 1 - meta_blocks) * BLOCK, b"".join(blocks))
    if (again.pos, again.count) != (layout.pos, layout.count):
        raise ImageError("the tree changed while its image was written")
    meta.pad_to(meta_blocks * BLOCK)
    meta.flush()
    dir_out.pad_to((total_blocks - 1 - meta_blocks) * BLOCK)
    dir_out.flush()
    return ImageStats(layout.count, total_blocks * BLOCK, meta_blocks, total_blocks - 1 - meta_blocks)


@dataclass
class _Dir:
    """What the writer keeps of one directory between its two passes."""

    node: Node
    parent: int
    nlink: int = 2
    size: int = 0
    start: int = 0


class _Layout:
    """Places inode records one after another in the metadata area (32-byte slots; a record that fits
    in a block never straddles two). Slot 0 stays unused: nid 0 would show as inode number 0, which
    readdir(3) takes for a deleted entry (it would hide "." and "..")."""

    def __init__(self) -> None:
        self.pos = SLOT
        self.count = 0

    def place(self, node: Node) -> None:
        if len(node.name) > NAME_MAX:
            raise ImageError(f"name too long for EROFS ({len(node.name)} bytes): {node.name[:40]!r}...")
        node._xattr_len = xattrs_size(node.xattrs)
        if node.inline and not (node.kind == "file" and 0 < node.size < BLOCK
                                and 32 + node._xattr_len + node.size <= BLOCK):
            raise ImageError(f"file {node.name!r} cannot be held inline")
        size = _record_size(node, node.size >= 1 << 32)
        pos = _align(self.pos, SLOT)
        if size <= BLOCK and pos // BLOCK != (pos + size - 1) // BLOCK:
            pos = _align(pos, BLOCK)
        if node.kind == "symlink" and size > BLOCK:
            raise ImageError(f"symlink target too long: {node.name!r}")
        node.nid = pos // SLOT
        self.pos = pos + size
        self.count += 1


class _Stream:
    """Sequential writes at increasing offsets from ``base`` of ``out``, gaps filled with zeros."""

    FLUSH = 1 << 20

    def __init__(self, out: BinaryIO, base: int) -> None:
        self.out = out
        self.base = base
        self.done = 0  # bytes written out so far
        self.buf = bytearray()

    def put(self, at: int, data: bytes) -> None:
        end = self.done + len(self.buf)
        if at < end:
            raise AssertionError("image records out of order")
        self.buf += b"\0" * (at - end)
        self.buf += data
        if len(self.buf) >= self.FLUSH:
            self.flush()

    def pad_to(self, size: int) -> None:
        self.put(size, b"")

    def flush(self) -> None:
        if self.buf:
            self.out.seek(self.base + self.done)
            self.out.write(self.buf)
            self.done += len(self.buf)
            self.buf = bytearray()


def _dirents(d: _Dir, kids: list[Node]) -> list[tuple[bytes, int, int]]:
    ents = [(b".", d.node.nid, FT_DIR), (b"..", d.parent, FT_DIR)]
    ents += [(c.name, c.nid, {"file": FT_REG_FILE, "dir": FT_DIR, "symlink": FT_SYMLINK}[c.kind]) for c in kids]
    ents.sort(key=lambda e: e[0])
    for a, b in zip(ents, ents[1:]):
        if a[0] == b[0]:
            raise ImageError(f"duplicate name {a[0]!r} in a directory")
    return ents


def _inode(node: Node, d: _Dir | None, sec: int, nsec: int) -> bytes:
    """The inode record of ``node`` (``d``: its directory's layout, for a directory)."""
    xbody = encode_xattrs(node.xattrs)
    icount = (len(xbody) - _XATTR_HEADER.size) // 4 + 1 if xbody else 0
    tail = b""
    size = node.size
    if node.kind == "dir":
        if d is None:
            raise AssertionError("a directory without its layout")
        layout, i_u, kind_bits, nlink, size = FLAT_PLAIN, d.start, S_IFDIR, d.nlink, d.size
    elif node.kind == "symlink":
        layout, i_u, kind_bits, nlink = FLAT_INLINE, 0, S_IFLNK, 1
        tail = node.target
        size = len(node.target)
    elif node.inline:
        if node.data is None or len(node.data) != node.size:
            raise ImageError(f"inline file {node.name!r}: {0 if node.data is None else len(node.data)} bytes "
                             f"given for {node.size}")
        layout, i_u, kind_bits, nlink = FLAT_INLINE, 0, S_IFREG, 1
        tail = node.data
    elif size:
        chunkbits = max(BLOCK_BITS, (size - 1).bit_length())
        if chunkbits - BLOCK_BITS > 31:
            raise ImageError(f"file too large for one EROFS chunk: {node.name!r}")
        layout, i_u, kind_bits, nlink = CHUNK_BASED, chunkbits - BLOCK_BITS, S_IFREG, 1
    else:
        layout, i_u, kind_bits, nlink = FLAT_PLAIN, 0, S_IFREG, 1
    extended = size >= 1 << 32
    mode = kind_bits | (node.mode & 0o7777)
    ino = node.nid & 0xFFFFFFFF
    if extended:
        raw = _EXTENDED.pack(1 | layout << 1, icount, mode, 0, size, i_u, ino, 0, 0, sec, nsec, nlink)
    else:
        raw = _COMPACT.pack(layout << 1, icount, mode, nlink, size, 0, i_u, ino, 0, 0, 0)
    rec = raw + xbody
    if layout == CHUNK_BASED:
        rec += b"\0" * (_align(len(rec), 4) - len(rec)) + struct.pack("<I", NULL_ADDR32)
    return rec + tail


def read_superblock(data: bytes) -> dict[str, int]:
    """The superblock fields tessera checks (magic, block size, root nid, inode count, epoch)."""
    if len(data) < SUPER_OFFSET + _SUPER.size:
        raise ImageError("not an EROFS image: too short")
    f = _SUPER.unpack_from(data, SUPER_OFFSET)
    if f[0] != MAGIC:
        raise ImageError("not an EROFS image: bad magic")
    return {"blkszbits": f[3], "root_nid": f[5], "inos": f[6], "epoch": f[7], "fixed_nsec": f[8],
            "blocks": f[9], "meta_blkaddr": f[10], "feature_incompat": f[14]}


def inline_files(f: BinaryIO) -> Iterator[tuple[bytes, bytes, dict[bytes, bytes]]]:
    """(path, bytes, xattrs by full name) of every inline file of an image this module wrote, read
    breadth first straight from ``f`` (`tessera fsck` checks them against their SHA-256 without
    mounting). `ImageError` when the image does not parse as such."""

    def read(pos: int, n: int) -> bytes:
        f.seek(pos)
        data = f.read(n)
        if len(data) != n:
            raise ImageError("truncated image")
        return data

    sb = read_superblock(read(0, SUPER_OFFSET + _SUPER.size))
    if sb["blkszbits"] != BLOCK_BITS:
        raise ImageError("not an image tessera wrote: block size")
    meta = sb["meta_blkaddr"] * BLOCK
    names = {1: "user.", 4: "trusted.", 6: "security."}
    queue: list[tuple[int, bytes]] = [(sb["root_nid"], b"")]
    seen = {sb["root_nid"]}
    while queue:
        nid, path = queue.pop(0)
        head = read(meta + nid * SLOT, 64 if read(meta + nid * SLOT, 2)[0] & 1 else 32)
        if head[0] & 1:
            fmt, icount, mode, _, size, i_u = _EXTENDED.unpack(head)[:6]
            isize = 64
        else:
            fmt, icount, mode, _, size, _, i_u = _COMPACT.unpack(head)[:7]
            isize = 32
        if mode & 0o170000 != S_IFDIR:
            raise ImageError("a directory entry of kind directory is not a directory")
        blocks = read(i_u * BLOCK, size)
        for base in range(0, size, BLOCK):
            block = blocks[base:base + BLOCK]
            first = _DIRENT.unpack_from(block, 0)[1]
            if first % _DIRENT.size or not 0 < first <= len(block):
                raise ImageError("malformed directory block")
            ents = [_DIRENT.unpack_from(block, i * _DIRENT.size) for i in range(first // _DIRENT.size)]
            for i, (child, off, ftype, _) in enumerate(ents):
                end = ents[i + 1][1] if i + 1 < len(ents) else len(block)
                name = block[off:end].rstrip(b"\0") if i + 1 == len(ents) else block[off:end]
                if name in (b".", b".."):
                    continue
                child_path = path + b"/" + name if path else name
                if ftype == FT_DIR:
                    if child in seen:
                        raise ImageError("a directory is listed twice")
                    seen.add(child)
                    queue.append((child, child_path))
                elif ftype == FT_REG_FILE:
                    found = _inline_file(read, meta + child * SLOT, names)
                    if found is not None:
                        yield child_path, found[0], found[1]


def _inline_file(read: "Callable[[int, int], bytes]", at: int,
                 names: dict[int, str]) -> tuple[bytes, dict[bytes, bytes]] | None:
    head = read(at, 32)
    if head[0] & 1:
        return None  # 4 GiB or more: never inline
    fmt, icount, mode, _, size = _COMPACT.unpack(head)[:5]
    if (fmt >> 1) & 7 != FLAT_INLINE or mode & 0o170000 != S_IFREG:
        return None
    xlen = _XATTR_HEADER.size + (icount - 1) * 4 if icount else 0
    body = read(at + 32, xlen + size)
    xattrs: dict[bytes, bytes] = {}
    pos = _XATTR_HEADER.size if xlen else 0
    while pos < xlen:
        nlen, index, vlen = _XATTR_ENTRY.unpack_from(body, pos)
        pos += _XATTR_ENTRY.size
        prefix = names.get(index)
        if prefix is None or pos + nlen + vlen > xlen:
            raise ImageError("malformed xattrs")
        xattrs[prefix.encode() + body[pos:pos + nlen]] = body[pos + nlen:pos + nlen + vlen]
        pos = _align(pos + nlen + vlen, 4)
    return body[xlen:], xattrs


__all__ = ["IMAGE_FORMAT", "inline_files", "ImageError", "ImageStats", "Node", "DirSource", "write_image", "encode_xattrs",
           "fits_inline", "read_superblock"]
