"""Offline multi-agent RL with Implicit Constraint Q-learning (ICQ-MA) on StarCraft micromanagement (SMAC or SMAX).

Implements Algorithm 2 of ICQ (Yang et al., "Believe What You See: Implicit Constraint Approach for Offline Multi-Agent
Reinforcement Learning", NeurIPS 2021, arXiv 2106.03400). The critic evaluates pi* = mu * exp(Q_tot / alpha) / Z by
TD(lambda) over rho * Q'_tot at dataset actions only (eq. 19-20); each agent extracts its policy by weighted behaviour
cloning (the factorised KL(pi* || pi_theta), Sec. 4.3). Z is the softmax over a batch's episodes (the authors' code,
`--normalizer batch`) or the paper's exact per-history Z^i(tau^i) from a learned behaviour policy (`behavior`).
Backends: StarCraft II through smac/smacv2, or JaxMARL's SMAX without it (datasets recorded from scripted controllers,
fenced at the end of this file). Usage, logged metrics, details and results: docs/icq_ma_smac.md.
"""

import copy
import dataclasses
import importlib
import json
import os
import random
import resource
import signal
import sys
import time
from dataclasses import dataclass
from typing import Annotated, Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter


def resolved_default(text):
    """--help shows this default for a field whose None is resolved at run time."""
    return tyro.conf.arg(help_behavior_hint=f"(default: {text})")


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be used when available"""
    track: bool = False
    """if toggled, the run is tracked with Weights and Biases"""
    wandb_project_name: str = "icq"
    """the wandb project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of the wandb project"""
    run_name: Annotated[Optional[str], resolved_default("{map}-{data}__{exp_name}__{alpha or bc}__{seed}__{time}")] = (
        None
    )
    """name of runs/{run_name}/ (with --resume: the checkpoint's run)"""
    save_model: bool = False
    """write runs/{run_name}/checkpoint.pt at every evaluation and at the end"""
    resume: Optional[str] = None
    """a checkpoint.pt to continue: its run's settings are restored (only schedule flags may change)"""
    threads: int = 1
    """torch CPU threads (the many small per-timestep critic steps run fastest on one)"""

    # Algorithm specific arguments
    map: str = "3s_vs_5z"
    """SMAC map, SMACv2 scenario (e.g. protoss_5_vs_5) or SMAX scenario"""
    env_backend: Literal["auto", "smac", "smacv2", "smax"] = "auto"
    """auto: smac when the smac package and StarCraft II are found, else smax (JaxMARL, no StarCraft II)"""
    dataset_path: Annotated[Optional[str], resolved_default("smax: a generated file under datasets/")] = None
    """an HDF5 file in the PyMARL episode layout; without it, smax records a dataset on first use"""
    quality: Literal["good", "medium", "poor", "mixed", "split"] = "medium"
    """generated SMAX data: good = the kite + focus-fire controller, medium / poor = it with 10 % / 30 % random
    actions, mixed = a strategy mixture in which it plays 20 % of the episodes (most by controllers that lose), split =
    it plays 20 %, a competent split-fire controller 80 % (on 2s3z split fire wins 0.27, the good controller 0.75)"""
    dataset_episodes: int = 1000
    """episodes in a generated SMAX dataset"""
    total_steps: int = 40_000
    """training iterations (each: the critic updates on one batch of episodes, then one actor update)"""
    batch_size: int = 32
    """episodes per iteration; the batch softmax normalises over them"""
    alpha: float = 0.1
    """actor temperature of exp(x / alpha) / Z (x = A_i with --normalizer batch, k_i Q_i with behavior);
    inf = exact behaviour cloning"""
    normalizer: Literal["batch", "behavior"] = "batch"
    """Z of the actor weight and of the critic's rho: batch = softmax over the batch's episodes (the authors');
    behavior = the exact per-history sum_b mu_i(b|tau_i) exp(k_i Q_i(tau_i, b) / alpha) of a learned BC policy mu_i"""
    critic_alpha: float = 1000.0
    """critic temperature of rho = exp(Q'_tot / critic_alpha) / Z"""
    td_lambda: float = 0.75
    """lambda of the TD(lambda) critic target"""
    gamma: float = 0.99
    """the discount factor"""
    reward_scale: Annotated[Optional[float], resolved_default("10 with smax, 1 with smac / smacv2")] = None
    """multiplies the dataset rewards on load, so that returns (and the temperatures) are on SMAC's scale"""
    critic_updates: Literal["sequential", "batched"] = "sequential"
    """sequential: one critic optimiser step per timestep, as the authors; batched: one masked step over all of them"""
    target_update_interval: int = 600
    """critic optimiser steps between hard copies of the target critic and mixer"""
    mixer_bias: bool = False
    """add the state bias b(s) to Q_tot (the paper's mixer; the authors' code has none)"""
    mixer_weight_in_exponent: bool = False
    """--normalizer batch: the weight n softmax(k_i A_i / alpha) instead of the authors' k_i n softmax(A_i / alpha)"""
    actor_lr: float = 1e-3
    """actor (and behaviour model) learning rate, RMSprop (the authors': 5e-4)"""
    actor_hidden: int = 128
    """width of the agent's GRU (the authors': 64)"""
    critic_lr: float = 1e-4
    """critic and mixer learning rate (RMSprop)"""
    grad_clip: float = 20.0
    """gradient-norm clip of each update"""
    eval_sample: bool = False
    """sample evaluation actions from the policy instead of the greedy available action"""
    eval_interval: int = 200
    """training iterations between evaluations"""
    eval_episodes: int = 32
    """episodes per evaluation"""
    log_interval: int = 20
    """training iterations between progress lines and TensorBoard scalars"""


# SMAC's episode limits (smac_maps.py), used as SMAX max_steps so episodes are as long as in SMAC.
SMAX_EPISODE_LIMITS = {
    "3m": 60, "8m": 120, "25m": 150, "5m_vs_6m": 70, "10m_vs_11m": 150, "27m_vs_30m": 180, "2s3z": 120, "3s5z": 150,
    "3s5z_vs_3s6z": 170, "3s_vs_5z": 250, "6h_vs_8z": 150, "smacv2_5_units": 200, "smacv2_10_units": 200,
    "smacv2_20_units": 200,
}  # fmt: skip
SMAC_INSTALL = (
    "install it with `pip install git+https://github.com/oxwhirl/{pkg}.git` and StarCraft II (set SC2PATH, default "
    "~/StarCraftII, with the SMAC maps in $SC2PATH/Maps), or use --env-backend smax"
)
DATA_KEYS = ("obs", "state", "actions", "avail_actions", "reward", "terminated", "filled")
# Flags a resumed run may change (plus --run-name and --cuda); every other setting comes from the checkpoint.
SCHEDULE_FLAGS = (
    "total_steps", "eval_interval", "log_interval", "eval_episodes", "threads", "track", "wandb_project_name",
    "wandb_entity", "resume",
)  # fmt: skip
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def fail(msg):
    raise SystemExit(f"error: {msg}")


def flag(name):
    return "--" + name.replace("_", "-")


def given_flags(args):
    """Fields set on the command line: those that differ from the defaults, and those named on sys.argv."""
    named = {arg[2:].split("=")[0].replace("-", "_") for arg in sys.argv[1:] if arg.startswith("--")}
    named |= {name[3:] for name in named if name.startswith("no_")}
    defaults = Args()
    fields = dataclasses.fields(Args)
    return {f.name for f in fields if f.name in named or getattr(args, f.name) != getattr(defaults, f.name)}


def restore_args(args):
    """--resume: the checkpoint's settings; of the command line only the schedule flags, --run-name and --cuda.
    A given flag that would change the algorithm or the data is refused, naming both values."""
    if not os.path.isfile(args.resume):
        fail(f"--resume {args.resume}: no such checkpoint")
    saved = torch.load(args.resume, map_location="cpu", weights_only=False)["args"]
    kept = SCHEDULE_FLAGS + ("run_name", "cuda")
    given = given_flags(args)
    for name in sorted(given - set(kept)):
        if name in saved and getattr(args, name) != saved[name]:
            fail(
                f"--resume {args.resume}: {flag(name)} {getattr(args, name)} given, the checkpoint was trained with "
                f"{flag(name)} {saved[name]}; a resumed run keeps its algorithm and data flags (only --total-steps, "
                "--eval-interval, --log-interval, --eval-episodes, --threads and --track may change)"
            )
    fields = {f.name for f in dataclasses.fields(Args)}
    restored = Args(**{k: v for k, v in saved.items() if k in fields})
    for name in kept:
        if name in given or name == "resume":
            setattr(restored, name, getattr(args, name))
    restored.run_name = restored.run_name or os.path.basename(os.path.dirname(os.path.abspath(args.resume)))
    return restored


def resolve_args(args):
    """Validate the flags; with --resume, the checkpoint's settings."""
    if args.resume is not None:
        args = restore_args(args)
    for name in ("alpha", "critic_alpha"):
        if not getattr(args, name) > 0:
            fail(f"{flag(name)} is a temperature and must be > 0 (got {getattr(args, name)}); --alpha inf is exact BC")
    if args.reward_scale is not None and not 0 < args.reward_scale < float("inf"):
        fail(f"--reward-scale must be a finite number > 0 (got {args.reward_scale})")
    if not 0 <= args.td_lambda <= 1:
        fail(f"--td-lambda must be in [0, 1] (got {args.td_lambda})")
    for name in ("total_steps", "batch_size", "eval_interval", "eval_episodes", "log_interval", "dataset_episodes",
                 "target_update_interval", "threads", "actor_hidden"):  # fmt: skip
        if getattr(args, name) < 1:
            fail(f"{flag(name)} must be >= 1 (got {getattr(args, name)})")
    if args.dataset_path is not None and not os.path.isfile(args.dataset_path):
        fail(f"--dataset-path {args.dataset_path}: no such file")
    return args


def import_jaxmarl():
    """JaxMARL, imported without its import-time chatter on stdout. Its print reaches the terminal even under
    contextlib.redirect_stdout (an import restores sys.stdout), so file descriptor 1 points at /dev/null meanwhile."""
    sys.stdout.flush()
    saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    try:
        return importlib.import_module("jaxmarl")
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


# ---------------------------------------------------------------------------------------------------------------------
# Environments, behind one batched interface: info (n_agents, n_actions, obs_shape, state_shape, episode_limit),
# max_batch, reset(n, seed) -> obs [n,N,O], state [n,S], avail [n,N,A], and
# step(actions [n,N]) -> obs, state, avail, reward [n], terminated [n], won [n] (numpy arrays).
class SmacAdapter:
    """A smac/smacv2 StarCraft2Env (one StarCraft II process, so one episode at a time)."""

    max_batch, raw_state = 1, None

    def __init__(self, env):
        self.env = env
        self.info = {
            k: env.get_env_info()[k] for k in ("n_agents", "n_actions", "obs_shape", "state_shape", "episode_limit")
        }

    def _observe(self):
        env = self.env
        return (
            np.asarray(env.get_obs(), np.float32)[None],
            np.asarray(env.get_state(), np.float32)[None],
            np.asarray(env.get_avail_actions(), bool)[None],
        )

    def reset(self, n, seed):
        self.env.reset()
        return self._observe()

    def step(self, actions):
        reward, terminated, info = self.env.step([int(a) for a in actions[0]])
        won = bool(info.get("battle_won", False))  # a protocol error returns an empty info
        return (*self._observe(), np.array([reward], np.float32), np.array([terminated]), np.array([won]))


def smax_state_scale(env):
    """World state -> hypernetwork input: keep the per-unit features, positions / map size, cooldowns / the largest
    cooldown; drop the raw team and type ids appended at the end (the type is already one-hot per unit)."""
    per_unit = [1.0, 1.0 / env.map_width, 1.0 / env.map_height, 1.0 / float(env.unit_type_weapon_cooldowns.max())]
    per_unit += [1.0] * len(env.unit_type_names)
    return np.tile(np.array(per_unit, np.float32), env.num_allies + env.num_enemies)


class SmaxAdapter:
    """JaxMARL SMAX vs its built-in heuristic enemy; many episodes at once in one compiled, vmapped env."""

    max_batch = 1024

    def __init__(self, map_name):
        import jax

        jaxmarl = import_jaxmarl()
        from jaxmarl.environments.smax import map_name_to_scenario

        self.jax, limit = jax, SMAX_EPISODE_LIMITS[map_name]
        # SMAX checks its step limit before counting the step (T+1 steps); evaluate() and the generator end at T.
        self.env = env = jaxmarl.make("HeuristicEnemySMAX", scenario=map_name_to_scenario(map_name), max_steps=limit)
        self.scale = jax.numpy.asarray(smax_state_scale(env))
        world = jax.eval_shape(lambda key: env.get_world_state(env.reset(key)[1]), jax.random.PRNGKey(0))
        self.raw_state = (int(world.shape[0]), np.asarray(self.scale))  # files that store get_world_state as is
        self.info = {
            "n_agents": env.num_allies,
            "n_actions": int(env.action_space(env.agents[0]).n),
            "obs_shape": int(env.observation_space(env.agents[0]).shape[0]),
            "state_shape": len(self.scale),
            "episode_limit": limit,
        }
        self._reset_batch = jax.jit(jax.vmap(self.reset_one))
        self._step_batch = jax.jit(jax.vmap(self.step_one))

    def observe(self, state):
        jnp, env = self.jax.numpy, self.env
        obs = jnp.stack([o for a, o in env.get_obs(state).items() if a != "world_state"])
        # every kept feature lies in [0, 1] once scaled; the clip catches idle cooldowns, which keep falling below 0
        world = self.jax.numpy.clip(env.get_world_state(state)[: len(self.scale)] * self.scale, 0.0, 1.0)
        avail = jnp.stack(list(env.get_avail_actions(state).values())).astype(bool)
        return obs, world, avail

    def reset_one(self, key):
        _, state = self.env.reset(key)
        # reset leaves weak-typed leaves that step makes strong: cast now so the step compiles once, not twice.
        state = self.jax.tree.map(lambda x: x.astype(x.dtype), state)
        return state, self.observe(state)

    def step_one(self, key, state, actions):
        env = self.env
        _, state, rewards, dones, _ = env.step_env(key, state, {a: actions[i] for i, a in enumerate(env.agents)})
        alive = state.state.unit_alive
        won = ~alive[env.num_allies :].any() & alive[: env.num_allies].any()  # SMAX's infos are empty
        return state, self.observe(state), rewards[env.agents[0]], dones["__all__"], won

    def reset(self, n, seed):
        self.key, key = self.jax.random.split(self.jax.random.PRNGKey(seed))
        self.state, out = self._reset_batch(self.jax.random.split(key, n))
        return tuple(np.array(x) for x in out)  # writable copies for torch

    def step(self, actions):
        self.key, key = self.jax.random.split(self.key)
        keys = self.jax.random.split(key, actions.shape[0])
        self.state, out, reward, done, won = self._step_batch(keys, self.state, self.jax.numpy.asarray(actions))
        return (*(np.array(x) for x in out), np.asarray(reward), np.asarray(done), np.asarray(won))


def smac_env(backend, map_name, seed):
    """StarCraft2Env of the smac/smacv2 package, or one clear message saying what is missing."""
    pkg = "smac" if backend == "smac" else "smacv2"
    try:
        module = importlib.import_module(f"{pkg}.env")
        maps = importlib.import_module(f"{pkg}.env.starcraft2.maps")
    except ImportError:  # note: `pip install smac` from PyPI is SMAC3, an unrelated optimiser without smac.env
        fail(
            f"--env-backend {backend}: the {pkg} package (StarCraft Multi-Agent Challenge) is not installed; "
            + SMAC_INSTALL.format(pkg=pkg)
        )
    sc2path = os.environ.get("SC2PATH", os.path.expanduser("~/StarCraftII"))
    if not os.path.isdir(sc2path):
        fail(f"--env-backend {backend}: StarCraft II not found at {sc2path}; " + SMAC_INSTALL.format(pkg=pkg))
    if backend == "smac":
        known = sorted(maps.get_smac_map_registry())
        if map_name not in known:
            fail(f"unknown SMAC map '{map_name}'; known maps: {', '.join(known)}")
        return module.StarCraft2Env(map_name=map_name, seed=seed)
    # SMACv2 scenarios "<race>_<allies>_vs_<enemies>", with the capability config of smacv2's example yaml files.
    units = {
        "protoss": ["stalker", "zealot", "colossus"],
        "terran": ["marine", "marauder", "medivac"],
        "zerg": ["zergling", "hydralisk", "baneling"],
    }
    race, _, n, _, m = (map_name.split("_") + [""] * 5)[:5]
    if race not in units or not (n.isdigit() and m.isdigit()):
        fail(
            f"unknown SMACv2 scenario '{map_name}'; known: <race>_<allies>_vs_<enemies> with race in "
            f"{sorted(units)}, e.g. protoss_5_vs_5"
        )
    config = {
        "n_units": int(n),
        "n_enemies": int(m),
        "team_gen": {
            "dist_type": "weighted_teams",
            "unit_types": units[race],
            "weights": [0.45, 0.45, 0.1],
            "exception_unit_types": [units[race][2]],
            "observe": True,
        },
        "start_positions": {
            "dist_type": "surrounded_and_reflect",
            "p": 0.5,
            "n_enemies": int(m),
            "map_x": 32,
            "map_y": 32,
        },
    }
    return module.StarCraftCapabilityEnvWrapper(
        capability_config=config,
        map_name=f"10gen_{race}",
        seed=seed,
        conic_fov=False,
        obs_own_pos=True,
        use_unit_ranges=True,
        min_attack_range=2,
    )


def make_adapter(backend, map_name, seed):
    if backend == "auto":
        try:
            importlib.import_module("smac.env")
            found = os.path.isdir(os.environ.get("SC2PATH", os.path.expanduser("~/StarCraftII")))
        except ImportError:
            found = False
        backend = "smac" if found else "smax"
        print(
            f"env backend: {backend} (auto: "
            f"{'smac and StarCraft II found' if found else 'smac or StarCraft II not found'})"
        )
    if backend == "smax":
        if map_name not in SMAX_EPISODE_LIMITS:
            fail(f"unknown SMAX map '{map_name}'; known maps: {', '.join(SMAX_EPISODE_LIMITS)}")
        return backend, SmaxAdapter(map_name)
    return backend, SmacAdapter(smac_env(backend, map_name, seed))


# ---------------------------------------------------------------------------------------------------------------------
# Data (PyMARL episode batches): row t holds obs/state/avail before action t, and action/reward/terminated of step t;
# the filled row after the last step holds the final obs (its action is a dummy). Transition t is valid when rows t and
# t+1 are filled, no terminal came before, and (so that no Q of an action outside the data is ever used) it is terminal
# or followed by a valid transition: an episode cut without a terminal loses its last step, as it has no next action.
def transition_mask(filled, terminated):
    """filled, terminated: [E, T] -> bool [E, T-1]."""
    filled, terminated = filled.bool(), terminated.bool()
    ended_before = torch.cumsum(terminated.long(), 1) - terminated.long() > 0
    mask = filled[:, :-1] & filled[:, 1:] & ~ended_before[:, :-1]
    has_next = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], 1)
    return mask & (terminated[:, :-1] | has_next)


