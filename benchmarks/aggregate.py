"""benchmark.sh's helper: aggregates a grid's runs into markdown tables and plots, and measures the speed floor.

    python benchmarks/aggregate.py learn|sweep|headline|speed|paper LIST --out-dir DIR   tables of the runs named in LIST
    python benchmarks/aggregate.py floor continuous|discrete|ma [script args] --run-name NAME
    python benchmarks/aggregate.py make-hopper-data PATH N
    python benchmarks/aggregate.py curves OUT.png TITLE LABEL=RUN[,RUN...] ...   evaluation curves of any runs

LIST is a run list written by benchmark.sh (one command line per run, each with --run-name); every run's result is
runs/<run_name>/summary.json. Run names follow the learn-grid convention <grid>__<script>__<dataset>__<method>__<seed>.
"""
import argparse
import json
import os
import platform
import re
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"continuous": "icq_continuous.py", "discrete": "icq_discrete.py", "ma": "icq_ma_smac.py"}


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


def plot_curves(path, title, runs_by_method, metric):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def missing_note(missing):
    return [f"\nMissing (no summary.json yet, or failed: see runs/logs/<name>.log): {', '.join(missing)}"] if missing else []


def aggregate_learn(list_path, out_dir, kind="learn"):
    groups, missing = collect(list_path)
    title = {"learn": "ICQ against exact behaviour cloning (`--alpha inf`)", "paper": "ICQ on the seed paper's datasets",
             "headline": "ICQ-MA against exact behaviour cloning on the main command's map, SMAX 3s_vs_5z"}[kind]
    command = ("learn --headline" if kind == "headline" else kind) + (" --tiny" if "_tiny" in list_path else "")
    lines = [f"# {kind}: {title}", "",
             "Each run's value is the mean of its last 3 evaluations (score where the data has reference scores, else "
             "the return; win rate for ICQ-MA); the table shows mean ± std (ddof 1) over seeds. "
             f"Made by `bash benchmark.sh {command}` from `{list_path}`.", "",
             "max |Q| is the largest |Q(s, a)| any seed's critic reached, against the reward-implied bound max|r| / (1 - gamma) "
             "(single-agent scripts; a critic beyond it diverges).", "",
             "| script | dataset | method | metric | mean ± std | seeds | dataset return | max abs Q / bound |",
             "|---|---|---|---|---|---|---|---|"]
    diffs = []
    for (script, dataset), methods in sorted(groups.items()):
        first = next(iter(methods.values()))[0][1]
        metric = metric_name(first)
        stats = {}
        for method, runs in sorted(methods.items()):
            stats[method] = mean_std([last3(r, metric) for _, r in runs])
            dataset_return = first.get("dataset_return")
            q_max = max((r["q_abs_max"] for _, r in runs if r.get("q_abs_max") is not None), default=None)
            q = "-" if q_max is None else f"{q_max:.3g} / {first['q_bound']:.3g}"
            lines.append(f"| {script} | {dataset} | {method} | {metric} | {fmt(*stats[method])} | {len(runs)} | {fmt(dataset_return)} | {q} |")
        if "icq" in stats and "bc" in stats and None not in (stats["icq"][0], stats["bc"][0]):
            diff = stats["icq"][0] - stats["bc"][0]
            spread = (stats["icq"][1] ** 2 + stats["bc"][1] ** 2) ** 0.5
            seeds = min(len(methods["icq"]), len(methods["bc"]))
            verdict = ("one seed: no spread" if seeds < 2 else "ICQ better" if diff > spread else "BC better" if -diff > spread
                       else "within spread")
            diffs.append(f"| {script} | {dataset} | {diff:+.3g} | {spread:.2g} | {verdict} |")
        plot_curves(os.path.join(out_dir, f"{kind}_{dataset}.png"), f"{script}: {dataset}", methods, metric)
    if diffs:
        lines += ["", "ICQ − BC against the seed spread sqrt(std_ICQ² + std_BC²):", "",
                  "| script | dataset | ICQ − BC | spread | verdict |", "|---|---|---|---|---|", *diffs]
    lines += ["", "Evaluation curves (mean ± std over seeds): " + ", ".join(f"`{kind}_{d}.png`" for _, d in sorted(groups))]
    return lines + missing_note(missing)


