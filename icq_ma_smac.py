"""Offline multi-agent RL with Implicit Constraint Q-learning (ICQ-MA) on StarCraft micromanagement (SMAC or SMAX).

Algorithm 2 of Yang et al., "Believe What You See: Implicit Constraint Approach for Offline Multi-Agent Reinforcement
Learning" (NeurIPS 2021, arXiv 2106.03400): the critic evaluates pi* = mu exp(Q_tot / alpha) / Z by TD(lambda) over
rho * Q'_tot at dataset actions only (eq. 19-20); each agent extracts its policy by weighted behaviour cloning (Sec.
4.3). Z: the paper's per-history Z^i(tau^i) from a learned behaviour policy (`--normalizer behavior`) or the batch
softmax of the authors' code (`batch`). StarCraft II (smac/smacv2) or JaxMARL's SMAX. Details: docs/icq_ma_smac.md."""

import copy
import importlib
import os
import random
import sys
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.optim.rmsprop import rmsprop  # the functional update RMSprop.step runs (--compile)

from icq_harness import Run, fail, flag, restore_args

SCRIPT = os.path.basename(__file__)


def resolved_default(text):  # --help shows this default of a field whose None is resolved at run time
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
    run_name: Annotated[Optional[str], resolved_default("{map}-{data}__{exp_name}__{alpha|bc}__{seed}__{time}")] = None
    """name of runs/{run_name}/ (with --resume: the checkpoint's run)"""
    save_model: bool = True
    """write runs/{run_name}/checkpoint.pt at every evaluation and at the end; --no-save-model turns it off"""
    resume: Optional[str] = None
    """a checkpoint.pt to continue: its run's settings are restored (only schedule flags may change)"""
    threads: int = 1
    """torch CPU threads (the many small per-timestep critic steps run fastest on one)"""
    compile: bool = False
    """torch.compile each critic step (with --critic-updates sequential; same math, float rounding differs)"""
    # Data and environment
    dataset_path: Annotated[Optional[str], resolved_default("smax: datasets/smax_{map}_{quality}_{N}ep_v2.h5")] = None
    """a PyMARL episode file (HDF5) or an OG-MARL vault (DIR.vlt/UID); without it, smax records the default file"""
    map: str = "3s_vs_5z"
    """SMAC map, SMACv2 scenario (e.g. protoss_5_vs_5) or SMAX scenario"""
    env_backend: Literal["auto", "smac", "smacv2", "smax"] = "auto"
    """auto: smac when the smac package and StarCraft II are found, else smax (JaxMARL, no StarCraft II)"""
    quality: Literal["good", "medium", "poor", "mixed", "split"] = "medium"
    """generated SMAX data: good (a scripted controller), medium / poor (it with random actions), mixed / split"""
    dataset_size: int = 1000
    """episodes in a generated SMAX dataset"""
    reward_scale: Annotated[Optional[float], resolved_default("10 with smax, 1 with smac / smacv2")] = None
    """multiplies the dataset rewards on load, so that returns (and the temperatures) are on SMAC's scale"""
    # Training
    total_steps: int = 40_000
    """training steps (each: the critic updates on one batch of episodes, then one actor update)"""
    batch_size: int = 32
    """episodes per step; the batch softmax normalises over them"""
    alpha: float = 0.1
    """actor temperature of exp(x / alpha) / Z; inf = exact behaviour cloning"""
    critic_alpha: float = 1000.0
    """critic temperature of rho = exp(Q'_tot / critic_alpha) / Z"""
    normalizer: Literal["behavior", "batch"] = "behavior"
    """Z of the actor weight and rho: behavior = the paper's exact Z (a BC model mu), batch = the authors' softmax"""
    gamma: float = 0.99
    """the discount factor"""
    td_lambda: float = 0.75
    """lambda of the TD(lambda) critic target"""
    critic_updates: Literal["sequential", "batched"] = "sequential"
    """sequential: one critic optimiser step per timestep, as the authors; batched: one masked step over all of them"""
    target_update_interval: int = 600
    """critic optimiser steps between hard copies of the target critic and mixer"""
    mixer_bias: bool = False
    """add the state bias b(s) to Q_tot (the paper's mixer; the authors' code has none)"""
    actor_weight_max: float = 1.0
    """--normalizer behavior: the actor weight min(w, W), truncated (not in the paper; inf: the paper's weight)"""
    mixer_weight_in_exponent: bool = False
    """--normalizer batch: the weight n softmax(k_i A_i / alpha) instead of the authors' k_i n softmax(A_i / alpha)"""
    actor_lr: float = 1e-3
    """actor (and behaviour model) learning rate, RMSprop"""
    actor_hidden: int = 128
    """width of the agent's GRU"""
    critic_lr: float = 1e-4
    """critic and mixer learning rate (RMSprop)"""
    grad_clip: float = 20.0
    """gradient-norm clip of each update"""
    eval_sample: bool = False
    """sample evaluation actions from the policy instead of the greedy available action"""
    eval_interval: int = 200
    """training steps between evaluations"""
    eval_episodes: int = 32
    """episodes per evaluation"""
    log_interval: int = 20
    """training steps between progress lines and TensorBoard scalars"""


