"""Which rows get ICQ-MA's actor weight on SMAX 3s_vs_5z data (the README's weight shares), and at which temperature.

usage: python benchmarks/ma_weight_share.py CHECKPOINT [DATASET]
CHECKPOINT: runs/<run>/checkpoint.pt of an icq_ma_smac.py run on 3s_vs_5z with --save-model; DATASET: an HDF5 file of
that map (default datasets/smax_3s_vs_5z_mixed_v2.h5). Over 40 batches of 32 episodes it prints, at the checkpoint's alpha:
each controller's share of the (row, agent) pairs and of the actor weight (all timesteps and t < 5), the effective sample
size of the batch softmaxes, and the mean / std of A_i. Then, with the checkpoint's critic and actor fixed, the mean
weight per pair of each controller (files with controller ids) and of the rows whose taken action the actor finds
unlikely (pi < 0.1: on epsilon-noise data mostly the random actions), for temperatures from 0.01 to 100, and by timestep
the weight, A_i and the actor's probability of the taken action.
"""
import os
import sys

import h5py
import numpy as np
import torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import icq_ma_smac as m

torch.set_num_threads(1)
ckpt = torch.load(sys.argv[1], weights_only=False)
path = sys.argv[2] if len(sys.argv) > 2 else "datasets/smax_3s_vs_5z_mixed_v2.h5"
args = ckpt["args"]
adapter = m.SmaxAdapter("3s_vs_5z")
data = m.load_dataset(path, adapter.info, "3s_vs_5z", "smax", torch.device("cpu"), 10.0, adapter.raw_state)
with h5py.File(path, "r") as f:
    controller = torch.as_tensor(f["controller"][:]) if "controller" in f else torch.zeros(data["obs"].shape[0], dtype=torch.long)
    names = list(f.attrs["controller_names"]) if "controller" in f else ["all"]
info = adapter.info
N, A = info["n_agents"], info["n_actions"]
actor = m.Actor(info["obs_shape"], A, N, args["actor_hidden"]); actor.load_state_dict(ckpt["actor"])
critic = m.Critic(info["state_shape"], info["obs_shape"], A, N); critic.load_state_dict(ckpt["critic"])
mixer = m.Mixer(info["state_shape"], N); mixer.load_state_dict(ckpt["mixer"])
g = torch.Generator().manual_seed(0)
C = len(names)
batches = []  # per batch: logits, avail, actions, q, k, mask, valid, controller id, t < 5, pi(a_i) < 0.1, A_i, t, pi(a_i)
with torch.no_grad():
    for _ in range(40):
        idx = torch.randperm(data["obs"].shape[0], generator=g)[:32]
        r = int(data["rows"][idx].max())
        obs, state = data["obs"][idx, :r].float(), data["state"][idx, :r].float()
        actions, avail, mask = data["actions"][idx, :r - 1], data["avail"][idx, :r - 1], data["mask"][idx, : r - 1]
        q = critic(state[:, :-1], obs[:, :-1]); k = mixer(state[:, :-1])[0]
        logits, _ = actor(obs[:, :-1], m.previous_actions_onehot(data["actions"][idx, :r - 1], A))
        log_pi, av = m.masked_log_softmax(logits, avail)
        adv = q.gather(-1, actions.unsqueeze(-1)).squeeze(-1) - (log_pi.exp() * q.masked_fill(~av, 0)).sum(-1)
        pi_taken = log_pi.gather(-1, actions.unsqueeze(-1)).squeeze(-1).exp()
        valid = mask.bool().unsqueeze(-1).expand_as(adv)
        cid = controller[idx].view(-1, 1, 1).expand_as(adv)
        t = torch.arange(r - 1).view(1, -1, 1).expand_as(adv)
        batches.append((logits, avail, actions, q, k, mask, valid, cid, t < 5, pi_taken < 0.1, adv, t, pi_taken))


present = [c for c in range(C) if any(bool((b[6] & (b[7] == c)).any()) for b in batches)]  # controllers in the file


def weights(alpha, in_exponent=False):
    return [m.actor_loss(b[0], b[1], b[2], b[3], b[4], b[5], alpha, in_exponent)[1] for b in batches]


def mean_weight(ws, select):  # mean actor weight per (row, agent) pair of the pairs select(batch) picks
    total = sum(w[select(b) & b[6]].sum() for w, b in zip(ws, batches))
    return float(total / max(sum(int((select(b) & b[6]).sum()) for b in batches), 1))


