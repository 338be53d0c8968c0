"""PyTorch datasets over a version, without a mount (``import tessera`` never imports this module or torch).

    from tessera.torch import VersionDataset, VersionStream
    ds = VersionDataset("coco@3f2a9c", prefix="train/", transform=decode)      # map-style
    stream = VersionStream("coco", prefix="train/", seed=0, window=4)          # iterable, sharded
    for epoch in range(n):
        stream.set_epoch(epoch)
        for batch in DataLoader(stream, batch_size=64, num_workers=4): ...

- **VersionDataset** (map-style): one file per sample, returned as ``bytes`` or ``transform(entry,
  data)``; ``ds.entries[i]`` is the `Entry` (path, size, sha256, the per-file ``meta`` you committed).
  Works with any sampler; random access reads only the chunks of the file asked for.
- **VersionStream** (iterable): shards by rank, then by DataLoader worker, with the same number of
  samples on every rank; shuffles **by pack** — the packs are shuffled, then samples within a window of
  ``window`` packs — so each worker reads each of its packs once per epoch in storage order (on a remote:
  one streamed GET per pack) and holds at most ``window`` packs' worth of samples; deterministic for
  (``seed``, epoch); ``state_dict()`` / ``load_state_dict()`` let torchdata's ``StatefulDataLoader``
  resume mid-epoch without repeating or skipping a sample.

The REF is resolved once, when the dataset is built (a bare ``NAME`` through the nearest
``tessera.lock``), so every worker and every epoch reads the same version. Workers may be forked or
spawned: a forked worker reopens the repository (no SQLite connection crosses ``fork``), a spawned one
opens its own; ``transform`` and ``filter`` must be picklable (module-level functions) for spawn.
"""
from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from torch.utils.data import Dataset, IterableDataset, get_worker_info

from tessera.errors import UsageError
from tessera.model import Entry

if TYPE_CHECKING:
    from tessera.repo import Repo
    from tessera.version import Version

logger = logging.getLogger(__name__)

__all__ = ["VersionDataset", "VersionStream", "chunk_placement"]

Transform = Callable[[Entry, bytes], Any]
Filter = Callable[[Entry], bool]
DEFAULT_WINDOW = 4
_INHERITED: list[Any] = []  # repositories a forked worker inherited: dropped there, never closed


class _Source:
    """One version of one home, opened per process (after ``fork`` too); pickles as (home, remote, ref)."""

    def __init__(self, ref: str, home: str | os.PathLike[str] | None, remote: str | None) -> None:
        from tessera.repo import Repo

        self.remote = remote
        self._repo: Repo | None = Repo(None if home is None else os.fspath(home), remote=remote)
        self.home = str(self._repo.home)
        self._version: Version | None = self._repo.get(ref)
        self.ref = self._version.ref  # NAME@<64 hex>: every worker reads this version
        self._pid = os.getpid()

    def version(self) -> "Version":
        if self._version is None or self._pid != os.getpid():
            from tessera.repo import Repo

            if self._repo is not None:
                _INHERITED.append(self._repo)
            self._repo = Repo(self.home, remote=self.remote)
            self._version = self._repo.get(self.ref)
            self._pid = os.getpid()
        return self._version

    def __getstate__(self) -> dict[str, Any]:
        return {"ref": self.ref, "home": self.home, "remote": self.remote}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.ref, self.home, self.remote = state["ref"], state["home"], state["remote"]
        self._repo, self._version, self._pid = None, None, -1


def _select(version: "Version", prefix: str, keep: Filter | None) -> list[Entry]:
    return [e for e in version.walk(prefix) if e.is_file and (keep is None or keep(e))]


def chunk_placement(version: "Version", entries: Sequence[Entry]) -> list[tuple[str, int]]:
    """Where each file's bytes begin in storage: (pack id, offset of its first chunk); ("", 0) for an
    empty file. Files of one pack sorted by offset read the pack front to back.

    Asks the version's role objects, batched: ``version.trees.file_records``, ``version.chunks.locations``."""
    ids = sorted({e.sha256 for e in entries if e.sha256 is not None and e.size})
    firsts = _first_chunks(version, ids)
    return [firsts.get(e.sha256, ("", 0)) if e.sha256 is not None and e.size else ("", 0) for e in entries]


