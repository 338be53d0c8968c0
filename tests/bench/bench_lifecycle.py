"""Issue 10 benchmark: reclaiming space locally and on S3.

(1) Local reclaim of a 100,000-file store: three versions of a tree of small files (each version rewrites
10 % of the files), forget all but the newest, then ``tessera gc``: wall time and peak RSS of the gc
process, what it deleted and freed; then a second gc with nothing to do (the cost of marking alone).
(2) S3 requests per forgotten version: ten versions pushed to moto (its own process, behind the
counting fault proxy of tests/fault_proxy.py), ``forget --remote --keep-last 2``, then ``prune`` and
``prune --wait`` (plan, then sweep): every HTTP request counted by method, divided by the 8 versions
forgotten.
(3) Soaks: the acceptance criteria at full size, run as tests with TESSERA_SOAK=1 (`make test` runs
them smaller): SIGKILL of gc at 32 random moments, two homes forgetting/pruning and pushing for 20
rounds, the daemon's keep_last = 5 over 50 changes. A failure fails the benchmark run.

Sizes: BENCH_SCALE (default 1.0), or BENCH_GC_FILES (100000). Run: ``make bench`` or
``python tests/bench/bench_lifecycle.py``.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from bench_s3 import start_moto  # noqa: E402
from common import WORK, fresh, peak_rss_of, scaled, table  # noqa: E402

GC_FILES = int(os.environ.get("BENCH_GC_FILES", scaled(100_000)))
DIR = WORK / "lifecycle"
MiB = 1 << 20


def tess(home: Path, *args: str, **extra: str) -> str:
    proc = subprocess.run(["tessera", *args], capture_output=True, text=True,
                          env={**os.environ, "TESSERA_HOME": str(home), **extra})
    if proc.returncode != 0:
        raise RuntimeError(f"tessera {' '.join(args)}: {proc.stderr.strip()[-400:]}")
    return proc.stdout


def small_tree(root: Path, files: int, version: int) -> None:
    """``files`` files of 1-3 KiB in 1000-file directories; version v rewrites the v-th tenth of them."""
    rng = random.Random(7)
    for i in range(files):
        p = root / f"d{i // 1000:04d}" / f"f{i:06d}.bin"
        size = rng.randint(1024, 3072)
        fresh_file = not p.exists()
        if fresh_file:
            p.parent.mkdir(parents=True, exist_ok=True)
        if fresh_file or (version and (i % 10) == version - 1):
            p.write_bytes(random.Random(i * 31 + version).randbytes(size))


def pack_bytes(home: Path) -> int:
    return sum(p.stat().st_size for p in (home / "packs").rglob("*.pack"))


def bench_local() -> str:
    root = DIR / "gc"
    fresh(root)
    home, src = root / "home", root / "src"
    for v in range(3):
        small_tree(src, GC_FILES, v)
        tess(home, "commit", "ds", str(src), "-m", f"v{v}")
    tess(home, "forget", "ds", "--keep-last", "1")
    before = pack_bytes(home)
    seconds, rss, out = peak_rss_of(["tessera", "--home", str(home), "gc", "--json"])
    report = json.loads(out)
    idle, idle_rss, _ = peak_rss_of(["tessera", "--home", str(home), "gc", "--json"])
    fsck = tess(home, "fsck").strip().splitlines()[-1]
    rows = [
        ["gc after forgetting 2 of 3 versions", f"{seconds:.1f}", f"{rss / MiB:.0f}",
         f"{report['deleted']['files']} file records, {report['deleted']['chunks']} chunks, "
         f"{report['deleted']['packs']} packs deleted; {report['repacked']} packs repacked",
         f"{before / MiB:.1f} -> {pack_bytes(home) / MiB:.1f} MiB"],
        ["gc again (nothing to do: marking only)", f"{idle:.1f}", f"{idle_rss / MiB:.0f}", "-", "-"],
    ]
    return table(f"Local reclaim of a {GC_FILES:,}-file store (3 versions, 10 % of files rewritten per version)",
                 ["run", "seconds", "peak RSS MiB", "what it did", "packs"], rows) + f"\n{fsck}\n"


def bench_s3() -> str:
    from fault_proxy import FaultProxy

    root = DIR / "s3"
    fresh(root)
    moto, endpoint = start_moto()
    try:
        host, port = endpoint.removeprefix("http://").split(":")
        with FaultProxy(host, int(port)) as proxy:
            env = {"AWS_ENDPOINT_URL": proxy.url, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                   "AWS_REGION": "us-east-1"}
            import boto3

            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                         aws_secret_access_key="bench").create_bucket(Bucket="bench-lifecycle")
            home, src = root / "home", root / "src"
            os.environ.update(env)
            tess(home, "remote", "add", "origin", "s3://bench-lifecycle/repo")
            tess(home, "config", "prune.margin", "2s")
            for v in range(10):  # each version: 8 MiB of its own plus a shared part
                shutil.rmtree(src, ignore_errors=True)
                (src / "shared").mkdir(parents=True)
                (src / "shared" / "s.bin").write_bytes(random.Random(1).randbytes(4 * MiB))
                (src / f"own{v}.bin").write_bytes(random.Random(100 + v).randbytes(8 * MiB))
                tess(home, "commit", "ds", str(src))
            tess(home, "push", "ds")
            rows = []
            totals: Counter[str] = Counter()
            for label, args in (("forget --remote --keep-last 2", ["forget", "--remote", "origin", "ds", "--keep-last", "2"]),
                                ("prune (mark, plan)", ["prune"]),
                                ("prune --wait (sweep, mark, plan)", ["prune", "--wait", "--json"])):
                start = len(proxy.stats.methods)
                t0 = time.perf_counter()
                out = tess(home, *args)
                seconds = time.perf_counter() - t0
                methods = Counter(proxy.stats.methods[start:])
                totals.update(methods)
                rows.append([label, f"{seconds:.1f}", sum(methods.values()),
                             ", ".join(f"{m} {n}" for m, n in sorted(methods.items())), f"{sum(methods.values()) / 8:.1f}"])
                if args[-1] == "--json":
                    swept = json.loads(out)
            rows.append(["total", "", sum(totals.values()), ", ".join(f"{m} {n}" for m, n in sorted(totals.items())),
                         f"{sum(totals.values()) / 8:.1f}"])
    finally:
        moto.kill()
        moto.wait()
    title = ("S3 (moto) requests to forget 8 of 10 versions and delete their data "
             f"(swept {swept['deleted']} objects, {swept['deleted_bytes'] / MiB:.0f} MiB)")
    return table(title, ["step", "seconds", "requests", "by method", "per forgotten version"], rows)


SOAKS = ["tests/test_3_lifecycle.py::test_sigkill_gc_at_random_moments",
         "tests/test_4_prune.py::test_two_homes_forget_and_prune_while_pushing",
         "tests/test_3_lifecycle.py::test_daemon_keep_last_five_over_fifty_changes"]


def bench_soak() -> str:
    root = HERE.parent.parent
    rows = []
    for test in SOAKS:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                              cwd=root, capture_output=True, text=True, env={**os.environ, "TESSERA_SOAK": "1"})
        if proc.returncode != 0:
            raise RuntimeError(f"soak {test} failed:\n{proc.stdout[-3000:]}")
        rows.append([test.split("::")[1], f"{time.perf_counter() - t0:.0f}", "passed"])
    return table("Lifecycle soaks (TESSERA_SOAK=1: acceptance sizes)", ["test", "seconds", "result"], rows)


def main() -> str:
    return bench_local() + "\n" + bench_s3() + "\n" + bench_soak()


if __name__ == "__main__":
    print(main())
