"""icq_continuous.py: the ICQ math (spec section 5), the data pipeline, and end-to-end runs on tiny local data."""

import dataclasses
import json

import gymnasium as gym
import gymnasium_robotics
import h5py
import numpy as np
import pytest
import torch
import tyro
from conftest import ROOT, assert_user_error, run_script

import icq_continuous as icq
import icq_data

SCRIPT = "icq_continuous.py"


# ---------------------------------------------------------------------------------------------------------------------
# icq_weights
def test_icq_weights_mean_one_and_zero_on_padding():
    x = torch.randn(7, 3)
    mask = torch.rand(7, 3) > 0.4
    mask[0] = True  # every column has a valid entry
    w = icq.icq_weights(x, 0.5, mask)
    assert torch.all(w[~mask] == 0)
    assert torch.allclose(w.sum(0) / mask.sum(0), torch.ones(3))
    assert torch.allclose(icq.icq_weights(x, 0.5).mean(0), torch.ones(3))
    # Padding values never matter, however extreme.
    assert torch.equal(icq.icq_weights(torch.where(mask, x, torch.tensor(1e9)), 0.5, mask), w)


def test_icq_weights_limits_and_stability():
    x = torch.tensor([1.0, 3.0, 2.0, -1.0])
    assert torch.allclose(icq.icq_weights(x, 1e9), torch.ones(4))  # temperature -> inf: uniform (SARSA)
    assert torch.equal(icq.icq_weights(x, 1e-4), torch.tensor([0.0, 4.0, 0.0, 0.0]))  # -> 0: one-hot on the max
    big = icq.icq_weights(torch.tensor([1e4, -1e4, 5e3]), 1e-3)
    assert torch.all(torch.isfinite(big)) and torch.allclose(big, torch.tensor([3.0, 0.0, 0.0]))
    assert torch.all(icq.icq_weights(x, 1e-3, torch.zeros(4, dtype=torch.bool)) == 0)  # nothing valid: zeros, not NaN


def test_icq_weights_carry_no_gradient():
    x = torch.randn(5, requires_grad=True)
    assert not icq.icq_weights(x, 1.0).requires_grad


# ---------------------------------------------------------------------------------------------------------------------
# critic target and losses
def test_critic_target_is_sarsa_as_temperature_grows():
    r, next_q = torch.randn(64), torch.randn(64) * 10
    d = (torch.rand(64) < 0.2).float()
    sarsa = r + 0.99 * (1 - d) * next_q
    assert torch.allclose(icq.critic_target(r, d, next_q, 0.99, 1e9)[0], sarsa, atol=1e-5)
    # Small temperature, unclipped: rho concentrates on the largest non-terminal Q', the in-data max of eq. 10.
    y = icq.critic_target(r, d, next_q, 0.99, 1e-4, clip=False)[0]
    best = torch.where(d == 0, next_q, -torch.inf).argmax()
    expected = r.clone()
    expected[best] += 0.99 * (d == 0).sum() * next_q[best]
    assert torch.allclose(y, expected, atol=1e-4)


def test_terminal_rows_stay_out_of_the_softmax():
    r, next_q = torch.zeros(4), torch.tensor([1.0, 2.0, 3.0, 4.0])
    d = torch.tensor([0.0, 0.0, 0.0, 1.0])
    y1 = icq.critic_target(r, d, next_q, 1.0, 1.0, clip=False)[0]
    y2 = icq.critic_target(r, d, torch.tensor([1.0, 2.0, 3.0, -1e6]), 1.0, 1.0, clip=False)[0]
    assert torch.equal(y1, y2) and y1[3] == 0
    w = 3 * torch.softmax(next_q[:3], 0)
    assert torch.allclose(y1[:3], w * next_q[:3])


def test_authors_clamp_and_scale():
    r, d, next_q = torch.zeros(4), torch.zeros(4), torch.tensor([0.0, 0.0, 0.0, 100.0])
    y, rho = icq.critic_target(r, d, next_q, 1.0, 1.0, scale=0.5)  # clip=True is the default
    assert torch.allclose(y, torch.tensor([0.0, 0.0, 0.0, 100.0]))  # rho = clamp(4/2 * ~1, 0, 1) = 1 on the max
    assert rho.max() == 1.0


def test_actor_loss_limits():
    log_prob, signal = torch.randn(16), torch.randn(16)
    assert torch.allclose(icq.actor_loss(log_prob, signal, 1e9), -log_prob.mean())  # plain behaviour cloning
    assert torch.allclose(icq.actor_loss(log_prob, signal, 1e-4), -log_prob[signal.argmax()])


