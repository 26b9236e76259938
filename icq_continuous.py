"""Offline RL with Implicit Constraint Q-learning (ICQ) on continuous actions: D4RL, Minari or LunarLander data.

Implements Algorithm 1 of Yang et al., "Believe What You See: Implicit Constraint Approach for Offline Multi-Agent
Reinforcement Learning" (NeurIPS 2021, arXiv 2106.03400). The critic evaluates pi* = mu * exp(Q / alpha) / Z with
importance weights on dataset actions only (eq. 10); the actor is extracted by weighted behaviour cloning
(KL(pi* || pi_theta)); Z is the batch softmax. Usage, metrics, deviations, results: docs/icq_continuous.md."""

import copy
import importlib
import os
import random
import sys
from dataclasses import dataclass
from typing import Annotated, Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro

import icq_data
from icq_harness import Run, fail, flag, restore_args


def resolved_default(text, presets=None):
    """The help's default of a flag resolved at run time (tyro would print "(default: None)"), and other presets'."""
    text = text if presets is None else f"{text} with the default data's preset lunarlander; {presets}"
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
    save_model: bool = True
    """write runs/{run_name}/checkpoint.pt at every evaluation and at the end; --no-save-model turns it off"""
    resume: Optional[str] = None
    """path of a checkpoint.pt to continue: its run keeps every setting; only schedule flags may change"""
    threads: int = 1
    """torch CPU threads"""

    # Data
    dataset_path: Optional[str] = None
    """an original D4RL HDF5 file (keys observations, actions, rewards, terminals, timeouts); needs --env-id"""
    dataset_id: Optional[str] = None
    """a Minari dataset id, e.g. D4RL/antmaze/umaze-v1, D4RL/door/expert-v2, mujoco/hopper/medium-v0"""
    env_id: Annotated[Optional[str], resolved_default("the Minari dataset's, else LunarLanderContinuous-v3")] = None
    """gymnasium id of the evaluation env; without a dataset, the built-in data are generated into datasets/ once"""
    quality: Literal["good", "medium", "mixed"] = "mixed"
    """built-in data: the heuristic lander with N(0, 0.1) / N(0, 1) action noise, or a mix of four distinct landers"""
    dataset_size: int = 100_000
    """transitions in a built-in dataset (whole episodes, so slightly more)"""
    ref_min_score: Annotated[Optional[float], resolved_default("D4RL's, Minari's or the built-in data's")] = None
    """return scored 0 by eval/normalized_score (give it with --ref-max-score)"""
    ref_max_score: Annotated[Optional[float], resolved_default("D4RL's, Minari's or the built-in data's")] = None
    """return scored 100 by eval/normalized_score"""

    # Training
    preset: Literal["auto", "locomotion", "antmaze", "adroit", "lunarlander"] = "auto"
    """the authors' per-domain settings for the options left unset (auto: from the env id and the dataset name)"""
    total_steps: int = 1_000_000
    """number of gradient steps (one critic and one actor update each)"""
    batch_size: Annotated[Optional[int], resolved_default(256, "locomotion and adroit 32, antmaze 1024")] = None
    """minibatch size; the batch softmax normalises over it"""
    alpha: Annotated[Optional[float], resolved_default(30, "locomotion and adroit 600, antmaze 10")] = None
    """actor temperature: weight = B * softmax_batch(signal / alpha); `inf` is exact behaviour cloning"""
    critic_alpha: Annotated[Optional[float], resolved_default(1000, "locomotion and adroit 600, antmaze 10")] = None
    """critic temperature of the importance weight rho"""
    actor_signal: Annotated[Optional[Literal["td", "q"]], resolved_default("q", "the other presets td")] = None
    """what the actor weight exponentiates: the authors' one-step TD error, or Q(s, a) as the paper writes"""
    twin_q: Annotated[Optional[bool], resolved_default(False, "antmaze True")] = None
    """two critics, min for targets and signals"""
    timeout_as_terminal: Annotated[Optional[bool], resolved_default(False, "antmaze True")] = None
    """keep a time-limited episode's last step with done = 1 instead of dropping it"""
    critic_weight_scale: Annotated[Optional[float], resolved_default(1, "locomotion and adroit 0.5, antmaze 1")] = None
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
    eval_episodes: Annotated[Optional[int], resolved_default(10, "locomotion and adroit 10, antmaze 100")] = None
    """episodes per evaluation"""
    log_interval: int = 1000
    """gradient steps between progress lines and TensorBoard scalars"""


