"""The speed floor: each script's own networks and optimisers (imported from it; importing a script has no side
effects) doing per update exactly the forwards, backwards and optimiser steps the script does, on one fixed batch, with
a plain TD target and unweighted behaviour cloning: no ICQ weights, no sampling, no NaN checks, no logging. Learning
rates, gamma and tau are the script's Args defaults. Also the synthetic D4RL-layout Hopper file the speed grid reads.
"""

import argparse
import json
import os
import resource
import time

import numpy as np

SCRIPTS = ("continuous", "discrete", "ma")


def timed(step, total_steps, warmup=20):
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(total_steps):
        step()
    return total_steps / (time.perf_counter() - start)


def polyak(net, target, tau):
    import torch

    with torch.no_grad():
        for p, p_target in zip(net.parameters(), target.parameters()):
            p_target.lerp_(p, tau)


def floor_continuous(opts, device):
    import h5py
    import torch
    from gymnasium.spaces import Box

    import icq_continuous as m

    with h5py.File(opts.dataset_path, "r") as f:
        raw = sum(f[k].nbytes for k in ("observations", "actions", "rewards", "terminals", "timeouts"))
    columns, _ = m.load_d4rl_hdf5(opts.dataset_path, False)  # (transitions, episode returns)
    keys = ("obs", "actions", "rewards", "next_obs", "next_actions", "dones")
    data = {k: torch.as_tensor(np.asarray(c, dtype=np.float32), device=device) for k, c in zip(keys, columns)}
    held = sum(t.nbytes for t in data.values())
    obs_dim, act_dim = data["obs"].shape[1], data["actions"].shape[1]
    obs, act, rew, next_obs, next_act, done = (data[k][: opts.batch_size].clone() for k in keys)
    a = m.Args
    actor = m.Actor(obs_dim, act_dim, Box(-1.0, 1.0, (act_dim,))).to(device)
    critic = m.Critic(obs_dim, act_dim, 1).to(device)  # the locomotion preset: one Q
    target = m.Critic(obs_dim, act_dim, 1).to(device).requires_grad_(False)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=a.actor_lr, weight_decay=a.actor_weight_decay)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=a.critic_lr)

    def step():
        with torch.no_grad():
            y = rew + a.gamma * (1 - done) * target(next_obs, next_act).min(0).values
        loss_q = ((critic(obs, act) - y) ** 2).mean(1).sum()
        critic_opt.zero_grad()
        loss_q.backward()
        critic_opt.step()
        with torch.no_grad():  # the actor signal's two critic forwards
            critic(obs, act), critic(next_obs, next_act)
        loss_pi = -actor.log_prob(obs, act).mean()
        actor_opt.zero_grad()
        loss_pi.backward()
        actor_opt.step()
        polyak(critic, target, a.tau)

    return timed(step, opts.total_steps), raw, held, "obs, actions, rewards, next_obs, next_actions, dones (float32)"


