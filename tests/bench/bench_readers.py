"""Issue 12 benchmark: PyTorch reading a version without a mount vs through the mount vs the native directory.

One epoch of a DataLoader (4 workers, fork, batch 32, a list collate: bytes only, no decoding) over
FILES small files (random 16-112 KiB, ~64 KiB on average), in samples/s:

- native: a map-style dataset opening the source files by path (shuffled sampler);
- mount: the same dataset over a `tessera mount` of the version;
- VersionDataset: `tessera.torch.VersionDataset` (shuffled sampler);
- VersionStream: `tessera.torch.VersionStream` (shuffled by pack, window 4).

Local: a home holding the packs (page cache warm: the data was just written). S3: moto_server on
127.0.0.1 (its own process), a fresh home that only knows the remote per row (so the first epoch fetches
everything lazily), and the GET requests the epoch sent, counted from moto's request log.

Run: ``make bench`` or ``python tests/bench/bench_readers.py``. Sizes: BENCH_SCALE, or
BENCH_READERS_FILES (default 4000).
"""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from common import WORK, fresh, scaled, table

DIR = WORK / "readers"
FILES = int(os.environ.get("BENCH_READERS_FILES", scaled(4000)))
WORKERS = 4
BATCH = 32


class PathDataset:
    """Files by path under a root (native directory or mountpoint), as a plain PyTorch script reads."""

    def __init__(self, root: Path, rels: list[str]) -> None:
        self.root, self.rels = root, rels

    def __len__(self) -> int:
        return len(self.rels)

    def __getitem__(self, i: int) -> bytes:
        with open(self.root / self.rels[i], "rb") as f:
            return f.read()


def as_list(batch: list[Any]) -> list[Any]:
    return batch


def make_source() -> tuple[Path, list[str], int]:
    src = DIR / "src"
    rels = [f"d{i // 500:03d}/f{i:06d}.bin" for i in range(FILES)]
    if not src.exists() or sum(1 for _ in src.rglob("*.bin")) != FILES:
        fresh(src)
        rng = random.Random(12)
        for rel in rels:
            p = src / rel
            p.parent.mkdir(exist_ok=True)
            p.write_bytes(rng.randbytes(rng.randint(16 << 10, 112 << 10)))
    return src, rels, sum((src / r).stat().st_size for r in rels)


def epoch(ds: Any, shuffle: bool) -> tuple[float, int]:
    """(seconds for one epoch, samples) with 4 forked workers."""
    from torch.utils.data import DataLoader

    loader = DataLoader(ds, batch_size=BATCH, shuffle=shuffle, num_workers=WORKERS, collate_fn=as_list,
                        multiprocessing_context="fork")
    t0 = time.perf_counter()
    n = sum(len(b) for b in loader)
    return time.perf_counter() - t0, n


def tessera(home: Path, *args: str) -> None:
    proc = subprocess.run(["tessera", *args], capture_output=True, text=True,
                          env={**os.environ, "TESSERA_HOME": str(home)})
    if proc.returncode != 0:
        raise RuntimeError(f"tessera {' '.join(args)}: {proc.stderr.strip()}")


def fuse_ok() -> bool:
    try:
        from fuse_probe import fuse_unavailable_reason

        return fuse_unavailable_reason() is None
    except Exception:  # noqa: BLE001 - a benchmark row, not a test
        return False