def test_alpha_inf_is_exact_behaviour_cloning():
    """--alpha inf weights every log-likelihood exactly 1, whatever the signal (a huge finite alpha does not, once Q
    grows)."""
    log_prob = torch.randn(37, requires_grad=True)
    for signal in (torch.randn(37), torch.randn(37) * 1e30, torch.full((37,), torch.inf)):
        loss = icq.actor_loss(log_prob, signal, float("inf"))
        (grad,) = torch.autograd.grad(loss, log_prob)
        assert torch.equal(loss, -log_prob.mean()) and torch.equal(grad, torch.full((37,), -1 / 37))
    assert not torch.equal(icq.actor_loss(log_prob, torch.randn(37) * 1e12, 1e9), -log_prob.mean())
    args = icq.resolve_args(tyro.cli(icq.Args, args=["--alpha", "inf"]))
    assert (
        args.alpha == float("inf")
        and "exact behaviour" in run_script(SCRIPT, "--help", cwd=ROOT, env={"COLUMNS": "200"}).stdout
    )


def test_clamped_critic_weight_is_the_default():
    """The authors' rho = clamp(scale * n * softmax, 0, 1) in every preset; the unclipped eq.-10 weight only on
    request."""
    for preset in icq.PRESETS:
        args = icq.resolve_args(tyro.cli(icq.Args, args=["--preset", preset]))
        assert args.clip_critic_weights and args.critic_weight_scale == icq.PRESETS[preset]["critic_weight_scale"]
    assert icq.PRESETS["locomotion"]["critic_weight_scale"] == icq.PRESETS["adroit"]["critic_weight_scale"] == 0.5
    assert icq.PRESETS["antmaze"]["critic_weight_scale"] == 1.0
    args = icq.resolve_args(tyro.cli(icq.Args, args=["--no-clip-critic-weights", "--critic-weight-scale", "1"]))
    assert not args.clip_critic_weights and args.critic_weight_scale == 1.0
    next_q, done = torch.tensor([0.0, 1.0, 50.0, 2.0]), torch.zeros(4)
    assert icq.critic_weights(next_q, done, 1.0, 1.0, True).max() == 1.0
    assert icq.critic_weights(next_q, done, 1.0, 1.0, False).max() > 3.9  # one row takes ~n: gamma * rho > 1


class SpyCritic(torch.nn.Module):
    """Records every action a critic is asked about."""

    def __init__(self, num_q):
        super().__init__()
        self.inner = icq.Critic(3, 2, num_q)
        self.seen = []

    def forward(self, obs, act):
        self.seen.append(act.detach().clone())
        return self.inner(obs, act)


@pytest.mark.parametrize("num_q", [1, 2])
def test_critic_only_sees_dataset_actions(num_q):
    torch.manual_seed(0)
    batch = (torch.randn(8, 3), torch.rand(8, 2), torch.randn(8), torch.randn(8, 3), torch.rand(8, 2), torch.zeros(8))
    critic, target = SpyCritic(num_q), SpyCritic(num_q)
    loss, q, rho = icq.critic_loss(critic, target, batch, 0.99, 1.0)
    loss.backward()
    for kind in ("td", "q"):
        icq.actor_signal(critic, batch, 0.99, kind)
    allowed = torch.cat([batch[1], batch[4]])
    for act in critic.seen + target.seen:
        assert all((row == allowed).all(1).any() for row in act)
    assert loss.shape == () and torch.isfinite(loss) and q.shape == (num_q, 8) and rho.shape == (8,)


# ---------------------------------------------------------------------------------------------------------------------
# data pipeline
def test_episode_transitions_next_action_terminal_and_timeout():
    obs = np.arange(5, dtype=np.float32)[:, None]
    actions = np.arange(4, dtype=np.float32)[:, None] + 10
    rewards = np.ones(4, np.float32)
    # Time-limited: the last step has no a' and is dropped.
    s, a, r, s2, a2, d = icq.episode_transitions(obs, actions, rewards, np.zeros(4, bool), False)
    assert (
        len(s) == 3 and np.array_equal(a2[:, 0], [11, 12, 13]) and np.array_equal(s2[:, 0], [1, 2, 3]) and not d.any()
    )
    # A true terminal is kept with done = 1.
    s, a, r, s2, a2, d = icq.episode_transitions(obs, actions, rewards, np.array([0, 0, 0, 1], bool), False)
    assert len(s) == 4 and np.array_equal(d, [0, 0, 0, 1]) and np.array_equal(a2[:3, 0], [11, 12, 13])
    # AntMaze (authors): a timeout counts as a terminal.
    assert np.array_equal(icq.episode_transitions(obs, actions, rewards, np.zeros(4, bool), True)[5], [0, 0, 0, 1])