def floor_discrete(opts, device):
    import torch
    import torch.nn.functional as F

    import icq_discrete as m

    episodes = m.load_builtin(opts.quality, opts.dataset_size)[0]
    raw = sum(a.nbytes for ep in episodes for a in ep)
    data = m.make_dataset_tensors(episodes, device)
    held = sum(t.nbytes for t in data.values())
    keys = ("obs", "actions", "rewards", "next_obs", "next_actions", "dones")
    obs, act, rew, next_obs, next_act, done = (data[k][: opts.batch_size].clone() for k in keys)
    n_actions = 4
    a = m.Args
    actor, critic, behavior = (net(obs.shape[1], n_actions).to(device) for net in (m.Actor, m.Critic, m.Actor))
    target = m.Critic(obs.shape[1], n_actions).to(device)
    target.requires_grad_(False)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=a.actor_lr)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=a.critic_lr)
    behavior_opt = torch.optim.Adam(behavior.parameters(), lr=a.actor_lr)
    use_behavior = opts.normalizer == "behavior"

    def step():
        if use_behavior:
            loss_mu = F.cross_entropy(behavior(obs), act)
            behavior_opt.zero_grad()
            loss_mu.backward()
            behavior_opt.step()
        with torch.no_grad():
            y = rew + a.gamma * (1 - done) * target(next_obs).gather(1, next_act[:, None]).squeeze(1)
            if use_behavior:
                behavior(next_obs)
        loss_q = F.mse_loss(critic(obs).gather(1, act[:, None]).squeeze(1), y)
        critic_opt.zero_grad()
        loss_q.backward()
        critic_opt.step()
        log_pi = F.log_softmax(actor(obs), -1)
        with torch.no_grad():
            critic(obs)
            if use_behavior:
                behavior(obs)
        loss_pi = -log_pi.gather(1, act[:, None]).mean()
        actor_opt.zero_grad()
        loss_pi.backward()
        actor_opt.step()
        polyak(critic, target, a.tau)

    return timed(step, opts.total_steps), raw, held, "obs, actions (int64), rewards, next_obs, next_actions, dones"


def smax_cache_path(map_name, quality, episodes):
    """The file icq_ma_smac.py generates and caches for --map, --quality and --dataset-size (episodes)."""
    return f"datasets/smax_{map_name}_{quality}_{episodes}ep_v2.h5"


def floor_ma(opts, device):
    import h5py
    import torch
    import torch.nn as nn

    import icq_ma_smac as m

    episodes = opts.dataset_episodes or m.Args.dataset_size
    path = opts.dataset_path or smax_cache_path(opts.map, opts.quality, episodes)
    if not os.path.isfile(path):
        raise SystemExit(f"error: no {path}: run icq_ma_smac.py once with the same --map/--quality to make it")
    with h5py.File(path, "r") as f:
        raw = sum(f[k].nbytes for k in m.DATA_KEYS)
        info = {
            "n_agents": f["obs"].shape[2],
            "n_actions": f["avail_actions"].shape[3],
            "obs_shape": f["obs"].shape[3],
            "state_shape": f["state"].shape[2],
        }
    data = m.load_pymarl_hdf5(path, info, opts.map, "smax", device)
    held = sum(t.nbytes for t in data.values())
    n_agents, n_actions = info["n_agents"], info["n_actions"]
    obs_dim, state_dim = info["obs_shape"], info["state_shape"]
    idx = torch.randperm(data["obs"].shape[0], generator=torch.Generator().manual_seed(0))[: opts.batch_size].to(device)
    rows = int(data["rows"][idx].max())
    obs, state = data["obs"][idx, :rows].float(), data["state"][idx, :rows].float()
    actions = data["actions"][idx, :rows]
    reward = data["reward"][idx, : rows - 1]
    a = m.Args
    actor = m.Actor(obs_dim, n_actions, n_agents, a.actor_hidden).to(device)
    critic = m.Critic(state_dim, obs_dim, n_actions, n_agents).to(device)
    mixer = m.Mixer(state_dim, n_agents).to(device)
    critic_target = m.Critic(state_dim, obs_dim, n_actions, n_agents).to(device)
    mixer_target = m.Mixer(state_dim, n_agents).to(device)
    critic_params = list(critic.parameters()) + list(mixer.parameters())
    actor_opt = torch.optim.RMSprop(actor.parameters(), lr=a.actor_lr, alpha=0.99, eps=1e-5)
    critic_opt = torch.optim.RMSprop(critic_params, lr=a.critic_lr, alpha=0.99, eps=1e-5)
    last_actions = m.previous_actions_onehot(actions[:, :-1], n_actions)

    def opt_step(opt, loss, params):
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, a.grad_clip)
        opt.step()

    def q_tot(s, o, act):
        k, b = mixer(s)
        return (k * critic(s, o).gather(-1, act.unsqueeze(-1)).squeeze(-1)).sum(-1) + b

    def step():
        with torch.no_grad():  # the target networks' forward (no TD(lambda), no ICQ weights)
            k_t, _ = mixer_target(state)
            q_t = (k_t * critic_target(state, obs).gather(-1, actions.unsqueeze(-1)).squeeze(-1)).sum(-1)
            y = reward + a.gamma * q_t[:, 1:]
        if opts.critic_updates == "sequential":
            for t in range(rows - 1):
                loss = ((q_tot(state[:, t], obs[:, t], actions[:, t]) - y[:, t]) ** 2).mean()
                opt_step(critic_opt, loss, critic_params)
        else:
            loss = ((q_tot(state[:, :-1], obs[:, :-1], actions[:, :-1]) - y) ** 2).mean()
            opt_step(critic_opt, loss, critic_params)
        with torch.no_grad():
            critic(state[:, :-1], obs[:, :-1]), mixer(state[:, :-1])
        logits, _ = actor(obs[:, :-1], last_actions)
        loss_pi = -torch.log_softmax(logits, -1).gather(-1, actions[:, :-1].unsqueeze(-1)).mean()
        opt_step(actor_opt, loss_pi, list(actor.parameters()))

    note = "episode tensors padded to the longest episode (obs/state as stored, actions int64, avail bool, mask)"
    return timed(step, opts.total_steps, warmup=2), raw, held, note


