"""Offline RL with Implicit Constraint Q-learning (ICQ) on discrete actions: Minari, D4RL-layout or LunarLander data.

ICQ (Yang et al., NeurIPS 2021, arXiv 2106.03400) for one agent with discrete actions: ICQ-MA without the mixer. The
critic evaluates pi* = mu exp(Q/alpha) / Z at dataset actions only (eq. 10); the actor is weighted behaviour cloning. Z
is the authors' batch softmax (`--normalizer batch`) or the exact per-state sum_b mu(b|s) exp(Q(s,b)/alpha) with mu a
learned behaviour model (`--normalizer behavior`). Usage, outputs, details and results: docs/icq_discrete.md.
"""

import copy
import math
import os
import random
import sys
from dataclasses import dataclass
from typing import Annotated, Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

from icq_harness import Run, fail, flag, restore_args

SCRIPT = "icq_discrete.py"


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
    save_model: bool = True
    """write runs/{run_name}/checkpoint.pt at every evaluation and at the end; --no-save-model turns it off"""
    resume: Optional[str] = None
    """path of a checkpoint.pt to continue: its run keeps every setting; only schedule flags may change"""
    threads: int = 1
    """torch CPU threads"""
    dataset_path: Optional[str] = None
    """a D4RL-layout HDF5 file (observations, integer actions, rewards, terminals, timeouts); evaluated on --env-id"""
    dataset_id: Optional[str] = None
    """a Minari dataset id with a Discrete action space (already downloaded); unset: the built-in data"""
    env_id: Annotated[
        Optional[str], tyro.conf.arg(help_behavior_hint="(default: the Minari dataset's eval env, else LunarLander-v3)")
    ] = None
    """the evaluation env, a gymnasium id (module:Env-v0 imports the module first); the built-in data's is fixed"""
    quality: Literal["good", "medium", "mixed"] = "mixed"
    """built-in dataset: the heuristic lander with few / more random actions, or a mixture of distinct policies"""
    dataset_size: int = 100_000
    """transitions in a built-in dataset (whole episodes, so slightly more)"""
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
    normalizer: Literal["batch", "behavior"] = "batch"
    """Z of pi* = mu exp(Q/T) / Z: softmax over the minibatch (authors), or exact per state from a learned mu"""
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


RANDOM_RETURN, HEURISTIC_RETURN = -181.7, 243.4  # the built-in data's returns of score 0 and 100 (measured: docs)
KEYS = ("obs", "actions", "rewards", "next_obs", "next_actions", "dones")


def resolve_args(args):
    """Validate the flags and resolve --env-id; with --resume, the checkpoint's settings."""
    if args.resume is not None:
        args = restore_args(Args, args, SCRIPT, resolved=("env_id",))
    if not (args.alpha > 0 and 0 < args.critic_alpha < math.inf):
        fail(f"--alpha (got {args.alpha}) and --critic-alpha (got {args.critic_alpha}) are temperatures: both must be "
             "> 0, --critic-alpha finite; --alpha inf is exact behaviour cloning")  # fmt: skip
    for name in "batch_size total_steps eval_interval log_interval eval_episodes dataset_size threads".split():
        if getattr(args, name) < 1:
            fail(f"{flag(name)} must be >= 1 (got {getattr(args, name)})")
    if args.dataset_id is not None and args.dataset_path is not None:
        fail("pass one of --dataset-id and --dataset-path")
    if args.dataset_id is None:
        args.env_id = args.env_id or "LunarLander-v3"
        if args.dataset_path is None and args.env_id != "LunarLander-v3":
            fail(f"no built-in dataset for --env-id {args.env_id}: use LunarLander-v3, a Minari id with --dataset-id, "
                 "or a D4RL-layout HDF5 file with --dataset-path")  # fmt: skip
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Data: every transition carries the next action a' of its episode (eq. 10 evaluates Q only at dataset actions). Loaders
# return episodes (obs with one more row than actions, actions, rewards, terminals) or one line saying what is wrong.
def flatten(space, x, batched=True):
    """Observations of `space` -> float32 [n, dim] (one: n = 1): arrays flattened, Discrete one-hot, Text dropped."""
    if isinstance(space, gym.spaces.Dict):
        subs = [flatten(sub, x[k], batched) for k, sub in space.spaces.items() if not isinstance(sub, gym.spaces.Text)]
        return np.concatenate(subs, -1)
    if isinstance(space, gym.spaces.Discrete):
        return np.eye(space.n, dtype=np.float32)[np.asarray(x, dtype=np.int64).reshape(-1) - space.start]
    return np.asarray(x, dtype=np.float32).reshape(len(x) if batched else 1, -1)


