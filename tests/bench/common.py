"""Shared helpers for `make bench`: timing, medians, child RSS, Markdown tables.

Benchmarks are not tests: they print ratios measured in one run on a noisy 2-core machine.
`BENCH_SCALE` (default 1.0) shrinks data sizes for a quick run.
"""
from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

SCALE = float(os.environ.get("BENCH_SCALE", "1.0"))
REPEAT = int(os.environ.get("BENCH_REPEAT", "3"))
WORK = Path(os.environ.get("BENCH_DIR", "/tmp/tessera-bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ for trees.py


def scaled(n: int) -> int:
    return max(1, int(n * SCALE))


def drop_caches() -> bool:
    """Drop the page cache (root only); returns False when not allowed."""
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_time(fn: Callable[[], object], repeat: int = REPEAT, setup: Callable[[], object] | None = None) -> float:
    times = []
    for _ in range(repeat):
        if setup:
            setup()
        times.append(timed(fn))
    return statistics.median(times)


def run_child(args: Sequence[str], env: dict[str, str] | None = None, cwd: str | None = None) -> tuple[float, int, str]:
    """Run a command; return (seconds, peak RSS of the child in bytes, stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run(list(args), capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {proc.stderr.strip()[-500:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return elapsed, max(after, before) * 1024, proc.stdout


def peak_rss_of(args: Sequence[str], env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """Like run_child but measures this child's own peak RSS via /usr/bin/time-free wait4."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t0
    out = proc.stdout.read() if proc.stdout else ""
    err = proc.stderr.read() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {err.strip()[-500:]}")
    return elapsed, usage.ru_maxrss * 1024, out


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(c) for c in r) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def mb(n: float) -> float:
    return n / 1e6
