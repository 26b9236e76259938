"""Offline RL with Implicit Constraint Q-learning (ICQ) on discrete actions: Minari, D4RL-layout or LunarLander data.

Implements ICQ (Yang et al., "Believe What You See: Implicit Constraint Approach for Offline Multi-Agent Reinforcement
Learning", NeurIPS 2021, arXiv 2106.03400) for one agent with discrete actions: ICQ-MA without the mixer. The critic
evaluates pi* = mu * exp(Q / alpha) / Z with importance weights on dataset actions only (eq. 10), and the actor is
extracted by weighted behaviour cloning. Z is the batch softmax of the authors' code (`--normalizer batch`) or the exact
per-state sum_b mu(b|s) exp(Q(s,b)/alpha) with mu a learned behaviour model (`--normalizer behavior`). Usage, logged
metrics, details and results: docs/icq_discrete.md.
"""

import copy
import dataclasses
import json
import math
import os
import random
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
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter


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
    run_name: Annotated[
        Optional[str], tyro.conf.arg(help_behavior_hint="(default: {data}__{exp_name}__{alpha or bc}__{seed}__{time})")
    ] = None
    """name of runs/{run_name}/ (with --resume: the checkpoint's run)"""
    save_model: bool = False
    """write runs/{run_name}/checkpoint.pt at every evaluation and at the end"""
    resume: Optional[str] = None
    """path of a checkpoint.pt to continue: its run keeps every setting; only schedule flags may change"""

    # Algorithm specific arguments
    dataset_id: Optional[str] = None
    """a Minari dataset id with a Discrete action space (already downloaded); unset: the built-in data"""
    dataset_path: Optional[str] = None
    """a D4RL-layout HDF5 file (observations, integer actions, rewards, terminals, timeouts); evaluated on --env-id"""
    env_id: str = "LunarLander-v3"
    """the evaluation env of --dataset-path, or the built-in dataset's env (only LunarLander-v3, data in datasets/)"""
    quality: Literal["expert", "medium", "mixed"] = "mixed"
    """built-in dataset: heuristic lander with epsilon 0.05 / 0.25 random actions, or a mixture of distinct policies"""
    dataset_size: int = 100_000
    """transitions in a built-in dataset (whole episodes, so slightly more)"""
    normalizer: Literal["batch", "behavior"] = "batch"
    """Z of pi* = mu exp(Q/T) / Z: softmax over the minibatch (authors), or exact per state from a learned mu"""
    total_steps: int = 100_000
    """number of gradient steps (one behaviour, one critic and one actor update each)"""
    batch_size: int = 256
    """minibatch size; the batch softmax normalises over it"""
    alpha: float = 10.0
    """actor temperature on the advantage; inf is exact behaviour cloning (every weight exactly 1)"""
    critic_alpha: float = 100.0
    """critic temperature of the importance weight rho on Q'(s', a')"""
    critic_weight_scale: float = 1.0
    """batch normaliser: rho = scale * n * softmax_batch(Q'/T) (the authors' MuJoCo code uses 0.5)"""
    clip_critic_weights: bool = True
    """batch normaliser: clamp rho to [0, 1] as the authors' code does (unclipped, single weights can reach n)"""
    gamma: float = 0.99
    """the discount factor"""
    tau: float = 0.005
    """polyak rate of the target critic"""
    actor_lr: float = 3e-4
    """actor and behaviour-model learning rate (Adam)"""
    critic_lr: float = 3e-4
    """critic learning rate (Adam)"""
    eval_interval: int = 10_000
    """gradient steps between evaluations"""
    eval_episodes: int = 10
    """episodes per evaluation (greedy actions)"""
    log_interval: int = 1000
    """gradient steps between progress lines and TensorBoard scalars"""
    threads: int = 1
    """torch CPU threads"""


