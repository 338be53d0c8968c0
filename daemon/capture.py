"""`tessera run`: run a command, snapshot its output directories while it runs and at exit, and record
where every version came from (Studio.ml's ``--capture`` / ``--capture-once``, with versions instead of
tarballs).

Each captured version's metadata holds ``meta["capture"]``:

    command    the argv list          exit_code  int (None while the command still runs)
    inputs     ["name@<64 hex>", ...]  mounts     {"name@<64 hex>": mountpoint}
    git        commit of the cwd       git_dirty  uncommitted changes to tracked files
    start/end  wall-clock times        final      False for periodic snapshots
    run_id     shared by a run's versions, cwd, directory

Periodic versions are only created when the content changed. If the final snapshot equals the last
periodic one, that history row is amended into the final one (metadata is not part of the hash); if it
equals a version made elsewhere, a history row with this run's lineage is added for the same hash.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tessera.daemon.config import check_not_home, ignore_matcher
from tessera.daemon.upkeep import apply_keep, maybe_reclaim
from tessera.openfiles import open_for_writing, process_tree
from tessera.errors import BadRef, MountError, SourceError, TesseraError, UsageError
from tessera.ids import check_dataset_name, parse_ref
from tessera.retention import KeepPolicy

logger = logging.getLogger(__name__)

DEFAULT_EVERY = 60.0
FINAL_TRIES = 3
FORWARDED = (signal.SIGTERM, signal.SIGHUP)


@dataclass(frozen=True)
class CaptureSpec:
    directory: str
    dataset: str
    once: bool = False


@dataclass(frozen=True)
class InputSpec:
    ref: str
    mountpoint: str | None = None


def parse_capture(text: str, *, once: bool = False) -> CaptureSpec:
    """``DIR:NAME`` (split at the last ``:``)."""
    directory, sep, name = text.rpartition(":")
    flag = "--capture-once" if once else "--capture"
    if not sep or not directory or not name:
        raise UsageError(f"bad {flag} {text!r}: expected DIR:NAME, like ./ckpt:run-42")
    try:
        check_dataset_name(name)
    except BadRef as exc:
        raise UsageError(f"bad {flag} {text!r}: {exc}") from None
    return CaptureSpec(os.path.realpath(os.path.expanduser(directory)), name, once)


def parse_input(text: str) -> InputSpec:
    """``REF:MOUNTPOINT`` mounts REF there; a bare ``REF`` (``coco``, ``coco@3f2a9c``, ``coco:v1``) is
    only recorded as an input. The split is at the last ``:``, so tags work: ``coco:v1:/mnt/coco``."""
    try:
        parse_ref(text)
        return InputSpec(text)
    except BadRef:
        pass
    ref, sep, mountpoint = text.rpartition(":")
    if not sep or not ref or not mountpoint:
        raise UsageError(f"bad --input {text!r}: expected REF:MOUNTPOINT or REF")
    parse_ref(ref)
    return InputSpec(ref, os.path.abspath(os.path.expanduser(mountpoint)))


def git_state(cwd: str) -> tuple[str | None, bool | None]:
    """(HEAD commit, dirty) of the git work tree at ``cwd``, or (None, None)."""
    try:
        head = subprocess.run(["git", "-C", cwd, "rev-parse", "--verify", "-q", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None, None
        dirty = subprocess.run(["git", "-C", cwd, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30)
        return head.stdout.strip() or None, bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None, None


def exit_status(returncode: int) -> int:
    """A shell-style exit code: a command killed by signal N exits 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


