"""Issue 14 benchmark: does memory stay flat and time linear as the file count grows?

For 100,000 and 1,000,000 files of 60 bytes, 1,000 to a directory (3,000,000 too when BENCH_SCALE >= 3;
a BENCH_SCALE below 1 shrinks the counts): `tessera commit` and an unchanged re-commit (files/s, peak RSS),
`tessera fsck` (peak RSS), the FUSE mount server after `find` over the whole mount, with each
`--listing` (median of 3 fresh mounts: time vs native `find`, the server's peak RSS), a first kernel mount
(`mount_kernel` in a process of its own: files cached, image written, mounted: time and peak RSS; then `find`
through it twice; as root where the machine can), and `tessera gc`
twice: with the version kept (a full mark, nothing to delete), then after `tessera rm` (every row and
pack swept); time and peak RSS. Then the memory cap check: 200,000 files committed under an address-space cap
(RLIMIT_AS) of what a one-file commit needs plus 200 MiB, which the code before issue 14 exceeds (it
needed about 420 MiB more for this tree), with the hash of an uncapped commit and an unchanged re-commit
that reads nothing (tests/test_3_scale.py proves the same flatness for commit, fsck and gc on 8,000 vs 32,000
files within `make test`'s time). Then a distributed commit on a local Ray cluster (`ray.init(num_cpus=2)`) of
512 MiB of 8 MiB files to a `file://` remote, with 1 and 2 tasks (MB/s).

Run: `make bench` or `python tests/bench/bench_scale.py` (BENCH_SCALE=0.1 for a quick look). Trees are
kept in $BENCH_DIR/scale between runs (they take minutes to write); delete them when done.
"""
from __future__ import annotations

import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SCALE, WORK, fresh, peak_rss_of, table  # noqa: E402
from scale_tree import make_flat_files  # noqa: E402


def counts() -> list[int]:
    base = [100_000, 1_000_000] + ([3_000_000] if SCALE >= 3 else [])
    return [max(1000, int(n * min(SCALE, 1.0))) for n in base]


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def vm_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def mount_find(home: Path, ref: str, mnt: Path, listing: str = "attrs") -> tuple[float, float, int]:
    """(find through a fresh FUSE mount, native find of the source is measured by the caller) -> seconds
    of the first and second find, the server's peak RSS."""
    env = {**os.environ, "TESSERA_HOME": str(home)}
    mnt.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tessera", "mount", "--fuse", "--listing", listing, ref, str(mnt)], env=env, check=True,
                   capture_output=True)
    try:
        from tessera.mounting import list_mounts

        pid = next(m.pid for m in list_mounts(home) if os.path.realpath(m.mountpoint) == os.path.realpath(mnt))
        t0 = time.perf_counter()
        subprocess.run(["find", str(mnt), "-type", "f"], check=True, stdout=subprocess.DEVNULL)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        subprocess.run(["find", str(mnt), "-type", "f"], check=True, stdout=subprocess.DEVNULL)
        second = time.perf_counter() - t0
        return first, second, vm_hwm(pid)
    finally:
        subprocess.run(["tessera", "umount", str(mnt)], env=env, capture_output=True)


KERNEL_MOUNT = """
import sys, tessera
from tessera.kernelmount import mount_kernel
with tessera.Repo(sys.argv[1]) as repo:
    mount_kernel(repo, repo.get(sys.argv[2]), sys.argv[3])
"""


def kernel_find(home: Path, ref: str, mnt: Path) -> tuple[float, int, float, float]:
    """A first kernel mount (cache what it needs, write the image, mount) in a process of its own:
    (its seconds, its peak RSS, the first and second `find` through it). Raises when the machine
    cannot make kernel mounts."""
    from tessera.kernelmount import probe

    why = probe(home)
    if why is not None:
        raise RuntimeError(why)
    mnt.mkdir(parents=True, exist_ok=True)
    t_mount, rss, _ = peak_rss_of([sys.executable, "-c", KERNEL_MOUNT, str(home), ref, str(mnt)])
    try:
        first = _timed(["find", str(mnt), "-type", "f"])
        second = _timed(["find", str(mnt), "-type", "f"])
        return t_mount, rss, first, second
    finally:
        subprocess.run(["tessera", "umount", str(mnt)], env={**os.environ, "TESSERA_HOME": str(home)},
                       capture_output=True)


