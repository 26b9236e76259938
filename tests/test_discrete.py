"""icq_discrete.py: the ICQ weights and operator (spec section 5) and the script end to end on tiny data."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import assert_user_error, run_script

from icq_discrete import (
    actor_loss,
    behavior_weights,
    critic_loss,
    critic_target,
    icq_weights,
    load_d4rl_hdf5,
    make_dataset_tensors,
)

SCRIPT = "icq_discrete.py"
ENV = {"OMP_NUM_THREADS": "1"}  # tiny networks: one thread is faster than two fighting over shared cores
TINY = ("--total-steps", 20, "--eval-interval", 10, "--eval-episodes", 1, "--log-interval", 10, "--batch-size", 16)


# ---------------------------------------------------------------------------------------------------------------------
# Weights
def test_icq_weights_properties():
    x = torch.tensor([0.3, -1.2, 2.0, 0.7, 5.0])
    mask = torch.tensor([True, True, True, True, False])
    w = icq_weights(x, 1.0, mask)
    assert torch.isclose(w[mask].mean(), torch.tensor(1.0)) and w[4] == 0
    assert torch.isclose(icq_weights(x, 1.0).mean(), torch.tensor(1.0))
    assert torch.allclose(icq_weights(x, 1e9, mask)[mask], torch.ones(4))  # uniform as T -> inf
    assert torch.allclose(
        icq_weights(x, 1e-3, mask), torch.tensor([0.0, 0.0, 4.0, 0.0, 0.0])
    )  # one-hot on the valid max
    big = icq_weights(torch.tensor([1e4, -1e4, 0.0, 9999.0]), 1e-3)
    assert torch.isfinite(big).all() and torch.allclose(big, torch.tensor([4.0, 0.0, 0.0, 0.0]))
    assert not icq_weights(x.clone().requires_grad_(), 1.0).requires_grad
    assert (icq_weights(x, 1.0, torch.zeros(5, dtype=torch.bool)) == 0).all()  # nothing valid: zeros, not NaN


def test_behavior_weights_exact_form():
    q = torch.tensor([[1.0, 3.0, -2.0], [1e4, 0.0, -1e4]])
    mu = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.8, 0.1]])
    w = torch.stack([behavior_weights(q, torch.full((2,), a), mu.log(), 2.0) for a in range(3)], 1)
    expected = torch.exp(q[0] / 2) / (mu[0] * torch.exp(q[0] / 2)).sum()
    assert torch.allclose(w[0], expected)
    assert torch.allclose(
        (mu * w).sum(1), torch.ones(2), atol=1e-3
    )  # E_mu[w] = 1 per state, even at q / T = 5000 (float32)
    assert torch.isfinite(behavior_weights(q, torch.tensor([1, 1]), mu.log(), 1e-3)).all()
    assert not behavior_weights(q.requires_grad_(), torch.tensor([0, 1]), mu.log(), 1.0).requires_grad


def test_batch_weights_approach_exact_weights_as_batch_grows():
    """One state, actions drawn from mu: n * softmax over the batch -> exp(q_a/T) / E_mu[exp(q/T)]."""
    torch.manual_seed(0)
    q, mu, temperature = torch.tensor([0.5, 2.0, -1.0, 1.0]), torch.tensor([0.4, 0.1, 0.3, 0.2]), 1.0
    errors = []
    for n in (10, 300_000):
        actions = torch.multinomial(mu, n, replacement=True)
        exact = behavior_weights(q.expand(n, 4), actions, mu.log().expand(n, 4), temperature)
        errors.append((icq_weights(q[actions], temperature) - exact).abs().max().item())
    assert errors[1] < 0.03 and errors[1] < errors[0] / 5


# ---------------------------------------------------------------------------------------------------------------------
# Critic and actor on tabular "networks": states are one-hot rows, so net(obs) reads a table
class Table(nn.Module):
    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(torch.as_tensor(table, dtype=torch.float32))

    def forward(self, obs):
        return obs @ self.table


def tabular_batch(n_states=6, n_actions=3, seed=0):
    """One row per state s' (all distinct) so that every Q'(s', b) entry belongs to exactly one row."""
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(n_states)
    obs, next_obs = eye[torch.randperm(n_states, generator=g)], eye
    act, next_act = (
        torch.randint(n_actions, (n_states,), generator=g),
        torch.randint(n_actions, (n_states,), generator=g),
    )
    rew, done = torch.randn(n_states, generator=g), torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    return (obs, act, rew, next_obs, next_act, done), torch.randn(n_states, n_actions, generator=g)


@pytest.mark.parametrize("normalizer", ["batch", "behavior"])
def test_large_temperature_gives_sarsa_target(normalizer):
    batch, q_table = tabular_batch()
    obs, act, rew, next_obs, next_act, done = batch
    critic, target = Table(q_table), Table(q_table * 2 + 1)
    behavior = Table(torch.randn(6, 3)) if normalizer == "behavior" else None
    sarsa = rew + 0.9 * (1 - done) * target.table.detach()[torch.arange(6), next_act]
    expected = ((critic.table.detach()[obs.argmax(1), act] - sarsa) ** 2).mean()
    assert torch.isclose(critic_loss(critic, target, behavior, batch, 0.9, 1e9)[0], expected)
    # and a small temperature does change it (the comparison above can fail)
    assert not torch.isclose(critic_loss(critic, target, behavior, batch, 0.9, 0.1)[0], expected)


def test_batch_critic_never_reads_q_at_actions_outside_the_batch():
    batch, q_table = tabular_batch()
    next_act = batch[4]
    outside = torch.ones_like(q_table, dtype=torch.bool)
    outside[torch.arange(6), next_act] = False
    perturbed = q_table + outside * 1000 * torch.randn_like(q_table)
    critic = Table(torch.zeros(6, 3))
    same = (
        critic_loss(critic, Table(q_table), None, batch, 0.9, 1.0)[0]
        == critic_loss(critic, Table(perturbed), None, batch, 0.9, 1.0)[0]
    )
    assert same
    behavior = Table(torch.zeros(6, 3))  # the exact Z reads them, by definition: the check above can see a difference
    assert (
        critic_loss(critic, Table(q_table), behavior, batch, 0.9, 1.0)[0]
        != critic_loss(critic, Table(perturbed), behavior, batch, 0.9, 1.0)[0]
    )


def test_critic_target_masks_terminals_and_actor_loss_weights():
    reward, done, next_q = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 1.0, 0.0]), torch.tensor([10.0, 1e6, 10.0])
    # the terminal's junk Q' (1e6) takes no share of the batch softmax: the other two keep weight 1 each
    assert torch.allclose(critic_target(reward, done, next_q, 0.5, 1.0)[0], torch.tensor([6.0, 2.0, 8.0]))
    log_prob, signal = torch.tensor([-1.0, -2.0]), torch.tensor([0.0, 1e3])
    assert torch.isclose(actor_loss(log_prob, signal, 1.0), torch.tensor(2.0))  # all weight (2) on the better action
    assert torch.isclose(actor_loss(log_prob, signal, 1e9), torch.tensor(1.5))  # behaviour cloning
    assert torch.isclose(actor_loss(log_prob, signal, 1.0, weights=torch.tensor([1.0, 0.0])), torch.tensor(0.5))


