"""icq_ma_smac.py: the ICQ-MA math (spec section 5), the env adapters, and tiny end-to-end runs (no network)."""

import json
import os
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, assert_user_error, run_script

from icq_data import CONTROLLERS, MIXTURES, generate_smax_dataset, normalise_smax_state
from icq_ma_smac import (
    Actor,
    Critic,
    Mixer,
    SmacAdapter,
    SmaxAdapter,
    actor_loss,
    behavior_weights,
    critic_loss,
    critic_targets,
    episodes_per_timestep,
    evaluate,
    icq_weights,
    load_pymarl_hdf5,
    on_valid_rows,
    previous_actions_onehot,
    td_lambda_targets,
    transition_mask,
)

SCRIPT = "icq_ma_smac.py"
# SMAX 3s_vs_5z as the script sees it: 3 agents, 10 actions, obs 101, normalised state 80.
N_AGENTS, N_ACTIONS, OBS, STATE = 3, 10, 101, 80


def random_episodes(B=5, T=8, gamma_seed=0, terminated_last=(1, 1, 0, 1, 1), lengths=(7, 3, 5, 1, 6)):
    """Transition tensors [B, T-1] with episodes of the given lengths; the unterminated one bootstraps at its end."""
    g = torch.Generator().manual_seed(gamma_seed)
    rewards, y = torch.randn(B, T - 1, generator=g), torch.randn(B, T, generator=g)
    mask, terminated = torch.zeros(B, T - 1), torch.zeros(B, T - 1)
    for b, (length, term) in enumerate(zip(lengths, terminated_last)):
        mask[b, :length] = 1
        terminated[b, length - 1] = term
    return rewards, terminated, mask, y


def brute_force_lambda_return(rewards, terminated, mask, y, gamma, lam):
    """G^lambda_t = (1 - lambda) sum_n lambda^(n-1) G^(n)_t + lambda^(N-1) G^(N)_t, written out term by term."""
    out = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        length = int(mask[b].sum())
        for t in range(length):
            N = length - t

            def n_step(n):
                ret = sum(gamma**j * rewards[b, t + j] for j in range(n))
                end_is_terminal = n == N and terminated[b, length - 1] == 1
                return ret + (0.0 if end_is_terminal else gamma**n * y[b, t + n])

            out[b, t] = (1 - lam) * sum(lam ** (n - 1) * n_step(n) for n in range(1, N)) + lam ** (N - 1) * n_step(N)
    return out


@pytest.mark.parametrize("lam", [0.0, 0.75, 1.0])
def test_td_lambda_matches_brute_force(lam):
    rewards, terminated, mask, y = random_episodes()
    got = td_lambda_targets(rewards, terminated, mask, y, 0.9, lam)
    torch.testing.assert_close(got, brute_force_lambda_return(rewards, terminated, mask, y, 0.9, lam))


def test_td_lambda_extremes_are_one_step_and_monte_carlo():
    rewards, terminated, mask, y = random_episodes()
    one_step = td_lambda_targets(rewards, terminated, mask, y, 0.9, 0.0)
    torch.testing.assert_close(one_step, mask * (rewards + 0.9 * (1 - terminated) * y[:, 1:]))
    mc = td_lambda_targets(rewards, terminated, mask, y, 0.9, 1.0)
    b, length = 0, 7  # a terminated episode: the lambda = 1 return is the discounted sum of its rewards
    for t in range(length):
        expected = sum(0.9**j * rewards[b, t + j] for j in range(length - t))
        torch.testing.assert_close(mc[b, t], expected)


def test_padding_contributes_nothing():
    rewards, terminated, mask, y = random_episodes()
    base = td_lambda_targets(rewards, terminated, mask, y, 0.99, 0.75)
    assert (base[mask == 0] == 0).all()
    pad = mask == 0
    r2, y2 = rewards.clone(), y.clone()
    r2[pad] = 1e6
    # rows after a terminal or past the bootstrap row of the unterminated episode are never read
    y2[0, 7:] = y2[1, 3:] = y2[3, 1:] = y2[4, 6:] = 1e6  # terminated: the row after the terminal is unread
    y2[2, 6:] = 1e6  # unterminated (length 5): row 5 is its bootstrap, later rows are unread
    torch.testing.assert_close(td_lambda_targets(r2, terminated, mask, y2, 0.99, 0.75), base)


def critic_inputs(seed=0, B=5, T=8, N=2, A=4):
    rewards, terminated, mask, _ = random_episodes(B, T, seed)
    g = torch.Generator().manual_seed(seed + 1)
    target_q = torch.randn(B, T, N, A, generator=g) * 3
    actions = torch.randint(A, (B, T, N), generator=g)
    k = torch.rand(B, T, N, generator=g)
    return target_q, actions, k / k.sum(-1, keepdim=True), torch.zeros(B, T), rewards, terminated, mask


def test_critic_target_with_infinite_temperature_is_sarsa_lambda():
    target_q, actions, k, bias, rewards, terminated, mask = critic_inputs()
    got = critic_targets(target_q, actions, k, bias, rewards, terminated, mask, 0.99, 0.75, critic_alpha=1e12)[0]
    q_tot = (k * target_q.gather(-1, actions.unsqueeze(-1)).squeeze(-1)).sum(-1)
    torch.testing.assert_close(got, td_lambda_targets(rewards, terminated, mask, q_tot, 0.99, 0.75))
    low = critic_targets(target_q, actions, k, bias, rewards, terminated, mask, 0.99, 0.75, critic_alpha=0.1)[0]
    assert not torch.allclose(low, got)  # a finite temperature does reweight


def test_critic_never_reads_q_outside_the_data():
    target_q, actions, k, bias, rewards, terminated, mask = critic_inputs()
    base = critic_targets(target_q, actions, k, bias, rewards, terminated, mask, 0.99, 0.75, 1.0)[0]
    poisoned = torch.full_like(target_q, 1e6)
    poisoned.scatter_(-1, actions.unsqueeze(-1), target_q.gather(-1, actions.unsqueeze(-1)))
    torch.testing.assert_close(
        critic_targets(poisoned, actions, k, bias, rewards, terminated, mask, 0.99, 0.75, 1.0)[0], base
    )
    # ... and the dataset action's value at a bootstrapped row does matter
    changed = target_q.clone()
    changed[0, 2, 0, actions[0, 2, 0]] += 5.0
    assert not torch.allclose(
        critic_targets(changed, actions, k, bias, rewards, terminated, mask, 0.99, 0.75, 1.0)[0], base
    )