def _timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def scale_rows() -> list[list[object]]:
    rows: list[list[object]] = []
    root = WORK / "scale"
    root.mkdir(parents=True, exist_ok=True)
    for n in counts():
        src = make_flat_files(root / f"files-{n}", n)
        home = root / "home"
        shutil.rmtree(home, ignore_errors=True)
        env = {"TESSERA_HOME": str(home)}
        t_commit, rss_commit, out = peak_rss_of(["tessera", "commit", "bench", str(src)], env=env)
        ref = out.strip().splitlines()[-1]
        t_re, rss_re, _ = peak_rss_of(["tessera", "commit", "bench", str(src)], env=env)
        t_fsck, rss_fsck, _ = peak_rss_of(["tessera", "fsck"], env=env)
        native = statistics.median(_timed(["find", f"{src}/", "-type", "f"]) for _ in range(3))
        mount_cells: list[object] = []
        for listing in ("attrs", "names"):
            try:
                runs = [mount_find(home, ref, root / "mnt", listing) for _ in range(3)]
                first = statistics.median(r[0] for r in runs)
                second = statistics.median(r[1] for r in runs)
                rss_mount = max(r[2] for r in runs)
                mount_cells += [f"{first:.2f} s / {second:.2f} s (native {native:.2f} s, {first / native:.1f}x)",
                                mib(rss_mount)]
            except (subprocess.CalledProcessError, StopIteration) as exc:
                mount_cells += [f"not measured ({exc})", "-"]
        try:
            t_km, rss_km, first, second = kernel_find(home, ref, root / "kmnt")
            mount_cells += [f"{t_km:.1f} s / {mib(rss_km)}",
                            f"{first:.2f} s / {second:.2f} s ({first / native:.1f}x native)"]
        except RuntimeError as exc:
            mount_cells += [f"not measured ({exc})", "-"]
        t_gc, rss_gc, _ = peak_rss_of(["tessera", "gc"], env=env)  # everything kept: a full mark, nothing swept
        subprocess.run(["tessera", "rm", "bench", "--yes"], env={**os.environ, **env}, check=True, capture_output=True)
        t_sweep, rss_sweep, _ = peak_rss_of(["tessera", "gc"], env=env)  # nothing kept: every row swept
        rows.append([f"{n:,}", f"{t_commit:.1f} s ({n / t_commit:,.0f}/s)", mib(rss_commit),
                     f"{t_re:.1f} s ({n / t_re:,.0f}/s)", mib(rss_re), f"{t_fsck:.1f} s", mib(rss_fsck), *mount_cells,
                     f"{t_gc:.1f} s / {t_sweep:.1f} s", f"{mib(rss_gc)} / {mib(rss_sweep)}"])
        shutil.rmtree(home, ignore_errors=True)
    return rows


CAP_FILES = 200_000
CAP_HEADROOM = 200 << 20


def _vm_peak_of_trivial_commit(work: Path) -> int:
    """VmPeak of the CLI committing one small file: the interpreter, libraries, threads (no cap)."""
    src = work / "one"
    src.mkdir(parents=True, exist_ok=True)
    (src / "f").write_bytes(b"x" * 100)
    code = ("import atexit, sys\n"
            "atexit.register(lambda: sys.stderr.write([l for l in open('/proc/self/status') "
            "if l.startswith('VmPeak')][0]))\n"
            "from tessera.cli import main\nsys.argv[0] = 'tessera'\nmain()\n")
    proc = subprocess.run([sys.executable, "-c", code, "commit", "t", str(src)], capture_output=True, text=True,
                          env={**os.environ, "TESSERA_HOME": str(work / "h0")}, timeout=300, check=True)
    m = re.search(r"VmPeak:\s+(\d+) kB", proc.stderr)
    if not m:
        raise RuntimeError(proc.stderr[-500:])
    return int(m.group(1)) * 1024


