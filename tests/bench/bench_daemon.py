"""Daemon benchmark: event-to-version latency and idle cost of a real `tessera daemon` process.

    python tests/bench/bench_daemon.py [--files 100000] [--rounds 10] [--idle-seconds 30] [--quiet 1]
    (or through `make bench` / tests/bench/run_all.py; BENCH_SCALE scales the tree and idle window)

1. latency: change 100 files in a watched directory; time from the last write until the catalog has
   the new version (median, p95). This includes the debounce wait (``quiet_seconds``), so the table
   also shows latency minus quiet = detection + commit. Measured on a 1,000-file tree and on the big
   tree, where every commit walks (stats) all files.
2. idle: the daemon watching a 100,000-file tree (100 directories), after its initial commit: CPU %
   (utime + stime from /proc over the idle window) and RSS (VmRSS; peak VmHWM includes the commit).

Prints a Markdown table (goals from the issue: idle CPU < 1 %, RSS < 200 MB).
"""
from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def make_tree(root: Path, files: int, per_dir: int = 1000) -> None:
    payload = os.urandom(256)
    for i in range(files):
        d = root / f"d{i // per_dir:04d}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        with open(d / f"f{i:07d}.bin", "wb") as f:
            f.write(payload[: 64 + i % 192] + i.to_bytes(8, "big"))


def head(db: Path, dataset: str) -> str | None:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    except sqlite3.OperationalError:
        return None  # not created yet
    try:
        row = con.execute("SELECT head FROM datasets WHERE name = ?", (dataset,)).fetchone()
        return row[0] if row else None
    except sqlite3.OperationalError:
        return None
    finally:
        con.close()


def wait_new_head(db: Path, dataset: str, old: str | None, timeout: float) -> float:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        h = head(db, dataset)
        if h is not None and h != old:
            return time.monotonic()
        time.sleep(0.005)
    raise TimeoutError(f"no new version of {dataset} within {timeout} s")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def mem_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def change_files(root: Path, n: int, round_: int) -> None:
    files = sorted(root.glob("d0000/*.bin"))[:n]
    for p in files:
        p.write_bytes(b"round %d of %s\n" % (round_, p.name.encode()))


def latency_rounds(db: Path, dataset: str, root: Path, rounds: int, quiet: float) -> list[float]:
    out = []
    for r in range(rounds):
        old = head(db, dataset)
        change_files(root, 100, r)
        t0 = time.monotonic()
        out.append(wait_new_head(db, dataset, old, quiet + 120) - t0)
        time.sleep(0.3)
    return out


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark; returns the Markdown report (`tests/bench/run_all.py` calls ``main()``)."""
    scale = float(os.environ.get("BENCH_SCALE", "1.0"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=max(1000, int(100_000 * scale)))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--idle-seconds", type=float, default=max(5.0, 30.0 * min(1.0, scale)))
    ap.add_argument("--quiet", type=float, default=1.0)
    args = ap.parse_args(argv if argv is not None else [])

    with tempfile.TemporaryDirectory(prefix="tessera-bench-daemon-") as tmp:
        base = Path(tmp)
        home, small, big = base / "home", base / "small", base / "big"
        home.mkdir()
        make_tree(small, 1000)
        t = time.monotonic()
        make_tree(big, args.files)
        print(f"# made {args.files} files in {time.monotonic() - t:.1f} s", file=sys.stderr)
        (home / "daemon.toml").write_text(
            f'[[watch]]\npath = "{small}"\ndataset = "small"\nquiet_seconds = {args.quiet}\nmax_wait_seconds = 60\n\n'
            f'[[watch]]\npath = "{big}"\ndataset = "big"\nquiet_seconds = {args.quiet}\nmax_wait_seconds = 300\n')
        env = dict(os.environ, TESSERA_HOME=str(home))
        log = open(base / "daemon.log", "w")
        t_start = time.monotonic()
        proc = subprocess.Popen(["tessera", "daemon"], env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        db = home / "catalog.db"
        try:
            wait_new_head(db, "small", None, 120)
            wait_new_head(db, "big", None, 1800)
            initial = time.monotonic() - t_start
            time.sleep(2)
            peak_after_initial = mem_kib(proc.pid, "VmHWM")

            c0, w0 = cpu_seconds(proc.pid), time.monotonic()
            time.sleep(args.idle_seconds)
            idle_cpu = 100 * (cpu_seconds(proc.pid) - c0) / (time.monotonic() - w0)
            idle_rss = mem_kib(proc.pid, "VmRSS")

            small_lat = latency_rounds(db, "small", small, args.rounds, args.quiet)
            big_lat = latency_rounds(db, "big", big, max(3, args.rounds // 2), args.quiet)
            peak = mem_kib(proc.pid, "VmHWM")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()

    q = args.quiet
    rows = [
        ("latency, 100-file change in a 1,000-file tree: median / p95",
         f"{statistics.median(small_lat):.2f} s / {pct(small_lat, 0.95):.2f} s",
         f"quiet_seconds = {q:g} included; minus quiet: {statistics.median(small_lat) - q:.2f} s / "
         f"{pct(small_lat, 0.95) - q:.2f} s"),
        (f"latency, 100-file change in the {args.files:,}-file tree: median / p95",
         f"{statistics.median(big_lat):.2f} s / {pct(big_lat, 0.95):.2f} s",
         f"minus quiet: {statistics.median(big_lat) - q:.2f} s / {pct(big_lat, 0.95) - q:.2f} s "
         "(every commit stats the whole tree)"),
        (f"idle CPU watching {args.files:,} files ({args.idle_seconds:.0f} s window)", f"{idle_cpu:.2f} %",
         f"goal < 1 % (resolution {100 / CLK_TCK / args.idle_seconds:.2f} %)"),
        ("idle RSS", f"{idle_rss / 1024:.0f} MiB", "goal < 200 MB"),
        ("peak RSS (VmHWM, includes the initial commit)", f"{max(peak, peak_after_initial) / 1024:.0f} MiB", ""),
        (f"start + initial commit of {args.files:,} + 1,000 files", f"{initial:.1f} s", ""),
    ]
    lines = ["### daemon: event-to-version latency and idle cost", "", "| measure | result | notes |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {note} |" for name, value, note in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(main(sys.argv[1:]))