ws = weights(args["alpha"])
for label, extra in (("all", lambda b: True), ("t<5", lambda b: b[8])):
    print(f"{label} at alpha {args['alpha']}: controller, share of (row, agent) pairs, share of actor weight, mean weight per pair")
    pairs = [sum(int((b[6] & (b[7] == c) & extra(b)).sum()) for b in batches) for c in range(C)]
    wsum = [sum(float(w[b[6] & (b[7] == c) & extra(b)].sum()) for w, b in zip(ws, batches)) for c in range(C)]
    for c in present:
        print(f"  {names[c]:10s} {pairs[c] / sum(pairs):.3f} {wsum[c] / sum(wsum):.3f} {wsum[c] / max(pairs[c], 1):.3f}")
ess = []  # effective sample size of each (t, i) softmax over episodes, relative to its valid episodes
for w, b in zip(ws, batches):
    wv, n = w * b[6], b[6].sum(0).float()
    ess.append((wv.sum(0) ** 2 / (wv ** 2).sum(0).clamp_min(1e-12) / n.clamp_min(1))[n >= 8])
print(f"effective sample size / valid episodes per (t, i) with >= 8 episodes: mean {torch.cat(ess).mean():.3f}, median {torch.cat(ess).median():.3f}")
print("controller: A_i mean / std, Q_i(a_i) mean (reward x 10)")
for c in present:
    a = torch.cat([b[10][b[6] & (b[7] == c)] for b in batches])
    qa = torch.cat([b[3].gather(-1, b[2].unsqueeze(-1)).squeeze(-1)[b[6] & (b[7] == c)] for b in batches])
    print(f"  {names[c]:10s} {a.mean():+.3f} / {a.std():.3f}   {qa.mean():.2f}")
a_rare = torch.cat([b[10][b[6] & b[9]] for b in batches]); a_common = torch.cat([b[10][b[6] & ~b[9]] for b in batches])
print(f"pi(a_i) < 0.1: {a_rare.numel() / (a_rare.numel() + a_common.numel()):.3f} of pairs, A_i {a_rare.mean():+.3f} / {a_rare.std():.3f}; "
      f"pi >= 0.1: A_i {a_common.mean():+.3f} / {a_common.std():.3f}")
print(f"by timestep: controller, pairs, mean weight per pair at alpha {args['alpha']} / 0.3 / 1 / 3, A_i mean / std, actor's pi(a_i) mean")
sweep = [weights(alpha) for alpha in (args["alpha"], 0.3, 1.0, 3.0)]
for lo, hi in ((0, 5), (5, 20), (20, 60), (60, 10**6)):
    print(f"  t in [{lo}, {hi if hi < 10**6 else 'end'})")
    for c in present:
        sel = [b[6] & (b[7] == c) & (b[11] >= lo) & (b[11] < hi) for b in batches]
        n = sum(int(x.sum()) for x in sel)
        if n:
            a = torch.cat([b[10][x] for b, x in zip(batches, sel)])
            w = " / ".join(f"{sum(float(wb[x].sum()) for wb, x in zip(ws, sel)) / n:.3f}" for ws in sweep)
            pi = torch.cat([b[12][x] for b, x in zip(batches, sel)]).mean()
            print(f"    {names[c]:10s} {n:6d} {w}  {a.mean():+.3f} / {a.std():.3f}  {pi:.3f}")
print("temperature sweep (critic and actor fixed): mean weight per pair; k_i outside the exponent (default) | inside")
print("  alpha   " + " ".join(f"{names[c][:10]:>10s}" for c in present) + "  pi<0.1 pi>=0.1 | " + " ".join(f"{names[c][:10]:>10s}" for c in present) + "  pi<0.1")
for alpha in (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0):
    cols = []
    for in_exp in (False, True):
        ws = weights(alpha, in_exp)
        cols.append(" ".join(f"{mean_weight(ws, lambda b, c=c: b[7] == c):10.3f}" for c in present))
        cols.append(f"{mean_weight(ws, lambda b: b[9]):7.3f}" + ("" if in_exp else f" {mean_weight(ws, lambda b: ~b[9]):7.3f}"))
    print(f"  {alpha:<7g} {cols[0]} {cols[1]} | {cols[2]} {cols[3]}")
