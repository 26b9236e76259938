"""Built-in datasets of the ICQ scripts and their data-file readers: the generators and the file formats, not ICQ.

icq_discrete.py imports this module only in the branch that records a missing built-in file; icq_ma_smac.py reads
its episode files and vaults through it (read_pymarl) and records the built-in SMAX files; icq_continuous.py reads
all its data through it (D4RL files, Minari datasets, the built-in files) and checks them with check_array. It
imports no script: a generator that needs an environment adapter is handed the script's.
Its command line records a dataset ahead of a run (for a cluster without network, or to inspect the data):

    python icq_data.py lunar-discrete --quality mixed --dataset-size 100000
    python icq_data.py lunar-continuous --quality mixed --dataset-size 100000
    python icq_data.py smax --map 3s_vs_5z --quality medium --dataset-size 1000
"""

import contextlib
import io
import json
import os
import re
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
# Gymnasium's heuristic lander (continuous mode) and systematically worse landers; "mixed" holds four of them for a
# quarter of its transitions each (docs/icq_continuous.md). h is the heuristic's action at the state.
LANDERS = {
    "heuristic": lambda h, rng: h,
    "heuristic + N(0, 0.1)": lambda h, rng: np.clip(h + rng.normal(0, 0.1, 2), -1, 1),
    "heuristic + N(0, 1)": lambda h, rng: np.clip(h + rng.normal(0, 1.0, 2), -1, 1),
    "uniform random": lambda h, rng: rng.uniform(-1, 1, 2),
    "main engine never fires": lambda h, rng: np.array([-1.0, h[1]]),
    "main engine over-fires": lambda h, rng: np.array([min(h[0] + 1.0, 1.0), h[1]]),
}
BUILTIN = {  # quality -> {lander: share of the transitions}; the order seeds the lander noise (good 0, medium 1, ...)
    "good": {"heuristic + N(0, 0.1)": 1.0},
    "medium": {"heuristic + N(0, 1)": 1.0},
    "mixed": {
        "heuristic": 0.25,
        "uniform random": 0.25,
        "main engine never fires": 0.25,
        "main engine over-fires": 0.25,
    },
}


def record_lunar_continuous(quality, size, path):
    """Roll out the BUILTIN[quality] landers for `size` transitions (whole episodes) into path.npz, and write
    path.json with the episodes, the mean return and each lander's mean episode return."""
    import gymnasium as gym
    from gymnasium.envs.box2d.lunar_lander import heuristic

    env, rng = gym.make("LunarLanderContinuous-v3"), np.random.default_rng(list(BUILTIN).index(quality))
    cols = {k: [] for k in ("obs", "actions", "rewards", "terminals", "lengths", "lander")}
    for lander, share in BUILTIN[quality].items():
        steps = 0
        while steps < share * size:
            o, _ = env.reset(seed=1_000_000 + len(cols["lengths"]))  # evaluation uses seeds near 10_000
            cols["obs"].append(o)
            done, length = False, 0
            while not done:
                a = LANDERS[lander](heuristic(env, o), rng).astype(np.float32)
                o, r, terminated, truncated, _ = env.step(a)
                for k, v in zip(("obs", "actions", "rewards", "terminals"), (o, a, r, terminated)):
                    cols[k].append(v)
                done, length = terminated or truncated, length + 1
            cols["lengths"].append(length), cols["lander"].append(list(LANDERS).index(lander))
            steps += length
    arrays = {k: np.array(v, np.float32 if k in ("obs", "actions", "rewards") else None) for k, v in cols.items()}
    with open(atomic_path(path + ".npz"), "wb") as f:
        np.savez(f, **arrays)
    os.replace(path + ".npz.tmp", path + ".npz")
    ends = np.cumsum(arrays["lengths"])
    returns = np.array(
        [float(arrays["rewards"][start:end].sum()) for start, end in zip(ends - arrays["lengths"], ends)]
    )
    names = list(LANDERS)
    landers = {names[k]: float(np.mean(returns[arrays["lander"] == k])) for k in np.unique(arrays["lander"])}
    info = {"episodes": len(returns), "mean_return": float(np.mean(returns)), "lander_mean_return": landers}
    with open(atomic_path(path + ".json"), "w") as f:
        json.dump(info, f, indent=2)
    os.replace(path + ".json.tmp", path + ".json")


def lunar_continuous(quality: Literal["good", "medium", "mixed"] = "mixed", dataset_size: int = 100_000):
    """icq_continuous.py's built-in data: datasets/LunarLanderContinuous-v3-{quality}-{dataset_size}.npz and .json."""
    record_lunar_continuous(quality, dataset_size, f"datasets/LunarLanderContinuous-v3-{quality}-{dataset_size}")


def read_lunar_continuous(quality, size, path, fix):
    """The episodes [(obs, actions, rewards, terminals)] of path.npz (obs has one more row than actions) and
    {lander: mean episode return} of path.json, recorded first if either is missing; an unreadable file is one line."""
    if not (os.path.exists(path + ".npz") and os.path.exists(path + ".json")):
        print(f"generating {path}.npz", flush=True)
        record_lunar_continuous(quality, size, path)
    try:
        with np.load(path + ".npz") as npz, open(path + ".json") as f:
            d, landers = {k: npz[k] for k in npz.files}, json.load(f)["lander_mean_return"]
        ends = np.cumsum(d["lengths"])  # episode i has rows start + i .. end + i of obs
        episodes = [(d["obs"][s + i : e + i + 1], d["actions"][s:e], d["rewards"][s:e], d["terminals"][s:e])
                    for i, (s, e) in enumerate(zip(ends - d["lengths"], ends))]  # fmt: skip
    except Exception as exc:  # a truncated zip or json, a missing array: numpy and json raise many types
        raise SystemExit(f"error: {path}.npz cannot be read ({type(exc).__name__}: {str(exc)[:80]}); {fix}")
    return episodes, landers