def test_batch_critic_weight_is_the_authors_clamped_one():
    reward, done = torch.zeros(4), torch.tensor([0.0, 0.0, 0.0, 1.0])
    next_q = torch.tensor([10.0, 0.0, -10.0, 1e6])
    _, rho = critic_target(reward, done, next_q, 0.9, 1.0)  # default: clamp(n * softmax, 0, 1)
    raw = icq_weights(next_q, 1.0, mask=done == 0)
    assert raw.max() > 2.9 and torch.allclose(rho, raw.clamp(0, 1)) and rho.max() == 1.0
    _, rho_half = critic_target(reward, done, next_q, 0.9, 1e9, scale=0.5)
    assert torch.allclose(rho_half, torch.tensor([0.5, 0.5, 0.5, 0.0]))  # scale 0.5: the authors' MuJoCo weight
    target, rho_raw = critic_target(reward, done, next_q, 0.9, 1.0, clip=False)  # eq. 10 as written: weights up to n
    assert torch.allclose(rho_raw, raw) and torch.isclose(target[0], 0.9 * raw[0] * 10.0)
    exact = torch.tensor([3.0, 0.5, 2.0, 1.0])  # the exact-Z weights are used as they are, never clamped
    assert torch.equal(critic_target(reward, done, next_q, 0.9, 1.0, weights=exact)[1], exact)


