"""Issue 3 benchmark: reading a mounted version vs reading the same files natively, in the same run.

(1) sequential ``dd bs=1M`` of a 256 MiB file, cold (caches dropped) and warm, median of
BENCH_REPEAT; (2) 20,000 files of 100 KiB read by path with Python ``open().read()``, first pass (caches
dropped; and through a fresh mount with the store still cached: the server's own cost, compared with
native warm reads) and second pass, 1 and 4 processes; (3) a torch DataLoader (num_workers=4) over those files, samples/s, two epochs; (4)
``os.walk`` + ``stat`` of every file; (5) ``tessera mount`` time for a 100,000-file version; (6) the
server's RSS. Every figure is printed next to the native one and their ratio.

Run: ``make bench`` or ``python tests/bench/bench_mount.py``. Sizes: BENCH_SCALE (default 1.0), or
BENCH_MOUNT_BIG_MIB, BENCH_MOUNT_SMALL_FILES, BENCH_MOUNT_MANY_FILES; extra ``tessera mount`` flags
in BENCH_MOUNT_FLAGS (e.g. "--threads" or "--open"). Data and the store are kept in
$BENCH_DIR/mount (default /tmp/tessera-bench/mount) between runs.
"""
from __future__ import annotations

import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPEAT, WORK, drop_caches, scaled, table  # noqa: E402

BIG_MIB = int(os.environ.get("BENCH_MOUNT_BIG_MIB", scaled(256)))
SMALL_FILES = int(os.environ.get("BENCH_MOUNT_SMALL_FILES", scaled(20_000)))
SMALL_SIZE = 100 * 1024
MANY_FILES = int(os.environ.get("BENCH_MOUNT_MANY_FILES", scaled(100_000)))
FLAGS = shlex.split(os.environ.get("BENCH_MOUNT_FLAGS", ""))
DIR = WORK / "mount"

READER = r"""
import os, sys, time
from multiprocessing import Pool
root, nproc, listfile = sys.argv[1], int(sys.argv[2]), sys.argv[3]
paths = [os.path.join(root, p) for p in open(listfile).read().split("\n") if p]
def work(shard):
    n = 0
    for p in shard:
        with open(p, "rb") as f:
            n += len(f.read())
    return n
if __name__ == "__main__":
    shards = [paths[i::nproc] for i in range(nproc)]
    t = time.perf_counter()
    if nproc == 1:
        total = work(paths)
    else:
        with Pool(nproc) as pool:
            total = sum(pool.map(work, shards))
    print(time.perf_counter() - t, total)
"""

LOADER = r"""
import os, sys, time
import torch
from torch.utils.data import DataLoader, Dataset
root, listfile = sys.argv[1], sys.argv[2]
rels = [p for p in open(listfile).read().split("\n") if p]
class Files(Dataset):
    def __len__(self): return len(rels)
    def __getitem__(self, i):
        with open(os.path.join(root, rels[i]), "rb") as f:
            return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
times = []
for epoch in range(2):
    t = time.perf_counter()
    n = sum(1 for _ in DataLoader(Files(), batch_size=None, num_workers=4, shuffle=True))
    times.append(time.perf_counter() - t)
    assert n == len(rels)
print(*times)
"""

WALKER = r"""
import os, sys, time
t = time.perf_counter(); n = 0
for d, dirs, files in os.walk(sys.argv[1]):
    for name in files:
        os.stat(os.path.join(d, name)); n += 1
print(time.perf_counter() - t, n)
"""


def _tessera(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TESSERA_HOME": str(DIR / "home")}
    p = subprocess.run(["tessera", *args], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"tessera {' '.join(args)}: {p.stderr.strip()}")
    return p


def _py(script: str, *args: str) -> list[float]:
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd="/")
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip()[-800:])
    return [float(x) for x in out.stdout.split()]