SMAX_DATASET = "datasets/smax_{map}_{quality}_{episodes}ep_v2.h5"  # generated from --map, --quality, --dataset-size
DATA_KEYS = ("obs", "state", "actions", "avail_actions", "reward", "terminated", "filled")
PYMARL_LAYOUT = (
    "obs [E,T,N,O], state [E,T,S], actions and avail_actions [E,T,N,1|A], reward, terminated, filled [E,T,1]"
)


def resolve_args(args):
    """Validate the flags; with --resume, the checkpoint's settings."""
    if args.resume is not None:
        args = restore_args(Args, args, SCRIPT)
    for name in ("alpha", "critic_alpha", "actor_weight_max"):
        if not getattr(args, name) > 0:
            fail(f"{flag(name)} must be > 0 (got {getattr(args, name)}); --alpha inf is exact BC")
    if args.reward_scale is not None and not 0 < args.reward_scale < float("inf"):
        fail(f"--reward-scale must be a finite number > 0 (got {args.reward_scale})")
    if not 0 <= args.td_lambda <= 1:
        fail(f"--td-lambda must be in [0, 1] (got {args.td_lambda})")
    if args.compile and args.critic_updates != "sequential":
        fail("--compile compiles the per-timestep critic steps: it needs --critic-updates sequential")
    for name in ("total_steps", "batch_size", "eval_interval", "eval_episodes", "log_interval", "dataset_size",
                 "target_update_interval", "threads", "actor_hidden"):  # fmt: skip
        if getattr(args, name) < 1:
            fail(f"{flag(name)} must be >= 1 (got {getattr(args, name)})")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Data (PyMARL episode batches): row t holds obs/state/avail before action t, and action/reward/terminated of step t;
# the filled row after the last step holds the final obs (a dummy action). Transition t is valid when rows t and t+1 are
# filled, no terminal came before, and it is terminal or followed by a valid transition (no Q outside the data is read).
def transition_mask(filled, terminated):  # [E, T] each -> bool [E, T-1]
    filled, terminated = filled.bool(), terminated.bool()
    ended_before = torch.cumsum(terminated.long(), 1) - terminated.long() > 0
    mask = filled[:, :-1] & filled[:, 1:] & ~ended_before[:, :-1]
    has_next = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], 1)
    return mask & (terminated[:, :-1] | has_next)