def _commit_capped(home: Path, src: Path, limit: int | None, *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    def cap() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    t0 = time.perf_counter()
    proc = subprocess.run(["tessera", "commit", "big", str(src), "--stats", *args], capture_output=True, text=True,
                          preexec_fn=cap, env={**os.environ, "TESSERA_HOME": str(home)}, stdin=subprocess.DEVNULL)
    return time.perf_counter() - t0, proc


def cap_rows() -> list[list[object]]:
    """The 200,000-file commit under an RLIMIT_AS cap: passes, same hash as uncapped, re-commit reads nothing."""
    n = max(1000, int(CAP_FILES * min(SCALE, 1.0)))
    src = make_flat_files(WORK / "scale" / f"files-{n}", n)
    work = fresh(WORK / "scale" / "cap")
    limit = _vm_peak_of_trivial_commit(work) + CAP_HEADROOM
    t_cap, capped = _commit_capped(work / "capped", src, limit, "--memory", "48M")
    ok = capped.returncode == 0
    ref = capped.stdout.strip().splitlines()[-1] if ok else f"FAILED: {capped.stderr.strip()[-200:]}"
    _, again = _commit_capped(work / "capped", src, limit, "--memory", "48M")
    stats = next((x for x in again.stderr.splitlines() if x.startswith("files ")), again.stderr.strip()[-200:])
    _, plain = _commit_capped(work / "plain", src, None, "--memory", "2G")
    same = ok and plain.returncode == 0 and plain.stdout.strip().splitlines()[-1] == ref
    shutil.rmtree(work, ignore_errors=True)
    return [[f"{n:,}", mib(limit), "ok" if ok else "EXCEEDED", f"{t_cap:.1f} s", "yes" if same else "NO",
             f"{'ok' if again.returncode == 0 else 'FAILED'}: {stats}"]]


def ray_rows() -> list[list[object]]:
    try:
        import ray
    except ImportError:
        return [["ray not installed", "-", "-"]]
    import tessera
    from tessera.raycluster import RayExecutor
    from trees import write_random

    src = WORK / "scale" / "ray-src"
    size = max(8 << 20, int((512 << 20) * min(SCALE, 1.0)))
    if not (src / ".complete").exists():
        shutil.rmtree(src, ignore_errors=True)
        for i in range(size // (8 << 20)):
            write_random(src / f"d{i % 8}" / f"f{i:04d}.bin", 8 << 20, i)
        (src / ".complete").write_text("")
    total = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    rows: list[list[object]] = []
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        for tasks in (1, 2):
            work = fresh(WORK / "scale" / "ray-run")
            with tessera.Repo(work / "home") as repo:
                t0 = time.perf_counter()
                res = repo.commit_distributed("bench", src, RayExecutor(tasks=tasks), remote=f"file://{work / 'remote'}")
                dt = time.perf_counter() - t0
            rows.append([tasks, f"{total / 1e6 / dt:.0f}", f"{dt:.1f} s", res.version.hash[:12]])
            shutil.rmtree(work, ignore_errors=True)
    finally:
        ray.shutdown()
    return rows


def main() -> str:
    out = table(f"Commit, re-commit, fsck, mount and gc vs file count (60-byte files, 1,000 per directory; cores={os.cpu_count()})",
                ["files", "commit", "commit peak RSS", "re-commit", "re-commit peak RSS", "fsck", "fsck peak RSS",
                 "find via mount (--listing attrs), 1st / 2nd", "mount server peak RSS",
                 "find via mount (--listing names), 1st / 2nd", "mount server peak RSS",
                 "kernel mount: first mount (image) / its peak RSS", "find via kernel mount, 1st / 2nd",
                 "gc: mark all / after rm, sweep all", "gc peak RSS"], scale_rows())
    out += "\n" + table("Commit under an address-space cap (RLIMIT_AS = a one-file commit's VmPeak + 200 MiB; "
                        "--memory 48M)", ["files", "cap", "capped commit", "time", "same hash as uncapped",
                                          "capped unchanged re-commit"], cap_rows())
    out += "\n" + table("Distributed commit on a local Ray cluster (num_cpus=2) to a file:// remote, 8 MiB random files",
                        ["tasks", "MB/s", "time", "version"], ray_rows())
    return out


if __name__ == "__main__":
    print(main())