def test_alpha_inf_is_exact_behaviour_cloning():
    log_prob = torch.tensor([-0.3, -1.7, -2.2, -0.01])
    for signal in (torch.tensor([1e30, -1e30, 0.0, 5.0]), torch.tensor([1e4, 1e4, -1e4, 3.0])):
        assert torch.equal(actor_loss(log_prob, signal, math.inf), -log_prob.mean())  # exactly, not approximately
        assert torch.equal(
            actor_loss(log_prob, signal, math.inf, weights=torch.tensor([9.0, 0.0, 0.0, 0.0])), -log_prob.mean()
        )
    assert not torch.equal(
        actor_loss(log_prob, torch.tensor([1e4, 0.0, 0.0, 0.0]), 1e6), -log_prob.mean()
    )  # a huge alpha is not


# ---------------------------------------------------------------------------------------------------------------------
# The exact ICQ operator on a tabular MDP (spec section 5)
def icq_operator_fixed_point(P, R, mu, alpha, gamma, iters=2000):
    """Iterate T Q = R + gamma P E_{a'~mu}[rho(s',a') Q(s',a')] with rho = behavior_weights (per-state Z)."""
    n_states, n_actions = R.shape
    q = torch.zeros_like(R)
    for _ in range(iters):
        rho = torch.stack(
            [behavior_weights(q, torch.full((n_states,), a), mu.log(), alpha) for a in range(n_actions)], 1
        )
        v = torch.where(mu > 0, mu * rho * q, 0.0).sum(1)  # unsupported actions: mu = 0, their rho is never used
        q, previous = R + gamma * P @ v, q
    return q, (q - previous).abs().max().item()


def test_exact_icq_operator_converges_between_sarsa_and_in_support_max():
    g = torch.Generator().manual_seed(1)
    n_states, n_actions, gamma = 5, 3, 0.9
    P = torch.rand(n_states, n_actions, n_states, generator=g, dtype=torch.float64)
    P /= P.sum(-1, keepdim=True)
    R = torch.rand(n_states, n_actions, generator=g, dtype=torch.float64)
    R[:, 2] += 5.0  # the best action by far, which the behaviour policy never takes
    mu = torch.tensor([[0.7, 0.3, 0.0]] * n_states, dtype=torch.float64)
    # Q^mu solves Q = R + gamma P mu Q; the in-support optimum is value iteration with max over mu's support.
    P_mu = torch.einsum("sat,tb->satb", P, mu).reshape(n_states * n_actions, -1)
    q_mu = torch.linalg.solve(
        torch.eye(n_states * n_actions, dtype=torch.float64) - gamma * P_mu, R.reshape(-1)
    ).reshape(R.shape)
    q_star = torch.zeros_like(R)
    for _ in range(2000):
        q_star = R + gamma * P @ q_star[:, :2].max(1).values
    q_large, delta_large = icq_operator_fixed_point(P, R, mu, 1e4, gamma)
    q_small, delta_small = icq_operator_fixed_point(P, R, mu, 1e-3, gamma)
    assert delta_large < 1e-8 and delta_small < 1e-8
    assert torch.allclose(q_large, q_mu, atol=1e-3)
    assert torch.allclose(q_small, q_star, atol=1e-3)
    assert not torch.allclose(q_mu, q_star, atol=0.1)  # the two limits differ, so the checks mean something
    q_mid, _ = icq_operator_fixed_point(P, R, mu, 0.3, gamma)
    assert (q_mu - 1e-9 <= q_mid).all() and (q_mid <= q_star + 1e-9).all()  # in between for a finite alpha
    assert (q_star < R[:, 2:].max() / (1 - gamma)).all()  # the unsupported action's reward never leaked in


