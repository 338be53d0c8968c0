"""Issue 2 benchmark: commit throughput vs `sha256sum` over the same files, re-commit time, peak RSS.

(a) 20,000 files of 60-200 KiB random bytes; (b) four 256 MiB files, half random / half text.
sha256sum is the floor: tessera must read and hash every byte too. Run: `make bench` or
`python tests/bench/bench_commit.py` (BENCH_SCALE=0.1 for a quick look).
"""
from __future__ import annotations

import os
import random
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPEAT, WORK, fresh, mb, peak_rss_of, scaled, table  # noqa: E402


def make_images(root: Path, count: int) -> int:
    rng = random.Random(1)
    total = 0
    for i in range(count):
        p = root / f"d{i // 1000:03d}" / f"img{i:06d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        n = rng.randint(60 * 1024, 200 * 1024)
        p.write_bytes(rng.randbytes(n))
        total += n
    return total


def make_shards(root: Path, count: int, size: int) -> int:
    rng = random.Random(2)
    words = [f"token{i}" for i in range(2000)]
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        with open(root / f"shard{i}.bin", "wb") as f:
            f.write(rng.randbytes(size // 2))
            left = size - size // 2
            while left > 0:
                line = (",".join(rng.choice(words) for _ in range(16)) + "\n").encode()[:left]
                block = line * min(1000, max(1, left // len(line)))
                block = block[:left]
                f.write(block)
                left -= len(block)
    return count * size


def sha256sum_time(root: Path) -> float:
    files = sorted(str(p) for p in root.rglob("*") if p.is_file())
    t, _, _ = peak_rss_of(["bash", "-c", 'xargs -0 sha256sum > /dev/null', "--"] if False else
                          ["sh", "-c", f"cd {root} && find . -type f -print0 | xargs -0 sha256sum > /dev/null"])
    return t if files else 0.0


def commit_once(src: Path, home: Path) -> tuple[float, int]:
    shutil.rmtree(home, ignore_errors=True)
    t, rss, _ = peak_rss_of(["tessera", "commit", "bench", str(src)], env={"TESSERA_HOME": str(home)})
    return t, rss


def bench_set(label: str, src: Path, nbytes: int, peer_rows: list[list[object]]) -> list[object]:
    home = WORK / "home-commit"
    sha256sum_time(src)  # warm the page cache for both contenders
    sha = statistics.median(sha256sum_time(src) for _ in range(REPEAT))
    runs = [commit_once(src, home) for _ in range(REPEAT)]
    commit = statistics.median(t for t, _ in runs)
    rss = max(r for _, r in runs)
    recommit = statistics.median(
        peak_rss_of(["tessera", "commit", "bench", str(src)], env={"TESSERA_HOME": str(home)})[0]
        for _ in range(REPEAT))
    stored = sum(p.stat().st_size for p in (home / "packs").rglob("*.pack"))
    shutil.rmtree(home, ignore_errors=True)
    for tool in PEERS:
        t = peer_time(tool, src)
        peer_rows.append([label, tool, "not installed" if t is None else f"{mb(nbytes) / t:.0f}",
                          "-" if t is None else f"{t / commit:.2f}x"])
    return [label, f"{mb(nbytes):.0f} MB", f"{mb(nbytes) / sha:.0f}", f"{mb(nbytes) / commit:.0f}",
            f"{commit / sha:.2f}x", f"{recommit:.2f} s", f"{mb(stored) / mb(nbytes):.2f}", f"{rss / 2**20:.0f} MiB"]


PEERS = {
    "restic": (["restic", "init", "-r", "{repo}"], ["restic", "-r", "{repo}", "backup", "-q", "{src}"],
               {"RESTIC_PASSWORD": "bench"}),
    "borg": (["borg", "init", "-e", "none", "{repo}"], ["borg", "create", "{repo}::a", "{src}"],
             {"BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes"}),
}


def peer_time(tool: str, src: Path) -> float | None:
    """Median ingest time of a peer backup tool on the same data (None when not installed)."""
    if shutil.which(tool) is None:
        return None
    init, backup, env = PEERS[tool]
    times = []
    for _ in range(REPEAT):
        repo = WORK / f"peer-{tool}"
        shutil.rmtree(repo, ignore_errors=True)
        fmt = lambda args: [a.format(repo=repo, src=src) for a in args]  # noqa: E731
        subprocess.run(fmt(init), env={**os.environ, **env}, capture_output=True, check=True)
        times.append(peak_rss_of(fmt(backup), env=env)[0])
        shutil.rmtree(repo, ignore_errors=True)
    return statistics.median(times)


def main() -> str:
    root = fresh(WORK / "commit")
    images = root / "images"
    n_images = make_images(images, scaled(20_000))
    shards = root / "shards"
    n_shards = make_shards(shards, 4, scaled(256 << 20))
    peer_rows: list[list[object]] = []
    rows = [bench_set(f"(a) {scaled(20_000)} files 60-200 KiB random", images, n_images, peer_rows),
            bench_set("(b) 4 shards, half random / half text", shards, n_shards, peer_rows)]
    out = table(
        f"Commit throughput (median of {REPEAT}; cores={os.cpu_count()})",
        ["data", "size", "sha256sum MB/s", "tessera MB/s", "tessera time / sha256sum", "re-commit",
         "stored / raw", "peak RSS"], rows)
    out += "\n" + table("Peers on the same data (median ingest)", ["data", "tool", "MB/s", "peer time / tessera time"],
                         peer_rows)
    shutil.rmtree(root, ignore_errors=True)
    return out


if __name__ == "__main__":
    print(main())