# =====================================================================================================================
# D4RL and Minari data (icq_continuous.py): the readers of an original D4RL HDF5 file and of a Minari dataset, D4RL's
# reference returns, the Minari ids of the paper's D4RL datasets, AntMaze's observation layout (the same in the data
# and the eval env). Data that cannot be used stop with one line saying what to do.
D4RL_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")
# D4RL reference returns (d4rl/infos.py), used only for an original D4RL file named as D4RL names its datasets.
D4RL_REF_SCORES = {"hopper": (-20.272305, 3234.3), "halfcheetah": (-280.178953, 12135.0),
                   "walker2d": (1.629008, 4592.3), "pen": (96.262799, 3076.8331), "door": (-56.512833, 2880.5693),
                   "hammer": (-274.856578, 12794.1348), "relocate": (-6.425911, 4233.8778)}  # fmt: skip
D4RL_NAME = re.compile(r"(hopper|halfcheetah|walker2d)-(random|medium|expert|medium-replay|medium-expert|full-replay)"
                       r"-v[012]|(pen|door|hammer|relocate)-(human|cloned|expert)-v[01]")  # fmt: skip
MINARI_IDS = {r"(hopper|halfcheetah|walker2d)-(medium|expert)(-replay|-expert)?-v\d": "mujoco/{0}/{1}-v0",
              r"(pen|door|hammer|relocate)-(human|cloned|expert)-v\d": "D4RL/{0}/{1}-v2",
              r"antmaze-((umaze|medium|large)(-play|-diverse)?)-v\d": "D4RL/antmaze/{0}-v1"}  # fmt: skip


def read_d4rl_episodes(path, fix):
    """The episodes [(obs, actions, rewards, terminals)] of a D4RL file (one long array per key; obs gets one more row
    than actions): an episode ends at a terminal or a timeout, the final row ends one too."""
    import h5py

    if not os.path.isfile(path) or not h5py.is_hdf5(path):
        raise SystemExit(f"error: --dataset-path {path}" + (
            f" is not an HDF5 file (expected a D4RL file with keys {', '.join(D4RL_KEYS)})" if os.path.isfile(path)
            else f": no such file; pass a D4RL HDF5 file (keys {', '.join(D4RL_KEYS)})"))  # fmt: skip
    try:
        with h5py.File(path, "r") as f:
            if missing := [k for k in D4RL_KEYS if k not in f]:
                raise SystemExit(f"error: {path} is not a D4RL file: missing keys {missing} (has {sorted(f.keys())}); "
                                 f"{fix}")  # fmt: skip
            data = {k: f[k][()] for k in (*D4RL_KEYS, "next_observations") if k in f}
            if "infos/goal" in f:  # AntMaze: append the goal, as the authors' replay buffer does
                for k in {"observations", "next_observations"} & data.keys():
                    data[k] = np.concatenate([data[k], f["infos/goal"][()]], axis=-1)
    except (OSError, RuntimeError, ValueError, TypeError, KeyError) as exc:  # h5py: on open or on read
        raise SystemExit(f"error: --dataset-path {path} cannot be read ({str(exc).splitlines()[0][:100]}): truncated "
                         "(a half-finished download?) or corrupt; download it again")  # fmt: skip
    if data["rewards"].ndim != 1 or len({x.shape[:1] for x in data.values()}) != 1 or not len(data["rewards"]):
        raise SystemExit(f"error: {path}: not D4RL's layout (one row per transition in every key, some rows): shapes "
                         f"{ {k: x.shape for k, x in data.items()} }; {fix}")  # fmt: skip
    n, terminals = len(data["rewards"]), data["terminals"].astype(bool)
    ends = sorted(set(np.flatnonzero(terminals | data["timeouts"].astype(bool)).tolist()) | {n - 1})
    # An episode's final observation is next_observations[end] when the file has it; otherwise it only pads a row
    # that is either dropped (timeout) or terminal (s' unused).
    obs, last_obs = data["observations"], data.get("next_observations", data["observations"])
    return [(np.concatenate([obs[s : e + 1], last_obs[e : e + 1]]), data["actions"][s : e + 1],
             data["rewards"][s : e + 1], terminals[s : e + 1]) for s, e in zip([0] + [e + 1 for e in ends[:-1]], ends)
            ]  # fmt: skip


def flatten_obs(obs):
    """AntMaze dict observations (Minari's data and eval env) become the D4RL 29-d layout (x, y first) followed by the
    2-d goal, as read_d4rl_episodes appends infos/goal to a D4RL file's observations."""
    keys = ("achieved_goal", "observation", "desired_goal")
    return np.concatenate([obs[k] for k in keys], axis=-1) if isinstance(obs, dict) else obs


