"""Layer 6: the daemon — config, bad input, debounce with real watchdog events on real files, the push
queue across outages and restarts, signals and crashes.

Subprocess tests run the real `tessera daemon`; queue tests run `Daemon` in a thread with a fake push
function so they do not depend on a remote.
"""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import tessera
from tessera.catalog import daemon_state as ds
from tessera.daemon.config import (
    WatchConfig,
    add_watch,
    ignore_matcher,
    load_config,
    parse_config,
    remove_watch,
)
from tessera.daemon.service import Daemon
from tessera.errors import ConfigError, TransientRemoteError
from conftest import wait_until  # noqa: E402

QUIET = 1.0


# -- helpers ------------------------------------------------------------------------------------------



def history(home: Path, dataset: str) -> list[Any]:
    with tessera.Repo(home) as r:
        if not r.catalog.dataset_head(dataset)[0]:
            return []
        return list(reversed(r.log(dataset)))


def add_remote_row(home: Path, name: str, url: str) -> None:
    """Register a remote without the remote CLI (the queue only needs its name)."""
    tessera.Repo(home).close()
    con = sqlite3.connect(home / "catalog.db")
    with con:
        con.execute("INSERT OR REPLACE INTO remotes (name, url, is_default) VALUES (?, ?, 0)", (name, url))
    con.close()


def write_config(home: Path, watches: list[dict[str, Any]], extra: str = "") -> Path:
    home.mkdir(parents=True, exist_ok=True)
    parts = [extra]
    for w in watches:
        lines = ["[[watch]]"]
        for k, v in w.items():
            lines.append(f"{k} = {v!r}".replace("'", '"') if not isinstance(v, list) else
                         f"{k} = [{', '.join(repr(x).replace(chr(39), chr(34)) for x in v)}]")
        parts.append("\n".join(lines) + "\n")
    path = home / "daemon.toml"
    path.write_text("\n".join(parts))
    return path


class DaemonProc:
    """A real `tessera daemon` subprocess with its log in a file."""

    def __init__(self, home: Path, env: dict[str, str] | None = None) -> None:
        self.home = home
        self.log = home.parent / f"daemon-{time.monotonic_ns()}.log"
        full_env = dict(os.environ, TESSERA_HOME=str(home), **(env or {}))
        self.proc = subprocess.Popen(["tessera", "daemon"], stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "w"), env=full_env, stdin=subprocess.DEVNULL)
        ok = wait_until(lambda: "daemon started" in self.text() or self.proc.poll() is not None, 20)
        assert ok and self.proc.poll() is None, f"daemon did not start: {self.text()}"

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def daemons():
    started: list[DaemonProc] = []

    def start(home: Path, **kw: Any) -> DaemonProc:
        d = DaemonProc(home, **kw)
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()


class ThreadDaemon:
    """`Daemon` in a thread of the test process, with an injected push function. Every one still running
    when its test ends is stopped (`_stop_thread_daemons`): a failed assertion must not leave a daemon
    retrying pushes, and logging, into the tests that follow in this process."""

    running: list["ThreadDaemon"] = []

    def __init__(self, home: Path, push: Callable[[Any, str, str], object]) -> None:
        self.daemon = Daemon(home, push=push, tick=0.2)
        ThreadDaemon.running.append(self)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.daemon.ready.wait(20)
        assert self.error is None, self.error

    def _run(self) -> None:
        try:
            self.daemon.run(install_signals=False)
        except BaseException as exc:  # noqa: BLE001
            self.error = exc
            self.daemon.ready.set()

    def stop(self) -> None:
        self.daemon.request_stop()
        self.thread.join(20)
        if self in ThreadDaemon.running:
            ThreadDaemon.running.remove(self)
        assert not self.thread.is_alive()


@pytest.fixture(autouse=True)
def _stop_thread_daemons() -> Iterator[None]:
    yield
    while ThreadDaemon.running:
        ThreadDaemon.running[-1].stop()