@pytest.mark.parametrize("sequential", [True, False])
def test_valid_rows_only_match_the_padded_batch(sequential):
    """The training loop runs the target critic, the critic steps and the actor-side Q on valid rows only
    (on_valid_rows, episodes_per_timestep): the targets, each critic step's loss and gradient, and the actor loss
    equal the padded batch's, whatever the padding rows hold."""
    torch.manual_seed(0)
    B, T, N, A, S, OBS_DIM = 5, 8, 3, 6, 7, 4
    rewards, terminated, mask, _ = random_episodes(B, T)  # lengths 7, 3, 5, 1, 6: the unterminated one bootstraps
    valid = mask.bool()
    state, obs, actions = torch.randn(B, T, S), torch.randn(B, T, N, OBS_DIM), torch.randint(A, (B, T, N))
    read = F.pad(valid, (1, 0)) | F.pad(valid, (0, 1))
    state[~read], obs[~read] = (
        1e3,
        -1e3,
    )  # junk in the padding: the padded computation masks it, the packed one skips it
    critic, mixer = Critic(S, OBS_DIM, A, N), Mixer(S, N)
    params = list(critic.parameters()) + list(mixer.parameters())

    def q_tot(s, o, a):
        k, b = mixer(s)
        return (k * critic(s, o).gather(-1, a.unsqueeze(-1)).squeeze(-1)).sum(-1) + b

    with torch.no_grad():
        padded, rho = critic_targets(
            critic(state, obs), actions, *mixer(state), rewards, terminated, mask, 0.99, 0.75, 1.0
        )
        packed_q = on_valid_rows(critic, F.pad(valid, (1, 0)), state, obs)
        k, b = on_valid_rows(mixer, F.pad(valid, (1, 0)), state)
        packed, packed_rho = critic_targets(packed_q, actions, k, b, rewards, terminated, mask, 0.99, 0.75, 1.0)
    torch.testing.assert_close(packed, padded)
    torch.testing.assert_close(packed_rho, rho)

    if sequential:  # the training loop's steps: one per timestep with valid episodes
        steps = [(e, torch.full_like(e, t)) for t, e in enumerate(episodes_per_timestep(valid)) if len(e)]
    else:
        steps = [valid.nonzero(as_tuple=True)]
    if sequential:  # the loop before packing: every episode at each timestep, masked
        expected = [
            ((q_tot(state[:, t], obs[:, t], actions[:, t]) - padded[:, t]) ** 2 * mask[:, t]).sum() / mask[:, t].sum()
            for t in range(T - 1)
        ]
        assert [e.tolist() for e, _ in steps] == [valid[:, t].nonzero().squeeze(1).tolist() for t in range(T - 1)]
    else:
        expected = [((q_tot(state[:, :-1], obs[:, :-1], actions[:, :-1]) - padded) ** 2 * mask).sum() / mask.sum()]
    assert len(steps) == len(expected)
    for index, want in zip(steps, expected):
        got = critic_loss(critic, mixer, state[index], obs[index], actions[index], packed[index])
        torch.testing.assert_close(got, want)
        for g_got, g_want in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
            torch.testing.assert_close(g_got, g_want)

    with torch.no_grad():
        q_values, k = (
            on_valid_rows(critic, valid, state[:, :-1], obs[:, :-1]),
            on_valid_rows(mixer, valid, state[:, :-1])[0],
        )
        full_q, full_k = critic(state[:, :-1], obs[:, :-1]), mixer(state[:, :-1])[0]
    logits, avail = torch.randn(B, T - 1, N, A), torch.ones(B, T - 1, N, A, dtype=torch.bool)
    torch.testing.assert_close(
        actor_loss(logits, avail, actions[:, :-1], q_values, k, mask, 0.1)[0],
        actor_loss(logits, avail, actions[:, :-1], full_q, full_k, mask, 0.1)[0],
    )
    # a timestep without valid episodes gets no sequential step (the authors skip it)
    holed = valid.clone()
    holed[:, 2] = False
    assert [len(e) for e in episodes_per_timestep(holed)] == [5, 4, 0, 3, 3, 2, 1]  # lengths 7, 3, 5, 1, 6