def write_d4rl_file(path, episodes, obs_dim=11, act_dim=3, goal=False, reward_value=None):
    """A D4RL-layout HDF5 file: `episodes` is a list of (length, ends_in_terminal)."""
    rng = np.random.default_rng(0)
    n = sum(length for length, _ in episodes)
    terminals, timeouts, i = np.zeros(n, bool), np.zeros(n, bool), 0
    for length, terminal in episodes:
        i += length
        (terminals if terminal else timeouts)[i - 1] = True
    rewards = rng.normal(size=n).astype(np.float32) if reward_value is None else np.full(n, reward_value, np.float32)
    with h5py.File(path, "w") as f:
        f["observations"] = rng.normal(size=(n, obs_dim)).astype(np.float32)
        f["actions"] = rng.uniform(-1, 1, size=(n, act_dim)).astype(np.float32)
        f["rewards"], f["terminals"], f["timeouts"] = rewards, terminals, timeouts
        if goal:
            f["infos/goal"] = rng.normal(size=(n, 2)).astype(np.float32)
    return n


def test_d4rl_loader_respects_episode_boundaries(tmp_path):
    path = tmp_path / "hopper-test.hdf5"
    write_d4rl_file(path, [(4, False), (3, True), (5, False)])
    with h5py.File(path) as f:
        obs, act = f["observations"][:], f["actions"][:]
    (s, a, r, s2, a2, d), returns = icq.load_d4rl_hdf5(str(path), False)
    with h5py.File(path) as f:
        assert np.allclose(
            returns, [f["rewards"][:4].sum(), f["rewards"][4:7].sum(), f["rewards"][7:].sum()]
        )  # every step counts
    # 4-step timeout -> 3 rows, 3-step terminal -> 3 rows, 5-step timeout -> 4 rows
    rows = [0, 1, 2, 4, 5, 6, 7, 8, 9, 10]
    assert (
        np.array_equal(s, obs[rows])
        and np.array_equal(a, act[rows])
        and np.array_equal(d, [0, 0, 0, 0, 0, 1, 0, 0, 0, 0])
    )
    non_terminal = [i for i in range(10) if d[i] == 0]
    assert np.array_equal(a2[non_terminal], act[[rows[i] + 1 for i in non_terminal]])  # a' from the same episode
    assert np.array_equal(s2[non_terminal], obs[[rows[i] + 1 for i in non_terminal]])
    # AntMaze files: the goal is appended to the 29-d observation.
    write_d4rl_file(tmp_path / "antmaze.hdf5", [(6, False)], obs_dim=29, act_dim=8, goal=True)
    (s, *_, d), _ = icq.load_d4rl_hdf5(str(tmp_path / "antmaze.hdf5"), True)
    assert s.shape == (6, 31) and d[-1] == 1


# ---------------------------------------------------------------------------------------------------------------------
# end to end through the command line
def make_minari_hopper(dataset_id="test/hopper/random-v0", episodes=4, length=40):
    import minari
    from minari.data_collector.episode_buffer import EpisodeBuffer

    env = gym.make("Hopper-v5", max_episode_steps=length)
    buffers = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=ep)
        observations, actions, rewards, terms, truncs = [obs], [], [], [], []
        while True:
            action = env.action_space.sample() * 0.3
            obs, reward, terminated, truncated, _ = env.step(action)
            (
                observations.append(obs),
                actions.append(action),
                rewards.append(reward),
                terms.append(terminated),
                truncs.append(truncated),
            )
            if terminated or truncated:
                break
        buffers.append(
            EpisodeBuffer(
                id=ep,
                seed=ep,
                observations=np.array(observations),
                actions=np.array(actions),
                rewards=rewards,
                terminations=terms,
                truncations=truncs,
                infos={},
            )
        )
    minari.create_dataset_from_buffers(
        dataset_id,
        buffers,
        env="Hopper-v5",
        eval_env="Hopper-v5",
        ref_min_score=-20.0,
        ref_max_score=3000.0,
        algorithm_name="random",
        author="test",
        author_email="test@example.com",
        code_permalink="https://example.com",
        description="tiny test data",
    )


