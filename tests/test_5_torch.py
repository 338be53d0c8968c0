"""`tessera.torch` with real torch (CPU) DataLoaders, fork and spawn workers, a local home and a home
that reads lazily from moto S3; `VersionStream` sharding, shuffling by pack and resuming through
torchdata's `StatefulDataLoader`."""
from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader  # noqa: E402

from readers_data import make_home, push, remote_only_home, write_samples  # noqa: E402
from tessera.errors import UsageError  # noqa: E402
from tessera.model import Entry  # noqa: E402
from tessera.torch import VersionDataset, VersionStream  # noqa: E402

N = 120
PACK = 1 << 20  # small packs: the samples span several


# module-level, so spawned workers can unpickle them
def path_and_bytes(entry: Entry, data: bytes) -> tuple[str, bytes]:
    return entry.path, data


def path_only(entry: Entry, data: bytes) -> str:
    assert len(data) == entry.size
    return entry.path


def as_list(batch: list[Any]) -> list[Any]:
    return batch


def big_enough(entry: Entry) -> bool:
    return entry.size >= 20_000


@pytest.fixture(autouse=True)
def _no_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERA_LOCK", "off")


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict[str, bytes]]:
    import tessera

    root = tmp_path_factory.mktemp("torch")
    files = write_samples(root / "src", N, seed=1)
    (root / "src" / "README").write_text("not a sample\n")
    with tessera.Repo(make_home(root / "home", PACK)) as repo:
        v = repo.commit("samples", root / "src", meta_for=lambda rel: {"label": int(rel[-6]) % 3}
                        if rel.startswith("samples/") else None)
    return root / "home", v.ref, files


def test_import_tessera_does_not_import_torch() -> None:
    code = "import sys, tessera, tessera.filesystem; tessera.Repo; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_dataset(local: tuple[Path, str, dict[str, bytes]]) -> None:
    home, ref, files = local
    ds = VersionDataset(ref.split("@")[0], prefix="samples", home=home)
    assert ds.ref == ref and len(ds) == N
    assert [e.path for e in ds.entries] == sorted(files)
    assert ds[7] == files[ds.entries[7].path]
    assert ds.entries[7].meta == {"label": int(ds.entries[7].path[-6]) % 3}
    picky = VersionDataset(ref, filter=big_enough, transform=path_and_bytes, home=home)
    assert {p for p, _ in (picky[i] for i in range(len(picky)))} == {p for p, b in files.items() if len(b) >= 20_000}
    assert all(files[p] == b for p, b in (picky[i] for i in range(len(picky))))


def _loader_bytes(ds: VersionDataset, context: str) -> dict[str, bytes]:
    loader = DataLoader(ds, batch_size=8, shuffle=True, num_workers=2, multiprocessing_context=context,
                        collate_fn=as_list, generator=torch.Generator().manual_seed(0))
    out: dict[str, bytes] = {}
    for batch in loader:
        for path, data in batch:
            assert path not in out
            out[path] = data
    return out


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_local(local: tuple[Path, str, dict[str, bytes]], context: str) -> None:
    home, ref, files = local
    ds = VersionDataset(ref, prefix="samples/", transform=path_and_bytes, home=home)
    assert _loader_bytes(ds, context) == files


@pytest.fixture(scope="module")
def remote(local: tuple[Path, str, dict[str, bytes]], moto_server: str,
           tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """The samples pushed once to a bucket shared by this module's S3 tests (the tests themselves
    use the `s3_env` fixture)."""
    import uuid

    import boto3

    home, ref, _ = local
    bucket = f"tessera-torch-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", region_name="us-east-1", endpoint_url=moto_server, aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=bucket)
    empty = tmp_path_factory.mktemp("aws")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": moto_server,
                     "AWS_CONFIG_FILE": str(empty / "config"),
                     "AWS_SHARED_CREDENTIALS_FILE": str(empty / "credentials")}.items():
            mp.setenv(k, v)
        push(home, ref, f"s3://{bucket}/repo")
    return f"s3://{bucket}/repo", ref


@pytest.mark.s3
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_lazily_from_s3(local: tuple[Path, str, dict[str, bytes]], remote: tuple[str, str],
                                   s3_env: str, tmp_path: Path, context: str) -> None:
    _, _, files = local
    url, ref = remote
    reader = remote_only_home(tmp_path / "reader", url)
    ds = VersionDataset("samples", prefix="samples", transform=path_and_bytes, home=reader)
    assert ds.ref == ref
    assert _loader_bytes(ds, context) == files
    assert not list((reader / "packs").rglob("*.pack"))  # lazy: chunks came through the cache, nothing pulled


# -- VersionStream --------------------------------------------------------------------------------------

def _epoch(ref: str, home: Path, rank: int, world: int, epoch: int, *, workers: int = 2,
           context: str = "fork", **kw: Any) -> list[str]:
    stream = VersionStream(ref, prefix="samples", transform=path_only, rank=rank, world_size=world, seed=5,
                           window=2, home=home, **kw)
    stream.set_epoch(epoch)
    loader = DataLoader(stream, batch_size=4, num_workers=workers, collate_fn=as_list,
                        multiprocessing_context=context if workers else None)
    return [p for batch in loader for p in batch]