def load_d4rl_hdf5(path):
    """A D4RL-layout HDF5 file -> episodes. The file is one long array; an episode ends at a terminal or a timeout."""
    import h5py

    keys = ("observations", "actions", "rewards", "terminals", "timeouts")
    if not os.path.isfile(path) or not h5py.is_hdf5(path):
        fail(f"--dataset-path {path}{' is not an HDF5 file' if os.path.isfile(path) else ': no such file'}; "
             "pass a D4RL-layout HDF5 file (observations, actions, rewards, terminals, timeouts)")  # fmt: skip
    try:
        with h5py.File(path, "r") as f:
            d = {k: f[k][()] for k in (*keys, "next_observations") if isinstance(f.get(k), h5py.Dataset)}
            found = sorted(f.keys())
    except OSError as exc:  # truncated or corrupt: h5py raises on open or on read
        fail(f"{path} is truncated or corrupt ({str(exc).splitlines()[0][:80]}); download or write it again")
    sizes = {k: len(v) if v.ndim else 0 for k, v in d.items()}
    n = sizes.get("actions", 0)
    actions = d["actions"].reshape(n, -1) if n else np.zeros((0, 1))
    problem = (
        f"missing keys {[k for k in keys if k not in d]} (has {found})" if not d.keys() >= set(keys)
        else f"non-numeric arrays {bad}" if (bad := [k for k, v in d.items() if v.dtype.kind not in "biuf"])
        else f"the keys have different lengths {sizes}" if len(set(sizes.values())) != 1
        else "zero transitions (zero episodes)" if n == 0
        else f"actions must be one non-negative integer per row (got shape {d['actions'].shape}, dtype "
        f"{d['actions'].dtype}); use icq_continuous.py for continuous actions"
        if actions.shape[1] != 1 or not np.array_equal(actions, np.round(actions)) or actions.min() < 0
        else "NaN or inf in its observations or rewards"
        if not all(np.isfinite(d[k]).all() for k in ("observations", "next_observations", "rewards") if k in d)
        else None
    )  # fmt: skip
    if problem:
        fail(f"{path}: {problem}; fix or write the file again (D4RL layout: docs/icq_discrete.md)")
    obs = d["observations"].reshape(n, -1).astype(np.float32)
    last_obs = d.get("next_observations", d["observations"]).reshape(n, -1).astype(np.float32)
    terminals = d["terminals"].astype(bool)
    ends = sorted(set(np.flatnonzero(terminals | d["timeouts"].astype(bool)).tolist()) | {n - 1})  # the last row too
    # An episode's last observation is next_observations[end], or a pad of a row that is dropped or terminal.
    return [(np.concatenate([obs[start : end + 1], last_obs[end : end + 1]]),
             actions[start : end + 1, 0].astype(np.int64), d["rewards"][start : end + 1].astype(np.float32),
             terminals[start : end + 1]) for start, end in zip([0] + [e + 1 for e in ends[:-1]], ends)]  # fmt: skip


