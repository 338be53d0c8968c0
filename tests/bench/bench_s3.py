"""Issue 4 benchmark: push and lazy reads against moto's S3 server on 127.0.0.1, each next to raw boto3.

(1) push MB/s of a big random file vs raw boto3 ``upload_file`` of the same bytes (default transfer
config: 8 MiB multipart, 10 threads), and HTTP PUT requests per GiB pushed (counted on the client
with a botocore event hook: every real request, parts and retries included); (2) lazy mount on a
fresh home that has only the bucket URL: ``tessera mount`` time (metadata fetch + mount), time to
first byte of the big file, sequential read MB/s through the mount vs raw boto3 ``get_object`` of the
same bytes; (3) many small files: push files/s, and the first (and second) pass reading every file
by path through a lazy mount, files/s.

moto runs as its own process (``moto_server``), so the server does not share our GIL. Sizes:
BENCH_SCALE (default 1.0), or BENCH_S3_BIG_MIB (256), BENCH_S3_SMALL_FILES (5000, 64 KiB each).
Run: ``make bench`` or ``python tests/bench/bench_s3.py``.
"""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK, fresh, scaled, table  # noqa: E402

BIG_MIB = int(os.environ.get("BENCH_S3_BIG_MIB", scaled(256)))
SMALL_FILES = int(os.environ.get("BENCH_S3_SMALL_FILES", scaled(5000)))
SMALL_SIZE = 64 * 1024
DIR = WORK / "s3"
MiB = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    proc = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def make_data() -> tuple[Path, Path]:
    big = DIR / "src-big"
    if not (big / "big.bin").exists() or (big / "big.bin").stat().st_size != BIG_MIB * MiB:
        fresh(big)
        rng = random.Random(1)
        with open(big / "big.bin", "wb") as f:
            for _ in range(BIG_MIB):
                f.write(rng.randbytes(MiB))
    small = DIR / "src-small"
    if not small.exists() or sum(1 for _ in small.rglob("*.bin")) != SMALL_FILES:
        fresh(small)
        rng = random.Random(2)
        for i in range(SMALL_FILES):
            p = small / f"d{i // 1000:03d}" / f"f{i:06d}.bin"
            p.parent.mkdir(exist_ok=True)
            p.write_bytes(rng.randbytes(SMALL_SIZE))
    return big, small


class RequestCounter:
    """Counts HTTP requests a boto3 client sends, by method (a botocore event hook)."""

    def __init__(self) -> None:
        self.methods: dict[str, int] = {}

    def __call__(self, request, **_: object) -> None:
        self.methods[request.method] = self.methods.get(request.method, 0) + 1


def _client_of(transport):  # Retrying -> S3Transport -> boto3 client
    return transport.inner._client


def tessera(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["tessera", *args], capture_output=True, text=True,
                          env={**os.environ, "TESSERA_HOME": str(home)})
    if check and proc.returncode != 0:
        raise RuntimeError(f"tessera {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def push_timed(home: Path, src: Path, name: str, url: str) -> tuple[float, int, int]:
    """Commit ``src`` (not timed), push it (timed); returns (seconds, PUT requests, all requests)."""
    from tessera.repo import Repo

    with Repo(fresh(home), remote=url) as repo:
        v = repo.commit(name, src)
        counter = RequestCounter()
        _client_of(repo.transports.get(url)).meta.events.register("before-send.s3", counter)
        t0 = time.perf_counter()
        repo.push(v.ref)
        took = time.perf_counter() - t0
    return took, counter.methods.get("PUT", 0), sum(counter.methods.values())


def read_file(path: Path, block: int = MiB) -> tuple[float, float]:
    """(seconds to the first byte, seconds for the whole file) reading sequentially."""
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        f.read(1)
        first = time.perf_counter() - t0
        while f.read(block):
            pass
    return first, time.perf_counter() - t0


def read_all(root: Path) -> float:
    paths = sorted(p for p in root.rglob("*.bin"))
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb") as f:
            f.read()
    return time.perf_counter() - t0


def main() -> str:
    import boto3
    from boto3.s3.transfer import TransferConfig

    DIR.mkdir(parents=True, exist_ok=True)
    big, small = make_data()
    moto, endpoint = start_moto()
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_REGION", "TESSERA_CACHE_SIZE")}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_REGION="us-east-1", TESSERA_CACHE_SIZE=str(4 * BIG_MIB * MiB))
    mnt = DIR / "mnt"
    mnt.mkdir(exist_ok=True)
    try:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="bench")
        nbytes = BIG_MIB * MiB
        # (1) push vs raw upload_file
        t0 = time.perf_counter()
        s3.upload_file(str(big / "big.bin"), "bench", "raw/big.bin", Config=TransferConfig())
        raw_up = time.perf_counter() - t0
        push_s, puts, reqs = push_timed(DIR / "home-a", big, "big", "s3://bench/repo")
        # (2) lazy mount on a fresh home
        home_b = fresh(DIR / "home-b")
        tessera(home_b, "remote", "add", "origin", "s3://bench/repo")
        t0 = time.perf_counter()
        tessera(home_b, "mount", "big", str(mnt))
        mount_s = time.perf_counter() - t0
        try:
            ttfb, lazy_read = read_file(mnt / "big.bin")
        finally:
            tessera(home_b, "umount", str(mnt))
        t0 = time.perf_counter()
        body = s3.get_object(Bucket="bench", Key="raw/big.bin")["Body"]
        while body.read(MiB):
            pass
        raw_get = time.perf_counter() - t0
        # (3) small files
        small_push, small_puts, _ = push_timed(DIR / "home-c", small, "small", "s3://bench/repo")
        home_d = fresh(DIR / "home-d")
        tessera(home_d, "remote", "add", "origin", "s3://bench/repo")
        tessera(home_d, "mount", "small", str(mnt))
        try:
            first = read_all(mnt)
            second = read_all(mnt)
        finally:
            tessera(home_d, "umount", str(mnt))
    finally:
        os.killpg(moto.pid, signal.SIGKILL)
        moto.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    mbps = lambda seconds: nbytes / seconds / 1e6  # noqa: E731
    rows = [
        ("push MB/s", f"{mbps(push_s):.0f}", f"{mbps(raw_up):.0f} (upload_file)", f"{raw_up / push_s:.2f}x", ">= 0.8x"),
        ("PUT requests per GiB", f"{puts / (nbytes / (1 << 30)):.0f}", "", f"{reqs} requests in all", "<= 64"),
        ("lazy: tessera mount (fresh home, metadata fetch)", f"{mount_s:.2f} s", "", "", ""),
        ("lazy: time to first byte", f"{ttfb * 1000:.0f} ms", "", "", "< 0.5 s"),
        ("lazy: sequential read MB/s", f"{mbps(lazy_read):.0f}", f"{mbps(raw_get):.0f} (get_object)",
         f"{raw_get / lazy_read:.2f}x", ">= 0.7x"),
        (f"small files ({SMALL_FILES} x 64 KiB): push files/s", f"{SMALL_FILES / small_push:.0f}", "",
         f"{small_puts} PUTs", ""),
        ("small files: lazy mount first pass files/s", f"{SMALL_FILES / first:.0f}", "", "", ""),
        ("small files: second pass files/s", f"{SMALL_FILES / second:.0f}", "", "", ""),
    ]
    return table(f"S3 remote (moto on 127.0.0.1, {BIG_MIB} MiB random file)", ["what", "tessera", "raw boto3",
                 "ratio", "goal"], rows)


if __name__ == "__main__":
    print(main())