def test_stream_two_ranks_two_workers(local: tuple[Path, str, dict[str, bytes]]) -> None:
    home, ref, files = local
    e0 = [_epoch(ref, home, r, 2, 0) for r in (0, 1)]
    assert len(e0[0]) == len(e0[1]) == N // 2  # equal samples per rank
    assert Counter(e0[0] + e0[1]) == Counter(list(files))  # every sample exactly once
    assert [_epoch(ref, home, r, 2, 0) for r in (0, 1)] == e0  # same seed and epoch: same order
    e1 = [_epoch(ref, home, r, 2, 1) for r in (0, 1)]
    assert Counter(e1[0] + e1[1]) == Counter(list(files)) and e1 != e0  # next epoch: another order
    assert [_epoch(ref, home, r, 2, 1, context="spawn") for r in (0, 1)] == e1  # spawn: the same


def test_stream_shuffles_by_pack(local: tuple[Path, str, dict[str, bytes]]) -> None:
    """Each worker's samples come in windows of at most `window` packs: a pack is read once."""
    home, ref, _ = local
    stream = VersionStream(ref, prefix="samples", rank=0, world_size=1, seed=1, window=2, home=home)
    packs = {p for p, _ in stream.placement}
    assert len(packs) >= 3
    for worker in (0, 1):
        windows = stream.worker_plan(0, 0, 1, worker, 2)
        seen: set[str] = set()
        for win in windows:
            in_win = {stream.placement[i][0] for i in win}
            assert len(in_win) <= 2 and not in_win & seen  # no pack comes back in a later window
            seen |= in_win
    order = stream.epoch_order(0)
    assert order != sorted(order) and sorted(order) == list(range(N))
    unshuffled = VersionStream(ref, prefix="samples", shuffle=False, rank=0, world_size=1, home=home)
    assert [i for w in unshuffled.worker_plan(0, 0, 1, 0, 1) for i in w] == unshuffled.epoch_order(0)


def test_stream_remainder_and_bad_input(local: tuple[Path, str, dict[str, bytes]]) -> None:
    home, ref, files = local

    def odd(e: Entry) -> bool:
        return e.path != "samples/00000.bin"

    padded = [_epoch(ref, home, r, 2, 0, workers=0, filter=odd) for r in (0, 1)]
    assert len(padded[0]) == len(padded[1]) == 60
    assert set(padded[0] + padded[1]) == set(files) - {"samples/00000.bin"}
    dropped = [_epoch(ref, home, r, 2, 0, workers=0, filter=odd, drop_last=True) for r in (0, 1)]
    assert len(dropped[0]) == len(dropped[1]) == 59 and len(set(dropped[0] + dropped[1])) == 118
    with pytest.raises(UsageError):
        VersionStream(ref, home=home, window=0)
    with pytest.raises(UsageError):
        list(VersionStream(ref, home=home, rank=2, world_size=2))
    saved = VersionStream(ref, home=home, seed=1).state_dict()
    with pytest.raises(UsageError, match="seed"):
        VersionStream(ref, home=home, seed=2).load_state_dict(saved)


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_resumes_with_stateful_dataloader(local: tuple[Path, str, dict[str, bytes]], workers: int) -> None:
    from torchdata.stateful_dataloader import StatefulDataLoader

    home, ref, files = local

    def loader() -> Any:
        stream = VersionStream(ref, prefix="samples", transform=path_only, rank=1, world_size=2, seed=9,
                               window=2, home=home)
        stream.set_epoch(3)
        return StatefulDataLoader(stream, batch_size=4, num_workers=workers, collate_fn=as_list)

    full = [p for batch in loader() for p in batch]
    assert len(full) == N // 2
    first = loader()
    it = iter(first)
    head = [p for _ in range(5) for p in next(it)]
    state = first.state_dict()
    del it, first
    resumed = loader()
    resumed.load_state_dict(state)
    rest = [p for batch in resumed for p in batch]
    assert head + rest == full  # exactly the remaining samples, in the same order


@pytest.mark.s3
def test_stream_reads_each_pack_once_from_s3(local: tuple[Path, str, dict[str, bytes]], remote: tuple[str, str],
                                            s3_env: str, fault_proxy: Any, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, files = local
    url, ref = remote
    reader = remote_only_home(tmp_path / "reader", url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.url)
    stream = VersionStream(ref, prefix="samples", transform=path_and_bytes, window=2, home=reader)
    packs = {p for p, _ in stream.placement}
    gets = fault_proxy.stats.methods.count("GET")
    loader = DataLoader(stream, batch_size=8, num_workers=2, collate_fn=as_list)
    assert dict(x for batch in loader for x in batch) == files
    reads = fault_proxy.stats.methods.count("GET") - gets
    # each worker reads each of its packs front to back: a ranged GET, then one stream for the rest of
    # the pack (a pack split between the two workers is read by both), never a GET per sample
    assert reads <= 2 * (len(packs) + 1) < N // 4, (reads, len(packs))
