"""Which rows get ICQ-MA's actor weight on SMAX data, and at which temperature (docs' diagnostics).

usage: python benchmarks/diagnostics/ma_weight_share.py CHECKPOINT [DATASET]
CHECKPOINT: runs/<run>/checkpoint.pt of an icq_ma_smac.py run on SMAX; DATASET: an HDF5 file of its map (default: the
run's own data set). Over 40 batches of 32 episodes it prints, at the checkpoint's alpha: each controller's share of
the (row, agent) pairs and of the actor weight (all timesteps and t < 5, and by agent), the effective sample size of
the batch softmaxes, and the mean / std of A_i. Then, with the checkpoint's critic and actor fixed, the mean weight per
pair of each controller (files with controller ids) and of the rows whose taken action the actor finds unlikely
(pi < 0.1: on epsilon-noise data mostly the random actions), for temperatures from 0.01 to 100, and by timestep the
weight, A_i and the actor's probability of the taken action. A checkpoint of --normalizer behavior is read with its
per-state weights (its behaviour model gives Z).
"""

import os
import sys

import h5py
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import icq_ma_smac as m  # noqa: E402
from benchmarks.floor import smax_cache_path  # noqa: E402

# per batch: logits, avail, actions, q, k, mask, valid, controller id, t < 5, pi(a_i) < 0.1, A_i, t, pi(a_i), and
# log mu (the checkpoint's behaviour model under --normalizer behavior, else None)
LOGITS, AVAIL, ACTIONS, Q, K, MASK, VALID, CID, EARLY, RARE, ADV, T, PI, LOG_MU = range(14)


def load_batches(ckpt, path, n_batches=40, batch_size=32):
    args = ckpt["args"]
    adapter = m.SmaxAdapter(args["map"])
    data = m.load_pymarl_hdf5(path, adapter.info, args["map"], "smax", torch.device("cpu"), 10.0)
    with h5py.File(path, "r") as f:
        if "controller" in f:
            controller, names = torch.as_tensor(f["controller"][:]), list(f.attrs["controller_names"])
        else:
            controller, names = torch.zeros(data["obs"].shape[0], dtype=torch.long), ["all"]
    info = adapter.info
    n_agents, n_actions = info["n_agents"], info["n_actions"]
    actor = m.Actor(info["obs_shape"], n_actions, n_agents, args["actor_hidden"])
    critic = m.Critic(info["state_shape"], info["obs_shape"], n_actions, n_agents)
    mixer = m.Mixer(info["state_shape"], n_agents)
    for net, key in ((actor, "actor"), (critic, "critic"), (mixer, "mixer")):
        net.load_state_dict(ckpt.get("modules", ckpt)[key])  # older checkpoints: the modules at the top
    behavior = None
    if args.get("normalizer") == "behavior":
        behavior = m.Actor(info["obs_shape"], n_actions, n_agents, args["actor_hidden"])
        behavior.load_state_dict(ckpt.get("modules", ckpt)["behavior"])
    g = torch.Generator().manual_seed(0)
    batches = []
    with torch.no_grad():
        for _ in range(n_batches):
            idx = torch.randperm(data["obs"].shape[0], generator=g)[:batch_size]
            r = int(data["rows"][idx].max())
            obs, state = data["obs"][idx, :r].float(), data["state"][idx, :r].float()
            actions, avail, mask = (data[k][idx, : r - 1] for k in ("actions", "avail", "mask"))
            q, k = critic(state[:, :-1], obs[:, :-1]), mixer(state[:, :-1])[0]
            logits, _ = actor(obs[:, :-1], m.previous_actions_onehot(actions, n_actions))
            log_pi, av = m.masked_log_softmax(logits, avail)
            adv = q.gather(-1, actions.unsqueeze(-1)).squeeze(-1) - (log_pi.exp() * q.masked_fill(~av, 0)).sum(-1)
            pi_taken = log_pi.gather(-1, actions.unsqueeze(-1)).squeeze(-1).exp()
            valid = mask.bool().unsqueeze(-1).expand_as(adv)
            cid = controller[idx].view(-1, 1, 1).expand_as(adv)
            t = torch.arange(r - 1).view(1, -1, 1).expand_as(adv)
            log_mu = None
            if behavior is not None:
                mu_logits, _ = behavior(obs[:, :-1], m.previous_actions_onehot(actions, n_actions))
                log_mu = m.masked_log_softmax(mu_logits, avail)[0]
            batches.append((logits, avail, actions, q, k, mask, valid, cid, t < 5, pi_taken < 0.1, adv, t, pi_taken,
                            log_mu))  # fmt: skip
    return batches, names


