"""Shared by the reader tests (fsspec, torch, lock file): small datasets, remote-only homes, GET counts."""
from __future__ import annotations

import hashlib
import random
import subprocess
from pathlib import Path

from trees import write_random


def write_table_dir(root: Path, rows: int = 300) -> Path:
    """``data.csv`` and the same rows as ``parts/part-0.parquet`` and ``parts/part-1.parquet``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    ids = list(range(rows))
    names = [f"item-{i}" for i in ids]
    scores = [round(i * 0.5, 1) for i in ids]
    with open(root / "data.csv", "w") as f:
        f.write("id,name,score\n")
        for i, n, s in zip(ids, names, scores):
            f.write(f"{i},{n},{s}\n")
    (root / "parts").mkdir(exist_ok=True)
    half = rows // 2
    for k, (lo, hi) in enumerate(((0, half), (half, rows))):
        table = pa.table({"id": ids[lo:hi], "name": names[lo:hi], "score": scores[lo:hi]})
        pq.write_table(table, root / "parts" / f"part-{k}.parquet")
    return root


def write_samples(root: Path, count: int, *, min_size: int = 2_000, max_size: int = 60_000,
                  seed: int = 0) -> dict[str, bytes]:
    """``count`` files of random bytes under ``root/samples/``; returns path -> bytes."""
    rng = random.Random(seed)
    out: dict[str, bytes] = {}
    (root / "samples").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        rel = f"samples/{i:05d}.bin"
        data = rng.randbytes(rng.randint(min_size, max_size))
        (root / rel).write_bytes(data)
        out[rel] = data
    return out


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_home(path: Path, pack_target: int | None = None) -> Path:
    from tessera.config import RepoSettings
    from tessera.repo import Repo

    settings = RepoSettings(pack_target=pack_target) if pack_target else None
    Repo(path, settings=settings).close()
    return path


def push(home: Path, ref: str, url: str) -> None:
    from tessera.repo import Repo

    with Repo(home) as repo:
        repo.push(ref, url)


def remote_only_home(path: Path, url: str) -> Path:
    """A fresh home whose only knowledge is a default remote (added like a user would)."""
    subprocess.run(["tessera", "--home", str(path), "remote", "add", "origin", url], check=True,
                   capture_output=True, stdin=subprocess.DEVNULL)
    return path


def big_file(path: Path, size: int, seed: int = 7) -> Path:
    write_random(path, size, seed)
    return path
