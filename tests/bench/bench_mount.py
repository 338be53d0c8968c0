"""Issue 3 benchmark: reading a mounted version vs reading the same files natively, in the same run.

(1) sequential ``dd bs=1M`` of a 256 MiB file, cold (caches dropped) and warm, median of
BENCH_REPEAT; (2) 20,000 files of 100 KiB read by path with Python ``open().read()``, first pass (caches
dropped; and through a fresh mount with the store still cached: the server's own cost, compared with
native warm reads) and second pass, 1 and 4 processes; (3) a torch DataLoader (num_workers=4) over those files, samples/s, two epochs; (4)
``os.walk`` + ``stat`` of every file; (5) ``tessera mount`` time for a 100,000-file version; (6) the
server's RSS. Every figure is printed next to the native one and their ratio.

Then (7) the FUSE path before and after the low-level server, in one run: the code as it was before
``fuse/lowlevel.py`` existed (checked out from git into a temp dir, or BENCH_BASELINE=<rev>) and the
current code, mounted alternately (old, new, old, new, ...), medians of BENCH_REPEAT: first pass of the
small files by path with 1 and 4 readers (packs in the page cache: the server's own cost), ``ls -f`` of
a 50,000-entry directory and ``find -type f`` over BENCH_MOUNT_MANY_FILES files (1,000 per directory;
1,000,000 with BENCH_SCALE=10), each next to the native directory. ``bench_mount.py before-after``
runs only this part.

Run: ``make bench`` or ``python tests/bench/bench_mount.py``. Sizes: BENCH_SCALE (default 1.0), or
BENCH_MOUNT_BIG_MIB, BENCH_MOUNT_SMALL_FILES, BENCH_MOUNT_MANY_FILES, BENCH_MOUNT_FLAT_FILES; extra
``tessera mount`` flags in BENCH_MOUNT_FLAGS (e.g. "--threads" or "--open"). Data and the store are
kept in $BENCH_DIR/mount (default /tmp/tessera-bench/mount) between runs.
"""
from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPEAT, WORK, drop_caches, scaled, table  # noqa: E402

BIG_MIB = int(os.environ.get("BENCH_MOUNT_BIG_MIB", scaled(256)))
SMALL_FILES = int(os.environ.get("BENCH_MOUNT_SMALL_FILES", scaled(20_000)))
SMALL_SIZE = 100 * 1024
MANY_FILES = int(os.environ.get("BENCH_MOUNT_MANY_FILES", scaled(100_000)))
FLAT_FILES = int(os.environ.get("BENCH_MOUNT_FLAT_FILES", 50_000))
REPO = Path(__file__).resolve().parents[2]
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


def _tessera(*args: str, code: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI; ``code``: a directory holding another ``tessera`` package to run instead (the
    mount server it starts inherits it)."""
    env = {**os.environ, "TESSERA_HOME": str(DIR / "home")}
    if code:
        env["PYTHONPATH"] = code
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
    want = {"big": BIG_MIB, "small": SMALL_FILES, "many": MANY_FILES, "flat": FLAT_FILES}
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
    flat = DIR / "flat"
    flat.mkdir()
    for i in range(FLAT_FILES):
        (flat / f"entry-{i:07d}.txt").write_bytes(b"%d\n" % i)
    refs = {"data": _tessera("commit", "data", str(src)).stdout.split()[-1],
            "many": _tessera("commit", "many", str(many)).stdout.split()[-1],
            "flat": _tessera("commit", "flat", str(flat)).stdout.split()[-1]}
    marker.write_text(json.dumps({"sizes": want, "refs": refs}))
    return refs


class Mount:
    def __init__(self, ref: str, mp: Path, code: str | None = None) -> None:
        self.ref, self.mp, self.code = ref, mp, code
        mp.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> "Mount":
        t = time.perf_counter()
        _tessera("mount", *FLAGS, self.ref, str(self.mp), code=self.code)
        self.seconds = time.perf_counter() - t
        mounts = json.loads(_tessera("mounts", "--json").stdout)
        self.pid = next(m["pid"] for m in mounts if m["mountpoint"] == str(self.mp))
        return self

    def rss(self) -> tuple[int, int]:
        status = dict(line.split(":", 1) for line in Path(f"/proc/{self.pid}/status").read_text().splitlines())
        return int(status["VmRSS"].split()[0]) * 1024, int(status["VmHWM"].split()[0]) * 1024

    def __exit__(self, *exc: object) -> None:
        _tessera("umount", str(self.mp), code=self.code)

    def cpu(self) -> float:
        """CPU seconds (user + system) the server has used so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
    return out + "\n" + before_after()


def baseline_code(work: Path) -> tuple[str, str]:
    """The tessera package as it was before the low-level server (or at BENCH_BASELINE), checked out
    into ``work`` as a package tree; returns (PYTHONPATH entry, revision)."""
    rev = os.environ.get("BENCH_BASELINE")
    if not rev:
        added = subprocess.run(["git", "-C", str(REPO), "log", "--diff-filter=A", "--format=%H", "--",
                                "fuse/lowlevel.py"], capture_output=True, text=True, check=True).stdout.split()
        rev = f"{added[-1]}^"
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", rev], capture_output=True, text=True,
                         check=True).stdout.strip()
    tree = work / "src"
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    pkg = work / "pkg" / "tessera"  # setuptools maps tessera = lib, tessera.fuse = fuse: mirror that
    pkg.mkdir(parents=True)
    for f in (tree / "lib").iterdir():
        (pkg / f.name).symlink_to(f)
    (pkg / "fuse").symlink_to(tree / "fuse")
    (pkg / "daemon").symlink_to(tree / "daemon")
    return str(work / "pkg"), rev