def aggregate_sweep(list_path, out_dir):
    groups, missing = collect(list_path)
    lines = ["# sweep: final performance against the actor temperature `--alpha` (inf = exact behaviour cloning)", "",
             f"Mean ± std over seeds of each run's last 3 evaluations. Made by `bash benchmark.sh learn --sweep` from `{list_path}`.", ""]
    for (script, dataset), methods in sorted(groups.items()):
        metric = metric_name(next(iter(methods.values()))[0][1])
        lines += [f"## {script}: {dataset} ({metric})", "", "| alpha | mean ± std | seeds |", "|---|---|---|"]
        for method, runs in sorted(methods.items(), key=lambda kv: float(kv[0][len("alpha"):])):
            lines.append(f"| {method[len('alpha'):]} | {fmt(*mean_std([last3(r, metric) for _, r in runs]))} | {len(runs)} |")
        lines.append("")
    return lines + missing_note(missing)


def machine_lines():
    import torch

    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), cpu)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    note = [f"- note: {os.environ['BENCH_MACHINE_NOTE']}"] if os.environ.get("BENCH_MACHINE_NOTE") else []
    return [f"- machine: {cpu}, {os.cpu_count()} CPUs visible, GPU: {gpu}; {platform.system()} {platform.release()}",
            f"- versions: Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}",
            f"- aggregated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; runs with OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}", *note]


def aggregate_speed(list_path, out_dir):
    groups, missing = collect(list_path)
    lines = ["# speed: each script's update rate beside its floor", "",
             "The floor is the same networks' forward, backward and optimiser steps on one fixed batch of the same size, "
             "with no ICQ weights, no sampling, no NaN checks and no logging (`benchmarks/aggregate.py floor`). "
             "Rates exclude dataset loading and evaluation; each number is the median over repeats (separate processes). "
             f"Made by `bash benchmark.sh speed` from `{list_path}`.", "", *machine_lines(), "",
             "| script | config | updates/s | floor updates/s | cost / floor (target ≤ 1.15) | peak RSS MB | repeats |",
             "|---|---|---|---|---|---|---|"]
    memory = []
    for (script, config), methods in sorted(groups.items()):
        runs, floors = methods.get("icq", []), methods.get("floor", [])
        rate_key = "iterations_per_second" if script == "ma" else "updates_per_second"
        rate = statistics.median([r[rate_key] for _, r in runs]) if runs else None
        floor = statistics.median([r["updates_per_second"] for _, r in floors]) if floors else None
        ratio = f"{floor / rate:.2f}" if rate and floor else "-"
        rss = statistics.median([r["peak_rss_mb"] for _, r in runs]) if runs else None
        unit = " (iterations)" if script == "ma" else ""
        lines.append(f"| {SCRIPTS[script]} | {config}{unit} | {fmt(rate, digits=4)} | {fmt(floor, digits=4)} | {ratio} | {fmt(rss, digits=4)} | {len(runs)}/{len(floors)} |")
        if floors and floors[0][1].get("raw_bytes"):
            f = floors[0][1]
            memory.append(f"| {SCRIPTS[script]} | {config} | {f['raw_bytes'] / 2**20:.1f} | {f['dataset_bytes'] / 2**20:.1f} | "
                          f"{f['dataset_bytes'] / f['raw_bytes']:.2f} | {f.get('dataset_note', '')} |")
    if memory:
        lines += ["", "Dataset memory: the bytes of the tensors a script holds for training against the raw arrays of the file "
                  "(target ≤ 1.2x).", "", "| script | data | raw MB | held MB | held / raw | held tensors |", "|---|---|---|---|---|---|", *memory]
    rss = {c: statistics.median([r["peak_rss_mb"] for _, r in m.get("icq", [])]) for (s, c), m in groups.items() if s == "continuous" and m.get("icq")}
    if {"hopper-1k", "hopper-1M"} <= rss.keys():
        raw = 1_000_000 * (11 + 3 + 1) * 4 + 2 * 1_000_000
        lines += ["", f"Peak RSS of icq_continuous.py, 1M minus 1k transitions: {rss['hopper-1M'] - rss['hopper-1k']:.0f} MB for "
                  f"{raw / 2**20:.0f} MB of raw arrays ({(rss['hopper-1M'] - rss['hopper-1k']) * 2**20 / raw:.2f}x; includes the "
                  "loader's temporary copies)."]
    return lines + missing_note(missing)