class Moto:
    """moto_server in its own process; its request log counts GETs across all our worker processes."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.log = DIR / "moto.log"
        self._out = open(self.log, "wb")
        self.proc = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)], stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1)
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("moto_server did not start")

    def gets(self) -> int:
        self._out.flush()
        return sum(1 for line in self.log.read_text(errors="replace").splitlines() if "GET /bench/" in line)  # ranged (206) lines are colour-coded

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._out.close()


def local_rows(src: Path, rels: list[str], nbytes: int, ref: str, home: Path) -> list[tuple[Any, ...]]:
    from tessera.torch import VersionDataset, VersionStream

    rows = []
    native_s, n = epoch(PathDataset(src, rels), True)
    rows.append(("local", "native directory", n / native_s, nbytes / native_s / 1e6, "1.00x", "", "-"))
    if fuse_ok():
        mnt = DIR / "mnt"
        mnt.mkdir(exist_ok=True)
        tessera(home, "mount", ref, str(mnt))
        try:
            s, n = epoch(PathDataset(mnt, rels), True)
        finally:
            tessera(home, "umount", str(mnt))
        rows.append(("local", "mount", n / s, nbytes / s / 1e6, f"{native_s / s:.2f}x", "", "-"))
    t0 = time.perf_counter()
    ds = VersionDataset(ref, home=home)
    setup = time.perf_counter() - t0
    s, n = epoch(ds, True)
    rows.append(("local", "VersionDataset", n / s, nbytes / s / 1e6, f"{native_s / s:.2f}x", f"{setup:.2f}", "-"))
    t0 = time.perf_counter()
    st = VersionStream(ref, home=home)
    setup = time.perf_counter() - t0
    s, n = epoch(st, False)
    rows.append(("local", "VersionStream", n / s, nbytes / s / 1e6, f"{native_s / s:.2f}x", f"{setup:.2f}", "-"))
    return rows


def s3_rows(home: Path, ref: str, nbytes: int, rels: list[str]) -> list[tuple[Any, ...]]:
    from tessera.repo import Repo
    from tessera.torch import VersionDataset, VersionStream

    moto = Moto()
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_REGION", "TESSERA_CACHE_SIZE")}
    os.environ.update(AWS_ENDPOINT_URL=moto.url, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_REGION="us-east-1", TESSERA_CACHE_SIZE=str(4 * nbytes))
    rows = []
    try:
        import boto3

        boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1").create_bucket(Bucket="bench")
        url = "s3://bench/repo"
        with Repo(home) as repo:
            repo.push(ref, url)

        def reader(name: str) -> Path:
            h = fresh(DIR / f"reader-{name}")
            tessera(h, "remote", "add", "origin", url)
            return h

        if fuse_ok():
            h = reader("mount")
            mnt = DIR / "mnt"
            tessera(h, "mount", ref, str(mnt))
            try:
                g = moto.gets()
                s, n = epoch(PathDataset(mnt, rels), True)
                rows.append(("S3", "mount (lazy)", n / s, nbytes / s / 1e6, "", "", moto.gets() - g))
            finally:
                tessera(h, "umount", str(mnt))
        for name, make, shuffle in (("VersionDataset", VersionDataset, True), ("VersionStream", VersionStream, False)):
            h = reader(name)
            t0 = time.perf_counter()
            ds = make(ref, home=h)
            setup = time.perf_counter() - t0
            g = moto.gets()
            s, n = epoch(ds, shuffle)
            rows.append(("S3", name, n / s, nbytes / s / 1e6, "", f"{setup:.2f}", moto.gets() - g))
    finally:
        moto.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return rows


def main() -> str:
    import warnings

    from tessera.repo import Repo

    warnings.filterwarnings("ignore", message=".*worker processes in total.*")  # 4 workers on 2 cores, on purpose
    os.environ["TESSERA_LOCK"] = "off"
    DIR.mkdir(parents=True, exist_ok=True)
    src, rels, nbytes = make_source()
    home = fresh(DIR / "home")
    with Repo(home) as repo:
        v = repo.commit("readers", src)
        packs = len({loc for loc in (p.name for p in (home / "packs").rglob("*.pack"))})
    rows = local_rows(src, rels, nbytes, v.ref, home) + s3_rows(home, v.ref, nbytes, rels)
    title = (f"PyTorch readers: {FILES} files ({nbytes / 1e6:.0f} MB, {packs} packs), one epoch, "
             f"DataLoader {WORKERS} workers (fork), batch {BATCH}")
    return table(title, ["where", "reader", "samples/s", "MB/s", "vs native", "setup s", "GETs/epoch"], rows)


if __name__ == "__main__":
    print(main())