def main(ckpt_path, path=None):
    torch.set_num_threads(1)
    ckpt = torch.load(ckpt_path, weights_only=False)
    args = ckpt["args"]
    # the run's data: --dataset-path (older runs: --dataset), else the generated file of its map and --quality
    path = path or args.get("dataset_path") or args.get("dataset")
    path = path or smax_cache_path(args["map"], args["quality"], args.get("dataset_size", args.get("dataset_episodes")))
    batches, names = load_batches(ckpt, path)
    n_controllers = len(names)
    present = [c for c in range(n_controllers) if any(bool((b[VALID] & (b[CID] == c)).any()) for b in batches)]

    def weights(alpha, in_exponent=False):
        return [m.actor_loss(*b[: MASK + 1], alpha, in_exponent, b[LOG_MU])[1] for b in batches]

    def mean_weight(ws, select):  # mean actor weight per (row, agent) pair of the pairs select(batch) picks
        total = sum(w[select(b) & b[VALID]].sum() for w, b in zip(ws, batches))
        return float(total / max(sum(int((select(b) & b[VALID]).sum()) for b in batches), 1))

    alpha0 = args["alpha"]
    ws = weights(alpha0)
    for label, extra in (("all", lambda b: True), ("t<5", lambda b: b[EARLY])):
        print(
            f"{label} at alpha {alpha0}: controller, share of (row, agent) pairs, share of actor weight, "
            "mean weight per pair"
        )
        sel = [[b[VALID] & (b[CID] == c) & extra(b) for b in batches] for c in range(n_controllers)]
        pairs = [sum(int(x.sum()) for x in sel[c]) for c in range(n_controllers)]
        wsum = [sum(float(w[x].sum()) for w, x in zip(ws, sel[c])) for c in range(n_controllers)]
        for c in present:
            share, weight_share, per_pair = pairs[c] / sum(pairs), wsum[c] / sum(wsum), wsum[c] / max(pairs[c], 1)
            print(f"  {names[c]:10s} {share:.3f} {weight_share:.3f} {per_pair:.3f}")
    print(f"by agent at alpha {alpha0}: mean weight per pair of {', '.join(names[c] for c in present)}")
    agents = torch.arange(batches[0][Q].shape[2])
    for i in agents.tolist():
        agent = [mean_weight(ws, lambda b, c=c, i=i: (b[CID] == c) & (agents == i)) for c in present]
        print(f"  agent {i}: " + " ".join(f"{w:.3f}" for w in agent))
    ess = []  # effective sample size of each (t, i) softmax over episodes, relative to its valid episodes
    for w, b in zip(ws, batches):
        wv, n = w * b[VALID], b[VALID].sum(0).float()
        ess.append((wv.sum(0) ** 2 / (wv**2).sum(0).clamp_min(1e-12) / n.clamp_min(1))[n >= 8])
    ess = torch.cat(ess)
    print(
        f"effective sample size / valid episodes per (t, i) with >= 8 episodes: mean {ess.mean():.3f}, "
        f"median {ess.median():.3f}"
    )
    print("controller: A_i mean / std, Q_i(a_i) mean (reward x 10)")
    for c in present:
        a = torch.cat([b[ADV][b[VALID] & (b[CID] == c)] for b in batches])
        q_taken = [b[Q].gather(-1, b[ACTIONS].unsqueeze(-1)).squeeze(-1)[b[VALID] & (b[CID] == c)] for b in batches]
        print(f"  {names[c]:10s} {a.mean():+.3f} / {a.std():.3f}   {torch.cat(q_taken).mean():.2f}")
    a_rare = torch.cat([b[ADV][b[VALID] & b[RARE]] for b in batches])
    a_common = torch.cat([b[ADV][b[VALID] & ~b[RARE]] for b in batches])
    print(
        f"pi(a_i) < 0.1: {a_rare.numel() / (a_rare.numel() + a_common.numel()):.3f} of pairs, "
        f"A_i {a_rare.mean():+.3f} / {a_rare.std():.3f}; "
        f"pi >= 0.1: A_i {a_common.mean():+.3f} / {a_common.std():.3f}"
    )
    print(
        f"by timestep: controller, pairs, mean weight per pair at alpha {alpha0} / 0.3 / 1 / 3, A_i mean / std, "
        "actor's pi(a_i) mean"
    )
    sweep = [weights(alpha) for alpha in (alpha0, 0.3, 1.0, 3.0)]
    for lo, hi in ((0, 5), (5, 20), (20, 60), (60, 10**6)):
        print(f"  t in [{lo}, {hi if hi < 10**6 else 'end'})")
        for c in present:
            sel = [b[VALID] & (b[CID] == c) & (b[T] >= lo) & (b[T] < hi) for b in batches]
            n = sum(int(x.sum()) for x in sel)
            if n:
                a = torch.cat([b[ADV][x] for b, x in zip(batches, sel)])
                w = " / ".join(f"{sum(float(wb[x].sum()) for wb, x in zip(ws_, sel)) / n:.3f}" for ws_ in sweep)
                pi = torch.cat([b[PI][x] for b, x in zip(batches, sel)]).mean()
                print(f"    {names[c]:10s} {n:6d} {w}  {a.mean():+.3f} / {a.std():.3f}  {pi:.3f}")
    print(
        "temperature sweep (critic and actor fixed): mean weight per pair; k_i outside the exponent (default) | inside"
    )
    header = " ".join(f"{names[c][:10]:>10s}" for c in present)
    print(f"  alpha   {header}  pi<0.1 pi>=0.1 | {header}  pi<0.1")
    for alpha in (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0):
        cols = []
        for in_exp in (False, True):
            ws = weights(alpha, in_exp)
            cols.append(" ".join(f"{mean_weight(ws, lambda b, c=c: b[CID] == c):10.3f}" for c in present))
            common = "" if in_exp else f" {mean_weight(ws, lambda b: ~b[RARE]):7.3f}"
            cols.append(f"{mean_weight(ws, lambda b: b[RARE]):7.3f}{common}")
        print(f"  {alpha:<7g} {cols[0]} {cols[1]} | {cols[2]} {cols[3]}")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__.split("\n\n")[1].splitlines()[0])
    main(*sys.argv[1:])