# ---------------------------------------------------------------------------------------------------------------------
# The script end to end
def read_summary(tmp_path, run_name):
    return json.loads((tmp_path / "runs" / run_name / "summary.json").read_text())


def test_builtin_dataset_end_to_end(tmp_path):
    proc = run_script(
        SCRIPT, "--quality", "medium", "--dataset-size", 300, "--run-name", "tiny", *TINY, cwd=tmp_path, env=ENV
    )
    assert "eval step 20" in proc.stdout
    assert (tmp_path / "datasets" / "LunarLander-v3-medium-300.npz").exists()
    summary = read_summary(tmp_path, "tiny")
    for key in ("final_score", "best_score", "final_return", "steps_per_second", "wall_seconds", "peak_rss_mb"):
        assert np.isfinite(summary[key]), key
    assert [e["step"] for e in summary["evaluations"]] == [10, 20]
    assert np.isclose(summary["final_score"], 100 * (summary["final_return"] + 181.7) / (243.4 + 181.7))
    assert summary["best_score"] == max(e["score"] for e in summary["evaluations"])


def test_builtin_mixed_data_mixes_distinct_policies(tmp_path):
    proc = run_script(
        SCRIPT, "--quality", "mixed", "--dataset-size", 1500, "--run-name", "mixed", *TINY, cwd=tmp_path, env=ENV
    )
    assert "mean episode return per policy: heuristic" in proc.stdout
    with np.load(tmp_path / "datasets" / "LunarLander-v3-mixed-policies-1500.npz") as npz:
        policies, lengths, rewards = npz["policies"], npz["lengths"], npz["rewards"]
        majority = float(npz["heuristic_is_majority"])
    returns = np.array([r.sum() for r in np.split(rewards, np.cumsum(lengths)[:-1])])
    summary = read_summary(tmp_path, "mixed")
    assert set(summary["component_returns"]) == set(policies) == {"heuristic", "no-main-engine", "random"}
    for policy, mean_return in summary["component_returns"].items():
        assert np.isclose(mean_return, returns[policies == policy].mean(), atol=1e-3)
    assert summary["component_returns"]["heuristic"] > 100 > 0 > summary["component_returns"]["no-main-engine"]
    assert np.isclose(summary["dataset_return"], returns.mean(), atol=1e-3)
    assert 0 < summary["heuristic_is_majority"] == majority < 1


def make_minari_dataset(root, dataset_id, env_id, episodes=4, eval_env=None, ref_scores=(0.0, 500.0)):
    """A small random-policy Minari dataset built from EpisodeBuffers (DataCollector would need jax)."""
    import gymnasium as gym
    import minari
    from minari.data_collector.episode_buffer import EpisodeBuffer

    env, buffers = gym.make(env_id), []
    env.action_space.seed(0)
    for i in range(episodes):
        obs, _ = env.reset(seed=i)
        observations, actions, rewards, terms, truncs = [obs], [], [], [], []
        done = False
        while not done:
            a = env.action_space.sample()
            obs, r, terminated, truncated, _ = env.step(a)
            (
                observations.append(obs),
                actions.append(a),
                rewards.append(r),
                terms.append(terminated),
                truncs.append(truncated),
            )
            done = terminated or truncated or len(actions) == 50
        truncs[-1] = truncs[-1] or not terms[-1]
        buffers.append(
            EpisodeBuffer(
                id=i,
                seed=i,
                observations=np.array(observations),
                actions=np.array(actions),
                rewards=rewards,
                terminations=terms,
                truncations=truncs,
                infos={},
            )
        )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(root))
        minari.create_dataset_from_buffers(
            dataset_id,
            buffers,
            env=env_id,
            eval_env=eval_env or env_id,
            algorithm_name="random",
            author="test",
            author_email="test@example.com",
            code_permalink="none",
            description="test",
            ref_min_score=ref_scores[0],
            ref_max_score=ref_scores[1],
        )