def test_behavior_weights_match_brute_force_and_average_one_under_mu():
    """--normalizer behavior: w(tau, a) = exp(x(a)/T) / sum_b mu(b|tau) exp(x(b)/T) at each state; E_{a~mu}[w] = 1."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 5, generator=g) * 4
    avail = torch.rand(7, 3, 5, generator=g) > 0.3
    avail[..., 1] = True
    log_mu = torch.log_softmax(torch.randn(7, 3, 5, generator=g).masked_fill(~avail, -torch.inf), -1)
    for temperature in (0.1, 1.0, 30.0):
        for a in range(5):
            actions = torch.full((7, 3), a)
            got = behavior_weights(x, actions, log_mu, temperature)
            for i in range(7):
                for j in range(3):
                    xd, mu = x[i, j].double(), log_mu[i, j].double().exp()  # float64: exp(x/T) reaches 1e70 here
                    z = sum(mu[b] * torch.exp(xd[b] / temperature) for b in range(5) if avail[i, j, b])
                    torch.testing.assert_close(
                        got[i, j].double(), torch.exp(xd[a] / temperature) / z, rtol=1e-4, atol=1e-6
                    )
        every = torch.stack([behavior_weights(x, torch.full((7, 3), a), log_mu, temperature) for a in range(5)], -1)
        torch.testing.assert_close((log_mu.exp() * every).sum(-1), torch.ones(7, 3))  # exactly 1 in every state
        shifted = behavior_weights(
            x + torch.randn(7, 3, 1, generator=g) * 100, torch.ones(7, 3, dtype=torch.long), log_mu, temperature
        )  # a per-state baseline cancels
        torch.testing.assert_close(shifted, every[..., 1], rtol=1e-3, atol=1e-5)  # float32 logits of ~1e3
    assert torch.isfinite(behavior_weights(x * 1e4, torch.ones(7, 3, dtype=torch.long), log_mu, 1e-3)).all()


def test_behavior_rho_is_the_brute_force_joint_normaliser():
    """The factorised rho of --normalizer behavior equals exp(Q_tot(a)/c) / E_{a'~mu}[exp(Q_tot(a')/c)] enumerated over
    all A^N joint actions (N = 3, A = 4), the mixer bias included."""
    B, T, N, A, c = 5, 8, 3, 4, 2.0
    target_q, actions, k, _, rewards, terminated, mask = critic_inputs(B=B, T=T, N=N, A=A)
    bias = torch.randn(B, T)
    log_mu = torch.log_softmax(torch.randn(B, T, N, A), -1)
    got_targets, rho = critic_targets(target_q, actions, k, bias, rewards, terminated, mask, 0.99, 0.75, c, log_mu)
    joint = torch.cartesian_prod(*[torch.arange(A)] * N)  # [A^N, N]
    bootstrapped = torch.cat([torch.zeros(B, 1, dtype=torch.bool), (mask == 1) & (terminated == 0)], 1)
    expected = torch.zeros(B, T)
    for b in range(B):
        for t in range(T):
            agents = torch.arange(N)

            def q_tot(a):
                return (k[b, t] * target_q[b, t, agents, a]).sum() + bias[b, t]

            z = sum(log_mu[b, t, agents, a].sum().exp() * torch.exp(q_tot(a) / c) for a in joint)
            if bootstrapped[b, t]:
                expected[b, t] = torch.exp(q_tot(actions[b, t]) / c) / z
    torch.testing.assert_close(rho, expected)
    q_tot_all = (k * target_q.gather(-1, actions.unsqueeze(-1)).squeeze(-1)).sum(-1) + bias
    torch.testing.assert_close(
        got_targets, td_lambda_targets(rewards, terminated, mask, expected * q_tot_all, 0.99, 0.75)
    )
    # a huge temperature is SARSA(lambda) here too: rho -> 1
    sarsa = critic_targets(target_q, actions, k, bias, rewards, terminated, mask, 0.99, 0.75, 1e12, log_mu)[0]
    torch.testing.assert_close(sarsa, td_lambda_targets(rewards, terminated, mask, q_tot_all, 0.99, 0.75))


def test_behavior_actor_weight_and_alpha_inf():
    logits, avail, actions, q, k, mask = actor_inputs()
    log_mu = torch.log_softmax(torch.randn_like(q).masked_fill(~avail, -torch.inf), -1)
    _, weight = actor_loss(logits, avail, actions, q, k, mask, 0.5, log_mu=log_mu)
    m = mask.unsqueeze(-1).expand_as(k)
    torch.testing.assert_close(weight, behavior_weights(k.unsqueeze(-1) * q, actions, log_mu, 0.5) * m)
    loss, weight = actor_loss(logits, avail, actions, q * 100, k, mask, float("inf"), log_mu=log_mu)
    assert torch.equal(weight, m)  # alpha = inf stays exact BC under either normaliser
    log_pi = taken_log_pi(logits, avail, actions)
    torch.testing.assert_close(loss, -(log_pi * m).sum() / m.sum())


def test_behavior_actor_weight_cap():
    """--actor-weight-max: the per-state weight is min(w, cap); inf is the paper's weight bit for bit; alpha = inf
    stays exact BC; the loss is the weighted BC of the capped weights."""
    logits, avail, actions, q, k, mask = actor_inputs()
    log_mu = torch.log_softmax(torch.randn_like(q).masked_fill(~avail, -torch.inf), -1)
    loss, free = actor_loss(logits, avail, actions, q * 20, k, mask, 0.1, log_mu=log_mu)
    loss_inf, weight_inf = actor_loss(logits, avail, actions, q * 20, k, mask, 0.1, log_mu=log_mu, cap=float("inf"))
    assert torch.equal(weight_inf, free) and torch.equal(loss_inf, loss)
    assert free.max() > 2.0  # some weights exceed the cap below
    loss_cap, capped = actor_loss(logits, avail, actions, q * 20, k, mask, 0.1, log_mu=log_mu, cap=2.0)
    assert capped.max() <= 2.0 and torch.equal(capped, free.clamp(max=2.0))
    m = mask.unsqueeze(-1).expand_as(k)
    torch.testing.assert_close(loss_cap, -(capped * taken_log_pi(logits, avail, actions)).sum() / m.sum())
    _, bc = actor_loss(logits, avail, actions, q * 20, k, mask, float("inf"), log_mu=log_mu, cap=0.5)
    assert torch.equal(bc, m.float())  # exact BC: every weight is 1, whatever the cap


def test_transition_mask_pymarl_layout():
    filled = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    terminated = torch.tensor([[0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    mask = transition_mask(filled, terminated)
    # terminal at t=2 (final obs row 3); an episode cut without a terminal loses the transition whose next row holds
    # only the final obs (a dummy action): episode 3 has obs rows 0-2, real actions at 0-1, so only transition 0 is kept
    assert mask.int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]]


def test_icq_weights_properties():
    x = torch.randn(6, 4) * 5
    mask = torch.rand(6, 4) > 0.3
    mask[0] = True
    w = icq_weights(x, 1.0, mask, dim=0)
    torch.testing.assert_close(w.sum(0), mask.sum(0).float())  # mean 1 over the valid entries
    assert (w[~mask] == 0).all() and (w >= 0).all()
    uniform = icq_weights(x, 1e9, mask, dim=0)
    torch.testing.assert_close(uniform, mask.float())
    sharp = icq_weights(x, 1e-4, mask, dim=0)
    best = x.masked_fill(~mask, -torch.inf).argmax(0)
    torch.testing.assert_close(sharp, mask.sum(0).float() * torch.nn.functional.one_hot(best, 6).T.float())
    huge = icq_weights(torch.tensor([1e4, -1e4, 0.0, 1e4 - 1]), 1e-3)
    assert torch.isfinite(huge).all() and huge.sum() == pytest.approx(4.0)
    torch.testing.assert_close(icq_weights(x.T, 1.0, mask.T, dim=1), w.T)  # dim works
    assert (icq_weights(x, 1.0, torch.zeros_like(mask)) == 0).all()  # no valid entry: zeros, not NaN


@pytest.mark.parametrize("bias", [False, True])
def test_mixer_weights_nonnegative_and_normalised(bias):
    mixer = Mixer(7, 4, bias=bias)
    k, b = mixer(torch.randn(3, 5, 7) * 10)
    assert k.shape == (3, 5, 4) and b.shape == (3, 5)
    assert (k >= 0).all()
    torch.testing.assert_close(k.sum(-1), torch.ones(3, 5))
    assert bool((b != 0).any()) == bias


def actor_inputs(seed=0, B=6, T=5, N=2, A=4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, N, A, generator=g, requires_grad=True)
    avail = torch.rand(B, T, N, A, generator=g) > 0.4
    avail[..., 0] = True
    actions = torch.multinomial(avail.float().view(-1, A), 1, generator=g).view(B, T, N)
    q = torch.randn(B, T, N, A, generator=g)
    k = torch.rand(B, T, N, generator=g)
    mask = torch.ones(B, T)
    mask[:2, 3:] = 0
    return logits, avail, actions, q, k / k.sum(-1, keepdim=True), mask


def taken_log_pi(logits, avail, actions):
    """log pi(a_i) over the available actions, written out independently of masked_log_softmax."""
    return torch.log_softmax(logits.detach().masked_fill(~avail, -torch.inf), -1).gather(-1, actions.unsqueeze(-1))[
        ..., 0
    ]


def test_actor_loss_masks_padding_and_unavailable_actions():
    logits, avail, actions, q, k, mask = actor_inputs()
    loss, _ = actor_loss(logits, avail, actions, q, k, mask, 0.1)
    loss.backward()
    assert (logits.grad[~avail] == 0).all()  # unavailable actions are outside the softmax
    assert (logits.grad[mask == 0] == 0).all()
    junk_logits, junk_q = logits.detach().clone(), q.clone()
    junk_logits[~avail], junk_q[~avail] = 1e3, 1e3
    junk_logits[mask == 0], junk_q[mask == 0] = 7.0, -1e3
    torch.testing.assert_close(actor_loss(junk_logits, avail, actions, junk_q, k, mask, 0.1)[0], loss.detach())


def test_actor_loss_is_weighted_behaviour_cloning():
    logits, avail, actions, q, k, mask = actor_inputs()
    log_pi = taken_log_pi(logits, avail, actions)
    m = mask.unsqueeze(-1).expand_as(k)
    k_weighted = -(k * log_pi * m).sum() / m.sum()  # alpha -> inf: every batch-softmax weight is 1, k_i remains
    torch.testing.assert_close(actor_loss(logits, avail, actions, q, k, mask, 1e9)[0], k_weighted)
    inside, _ = actor_loss(logits, avail, actions, q, k, mask, 1e9, weight_in_exponent=True)
    torch.testing.assert_close(inside, -(log_pi * m).sum() / m.sum())
    # a small alpha puts the weight on the episodes with the largest advantage
    assert not torch.allclose(actor_loss(logits, avail, actions, q, k, mask, 0.01)[0], k_weighted)


@pytest.mark.parametrize("weight_in_exponent", [False, True])
def test_alpha_inf_is_exact_behaviour_cloning(weight_in_exponent):
    """--alpha inf: every agent's log-likelihood has weight exactly 1, the mixer weight k_i included."""
    logits, avail, actions, q, k, mask = actor_inputs()
    log_pi = taken_log_pi(logits, avail, actions)
    m = mask.unsqueeze(-1).expand_as(k)
    loss, weight = actor_loss(logits, avail, actions, q * 100, k, mask, float("inf"), weight_in_exponent)
    assert torch.equal(weight, m)  # exactly 1 on valid (t, i), 0 on padding
    torch.testing.assert_close(loss, -(log_pi * m).sum() / m.sum())


