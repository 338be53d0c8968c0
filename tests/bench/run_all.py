"""`make bench`: run every benchmark in one go, print Markdown tables, save them to bench-results/.

Each module exposes `main() -> str` (a Markdown report). Figures worth keeping go to
docs/benchmarks.md by hand, with the command that produced them.
"""
from __future__ import annotations

import importlib
import os
import platform
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
MODULES = ["bench_chunking", "bench_commit", "bench_mount", "bench_s3", "bench_daemon", "bench_worktree",
           "bench_readers", "bench_lifecycle", "bench_scale", "bench_fresh_home", "bench_table_merge"]


def main() -> int:
    only = [m for m in sys.argv[1:]] or MODULES
    parts = [f"# tessera benchmarks — {time.strftime('%Y-%m-%d %H:%M')} — {platform.node()}, "
             f"{os.cpu_count()} cores, Python {platform.python_version()}, "
             f"BENCH_SCALE={os.environ.get('BENCH_SCALE', '1.0')}\n"]
    failed = 0
    for name in only:
        if not (HERE / f"{name}.py").exists():
            continue
        print(f"== {name}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            report = importlib.import_module(name).main()
        except Exception:  # noqa: BLE001 - one broken benchmark must not hide the others
            failed += 1
            report = f"### {name} FAILED\n\n```\n{traceback.format_exc()}```\n"
        parts.append(report + f"\n_{name}: {time.perf_counter() - t0:.0f} s_\n")
        print(parts[-1], flush=True)
    out = Path("bench-results")
    out.mkdir(exist_ok=True)
    (out / "latest.md").write_text("\n".join(parts))
    print(f"saved bench-results/latest.md", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
