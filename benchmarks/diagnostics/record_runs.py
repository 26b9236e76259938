"""Record runs that go on over several sessions: every evaluation so far (a "step" each), as JSON, and their curves.

    python benchmarks/diagnostics/record_runs.py --out benchmarks/main40k.json --png benchmarks/main40k.png \
        --metric win_rate RUN_DIR [RUN_DIR ...]

Reads each run's summary.json, or its checkpoint.pt where no summary was written (a run killed before its end), so a
segment's numbers can be committed as it finishes; re-running after a later segment rewrites both files.
"""

import argparse
import json
import os
import subprocess

import torch


def read_run(run_dir):
    summary_path, checkpoint_path = f"{run_dir}/summary.json", f"{run_dir}/checkpoint.pt"
    checkpoint = torch.load(checkpoint_path, weights_only=False) if os.path.exists(checkpoint_path) else None
    summary = json.load(open(summary_path)) if os.path.exists(summary_path) else None
    if checkpoint is not None and (summary is None or checkpoint["step"] > summary["step"]):  # the newer of the two
        return {"args": checkpoint["args"], "step": checkpoint["step"], "evaluations": checkpoint["evaluations"],
                "segments": checkpoint.get("segments"), "source": "checkpoint.pt"}  # fmt: skip
    keep = ("args", "step", "evaluations", "segments", "wall_seconds", "steps_per_second", "finished", "interrupted")
    return {**{k: summary.get(k) for k in keep}, "source": "summary.json"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--png")
    parser.add_argument("--metric", default="win_rate")
    cli = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    runs = {os.path.basename(os.path.normpath(d)): read_run(d) for d in cli.runs}
    with open(cli.out, "w") as f:
        json.dump({"recorded_at_commit": commit, "metric": cli.metric, "runs": runs}, f, indent=1)
    for name, run in runs.items():
        values = [e[cli.metric] for e in run["evaluations"]]
        last3 = sum(values[-3:]) / len(values[-3:]) if values else float("nan")
        print(f"{name}: step {run['step']}, {len(values)} evaluations, last-3 {cli.metric} {last3:.3f}")
    if cli.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for name, run in runs.items():
            ax.plot([e["step"] for e in run["evaluations"]], [e[cli.metric] for e in run["evaluations"]], label=name)
        ax.set_xlabel("step")
        ax.set_ylabel(cli.metric)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(cli.png, dpi=100)


if __name__ == "__main__":
    main()
