"""Issue 15's table: ICQ-MA's two normalisers (--normalizer batch | behavior) against exact BC on SMAX.

usage: python benchmarks/diagnostics/normalizer_table.py RUN [RUN ...]   (runs/<RUN>/summary.json, their event files)
Default: every runs/h15_* run with a summary. Writes benchmarks/normalizer.md (per run: last-3 mean, best evaluation,
the actor weights' effective sample size; per dataset and method: mean ± std over seeds),
benchmarks/normalizer_runs.json (every evaluation of every run) and one curve PNG per dataset (mean ± std over seeds
by iteration).
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
EARLIER = {"2s3z-split": (600,)}  # first run to 600 iterations, then continued with --resume --total-steps 1500
METHODS = ("exact BC", "batch, alpha 0.1", "behavior, alpha 0.1", "behavior, alpha 0.3", "behavior, alpha 1")
HEADER = """# ICQ-MA's normalisers (--normalizer batch | behavior) against exact BC on SMAX

Per run: mean win rate of the last 3 evaluations (64 greedy episodes each), the best evaluation, and the mean over the
run's log points of the actor weights' effective sample size (sum w)^2 / (n sum w^2) over the batch's valid (t, i)
pairs (1 for exact BC, whose weights are all 1). Exact BC is `--alpha inf --critic-updates batched` (the critic does
not reach the actor at alpha = inf).

Data: 3s_vs_5z medium (focus-kite with 10 % random actions) and mixed (focus-kite plays 20 % of the episodes, most of
the rest by controllers that lose); 2s3z mixed (the same mixture; focus-kite wins 0.75 there, the data 0.15) and split
(focus-kite 20 %, a competent split-fire controller 80 % that wins 0.27; the data wins 0.365).

Commits: the 3s_vs_5z seed-1 runs ran at abd542d, seeds 2 and 3 at 94bb08b's icq_ma_smac.py (training bit-identical to
abd542d's for --normalizer behavior, checked on a short run); every 2s3z run at 57614bc (its training code is that of
0180f46); the 3s_vs_5z `behavior` runs at alpha 0.3 and 1 at 7a1453c (training code unchanged since 94bb08b).
Evaluations: 3s_vs_5z and 2s3z mixed every 300 iterations to 3,000; 2s3z split every 100, run to 600 and then
continued with --resume --total-steps 1500 (it/s: the continuation's). Machine: the 2-core build machine, two
runs at a time (it/s are those of a shared machine).
"""


def scalar(run_dir, tag):
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return np.array([e.value for e in acc.Scalars(tag)]) if tag in acc.Tags()["scalars"] else np.array([])


def method(a):
    return "exact BC" if a["alpha"] == float("inf") else f"{a['normalizer']}, alpha {a['alpha']:g}"


def main(runs):
    rows, store = [], {}
    for run in runs:
        run_dir = os.path.join(ROOT, "runs", run)
        summary = json.load(open(os.path.join(run_dir, "summary.json")))
        a = summary["args"]
        quality = os.path.basename(summary["dataset"])[len(f"smax_{a['map']}_") :].split("_")[0]
        ess = scalar(run_dir, "losses/actor_weight_ess")
        wins = [e["win_rate"] for e in summary["evaluations"]]
        step = summary["evaluations"][-1]["step"]  # the seed-1 runs started before summaries had last3_mean / step
        rate = summary.get("steps_per_second", summary.get("iterations_per_second"))  # older runs: iterations_
        done = step == a["total_steps"] and not summary.get("interrupted", False)
        rows.append((f"{a['map']}-{quality}", METHODS.index(method(a)), a["seed"], float(np.mean(wins[-3:])), max(wins),
                     ess.mean() if len(ess) else 1.0, rate, step, done))  # fmt: skip
        store[run] = {"args": a, "data": rows[-1][0], "finished": done, "evaluations": summary["evaluations"],
                      "actor_weight_ess_mean": rows[-1][5]}  # fmt: skip
    lines = HEADER.splitlines() + ["", "| data | method | seed | iterations | last-3 mean | best | weight ESS | it/s |",
                                   "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for d, m, s, m3, best, ess, its, step, done in sorted(rows):
        lines.append(f"| {d} | {METHODS[m]} | {s} | {step}{'' if done else ' (unfinished)'} | {m3:.3f} | {best:.3f} "
                     f"| {ess:.3f} | {its:.2f} |")  # fmt: skip
    lines += ["", "Over seeds (mean ± std, ddof 1) of the finished runs, at their budget and at the earlier budgets",
              "they were first run to (continued with --resume); for 3s_vs_5z with the headline grid's runs (32",
              "episodes per evaluation, same budget):", "",
              "| data | method | iterations | last-3 mean ± std | seeds |", "|---|---|---|---|---|"]  # fmt: skip
    curves = {}
    for d in sorted({r[0] for r in rows}):
        for name in METHODS:
            runs = [v for v in store.values() if v["finished"] and (v["data"], method(v["args"])) == (d, name)]
            evals = [v["evaluations"] for v in runs]
            if evals:
                curves[d, name] = [e["step"] for e in evals[0]], np.array([[e["win_rate"] for e in ev] for ev in evals])
                for budget in sorted({*EARLIER.get(d, ()), curves[d, name][0][-1]}):
                    vals = [np.mean([e["win_rate"] for e in ev if e["step"] <= budget][-3:]) for ev in evals]
                    sd = np.std(vals, ddof=1) if len(vals) > 1 else float("nan")
                    lines.append(f"| {d} | {name} | {budget} | {np.mean(vals):.3f} ± {sd:.3f} | {len(vals)} |")
            elif name in HEADLINE.get(d, {}):
                mean, std = HEADLINE[d][name]
                lines.append(f"| {d} | {name} (headline grid) | 3000 | {mean:.3f} ± {std:.3f} | 3 |")
    with open(os.path.join(ROOT, "benchmarks/normalizer.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(ROOT, "benchmarks/normalizer_runs.json"), "w") as f:
        json.dump(store, f, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for d in sorted({r[0] for r in rows}):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, color in zip(METHODS, ("k", "tab:gray", "tab:blue", "tab:orange", "tab:green")):
            if (d, name) in curves:
                steps, wins = curves[d, name]
                mean, sd = wins.mean(0), wins.std(0)
                ax.plot(steps, mean, marker="o", ms=3, color=color, label=f"{name} ({len(wins)} seeds)")
                ax.fill_between(steps, mean - sd, mean + sd, color=color, alpha=0.15)
            elif name in HEADLINE.get(d, {}):
                ax.axhline(HEADLINE[d][name][0], ls="--", color=color, label=f"{name}: last-3 mean at 3,000 (3 seeds)")
        ax.set(xlabel="iteration", ylabel="win rate (64 greedy episodes)", title=f"SMAX {d}: mean ± std over seeds")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(ROOT, f"benchmarks/normalizer_{d}.png"), dpi=100)
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:] or sorted(p.split(os.sep)[-2] for p in glob.glob(os.path.join(ROOT, "runs/h15_*/summary.json"))))