def load_dataset(path, info, map_name, backend, device, reward_scale=1.0, raw_state=None):
    """Episode tensors on `device`, rewards times reward_scale. raw_state = (size, scale): a `state` of that size is the
    raw SMAX world state (env.get_world_state, e.g. recorded by another SMAX tool), normalised like SmaxAdapter's."""
    import h5py

    if not os.path.isfile(path):
        fail(f"--dataset-path {path}: no such file")
    if not h5py.is_hdf5(path):
        fail(
            f"--dataset-path {path} is not an HDF5 file; pass a PyMARL episode file (HDF5 keys {', '.join(DATA_KEYS)})"
        )
    with h5py.File(path, "r") as f:
        missing = [k for k in DATA_KEYS if k not in f]
        if missing:
            fail(
                f"{path} is not a PyMARL episode file: missing keys {missing} (has {sorted(f.keys())}); "
                f"needs {list(DATA_KEYS)}"
            )
        data_map = f.attrs.get("map_name")
        data_map = data_map.decode() if isinstance(data_map, bytes) else data_map
        shape = {
            "n_agents": f["obs"].shape[2],
            "n_actions": f["avail_actions"].shape[3],
            "obs_shape": f["obs"].shape[3],
            "state_shape": f["state"].shape[2],
        }
        normalise = raw_state is not None and shape["state_shape"] == raw_state[0] != info["state_shape"]
        if normalise:
            shape["state_shape"] = info["state_shape"]
        diffs = [f"{k} {shape[k]} (dataset) vs {info[k]} (env)" for k in shape if shape[k] != info[k]]
        if raw_state is not None and shape["state_shape"] != info["state_shape"]:
            diffs[-1] = diffs[-1][:-1] + f", or {raw_state[0]} for its raw world state)"
        if data_map is not None and data_map != map_name:
            diffs.insert(0, f"map {data_map} (dataset) vs {map_name} (env)")
        if diffs:
            fail(
                f"{path} does not match the {backend} env of map {map_name}: {'; '.join(diffs)}. Use data recorded "
                "on the "
                "same map, backend and version (SMAX states are normalised: see README)"
            )
        rows = int(f["filled"][:].reshape(len(f["filled"]), -1).sum(1).max())  # drop all-padding columns
        raw = {k: f[k][:, :rows] for k in DATA_KEYS}
    if normalise:  # as SmaxAdapter.observe: keep the per-unit features, scale them, clip the idle cooldowns below 0
        raw["state"] = np.clip(raw["state"][..., : len(raw_state[1])].astype(np.float32) * raw_state[1], 0.0, 1.0)
        print(
            f"{path}: state is the raw SMAX world state ({raw_state[0]} features); normalised to "
            f"{info['state_shape']} on load"
        )
    data = {
        "obs": torch.as_tensor(raw["obs"]),
        "state": torch.as_tensor(raw["state"]),  # float16 files stay float16 in memory
        "actions": torch.as_tensor(raw["actions"].reshape(raw["actions"].shape[:3]).astype(np.int64)),
        "avail": torch.as_tensor(raw["avail_actions"] != 0),
    }
    flat = {
        k: torch.as_tensor(raw[k].reshape(raw[k].shape[:2]).astype(np.float32))
        for k in ("reward", "terminated", "filled")
    }
    data["reward"], data["terminated"] = flat["reward"][:, :-1] * reward_scale, flat["terminated"][:, :-1]
    data["mask"] = transition_mask(flat["filled"], flat["terminated"])
    keep = data["mask"].any(1)  # episodes without a single valid transition would give empty batches
    if not keep.any():
        fail(f"{path} holds no valid transition (filled/terminated are all padding)")
    data = {k: v[keep] for k, v in data.items()}
    last = torch.where(data["mask"], torch.arange(rows - 1), -1).max(1).values
    data["rows"] = last + 2  # rows an episode needs: its transitions and the row after the last one
    return {k: v.to(device) for k, v in data.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Networks (the authors' ICQ-MA: rnn_agent.py, offpg.py critic, linear qmix.py mixer)
class Actor(nn.Module):
    """Shared GRU agent on (obs, last action one-hot, agent id one-hot); one fused nn.GRU call over the sequence."""

    def __init__(self, obs_dim, n_actions, n_agents, hidden=128):
        super().__init__()
        self.n_agents = n_agents
        self.fc1 = nn.Linear(obs_dim + n_actions + n_agents, hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.fc2 = nn.Linear(hidden, n_actions)

    def forward(self, obs, last_actions, h=None):
        """obs [B,T,N,O], last_actions [B,T,N,A] one-hot, h [1,B*N,H] -> logits [B,T,N,A], h."""
        B, T, N, _ = obs.shape
        ids = torch.eye(N, device=obs.device).expand(B, T, N, N)
        x = F.relu(self.fc1(torch.cat([obs, last_actions, ids], -1)))
        x, h = self.gru(x.transpose(1, 2).reshape(B * N, T, -1), h)
        return self.fc2(x).reshape(B, N, T, -1).transpose(1, 2), h


class Critic(nn.Module):
    """Per-agent Q_i(s, o_i, id, .) for all actions, shared weights, dueling head without mean subtraction."""

    def __init__(self, state_dim, obs_dim, n_actions, n_agents, hidden=256):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(state_dim + obs_dim + n_agents, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.advantage, self.value = nn.Linear(hidden, n_actions), nn.Linear(hidden, 1)

    def forward(self, state, obs):
        """state [...,S], obs [...,N,O] -> Q [...,N,A]."""
        N = obs.shape[-2]
        ids = torch.eye(N, device=obs.device).expand(*obs.shape[:-1], N)
        x = self.body(torch.cat([state.unsqueeze(-2).expand(*obs.shape[:-1], -1), obs, ids], -1))
        return self.advantage(x) + self.value(x)


class Mixer(nn.Module):
    """Linear mixer Q_tot = sum_i k_i(s) Q_i + b(s) (eq. 16), k = |W1(s)| |w_final(s)| normalised over agents."""

    def __init__(self, state_dim, n_agents, embed=32, bias=False):
        super().__init__()
        self.n_agents, self.embed = n_agents, embed
        self.hyper_w_1, self.hyper_w_final = nn.Linear(state_dim, embed * n_agents), nn.Linear(state_dim, embed)
        self.hyper_b = nn.Sequential(nn.Linear(state_dim, embed), nn.ReLU(), nn.Linear(embed, 1)) if bias else None

    def forward(self, state):
        """state [...,S] -> k [...,N] (>= 0, sums to 1), b [...]."""
        w1 = self.hyper_w_1(state).abs().view(*state.shape[:-1], self.n_agents, self.embed)
        k = (w1 @ self.hyper_w_final(state).abs().unsqueeze(-1)).squeeze(-1)
        k = k / k.sum(-1, keepdim=True).clamp_min(1e-12)
        b = self.hyper_b(state).squeeze(-1) if self.hyper_b is not None else torch.zeros_like(k[..., 0])
        return k, b


# ---------------------------------------------------------------------------------------------------------------------
# ICQ losses
@torch.no_grad()
def icq_weights(x, temperature, mask=None, dim=0):
    """n * softmax(x / temperature) along `dim` over the valid entries: the practical Z of the paper (Sec. 4.1).

    x: any shape; mask: bool like x (None: all valid). Invalid entries get weight 0 and never enter the softmax; n is
    the number of valid entries along `dim`, so valid weights average 1. softmax subtracts the max: no overflow.
    """
    logits = x / temperature
    if mask is None:
        return x.shape[dim] * torch.softmax(logits, dim=dim)
    weights = mask.sum(dim, keepdim=True) * torch.softmax(logits.masked_fill(~mask, -torch.inf), dim=dim)
    return torch.where(mask, weights, torch.zeros_like(weights))  # a slice with no valid entry gives 0, not NaN


@torch.no_grad()
def behavior_weights(x, actions, log_mu, temperature):
    """The exact per-state weight exp(x(a)/T) / Z(tau), Z(tau) = sum_b mu(b|tau) exp(x(b)/T): the paper's own Z of
    pi* = mu exp(x/T) / Z instead of the batch softmax, at the data action a, in log space.

    x, log_mu: [..., A] (log_mu: the behaviour model's log-probabilities, -inf at unavailable actions); actions [...].
    Returns [...].
    Any baseline added to x cancels, and E_{a ~ mu}[weight] = 1 in every state: states with high Q do not take the
    weight from states with low Q, as they do under the batch softmax.
    """
    logits = x / temperature
    log_z = torch.logsumexp(log_mu + logits, -1)
    return (logits.gather(-1, actions.unsqueeze(-1)).squeeze(-1) - log_z).exp()


def td_lambda_targets(rewards, terminated, mask, target_qs, gamma, td_lambda):
    """TD(lambda) returns G_t = r_t + gamma (1 - d_t) [(1 - lambda) y_{t+1} + lambda G_{t+1}] (eq. 20).

    rewards, terminated, mask: [B, T-1] for transitions t; target_qs: [B, T], y_t, the bootstrap value of row t.
    Returns [B, T-1], 0 where mask is 0. After the last valid transition the return bootstraps on y alone.
    """
    returns = torch.zeros_like(rewards)
    next_return, next_valid = target_qs[:, -1], torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        bootstrap = target_qs[:, t + 1] + td_lambda * next_valid * (next_return - target_qs[:, t + 1])
        returns[:, t] = mask[:, t] * (rewards[:, t] + gamma * (1 - terminated[:, t]) * bootstrap)
        next_return, next_valid = returns[:, t], mask[:, t].to(rewards.dtype)
    return returns


@torch.no_grad()
def critic_targets(target_q, actions, k, bias, rewards, terminated, mask, gamma, td_lambda, critic_alpha, log_mu=None):
    """The ICQ-MA critic target: TD(lambda) over y = rho * Q'_tot, rho = exp(Q'_tot/alpha)/Z (eq. 19).

    target_q [B,T,N,A] from the target critic; actions [B,T,N] dataset actions; k [B,T,N], bias [B,T] from the target
    mixer; rewards, terminated, mask [B,T-1]. Returns the targets [B,T-1] and rho [B,T] (0 where nothing bootstraps).

    log_mu None (--normalizer batch): Z is the softmax per timestep over the episodes that bootstrap from that row, and
    Q' is only read at dataset actions. log_mu [B,T,N,A] (behavior): the exact Z(tau) = E_{a ~ mu}[exp(Q_tot(tau,a)/c)].
    It needs no sum over the A^N joint actions: with a factorised behaviour policy mu(a|tau) = prod_i mu_i(a_i|tau_i)
    and the linear mixer Q_tot = sum_i k_i Q_i + b,
        E_mu[exp(Q_tot/c)] = exp(b/c) sum_{a_1..a_N} prod_i mu_i(a_i) exp(k_i Q_i(a_i)/c)
                           = exp(b/c) prod_i sum_{b_i} mu_i(b_i) exp(k_i Q_i(b_i)/c),
    so rho = exp(Q_tot(a)/c) / Z = prod_i exp(k_i Q_i(a_i)/c) / sum_b mu_i(b) exp(k_i Q_i(b)/c): the bias cancels and
    rho is the product of the agents' own behavior_weights (N sums of A terms). Z reads Q' at the actions mu_i takes.
    """
    q_taken = target_q.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    mask = mask.bool()
    bootstrapped = torch.cat([torch.zeros_like(mask[:, :1]), mask & (terminated == 0)], 1)
    q_tot = (k * q_taken).sum(-1) + bias
    if log_mu is None:
        rho = icq_weights(q_tot, critic_alpha, bootstrapped, dim=0)
    else:
        rho = behavior_weights(k.unsqueeze(-1) * target_q, actions, log_mu, critic_alpha).prod(-1) * bootstrapped
    return td_lambda_targets(rewards, terminated, mask.to(rewards.dtype), rho * q_tot, gamma, td_lambda), rho


def on_valid_rows(net, rows, *inputs):
    """net(*inputs) at the (episode, t) rows where `rows` [B, T] is true only, each output scattered back into zeros
    [B, T, ...]. The packing optimisation: a batch is cut to its longest episode, so about a third of its rows are
    padding (3s_vs_5z); rows left at zero are never read (rho and the masks are 0 there)."""
    index = rows.nonzero(as_tuple=True)
    out = net(*(x[index] for x in inputs))

    def scatter(y):
        return y.new_zeros(rows.shape + y.shape[1:]).index_put_(index, y)

    return tuple(map(scatter, out)) if isinstance(out, tuple) else scatter(out)


def episodes_per_timestep(valid):
    """valid [B, T-1] -> for each timestep t, the episodes with a valid transition at t (one host sync)."""
    _, episodes = valid.t().nonzero(as_tuple=True)  # ordered by timestep
    return torch.split(episodes, valid.sum(0).tolist())


def critic_loss(critic, mixer, state, obs, actions, targets):
    """Squared error of Q_tot(s, a) = sum_i k_i(s) Q_i(s, o_i, a_i) + b(s) (eq. 16) against the TD(lambda) targets."""
    k, b = mixer(state)
    q_tot = (k * critic(state, obs).gather(-1, actions.unsqueeze(-1)).squeeze(-1)).sum(-1) + b
    return ((q_tot - targets) ** 2).mean()


def previous_actions_onehot(actions, n_actions):
    """actions [B,T,N] -> the agent input "last action" [B,T,N,A]: a_{t-1} one-hot, zeros at t = 0 (as evaluate)."""
    return F.pad(F.one_hot(actions[:, :-1], n_actions).float(), (0, 0, 0, 0, 1, 0))


def masked_log_softmax(logits, avail):
    """log pi over the available actions (rows with none available, i.e. padding, use all actions: they are masked)."""
    avail = avail | ~avail.any(-1, keepdim=True)
    return torch.log_softmax(logits.masked_fill(~avail, -torch.inf), -1), avail


def actor_loss(logits, avail, actions, q_values, k, mask, alpha, weight_in_exponent=False, log_mu=None):
    """Weighted behaviour cloning of each agent (Sec. 4.3): -mean(k_i * icq_weights(A_i / alpha) * log pi_i(a_i)).

    logits, q_values [B,T,N,A] (q detached); avail bool [B,T,N,A]; actions [B,T,N]; k [B,T,N] mixer weights;
    mask [B,T] valid transitions. A_i = Q_i(a_i) - sum_a pi_i(a) Q_i(a), the counterfactual baseline; the batch softmax
    runs over episodes for each (t, i). weight_in_exponent uses icq_weights(k_i A_i / alpha) instead. alpha = inf is
    exact behaviour cloning: every weight is 1 (pi* = mu, so neither the softmax nor k_i reweights). log_mu [B,T,N,A]
    (--normalizer behavior): the paper's per-agent, per-history Z^i(tau^i) instead of the batch softmax, weight =
    behavior_weights(k_i Q_i, a_i, log mu_i, alpha). Returns the loss and the weights [B,T,N] (0 on padding).
    """
    log_pi, avail = masked_log_softmax(logits, avail)
    q_values, k = q_values.detach(), k.detach()
    baseline = (log_pi.detach().exp() * q_values.masked_fill(~avail, 0.0)).sum(-1)
    advantage = q_values.gather(-1, actions.unsqueeze(-1)).squeeze(-1) - baseline
    agent_mask = mask.bool().unsqueeze(-1).expand_as(advantage)
    if alpha == float("inf"):
        weight = agent_mask.float()
    elif log_mu is not None:
        weight = behavior_weights(k.unsqueeze(-1) * q_values, actions, log_mu, alpha) * agent_mask
    elif weight_in_exponent:
        weight = icq_weights(k * advantage, alpha, agent_mask, dim=0)
    else:
        weight = k * icq_weights(advantage, alpha, agent_mask, dim=0)
    log_pi_taken = log_pi.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    return -(weight * log_pi_taken).masked_fill(~agent_mask, 0.0).sum() / agent_mask.sum().clamp_min(1), weight


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation: greedy over available actions (the authors sample plus epsilon-random); ends episodes at the SMAC limit.
@torch.no_grad()
def evaluate(actor, adapter, episodes, seed, device, sample=False):
    """Returns (win rate, mean return). Uses its own generator, so training RNG streams are untouched."""
    generator = torch.Generator(device=device).manual_seed(seed)
    n_actions, limit = adapter.info["n_actions"], adapter.info["episode_limit"]
    wins, returns = [], []
    while len(wins) < episodes:
        n = min(adapter.max_batch, episodes - len(wins))
        obs, _, avail = adapter.reset(n, seed + len(wins))
        last, h = torch.zeros(n, adapter.info["n_agents"], n_actions, device=device), None
        ret, won, active = np.zeros(n), np.zeros(n, bool), np.ones(n, bool)
        for t in range(limit):
            obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device)
            logits, h = actor(obs_t[:, None], last[:, None], h)
            log_pi, _ = masked_log_softmax(logits[:, 0], torch.as_tensor(avail, device=device))
            if sample:
                act = torch.multinomial(log_pi.exp().flatten(0, 1), 1, generator=generator).view(n, -1)
            else:
                act = log_pi.argmax(-1)
            obs, _, avail, reward, terminated, battle_won = adapter.step(act.cpu().numpy())
            ret += reward * active
            won |= battle_won & active
            active &= ~(terminated | (t + 1 >= limit))
            last = F.one_hot(act, n_actions).float()
            if not active.any():
                break
        wins += won.tolist()
        returns += ret.tolist()
    return float(np.mean(wins)), float(np.mean(returns))


# ---------------------------------------------------------------------------------------------------------------------
# Training (Algorithm 2): each iteration samples episodes, runs the critic phase, then the actor phase.
def time_left(start_time, steps_done, steps_left):
    """Time left at this process's rate so far, evaluations included: 1h02m or 3m12s."""
    seconds = int((time.time() - start_time) / steps_done * steps_left)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def last3_mean(evaluations):
    """The README's metric: the mean win rate of the last three evaluations."""
    return float(np.mean([e["win_rate"] for e in evaluations[-3:]])) if evaluations else None


def weight_stats(actor_weights, rho):
    """Spread of the ICQ weights (eq. 19, Sec. 4.3) over the valid entries: near 1 everywhere is plain SARSA / BC."""
    w, r = actor_weights, rho[rho > 0]
    return {"actor_weight_max": w.max(), "actor_weight_std": w.std(), "rho_max": rho.max(), "rho_std": r.std(),
            # effective sample size of the actor weights, as a fraction of the batch's (t, i) pairs
            "actor_weight_ess": w.sum() ** 2 / (w.numel() * (w**2).sum())}  # fmt: skip


def main(args):
    """Train ICQ-MA on one dataset; returns the summary (also written to runs/{run_name}/summary.json)."""
    args = resolve_args(args)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines reach nohup / SLURM logs as they happen
    # SIGINT / SIGTERM only set a flag: the loop finishes its iteration, then saves the run and exits.
    stop = {"signal": None}
    previous_handlers = {s: signal.signal(s, lambda signum, frame: stop.update(signal=signum)) for s in STOP_SIGNALS}
    checkpoint = None if args.resume is None else torch.load(args.resume, map_location="cpu", weights_only=False)
    data_name = os.path.basename(args.dataset_path).rsplit(".", 1)[0] if args.dataset_path else args.quality
    method = "bc" if args.alpha == float("inf") else f"alpha{args.alpha:g}"
    args.run_name = (
        args.run_name or f"{args.map}-{data_name}__{args.exp_name}__{method}__{args.seed}__{int(time.time())}"
    )
    run_dir, ckpt_path = f"runs/{args.run_name}", f"runs/{args.run_name}/checkpoint.pt"
    print(f"run directory: {run_dir}/")

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # Environment and data
    backend, adapter = make_adapter(args.env_backend, args.map, args.seed)
    dataset_path = args.dataset_path
    if dataset_path is None:
        if backend != "smax":
            fail(
                f"--env-backend {backend} needs --dataset-path PATH.h5 (PyMARL episode layout, recorded on this "
                "StarCraft II version)"
            )
        # v2: strategy-mixed data with controller ids
        dataset_path = f"datasets/smax_{args.map}_{args.quality}_{args.dataset_episodes}ep_v2.h5"
        if not os.path.isfile(dataset_path):
            gen_start = time.time()
            print(f"generating {dataset_path} ({args.dataset_episodes} episodes):")
            win_rate, mean_return, _ = generate_smax_dataset(
                dataset_path, args.map, args.quality, args.dataset_episodes, seed=0
            )
            print(
                f"generated {dataset_path}: {args.dataset_episodes} episodes in {time.time() - gen_start:.1f}s, "
                f"behaviour win rate {win_rate:.3f}, mean return {mean_return:.3f}"
            )
    reward_scale = args.reward_scale if args.reward_scale is not None else (10.0 if backend == "smax" else 1.0)
    data = load_dataset(dataset_path, adapter.info, args.map, backend, device, reward_scale, adapter.raw_state)
    dataset_return = float((data["reward"] * data["mask"]).sum(1).mean()) / reward_scale
    num_episodes, (n_agents, n_actions) = data["obs"].shape[0], (adapter.info["n_agents"], adapter.info["n_actions"])
    obs_dim, state_dim = adapter.info["obs_shape"], adapter.info["state_shape"]
    print(
        f"{num_episodes} episodes, {int(data['mask'].sum())} transitions from {dataset_path}; backend {backend}, "
        f"map {args.map}; mean episode return {dataset_return:.3f}, rewards x {reward_scale:g} for training"
    )

    actor = Actor(obs_dim, n_actions, n_agents, args.actor_hidden).to(device)
    critic = Critic(state_dim, obs_dim, n_actions, n_agents).to(device)
    mixer = Mixer(state_dim, n_agents, bias=args.mixer_bias).to(device)
    critic_target_net = copy.deepcopy(critic).requires_grad_(False)
    mixer_target = copy.deepcopy(mixer).requires_grad_(False)
    critic_params = list(critic.parameters()) + list(mixer.parameters())
    actor_optimizer = torch.optim.RMSprop(actor.parameters(), lr=args.actor_lr, alpha=0.99, eps=1e-5)
    critic_optimizer = torch.optim.RMSprop(critic_params, lr=args.critic_lr, alpha=0.99, eps=1e-5)
    modules = {
        "actor": actor,
        "critic": critic,
        "mixer": mixer,
        "critic_target": critic_target_net,
        "mixer_target": mixer_target,
        "actor_optimizer": actor_optimizer,
        "critic_optimizer": critic_optimizer,
    }
    if args.normalizer == "behavior":  # mu_i for the exact Z: a recurrent policy on the actor's inputs, exact BC
        behavior = Actor(obs_dim, n_actions, n_agents, args.actor_hidden).to(device)
        behavior_optimizer = torch.optim.RMSprop(behavior.parameters(), lr=args.actor_lr, alpha=0.99, eps=1e-5)
        modules.update(behavior=behavior, behavior_optimizer=behavior_optimizer)

    start_step, evaluations, critic_steps, last_target_update = 0, [], 0, 0
    if checkpoint is not None:
        for key, module in modules.items():
            module.load_state_dict(checkpoint[key])
        random.setstate(checkpoint["rng"]["python"])
        np.random.set_state(checkpoint["rng"]["numpy"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if device.type == "cuda" and checkpoint["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
        start_step, evaluations = checkpoint["step"], checkpoint["evaluations"]
        critic_steps, last_target_update = checkpoint["critic_steps"], checkpoint["last_target_update"]
        print(f"resumed from {args.resume} at iteration {start_step}")

    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True, config=vars(args),
                   name=args.run_name, save_code=True)  # fmt: skip
    writer = SummaryWriter(run_dir)
    writer.add_text(
        "hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    )

    def save_checkpoint(step):
        state = {key: module.state_dict() for key, module in modules.items()}
        state["rng"] = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
        }
        state.update(
            step=step,
            args=vars(args),
            evaluations=evaluations,
            critic_steps=critic_steps,
            last_target_update=last_target_update,
        )
        torch.save(state, ckpt_path + ".tmp")
        os.replace(ckpt_path + ".tmp", ckpt_path)  # atomic: a crash mid-save leaves the previous checkpoint intact

    def check_finite(nonfinite_step):
        if int(nonfinite_step) >= 0:
            kept = (
                f"the last checkpoint {ckpt_path} is unchanged; continue with --resume {ckpt_path}"
                if os.path.exists(ckpt_path)
                else "no checkpoint was written (use --save-model)"
            )
            fail(f"non-finite loss (NaN or inf) at iteration {int(nonfinite_step)}; training stopped, {kept}")

    def write_summary(step, interrupted):
        wall_seconds = time.time() - start_time
        summary = {
            "args": vars(args), "run_name": args.run_name, "interrupted": interrupted, "step": step,
            "backend": backend, "dataset": dataset_path, "dataset_return": dataset_return, "reward_scale": reward_scale,
            "last3_mean": last3_mean(evaluations), "last3_metric": "win rate",
            "final_win_rate": evaluations[-1]["win_rate"] if evaluations else None,
            "best_win_rate": max(e["win_rate"] for e in evaluations) if evaluations else None,
            "final_return": evaluations[-1]["return"] if evaluations else None,
            "iterations_per_second": (step - start_step) / max(wall_seconds - eval_seconds, 1e-9),
            "wall_seconds": wall_seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "evaluations": evaluations,
        }  # fmt: skip
        with open(f"{run_dir}/summary.json", "w") as f:
            json.dump(summary, f, indent=2)
        return summary

    def clipped_step(optimizer, loss, params):
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, args.grad_clip)
        optimizer.step()

    def log_progress(step, scalars):
        scalars = {key: float(value.detach()) for key, value in scalars.items()}  # the only host syncs of an iteration
        its = (step - start_step) / (time.time() - start_time - eval_seconds)
        for key, value in scalars.items():
            writer.add_scalar(f"losses/{key}", value, step)
        writer.add_scalar("charts/SPS", its, step)
        eta = time_left(start_time, step - start_step, args.total_steps - step)
        print(
            f"step {step}/{args.total_steps} | critic {scalars['critic_loss']:.4f} | actor {scalars['actor_loss']:.4f} "
            f"| q {scalars['q_values']:.3f} | weight max {scalars['actor_weight_max']:.2f} std "
            f"{scalars['actor_weight_std']:.3f} ess {scalars['actor_weight_ess']:.3f} | rho max "
            f"{scalars['rho_max']:.3f} | {its:.2f} it/s | ETA {eta}"
        )

    nonfinite_step = torch.full((), -1, device=device)  # first iteration with a NaN/inf loss, read at log intervals
    start_time, eval_seconds, step = time.time(), 0.0, start_step
    for step in range(start_step + 1, args.total_steps + 1):
        # A batch of distinct episodes, cut to the longest one (one host sync: the cut length decides the loop length).
        idx = torch.randperm(num_episodes, device=device)[: args.batch_size]
        rows = int(data["rows"][idx].max())
        obs, state = data["obs"][idx, :rows].float(), data["state"][idx, :rows].float()
        actions, avail = data["actions"][idx, :rows], data["avail"][idx, :rows]
        reward, terminated, mask = (data[k][idx, : rows - 1] for k in ("reward", "terminated", "mask"))
        valid = mask.bool()
        log_mu = None
        if args.normalizer == "behavior":  # mu_i(.|tau_i) at every row: the actor's rows t and the target's rows t + 1
            mu_logits, _ = behavior(obs, previous_actions_onehot(actions, n_actions))
            log_mu = masked_log_softmax(mu_logits, avail)[0].detach()

        # Critic phase (eq. 19-20): regress Q_tot(tau_t, a_t) on TD(lambda) targets built once from the target networks
        # at the rows the valid transitions bootstrap from (t + 1); every network skips the padding.
        with torch.no_grad():
            next_rows = F.pad(valid, (1, 0))
            target_q = on_valid_rows(critic_target_net, next_rows, state, obs)
            k_target, b_target = on_valid_rows(mixer_target, next_rows, state)
            targets, rho = critic_targets(
                target_q,
                actions,
                k_target,
                b_target,
                reward,
                terminated,
                mask,
                args.gamma,
                args.td_lambda,
                args.critic_alpha,
                log_mu,
            )

        def critic_step(index):  # one optimiser step on the (episodes, timesteps) `index` of this batch
            loss = critic_loss(critic, mixer, state[index], obs[index], actions[index], targets[index])
            clipped_step(critic_optimizer, loss, critic_params)
            return loss

        if args.critic_updates == "sequential":  # the authors' loop: one optimiser step per timestep t = 0..T-2
            for t, episodes in enumerate(episodes_per_timestep(valid)):
                if len(episodes):  # a timestep without valid episodes is skipped, as in the authors' code
                    loss_q = critic_step((episodes, torch.full_like(episodes, t)))
                    critic_steps += 1
        else:  # batched: one step over every valid transition of the batch
            loss_q = critic_step(valid.nonzero(as_tuple=True))
            critic_steps += 1
        if critic_steps - last_target_update >= args.target_update_interval:
            critic_target_net.load_state_dict(critic.state_dict())
            mixer_target.load_state_dict(mixer.state_dict())
            last_target_update = critic_steps

        # Actor phase (Sec. 4.3): weighted behaviour cloning with the just-updated critic; a_{t-1} is an input at t.
        with torch.no_grad():
            q_values = on_valid_rows(critic, valid, state[:, :-1], obs[:, :-1])
            k = on_valid_rows(mixer, valid, state[:, :-1])[0]
        logits, _ = actor(obs[:, :-1], previous_actions_onehot(actions[:, :-1], n_actions))
        loss_pi, actor_weights = actor_loss(
            logits,
            avail[:, :-1],
            actions[:, :-1],
            q_values,
            k,
            mask,
            args.alpha,
            args.mixer_weight_in_exponent,
            None if log_mu is None else log_mu[:, :-1],
        )
        clipped_step(actor_optimizer, loss_pi, list(actor.parameters()))
        if args.normalizer == "behavior":  # exact BC of mu_i on the same batch, after its weights were read
            loss_mu, _ = actor_loss(mu_logits[:, :-1], avail[:, :-1], actions[:, :-1], q_values, k, mask, float("inf"))
            clipped_step(behavior_optimizer, loss_mu, list(behavior.parameters()))
        nonfinite_step = torch.where((nonfinite_step < 0) & ~torch.isfinite(loss_q + loss_pi), step, nonfinite_step)

        if step % args.log_interval == 0:
            check_finite(nonfinite_step)
            q_taken = q_values.gather(-1, actions[:, :-1].unsqueeze(-1)).squeeze(-1)
            scalars = {"critic_loss": loss_q, "actor_loss": loss_pi, "q_values": q_taken[valid].mean(),
                       **weight_stats(actor_weights[valid], rho)}  # fmt: skip
            if args.normalizer == "behavior":
                scalars["behavior_loss"] = loss_mu
            log_progress(step, scalars)

        if step % args.eval_interval == 0 or step == args.total_steps:
            check_finite(nonfinite_step)
            eval_start = time.time()
            win_rate, mean_return = evaluate(
                actor, adapter, args.eval_episodes, args.seed + 10_000, device, args.eval_sample
            )
            eval_seconds += time.time() - eval_start
            evaluations.append({"step": step, "win_rate": win_rate, "return": mean_return})
            writer.add_scalar("eval/win_rate", win_rate, step)
            writer.add_scalar("eval/return", mean_return, step)
            print(
                f"eval step {step}: win rate {win_rate:.3f}, return {mean_return:.3f} ({args.eval_episodes} episodes, "
                f"{time.time() - eval_start:.1f}s)"
            )
            if args.save_model:
                save_checkpoint(step)

        if stop["signal"] is not None:
            check_finite(nonfinite_step)
            save_checkpoint(step)
            write_summary(step, interrupted=True)
            writer.close()
            for s, handler in previous_handlers.items():
                signal.signal(s, handler)
            print(
                f"interrupted at iteration {step} ({signal.Signals(stop['signal']).name}): checkpoint {ckpt_path}; "
                f"continue with: python {os.path.basename(__file__)} --resume {ckpt_path}",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(128 + stop["signal"])

    for s, handler in previous_handlers.items():
        signal.signal(s, handler)
    summary = write_summary(step, interrupted=False)
    mean3 = summary["last3_mean"]
    print(
        f"done: last-3 eval mean {'n/a' if mean3 is None else f'{mean3:.3f}'} (win rate), summary in "
        f"{run_dir}/summary.json"
    )
    writer.close()
    return summary


# =====================================================================================================================
# Data generation, not part of ICQ-MA: scripted SMAX behaviour controllers and the recorder of their episodes.
# Each controller reads only the privileged world state and the available actions and gives every agent a distribution
# over actions (one-hot where it is deterministic); the recorder samples it with the episode's key, so an episode is a
# deterministic function of (seed, controller, epsilon).
CONTROLLERS = ("focus_kite", "spread", "hold", "wander", "random", "split")
QUALITY_EPSILON = {"good": 0.0, "medium": 0.1, "poor": 0.3}  # per-agent chance of a uniform available action
# Strategy mixtures (shares of the episodes). mixed: the good controller plays a minority, so that at most states the
# data's most frequent action comes from a worse one: hold (stop, not approach) outweighs the approaching controllers,
# and spread + hold (fire spread over the enemies) outweigh focus fire. The recorder measures how often the good action
# is not the mixture's most probable one: the attribute good_not_majority_fraction.
# split: the majority is competent, not a loser, so behaviour cloning does not collapse; half of its agents already fire
# as the good controller does, and the good action is the mixture's most probable one wherever they agree.
MIXTURES = {
    "mixed": {"focus_kite": 0.2, "spread": 0.2, "hold": 0.5, "wander": 0.05, "random": 0.05},
    "split": {"focus_kite": 0.2, "split": 0.8},
}


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


def generate_smax_dataset(path, map_name, quality, episodes, seed, chunk=250):
    """Record `episodes` scripted episodes in the PyMARL layout (float16 obs/state, trimmed to the longest episode),
    with each episode's controller id ("controller", names in the attribute controller_names). Prints each component's
    win rate; returns (win rate, mean return, good_not_majority_fraction)."""
    import h5py
    import jax
    import jax.numpy as jnp

    jaxmarl = import_jaxmarl()
    adapter = SmaxAdapter(map_name)
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
        parts.append(
            {
                "obs": np.asarray(obs * filled[..., None, None], np.float16),
                "state": np.asarray(state * filled[..., None], np.float16),
                "avail_actions": np.asarray(avail & filled[..., None, None], np.uint8),
                "actions": np.asarray(jnp.pad(actions * acted[..., None], ((0, 0), (0, 1), (0, 0))), np.int64)[
                    ..., None
                ],
                "reward": np.asarray(jnp.pad(reward * acted, ((0, 0), (0, 1))), np.float32)[..., None],
                "terminated": np.asarray(jnp.pad(terminated & acted, ((0, 0), (0, 1))), np.uint8)[..., None],
                "filled": np.asarray(filled, np.uint8)[..., None],
                "won": np.asarray((won & active).any(1)),
                "length": np.asarray(length),
                "disagree": np.asarray((disagree[:, :, 0] & choice).sum()),
                "choice": np.asarray(choice.sum()),
            }
        )
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
        print(
            f"  good action is not the behaviour mixture's most probable action at {not_majority:.3f} of the "
            "(state, agent) pairs with a choice"
        )
    rows = int(data["length"].max()) + 1
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with h5py.File(path + ".tmp", "w") as f:
        for k in DATA_KEYS:
            f.create_dataset(k, data=data[k][:, :rows], compression="lzf", chunks=True)
        f.create_dataset("controller", data=data["controller"])
        f.attrs.update(
            map_name=map_name,
            backend="smax",
            episode_limit=limit,
            quality=quality,
            seed=seed,
            version=2,
            behaviour_win_rate=float(data["won"].mean()),
            behaviour_mean_return=float(data["reward"].sum((1, 2)).mean()),
            controller_names=list(CONTROLLERS),
            controller_win_rates=win_rates,
            mixture=shares,
            good_not_majority_fraction=not_majority if quality in MIXTURES else np.nan,
            jaxmarl_version=getattr(jaxmarl, "__version__", "unknown"),
            episodes=episodes,
            state_normalisation="per unit: positions / map size, cooldown / max cooldown; team and type ids dropped",
        )
    os.replace(path + ".tmp", path)
    return float(data["won"].mean()), float(data["reward"].sum((1, 2)).mean()), not_majority


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__.split("\n\n")[0]))
