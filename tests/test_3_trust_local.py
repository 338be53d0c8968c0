"""Issue 8 (trust), the local side, tested the way each hole was found:

- the home is never a source or target: export --force of a dataset holding ``catalog.db`` over the
  home, commit of the home or its packs/, commit of a directory that contains the home;
- the daemon never versions a torn file: a writer that pauses between two write() calls while
  max_wait forces commits, and an appender that holds its file open;
- 10 concurrent first commands on a home that does not exist yet;
- names that are not valid UTF-8 (and 255-byte names) through commit -> export -> verify -> mount;
- a read-only home (a real read-only bind mount; a non-root uid without write permission);
- read commands never create a home (issue 11).
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import tessera
from fuse_probe import fuse_unavailable_reason
from tessera.errors import ConfigError, NoHome, ReadOnlyHome, UsageError
from tessera.mounting import is_mounted, read_record, registry_path
from conftest import wait_until  # noqa: E402

# -- helpers ------------------------------------------------------------------------------------------

def run(home: Path | str, *args: str | bytes, timeout: float = 120,
        unprivileged: bool = False) -> subprocess.CompletedProcess[bytes]:
    """The real `tessera` command; bytes in and out (names that are not UTF-8 stay bytes).
    ``unprivileged``: without the capabilities that let root ignore file permissions."""
    env = {**os.environ, "TESSERA_HOME": os.fsdecode(home)}
    return subprocess.run(["tessera", *args], capture_output=True, env=env, timeout=timeout, cwd="/",
                          stdin=subprocess.DEVNULL, preexec_fn=drop_dac_capabilities if unprivileged else None)


def drop_dac_capabilities() -> None:
    """In the child before exec: remove CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and CAP_FOWNER from the
    bounding set, so the command (still uid 0, so it can run this venv's interpreter, which lives under
    /root) obeys file modes like any user: a home with mode 0555/0444 is not writable to it."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop = 24
    for cap in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
        if libc.prctl(pr_capbset_drop, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def ok(proc: subprocess.CompletedProcess[bytes]) -> bytes:
    assert proc.returncode == 0, (proc.args, proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


def one_line_error(proc: subprocess.CompletedProcess[bytes], code: int, *needles: str) -> str:
    err = proc.stderr.decode("utf-8", "backslashreplace")
    assert proc.returncode == code, (proc.args, proc.returncode, proc.stdout, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]




def tree_bytes(root: Path) -> dict[bytes, bytes | None]:
    """Every path below ``root`` (as bytes) -> file content (None for directories)."""
    out: dict[bytes, bytes | None] = {}
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), base)] = None
        for f in filenames:
            with open(os.path.join(dirpath, f), "rb") as fh:
                out[os.path.relpath(os.path.join(dirpath, f), base)] = fh.read()
    return out


def home_state(home: Path) -> tuple[Any, ...]:
    """What a refused command must not change: the catalog's rows and the pack files."""
    con = sqlite3.connect(f"file:{home / 'catalog.db'}?mode=ro", uri=True)
    try:
        rows = tuple(con.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()
                     for t in ("datasets", "versions", "history", "files", "chunks", "packs", "tags", "stat_cache"))
    finally:
        con.close()
    packs = sorted((str(p.relative_to(home)), p.stat().st_size) for p in (home / "packs").rglob("*") if p.is_file())
    return rows, packs


@pytest.fixture
def fuse_ok() -> None:
    why = fuse_unavailable_reason()
    if why is not None:
        if os.environ.get("TESSERA_REQUIRE_FUSE") == "1":
            pytest.fail(f"FUSE required but unavailable: {why}")
        pytest.skip(f"FUSE unavailable here: {why}")


def mount(home: Path, ref: str, mp: Path) -> None:
    mp.mkdir(parents=True, exist_ok=True)
    ok(run(home, "mount", ref, str(mp)))
    assert is_mounted(str(mp))