def build() -> dict[str, str]:
    """Source trees and their versions (kept between runs while the sizes stay the same)."""
    marker = DIR / "built.json"
    want = {"big": BIG_MIB, "small": SMALL_FILES, "many": MANY_FILES}
    if marker.exists():
        got = json.loads(marker.read_text())
        if got.get("sizes") == want:
            return got["refs"]
    subprocess.run(["rm", "-rf", str(DIR)], check=True)
    src = DIR / "src"
    rng = random.Random(5)
    (src / "big").mkdir(parents=True)
    with open(src / "big" / "shard.bin", "wb") as f:
        for _ in range(BIG_MIB):
            f.write(rng.randbytes(1 << 20))
    names = []
    for i in range(SMALL_FILES):
        rel = f"small/d{i // 1000:03d}/f{i:06d}.jpg"
        p = src / rel
        if i % 1000 == 0:
            p.parent.mkdir(parents=True)
        p.write_bytes(rng.randbytes(SMALL_SIZE))
        names.append(rel)
    (DIR / "small.list").write_text("\n".join(names))
    many = DIR / "many"
    for i in range(MANY_FILES):
        p = many / f"d{i // 1000:03d}" / f"f{i:06d}.txt"
        if i % 1000 == 0:
            p.parent.mkdir(parents=True)
        p.write_bytes(b"%d\n" % i)
    refs = {"data": _tessera("commit", "data", str(src)).stdout.split()[-1],
            "many": _tessera("commit", "many", str(many)).stdout.split()[-1]}
    marker.write_text(json.dumps({"sizes": want, "refs": refs}))
    return refs


class Mount:
    def __init__(self, ref: str, mp: Path) -> None:
        self.ref, self.mp = ref, mp
        mp.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> "Mount":
        t = time.perf_counter()
        _tessera("mount", *FLAGS, self.ref, str(self.mp))
        self.seconds = time.perf_counter() - t
        mounts = json.loads(_tessera("mounts", "--json").stdout)
        self.pid = next(m["pid"] for m in mounts if m["mountpoint"] == str(self.mp))
        return self

    def rss(self) -> tuple[int, int]:
        status = dict(line.split(":", 1) for line in Path(f"/proc/{self.pid}/status").read_text().splitlines())
        return int(status["VmRSS"].split()[0]) * 1024, int(status["VmHWM"].split()[0]) * 1024

    def __exit__(self, *exc: object) -> None:
        _tessera("umount", str(self.mp))


def dd(path: Path) -> float:
    """Seconds dd itself reports for copying the file (not counting its own start-up)."""
    p = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], check=True, capture_output=True, text=True)
    # "268435456 bytes (268 MB, 256 MiB) copied, 0.0378 s, 7.1 GB/s"
    return float(p.stderr.strip().splitlines()[-1].split(" copied, ")[1].split(" s")[0].replace(",", "."))


