"""Offline RL with Implicit Constraint Q-learning (ICQ) on continuous actions: D4RL, Minari or LunarLander data.

Implements Algorithm 1 of Yang et al., "Believe What You See: Implicit Constraint Approach for Offline Multi-Agent
Reinforcement Learning" (NeurIPS 2021, arXiv 2106.03400). The critic evaluates pi* = mu * exp(Q / alpha) / Z with
importance weights on dataset actions only (eq. 10); the actor is extracted by weighted behaviour cloning
(KL(pi* || pi_theta)); Z is the batch softmax. Usage, logged metrics, details against the authors' code and results:
docs/icq_continuous.md.
"""

import copy
import dataclasses
import json
import os
import random
import re
import resource
import signal
import sys
import time
from dataclasses import dataclass
from typing import Annotated, Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter


def resolved_default(text):
    """The help's default of a flag resolved at run time (tyro would print "(default: None)")."""
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
    run_name: Annotated[Optional[str], resolved_default("{data}__{exp_name}__{alpha or bc}__{seed}__{time}")] = None
    """name of runs/{run_name}/ (with --resume: the checkpoint's run)"""
    save_model: bool = False
    """write runs/{run_name}/checkpoint.pt at every evaluation and at the end"""
    resume: Optional[str] = None
    """path of a checkpoint.pt to continue: its run keeps every setting; only schedule flags may change"""
    threads: int = 1
    """torch CPU threads"""

    # Algorithm specific arguments
    dataset_id: Optional[str] = None
    """a Minari dataset id, e.g. D4RL/antmaze/umaze-v1, D4RL/door/expert-v2, mujoco/hopper/medium-v0"""
    dataset_path: Optional[str] = None
    """an original D4RL HDF5 file (keys observations, actions, rewards, terminals, timeouts); needs --env-id"""
    env_id: Annotated[Optional[str], resolved_default("the Minari dataset's, else LunarLanderContinuous-v3")] = None
    """gymnasium id of the evaluation env; without a dataset, the built-in data are generated into datasets/ once"""
    quality: Literal["expert", "medium", "mixed"] = "mixed"
    """built-in data: the heuristic lander with N(0, 0.1) / N(0, 1) action noise, or a mix of four distinct landers"""
    dataset_size: int = 100_000
    """transitions in a built-in dataset (whole episodes, so slightly more)"""
    ref_min_score: Annotated[Optional[float], resolved_default("D4RL's, Minari's or the built-in data's")] = None
    """return scored 0 by eval/normalized_score (give it with --ref-max-score)"""
    ref_max_score: Annotated[Optional[float], resolved_default("D4RL's, Minari's or the built-in data's")] = None
    """return scored 100 by eval/normalized_score"""
    preset: Literal["auto", "locomotion", "antmaze", "adroit", "lunarlander"] = "auto"
    """the authors' per-domain settings for the options left unset (auto: from the env id and the dataset name)"""
    total_steps: int = 1_000_000
    """number of gradient steps (one critic and one actor update each)"""
    batch_size: Annotated[Optional[int], resolved_default("32; antmaze 1024, lunarlander 256 per --preset")] = None
    """minibatch size; the batch softmax normalises over it"""
    alpha: Annotated[Optional[float], resolved_default("600; antmaze 10, lunarlander 30 per --preset")] = None
    """actor temperature: weight = B * softmax_batch(signal / alpha); `inf` is exact behaviour cloning"""
    critic_alpha: Annotated[Optional[float], resolved_default("600; antmaze 10, lunarlander 1000 per --preset")] = None
    """critic temperature of the importance weight rho"""
    actor_signal: Annotated[Optional[Literal["td", "q"]], resolved_default("td; lunarlander q per --preset")] = None
    """what the actor weight exponentiates: the authors' one-step TD error, or Q(s, a) as the paper writes"""
    twin_q: Annotated[Optional[bool], resolved_default("False; antmaze True per --preset")] = None
    """two critics, min for targets and signals"""
    timeout_as_terminal: Annotated[Optional[bool], resolved_default("False; antmaze True per --preset")] = None
    """keep a time-limited episode's last step with done = 1 instead of dropping it"""
    critic_weight_scale: Annotated[Optional[float], resolved_default("0.5; antmaze and lunarlander 1 per --preset")] = (
        None
    )
    """rho = clamp(scale * B * softmax_batch(Q'/T), 0, 1), as the authors' code"""
    clip_critic_weights: bool = True
    """clamp rho to [0, 1] as the authors' code does; unclipped with scale 1 is eq. 10 as written, which can diverge"""
    gamma: float = 0.99
    """the discount factor"""
    tau: float = 0.005
    """polyak rate of the target critic"""
    actor_lr: float = 3e-4
    """actor learning rate (Adam)"""
    critic_lr: float = 3e-4
    """critic learning rate (Adam)"""
    actor_weight_decay: float = 1e-4
    """actor Adam weight decay"""
    eval_interval: int = 5000
    """gradient steps between evaluations"""
    eval_episodes: Annotated[Optional[int], resolved_default("10; antmaze 100 per --preset")] = None
    """episodes per evaluation"""
    log_interval: int = 1000
    """gradient steps between progress lines and TensorBoard scalars"""


