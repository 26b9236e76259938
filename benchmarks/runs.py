"""Reading a grid's runs: the run list benchmark.sh wrote, each run's summary.json, and the numbers the tables report.

A run list has one command line per run, each with `--run-name NAME`; a run's result is runs/NAME/summary.json. Run
names follow <grid>__<script>__<dataset>__<method>__<seed>.
"""

import json
import os
import re
import subprocess

import numpy as np


def run_names(list_path):
    with open(list_path) as f:
        return [m.group(1) for m in (re.search(r"--run-name (\S+)", line) for line in f) if m]


def load_summary(name):
    path = os.path.join("runs", name, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def metric_name(summary):
    """MA runs report win rates; single-agent runs the normalised score, or the return where the data has no score."""
    evals = summary["evaluations"]
    if evals and "win_rate" in evals[0]:
        return "win_rate"
    return "score" if evals and all(e.get("score") is not None for e in evals) else "return"


def last3(summary, metric):
    """The mean of a run's last three evaluations: less noisy than the final one, still the end of training."""
    values = [e[metric] for e in summary["evaluations"][-3:]]
    return float(np.mean(values)) if values else None


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def fmt(mean, std=None, digits=3):
    if mean is None:
        return "-"
    return f"{mean:.{digits}g}" if std is None else f"{mean:.{digits}g} ± {std:.2g}"


def collect(list_path):
    """{(script, dataset): {method: [(seed, summary)]}} for the runs in LIST, and the names that have no summary."""
    groups, missing = {}, []
    for name in run_names(list_path):
        parts = name.split("__")
        summary = load_summary(name)
        if summary is None or len(parts) != 5:
            missing.append(name)
            continue
        _, script, dataset, method, seed = parts
        groups.setdefault((script, dataset), {}).setdefault(method, []).append((seed, summary))
    return groups, missing


def missing_note(missing):
    if not missing:
        return []
    return [f"\nMissing (no summary.json yet, or failed: see runs/logs/<name>.log): {', '.join(missing)}"]


def commit_line(list_path):
    """The commit the runs were made at: benchmark.sh writes it beside the list (LIST.commit) when it launches them."""
    path = os.path.splitext(list_path)[0] + ".commit"
    if os.path.exists(path):
        with open(path) as f:
            commit = f.read().strip()
        return f"Commit: {commit}." if commit.startswith("unknown") else f"Commit: {commit} (the launch's checkout)."
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "Commit: unknown (not a git checkout)."
    return f"Commit: {head.stdout.strip()} (HEAD when aggregated; no {path} from the launch)."