class FakeRemote:
    """Records pushes; raises a transient error while ``down``."""

    def __init__(self) -> None:
        self.down = False
        self.pushed: list[tuple[str, str]] = []
        self.attempts = 0

    def __call__(self, repo: Any, ref: str, remote: str) -> None:
        self.attempts += 1
        if self.down:
            raise TransientRemoteError(f"remote {remote} unreachable (test outage)")
        repo.get(ref)  # the version exists in the store the worker reads
        self.pushed.append((ref, remote))


# -- config -------------------------------------------------------------------------------------------

def test_config_parse_defaults_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    cfg = parse_config('[[watch]]\npath = "data"\ndataset = "d"\n', tmp_path / "daemon.toml")
    w = cfg.watches[0]
    assert w.path == str((tmp_path / "data").resolve()) and w.dataset == "d" and w.remote is None
    assert (w.quiet_seconds, w.max_wait_seconds, w.ignore) == (5.0, 60.0, ())
    assert load_config(tmp_path / "missing.toml").watches == []


@pytest.mark.parametrize("text, line, fragment", [
    ('[[watch]]\npath = "/x"\ndataset = \n', 3, "malformed TOML"),
    ('[[watch]]\npath = "/x"\ndataset = "d"\nquiet = 3\n', 4, "unknown watch setting 'quiet'"),
    ('# c\n[[watch]]\npath = "/x"\n', 2, "missing 'dataset'"),
    ('[[watch]]\npath = "/x"\ndataset = "d"\nquiet_seconds = 10\nmax_wait_seconds = 5\n', 5, "max_wait_seconds"),
    ('[[watch]]\npath = "/x"\ndataset = "d"\nquiet_seconds = "soon"\n', 4, "number of seconds"),
    ('[[watch]]\npath = "/x"\ndataset = "bad name"\n', 3, "bad dataset name"),
    ('[[watch]]\npath = "/x"\ndataset = "a"\n\n[[watch]]\npath = "/x"\ndataset = "b"\n', 5, "watched twice"),
    ('[[watch]]\npath = "/x"\ndataset = "a"\nignore = "*.log"\n', 4, "list of glob"),
    ('[daemon]\npush_retry_max_seconds = 0\n', 2, "greater than 0"),
    ('watches = 1\n', 1, "unknown setting 'watches'"),
])
def test_config_errors_name_the_line(tmp_path: Path, text: str, line: int, fragment: str) -> None:
    path = tmp_path / "daemon.toml"
    with pytest.raises(ConfigError) as err:
        parse_config(text, path)
    assert f"{path}:{line}:" in str(err.value) and fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_add_and_remove_watch_keep_comments(tmp_path: Path) -> None:
    path = tmp_path / "daemon.toml"
    path.write_text("# my daemon\n[daemon]\npush_retry_max_seconds = 30 # cap\n")
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        add_watch(path, WatchConfig(str(tmp_path / name), name, None, 1, 2, ("*.log",)))
    assert [w.dataset for w in load_config(path).watches] == ["a", "b", "c"]
    with pytest.raises(ConfigError, match="already watched"):
        add_watch(path, WatchConfig(str(tmp_path / "b"), "zz"))
    with pytest.raises(ConfigError, match="already fed"):
        add_watch(path, WatchConfig(str(tmp_path), "a"))
    removed = remove_watch(path, str(tmp_path / "b"))
    assert removed.dataset == "b"
    text = path.read_text()
    assert "# my daemon" in text and "# cap" in text
    cfg = load_config(path)
    assert [w.dataset for w in cfg.watches] == ["a", "c"] and cfg.settings.push_retry_max_seconds == 30
    assert cfg.watches[0].ignore == ("*.log",)
    with pytest.raises(ConfigError, match="not watched"):
        remove_watch(path, str(tmp_path / "b"))


def test_ignore_matcher() -> None:
    ig = ignore_matcher(["*.log", "cache", "raw/*.csv"])
    assert ig("x.log") and ig("a/b/x.log") and ig("cache") and ig("cache/deep/file") and ig("a/cache/f")
    assert ig("raw/x.csv") and not ig("other/raw/x.csv") and not ig("raw.csv")
    assert ig("f.tmp") and ig(".#edit") and ig("a/.x.swp") and ig("dl.part")  # temp files by default
    assert not ig("data/x.bin") and not ig("logs/x.txt")


