"""Evaluation-curve plots: one line per method or label, the mean over its runs with a ± std band."""

from benchmarks.runs import load_summary, metric_name


def plot_curves(path, title, runs_by_method, metric):
    """runs_by_method: {label: [(seed or run name, summary)]}; curves are cut to the shortest run of each label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    plt.figure(figsize=(5, 3.5))
    for method, runs in sorted(runs_by_method.items()):
        curves = [r["evaluations"] for _, r in runs]
        length = min(len(c) for c in curves)
        if length == 0:
            continue
        steps = [e["step"] for e in curves[0][:length]]
        values = np.array([[e[metric] for e in c[:length]] for c in curves], dtype=float)
        mean, std = values.mean(0), values.std(0)
        name = method.upper() if method in ("icq", "bc") else method
        plt.plot(steps, mean, label=f"{name} ({len(curves)} seed{'s' if len(curves) > 1 else ''})")
        plt.fill_between(steps, mean - std, mean + std, alpha=0.25)
    plt.xlabel("training step"), plt.ylabel(f"evaluation {metric}"), plt.title(title, fontsize=9), plt.legend()
    plt.tight_layout()
    plt.savefig(path, dpi=100)
    plt.close()


def curves_command(out_path, title, groups):
    """`aggregate.py curves OUT.png TITLE LABEL=RUN[,RUN...] ...`: the curves of any runs (a resumed run included)."""
    labelled = (group.split("=", 1) for group in groups)
    runs = {label: [(r, load_summary(r)) for r in names.split(",")] for label, names in labelled}
    missing = [r for group in runs.values() for r, summary in group if summary is None]
    if missing:
        raise SystemExit(f"error: no runs/<run>/summary.json for {', '.join(missing)}")
    metric = metric_name(next(iter(runs.values()))[0][1])
    plot_curves(out_path, title, runs, metric)
