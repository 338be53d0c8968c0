"""The whole-file cache: one verified, read-only copy of each file, named by its SHA-256.

    $TESSERA_HOME/files/ab/<sha256>     the file's bytes (mode 0444, owner root when made by root)
    $TESSERA_HOME/files/tmp/            files being written (garbage after a crash)
    $TESSERA_HOME/files/lock            flock: exclusive while materializing, evicting or mounting

The kernel mount (`tessera.kernelmount`) stacks a metadata-only EROFS image over ``files/`` with
overlayfs, so every file of a mounted version is read by the kernel straight from here. A file is
shared by every version that has it and written only when missing: materializing the second
version of a dataset writes only its changed files.

Trust: a file gets here only by `materialize`, which reads it through the library
(``Version.open``, so every chunk is checked on the way), writes it to ``tmp/`` checking its SHA-256
against the version's, makes it read-only, and renames it into place only after the file system has
been synced (``syncfs``, once per batch of up to 4096 files / 512 MiB, not an fsync per file). A name in ``ab/`` is
therefore a claim that was true when written; `verify_files` (run by ``tessera fsck``) checks every
file again, and `has` checks sizes on every use.

Bounds: ``max_size`` bytes (`tessera.config.FileCacheSettings`). To make room, `evict` deletes files
no *active* mount needs (`pinned`), least recently read first (``st_atime``), and before it deletes
any file it deletes every EROFS image of a version that is not mounted (an image exists only while
all of its version's files do: see `tessera.kernelmount`).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import queue
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from tessera.errors import CorruptData, DiskFull, TesseraError
from tessera.model import Entry
from tessera.progress import NullProgress, Progress

if TYPE_CHECKING:
    from tessera.version import Version

logger = logging.getLogger(__name__)

CACHE_DIR = "files"
IMAGES_DIR = "images"  # EROFS images of versions (`tessera.kernelmount`): each promises its files are here
CACHE_FORMAT = 1
READ_BLOCK = 1 << 20
BATCH_FILES = 4096  # files made durable (one syncfs) and renamed into place together
BATCH_BYTES = 512 << 20
DEFAULT_RATE = 300e6  # bytes/s assumed for estimates until a materialization has been measured
DEFAULT_FILE_SECONDS = 0.0005  # and seconds per file (create, write, rename: ~0.3-0.5 ms measured here)


@dataclass(frozen=True)
class Missing:
    """What a version still needs in the cache: distinct files (one entry per SHA-256) and bytes."""

    entries: tuple[Entry, ...]
    bytes: int
    total_files: int
    total_bytes: int

    @property
    def files(self) -> int:
        return len(self.entries)


@dataclass
class MaterializeStats:
    files_written: int = 0
    bytes_written: int = 0
    files_present: int = 0
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.bytes_written / self.seconds if self.seconds > 0 else 0.0


class CacheFull(DiskFull):
    """The files a mount needs do not fit in the file cache budget, even after eviction."""


def file_entries(version: "Version") -> list[Entry]:
    """Every regular file of ``version`` with content (empty files need no cache file)."""
    return [e for e in version.walk() if e.is_file and e.sha256 and e.size > 0]


class FileCache:
    """The cache under ``home/files``. Methods that change it take the cache lock themselves unless
    the caller holds it (`locked`)."""

    def __init__(self, home: str | Path, max_size: int, on_evict: Callable[[], object] | None = None) -> None:
        """``on_evict`` runs (under the lock) before any file is evicted: `tessera.kernelmount` drops the
        images of unmounted versions there."""
        self.home = Path(home)
        self.root = self.home / CACHE_DIR
        self.tmp = self.root / "tmp"
        self._root_str = str(self.root)
        self.max_size = max_size
        self._lock_depth = 0
        self._lock_fd = -1
        self._mutex = threading.RLock()
        self._on_evict = on_evict

    # -- layout -------------------------------------------------------------------------------------

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def _path_str(self, sha256: str) -> str:
        return f"{self._root_str}/{sha256[:2]}/{sha256}"

    def redirect(self, sha256: str) -> str:
        """The path of a file inside the cache, as overlayfs's ``trusted.overlay.redirect`` names it."""
        return f"/{sha256[:2]}/{sha256}"

    def ensure(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        fmt = self.root / "FORMAT"
        if not fmt.exists():
            fmt.write_text(f"tessera file cache {CACHE_FORMAT}\n")
        else:
            text = fmt.read_text().strip()
            if text != f"tessera file cache {CACHE_FORMAT}":
                raise CorruptData(f"{self.root} holds an unknown file cache format ({text!r}); "
                                  "upgrade tessera or remove that directory")

    @contextlib.contextmanager
    def locked(self, *, wait: bool = True) -> Iterator[None]:
        """Hold the cache lock (re-entrant in this process; exclusive across processes). ``wait=False``:
        raise `BlockingIOError` at once when another process holds it."""
        with self._mutex:
            if self._lock_depth == 0:
                self.ensure()
                fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BaseException:
                    os.close(fd)
                    raise
                self._lock_fd = fd
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0:
                    os.close(self._lock_fd)
                    self._lock_fd = -1

    # -- lookups ------------------------------------------------------------------------------------

    def has(self, sha256: str, size: int) -> bool:
        try:
            return os.stat(self._path_str(sha256)).st_size == size
        except OSError:
            return False

    def missing(self, entries: Iterable[Entry]) -> Missing:
        seen: dict[str, Entry] = {}
        total = 0
        for e in entries:
            if e.sha256 and e.sha256 not in seen:
                seen[e.sha256] = e
                total += e.size
        need = tuple(e for sha, e in seen.items() if not self.has(sha, e.size))
        return Missing(need, sum(e.size for e in need), len(seen), total)

    def iter_files(self) -> Iterator[tuple[str, os.stat_result]]:
        """(sha256, stat) of every cache file."""
        if not self.root.is_dir():
            return
        for sub in sorted(os.scandir(self.root), key=lambda d: d.name):
            if len(sub.name) != 2 or not sub.is_dir(follow_symlinks=False):
                continue
            for f in os.scandir(sub.path):
                if len(f.name) == 64:
                    with contextlib.suppress(OSError):
                        yield f.name, f.stat(follow_symlinks=False)

    def usage(self) -> tuple[int, int]:
        """(bytes, files) held."""
        n = size = 0
        for _, st in self.iter_files():
            n += 1
            size += st.st_size
        return size, n

    # -- writing ------------------------------------------------------------------------------------

    def materialize(self, version: "Version", entries: Iterable[Entry] | None = None, *,
                    pinned: set[str] | None = None, progress: Progress | None = None,
                    workers: int = 3, missing: Missing | None = None) -> MaterializeStats:
        """Write every file of ``version`` (or of ``entries``) the cache lacks. Makes room first by
        evicting files not in ``pinned`` (files active mounts need; this version's are added).
        ``missing``: what an earlier `missing` call found (only those are looked at again).
        On any error nothing half-written stays, and the files already written stay valid."""
        progress = progress or NullProgress()
        ents = file_entries(version) if entries is None else [e for e in entries if e.size > 0]
        stats = MaterializeStats()
        with self.locked():
            need = self.missing(ents) if missing is None else self.missing(missing.entries)
            if missing is not None:
                need = Missing(need.entries, need.bytes, missing.total_files, missing.total_bytes)
            stats.files_present = need.total_files - need.files
            if not need.entries:
                return stats
            keep = set(pinned or ()) | {e.sha256 for e in ents if e.sha256}
            self.make_room(need.bytes, keep)
            t0 = time.perf_counter()
            progress.start(f"materializing {version.name}@{version.hash[:12]}", need.bytes)
            try:
                self._write_all(version, list(need.entries), progress, workers, stats)
            finally:
                progress.finish()
                self._clean_tmp(mine_only=True)
            stats.seconds = time.perf_counter() - t0
            self._record_rate(stats)
        return stats

    def _write_all(self, version: "Version", todo: list[Entry], progress: Progress, workers: int,
                   stats: MaterializeStats) -> None:
        """Worker threads write and check temp files; this thread makes them durable a batch at a time
        (one ``syncfs`` per batch instead of an fsync per file) and only then renames them into place."""
        stop = threading.Event()
        todo.sort(key=lambda e: e.path)  # in tree order: packs are read mostly sequentially
        feed = iter(todo)
        feed_lock = threading.Lock()
        results: queue.Queue[tuple[Path, Path, int] | BaseException | None] = queue.Queue(maxsize=4 * BATCH_FILES)

        def work() -> None:
            try:
                while not stop.is_set():
                    with feed_lock:
                        e = next(feed, None)
                    if e is None:
                        break
                    results.put(self._write_one(version, e, progress, stop))
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                stop.set()
                results.put(exc)
            finally:
                results.put(None)

        threads = [threading.Thread(target=work, name=f"materialize-{i}", daemon=True)
                   for i in range(max(1, min(workers, len(todo))))]
        for t in threads:
            t.start()
        pending: list[tuple[Path, Path, int]] = []
        dirs: set[Path] = set()
        pending_bytes = 0
        running = len(threads)
        failure: BaseException | None = None
        try:
            while running:
                item = results.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    if failure is None or isinstance(failure, _Stopped):
                        failure = item
                elif failure is not None:
                    _unlink(item[0])
                else:
                    pending.append(item)
                    pending_bytes += item[2]
                    if len(pending) >= BATCH_FILES or pending_bytes >= BATCH_BYTES:
                        self._publish(pending, dirs, stats)
                        pending, pending_bytes = [], 0
            if failure is not None:
                raise failure
            self._publish(pending, dirs, stats)
            pending = []
            if dirs:
                _syncfs(self.root)  # the renames (directory entries) are durable too
        except BaseException:
            stop.set()
            while running:  # let the workers finish, dropping what they still hand over
                item = results.get()
                if item is None:
                    running -= 1
                elif isinstance(item, tuple):
                    _unlink(item[0])
            for tmp, _, _ in pending:
                _unlink(tmp)
            raise

    def _publish(self, batch: list[tuple[Path, Path, int]], dirs: set[Path], stats: MaterializeStats) -> None:
        if not batch:
            return
        _syncfs(self.tmp)
        for tmp, final, size in batch:
            if final.parent not in dirs:
                final.parent.mkdir(exist_ok=True)
            os.rename(tmp, final)
            dirs.add(final.parent)
            stats.files_written += 1
            stats.bytes_written += size

    def _write_one(self, version: "Version", e: Entry, progress: Progress,
                   stop: threading.Event) -> tuple[Path, Path, int]:
        """Write ``e`` to a temp file and check its size and SHA-256; returns (temp, final, size)."""
        sha = e.sha256 or ""
        if stop.is_set():
            raise _Stopped("stopped")
        tmp = self.tmp / f"{sha}.{os.getpid()}.{secrets.token_hex(4)}"
        h = hashlib.sha256()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                with version.open(e.path) as src:
                    while True:
                        if stop.is_set():
                            raise _Stopped("stopped")
                        block = src.read(READ_BLOCK)
                        if not block:
                            break
                        h.update(block)
                        view = memoryview(block)
                        while view:
                            view = view[os.write(fd, view):]
                        progress.advance(len(block))
                if os.fstat(fd).st_size != e.size or h.hexdigest() != sha:
                    raise CorruptData(f"{version.name}@{version.hash[:12]}:{e.path}: the bytes read do not match "
                                      f"its SHA-256 {sha[:16]}...; not cached")
                os.fchmod(fd, 0o444)
            finally:
                os.close(fd)
        except OSError as exc:
            _unlink(tmp)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(f"disk full while caching {e.path} in {self.root} (nothing was mounted; the "
                               "files cached so far stay valid)") from None
            raise
        except BaseException:
            _unlink(tmp)
            raise
        return tmp, self.path(sha), e.size

    def _clean_tmp(self, *, mine_only: bool) -> None:
        """Remove leftover temp files: this process's, or (``mine_only=False``) those of dead processes."""
        if not self.tmp.is_dir():
            return
        for f in os.scandir(self.tmp):
            parts = f.name.split(".")
            pid = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else 0
            if (mine_only and pid == os.getpid()) or (not mine_only and (pid == 0 or not _pid_alive(pid))):
                _unlink(Path(f.path))

    # -- bounds -------------------------------------------------------------------------------------

    def make_room(self, need: int, keep: set[str]) -> int:
        """Evict until ``need`` more bytes fit in ``max_size``; `CacheFull` when they cannot."""
        with self.locked():
            self._clean_tmp(mine_only=False)
            used, _ = self.usage()
            if used + need <= self.max_size:
                return 0
            freed = self.evict(used + need - self.max_size, keep)
            if used - freed + need > self.max_size:
                raise CacheFull(f"the file cache cannot hold {_human(need)} more: {_human(used - freed)} of its "
                                f"{_human(self.max_size)} budget is used by active mounts (raise it with "
                                "`tessera cache budget SIZE`, or unmount something)")
            return freed

    def evict(self, want: int, keep: set[str]) -> int:
        """Delete files not in ``keep``, least recently read first, until ``want`` bytes are freed
        (``want < 0``: every such file, and every image of an unmounted version even when no file
        goes: an image of small files only needs none). Images of unmounted versions go first (`on_evict`)."""
        with self.locked():
            victims = sorted((st.st_atime_ns, sha, st.st_size) for sha, st in self.iter_files() if sha not in keep)
            if (victims or want < 0) and self._on_evict is not None:
                self._on_evict()
            if not victims:
                return 0
            freed = 0
            for _, sha, size in victims:
                if 0 <= want <= freed:
                    break
                _unlink(self.path(sha))
                freed += size
            logger.info("file cache: evicted %s", _human(freed))
            return freed

    def remove_unused(self, live: Callable[[list[str]], set[str]], *, dry_run: bool = False) -> tuple[int, int]:
        """Under the lock: delete every file whose SHA-256 ``live`` leaves out (`tessera gc`: no file
        record of the home names it any more). The caller drops the images of such files' versions
        first. Returns (files, bytes) deleted (would be, with ``dry_run``)."""
        with self.locked():
            found = [(sha, st.st_size) for sha, st in self.iter_files()]
            keep = live([sha for sha, _ in found])
            files = size = 0
            for sha, n in found:
                if sha in keep:
                    continue
                if not dry_run:
                    _unlink(self.path(sha))
                files += 1
                size += n
            if files:
                logger.info("file cache: %s %d files (%s) no version uses", "would remove" if dry_run else "removed",
                            files, _human(size))
            return files, size

    # -- checking -----------------------------------------------------------------------------------

    def verify_files(self, errors: list[str], progress: Progress | None = None) -> int:
        """Hash every cache file; a mismatch is appended to ``errors`` and the file is removed (it is a
        cache: the next kernel mount that needs it writes it again). Returns the number checked."""
        progress = progress or NullProgress()
        files = list(self.iter_files())
        progress.start("fsck file cache", sum(st.st_size for _, st in files))
        n = 0
        for sha, st in files:
            path = self.path(sha)
            h = hashlib.sha256()
            try:
                with open(path, "rb") as f:
                    while block := f.read(READ_BLOCK):
                        h.update(block)
            except OSError as exc:
                errors.append(f"file cache: {path}: {exc.strerror}")
                continue
            n += 1
            progress.advance(st.st_size)
            if h.hexdigest() != sha:
                errors.append(f"file cache: {path} fails its SHA-256 check (removed; the next kernel mount "
                              "that needs it writes it again)")
                _unlink(path)
        progress.finish()
        return n

    # -- estimates ----------------------------------------------------------------------------------

    def rates(self) -> tuple[float, float]:
        """(bytes/s, seconds per file) of materialization as last measured here; the defaults
        (DEFAULT_RATE, DEFAULT_FILE_SECONDS) before anything was measured."""
        try:
            obj = json.loads((self.root / "rate.json").read_text())
            return (max(1e6, float(obj.get("bytes_per_s", DEFAULT_RATE))),
                    min(0.1, max(1e-6, float(obj.get("seconds_per_file", DEFAULT_FILE_SECONDS)))))
        except (OSError, ValueError, TypeError, AttributeError):
            return DEFAULT_RATE, DEFAULT_FILE_SECONDS

    def rate(self) -> float:
        return self.rates()[0]

    def estimate(self, files: int, nbytes: int) -> float:
        """Seconds to materialize ``files`` files holding ``nbytes`` bytes (a per-byte and a per-file
        cost: 100,000 files of a few bytes take far longer than their bytes suggest)."""
        bps, spf = self.rates()
        return nbytes / bps + files * spf

    def _record_rate(self, stats: MaterializeStats) -> None:
        """Update the per-file cost from runs of small files and the byte rate from runs of big ones."""
        n, b, t = stats.files_written, stats.bytes_written, stats.seconds
        if t <= 0 or n == 0:
            return
        bps, spf = self.rates()
        if b / n >= 1 << 20 and b >= 16 << 20:
            bps = b / max(t - n * spf, t / 10)
        elif b / n < 64 << 10 and n >= 1000:
            spf = max(t - b / bps, t / 10) / n
        else:
            return  # too small, or a mix: keep what we have
        with contextlib.suppress(OSError):
            tmp = self.root / f"rate.json.{os.getpid()}"
            tmp.write_text(json.dumps({"bytes_per_s": bps, "seconds_per_file": spf, "measured": time.time()}))
            os.replace(tmp, self.root / "rate.json")


class _Stopped(TesseraError):
    """Another worker failed: this one stops early (never reported on its own)."""


def images_dir(home: str | Path) -> Path:
    return Path(home) / IMAGES_DIR


def drop_all_images(home: str | Path) -> int:
    """Delete every version image (mounted ones keep working: the kernel holds them open)."""
    n = 0
    d = images_dir(home)
    for f in sorted(d.iterdir()) if d.is_dir() else []:
        with contextlib.suppress(OSError):
            f.unlink()
            n += 1
    return n


def _syncfs(path: Path) -> None:
    """Flush every dirty page of the file system holding ``path`` (the temp files of a batch)."""
    import ctypes

    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


__all__ = ["FileCache", "Missing", "MaterializeStats", "CacheFull", "file_entries", "CACHE_DIR", "IMAGES_DIR",
           "images_dir", "drop_all_images"]