def train_matrix_game(alpha, iterations=300, episodes=200, seed=0, normalizer="batch"):
    """A one-step cooperative 2-agent, 3-action matrix game: joint action (0, 0) pays 1, (1, 1) pays 0.5, the rest 0.
    The offline data are 70 % (1, 1), 20 % (0, 0) and 10 % uniform joint actions. Trains the critic on the ICQ-MA
    target and the actor on the ICQ-MA loss over the whole data, and returns the greedy joint action."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    kind = torch.multinomial(torch.tensor([0.7, 0.2, 0.1]), episodes, replacement=True, generator=g)
    joint = torch.where((kind == 0)[:, None], 1, 0).repeat(1, 2)
    joint[kind == 2] = torch.randint(3, (int((kind == 2).sum()), 2), generator=g)
    payoff = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 0.0]])
    actions = torch.stack([joint, torch.zeros_like(joint)], 1)  # rows: the step, then the final row (dummy action)
    reward = (payoff[joint[:, 0], joint[:, 1]] * 10)[:, None]  # x 10, as the script scales SMAX rewards
    terminated, mask = torch.ones(episodes, 1), torch.ones(episodes, 1)
    obs, state = torch.ones(episodes, 2, 2, 1), torch.ones(episodes, 2, 1)
    avail = torch.ones(episodes, 2, 2, 3, dtype=torch.bool)
    actor, critic, mixer = Actor(1, 3, 2, hidden=16), Critic(1, 1, 3, 2, hidden=32), Mixer(1, 2)
    log_mu = None  # behavior: the data's own per-agent action frequencies are mu_i (one state)
    if normalizer == "behavior":
        log_mu = torch.log(F.one_hot(joint, 3).float().mean(0)).expand(episodes, 2, 2, 3)
    critic_opt = torch.optim.Adam(list(critic.parameters()) + list(mixer.parameters()), lr=3e-3)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=1e-2)
    for _ in range(iterations):
        with torch.no_grad():
            k_target, b_target = mixer(state)
            targets, _ = critic_targets(
                critic(state, obs), actions, k_target, b_target, reward, terminated, mask, 0.99, 0.75, 1000.0, log_mu
            )
        k, b = mixer(state[:, :-1])
        q_tot = (k * critic(state[:, :-1], obs[:, :-1]).gather(-1, actions[:, :-1, :, None]).squeeze(-1)).sum(-1) + b
        critic_opt.zero_grad()
        ((q_tot - targets) ** 2).mean().backward()
        critic_opt.step()
    for _ in range(iterations):
        with torch.no_grad():
            q_values, (k, _) = critic(state[:, :-1], obs[:, :-1]), mixer(state[:, :-1])
        logits, _ = actor(obs[:, :-1], previous_actions_onehot(actions[:, :-1], 3))
        loss, _ = actor_loss(
            logits,
            avail[:, :-1],
            actions[:, :-1],
            q_values,
            k,
            mask,
            alpha,
            log_mu=None if log_mu is None else log_mu[:, :-1],
        )
        actor_opt.zero_grad()
        loss.backward()
        actor_opt.step()
    return tuple(actor(obs[:1, :1], torch.zeros(1, 1, 2, 3))[0][0, 0].argmax(-1).tolist())


@pytest.mark.parametrize("normalizer", ["batch", "behavior"])
def test_matrix_game_icq_finds_the_minority_best_joint_action_and_bc_the_majority(normalizer):
    assert train_matrix_game(0.1, normalizer=normalizer) == (0, 0)  # the best joint action in the data (20 % of it)
    assert train_matrix_game(float("inf"), normalizer=normalizer) == (1, 1)  # exact BC: the data's majority


def test_fused_gru_matches_step_by_step():
    actor = Actor(5, 4, 3)
    obs, last = torch.randn(2, 6, 3, 5), torch.randn(2, 6, 3, 4)
    full, _ = actor(obs, last)
    h, steps = None, []
    for t in range(6):
        out, h = actor(obs[:, t : t + 1], last[:, t : t + 1], h)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), full)


def test_last_action_input_matches_evaluation():
    """Training feeds a_{t-1} one-hot and zeros at t = 0, exactly what evaluate() feeds while acting."""
    actions = torch.tensor([[[2, 0], [1, 3], [0, 0]]])  # [B=1, T=3, N=2]
    last = previous_actions_onehot(actions, 4)
    assert last.shape == (1, 3, 2, 4) and (last[:, 0] == 0).all()
    torch.testing.assert_close(last[:, 1:], torch.nn.functional.one_hot(actions[:, :-1], 4).float())


class FakeStarCraft2Env:
    """STAND-IN for smac's StarCraft2Env (no StarCraft II here): same method names and return shapes.

    2 agents, 5 actions, random availability each step (it raises on an unavailable action), reward 1 per step,
    episodes of 4 steps, won on odd-numbered resets.
    """

    def __init__(self):
        self.rng, self.resets = np.random.default_rng(0), 0

    def get_env_info(self):
        return {"n_agents": 2, "n_actions": 5, "obs_shape": 6, "state_shape": 7, "episode_limit": 10}

    def _new_avail(self):
        self.avail = self.rng.integers(0, 2, (2, 5))
        self.avail[:, 1] = 1

    def reset(self):
        self.t, self.resets = 0, self.resets + 1
        self._new_avail()
        return self.get_obs(), self.get_state()

    def get_obs(self):
        return [self.rng.normal(size=6).astype(np.float32) for _ in range(2)]

    def get_state(self):
        return self.rng.normal(size=7).astype(np.float32)

    def get_avail_actions(self):
        return self.avail.tolist()

    def step(self, actions):
        if not all(self.avail[i][a] for i, a in enumerate(actions)):
            raise ValueError(f"unavailable action {actions} for {self.avail.tolist()}")
        self.t += 1
        self._new_avail()
        done = self.t >= 4
        return 1.0, done, ({"battle_won": self.resets % 2 == 1} if done else {})


@pytest.mark.parametrize("sample", [False, True])
def test_standin_smac_adapter_runs_an_evaluation(sample):
    env = FakeStarCraft2Env()
    adapter = SmacAdapter(env)
    assert adapter.info == env.get_env_info()
    results = evaluate(Actor(6, 5, 2), adapter, 3, seed=0, device=torch.device("cpu"), sample=sample)
    assert env.resets == 3
    assert results["win_rate"] == pytest.approx(2 / 3) and results["return"] == pytest.approx(4.0)


# ---------------------------------------------------------------------------------------------------------------------
# Command line (SMAX backend). JAX's compilation cache is shared by the runs of this file to keep it fast.
@pytest.fixture(scope="module")
def jax_env(tmp_path_factory):
    return {
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
        "SC2PATH": "/nonexistent/StarCraftII",
    }


def write_pymarl_h5(path, episodes=6, rows=12, obs=OBS, state=STATE, seed=0, keys=None, nan_reward=False):
    """A PyMARL episode batch like the authors' <map>.h5: final obs row filled, timeouts stored as terminated."""
    rng = np.random.default_rng(seed)
    data = {
        "obs": rng.random((episodes, rows, N_AGENTS, obs), dtype=np.float32),
        "state": rng.random((episodes, rows, state), dtype=np.float32),
        "actions": np.zeros((episodes, rows, N_AGENTS, 1), np.int64),
        "avail_actions": np.zeros((episodes, rows, N_AGENTS, N_ACTIONS), np.int32),
        "reward": np.zeros((episodes, rows, 1), np.float32),
        "terminated": np.zeros((episodes, rows, 1), np.uint8),
        "filled": np.zeros((episodes, rows, 1), np.int64),
    }
    for e in range(episodes):
        length = int(rng.integers(2, rows))  # steps; rows 0..length are filled
        data["filled"][e, : length + 1] = 1
        data["terminated"][e, length - 1] = 1
        data["avail_actions"][e, : length + 1] = rng.integers(0, 2, (length + 1, N_AGENTS, N_ACTIONS))
        data["avail_actions"][e, : length + 1, :, 4] = 1
        probs = data["avail_actions"][e, :length] / data["avail_actions"][e, :length].sum(-1, keepdims=True)
        data["actions"][e, :length, :, 0] = (probs.cumsum(-1) > rng.random(probs.shape[:-1] + (1,))).argmax(-1)
        data["reward"][e, :length, 0] = rng.random(length)
    if nan_reward:
        data["reward"][:, 0] = np.nan
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            if keys is None or k in keys:
                f.create_dataset(k, data=v)
        f.create_dataset("actions_onehot", data=np.eye(N_ACTIONS, dtype=np.float32)[data["actions"][..., 0]])