# The authors' settings per domain (ICQ_softmax; ICQ-antmaze_softmax); lunarlander is ours (docs/icq_continuous.md).
PRESETS = {
    "locomotion": dict(actor_signal="td", batch_size=32, alpha=600.0, critic_alpha=600.0, critic_weight_scale=0.5,
                       twin_q=False, timeout_as_terminal=False, eval_episodes=10),
    "antmaze": dict(actor_signal="td", batch_size=1024, alpha=10.0, critic_alpha=10.0, critic_weight_scale=1.0,
                    twin_q=True, timeout_as_terminal=True, eval_episodes=100),
    "lunarlander": dict(actor_signal="q", batch_size=256, alpha=30.0, critic_alpha=1000.0, critic_weight_scale=1.0,
                        twin_q=False, timeout_as_terminal=False, eval_episodes=10),
}  # fmt: skip
PRESETS["adroit"] = PRESETS["locomotion"]  # the authors' ICQ_softmax settings serve both
RANDOM_RETURN, HEURISTIC_RETURN, BUILTIN_ENV = -209.8, 282.8, "LunarLanderContinuous-v3"  # returns scored 0, 100
KEYS = ("obs", "actions", "rewards", "next_obs", "next_actions", "dones")  # the dataset tensors


def resolve_args(args):
    """Validate the flags and fill the preset's values; with --resume, the checkpoint's settings."""
    if args.resume is not None:
        args = restore_args(Args, args, os.path.basename(__file__), resolved=("preset",))
    if args.dataset_id is not None and args.dataset_path is not None:
        fail("give at most one of --dataset-id (a Minari id) and --dataset-path (a D4RL HDF5 file)")
    builtin = args.dataset_id is None and args.dataset_path is None
    if builtin and (args.env_id or BUILTIN_ENV) != BUILTIN_ENV:
        make_env(args.env_id, None).close()  # a discrete-action env stops there: use icq_discrete.py
        fail(f"no built-in dataset for --env-id {args.env_id}: use {BUILTIN_ENV}, --dataset-id or --dataset-path")
    args.env_id = BUILTIN_ENV if builtin else args.env_id
    if args.dataset_path is not None and args.env_id is None:
        fail("--dataset-path needs --env-id, the gymnasium env to evaluate in (e.g. Hopper-v5 for hopper-medium-v2)")
    if args.preset == "auto":  # the env decides where it is known (the built-in data's too); else the dataset's name
        name = (args.dataset_id or os.path.basename(args.dataset_path or "")).lower()
        adroit = any(task in name for task in ("pen", "door", "hammer", "relocate"))
        preset = "antmaze" if "antmaze" in name else "adroit" if adroit else "locomotion"
        args.preset = "lunarlander" if "lunarlander" in (args.env_id or "").lower() else preset
    for key, value in PRESETS[args.preset].items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    for name in ("alpha", "critic_alpha"):
        if not getattr(args, name) > 0:
            fail(f"{flag(name)} is a temperature and must be > 0 (got {getattr(args, name)}); --alpha inf is BC")
    for name in "batch_size total_steps eval_interval log_interval eval_episodes dataset_size threads".split():
        if getattr(args, name) < 1:
            fail(f"{flag(name)} must be >= 1 (got {getattr(args, name)})")
    refs = (args.ref_min_score, args.ref_max_score)
    if refs != (None, None) and (None in refs or refs[0] == refs[1]):
        fail("give both --ref-min-score and --ref-max-score, and different ones")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Data: every transition carries the next action a' of the same episode, because the ICQ operator (eq. 10) only ever
# evaluates Q at dataset actions. A time-limited episode's last step has no a' and is dropped; true terminals are kept
# with done = 1 (their a' is never used). Each loader checks its file and stops with one line saying what to do.
def episode_transitions(obs, actions, rewards, terminals, timeout_as_terminal):
    """One episode (obs has one more row than actions) -> (s, a, r, s', a', done) arrays."""
    ends_in_terminal = bool(terminals[-1]) or timeout_as_terminal
    keep = len(actions) if ends_in_terminal else len(actions) - 1
    next_actions = np.concatenate([actions[1:], actions[-1:]])  # the last a' only pads a terminal row
    done = (np.arange(keep) == len(actions) - 1).astype(np.float32)  # the last row, if kept, is terminal
    return obs[:keep], actions[:keep], rewards[:keep], obs[1 : keep + 1], next_actions[:keep], done


