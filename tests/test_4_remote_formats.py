"""Remote format 2 (issue 14) and the format-1 remotes written before it.

- A remote written by an older tessera (tests/data/remote-format1/, made by
  tests/data/make_remote_format1.py with the tessera of commit 7374672) still reads in a fresh home:
  log, ls, cat, export + verify, a full pull, fsck; and a newer version pushed on top of it (format 2)
  reads next to the old ones.
- A fresh home lists one directory of a 200,000-file version on S3 (moto behind a counting proxy) by
  fetching that directory's tree and little else: the requests and bytes are counted and bounded, and
  the version's metadata is then completed on demand (pull --metadata-only, fsck).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from conftest import run_cli

sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))
from scale_tree import make_flat_files  # noqa: E402

FIXTURE = Path(__file__).resolve().parent / "data" / "remote-format1"
V1_FIRST = "40548c88b0c9e85ea1aaf71d20d28b559a2e12b61acaa06df6c3f0d89b4ee13c"
V1_SECOND = "fcd326755c54a1abaf4a85a20bb10da896ef6961585337975d6ae65cacce4af0"


def _env(home: Path) -> dict[str, str]:
    return {"TESSERA_HOME": str(home)}


def _format1_remote(tmp_path: Path) -> str:
    copy = tmp_path / "remote"
    shutil.copytree(FIXTURE, copy)
    return f"file://{copy}"


def test_a_format1_remote_still_reads_in_a_fresh_home(tmp_path: Path) -> None:
    url = _format1_remote(tmp_path)
    e = _env(tmp_path / "home")
    run_cli("remote", "add", "origin", url, "--default", env=e, check=True)
    log = run_cli("log", "pets", "--json", env=e, check=True).stdout
    assert V1_FIRST in log and V1_SECOND in log
    listing = run_cli("ls", "pets", "train/cats", env=e, check=True).stdout
    assert [ln.split()[-1] for ln in listing.splitlines()] == [f"train/cats/c{i}.bin" for i in range(3)]
    labels = run_cli("cat", "pets:v2", "labels.csv", env=e, check=True).stdout
    assert labels == "".join(f"{i},cat\n" for i in range(2001))
    out = tmp_path / "out"
    run_cli("export", f"pets@{V1_FIRST[:12]}", str(out), env=e, check=True)
    assert (out / "labels.csv").read_text() == "".join(f"{i},cat\n" for i in range(2000))
    assert (out / "latest").readlink() == Path("train/cats/c0.bin")
    run_cli("verify", f"pets@{V1_FIRST[:12]}", str(out), env=e, check=True)
    run_cli("pull", "pets", env=e, check=True)
    fsck = run_cli("fsck", env=e)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_a_format2_version_pushed_onto_a_format1_remote_reads_next_to_the_old_ones(tmp_path: Path) -> None:
    from tessera.remote.wire import VersionObject
    from tessera.repo import Repo

    url = _format1_remote(tmp_path)
    root = Path(url.removeprefix("file://"))
    with Repo(tmp_path / "a", remote=url) as a:
        a.pull("pets")
        src = tmp_path / "src"
        a.export("pets", src)
        (src / "train" / "cats" / "c9.bin").write_bytes(b"a new cat\n" * 500)
        v3 = a.commit("pets", src, message="third")
        a.push("pets")
        # every tree of v3 is now recorded in a metadata pack a table covers (those only in format-1
        # packs were sent again, once: the next push must not send them once more)
        from tessera.catalog import remote_state as rs
        from tessera.format.pack import KIND_TREE

        remote = a.catalog.query_one("SELECT DISTINCT remote FROM remote_meta")[0]
        trees = [v3.hash] + [e.tree_id for e in v3.walk(dirs=True) if e.tree_id]
        where = rs.meta_locations(a.catalog, remote, KIND_TREE, trees)
        assert len(where) == len(trees)
        assert set(where.values()) <= set(rs.meta_locations(a.catalog, remote, rs.KIND_META_TABLE, set(where.values())))
    obj = VersionObject.from_bytes(v3.hash, (root / "versions" / v3.hash).read_bytes(), "v3")
    assert obj.format == 2 and obj.chunk_tables and obj.meta_tables and obj.pack_lists
    assert len(list((root / "index").iterdir())) == 2  # no per-pack index objects any more
    # the new version's chunk table also locates the old packs it reuses (their rows were indexed once)
    assert obj.pack_count == 3
    with Repo(tmp_path / "fresh", remote=url) as fresh:
        assert fresh.get("pets").read_bytes("train/cats/c9.bin") == b"a new cat\n" * 500
        assert fresh.get("pets").read_bytes("labels.csv") == "".join(f"{i},cat\n" for i in range(2001)).encode()
        assert len(fresh.get(f"pets@{V1_FIRST[:12]}").read_bytes("train/dogs/d0.bin")) == 9000
        fresh.pull("pets")
        assert fresh.fsck().ok


def _trees(repo) -> int:
    return int(repo.catalog.query_one("SELECT count(*) FROM trees")[0])


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200,000 files of 60 bytes, 1,000 to a directory (d00000 ... d00199)."""
    return make_flat_files(tmp_path_factory.mktemp("big") / "tree", 200_000)


