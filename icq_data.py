"""Built-in datasets of the ICQ scripts: the generators, not ICQ.

The scripts import this module only in the branch that records a missing built-in file, and it imports no script:
a generator that needs an environment adapter is handed the script's. Its command line records a dataset ahead of a
run (for a cluster without network, or to inspect the data):

    python icq_data.py lunar-discrete --quality mixed --dataset-size 100000
    python icq_data.py lunar-continuous --quality mixed --dataset-size 100000
    python icq_data.py smax --map 3s_vs_5z --quality medium --dataset-size 1000
"""

import os
from typing import Literal

import numpy as np

# =====================================================================================================================
# LunarLander-v3, discrete actions (icq_discrete.py)
# good / medium: gymnasium's heuristic lander whose every action is replaced by a uniform random one with probability
# epsilon. mixed: whole episodes of distinct policies, each episode's policy drawn with these shares. Why these
# policies: docs/icq_discrete.md.
EPSILON = {"good": 0.05, "medium": 0.25}
MIXED_SHARES = {"heuristic": 0.25, "no-main-engine": 0.5, "random": 0.25}
MIXED_POLICIES = {  # (heuristic action h, rng) -> action
    "heuristic": lambda h, rng: h,
    "no-main-engine": lambda h, rng: 0 if h == 2 else h,  # the heuristic, but it never fires the main engine: crashes
    "random": lambda h, rng: int(rng.integers(4)),
}


def record_lunar_discrete(quality, size, path, env_id="LunarLander-v3"):
    """Roll out the built-in policies of `quality` for `size` transitions (whole episodes) into the .npz file `path`.

    The file holds obs (one more row per episode than actions), actions, rewards, terminals, the episodes' lengths and
    policies, and the fraction of states where the heuristic's action is the mixture's most likely action
    sum_k share_k pi_k(a|s) (what greedy BC imitates; 1 for good and medium).
    """
    import gymnasium as gym
    from gymnasium.envs.box2d.lunar_lander import heuristic

    print(f"generating {path}", flush=True)
    env, rng = gym.make(env_id), np.random.default_rng(["good", "medium", "mixed"].index(quality))
    obs, actions, rewards, terminals, lengths, policies, heuristic_actions = [], [], [], [], [], [], []
    while len(actions) < size:
        if quality == "mixed":
            policy = rng.choice(list(MIXED_SHARES), p=list(MIXED_SHARES.values()))
        else:
            policy = f"heuristic-epsilon-{EPSILON[quality]}"
        o, _ = env.reset(seed=1_000_000 + len(lengths))  # evaluation uses seeds near 10_000
        obs.append(o)
        done = False
        while not done:
            h = heuristic(env, o)
            if quality == "mixed":
                a = MIXED_POLICIES[policy](h, rng)
            else:
                a = int(rng.integers(env.action_space.n)) if rng.uniform() < EPSILON[quality] else h
            o, r, terminated, truncated, _ = env.step(a)
            obs.append(o), actions.append(a), rewards.append(r), terminals.append(terminated)
            heuristic_actions.append(h)
            done = terminated or truncated
        lengths.append(len(actions) - sum(lengths)), policies.append(policy)
    h = np.array(heuristic_actions)
    mixture = sum(
        share * (np.full((len(h), 4), 0.25) if k == "random" else np.eye(4)[[MIXED_POLICIES[k](a, None) for a in h]])
        for k, share in MIXED_SHARES.items()
    )
    with open(atomic_path(path), "wb") as f:
        np.savez(
            f,
            obs=np.array(obs, np.float32),
            actions=np.array(actions),
            rewards=np.array(rewards, np.float32),
            terminals=np.array(terminals),
            lengths=np.array(lengths),
            policies=np.array(policies),
            heuristic_is_majority=np.mean(mixture.argmax(1) == h) if quality == "mixed" else 1.0,
        )
    os.replace(path + ".tmp", path)


def lunar_discrete(quality: Literal["good", "medium", "mixed"] = "mixed", dataset_size: int = 100_000):
    """Record icq_discrete.py's built-in LunarLander-v3 data (--quality, --dataset-size transitions) into datasets/."""
    name = "mixed-policies" if quality == "mixed" else quality
    record_lunar_discrete(quality, dataset_size, f"datasets/LunarLander-v3-{name}-{dataset_size}.npz")


# =====================================================================================================================
# LunarLanderContinuous-v3 (icq_continuous.py)
# (section filled by the icq_continuous.py restructure)

# =====================================================================================================================
# SMAX (icq_ma_smac.py): scripted controllers and the recorder of their episodes
# (section filled by the icq_ma_smac.py restructure)

# =====================================================================================================================
# Command line: one subcommand per generator (each section adds its own to COMMANDS)
COMMANDS = {}
COMMANDS["lunar-discrete"] = lunar_discrete


def atomic_path(path):
    """Write to `path + ".tmp"` first and os.replace it after, so a concurrent run never reads half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path + ".tmp"


if __name__ == "__main__":
    import tyro

    tyro.extras.subcommand_cli_from_dict(COMMANDS, description=__doc__.split("\n\n")[0])