# Built-in data. expert / medium: gymnasium's heuristic lander whose every action is replaced by a uniform random one
# with probability epsilon (greedy BC recovers the heuristic from such data). mixed: whole episodes of distinct
# policies, each episode's policy drawn with these shares; the heuristic is a minority and the majority never fires the
# main engine, so where the heuristic would brake the data's most common action is a worse one (offline RL's case, not
# BC's).
EPSILON = {"expert": 0.05, "medium": 0.25}
MIXED_SHARES = {"heuristic": 0.25, "no-main-engine": 0.5, "random": 0.25}
MIXED_POLICIES = {  # (heuristic action h, rng) -> action
    "heuristic": lambda h, rng: h,
    "no-main-engine": lambda h, rng: 0 if h == 2 else h,  # the heuristic, but it never fires the main engine: crashes
    "random": lambda h, rng: int(rng.integers(4)),
}
# eval/normalized_score = 100 (return - random) / (heuristic - random). Measured once on LunarLander-v3 (gymnasium
# 1.4.0, box2d 2.3.10): mean return over 1000 episodes, env.reset(seed=i) for i = 0..999, of uniform random actions
# (np.random.default_rng(0)) and of gymnasium.envs.box2d.lunar_lander.heuristic; standard errors 3.5 and 2.9.
RANDOM_RETURN, HEURISTIC_RETURN = -181.7, 243.4


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
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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
    """--resume: the checkpoint's settings; of the command line only the schedule flags, --run-name and --cuda.

    A given flag that would change the algorithm or the data is refused, naming both values.
    """
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
    if not args.alpha > 0:
        fail(f"--alpha is a temperature and must be > 0 (got {args.alpha}); --alpha inf is exact behaviour cloning")
    if not 0 < args.critic_alpha < math.inf:
        fail(f"--critic-alpha is a temperature and must be > 0 and finite (got {args.critic_alpha})")
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
    if args.dataset_id is not None and args.dataset_path is not None:
        fail("pass one of --dataset-id and --dataset-path")
    if args.dataset_id is None and args.dataset_path is None and args.env_id != "LunarLander-v3":
        fail(
            f"no built-in dataset for --env-id {args.env_id}: use LunarLander-v3, a Minari id with --dataset-id, "
            "or a D4RL-layout HDF5 file with --dataset-path"
        )
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Data: every transition carries the next action a' of the same episode, because the ICQ operator (eq. 10) only ever
# evaluates Q at dataset actions. A time-limited episode's last step has no a' and is dropped; true terminals are kept
# with done = 1 (their a' is never used).
def flatten(space, x):
    """A batch of observations of `space` -> float32 [n, dim]: images and dicts flattened, Discrete one-hot, Text
    dropped."""
    if isinstance(space, gym.spaces.Dict):
        return np.concatenate(
            [flatten(sub, x[k]) for k, sub in space.spaces.items() if not isinstance(sub, gym.spaces.Text)], -1
        )
    if isinstance(space, gym.spaces.Discrete):
        return np.eye(space.n, dtype=np.float32)[np.asarray(x, dtype=np.int64).reshape(-1) - space.start]
    x = np.asarray(x, dtype=np.float32)
    return x.reshape(len(x), -1)


def add_batch_dim(obs):
    return {k: add_batch_dim(v) for k, v in obs.items()} if isinstance(obs, dict) else np.asarray(obs)[None]


def episode_transitions(obs, actions, rewards, terminals):
    """One episode (obs has one more row than actions) -> (s, a, r, s', a', done) arrays."""
    steps = len(actions)
    keep = steps if terminals[-1] else steps - 1
    next_actions = np.concatenate([actions[1:], actions[-1:]])  # the last a' only pads a terminal row
    done = np.zeros(steps, dtype=np.float32)
    done[-1] = float(terminals[-1])
    return obs[:keep], actions[:keep], rewards[:keep], obs[1 : keep + 1], next_actions[:keep], done[:keep]