def umount(home: Path, mp: Path) -> None:
    if is_mounted(str(mp)):
        ok(run(home, "umount", str(mp)))
    assert not is_mounted(str(mp))


# -- 1. the home is never a source or a target -----------------------------------------------------

def test_export_force_over_the_home_is_refused_and_the_home_still_works(home: Path, tmp_path: Path) -> None:
    """The attack: a dataset holding a file named catalog.db (and packs/) exported with --force over
    $TESSERA_HOME would replace the real catalog. Refused (into, inside, above the home), nothing changes."""
    evil = tmp_path / "evil"
    (evil / "packs").mkdir(parents=True)
    (evil / "catalog.db").write_bytes(b"not a catalog" * 100)
    (evil / "packs" / "x.pack").write_bytes(b"junk")
    good = tmp_path / "good"
    good.mkdir()
    (good / "data.txt").write_text("precious\n")
    ok(run(home, "commit", "good", str(good)))
    ok(run(home, "commit", "evil", str(evil)))
    catalog_sha = hashlib.sha256((home / "catalog.db").read_bytes()).hexdigest()
    before = home_state(home)

    one_line_error(run(home, "export", "--force", "evil", str(home)), 2, "is the tessera home itself",
                   "export target")
    one_line_error(run(home, "export", "--force", "evil", str(home / "packs")), 2, "inside the tessera home")
    one_line_error(run(home, "export", "evil", str(home / "new-dir")), 2, "inside the tessera home")
    one_line_error(run(home, "export", "--force", "evil", str(tmp_path)), 2, "contains the tessera home")
    link = tmp_path / "link-to-home"
    link.symlink_to(home)
    one_line_error(run(home, "export", "--force", "evil", str(link)), 2, "tessera home")

    assert hashlib.sha256((home / "catalog.db").read_bytes()).hexdigest() == catalog_sha
    assert home_state(home) == before
    assert not (home / "new-dir").exists() and not (home / "packs" / "x.pack").exists()
    assert b"good" in ok(run(home, "datasets")) and b"evil" in ok(run(home, "datasets"))
    assert ok(run(home, "cat", "good", "data.txt")) == b"precious\n"
    ok(run(home, "fsck"))
    with tessera.Repo(home) as repo, pytest.raises(UsageError, match="tessera home"):
        repo.export("evil", home, force=True)


def test_commit_of_the_home_or_its_packs_is_refused_and_nothing_changes(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a\n")
    ok(run(home, "commit", "ds", str(src)))
    before = home_state(home)
    pack_dir = next(p for p in (home / "packs").iterdir() if p.is_dir())
    for target, why in ((home, "is the tessera home itself"), (home / "packs", "inside the tessera home"),
                        (pack_dir, "inside the tessera home"), (home / "tmp", "inside the tessera home")):
        one_line_error(run(home, "commit", "ds2", str(target)), 2, why, "commit source")
        one_line_error(run(home, "commit", "ds", str(target)), 2, why)
    assert home_state(home) == before
    assert ok(run(home, "datasets")).count(b"\n") == 1
    with tessera.Repo(home) as repo, pytest.raises(UsageError, match="tessera home"):
        repo.commit_dir("ds3", home / "packs")


def test_commit_of_a_directory_containing_the_home_skips_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "data" / "x.bin").write_bytes(os.urandom(10_000))
    (work / "notes.txt").write_text("notes\n")
    home = work / "state" / "tessera"  # the home two levels down, next to the data
    monkeypatch.setenv("TESSERA_HOME", str(home))
    ok(run(home, "commit", "seed", str(work / "data")))  # creates the home inside work/
    proc = run(home, "commit", "work", str(work))
    ok(proc)
    assert b"skipped the tessera home " + os.fsencode(home) in proc.stderr
    listing = ok(run(home, "ls", "-R", "work")).decode().split()
    assert sorted(listing) == ["data/", "data/x.bin", "notes.txt", "state/"]  # state/ is kept, empty
    again = run(home, "commit", "work", str(work))
    ok(again)
    assert b"unchanged" in again.stderr, again.stderr  # the home's own writes never make a new version
    with tessera.Repo(home) as repo:
        res = repo.commit_dir("work", work)
        assert res.stats.home_skipped == str(home) and not res.created
        assert repo.commit_dir("data", work / "data").stats.home_skipped is None