def test_minari_end_to_end(tmp_path, monkeypatch):
    help_text = run_script(SCRIPT, "--help", cwd=tmp_path)
    assert (
        "--dataset-id" in help_text.stdout and "Adroit" not in help_text.stderr
    )  # gymnasium-robotics only when needed
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))  # the script inherits it
    make_minari_hopper()
    proc = run_script(
        SCRIPT,
        "--dataset-id",
        "test/hopper/random-v0",
        "--total-steps",
        200,
        "--eval-interval",
        200,
        "--eval-episodes",
        2,
        "--log-interval",
        100,
        "--batch-size",
        64,
        "--run-name",
        "m",
        cwd=tmp_path,
    )
    assert "steps/s" in proc.stdout and "eval step 200" in proc.stdout
    summary = json.loads((tmp_path / "runs/m/summary.json").read_text())
    assert summary["args"]["preset"] == "locomotion" and summary["args"]["batch_size"] == 64
    (evaluation,) = summary["evaluations"]
    assert evaluation["step"] == 200 and summary["final_score"] == pytest.approx(
        100 * (evaluation["return"] + 20) / 3020
    )
    assert summary["reference_scores"] == {
        "min": -20.0,
        "max": 3000.0,
        "source": "Minari metadata of test/hopper/random-v0",
    }
    assert summary["steps_per_second"] > 0 and summary["peak_rss_mb"] > 0 and summary["wall_seconds"] > 0
    import minari

    episodes = list(minari.load_dataset("test/hopper/random-v0").iterate_episodes())
    assert summary["dataset_return"] == pytest.approx(np.mean([ep.rewards.sum() for ep in episodes]))
    # the bound uses the transitions the script keeps: a time-limited episode's last step has no a' and is dropped
    kept_rewards = [ep.rewards if ep.terminations[-1] else ep.rewards[:-1] for ep in episodes]
    assert (
        0
        < summary["q_abs_max"]
        <= summary["q_bound"]
        == pytest.approx(max(abs(r).max() for r in kept_rewards if len(r)) / 0.01, rel=1e-4)
    )
    assert "Adroit" not in proc.stderr
    assert list((tmp_path / "runs/m").glob("events.out.tfevents.*"))


def test_minari_antmaze_dict_observations_and_success_score(tmp_path, monkeypatch):
    """AntMaze: dict observations flatten to 29 + 2 dims, the preset applies, and the score is the success rate x100."""
    import minari
    from minari.data_collector.episode_buffer import EpisodeBuffer

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    gym.register_envs(gymnasium_robotics)  # the script imports it itself only when an env id needs it
    spec = gym.spec("AntMaze_UMaze-v4")
    eval_env = dataclasses.replace(spec, max_episode_steps=30, kwargs={**spec.kwargs, "continuing_task": True})
    rng = np.random.default_rng(0)
    buffers = []
    for ep in range(3):
        obs = {
            "achieved_goal": rng.normal(size=(21, 2)),
            "desired_goal": rng.normal(size=(21, 2)),
            "observation": rng.normal(size=(21, 27)),
        }
        buffers.append(
            EpisodeBuffer(
                id=ep,
                seed=ep,
                observations=obs,
                actions=rng.uniform(-1, 1, (20, 8)).astype(np.float32),
                rewards=[0.0] * 20,
                terminations=[False] * 20,
                truncations=[False] * 19 + [True],
                infos={},
            )
        )
    minari.create_dataset_from_buffers(
        "test/antmaze/tiny-v1",
        buffers,
        env=eval_env,
        eval_env=eval_env,
        ref_min_score=0.0,
        ref_max_score=1.0,
        algorithm_name="random",
        author="test",
        author_email="test@example.com",
        code_permalink="https://example.com",
        description="tiny test data",
    )
    run_script(
        SCRIPT,
        "--dataset-id",
        "test/antmaze/tiny-v1",
        "--total-steps",
        20,
        "--eval-interval",
        20,
        "--batch-size",
        16,
        "--eval-episodes",
        2,
        "--run-name",
        "ant",
        cwd=tmp_path,
    )
    summary = json.loads((tmp_path / "runs/ant/summary.json").read_text())
    assert (
        summary["args"]["preset"] == "antmaze" and summary["args"]["twin_q"] and summary["args"]["timeout_as_terminal"]
    )
    (evaluation,) = summary["evaluations"]
    assert summary["final_score"] == 100 * evaluation["success_rate"] and summary["final_score"] in (0.0, 50.0, 100.0)


def load_params(path):
    checkpoint = torch.load(path, weights_only=False)
    return checkpoint, {
        f"{k}.{n}": v for k in ("actor", "critic", "critic_target") for n, v in checkpoint["modules"][k].items()
    }


