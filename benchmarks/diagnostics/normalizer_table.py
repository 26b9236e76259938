"""Issue 15's table: ICQ-MA --normalizer behavior on SMAX 3s_vs_5z against the headline grid's batch and BC runs.

usage: python benchmarks/diagnostics/normalizer_table.py RUN [RUN ...]   (runs/<RUN>/summary.json, their event files)
Writes benchmarks/normalizer.md (per-run last-3 mean, best, the actor weights' effective sample size) and
benchmarks/normalizer_runs.json (every evaluation of every run), and one curve PNG per dataset.
"""

import glob
import json
import os
import sys

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# benchmarks/headline.md (commit 16aa19e; the batch and BC code paths are bit-identical at this commit)
HEADLINE = {"3s_vs_5z-medium": {"batch, alpha 0.1": (0.0139, 0.016), "exact BC": (0.271, 0.2)},
            "3s_vs_5z-mixed": {"batch, alpha 0.1": (0.0, 0.0), "exact BC": (0.00347, 0.006)}}  # fmt: skip


def scalar(run_dir, tag):
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return np.array([e.value for e in acc.Scalars(tag)]) if tag in acc.Tags()["scalars"] else np.array([])


def main(runs):
    rows, store = [], {}
    for run in runs:
        run_dir = os.path.join(ROOT, "runs", run)
        summary = json.load(open(os.path.join(run_dir, "summary.json")))
        a = summary["args"]
        quality = os.path.basename(summary["dataset"])[len(f"smax_{a['map']}_") :].split("_")[0]
        data = f"{a['map']}-{quality}"
        ess = scalar(run_dir, "losses/actor_weight_ess")
        wins = [e["win_rate"] for e in summary["evaluations"]]
        step = summary["evaluations"][-1]["step"]  # the seed-1 runs started before summaries had last3_mean / step
        rows.append((data, a["normalizer"], a["alpha"], a["seed"], float(np.mean(wins[-3:])), max(wins), ess.mean(),
                     summary["iterations_per_second"], step, summary.get("interrupted", False)))  # fmt: skip
        store[run] = {"args": a, "evaluations": summary["evaluations"], "actor_weight_ess_mean": float(ess.mean())}
    lines = ["# ICQ-MA with the per-state normaliser (--normalizer behavior) on SMAX 3s_vs_5z", "",
             "Per run: mean win rate of the last 3 evaluations (64 greedy episodes each, every 300 iterations), the",
             "best evaluation, and the mean over the run's log points of the actor weights' effective sample size",
             "(sum w)^2 / (n sum w^2) over the batch's valid (t, i) pairs.", "",
             "Commits: the seed-1 runs ran at abd542d, seeds 2 and 3 at 94bb08b's icq_ma_smac.py (its training is",
             "bit-identical to abd542d's for --normalizer behavior, checked on a short run). Machine: the 2-core build",
             "machine, two or three runs at a time (it/s are those of a shared machine).", "",
             "| data | normalizer | alpha | seed | iterations | last-3 mean | best | weight ESS | it/s |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for d, n, al, s, m3, best, ess, its, step, cut in sorted(rows):
        lines.append(f"| {d} | {n} | {al:g} | {s} | {step}{' (interrupted)' if cut else ''} | {m3:.3f} | {best:.3f} "
                     f"| {ess:.3f} | {its:.2f} |")  # fmt: skip
    lines += ["", "Over seeds (mean ± std, ddof 1), with the headline grid's runs (32 episodes per evaluation):", "",
              "| data | method | last-3 mean ± std | seeds |", "|---|---|---|---|"]  # fmt: skip
    for d in sorted({r[0] for r in rows}):
        vals = [r[4] for r in rows if r[0] == d and r[8] == 3000]
        sd = np.std(vals, ddof=1) if len(vals) > 1 else float("nan")
        lines.append(f"| {d} | behavior, alpha 0.1 | {np.mean(vals):.3f} ± {sd:.3f} | {len(vals)} |")
        for method, (mean, std) in HEADLINE.get(d, {}).items():
            lines.append(f"| {d} | {method} (headline grid) | {mean:.3f} ± {std:.3f} | 3 |")
    with open(os.path.join(ROOT, "benchmarks/normalizer.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(ROOT, "benchmarks/normalizer_runs.json"), "w") as f:
        json.dump(store, f, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for d in sorted({r[0] for r in rows}):
        fig, ax = plt.subplots(figsize=(6, 4))
        for run, v in store.items():
            if f"{v['args']['map']}-" in d and f"_{d.split('-')[1]}_" in (
                v["args"].get("dataset_path") or v["args"]["dataset"]
            ):
                ev = v["evaluations"]
                ax.plot([e["step"] for e in ev], [e["win_rate"] for e in ev], marker="o", ms=3,
                        label=f"behavior, seed {v['args']['seed']}")  # fmt: skip
        for (method, (mean, _)), color in zip(HEADLINE.get(d, {}).items(), ("tab:gray", "k")):
            ax.axhline(mean, ls="--", color=color, label=f"{method}: last-3 mean at 3,000 (3 seeds)")
        ax.set(xlabel="iteration", ylabel="win rate (64 greedy episodes)", title=f"SMAX {d}: --normalizer behavior")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(ROOT, f"benchmarks/normalizer_{d}.png"), dpi=100)
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:] or sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "runs/h15_*"))))