def test_watch_keeps_refusing_the_home_through_the_shared_check(tmp_path: Path) -> None:
    from tessera.daemon.config import check_not_home

    home = tmp_path / "parent" / "home"
    home.mkdir(parents=True)
    with pytest.raises(ConfigError, match="is the tessera home itself: watch a data directory"):
        check_not_home(str(home), home)
    with pytest.raises(ConfigError, match="is inside the tessera home"):
        check_not_home(str(home / "packs"), home)
    with pytest.raises(ConfigError, match="contains the tessera home .*would watch its own writes"):
        check_not_home(str(tmp_path / "parent"), home, "cfg:3")
    check_not_home(str(tmp_path / "elsewhere"), home)


# -- 2. the daemon never versions a torn file ------------------------------------------------------

PAUSING_WRITER = textwrap.dedent("""
    import sys, time
    path, rounds, half, pause = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    for k in range(1, rounds + 1):
        fill = bytes([k % 250 + 1])
        with open(path, "wb") as f:          # truncate, first half, pause with the fd open, second half
            f.write(fill * half)
            f.flush()
            time.sleep(pause)
            f.write(fill * half)
        time.sleep(pause)                    # closed: a complete state the daemon may take
    print("done", flush=True)
""")


class DaemonProc:
    def __init__(self, home: Path) -> None:
        self.log = home.parent / f"daemon-{time.monotonic_ns()}.log"
        env = dict(os.environ, TESSERA_HOME=str(home))
        self.proc = subprocess.Popen(["tessera", "daemon"], stdout=subprocess.DEVNULL, stderr=open(self.log, "w"),
                                     env=env, stdin=subprocess.DEVNULL)
        assert wait_until(lambda: "daemon started" in self.text() or self.proc.poll() is not None, 20)
        assert self.proc.poll() is None, self.text()

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout=30)


@pytest.fixture
def daemon_proc() -> Iterator[Callable[[Path], DaemonProc]]:
    started: list[DaemonProc] = []

    def start(home: Path) -> DaemonProc:
        d = DaemonProc(home)
        started.append(d)
        return d

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


def watch_config(home: Path, data: Path, dataset: str, quiet: float, max_wait: float) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "daemon.toml").write_text(f'[[watch]]\npath = "{data}"\ndataset = "{dataset}"\n'
                                      f"quiet_seconds = {quiet}\nmax_wait_seconds = {max_wait}\n")


def all_versions(home: Path, dataset: str) -> list[tuple[str, bytes | None]]:
    """(hash, content of ckpt.bin or None) for every version in the dataset's history."""
    out = []
    with tessera.Repo(home) as repo:
        for e in reversed(repo.log(dataset)):
            v = repo.get(f"{dataset}@{e.hash}")
            names = {x.path for x in v.walk()}
            out.append((e.hash, v.read_bytes("ckpt.bin") if "ckpt.bin" in names else None))
    return out


