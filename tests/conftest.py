"""Shared test helpers: run a script through its command line, as a user would."""

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

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


def write_lunar_data(path, discrete, episodes=3, length=40):
    """Random LunarLander(Continuous)-v3 shaped data in the D4RL layout; the last step of each episode is a timeout."""
    rng = np.random.default_rng(0)
    n = episodes * length
    timeouts = np.zeros(n, bool)
    timeouts[length - 1 :: length] = True
    with h5py.File(path, "w") as f:
        f["observations"] = rng.normal(size=(n, 8)).astype(np.float32)
        f["actions"] = rng.integers(4, size=n) if discrete else rng.uniform(-1, 1, (n, 2)).astype(np.float32)
        f["rewards"] = rng.normal(size=n).astype(np.float32)
        f["terminals"], f["timeouts"] = np.zeros(n, bool), timeouts