# -- bad input through the real CLI --------------------------------------------------------------------

def test_watch_bad_input_is_one_line(home: Path, tmp_path: Path, cli) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "file.txt").write_text("x")
    assert cli("watch", str(data), "d1", "--quiet", "1", check=True).returncode == 0
    (home / "packs").mkdir(exist_ok=True)
    other = tmp_path / "other"
    other.mkdir()
    cases = [
        ((str(tmp_path / "missing"), "x"), "no such directory"),
        ((str(tmp_path / "file.txt"), "x"), "not a directory"),
        ((str(home), "x"), "tessera home itself"),
        ((str(home / "packs"), "x"), "inside the tessera home"),
        ((str(tmp_path), "x"), "contains the tessera home"),
        ((str(data), "d2"), "already watched"),
        ((str(data / "."), "d2"), "already watched"),
        ((str(other), "d1"), "already fed"),
        ((str(other), "bad name!"), "bad dataset name"),
        ((str(other), "d3", "--remote", "nope"), "unknown remote 'nope'"),
        ((str(other), "d3", "--quiet", "5", "--max-wait", "1"), "--max-wait"),
    ]
    for args, fragment in cases:
        p = cli("watch", *args)
        assert p.returncode != 0, args
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], (args, p.stderr)
    p = cli("unwatch", str(tmp_path / "never"))
    assert p.returncode != 0 and "not watched" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert len(load_config(home / "daemon.toml").watches) == 1


def test_daemon_refuses_bad_config_and_second_instance(home: Path, tmp_path: Path, cli, daemons) -> None:
    home.mkdir()
    cfg = home / "daemon.toml"
    cfg.write_text('[[watch]]\npath = "/tmp"\ndataset = "t"\nmax_wait_seconds = [1\n')
    p = cli("daemon", timeout=30)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "daemon.toml:4:" in p.stderr, p.stderr
    data = tmp_path / "data"
    data.mkdir()
    write_config(home, [{"path": str(data), "dataset": "d", "remote": "nowhere"}])
    p = cli("daemon", timeout=30)
    assert p.returncode != 0 and "unknown remote 'nowhere'" in p.stderr and p.stderr.count("\n") == 1
    write_config(home, [{"path": str(home), "dataset": "d"}])
    p = cli("daemon", timeout=30)
    assert p.returncode == 2 and "tessera home itself" in p.stderr and p.stderr.count("\n") == 1
    write_config(home, [{"path": str(data), "dataset": "d", "quiet_seconds": QUIET}])
    first = daemons(home)
    p = cli("daemon", timeout=30)
    assert p.returncode != 0 and p.stderr.count("\n") == 1
    assert f"already running for {home} (pid {first.proc.pid})" in p.stderr
    assert first.stop() == 0


# -- debounce with real files ---------------------------------------------------------------------------

def test_ten_files_make_one_version_quickly(home: Path, tmp_path: Path, cli, daemons) -> None:
    data = tmp_path / "data"
    data.mkdir()
    write_config(home, [{"path": str(data), "dataset": "d", "quiet_seconds": QUIET, "max_wait_seconds": 10}])
    d = daemons(home)
    for i in range(10):
        (data / f"f{i}.txt").write_text(f"file {i}\n" * (i + 1))
        time.sleep(0.02)
    written = time.monotonic()
    assert wait_until(lambda: history(home, "d"), QUIET + 2), d.text()
    assert time.monotonic() - written <= QUIET + 2
    time.sleep(QUIET + 0.5)
    versions = history(home, "d")
    assert len(versions) == 1 and versions[0].files == 10
    with tessera.Repo(home) as r:
        assert r.get("d").read_text("f3.txt") == "file 3\n" * 4
        assert r.get("d").info.meta["daemon"]["watch"] == str(data.resolve())
    out = cli("status", check=True).stdout
    assert f"pid {d.proc.pid}" in out and str(data.resolve()) in out and f"d@{versions[0].hash[:12]}" in out
    assert "pending       0 uploads" in out
    js = cli("status", "--json", check=True).stdout
    assert '"last_version": "d@' + versions[0].hash in js
    t0 = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - t0 < 5
    assert "daemon stopped" in d.text()
    assert "not running" in cli("status", check=True).stdout
    assert cli("fsck", check=True).returncode == 0