def read_minari(dataset_id, fix):
    """The episodes [(obs, actions, rewards, terminals)] of a Minari dataset of the local store with continuous actions,
    and the dataset; one line if it is a D4RL name, is not downloaded, has discrete actions or cannot be read."""
    refuse_d4rl_name(dataset_id)
    import gymnasium as gym
    import minari

    try:
        dataset = minari.load_dataset(dataset_id)
    except (FileNotFoundError, ValueError) as exc:
        root = os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")
        raise SystemExit(f"error: Minari dataset '{dataset_id}' is not in the local store ({root}: {str(exc)[:100]}); "
                         f"download it once with `minari download {dataset_id}` (needs network and `pip install "
                         "\"minari[hf]\"`), or pass an original D4RL file with --dataset-path FILE.hdf5 --env-id "
                         "ENV")  # fmt: skip
    if not isinstance(dataset.action_space, gym.spaces.Box):
        raise SystemExit(f"error: Minari dataset {dataset_id} has discrete actions ({dataset.action_space}): use "
                         "icq_discrete.py")  # fmt: skip
    try:
        episodes = [(flatten_obs(ep.observations), ep.actions, ep.rewards, ep.terminations)
                    for ep in dataset.iterate_episodes()]  # fmt: skip
    except (OSError, KeyError, ValueError, IndexError) as exc:
        raise SystemExit(f"error: Minari dataset {dataset_id} cannot be read ({type(exc).__name__}: {str(exc)[:100]}); "
                         f"{fix}")  # fmt: skip
    return episodes, dataset


def d4rl_reference_scores(path):
    """(D4RL's return scored 0, scored 100, source) for a file named as D4RL names a dataset, else None."""
    name = os.path.splitext(os.path.basename(path))[0]
    if D4RL_NAME.fullmatch(name):
        return *D4RL_REF_SCORES[name.split("-")[0]], f"D4RL reference returns for {name} (d4rl/infos.py)"
    return None


def refuse_d4rl_name(dataset_id):
    """Stop with "did you mean" if the Minari id `dataset_id` is the D4RL name of one of the paper's datasets."""
    for pattern, minari_id in MINARI_IDS.items():
        if m := re.fullmatch(pattern, dataset_id):
            raise SystemExit(f"error: --dataset-id {dataset_id} is a D4RL name: did you mean --dataset-id "
                             f"{minari_id.format(*m.groups())}? (Minari's mujoco/* data are regenerated on Gymnasium "
                             "v5 with new policies, not D4RL's; for the paper's data pass the D4RL file: "
                             f"--dataset-path {dataset_id}.hdf5 --env-id ENV)")  # fmt: skip


def check_array(source, key, x, ndim, fix):
    """Stop with one line naming `source` unless its array `key` is an `ndim`-d array of finite numbers."""
    if x.dtype.kind not in "iuf" or x.ndim != ndim:
        raise SystemExit(f"error: {source}: its {key} have dtype {x.dtype} and shape {x.shape}, not {ndim}-d numbers; "
                         f"{fix}")  # fmt: skip
    if not np.isfinite(x).all():
        raise SystemExit(f"error: {source}: its {key} hold NaN or inf; {fix}")


# =====================================================================================================================
# SMAX (icq_ma_smac.py): scripted controllers and the recorder of their episodes
# Each controller reads only the privileged world state and the available actions and gives every agent a distribution
# over actions (one-hot where it is deterministic); the recorder samples it with the episode's key, so an episode is a
# deterministic function of (seed, controller, epsilon). The controllers and mixtures: docs/icq_ma_smac.md.
CONTROLLERS = ("focus_kite", "spread", "hold", "wander", "random", "split")
QUALITY_EPSILON = {"good": 0.0, "medium": 0.1, "poor": 0.3}  # per-agent chance of a uniform available action
# Strategy mixtures (shares of the episodes). mixed: the good controller plays a minority, so that at most states the
# data's most frequent action comes from a worse one (the attribute good_not_majority_fraction measures how often).
# split: the majority is competent (half of its agents fire as the good controller does), so BC does not collapse.
MIXTURES = {
    "mixed": {"focus_kite": 0.2, "spread": 0.2, "hold": 0.5, "wander": 0.05, "random": 0.05},
    "split": {"focus_kite": 0.2, "split": 0.8},
}
PYMARL_KEYS = ("obs", "state", "actions", "avail_actions", "reward", "terminated", "filled")