# Flags a resumed run may change (plus --run-name and --cuda); every other setting comes from the checkpoint.
SCHEDULE_FLAGS = (
    "total_steps",
    "eval_interval",
    "log_interval",
    "eval_episodes",
    "threads",
    "track",
    "wandb_project_name",
    "wandb_entity",
    "resume",
)


# The authors' settings per domain (ICQ_softmax for MuJoCo/Adroit, ICQ-antmaze_softmax for AntMaze). Their critic weight
# is clamp(scale * B * softmax_batch(Q'/T), 0, 1) in both. LunarLander's preset is ours: its rewards reach +-100 in one
# step (landing, crash), so the MuJoCo T = 600 would leave the actor weights ~1 (BC), and the critic's T = 1000 keeps
# rho ~ 1 (a SARSA-like evaluation, as icq_discrete.py and ICQ-MA). Under such a critic the TD error
# r + gamma Q(s',a') - Q(s,a) has mean ~0 for every lander's actions, so it barely tells them apart (measured: no actor
# T in 1..100 beat exact BC on the mixed data); Q(s, a), the paper's signal, does, at T = 30 (README, sweep).
PRESETS = {
    "locomotion": dict(actor_signal="td", batch_size=32, alpha=600.0, critic_alpha=600.0, critic_weight_scale=0.5,
                       twin_q=False, timeout_as_terminal=False, eval_episodes=10),
    "antmaze": dict(actor_signal="td", batch_size=1024, alpha=10.0, critic_alpha=10.0, critic_weight_scale=1.0,
                    twin_q=True, timeout_as_terminal=True, eval_episodes=100),
    "lunarlander": dict(actor_signal="q", batch_size=256, alpha=30.0, critic_alpha=1000.0, critic_weight_scale=1.0,
                        twin_q=False, timeout_as_terminal=False, eval_episodes=10),
}  # fmt: skip
PRESETS["adroit"] = PRESETS["locomotion"]  # the authors' ICQ_softmax settings serve both
# D4RL reference returns (d4rl/infos.py), used only for an original D4RL file named as D4RL names its datasets.
D4RL_REF_SCORES = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
    "pen": (96.262799, 3076.8331),
    "door": (-56.512833, 2880.5693),
    "hammer": (-274.856578, 12794.1348),
    "relocate": (-6.425911, 4233.8778),
}
D4RL_NAME = re.compile(
    r"(hopper|halfcheetah|walker2d)-(random|medium|expert|medium-replay|medium-expert|full-replay)-v[012]"
    r"|(pen|door|hammer|relocate)-(human|cloned|expert)-v[01]"
)
# Built-in data: gymnasium's heuristic lander (continuous mode) and systematically worse landers. "mixed" holds each for
# a quarter of its transitions, so at most states three of four actions come from a worse lander (D4RL medium-replay
# idea). "main engine never fires" keeps the heuristic's steering, falls and crashes; "main engine over-fires" keeps the
# throttle >= 50 % and hovers until the time limit.
LANDERS = {
    "heuristic": lambda h, rng: h,
    "heuristic + N(0, 0.1)": lambda h, rng: np.clip(h + rng.normal(0, 0.1, 2), -1, 1),
    "heuristic + N(0, 1)": lambda h, rng: np.clip(h + rng.normal(0, 1.0, 2), -1, 1),
    "uniform random": lambda h, rng: rng.uniform(-1, 1, 2),
    "main engine never fires": lambda h, rng: np.array([-1.0, h[1]]),
    "main engine over-fires": lambda h, rng: np.array([min(h[0] + 1.0, 1.0), h[1]]),
}
BUILTIN = {
    "expert": {"heuristic + N(0, 0.1)": 1.0},
    "medium": {"heuristic + N(0, 1)": 1.0},
    "mixed": {
        "heuristic": 0.25,
        "uniform random": 0.25,
        "main engine never fires": 0.25,
        "main engine over-fires": 0.25,
    },
}
# Built-in score = 100 (return - random) / (heuristic - random). Measured once on LunarLanderContinuous-v3 (gymnasium
# 1.4.0): mean return of 1000 episodes, env.reset(seed=i) for i = 0..999, of uniform random actions
# (np.random.default_rng(0)) and of gymnasium.envs.box2d.lunar_lander.heuristic; standard errors 4.0 and 0.8.
RANDOM_RETURN, HEURISTIC_RETURN = -209.8, 282.8


def fail(msg):
    raise SystemExit(f"error: {msg}")


def rounded(x):
    """A metric for a progress line: 3 significant digits (whole numbers from 1000 on)."""
    return "n/a" if x is None else f"{x:.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def flag(name):
    return "--" + name.replace("_", "-")