def test_minari_discrete_dataset_end_to_end(tmp_path):
    root = tmp_path / "minari"
    make_minari_dataset(root, "test/cartpole/random-v0", "CartPole-v1")
    run_script(
        SCRIPT,
        "--dataset-id",
        "test/cartpole/random-v0",
        "--run-name",
        "cart",
        "--normalizer",
        "behavior",
        *TINY,
        cwd=tmp_path,
        env={**ENV, "MINARI_DATASETS_PATH": str(root)},
    )
    summary = read_summary(tmp_path, "cart")
    assert summary["final_return"] >= 1 and np.isclose(summary["final_score"], 100 * summary["final_return"] / 500)


def test_resume_equals_straight_run(tmp_path):
    common = (
        "--quality",
        "mixed",
        "--dataset-size",
        200,
        "--normalizer",
        "behavior",
        "--save-model",
        *TINY[4:],
        "--eval-interval",
        15,
    )
    run_script(SCRIPT, *common, "--total-steps", 30, "--run-name", "straight", cwd=tmp_path, env=ENV)
    run_script(SCRIPT, *common, "--total-steps", 15, "--run-name", "split", cwd=tmp_path, env=ENV)
    proc = run_script(
        SCRIPT, *common, "--total-steps", 30, "--resume", "runs/split/checkpoint.pt", cwd=tmp_path, env=ENV
    )
    assert "resumed from runs/split/checkpoint.pt at step 15" in proc.stdout
    a, b = (torch.load(tmp_path / "runs" / r / "checkpoint.pt", weights_only=False) for r in ("straight", "split"))
    assert a["step"] == b["step"] == 30
    for key in ("actor", "critic", "critic_target", "behavior"):
        for name, tensor in a["modules"][key].items():
            assert torch.equal(tensor, b["modules"][key][name]), f"{key}.{name}"
    assert read_summary(tmp_path, "split")["evaluations"] == read_summary(tmp_path, "straight")["evaluations"]


# ---------------------------------------------------------------------------------------------------------------------
# D4RL-layout HDF5 files
def write_d4rl(path, obs, actions, rewards, terminals, timeouts, next_obs=None, drop=()):
    import h5py

    with h5py.File(path, "w") as f:
        arrays = dict(observations=obs, actions=actions, rewards=rewards, terminals=terminals, timeouts=timeouts)
        if next_obs is not None:
            arrays["next_observations"] = next_obs
        for key, value in arrays.items():
            if key not in drop:
                f[key] = np.asarray(value)