def test_daemon_never_versions_a_file_caught_between_two_writes(home: Path, tmp_path: Path, daemon_proc) -> None:
    """How it was found: a checkpoint writer truncates, writes half, pauses with the fd open, writes the
    other half, closes — over and over — while max_wait forces commits. No version may hold a half file:
    each version's ckpt.bin is absent (new and busy) or one complete round."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "static.txt").write_text("static\n")
    watch_config(home, data, "ck", quiet=0.5, max_wait=0.6)  # writes every 0.3 s: never quiet, always forced
    d = daemon_proc(home)
    half, rounds = 64 * 1024, 20
    writer = subprocess.run([sys.executable, "-c", PAUSING_WRITER, str(data / "ckpt.bin"), str(rounds), str(half),
                             "0.3"], capture_output=True, text=True, timeout=120)
    assert writer.stdout.strip() == "done", writer.stderr
    final = bytes([rounds % 250 + 1]) * (2 * half)
    assert wait_until(lambda: any(c == final for _, c in all_versions(home, "ck")), 20), d.text()
    assert d.stop() == 0
    versions = all_versions(home, "ck")
    torn = [(h[:12], len(c)) for h, c in versions if c is not None and not (len(c) == 2 * half and len(set(c)) == 1)]
    assert not torn, f"versions holding a torn ckpt.bin: {torn}"
    log = d.text()
    forced = log.count("new version") + log.count("unchanged (")
    assert forced >= rounds // 2, log  # max_wait really forced commits while the writer worked
    assert "ckpt.bin is still being written (" in log, log  # some commit caught it mid-file
    during = [c for _, c in versions if c is not None and c != final]
    assert during, "no complete round was ever versioned while the writer worked"


APPENDER = textwrap.dedent("""
    import os, sys, time
    path, seconds = sys.argv[1], float(sys.argv[2])
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        os.write(fd, f"{n:07d} ".encode())   # one line in two write() calls
        time.sleep(0.001)
        os.write(fd, b"x" * (n % 50) + b"\\n")
        n += 1
    os.close(fd)
    print(n, flush=True)
""")


def test_a_file_held_open_for_writing_keeps_its_previous_content(home: Path, tmp_path: Path, daemon_proc) -> None:
    """An appender that holds its file open (and writes each line in two calls) is never captured
    mid-way: while it is open, versions keep the previous content; after close it is captured whole."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "static.txt").write_text("static\n")
    watch_config(home, data, "ap", quiet=0.5, max_wait=1.0)
    d = daemon_proc(home)
    out = subprocess.run([sys.executable, "-c", APPENDER, str(data / "ckpt.bin"), "5"], capture_output=True,
                         text=True, timeout=60)
    n = int(out.stdout)
    final = b"".join(f"{i:07d} ".encode() + b"x" * (i % 50) + b"\n" for i in range(n))
    assert wait_until(lambda: any(c == final for _, c in all_versions(home, "ap")), 20), d.text()
    assert d.stop() == 0
    assert {c for _, c in all_versions(home, "ap")} == {None, final}
    assert d.text().count("ckpt.bin is still being written (open for writing)") >= 2, d.text()