def test_d4rl_file_end_to_end_and_resume_equality(tmp_path):
    write_d4rl_file(tmp_path / "hopper-medium-v2.hdf5", [(30, False), (20, True), (30, False)])
    common = [
        "--dataset-path",
        "hopper-medium-v2.hdf5",
        "--env-id",
        "Hopper-v5",
        "--eval-episodes",
        1,
        "--log-interval",
        50,
        "--eval-interval",
        60,
        "--save-model",
        "--twin-q",
        "True",
    ]
    run_script(SCRIPT, *common, "--total-steps", 120, "--run-name", "straight", cwd=tmp_path)
    run_script(SCRIPT, *common, "--total-steps", 60, "--run-name", "half", cwd=tmp_path)
    proc = run_script(SCRIPT, *common, "--total-steps", 120, "--resume", "runs/half/checkpoint.pt", cwd=tmp_path)
    assert "resumed from runs/half/checkpoint.pt at step 60" in proc.stdout
    straight, p_straight = load_params(tmp_path / "runs/straight/checkpoint.pt")
    resumed, p_resumed = load_params(tmp_path / "runs/half/checkpoint.pt")
    assert straight["step"] == resumed["step"] == 120
    assert p_straight.keys() == p_resumed.keys() and all(torch.equal(p_straight[k], p_resumed[k]) for k in p_straight)
    assert straight["evaluations"] == resumed["evaluations"] and len(resumed["evaluations"]) == 2
    summary = json.loads((tmp_path / "runs/half/summary.json").read_text())
    assert summary["final_score"] == pytest.approx(100 * (summary["final_return"] + 20.272305) / (3234.3 + 20.272305))
    assert summary["reference_scores"]["source"] == "D4RL reference returns for hopper-medium-v2 (d4rl/infos.py)"

    # A loss that overflows stops training, names the step and leaves the last checkpoint as it was.
    before = (tmp_path / "runs/half/checkpoint.pt").read_bytes()
    write_d4rl_file(tmp_path / "hopper-medium-v2.hdf5", [(30, False), (20, True), (30, False)], reward_value=1e30)
    proc = run_script(
        SCRIPT, *common, "--total-steps", 200, "--resume", "runs/half/checkpoint.pt", cwd=tmp_path, check=False
    )
    assert_user_error(proc, "non-finite loss", "at step 121", "runs/half/checkpoint.pt is unchanged")
    assert (tmp_path / "runs/half/checkpoint.pt").read_bytes() == before


def test_bad_inputs(tmp_path):
    env = {"MINARI_DATASETS_PATH": str(tmp_path / "empty")}
    assert_user_error(
        run_script(SCRIPT, "--dataset-id", "D4RL/door/expert-v2", cwd=tmp_path, env=env, check=False),
        "D4RL/door/expert-v2",
        "minari download D4RL/door/expert-v2",
        "--dataset-path",
    )
    assert_user_error(
        run_script(SCRIPT, "--dataset-path", "nope.hdf5", "--env-id", "Hopper-v5", cwd=tmp_path, check=False),
        "no such file",
    )
    with h5py.File(tmp_path / "broken.hdf5", "w") as f:
        f["observations"] = np.zeros((5, 11), np.float32)
        f["actions"] = np.zeros((5, 3), np.float32)
    assert_user_error(
        run_script(SCRIPT, "--dataset-path", "broken.hdf5", "--env-id", "Hopper-v5", cwd=tmp_path, check=False),
        "missing keys",
        "rewards",
        "terminals",
        "timeouts",
    )
    write_d4rl_file(tmp_path / "hopper.hdf5", [(10, False)])
    assert_user_error(
        run_script(SCRIPT, "--dataset-path", "hopper.hdf5", "--env-id", "Walker2d-v5", cwd=tmp_path, check=False),
        "observation size 11 vs 17",
        "action size 3 vs 6",
    )
    assert_user_error(run_script(SCRIPT, "--dataset-path", "hopper.hdf5", cwd=tmp_path, check=False), "--env-id")
    assert_user_error(
        run_script(SCRIPT, "--dataset-path", "hopper.hdf5", "--env-id", "Hoper-v5", cwd=tmp_path, check=False),
        "--env-id Hoper-v5",
    )
    assert_user_error(
        run_script(
            SCRIPT, "--dataset-path", "hopper.hdf5", "--env-id", "Hopper-v5", "--alpha", 0, cwd=tmp_path, check=False
        ),
        "must be > 0",
    )
    assert_user_error(
        run_script(SCRIPT, "--env-id", "Pendulum-v1", cwd=tmp_path, check=False),
        "no built-in dataset",
        "LunarLanderContinuous-v3",
    )
    assert_user_error(run_script(SCRIPT, "--ref-min-score", 0, cwd=tmp_path, check=False), "--ref-max-score")


