"""A mounted version is a root: forgetting it (or removing its dataset) is refused while it is mounted, and
gc — deleting and repacking the packs under it — never disturbs a reader of the mount. Real FUSE mounts."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fuse_probe import fuse_unavailable_reason
from trees import make_small_files, tree_digest, write_random

import tessera
from tessera.config import RepoSettings
from tessera.mounting import is_mounted

pytestmark = pytest.mark.fuse


@pytest.fixture(scope="module", autouse=True)
def _fuse_available() -> None:
    why = fuse_unavailable_reason()
    if why is None:
        return
    sys.stderr.write(f"\n!! FUSE tests SKIPPED: {why}\n")
    if os.environ.get("TESSERA_REQUIRE_FUSE") == "1":
        pytest.fail(f"FUSE required (TESSERA_REQUIRE_FUSE=1) but unavailable: {why}")
    pytest.skip(f"FUSE unavailable here: {why}")


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
    make_small_files(src / "small", 60, 5000, 40000, seed=3)
    write_random(src / "big.bin", 3 << 20, 4)
    refs = [ok(tess(home, "commit", "ds", str(src))).strip()]
    expected = tree_digest(src)
    for step in range(3):  # later versions drop most of the first one's files: its packs go mostly dead
        for f in sorted(p for p in (src / "small").rglob("*") if p.is_file())[step * 15:(step + 1) * 15]:
            f.write_bytes(os.urandom(9000))
        write_random(src / "big.bin", 3 << 20, 10 + step)
        refs.append(ok(tess(home, "commit", "ds", str(src))).strip())
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ok(tess(home, "mount", refs[0], str(mnt)))
    try:
        assert is_mounted(str(mnt))
        forget = json.loads(ok(tess(home, "forget", "ds", "--keep-last", "1", "--json")))
        reasons = {v["hash"]: v["reasons"] for v in forget["versions"]}
        assert reasons[refs[0].split("@")[1]] == [f"mounted at {mnt}"]
        assert forget["forgotten"] == 2
        err = tess(home, "forget", refs[0])
        assert err.returncode != 0 and "mounted at" in err.stderr and "tessera umount" in err.stderr
        assert "is mounted" in tess(home, "rm", "ds", "--yes").stderr

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
    ok(tess(home, "tag", refs[0], "keep"))  # unmounted now: only a tag keeps it
    ok(tess(home, "tag", "--delete", "ds:keep"))
    assert "forgot 1 versions" in ok(tess(home, "forget", refs[0]))
    ok(tess(home, "gc"))
    assert ok(tess(home, "fsck")).startswith("ok:")
