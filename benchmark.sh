#!/usr/bin/env bash
# Benchmarks and result runs. Usage: bash benchmark.sh [speed|continuous|discrete|smax|table|plot] [extra args for every run]
#   speed       updates/s and memory on synthetic data (no download): runs anywhere in minutes
#   continuous  ICQ on D4RL data through Minari (needs `minari download <id>` first; 1M steps each, hours per run)
#   discrete    ICQ and behaviour cloning on the built-in LunarLander-v3 datasets, 3 seeds, both normalisers
#   smax        ICQ-MA and behaviour cloning on SMAX 3s_vs_5z (no StarCraft II needed)
#   table       aggregate runs/*/summary.json into a markdown table (mean +- std over seeds)
#   plot        draw each run group's evaluation curve (mean +- std over seeds) into runs/plots/<group>.png
# Each result run writes runs/<name>/summary.json; `bash benchmark.sh table` prints what has been run so far.
set -euo pipefail
cd "$(dirname "$0")"
SEEDS=${SEEDS:-"1 2 3"}

speed() {
  # Extra arguments go to every run (e.g. --no-cuda). Runs one process at a time.
  # Continuous: Hopper sizes (obs 11, act 3), batch 256; 1M transitions = 1000 episodes of 1000 steps.
  mkdir -p datasets
  python - <<'EOF'
import os
import h5py
import numpy as np
for name, n in (("synthetic-hopper-1M.hdf5", 1_000_000), ("synthetic-hopper-1k.hdf5", 1_000)):
    path = os.path.join("datasets", name)
    if os.path.exists(path):
        continue
    rng = np.random.default_rng(0)
    timeouts = np.zeros(n, bool)
    timeouts[999::1000] = True
    with h5py.File(path, "w") as f:
        f["observations"] = rng.normal(size=(n, 11)).astype(np.float32)
        f["actions"] = rng.uniform(-1, 1, size=(n, 3)).astype(np.float32)
        f["rewards"] = rng.normal(size=n).astype(np.float32)
        f["terminals"], f["timeouts"] = np.zeros(n, bool), timeouts
EOF
  for data in 1k 1M; do
    python icq_continuous.py --dataset-path "datasets/synthetic-hopper-$data.hdf5" --env-id Hopper-v5 --batch-size 256 \
      --total-steps 5000 --eval-interval 5000 --eval-episodes 1 --run-name "speed_continuous_$data" "$@"
  done
  # Discrete: LunarLander-v3 sizes (obs 8, 4 actions), batch 256, both normalisers.
  for normalizer in batch behavior; do
    python icq_discrete.py --quality medium --normalizer "$normalizer" --total-steps 3000 --eval-interval 3000 \
      --eval-episodes 1 --run-name "speed_discrete_$normalizer" "$@"
  done
  # Multi-agent: SMAX 3s_vs_5z, 32 episodes per iteration, both critic-update modes (the dataset is made on first use).
  for mode in sequential batched; do
    python icq_ma_smac.py --map 3s_vs_5z --critic-updates "$mode" --total-steps 30 --log-interval 10 --eval-interval 30 \
      --run-name "speed_ma_$mode" "$@"
  done
  python - <<'EOF'
import json
def summary(name):
    return json.load(open(f"runs/{name}/summary.json"))
for data in ("1k", "1M"):
    s = summary(f"speed_continuous_{data}")
    print(f"icq_continuous.py Hopper sizes, batch 256, {data} transitions: {s['updates_per_second']:.0f} updates/s, peak RSS {s['peak_rss_mb']:.0f} MB")
for normalizer in ("batch", "behavior"):
    s = summary(f"speed_discrete_{normalizer}")
    print(f"icq_discrete.py LunarLander-v3, batch 256, --normalizer {normalizer}: {s['updates_per_second']:.0f} updates/s")
for mode in ("sequential", "batched"):
    s = summary(f"speed_ma_{mode}")
    print(f"icq_ma_smac.py SMAX 3s_vs_5z, batch 32, --critic-updates {mode}: {1 / s['iterations_per_second']:.2f} s/iteration")
EOF
}