TINY = ("--total-steps", 4, "--batch-size", 4, "--eval-interval", 2, "--eval-episodes", 3, "--log-interval", 1)


def assert_same_parameters(a, b):
    for key in ("actor", "critic", "mixer", "critic_target", "mixer_target"):
        for name, value in a["modules"][key].items():
            assert torch.equal(value, b["modules"][key][name]), f"{key}.{name} differs after resume"


def test_compiled_critic_steps_match_eager(tmp_path, jax_env):
    """--compile (each timestep's critic step at the batch's full width, padding masked, fused by torch.compile into
    one graph) trains the same networks as the eager steps: the same number of critic steps, parameters equal to a
    relative 1e-4 (float rounding: the padded sums and the compiled kernels add in another order)."""
    write_pymarl_h5(tmp_path / "3s_vs_5z.h5", episodes=8, rows=10)
    common = ("--env-backend smax --dataset-path 3s_vs_5z.h5 --actor-hidden 16 --alpha 1 --total-steps 3 "
              "--batch-size 4 --eval-interval 3 --eval-episodes 1 --log-interval 1").split()  # fmt: skip
    for name, extra in (("eager", ()), ("compiled", ("--compile",))):
        run_script(SCRIPT, *common, *extra, "--run-name", name, cwd=tmp_path, env=jax_env)
    eager, compiled = (
        torch.load(tmp_path / f"runs/{n}/checkpoint.pt", weights_only=False) for n in ("eager", "compiled")
    )
    assert eager["state"] == compiled["state"] and eager["state"]["critic_steps"] > 3  # per-timestep steps
    for key in ("actor", "critic", "mixer", "critic_optimizer"):
        left, right = eager["modules"][key], compiled["modules"][key]
        tensors = (
            [(left[n], right[n]) for n in left]
            if key != "critic_optimizer"
            else [(left["state"][i][k], right["state"][i][k]) for i in left["state"] for k in ("step", "square_avg")]
        )
        for x, y in tensors:
            assert float((x - y).norm()) <= 1e-4 * float(x.norm()) + 1e-7, key
    refused = run_script(SCRIPT, *common, "--compile", "--critic-updates", "batched", cwd=tmp_path, env=jax_env,
                         check=False)  # fmt: skip
    assert_user_error(refused, "--compile", "needs --critic-updates sequential")