def controller_policies(env, state, avail, kite_distance=5.0):
    """Action probabilities [len(CONTROLLERS), n_allies, n_actions] of every controller at this state (actions 0-3 move
    N/E/S/W, 4 stops, 5 + j attacks enemy j).

    focus_kite (good): all focus fire on the weakest enemy in range; ranged allies facing melee enemies kite (attack
        when the weapon is ready, else step away from nearby enemies); out of range, approach the closest enemy.
    spread: attack the healthiest enemy in range, agent i preferring enemy i at equal health (fire spread over the
        enemies), else approach the closest enemy; no kiting.
    hold: never move; fire as spread does, else stop.
    wander: a uniform available move, ignoring the enemies.   random: a uniform available action.
    split: even-numbered agents focus fire as focus_kite does, odd-numbered ones fire spread; no kiting; out of range,
        approach the closest enemy.
    """
    import jax
    import jax.numpy as jnp

    s, na, ne = state.state, env.num_allies, env.num_enemies
    pos, alive = s.unit_positions, s.unit_alive
    diff = pos[:na, None] - pos[None, na:]  # ally -> enemy offsets [na, ne, 2]
    dist = jnp.where(alive[None, na:], jnp.linalg.norm(diff, axis=-1), jnp.inf)
    health = s.unit_health[na:] / env.unit_type_health[s.unit_types[na:]]
    attackable = avail[:, 5:]
    in_range = attackable.any(-1)

    def attack(score):  # attack the enemy in range with the lowest score [na, ne]
        return 5 + jnp.argmin(jnp.where(attackable, score, jnp.inf), -1)

    ranges = env.unit_type_attack_ranges[s.unit_types]
    kite = ranges[:na] > jnp.max(jnp.where(jnp.arange(len(ranges)) >= na, ranges, 0.0))
    nearest = jnp.min(dist, -1)
    dirs = jnp.array([[0.0, 1.0], [1.0, 0.0], [0.0, -1.0], [-1.0, 0.0]])
    away = jnp.sum(jnp.where(jnp.isfinite(dist)[..., None], diff / jnp.maximum(dist, 0.5)[..., None] ** 3, 0.0), 1)
    away = away / (jnp.linalg.norm(away, axis=-1, keepdims=True) + 1e-6)
    size = jnp.array([env.map_width, env.map_height])
    wall = (pos[:na] < 4.0).astype(jnp.float32) - (pos[:na] > size - 4.0).astype(jnp.float32)
    flee = jnp.argmax((away + wall) @ dirs.T, -1)
    approach = jnp.argmax((pos[na:][jnp.argmin(dist, -1)] - pos[:na]) @ dirs.T, -1)
    ready = s.unit_weapon_cooldowns[:na] <= 0.5
    focus_fire = attack(health[None] + 1e-3 * dist)
    focus_kite = jnp.where(
        in_range & (ready | ~kite),
        focus_fire,
        jnp.where(kite & (nearest < kite_distance), flee, jnp.where(nearest < ranges[:na] - 0.3, 4, approach)),
    )
    preference = (jnp.arange(ne)[None] - jnp.arange(na)[:, None]) % ne
    spread_fire = attack(-health[None] + 1e-3 * preference)
    spread, hold = jnp.where(in_range, spread_fire, approach), jnp.where(in_range, spread_fire, 4)
    split = jnp.where(in_range, jnp.where(jnp.arange(na) % 2 == 0, focus_fire, spread_fire), approach)
    n_actions = avail.shape[-1]

    def one_hot(a):
        return jax.nn.one_hot(jnp.where(avail[jnp.arange(na), a], a, 4), n_actions)

    moves = avail.at[:, 4:].set(False)
    wander = jnp.where(moves.any(-1, keepdims=True), moves, jax.nn.one_hot(4, n_actions, dtype=bool)).astype(
        jnp.float32
    )
    uniform = avail.astype(jnp.float32)
    return jnp.stack(
        [
            one_hot(focus_kite),
            one_hot(spread),
            one_hot(hold),
            wander / wander.sum(-1, keepdims=True),
            uniform / uniform.sum(-1, keepdims=True),
            one_hot(split),
        ]
    )