def load_minari(dataset_id):
    """A downloaded Minari dataset with Discrete actions -> (episodes, the dataset, its reference returns or None)."""
    import minari

    try:
        dataset = minari.load_dataset(dataset_id)
    except (FileNotFoundError, ValueError) as exc:
        root = os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")
        fail(f"Minari dataset '{dataset_id}' is not in {root} ({str(exc).splitlines()[0][:50]}): download it with "
             f"`minari download {dataset_id}`, or leave --dataset-id unset for the built-in data")  # fmt: skip
    if not isinstance(dataset.action_space, gym.spaces.Discrete):
        fail(f"{dataset_id} has a continuous ({type(dataset.action_space).__name__}) action space, and icq_discrete.py "
             "needs a Discrete one: use icq_continuous.py for this dataset")  # fmt: skip
    episodes = [(flatten(dataset.observation_space, ep.observations), np.asarray(ep.actions, np.int64).reshape(-1),
                 np.asarray(ep.rewards, np.float32), np.asarray(ep.terminations, bool))
                for ep in dataset.iterate_episodes()]  # fmt: skip
    if not episodes or not all(np.isfinite(ep[0]).all() and np.isfinite(ep[2]).all() for ep in episodes):
        problem = "NaN or inf in its observations or rewards" if episodes else "zero episodes"
        fail(f"Minari dataset {dataset_id} has {problem}; download it again with `minari download {dataset_id}`")
    refs = tuple(dataset.storage.metadata.get(f"ref_{k}_score") for k in ("min", "max"))
    return episodes, dataset, None if None in refs else refs


def load_builtin(quality, size, env_id="LunarLander-v3"):
    """Built-in data, recorded once by icq_data.py: episodes, {policy: mean return}, heuristic_is_majority (docs)."""
    path = f"datasets/{env_id}-{'mixed-policies' if quality == 'mixed' else quality}-{size}.npz"
    if not os.path.exists(path):
        import icq_data

        icq_data.record_lunar_discrete(quality, size, path, env_id)
    try:  # each npz[k] re-reads the file: read every array once
        with np.load(path) as npz:
            d = {k: npz[k] for k in npz.files}
        ends = np.cumsum(d["lengths"])
    except Exception as exc:  # a truncated zip, a missing key: numpy raises many types
        fail(f"{path} is unreadable ({type(exc).__name__}: {exc}); delete it and run again to record it anew")
    # Episode i owns rows start..end of actions and start+i..end+i of obs (each episode has one extra observation).
    bounds = enumerate(zip(ends - d["lengths"], ends))
    episodes = [(d["obs"][start + i : end + i + 1], d["actions"][start:end], d["rewards"][start:end],
                 d["terminals"][start:end]) for i, (start, end) in bounds]  # fmt: skip
    returns, policies = np.array([ep[2].sum() for ep in episodes]), d.get("policies", np.full(len(episodes), quality))
    components = {str(p): float(returns[policies == p].mean()) for p in np.unique(policies)}
    return episodes, components, float(d.get("heuristic_is_majority", 1.0))


def make_dataset_tensors(episodes, device):
    """Episodes -> (s, a, r, s', a', done) tensors; a timed-out last step (no a') is dropped, a terminal one kept."""
    columns = []
    for obs, actions, rewards, terminals in episodes:
        keep = len(actions) if terminals[-1] else len(actions) - 1
        next_actions, done = np.concatenate([actions[1:], actions[-1:]]), np.zeros(keep, dtype=np.float32)
        done[len(actions) - 1 :] = 1.0  # a kept last row is terminal
        columns.append((obs[:keep], actions[:keep], rewards[:keep], obs[1 : keep + 1], next_actions[:keep], done))
    dtypes = (torch.float32, torch.long, torch.float32, torch.float32, torch.long, torch.float32)
    return {k: torch.as_tensor(np.concatenate(c), dtype=t, device=device)
            for k, c, t in zip(KEYS, zip(*columns), dtypes)}  # fmt: skip


def make_env(env_id, minari_dataset):
    """The evaluation env: --env-id, else the Minari dataset's eval env. It must have Discrete actions."""
    try:
        env = gym.make(env_id) if env_id else minari_dataset.recover_environment(eval_env=True)
    except (gym.error.Error, ModuleNotFoundError) as exc:
        fail(f"--env-id {env_id or minari_dataset.spec.env_spec.id}: {exc}")
    if not isinstance(env.action_space, gym.spaces.Discrete):
        fail(f"the evaluation env {env.spec.id} has a {type(env.action_space).__name__} action space; icq_discrete.py "
             "needs Discrete actions: use icq_continuous.py")  # fmt: skip
    return env


