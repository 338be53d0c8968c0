"""Working directories: `status` and `checkout` on a 20,000-file tree, against `find` and re-commit.

    python tests/bench/run_all.py bench_worktree

status of an unchanged tree must cost about a directory walk (stat cache: no file read); a checkout
that finds everything in place writes nothing; a checkout after `touch` (stat changed, bytes not)
reads and compares by SHA-256 but writes nothing; a sparse 1 GiB file with 1 MiB of data exports
to about 1 MiB on disk.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from common import WORK, fresh, median_time, run_child, scaled, table
from trees import make_small_files


def tessera(home: Path, *args: str) -> str:
    return run_child(["tessera", *args], env={"TESSERA_HOME": str(home)})[2]


def main() -> str:
    root = fresh(WORK / "worktree")
    home = root / "home"
    n = scaled(20_000)
    src = make_small_files(root / "src", n, 4096, 16384)
    tessera(home, "commit", "wt", str(src))
    rows = []
    t_find = median_time(lambda: subprocess.run(["find", str(src), "-type", "f", "-newer", "/"],
                                                capture_output=True))
    rows.append(["find DIR (walk + stat), for scale", t_find, ""])
    t_status = median_time(lambda: tessera(home, "status", str(src)))
    st = json.loads(tessera(home, "status", str(src), "--json"))
    rows.append(["status, unchanged tree", t_status, f"{st['hashed']} files read"])
    t_recommit = median_time(lambda: tessera(home, "commit", "wt", str(src)))
    rows.append(["re-commit, unchanged tree", t_recommit, "for comparison"])
    out = root / "out"
    t_first = median_time(lambda: tessera(home, "checkout", "wt", str(out)),
                          repeat=1, setup=lambda: fresh(out))
    rows.append([f"checkout into an empty dir ({n} files)", t_first, "all written"])
    t_again = median_time(lambda: tessera(home, "checkout", "wt", str(out)))
    res = json.loads(tessera(home, "checkout", "wt", str(out), "--json"))
    rows.append(["checkout again (nothing differs)", t_again, f"{res['written']} written, {res['hashed']} read"])
    subprocess.run(["find", str(out), "-type", "f", "-exec", "touch", "{}", "+"], check=True)
    t_touch = median_time(lambda: tessera(home, "checkout", "wt", str(out)), repeat=1)
    rows.append(["checkout after touching every file", t_touch, "compared by SHA-256, 0 written"])
    sparse_src = fresh(root / "sparse")
    with open(sparse_src / "disk.img", "wb") as f:
        f.seek(1 << 29)
        f.write(os.urandom(1 << 20))
        f.truncate(1 << 30)
    tessera(home, "commit", "sparse", str(sparse_src))
    t_sparse = median_time(lambda: tessera(home, "export", "sparse", str(root / "sparse-out")), repeat=1)
    du = os.stat(root / "sparse-out" / "disk.img").st_blocks * 512
    rows.append(["export of a 1 GiB file holding 1 MiB", t_sparse, f"{du / 2**20:.1f} MiB on disk"])
    return table("Working directories (seconds, CLI processes, median of 3 unless noted)",
                 ["operation", "seconds", "notes"], rows)


if __name__ == "__main__":
    print(main())