def generate_smax_dataset(adapter, path, quality, episodes, seed=0, chunk=250):
    """Record `episodes` scripted episodes of `adapter` (icq_ma_smac.py's SmaxAdapter) in the PyMARL layout (float16
    obs/state, trimmed to the longest episode), with each episode's controller id ("controller", names in the attribute
    controller_names). Prints each component's win rate; returns (win rate, mean return, good_not_majority_fraction)."""
    import time

    import h5py
    import jax
    import jax.numpy as jnp
    import jaxmarl  # already imported (quietly) by the adapter

    gen_start = time.time()
    print(f"generating {path} ({episodes} episodes):")
    env, limit = adapter.env, adapter.info["episode_limit"]
    shares = np.array([MIXTURES.get(quality, {}).get(c, 0.0) for c in CONTROLLERS])
    mixture = jnp.asarray(shares)

    def episode(key, controller, epsilon):
        key, reset_key = jax.random.split(key)
        state, observed = adapter.reset_one(reset_key)

        def body(carry, t):
            key, state, observed, ended = carry
            key, act_key, step_key = jax.random.split(key, 3)
            avail = observed[2]
            policies = controller_policies(env, state, avail)
            probs = (1 - epsilon) * policies[controller] + epsilon * policies[CONTROLLERS.index("random")]
            actions = jax.random.categorical(act_key, jnp.log(probs))
            # does the good controller's action differ from the mixture's most probable one at this state?
            majority = jnp.einsum("c,cna->na", mixture, policies).argmax(-1)
            choice = avail.sum(-1) > 1  # alive agents that have a choice
            disagree = jnp.stack([majority != policies[0].argmax(-1), choice])
            state, next_observed, reward, done, won = adapter.step_one(step_key, state, actions)
            terminated = done | (t + 1 >= limit)
            row = (*observed, actions, reward, terminated, won, ~ended, disagree)
            return (key, state, next_observed, ended | terminated), row

        (_, _, final, _), rows = jax.lax.scan(body, (key, state, observed, jnp.array(False)), jnp.arange(limit))
        return final, rows

    rollout = jax.jit(jax.vmap(episode))
    if quality in MIXTURES:
        counts = np.floor(shares * episodes).astype(int)
        counts[0] += episodes - counts.sum()
        controllers, epsilons = np.repeat(np.arange(len(CONTROLLERS)), counts), np.zeros(episodes)
    else:
        controllers, epsilons = np.zeros(episodes, int), np.full(episodes, QUALITY_EPSILON[quality])
    parts, key = [], jax.random.PRNGKey(seed)
    for start in range(0, episodes, chunk):
        key, chunk_key = jax.random.split(key)
        ctrl, eps = (jnp.asarray(x[start : start + chunk]) for x in (controllers, epsilons.astype(np.float32)))
        final, (obs, state, avail, actions, reward, terminated, won, active, disagree) = rollout(
            jax.random.split(chunk_key, len(eps)), ctrl, eps
        )
        obs, state, avail = (jnp.concatenate([x, f[:, None]], 1) for x, f in zip((obs, state, avail), final))
        length = active.sum(1)  # steps taken; rows 0..length hold observations (filled), 0..length-1 transitions
        row = jnp.arange(limit + 1)[None]
        filled, acted = row <= length[:, None], row[:, :-1] < length[:, None]
        choice = disagree[:, :, 1] & acted[..., None]
        parts.append({
            "obs": np.asarray(obs * filled[..., None, None], np.float16),
            "state": np.asarray(state * filled[..., None], np.float16),
            "avail_actions": np.asarray(avail & filled[..., None, None], np.uint8),
            "actions": np.asarray(jnp.pad(actions * acted[..., None], ((0, 0), (0, 1), (0, 0))), np.int64)[..., None],
            "reward": np.asarray(jnp.pad(reward * acted, ((0, 0), (0, 1))), np.float32)[..., None],
            "terminated": np.asarray(jnp.pad(terminated & acted, ((0, 0), (0, 1))), np.uint8)[..., None],
            "filled": np.asarray(filled, np.uint8)[..., None],
            "won": np.asarray((won & active).any(1)),
            "length": np.asarray(length),
            "disagree": np.asarray((disagree[:, :, 0] & choice).sum()),
            "choice": np.asarray(choice.sum()),
        })  # fmt: skip
    data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k not in ("disagree", "choice")}
    data["controller"] = controllers.astype(np.int64)
    not_majority = float(sum(p["disagree"] for p in parts) / max(sum(p["choice"] for p in parts), 1))
    win_rates = np.array(
        [data["won"][controllers == c].mean() if (controllers == c).any() else np.nan for c in range(len(CONTROLLERS))]
    )
    for c, name in enumerate(CONTROLLERS):
        if (controllers == c).any():
            print(f"  {name}: {(controllers == c).sum()} episodes, win rate {win_rates[c]:.3f}")
    if quality in MIXTURES:  # against the mixture's own controllers: meaningless for a single-controller dataset
        print(f"  good action is not the behaviour mixture's most probable action at {not_majority:.3f} of the "
              "(state, agent) pairs with a choice")  # fmt: skip
    rows = int(data["length"].max()) + 1
    win_rate, mean_return = float(data["won"].mean()), float(data["reward"].sum((1, 2)).mean())
    with h5py.File(atomic_path(path), "w") as f:
        for k in PYMARL_KEYS:
            f.create_dataset(k, data=data[k][:, :rows], compression="lzf", chunks=True)
        f.create_dataset("controller", data=data["controller"])
        f.attrs.update(
            map_name=adapter.map_name, backend="smax", episode_limit=limit, quality=quality, seed=seed, version=2,
            behaviour_win_rate=win_rate, behaviour_mean_return=mean_return, controller_names=list(CONTROLLERS),
            controller_win_rates=win_rates, mixture=shares,
            good_not_majority_fraction=not_majority if quality in MIXTURES else np.nan,
            jaxmarl_version=getattr(jaxmarl, "__version__", "unknown"), episodes=episodes,
            state_normalisation="per unit: positions / map size, cooldown / max cooldown; team and type ids dropped",
        )  # fmt: skip
    os.replace(path + ".tmp", path)
    print(f"generated {path}: {episodes} episodes in {time.time() - gen_start:.1f}s, behaviour win rate "
          f"{win_rate:.3f}, mean return {mean_return:.3f}")  # fmt: skip
    return win_rate, mean_return, not_majority


def smax(
    map: str = "3s_vs_5z",
    quality: Literal["good", "medium", "poor", "mixed", "split"] = "medium",
    dataset_size: int = 1000,
    dataset_path: str = "",
    seed: int = 0,
):
    """Record a SMAX dataset of icq_ma_smac.py (--dataset-size episodes) to --dataset-path, by default the file the
    script reads: datasets/smax_{map}_{quality}_{dataset_size}ep_v2.h5 (its own data are recorded with seed 0)."""
    import importlib

    script = importlib.import_module("icq_ma_smac")
    path = dataset_path or script.SMAX_DATASET.format(map=map, quality=quality, episodes=dataset_size)
    generate_smax_dataset(script.SmaxAdapter(map), path, quality, dataset_size, seed)