def transitions(episodes, source, fix, timeout_as_terminal=False):
    """Episodes [(obs, actions, rewards, terminals)] -> the (s, a, r, s', a', done) columns and the episode returns,
    or one line if there are no transitions, the actions are discrete, or numbers are missing or not finite."""
    columns = [np.concatenate(c) for c in zip(*(episode_transitions(*ep, timeout_as_terminal) for ep in episodes))]
    if not columns or len(columns[0]) == 0:
        fail(f"{source} holds no transitions (zero episodes, or only one-step ones, whose last step has no a'); {fix}")
    if columns[1].ndim == 1 or columns[1].dtype.kind in "iub":
        fail(f"{source} has discrete actions (shape {columns[1].shape[1:]}, {columns[1].dtype}): use icq_discrete.py")
    for key, column, ndim in zip(("observations", "actions", "rewards"), columns, (2, 2, 1)):
        icq_data.check_array(source, key, column, ndim, fix)
    return columns, [float(np.sum(ep[2])) for ep in episodes]


def load_minari(dataset_id, timeout_as_terminal):
    """A downloaded Minari dataset (icq_data.read_minari reads and checks it) -> transitions, returns, dataset."""
    fix = f"download it again with `minari download {dataset_id}`"
    episodes, dataset = icq_data.read_minari(dataset_id, fix)
    return *transitions(episodes, f"Minari dataset {dataset_id}", fix, timeout_as_terminal), dataset


def load_d4rl_hdf5(path, timeout_as_terminal):
    """An original D4RL file, read and checked by icq_data.read_d4rl_episodes -> transitions, episode returns."""
    fix = "download or write it again"
    return transitions(icq_data.read_d4rl_episodes(path, fix), path, fix, timeout_as_terminal)


def load_builtin(quality, size):
    """The built-in data (recorded once by icq_data.py) -> transitions, episode returns, {lander: mean return}."""
    path, fix = f"datasets/{BUILTIN_ENV}-{quality}-{size}", "delete it and its .json to record it again"
    episodes, landers = icq_data.read_lunar_continuous(quality, size, path, fix)
    return *transitions(episodes, path + ".npz", fix), landers


def make_env(env_id, minari_dataset, retry=True):
    """The evaluation env; gymnasium-robotics (AntMaze, Adroit) is imported only when an id needs it (it warns)."""
    try:
        env = gym.make(env_id) if env_id else minari_dataset.recover_environment(eval_env=True)
    except gym.error.Error as exc:
        if retry and isinstance(exc, gym.error.NameNotFound):
            gym.register_envs(importlib.import_module("gymnasium_robotics"))
            return make_env(env_id, minari_dataset, retry=False)
        fail(f"--env-id {env_id}: {exc}" if env_id else f"the eval env of {minari_dataset.spec.dataset_id}: {exc}")
    if not isinstance(env.action_space, gym.spaces.Box):
        fail(f"--env-id {env.spec.id} has discrete actions ({env.action_space}): use icq_discrete.py")
    return env


# ---------------------------------------------------------------------------------------------------------------------
# Networks (the authors' ICQ_softmax core.py): Q is a 256-256 MLP on (s, a); the actor is a 4x256 MLP with a tanh mean
# and a state-independent log-std squashed into [-6, 0]; log pi is the Normal density of the dataset action.
def mlp(sizes):
    layers = [layer for n_in, n_out in zip(sizes, sizes[1:]) for layer in (nn.Linear(n_in, n_out), nn.ReLU())]
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
    """n * softmax(x / temperature) over dim 0 (the minibatch), the practical Z of the paper (Sec. 4.1); entries where
    `mask` is False get 0 and stay out of the softmax, n counts the valid ones (their weights average to 1)."""
    logits = x / temperature
    if mask is None:
        return x.shape[0] * torch.softmax(logits, dim=0)
    weights = mask.sum(0, keepdim=True) * torch.softmax(logits.masked_fill(~mask, -torch.inf), dim=0)
    return torch.where(mask, weights, torch.zeros_like(weights))  # a column with no valid entry gives 0, not NaN


def critic_weights(next_q, done, temperature, scale, clip):
    """rho(s', a') = exp(Q'/T) / Z of eq. 10 with the batch Z: clamp(scale * n * softmax_batch(Q'/T), 0, 1) by default
    (the authors'); terminal rows carry no a' and stay out. Unclipped, scale 1 is eq. 10 as written (it can diverge)."""
    rho = scale * icq_weights(next_q, temperature, mask=done == 0)
    return rho.clamp(0.0, 1.0) if clip else rho


def critic_target(reward, done, next_q, gamma, temperature, scale=1.0, clip=True):
    """The ICQ target r + gamma (1 - d) rho Q'(s', a') (eq. 10), all [B], a' the dataset's next action -> target, rho"""
    rho = critic_weights(next_q, done, temperature, scale, clip)
    return reward + gamma * (1.0 - done) * rho * next_q, rho