def builtin_episodes(env_id, quality, size):
    """Roll out the built-in policies for `size` transitions once, cached under datasets/.

    Returns the episodes and {policy: mean episode return}. The mixed data also stores the fraction of its states where
    the heuristic's action is the mixture's most likely action sum_k share_k pi_k(a|s) (what greedy BC imitates).
    """
    from gymnasium.envs.box2d.lunar_lander import heuristic

    path = (
        f"datasets/{env_id}-{quality}-{size}.npz"
        if quality != "mixed"
        else f"datasets/{env_id}-mixed-policies-{size}.npz"
    )
    if not os.path.exists(path):
        print(f"generating {path}", flush=True)
        env, rng = gym.make(env_id), np.random.default_rng(["expert", "medium", "mixed"].index(quality))
        obs, actions, rewards, terminals, lengths, policies, heuristic_actions = [], [], [], [], [], [], []
        while len(actions) < size:
            policy = (
                rng.choice(list(MIXED_SHARES), p=list(MIXED_SHARES.values()))
                if quality == "mixed"
                else f"heuristic-epsilon-{EPSILON[quality]}"
            )
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
                (
                    obs.append(o),
                    actions.append(a),
                    rewards.append(r),
                    terminals.append(terminated),
                    heuristic_actions.append(h),
                )
                done = terminated or truncated
            lengths.append(len(actions) - sum(lengths)), policies.append(policy)
        h = np.array(heuristic_actions)
        mixture = sum(
            share
            * (np.full((len(h), 4), 0.25) if k == "random" else np.eye(4)[[MIXED_POLICIES[k](a, None) for a in h]])
            for k, share in MIXED_SHARES.items()
        )
        os.makedirs("datasets", exist_ok=True)
        with open(path + ".tmp", "wb") as f:  # atomic, so a concurrent run never reads half a file
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
    with np.load(path) as npz:
        d = {k: npz[k] for k in npz.files}  # each npz[k] re-reads the file: read every array once
    ends = np.cumsum(d["lengths"])
    # Episode i owns rows start..end of actions and start+i..end+i of obs (each episode has one extra observation).
    episodes = [
        (d["obs"][start + i : end + i + 1], d["actions"][start:end], d["rewards"][start:end], d["terminals"][start:end])
        for i, (start, end) in enumerate(zip(ends - d["lengths"], ends))
    ]
    returns = np.array([ep[2].sum() for ep in episodes])
    policies = d.get(
        "policies", np.full(len(episodes), f"heuristic-epsilon-{EPSILON.get(quality)}")
    )  # caches before policies
    components = {str(p): float(returns[policies == p].mean()) for p in np.unique(policies)}
    return episodes, components, float(d.get("heuristic_is_majority", 1.0))


def load_d4rl_hdf5(path):
    """A D4RL-layout HDF5 file -> episodes. The file is one long array; an episode ends at a terminal or a timeout."""
    import h5py

    if not os.path.isfile(path):
        fail(f"--dataset-path {path}: no such file")
    if not h5py.is_hdf5(path):
        fail(f"--dataset-path {path} is not an HDF5 file (expected a D4RL-layout file with observations, actions, ...)")
    with h5py.File(path, "r") as f:
        missing = [k for k in ("observations", "actions", "rewards", "terminals", "timeouts") if k not in f]
        if missing:
            fail(f"{path} is not a D4RL file: missing keys {missing} (has {sorted(f.keys())})")
        d = {
            k: f[k][:]
            for k in ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")
            if k in f
        }
    sizes = {k: len(v) for k, v in d.items()}
    if len(set(sizes.values())) != 1:
        fail(f"{path}: the keys have different lengths {sizes}")
    actions = d["actions"].reshape(len(d["actions"]), -1)
    if actions.shape[1] != 1 or not np.array_equal(actions, np.round(actions)) or actions.min() < 0:
        fail(
            f"{path}: actions must be one non-negative integer per row (got shape {d['actions'].shape}, dtype "
            f"{d['actions'].dtype}); use icq_continuous.py for continuous actions"
        )
    obs = d["observations"].reshape(len(actions), -1).astype(np.float32)
    last_obs = d.get("next_observations", d["observations"]).reshape(len(actions), -1).astype(np.float32)
    terminals = d["terminals"].astype(bool)
    ends = np.flatnonzero(terminals | d["timeouts"].astype(bool)).tolist()
    if not ends or ends[-1] != len(actions) - 1:
        ends.append(len(actions) - 1)  # the final row ends an episode too
    # An episode's final observation is next_observations[end] when the file has it; otherwise it only pads a row that
    # is either dropped (timeout: no a') or terminal (s' unused).
    episodes, start = [], 0
    for end in ends:
        episodes.append(
            (
                np.concatenate([obs[start : end + 1], last_obs[end : end + 1]]),
                actions[start : end + 1, 0].astype(np.int64),
                d["rewards"][start : end + 1].astype(np.float32),
                terminals[start : end + 1],
            )
        )
        start = end + 1
    return episodes


