"""Layer 2: commit, identity, dedup, read side and derived datasets through the Python API."""
from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

import pytest

import tessera
from tessera.config import RepoSettings
from tessera.errors import AmbiguousRef, BadRef, NotFound, UsageError
from tessera.format.chunker import ChunkParams
from trees import make_small_files, tree_digest, write_random, write_text


def test_round_trip_tricky_tree(repo: tessera.Repo, tricky_tree: Path, tmp_path: Path) -> None:
    v = repo.commit("tricky", tricky_tree, message="first")
    assert len(v.hash) == 64
    out = tmp_path / "out"
    repo.export(v.ref, out)
    assert tree_digest(out) == tree_digest(tricky_tree)
    assert os.stat(out / "run.sh").st_mode & 0o111
    assert not os.stat(out / "a" / "hello.txt").st_mode & 0o111
    assert os.readlink(out / "link-dangling") == "does/not/exist"
    assert (out / "empty dir" / "nested empty").is_dir()
    assert repo.verify(v.ref, out).ok
    # flip one byte in the export: verify names exactly that path
    p = out / "big" / "big.bin"
    with open(p, "r+b") as f:
        f.seek(123_456_789)
        b = f.read(1)
        f.seek(123_456_789)
        f.write(bytes([b[0] ^ 0xFF]))
    report = repo.verify(v.ref, out)
    assert not report.ok and report.modified == ["big/big.bin"]