def normalise_smax_state(adapter, source, path):
    """A PyMARL file whose `state` is SMAX's raw world state (env.get_world_state, as other SMAX tools record it) ->
    `path`, the same file with the state the script's SmaxAdapter observes (per-unit features scaled, ids dropped)."""
    import h5py

    scale = np.asarray(adapter.scale)
    with h5py.File(source, "r") as f:
        data, attrs = {k: f[k][:] for k in f}, dict(f.attrs)
    if data["state"].shape[-1] <= len(scale):
        raise SystemExit(f"error: {source}: state has {data['state'].shape[-1]} features, not the raw SMAX world state "
                         f"of {adapter.map_name} (more than {len(scale)}); nothing to convert")  # fmt: skip
    # as SmaxAdapter.observe: keep the per-unit features, scale them, clip the idle cooldowns below 0
    data["state"] = np.clip(data["state"][..., : len(scale)].astype(np.float32) * scale, 0.0, 1.0)
    with h5py.File(atomic_path(path), "w") as f:
        for k, v in data.items():
            f.create_dataset(k, data=v, compression="lzf", chunks=True)
        f.attrs.update(attrs)
    os.replace(path + ".tmp", path)


def smax_state(map: str, source: str, path: str):
    """Convert a PyMARL file with SMAX's raw world state (e.g. recorded by another SMAX tool) to icq_ma_smac.py's
    normalised state: python icq_data.py smax-state --map 3s_vs_5z --source raw.h5 --path normalised.h5"""
    import importlib

    normalise_smax_state(importlib.import_module("icq_ma_smac").SmaxAdapter(map), source, path)


# =====================================================================================================================
# PyMARL episode files (icq_ma_smac.py): an HDF5 file with one array per key, or an OG-MARL vault (below).
def read_pymarl(path, keys, layout, info, map_name, backend):
    """The arrays `keys` of a PyMARL episode file (HDF5) or an OG-MARL vault DIR.vlt/UID, cut to the longest episode,
    checked against the env (`info`: n_agents, n_actions, obs_shape, state_shape; the map name the file stores), or one
    line saying what is wrong; `layout` describes the format in that line."""
    raw, data_map = read_vault(path) if os.path.isdir(path) else read_pymarl_hdf5(path, keys, layout)
    shapes, (E, T) = {k: raw[k].shape for k in keys}, (raw["obs"].shape + (0, 0))[:2]
    for k, rank in zip(keys, (4, 3, 4, 4, 3, 3, 3)):
        per_step = k in keys[4:] + ("actions",)  # one number per row (and agent)
        if len(shapes[k]) != rank or shapes[k][:2] != (E, T) or per_step > (shapes[k][-1:] == (1,)) or (
                raw[k].dtype.kind not in "biuf"):  # fmt: skip
            raise SystemExit(f"error: {path}: {k} is {raw[k].dtype} {list(shapes[k])}, not numbers in the PyMARL "
                             f"layout ({layout})")  # fmt: skip
    if E == 0 or T < 2:
        raise SystemExit(f"error: {path} holds {E} episodes of {T} rows, no data; record or download the dataset again")
    rows = int(raw["filled"].reshape(E, T).sum(1).max())  # drop the all-padding columns
    raw = {k: v[:, : max(rows, 2)] for k, v in raw.items()}
    shape = {"n_agents": shapes["obs"][2], "n_actions": shapes["avail_actions"][3], "obs_shape": shapes["obs"][3],
             "state_shape": shapes["state"][2]}  # fmt: skip
    diffs = [f"{k} {shape[k]} (dataset) vs {info[k]} (env)" for k in shape if shape[k] != info[k]]
    diffs = [f"map {data_map} (dataset) vs {map_name} (env)"] * (data_map not in (None, map_name)) + diffs
    if diffs:
        raise SystemExit(f"error: {path} does not match the {backend} env of map {map_name}: {'; '.join(diffs)}. Use "
                         "data recorded on the same map, backend and version (a raw SMAX world state: python "
                         "icq_data.py smax-state)")  # fmt: skip
    for k in ("obs", "state", "reward"):
        if not np.isfinite(raw[k]).all():
            raise SystemExit(f"error: {path}: {k} holds NaN or inf values; fix the file or record the dataset again")
    low, high = raw["actions"].min(), raw["actions"].max()
    if (raw["actions"] % 1 != 0).any() or low < 0 or high >= info["n_actions"]:
        n = info["n_actions"]
        raise SystemExit(f"error: {path}: actions range {low:g}..{high:g}, the {backend} env has the discrete "
                         f"actions 0..{n - 1} (ICQ-MA needs the action ids, not continuous actions)")  # fmt: skip
    return raw


def read_pymarl_hdf5(path, keys, layout):
    """The arrays `keys` of a PyMARL episode file and its map name (None if it stores none)."""
    import h5py

    if not os.path.isfile(path) or not h5py.is_hdf5(path):
        problem = " is not an HDF5 file" if os.path.isfile(path) else ": no such file"
        raise SystemExit(f"error: --dataset-path {path}{problem}; pass a PyMARL episode file ({layout})")
    try:
        with h5py.File(path, "r") as f:
            if any(k not in f for k in keys):
                missing = [k for k in keys if k not in f]
                raise SystemExit(f"error: {path} is not a PyMARL episode file: missing keys {missing} (has "
                                 f"{sorted(f.keys())}); needs {list(keys)}")  # fmt: skip
            data_map = f.attrs.get("map_name")
            return {k: f[k][:] for k in keys}, getattr(data_map, "decode", lambda: data_map)()
    except OSError as exc:  # h5py raises it on open or on read of a truncated or corrupt file
        raise SystemExit(f"error: {path} is not a readable HDF5 file: {str(exc).splitlines()[0][:100]}; it may be "
                         "truncated or corrupt: download or record it again")  # fmt: skip


