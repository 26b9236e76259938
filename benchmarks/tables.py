"""The result tables of the learn, headline, paper and sweep grids (markdown), with one curve plot per dataset."""

import os

from benchmarks.curves import plot_curves
from benchmarks.runs import collect, commit_line, fmt, last3, mean_std, metric_name, missing_note

TITLES = {
    "learn": "ICQ against exact behaviour cloning (`--alpha inf`)",
    "paper": "ICQ on the seed paper's datasets",
    "headline": "ICQ-MA against exact behaviour cloning on the main command's map, SMAX 3s_vs_5z",
}


def learn_table(list_path, out_dir, kind="learn"):
    """Per dataset and method: mean ± std over seeds of each run's last-3 mean; ICQ − BC against the seed spread."""
    groups, missing = collect(list_path)
    command = ("learn --headline" if kind == "headline" else kind) + (" --tiny" if "_tiny" in list_path else "")
    lines = [
        f"# {kind}: {TITLES[kind]}",
        "",
        "Each run's value is the mean of its last 3 evaluations (score where the data has reference scores, else the "
        "return; win rate for ICQ-MA); the table shows mean ± std (ddof 1) over seeds. "
        f"Made by `bash benchmark.sh {command}` from `{list_path}`.",
        "",
        commit_line(list_path),
        "",
        "max |Q| is the largest |Q(s, a)| any seed's critic reached, against the reward-implied bound "
        "max|r| / (1 - gamma) (single-agent scripts; a critic beyond it diverges).",
        "",
        "| script | dataset | method | metric | mean ± std | seeds | dataset return | max abs Q / bound |",
        "|---|---|---|---|---|---|---|---|",
    ]
    diffs = []
    for (script, dataset), methods in sorted(groups.items()):
        first = next(iter(methods.values()))[0][1]
        metric = metric_name(first)
        stats = {}
        for method, runs in sorted(methods.items()):
            stats[method] = mean_std([last3(r, metric) for _, r in runs])
            q_max = max((r["q_abs_max"] for _, r in runs if r.get("q_abs_max") is not None), default=None)
            q = "-" if q_max is None else f"{q_max:.3g} / {first['q_bound']:.3g}"
            lines.append(
                f"| {script} | {dataset} | {method} | {metric} | {fmt(*stats[method])} | {len(runs)} | "
                f"{fmt(first.get('dataset_return'))} | {q} |"
            )
        if "icq" in stats and "bc" in stats and None not in (stats["icq"][0], stats["bc"][0]):
            diffs.append(verdict_row(script, dataset, stats, min(len(methods["icq"]), len(methods["bc"]))))
        plot_curves(os.path.join(out_dir, f"{kind}_{dataset}.png"), f"{script}: {dataset}", methods, metric)
    if diffs:
        lines += [
            "",
            "ICQ − BC against the seed spread sqrt(std_ICQ² + std_BC²):",
            "",
            "| script | dataset | ICQ − BC | spread | verdict |",
            "|---|---|---|---|---|",
            *diffs,
        ]
    plots = ", ".join(f"`{kind}_{d}.png`" for _, d in sorted(groups))
    lines += ["", f"Evaluation curves (mean ± std over seeds): {plots}"]
    return lines + missing_note(missing)


def verdict_row(script, dataset, stats, seeds):
    diff = stats["icq"][0] - stats["bc"][0]
    spread = (stats["icq"][1] ** 2 + stats["bc"][1] ** 2) ** 0.5
    if seeds < 2:
        verdict = "one seed: no spread"
    else:
        verdict = "ICQ better" if diff > spread else "BC better" if -diff > spread else "within spread"
    return f"| {script} | {dataset} | {diff:+.3g} | {spread:.2g} | {verdict} |"


def sweep_table(list_path):
    """Per dataset: each --alpha's mean ± std over seeds of the last-3 means, in increasing alpha (inf = BC last)."""
    groups, missing = collect(list_path)
    lines = [
        "# sweep: final performance against the actor temperature `--alpha` (inf = exact behaviour cloning)",
        "",
        "Mean ± std over seeds of each run's last 3 evaluations. "
        f"Made by `bash benchmark.sh learn --sweep` from `{list_path}`.",
        "",
        commit_line(list_path),
        "",
    ]
    for (script, dataset), methods in sorted(groups.items()):
        metric = metric_name(next(iter(methods.values()))[0][1])
        lines += [f"## {script}: {dataset} ({metric})", "", "| alpha | mean ± std | seeds |", "|---|---|---|"]
        for method, runs in sorted(methods.items(), key=lambda kv: float(kv[0][len("alpha") :])):
            values = mean_std([last3(r, metric) for _, r in runs])
            lines.append(f"| {method[len('alpha') :]} | {fmt(*values)} | {len(runs)} |")
        lines.append("")
    return lines + missing_note(missing)
