"""Issue 14 benchmark: location tables merged over time (`tessera.tablemerge`).

(1) The daemon's pattern: a dataset pushed after every small change (one 100-byte file more each time;
200 pushes, BENCH_SCALE scales them) to a `file://` remote, with merging (fan-in 8) and without it
(fan-in effectively infinite): tables the last version names, table objects on the remote and the bytes
written to them (write amplification of merging), the median push time, and a fresh home's first lazy
read of the oldest file (`tessera cat`, median of 3 fresh homes; its requests counted by a transport
wrapper in the same process).
(2) One merge of 9 chunk tables of N rows each (one pack each): time and peak RSS of the process.

Run: `make bench` or `python tests/bench/bench_table_merge.py`.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK, scaled, table  # noqa: E402

MERGE_ONE = r'''
import os, resource, sys, time
from pathlib import Path
import tessera
from tessera import tablemerge
from tessera.catalog import remote_state as rs
from tessera.format import table
from tessera.ids import sha256_hex
from tessera.remote import open_transport
from tessera.remote.wire import chunk_table_key

root, n = Path(sys.argv[1]), int(sys.argv[2])
with tessera.Repo(root / "home") as r, open_transport(f"file://{root / 'remote'}") as t:
    packs = []
    for i in range(9):
        pack = sha256_hex(f"pack{i}".encode())
        data = table.encode(table.KIND_CHUNKS, [(pack, 64 + 100 * n)],
                            (table.Row(os.urandom(16), pack, 64 + 100 * j, 50, 60, 1) for j in range(n)))
        name = sha256_hex(data)
        t.put(chunk_table_key(name), data)
        rs.mark_meta_pack(r.catalog, "origin", name, [(rs.KIND_PACK_TABLE, pack)], key=chunk_table_key(name))
        packs.append(pack)
    del data
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    [m] = tablemerge.merge_tables(r.catalog, t, "origin", rs.KIND_PACK_TABLE, packs)
    print(m.rows, time.perf_counter() - t0, before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
'''


def _daemon_pattern(work: Path, steps: int, fan_in: int) -> list[object]:
    import tessera
    from tessera import tablemerge
    from tessera.catalog import remote_state as rs
    from tessera.remote import open_transport
    from tessera.remote.wire import VersionObject, version_key

    shutil.rmtree(work, ignore_errors=True)
    url = f"file://{work / 'remote'}"
    src = work / "src"
    src.mkdir(parents=True)
    saved = tablemerge.FAN_IN
    tablemerge.FAN_IN = fan_in
    times = []
    try:
        with tessera.Repo(work / "a") as r:
            rs.add_remote(r.catalog, "origin", url, default=True)
            for i in range(steps):
                (src / f"f{i:04d}.txt").write_bytes(os.urandom(50).hex().encode())
                h = r.commit("ds", src).hash
                t0 = time.perf_counter()
                r.push("ds")
                times.append(time.perf_counter() - t0)
    finally:
        tablemerge.FAN_IN = saved
    with open_transport(url) as t:
        v = VersionObject.from_bytes(h, t.get(version_key(h)), h)
        objs = [i for prefix in ("chunkidx/", "metaidx/") for i in t.list(prefix)]
    reads = []
    for k in range(3):
        env = {**os.environ, "TESSERA_HOME": str(work / f"fresh{k}")}
        subprocess.run(["tessera", "remote", "add", "origin", url], env=env, check=True, capture_output=True)
        subprocess.run(["tessera", "log", "ds"], env=env, check=True, capture_output=True)
        t0 = time.perf_counter()
        subprocess.run(["tessera", "cat", "ds", "f0000.txt"], env=env, check=True, capture_output=True)
        reads.append(time.perf_counter() - t0)
    requests = _lazy_read_requests(work / "counted", url)
    return [f"{steps} pushes, fan-in {fan_in if fan_in < 1000 else 'off'}", len(v.chunk_tables), len(v.meta_tables),
            len(objs), f"{sum(o.size for o in objs) / 1024:.0f} KiB", f"{statistics.median(times) * 1000:.0f} ms",
            f"{statistics.median(reads):.2f} s", requests]


def _lazy_read_requests(home: Path, url: str) -> int:
    """GETs a fresh home's first read of f0000.txt makes (after resolving the dataset)."""
    import tessera
    from tessera.remote.local import LocalTransport

    count = [0]
    real = LocalTransport.get

    def counted(self: LocalTransport, key: str, start: int | None = None, end: int | None = None) -> bytes:
        count[0] += 1
        return real(self, key, start, end)

    with tessera.Repo(home, remote=url) as fresh:
        v = fresh.get("ds")
        LocalTransport.get = counted  # type: ignore[method-assign]
        try:
            v.read_bytes("f0000.txt")
        finally:
            LocalTransport.get = real  # type: ignore[method-assign]
    return count[0]


def main() -> str:
    root = WORK / "table-merge"
    steps = scaled(200)
    rows = [_daemon_pattern(root / f"fan{f}", steps, f) for f in (8, 10 ** 9)]
    out = [table("Location tables merged over time: the daemon's pattern",
                 ["", "chunk tables named", "metadata tables named", "table objects", "table bytes",
                  "push (median)", "fresh `cat` (median)", "GETs of that read"], rows)]
    merge_rows = []
    for n in (scaled(10_000), scaled(50_000)):
        work = root / f"merge-{n}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        proc = subprocess.run([sys.executable, "-c", MERGE_ONE, str(work), str(n)], check=True, capture_output=True,
                              text=True)
        merged, secs, before, peak = proc.stdout.split()
        merge_rows.append([f"9 x {n:,} rows", f"{int(merged):,}", f"{float(secs):.2f} s",
                           f"{int(before) // 1024} MiB", f"{int(peak) // 1024} MiB"])
    out.append(table("One merge of 9 chunk tables", ["merge of", "rows out", "time", "RSS before", "peak RSS"],
                     merge_rows))
    shutil.rmtree(root, ignore_errors=True)
    return "\n".join(out)


if __name__ == "__main__":
    print(main())