# ---------------------------------------------------------------------------------------------------------------------
# The floor: the networks of each script, imported from it (importing a script has no side effects).
def timed(step, total_steps, warmup=20):
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(total_steps):
        step()
    return total_steps / (time.perf_counter() - start)


def floor_continuous(opts, device):
    import torch
    from gymnasium.spaces import Box

    import icq_continuous as m

    with __import__("h5py").File(opts.dataset_path, "r") as f:
        raw = sum(f[k].nbytes for k in ("observations", "actions", "rewards", "terminals", "timeouts"))
    columns, _ = m.load_d4rl_hdf5(opts.dataset_path, False)  # (transitions, episode returns)
    data = m.make_dataset_tensors(columns, device)
    held = sum(t.nbytes for t in data.values())
    obs_dim, act_dim = data["obs"].shape[1], data["actions"].shape[1]
    batch = [data[k][:opts.batch_size].clone() for k in ("obs", "actions", "rewards", "next_obs", "next_actions", "dones")]
    actor = m.Actor(obs_dim, act_dim, Box(-1.0, 1.0, (act_dim,))).to(device)
    critic = m.Critic(obs_dim, act_dim, 1).to(device)  # the locomotion preset: one Q
    target = m.Critic(obs_dim, act_dim, 1).to(device).requires_grad_(False)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=3e-4, weight_decay=1e-4)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=3e-4)
    obs, act, rew, next_obs, next_act, done = batch

    def step():
        with torch.no_grad():
            y = rew + 0.99 * (1 - done) * target(next_obs, next_act).min(0).values
        loss_q = ((critic(obs, act) - y) ** 2).mean(1).sum()
        critic_opt.zero_grad()
        loss_q.backward()
        critic_opt.step()
        with torch.no_grad():  # the actor signal's two critic forwards
            critic(obs, act), critic(next_obs, next_act)
        loss_pi = -actor.log_prob(obs, act).mean()
        actor_opt.zero_grad()
        loss_pi.backward()
        actor_opt.step()
        with torch.no_grad():
            for p, p_target in zip(critic.parameters(), target.parameters()):
                p_target.lerp_(p, 0.005)

    return timed(step, opts.total_steps), raw, held, "obs, actions, rewards, next_obs, next_actions, dones (float32)"


def floor_discrete(opts, device):
    import torch
    import torch.nn.functional as F

    import icq_discrete as m

    episodes = m.builtin_episodes("LunarLander-v3", opts.quality, opts.dataset_size)
    episodes = episodes[0] if isinstance(episodes, tuple) else episodes  # (episodes, info) in newer versions
    raw = sum(a.nbytes for ep in episodes for a in ep)
    data = m.make_dataset_tensors(episodes, device)
    held = sum(t.nbytes for t in data.values())
    obs, act, rew, next_obs, next_act, done = (data[k][:opts.batch_size].clone() for k in ("obs", "actions", "rewards", "next_obs", "next_actions", "dones"))
    n_actions = 4
    actor, critic, behavior, target = (m.mlp([obs.shape[1], 256, 256, n_actions]).to(device) for _ in range(4))
    target.requires_grad_(False)
    opts_ = [torch.optim.Adam(net.parameters(), lr=3e-4) for net in (actor, critic, behavior)]
    use_behavior = opts.normalizer == "behavior"

    def step():
        if use_behavior:
            loss_mu = F.cross_entropy(behavior(obs), act)
            opts_[2].zero_grad()
            loss_mu.backward()
            opts_[2].step()
        with torch.no_grad():
            y = rew + 0.99 * (1 - done) * target(next_obs).gather(1, next_act[:, None]).squeeze(1)
            if use_behavior:
                behavior(next_obs)
        loss_q = F.mse_loss(critic(obs).gather(1, act[:, None]).squeeze(1), y)
        opts_[1].zero_grad()
        loss_q.backward()
        opts_[1].step()
        log_pi = F.log_softmax(actor(obs), -1)
        with torch.no_grad():
            critic(obs)
            if use_behavior:
                behavior(obs)
        loss_pi = -log_pi.gather(1, act[:, None]).mean()
        opts_[0].zero_grad()
        loss_pi.backward()
        opts_[0].step()
        with torch.no_grad():
            for p, p_target in zip(critic.parameters(), target.parameters()):
                p_target.lerp_(p, 0.005)

    return timed(step, opts.total_steps), raw, held, "obs, actions (int64), rewards, next_obs, next_actions, dones"


