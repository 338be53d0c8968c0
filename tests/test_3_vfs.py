"""Layer 3: a version as a file system (`tessera.vfs`), tested without FUSE or any binding."""
from __future__ import annotations

import ast
import hashlib
import os
import random
import stat
from pathlib import Path

import pytest

import tessera
from tessera.config import RepoSettings
from tessera.errors import CorruptData, NotFound
from tessera.format.chunker import ChunkParams
from tessera.format.compress import RAW, ZSTD
from tessera.vfs import XATTR_SHA256, FileRange, IsADirectory, NotADirectory, NotASymlink, VersionFS
from trees import write_random, write_text

LIB = Path(tessera.__file__).resolve().parent
SMALL_CHUNKS = RepoSettings(ChunkParams(16 * 1024, 32 * 1024, 64 * 1024), compression_level=1)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    write_random(root / "data" / "random.bin", 1 << 20, 1)  # raw chunks
    write_text(root / "data" / "text.csv", 1 << 20, 2)  # zstd chunks
    (root / "data" / "tiny.txt").write_text("tiny\n")
    (root / "empty.txt").write_bytes(b"")
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "sub" / "deeper" / "x.txt").write_text("x" * 5000)
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    os.symlink("data/tiny.txt", root / "link")
    return root


@pytest.fixture
def small_repo(tmp_path: Path):
    r = tessera.Repo(tmp_path / "home", settings=SMALL_CHUNKS, chunk_cache_bytes=256 * 1024)
    yield r
    r.close()


@pytest.fixture
def fs(small_repo: tessera.Repo, src: Path):
    v = small_repo.commit("ds", src)
    f = VersionFS(v)
    yield f
    f.close()


def test_stat_readdir_readlink(fs: VersionFS, src: Path) -> None:
    root = fs.stat("/")
    assert root.ino == 1 and stat.S_ISDIR(root.mode)
    names = [n for n, _ in fs.readdir("/")]
    assert names == sorted(os.listdir(src))
    a = fs.stat("/data/random.bin")
    assert stat.S_ISREG(a.mode) and a.size == 1 << 20 and a.blocks == (1 << 20) // 512
    assert a.mtime_ns == int(round(fs.version.time * 1e9))
    assert fs.stat("run.sh").mode & 0o111 and not fs.stat("data/tiny.txt").mode & 0o111
    link = fs.stat("/link")
    assert stat.S_ISLNK(link.mode) and link.size == len("data/tiny.txt")
    assert fs.readlink("/link") == "data/tiny.txt"
    assert fs.stat("/empty.txt").size == 0 and fs.read("/empty.txt", 0, 100) == b""
    kids = dict(fs.readdir("/sub"))
    assert stat.S_ISDIR(kids["deeper"].mode)


def test_errors(fs: VersionFS) -> None:
    with pytest.raises(NotFound):
        fs.stat("/nope")
    with pytest.raises(NotFound):
        fs.stat("/sub/nope/deeper")
    with pytest.raises(NotADirectory):
        fs.stat("/data/tiny.txt/x")
    with pytest.raises(NotADirectory):
        fs.readdir("/data/tiny.txt")
    with pytest.raises(IsADirectory):
        fs.read("/data", 0, 10)
    with pytest.raises(NotASymlink):
        fs.readlink("/data/tiny.txt")


def test_inodes_stable_unique_and_per_version(small_repo: tessera.Repo, src: Path) -> None:
    v1 = small_repo.commit("ds", src)
    paths = [e.path for e in v1.walk(dirs=True)]
    a, b = VersionFS(v1), VersionFS(small_repo.get(v1.ref))
    inos = [a.stat(p).ino for p in paths]
    assert inos == [b.stat(p).ino for p in paths]  # same version, another mount: same numbers
    assert len(set(inos)) == len(inos) and 1 not in inos
    assert dict(a.readdir("/data"))["tiny.txt"].ino == a.stat("/data/tiny.txt").ino
    (src / "new.txt").write_text("changes the version\n")
    v2 = small_repo.commit("ds", src)
    assert VersionFS(v2).stat("/data/tiny.txt").ino != a.stat("/data/tiny.txt").ino


def test_random_reads_match_source(fs: VersionFS, src: Path) -> None:
    rng = random.Random(7)
    for rel in ("data/random.bin", "data/text.csv", "sub/deeper/x.txt", "data/tiny.txt"):
        data = (src / rel).read_bytes()
        assert fs.read(rel, 0, len(data) + 10) == data
        for _ in range(200):
            off = rng.randrange(0, len(data) + 100)
            n = rng.choice([1, 4096, 65536, 131072, 1 << 20, rng.randrange(0, 300_000)])
            assert fs.read("/" + rel, off, n) == data[off:off + n], (rel, off, n)


