"""Seconds per ICQ-MA learner iteration on one fixed batch of SMAX 3s_vs_5z episodes (a benchmark, not a test).

Three learners on the same batch, networks and optimisers, all sized and tuned by icq_ma_smac.py's Args defaults (GRU
width, learning rates, gradient clip, temperatures):
  padded   icq_ma_smac.py's iteration before packing: target critic, critic and actor-side Q on every (episode, t) row
           of the batch cut to its longest episode (padding included);
  packed   icq_ma_smac.py's iteration now: those three run on the valid rows only, scattered back (`on_valid_rows`);
  authors  the authors' learner as published (PyMARL offpg_learner, see docs/icq_ma_smac.md): the agent GRU unrolled
           one timestep at a time with a GRUCell, an epsilon-floored policy, the target critic / critic / actor-side Q
           on all padded rows, batch softmaxes that include the padding, one critic step per timestep (sequential).
Environment interaction and evaluation are excluded (the script's it/s excludes evaluation too).

    python benchmarks/diagnostics/ma_learner_timing.py [--iterations 5] [--rounds 3] [--dataset-path PATH]

prints one markdown table (s/iteration and the ratio to the authors' learner) on stdout.
"""

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import icq_data  # noqa: E402
import icq_ma_smac as ma  # noqa: E402
from benchmarks.floor import smax_cache_path  # noqa: E402

BATCH_KEYS = ("state", "obs", "actions", "avail", "reward", "terminated", "mask")


def batch_of(data, batch_size, seed):
    idx = torch.randperm(data["obs"].shape[0], generator=torch.Generator().manual_seed(seed))[:batch_size]
    rows = int(data["rows"][idx].max())
    b = {k: data[k][idx, :rows] for k in ("obs", "state", "actions", "avail")}
    b["obs"], b["state"] = b["obs"].float(), b["state"].float()
    b.update({k: data[k][idx, : rows - 1] for k in ("reward", "terminated", "mask")})
    return b