def test_compile_speed_times_the_training_loop(tmp_path, jax_env):
    """benchmarks/compile_speed.py (benchmark.sh speed's steady rows, benchmarks/gpu_speed.sh on a GPU) on CPU: the
    script's own loop, timed per iteration after the warmup and per phase, the evaluation apart, and the table."""
    write_pymarl_h5(tmp_path / "3s_vs_5z.h5", episodes=8, rows=10)
    args = ("eager", "--env-backend", "smax", "--dataset-path", "3s_vs_5z.h5", "--batch-size", 4, "--actor-hidden", 16,
            "--iterations", 3, "--warmup", 1, "--eval-episodes", 1, "--run-name", "timed")  # fmt: skip
    run_script("benchmarks/compile_speed.py", *args, cwd=tmp_path, env=jax_env)
    summary = json.loads((tmp_path / "runs/timed/summary.json").read_text())
    assert summary["finished"] and summary["step"] == 4 and summary["graphs"] == 0 and summary["device"] == "cpu"
    phases = summary["phases_per_iteration"]
    assert {"critic steps", "TD targets", "actor and behaviour GRU forwards"} <= phases.keys()
    assert min(phases.values()) > 0 and summary["seconds_per_iteration"] > phases["critic steps"]
    assert summary["evaluation_seconds"] > 0 and summary["steps_per_second_with_compile"] > 0
    table = run_script("benchmarks/compile_speed.py", "table", "runs/timed/summary.json", cwd=tmp_path).stdout
    assert "| eager | cpu |" in table and "critic steps" in table


