"""How tests/data/remote-format1/ was made: a remote written by the tessera of commit 7374672 (remote
format 1: one ``index/<pack>`` per data pack, version objects listing every pack). Kept so that every
later tessera is tested against bytes an older one wrote (tests/test_4_remote_formats.py).

Run with that tessera on the path: ``PYTHONPATH=<its lib as tessera> python make_remote_format1.py OUT``.
"""
from __future__ import annotations

import os
import random
import sys
import tempfile
from pathlib import Path

import tessera


def build(root: Path, round_: int) -> None:
    rng = random.Random(7 + round_)
    (root / "train" / "cats").mkdir(parents=True, exist_ok=True)
    (root / "train" / "dogs").mkdir(parents=True, exist_ok=True)
    for i in range(3):
        (root / "train" / "cats" / f"c{i}.bin").write_bytes(rng.randbytes(20_000 + i))
        (root / "train" / "dogs" / f"d{i}.bin").write_bytes(rng.randbytes(9_000 + i))
    (root / "labels.csv").write_text("".join(f"{i},cat\n" for i in range(2000 + round_)))
    (root / "empty").write_bytes(b"")
    if not (root / "latest").is_symlink():
        os.symlink("train/cats/c0.bin", root / "latest")
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "run.sh", 0o755)


def main(out: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        with tessera.Repo(Path(tmp) / "home") as repo:
            build(src, 0)
            repo.commit("pets", src, message="first")
            build(src, 1)
            v2 = repo.commit("pets", src, message="second")
            repo.tag(v2.ref, "v2")
            repo.push("pets", f"file://{out}")
            print(v2.ref)


if __name__ == "__main__":
    main(sys.argv[1])
