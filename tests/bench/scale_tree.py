"""Many small files fast: ``n`` files of ``size`` distinct bytes, ``per_dir`` to a directory (issue 14's shape:
1,000,000 files of 60 bytes in 1,000 directories). Used by tests/bench/bench_scale.py and tests/test_3_scale.py.

    python tests/bench/scale_tree.py DIR N [PER_DIR] [SIZE]
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path


def make_flat_files(root: Path, n: int, per_dir: int = 1000, size: int = 60, seed: int = 0) -> Path:
    """Every file's bytes differ (a counter under a hash), so nothing deduplicates away. Idempotent: a
    tree already complete (a ``<root>.done`` marker beside it names its shape) is left alone."""
    marker = root.with_name(root.name + ".done")
    shape = f"{n} {per_dir} {size} {seed}\n"
    if marker.exists() and marker.read_text() == shape:
        return root
    root.mkdir(parents=True, exist_ok=True)
    salt = hashlib.sha256(f"tessera-scale-{seed}".encode()).digest()
    for d in range((n + per_dir - 1) // per_dir):
        dpath = os.path.join(root, f"d{d:05d}")
        os.makedirs(dpath, exist_ok=True)
        for i in range(d * per_dir, min(n, (d + 1) * per_dir)):
            head = hashlib.blake2b(i.to_bytes(8, "little"), key=salt, digest_size=32).digest()
            body = (head * (size // 32 + 1))[:size]
            fd = os.open(os.path.join(dpath, f"f{i:08d}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, body)
            finally:
                os.close(fd)
    marker.write_text(shape)
    return root


if __name__ == "__main__":
    args = sys.argv[1:]
    make_flat_files(Path(args[0]), int(args[1]), *(int(a) for a in args[2:4]))