# ---------------------------------------------------------------------------------------------------------------------
# reference scores, built-in data, divergence monitor and a learning regression on a task built here
def test_reference_score_rule():
    """D4RL's references only for a D4RL file named as D4RL names it; explicit references win; otherwise None."""

    def refs(*cli):
        return icq.reference_scores(icq.resolve_args(tyro.cli(icq.Args, args=list(cli))), None)

    d4rl = refs("--dataset-path", "data/hopper-medium-v2.hdf5", "--env-id", "Hopper-v5")
    assert d4rl[:2] == (-20.272305, 3234.3) and "D4RL" in d4rl[2]
    assert refs("--dataset-path", "door-human-v0.hdf5", "--env-id", "AdroitHandDoor-v1")[:2] == (-56.512833, 2880.5693)
    for name in ("hopper-medium-test.hdf5", "my_hopper.hdf5", "hopper-medium-v2-resampled.hdf5", "walker.hdf5"):
        assert refs("--dataset-path", name, "--env-id", "Hopper-v5") is None, name
    assert refs(
        "--dataset-path", "my_hopper.hdf5", "--env-id", "Hopper-v5", "--ref-min-score", "-5", "--ref-max-score", "95"
    ) == (-5.0, 95.0, "--ref-min-score/--ref-max-score")
    assert refs()[:2] == (icq.RANDOM_RETURN, icq.HEURISTIC_RETURN)
    assert (
        icq.normalized_score((-5.0, 95.0, ""), False, 45.0, 0.0) == 50.0
        and icq.normalized_score(None, False, 45.0, 0.0) is None
    )


def test_builtin_dataset(tmp_path):
    """`python icq_continuous.py` runs offline on the built-in mixed LunarLander data and reports each lander's
    return."""
    common = [
        "--dataset-size",
        400,
        "--total-steps",
        20,
        "--eval-interval",
        20,
        "--log-interval",
        10,
        "--eval-episodes",
        1,
        "--batch-size",
        16,
    ]
    proc = run_script(SCRIPT, *common, "--run-name", "b", cwd=tmp_path)
    assert "generating datasets/LunarLanderContinuous-v3-mixed-400.npz" in proc.stdout and "Adroit" not in proc.stderr
    summary = json.loads((tmp_path / "runs/b/summary.json").read_text())
    info = json.loads((tmp_path / "datasets/LunarLanderContinuous-v3-mixed-400.json").read_text())
    landers = summary["dataset_lander_returns"]
    assert landers == info["lander_mean_return"] and summary["dataset_return"] == pytest.approx(info["mean_return"])
    assert list(landers) == list(icq_data.BUILTIN["mixed"]) and max(landers, key=landers.get) == "heuristic"
    assert summary["args"]["preset"] == "lunarlander" and summary["reference_scores"]["min"] == icq.RANDOM_RETURN
    (evaluation,) = summary["evaluations"]
    assert evaluation["score"] == pytest.approx(
        100 * (evaluation["return"] - icq.RANDOM_RETURN) / (icq.HEURISTIC_RETURN - icq.RANDOM_RETURN)
    )
    proc = run_script(SCRIPT, *common, "--run-name", "b2", cwd=tmp_path)  # the cached file is reused
    assert "generating" not in proc.stdout
    assert json.loads((tmp_path / "runs/b2/summary.json").read_text())["dataset_return"] == summary["dataset_return"]