def main() -> str:
    refs = build()
    src, mp = DIR / "src", DIR / "mnt"
    lst = str(DIR / "small.list")
    rows: list[list[object]] = []
    can_drop = drop_caches()
    big_mb = BIG_MIB * 1.048576

    def add(name: str, unit: str, native: float, mounted: float, higher_better: bool = True) -> None:
        ratio = mounted / native if higher_better else native / mounted
        rows.append([name, unit, native, mounted, ratio])

    # (1) sequential read, median of REPEAT, native and mount interleaved
    cold_n, cold_m, warm_n, warm_m = [], [], [], []
    with Mount(refs["data"], mp) as m:
        for _ in range(REPEAT):
            drop_caches()
            cold_n.append(dd(src / "big" / "shard.bin"))
            drop_caches()
            cold_m.append(dd(mp / "big" / "shard.bin"))
            warm_m.append(min(dd(mp / "big" / "shard.bin") for _ in range(3)))
            warm_n.append(min(dd(src / "big" / "shard.bin") for _ in range(3)))
        rss = [m.rss()]
    med = statistics.median
    add(f"dd {BIG_MIB} MiB, cold" + ("" if can_drop else " (caches not dropped)"), "MB/s", big_mb / med(cold_n),
        big_mb / med(cold_m))
    add(f"dd {BIG_MIB} MiB, warm", "MB/s", big_mb / med(warm_n), big_mb / med(warm_m))

    # (2) small files by path: first pass (caches dropped), second pass; then a first pass through a
    # fresh mount while the store's packs are still in the page cache (the server's own cost)
    for nproc in (1, 4):
        drop_caches()
        n1 = _py(READER, str(src), str(nproc), lst)[0]
        n2 = med([_py(READER, str(src), str(nproc), lst)[0] for _ in range(2)])
        with Mount(refs["data"], mp) as m:
            drop_caches()
            m1 = _py(READER, str(mp), str(nproc), lst)[0]
            m2 = med([_py(READER, str(mp), str(nproc), lst)[0] for _ in range(2)])
            rss.append(m.rss())
        with Mount(refs["data"], mp) as m:
            m1w = _py(READER, str(mp), str(nproc), lst)[0]
        add(f"{SMALL_FILES} x 100 KiB, {nproc} proc, 1st pass, cold", "files/s", SMALL_FILES / n1, SMALL_FILES / m1)
        add(f"{SMALL_FILES} x 100 KiB, {nproc} proc, 1st pass, store cached", "files/s", SMALL_FILES / n2,
            SMALL_FILES / m1w)
        add(f"{SMALL_FILES} x 100 KiB, {nproc} proc, 2nd pass", "files/s", SMALL_FILES / n2, SMALL_FILES / m2)

    # (3) DataLoader, 4 workers, two epochs (the first one cold)
    drop_caches()
    ne = _py(LOADER, str(src), lst)
    with Mount(refs["data"], mp) as m:
        drop_caches()
        me = _py(LOADER, str(mp), lst)
        rss.append(m.rss())
    add("DataLoader 4 workers, epoch 1", "samples/s", SMALL_FILES / ne[0], SMALL_FILES / me[0])
    add("DataLoader 4 workers, epoch 2", "samples/s", SMALL_FILES / ne[1], SMALL_FILES / me[1])

    # (4) os.walk + stat of every file
    drop_caches()
    nw1, nw2 = _py(WALKER, str(src / "small"))[0], _py(WALKER, str(src / "small"))[0]
    with Mount(refs["data"], mp) as m:
        mw1, mw2 = _py(WALKER, str(mp / "small"))[0], _py(WALKER, str(mp / "small"))[0]
        rss.append(m.rss())
    add(f"os.walk + stat {SMALL_FILES} files, 1st", "files/s", SMALL_FILES / nw1, SMALL_FILES / mw1)
    add(f"os.walk + stat {SMALL_FILES} files, 2nd", "files/s", SMALL_FILES / nw2, SMALL_FILES / mw2)

    # (5) mount time, (6) server RSS
    mount_times = []
    for _ in range(3):
        with Mount(refs["many"], DIR / "mnt-many") as m:
            mount_times.append(m.seconds)
            os.stat(m.mp / "d000" / "f000000.txt")
            idle = m.rss()
    peak = max(h for _, h in rss)
    out = table(f"Mount vs native directory ({', '.join(FLAGS) or 'default options'})",
                ["test", "unit", "native", "mount", "ratio"], rows)
    out += table("Mount server", ["what", "value"], [
        [f"`tessera mount` of a {MANY_FILES:,}-file version (median of 3, s)", statistics.median(mount_times)],
        ["server RSS just mounted, MiB", idle[0] / 2**20],
        ["server RSS after the reads above (max), MiB", max(r for r, _ in rss) / 2**20],
        ["server peak RSS (VmHWM), MiB", peak / 2**20],
    ])
    return out


if __name__ == "__main__":
    print(main())