# ---------------------------------------------------------------------------------------------------------------------
# Networks: 256-256 MLPs. Q(s, .) has one output per action (ICQ-MA's critic head); pi and mu are categorical (logits).
class MLP(nn.Sequential):
    def __init__(self, obs_dim, num_actions, hidden=256):
        super().__init__(nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_actions))  # fmt: skip


class Actor(MLP):
    """Logits of pi(a|s) (and of mu(a|s) for the behaviour model)."""


class Critic(MLP):
    """Q(s, a) for every action a."""


# ---------------------------------------------------------------------------------------------------------------------
# ICQ losses
@torch.no_grad()
def icq_weights(x, temperature, mask=None):
    """n * softmax(x / T) over the minibatch (the paper's practical Z, Sec. 4.1); n counts the entries `mask` keeps."""
    logits = x / temperature
    if mask is None:
        return x.shape[0] * torch.softmax(logits, dim=0)
    weights = mask.sum(0, keepdim=True) * torch.softmax(logits.masked_fill(~mask, -torch.inf), dim=0)
    return torch.where(mask, weights, torch.zeros_like(weights))  # a column with no valid entry gives 0, not NaN


@torch.no_grad()
def behavior_weights(q, action, log_mu, temperature):
    """The exact pi*(a|s) / mu(a|s) = exp(q[a]/T) / sum_b mu(b|s) exp(q[b]/T) (eq. 8-10): E_mu of it is 1 per state."""
    q = q / temperature
    return torch.exp(q.gather(1, action[:, None]).squeeze(1) - torch.logsumexp(log_mu + q, dim=1))


def critic_target(reward, done, next_q, gamma, temperature, weights=None, scale=1.0, clip=True):
    """The ICQ target r + gamma (1 - d) rho Q'(s', a') of eq. 10, all [B]; returns (target, rho). rho: the authors'
    batch weight clamp(scale * n * softmax_batch(Q'/T), 0, 1) without terminal rows, or the exact `weights` as given."""
    if weights is None:
        weights = scale * icq_weights(next_q, temperature, mask=done == 0)
        weights = weights.clamp(0.0, 1.0) if clip else weights
    return reward + gamma * (1.0 - done) * weights * next_q, weights


def critic_loss(critic, target_critic, behavior, batch, gamma, temperature, scale=1.0, clip=True):
    """Squared error to the ICQ target; returns (loss, rho). The batch Z (behavior=None) reads Q' only at (s', a')."""
    obs, act, rew, next_obs, next_act, done = batch
    with torch.no_grad():
        next_q_all = target_critic(next_obs)
        next_q = next_q_all.gather(1, next_act[:, None]).squeeze(1)
        weights = None
        if behavior is not None:
            weights = behavior_weights(next_q_all, next_act, F.log_softmax(behavior(next_obs), -1), temperature)
        target, rho = critic_target(rew, done, next_q, gamma, temperature, weights, scale, clip)
    return F.mse_loss(critic(obs).gather(1, act[:, None]).squeeze(1), target), rho


def actor_loss(log_prob, signal, temperature, weights=None):
    """Weighted BC, the KL(pi* || pi_theta) objective of Sec. 4.2: -mean(exp(signal/T)/Z log pi) or the exact weights.
    temperature = inf is exact behaviour cloning (pi* = mu as alpha -> inf, eq. 8): every weight is exactly 1."""
    if math.isinf(temperature):
        weights = torch.ones_like(log_prob)
    elif weights is None:
        weights = icq_weights(signal, temperature)
    return -(weights * log_prob).mean()


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation: greedy actions; the env's own seeding leaves the training RNG streams untouched (exact resume).
@torch.no_grad()
def evaluate(actor, env, space, episodes, seed, device):
    returns = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        ret, done = 0.0, False
        while not done:
            action = int(actor(torch.as_tensor(flatten(space, obs, batched=False), device=device)).argmax())
            obs, reward, terminated, truncated, _ = env.step(action)
            ret, done = ret + float(reward), terminated or truncated
        returns.append(ret)
    return {"return": float(np.mean(returns))}


