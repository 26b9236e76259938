"""Which controller's rows get ICQ-MA's actor weight on SMAX 3s_vs_5z strategy-mixed data (the README's weight shares).

usage: python benchmarks/ma_weight_share.py CHECKPOINT [DATASET]
CHECKPOINT: runs/<run>/checkpoint.pt of an icq_ma_smac.py run on 3s_vs_5z with --save-model; DATASET: a file with
per-episode controller ids (default datasets/smax_3s_vs_5z_mixed_v2.h5). Prints, per controller, its share of the
(row, agent) pairs and of the actor weight (all timesteps and t < 5), the effective sample size of the batch softmaxes,
and the mean / std of the advantages A_i over 40 batches of 32 episodes.
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
controller = torch.as_tensor(h5py.File(path, "r")["controller"][:])
names = list(h5py.File(path, "r").attrs["controller_names"])
info = adapter.info
N, A = info["n_agents"], info["n_actions"]
actor = m.Actor(info["obs_shape"], A, N, args["actor_hidden"]); actor.load_state_dict(ckpt["actor"])
critic = m.Critic(info["state_shape"], info["obs_shape"], A, N); critic.load_state_dict(ckpt["critic"])
mixer = m.Mixer(info["state_shape"], N); mixer.load_state_dict(ckpt["mixer"])
g = torch.Generator().manual_seed(0)
C = len(names)
w_sum = {"all": torch.zeros(C), "t<5": torch.zeros(C)}; rows = {"all": torch.zeros(C), "t<5": torch.zeros(C)}
adv_by = [[] for _ in range(C)]; q_by = [[] for _ in range(C)]; ess = []
with torch.no_grad():
    for _ in range(40):
        idx = torch.randperm(data["obs"].shape[0], generator=g)[:32]
        r = int(data["rows"][idx].max())
        obs, state = data["obs"][idx, :r].float(), data["state"][idx, :r].float()
        actions, avail, mask = data["actions"][idx, :r], data["avail"][idx, :r], data["mask"][idx, : r - 1]
        q = critic(state[:, :-1], obs[:, :-1]); k = mixer(state[:, :-1])[0]
        logits, _ = actor(obs[:, :-1], m.previous_actions_onehot(actions[:, :-1], A))
        _, w = m.actor_loss(logits, avail[:, :-1], actions[:, :-1], q, k, mask, args["alpha"])
        log_pi, av = m.masked_log_softmax(logits, avail[:, :-1])
        base = (log_pi.exp() * q.masked_fill(~av, 0)).sum(-1)
        adv = q.gather(-1, actions[:, :-1].unsqueeze(-1)).squeeze(-1) - base
        qa = q.gather(-1, actions[:, :-1].unsqueeze(-1)).squeeze(-1)
        valid = mask.bool()
        wv = w * valid.unsqueeze(-1)  # weights [B,T,N]; effective sample size of each (t, i) softmax over episodes
        n = valid.sum(0).unsqueeze(-1).float().expand(wv.shape[1:])
        keep = n >= 8
        ess.append((wv.sum(0) ** 2 / (wv ** 2).sum(0).clamp_min(1e-12) / n)[keep])
        cid = controller[idx].view(-1, 1).expand_as(mask)
        for key, sel in (("all", valid), ("t<5", valid & (torch.arange(r - 1) < 5))):
            for c in range(C):
                s = sel & (cid == c)
                w_sum[key][c] += w[s].sum(); rows[key][c] += s.sum() * N
        for c in range(C):
            s = valid & (cid == c)
            adv_by[c].append(adv[s].flatten()); q_by[c].append(qa[s].flatten())
for key in ("all", "t<5"):
    print(f"{key}: controller, share of (row, agent) pairs, share of actor weight, mean weight per pair")
    for c in range(C):
        print(f"  {names[c]:10s} {rows[key][c] / rows[key].sum():.3f} {w_sum[key][c] / w_sum[key].sum():.3f} {w_sum[key][c] / max(rows[key][c], 1):.3f}")
print(f"effective sample size / valid episodes per (t, i) with >= 8 episodes: mean {torch.cat(ess).mean():.3f}, median {torch.cat(ess).median():.3f}")
print("controller: A_i mean / std, Q_i(a_i) mean (reward x 10)")
for c in range(C):
    a, qq = torch.cat(adv_by[c]), torch.cat(q_by[c])
    print(f"  {names[c]:10s} {a.mean():+.3f} / {a.std():.3f}   {qq.mean():.2f}")
