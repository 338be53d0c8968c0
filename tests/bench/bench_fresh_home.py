"""Issue 14 benchmark: a remote at scale, seen from a fresh machine.

For the trees bench_scale.py commits (100,000 and 1,000,000 files of 60 bytes, 1,000 to a directory;
3,000,000 when BENCH_SCALE >= 3; a BENCH_SCALE below 1 shrinks them): `tessera push` to a `file://`
remote (time, peak RSS), then in a fresh home that knows only the remote's URL the time to the first
listing of one directory (`tessera ls big d00099`: history, the version object, two trees; its peak
RSS) and the time of a full metadata fetch (`tessera pull big --metadata-only`), then `find` through a
FUSE mount of the lazily fetched version. The first listing should not grow with the file count; the
full fetch's time does (it is what the old format did on first use), and neither push's nor the full
fetch's peak RSS should (issue 14).

Run: `make bench` or `python tests/bench/bench_fresh_home.py` (BENCH_SCALE=0.1 for a quick look). Trees
are shared with bench_scale.py under $BENCH_DIR/scale.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK, peak_rss_of, table  # noqa: E402
from bench_scale import counts, mib  # noqa: E402  (the same file counts as bench_scale.py)
from scale_tree import make_flat_files  # noqa: E402


def _find_via_mount(home: Path, ref: str, mnt: Path) -> str:
    env = {**os.environ, "TESSERA_HOME": str(home)}
    mnt.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["tessera", "mount", "--fuse", ref, str(mnt)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return f"not measured ({proc.stderr.strip()[-120:]})"
    try:
        t0 = time.perf_counter()
        subprocess.run(["find", str(mnt), "-type", "f"], check=True, stdout=subprocess.DEVNULL)
        return f"{time.perf_counter() - t0:.1f} s"
    finally:
        subprocess.run(["tessera", "umount", str(mnt)], env=env, capture_output=True)


def rows() -> list[list[object]]:
    out: list[list[object]] = []
    root = WORK / "scale"
    root.mkdir(parents=True, exist_ok=True)
    for n in counts():
        src = make_flat_files(root / f"files-{n}", n)
        work = root / "fresh-home"
        shutil.rmtree(work, ignore_errors=True)
        url = f"file://{work / 'remote'}"
        a = {"TESSERA_HOME": str(work / "a")}
        t_commit, rss_commit, _ = peak_rss_of(["tessera", "commit", "big", str(src)], env=a)
        t_push, rss_push, _ = peak_rss_of(["tessera", "push", "big", "--remote", url], env=a)
        b = {"TESSERA_HOME": str(work / "b")}
        subprocess.run(["tessera", "remote", "add", "origin", url], env={**os.environ, **b}, check=True,
                       capture_output=True)
        last = f"d{(n - 1) // 1000:05d}"
        t_ls, rss_ls, listing = peak_rss_of(["tessera", "ls", "big", last], env=b)
        assert len(listing.splitlines()) == min(1000, n), listing[-300:]
        find = _find_via_mount(work / "b", "big", work / "mnt")
        c = {"TESSERA_HOME": str(work / "c")}
        subprocess.run(["tessera", "remote", "add", "origin", url], env={**os.environ, **c}, check=True,
                       capture_output=True)
        t_meta, rss_meta, _ = peak_rss_of(["tessera", "pull", "big", "--metadata-only"], env=c)
        out.append([f"{n:,}", f"{t_commit:.0f} s ({n / t_commit:,.0f}/s)", mib(rss_commit), f"{t_push:.1f} s", mib(rss_push), f"{t_ls:.2f} s", mib(rss_ls), find,
                    f"{t_meta:.1f} s", mib(rss_meta)])
        shutil.rmtree(work, ignore_errors=True)
    return out


def main() -> str:
    return table(f"A remote at scale from a fresh home (file:// remote; 60-byte files, 1,000 per directory; "
                 f"cores={os.cpu_count()})",
                 ["files", "commit", "commit peak RSS", "push", "push peak RSS", "fresh home: first `ls` of one directory", "its peak RSS",
                  "then `find` via a FUSE mount (lazy)", "full metadata pull", "its peak RSS"], rows())


if __name__ == "__main__":
    print(main())