def load_pymarl_hdf5(path, info, map_name, backend, device, reward_scale=1.0):
    """Episode tensors on `device`, rewards times reward_scale. icq_data.read_pymarl reads the file and checks it
    against the env (layout, sizes, map, finite values, action ids), stopping with one line that says what is wrong."""
    raw = importlib.import_module("icq_data").read_pymarl(path, DATA_KEYS, PYMARL_LAYOUT, info, map_name, backend)
    data = {"obs": torch.as_tensor(raw["obs"]), "state": torch.as_tensor(raw["state"]),  # float16 files stay float16
            "actions": torch.as_tensor(raw["actions"].reshape(raw["actions"].shape[:3]).astype(np.int64)),
            "avail": torch.as_tensor(raw["avail_actions"] != 0)}  # fmt: skip
    flat = {k: torch.as_tensor(raw[k].reshape(raw[k].shape[:2]).astype(np.float32)) for k in DATA_KEYS[4:]}
    data["reward"], data["terminated"] = flat["reward"][:, :-1] * reward_scale, flat["terminated"][:, :-1]
    data["mask"] = transition_mask(flat["filled"], flat["terminated"])
    keep = data["mask"].any(1)  # episodes without a single valid transition would give empty batches
    if not keep.any():
        fail(f"{path} holds no valid transition (filled/terminated are all padding)")
    data = {k: v[keep] for k, v in data.items()}
    last = torch.where(data["mask"], torch.arange(data["mask"].shape[1]), -1).max(1).values
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
        layers = nn.Linear(state_dim + obs_dim + n_agents, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        self.body = nn.Sequential(*layers)
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
    """n * softmax(x / temperature) along `dim` over the valid entries: the practical Z of the paper (Sec. 4.1). mask:
    bool like x (None: all valid); invalid entries get weight 0, n counts the valid ones (weights average 1)."""
    logits = x / temperature
    if mask is None:
        return x.shape[dim] * torch.softmax(logits, dim=dim)
    weights = mask.sum(dim, keepdim=True) * torch.softmax(logits.masked_fill(~mask, -torch.inf), dim=dim)
    return torch.where(mask, weights, torch.zeros_like(weights))  # a slice with no valid entry gives 0, not NaN


@torch.no_grad()
def behavior_weights(x, actions, log_mu, temperature):
    """The exact per-state weight exp(x(a)/T) / Z(tau), Z(tau) = sum_b mu(b|tau) exp(x(b)/T) (the paper's Z of pi* = mu
    exp(x/T) / Z), at the data action a, in log space. x, log_mu (-inf at unavailable actions) [..., A]; actions [...].
    Returns [...]; a baseline added to x cancels, and E_{a ~ mu}[weight] = 1 in every state."""
    logits = x / temperature
    log_z = torch.logsumexp(log_mu + logits, -1)
    return (logits.gather(-1, actions.unsqueeze(-1)).squeeze(-1) - log_z).exp()


def td_lambda_targets(rewards, terminated, mask, target_qs, gamma, td_lambda):
    """TD(lambda) returns G_t = r_t + gamma (1 - d_t) [(1 - lambda) y_{t+1} + lambda G_{t+1}] (eq. 20), [B, T-1], 0
    where mask is 0; rewards, terminated, mask [B, T-1]; target_qs [B, T]: y_t, the bootstrap value of row t."""
    returns = torch.zeros_like(rewards)
    next_return, next_valid = target_qs[:, -1], torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        bootstrap = target_qs[:, t + 1] + td_lambda * next_valid * (next_return - target_qs[:, t + 1])
        returns[:, t] = mask[:, t] * (rewards[:, t] + gamma * (1 - terminated[:, t]) * bootstrap)
        next_return, next_valid = returns[:, t], mask[:, t].to(rewards.dtype)
    return returns


@torch.no_grad()
def critic_targets(target_q, actions, k, bias, rewards, terminated, mask, gamma, td_lambda, critic_alpha, log_mu=None):
    """The ICQ-MA critic target: TD(lambda) over y = rho * Q'_tot, rho = exp(Q'_tot/alpha)/Z (eq. 19). target_q
    [B,T,N,A] from the target critic; actions [B,T,N] dataset actions; k [B,T,N], bias [B,T] from the target mixer;
    rewards, terminated, mask [B,T-1]. Returns the targets [B,T-1] and rho [B,T] (0 where nothing bootstraps). log_mu
    None (--normalizer batch): Z is the softmax per timestep over the episodes that bootstrap from that row; Q' is read
    at dataset actions only. log_mu [B,T,N,A] (behavior): the exact Z(tau) = E_{a ~ mu}[exp(Q_tot(tau,a)/c)]; with a
    factorised mu and the linear mixer, rho is the product of the agents' own behavior_weights of k_i Q_i (the bias
    cancels; derivation in docs/icq_ma_smac.md, "Normalisers")."""
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
    """net(*inputs) at the (episode, t) rows where `rows` [B, T] is true only, each output scattered back into zeros [B,
    T, ...]: the padding rows of a batch are skipped, and rows left at zero are never read."""
    index = rows.nonzero(as_tuple=True)
    out = net(*(x[index] for x in inputs))
    outs = [y.new_zeros(rows.shape + y.shape[1:]).index_put_(index, y)
            for y in (out if isinstance(out, tuple) else [out])]  # fmt: skip
    return tuple(outs) if isinstance(out, tuple) else outs[0]


def episodes_per_timestep(valid):
    """valid [B, T-1] -> for each timestep t, the episodes with a valid transition at t (one host sync)."""
    _, episodes = valid.t().nonzero(as_tuple=True)  # ordered by timestep
    return torch.split(episodes, valid.sum(0).tolist())


def critic_loss(critic, mixer, state, obs, actions, targets, valid=None):
    """Squared error of Q_tot(s, a) = sum_i k_i(s) Q_i(s, o_i, a_i) + b(s) (eq. 16) against the TD(lambda) targets;
    its mean over the rows, or over the rows where `valid` (0 / 1) is 1."""
    k, b = mixer(state)
    squared_error = ((k * critic(state, obs).gather(-1, actions.unsqueeze(-1)).squeeze(-1)).sum(-1) + b - targets) ** 2
    return squared_error.mean() if valid is None else (valid * squared_error).sum() / valid.sum()


def previous_actions_onehot(actions, n_actions):
    """actions [B,T,N] -> the agent input "last action" [B,T,N,A]: a_{t-1} one-hot, zeros at t = 0 (as evaluate)."""
    return F.pad(F.one_hot(actions[:, :-1], n_actions).float(), (0, 0, 0, 0, 1, 0))


def masked_log_softmax(logits, avail):
    """log pi over the available actions (rows with none available, i.e. padding, use all actions: they are masked)."""
    avail = avail | ~avail.any(-1, keepdim=True)
    return torch.log_softmax(logits.masked_fill(~avail, -torch.inf), -1), avail


def actor_loss(logits, avail, actions, q_values, k, mask, alpha, weight_in_exponent=False, log_mu=None, cap=torch.inf):
    """Weighted behaviour cloning of each agent (Sec. 4.3): -mean(k_i * icq_weights(A_i / alpha) * log pi_i(a_i)).
    logits, q_values [B,T,N,A]; avail bool [B,T,N,A]; actions [B,T,N]; k [B,T,N] mixer weights; mask [B,T] valid
    transitions. A_i = Q_i(a_i) - sum_a pi_i(a) Q_i(a) (the counterfactual baseline); the batch softmax runs over
    episodes for each (t, i); weight_in_exponent: icq_weights(k_i A_i / alpha). alpha = inf is exact BC (every weight
    1). log_mu [B,T,N,A] (--normalizer behavior): weight = behavior_weights(k_i Q_i, a_i, log mu_i, alpha), the paper's
    per-history Z^i(tau^i), truncated as min(w, cap) (not in the paper). Returns the loss and the weights [B,T,N] (0 on
    padding)."""
    log_pi, avail = masked_log_softmax(logits, avail)
    q_values, k = q_values.detach(), k.detach()
    baseline = (log_pi.detach().exp() * q_values.masked_fill(~avail, 0.0)).sum(-1)
    advantage = q_values.gather(-1, actions.unsqueeze(-1)).squeeze(-1) - baseline
    agent_mask = mask.bool().unsqueeze(-1).expand_as(advantage)
    if alpha == float("inf"):
        weight = agent_mask.float()
    elif log_mu is not None:
        weight = behavior_weights(k.unsqueeze(-1) * q_values, actions, log_mu, alpha).clamp(max=cap) * agent_mask
    elif weight_in_exponent:
        weight = icq_weights(k * advantage, alpha, agent_mask, dim=0)
    else:
        weight = k * icq_weights(advantage, alpha, agent_mask, dim=0)
    log_pi_taken = log_pi.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    return -(weight * log_pi_taken).masked_fill(~agent_mask, 0.0).sum() / agent_mask.sum().clamp_min(1), weight


# ---------------------------------------------------------------------------------------------------------------------
# Environments, one batched interface: info (n_agents, n_actions, obs_shape, state_shape, episode_limit), max_batch,
# reset(n, seed) -> obs [n,N,O], state [n,S], avail [n,N,A]; step(actions [n,N]) -> obs, state, avail, reward [n],
# terminated [n], won [n] (numpy). SMAX's max_steps are SMAC's episode limits (smac_maps.py).
SC2PATH = os.environ.get("SC2PATH", os.path.expanduser("~/StarCraftII"))
SMAX_EPISODE_LIMITS = {
    "3m": 60, "8m": 120, "25m": 150, "5m_vs_6m": 70, "10m_vs_11m": 150, "27m_vs_30m": 180, "2s3z": 120, "3s5z": 150,
    "3s5z_vs_3s6z": 170, "3s_vs_5z": 250, "6h_vs_8z": 150, "smacv2_5_units": 200, "smacv2_10_units": 200,
    "smacv2_20_units": 200}  # fmt: skip
SMAC_INSTALL = "pip install git+https://github.com/oxwhirl/{pkg}.git, StarCraft II in $SC2PATH, or --env-backend smax"


class SmacAdapter:
    """A smac/smacv2 StarCraft2Env (one StarCraft II process, so one episode at a time)."""

    max_batch = 1

    def __init__(self, env):
        self.env = env
        keys = ("n_agents", "n_actions", "obs_shape", "state_shape", "episode_limit")
        self.info = {k: env.get_env_info()[k] for k in keys}

    def _observe(self):
        obs, state, avail = self.env.get_obs(), self.env.get_state(), self.env.get_avail_actions()
        return np.asarray(obs, np.float32)[None], np.asarray(state, np.float32)[None], np.asarray(avail, bool)[None]

    def reset(self, n, seed):
        self.env.reset()
        return self._observe()

    def step(self, actions):
        reward, terminated, info = self.env.step([int(a) for a in actions[0]])
        won = bool(info.get("battle_won", False))  # a protocol error returns an empty info
        return (*self._observe(), np.array([reward], np.float32), np.array([terminated]), np.array([won]))


class SmaxAdapter:
    """JaxMARL SMAX vs its built-in heuristic enemy; many episodes at once in one compiled, vmapped env."""

    max_batch = 1024

    def __init__(self, map_name):
        import jax

        sys.stdout.flush()  # JaxMARL's import-time print escapes contextlib.redirect_stdout: fd 1 -> /dev/null
        saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        try:
            jaxmarl = importlib.import_module("jaxmarl")
        finally:
            sys.stdout.flush(), os.dup2(saved, 1), os.close(saved), os.close(null)
        from jaxmarl.environments.smax import map_name_to_scenario

        self.jax, self.map_name, limit = jax, map_name, SMAX_EPISODE_LIMITS[map_name]
        # SMAX checks its step limit before counting the step (T+1 steps); evaluate() and the generator end at T.
        self.env = env = jaxmarl.make("HeuristicEnemySMAX", scenario=map_name_to_scenario(map_name), max_steps=limit)
        # world state -> hypernetwork input: per unit, positions / map size, cooldowns / the largest cooldown, the rest
        # as is; the raw team and type ids appended at the end are dropped (the type is already one-hot per unit)
        per_unit = [1.0, 1.0 / env.map_width, 1.0 / env.map_height, 1.0 / float(env.unit_type_weapon_cooldowns.max())]
        per_unit = np.array(per_unit + [1.0] * len(env.unit_type_names), np.float32)
        self.scale = jax.numpy.asarray(np.tile(per_unit, env.num_allies + env.num_enemies))
        self.info = {"n_agents": env.num_allies, "n_actions": int(env.action_space(env.agents[0]).n),
                     "obs_shape": int(env.observation_space(env.agents[0]).shape[0]), "state_shape": len(self.scale),
                     "episode_limit": limit}  # fmt: skip
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
    except ImportError:
        fail(f"--env-backend {backend}: the {pkg} package (StarCraft Multi-Agent Challenge) is not installed; "
             + SMAC_INSTALL.format(pkg=pkg))  # fmt: skip
    if not os.path.isdir(SC2PATH):
        fail(f"--env-backend {backend}: StarCraft II not found at {SC2PATH}; " + SMAC_INSTALL.format(pkg=pkg))
    if backend == "smac":
        known = sorted(maps.get_smac_map_registry())
        if map_name not in known:
            fail(f"unknown SMAC map '{map_name}'; known maps: {', '.join(known)}")
        return module.StarCraft2Env(map_name=map_name, seed=seed)
    # SMACv2 scenarios "<race>_<allies>_vs_<enemies>", with the capability config of smacv2's example yaml files.
    units = {"protoss": ["stalker", "zealot", "colossus"], "terran": ["marine", "marauder", "medivac"],
             "zerg": ["zergling", "hydralisk", "baneling"]}  # fmt: skip
    race, _, n, _, m = (map_name.split("_") + [""] * 5)[:5]
    if race not in units or not (n.isdigit() and m.isdigit()):
        fail(f"unknown SMACv2 scenario '{map_name}'; known: <race>_<allies>_vs_<enemies> with race in "
             f"{sorted(units)}, e.g. protoss_5_vs_5")  # fmt: skip
    team = {"dist_type": "weighted_teams", "unit_types": units[race], "weights": [0.45, 0.45, 0.1],
            "exception_unit_types": [units[race][2]], "observe": True}  # fmt: skip
    start = {"dist_type": "surrounded_and_reflect", "p": 0.5, "n_enemies": int(m), "map_x": 32, "map_y": 32}
    config = {"n_units": int(n), "n_enemies": int(m), "team_gen": team, "start_positions": start}
    kw = dict(conic_fov=False, obs_own_pos=True, use_unit_ranges=True, min_attack_range=2)
    return module.StarCraftCapabilityEnvWrapper(capability_config=config, map_name=f"10gen_{race}", seed=seed, **kw)


def make_adapter(backend, map_name, seed):
    if backend == "auto":
        try:  # `pip install smac` from PyPI is SMAC3, an unrelated optimiser: look for smac.env itself
            found = importlib.import_module("smac.env") is not None and os.path.isdir(SC2PATH)
        except ImportError:
            found = False
        backend = "smac" if found else "smax"
        print(f"env backend: {backend} (auto: smac and StarCraft II {'found' if found else 'not both found'})")
    if backend == "smax":
        if map_name not in SMAX_EPISODE_LIMITS:
            fail(f"unknown SMAX map '{map_name}'; known maps: {', '.join(SMAX_EPISODE_LIMITS)}")
        return backend, SmaxAdapter(map_name)
    return backend, SmacAdapter(smac_env(backend, map_name, seed))


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation: greedy over available actions (the authors sample plus epsilon-random); ends episodes at the SMAC limit.
@torch.no_grad()
def evaluate(actor, adapter, episodes, seed, device, sample=False):
    """Returns {"win_rate", "return"} (means). Uses its own generator, so training RNG streams are untouched."""
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
            act = log_pi.argmax(-1)
            if sample:
                act = torch.multinomial(log_pi.exp().flatten(0, 1), 1, generator=generator).view(n, -1)
            obs, _, avail, reward, terminated, battle_won = adapter.step(act.cpu().numpy())
            ret += reward * active
            won |= battle_won & active
            active &= ~(terminated | (t + 1 >= limit))
            last = F.one_hot(act, n_actions).float()
            if not active.any():
                break
        wins += won.tolist()
        returns += ret.tolist()
    return {"win_rate": float(np.mean(wins)), "return": float(np.mean(returns))}


# ---------------------------------------------------------------------------------------------------------------------
# Training (Algorithm 2): each step samples episodes, runs the critic phase, then the actor phase.
def clipped_step(optimizer, loss, params, max_norm):
    optimizer.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()


def compiled_step(loss_fn, modules, optimizer, max_norm):
    """--compile: clipped_step of loss_fn(*inputs) as one compiled graph (torch.func gradients, clip_grad_norm_'s clip,
    torch.optim's own RMSprop update), in place on the parameters and the optimiser's state, as the eager step."""
    holder = torch.nn.ModuleList(modules)
    holder.forward = loss_fn  # functional_call(holder, weights) runs loss_fn with `weights` as the modules' parameters
    params, group = list(holder.parameters()), optimizer.param_groups[0]
    settings = {k: group[k] for k in ("lr", "alpha", "eps", "weight_decay", "momentum", "centered")}
    for p in params:  # the state RMSprop creates at its first step
        optimizer.state[p] = optimizer.state[p] or {"step": torch.zeros(()), "square_avg": torch.zeros_like(p)}
    square_avgs, counts = ([optimizer.state[p][k] for p in params] for k in ("square_avg", "step"))

    def step(*inputs):
        weights = {name: p.detach() for name, p in holder.named_parameters()}
        grads, loss = torch.func.grad_and_value(lambda w: torch.func.functional_call(holder, w, inputs))(weights)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
        grads = [g * (max_norm / (norm + 1e-6)).clamp(max=1.0) for g in grads.values()]
        with torch.no_grad():
            rmsprop(params, grads, square_avgs, [], [], counts, foreach=False, **settings)
        return loss.detach().clone()  # a clone: under CUDA graphs, the next replay overwrites the graph's outputs

    return torch.compile(step)


def critic_phase(critic, mixer, optimizer, params, *, state, obs, actions, targets, valid, sequential, max_norm,
                 compiled=None):  # fmt: skip
    """The critic's steps on a batch: one per timestep with valid episodes (authors') or one over all; (loss, count).
    compiled (--compile): timestep t's step sees every episode, those without a valid transition at t masked out, so
    all steps have one shape and one compiled graph serves them."""
    if compiled is not None:
        columns = [x.transpose(0, 1).contiguous() for x in (state, obs, actions, targets, valid.float())]
        steps = [t for t, count in enumerate(valid.sum(0).tolist()) if count]
        for t in steps:
            loss = compiled(*(x[t] for x in columns))
        return loss, len(steps)
    if sequential:
        indices = [(e, torch.full_like(e, t)) for t, e in enumerate(episodes_per_timestep(valid)) if len(e)]
    else:
        indices = [valid.nonzero(as_tuple=True)]
    for index in indices:  # (episodes, timesteps) of this batch
        loss = critic_loss(critic, mixer, state[index], obs[index], actions[index], targets[index])
        clipped_step(optimizer, loss, params, max_norm)
    return loss, len(indices)


def main(args):
    """Train ICQ-MA on one dataset; returns the summary (also written to runs/{run_name}/summary.json)."""
    args = resolve_args(args)
    data_name = os.path.basename(args.dataset_path).rsplit(".", 1)[0] if args.dataset_path else args.quality
    run = Run(args, SCRIPT, data_name=f"{args.map}-{data_name}")

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    backend, adapter = make_adapter(args.env_backend, args.map, args.seed)
    path = args.dataset_path or SMAX_DATASET.format(map=args.map, quality=args.quality, episodes=args.dataset_size)
    if args.dataset_path is None and backend != "smax":
        fail(f"--env-backend {backend} needs --dataset-path PATH.h5 (PyMARL episode layout, recorded on this StarCraft "
             "II version)")  # fmt: skip
    if args.dataset_path is None and not os.path.isfile(path):  # the main command records its SMAX data on first use
        import icq_data

        icq_data.generate_smax_dataset(adapter, path, args.quality, args.dataset_size, seed=0)
    reward_scale = args.reward_scale if args.reward_scale is not None else (10.0 if backend == "smax" else 1.0)
    data = load_pymarl_hdf5(path, adapter.info, args.map, backend, device, reward_scale)
    dataset_return = float((data["reward"] * data["mask"]).sum(1).mean()) / reward_scale
    num_episodes, (n_agents, n_actions) = data["obs"].shape[0], (adapter.info["n_agents"], adapter.info["n_actions"])
    obs_dim, state_dim = adapter.info["obs_shape"], adapter.info["state_shape"]
    print(f"{num_episodes} episodes, {int(data['mask'].sum())} transitions from {path}; backend {backend}, map "
          f"{args.map}; mean episode return {dataset_return:.3f}, rewards x {reward_scale:g} for training")  # fmt: skip

    actor = Actor(obs_dim, n_actions, n_agents, args.actor_hidden).to(device)
    critic = Critic(state_dim, obs_dim, n_actions, n_agents).to(device)
    mixer = Mixer(state_dim, n_agents, bias=args.mixer_bias).to(device)
    critic_target = copy.deepcopy(critic).requires_grad_(False)
    mixer_target = copy.deepcopy(mixer).requires_grad_(False)
    critic_params = list(critic.parameters()) + list(mixer.parameters())
    actor_optimizer = torch.optim.RMSprop(actor.parameters(), lr=args.actor_lr, alpha=0.99, eps=1e-5)
    critic_optimizer = torch.optim.RMSprop(critic_params, lr=args.critic_lr, alpha=0.99, eps=1e-5)
    modules = {"actor": actor, "critic": critic, "critic_target": critic_target, "actor_optimizer": actor_optimizer,
               "critic_optimizer": critic_optimizer, "mixer": mixer, "mixer_target": mixer_target}  # fmt: skip
    if args.normalizer == "behavior":  # mu_i for the exact Z: a recurrent policy on the actor's inputs, exact BC
        behavior = Actor(obs_dim, n_actions, n_agents, args.actor_hidden).to(device)
        behavior_optimizer = torch.optim.RMSprop(behavior.parameters(), lr=args.actor_lr, alpha=0.99, eps=1e-5)
        modules.update(behavior=behavior, behavior_optimizer=behavior_optimizer)
    counters = {"critic_steps": 0, "last_target_update": 0}  # critic optimiser steps, the last target copy's
    info = {"backend": backend, "dataset": path, "dataset_return": dataset_return, "reward_scale": reward_scale}
    start_step = run.begin(modules, device, state=counters, info=info, metrics=("win_rate",))
    batch_loss = partial(critic_loss, critic, mixer)  # --compile fuses its whole optimiser step into one graph
    compiled = compiled_step(batch_loss, [critic, mixer], critic_optimizer, args.grad_clip) if args.compile else None

    nonfinite_step = torch.full((), -1, device=device)  # first step with a NaN/inf loss, read at log intervals
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
            target_q = on_valid_rows(critic_target, next_rows, state, obs)
            k_target, b_target = on_valid_rows(mixer_target, next_rows, state)
            targets, rho = critic_targets(target_q, actions, k_target, b_target, rewards=reward, terminated=terminated,
                                          mask=mask, gamma=args.gamma, td_lambda=args.td_lambda,
                                          critic_alpha=args.critic_alpha, log_mu=log_mu)  # fmt: skip
        loss_q, n_steps = critic_phase(critic, mixer, critic_optimizer, critic_params, state=state, obs=obs,
                                       actions=actions, targets=targets, valid=valid, max_norm=args.grad_clip,
                                       sequential=args.critic_updates == "sequential", compiled=compiled)  # fmt: skip
        counters["critic_steps"] += n_steps
        if counters["critic_steps"] - counters["last_target_update"] >= args.target_update_interval:
            critic_target.load_state_dict(critic.state_dict())
            mixer_target.load_state_dict(mixer.state_dict())
            counters["last_target_update"] = counters["critic_steps"]

        # Actor phase (Sec. 4.3): weighted behaviour cloning with the just-updated critic; a_{t-1} is an input at t.
        with torch.no_grad():
            q_values = on_valid_rows(critic, valid, state[:, :-1], obs[:, :-1])
            k = on_valid_rows(mixer, valid, state[:, :-1])[0]
        logits, _ = actor(obs[:, :-1], previous_actions_onehot(actions[:, :-1], n_actions))
        loss_pi, actor_weights = actor_loss(logits, avail[:, :-1], actions[:, :-1], q_values, k, mask, alpha=args.alpha,
                                            weight_in_exponent=args.mixer_weight_in_exponent,
                                            log_mu=None if log_mu is None else log_mu[:, :-1],
                                            cap=args.actor_weight_max)  # fmt: skip
        clipped_step(actor_optimizer, loss_pi, list(actor.parameters()), args.grad_clip)
        if args.normalizer == "behavior":  # exact BC of mu_i on the same batch, after its weights were read
            loss_mu, _ = actor_loss(mu_logits[:, :-1], avail[:, :-1], actions[:, :-1], q_values, k, mask, float("inf"))
            clipped_step(behavior_optimizer, loss_mu, list(behavior.parameters()), args.grad_clip)
        nonfinite_step = torch.where((nonfinite_step < 0) & ~torch.isfinite(loss_q + loss_pi), step, nonfinite_step)

        if step % args.log_interval == 0:
            run.check_finite(nonfinite_step)
            q_taken, w = q_values.gather(-1, actions[:, :-1].unsqueeze(-1)).squeeze(-1), actor_weights[valid]
            scalars = {"critic_loss": loss_q.detach(), "actor_loss": loss_pi.detach(), "q_mean": q_taken[valid].mean(),
                       "actor_weight_max": w.max(), "actor_weight_std": w.std(), "rho_max": rho.max(),
                       "rho_std": rho[rho > 0].std(),  # the actor weights' effective sample size, a fraction of (t, i)
                       "actor_weight_ess": w.sum() ** 2 / (w.numel() * (w**2).sum())}  # fmt: skip
            if args.normalizer == "behavior":
                scalars["behavior_loss"] = loss_mu.detach()
            run.log(step, scalars)
        if step % args.eval_interval == 0 or step == args.total_steps:
            run.check_finite(nonfinite_step)
            with run.timing_evaluation():
                results = evaluate(actor, adapter, args.eval_episodes, args.seed + 10_000, device, args.eval_sample)
            run.evaluated(step, results)
        if run.stopped:
            run.check_finite(nonfinite_step)
            run.interrupt(step)
    return run.finish(step)


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__.split("\n\n")[0]))
