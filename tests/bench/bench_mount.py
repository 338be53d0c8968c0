"""Issues 3 and 13 benchmark: reading a mounted version, through the FUSE path, the kernel path
(whole-file cache + EROFS + overlayfs) and borg's mount, against the same files read natively, in one run.

Rows: (1) ``dd bs=1M`` of a 256 MiB file, cold (caches dropped) and warm; (2) 20,000 files of 100 KiB
read by path with Python ``open().read()``: first pass cold (caches dropped), first pass through a
fresh mount with the data in the page cache ("page-cache warm": for FUSE the packs, for the kernel
path the cache files, for native the files), second pass; 1 and 4 processes; (3) a torch DataLoader
(num_workers=4, shuffled), two epochs; (4) ``os.walk`` + ``stat`` of every file, twice; (5) readdir of
a 50,000-entry directory through a fresh mount; (6) ``tessera mount`` of a 100,000-file version: FUSE,
kernel path the first time (materialize + image) and once materialized; (7) materialization MB/s and
file-cache bytes per version; (8) the FUSE server's RSS. Every figure is the median of BENCH_REPEAT
runs (default 3), shown next to native with the ratio (for times: native / mount).

Run: ``make bench`` or ``python tests/bench/bench_mount.py``. Sizes: BENCH_SCALE (default 1.0), or
BENCH_MOUNT_BIG_MIB, BENCH_MOUNT_SMALL_FILES, BENCH_MOUNT_MANY_FILES, BENCH_MOUNT_WIDE_FILES; extra
FUSE flags in BENCH_MOUNT_FLAGS. Data and the store are kept in $BENCH_DIR/mount (default
/tmp/tessera-bench/mount) between runs. The kernel column needs root; borg's needs ``borg`` with a
FUSE binding (``make bench`` installs borgbackup); a missing one is reported, not fatal.
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
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPEAT, WORK, drop_caches, scaled, table  # noqa: E402

BIG_MIB = int(os.environ.get("BENCH_MOUNT_BIG_MIB", scaled(256)))
SMALL_FILES = int(os.environ.get("BENCH_MOUNT_SMALL_FILES", scaled(20_000)))
SMALL_SIZE = 100 * 1024
MANY_FILES = int(os.environ.get("BENCH_MOUNT_MANY_FILES", scaled(100_000)))
WIDE_FILES = int(os.environ.get("BENCH_MOUNT_WIDE_FILES", scaled(50_000)))
FLAGS = shlex.split(os.environ.get("BENCH_MOUNT_FLAGS", ""))
DIR = WORK / "mount"
HOME = DIR / "home"

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

LISTER = r"""
import os, sys, time
t = time.perf_counter(); n = len(os.listdir(sys.argv[1])); print(time.perf_counter() - t, n)
"""


def _tessera(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "TESSERA_HOME": str(HOME), **(env or {})}
    p = subprocess.run(["tessera", *args], capture_output=True, text=True, env=full)
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
    want = {"big": BIG_MIB, "small": SMALL_FILES, "many": MANY_FILES, "wide": WIDE_FILES, "v": 2}
    if marker.exists():
        got = json.loads(marker.read_text())
        if got.get("sizes") == want:
            return dict(got["refs"])
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
    wide = DIR / "wide" / "w"
    wide.mkdir(parents=True)
    for i in range(WIDE_FILES):
        (wide / f"entry-{i:06d}.txt").write_bytes(b"%d\n" % i)
    refs = {name: _tessera("commit", name, str(path)).stdout.split()[-1]
            for name, path in (("data", src), ("many", many), ("wide", DIR / "wide"))}
    marker.write_text(json.dumps({"sizes": want, "refs": refs}))
    return refs


class Mount:
    """``with Mount("fuse" | "kernel" | "borg", ref, mp):`` — mount, time it, unmount."""

    def __init__(self, kind: str, ref: str, mp: Path, env: dict[str, str] | None = None) -> None:
        self.kind, self.ref, self.mp, self.env = kind, ref, mp, env
        mp.mkdir(parents=True, exist_ok=True)
        self.pid = 0

    def __enter__(self) -> "Mount":
        t = time.perf_counter()
        if self.kind == "borg":
            subprocess.run(["borg", "mount", f"{DIR / 'borg'}::data", str(self.mp)], check=True, capture_output=True,
                           env={**os.environ, "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes"})
        else:
            flags = FLAGS + ["--fuse"] if self.kind == "fuse" else ["--kernel"]
            _tessera("mount", *flags, self.ref, str(self.mp), env=self.env)
        self.seconds = time.perf_counter() - t
        if self.kind == "fuse":  # the registry entry (`tessera mounts` also stats other people's mounts)
            from tessera.mounting import read_record, registry_path

            rec = read_record(registry_path(HOME, str(self.mp)))
            self.pid = rec.pid if rec is not None else 0
        return self

    def rss(self) -> tuple[int, int]:
        if not self.pid:
            return 0, 0
        status = dict(line.split(":", 1) for line in Path(f"/proc/{self.pid}/status").read_text().splitlines())
        return int(status["VmRSS"].split()[0]) * 1024, int(status["VmHWM"].split()[0]) * 1024

    def root(self, src: Path) -> Path:
        """Where the tree that is ``src`` natively appears in this mount (borg keeps the full path)."""
        return self.mp / str(src).lstrip("/") if self.kind == "borg" else self.mp

    def __exit__(self, *exc: object) -> None:
        if self.kind == "borg":
            subprocess.run(["borg", "umount", str(self.mp)], check=True, capture_output=True)
        else:
            _tessera("umount", str(self.mp))


def dd(path: Path) -> float:
    """Seconds dd itself reports for copying the file (not counting its own start-up)."""
    p = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], check=True, capture_output=True, text=True)
    return float(p.stderr.strip().splitlines()[-1].split(" copied, ")[1].split(" s")[0].replace(",", "."))


def kernel_ok() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    from tessera.kernelmount import probe

    HOME.mkdir(parents=True, exist_ok=True)
    return probe(HOME)


def borg_ok() -> str | None:
    if shutil.which("borg") is None:
        return "borg not installed"
    env = {**os.environ, "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes"}
    repo = DIR / "borg"
    if not (repo / "config").exists():
        shutil.rmtree(repo, ignore_errors=True)
        p = subprocess.run(["borg", "init", "--encryption=none", str(repo)], capture_output=True, text=True, env=env)
        if p.returncode == 0:
            p = subprocess.run(["borg", "create", "--compression", "none", f"{repo}::data", str(DIR / "src")],
                               capture_output=True, text=True, env=env)
        if p.returncode != 0:
            shutil.rmtree(repo, ignore_errors=True)
            return f"borg failed: {p.stderr.strip()[-200:]}"
    mp = DIR / "mnt-borg-probe"
    mp.mkdir(exist_ok=True)
    p = subprocess.run(["borg", "mount", f"{repo}::data", str(mp)], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        return f"borg mount failed: {p.stderr.strip()[-200:]}"
    subprocess.run(["borg", "umount", str(mp)], capture_output=True)
    return None


def main() -> str:
    refs = build()
    src, lst = DIR / "src", str(DIR / "small.list")
    med = statistics.median
    can_drop = drop_caches()
    notes: list[str] = []
    kinds = ["fuse"]
    why = kernel_ok()
    kinds += ["kernel"] if why is None else []
    notes += [f"kernel path skipped: {why}"] if why else []
    why_borg = borg_ok()
    kinds += ["borg"] if why_borg is None else []
    notes += [f"borg skipped: {why_borg}"] if why_borg else []
    mp = {k: DIR / f"mnt-{k}" for k in kinds}
    cols = ["native", *kinds]
    rss: list[tuple[int, int]] = []
    extra = _Printed()

    # (0) kernel path: materialize the data version from an empty cache (MB/s, bytes) — then warm
    if "kernel" in kinds:
        _tessera("cache", "evict", "--all")
        t = time.perf_counter()
        with Mount("kernel", refs["data"], mp["kernel"]):
            first = time.perf_counter() - t
        used, disk = _cache_bytes(refs["data"])
        size = _version_size(refs["data"])
        extra.append(["kernel: first `tessera mount` of the data version (materialize + image), s", first])
        extra.append(["kernel: materialization, MB/s (whole first mount)", used / 1e6 / first])
        extra.append(["kernel: file-cache bytes (apparent / on disk) per byte of the data version",
                      f"{used / size:.3f} / {disk / size:.3f}"])

    # (1) sequential read
    big = Path("big") / "shard.bin"
    for _ in range(REPEAT):
        for col in cols:
            def one(root: Path) -> None:
                drop_caches()
                _acc(f"dd {BIG_MIB} MiB, cold" + ("" if can_drop else " (caches not dropped)"), "MB/s", col,
                     BIG_MIB * 1.048576 / dd(root / big))
                _acc(f"dd {BIG_MIB} MiB, warm", "MB/s", col,
                     BIG_MIB * 1.048576 / min(dd(root / big) for _ in range(3)))
            _run_in(col, refs["data"], mp, src, one)

    # (2) small files by path
    for nproc in (1, 4):
        cold, warm1, second = (f"{SMALL_FILES} x 100 KiB, {nproc} proc, {x}" for x in
                               ("1st pass, cold", "1st pass, page-cache warm", "2nd pass"))
        for _ in range(REPEAT):
            for col in cols:
                def passes(root: Path) -> None:
                    drop_caches()
                    _acc(cold, "files/s", col, SMALL_FILES / _py(READER, str(root), str(nproc), lst)[0])
                    _acc(second, "files/s", col, SMALL_FILES / _py(READER, str(root), str(nproc), lst)[0])
                _run_in(col, refs["data"], mp, src, passes, rss=rss)

                def fresh(root: Path) -> None:
                    _acc(warm1, "files/s", col, SMALL_FILES / _py(READER, str(root), str(nproc), lst)[0])
                if col == "native":
                    _py(READER, str(src), str(nproc), lst)
                _run_in(col, refs["data"], mp, src, fresh)

    # (3) DataLoader, (4) os.walk + stat
    for _ in range(REPEAT):
        for col in cols:
            def loader(root: Path) -> None:
                drop_caches()
                e1, e2 = _py(LOADER, str(root), lst)
                _acc("DataLoader 4 workers, epoch 1 (cold)", "samples/s", col, SMALL_FILES / e1)
                _acc("DataLoader 4 workers, epoch 2", "samples/s", col, SMALL_FILES / e2)
            _run_in(col, refs["data"], mp, src, loader, rss=rss)

            def walker(root: Path) -> None:
                drop_caches()
                _acc(f"os.walk + stat {SMALL_FILES} files, 1st (cold)", "files/s", col,
                     SMALL_FILES / _py(WALKER, str(root / "small"))[0])
                _acc(f"os.walk + stat {SMALL_FILES} files, 2nd", "files/s", col,
                     SMALL_FILES / _py(WALKER, str(root / "small"))[0])
            _run_in(col, refs["data"], mp, src, walker)

    # (5) readdir of a 50,000-entry directory through a fresh mount (metadata in the page cache)
    for _ in range(REPEAT):
        for col in [c for c in cols if c != "borg"]:
            def lister(root: Path) -> None:
                _acc(f"readdir of {WIDE_FILES:,} entries, fresh mount", "entries/s", col,
                     WIDE_FILES / _py(LISTER, str(root / "w"))[0])
            if col == "native":
                lister(DIR / "wide")
            else:
                with Mount(col, refs["wide"], mp[col]) as m:
                    lister(m.mp)

    # (6) mount time of a 100,000-file version
    times: dict[str, list[float]] = {"fuse": [], "kernel-first": [], "kernel": []}
    many_mp = DIR / "mnt-many"
    for _ in range(REPEAT):
        with Mount("fuse", refs["many"], many_mp) as m:
            times["fuse"].append(m.seconds)
            os.stat(many_mp / "d000" / "f000000.txt")
            idle = m.rss()
        if "kernel" in kinds:
            _evict_version(refs["many"])
            with Mount("kernel", refs["many"], many_mp) as m:
                times["kernel-first"].append(m.seconds)
            with Mount("kernel", refs["many"], many_mp) as m:
                times["kernel"].append(m.seconds)
                os.stat(many_mp / "d000" / "f000000.txt")
    extra.append([f"`tessera mount` of a {MANY_FILES:,}-file version, FUSE, s", med(times["fuse"])])
    if times["kernel"]:
        extra.append([f"`tessera mount` of a {MANY_FILES:,}-file version, kernel, first time, s",
                      med(times["kernel-first"])])
        extra.append([f"`tessera mount` of a {MANY_FILES:,}-file version, kernel, materialized, s",
                      med(times["kernel"])])
        used2, disk2 = _cache_bytes(refs["many"])
        extra.append([f"kernel: file cache of the {MANY_FILES:,}-file version ({_version_size(refs['many'])} bytes), "
                      "MiB apparent / on disk", f"{used2 / 2**20:.1f} / {disk2 / 2**20:.1f}"])
    extra.append(["FUSE server RSS just mounted, MiB", idle[0] / 2**20])
    if rss:
        extra.append(["FUSE server peak RSS (VmHWM), MiB", max(h for _, h in rss) / 2**20])

    header = ["test", "unit", "native"]
    for k in kinds:
        header += [k, f"{k} ratio"]
    lines = []
    for row, vals in _ROWS.items():
        line: list[object] = [row, _UNITS[row], med(vals["native"])]
        for k in kinds:
            v = med(vals[k]) if vals.get(k) else float("nan")
            line += [v, v / med(vals["native"])]
        lines.append(line)
    out = table(f"Mount vs native directory (median of {REPEAT}; FUSE {', '.join(FLAGS) or 'default options'})",
                header, lines)
    out += table("Mount time, file cache, server", ["what", "value"], extra)
    if notes:
        out += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    return out


class _Printed(list):  # type: ignore[type-arg]
    """A list of table rows that also goes to stderr as it grows (partial figures survive a crash)."""

    def append(self, row: list[object]) -> None:  # type: ignore[override]
        print(f"  {row[0]} | {row[1]}", file=sys.stderr, flush=True)
        super().append(row)


_ROWS: dict[str, dict[str, list[float]]] = {}
_UNITS: dict[str, str] = {}


def _acc(row: str, unit: str, col: str, value: float) -> None:
    _UNITS[row] = unit
    _ROWS.setdefault(row, {}).setdefault(col, []).append(value)
    print(f"  {row} | {col} | {value:.1f}", file=sys.stderr, flush=True)  # partial figures survive a crash


def _run_in(col: str, ref: str, mp: dict[str, Path], src: Path, fn: Callable[[Path], None], *,
            rss: list[tuple[int, int]] | None = None) -> None:
    if col == "native":
        fn(src)
        return
    with Mount(col, ref, mp[col]) as m:
        fn(m.root(src))
        if rss is not None and m.pid:
            rss.append(m.rss())


def _cache_bytes(ref: str) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of one version's files in the whole-file cache."""
    import tessera
    from tessera.kernelmount import open_cache

    used = disk = 0
    with tessera.Repo(HOME) as repo:
        cache = open_cache(repo)
        for sha in {e.sha256 for e in repo.get(ref).walk() if e.is_file and e.sha256}:
            try:
                st = os.lstat(cache.path(sha))
            except FileNotFoundError:
                continue
            used += st.st_size
            disk += st.st_blocks * 512
    return used, disk


def _version_size(ref: str) -> int:
    out = json.loads(_tessera("show", ref, "--json").stdout)
    return int(out.get("size") or out.get("bytes") or 1)


def _evict_version(ref: str) -> None:
    """Remove one version's cache files and images (nothing else), so its next kernel mount starts cold."""
    import tessera
    from tessera.filecache import drop_all_images
    from tessera.kernelmount import open_cache

    with tessera.Repo(HOME) as repo:
        cache = open_cache(repo)
        with cache.locked():
            drop_all_images(HOME)
            for e in repo.get(ref).walk():
                if e.is_file and e.sha256:
                    cache.path(e.sha256).unlink(missing_ok=True)


if __name__ == "__main__":
    print(main())
