"""A mounted version is a root: forgetting it (or removing its dataset) is refused while it is mounted, and
gc — deleting and repacking the packs under it — never disturbs a reader of the mount. Real FUSE mounts,
and a real kernel mount (EROFS + overlayfs over the whole-file cache): gc keeps the cached files and the
image a kernel mount uses, and deletes those of versions no longer kept."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fuse_probe import fuse_unavailable_reason, require_fuse
from inprocess import tessera_main
from trees import make_small_files, tree_digest, write_random

import tessera
from tessera.config import RepoSettings
from tessera.errors import UsageError
from tessera.mounting import is_mounted
from tessera.retention import KeepPolicy

pytestmark = pytest.mark.fuse


@pytest.fixture(scope="module", autouse=True)
def _fuse_available() -> None:
    require_fuse()


def tess(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tessera", *args], capture_output=True, text=True,
                          env={**os.environ, "TESSERA_HOME": str(home)}, stdin=subprocess.DEVNULL, timeout=120)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_mounted_version_is_kept_and_survives_gc_with_repacking(tmp_path: Path) -> None:
    home = tmp_path / "home"
    tessera.Repo(home, settings=RepoSettings(pack_target=1 << 20)).close()
    src = tmp_path / "src"
    make_small_files(src / "small", 30, 5000, 40000, seed=3)
    write_random(src / "big.bin", 2 << 20, 4)
    with tessera.Repo(home) as r:  # setup through the library: the CLI is exercised below
        refs = [r.commit("ds", src).ref]
        expected = tree_digest(src)
        for step in range(3):  # later versions drop most of the first one's files: its packs go mostly dead
            for f in sorted(p for p in (src / "small").rglob("*") if p.is_file())[step * 8:(step + 1) * 8]:
                f.write_bytes(os.urandom(9000))
            write_random(src / "big.bin", 2 << 20, 10 + step)
            refs.append(r.commit("ds", src).ref)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ok(tess(home, "mount", "--fuse", refs[0], str(mnt)))  # FUSE: reads go through the packs gc rewrites
    try:
        assert is_mounted(str(mnt))
        forget = json.loads(ok(tessera_main(home, "forget", "ds", "--keep-last", "1", "--json")))
        reasons = {v["hash"]: v["reasons"] for v in forget["versions"]}
        assert reasons[refs[0].split("@")[1]] == [f"mounted at {mnt}"]
        assert forget["forgotten"] == 2
        err = tessera_main(home, "forget", refs[0])
        assert err.returncode != 0 and "mounted at" in err.stderr and "tessera umount" in err.stderr
        assert "is mounted" in tessera_main(home, "rm", "ds", "--yes").stderr

        # a reader goes through the mount while gc deletes and repacks the packs it reads
        errors: list[str] = []
        done = threading.Event()

        def reader() -> None:
            while not done.is_set():
                try:
                    for rel, want in expected.items():
                        p = mnt / rel
                        if want[0] == "file" and sha(p) != want[2]:
                            errors.append(f"{rel} read wrong bytes")
                except OSError as exc:
                    errors.append(f"{exc}")

        t = threading.Thread(target=reader)
        t.start()
        try:
            gc = json.loads(ok(tess(home, "gc", "--repack-threshold", "1%", "--json")))
        finally:
            done.set()
            t.join(60)
        assert gc["repacked"] >= 1 and gc["deleted"]["packs"] >= 1, gc
        assert not errors, errors[:5]
        assert tree_digest(mnt) == expected  # the mount still serves the version, byte for byte
    finally:
        ok(tess(home, "umount", str(mnt)))
    assert not is_mounted(str(mnt))
    with tessera.Repo(home) as r:  # unmounted now: only a tag keeps it
        r.tag(refs[0], "keep")
        with pytest.raises(UsageError, match="tag keep"):
            r.forget("ds", version=refs[0])
        r.delete_tag("ds", "keep")
        assert len(r.forget("ds", version=refs[0]).forgotten) == 1
        r.gc()
        assert r.fsck().ok


def test_kernel_mounted_version_is_kept_and_gc_empties_the_file_cache_after_it(tmp_path: Path) -> None:
    from kernel_probe import kernel_unavailable_reason

    why = kernel_unavailable_reason()
    if why is not None:
        if os.environ.get("TESSERA_REQUIRE_KERNEL_MOUNT") == "1":
            pytest.fail(f"kernel mounts required (TESSERA_REQUIRE_KERNEL_MOUNT=1) but unavailable: {why}")
        pytest.skip(f"kernel mounts unavailable here: {why}")
    home = tmp_path / "home"
    tessera.Repo(home, settings=RepoSettings(pack_target=1 << 20)).close()
    src = tmp_path / "src"
    make_small_files(src / "small", 12, 2000, 20000, seed=8)
    write_random(src / "shared.bin", 300_000, 9)  # in both versions
    shared = hashlib.sha256((src / "shared.bin").read_bytes()).hexdigest()
    with tessera.Repo(home) as r:
        refs = [r.commit("ds", src).ref]
        expected = tree_digest(src)
        own = {want[2] for rel, want in expected.items() if want[0] == "file" and rel.startswith("small")}
        for f in (p for p in (src / "small").rglob("*") if p.is_file()):
            f.write_bytes(os.urandom(5000))
        refs.append(r.commit("ds", src).ref)
    mnt = tmp_path / "mnt"
    ok(tess(home, "mount", "--kernel", refs[0], str(mnt)))
    cached = home / "files"
    try:
        with tessera.Repo(home) as r:
            with pytest.raises(UsageError, match="mounted at"):
                r.forget("ds", version=refs[0])
            report = r.forget("ds", KeepPolicy(last=1))
            assert {f.hash: f.reasons for f in report.fates}[refs[0].split("@")[1]] == [f"mounted at {mnt}"]
            gc = r.gc()
            assert gc.cached_files == 0 and gc.images == 0 and not gc.cache_busy, gc
        assert tree_digest(mnt) == expected  # read by the kernel from the file cache
    finally:
        ok(tess(home, "umount", str(mnt)))
    assert own | {shared} <= {p.name for p in cached.glob("*/*")}  # cached until a gc says otherwise
    with tessera.Repo(home) as r:
        assert len(r.forget("ds", version=refs[0]).forgotten) == 1
    gc_json = json.loads(ok(tess(home, "gc", "--json")))
    assert gc_json["deleted"]["cached_files"] == len(own) and gc_json["deleted"]["images"] == 1, gc_json
    left = {p.name for p in cached.glob("*/*")}
    assert not own & left and shared in left  # the kept version's file stays
    assert not list((home / "images").glob("*.erofs"))
    with tessera.Repo(home) as r:
        assert r.fsck().ok