# =====================================================================================================================
# OG-MARL vaults (Flashbax), the community's offline-MARL datasets <-> the PyMARL episode layout of icq_ma_smac.py.
# A vault is named by the directory of its uid: vaults/og_marl/smac_v1/3m.vlt/Good (OG-MARL's download_and_unzip_vault
# makes <base>/<source>/<env>/<scenario>.vlt, one folder per uid). OG-MARL's recorder (og_marl/replay_buffers.py) stores
# one row per env step: obs, legals and state before the action, then the action, the team reward (copied to each
# agent) and terminals / truncations after it; after an episode end comes the next episode's first obs, so an
# episode's final obs is never stored. Its SMAC wrapper marks the episode limit as a terminal, as our SMAX files do.
PYMARL_KEYS_OF_VAULT = ("observations", "actions", "rewards", "terminals", "truncations", "infos.legals", "infos.state")


def flat(experience):
    """{"infos": {"legals": x}} -> {"infos.legals": x}, numpy arrays."""
    out = {}
    for k, v in experience.items():
        out.update({f"{k}.{j}": np.asarray(w) for j, w in v.items()} if isinstance(v, dict) else {k: np.asarray(v)})
    return out


def read_vault(dataset_path):
    """The vault at dataset_path (DIR.vlt/UID) as PyMARL arrays (vault_to_pymarl) and its map name (or None); a broken
    vault is one line. Each step's sizes are checked against the env by the script's loader, as for an HDF5 file."""
    name = os.path.normpath(dataset_path)
    if not os.path.isfile(os.path.join(name, "metadata.json")):
        uids = sorted(d for d in os.listdir(name) if os.path.isfile(os.path.join(name, d, "metadata.json")))
        what = f"a vault with the uids {uids}: pass {name}/UID" if uids else "not a vault uid (no metadata.json)"
        raise SystemExit(f"error: --dataset-path {name} is {what}; an OG-MARL vault is named DIR.vlt/UID")
    where, uid = os.path.split(os.path.abspath(name))
    from flashbax.vault import Vault

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # flashbax announces every vault it opens
            vault = Vault(os.path.basename(where), rel_dir=os.path.dirname(where), vault_uid=uid)
        if vault.vault_index == 0:
            raise SystemExit(f"error: vault {name} is empty (0 timesteps); download or export it again")
        x = flat(vault.read(timesteps=1).experience)  # one step: check the layout before reading everything
        if missing := [k for k in PYMARL_KEYS_OF_VAULT if k not in x]:
            raise SystemExit(f"error: vault {name} lacks {missing} (has {sorted(x)}); an OG-MARL SMAC vault has "
                             f"{list(PYMARL_KEYS_OF_VAULT)}")  # fmt: skip
        n, a = x["observations"].shape[2:3] or (0,), x["infos.legals"].shape[-1]
        want = {"observations": 4, "actions": 3, "rewards": 3, "terminals": 3, "truncations": 3, "infos.legals": 4,
                "infos.state": 3}  # fmt: skip
        bad = [f"{k} {list(x[k].shape[2:])}" for k in want if x[k].ndim != want[k] or (k != "infos.state" and
               x[k].shape[2:3] != n) or (k == "infos.legals" and x[k].shape[3] != a)]  # fmt: skip
        if bad:
            raise SystemExit(f"error: vault {name}: per step {', '.join(bad)} do not fit OG-MARL's layout for "
                             f"{n[0]} agents (observations {list(x['observations'].shape[2:])}, actions [N], legals "
                             "[N, A], state [S])")  # fmt: skip
        experience = flat(vault.read().experience)
    except (OSError, ValueError, KeyError, AssertionError) as exc:  # metadata or data store unreadable
        raise SystemExit(f"error: vault {name} cannot be read by flashbax ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:80]}); download or export it again")  # fmt: skip
    with open(os.path.join(name, "metadata.json")) as f:  # the export stores the map name there
        map_name = json.load(f).get("map_name")
    return vault_to_pymarl(experience, name), map_name