@pytest.mark.allow_logs("is still being written")
def test_keep_busy_rules_in_one_process(repo: tessera.Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The three rules of a keep_busy commit, deterministically: open for writing when the snapshot
    starts, open when it ends, changed after our read. /proc is scanned at most twice per commit."""
    import tessera.openfiles as openfiles

    scans: list[str] = []
    real_scan = openfiles.open_for_writing

    def counting(roots: list[str], pids: list[int] | None = None, *, skip_self: bool = True) -> set[str]:
        scans.append(roots[0])
        return real_scan(roots, pids, skip_self=skip_self)

    monkeypatch.setattr(openfiles, "open_for_writing", counting)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"A" * 1000)
    (src / "b.bin").write_bytes(b"B" * 1000)
    v1 = repo.commit_dir("k", src, keep_busy=True)
    assert v1.created and v1.stats.busy == [] and len(scans) == 2

    # open for writing (by this very process) while the commit runs: previous content / left out
    with open(src / "a.bin", "r+b") as fa, open(src / "new.bin", "wb") as fn:
        fa.write(b"half")
        fa.flush()
        fn.write(b"half")
        fn.flush()
        scans.clear()
        res = repo.commit_dir("k", src, keep_busy=True)
        assert len(scans) == 2
    assert sorted(res.stats.busy) == ["a.bin", "new.bin"]
    v = res.version
    assert v.read_bytes("a.bin") == b"A" * 1000 and "new.bin" not in {e.path for e in v.walk()}
    # once closed, the next commit takes them, and a scan the caller made counts as the first one
    scans.clear()
    res = repo.commit_dir("k", src, keep_busy=True, open_at_start=set())
    assert res.stats.busy == [] and len(scans) == 1
    assert res.version.read_bytes("a.bin") == b"half" + b"A" * 996 and res.version.read_bytes("new.bin") == b"half"

    # changed after our read, before the end of the commit (the second scan is the last step before
    # the check): that file keeps its previous content; the stat cache does not remember the torn read
    (src / "b.bin").write_bytes(b"b" * 500)

    def scan_then_write(roots: list[str], pids: list[int] | None = None, *, skip_self: bool = True) -> set[str]:
        scans.append(roots[0])
        if len(scans) == 2:
            with open(src / "b.bin", "ab") as f:
                f.write(b"b" * 500)
        return real_scan(roots, pids, skip_self=skip_self)

    monkeypatch.setattr(openfiles, "open_for_writing", scan_then_write)
    scans.clear()
    res = repo.commit_dir("k", src, keep_busy=True)
    assert res.stats.busy == ["b.bin"] and res.version.read_bytes("b.bin") == b"B" * 1000
    res = repo.commit_dir("k", src, keep_busy=True)
    assert res.stats.busy == [] and res.version.read_bytes("b.bin") == b"b" * 1000
    # without keep_busy (the CLI), nothing is scanned and files are taken as read
    scans.clear()
    repo.commit_dir("plain", src)
    assert scans == []


# -- 3. concurrent first commands on a new home ----------------------------------------------------

@pytest.mark.parametrize("round_", range(5))
def test_ten_concurrent_first_commands_on_a_new_home(tmp_path: Path, round_: int) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.txt").write_text(f"round {round_}\n")
    home = tmp_path / "new" / "home"  # neither it nor its parent exists yet
    env = {**os.environ, "TESSERA_HOME": str(home)}
    cmds = [["commit", f"d{i}", str(src)] for i in range(6)] + [["init"], ["init"], ["datasets"], ["datasets"]]
    procs = [subprocess.Popen(["tessera", *c], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                              stdin=subprocess.DEVNULL) for c in cmds]
    results = [(c, p.wait(120), p.stdout.read().decode(), p.stderr.read().decode())  # type: ignore[union-attr]
               for c, p in zip(cmds, procs)]
    for p in procs:
        p.stdout.close()  # type: ignore[union-attr]
        p.stderr.close()  # type: ignore[union-attr]
    for cmd, code, out, err in results:
        assert "Traceback" not in err and "locked" not in err and "already exists" not in err, (cmd, err)
        if cmd[0] == "datasets" and code != 0:  # ran before any command had created the home
            assert code == 3 and err.strip() == f"error: no tessera home at {home} (commit something or run " \
                                                 "`tessera init` to create one)", (cmd, code, err)
        else:
            assert code == 0, (cmd, code, out, err)
    listed = ok(run(home, "datasets")).decode().split("\n")
    assert sorted(line.split("\t")[0] for line in listed if line) == [f"d{i}" for i in range(6)]
    ok(run(home, "fsck"))


def test_init_lock_serialises_catalog_creation(tmp_path: Path) -> None:
    """The same race inside one process: threads opening one new home."""
    import threading

    home = tmp_path / "h"
    errors: list[BaseException] = []

    def open_it() -> None:
        try:
            tessera.Repo(home).close()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with tessera.Repo(home) as repo:
        assert repo.catalog.setting("schema_version") is not None and repo.catalog.setting("chunk.avg_size")


# -- 4. names that are not UTF-8 ---------------------------------------------------------------------

NAMES = [b"\xff\xfe.bin", b"caf\xe9", b"caf\xe9/na\xefve.txt", "café-utf8.txt".encode()]


def make_named_tree(root: Path) -> dict[bytes, bytes | None]:
    base = os.fsencode(root)
    os.makedirs(os.path.join(base, b"caf\xe9"))
    contents = {b"\xff\xfe.bin": os.urandom(300_000), b"caf\xe9/na\xefve.txt": b"latin-1 names\n",
                "café-utf8.txt".encode(): b"valid utf-8\n"}
    for rel, data in contents.items():
        with open(os.path.join(base, rel), "wb") as f:
            f.write(data)
    return tree_bytes(root)


def test_non_utf8_names_commit_export_verify_and_recommit(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    expected = make_named_tree(src)
    ref = ok(run(home, "commit", "names", str(src))).decode().strip().splitlines()[-1]
    listing = ok(run(home, "ls", "-R", "names")).splitlines()
    assert sorted(listing) == sorted([b"caf\xe9/", b"caf\xe9/na\xefve.txt", b"\xff\xfe.bin",
                                      "café-utf8.txt".encode()])  # the original bytes, as ls prints them
    js = json.loads(ok(run(home, "ls", "-R", "--json", "names")))  # valid UTF-8 JSON with \udcXX escapes
    assert {os.fsencode(e["path"]) for e in js} == set(expected)
    out = tmp_path / "out"
    ok(run(home, "export", ref, str(out)))
    assert tree_bytes(out) == expected
    assert b"ok: 3 files match" in ok(run(home, "verify", ref, str(out)))
    with open(os.path.join(os.fsencode(out), b"\xff\xfe.bin"), "ab") as f:
        f.write(b"!")
    bad = run(home, "verify", ref, str(out))
    assert bad.returncode == 1 and b"modified: \xff\xfe.bin" in bad.stdout
    # a recommit reads nothing: the stat cache keys these names (as BLOBs; valid names stay TEXT)
    again = run(home, "commit", "names", str(src), "--stats")
    assert b"unchanged" in again.stderr and b"read 0 (" in again.stderr, again.stderr
    con = sqlite3.connect(home / "catalog.db")
    kinds = dict(con.execute("SELECT CAST(name AS BLOB), typeof(name) FROM stat_cache").fetchall())
    con.close()
    assert kinds == {b"\xff\xfe.bin": "blob", b"na\xefve.txt": "blob", "café-utf8.txt".encode(): "text"}
    # diff and cat name them too
    os.rename(os.path.join(os.fsencode(src), b"\xff\xfe.bin"), os.path.join(os.fsencode(src), b"\xfe\xff.bin"))
    ok(run(home, "commit", "names", str(src)))
    assert set(ok(run(home, "diff", ref, "names")).splitlines()) == {b"- \xff\xfe.bin", b"+ \xfe\xff.bin"}
    assert ok(run(home, "cat", "names", b"caf\xe9/na\xefve.txt")) == b"latin-1 names\n"


def test_non_utf8_names_through_the_library_and_a_keep_busy_commit(repo: tessera.Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    expected = make_named_tree(src)
    res = repo.commit_dir("names", src, keep_busy=True)  # the daemon's way: /proc paths, stat cache, trees
    v = res.version
    files = {os.fsencode(e.path): v.read_bytes(e.path) for e in v.walk()}
    assert files == {k: c for k, c in expected.items() if c is not None}
    assert repo.commit_dir("names", src, keep_busy=True).stats.files_read == 0


def test_a_non_utf8_watch_directory_is_one_line_error(home: Path, tmp_path: Path) -> None:
    d = os.path.join(os.fsencode(tmp_path), b"caf\xe9")
    os.mkdir(d)
    one_line_error(run(home, "watch", d, "w"), 2, "not valid UTF-8")


def test_non_utf8_and_255_byte_names_through_a_real_mount(home: Path, tmp_path: Path, fuse_ok: None) -> None:
    src = tmp_path / "src"
    expected = make_named_tree(src)
    long_name = b"L" * 251 + b".bin"
    assert len(long_name) == 255
    with open(os.path.join(os.fsencode(src), long_name), "wb") as f:
        f.write(b"long name\n" * 1000)
    expected[long_name] = b"long name\n" * 1000
    ref = ok(run(home, "commit", "names", str(src))).decode().strip().splitlines()[-1]
    mp = tmp_path / "mnt"
    mount(home, ref, mp)
    try:
        assert tree_bytes(mp) == expected
        assert os.getxattr(os.path.join(os.fsencode(mp), b"\xff\xfe.bin"), "user.tessera.sha256").decode() == \
            hashlib.sha256(expected[b"\xff\xfe.bin"] or b"").hexdigest()
    finally:
        umount(home, mp)


def test_255_byte_names_export(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    name = "L" * 251 + ".bin"
    (src / name).write_bytes(b"long name\n")
    ok(run(home, "commit", "long", str(src)))
    out = tmp_path / "out"
    ok(run(home, "export", "long", str(out)))
    assert (out / name).read_bytes() == b"long name\n"
    ok(run(home, "verify", "long", str(out)))


# -- 5. a read-only home -------------------------------------------------------------------------------

def reads_work(home: Path, tmp_path: Path, ref: str, src: Path, unprivileged: bool = False) -> None:
    """datasets, log, ls, show, cat, diff, export, verify, fsck, stats on ``home``; writes refused."""
    assert ok(run(home, "datasets", unprivileged=unprivileged)).startswith(b"ro\t")
    assert ref[3:15].encode() in ok(run(home, "log", "ro", unprivileged=unprivileged))
    listed = ok(run(home, "ls", "-R", "ro", unprivileged=unprivileged))
    assert sorted(listed.split()) == [b"a.txt", b"sub/", b"sub/b.bin"]
    assert ref.encode() in ok(run(home, "show", "ro", unprivileged=unprivileged))
    assert ok(run(home, "cat", "ro", "a.txt", unprivileged=unprivileged)) == b"alpha\n"
    assert ok(run(home, "diff", "ro", ref, unprivileged=unprivileged)) == b""
    out = Path(tempfile.mkdtemp(dir=tmp_path))
    os.chmod(out, 0o777)
    ok(run(home, "export", "ro", str(out / "x"), unprivileged=unprivileged))
    assert tree_bytes(out / "x") == tree_bytes(src)
    ok(run(home, "verify", "ro", str(out / "x"), unprivileged=unprivileged))
    ok(run(home, "fsck", unprivileged=unprivileged))
    ok(run(home, "stats", unprivileged=unprivileged))
    ro = "is read-only"
    one_line_error(run(home, "commit", "ro2", str(src), unprivileged=unprivileged), 14, f"tessera home {home} {ro}")
    one_line_error(run(home, "commit", "ro", str(src), unprivileged=unprivileged), 14, ro)
    one_line_error(run(home, "tag", "ro", "v1", unprivileged=unprivileged), 14, ro)
    one_line_error(run(home, "gc", unprivileged=unprivileged), 14, ro)
    one_line_error(run(home, "remote", "add", "o", "file:///tmp/x", unprivileged=unprivileged), 14, ro)


def make_home(home: Path, tmp_path: Path) -> tuple[str, Path]:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha\n")
    (src / "sub" / "b.bin").write_bytes(os.urandom(200_000))
    ref = ok(run(home, "commit", "ro", str(src))).decode().strip().splitlines()[-1]
    return ref, src


def listing(root: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_read_only_bind_mount_home_allows_reads(home: Path, tmp_path: Path, fuse_ok: None) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for a bind mount")
    ref, src = make_home(home, tmp_path)
    ro = tmp_path / "ro-home"
    ro.mkdir()
    subprocess.run(["mount", "--bind", str(home), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], check=True)
        with pytest.raises(OSError):
            (ro / "probe").write_text("x")
        before = listing(home)
        reads_work(ro, tmp_path, ref, src)
        mp = tmp_path / "mnt"
        mount(ro, "ro", mp)
        try:
            assert tree_bytes(mp) == tree_bytes(src)
            record = read_record(registry_path(ro, str(mp)))  # kept outside the read-only home
            assert record is not None and record.mountpoint == str(mp) and ro not in registry_path(ro, str(mp)).parents
        finally:
            umount(ro, mp)
        with tessera.Repo(ro) as repo:
            assert repo.read_only and repo.get("ro").read_bytes("a.txt") == b"alpha\n"
            with pytest.raises(ReadOnlyHome):
                repo.tag("ro", "v1")
        assert listing(home) == before
    finally:
        subprocess.run(["umount", str(ro)], check=False)


def test_home_without_write_permission_allows_reads(home: Path, tmp_path: Path) -> None:
    """chmod a-w on the home, and a command that cannot override file modes (root without its DAC
    capabilities: see `drop_dac_capabilities`)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop capabilities")
    ref, src = make_home(home, tmp_path)
    probe = run(home, "datasets", unprivileged=True)
    assert probe.returncode == 0, probe.stderr
    for p in [home, *home.rglob("*")]:
        os.chmod(p, 0o555 if p.is_dir() else 0o444)
    try:
        check = subprocess.run([sys.executable, "-c", f"open({str(home / 'probe')!r}, 'w')"], capture_output=True,
                               preexec_fn=drop_dac_capabilities)
        assert check.returncode != 0 and b"PermissionError" in check.stderr  # the setup really denies writes
        before = listing(home)
        reads_work(home, tmp_path, ref, src, unprivileged=True)
        assert listing(home) == before  # nothing created, nothing changed (no -wal, -shm or lock files)
    finally:
        for p in [home, *home.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)


# -- 6. read commands never create a home (issue 11) -------------------------------------------------

READ_COMMANDS = [["datasets"], ["log", "x"], ["ls", "x"], ["show", "x"], ["diff", "x", "y"], ["cat", "x", "p"],
                 ["export", "x", "OUT"], ["verify", "x", "OUT"], ["mount", "x", "MNT"], ["mounts"], ["fsck"],
                 ["stats"], ["remote", "list"], ["push", "x"]]


def test_read_commands_never_create_a_home(tmp_path: Path) -> None:
    home = tmp_path / "nonexistent" / "x"
    out = tmp_path / "out"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for cmd in READ_COMMANDS:
        args = [a.replace("OUT", str(out)).replace("MNT", str(mnt)) for a in cmd]
        proc = subprocess.run(["tessera", "--home", str(home), *args], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=60)
        assert proc.returncode == 3, (cmd, proc.stderr)
        assert proc.stderr == f"error: no tessera home at {home} (commit something or run `tessera init` " \
                              "to create one)\n", (cmd, proc.stderr)
        assert not (tmp_path / "nonexistent").exists() and not out.exists(), cmd
    with pytest.raises(NoHome):
        tessera.Repo(home, create=False)
    assert not home.exists()
    ok(run(home, "init"))
    assert (home / "catalog.db").is_file()
    ok(run(home, "datasets"))


def test_write_commands_create_the_home(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("f\n")
    h1, h2, h3 = tmp_path / "a" / "h", tmp_path / "b" / "h", tmp_path / "c" / "h"
    ok(run(h1, "commit", "ds", str(src)))
    ok(run(h2, "remote", "add", "origin", f"file://{tmp_path / 'remote'}"))
    ok(run(h3, "watch", str(src), "w"))
    for h in (h1, h2, h3):
        assert (h / "catalog.db").is_file()
    with tessera.Repo(tmp_path / "d" / "h") as repo:  # the library keeps creating by default
        assert repo.datasets() == []