def test_same_tree_same_hash_in_two_homes_and_chunk_settings(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_small_files(src, 50, seed=3)
    write_random(src / "big.bin", 3 << 20, 4)
    os.symlink("big.bin", src / "alias")
    a = tessera.Repo(tmp_path / "h1").commit("d", src)
    b = tessera.Repo(tmp_path / "h2").commit("other-name", src, message="different message")
    small = RepoSettings(ChunkParams(16 * 1024, 32 * 1024, 64 * 1024), compression_level=1)
    c = tessera.Repo(tmp_path / "h3", settings=small).commit("d", src)
    assert a.hash == b.hash == c.hash
    # and a copy of the tree elsewhere (new inodes, new mtimes) too
    copy = tmp_path / "copy"
    shutil.copytree(src, copy, symlinks=True)
    assert tessera.Repo(tmp_path / "h4").commit("d", copy).hash == a.hash


def test_content_changes_change_the_hash(repo: tessera.Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "x").write_text("1")
    h1 = repo.commit("d", src).hash
    (src / "x").chmod(0o755)
    h2 = repo.commit("d", src).hash
    (src / "x").write_text("2")
    h3 = repo.commit("d", src).hash
    (src / "empty").mkdir()
    h4 = repo.commit("d", src).hash
    assert len({h1, h2, h3, h4}) == 4
    assert [e.hash for e in repo.log("d")] == [h4, h3, h2, h1]


def test_unchanged_commit_is_a_noop(repo: tessera.Repo, tmp_path: Path) -> None:
    src = make_small_files(tmp_path / "src", 20)
    r1 = repo.commit_dir("d", src)
    r2 = repo.commit_dir("d", src, message="again")
    assert r1.created and not r2.created
    assert r2.version.hash == r1.version.hash
    assert len(repo.log("d")) == 1


def test_reverting_to_old_content_moves_head(repo: tessera.Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "x").write_text("1")
    v1 = repo.commit("d", src)
    (src / "x").write_text("2")
    repo.commit("d", src)
    (src / "x").write_text("1")
    v3 = repo.commit("d", src)
    assert v3.hash == v1.hash and repo.get("d").hash == v1.hash
    assert len(repo.log("d")) == 3


def test_dedup_small_file_edits_and_big_file_insert(repo: tessera.Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_small_files(src / "small", 2000, 2048, 16384, seed=5)
    big = src / "big.bin"
    write_random(big, 256 << 20, 6)
    repo.commit("d", src)
    before = repo.stats()["pack_bytes"]
    changed = 0
    rng = random.Random(7)
    files = sorted((src / "small").rglob("*.bin"))
    for p in rng.sample(files, 20):  # 1 %
        data = rng.randbytes(p.stat().st_size)
        p.write_bytes(data)
        changed += len(data)
    insert = os.urandom(1 << 20)
    with open(big, "r+b") as f:
        f.seek(128 << 20)
        tail = f.read()
        f.seek(128 << 20)
        f.write(insert + tail)
    changed += len(insert)
    res = repo.commit_dir("d", src)
    added = repo.stats()["pack_bytes"] - before
    assert res.created
    assert added < 2 * changed, f"stored {added} bytes for {changed} changed bytes"
    assert res.version.read_bytes("big.bin")[128 << 20:(128 << 20) + (1 << 20)] == insert


def test_recommit_of_unchanged_tree_reads_nothing(repo: tessera.Repo, tmp_path: Path) -> None:
    src = make_small_files(tmp_path / "src", 20_000, 1024, 8192, seed=8)
    t0 = time.perf_counter()
    first = repo.commit_dir("d", src)
    again = repo.commit_dir("d", src)
    # the counters prove it reads nothing; how fast that is belongs to `make bench` (bench_commit)
    assert first.stats.files_read == 20_000
    assert again.stats.files_read == 0 and again.stats.bytes_read == 0
    assert again.stats.stat_cache_hits == 20_000
    assert not again.created


def test_stat_cache_notices_a_rewrite(repo: tessera.Repo, tmp_path: Path) -> None:
    src = make_small_files(tmp_path / "src", 10)
    repo.commit("d", src)
    target = next(src.rglob("*.bin"))
    target.write_bytes(b"different")
    res = repo.commit_dir("d", src)
    assert res.created and res.stats.files_read == 1
    assert res.version.read_bytes(str(target.relative_to(src))) == b"different"


def test_refs_prefix_tag_latest(repo: tessera.Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    hashes = []
    for i in range(40):  # enough versions that some 1-hex prefixes collide
        (src / "x").write_text(str(i))
        hashes.append(repo.commit("d", src).hash)
    assert repo.get("d").hash == hashes[-1]
    assert repo.get(f"d@{hashes[3][:10]}").hash == hashes[3]
    assert repo.get(f"d@{hashes[3].upper()}").hash == hashes[3]
    repo.tag(f"d@{hashes[5]}", "v1")
    assert repo.get("d:v1").hash == hashes[5]
    with pytest.raises(BadRef):
        repo.get("d@abc")
    with pytest.raises(BadRef):
        repo.get("bad name")
    with pytest.raises(NotFound):
        repo.get("nope")
    with pytest.raises(NotFound):
        repo.get("d:nope")
    with pytest.raises(NotFound):
        repo.get("d@" + "0" * 64)
    # Ambiguity needs two versions sharing a 6-char prefix: craft it by searching prefixes.
    by_prefix: dict[str, list[str]] = {}
    for h in hashes:
        by_prefix.setdefault(h[:1], []).append(h)
    shared = next(p for p, hs in by_prefix.items() if len(hs) > 1)
    repo.catalog.conn.execute("SELECT 1")  # the catalog is live
    assert len(repo.catalog.find_versions("d", shared)) > 1
    with pytest.raises(AmbiguousRef) as exc:
        repo.resolve(tessera.ids.Ref("d", prefix=shared)) if False else repo.resolve(_ref("d", shared))
    assert by_prefix[shared][0][:12] in str(exc.value)


def _ref(name: str, prefix: str):
    from tessera.ids import Ref

    return Ref(name, prefix=prefix)


def test_open_is_seekable_and_reads_only_needed_chunks(repo: tessera.Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_text(src / "t.csv", 20 << 20, 9)
    v = repo.commit("d", src)
    data = (src / "t.csv").read_bytes()
    rng = random.Random(10)
    with v.open("t.csv") as f:
        for _ in range(200):
            off = rng.randrange(len(data))
            n = rng.randrange(1, 300_000)
            f.seek(off)
            assert f.read(n) == data[off:off + n]
        f.seek(-10, os.SEEK_END)
        assert f.read() == data[-10:]
    assert v.read_bytes("t.csv") == data
    with pytest.raises(NotFound):
        v.read_bytes("missing.csv")


def test_walk_entry_and_meta(repo: tessera.Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "train").mkdir(parents=True)
    (src / "val").mkdir()
    for i in range(6):
        (src / ("train" if i < 4 else "val") / f"{i}.jpg").write_bytes(bytes([i]) * 100)
    tags = {"train/0.jpg": {"tags": ["animal"]}, "train/2.jpg": {"tags": ["animal", "cat"]}}
    v = repo.commit("coco", src, meta={"source": "test"}, meta_for=lambda p: tags.get(p))
    assert v.meta == {"source": "test"}
    assert [e.path for e in v.walk("train")] == [f"train/{i}.jpg" for i in range(4)]
    assert v.entry("train/2.jpg").meta == {"tags": ["animal", "cat"]}
    # per-entry metadata is content: it changes the hash
    plain = tessera.Repo(tmp_path / "h2").commit("coco", src)
    assert plain.hash != v.hash


def test_filter_then_commit_version_copies_no_bytes(repo: tessera.Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i in range(10):
        write_random(src / "img" / f"{i}.bin", 50_000, i)
    meta = {f"img/{i}.bin": {"tags": ["animal"] if i % 2 else []} for i in range(10)}
    v = repo.commit("coco", src, meta_for=meta.get)
    before = repo.stats()
    animals = v.filter(lambda e: "animal" in e.meta.get("tags", []))
    assert len(animals) == 5
    d = repo.commit_version("coco-animals", animals, message="only animals")
    after = repo.stats()
    assert after["pack_bytes"] == before["pack_bytes"] and after["chunks"] == before["chunks"]
    assert [e.path for e in d.walk()] == [f"img/{i}.bin" for i in range(1, 10, 2)]
    assert d.read_bytes("img/3.bin") == (src / "img" / "3.bin").read_bytes()
    assert d.meta["derived_from"] == v.ref
    # identity is content: committing the same subset as a directory gives the same hash
    sub = tmp_path / "sub"
    for i in range(1, 10, 2):
        (sub / "img").mkdir(parents=True, exist_ok=True)
        shutil.copy(src / "img" / f"{i}.bin", sub / "img" / f"{i}.bin")
    again = repo.commit("sub", sub, meta_for=meta.get)
    assert again.hash == d.hash


def test_entry_meta_sidecar_file(repo: tessera.Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a")
    side = tmp_path / "meta.json"
    side.write_text('{"a.txt": {"label": 3}}')
    v = repo.commit("d", src, meta_for=side)
    assert v.entry("a.txt").meta == {"label": 3}
    side.write_text("[1, 2]")
    with pytest.raises(UsageError):
        repo.commit("d", src, meta_for=side)


def test_diff(repo: tessera.Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "keep").mkdir(parents=True)
    (src / "keep" / "same.txt").write_text("same")
    (src / "mod.txt").write_text("1")
    (src / "gone.txt").write_text("x")
    a = repo.commit("d", src)
    (src / "mod.txt").write_text("2")
    (src / "gone.txt").unlink()
    (src / "new").mkdir()
    (src / "new" / "n.txt").write_text("n")
    b = repo.commit("d", src)
    changes = [(c.status, c.path) for c in repo.diff(a.ref, b.ref)]
    assert changes == [("removed", "gone.txt"), ("modified", "mod.txt"), ("added", "new/n.txt")]


@pytest.mark.allow_logs("not a regular file, directory or symlink")
def test_special_files_are_skipped(repo: tessera.Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a")
    os.mkfifo(src / "pipe")
    res = repo.commit_dir("d", src)
    assert res.stats.skipped == 1
    assert [e.path for e in res.version.walk()] == ["a.txt"]


def test_fsck_detects_a_flipped_byte(repo: tessera.Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_random(src / "r.bin", 1 << 20, 11)
    v = repo.commit("d", src)
    assert repo.fsck().ok
    pack = next((repo.home / "packs").rglob("*.pack"))
    with open(pack, "r+b") as f:
        f.seek(4096)
        b = f.read(1)
        f.seek(4096)
        f.write(bytes([b[0] ^ 1]))
    report = repo.fsck()
    assert not report.ok and "fails its hash check" in report.errors[0]
    repo2 = tessera.Repo(repo.home)
    with pytest.raises(tessera.errors.CorruptData, match="fails its hash check"):
        repo2.get(v.ref).read_bytes("r.bin")


def test_directory_cache_never_hides_a_change(repo: tessera.Repo, tmp_path: Path) -> None:
    """Each kind of change deep in a tree, re-committed right after: the hash must equal a fresh
    home's hash of the same tree (no stale tree reused)."""
    src = tmp_path / "src"
    make_small_files(src / "a" / "b", 30, seed=12, per_dir=10)
    (src / "a" / "b" / "link").symlink_to("d0000")
    deep = src / "a" / "b" / "d0001"
    changes = [
        lambda: (deep / "f000010.bin").write_bytes(b"new content"),
        lambda: (deep / "added.txt").write_text("added"),
        lambda: (deep / "added.txt").unlink(),
        lambda: (deep / "f000011.bin").rename(deep / "renamed.bin"),
        lambda: (deep / "f000012.bin").chmod(0o755),
        lambda: ((src / "a" / "b" / "link").unlink(), (src / "a" / "b" / "link").symlink_to("d0002")),
        lambda: (deep / "sub").mkdir(),
        lambda: (src / "a" / "b" / "d0002").rename(src / "moved"),
    ]
    repo.commit("d", src)
    for i, change in enumerate(changes):
        change()
        got = repo.commit("d", src).hash
        fresh = tessera.Repo(tmp_path / f"fresh{i}").commit("d", src).hash
        assert got == fresh, f"change {i} was missed"


def test_directory_cache_respects_changing_excludes(repo: tessera.Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "keep.txt").write_text("k")
    (src / "a" / "skip.tmp").write_text("s")
    no_tmp = lambda rel: rel.endswith(".tmp")  # noqa: E731
    v1 = repo.commit_dir("d", src, exclude=no_tmp).version
    assert [e.path for e in v1.walk()] == ["a/keep.txt"]
    again = repo.commit_dir("d", src, exclude=no_tmp)
    assert again.version.hash == v1.hash and again.stats.files_read == 0
    v2 = repo.commit_dir("d", src).version  # rules changed: the .tmp file now counts
    assert [e.path for e in v2.walk()] == ["a/keep.txt", "a/skip.tmp"]
    v3 = repo.commit_dir("d", src, exclude=lambda rel: rel.endswith("keep.txt")).version
    assert [e.path for e in v3.walk()] == ["a/skip.tmp"]


@pytest.mark.allow_logs("is still being written")
def test_keep_busy_keeps_previous_content_of_a_file_being_written(repo: tessera.Repo, tmp_path: Path) -> None:
    import threading

    src = tmp_path / "src"
    src.mkdir()
    (src / "stable.txt").write_text("stable")
    log = src / "busy.log"
    log.write_bytes(b"first\n")
    v1 = repo.commit("d", src)
    stop = threading.Event()

    def writer() -> None:  # rewrites 4 MiB in place without pause, for at most 60 s
        fd = os.open(log, os.O_WRONLY)
        deadline = time.monotonic() + 60
        off = 0
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                os.pwrite(fd, os.urandom(4096), off)
                off = (off + 4096) % (4 << 20)
        finally:
            os.close(fd)

    t = threading.Thread(target=writer)
    t.start()
    try:
        (src / "stable.txt").write_text("stable v2")
        for _ in range(20):  # until a commit catches the writer mid-read
            head = repo.get("d")
            res = repo.commit_dir("d", src, keep_busy=True)
            if res.stats.busy:
                break
            (src / "stable.txt").write_text(f"stable {_}")
    finally:
        stop.set()
        t.join()
    assert res.stats.busy == ["busy.log"]
    assert res.version.read_bytes("busy.log") == head.read_bytes("busy.log")  # the previous content
    assert res.version.read_bytes("stable.txt").startswith(b"stable")
    assert repo.fsck().ok
    # the next commit, with the writer gone, captures the file for real
    final = repo.commit_dir("d", src, keep_busy=True)
    assert final.version.read_bytes("busy.log") == log.read_bytes() and not final.stats.busy
    assert v1.hash != final.version.hash


def test_export_force_never_writes_through_symlinks(repo: tessera.Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "x.txt").write_text("payload")
    (src / "f.txt").write_text("f")
    v = repo.commit("d", src)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f.txt").write_text("precious")
    target = tmp_path / "target"
    target.mkdir()
    os.symlink(outside, target / "a")             # a directory of the version is a symlink out
    os.symlink(outside / "f.txt", target / "f.txt")  # a file of the version is a symlink out
    repo.export(v.ref, target, force=True)
    assert sorted(p.name for p in outside.iterdir()) == ["f.txt"]
    assert (outside / "f.txt").read_text() == "precious"
    assert not (target / "a").is_symlink() and (target / "a" / "x.txt").read_text() == "payload"
    assert not (target / "f.txt").is_symlink() and (target / "f.txt").read_text() == "f"
    assert repo.verify(v.ref, target).ok


def test_reading_a_growing_file_is_bounded(repo: tessera.Repo, tmp_path: Path) -> None:
    """A writer appending faster than we read must not make a commit read (or hold) without end:
    each read stops one byte past the stat'ed size, and the file is retried, then reported."""
    import resource
    import threading

    src = tmp_path / "src"
    src.mkdir()
    grow = src / "grow.bin"
    grow.write_bytes(os.urandom(9 << 20))  # above the whole-read size: the streaming path
    small = src / "small.bin"
    small.write_bytes(b"s")
    stop = threading.Event()

    def writer() -> None:
        block = os.urandom(1 << 20)
        with open(grow, "ab", buffering=0) as f, open(small, "ab", buffering=0) as g:
            for _ in range(2000):
                if stop.is_set():
                    break
                f.write(block)
                g.write(b"x")

    t = threading.Thread(target=writer)
    t.start()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        try:  # a read may land between two writes (then the commit succeeds); either is fine
            res = repo.commit_dir("d", src)
            assert res.version.entry("grow.bin").size >= 9 << 20
        except tessera.errors.SourceError as exc:
            assert "kept changing" in str(exc)
    finally:
        stop.set()
        t.join()
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 512 * 1024, f"peak RSS grew by {grown_kib} KiB"
