"""icq_continuous.py and icq_discrete.py as long runs: progress lines, interrupts, resume, bad input, --help."""

import dataclasses
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import tyro
from conftest import ROOT, assert_user_error, run_script, write_lunar_data

import icq_continuous
import icq_discrete

SCRIPTS = {"icq_continuous.py": icq_continuous, "icq_discrete.py": icq_discrete}
ENV = {"OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def data_args(tmp_path, script):
    discrete = script == "icq_discrete.py"
    write_lunar_data(tmp_path / "lunar.hdf5", discrete)
    return ["--dataset-path", "lunar.hdf5", "--env-id", "LunarLander-v3" if discrete else "LunarLanderContinuous-v3"]


def start(script, *args, cwd):
    return subprocess.Popen(
        [sys.executable, str(ROOT / script), *map(str, args)],
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def interrupt_after_first_step_line(proc, signum):
    """Send `signum` once the first training progress line is out; returns (stdout, stderr)."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step "):
            proc.send_signal(signum)
            break
    out, err = proc.communicate(timeout=600)
    return "".join(lines) + out, err


def state_tensors(path):
    """Every tensor of the networks and optimizers in a checkpoint, by name."""
    checkpoint = torch.load(path, weights_only=False)
    tensors = {}

    def walk(prefix, x):
        if isinstance(x, torch.Tensor):
            tensors[prefix] = x
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(f"{prefix}[{i}]", v)

    for key, module in checkpoint["modules"].items():
        walk(key, module)
    return checkpoint, tensors


@pytest.mark.parametrize("script", SCRIPTS)
def test_sigint_saves_the_run_and_a_plain_resume_finishes_it_exactly(tmp_path, script):
    common = [*data_args(tmp_path, script), "--batch-size", 16, "--eval-episodes", 1, "--alpha", 1, "--save-model"]
    common += ["--eval-interval", 300, "--log-interval", 5, "--total-steps", 600]
    straight = run_script(script, *common, "--run-name", "straight", cwd=tmp_path, env=ENV)
    lines = straight.stdout.splitlines()
    assert "run directory: runs/straight/" in lines
    assert all(" | ETA " in line for line in lines if line.startswith(("step ", "eval step ")))
    summary = json.loads((tmp_path / "runs/straight/summary.json").read_text())
    assert summary["interrupted"] is False and len(summary["evaluations"]) == 2
    metric = key = "score" if summary["evaluations"][0]["score"] is not None else "return"
    assert summary["last3_metric"] == metric
    assert summary["last3_mean"] == pytest.approx(np.mean([e[key] for e in summary["evaluations"]]))
    assert (
        lines[-1].startswith("done: last-3 eval mean ")
        and f"({metric}), summary in runs/straight/summary.json" in lines[-1]
    )

    proc = start(script, *common, "--run-name", "cut", cwd=tmp_path)
    out, err = interrupt_after_first_step_line(proc, signal.SIGINT)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and "run directory: runs/cut/\n" in out
    cut = json.loads((tmp_path / "runs/cut/summary.json").read_text())
    step = cut["step"]
    assert cut["interrupted"] is True and 5 <= step < 600
    assert err.strip().splitlines()[-1] == (
        f"interrupted at step {step} (SIGINT): checkpoint runs/cut/checkpoint.pt; "
        f"continue with: python {script} --resume runs/cut/checkpoint.pt"
    )
    assert torch.load(tmp_path / "runs/cut/checkpoint.pt", weights_only=False)["step"] == step

    # Resumed without flags: the same run, with the same settings, ends with the same parameters.
    resumed = run_script(script, "--resume", "runs/cut/checkpoint.pt", cwd=tmp_path, env=ENV)
    assert "run directory: runs/cut/\n" in resumed.stdout
    assert f"resumed from runs/cut/checkpoint.pt at step {step}" in resumed.stdout
    a, pa = state_tensors(tmp_path / "runs/straight/checkpoint.pt")
    b, pb = state_tensors(tmp_path / "runs/cut/checkpoint.pt")
    assert a["step"] == b["step"] == 600 and pa.keys() == pb.keys() and len(pa) > 10
    assert all(torch.equal(pa[k], pb[k]) for k in pa), [k for k in pa if not torch.equal(pa[k], pb[k])]
    final = json.loads((tmp_path / "runs/cut/summary.json").read_text())
    assert final["interrupted"] is False and final["evaluations"] == summary["evaluations"]
    assert [(s["start_step"], s["end_step"], s["ended_by"]) for s in final["segments"]] == [
        (0, step, "SIGINT"),
        (step, 600, "finished"),
    ]
    assert final["last3_mean"] == summary["last3_mean"] and final["q_abs_max"] == summary["q_abs_max"]
    kept = {k: final["args"][k] for k in ("alpha", "save_model", "eval_interval", "log_interval", "batch_size")}
    assert kept == {"alpha": 1.0, "save_model": True, "eval_interval": 300, "log_interval": 5, "batch_size": 16}


@pytest.mark.parametrize("script", SCRIPTS)
def test_sigterm_without_save_model_still_writes_checkpoint_and_summary(tmp_path, script):
    common = [*data_args(tmp_path, script), "--batch-size", 16, "--eval-episodes", 1, "--log-interval", 5]
    common.append("--no-save-model")
    proc = start(script, *common, "--total-steps", 100_000, "--run-name", "term", cwd=tmp_path)
    out, err = interrupt_after_first_step_line(proc, signal.SIGTERM)
    assert proc.returncode == 143 and "(SIGTERM)" in err and "Traceback" not in err, (out, err)
    summary = json.loads((tmp_path / "runs/term/summary.json").read_text())
    assert summary["interrupted"] is True and summary["args"]["save_model"] is False
    checkpoint = torch.load(tmp_path / "runs/term/checkpoint.pt", weights_only=False)
    assert checkpoint["step"] == summary["step"] >= 5


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_keeps_the_settings_and_refuses_a_changed_algorithm_flag(tmp_path, script, monkeypatch):
    module = SCRIPTS[script]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [script])
    saved = module.resolve_args(
        module.Args(alpha=1.0, critic_alpha=50.0, gamma=0.98, eval_interval=7, log_interval=3, run_name="r")
    )
    (tmp_path / "runs/r").mkdir(parents=True)
    torch.save({"script": script, "args": vars(saved), "step": 0, "modules": {}}, tmp_path / "runs/r/checkpoint.pt")

    def resolve(*cli):
        monkeypatch.setattr(sys, "argv", [script, *cli])
        return module.resolve_args(tyro.cli(module.Args, args=list(cli)))

    args = resolve("--resume", "runs/r/checkpoint.pt")
    assert (args.alpha, args.critic_alpha, args.save_model, args.eval_interval, args.log_interval) == (
        1.0,
        50.0,
        True,
        7,
        3,
    )
    assert args.run_name == "r" and args.resume == "runs/r/checkpoint.pt"
    args = resolve("--resume", "runs/r/checkpoint.pt", "--eval-interval", "100", "--total-steps", "9", "--alpha", "1")
    assert (args.eval_interval, args.total_steps, args.alpha, args.log_interval) == (100, 9, 1.0, 3)
    with pytest.raises(SystemExit) as exc:
        resolve("--resume", "runs/r/checkpoint.pt", "--alpha", "2")
    assert "--alpha 2.0 given, the checkpoint was trained with --alpha 1.0" in str(exc.value)
    assert "only --total-steps, --eval-interval, --log-interval, --eval-episodes, --threads, --track" in str(exc.value)
    if script == "icq_continuous.py":  # the checkpoint holds the preset that auto resolved to
        assert resolve("--resume", "runs/r/checkpoint.pt", "--preset", "auto").preset == "lunarlander"
        with pytest.raises(
            SystemExit, match="--preset locomotion given, the checkpoint was trained with --preset lunar"
        ):
            resolve("--resume", "runs/r/checkpoint.pt", "--preset", "locomotion")
    with pytest.raises(SystemExit, match="--gamma 0.99 given, the checkpoint was trained with --gamma 0.98"):
        resolve("--resume", "runs/r/checkpoint.pt", "--gamma", "0.99")  # the default value, but given
    assert resolve("--resume", "runs/r/checkpoint.pt", "--no-save-model").save_model is False  # a schedule flag


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_input_one_line_naming_the_file_or_flag(tmp_path, script):
    (tmp_path / "notes.h5").write_text("this is a text file, not HDF5\n")
    env_id = "LunarLander-v3" if script == "icq_discrete.py" else "LunarLanderContinuous-v3"
    proc = run_script(
        script, "--dataset-path", "notes.h5", "--env-id", env_id, "--alpha", "inf", cwd=tmp_path, env=ENV, check=False
    )
    assert_user_error(proc, "--dataset-path notes.h5 is not an HDF5 file")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "runs").exists()  # bad data leaves no run directory behind
    # The default run name says BC or ICQ (with its alpha).
    tiny = [*data_args(tmp_path, script), "--total-steps", 1, "--eval-episodes", 1, "--batch-size", 4]
    for alpha, method in (("inf", "bc"), (3, "alpha3")):
        proc = run_script(script, *tiny, "--alpha", alpha, cwd=tmp_path, env=ENV)
        assert f"run directory: runs/lunar__{script[:-3]}__{method}__1__" in proc.stdout
    for flag, value in (("--total-steps", 0), ("--eval-interval", -2)):
        proc = run_script(script, flag, value, cwd=tmp_path, env=ENV, check=False)
        assert_user_error(proc, f"{flag} must be >= 1 (got {value})")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_opens_with_the_description_and_shows_one_default_per_flag(script):
    help_text = run_script(script, "--help", cwd=ROOT, env=ENV).stdout
    description = SCRIPTS[script].__doc__.split("\n\n")[0]
    assert description in help_text and help_text.index(description) < help_text.index("--seed")
    assert help_text.count("(default:") == len(dataclasses.fields(SCRIPTS[script].Args))
    assert "(preset:" not in help_text and "README" not in help_text