def given_flags(args):
    """Fields set on the command line: those that differ from the defaults, and those named on sys.argv."""
    named = {arg[2:].split("=")[0].replace("-", "_") for arg in sys.argv[1:] if arg.startswith("--")}
    named |= {name[3:] for name in named if name.startswith("no_")}
    defaults = Args()
    return {
        f.name
        for f in dataclasses.fields(Args)
        if f.name in named or getattr(args, f.name) != getattr(defaults, f.name)
    }


def restore_args(args):
    """--resume: the checkpoint's (resolved) settings; of the command line only the schedule flags, --run-name, --cuda.

    A given flag that would change the algorithm or the data is refused, naming both values.
    """
    if not os.path.isfile(args.resume):
        fail(f"--resume {args.resume}: no such checkpoint")
    saved = torch.load(args.resume, map_location="cpu", weights_only=False)["args"]
    kept = SCHEDULE_FLAGS + ("run_name", "cuda")
    given = given_flags(args)
    for name in sorted(given - set(kept)):
        if name == "preset" and args.preset == "auto":
            continue  # the checkpoint holds the preset that auto resolved to
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


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def resolve_args(args):
    """Validate the flags and fill the preset's values; with --resume, the checkpoint's settings."""
    if args.resume is not None:
        args = restore_args(args)
    if args.dataset_id is not None and args.dataset_path is not None:
        fail("give at most one of --dataset-id (a Minari id) and --dataset-path (a D4RL HDF5 file)")
    builtin = args.dataset_id is None and args.dataset_path is None
    if builtin:
        args.env_id = args.env_id or "LunarLanderContinuous-v3"
        if args.env_id != "LunarLanderContinuous-v3":
            fail(
                f"no built-in dataset for --env-id {args.env_id}: use LunarLanderContinuous-v3, --dataset-id or "
                "--dataset-path"
            )
    name = (args.dataset_id or os.path.basename(args.dataset_path or "")).lower()
    preset = args.preset
    if preset == "auto":  # the env decides where it is known; otherwise the dataset's name
        adroit = any(task in name for task in ("pen", "door", "hammer", "relocate"))
        lunar = builtin or "lunarlander" in (args.env_id or "").lower()
        preset = "lunarlander" if lunar else "antmaze" if "antmaze" in name else "adroit" if adroit else "locomotion"
    for key, value in PRESETS[preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.preset = preset
    if args.dataset_path is not None and args.env_id is None:
        fail(
            "--dataset-path needs --env-id, the gymnasium env to evaluate in (e.g. Hopper-v5 for hopper-medium-v2.hdf5)"
        )
    for name in ("alpha", "critic_alpha"):
        if not getattr(args, name) > 0:
            fail(
                f"{flag(name)} is a temperature and must be > 0 (got {getattr(args, name)}); "
                "--alpha inf is behaviour cloning"
            )
    for name in (
        "batch_size",
        "total_steps",
        "eval_interval",
        "log_interval",
        "eval_episodes",
        "dataset_size",
        "threads",
    ):
        if getattr(args, name) < 1:
            fail(f"{flag(name)} must be >= 1 (got {getattr(args, name)})")
    refs = (args.ref_min_score, args.ref_max_score)
    if refs != (None, None) and (None in refs or refs[0] == refs[1]):
        fail("give both --ref-min-score and --ref-max-score, and different ones")
    return args


def reference_scores(args, minari_dataset):
    """(return scored 0, return scored 100, where they come from) for eval/normalized_score, or None.

    Order: --ref-min/max-score; a Minari dataset's own references; D4RL's only for a D4RL file named as D4RL names it
    (e.g. hopper-medium-v2.hdf5: D4RL measured them on the -v3/-v0 envs); the built-in data's random and heuristic.
    """
    if args.ref_min_score is not None:
        return args.ref_min_score, args.ref_max_score, "--ref-min-score/--ref-max-score"
    if minari_dataset is not None:
        low, high = (minari_dataset.storage.metadata.get(k) for k in ("ref_min_score", "ref_max_score"))
        return (
            None if low is None or high is None else (float(low), float(high), f"Minari metadata of {args.dataset_id}")
        )
    if args.dataset_path is not None:
        name = os.path.splitext(os.path.basename(args.dataset_path))[0]
        if D4RL_NAME.fullmatch(name):
            return (*D4RL_REF_SCORES[name.split("-")[0]], f"D4RL reference returns for {name} (d4rl/infos.py)")
        return None
    return RANDOM_RETURN, HEURISTIC_RETURN, "built-in: uniform random and heuristic lander, 1000 episodes each"


def make_env(env_id, minari_dataset):
    """The evaluation env. gymnasium-robotics (AntMaze, Adroit) is imported only when the id needs it (its import
    warns)."""
    make = (lambda: gym.make(env_id)) if env_id else (lambda: minari_dataset.recover_environment(eval_env=True))
    for attempt in range(2):
        try:
            return make()
        except gym.error.Error as exc:
            if attempt == 1 or not isinstance(exc, gym.error.NameNotFound):
                fail(
                    f"--env-id {env_id}: {exc}"
                    if env_id
                    else f"the eval env of {minari_dataset.spec.dataset_id}: {exc}"
                )
            import gymnasium_robotics

            gym.register_envs(gymnasium_robotics)


# ---------------------------------------------------------------------------------------------------------------------
# Data: every transition carries the next action a' of the same episode, because the ICQ operator (eq. 10) only ever
# evaluates Q at dataset actions. A time-limited episode's last step has no a' and is dropped; true terminals are kept
# with done = 1 (their a' is never used).
def flatten_obs(obs):
    """AntMaze dict observations become the D4RL 29-d layout (x, y first) followed by the 2-d goal."""
    if isinstance(obs, dict):
        return np.concatenate([obs["achieved_goal"], obs["observation"], obs["desired_goal"]], axis=-1)
    return obs


def episode_transitions(obs, actions, rewards, terminals, timeout_as_terminal):
    """One episode (obs has one more row than actions) -> (s, a, r, s', a', done) arrays."""
    steps = len(actions)
    ends_in_terminal = bool(terminals[-1]) or timeout_as_terminal
    keep = steps if ends_in_terminal else steps - 1
    next_actions = np.concatenate([actions[1:], actions[-1:]])  # the last a' only pads a terminal row
    done = np.zeros(steps, dtype=np.float32)
    done[-1] = float(ends_in_terminal)
    return obs[:keep], actions[:keep], rewards[:keep], obs[1 : keep + 1], next_actions[:keep], done[:keep]


def load_minari(dataset_id, timeout_as_terminal):
    import minari

    try:
        dataset = minari.load_dataset(dataset_id)
    except (FileNotFoundError, ValueError) as exc:
        root = os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")
        fail(
            f"Minari dataset '{dataset_id}' is not in the local store ({root}): {exc}\n"
            f"Download it once with `minari download {dataset_id}` (needs network and `pip install minari[hf]`), "
            "or pass an original D4RL file with --dataset-path FILE.hdf5 --env-id ENV."
        )
    parts, returns = [], []
    for ep in dataset.iterate_episodes():
        obs = flatten_obs(ep.observations)
        parts.append(episode_transitions(obs, ep.actions, ep.rewards, ep.terminations, timeout_as_terminal))
        returns.append(float(np.sum(ep.rewards)))
    return [np.concatenate(column) for column in zip(*parts)], returns, dataset


def load_d4rl_hdf5(path, timeout_as_terminal):
    import h5py

    if not os.path.isfile(path):
        fail(f"--dataset-path {path}: no such file")
    if not h5py.is_hdf5(path):
        fail(
            f"--dataset-path {path} is not an HDF5 file (expected a D4RL file with observations, actions, rewards, ...)"
        )
    with h5py.File(path, "r") as f:
        missing = [k for k in ("observations", "actions", "rewards", "terminals", "timeouts") if k not in f]
        if missing:
            fail(f"{path} is not a D4RL file: missing keys {missing} (has {sorted(f.keys())})")
        data = {
            k: f[k][:]
            for k in ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")
            if k in f
        }
        if "infos/goal" in f:  # AntMaze: append the goal, as the authors' replay buffer does
            for k in ("observations", "next_observations"):
                if k in data:
                    data[k] = np.concatenate([data[k], f["infos/goal"][:]], axis=-1)
    # The file is one long array; episodes end at a terminal or a timeout (the final row ends one too).
    data["terminals"], data["timeouts"] = data["terminals"].astype(bool), data["timeouts"].astype(bool)
    ends = np.flatnonzero(data["terminals"] | data["timeouts"]).tolist()
    if not ends or ends[-1] != len(data["rewards"]) - 1:
        ends.append(len(data["rewards"]) - 1)
    # The final observation of an episode is next_observations[end] when the file has it; otherwise it only pads a row
    # that is either dropped (timeout) or terminal (s' unused).
    last_obs = data.get("next_observations", data["observations"])
    parts, returns, start = [], [], 0
    for end in ends:
        sl = slice(start, end + 1)
        obs = np.concatenate([data["observations"][sl], last_obs[end : end + 1]])
        parts.append(
            episode_transitions(
                obs, data["actions"][sl], data["rewards"][sl], data["terminals"][sl], timeout_as_terminal
            )
        )
        returns.append(float(data["rewards"][sl].sum()))
        start = end + 1
    return [np.concatenate(column) for column in zip(*parts)], returns


def builtin_data(quality, size):
    """Roll out the BUILTIN[quality] landers once into datasets/LunarLanderContinuous-v3-{quality}-{size}.npz.

    Returns the transitions, the episode returns and {lander: mean episode return}, also written to a .json beside it.
    """
    from gymnasium.envs.box2d.lunar_lander import heuristic

    path = f"datasets/LunarLanderContinuous-v3-{quality}-{size}"
    if not os.path.exists(path + ".npz"):
        print(f"generating {path}.npz", flush=True)
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
        os.makedirs("datasets", exist_ok=True)
        with open(path + ".npz.tmp", "wb") as f:  # atomic, so a concurrent run never reads half a file
            np.savez(
                f,
                **{k: np.array(v, np.float32 if k in ("obs", "actions", "rewards") else None) for k, v in cols.items()},
            )
        os.replace(path + ".npz.tmp", path + ".npz")
    with np.load(path + ".npz") as npz:
        d = {k: npz[k] for k in npz.files}  # each npz[k] re-reads the file: read every array once
    ends = np.cumsum(d["lengths"])
    parts, returns = [], []
    for i, (start, end) in enumerate(zip(ends - d["lengths"], ends)):  # episode i has rows start+i..end+i of obs
        parts.append(
            episode_transitions(
                d["obs"][start + i : end + i + 1],
                d["actions"][start:end],
                d["rewards"][start:end],
                d["terminals"][start:end],
                False,
            )
        )
        returns.append(float(d["rewards"][start:end].sum()))
    names = list(LANDERS)
    components = {names[k]: float(np.mean(np.array(returns)[d["lander"] == k])) for k in np.unique(d["lander"])}
    with open(path + ".json.tmp", "w") as f:
        json.dump(
            {"episodes": len(returns), "mean_return": float(np.mean(returns)), "lander_mean_return": components},
            f,
            indent=2,
        )
    os.replace(path + ".json.tmp", path + ".json")
    return [np.concatenate(column) for column in zip(*parts)], returns, components


def make_dataset_tensors(columns, device):
    names = ("obs", "actions", "rewards", "next_obs", "next_actions", "dones")
    return {n: torch.as_tensor(np.asarray(c, dtype=np.float32), device=device) for n, c in zip(names, columns)}


# ---------------------------------------------------------------------------------------------------------------------
# Networks (the authors' ICQ_softmax core.py): Q is a 256-256 MLP on (s, a); the actor is a 4x256 MLP with a tanh mean
# and a state-independent log-std squashed into [-6, 0]; log pi is the Normal density of the dataset action.
def mlp(sizes):
    layers = []
    for i in range(len(sizes) - 1):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class Critic(nn.Module):
    def __init__(self, obs_dim, act_dim, num_q):
        super().__init__()
        self.qs = nn.ModuleList(mlp([obs_dim + act_dim, 256, 256, 1]) for _ in range(num_q))

    def forward(self, obs, act):
        x = torch.cat([obs, act], -1)
        return torch.stack([q(x).squeeze(-1) for q in self.qs])  # [num_q, B]


class Actor(nn.Module):
    def __init__(self, obs_dim, act_dim, action_space):
        super().__init__()
        self.net = mlp([obs_dim, 256, 256, 256, 256, act_dim])
        self.log_std_logits = nn.Parameter(torch.zeros(act_dim))  # initial std e^-3
        low, high = (torch.as_tensor(b, dtype=torch.float32) for b in (action_space.low, action_space.high))
        self.register_buffer("action_scale", (high - low) / 2)
        self.register_buffer("action_bias", (high + low) / 2)

    def forward(self, obs):
        return torch.tanh(self.net(obs)) * self.action_scale + self.action_bias

    def log_prob(self, obs, act):
        std = torch.exp(-6.0 + 6.0 * torch.sigmoid(self.log_std_logits))
        return torch.distributions.Normal(self(obs), std).log_prob(act).sum(-1)


# ---------------------------------------------------------------------------------------------------------------------
# ICQ losses
@torch.no_grad()
def icq_weights(x, temperature, mask=None):
    """n * softmax(x / temperature) over dim 0 (the minibatch), the practical Z of the paper (Sec. 4.1).

    Entries where the boolean `mask` is False get weight 0 and do not enter the softmax; n is the number of valid
    entries, so the valid weights average to 1. softmax subtracts the max, so large x or small temperatures stay finite.
    """
    logits = x / temperature
    if mask is None:
        return x.shape[0] * torch.softmax(logits, dim=0)
    weights = mask.sum(0, keepdim=True) * torch.softmax(logits.masked_fill(~mask, -torch.inf), dim=0)
    return torch.where(mask, weights, torch.zeros_like(weights))  # a column with no valid entry gives 0, not NaN


def critic_weights(next_q, done, temperature, scale, clip):
    """rho(s', a') = exp(Q'/T) / Z of eq. 10 with the batch Z: clamp(scale * n * softmax_batch(Q'/T), 0, 1) by default.

    Terminal rows carry no a' and stay out of the softmax. Unclipped (clip=False, scale=1, the literal eq. 10), the
    softmax runs across *different* states, so one row's weight can reach n: gamma * rho > 1 there, the backup is no
    contraction and Q diverges on mixed data. The authors' clamp keeps gamma * rho <= gamma.
    """
    rho = scale * icq_weights(next_q, temperature, mask=done == 0)
    return rho.clamp(0.0, 1.0) if clip else rho


def critic_target(reward, done, next_q, gamma, temperature, scale=1.0, clip=True):
    """The ICQ target r + gamma (1 - d) rho Q'(s', a') (eq. 10), all [B]; a' is the dataset's next action.

    Returns (target, rho); rho is the authors' clamped weight by default (clip=True).
    """
    rho = critic_weights(next_q, done, temperature, scale, clip)
    return reward + gamma * (1.0 - done) * rho * next_q, rho


def critic_loss(critic, critic_target_net, batch, gamma, temperature, scale=1.0, clip=True):
    """Squared error to the ICQ target; twin critics share one target built from their min (authors' AntMaze code).

    Q and Q' are evaluated only at the batch's (s, a) and (s', a'): the implicit constraint of eq. 10.
    Returns the loss, Q(s, a) [num_q, B] and rho [B] (detached, for the divergence monitor).
    """
    obs, act, rew, next_obs, next_act, done = batch
    with torch.no_grad():
        next_q = critic_target_net(next_obs, next_act).min(0).values
        target, rho = critic_target(rew, done, next_q, gamma, temperature, scale, clip)
    q = critic(obs, act)
    return ((q - target) ** 2).mean(1).sum(), q.detach(), rho


@torch.no_grad()
def actor_signal(critic, batch, gamma, kind):
    """What the actor weight exponentiates: Q(s, a) (paper) or the one-step TD error (authors' code, "more stable")."""
    obs, act, rew, next_obs, next_act, done = batch
    q = critic(obs, act)
    signal = q if kind == "q" else rew + gamma * (1.0 - done) * critic(next_obs, next_act) - q
    return signal.min(0).values


def actor_loss(log_prob, signal, temperature):
    """Weighted behaviour cloning, the KL(pi* || pi_theta) objective of Sec. 4.2: -mean(exp(signal/T)/Z * log pi).

    temperature = inf is exact behaviour cloning: every weight is exactly 1 (not n * softmax(0), which rounds).
    """
    if temperature == float("inf"):
        return -log_prob.mean()
    return -(icq_weights(signal, temperature) * log_prob).mean()


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation: deterministic mean action; AntMaze counts success (Minari's AntMaze eval env never ends on success).
def evaluate(actor, env, episodes, seed, device, antmaze):
    returns, successes = [], []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        ret, success, done = 0.0, False, False
        while not done:
            with torch.no_grad():
                action = actor(torch.as_tensor(flatten_obs(obs), dtype=torch.float32, device=device)).cpu().numpy()
            obs, reward, terminated, truncated, info = env.step(action)
            ret += float(reward)
            success = success or bool(info.get("success", False))
            done = terminated or truncated or (antmaze and success)
        returns.append(ret)
        successes.append(success)
    return float(np.mean(returns)), float(np.mean(successes))


def normalized_score(refs, antmaze, mean_return, success_rate):
    """x100 scores: AntMaze success rate; otherwise 100 (return - ref_min) / (ref_max - ref_min); None without
    references."""
    if antmaze:
        return 100.0 * success_rate
    return None if refs is None else 100.0 * (mean_return - refs[0]) / (refs[1] - refs[0])


def time_left(start_time, steps_done, steps_left):
    """Time left at this process's rate so far, evaluations included: 1h02m or 3m12s."""
    seconds = int((time.time() - start_time) / steps_done * steps_left)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def last3_mean(evaluations):
    """The README's metric: mean of the last three evaluations' normalised score (return where the data has none)."""
    if not evaluations:
        return None, None
    last = evaluations[-3:]
    if all(e["score"] is not None for e in last):
        return float(np.mean([e["score"] for e in last])), "normalized score"
    return float(np.mean([e["return"] for e in last])), "return"


def main(args):
    """Algorithm 1: one critic step (eq. 10) and one weighted-BC actor step per minibatch; returns the summary."""
    args = resolve_args(args)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines reach log files as they happen
    # SIGINT / SIGTERM only set a flag: the loop finishes its update, then saves the run and exits.
    stop = {"signal": None}
    previous_handlers = {s: signal.signal(s, lambda signum, frame: stop.update(signal=signum)) for s in STOP_SIGNALS}
    torch.set_num_threads(args.threads)
    checkpoint = None if args.resume is None else torch.load(args.resume, map_location="cpu", weights_only=False)
    dataset_name = (
        args.dataset_id
        or os.path.splitext(os.path.basename(args.dataset_path or ""))[0]
        or f"{args.env_id}-{args.quality}"
    ).replace("/", "-")
    method = "bc" if args.alpha == float("inf") else f"alpha{args.alpha:g}"
    run_name = args.run_name or f"{dataset_name}__{args.exp_name}__{method}__{args.seed}__{int(time.time())}"
    args.run_name = run_name  # the checkpoint keeps it: a resumed run continues in the same directory
    run_dir = f"runs/{run_name}"
    ckpt_path = f"{run_dir}/checkpoint.pt"
    print(f"run directory: {run_dir}/", flush=True)

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # Data and evaluation env
    minari_dataset, components = None, None
    if args.dataset_id is not None:
        columns, returns, minari_dataset = load_minari(args.dataset_id, args.timeout_as_terminal)
    elif args.dataset_path is not None:
        columns, returns = load_d4rl_hdf5(args.dataset_path, args.timeout_as_terminal)
    else:
        columns, returns, components = builtin_data(args.quality, args.dataset_size)
    env = make_env(args.env_id, minari_dataset)
    refs = reference_scores(args, minari_dataset)
    data = make_dataset_tensors(columns, device)
    obs_dim, act_dim = data["obs"].shape[1], data["actions"].shape[1]
    env_obs_dim = flatten_obs(env.observation_space.sample()).shape[0]
    if (obs_dim, act_dim) != (env_obs_dim, env.action_space.shape[0]):
        fail(
            f"the data and the env disagree: observation size {obs_dim} vs {env_obs_dim}, action size {act_dim} vs "
            f"{env.action_space.shape[0]} (data: {args.dataset_id or args.dataset_path}, env: {env.spec.id}); "
            "pick the matching --env-id"
        )
    num_transitions = data["rewards"].shape[0]
    dataset_return = float(np.mean(returns))
    # |Q| <= max|r| / (1 - gamma) for any policy's values: a critic beyond it diverges (gamma * rho > 1 somewhere).
    q_bound = float(data["rewards"].abs().max()) / (1.0 - args.gamma)
    print(
        f"{num_transitions} transitions from {dataset_name} ({len(returns)} episodes, mean return "
        f"{dataset_return:.1f}), preset {args.preset}, eval env {env.spec.id}",
        flush=True,
    )
    if components is not None:
        print("mean return per lander: " + ", ".join(f"{k} {v:.1f}" for k, v in components.items()), flush=True)

    actor = Actor(obs_dim, act_dim, env.action_space).to(device)
    critic = Critic(obs_dim, act_dim, 2 if args.twin_q else 1).to(device)
    critic_target_net = copy.deepcopy(critic).requires_grad_(False)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.actor_lr, weight_decay=args.actor_weight_decay)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.critic_lr)
    state_modules = (
        ("actor", actor),
        ("critic", critic),
        ("critic_target", critic_target_net),
        ("actor_optimizer", actor_optimizer),
        ("critic_optimizer", critic_optimizer),
    )

    start_step, evaluations, q_abs_max = 0, [], 0.0
    if checkpoint is not None:
        for key, module in state_modules:
            module.load_state_dict(checkpoint[key])
        random.setstate(checkpoint["rng"]["python"])
        np.random.set_state(checkpoint["rng"]["numpy"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if device.type == "cuda" and checkpoint["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
        start_step, evaluations = checkpoint["step"], checkpoint["evaluations"]
        q_abs_max = checkpoint.get("q_abs_max", 0.0)
        print(f"resumed from {args.resume} at step {start_step}")

    if args.track:
        import wandb

        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            sync_tensorboard=True,
            config=vars(args),
            name=run_name,
            save_code=True,
        )
    writer = SummaryWriter(run_dir)
    writer.add_text(
        "hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    )

    def save_checkpoint(step):
        state = {key: module.state_dict() for key, module in state_modules}
        state["rng"] = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
        }
        state.update(step=step, args=vars(args), evaluations=evaluations, q_abs_max=float(q_abs_max))
        torch.save(state, ckpt_path + ".tmp")
        os.replace(ckpt_path + ".tmp", ckpt_path)  # atomic: a crash mid-save leaves the previous checkpoint intact

    def check_finite(nonfinite_step):
        if int(nonfinite_step) >= 0:
            if os.path.exists(ckpt_path):
                kept = f"the last checkpoint {ckpt_path} is unchanged; continue with --resume {ckpt_path}"
            else:
                kept = "no checkpoint was written"
            fail(f"non-finite loss (NaN or inf) at step {int(nonfinite_step)}; training stopped, {kept}")

    def write_summary(step, interrupted):
        wall_seconds = time.time() - start_time
        scores = [e["score"] for e in evaluations if e["score"] is not None]  # None where the data has no references
        mean3, metric = last3_mean(evaluations)
        summary = {
            "args": vars(args),
            "run_name": run_name,
            "interrupted": interrupted,
            "step": step,
            "last3_mean": mean3,
            "last3_metric": metric,
            "final_score": evaluations[-1]["score"] if evaluations else None,
            "best_score": max(scores) if scores else None,
            "final_return": evaluations[-1]["return"] if evaluations else None,
            "best_return": max(e["return"] for e in evaluations) if evaluations else None,
            "updates_per_second": (step - start_step) / max(wall_seconds - eval_seconds, 1e-9),
            "wall_seconds": wall_seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "dataset_return": dataset_return,
            "dataset_lander_returns": components,
            "reference_scores": None if refs is None else {"min": refs[0], "max": refs[1], "source": refs[2]},
            "q_abs_max": float(q_abs_max),
            "q_bound": q_bound,
            "evaluations": evaluations,
        }
        with open(f"{run_dir}/summary.json.tmp", "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(f"{run_dir}/summary.json.tmp", f"{run_dir}/summary.json")
        return summary

    nonfinite_step = torch.full((), -1, device=device)  # first step with a NaN/inf loss, read only at log intervals
    q_abs_max = torch.full(
        (), q_abs_max, device=device
    )  # running max of |Q(s, a)| over the batches, read at log intervals
    q_exceeded_step = torch.full((), -1, device=device)  # first step with |Q| > q_bound
    warned = False
    start_time, eval_seconds = time.time(), 0.0
    step = start_step
    for step in range(start_step + 1, args.total_steps + 1):
        idx = torch.randint(num_transitions, (args.batch_size,), device=device)

        batch = tuple(data[k][idx] for k in ("obs", "actions", "rewards", "next_obs", "next_actions", "dones"))
        loss_q, q, rho = critic_loss(
            critic,
            critic_target_net,
            batch,
            args.gamma,
            args.critic_alpha,
            args.critic_weight_scale,
            args.clip_critic_weights,
        )
        critic_optimizer.zero_grad()
        loss_q.backward()
        critic_optimizer.step()

        # The actor's weights come from the just-updated critic, as in the authors' code.
        weight_signal = actor_signal(critic, batch, args.gamma, args.actor_signal)
        loss_pi = actor_loss(actor.log_prob(batch[0], batch[1]), weight_signal, args.alpha)
        actor_optimizer.zero_grad()
        loss_pi.backward()
        actor_optimizer.step()

        with torch.no_grad():
            for p, p_target in zip(critic.parameters(), critic_target_net.parameters()):
                p_target.lerp_(p, args.tau)
        nonfinite_step = torch.where((nonfinite_step < 0) & ~torch.isfinite(loss_q + loss_pi), step, nonfinite_step)
        q_abs_max = torch.maximum(q_abs_max, q.abs().max())
        q_exceeded_step = torch.where((q_exceeded_step < 0) & (q_abs_max > q_bound), step, q_exceeded_step)

        if step % args.log_interval == 0:
            check_finite(nonfinite_step)
            eta = time_left(start_time, step - start_step, args.total_steps - step)
            sps = int((step - start_step) / (time.time() - start_time - eval_seconds))
            writer.add_scalar("losses/critic_loss", loss_q.item(), step)
            writer.add_scalar("losses/actor_loss", loss_pi.item(), step)
            writer.add_scalar("losses/actor_signal", weight_signal.mean().item(), step)
            writer.add_scalar("losses/q_mean", q.mean().item(), step)
            writer.add_scalar("losses/max_critic_weight", rho.max().item(), step)
            writer.add_scalar("losses/q_abs_max", q_abs_max.item(), step)
            writer.add_scalar("charts/SPS", sps, step)
            print(
                f"step {step}/{args.total_steps} | critic {loss_q.item():.4f} | actor {loss_pi.item():.4f} | "
                f"Q mean {q.mean().item():.1f} | max rho {rho.max().item():.2f} | {sps} steps/s | ETA {eta}",
                flush=True,
            )
            if not warned and int(q_exceeded_step) >= 0:
                warned = True
                if not args.clip_critic_weights:
                    fix = "use the authors' clamped weight (drop --no-clip-critic-weights)"
                else:
                    fix = "try a larger --critic-alpha or --critic-weight-scale 0.5"
                print(
                    f"warning: |Q| = {q_abs_max.item():.3g} at step {int(q_exceeded_step)} left the bound "
                    f"max|r| / (1 - gamma) = {q_bound:.3g} that the rewards imply: the critic diverges; {fix}",
                    file=sys.stderr,
                    flush=True,
                )

        if step % args.eval_interval == 0 or step == args.total_steps:
            check_finite(nonfinite_step)
            eval_start = time.time()
            actor.eval()
            antmaze = args.preset == "antmaze"
            mean_return, success_rate = evaluate(actor, env, args.eval_episodes, args.seed + 10_000, device, antmaze)
            actor.train()
            score = normalized_score(refs, antmaze, mean_return, success_rate)
            eval_seconds += time.time() - eval_start
            evaluations.append({"step": step, "return": mean_return, "score": score, "success_rate": success_rate})
            writer.add_scalar("eval/episodic_return", mean_return, step)
            if score is not None:
                writer.add_scalar("eval/normalized_score", score, step)
            eta = time_left(start_time, step - start_step, args.total_steps - step)
            score_text = f", score {score:.1f}" if score is not None else ""
            print(f"eval step {step}: return {mean_return:.1f}{score_text} | ETA {eta}", flush=True)
            if args.save_model:
                save_checkpoint(step)

        if stop["signal"] is not None:
            check_finite(nonfinite_step)
            save_checkpoint(step)
            write_summary(step, interrupted=True)
            env.close()
            writer.close()
            for s, handler in previous_handlers.items():
                signal.signal(s, handler)
            print(
                f"interrupted at step {step} ({signal.Signals(stop['signal']).name}): checkpoint {ckpt_path}; "
                f"continue with: python {os.path.basename(__file__)} --resume {ckpt_path}",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(128 + stop["signal"])

    for s, handler in previous_handlers.items():
        signal.signal(s, handler)
    summary = write_summary(step, interrupted=False)
    mean3, metric = summary["last3_mean"], summary["last3_metric"]
    print(f"done: last-3 eval mean {rounded(mean3)} ({metric}), summary in {run_dir}/summary.json", flush=True)
    env.close()
    writer.close()
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__.split("\n\n")[0]))