def test_appender_versions_are_never_torn(home: Path, tmp_path: Path, daemons) -> None:
    """A writer appends bursts of numbered lines for 8 s (max_wait 2 s), opening the file for each
    burst: every captured state is a prefix of whole lines, i.e. a state the writer actually produced,
    and states are captured while it works. (A file held open for writing the whole time keeps its
    previous content until closed: tests/test_3_trust_local.py.)"""
    data = tmp_path / "data"
    data.mkdir()
    (data / "static.txt").write_text("static\n")
    write_config(home, [{"path": str(data), "dataset": "log", "quiet_seconds": QUIET, "max_wait_seconds": 2}])
    d = daemons(home)
    lines = [f"{i:07d} {'x' * (i % 50)}\n".encode() for i in range(1_000_000)]
    n = 0
    end, hard_end = time.monotonic() + 8, time.monotonic() + 40
    # 8 s of writing; on a loaded machine, on until three versions were captured while it writes
    while time.monotonic() < end or (len(history(home, "log")) < 3 and time.monotonic() < hard_end):
        fd = os.open(data / "train.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        for _ in range(200):
            os.write(fd, lines[n])
            n += 1
        os.close(fd)
        time.sleep(0.25)
    final = b"".join(lines[:n])
    assert wait_until(lambda: any(v.size == len(final) + 7 for v in history(home, "log")), QUIET + 5), d.text()
    versions = history(home, "log")
    assert len(versions) >= 3, [v.size for v in versions]  # captured during the writes, not only after
    with tessera.Repo(home) as r:
        for v in versions:
            content = r.get(f"log@{v.hash}").read_bytes("train.log") if v.files == 2 else b""
            assert final.startswith(content), f"{v.hash[:12]} is not a prefix"
            assert content == b"" or content.endswith(b"\n"), f"{v.hash[:12]} ends mid-line"
    assert d.stop() == 0


def test_burst_of_5000_files_makes_few_versions(home: Path, tmp_path: Path, daemons, cli) -> None:
    data = tmp_path / "data"
    data.mkdir()
    write_config(home, [{"path": str(data), "dataset": "burst", "quiet_seconds": QUIET, "max_wait_seconds": 30}])
    d = daemons(home)
    for i in range(5000):
        sub = data / f"d{i // 500:02d}"
        if i % 500 == 0:
            sub.mkdir()
        (sub / f"f{i:05d}.bin").write_bytes(i.to_bytes(4, "big") * 8)
    assert wait_until(lambda: any(v.files == 5000 for v in history(home, "burst")), 30), d.text()
    time.sleep(QUIET + 0.5)
    versions = history(home, "burst")
    assert 1 <= len(versions) <= 3 and versions[-1].files == 5000
    # the CLI works on the same home while the daemon commits (no "database is locked")
    for i in range(0, 5000, 2):
        (data / f"d{i // 500:02d}" / f"f{i:05d}.bin").write_bytes(b"changed %d" % i)
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_text("x")
    deadline = time.monotonic() + QUIET + 1.5
    while time.monotonic() < deadline:
        for args in (("log", "burst"), ("status",), ("commit", "other", str(other))):
            p = cli(*args)
            assert p.returncode == 0 and "locked" not in p.stderr, p.stderr
    # SIGTERM while a commit of the whole tree is (probably) running: clean exit, sound store
    assert d.stop() == 0
    assert cli("fsck", check=True).returncode == 0
    last = history(home, "burst")[-1]
    assert last.files == 5000


def test_daemon_honours_tesseraignore(home: Path, tmp_path: Path, cli, daemons) -> None:
    """The watched directory's .tesseraignore (gitignore syntax) shapes every daemon version, and a
    change to it is picked up without a restart; changes to ignored files commit nothing."""
    data = tmp_path / "data"
    (data / "cache").mkdir(parents=True)
    (data / ".tesseraignore").write_text("*.log\ncache/\n")
    (data / "a.txt").write_text("a")
    (data / "x.log").write_text("ignored")
    (data / "cache" / "blob").write_text("ignored")
    cli("watch", str(data), "ign", "--quiet", str(QUIET), check=True)
    d = daemons(home)
    assert wait_until(lambda: history(home, "ign"), 10), d.text()
    with tessera.Repo(home) as r:
        assert sorted(e.path for e in r.get("ign").walk()) == [".tesseraignore", "a.txt"]
    (data / "more.log").write_text("still ignored")
    (data / "cache" / "blob2").write_text("still ignored")
    time.sleep(QUIET + 1.5)
    assert len(history(home, "ign")) == 1, d.text()  # no event worth a commit
    (data / ".tesseraignore").write_text("cache/\n")  # logs are wanted from now on
    assert wait_until(lambda: len(history(home, "ign")) == 2, QUIET + 5), d.text()
    with tessera.Repo(home) as r:
        assert sorted(e.path for e in r.get("ign").walk()) == [".tesseraignore", "a.txt", "more.log", "x.log"]
    assert cli("status", str(data), check=True).stdout == ""  # the daemon's commit is DIR's version


def test_config_changes_apply_without_restart(home: Path, tmp_path: Path, cli, daemons) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (b / "existing.txt").write_text("already here\n")
    cli("watch", str(a), "a", "--quiet", str(QUIET), check=True)
    d = daemons(home)
    cli("watch", str(b), "b", "--quiet", str(QUIET), "--ignore", "*.log", check=True)
    # a new watch commits what is already there, ignoring *.log and temp files
    (b / "skip.log").write_text("no")
    (b / "x.tmp").write_text("no")
    assert wait_until(lambda: history(home, "b"), 5), d.text()
    with tessera.Repo(home) as r:
        time.sleep(QUIET + 0.5)
        assert [e.path for e in r.get("b").walk()] == ["existing.txt"]
    # a malformed config is reported and the previous one kept
    cfg = home / "daemon.toml"
    good = cfg.read_text()
    cfg.write_text(good + "\n[[watch]]\npath = \n")
    assert wait_until(lambda: "config error" in cli("status").stdout, 5)
    status = cli("status").stdout
    assert "daemon.toml:" in status and "malformed TOML" in status
    (a / "one.txt").write_text("1")
    assert wait_until(lambda: history(home, "a"), QUIET + 3), d.text()
    cfg.write_text(good)
    assert wait_until(lambda: "config error" not in cli("status").stdout, 5)
    # unwatch: later changes are not committed
    cli("unwatch", str(a), check=True)
    time.sleep(1.5)
    (a / "two.txt").write_text("2")
    time.sleep(QUIET + 1.5)
    assert len(history(home, "a")) == 1
    assert d.stop() == 0


def test_watched_dir_may_come_and_go(home: Path, tmp_path: Path, daemons, cli) -> None:
    data = tmp_path / "later"
    write_config(home, [{"path": str(data), "dataset": "later", "quiet_seconds": QUIET}])
    d = daemons(home)
    assert wait_until(lambda: "does not exist" in cli("status").stdout, 5)
    data.mkdir()
    (data / "f.txt").write_text("hello")
    assert wait_until(lambda: history(home, "later"), QUIET + 4), d.text()
    assert wait_until(lambda: "last error    -" in cli("status").stdout, 3)
    assert d.stop() == 0


# -- the push queue ---------------------------------------------------------------------------------------

@pytest.mark.allow_logs("push of .* failed")
def test_queue_survives_outage_and_restart(home: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    add_remote_row(home, "origin", "memory://test")
    write_config(home, [{"path": str(data), "dataset": "q", "remote": "origin", "quiet_seconds": 0.3,
                         "max_wait_seconds": 5}],
                 extra="[daemon]\npush_retry_min_seconds = 0.2\npush_retry_max_seconds = 0.5\n")
    remote = FakeRemote()
    remote.down = True
    td = ThreadDaemon(home, remote)
    for i in range(3):
        (data / f"v{i}.txt").write_text(str(i))
        assert wait_until(lambda: len(history(home, "q")) == i + 1, 30)
    versions = [f"q@{v.hash}" for v in history(home, "q")]
    assert wait_until(lambda: remote.attempts >= 3, 30)

    def queued() -> list[Any]:
        with tessera.Repo(home) as r:
            return ds.pending_pushes(r.catalog)

    # a version is queued right after it is recorded: wait for the last one's queue row
    assert wait_until(lambda: [i.ref for i in queued()] == versions, 30), ([i.ref for i in queued()], versions)
    rows = queued()
    assert any(i.attempts >= 1 for i in rows) and "test outage" in (rows[0].last_error or "")
    td.stop()
    # restart while the remote is still down, then it comes back: everything is pushed, in order
    remote2 = FakeRemote()
    remote2.down = True
    td2 = ThreadDaemon(home, remote2)
    assert wait_until(lambda: remote2.attempts >= 1, 30)
    remote2.down = False
    assert wait_until(lambda: len(remote2.pushed) == 3, 30)
    assert [ref for ref, _ in remote2.pushed] == versions
    with tessera.Repo(home) as r:
        assert ds.pending_pushes(r.catalog) == []
    td2.stop()


def test_crash_between_version_and_queue_is_repaired(home: Path, tmp_path: Path, daemons, cli) -> None:
    """SIGKILL right after a commit, before its push is queued: fsck passes and the next start
    queues the version."""
    data = tmp_path / "data"
    data.mkdir()
    add_remote_row(home, "origin", "memory://test")
    write_config(home, [{"path": str(data), "dataset": "k", "remote": "origin", "quiet_seconds": QUIET}])
    d = daemons(home, env={"TESSERA_CRASH_AT": "daemon-after-commit"})
    (data / "x.bin").write_bytes(os.urandom(100_000))
    assert d.proc.wait(timeout=QUIET + 10) == -signal.SIGKILL
    assert cli("fsck", check=True).returncode == 0
    [v] = history(home, "k")
    with tessera.Repo(home) as r:
        assert ds.pending_pushes(r.catalog) == []
    remote = FakeRemote()
    td = ThreadDaemon(home, remote)
    assert wait_until(lambda: remote.pushed, 5)
    assert remote.pushed == [(f"k@{v.hash}", "origin")]
    td.stop()


@pytest.mark.parametrize("point", ["before-seal", "after-seal", "after-files"])
def test_sigkill_during_commit_leaves_a_sound_store(home: Path, tmp_path: Path, daemons, cli, point: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    write_config(home, [{"path": str(data), "dataset": "c", "quiet_seconds": 0.3}])
    d = daemons(home, env={"TESSERA_CRASH_AT": point})
    (data / "x.bin").write_bytes(os.urandom(300_000))
    assert d.proc.wait(timeout=10) == -signal.SIGKILL
    assert cli("fsck", check=True).returncode == 0
    assert history(home, "c") == []
    d2 = daemons(home)  # restart: the directory is committed after all
    assert wait_until(lambda: history(home, "c"), 5), d2.text()
    assert d2.stop() == 0
    assert cli("fsck", check=True).returncode == 0


def test_layering_only_watcher_imports_watchdog() -> None:
    import ast

    root = Path(__file__).resolve().parent.parent
    offenders = []
    for path in list((root / "lib").rglob("*.py")) + list((root / "daemon").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "watchdog" or n.startswith("watchdog.") for n in names):
                offenders.append(str(path.relative_to(root)))
    assert offenders == ["daemon/watcher.py"] or set(offenders) == {"daemon/watcher.py"}


# -- real pushes (file:// and moto S3) -------------------------------------------------------------------

def pending(home: Path) -> list[Any]:
    with tessera.Repo(home) as r:
        return ds.pending_pushes(r.catalog)


def test_new_version_is_pushed_to_a_file_remote(home: Path, tmp_path: Path, cli, daemons) -> None:
    data, bucket = tmp_path / "data", tmp_path / "remote"
    data.mkdir()
    cli("remote", "add", "origin", f"file://{bucket}", check=True)
    cli("watch", str(data), "d", "--remote", "origin", "--quiet", str(QUIET), check=True)
    d = daemons(home)
    for i in range(10):
        (data / f"f{i}.txt").write_text(f"file {i}\n")
    assert wait_until(lambda: history(home, "d"), QUIET + 2), d.text()
    [v] = history(home, "d")
    assert wait_until(lambda: (bucket / "versions" / v.hash).exists() and not pending(home), 10), d.text()
    assert f"pushed d@{v.hash}" in d.text()
    assert d.stop() == 0


def test_file_remote_outage_and_restart(home: Path, tmp_path: Path, cli, daemons) -> None:
    """The remote directory is replaced by a plain file (root ignores permissions) while versions are
    made, the daemon restarts in between, then the directory comes back: every version is pushed."""
    data, bucket = tmp_path / "data", tmp_path / "remote"
    data.mkdir()
    bucket.mkdir()
    cli("remote", "add", "origin", f"file://{bucket}", check=True)
    write_config(home, [{"path": str(data), "dataset": "o", "remote": "origin", "quiet_seconds": 0.5}],
                 extra="[daemon]\npush_retry_min_seconds = 0.3\npush_retry_max_seconds = 1\n")
    aside = tmp_path / "remote-away"
    bucket.rename(aside)
    bucket.write_text("the remote is down")
    d = daemons(home)
    (data / "a.txt").write_text("a")
    assert wait_until(lambda: len(history(home, "o")) == 1, 5), d.text()
    assert wait_until(lambda: any(i.last_error for i in pending(home)), 5), d.text()
    assert d.stop() == 0
    d2 = daemons(home)
    (data / "b.txt").write_text("b")
    assert wait_until(lambda: len(history(home, "o")) == 2, 5), d2.text()
    assert wait_until(lambda: len(pending(home)) == 2 and all(i.last_error for i in pending(home)), 5)
    status = cli("status", check=True).stdout
    assert "pending       2 uploads" in status and "last error    " in status and "/remote" in status
    bucket.unlink()
    aside.rename(bucket)
    assert wait_until(lambda: not pending(home), 10), d2.text()
    for v in history(home, "o"):
        assert (bucket / "versions" / v.hash).exists()
    assert d2.stop() == 0


@pytest.mark.s3
def test_s3_outage_and_restart(home: Path, tmp_path: Path, cli, daemons, s3_bucket: str, fault_proxy,
                               s3_client) -> None:
    """moto behind the fault proxy: the server goes away while versions are created, the daemon is
    restarted in between; once the server is back, every version is in the bucket."""
    data = tmp_path / "data"
    data.mkdir()
    env = {"AWS_ENDPOINT_URL": fault_proxy.url, "TESSERA_REMOTE_RETRIES": "1", "TESSERA_REMOTE_TIMEOUT": "2"}
    cli("remote", "add", "origin", s3_bucket, check=True)
    write_config(home, [{"path": str(data), "dataset": "s", "remote": "origin", "quiet_seconds": 0.5}],
                 extra="[daemon]\npush_retry_min_seconds = 0.3\npush_retry_max_seconds = 1\n")
    d = daemons(home, env=env)
    (data / "first.bin").write_bytes(os.urandom(50_000))
    assert wait_until(lambda: len(history(home, "s")) == 1, 5), d.text()
    first = history(home, "s")[0]
    assert wait_until(lambda: f"pushed s@{first.hash}" in d.text(), 15), d.text()
    fault_proxy.down()
    (data / "second.bin").write_bytes(os.urandom(50_000))
    assert wait_until(lambda: len(history(home, "s")) == 2, 5), d.text()
    assert wait_until(lambda: any(i.last_error for i in pending(home)), 15), d.text()
    assert d.stop() == 0
    d2 = daemons(home, env=env)
    (data / "third.bin").write_bytes(os.urandom(50_000))
    assert wait_until(lambda: len(history(home, "s")) == 3, 5), d2.text()
    time.sleep(1)
    assert len(pending(home)) == 2
    fault_proxy.up()
    assert wait_until(lambda: not pending(home), 20), d2.text()
    bucket, _, prefix = s3_bucket.removeprefix("s3://").partition("/")
    for v in history(home, "s"):
        s3_client.head_object(Bucket=bucket, Key=f"{prefix}/versions/{v.hash}")
    assert d2.stop() == 0