continuous() {
  # The authors' settings per domain come from --preset auto; D4RL/antmaze and D4RL/<adroit> ids are D4RL re-creations,
  # mujoco/* ids are Gymnasium-v5 regenerations (not the paper's data).
  for id in mujoco/hopper/medium-v0 mujoco/halfcheetah/medium-v0 mujoco/walker2d/medium-v0 D4RL/antmaze/umaze-v1 \
            D4RL/pen/human-v2 D4RL/door/expert-v2; do
    for seed in $SEEDS; do
      python icq_continuous.py --dataset-id "$id" --seed "$seed" --run-name "continuous__${id//\//-}__$seed" "$@"
    done
  done
}

discrete() {
  # ICQ (--alpha 10) and behaviour cloning (--alpha 1e6) on the built-in LunarLander-v3 data, both normalisers.
  for quality in mixed medium; do for normalizer in batch behavior; do for algo in icq bc; do for seed in $SEEDS; do
    alpha=10; [ "$algo" = bc ] && alpha=1000000
    python icq_discrete.py --quality "$quality" --normalizer "$normalizer" --alpha "$alpha" --seed "$seed" \
      --run-name "discrete__LunarLander-v3-${quality}__${normalizer}__${algo}__${seed}" "$@"
  done; done; done; done
}

smax() {
  # ICQ-MA (--alpha 0.1) and behaviour cloning (--alpha 1e6) on SMAX 3s_vs_5z, medium and mixed data.
  for quality in medium mixed; do for algo in icq bc; do for seed in $SEEDS; do
    alpha=0.1; [ "$algo" = bc ] && alpha=1000000
    python icq_ma_smac.py --map 3s_vs_5z --quality "$quality" --alpha "$alpha" --seed "$seed" \
      --run-name "smax__3s_vs_5z-${quality}__${algo}__${seed}" "$@"
  done; done; done
}

table() {
  python - "$@" <<'EOF'
import collections, glob, json, statistics
groups = collections.defaultdict(list)
for path in sorted(glob.glob("runs/*/summary.json")):
    s = json.load(open(path))
    name = s["run_name"].rsplit("__", 1)[0]  # result runs are named <group>__<seed>
    groups[name].append(s)
def fmt(values):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.mean(values):.2f} ± {statistics.pstdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"
print("| run | seeds | final | best | rate (/s) |")
print("|---|---|---|---|---|")
for name, runs in groups.items():
    final = [r.get("final_score", r.get("final_win_rate")) for r in runs]
    best = [r.get("best_score", r.get("best_win_rate")) for r in runs]
    rate = [r.get("updates_per_second", r.get("iterations_per_second")) for r in runs]
    print(f"| {name} | {len(runs)} | {fmt(final)} | {fmt(best)} | {fmt(rate)} |")
EOF
}

plot() {
  python - <<'EOF'
import collections, glob, json, os
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
groups = collections.defaultdict(list)
for path in sorted(glob.glob("runs/*/summary.json")):
    s = json.load(open(path))
    groups[s["run_name"].rsplit("__", 1)[0]].append(s["evaluations"])
os.makedirs("runs/plots", exist_ok=True)
for name, runs in groups.items():
    metric = next(k for k in ("win_rate", "score", "return") if runs[0] and runs[0][0].get(k) is not None)
    steps = [e["step"] for e in runs[0]]
    values = np.array([[e[metric] for e in run] for run in runs if len(run) == len(steps)], dtype=float)
    mean, std = values.mean(0), values.std(0)
    plt.figure(figsize=(5, 3.5))
    plt.plot(steps, mean)
    plt.fill_between(steps, mean - std, mean + std, alpha=0.3)
    plt.xlabel("step"), plt.ylabel(f"eval {metric}"), plt.title(f"{name} ({len(values)} seeds)", fontsize=9)
    plt.tight_layout()
    plt.savefig(f"runs/plots/{name}.png", dpi=100)
    plt.close()
    print(f"runs/plots/{name}.png")
EOF
}

"${1:-speed}" "${@:2}"