def floor_ma(opts, device):
    import h5py
    import torch
    import torch.nn as nn

    import icq_ma_smac as m

    import glob

    path = max(glob.glob(f"datasets/smax_{opts.map}_{opts.quality}*.h5"), key=os.path.getmtime)  # the script's cache
    with h5py.File(path, "r") as f:
        raw = sum(f[k].nbytes for k in m.DATA_KEYS)
        info = {"n_agents": f["obs"].shape[2], "n_actions": f["avail_actions"].shape[3], "obs_shape": f["obs"].shape[3],
                "state_shape": f["state"].shape[2]}
    data = m.load_dataset(path, info, opts.map, "smax", device)
    held = sum(t.nbytes for t in data.values())
    n_agents, n_actions, obs_dim, state_dim = info["n_agents"], info["n_actions"], info["obs_shape"], info["state_shape"]
    idx = torch.randperm(data["obs"].shape[0], generator=torch.Generator().manual_seed(0))[: opts.batch_size].to(device)
    rows = int(data["rows"][idx].max())
    obs, state = data["obs"][idx, :rows].float(), data["state"][idx, :rows].float()
    actions = data["actions"][idx, :rows]
    reward = data["reward"][idx, : rows - 1]
    actor, critic, mixer = m.Actor(obs_dim, n_actions, n_agents, m.Args.actor_hidden).to(device), m.Critic(state_dim, obs_dim, n_actions, n_agents).to(device), m.Mixer(state_dim, n_agents).to(device)
    critic_target, mixer_target = m.Critic(state_dim, obs_dim, n_actions, n_agents).to(device), m.Mixer(state_dim, n_agents).to(device)
    critic_params = list(critic.parameters()) + list(mixer.parameters())
    actor_opt = torch.optim.RMSprop(actor.parameters(), lr=m.Args.actor_lr, alpha=0.99, eps=1e-5)
    critic_opt = torch.optim.RMSprop(critic_params, lr=1e-4, alpha=0.99, eps=1e-5)
    last_actions = m.previous_actions_onehot(actions[:, :-1], n_actions)

    def opt_step(opt, loss, params):
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 20.0)
        opt.step()

    def q_tot(s, o, a):
        k, b = mixer(s)
        return (k * critic(s, o).gather(-1, a.unsqueeze(-1)).squeeze(-1)).sum(-1) + b

    def step():
        with torch.no_grad():  # the target networks' forward (no TD(lambda), no ICQ weights)
            k_t, _ = mixer_target(state)
            q_t = (k_t * critic_target(state, obs).gather(-1, actions.unsqueeze(-1)).squeeze(-1)).sum(-1)
            y = reward + 0.99 * q_t[:, 1:]
        if opts.critic_updates == "sequential":
            for t in range(rows - 1):
                opt_step(critic_opt, ((q_tot(state[:, t], obs[:, t], actions[:, t]) - y[:, t]) ** 2).mean(), critic_params)
        else:
            opt_step(critic_opt, ((q_tot(state[:, :-1], obs[:, :-1], actions[:, :-1]) - y) ** 2).mean(), critic_params)
        with torch.no_grad():
            critic(state[:, :-1], obs[:, :-1]), mixer(state[:, :-1])
        logits, _ = actor(obs[:, :-1], last_actions)
        loss_pi = -torch.log_softmax(logits, -1).gather(-1, actions[:, :-1].unsqueeze(-1)).mean()
        opt_step(actor_opt, loss_pi, list(actor.parameters()))

    note = "episode tensors padded to the longest episode (obs/state as stored, actions int64, avail bool, mask)"
    return timed(step, opts.total_steps, warmup=2), raw, held, note


