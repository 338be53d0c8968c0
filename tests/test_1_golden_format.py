"""Formats are forever: a fixed tree, committed and pushed, gives byte-identical packs and remote objects.

The pack, metadata pack and version hash were recorded before the read path and the remote layer were
restructured (issue 9); the remote's location tables, pack list and version object when remote format 2
replaced per-pack indexes (issue 14: format-1 remotes are read by tests/test_4_remote_formats.py from a
remote an older tessera wrote). Any change here is a format change and needs a format version, an
old-format reader and docs/format.md.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import tessera
from trees import write_random, write_text

VERSION = "2df52391a6a89caf03402d01cdc4c9d2632174497e963db9c9862ff9ef1b111f"
PACK = "c2c71d305685a8d9304ebe2e92d916bd315da97dadccf75c693f6741af6bbc92"
CHUNK_TABLE = "034b9e785c5dc608ceabfdd75efd18528f962359b6eea4accdd4279f94491062"
META = "c124b3f06ce3a5c168ec09bcb7f01dd5509da7ee587a16af90f4d2d269184832"
META_TABLE = "5e93838d8ca852c666384c81f07a5cfe70744f374ae974442c2e6ce234d68866"
PACK_LIST = "9c7ca88ca702601d32c1b7e68787e19e8f3c5fd300724269646dba89cc7f091d"
REMOTE = {
    f"chunkidx/{CHUNK_TABLE}": CHUNK_TABLE,
    f"meta/{META}": META,
    f"metaidx/{META_TABLE}": META_TABLE,
    f"packlist/{PACK_LIST}": PACK_LIST,
    f"packs/{PACK}": PACK,
    f"versions/{VERSION}": "193cc2dc7b154773e3f9f23d44d6a5c63c68dbc12f895c2825cc9822d22bb18d",
}


def build(root: Path) -> None:
    write_random(root / "a" / "rand.bin", 3 << 20, 11)
    write_text(root / "a" / "text.csv", 2 << 20, 12)
    (root / "b").mkdir(parents=True)
    (root / "b" / "small.txt").write_text("small\n")
    (root / "b" / "empty").write_bytes(b"")
    (root / "c" / "d").mkdir(parents=True)
    os.symlink("../a/rand.bin", root / "c" / "link")
    (root / "x.sh").write_text("#!/bin/sh\n")
    os.chmod(root / "x.sh", 0o755)


def test_fixed_tree_gives_recorded_packs_and_remote_objects(tmp_path: Path) -> None:
    src = tmp_path / "src"
    build(src)
    with tessera.Repo(tmp_path / "home") as repo:
        res = repo.commit_dir("g", src, workers=1)  # one pack writer: deterministic pack contents
        assert res.version.hash == VERSION
        assert sorted(p.id for p in repo.catalog.packs()) == [PACK]
        remote = tmp_path / "remote"
        repo.push("g", f"file://{remote}")
    found = {str(p.relative_to(remote)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(remote.rglob("*")) if p.is_file() and not str(p.relative_to(remote)).startswith("history/")}
    assert found == REMOTE
