"""OG-MARL vaults (Flashbax) in icq_ma_smac.py and icq_data.py: every vault is written with flashbax in the test."""

import os

import h5py
import numpy as np
import pytest
import torch
from conftest import assert_user_error, run_script

import icq_data
from icq_ma_smac import load_pymarl_hdf5, transition_mask

N, OBS, A, S = 3, 5, 9, 7  # agents, obs size, actions, state size
INFO = {"n_agents": N, "n_actions": A, "obs_shape": OBS, "state_shape": S}
CPU = torch.device("cpu")


def pymarl_file(path, lengths, terminal, rows=8, seed=0):
    """A PyMARL file as generate_smax_dataset writes it: rows 0..L filled (row L the final obs), terminated at L-1
    where the episode ended in a terminal, none where it was cut."""
    rng = np.random.default_rng(seed)
    lengths, terminal = np.array(lengths), np.array(terminal)
    filled, acted = np.arange(rows)[None] <= lengths[:, None], np.arange(rows)[None] < lengths[:, None]
    avail = (rng.random((len(lengths), rows, N, A)) < 0.7) | (np.arange(A) == 4)
    data = {"obs": (rng.normal(size=(len(lengths), rows, N, OBS)) * filled[..., None, None]).astype(np.float16),
            "state": (rng.normal(size=(len(lengths), rows, S)) * filled[..., None]).astype(np.float16),
            "actions": (rng.integers(0, A, (len(lengths), rows, N)) * acted[..., None])[..., None].astype(np.int64),
            "avail_actions": (avail & filled[..., None, None]).astype(np.uint8),
            "reward": (rng.random((len(lengths), rows)) * acted)[..., None].astype(np.float32),
            "terminated": ((np.arange(rows)[None] == lengths[:, None] - 1) & terminal[:, None])[..., None].astype(
                np.uint8), "filled": filled[..., None].astype(np.uint8)}  # fmt: skip
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            f.create_dataset(k, data=v)
        f.attrs.update(map_name="3m", backend="smax")
    return data


def og_marl_vault(path, experience, write=True):
    """A vault as OG-MARL's recorder writes one: a flashbax trajectory buffer, Vault(experience_structure=...)."""
    import flashbax as fbx
    import jax
    from flashbax.vault import Vault

    buffer = fbx.make_trajectory_buffer(add_batch_size=1, sample_batch_size=1, sample_sequence_length=1, period=1,
                                        min_length_time_axis=1, max_length_time_axis=100)  # fmt: skip
    state = jax.jit(buffer.init)(jax.tree.map(lambda x: x[0, 0], experience))
    where, uid = os.path.split(path)
    vault = Vault(os.path.basename(where), state.experience, rel_dir=os.path.dirname(where), vault_uid=uid)
    if write:
        vault.write(jax.jit(buffer.add)(state, experience))


def og_marl_steps(terminals, truncations, seed=0, agents=N):
    """OG-MARL experience [1, T, ...]: per-step episode ends copied to every agent, the team reward per agent."""
    rng, T = np.random.default_rng(seed), len(terminals)
    flags = [np.repeat(np.array(f, bool)[None, :, None], agents, 2) for f in (terminals, truncations)]
    return {"observations": rng.normal(size=(1, T, agents, OBS)).astype(np.float32),
            "actions": rng.integers(0, A, (1, T, agents)).astype(np.int32),
            "rewards": np.repeat(rng.random((1, T, 1)), agents, 2).astype(np.float32),
            "terminals": flags[0], "truncations": flags[1],
            "infos": {"legals": np.ones((1, T, agents, A), np.float32),
                      "state": rng.normal(size=(1, T, S)).astype(np.float32)}}  # fmt: skip


def test_pymarl_file_to_vault_to_loader_gives_the_same_episode_tensors(tmp_path, capsys):
    pymarl_file(tmp_path / "smax_3m.h5", lengths=[5, 7, 2, 4], terminal=[True, False, True, False])
    icq_data.vault_export(str(tmp_path / "smax_3m.h5"), str(tmp_path / "3m.vlt/Good"))
    assert "4 episodes, 18 steps written to the vault" in capsys.readouterr().out
    h5 = load_pymarl_hdf5(str(tmp_path / "smax_3m.h5"), INFO, "3m", "smax", CPU, 10.0)
    vault = load_pymarl_hdf5(str(tmp_path / "3m.vlt/Good"), INFO, "3m", "smax", CPU, 10.0)
    assert vault["mask"].sum(1).tolist() == h5["mask"].sum(1).tolist() == [5, 6, 2, 3]  # cut ones lose their last
    assert torch.equal(vault["rows"], h5["rows"])
    e, t = vault["mask"].nonzero(as_tuple=True)
    for k in ("obs", "state", "actions", "avail", "reward", "terminated"):  # every transition
        assert torch.equal(vault[k][e, t], h5[k][e, t]), k
    going_on = h5["terminated"][e, t] == 0  # and the row it bootstraps from
    for k in ("obs", "state", "actions", "avail"):
        assert torch.equal(vault[k][e[going_on], t[going_on] + 1], h5[k][e[going_on], t[going_on] + 1]), k
    with pytest.raises(SystemExit, match="^error: vault .* exists"):
        icq_data.vault_export(str(tmp_path / "smax_3m.h5"), str(tmp_path / "3m.vlt/Good"))