class PointMass(gym.Env):
    """x' = clip(x + 0.2 a, -1, 1), reward x', 10 steps from x ~ 0: pushing right (a = 1) is best (return ~8)."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.x = float(self.np_random.uniform(-0.1, 0.1))
        return np.array([self.x], np.float32), {}

    def step(self, action):
        self.x = float(np.clip(self.x + 0.2 * float(np.clip(action[0], -1, 1)), -1, 1))
        return np.array([self.x], np.float32), self.x, False, False, {}


@pytest.fixture
def point_mass_data(tmp_path, monkeypatch):
    """A D4RL-layout file where a quarter of the episodes push right and the rest push left (BC's mean action is
    ~ -0.5)."""
    if "PointMass1D-v0" not in gym.registry:
        gym.register("PointMass1D-v0", entry_point=PointMass, max_episode_steps=10)
    monkeypatch.chdir(tmp_path)
    rng, env, rows = np.random.default_rng(0), gym.make("PointMass1D-v0"), []
    for ep in range(40):
        obs, _ = env.reset(seed=ep)
        for t in range(10):
            action = np.array([(1.0 if ep % 4 == 0 else -1.0) * (1 - abs(rng.normal(0, 0.2)))], np.float32)
            next_obs, reward, _, truncated, _ = env.step(action)
            rows.append((obs, action, reward, truncated))
            obs = next_obs
    with h5py.File("point-mass.hdf5", "w") as f:
        for key, column in zip(("observations", "actions", "rewards", "timeouts"), zip(*rows)):
            f[key] = np.array(column, np.float32 if key != "timeouts" else bool)
        f["terminals"] = np.zeros(len(rows), bool)
    return [
        "--dataset-path",
        "point-mass.hdf5",
        "--env-id",
        "PointMass1D-v0",
        "--batch-size",
        "64",
        "--eval-episodes",
        "5",
    ]


def train(*cli):
    return icq.main(icq.resolve_args(tyro.cli(icq.Args, args=[str(c) for c in cli])))


# A critic temperature small against this task's Q spread: the unclipped eq.-10 weight then reaches ~n on single rows.
POINT_MASS_ICQ = [
    "--alpha",
    "0.1",
    "--critic-alpha",
    "1",
    "--total-steps",
    "1500",
    "--eval-interval",
    "1500",
    "--log-interval",
    "250",
]


def test_icq_beats_exact_bc_and_q_stays_bounded(point_mass_data):
    """Learning regression: from data where 3 of 4 episodes push the wrong way, ICQ's weighted BC recovers the
    right-pushing policy while exact BC clones the majority; the default (clamped) critic stays inside
    max|r| / (1 - gamma) all run long."""
    icq_run = train(*point_mass_data, *POINT_MASS_ICQ, "--run-name", "icq")
    bc_run = train(*point_mass_data, *POINT_MASS_ICQ, "--alpha", "inf", "--run-name", "bc")
    assert icq_run["final_return"] > 4.0 and bc_run["final_return"] < 0.0, (
        icq_run["final_return"],
        bc_run["final_return"],
    )
    assert icq_run["q_abs_max"] <= icq_run["q_bound"] == pytest.approx(1 / (1 - 0.99))


def test_unclipped_critic_weight_diverges_with_one_warning(point_mass_data, capsys):
    """The literal eq.-10 weight leaves the reward-implied bound; the run warns once, with the step and the flag."""
    summary = train(
        *point_mass_data,
        *POINT_MASS_ICQ,
        "--no-clip-critic-weights",
        "--critic-weight-scale",
        "1",
        "--total-steps",
        "800",
        "--eval-interval",
        "800",
        "--log-interval",
        "100",
        "--run-name",
        "unclipped",
    )
    err = capsys.readouterr().err
    assert summary["q_abs_max"] > summary["q_bound"]
    assert err.count("warning: |Q|") == 1 and "at step" in err and "drop --no-clip-critic-weights" in err


def test_critic_loss_trains_with_the_tested_critic_target(monkeypatch):
    """critic_loss builds its target with critic_target (no inline copy), so the tests above test what trains."""
    calls = []
    original = icq.critic_target

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(icq, "critic_target", spy)
    torch.manual_seed(0)
    batch = (torch.randn(8, 3), torch.rand(8, 2), torch.randn(8), torch.randn(8, 3), torch.rand(8, 2), torch.zeros(8))
    critic = icq.Critic(3, 2, 1)
    loss, q, rho = icq.critic_loss(critic, critic, batch, 0.99, 1.0, 0.5, True)
    assert len(calls) == 1
    target, expected_rho = original(
        batch[2], batch[5], critic(batch[3], batch[4]).min(0).values.detach(), 0.99, 1.0, 0.5
    )
    assert torch.equal(rho, expected_rho) and torch.equal(loss, ((q - target) ** 2).mean(1).sum())


def test_preset_auto_follows_a_lunarlander_env_whatever_the_data(tmp_path):
    """--preset auto picks lunarlander for a LunarLander env id, also for a --dataset-path file; an explicit preset
    wins."""

    def resolve(*cli):
        return icq.resolve_args(tyro.cli(icq.Args, args=list(cli)))

    lunar = ("--dataset-path", "lunar-mixed.hdf5", "--env-id", "LunarLanderContinuous-v3")
    args = resolve(*lunar)
    assert args.preset == "lunarlander" and (args.batch_size, args.alpha, args.actor_signal) == (256, 30.0, "q")
    assert resolve(*lunar, "--preset", "locomotion").preset == "locomotion"
    assert resolve(*lunar, "--alpha", "5").alpha == 5.0  # a given flag still beats the preset
    assert resolve("--dataset-path", "hopper-medium-v2.hdf5", "--env-id", "Hopper-v5").preset == "locomotion"
    assert resolve("--dataset-path", "antmaze-umaze-v2.hdf5", "--env-id", "AntMaze_UMaze-v4").preset == "antmaze"
    assert resolve().preset == "lunarlander"  # built-in data
    # End to end: the summary of a run on such a file records the lunarlander preset.
    write_d4rl_file(tmp_path / "lunar-mixed.hdf5", [(30, False), (20, True)], obs_dim=8, act_dim=2)
    run_script(
        SCRIPT, *lunar, "--total-steps", 10, "--batch-size", 16, "--eval-episodes", 1, "--run-name", "l", cwd=tmp_path
    )
    assert json.loads((tmp_path / "runs/l/summary.json").read_text())["args"]["preset"] == "lunarlander"


# ---------------------------------------------------------------------------------------------------------------------
# issue 22: broken data files and mismatched action spaces end in one line, with no traceback and no run directory
def truncated(fraction):
    def make(path):
        write_d4rl_file(path, [(200, False)] * 5)
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * fraction)])

    return make


def rewrite(**arrays):
    def make(path):
        write_d4rl_file(path, [(20, False), (10, True)])
        with h5py.File(path, "a") as f:
            for key, value in arrays.items():
                del f[key]
                if value is not None:
                    f[key] = value

    return make


def zero_rows(path):
    with h5py.File(path, "w") as f:
        for key, shape in (("observations", (0, 11)), ("actions", (0, 3)), ("rewards", (0,))):
            f[key] = np.zeros(shape, np.float32)
        f["terminals"], f["timeouts"] = np.zeros(0, bool), np.zeros(0, bool)


def nan_reward(path):
    write_d4rl_file(path, [(20, False), (10, True)])
    with h5py.File(path, "a") as f:
        f["rewards"][3] = np.nan


BROKEN_FILES = {
    "truncated at 10 %": (truncated(0.1), "hopper.hdf5"),
    "truncated at 50 %": (truncated(0.5), "hopper.hdf5"),
    "truncated at 90 %": (truncated(0.9), "hopper.hdf5"),
    "empty": (lambda path: path.write_bytes(b""), "not an HDF5 file"),
    "not HDF5": (lambda path: path.write_text("observations,actions\n1,2\n"), "not an HDF5 file"),
    "wrong keys": (rewrite(timeouts=None), "missing keys ['timeouts']"),
    "wrong dtype": (rewrite(rewards=np.array([b"x"] * 30)), "rewards have dtype"),
    "wrong shape": (rewrite(rewards=np.zeros(7, np.float32)), "not D4RL's layout"),
    "NaN reward": (nan_reward, "rewards hold NaN or inf"),
    "zero episodes": (zero_rows, "not D4RL's layout"),
    "only one-step episodes": (rewrite(timeouts=np.ones(30, bool), terminals=np.zeros(30, bool)), "no transitions"),
    "discrete actions": (rewrite(actions=np.zeros(30, np.int64)), "use icq_discrete.py"),
}


@pytest.mark.parametrize("case", list(BROKEN_FILES))
def test_broken_d4rl_file_is_one_line(tmp_path, case):
    make, fragment = BROKEN_FILES[case]
    make(tmp_path / "hopper.hdf5")
    cli = ("--dataset-path", "hopper.hdf5", "--env-id", "Hopper-v5", "--total-steps", 10)
    proc = run_script(SCRIPT, *cli, cwd=tmp_path, check=False, timeout=120)
    assert_user_error(proc, fragment, "hopper.hdf5")
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == proc.stderr.strip().splitlines()[
        -1:
    ]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "cli, fragments",
    [
        (("--env-id", "LunarLander-v3"), ("LunarLander-v3 has discrete actions", "use icq_discrete.py")),
        (("--dataset-id", "hopper-medium-v2"), ("did you mean --dataset-id mujoco/hopper/medium-v0", "Gymnasium v5")),
        (("--dataset-id", "halfcheetah-medium-expert-v2"), ("did you mean --dataset-id mujoco/halfcheetah/medium-v0",)),
        (("--dataset-id", "antmaze-medium-play-v2"), ("did you mean --dataset-id D4RL/antmaze/medium-play-v1",)),
        (("--dataset-id", "pen-human-v1"), ("did you mean --dataset-id D4RL/pen/human-v2",)),
        (("--dataset-id", "door-expert-v2"), ("did you mean --dataset-id D4RL/door/expert-v2",)),
    ],
)
def test_discrete_env_and_d4rl_names_are_one_line(tmp_path, cli, fragments):
    proc = run_script(SCRIPT, *cli, cwd=tmp_path, check=False)
    assert_user_error(proc, *fragments)
    assert not (tmp_path / "runs").exists()


def test_broken_builtin_cache_is_one_line(tmp_path):
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets/LunarLanderContinuous-v3-mixed-400.npz").write_bytes(b"PK\x03\x04 truncated")
    (tmp_path / "datasets/LunarLanderContinuous-v3-mixed-400.json").write_text("{}")
    proc = run_script(SCRIPT, "--dataset-size", 400, cwd=tmp_path, check=False)
    assert_user_error(proc, "LunarLanderContinuous-v3-mixed-400.npz cannot be read", "record it again")
    assert not (tmp_path / "runs").exists()