def floor_command(argv):
    """Measure one floor and write runs/<run_name>/summary.json (steps_per_second, raw_bytes, dataset_bytes)."""
    import torch

    parser = argparse.ArgumentParser(prog="aggregate.py floor")
    parser.add_argument("script", choices=SCRIPTS)
    parser.add_argument("--run-name", required=True)
    parser.add_argument("--total-steps", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--dataset-path")
    parser.add_argument("--quality", default="medium")
    parser.add_argument("--normalizer", default="batch")
    parser.add_argument("--dataset-size", type=int, default=100_000)
    parser.add_argument("--map", default="3s_vs_5z")
    parser.add_argument("--dataset-episodes", type=int, help="default: icq_ma_smac.py's")
    parser.add_argument("--critic-updates", default="sequential")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-cuda", action="store_true")
    opts, _ = parser.parse_known_args(argv)  # the scripts' other options (e.g. --env-id) do not change the floor
    torch.manual_seed(0)
    if opts.script == "ma":
        torch.set_num_threads(opts.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and not opts.no_cuda else "cpu")
    measure = {"continuous": floor_continuous, "discrete": floor_discrete, "ma": floor_ma}[opts.script]
    rate, raw, held, note = measure(opts, device)
    summary = {
        "run_name": opts.run_name,
        "steps_per_second": rate,
        "raw_bytes": int(raw),
        "dataset_bytes": int(held),
        "dataset_note": note,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device": str(device),
    }
    os.makedirs(f"runs/{opts.run_name}", exist_ok=True)
    with open(f"runs/{opts.run_name}/summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    print(
        f"floor {opts.script}: {rate:.1f} updates/s on {device}; "
        f"dataset {held / 2**20:.1f} MB held for {raw / 2**20:.1f} MB raw",
        flush=True,
    )


def make_hopper_data(path, n):
    """A synthetic D4RL-layout file with Hopper sizes (obs 11, act 3), episodes of 1000 steps ending in a timeout."""
    import h5py

    if os.path.exists(path):
        return
    rng = np.random.default_rng(0)
    timeouts = np.zeros(n, bool)
    timeouts[999::1000] = True
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with h5py.File(path + ".tmp", "w") as f:
        f["observations"] = rng.normal(size=(n, 11)).astype(np.float32)
        f["actions"] = rng.uniform(-1, 1, size=(n, 3)).astype(np.float32)
        f["rewards"] = rng.normal(size=n).astype(np.float32)
        f["terminals"], f["timeouts"] = np.zeros(n, bool), timeouts
    os.replace(path + ".tmp", path)
