"""`tessera ARGS` without a process per call: the console script's entry point (`tessera.cli.main`) run in
this process under click's stream isolation. It prints and exits exactly as the script does (stdin is not
a terminal); an exception other than the exit is a bug and fails the calling test with its traceback.

For commands whose process boundary does not matter to the test; SIGKILL failpoints, concurrency between
processes, daemons and mounts keep running the real script (`subprocess`)."""
from __future__ import annotations

import subprocess
from pathlib import Path


def tessera_main(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    from click.testing import CliRunner

    from tessera.cli import main

    code = 0
    with CliRunner().isolation(env={"TESSERA_HOME": str(home)}) as (out, err, _):
        try:
            main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
    return subprocess.CompletedProcess(["tessera", *args], code, stdout, stderr)
