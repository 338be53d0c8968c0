"""Shared fixtures. Kept in tests/ (never the repo root) so the repo's fuse/ folder cannot shadow
fusepy's `fuse` module; there is deliberately no tests/__init__.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from trees import make_tricky_tree  # noqa: E402

try:
    from s3_fixtures import *  # noqa: F401,F403,E402
except ImportError:  # the remote layer may not exist yet in a partial checkout
    pass


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh TESSERA_HOME for the test (also exported for CLI subprocesses)."""
    h = tmp_path / "home"
    monkeypatch.setenv("TESSERA_HOME", str(h))
    return h


@pytest.fixture
def repo(home: Path):
    import tessera

    r = tessera.Repo(home)
    yield r
    r.close()


@pytest.fixture(scope="session")
def tricky_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The store issue's tricky tree, with a 300 MiB file; built once per session, never modified."""
    return make_tricky_tree(tmp_path_factory.mktemp("tricky") / "src")


def run_cli(*args: str, env: dict[str, str] | None = None, input: bytes | None = None,
            check: bool = False, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the real `tessera` console script."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    proc = subprocess.run(["tessera", *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"tessera {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


@pytest.fixture
def cli():
    return run_cli


# -- check-logs (s3ql's habit): a test fails on a tessera WARNING or ERROR it did not declare ---------------

@pytest.fixture(autouse=True)
def check_logs(request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture):
    """Fail the test when code in this process logged a tessera WARNING or worse that the test did not
    declare with ``@pytest.mark.allow_logs("regex", ...)``: an unexpected warning is a bug or a test gap."""
    import logging
    import re

    caplog.set_level(logging.WARNING, logger="tessera")
    yield
    allowed = [re.compile(p) for m in request.node.iter_markers("allow_logs") for p in m.args]
    unexpected = [f"{r.levelname} {r.name}: {r.getMessage()}" for phase in ("setup", "call")
                  for r in caplog.get_records(phase)  # type: ignore[arg-type]
                  if r.levelno >= logging.WARNING and r.name.startswith("tessera")
                  and not any(p.search(r.getMessage()) for p in allowed)]
    if unexpected:
        pytest.fail("unexpected log records (declare them with @pytest.mark.allow_logs):\n" + "\n".join(unexpected),
                    pytrace=False)