def _timed_cmd(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def before_after() -> str:
    """(7): the FUSE path before and after, interleaved, medians; see the module docstring."""
    refs = build()
    src, lst = DIR / "src", str(DIR / "small.list")
    work = Path(tempfile.mkdtemp(prefix="tessera-bench-baseline-"))
    try:
        old, rev = baseline_code(work)
        for pack in (DIR / "home" / "packs").rglob("*.pack"):  # the store in the page cache: the server's cost
            with open(pack, "rb") as f:
                while f.read(1 << 24):
                    pass
        med = statistics.median
        rows = []
        workloads = [
            (f"{SMALL_FILES} x 100 KiB by path, 1st pass, 1 reader", "files/s", refs["data"], SMALL_FILES,
             lambda root: _py(READER, str(root), "1", lst)[0], src),
            (f"{SMALL_FILES} x 100 KiB by path, 1st pass, 4 readers", "files/s", refs["data"], SMALL_FILES,
             lambda root: _py(READER, str(root), "4", lst)[0], src),
            (f"`ls -f` of {FLAT_FILES:,} entries, 1st", "entries/s", refs["flat"], FLAT_FILES,
             lambda root: _timed_cmd(["ls", "-f", str(root)]), DIR / "flat"),
            (f"`find -type f` over {MANY_FILES:,} files, 1st", "files/s", refs["many"], MANY_FILES,
             lambda root: _timed_cmd(["find", str(root), "-type", "f"]), DIR / "many"),
        ]
        for name, unit, ref, n, run, native_root in workloads:
            times: dict[str, list[float]] = {"native": [], "before": [], "after": []}
            cpu: dict[str, list[float]] = {"before": [], "after": []}
            for _ in range(REPEAT):
                run(native_root)  # warm: native reads from the page cache, like the mount's store
                times["native"].append(run(native_root))
                for label, code in (("before", old), ("after", None)):
                    with Mount(ref, DIR / "mnt-ba", code=code) as m:
                        c0 = m.cpu()
                        times[label].append(run(m.mp))
                        cpu[label].append(m.cpu() - c0)
            rate = {k: n / med(v) for k, v in times.items()}
            rows.append([name, unit, rate["native"], rate["before"], rate["after"], rate["after"] / rate["before"],
                         rate["after"] / rate["native"], med(cpu["before"]) / n * 1e6, med(cpu["after"]) / n * 1e6])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return table(f"FUSE path before ({rev}: mfusepy, high-level API) and after (low-level API), interleaved, "
                 f"median of {REPEAT}", ["test", "unit", "native", "FUSE before", "FUSE after", "after / before",
                                         "after / native", "server CPU us per item, before", "after"], rows)


if __name__ == "__main__":
    print(before_after() if sys.argv[1:] == ["before-after"] else main())