def test_d4rl_hdf5_episode_boundaries_and_next_actions(tmp_path):
    # Three episodes in one array: rows 0-2 end terminal, rows 3-5 end by timeout, rows 6-7 end with the file.
    obs = np.arange(8, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    actions = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    terminals, timeouts = np.eye(8, dtype=bool)[2], np.eye(8, dtype=bool)[5]
    write_d4rl(tmp_path / "d.hdf5", obs, actions, np.arange(8.0), terminals, timeouts, next_obs=obs + 0.5)
    episodes = load_d4rl_hdf5(str(tmp_path / "d.hdf5"))
    assert [len(ep[1]) for ep in episodes] == [3, 3, 2]
    assert episodes[0][0][-1, 0] == 2.5  # an episode's last observation is next_observations[end]
    data = make_dataset_tensors(episodes, "cpu")
    # The terminal row is kept (done 1), a timeout's or the file's last row has no a' and is dropped.
    assert data["obs"][:, 0].tolist() == [0, 1, 2, 3, 4, 6]
    assert data["next_obs"][:, 0].tolist() == [1, 2, 2.5, 4, 5, 7]
    assert data["next_actions"].tolist()[:2] == [1, 2] and data["next_actions"].tolist()[3:] == [0, 1, 3]
    assert data["dones"].tolist() == [0, 0, 1, 0, 0, 0]
    assert data["actions"].dtype == torch.long and data["rewards"].tolist() == [0, 1, 2, 3, 4, 6]


@pytest.mark.parametrize(
    "case, fragments",
    [
        ("missing", ("no such file",)),
        ("keys", ("missing keys ['timeouts']",)),
        ("float-actions", ("integer",)),
        ("lengths", ("different lengths",)),
        ("env", ("disagree", "observation size 3 vs 8")),
        ("actions", ("disagree", "actions used by the data 5 vs the env's 4")),
    ],
)
def test_d4rl_hdf5_errors(tmp_path, case, fragments):
    n = 6
    obs, actions = np.zeros((n, 8 if case != "env" else 3), np.float32), np.zeros(n, np.int64)
    if case == "float-actions":
        actions = np.full((n, 2), 0.5, np.float32)
    if case == "actions":
        actions = np.full(n, 4)
    rewards = np.zeros(n - 1 if case == "lengths" else n, np.float32)
    if case != "missing":
        write_d4rl(
            tmp_path / "d.hdf5",
            obs,
            actions,
            rewards,
            np.zeros(n, bool),
            np.zeros(n, bool),
            drop=("timeouts",) if case == "keys" else (),
        )
    proc = run_script(SCRIPT, "--dataset-path", "d.hdf5", *TINY, cwd=tmp_path, env=ENV, check=False)
    assert_user_error(proc, *fragments)


def test_q_leaving_the_reward_bound_warns_once_with_the_flag(tmp_path):
    # All rewards 0: the bound max|r| / (1 - gamma) is 0, so the freshly initialised critic already leaves it at step 1.
    rng = np.random.default_rng(0)
    write_d4rl(
        tmp_path / "zero.hdf5",
        rng.normal(size=(40, 8)).astype(np.float32),
        rng.integers(4, size=40),
        np.zeros(40),
        np.eye(40, dtype=bool)[19],
        np.zeros(40, bool),
    )
    proc = run_script(
        SCRIPT,
        "--dataset-path",
        "zero.hdf5",
        "--no-clip-critic-weights",
        "--run-name",
        "zero",
        *TINY,
        cwd=tmp_path,
        env=ENV,
    )
    assert "warning" not in proc.stdout  # warnings go to stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and "at step 1:" in warnings[0] and "try --clip-critic-weights" in warnings[0]
    summary = read_summary(tmp_path, "zero")
    assert summary["q_bound"] == 0 < summary["q_abs_max"] and summary["final_score"] is None


# ---------------------------------------------------------------------------------------------------------------------
# Learning regression: a chain where the good policy is a minority of the data
CHAIN_ENV = """
import gymnasium as gym
import numpy as np


class Chain(gym.Env):
    \"\"\"States 0..5 in a row (one-hot), start at 0; action 0 moves right, 1 stays, 2 moves left; state 5 pays 100
    and ends.\"\"\"
    observation_space = gym.spaces.Box(0.0, 1.0, (6,), np.float32)
    action_space = gym.spaces.Discrete(3)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.s = 0
        return np.eye(6, dtype=np.float32)[self.s], {}

    def step(self, action):
        self.s = min(max(self.s + (1, 0, -1)[int(action)], 0), 5)
        return np.eye(6, dtype=np.float32)[self.s], 100.0 * (self.s == 5), self.s == 5, False, {}


gym.register("Chain-v0", entry_point=Chain, max_episode_steps=16)
"""


def write_chain_data(tmp_path, seed=0):
    """25 % of episodes move right to the goal; the rest stay with probability 0.7 and move right with 0.2, so at every
    state the data's most common action is "stay" and greedy behaviour cloning never reaches the goal."""
    (tmp_path / "chain_env.py").write_text(CHAIN_ENV)
    rng, rows = np.random.default_rng(seed), []
    for episode in range(200):
        good, s = episode % 4 == 0, 0
        for t in range(16):
            a = 0 if good else int(rng.choice(3, p=[0.2, 0.7, 0.1]))
            s2 = min(max(s + (1, 0, -1)[a], 0), 5)
            rows.append((np.eye(6)[s], a, 100.0 * (s2 == 5), s2 == 5, s2 != 5 and t == 15, np.eye(6)[s2]))
            s = s2
            if s == 5:
                break
    obs, actions, rewards, terminals, timeouts, next_obs = map(np.array, zip(*rows))
    write_d4rl(tmp_path / "chain.hdf5", obs, actions, rewards, terminals, timeouts, next_obs)


def test_icq_beats_exact_bc_on_a_chain_and_q_stays_bounded(tmp_path):
    write_chain_data(tmp_path)
    env = {**ENV, "PYTHONPATH": str(tmp_path)}
    common = (
        "--dataset-path",
        "chain.hdf5",
        "--env-id",
        "chain_env:Chain-v0",
        "--batch-size",
        64,
        "--eval-episodes",
        1,
        "--log-interval",
        100,
    )
    summaries = {}  # default ICQ; exact BC needs fewer steps to settle on the majority action
    for method, extra in (
        ("icq", ("--total-steps", 3000, "--eval-interval", 1000)),
        ("bc", ("--alpha", "inf", "--total-steps", 600, "--eval-interval", 300)),
    ):
        proc = run_script(SCRIPT, *common, *extra, "--run-name", method, cwd=tmp_path, env=env)
        assert "warning" not in proc.stdout + proc.stderr
        summaries[method] = read_summary(tmp_path, method)
    icq, bc = summaries["icq"], summaries["bc"]
    assert icq["dataset_return"] < 50 and icq["q_bound"] == 100 / (1 - 0.99)
    assert bc["final_return"] == 0.0  # greedy BC copies the majority's "stay" and never reaches the goal
    assert icq["final_return"] == 100.0  # ICQ's weights pick the minority's "right" from the rewards
    assert 0 < icq["q_abs_max"] <= icq["q_bound"]  # the running max over the whole run stayed inside the bound


# ---------------------------------------------------------------------------------------------------------------------
# Bad inputs: one clear message, no traceback
@pytest.mark.parametrize(
    "args, fragments",
    [
        (("--alpha", 0), ("--alpha", "> 0")),
        (("--critic-alpha", -1), ("--critic-alpha", "> 0")),
        (("--alpha", "nan"), ("--alpha", "inf is exact behaviour cloning")),
        (("--dataset-id", "a/b-v0", "--dataset-path", "c.hdf5"), ("one of --dataset-id and --dataset-path",)),
        (("--quality", "superb"), ("superb", "good")),
        (("--env-id", "CartPole-v1"), ("no built-in dataset", "LunarLander-v3")),
        (("--dataset-id", "nope/nothing-v0"), ("minari download nope/nothing-v0", "built-in")),
        (("--gamma", 1e30, "--dataset-size", 100, *TINY), ("non-finite loss",)),
    ],
)
def test_bad_inputs(tmp_path, args, fragments):
    env = {**ENV, "MINARI_DATASETS_PATH": str(tmp_path / "minari")}
    assert_user_error(run_script(SCRIPT, *args, cwd=tmp_path, env=env, check=False), *fragments)


def test_bad_minari_datasets(tmp_path):
    root = tmp_path / "minari"
    make_minari_dataset(root, "test/pendulum/random-v0", "Pendulum-v1", episodes=1)
    make_minari_dataset(root, "test/cartpole/acrobot-v0", "CartPole-v1", episodes=1, eval_env="Acrobot-v1")
    env = {**ENV, "MINARI_DATASETS_PATH": str(root)}
    proc = run_script(SCRIPT, "--dataset-id", "test/pendulum/random-v0", *TINY, cwd=tmp_path, env=env, check=False)
    assert_user_error(proc, "Discrete", "icq_continuous.py")
    proc = run_script(SCRIPT, "--dataset-id", "test/cartpole/acrobot-v0", *TINY, cwd=tmp_path, env=env, check=False)
    assert_user_error(proc, "disagree", "observation size 4 vs 6")


# ---------------------------------------------------------------------------------------------------------------------
# Broken data files (issue 22): one error line naming the file, no traceback, no run directory
def good_d4rl(path, n=200):
    rng = np.random.default_rng(0)
    write_d4rl(path, rng.normal(size=(n, 8)).astype(np.float32), rng.integers(4, size=n), rng.normal(size=n),
               np.eye(n, dtype=bool)[n // 2], np.zeros(n, bool))  # fmt: skip


def truncate(fraction):
    def make(path):
        good_d4rl(path, n=2000)
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * fraction)])

    return make


