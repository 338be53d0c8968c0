"""Choosing the default FastCDC sizes: dedup after an edit vs commit speed vs catalog size.

Four shards (256 MiB each at BENCH_SCALE=1; half random, half text); then 1 MiB is inserted in the
middle of one shard and 10 MiB appended to another (the edit DVC re-stores whole). For each
parameter set: first-commit MB/s, new bytes stored by the second commit, chunks per GiB.
"""
from __future__ import annotations

import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_commit import make_shards  # noqa: E402
from common import REPEAT, WORK, fresh, mb, scaled, table  # noqa: E402

import tessera  # noqa: E402
from tessera.config import RepoSettings  # noqa: E402
from tessera.format.chunker import ChunkParams  # noqa: E402

K = 1024
SETS = [
    (32 * K, 64 * K, 256 * K),
    (64 * K, 128 * K, 512 * K),
    (64 * K, 192 * K, 1024 * K),
    (128 * K, 256 * K, 2048 * K),
    (256 * K, 512 * K, 4096 * K),
]


def edit(src: Path) -> int:
    shard = src / "shard1.bin"
    data = shard.read_bytes()
    mid = len(data) // 2
    shard.write_bytes(data[:mid] + os.urandom(1 << 20) + data[mid:])
    with open(src / "shard2.bin", "ab") as f:
        f.write(os.urandom(10 << 20))
    return 11 << 20


def main() -> str:
    root = fresh(WORK / "chunking")
    base = root / "base"
    total = make_shards(base, 4, scaled(256 << 20))
    rows = []
    for mn, avg, mx in SETS:
        settings = RepoSettings(ChunkParams(mn, avg, mx))
        speeds = []
        for _ in range(REPEAT):
            home = root / "home"
            shutil.rmtree(home, ignore_errors=True)
            repo = tessera.Repo(home, settings=settings)
            t0 = time.perf_counter()
            repo.commit_dir("d", base)
            speeds.append(mb(total) / (time.perf_counter() - t0))
            repo.close()
        src = root / "edited"
        shutil.rmtree(src, ignore_errors=True)
        shutil.copytree(base, src)
        home = root / "home"
        shutil.rmtree(home, ignore_errors=True)
        repo = tessera.Repo(home, settings=settings)
        repo.commit_dir("d", src)
        before = repo.stats()
        changed = edit(src)
        repo.commit_dir("d", src)
        after = repo.stats()
        added = after["pack_bytes"] - before["pack_bytes"]
        chunks_per_gib = before["chunks"] / (total / 2**30)
        rows.append([f"{mn // K}K / {avg // K}K / {mx // K}K", f"{statistics.median(speeds):.0f}",
                     f"{mb(added):.1f} MB", f"{added / changed:.2f}", f"{chunks_per_gib:.0f}"])
        repo.close()
    shutil.rmtree(root, ignore_errors=True)
    return table(f"FastCDC parameters ({mb(total):.0f} MB of shards; edit = 1 MiB insert + 10 MiB append)",
                 ["min / avg / max", "commit MB/s", "new bytes stored", "stored / changed", "chunks per GiB"],
                 rows)


if __name__ == "__main__":
    print(main())