def minari_episodes(dataset_id):
    import minari

    try:
        dataset = minari.load_dataset(dataset_id)
    except (FileNotFoundError, ValueError) as exc:
        root = os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")
        fail(
            f"Minari dataset '{dataset_id}' is not in the local store ({root}): {exc}\n"
            f"Download it once with `minari download {dataset_id}` (needs network and `pip install minari[hf]`), "
            "or leave --dataset-id unset to use a built-in dataset "
            "(--env-id LunarLander-v3 --quality expert|medium|mixed)."
        )
    if not isinstance(dataset.action_space, gym.spaces.Discrete):
        fail(
            f"{dataset_id} has a continuous ({type(dataset.action_space).__name__}) action space, and icq_discrete.py "
            "needs a Discrete one: use icq_continuous.py for this dataset"
        )
    episodes = [
        (
            flatten(dataset.observation_space, ep.observations),
            np.asarray(ep.actions, np.int64).reshape(-1),
            np.asarray(ep.rewards, np.float32),
            np.asarray(ep.terminations, bool),
        )
        for ep in dataset.iterate_episodes()
    ]
    return episodes, dataset


def make_dataset_tensors(episodes, device):
    columns = [np.concatenate(column) for column in zip(*(episode_transitions(*ep) for ep in episodes))]
    names = ("obs", "actions", "rewards", "next_obs", "next_actions", "dones")
    dtypes = (torch.float32, torch.long, torch.float32, torch.float32, torch.long, torch.float32)
    return {n: torch.as_tensor(np.asarray(c), dtype=t, device=device) for n, c, t in zip(names, columns, dtypes)}


# ---------------------------------------------------------------------------------------------------------------------
# Networks: 256-256 MLPs. Q(s, .) has one output per action (ICQ-MA's critic head); the policy and the behaviour model
# mu are categorical distributions given by logits.
def mlp(sizes):
    layers = []
    for i in range(len(sizes) - 1):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


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


@torch.no_grad()
def behavior_weights(q, action, log_mu, temperature):
    """The exact importance ratio pi*(a|s) / mu(a|s) = exp(q[a]/T) / sum_b mu(b|s) exp(q[b]/T) (Sec. 3, eq. 8-10).

    q, log_mu: [B, actions], action: [B]. Computed in log space (logsumexp), so it stays finite for any q / T; its
    expectation over a ~ mu is exactly 1 in every state, which the batch softmax only reaches on average.
    """
    q = q / temperature
    return torch.exp(q.gather(1, action[:, None]).squeeze(1) - torch.logsumexp(log_mu + q, dim=1))


def critic_target(reward, done, next_q, gamma, temperature, weights=None, scale=1.0, clip=True):
    """The ICQ target r + gamma (1 - d) rho Q'(s', a') with rho = exp(Q'/T) / Z (eq. 10), all [B]; returns (target,
    rho).

    a' is the dataset's next action. rho defaults to the authors' batch weight
    clamp(scale * n * softmax_batch(Q'/T), 0, 1), where terminal rows carry no a' and stay out. The batch softmax runs
    across different states, so an unclipped weight reaches n and gamma * rho > 1 breaks the contraction; the clamp
    keeps gamma * rho <= gamma. `weights` passes the exact behaviour_weights instead (a per-state expectation of 1, used
    as they are).
    """
    if weights is None:
        weights = scale * icq_weights(next_q, temperature, mask=done == 0)
        weights = weights.clamp(0.0, 1.0) if clip else weights
    return reward + gamma * (1.0 - done) * weights * next_q, weights


def critic_loss(critic, critic_target_net, behavior, batch, gamma, temperature, scale=1.0, clip=True):
    """Squared error to the ICQ target; returns (loss, rho). With behavior=None (batch Z) Q' is read only at the batch's
    (s', a'), the implicit constraint of eq. 10; the exact Z also reads Q'(s', b) for every b, weighted by mu(b|s')."""
    obs, act, rew, next_obs, next_act, done = batch
    with torch.no_grad():
        next_q_all = critic_target_net(next_obs)
        next_q = next_q_all.gather(1, next_act[:, None]).squeeze(1)
        weights = None
        if behavior is not None:
            weights = behavior_weights(next_q_all, next_act, F.log_softmax(behavior(next_obs), -1), temperature)
        target, rho = critic_target(rew, done, next_q, gamma, temperature, weights, scale, clip)
    return F.mse_loss(critic(obs).gather(1, act[:, None]).squeeze(1), target), rho