def critic_loss(critic, critic_target_net, batch, gamma, temperature, scale=1.0, clip=True):
    """Squared error to the ICQ target, Q and Q' only at the batch's (s, a) and (s', a'): the implicit constraint of
    eq. 10. Twin critics share one target from their min (authors' AntMaze code) -> loss, Q [num_q, B], rho [B]"""
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
    """Weighted behaviour cloning, the KL(pi* || pi_theta) objective of Sec. 4.2: -mean(exp(signal/T)/Z * log pi);
    temperature inf is exact behaviour cloning (every weight exactly 1, not n * softmax(0), which rounds)."""
    if temperature == float("inf"):
        return -log_prob.mean()
    return -(icq_weights(signal, temperature) * log_prob).mean()


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation: deterministic mean action; AntMaze counts success (Minari's AntMaze eval env never ends on success).
@torch.no_grad()
def evaluate(actor, env, episodes, seed, device, antmaze):
    returns, successes = [], []
    actor.eval()
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        ret, success, done = 0.0, False, False
        while not done:
            action = actor(torch.as_tensor(icq_data.flatten_obs(obs), dtype=torch.float32, device=device)).cpu().numpy()
            obs, reward, terminated, truncated, info = env.step(action)
            ret += float(reward)
            success = success or bool(info.get("success", False))
            done = terminated or truncated or (antmaze and success)
        returns.append(ret)
        successes.append(success)
    actor.train()
    return {"return": float(np.mean(returns)), "success_rate": float(np.mean(successes))}


def reference_scores(args, minari_dataset):
    """(return scored 0, scored 100, source) or None: the flags', a Minari dataset's, a D4RL-named file's, built-in."""
    if args.ref_min_score is not None:
        return args.ref_min_score, args.ref_max_score, "--ref-min-score/--ref-max-score"
    if minari_dataset is not None:
        low, high = (minari_dataset.storage.metadata.get(k) for k in ("ref_min_score", "ref_max_score"))
        return None if None in (low, high) else (float(low), float(high), f"Minari metadata of {args.dataset_id}")
    if args.dataset_path is not None:
        return icq_data.d4rl_reference_scores(args.dataset_path)
    return RANDOM_RETURN, HEURISTIC_RETURN, "built-in: uniform random and heuristic lander, 1000 episodes each"


def normalized_score(refs, antmaze, mean_return, success_rate):
    """x100: AntMaze success rate; otherwise 100 (return - ref_min) / (ref_max - ref_min); None without references."""
    if antmaze:
        return 100.0 * success_rate
    return None if refs is None else 100.0 * (mean_return - refs[0]) / (refs[1] - refs[0])


def main(args):
    """Algorithm 1: one critic step (eq. 10) and one weighted-BC actor step per minibatch; returns the summary."""
    args = resolve_args(args)
    torch.set_num_threads(args.threads)
    data_name = args.dataset_id or os.path.splitext(os.path.basename(args.dataset_path or ""))[0]
    data_name = (data_name or f"{args.env_id}-{args.quality}").replace("/", "-")
    run = Run(args, os.path.basename(__file__), data_name)

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # Data and evaluation env (all checked before the run directory exists)
    minari_dataset, landers = None, None
    if args.dataset_id is not None:
        columns, returns, minari_dataset = load_minari(args.dataset_id, args.timeout_as_terminal)
    elif args.dataset_path is not None:
        columns, returns = load_d4rl_hdf5(args.dataset_path, args.timeout_as_terminal)
    else:
        columns, returns, landers = load_builtin(args.quality, args.dataset_size)
    env, refs = make_env(args.env_id, minari_dataset), reference_scores(args, minari_dataset)
    data = {k: torch.as_tensor(np.asarray(c, dtype=np.float32), device=device) for k, c in zip(KEYS, columns)}
    obs_dim, act_dim = data["obs"].shape[1], data["actions"].shape[1]
    env_obs_dim = icq_data.flatten_obs(env.observation_space.sample()).shape[0]
    if (obs_dim, act_dim) != (env_obs_dim, env.action_space.shape[0]):
        fail(f"the data and the env disagree: observation size {obs_dim} vs {env_obs_dim}, action size {act_dim} vs "
             f"{env.action_space.shape[0]} (data: {args.dataset_id or args.dataset_path}, env: {env.spec.id}); "
             "pick the matching --env-id")  # fmt: skip
    num_transitions = data["rewards"].shape[0]
    q_bound = float(data["rewards"].abs().max()) / (1.0 - args.gamma)  # no policy's |Q| exceeds it (docs)
    print(f"{num_transitions} transitions from {data_name} ({len(returns)} episodes, mean return "
          f"{np.mean(returns):.1f}), preset {args.preset}, eval env {env.spec.id}")  # fmt: skip
    if landers is not None:
        print("mean return per lander: " + ", ".join(f"{k} {v:.1f}" for k, v in landers.items()))

    actor = Actor(obs_dim, act_dim, env.action_space).to(device)
    critic = Critic(obs_dim, act_dim, 2 if args.twin_q else 1).to(device)
    critic_target = copy.deepcopy(critic).requires_grad_(False)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.actor_lr, weight_decay=args.actor_weight_decay)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.critic_lr)
    modules = {"actor": actor, "critic": critic, "critic_target": critic_target,
               "actor_optimizer": actor_optimizer, "critic_optimizer": critic_optimizer}  # fmt: skip
    # Divergence monitor, on the device and read at log intervals: running max |Q(s, a)|, first step above q_bound.
    state = {"q_abs_max": torch.zeros((), device=device), "q_exceeds_step": torch.full((), -1, device=device)}
    info = {"dataset": data_name, "dataset_return": float(np.mean(returns)), "dataset_lander_returns": landers,
            "reference_scores": refs and dict(zip(("min", "max", "source"), refs)), "q_bound": q_bound}  # fmt: skip
    start_step = run.begin(modules, device, state=state, info=info, metrics=("score", "return"))  # fmt: skip
    nonfinite_step = torch.full((), -1, device=device)  # first step with a NaN/inf loss, read at log intervals
    warned = False
    for step in range(start_step + 1, args.total_steps + 1):
        idx = torch.randint(num_transitions, (args.batch_size,), device=device)
        batch = tuple(data[k][idx] for k in KEYS)
        loss_q, q, rho = critic_loss(critic, critic_target, batch, gamma=args.gamma, temperature=args.critic_alpha,
                                     scale=args.critic_weight_scale, clip=args.clip_critic_weights)  # fmt: skip
        critic_optimizer.zero_grad()
        loss_q.backward()
        critic_optimizer.step()

        # The actor's weights come from the just-updated critic, as in the authors' code.
        signal = actor_signal(critic, batch, gamma=args.gamma, kind=args.actor_signal)
        loss_pi = actor_loss(actor.log_prob(batch[0], batch[1]), signal, temperature=args.alpha)
        actor_optimizer.zero_grad()
        loss_pi.backward()
        actor_optimizer.step()

        with torch.no_grad():
            for p, p_target in zip(critic.parameters(), critic_target.parameters()):
                p_target.lerp_(p, args.tau)
        nonfinite_step = torch.where((nonfinite_step < 0) & ~torch.isfinite(loss_q + loss_pi), step, nonfinite_step)
        state["q_abs_max"] = torch.maximum(state["q_abs_max"], q.abs().max())
        exceeds = (state["q_exceeds_step"] < 0) & (state["q_abs_max"] > q_bound)
        state["q_exceeds_step"] = torch.where(exceeds, step, state["q_exceeds_step"])

        if step % args.log_interval == 0:
            run.check_finite(nonfinite_step)
            run.log(step, {"critic_loss": loss_q, "actor_loss": loss_pi, "actor_signal": signal.mean(),
                           "q_mean": q.mean(), "rho_max": rho.max(), "q_abs_max": state["q_abs_max"]})  # fmt: skip
            if not warned and int(state["q_exceeds_step"]) >= 0:
                warned = True
                print(f"warning: |Q| = {float(state['q_abs_max']):.3g} at step {int(state['q_exceeds_step'])} left the "
                      f"bound max|r| / (1 - gamma) = {q_bound:.3g} of the rewards: the critic diverges; " + (
                      "try a larger --critic-alpha or --critic-weight-scale 0.5" if args.clip_critic_weights else
                      "use the authors' clamped weight (drop --no-clip-critic-weights)"), file=sys.stderr)  # fmt: skip

        if step % args.eval_interval == 0 or step == args.total_steps:
            run.check_finite(nonfinite_step)
            antmaze = args.preset == "antmaze"
            with run.timing_evaluation():
                results = evaluate(actor, env, args.eval_episodes, args.seed + 10_000, device, antmaze=antmaze)
            results["score"] = normalized_score(refs, antmaze, results["return"], results["success_rate"])
            run.evaluated(step, results)
        if run.stopped:
            run.check_finite(nonfinite_step)
            env.close()
            run.interrupt(step)
    env.close()
    return run.finish(step)


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__.split("\n\n")[0]))
