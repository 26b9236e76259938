"""A strategy-mixed LunarLanderContinuous-v3 dataset in the D4RL HDF5 layout (not icq_continuous.py's built-in one).

Whole episodes of five landers, each episode's lander drawn with SHARES (the best, the heuristic, is a 15 % minority);
the landers are the built-in data's behaviour policies (icq_data.LANDERS). Seeds differ from the built-in data's
(reset seeds from 2_000_000, rng seed 7). Writes observations, actions, rewards, terminals, timeouts, next_observations
and `policy` (the lander index per row), and prints each lander's mean episode return.
Usage: python benchmarks/diagnostics/make_lunar_mix.py OUT.hdf5 [TRANSITIONS]   (docs/icq_continuous.md, issue 16)
"""

import json
import os
import sys

import gymnasium as gym
import h5py
import numpy as np
from gymnasium.envs.box2d.lunar_lander import heuristic

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from icq_data import LANDERS  # noqa: E402

SHARES = {
    "heuristic": 0.15,
    "heuristic + N(0, 1)": 0.20,
    "main engine over-fires": 0.25,
    "main engine never fires": 0.25,
    "uniform random": 0.15,
}
out, size = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
env, rng = gym.make("LunarLanderContinuous-v3"), np.random.default_rng(7)
cols = {k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations", "policy")}
returns = {k: [] for k in SHARES}
episode = 0
while len(cols["rewards"]) < size:
    lander = rng.choice(list(SHARES), p=list(SHARES.values()))
    o, _ = env.reset(seed=2_000_000 + episode)
    done, ret = False, 0.0
    while not done:
        a = LANDERS[lander](heuristic(env, o), rng).astype(np.float32)
        o2, r, terminated, truncated, _ = env.step(a)
        for k, v in zip(cols, (o, a, r, terminated, truncated and not terminated, o2, list(SHARES).index(lander))):
            cols[k].append(v)
        o, ret, done = o2, ret + r, terminated or truncated
    returns[lander].append(ret)
    episode += 1
with h5py.File(out, "w") as f:
    for k, v in cols.items():
        f[k] = np.array(v, np.float32 if k in ("observations", "actions", "rewards", "next_observations") else None)
info = {
    "transitions": len(cols["rewards"]),
    "episodes": episode,
    "mean_return": float(np.mean([r for v in returns.values() for r in v])),
    "lander": {
        k: {"share": SHARES[k], "episodes": len(v), "mean_return": float(np.mean(v))} for k, v in returns.items()
    },
}
print(json.dumps(info, indent=2))
