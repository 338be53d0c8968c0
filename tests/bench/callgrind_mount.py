"""Instructions the mount server spends per file: a repeatable measure on a noisy shared machine.

Runs the real server (``python -m tessera.fuse.mount``'s ``main``) under ``valgrind --tool=callgrind``
twice, once reading N files of one directory by path (first pass: LOOKUP + READ each) and once reading
none, and prints the difference divided by N: user-space instructions of every server thread, from
libfuse and ctypes to SQLite and the hash checks. ``--baseline`` measures the code as it was before the
low-level server (see `bench_mount.baseline_code`; in its own home, `bench_mount.baseline_home`) the
same way.

Uses the data of `bench_mount` ($BENCH_DIR/mount). Needs valgrind (``apt-get install valgrind``).

    python tests/bench/callgrind_mount.py [N] [--baseline]

Under valgrind the server's readiness check (a ``stat`` of its own mountpoint from a second thread)
would deadlock: valgrind holds its big lock through ``newfstatat``, so the FUSE loop never answers. The
driver below replaces only that check with a short sleep.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_mount  # noqa: E402

DRIVER = r"""
import os as _os, sys, time
import tessera.fuse.mount as m
class _NoSelfStat:
    def __getattr__(self, name): return getattr(_os, name)
    def stat(self, path): time.sleep(2)
m.os = _NoSelfStat()
sys.exit(m.main(sys.argv[1:]))
"""


def instructions(ref: str, files: list[str], code: str | None, home: Path, work: Path) -> int:
    mp = work / "mnt"
    mp.mkdir(exist_ok=True)
    out = work / f"callgrind-{len(files)}.out"
    env = {**os.environ, "TESSERA_HOME": str(home)}
    if code:
        env["PYTHONPATH"] = code
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-c", DRIVER,
           "--home", env["TESSERA_HOME"], "--ref", ref, "--mountpoint", str(mp)]
    with open(work / "server.log", "a") as log:
        server = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, cwd="/")
    try:
        deadline = time.monotonic() + 300
        while not os.path.ismount(mp):
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"the server did not mount (see {work / 'server.log'})")
            time.sleep(0.2)
        time.sleep(3)
        for rel in files:
            with open(mp / rel, "rb") as f:
                f.read()
    finally:
        subprocess.run(["fusermount3", "-u", str(mp)], check=False)
        server.wait(timeout=600)
    for line in out.read_text(errors="replace").splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {out}")


def main() -> str:
    n = int(next((a for a in sys.argv[1:] if a.isdigit()), "1000"))
    refs = bench_mount.build()
    rels = [r for r in (bench_mount.DIR / "small.list").read_text().split("\n") if r][:n]
    with tempfile.TemporaryDirectory(prefix="tessera-callgrind-") as tmp:
        work = Path(tmp)
        code, label, home = None, "current code", bench_mount.HOME
        if "--baseline" in sys.argv:
            code, rev = bench_mount.baseline_code(work / "baseline")
            label, home = f"baseline {rev}", bench_mount.baseline_home(code, rev)
        none = instructions(refs["data"], [], code, home, work)
        some = instructions(refs["data"], rels, code, home, work)
    return f"{label}: {(some - none) / len(rels):,.0f} instructions per first read of a 100 KiB file by path " \
           f"({len(rels)} files of one directory)"


if __name__ == "__main__":
    print(main())
