"""Excludes: gitignore rules (pathspec) for `.tesseraignore` and `commit --exclude`, the daemon's watch
globs, and the directory cache staying correct when the rules change between commits."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import tessera
from tessera.errors import UsageError
from tessera.ignore import DirIgnore, IgnoreRules, combined_exclude


def test_gitignore_rules() -> None:
    r = IgnoreRules(gitignore=["*.log", "!keep.log", "/top.txt", "build/", "raw/*.csv", "deep/**/x", "# c", ""])
    yes = ["a.log", "d/e/a.log", "top.txt", "build/", "x/build/", "raw/a.csv", "deep/x", "deep/a/b/x"]
    no = ["keep.log", "d/keep.log", "d/top.txt", "build", "raw/s/a.csv", "x/raw/a.csv", "a.txt", "deep/y"]
    assert [p for p in yes if not r.excludes(p)] == []
    assert [p for p in no if r.excludes(p)] == []
    assert r("build/inside/file.txt") and r("x/build/f") and not r("buildings/f")  # any directory above


def test_watch_globs_keep_their_rules() -> None:
    r = IgnoreRules(["*.log", "cache", "raw/*.csv"], temp_files=True)
    assert r("a/b/x.log") and r("cache/deep/file") and r("raw/s/x.csv")  # '*' crosses '/' in globs
    assert not r("other/raw/x.csv") and not r("data/x.bin")
    assert r("f.tmp") and r("a/.x.swp") and r(".#edit")
    assert not IgnoreRules(["*.log"])("f.tmp")  # temp files only when asked
    assert IgnoreRules().empty and not IgnoreRules(gitignore=["# only a comment"]).excludes("x")


def test_ignore_file_and_excludes_combine(tmp_path: Path) -> None:
    (tmp_path / ".tesseraignore").write_text("*.log\n")
    ex = combined_exclude(tmp_path, lambda rel: rel == "custom", ["tmp/"])
    assert ex is not None
    assert ex("a.log") and ex("tmp/") and ex("custom") and not ex("tmp") and not ex("a.txt")
    assert combined_exclude(tmp_path, None, ignore_file=False) is None
    (tmp_path / "sub").mkdir()
    assert combined_exclude(tmp_path / "sub", None) is None
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / ".tesseraignore").mkdir()
    with pytest.raises(UsageError, match="is a directory"):
        IgnoreRules.for_dir(tmp_path / "d")


def test_dir_ignore_rereads_the_file(tmp_path: Path) -> None:
    d = DirIgnore(str(tmp_path), ["*.bak"])
    assert d("x.bak") and not d("x.log") and d("x.tmp")
    (tmp_path / ".tesseraignore").write_text("*.log\n")
    assert not d("x.log")  # not re-read until an event names the file ...
    assert not d(".tesseraignore") and d("x.log") and d("x.bak")  # ... which re-reads it


def paths(v: tessera.Version) -> list[str]:
    return [e.path for e in v.walk()]


def test_commit_honours_tesseraignore_and_exclude(home: Path, tmp_path: Path, cli) -> None:
    src = tmp_path / "src"
    (src / "cache" / "deep").mkdir(parents=True)
    (src / "logs").mkdir()
    (src / "a.txt").write_text("a")
    (src / "b.log").write_text("b")
    (src / "keep.log").write_text("k")
    (src / "cache" / "deep" / "c.bin").write_text("c")
    (src / "logs" / "x.txt").write_text("x")
    (src / ".tesseraignore").write_text("*.log\n!keep.log\ncache/\n")
    out = cli("commit", "ds", str(src), "--exclude", "logs/", "--json", check=True)
    obj = json.loads(out.stdout)
    assert obj["excluded"] == 3 and obj["files"] == 3
    with tessera.Repo(home) as r:
        assert paths(r.get("ds")) == [".tesseraignore", "a.txt", "keep.log"]
    st = json.loads(cli("status", str(src), "--json", check=True).stdout)
    assert st["changes"] == [] and st["excluded"] == 3  # the commit's --exclude is remembered
    (src / "more.log").write_text("ignored by status too")
    (src / "logs" / "y.txt").write_text("and this, by the commit's --exclude")
    (src / "new.txt").write_text("seen")
    assert cli("status", str(src), check=True).stdout == "+ new.txt\n"


def test_dir_cache_follows_changing_rules(home: Path, tmp_path: Path) -> None:
    """Each commit must equal a fresh home's commit of the same tree with the same rules, however the
    rules changed since the previous commit of this directory (the directory cache must not serve a
    tree built under other rules)."""
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "x.log").write_text("log")
    (src / "a" / "b" / "y.txt").write_text("y")
    (src / "z.txt").write_text("z")
    steps = [(), ("*.log",), (), ("a/",), ("*.log",), ()]
    with tessera.Repo(home) as repo:
        for i, rules in enumerate(steps):
            got = repo.commit_dir("ds", src, excludes=rules).version
            with tessera.Repo(tmp_path / f"fresh{i}") as fresh:
                want = fresh.commit_dir("ds", src, excludes=rules).version
                assert got.hash == want.hash, (i, rules, paths(got), paths(want))
        (src / ".tesseraignore").write_text("y.txt\n")
        got = repo.commit_dir("ds", src).version
        assert sorted(paths(got)) == [".tesseraignore", "a/b/x.log", "z.txt"]


def test_status_reports_what_the_next_commit_would_change(home: Path, tmp_path: Path, cli) -> None:
    """A committed file that a new .tesseraignore now excludes would leave the next version: status
    says so (the directory cache must not vouch for a directory where something is now excluded)."""
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "x.log").write_text("log")
    (src / "a" / "b" / "y.txt").write_text("y")
    cli("commit", "ds", str(src), check=True)
    assert cli("status", str(src), check=True).stdout == ""
    (src / ".tesseraignore").write_text("*.log\n")
    assert cli("status", str(src), check=True).stdout.splitlines() == ["+ .tesseraignore", "- a/b/x.log"]
    ref = cli("commit", "ds", str(src), check=True).stdout.strip().splitlines()[-1]
    assert cli("status", str(src), check=True).stdout == ""
    with tessera.Repo(home) as r:
        assert sorted(paths(r.get(ref))) == [".tesseraignore", "a/b/y.txt"]