def actor_loss(log_prob, signal, temperature, weights=None):
    """Weighted behaviour cloning, the KL(pi* || pi_theta) objective of Sec. 4.2: -mean(exp(signal/T)/Z * log pi).
    `weights` passes the exact behaviour_weights instead of the batch softmax of the signal. temperature = inf is exact
    behaviour cloning (pi* = mu as alpha -> inf, eq. 8): every weight is exactly 1, whatever the signal."""
    if math.isinf(temperature):
        weights = torch.ones_like(log_prob)
    elif weights is None:
        weights = icq_weights(signal, temperature)
    return -(weights * log_prob).mean()


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation: greedy actions; the env's own seeding leaves the training RNG streams untouched (exact resume).
def evaluate(actor, env, space, episodes, seed, device):
    returns = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        ret, done = 0.0, False
        while not done:
            with torch.no_grad():
                action = int(actor(torch.as_tensor(flatten(space, add_batch_dim(obs)), device=device)).argmax())
            obs, reward, terminated, truncated, _ = env.step(action)
            ret += float(reward)
            done = terminated or truncated
        returns.append(ret)
    return float(np.mean(returns))


def normalized_score(minari_dataset, mean_return, builtin):
    """x100 scores: Minari's reference scores (None if the dataset has none); built-in data: random 0, heuristic 100;
    HDF5 files: None (no references)."""
    if builtin:
        return 100.0 * (mean_return - RANDOM_RETURN) / (HEURISTIC_RETURN - RANDOM_RETURN)
    if minari_dataset is None:
        return None
    import minari

    try:
        return 100.0 * float(minari.get_normalized_score(minari_dataset, np.array([mean_return]))[0])
    except ValueError:
        return None


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
    """One behaviour-model, one critic (eq. 10) and one weighted-BC actor step per minibatch; returns the summary."""
    args = resolve_args(args)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines reach log files as they happen
    # SIGINT / SIGTERM only set a flag: the loop finishes its update, then saves the run and exits.
    stop = {"signal": None}
    previous_handlers = {s: signal.signal(s, lambda signum, frame: stop.update(signal=signum)) for s in STOP_SIGNALS}
    checkpoint = None if args.resume is None else torch.load(args.resume, map_location="cpu", weights_only=False)
    dataset_name = (
        args.dataset_id
        or (args.dataset_path and os.path.basename(args.dataset_path).rsplit(".", 1)[0])
        or f"{args.env_id}-{args.quality}"
    )
    method = "bc" if args.alpha == float("inf") else f"alpha{args.alpha:g}"
    run_name = (
        args.run_name or f"{dataset_name.replace('/', '-')}__{args.exp_name}__{method}__{args.seed}__{int(time.time())}"
    )
    args.run_name = run_name  # the checkpoint keeps it: a resumed run continues in the same directory
    run_dir = f"runs/{run_name}"
    ckpt_path = f"{run_dir}/checkpoint.pt"
    print(f"run directory: {run_dir}/")

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    torch.set_num_threads(args.threads)

    # Data and evaluation env
    minari_dataset, components, heuristic_is_majority = None, None, None
    if args.dataset_id is not None:
        episodes, minari_dataset = minari_episodes(args.dataset_id)
        env = minari_dataset.recover_environment(eval_env=True)
        space = minari_dataset.observation_space
    else:
        if args.dataset_path is not None:
            episodes = load_d4rl_hdf5(args.dataset_path)
        else:
            episodes, components, heuristic_is_majority = builtin_episodes(args.env_id, args.quality, args.dataset_size)
        try:
            env = gym.make(args.env_id)
        except (gym.error.Error, ModuleNotFoundError) as exc:
            fail(f"--env-id {args.env_id}: {exc}")
        space = env.observation_space
    if not isinstance(env.action_space, gym.spaces.Discrete):
        fail(
            f"the evaluation env {env.spec.id} has a {type(env.action_space).__name__} action space; "
            "icq_discrete.py needs Discrete actions"
        )
    data = make_dataset_tensors(episodes, device)
    obs_dim, num_actions = data["obs"].shape[1], int(env.action_space.n)
    env_obs_dim = flatten(env.observation_space, add_batch_dim(env.observation_space.sample())).shape[1]
    data_actions = int(data["actions"].max()) + 1
    if obs_dim != env_obs_dim or data_actions > num_actions:
        fail(
            f"the data and the env disagree: observation size {obs_dim} vs {env_obs_dim}, actions used by the data "
            f"{data_actions} vs the env's {num_actions} (data: {dataset_name}, env: {env.spec.id})"
        )
    num_transitions = data["rewards"].shape[0]
    dataset_return = float(np.mean([ep[2].sum() for ep in episodes]))
    # Every weight in the backup is <= 1 (clamped) or an expectation of 1 (exact Z), so |Q| <= max|r| / (1 - gamma).
    q_bound = float(data["rewards"].abs().max()) / (1.0 - args.gamma)
    print(
        f"{num_transitions} transitions from {dataset_name} ({len(episodes)} episodes, mean return "
        f"{dataset_return:.1f}), normalizer {args.normalizer}, eval env {env.spec.id}, "
        f"reward-implied |Q| bound {q_bound:.1f}"
    )
    if components is not None:
        print(
            "mean episode return per policy: "
            + ", ".join(f"{k} {v:.1f}" for k, v in components.items())
            + f"; the heuristic's action is the data's majority action at {100 * heuristic_is_majority:.0f}% of states"
        )

    actor = mlp([obs_dim, 256, 256, num_actions]).to(device)
    critic = mlp([obs_dim, 256, 256, num_actions]).to(device)
    behavior = mlp([obs_dim, 256, 256, num_actions]).to(device)
    critic_target_net = copy.deepcopy(critic).requires_grad_(False)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.actor_lr)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.critic_lr)
    behavior_optimizer = torch.optim.Adam(behavior.parameters(), lr=args.actor_lr)
    state_modules = (
        ("actor", actor),
        ("critic", critic),
        ("critic_target", critic_target_net),
        ("behavior", behavior),
        ("actor_optimizer", actor_optimizer),
        ("critic_optimizer", critic_optimizer),
        ("behavior_optimizer", behavior_optimizer),
    )

    start_step, evaluations, q_abs_max, warned = 0, [], 0.0, False
    if checkpoint is not None:
        for key, module in state_modules:
            module.load_state_dict(checkpoint[key])
        random.setstate(checkpoint["rng"]["python"])
        np.random.set_state(checkpoint["rng"]["numpy"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if device.type == "cuda" and checkpoint["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
        start_step, evaluations, q_abs_max = checkpoint["step"], checkpoint["evaluations"], checkpoint["q_abs_max"]
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
            "dataset_return": dataset_return,
            "component_returns": components,
            "heuristic_is_majority": heuristic_is_majority,
            "q_abs_max": float(q_abs_max),
            "q_bound": q_bound,
            "updates_per_second": (step - start_step) / max(wall_seconds - eval_seconds, 1e-9),
            "wall_seconds": wall_seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "evaluations": evaluations,
        }
        with open(f"{run_dir}/summary.json.tmp", "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(f"{run_dir}/summary.json.tmp", f"{run_dir}/summary.json")
        return summary

    use_behavior = args.normalizer == "behavior"
    nonfinite_step = torch.full((), -1, device=device)  # first step with a NaN/inf loss, read only at log intervals
    q_abs_max = torch.full(
        (), q_abs_max, device=device
    )  # running max of |Q(s, a)| on the batches, read only at log intervals
    q_exceeds_step = torch.full((), -1, device=device)  # first step where |Q| left the reward-implied bound
    bc = math.isinf(args.alpha)
    start_time, eval_seconds = time.time(), 0.0
    step = start_step
    for step in range(start_step + 1, args.total_steps + 1):
        idx = torch.randint(num_transitions, (args.batch_size,), device=device)
        batch = tuple(data[k][idx] for k in ("obs", "actions", "rewards", "next_obs", "next_actions", "dones"))
        obs, act = batch[0], batch[1]

        if use_behavior:  # mu by maximum likelihood; only the exact normaliser needs it
            loss_mu = F.cross_entropy(behavior(obs), act)
            behavior_optimizer.zero_grad()
            loss_mu.backward()
            behavior_optimizer.step()

        loss_q, rho = critic_loss(
            critic,
            critic_target_net,
            behavior if use_behavior else None,
            batch,
            args.gamma,
            args.critic_alpha,
            args.critic_weight_scale,
            args.clip_critic_weights,
        )
        critic_optimizer.zero_grad()
        loss_q.backward()
        critic_optimizer.step()

        # Actor signal: ICQ-MA's counterfactual advantage Q(s,a) - sum_b pi(b|s) Q(s,b) from the just-updated critic.
        # The exact weight needs no baseline: exp(A(s,a)/alpha) / sum_b mu(b|s) exp(A(s,b)/alpha) equals
        # behavior_weights on Q.
        log_pi = F.log_softmax(actor(obs), -1)
        with torch.no_grad():
            q_all = critic(obs)
            q_data = q_all.gather(1, act[:, None]).squeeze(1)
            advantage = q_data - (log_pi.exp() * q_all).sum(1)
            weights = (
                behavior_weights(q_all, act, F.log_softmax(behavior(obs), -1), args.alpha)
                if use_behavior and not bc
                else None
            )
        loss_pi = actor_loss(log_pi.gather(1, act[:, None]).squeeze(1), advantage, args.alpha, weights)
        actor_optimizer.zero_grad()
        loss_pi.backward()
        actor_optimizer.step()

        with torch.no_grad():
            for p, p_target in zip(critic.parameters(), critic_target_net.parameters()):
                p_target.lerp_(p, args.tau)
            nonfinite_step = torch.where((nonfinite_step < 0) & ~torch.isfinite(loss_q + loss_pi), step, nonfinite_step)
            q_abs_max = torch.maximum(q_abs_max, q_data.abs().max())
            q_exceeds_step = torch.where((q_exceeds_step < 0) & (q_abs_max > q_bound), step, q_exceeds_step)

        if step % args.log_interval == 0:
            check_finite(nonfinite_step)
            if int(q_exceeds_step) >= 0 and not warned:
                warned = True
                fix = (
                    "a larger --critic-alpha"
                    if use_behavior
                    else "--critic-weight-scale 0.5 or a larger --critic-alpha"
                    if args.clip_critic_weights
                    else "--clip-critic-weights"
                )
                print(
                    f"warning: |Q| = {float(q_abs_max):.3g} left the reward-implied bound max|r|/(1-gamma) = "
                    f"{q_bound:.3g} at step {int(q_exceeds_step)}: the critic is diverging; try {fix}",
                    file=sys.stderr,
                    flush=True,
                )
            sps = int((step - start_step) / (time.time() - start_time - eval_seconds))
            eta = time_left(start_time, step - start_step, args.total_steps - step)
            writer.add_scalar("losses/critic_loss", loss_q.item(), step)
            writer.add_scalar("losses/actor_loss", loss_pi.item(), step)
            writer.add_scalar("losses/advantage", advantage.mean().item(), step)
            writer.add_scalar("losses/q_mean", q_data.mean().item(), step)
            writer.add_scalar("losses/q_abs_max", q_abs_max.item(), step)
            writer.add_scalar("losses/max_critic_weight", rho.max().item(), step)
            if use_behavior:
                writer.add_scalar("losses/behavior_loss", loss_mu.item(), step)
            writer.add_scalar("charts/SPS", sps, step)
            print(
                f"step {step}/{args.total_steps} | critic {loss_q.item():.4f} | actor {loss_pi.item():.4f} | "
                f"Q mean {q_data.mean().item():.1f} max|Q| {q_abs_max.item():.1f} | max rho {rho.max().item():.2f} | "
                f"{sps} steps/s | ETA {eta}"
            )

        if step % args.eval_interval == 0 or step == args.total_steps:
            check_finite(nonfinite_step)
            eval_start = time.time()
            mean_return = evaluate(actor, env, space, args.eval_episodes, args.seed + 10_000, device)
            score = normalized_score(minari_dataset, mean_return, components is not None)
            eval_seconds += time.time() - eval_start
            evaluations.append({"step": step, "return": mean_return, "score": score})
            writer.add_scalar("eval/episodic_return", mean_return, step)
            if score is not None:
                writer.add_scalar("eval/normalized_score", score, step)
            eta = time_left(start_time, step - start_step, args.total_steps - step)
            score_text = f", score {score:.1f}" if score is not None else ""
            print(f"eval step {step}: return {mean_return:.1f}{score_text} | ETA {eta}")
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
    print(f"done: last-3 eval mean {rounded(mean3)} ({metric}), summary in {run_dir}/summary.json")
    env.close()
    writer.close()
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__.split("\n\n")[0]))