def floor(argv):
    """Measure one floor and write runs/<run_name>/summary.json (updates_per_second, raw_bytes, dataset_bytes)."""
    import resource

    import torch

    parser = argparse.ArgumentParser(prog="aggregate.py floor")
    parser.add_argument("script", choices=SCRIPTS)
    parser.add_argument("--run-name", required=True)
    parser.add_argument("--total-steps", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--dataset-path"), parser.add_argument("--quality", default="medium")
    parser.add_argument("--normalizer", default="batch"), parser.add_argument("--dataset-size", type=int, default=100_000)
    parser.add_argument("--map", default="3s_vs_5z"), parser.add_argument("--critic-updates", default="sequential")
    parser.add_argument("--threads", type=int, default=1), parser.add_argument("--no-cuda", action="store_true")
    opts, _ = parser.parse_known_args(argv)  # the scripts' other options (e.g. --env-id) do not change the floor
    sys.path.insert(0, ROOT)
    torch.manual_seed(0)
    if opts.script == "ma":
        torch.set_num_threads(opts.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and not opts.no_cuda else "cpu")
    rate, raw, held, note = {"continuous": floor_continuous, "discrete": floor_discrete, "ma": floor_ma}[opts.script](opts, device)
    summary = {"run_name": opts.run_name, "updates_per_second": rate, "raw_bytes": int(raw), "dataset_bytes": int(held),
               "dataset_note": note, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "device": str(device)}
    os.makedirs(f"runs/{opts.run_name}", exist_ok=True)
    with open(f"runs/{opts.run_name}/summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    print(f"floor {opts.script}: {rate:.1f} updates/s on {device}; dataset {held / 2**20:.1f} MB held for {raw / 2**20:.1f} MB raw", flush=True)


def make_hopper_data(path, n):
    """A synthetic D4RL-layout file with Hopper sizes (obs 11, act 3), episodes of 1000 steps ending in a timeout."""
    import h5py

    if os.path.exists(path):
        return
    rng = np.random.default_rng(0)
    timeouts = np.zeros(n, bool)
    timeouts[999::1000] = True
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with h5py.File(path + ".tmp", "w") as f:
        f["observations"] = rng.normal(size=(n, 11)).astype(np.float32)
        f["actions"] = rng.uniform(-1, 1, size=(n, 3)).astype(np.float32)
        f["rewards"] = rng.normal(size=n).astype(np.float32)
        f["terminals"], f["timeouts"] = np.zeros(n, bool), timeouts
    os.replace(path + ".tmp", path)


def main(argv):
    if argv[:1] == ["floor"]:
        return floor(argv[1:])
    if argv[:1] == ["make-hopper-data"]:
        return make_hopper_data(argv[1], int(argv[2]))
    if argv[:1] == ["curves"]:  # one line per LABEL (mean +- std over its runs), e.g. runs continued with --resume
        groups = {label: [(r, load_summary(r)) for r in runs.split(",")] for label, runs in (a.split("=", 1) for a in argv[3:])}
        missing = [r for runs in groups.values() for r, summary in runs if summary is None]
        if missing:
            raise SystemExit(f"error: no runs/<run>/summary.json for {', '.join(missing)}")
        metric = metric_name(next(iter(groups.values()))[0][1])
        return plot_curves(argv[1], argv[2], groups, metric)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("learn", "sweep", "headline", "speed", "paper"))
    parser.add_argument("list", help="a run list written by benchmark.sh (runs/lists/<kind>.txt)")
    parser.add_argument("--out-dir", default="benchmarks")
    opts = parser.parse_args(argv)
    if not os.path.exists(opts.list):
        raise SystemExit(f"error: no run list {opts.list}")
    os.makedirs(opts.out_dir, exist_ok=True)
    if opts.kind == "sweep":
        lines = aggregate_sweep(opts.list, opts.out_dir)
    elif opts.kind == "speed":
        lines = aggregate_speed(opts.list, opts.out_dir)
    else:
        lines = aggregate_learn(opts.list, opts.out_dir, opts.kind)
    out = os.path.join(opts.out_dir, f"{opts.kind}.md")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