# Episode e of L stored steps becomes rows 0..L-1 plus row L, filled but all zeros (never read: it stands in for the
# final obs). The script's transition mask keeps transition t when rows t and t+1 are filled and t is terminal or t+1
# is a transition: a terminal episode keeps its L transitions, a truncated one drops exactly its last (it has no
# stored successor to bootstrap from, and ICQ never bootstraps from data that are not there) and keeps t = L-2, whose
# successor (obs, state and action of row L-1) is stored. Without row L a truncated episode would lose two.
def vault_to_pymarl(x, name="vault"):
    """OG-MARL arrays [1, T, ...] (flat keys) -> PyMARL arrays [E, L+1, ...] (obs, state, actions, avail_actions,
    reward, terminated, filled), episodes cut where the agents' terminals or truncations are set."""
    x = {k: v[0] for k, v in x.items()}
    term, trunc, reward = x["terminals"] != 0, x["truncations"] != 0, x["rewards"]
    if (reward != reward[:, :1]).any() or (term.any(1) != term.all(1)).any() or (trunc.any(1) != trunc.all(1)).any():
        raise SystemExit(f"error: vault {name}: its agents differ in rewards, terminals or truncations; ICQ-MA needs "
                         "one team reward and one episode end (as OG-MARL's SMAC vaults store them)")  # fmt: skip
    done = term[:, 0] | trunc[:, 0]  # OG-MARL resets when all agents are terminal or all truncated
    done[-1] = True  # steps after the last episode end: an unfinished episode, treated as truncated
    ends = np.flatnonzero(done)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    episode = np.repeat(np.arange(len(ends)), lengths)
    t = np.arange(len(done)) - starts[episode]

    def rows(v, dtype):  # [T, ...] -> [E, L+1, ...], zeros after each episode
        out = np.zeros((len(ends), lengths.max() + 1, *v.shape[1:]), dtype)
        out[episode, t] = v
        return out

    filled = rows(np.ones(len(done)), np.uint8)
    filled[np.arange(len(ends)), lengths] = 1  # the stand-in for the final obs
    obs, state = x["observations"], x["infos.state"]
    return {"obs": rows(obs, obs.dtype), "state": rows(state, state.dtype),
            "actions": rows(x["actions"], np.int64)[..., None], "avail_actions": rows(x["infos.legals"] != 0, np.uint8),
            "reward": rows(reward[:, 0], np.float32)[..., None], "terminated": rows(term[:, 0], np.uint8)[..., None],
            "filled": filled[..., None]}  # fmt: skip


def write_vault(arrays, path, metadata=None):
    """PyMARL arrays -> a new vault at path (DIR.vlt/UID) in OG-MARL's layout, with the SMACv1 wrapper's dtypes. An
    episode ends at its first terminated row (terminals) or, without one, at its last filled row but one
    (truncations: the last filled row is the final obs, which a vault does not store). Returns (episodes, steps)."""
    filled, term = arrays["filled"][..., 0] != 0, arrays["terminated"][..., 0] != 0
    steps = np.where(term.any(1), term.argmax(1) + 1, filled.sum(1) - 1)
    row = np.arange(filled.shape[1])
    step, last = row < steps[:, None], row == steps[:, None] - 1
    n = arrays["obs"].shape[2]

    def agents(v):  # [E, L+1] -> [1, T, N]: a per-step flag or the team reward, copied to each agent
        return np.repeat(v[step][None, :, None], n, 2)

    experience = {"observations": arrays["obs"][step][None].astype(np.float32),
                  "actions": arrays["actions"][..., 0][step][None].astype(np.int32),
                  "rewards": agents(arrays["reward"][..., 0].astype(np.float32)), "terminals": agents(last & term),
                  "truncations": agents(last & ~term.any(1, keepdims=True)),
                  "infos": {"legals": arrays["avail_actions"][step][None].astype(np.float32),
                            "state": arrays["state"][step][None].astype(np.float32)}}  # fmt: skip
    if os.path.exists(path):
        raise SystemExit(f"error: vault {path} exists (a write would append to it); remove it or choose another uid")
    if not step.any():
        raise SystemExit(f"error: no episode step to export to {path} (filled/terminated are all padding)")
    from flashbax.buffers.trajectory_buffer import TrajectoryBufferState
    from flashbax.vault import Vault

    where, uid = os.path.split(os.path.abspath(path))
    with contextlib.redirect_stdout(io.StringIO()):  # its advice on write intervals is for recorders, not an export
        vault = Vault(os.path.basename(where), experience, rel_dir=os.path.dirname(where), vault_uid=uid,
                      metadata=metadata)  # fmt: skip
        vault.write(TrajectoryBufferState(experience=experience, current_index=int(step.sum()), is_full=False))
    return int((steps > 0).sum()), int(step.sum())


def vault_export(source: str, path: str):
    """Export a PyMARL episode file (e.g. a generated SMAX dataset) as an OG-MARL vault: python icq_data.py
    vault-export --source datasets/smax_3m_good_1000ep_v2.h5 --path vaults/smax/3m.vlt/Good"""
    import h5py

    if not os.path.isfile(source) or not h5py.is_hdf5(source):
        raise SystemExit(f"error: --source {source}: no such HDF5 file; pass a PyMARL episode file")
    with h5py.File(source, "r") as f:
        arrays = {k: f[k][:] for k in PYMARL_KEYS}
        metadata = {k: f.attrs[k] for k in ("map_name", "backend", "quality", "episode_limit") if k in f.attrs}
    episodes, steps = write_vault(arrays, path, {**metadata, "source": os.path.basename(source)})
    print(f"{source}: {episodes} episodes, {steps} steps written to the vault {path}")


# =====================================================================================================================
# Command line: one subcommand per generator (each section adds its own to COMMANDS)
COMMANDS = {}
COMMANDS["smax"] = smax
COMMANDS["smax-state"] = smax_state
COMMANDS["vault-export"] = vault_export
COMMANDS["lunar-discrete"] = lunar_discrete
COMMANDS["lunar-continuous"] = lunar_continuous


def atomic_path(path):
    """Write to `path + ".tmp"` first and os.replace it after, so a concurrent run never reads half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path + ".tmp"


if __name__ == "__main__":
    import tyro

    tyro.extras.subcommand_cli_from_dict(COMMANDS, description=__doc__.split("\n\n")[0])