def _first_chunks(version: "Version", ids: list[str]) -> dict[str, tuple[str, int]]:
    records = version.trees.file_records(ids)
    first = {fid: rec.chunks[0][0] for fid, rec in records.items() if rec.chunks}
    locs = version.chunks.locations(sorted(set(first.values())))
    return {fid: (locs[c].pack, locs[c].offset) for fid, c in first.items() if c in locs}


class VersionDataset(Dataset[Any]):
    """Map-style dataset: sample ``i`` is the bytes of ``entries[i]`` (files under ``prefix`` for which
    ``filter(entry)`` is true, in path order), or ``transform(entry, data)``."""

    def __init__(self, ref: str, *, prefix: str = "", transform: Transform | None = None,
                 filter: Filter | None = None, home: str | os.PathLike[str] | None = None,
                 remote: str | None = None) -> None:
        self._source = _Source(ref, home, remote)
        self.transform = transform
        self.entries: list[Entry] = _select(self._source.version(), prefix, filter)

    @property
    def ref(self) -> str:
        """The version read: ``NAME@<64 hex>``."""
        return self._source.ref

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> Any:
        e = self.entries[index]
        data = self._source.version().read_bytes(e.path)
        return self.transform(e, data) if self.transform is not None else data


class VersionStream(IterableDataset[Any]):
    """Iterable dataset: every sample once per epoch across ranks and workers, shuffled by pack.

    ``rank`` / ``world_size`` default to `torch.distributed`'s when it is initialised, else 0 / 1.
    Each rank gets ``ceil(N / world_size)`` samples (the epoch's first samples repeated to fill the
    last rank), or ``floor`` with ``drop_last=True``. Call `set_epoch` before each epoch (as with
    ``DistributedSampler``); a stream also moves to the next epoch by itself after a complete pass in
    the same process (persistent workers)."""

    def __init__(self, ref: str, *, prefix: str = "", transform: Transform | None = None,
                 filter: Filter | None = None, shuffle: bool = True, seed: int = 0,
                 window: int = DEFAULT_WINDOW, rank: int | None = None, world_size: int | None = None,
                 drop_last: bool = False, home: str | os.PathLike[str] | None = None,
                 remote: str | None = None) -> None:
        if window < 1:
            raise UsageError(f"window must be at least 1 pack, got {window}")
        self._source = _Source(ref, home, remote)
        version = self._source.version()
        self.transform = transform
        self.shuffle = shuffle
        self.seed = seed
        self.window = window
        self.drop_last = drop_last
        self._rank, self._world = rank, world_size
        self.entries: list[Entry] = _select(version, prefix, filter)
        self.placement: list[tuple[str, int]] = chunk_placement(version, self.entries)
        self._epoch = 0
        self._yielded = 0  # samples this process's iterator handed out in the current epoch
        self._skip: int | None = None  # from load_state_dict: resume after that many
        self._workers: int | None = None  # DataLoader workers of the current iteration

    @property
    def ref(self) -> str:
        return self._source.ref

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self._yielded = 0

    def _rank_world(self) -> tuple[int, int]:
        rank, world = self._rank, self._world
        if rank is None or world is None:
            import torch.distributed as dist

            live = dist.is_available() and dist.is_initialized()
            rank = rank if rank is not None else (dist.get_rank() if live else 0)
            world = world if world is not None else (dist.get_world_size() if live else 1)
        if not 0 <= rank < world:
            raise UsageError(f"rank {rank} is not in [0, world_size={world})")
        return rank, world

    def per_rank(self) -> int:
        n, world = len(self.entries), self._rank_world()[1]
        return n // world if self.drop_last else math.ceil(n / world)

    def __len__(self) -> int:
        return self.per_rank()

    # -- the epoch's plan (pure: the same numbers give the same plan in any process) --------------

    def epoch_order(self, epoch: int) -> list[int]:
        """Every sample index once: packs in a (seeded) random order, each pack's files by offset."""
        groups: dict[str, list[int]] = {}
        for i, place in enumerate(self.placement):
            groups.setdefault(place[0], []).append(i)
        packs = sorted(groups)
        if self.shuffle:
            random.Random(f"tessera-stream-{self.seed}-{epoch}").shuffle(packs)
        return [i for p in packs for i in sorted(groups[p], key=lambda i: (self.placement[i][1], i))]

    def rank_order(self, epoch: int, rank: int, world: int) -> list[int]:
        order = self.epoch_order(epoch)
        per = self.per_rank()
        if len(order) < per * world and order:
            order = (order * math.ceil(per * world / len(order)))[:per * world]
        return order[rank * per:(rank + 1) * per]

    def worker_plan(self, epoch: int, rank: int, world: int, worker: int, workers: int) -> list[list[int]]:
        """The worker's samples in yield order, in windows of ``window`` consecutive packs."""
        mine = self.rank_order(epoch, rank, world)
        base, extra = divmod(len(mine), workers)
        start = worker * base + min(worker, extra)
        mine = mine[start:start + base + (1 if worker < extra else 0)]
        windows: list[list[int]] = []
        packs_in: list[str] = []
        for i in mine:
            pack = self.placement[i][0]
            if not packs_in or pack != packs_in[-1]:
                if len(packs_in) == self.window:
                    packs_in = []
                if not packs_in:
                    windows.append([])
                packs_in.append(pack)
            windows[-1].append(i)
        if self.shuffle:
            for k, win in enumerate(windows):
                random.Random(f"tessera-window-{self.seed}-{epoch}-{rank}-{worker}-{k}").shuffle(win)
        return windows

    # -- iterating ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = self._rank_world()
        skip = self._skip or 0
        self._skip = None
        self._workers = workers
        self._yielded = skip
        return self._samples(self._epoch, self.worker_plan(self._epoch, rank, world, worker, workers), skip)

    def _samples(self, epoch: int, windows: list[list[int]], skip: int) -> Iterator[Any]:
        version = self._source.version()
        for win in windows:
            if skip >= len(win):
                skip -= len(win)
                continue
            todo, skip = win[skip:], 0
            data = {}
            for i in sorted(todo, key=lambda i: (self.placement[i], i)):  # storage order: streamed
                data[i] = version.read_bytes(self.entries[i].path)
            for i in todo:
                self._yielded += 1  # counted before the caller gets it: a state taken then includes it
                blob = data.pop(i)
                yield self.transform(self.entries[i], blob) if self.transform is not None else blob
        if self._epoch == epoch:
            self._epoch, self._yielded = epoch + 1, 0

    # -- resuming (torchdata's Stateful protocol) ----------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        rank, world = self._rank_world()
        return {"version": self.ref, "seed": self.seed, "epoch": self._epoch, "yielded": self._yielded,
                "rank": rank, "world_size": world, "num_workers": self._workers,
                "window": self.window, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where ``state`` (from `state_dict`, in the same worker slot) stopped. The version,
        seed, window, ranks and worker count must be those of the run that saved it."""
        rank, world = self._rank_world()
        mine = {"version": self.ref, "seed": self.seed, "rank": rank, "world_size": world,
                "window": self.window, "shuffle": self.shuffle}
        for key, value in mine.items():
            if state.get(key) != value:
                raise UsageError(f"cannot resume: the saved stream has {key}={state.get(key)!r}, this one {value!r}")
        info = get_worker_info()
        workers = info.num_workers if info is not None else 1
        if state.get("num_workers") not in (None, workers):
            raise UsageError(f"cannot resume: the saved stream ran with {state['num_workers']} workers, "
                             f"this one has {workers}")
        self._epoch = int(state["epoch"])
        self._skip = int(state["yielded"])
        self._yielded = self._skip