def d4rl_with(**changes):
    def make(path):
        rng, n = np.random.default_rng(0), changes.pop("n", 50)
        arrays = dict(obs=rng.normal(size=(n, 8)).astype(np.float32), actions=rng.integers(4, size=n),
                      rewards=rng.normal(size=n), terminals=np.zeros(n, bool), timeouts=np.zeros(n, bool))  # fmt: skip
        arrays.update(changes)
        write_d4rl(path, **arrays)

    return make


BROKEN_FILES = {  # case -> (make the file, extra flags, fragments of the error line)
    "truncated-1%": (truncate(0.01), (), ("truncated or corrupt",)),
    "truncated-50%": (truncate(0.5), (), ("truncated or corrupt",)),
    "truncated-99%": (truncate(0.99), (), ("truncated or corrupt",)),
    "empty": (lambda path: path.write_bytes(b""), (), ("not an HDF5 file",)),
    "not-hdf5": (lambda path: path.write_text("observations,actions\n1,2\n"), (), ("not an HDF5 file",)),
    "wrong-keys": (
        lambda path: write_d4rl(
            path, np.zeros((5, 8)), np.zeros(5), np.zeros(5), np.zeros(5), np.zeros(5), drop=("rewards", "terminals")
        ),
        (),
        ("missing keys ['rewards', 'terminals']",),
    ),  # fmt: skip
    "wrong-dtype": (d4rl_with(rewards=np.array([b"x"] * 50)), (), ("non-numeric arrays ['rewards']",)),
    "nan-reward": (d4rl_with(rewards=np.r_[np.zeros(49), np.nan]), (), ("NaN or inf",)),
    "inf-observation": (d4rl_with(obs=np.full((50, 8), np.inf, np.float32)), (), ("NaN or inf",)),
    "zero-episodes": (d4rl_with(n=0, obs=np.zeros((0, 8), np.float32)), (), ("zero transitions",)),
    "continuous-actions": (d4rl_with(actions=np.full((50, 2), 0.3)), (), ("integer", "use icq_continuous.py")),
    "too-many-actions": (
        d4rl_with(actions=np.full(50, 6)),
        (),
        ("disagree", "actions used by the data 7 vs the env's 4"),
    ),
    "continuous-env": (good_d4rl, ("--env-id", "Pendulum-v1"), ("Box action space", "use icq_continuous.py")),
}


@pytest.mark.parametrize("case", list(BROKEN_FILES))
def test_broken_data_files(tmp_path, case):
    make, extra, fragments = BROKEN_FILES[case]
    make(tmp_path / "d.hdf5")
    proc = run_script(SCRIPT, "--dataset-path", "d.hdf5", *extra, *TINY, cwd=tmp_path, env=ENV, check=False)
    assert_user_error(proc, *fragments)
    assert [line.startswith("error:") for line in proc.stderr.strip().splitlines()] == [True], proc.stderr
    assert not (tmp_path / "runs").exists()


def test_broken_builtin_cache(tmp_path):
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "LunarLander-v3-medium-300.npz").write_bytes(b"PK\x03\x04 half a zip")
    proc = run_script(SCRIPT, "--quality", "medium", "--dataset-size", 300, *TINY, cwd=tmp_path, env=ENV, check=False)
    assert_user_error(proc, "LunarLander-v3-medium-300.npz is unreadable", "delete it")
    assert not (tmp_path / "runs").exists()