class Learner:
    """The script's networks and optimisers at its Args defaults (fresh, seeded), one iteration of each learner."""

    def __init__(self, info, n_agents, n_actions, seed, args):
        torch.manual_seed(seed)
        self.args, self.n_actions = args, n_actions
        self.actor = ma.Actor(info["obs_shape"], n_actions, n_agents, args.actor_hidden)
        self.critic = ma.Critic(info["state_shape"], info["obs_shape"], n_actions, n_agents)
        self.mixer = ma.Mixer(info["state_shape"], n_agents)
        self.critic_target, self.mixer_target = copy.deepcopy(self.critic), copy.deepcopy(self.mixer)
        self.critic_params = list(self.critic.parameters()) + list(self.mixer.parameters())
        self.actor_opt = torch.optim.RMSprop(self.actor.parameters(), lr=args.actor_lr, alpha=0.99, eps=1e-5)
        self.critic_opt = torch.optim.RMSprop(self.critic_params, lr=args.critic_lr, alpha=0.99, eps=1e-5)
        # the authors' agent: the same fc1 / fc2, the GRU as a GRUCell stepped by hand
        self.cell = nn.GRUCell(args.actor_hidden, args.actor_hidden)
        self.cell.load_state_dict({k[:-3]: v for k, v in self.actor.gru.state_dict().items()})
        self.authors_actor_params = [
            *self.actor.fc1.parameters(),
            *self.cell.parameters(),
            *self.actor.fc2.parameters(),
        ]
        self.authors_actor_opt = torch.optim.RMSprop(self.authors_actor_params, lr=args.actor_lr, alpha=0.99, eps=1e-5)

    def step(self, optimizer, loss, params):
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, self.args.grad_clip)
        optimizer.step()

    def q_tot(self, state, obs, actions):
        k, b = self.mixer(state)
        return (k * self.critic(state, obs).gather(-1, actions.unsqueeze(-1)).squeeze(-1)).sum(-1) + b

    def script_iteration(self, b, packed, mode):
        """icq_ma_smac.py's learner (packed=True: as it is now; False: as it was, on the padded rows)."""
        a = self.args
        state, obs, actions, avail, reward, terminated, mask = (b[k] for k in BATCH_KEYS)
        valid = mask.bool()
        with torch.no_grad():
            if packed:
                next_rows = F.pad(valid, (1, 0))
                target_q = ma.on_valid_rows(self.critic_target, next_rows, state, obs)
                k_t, b_t = ma.on_valid_rows(self.mixer_target, next_rows, state)
            else:
                target_q, (k_t, b_t) = self.critic_target(state, obs), self.mixer_target(state)
            targets, _ = ma.critic_targets(
                target_q, actions, k_t, b_t, reward, terminated, mask, a.gamma, a.td_lambda, a.critic_alpha
            )
        if packed:  # the script's loop
            if mode == "sequential":
                indices = [(e, torch.full_like(e, t)) for t, e in enumerate(ma.episodes_per_timestep(valid)) if len(e)]
            else:
                indices = [valid.nonzero(as_tuple=True)]
            for index in indices:
                loss = ma.critic_loss(self.critic, self.mixer, state[index], obs[index], actions[index], targets[index])
                self.step(self.critic_opt, loss, self.critic_params)
        elif mode == "sequential":  # the loop before packing
            maskf = mask.float()
            for t in range(mask.shape[1]):
                error = (self.q_tot(state[:, t], obs[:, t], actions[:, t]) - targets[:, t]) ** 2
                self.step(
                    self.critic_opt, (error * maskf[:, t]).sum() / maskf[:, t].sum().clamp_min(1), self.critic_params
                )
        else:
            error = (self.q_tot(state[:, :-1], obs[:, :-1], actions[:, :-1]) - targets) ** 2
            self.step(self.critic_opt, (error * mask).sum() / mask.sum(), self.critic_params)
        with torch.no_grad():
            if packed:
                q_values = ma.on_valid_rows(self.critic, valid, state[:, :-1], obs[:, :-1])
                k = ma.on_valid_rows(self.mixer, valid, state[:, :-1])[0]
            else:
                q_values, k = self.critic(state[:, :-1], obs[:, :-1]), self.mixer(state[:, :-1])[0]
        logits, _ = self.actor(obs[:, :-1], ma.previous_actions_onehot(actions[:, :-1], self.n_actions))
        loss, _ = ma.actor_loss(logits, avail[:, :-1], actions[:, :-1], q_values, k, mask, a.alpha)
        self.step(self.actor_opt, loss, list(self.actor.parameters()))

    def authors_iteration(self, b, epsilon=0.05):
        """The authors' learner, rebuilt from its description: every network on every padded row, softmaxes over the
        batch including the padding, one critic step per timestep (skipping empty ones), a per-timestep GRUCell
        unroll."""
        a = self.args
        state, obs, actions, avail, reward, terminated, mask = (b[k] for k in BATCH_KEYS)
        B, T, N = actions.shape
        with torch.no_grad():
            k_t, _ = self.mixer_target(state)
            q_taken = self.critic_target(state, obs).gather(-1, actions.unsqueeze(-1)).squeeze(-1)
            q_tot = (k_t * q_taken).sum(-1)  # [B, T]
            y = B * torch.softmax(q_tot / a.critic_alpha, 0) * q_tot  # over the batch, padding included
            step_mask = mask * F.pad(1 - terminated[:, :-1], (1, 0))
            ret = torch.zeros(B, T)
            ret[:, -1] = y[:, -1] * (1 - terminated.sum(1))
            for t in reversed(range(T - 1)):
                ret[:, t] = a.td_lambda * a.gamma * ret[:, t + 1] + step_mask[:, t] * (
                    reward[:, t] + (1 - a.td_lambda) * a.gamma * y[:, t + 1] * (1 - terminated[:, t])
                )
            targets = ret[:, :-1]
        for t in range(T - 1):
            mask_t = step_mask[:, t]
            if mask_t.sum() == 0:  # a host sync per timestep, as in the original
                continue
            error = (self.q_tot(state[:, t], obs[:, t], actions[:, t]) - targets[:, t]) ** 2
            self.step(self.critic_opt, (error * mask_t).sum() / mask_t.sum(), self.critic_params)
        # actor: unroll the agent one timestep at a time over the whole padded episode
        last = ma.previous_actions_onehot(actions, self.n_actions)
        ids = torch.eye(N).expand(B, N, N)
        h, probs = torch.zeros(B * N, a.actor_hidden), []
        for t in range(T):
            x = F.relu(self.actor.fc1(torch.cat([obs[:, t], last[:, t], ids], -1))).reshape(B * N, -1)
            h = self.cell(x, h)
            p = torch.softmax(self.actor.fc2(h).reshape(B, N, -1).masked_fill(~avail[:, t], -1e10), -1)
            n_avail = avail[:, t].sum(-1, keepdim=True).clamp_min(1)
            p = ((1 - epsilon) * p + epsilon / n_avail) * avail[:, t]
            probs.append(p / p.sum(-1, keepdim=True).clamp_min(1e-10))
        pi = torch.stack(probs, 1)[:, :-1]
        with torch.no_grad():
            q_vals, (k, _) = self.critic(state[:, :-1], obs[:, :-1]), self.mixer(state[:, :-1])
        baseline = (pi * q_vals).sum(-1).detach()
        advantage = q_vals.gather(-1, actions[:, :-1].unsqueeze(-1)).squeeze(-1) - baseline
        weight = B * torch.softmax(advantage / a.alpha, 0)  # per (t, agent) over the batch, padding included
        pi_taken = pi.gather(-1, actions[:, :-1].unsqueeze(-1)).squeeze(-1)
        agent_mask = mask.unsqueeze(-1).expand_as(pi_taken)
        log_pi = torch.log(torch.where(agent_mask > 0, pi_taken, torch.ones_like(pi_taken)))
        loss = -(k * weight * log_pi * agent_mask).sum() / agent_mask.sum()
        self.step(self.authors_actor_opt, loss, self.authors_actor_params)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--map", default="3s_vs_5z")
    p.add_argument("--dataset-path", help="default: the script's cached medium file of --map (made if missing)")
    p.add_argument(
        "--iterations", type=int, default=5, help="timed iterations per learner and round (after one warm-up)"
    )
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median round is reported")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=1)
    cli = p.parse_args()
    torch.set_num_threads(cli.threads)
    adapter = ma.SmaxAdapter(cli.map)
    args = ma.Args(map=cli.map)
    path = cli.dataset_path or smax_cache_path(cli.map, "medium", args.dataset_size)
    if not os.path.isfile(path):
        icq_data.generate_smax_dataset(adapter, path, "medium", args.dataset_size, seed=0)
    data = ma.load_pymarl_hdf5(path, adapter.info, cli.map, "smax", "cpu", 10.0)
    b = batch_of(data, cli.batch_size, cli.seed)
    valid, rows = int(b["mask"].sum()), b["mask"].numel()
    learner = Learner(adapter.info, adapter.info["n_agents"], adapter.info["n_actions"], cli.seed, args)
    runs = [("authors (GRUCell unroll, padded, sequential)", lambda: learner.authors_iteration(b))]
    for mode in ("sequential", "batched"):
        for packed in (False, True):
            runs.append(
                (
                    f"icq_ma_smac.py {mode}, {'packed (now)' if packed else 'padded (before)'}",
                    lambda m=mode, pk=packed: learner.script_iteration(b, pk, m),
                )
            )
    for _, fn in runs:
        fn()  # warm-up
    times = {name: [] for name, _ in runs}
    for _ in range(cli.rounds):  # interleaved rounds, so a load change on a shared machine hits every learner alike
        for name, fn in runs:
            start = time.perf_counter()
            for _ in range(cli.iterations):
                fn()
            times[name].append((time.perf_counter() - start) / cli.iterations)
    results = [(name, statistics.median(t)) for name, t in times.items()]
    authors = results[0][1]
    print(
        f"batch: {cli.batch_size} episodes x {b['mask'].shape[1]} transition rows, {valid} valid ({valid / rows:.0%}); "
        f"median of {cli.rounds} interleaved rounds of {cli.iterations} iterations, torch threads {cli.threads}\n"
    )
    print("| learner | s/iteration | authors' time / this |\n|---|---|---|")
    for name, seconds in results:
        print(f"| {name} | {seconds:.3f} | {authors / seconds:.2f}x |")


if __name__ == "__main__":
    main()
