"""Shared test helpers: run a script through its command line, as a user would."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests import the ICQ loss functions from the scripts


def run_script(script, *args, cwd, env=None, check=True, timeout=900):
    """Run `python <script> <args>` in `cwd`; with check=True a failure shows the script's output."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{script} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
        )
    return proc


def assert_user_error(proc, *fragments):
    """A user error ends with a non-zero exit and one clear message (no traceback) containing `fragments`."""
    assert proc.returncode != 0, f"expected a failure, got exit 0\n{proc.stdout[-2000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in proc.stderr, f"{fragment!r} not in stderr:\n{proc.stderr[-3000:]}"