def test_pymarl_h5_trains_and_resume_is_exact(tmp_path, jax_env):
    """A run stopped at iteration 2 and resumed with no other flag than --total-steps ends equal to a straight run:
    --save-model, the critic mode, the target interval and the GRU width all come from the checkpoint."""
    write_pymarl_h5(tmp_path / "3s_vs_5z.h5")
    algo = ("--critic-updates", "batched", "--target-update-interval", 2, "--actor-hidden", 16, "--alpha", 1)
    common = ("--env-backend", "smax", "--dataset-path", "3s_vs_5z.h5", "--save-model", *algo, *TINY)
    run_script(SCRIPT, *common, "--run-name", "straight", cwd=tmp_path, env=jax_env)
    half = list(common)
    half[half.index("--total-steps") + 1] = 2
    run_script(SCRIPT, *half, "--run-name", "resumed", cwd=tmp_path, env=jax_env)
    out = run_script(SCRIPT, "--resume", "runs/resumed/checkpoint.pt", "--total-steps", 4, cwd=tmp_path, env=jax_env)
    assert "resumed from" in out.stdout and "run directory: runs/resumed/" in out.stdout
    a = torch.load(tmp_path / "runs/straight/checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "runs/resumed/checkpoint.pt", weights_only=False)  # written: --save-model was restored
    assert a["step"] == b["step"] == 4 and a["state"]["critic_steps"] == b["state"]["critic_steps"] == 4
    assert a["modules"]["actor"]["gru.weight_hh_l0"].shape == (3 * 16, 16)  # --actor-hidden sets the GRU width
    assert_same_parameters(a, b)
    summary = json.loads((tmp_path / "runs/resumed/summary.json").read_text())
    assert [e["step"] for e in summary["evaluations"]] == [2, 4]  # the history survives the resume
    assert summary["args"]["alpha"] == 1 and summary["args"]["eval_interval"] == 2 and not summary["interrupted"]
    # a flag that changes the algorithm or the data is refused, naming the flag and both values
    for flag_name, value, saved in (
        ("--actor-hidden", 32, 16),
        ("--alpha", 0.1, 1.0),
        ("--normalizer", "batch", "behavior"),
    ):
        assert_user_error(
            run_script(SCRIPT, "--resume", "runs/resumed/checkpoint.pt", flag_name, value, cwd=tmp_path, env=jax_env,
                       check=False),
            f"{flag_name} {value} given", f"trained with {flag_name} {saved}",
        )  # fmt: skip


def test_sigint_saves_the_run_and_resume_finishes_it_exactly(tmp_path, jax_env):
    """Ctrl-C mid-training, between evaluations: checkpoint.pt and summary.json (interrupted) are written and the exit
    names the resume command; resumed without flags, the run ends with the parameters of a straight run."""
    write_pymarl_h5(tmp_path / "3s_vs_5z.h5")
    common = ("--env-backend", "smax", "--dataset-path", "3s_vs_5z.h5", "--actor-hidden", 16, "--normalizer",
              "behavior", "--total-steps", 40, "--batch-size", 4, "--eval-interval", 15, "--eval-episodes", 2,
              "--log-interval", 1, "--save-model")  # fmt: skip
    proc = subprocess.Popen([sys.executable, str(ROOT / SCRIPT), *map(str, common), "--run-name", "cut"], cwd=tmp_path,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **jax_env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    for line in proc.stdout:
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert "continue with: python icq_ma_smac.py --resume runs/cut/checkpoint.pt" in err
    summary = json.loads((tmp_path / "runs/cut/summary.json").read_text())
    assert summary["interrupted"] and 3 <= summary["step"] < 40
    assert torch.load(tmp_path / "runs/cut/checkpoint.pt", weights_only=False)["step"] == summary["step"]
    run_script(SCRIPT, "--resume", "runs/cut/checkpoint.pt", cwd=tmp_path, env=jax_env)
    run_script(SCRIPT, *common, "--run-name", "straight", cwd=tmp_path, env=jax_env)
    a = torch.load(tmp_path / "runs/straight/checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "runs/cut/checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 40
    assert_same_parameters(a, b)
    for name, value in a["modules"]["behavior"].items():
        assert torch.equal(value, b["modules"]["behavior"][name])
    summary = json.loads((tmp_path / "runs/cut/summary.json").read_text())
    assert not summary["interrupted"] and [e["step"] for e in summary["evaluations"]] == [15, 30, 40]


def test_behaviour_cloning_actor_does_not_depend_on_the_critic_updates(tmp_path, jax_env):
    """benchmark.sh runs ICQ-MA's BC baseline with the cheap batched critic: with --alpha inf the actor is unchanged."""
    write_pymarl_h5(tmp_path / "3s_vs_5z.h5")
    common = (
        "--env-backend",
        "smax",
        "--dataset-path",
        "3s_vs_5z.h5",
        "--save-model",
        "--alpha",
        "inf",
        "--actor-hidden",
        16,
        *TINY,
    )
    actors = {}
    for mode in ("sequential", "batched"):
        run_script(SCRIPT, *common, "--critic-updates", mode, "--run-name", mode, cwd=tmp_path, env=jax_env)
        actors[mode] = torch.load(tmp_path / f"runs/{mode}/checkpoint.pt", weights_only=False)
    a, b = actors["sequential"], actors["batched"]
    assert a["state"]["critic_steps"] > b["state"]["critic_steps"] == 4  # the critics did train differently
    a, b = a["modules"], b["modules"]
    assert any(not torch.equal(a["critic"][name], b["critic"][name]) for name in a["critic"])
    for name, value in a["actor"].items():
        assert torch.equal(value, b["actor"][name]), f"actor.{name} depends on the critic mode under --alpha inf"


def test_tiny_smax_run_end_to_end(tmp_path, jax_env):
    out = run_script(
        SCRIPT,
        "--map",
        "3s_vs_5z",
        "--alpha",
        0.1,
        "--dataset-size",
        6,
        "--run-name",
        "tiny",
        *TINY,
        cwd=tmp_path,
        env=jax_env,
    )
    assert out.stdout.count("env backend: smax") == 1  # auto says which backend, once
    assert "run directory: runs/tiny/" in out.stdout and "| ETA " in out.stdout
    assert (
        "Importing" not in out.stdout and "not the behaviour mixture" not in out.stdout
    )  # no chatter, no mixed figure
    assert "done: last-3 eval mean" in out.stdout
    with h5py.File(tmp_path / "datasets/smax_3s_vs_5z_medium_6ep_v2.h5") as f:
        assert f["obs"].shape[0] == 6 and f["obs"].shape[2:] == (N_AGENTS, OBS) and f["state"].shape[2] == STATE
        for attr in (
            "map_name",
            "backend",
            "episode_limit",
            "quality",
            "behaviour_win_rate",
            "behaviour_mean_return",
            "seed",
            "jaxmarl_version",
        ):
            assert attr in f.attrs
        assert f.attrs["episode_limit"] == 250 and f.attrs["quality"] == "medium"
        assert (f["controller"][:] == 0).all() and list(f.attrs["controller_names"])[0] == "focus_kite"
        filled = f["filled"][:, :, 0].sum(1)
        assert f["obs"].shape[1] == filled.max()  # trimmed to the longest episode's rows
        assert np.abs(f["state"][:]).max() <= 1.0 + 1e-3  # normalised world state
    summary = json.loads((tmp_path / "runs/tiny/summary.json").read_text())
    for key in (
        "final_win_rate",
        "best_win_rate",
        "final_return",
        "steps_per_second",
        "wall_seconds",
        "peak_rss_mb",
    ):
        assert summary[key] is not None, key
    assert 0 <= summary["final_win_rate"] <= summary["best_win_rate"] <= 1
    assert summary["reward_scale"] == 10.0 and summary["dataset_return"] >= 0  # SMAX rewards scaled to SMAC's
    assert [e["step"] for e in summary["evaluations"]] == [2, 4]
    assert list((tmp_path / "runs/tiny").glob("events.out.tfevents.*"))


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (("--alpha", 0), ("--alpha", "> 0")),
        (("--env-backend", "smax", "--map", "MMM2"), ("unknown SMAX map 'MMM2'", "3s_vs_5z")),
        (("--env-backend", "smac"), ("pip install git+https://github.com/oxwhirl/smac.git", "SC2PATH")),
        (("--dataset-path", "nope.h5"), ("nope.h5", "no such file")),
        (("--total-steps", 0), ("--total-steps must be >= 1 (got 0)",)),
        (("--td-lambda", 2), ("--td-lambda must be in [0, 1] (got 2.0)",)),
        (("--actor-weight-max", 0), ("--actor-weight-max must be > 0 (got 0.0)",)),
    ],
)
def test_bad_inputs_fast(tmp_path, jax_env, extra, fragments):
    assert_user_error(run_script(SCRIPT, *extra, cwd=tmp_path, env=jax_env, check=False), *fragments)


def test_bad_datasets(tmp_path, jax_env):
    (tmp_path / "text.h5").write_text("not an HDF5 file\n")
    proc = run_script(
        SCRIPT, "--env-backend", "smax", "--dataset-path", "text.h5", cwd=tmp_path, env=jax_env, check=False
    )
    assert_user_error(proc, "text.h5 is not an HDF5 file")
    assert len(proc.stderr.strip().splitlines()) == 1
    write_pymarl_h5(tmp_path / "keys.h5", keys=("obs", "state", "actions"))
    assert_user_error(
        run_script(
            SCRIPT, "--env-backend", "smax", "--dataset-path", "keys.h5", cwd=tmp_path, env=jax_env, check=False
        ),
        "missing keys",
        "avail_actions",
        "filled",
    )
    write_pymarl_h5(tmp_path / "dims.h5", obs=36)
    assert_user_error(
        run_script(
            SCRIPT, "--env-backend", "smax", "--dataset-path", "dims.h5", cwd=tmp_path, env=jax_env, check=False
        ),
        "obs_shape 36 (dataset) vs 101 (env)",
    )
    write_pymarl_h5(tmp_path / "huge.h5")  # finite data whose squared TD errors overflow float32
    assert_user_error(
        run_script(SCRIPT, "--env-backend", "smax", "--dataset-path", "huge.h5", "--reward-scale", 1e30, *TINY,
                   cwd=tmp_path, env=jax_env, check=False),
        "non-finite loss",
        "step 1",
    )  # fmt: skip


def test_raw_world_state_files_convert_to_the_observed_state(tmp_path):
    """A file whose `state` is env.get_world_state as is converts (icq_data.py smax-state) to the state SmaxAdapter
    observes and then loads; unconverted, it and other sizes fail in one line."""
    import jax

    adapter = SmaxAdapter("3s_vs_5z")
    keys = jax.random.split(jax.random.PRNGKey(3), 6)
    states = [adapter.env.reset(key)[1] for key in keys]
    raw = np.stack([np.asarray(adapter.env.get_world_state(st)) for st in states])
    observed = np.stack([np.asarray(adapter.observe(st)[1]) for st in states])
    assert raw.shape[1] == 96 and observed.shape[1] == STATE
    write_pymarl_h5(tmp_path / "raw.h5", episodes=6, rows=12, state=96)
    with h5py.File(tmp_path / "raw.h5", "r+") as f:
        state = f["state"][:]
        state[:, 0] = raw  # the first row of each episode holds a real world state
        f["state"][...] = state
        reward = f["reward"][:]
    with pytest.raises(SystemExit, match="state_shape 96 \\(dataset\\) vs 80 \\(env\\).*icq_data.py smax-state"):
        load_pymarl_hdf5(str(tmp_path / "raw.h5"), adapter.info, "3s_vs_5z", "smax", torch.device("cpu"), 10.0)
    normalise_smax_state(adapter, str(tmp_path / "raw.h5"), str(tmp_path / "normalised.h5"))
    data = load_pymarl_hdf5(
        str(tmp_path / "normalised.h5"), adapter.info, "3s_vs_5z", "smax", torch.device("cpu"), 10.0
    )
    assert data["state"].shape[-1] == STATE
    np.testing.assert_allclose(data["state"][:, 0].numpy(), observed, atol=1e-6)
    np.testing.assert_allclose(
        data["reward"].numpy(), reward[:, : data["reward"].shape[1], 0] * 10.0, rtol=1e-6
    )  # --reward-scale 10
    write_pymarl_h5(tmp_path / "odd.h5", state=90)
    with pytest.raises(SystemExit, match="state_shape 90 \\(dataset\\) vs 80 \\(env\\)"):
        load_pymarl_hdf5(str(tmp_path / "odd.h5"), adapter.info, "3s_vs_5z", "smax", torch.device("cpu"), 1.0)
    with pytest.raises(SystemExit, match="not the raw SMAX world state"):
        normalise_smax_state(adapter, str(tmp_path / "normalised.h5"), str(tmp_path / "twice.h5"))


@pytest.mark.parametrize("quality", ["mixed", "split"])
def test_strategy_mixed_dataset(tmp_path, capfd, quality):
    """A strategy mixture on 3m: its controllers play their shares, ids stored, win rates printed, good a minority.
    mixed: a worse controller's action is the majority at most states; split: a competent majority that agrees with the
    good controller for half of its agents, so only at some states."""
    path = str(tmp_path / "mixed.h5")
    win_rate, _, not_majority = generate_smax_dataset(SmaxAdapter("3m"), path, quality, 20, seed=0)
    out = capfd.readouterr().out
    shares = np.array([MIXTURES[quality].get(name, 0.0) for name in CONTROLLERS])
    with h5py.File(path) as f:
        assert list(f.attrs["controller_names"]) == list(CONTROLLERS)
        counts = np.bincount(f["controller"][:], minlength=len(CONTROLLERS))
        assert counts.tolist() == np.floor(shares * 20).astype(int).tolist() and counts[0] / 20 <= 0.25
        assert f.attrs["good_not_majority_fraction"] == not_majority
        assert not_majority > 0.5 if quality == "mixed" else 0 < not_majority < 0.5
        assert f.attrs["behaviour_win_rate"] == win_rate
    for name in CONTROLLERS:
        if counts[CONTROLLERS.index(name)]:
            assert f"{name}: {counts[CONTROLLERS.index(name)]} episodes, win rate" in out


def rewrite(path, **changes):
    """Replace datasets of a PyMARL file (None deletes one)."""
    with h5py.File(path, "r+") as f:
        for key, value in changes.items():
            del f[key]
            if value is not None:
                f.create_dataset(key, data=value)


def broken_file(path, case):
    """A PyMARL file of 3s_vs_5z with one thing wrong (issue 22's table)."""
    if case == "empty":
        path.write_bytes(b"")
        return
    write_pymarl_h5(path)
    with h5py.File(path, "r") as f:
        d = {k: f[k][:] for k in f}
    if case.startswith("truncated"):
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * float(case.split("_")[1]))])
    elif case == "wrong_keys":
        rewrite(path, reward=None, filled=None)
    elif case == "string_reward":
        rewrite(path, reward=np.full(d["reward"].shape, b"1.0"))
    elif case == "reward_shape":
        rewrite(path, reward=np.concatenate([d["reward"]] * 2, -1))
    elif case == "nan_reward":
        d["reward"][0, 0] = np.nan
        rewrite(path, reward=d["reward"])
    elif case == "inf_obs":
        d["obs"][1, 0, 0, 0] = np.inf
        rewrite(path, obs=d["obs"])
    elif case == "zero_episodes":
        rewrite(path, **{k: d[k][:0] for k in ("obs", "state", "actions", "avail_actions", "reward", "terminated",
                                                 "filled")})  # fmt: skip
    elif case == "continuous_actions":
        rewrite(path, actions=d["actions"].astype(np.float32) + 0.25)
    elif case == "action_out_of_range":
        d["actions"][0, 0, 0, 0] = N_ACTIONS + 2
        rewrite(path, actions=d["actions"])
    elif case == "more_actions":
        rewrite(path, avail_actions=np.concatenate([d["avail_actions"], d["avail_actions"][..., :2]], -1))
    elif case == "more_agents":
        rewrite(path, **{k: np.concatenate([d[k], d[k][:, :, :1]], 2) for k in ("obs", "actions", "avail_actions")})


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("empty", "is not an HDF5 file"),
        ("truncated_0.001", "may be truncated or corrupt"),
        ("truncated_0.3", "may be truncated or corrupt"),
        ("truncated_0.6", "may be truncated or corrupt"),
        ("truncated_0.99", "may be truncated or corrupt"),
        ("wrong_keys", "missing keys ['reward', 'filled']"),
        ("string_reward", "not numbers in the PyMARL layout"),
        ("reward_shape", "reward is float32 [6, 12, 2]"),
        ("nan_reward", "reward holds NaN or inf"),
        ("inf_obs", "obs holds NaN or inf"),
        ("zero_episodes", "holds 0 episodes"),
        ("continuous_actions", "not continuous actions"),
        ("action_out_of_range", "actions range 0..12, the smax env has the discrete actions 0..9"),
        ("more_actions", "n_actions 12 (dataset) vs 10 (env)"),
        ("more_agents", "n_agents 4 (dataset) vs 3 (env)"),
    ],
)
def test_broken_data_files_give_one_line(tmp_path, jax_env, case, fragment):
    """Each broken file stops the run before it starts: one `error:` line naming the file, no traceback, no runs/."""
    broken_file(tmp_path / "data.h5", case)
    proc = run_script(SCRIPT, "--env-backend", "smax", "--dataset-path", "data.h5", cwd=tmp_path, env=jax_env,
                      check=False)  # fmt: skip
    assert_user_error(proc, fragment, "data.h5")
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith("error: ") and not (tmp_path / "runs").exists()
