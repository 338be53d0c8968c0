"""Generators for test trees (real files on disk), shared by every test layer."""
from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

BIG_FILE_SIZE = 300 * 1024 * 1024


def write_random(path: Path, size: int, seed: int) -> None:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(rng.randbytes(n))
            left -= n


def write_text(path: Path, size: int, seed: int) -> None:
    rng = random.Random(seed)
    words = [f"word{i}" for i in range(500)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        left = size
        while left > 0:
            line = ",".join(rng.choice(words) for _ in range(12)) + "\n"
            line = line[:left]
            f.write(line)
            left -= len(line)


def make_tricky_tree(root: Path, big_size: int = BIG_FILE_SIZE) -> Path:
    """Nested dirs, empty files and dirs, unicode and spaces in names, an executable, symlinks
    (relative, absolute, dangling, to a dir) and one big file (default 300 MiB, half random)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "empty dir" / "nested empty").mkdir(parents=True)
    (root / "zero.bin").write_bytes(b"")
    (root / "a" / "empty.txt").write_bytes(b"")
    (root / "a" / "hello.txt").write_text("hello tessera\n")
    (root / "a" / "b" / "c" / "deep.txt").write_text("deep\n" * 1000)
    (root / "naïve café ünïcödé.txt").write_text("unicode name\n")
    (root / "日本語 ファイル").mkdir()
    (root / "日本語 ファイル" / "データ.csv").write_text("a,b\n1,2\n" * 5000)
    (root / "with space.txt").write_text("spaces\n")
    run = root / "run.sh"
    run.write_text("#!/bin/sh\necho hi\n")
    run.chmod(0o755)
    os.symlink("a/hello.txt", root / "link-rel")
    os.symlink("/etc/hostname", root / "link-abs")
    os.symlink("does/not/exist", root / "link-dangling")
    os.symlink("a/b", root / "link-dir")
    write_random(root / "a" / "small-random.bin", 200_000, 1)
    big = root / "big" / "big.bin"
    big.parent.mkdir()
    half = big_size // 2
    write_random(big, half, 2)
    with open(big, "ab") as f:
        chunk = (b"0123456789,abcdef,tessera,text-ish payload\n" * 1000)
        left = big_size - half
        while left:
            n = min(left, len(chunk))
            f.write(chunk[:n])
            left -= n
    return root


def make_small_files(root: Path, count: int, min_size: int = 1024, max_size: int = 4096, seed: int = 0,
                     per_dir: int = 1000) -> Path:
    rng = random.Random(seed)
    for i in range(count):
        p = root / f"d{i // per_dir:04d}" / f"f{i:06d}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(rng.randint(min_size, max_size)))
    return root


def tree_digest(root: Path) -> dict[str, tuple]:
    """path -> (kind, mode-ish, sha256 or symlink target) for comparing trees byte for byte."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("symlink", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    while block := f.read(1 << 20):
                        h.update(block)
                out[rel] = ("file", bool(p.stat().st_mode & 0o111), h.hexdigest())
    return out