class Run:
    """One `tessera run`: validate, mount inputs, run, capture, return the command's exit code."""

    def __init__(self, repo: Any, command: list[str], captures: list[CaptureSpec], inputs: list[InputSpec],
                 every: float = DEFAULT_EVERY, report: Callable[[str], None] | None = None,
                 keep: KeepPolicy | None = None) -> None:
        if not command:
            raise UsageError("no command given: tessera run [OPTIONS] -- COMMAND [ARGS...]")
        if every <= 0:
            raise UsageError(f"--every must be a positive number of seconds, got {every:g}")
        self.repo = repo
        self.command = list(command)
        self.captures = captures
        self.inputs = inputs
        self.every = every
        self.report = report or (lambda msg: logger.info("%s", msg))
        self.run_id = uuid.uuid4().hex
        self.cwd = os.getcwd()
        self.versions: dict[str, str] = {}  # dataset -> ref of its newest captured version
        self._last_row: dict[str, int] = {}  # dataset -> history seq of this run's newest version
        self._ignored = ignore_matcher(())
        self._proc: subprocess.Popen[bytes] | None = None
        self.keep = keep  # `--keep-last N`: applied to each captured dataset after each new version

    # -- checks ------------------------------------------------------------------------------------

    def _check(self) -> None:
        seen_dirs: dict[str, str] = {}
        seen_names: set[str] = set()
        for c in self.captures:
            if c.directory in seen_dirs:
                raise UsageError(f"{c.directory} is captured twice ({seen_dirs[c.directory]} and {c.dataset})")
            if c.dataset in seen_names:
                raise UsageError(f"dataset {c.dataset!r} is the target of two captures")
            seen_dirs[c.directory] = c.dataset
            seen_names.add(c.dataset)
            check_not_home(c.directory, self.repo.home)
            p = Path(c.directory)
            if p.exists() and not p.is_dir():
                raise UsageError(f"{c.directory}: not a directory")
        mounts = [i.mountpoint for i in self.inputs if i.mountpoint]
        if len(set(mounts)) != len(mounts):
            raise UsageError("two inputs use the same mountpoint")

    def _resolve_inputs(self) -> list[tuple[Any, InputSpec]]:
        return [(self.repo.get(i.ref), i) for i in self.inputs]

    # -- lineage -----------------------------------------------------------------------------------

    def _lineage(self, resolved: list[tuple[Any, InputSpec]], git: tuple[str | None, bool | None],
                 start: float) -> dict[str, Any]:
        return {
            "command": self.command,
            "exit_code": None,
            "git": git[0],
            "git_dirty": git[1],
            "inputs": [v.ref for v, _ in resolved],
            "mounts": {v.ref: i.mountpoint for v, i in resolved if i.mountpoint},
            "start": start,
            "end": None,
            "run_id": self.run_id,
            "cwd": self.cwd,
            "host": socket.gethostname(),
            "final": False,
        }

    # -- running -----------------------------------------------------------------------------------

    def run(self) -> int:
        self._check()
        resolved = self._resolve_inputs()
        for c in self.captures:
            os.makedirs(c.directory, exist_ok=True)
        lineage = self._lineage(resolved, git_state(self.cwd), time.time())
        with ExitStack() as stack:
            for version, spec in resolved:
                if spec.mountpoint:
                    os.makedirs(spec.mountpoint, exist_ok=True)
                    stack.enter_context(_mount(version, spec.mountpoint))
                    self.report(f"mounted {version.ref} at {spec.mountpoint}")
            returncode = self._execute(lineage)
        lineage.update(exit_code=exit_status(returncode), end=time.time(), final=True)
        failed: TesseraError | None = None
        for c in self.captures:
            try:
                self._final_snapshot(c, lineage)
            except TesseraError as exc:
                failed = exc
                self.report(f"error: could not capture {c.directory}: {exc}")
        code = exit_status(returncode)
        if failed is not None and code == 0:
            raise failed
        return code

    def _execute(self, lineage: dict[str, Any]) -> int:
        env = dict(os.environ, TESSERA_RUN_ID=self.run_id)
        try:
            proc = subprocess.Popen(self.command, env=env)
        except FileNotFoundError:
            raise UsageError(f"command not found: {self.command[0]}") from None
        except PermissionError:
            raise UsageError(f"command not executable: {self.command[0]}") from None
        self._proc = proc
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, *FORWARDED)}
        # Like a shell: Ctrl-C reaches the command through the terminal's process group, so we only
        # ignore it; SIGTERM/SIGHUP sent to us are passed on. Captures happen after the command exits.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for s in FORWARDED:
            signal.signal(s, lambda signum, frame: proc.send_signal(signum))
        try:
            periodic = [c for c in self.captures if not c.once]
            next_due = time.monotonic() + self.every
            while True:
                timeout = max(0.0, next_due - time.monotonic()) if periodic else None
                try:
                    return proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    pass
                next_due = self._periodic(periodic, lineage, next_due)
        finally:
            if proc.poll() is None:  # we are leaving because of an exception: do not orphan it
                proc.terminate()
                proc.wait()
            for s, h in previous.items():
                signal.signal(s, h)

    def _periodic(self, captures: list[CaptureSpec], lineage: dict[str, Any], due: float) -> float:
        """Snapshot while the command runs; postpone (up to one period) while it holds files open for
        writing in a capture directory. Returns the next due time."""
        assert self._proc is not None
        busy = open_for_writing([c.directory for c in captures], process_tree(self._proc.pid))
        now = time.monotonic()
        if busy and now - due < self.every / 2:
            return now + min(0.5, self.every / 4)
        for c in captures:
            try:
                self._snapshot(c, lineage, final=False)
            except TesseraError as exc:
                self.report(f"warning: periodic capture of {c.directory} skipped: {exc}")
        return max(due + self.every, time.monotonic() + self.every / 4)

    # -- snapshots ---------------------------------------------------------------------------------

    def _message(self, lineage: dict[str, Any]) -> str:
        cmd = " ".join(self.command)
        if len(cmd) > 120:
            cmd = cmd[:117] + "..."
        if lineage["final"]:
            return f"run: {cmd} (exit {lineage['exit_code']})"
        return f"run: {cmd} (running for {time.time() - lineage['start']:.0f} s)"

    def _snapshot(self, c: CaptureSpec, lineage: dict[str, Any], *, final: bool) -> bool:
        meta = {"capture": dict(lineage, directory=c.directory)}
        res = self.repo.commit_dir(c.dataset, c.directory, message=self._message(lineage), meta=meta,
                                   exclude=self._ignored.excludes)
        if res.created:
            newest = self.repo.catalog.history(c.dataset, limit=1)
            if newest:
                self._last_row[c.dataset] = newest[0].seq
            self.versions[c.dataset] = res.version.ref
            self.report(f"captured {res.version.ref}" + (" (final)" if final else ""))
            if self.keep is not None and apply_keep(self.repo, c.dataset, self.keep):
                maybe_reclaim(self.repo)
        return bool(res.created)

    def _final_snapshot(self, c: CaptureSpec, lineage: dict[str, Any]) -> None:
        for attempt in range(FINAL_TRIES):
            try:
                if self._snapshot(c, lineage, final=True):
                    return
                break
            except SourceError:
                if attempt == FINAL_TRIES - 1:
                    raise
                time.sleep(0.5 * (attempt + 1))
        # unchanged since the last snapshot: give the head this run's final lineage
        head = self.repo.catalog.history(c.dataset, limit=1)[0]
        hash_ = head.hash
        final_meta = dict(head.meta)
        final_meta["capture"] = dict(lineage, directory=c.directory)
        if self._last_row.get(c.dataset) == head.seq:
            self.repo.catalog.amend_history(head.seq, final_meta, self._message(lineage))
        else:
            from tessera.config import default_author
            from tessera.model import HistoryEntry

            self.repo.catalog.append_history(HistoryEntry(
                c.dataset, hash_, hash_, time.time(), default_author(), self._message(lineage),
                {"capture": final_meta["capture"]}))
        self.versions[c.dataset] = f"{c.dataset}@{hash_}"
        self.report(f"captured {c.dataset}@{hash_} (final, content unchanged)")


def _mount(version: Any, mountpoint: str) -> Any:
    try:
        return version.mount(mountpoint)
    except ModuleNotFoundError as exc:
        raise MountError(f"cannot mount {version.ref}: this tessera has no FUSE mount support ({exc.name})"
                         " — pass --input REF without a mountpoint to only record it") from None
