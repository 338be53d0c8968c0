"""Working directories through the real CLI: status, diff with a directory, checkout/restore (resumed
after SIGKILL), and export's fixes: 255-byte names, interrupted exports, sparse files."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from trees import tree_digest, write_random


def last_ref(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def one_line_error(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def make_tree(root: Path) -> None:
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "keep.txt").write_text("keep\n")
    (root / "edit.txt").write_text("before\n")
    (root / "gone.txt").write_text("will be removed\n")
    (root / "sub" / "deep" / "x.bin").write_bytes(os.urandom(300_000))
    run = root / "run.sh"
    run.write_text("#!/bin/sh\necho hi\n")
    os.symlink("keep.txt", root / "link")
    (root / "empty").mkdir()


def change_tree(root: Path) -> None:
    """One of each: added, removed, modified, mode-only."""
    (root / "new.txt").write_text("added\n")
    (root / "gone.txt").unlink()
    (root / "edit.txt").write_text("after!\n")
    (root / "run.sh").chmod(0o755)


EXPECTED = ["+ new.txt", "- gone.txt", "M edit.txt", "m run.sh"]


def marks(out: str) -> list[str]:
    return sorted(out.strip().splitlines(), key=lambda s: s[2:])


@pytest.fixture
def data(home: Path, tmp_path: Path, cli) -> tuple[Path, str]:
    src = tmp_path / "data"
    make_tree(src)
    return src, last_ref(cli("commit", "ds", str(src), "-m", "v1"))


def test_status_after_commit_uses_the_stat_cache(data, cli) -> None:
    src, ref = data
    st = cli("status", str(src), "--json", check=True)
    obj = json.loads(st.stdout)
    assert obj["ref"] == ref and obj["how"] == "commit" and obj["changes"] == []
    assert obj["hashed"] == 0 and obj["stat_cache_hits"] == obj["files"] == 5  # read no file bytes
    plain = cli("status", str(src), check=True)
    assert plain.stdout == "" and "committed as ds@" in plain.stderr and "no changes" in plain.stderr


def test_status_and_diff_show_added_removed_modified_mode(data, cli) -> None:
    src, ref = data
    change_tree(src)
    st = cli("status", str(src), check=True)
    assert sorted(st.stdout.split("\n")[:-1], key=lambda s: s[2:]) == sorted(EXPECTED, key=lambda s: s[2:])
    assert "1 added, 1 removed, 1 modified, 1 mode" in st.stderr
    forward = cli("diff", ref, str(src), check=True).stdout
    assert marks(forward) == marks("\n".join(EXPECTED))
    backward = cli("diff", str(src), ref, "--json", check=True).stdout
    got = {c["path"]: c["status"] for c in json.loads(backward)["changes"]}
    assert got == {"new.txt": "removed", "gone.txt": "added", "edit.txt": "modified", "run.sh": "mode"}
    # the same changes, committed, diffed version to version
    ref2 = last_ref(cli("commit", "ds", str(src), "-m", "v2"))
    assert marks(cli("diff", ref, ref2, check=True).stdout) == marks("\n".join(EXPECTED))
    assert cli("status", str(src), check=True).stdout == ""


def test_checkout_restores_every_kind_of_change(data, cli, tmp_path: Path) -> None:
    src, ref = data
    before = tree_digest(src)
    ref_ino = os.stat(src / "keep.txt").st_ino
    change_tree(src)
    (src / "link").unlink()
    os.symlink("elsewhere", src / "link")
    res = json.loads(cli("checkout", ref, str(src), "--json", check=True).stdout)
    assert (res["written"], res["modes"], res["symlinks"], res["extra"], res["deleted"]) == (2, 1, 1, 1, 0)
    assert os.stat(src / "keep.txt").st_ino == ref_ino  # untouched files are not rewritten
    assert (src / "new.txt").exists()  # extras are kept without --delete
    res = json.loads(cli("restore", ref, str(src), "--delete", "--json", check=True).stdout)
    assert res["deleted"] == 1 and res["written"] == 0
    assert tree_digest(src) == before
    assert cli("status", str(src), check=True).stdout == ""
    assert cli("verify", ref, str(src), check=True).returncode == 0


def test_checkout_into_an_empty_dir_then_status_is_instant(data, cli, tmp_path: Path) -> None:
    src, ref = data
    out = tmp_path / "out"
    summary = cli("checkout", ref, str(out), check=True).stdout
    assert "5 files: 5 written" in summary and ("MiB/s" in summary or "KiB/s" in summary)
    st = json.loads(cli("status", str(out), "--json", check=True).stdout)
    assert st["how"] == "checkout" and st["changes"] == [] and st["hashed"] == 0
    assert tree_digest(out) == tree_digest(src)


def test_checkout_refuses_a_directory_in_the_way_without_writing(data, cli, tmp_path: Path) -> None:
    src, ref = data
    out = tmp_path / "out"
    (out / "edit.txt").mkdir(parents=True)
    (out / "edit.txt" / "mine").write_text("precious")
    one_line_error(cli("checkout", ref, str(out)), 2, "a directory is in the way", "--delete")
    assert sorted(p.name for p in out.iterdir()) == ["edit.txt"]  # nothing written
    assert json.loads(cli("checkout", ref, str(out), "--delete", "--json", check=True).stdout)["replaced"] == 1
    assert tree_digest(out) == tree_digest(src)


def test_checkout_delete_keeps_ignored_paths(data, cli, tmp_path: Path) -> None:
    src, ref = data
    (src / ".tesseraignore").write_text("cache/\n*.log\n")
    ref2 = last_ref(cli("commit", "ds", str(src), check=True))
    (src / "cache").mkdir()
    (src / "cache" / "big.bin").write_bytes(b"x" * 1000)
    (src / "run.log").write_text("log")
    (src / "stray.txt").write_text("stray")
    assert cli("status", str(src), check=True).stdout == "+ stray.txt\n"
    res = json.loads(cli("checkout", ref2, str(src), "--delete", "--json", check=True).stdout)
    assert res["deleted"] == 1
    assert (src / "cache" / "big.bin").exists() and (src / "run.log").exists() and not (src / "stray.txt").exists()


def test_checkout_home_is_refused(home: Path, data, cli) -> None:
    _, ref = data
    one_line_error(cli("checkout", ref, str(home)), 2, "tessera home")
    one_line_error(cli("checkout", ref, str(home / "packs")), 2, "inside the tessera home")


def test_status_errors_are_one_line(home: Path, data, cli, tmp_path: Path) -> None:
    src, ref = data
    other = tmp_path / "other"
    other.mkdir()
    one_line_error(cli("status", str(other)), 2, "no recorded version", "tessera diff REF DIR")
    one_line_error(cli("status", str(tmp_path / "missing")), 2, "no such directory")
    one_line_error(cli("diff", str(src), str(other)), 2, "not two directories")


def test_diff_name_that_is_both_dataset_and_directory(data, cli, tmp_path: Path) -> None:
    src, ref = data
    (tmp_path / "ds").mkdir()
    proc = subprocess.run(["tessera", "diff", "ds", ref], capture_output=True, text=True, cwd=tmp_path,
                          stdin=subprocess.DEVNULL)
    one_line_error(proc, 2, "both a directory here and a dataset", "./ds")
    proc = subprocess.run(["tessera", "diff", ref, "./ds"], capture_output=True, text=True, cwd=tmp_path,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 7  # everything removed


def many_files(root: Path, n: int) -> None:
    for i in range(n):
        p = root / f"d{i // 100:02d}" / f"f{i:04d}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(i.to_bytes(4, "little") * 2000)


@pytest.mark.parametrize("how", ["crash-point", "external-sigkill"])
def test_checkout_resumed_after_sigkill_writes_only_what_is_missing(home: Path, tmp_path: Path, cli, how: str) -> None:
    src = tmp_path / "src"
    many_files(src, 600)
    ref = last_ref(cli("commit", "big", str(src)))
    out = tmp_path / "out"
    env = {**os.environ}
    if how == "crash-point":
        env["TESSERA_CRASH_AT"] = "checkout-after-file-150"
        proc = subprocess.run(["tessera", "checkout", ref, str(out)], env=env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=120)
        assert proc.returncode == -signal.SIGKILL
    else:
        p = subprocess.Popen(["tessera", "checkout", ref, str(out)], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum(1 for _ in out.rglob("f*.bin")) < 100:
            time.sleep(0.005)
        p.kill()
        p.wait()
    present = {p: p.stat().st_ino for p in out.rglob("f*.bin")}
    assert 0 < len(present) < 600, len(present)
    st = json.loads(cli("status", str(out), "--json", check=True).stdout)
    assert st["complete"] is False and st["how"] == "checkout"
    res = json.loads(cli("checkout", ref, str(out), "--json", check=True).stdout)
    assert res["resumed"] is True
    assert res["written"] == 600 - len(present)  # only what was missing
    assert res["unchanged"] == len(present)
    assert all(p.stat().st_ino == ino for p, ino in present.items())  # not rewritten
    assert not list(out.rglob(".tessera-*.tmp"))
    assert tree_digest(out) == tree_digest(src)
    assert json.loads(cli("status", str(out), "--json", check=True).stdout)["complete"] is True


def test_interrupted_export_reruns_without_force(home: Path, tmp_path: Path, cli) -> None:
    src = tmp_path / "src"
    many_files(src, 300)
    ref = last_ref(cli("commit", "big", str(src)))
    out = tmp_path / "out"
    env = {**os.environ, "TESSERA_CRASH_AT": "checkout-after-file-40"}
    proc = subprocess.run(["tessera", "export", ref, str(out)], env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    res = json.loads(cli("export", ref, str(out), "--json", check=True).stdout)  # no --force needed
    assert res["resumed"] and res["written"] < 300
    assert tree_digest(out) == tree_digest(src)
    # a finished export into a non-empty directory still needs --force
    one_line_error(cli("export", ref, str(out)), 2, "not empty", "--force")
    res = json.loads(cli("export", ref, str(out), "--force", "--json", check=True).stdout)
    assert res["written"] == 0 and res["unchanged"] == 300


def test_names_of_243_to_255_bytes_export_and_verify(home: Path, tmp_path: Path, cli) -> None:
    src = tmp_path / "src"
    src.mkdir()
    names = ["a" * n for n in (243, 250, 255)] + ["é" * 127 + "x"]  # 255 bytes in UTF-8
    for i, n in enumerate(names):
        (src / n).write_text(f"file {i}\n")
    (src / ("d" * 255)).mkdir()
    (src / ("d" * 255) / ("f" * 255)).write_text("deep\n")
    ref = last_ref(cli("commit", "long", str(src)))
    out = tmp_path / "out"
    cli("export", ref, str(out), check=True)
    assert cli("verify", ref, str(out), check=True).returncode == 0
    assert tree_digest(out) == tree_digest(src)
    assert not list(out.rglob(".tessera-*"))


def test_sparse_file_is_exported_sparse(home: Path, tmp_path: Path, cli) -> None:
    src = tmp_path / "src"
    src.mkdir()
    gib = 1 << 30
    with open(src / "sparse.img", "wb") as f:
        f.seek(gib // 3)
        f.write(os.urandom(512 * 1024))
        f.seek(gib - 512 * 1024)
        f.write(os.urandom(512 * 1024))  # 1 MiB of data in 1 GiB, ending in data
    (src / "tail-hole.img").write_bytes(b"")
    os.truncate(src / "tail-hole.img", 10 << 20)  # ends in a hole: ftruncate must make the size
    ref = last_ref(cli("commit", "sparse", str(src)))
    out = tmp_path / "out"
    cli("export", ref, str(out), check=True)
    for name, size in (("sparse.img", gib), ("tail-hole.img", 10 << 20)):
        st = os.stat(out / name)
        assert st.st_size == size
        assert st.st_blocks * 512 <= 4 << 20, (name, st.st_blocks * 512)  # du <= 4 MiB
    assert cli("verify", ref, str(out), check=True).returncode == 0


def test_export_force_writes_only_what_differs(home: Path, tmp_path: Path, cli) -> None:
    src = tmp_path / "src"
    src.mkdir()
    write_random(src / "a.bin", 200_000, 1)
    write_random(src / "b.bin", 200_000, 2)
    ref = last_ref(cli("commit", "ds", str(src)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.bin").write_bytes((src / "a.bin").read_bytes())  # same bytes, no stat-cache row: hashed
    (out / "b.bin").write_bytes(b"other")
    (out / "mine.txt").write_text("user file")
    res = json.loads(cli("export", ref, str(out), "--force", "--json", check=True).stdout)
    assert (res["written"], res["unchanged"], res["hashed"], res["extra"]) == (1, 1, 1, 1)
    assert (out / "mine.txt").read_text() == "user file"


def test_checkout_fills_the_directory_cache_soundly(home: Path, tmp_path: Path, repo, monkeypatch) -> None:
    """After a checkout the directory cache vouches for the tree: status, a second checkout and a
    commit read no tree; yet every later change is still seen, and per-entry metadata (part of the
    tree id) never leaks into a commit made without it."""
    src = tmp_path / "src"
    make_tree(src)
    v1 = repo.commit_dir("ds", src).version
    change_tree(src)
    v2 = repo.commit_dir("ds", src).version
    out = tmp_path / "out"
    repo.checkout(v1.ref, out)
    reads: list[str] = []
    real = type(repo.trees).load_tree
    monkeypatch.setattr(type(repo.trees), "load_tree", lambda self, tid: reads.append(tid) or real(self, tid))
    assert repo.status(out).changes == [] and reads == []
    again = repo.checkout(v1.ref, out)
    assert (again.written, again.unchanged, again.hashed, reads) == (0, 5, 0, [])
    assert repo.commit_dir("other", out).version.hash == v1.hash and reads == []
    # a change deep down is seen, and a checkout of another version over it is exact
    (out / "sub" / "deep" / "x.bin").write_bytes(b"changed")
    assert [(c.status, c.path) for c in repo.status(out).changes] == [("modified", "sub/deep/x.bin")]
    res = repo.checkout(v2.ref, out, delete=True)
    assert res.written == 3 and tree_digest(out) == tree_digest(src)
    assert repo.commit_dir("other", out).version.hash == v2.hash
    # per-entry metadata is part of the version's tree ids, not of what a plain commit makes
    tagged = repo.commit_dir("meta", src, meta_for=lambda rel: {"k": rel} if rel == "keep.txt" else None).version
    with_meta = tmp_path / "with-meta"
    repo.checkout(tagged.ref, with_meta)
    assert repo.commit_dir("plain", with_meta).version.hash == v2.hash != tagged.hash