def test_a_truncated_episode_drops_only_its_last_transition(tmp_path):
    # a terminal episode of 3 steps, a truncated one of 4, then 2 steps of an episode the vault ends in
    og_marl_vault(str(tmp_path / "x.vlt/Poor"), og_marl_steps([0, 0, 1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 1, 0, 0]))
    arrays, _ = icq_data.read_vault(str(tmp_path / "x.vlt/Poor"))
    filled, terminated = (torch.as_tensor(arrays[k][..., 0]) for k in ("filled", "terminated"))
    assert transition_mask(filled, terminated).sum(1).tolist() == [3, 3, 1]
    filled[1, 4] = 0  # without the stand-in row of the final obs, the truncated episode would lose two
    assert transition_mask(filled, terminated).sum(1).tolist() == [3, 2, 1]
    data = load_pymarl_hdf5(str(tmp_path / "x.vlt/Poor"), INFO, "3m", "smax", CPU)
    assert data["terminated"].sum(1).tolist() == [1, 0, 0]


def broken(tmp_path, name, experience, write=True):
    path = str(tmp_path / f"{name}.vlt/Good")
    og_marl_vault(path, experience, write)
    with pytest.raises(SystemExit) as exc:
        load_pymarl_hdf5(path, INFO, "3m", "smax", CPU)
    message = str(exc.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def test_broken_vaults_give_one_line(tmp_path):
    good = og_marl_steps([0, 1, 0, 1], [0, 0, 0, 0])
    assert "lacks ['truncations']" in broken(tmp_path, "a", {k: v for k, v in good.items() if k != "truncations"})
    message = broken(tmp_path, "b", og_marl_steps([0, 1, 0, 1], [0, 0, 0, 0], agents=5))
    assert "n_agents 5 (dataset) vs 3 (env)" in message
    assert "is empty (0 timesteps)" in broken(tmp_path, "c", good, write=False)
    assert "per step actions [2] do not fit" in broken(tmp_path, "d", good | {"actions": good["actions"][:, :, :2]})
    with pytest.raises(SystemExit, match=r"^error: --dataset-path .*a\.vlt is a vault with the uids \['Good'\]"):
        load_pymarl_hdf5(str(tmp_path / "a.vlt"), INFO, "3m", "smax", CPU)
    with pytest.raises(SystemExit, match="is not a vault uid"):
        load_pymarl_hdf5(str(tmp_path), INFO, "3m", "smax", CPU)


def test_a_vault_of_the_projects_own_3m_data_trains_end_to_end(tmp_path):
    """The SMAX recorder's 3m data, exported as a vault, trains; its load line reports the vault's episodes."""
    env = {"OMP_NUM_THREADS": "1", "SC2PATH": "/nonexistent"}
    run_script("icq_data.py", "smax", "--map", "3m", "--quality", "good", "--dataset-size", 12, "--dataset-path",
               "smax_3m.h5", cwd=tmp_path, env=env)  # fmt: skip
    out = run_script("icq_data.py", "vault-export", "--source", "smax_3m.h5", "--path", "vaults/3m.vlt/Good",
                     cwd=tmp_path, env=env).stdout  # fmt: skip
    assert "smax_3m.h5: 12 episodes" in out
    args = ("--map", "3m", "--env-backend", "smax", "--total-steps", 2, "--batch-size", 4, "--eval-interval", 2,
            "--eval-episodes", 2, "--log-interval", 1)  # fmt: skip
    run = run_script("icq_ma_smac.py", "--dataset-path", "vaults/3m.vlt/Good", *args, cwd=tmp_path, env=env)
    assert "12 episodes, " in run.stdout and " transitions from vaults/3m.vlt/Good; backend smax" in run.stdout
    assert "done: last-3 eval mean" in run.stdout
    proc = run_script("icq_ma_smac.py", "--dataset-path", "vaults/3m.vlt/Good", *args[2:], "--map", "2s3z",
                      cwd=tmp_path, env=env, check=False)  # fmt: skip
    assert_user_error(proc, "does not match the smax env of map 2s3z", "n_agents 3 (dataset) vs 5 (env)")