def main(args):
    """One behaviour-model, one critic (eq. 10) and one weighted-BC actor step per minibatch; returns the summary."""
    args = resolve_args(args)
    path_name = os.path.splitext(os.path.basename(args.dataset_path or ""))[0]
    data_name = args.dataset_id or path_name or f"{args.env_id}-{args.quality}"
    run = Run(args, SCRIPT, data_name)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    torch.set_num_threads(args.threads)
    # Data and env before run.begin (an error leaves no run directory); refs: the returns of score 0 and 100, or None
    minari_dataset, components, heuristic_is_majority, refs = None, None, None, None
    if args.dataset_id is not None:
        episodes, minari_dataset, refs = load_minari(args.dataset_id)
    elif args.dataset_path is not None:
        episodes = load_d4rl_hdf5(args.dataset_path)
    else:
        episodes, components, heuristic_is_majority = load_builtin(args.quality, args.dataset_size, args.env_id)
        refs = (RANDOM_RETURN, HEURISTIC_RETURN)
    env = make_env(args.env_id, minari_dataset)
    space = env.observation_space if minari_dataset is None else minari_dataset.observation_space
    data = make_dataset_tensors(episodes, device)
    num_transitions, obs_dim, num_actions = data["rewards"].shape[0], data["obs"].shape[1], int(env.action_space.n)
    env_obs_dim = flatten(env.observation_space, env.observation_space.sample(), batched=False).shape[1]
    data_actions = int(data["actions"].max()) + 1 if num_transitions else 0
    if num_transitions == 0 or obs_dim != env_obs_dim or data_actions > num_actions:
        fail(f"the data and the env disagree: observation size {obs_dim} vs {env_obs_dim}, actions used by the data "
             f"{data_actions} vs the env's {num_actions} ({data_name}, {num_transitions} transitions)")  # fmt: skip
    dataset_return = float(np.mean([ep[2].sum() for ep in episodes]))
    q_bound = float(data["rewards"].abs().max()) / (1.0 - args.gamma)  # every weight is <= 1 or averages 1
    print(f"{num_transitions} transitions from {data_name} ({len(episodes)} episodes, mean return "
          f"{dataset_return:.1f}), normalizer {args.normalizer}, eval env {env.spec.id}, reward-implied |Q| bound "
          f"{q_bound:.1f}")  # fmt: skip
    if components is not None:
        print(f"mean episode return per policy: {', '.join(f'{k} {v:.1f}' for k, v in components.items())}; the "
              f"heuristic's action is the majority action at {100 * heuristic_is_majority:.0f}% of states")  # fmt: skip

    actor = Actor(obs_dim, num_actions).to(device)
    critic = Critic(obs_dim, num_actions).to(device)
    behavior = Actor(obs_dim, num_actions).to(device)
    critic_target = copy.deepcopy(critic).requires_grad_(False)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.actor_lr)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.critic_lr)
    behavior_optimizer = torch.optim.Adam(behavior.parameters(), lr=args.actor_lr)
    modules = dict(actor=actor, critic=critic, critic_target=critic_target, actor_optimizer=actor_optimizer,
                   critic_optimizer=critic_optimizer, behavior=behavior,
                   behavior_optimizer=behavior_optimizer)  # fmt: skip
    # running max of |Q(s, a)| and first step past q_bound (-1: none yet), tensors read only at log intervals
    state = {"q_abs_max": torch.zeros((), device=device), "q_exceeds_step": torch.full((), -1, device=device)}
    info = dict(dataset=data_name, dataset_return=dataset_return, component_returns=components,
                heuristic_is_majority=heuristic_is_majority, q_bound=q_bound)  # fmt: skip
    start_step = run.begin(modules, device, state=state, info=info, metrics=("score", "return"))

    use_behavior, warned = args.normalizer == "behavior", False
    q_fix = ("a larger --critic-alpha" if use_behavior else "--critic-weight-scale 0.5 or a larger --critic-alpha"
             if args.clip_critic_weights else "--clip-critic-weights")  # fmt: skip
    nonfinite_step = torch.full((), -1, device=device)  # first step with a NaN/inf loss, read only at log intervals
    for step in range(start_step + 1, args.total_steps + 1):
        idx = torch.randint(num_transitions, (args.batch_size,), device=device)
        obs, act, *_ = batch = tuple(data[k][idx] for k in KEYS)

        if use_behavior:  # mu by maximum likelihood; only the exact normaliser needs it
            loss_mu = F.cross_entropy(behavior(obs), act)
            behavior_optimizer.zero_grad()
            loss_mu.backward()
            behavior_optimizer.step()

        loss_q, rho = critic_loss(critic, critic_target, behavior if use_behavior else None, batch, gamma=args.gamma,
            temperature=args.critic_alpha, scale=args.critic_weight_scale, clip=args.clip_critic_weights)  # fmt: skip
        critic_optimizer.zero_grad()
        loss_q.backward()
        critic_optimizer.step()

        log_pi = F.log_softmax(actor(obs), -1)
        with torch.no_grad():
            q_all = critic(obs)
            q_data = q_all.gather(1, act[:, None]).squeeze(1)
            advantage = q_data - (log_pi.exp() * q_all).sum(1)  # the actor signal; the exact weight needs no baseline
            weights = behavior_weights(q_all, act, behavior(obs).log_softmax(-1), args.alpha) if use_behavior else None
        loss_pi = actor_loss(log_pi.gather(1, act[:, None]).squeeze(1), advantage, args.alpha, weights)
        actor_optimizer.zero_grad()
        loss_pi.backward()
        actor_optimizer.step()

        with torch.no_grad():
            for p, p_target in zip(critic.parameters(), critic_target.parameters()):
                p_target.lerp_(p, args.tau)
            nonfinite_step = torch.where((nonfinite_step < 0) & ~torch.isfinite(loss_q + loss_pi), step, nonfinite_step)
            q_abs_max = state["q_abs_max"] = torch.maximum(state["q_abs_max"], q_data.abs().max())
            exceeds = (state["q_exceeds_step"] < 0) & (q_abs_max > q_bound)
            state["q_exceeds_step"] = torch.where(exceeds, step, state["q_exceeds_step"])

        if step % args.log_interval == 0:
            run.check_finite(nonfinite_step)
            if int(state["q_exceeds_step"]) >= 0 and not warned:  # the divergence monitor (docs/icq_discrete.md)
                warned = True
                print(f"warning: |Q| = {float(q_abs_max):.3g} left the reward-implied bound max|r|/(1-gamma) = "
                      f"{q_bound:.3g} at step {int(state['q_exceeds_step'])}: the critic is diverging; try {q_fix}",
                      file=sys.stderr, flush=True)  # fmt: skip
            scalars = dict(critic_loss=loss_q, actor_loss=loss_pi, actor_signal=advantage.mean(), q_mean=q_data.mean(),
                           rho_max=rho.max(), q_abs_max=q_abs_max)  # fmt: skip
            run.log(step, {**scalars, "behavior_loss": loss_mu} if use_behavior else scalars)

        if step % args.eval_interval == 0 or step == args.total_steps:
            run.check_finite(nonfinite_step)
            with run.timing_evaluation():
                results = evaluate(actor, env, space, args.eval_episodes, seed=args.seed + 10_000, device=device)
            results["score"] = None if refs is None else 100.0 * (results["return"] - refs[0]) / (refs[1] - refs[0])
            run.evaluated(step, results)

        if run.stopped:
            run.check_finite(nonfinite_step)
            run.interrupt(step)

    env.close()
    return run.finish(step)


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__.split("\n\n")[0]))
