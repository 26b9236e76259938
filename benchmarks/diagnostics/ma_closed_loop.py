"""Which scripted controller a trained ICQ-MA / BC actor imitates in its own greedy SMAX episodes (docs).

usage: python benchmarks/diagnostics/ma_closed_loop.py CHECKPOINT [CHECKPOINT ...]
Plays 128 greedy episodes of each checkpoint's actor on its map (the evaluation of icq_ma_smac.py) and, at every step of
every alive agent with more than one available action, asks each deterministic controller of the data generator
(focus_kite, spread, hold, split) what it would do in that state. Prints the win rate and, by timestep, the fraction of
agent-steps whose action equals each controller's, and the fractions of attack / move / stop actions; then, for
t < 60, how the actor's action kind compares with focus_kite's.
"""

import os
import sys

import jax
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import icq_data  # noqa: E402
import icq_ma_smac as m  # noqa: E402

EPISODES, BUCKETS = 128, ((0, 5), (5, 20), (20, 60), (60, 250))
COMPARED = [icq_data.CONTROLLERS.index(name) for name in ("focus_kite", "spread", "hold", "split")]


def kind(actions):  # 0 attack (5 + enemy), 1 move (0-3), 2 stop (4)
    return np.where(actions >= 5, 0, np.where(actions < 4, 1, 2))


def closed_loop(path):
    ckpt = torch.load(path, weights_only=False)
    args = ckpt["args"]
    adapter = m.SmaxAdapter(args["map"])
    info = adapter.info
    n_agents, n_actions = info["n_agents"], info["n_actions"]
    actor = m.Actor(info["obs_shape"], n_actions, n_agents, args["actor_hidden"])
    actor.load_state_dict(ckpt.get("modules", ckpt)["actor"])  # older checkpoints: the modules at the top
    policies = jax.jit(jax.vmap(lambda state, avail: icq_data.controller_policies(adapter.env, state, avail)))
    confusion = np.zeros((3, 3))  # focus_kite's kind x the actor's kind, t < 60
    match, kinds, count = np.zeros((len(BUCKETS), len(COMPARED))), np.zeros((len(BUCKETS), 3)), np.zeros(len(BUCKETS))
    with torch.no_grad():
        obs, _, avail = adapter.reset(EPISODES, 10_000)
        last, h = torch.zeros(EPISODES, n_agents, n_actions), None
        won, active = np.zeros(EPISODES, bool), np.ones(EPISODES, bool)
        for t in range(info["episode_limit"]):
            logits, h = actor(torch.as_tensor(obs)[:, None], last[:, None], h)
            act = m.masked_log_softmax(logits[:, 0], torch.as_tensor(avail))[0].argmax(-1)
            controllers = np.asarray(policies(adapter.state, jax.numpy.asarray(avail))).argmax(-1)[:, COMPARED]
            a = act.numpy()
            choice = (avail.sum(-1) > 1) & active[:, None]  # [n, N]
            b = next(i for i, (lo, hi) in enumerate(BUCKETS) if lo <= t < hi)
            count[b] += choice.sum()
            match[b] += [((controllers[:, c] == a) & choice).sum() for c in range(len(COMPARED))]
            kinds[b] += np.bincount(kind(a)[choice], minlength=3)
            if t < 60:
                np.add.at(confusion, (kind(controllers[:, 0])[choice], kind(a)[choice]), 1)
            obs, _, avail, _, terminated, battle_won = adapter.step(a)
            won |= battle_won & active
            active &= ~(terminated | (t + 1 >= info["episode_limit"]))
            last = F.one_hot(act, n_actions).float()
            if not active.any():
                break
    print(f"{path}: step {ckpt['step']}, alpha {args['alpha']}, {EPISODES} greedy episodes, win rate {won.mean():.3f}")
    print("  t bucket    agent-steps  same as focus_kite / spread / hold / split   attack / move / stop")
    for (lo, hi), n, mt, k in zip(BUCKETS, count, match, kinds):
        if n:
            same = " / ".join(f"{x / n:.3f}" for x in mt)
            kind_shares = " / ".join(f"{x / n:.3f}" for x in k)
            print(f"  [{lo:3d}, {hi:3d})  {int(n):10d}  {same}          {kind_shares}")
    print("  t < 60, rows: focus_kite's action kind, columns: the actor's (fraction of the row)")
    for name, row in zip(("attack", "move", "stop"), confusion):
        print(f"    {name:6s} {int(row.sum()):6d}  " + " ".join(f"{x / max(row.sum(), 1):.3f}" for x in row))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__.split("\n\n")[1].splitlines()[0])
    torch.set_num_threads(1)
    for checkpoint in sys.argv[1:]:
        closed_loop(checkpoint)
