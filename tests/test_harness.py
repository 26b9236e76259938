"""The run harness (icq_harness.py): resume, checkpoints, summary over segments, and one-line errors for bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT, assert_user_error, run_script, write_lunar_data

import icq_harness as harness


@dataclass
class Args:
    exp_name: str = "toy"
    seed: int = 1
    cuda: bool = False
    track: bool = False
    wandb_project_name: str = "icq"
    wandb_entity: str = None
    run_name: str = None
    save_model: bool = True
    resume: str = None
    threads: int = 1
    alpha: float = 0.1
    total_steps: int = 6
    eval_interval: int = 2
    eval_episodes: int = 1
    log_interval: int = 2


def toy_run(args, stop_at=None):
    """A training loop written as the scripts write theirs: a linear model fitted on random batches."""
    run = harness.Run(args, "toy.py", "toy")
    torch.manual_seed(args.seed)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    state = {"updates": 0}
    start = run.begin({"model": model, "optimizer": optimizer}, torch.device("cpu"), state=state)
    for step in range(start + 1, args.total_steps + 1):
        x = torch.randn(8, 3)
        loss = ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        state["updates"] += 1
        if step % args.log_interval == 0:
            run.log(step, {"loss": loss.detach()})
        if step % args.eval_interval == 0:
            run.evaluated(step, {"return": -loss.item(), "score": None})
        if step == stop_at:
            run.stop_signal = signal.SIGTERM
        if run.stopped:
            run.interrupt(step)
    return run.finish(step), model


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["toy.py"])
    return tmp_path


def test_resumed_run_is_the_same_run_and_its_summary_covers_every_segment(in_tmp):
    straight, straight_model = toy_run(Args(run_name="straight"))
    with pytest.raises(SystemExit) as exit_info:
        toy_run(Args(run_name="cut"), stop_at=3)
    assert exit_info.value.code == 128 + signal.SIGTERM
    cut = json.load(open("runs/cut/summary.json"))
    assert cut["interrupted"] and not cut["finished"] and cut["step"] == 3
    resumed, resumed_model = toy_run(harness.restore_args(Args, Args(resume="runs/cut/checkpoint.pt"), "toy.py"))
    for a, b in zip(straight_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    assert resumed["evaluations"] == straight["evaluations"]  # the first segment's evaluation is kept
    assert [(s["start_step"], s["end_step"], s["ended_by"]) for s in resumed["segments"]] == [
        (0, 3, "SIGTERM"),
        (3, 6, "finished"),
    ]
    assert resumed["updates"] == 6 and resumed["finished"]
    assert resumed["wall_seconds"] >= resumed["segments"][0]["wall_seconds"]
    assert resumed["last3_mean"] == pytest.approx(np.mean([e["return"] for e in straight["evaluations"]]))
    assert resumed["last3_metric"] == "return"  # "score" is None: the next metric is used


def test_a_run_resumed_from_an_evaluation_checkpoint_records_the_lost_segment_as_killed(in_tmp):
    toy_run(Args(run_name="r"))  # its checkpoint of step 4 is what a hard kill after step 4 would have left
    args = Args(run_name="r", total_steps=4)
    run = harness.Run(args, "toy.py", "toy")
    model = torch.nn.Linear(3, 1)
    run.begin({"model": model}, torch.device("cpu"))
    run.evaluated(4, {"return": 1.0})
    checkpoint = torch.load("runs/r/checkpoint.pt", weights_only=False)
    assert checkpoint["segments"][-1]["ended_by"] == "killed" and checkpoint["step"] == 4


def test_restore_refuses_a_changed_algorithm_flag_and_keeps_schedule_flags(in_tmp, monkeypatch):
    toy_run(Args(run_name="r", total_steps=4))
    monkeypatch.setattr(sys, "argv", ["toy.py", "--alpha", "1", "--resume", "runs/r/checkpoint.pt"])
    with pytest.raises(SystemExit, match=r"error: .*--alpha 1.0 given, the checkpoint was trained with --alpha 0.1"):
        harness.restore_args(Args, Args(alpha=1.0, resume="runs/r/checkpoint.pt"), "toy.py")
    monkeypatch.setattr(sys, "argv", ["toy.py", "--total-steps", "9", "--resume", "runs/r/checkpoint.pt"])
    restored = harness.restore_args(Args, Args(total_steps=9, resume="runs/r/checkpoint.pt"), "toy.py")
    assert (restored.total_steps, restored.alpha, restored.run_name) == (9, 0.1, "r")


@pytest.mark.parametrize("total_steps", [4, 3])
def test_resume_at_or_below_the_checkpoints_step_is_refused(in_tmp, total_steps):
    toy_run(Args(run_name="r", total_steps=4))
    with pytest.raises(SystemExit, match=r"error: .*is at step 4 of --total-steps \d; pass --total-steps N with N > 4"):
        harness.restore_args(Args, Args(total_steps=total_steps, resume="runs/r/checkpoint.pt"), "toy.py")


def broken_checkpoints(tmp_path):
    """name -> a file that --resume must refuse in one line."""
    toy_run(Args(run_name="good", total_steps=2))
    good = open("runs/good/checkpoint.pt", "rb").read()
    files = {}
    for fraction in (0.1, 0.5, 0.99):
        files[f"truncated at {fraction:.0%}"] = good[: int(len(good) * fraction)]
    files["empty"] = b""
    files["random bytes"] = np.random.default_rng(0).bytes(4096)
    paths = {name: tmp_path / f"{name}.pt" for name in files}
    for name, data in files.items():
        paths[name].write_bytes(data)
    with h5py.File(tmp_path / "data.hdf5", "w") as f:
        f["observations"] = np.zeros((3, 2))
    paths["an HDF5 data file"] = tmp_path / "data.hdf5"
    torch.save({"step": 3, "weights": torch.zeros(2)}, tmp_path / "state.pt")
    paths["a torch file without a run"] = tmp_path / "state.pt"
    other = torch.load("runs/good/checkpoint.pt", weights_only=False)
    other["script"] = "icq_discrete.py"
    torch.save(other, tmp_path / "other.pt")
    paths["another script's checkpoint"] = tmp_path / "other.pt"
    paths["a missing file"] = tmp_path / "missing.pt"
    return paths


def test_broken_checkpoints_are_refused_in_one_line(in_tmp):
    for name, path in broken_checkpoints(in_tmp).items():
        with pytest.raises(SystemExit) as exit_info:
            harness.restore_args(Args, Args(resume=str(path), total_steps=10), "toy.py")
        message = str(exit_info.value.code)
        assert message.startswith("error: --resume ") and "\n" not in message, (name, message)
        if name == "another script's checkpoint":
            assert "python icq_discrete.py --resume" in message


def test_a_checkpoint_whose_modules_do_not_fit_is_refused(in_tmp):
    toy_run(Args(run_name="r", total_steps=2))
    run = harness.Run(harness.restore_args(Args, Args(resume="runs/r/checkpoint.pt", total_steps=4), "toy.py"),
                      "toy.py", "toy")  # fmt: skip
    with pytest.raises(SystemExit, match=r"error: --resume .*its model does not fit this run"):
        run.begin({"model": torch.nn.Linear(5, 1)}, torch.device("cpu"))


def test_no_save_model_writes_no_checkpoint_but_an_interrupt_still_does(in_tmp):
    toy_run(Args(run_name="off", save_model=False))
    assert not os.path.exists("runs/off/checkpoint.pt") and os.path.exists("runs/off/summary.json")
    with pytest.raises(SystemExit):
        toy_run(Args(run_name="off2", save_model=False), stop_at=1)
    assert torch.load("runs/off2/checkpoint.pt", weights_only=False)["step"] == 1


def test_progress_line_and_eta_format():
    assert harness.time_left(100.0, 10, 30) == "5m00s"
    assert harness.time_left(3600.0, 1, 2) == "2h00m"
    assert harness.rounded(None) == "n/a" and harness.rounded(1234.5) == "1234" and harness.rounded(0.12345) == "0.123"
    assert harness.last3_mean([], ("return",)) == (None, None)


# --- a real script killed hard (SIGKILL) after its first checkpoint ------------------------------------------------


def test_a_default_run_killed_hard_resumes_to_the_same_parameters(tmp_path):
    """No --save-model given: checkpoints are on by default, so SIGKILL loses at most one evaluation interval."""
    write_lunar_data(tmp_path / "lunar.hdf5", discrete=True, episodes=20, length=50)
    common = "--dataset-path lunar.hdf5 --env-id LunarLander-v3 --total-steps 3000 --eval-interval 500".split()
    common += "--eval-episodes 1 --log-interval 500 --batch-size 64".split()
    env = {"OMP_NUM_THREADS": "1"}
    run_script("icq_discrete.py", *common, "--run-name", "straight", cwd=tmp_path, env=env)
    proc = subprocess.Popen([sys.executable, str(ROOT / "icq_discrete.py"), *common, "--run-name", "killed"],
                            cwd=tmp_path, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    checkpoint = tmp_path / "runs/killed/checkpoint.pt"
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    step = torch.load(checkpoint, weights_only=False)["step"]
    assert 500 <= step < 3000, "the run ended before it could be killed; make it longer"
    run_script("icq_discrete.py", "--resume", "runs/killed/checkpoint.pt", cwd=tmp_path, env=env)
    straight = torch.load(tmp_path / "runs/straight/checkpoint.pt", weights_only=False)
    resumed = torch.load(checkpoint, weights_only=False)
    for key, module in straight["modules"].items():
        if not key.endswith("optimizer"):
            for name, value in module.items():
                assert torch.equal(value, resumed["modules"][key][name]), (key, name)
    summary = json.load(open(tmp_path / "runs/killed/summary.json"))
    assert [s["ended_by"] for s in summary["segments"]] == ["killed", "finished"]
    assert summary["segments"][0]["end_step"] == step and summary["step"] == 3000
    assert [e["step"] for e in summary["evaluations"]] == list(range(500, 3001, 500))


@pytest.mark.parametrize("script", ["icq_continuous.py", "icq_discrete.py", "icq_ma_smac.py"])
def test_each_script_refuses_broken_checkpoints_in_one_line(tmp_path, monkeypatch, script):
    """The table of broken checkpoints through each script's command line: one error line, no traceback, no run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["toy.py"])
    paths = broken_checkpoints(tmp_path)
    other = torch.load(paths["another script's checkpoint"], weights_only=False)
    other["script"] = "icq_discrete.py" if script != "icq_discrete.py" else "icq_continuous.py"
    torch.save(other, paths["another script's checkpoint"])
    (tmp_path / "runs").rename(tmp_path / "toy_runs")  # the toy run's directory is not the scripts' business
    for name, path in paths.items():
        proc = run_script(script, "--resume", path, "--total-steps", 10, cwd=tmp_path, check=False)
        assert_user_error(proc, f"error: --resume {path}")
        assert len(proc.stderr.strip().splitlines()) == 1, (name, proc.stderr)
        if name == "another script's checkpoint":
            assert f"is a checkpoint of {other['script']}" in proc.stderr
    assert not (tmp_path / "runs").exists()