def test_a_fresh_home_lists_one_directory_of_a_200k_file_version_with_a_few_requests(
        tmp_path: Path, big_tree: Path, s3_bucket: str, fault_proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    from tessera.repo import Repo

    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.url)
    with Repo(tmp_path / "a", remote=s3_bucket) as a:
        v = a.commit("big", big_tree)
        a.push("big")
    stats = fault_proxy.stats
    before, got = stats.requests, stats.response_bytes
    with Repo(tmp_path / "fresh", remote=s3_bucket) as fresh:
        names = [e.path for e in fresh.get("big").listdir("d00150")]
        listing_requests, listing_bytes = stats.requests - before, stats.response_bytes - got
        assert names == [f"d00150/f{i:08d}" for i in range(150_000, 151_000)]
        print(f"listing d00150 of a 200,000-file version: {listing_requests} requests, {listing_bytes} bytes")
        # history list + entry, tombstones, tags, the version object; the metadata table's head and two
        # buckets; the root's and d00150's trees: about 11 requests and 150 KB, where the whole metadata
        # (200,000 file records) is about 14 MB in one metadata pack plus its 11 MB table
        assert listing_requests <= 14, stats.methods[-listing_requests:]
        assert listing_bytes <= 256 << 10, listing_bytes
        assert _trees(fresh) == 2

        before = stats.requests
        body = fresh.get("big").read_bytes("d00150/f00150007")
        assert body == (big_tree / "d00150" / "f00150007").read_bytes()
        assert stats.requests - before <= 8  # file record (bucket, blob), chunk table (head, bucket), the chunk

    e = _env(tmp_path / "fresh")
    e["AWS_ENDPOINT_URL"] = fault_proxy.url
    run_cli("pull", "big", "--metadata-only", "-r", s3_bucket, env=e, check=True)
    with Repo(tmp_path / "fresh", remote=s3_bucket) as fresh:
        assert _trees(fresh) == 201
        assert fresh.fsck().ok
        assert fresh.get("big").hash == v.hash


def test_a_lying_metadata_table_makes_a_lazy_read_fail_never_lie(tmp_path: Path) -> None:
    """Ranged reads of a location table cannot check its SHA-256: a hostile bucket can rewrite rows. Each
    blob a row points at is checked itself (its header against the row, a tree against its hash), so
    the lie is a one-line error; a full metadata pull does not depend on the table (it reads the metadata
    packs whole, checked against their SHA-256) and gets the true version."""
    from tessera.format import table
    from tessera.repo import Repo

    url = f"file://{tmp_path / 'remote'}"
    src = tmp_path / "src"
    for d in ("a", "b"):
        (src / d).mkdir(parents=True)
        (src / d / "x.txt").write_text(f"file in {d}\n")
    with Repo(tmp_path / "home", remote=url) as repo:
        repo.commit("ds", src)
        repo.push("ds")
    [path] = (tmp_path / "remote" / "metaidx").iterdir()
    head, rows = table.decode(path.read_bytes(), "t", kind=table.KIND_META)
    trees = [r for r in rows if r.key[32] == 1]
    assert len(trees) == 3
    # every tree row now points at the next tree's bytes
    moved = {r.key: trees[(i + 1) % 3] for i, r in enumerate(trees)}
    lied = [table.Row(r.key, m.pack, m.offset, m.stored_len, m.raw_len, m.codec) if (m := moved.get(r.key)) else r
            for r in rows]
    path.write_bytes(table.encode(table.KIND_META, head.packs, lied))
    e = _env(tmp_path / "fresh")
    run_cli("remote", "add", "origin", url, env=e, check=True)
    ls = run_cli("ls", "ds", env=e)
    assert ls.returncode == 5 and ls.stderr.strip().splitlines()[-1].startswith("error: "), ls.stderr
    assert "is not where its table says" in ls.stderr and "Traceback" not in ls.stderr, ls.stderr
    other = _env(tmp_path / "other")
    run_cli("remote", "add", "origin", url, env=other, check=True)
    run_cli("pull", "ds", "--metadata-only", env=other, check=True)
    assert run_cli("cat", "ds", "b/x.txt", env=other, check=True).stdout == "file in b\n"