def test_read_plan_uses_file_ranges_for_raw_chunks(fs: VersionFS, small_repo: tessera.Repo) -> None:
    v = fs.version
    codecs = {small_repo.chunks.location(cid).codec for cid, _ in v.file_record("data/random.bin").chunks}
    assert codecs == {RAW}
    first = fs.read_plan("/data/random.bin", 1000, 200_000)  # first touch: whole chunks come as checked bytes
    assert sum(len(s) if isinstance(s, bytes) else s.size for s in first) == 200_000
    plan = fs.read_plan("/data/random.bin", 1000, 200_000)  # verified: plain (fd, offset) ranges
    assert plan and all(isinstance(s, FileRange) for s in plan)
    assert sum(s.size for s in plan) == 200_000
    codecs = {small_repo.chunks.location(cid).codec for cid, _ in v.file_record("data/text.csv").chunks}
    assert codecs == {ZSTD}
    assert all(isinstance(s, bytes) for s in fs.read_plan("/data/text.csv", 1000, 200_000))


def test_chunk_cache_is_byte_bounded(fs: VersionFS, small_repo: tessera.Repo) -> None:
    for off in range(0, 1 << 20, 1000):  # small reads across many compressed chunks
        fs.read("/data/text.csv", off, 100)
    assert 0 < small_repo.chunks._decoded.size <= 256 * 1024


def test_xattrs_and_statfs(fs: VersionFS, src: Path) -> None:
    want = hashlib.sha256((src / "data" / "random.bin").read_bytes()).hexdigest()
    assert fs.getxattr("/data/random.bin", XATTR_SHA256) == want.encode()
    assert fs.listxattr("/data/random.bin") == [XATTR_SHA256]
    assert fs.getxattr("/data", XATTR_SHA256) is None
    assert fs.getxattr("/", "user.tessera.ref") == fs.version.ref.encode()
    s = fs.statfs()
    assert s.blocks * s.frsize >= fs.version.size and s.files == fs.version.files


def test_lookups_do_not_scan(small_repo: tessera.Repo, src: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    v = small_repo.commit("ds", src)
    loaded: list[str] = []
    real = small_repo.trees.load_tree
    monkeypatch.setattr(small_repo.trees, "load_tree", lambda tid: loaded.append(tid) or real(tid))
    fs = VersionFS(v)
    assert loaded == []  # nothing read at mount time
    fs.stat("/sub/deeper/x.txt")
    assert len(set(loaded)) == 3  # root, sub, sub/deeper: only the path walked


def test_corrupt_chunk_raises_and_other_files_still_read(fs: VersionFS, small_repo: tessera.Repo, src: Path) -> None:
    v = fs.version
    cid = v.file_record("data/random.bin").chunks[3][0]
    loc = small_repo.chunks.location(cid)
    pack = small_repo.store.pack_path(loc.pack)
    with open(pack, "r+b") as f:
        f.seek(loc.offset + 100)
        b = f.read(1)
        f.seek(loc.offset + 100)
        f.write(bytes([b[0] ^ 0x01]))
    start = sum(n for _, n in v.file_record("data/random.bin").chunks[:3])
    with pytest.raises(CorruptData, match="hash check"):
        fs.read("/data/random.bin", start + 10, 10)
    with pytest.raises(CorruptData):  # never served later either
        fs.read("/data/random.bin", 0, 1 << 20)
    assert small_repo.chunks.errors >= 2
    assert fs.read("/data/tiny.txt", 0, 100) == b"tiny\n"
    assert fs.read("/data/random.bin", 0, start) == (src / "data" / "random.bin").read_bytes()[:start]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", ["vfs.py", "mounting.py"])
def test_lib_never_imports_a_fuse_binding(module: str) -> None:
    bad = {n for n in _imports(LIB / module) if n.split(".")[0] in ("fuse", "mfusepy") or n.startswith("tessera.fuse")}
    assert not bad, f"{module} imports {bad}"


def test_reading_a_directory_in_order_prefetches_layouts(small_repo: tessera.Repo, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from trees import make_small_files

    root = make_small_files(tmp_path / "many", 300, per_dir=300, seed=4)
    v = small_repo.commit("many", root)
    calls = {"file": 0, "files_by_id": 0}
    cat = small_repo.catalog
    for name in calls:
        real = getattr(cat, name)
        monkeypatch.setattr(cat, name, lambda *a, _r=real, _n=name: calls.__setitem__(_n, calls[_n] + 1) or _r(*a))
    fs = VersionFS(v)
    names = [n for n, _ in fs.readdir("/d0000")]
    for n in names:  # in order: one query per growing window, not one per file
        assert fs.read(f"/d0000/{n}", 0, 1 << 20) == (root / "d0000" / n).read_bytes()
    assert calls["file"] + calls["files_by_id"] <= 8
    fs2, calls["file"] = VersionFS(v), 0
    for n in random.Random(1).sample(names, 50):  # random access: small single queries, still right
        assert fs2.read(f"/d0000/{n}", 10, 100) == (root / "d0000" / n).read_bytes()[10:110]
