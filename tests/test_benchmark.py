"""benchmark.sh and benchmarks/: the run lists, the aggregation's numbers, and a real one-node SLURM cluster (array
tasks, aggregation, preemption and requeue)."""

import ast
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT

SCRIPTS = {"continuous": "icq_continuous.py", "discrete": "icq_discrete.py", "ma": "icq_ma_smac.py"}


def bench(*args, cwd=ROOT, timeout=120):
    proc = subprocess.run(["bash", "benchmark.sh", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"benchmark.sh {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout.splitlines()


def script_flags(script):
    """The --flags of a script's tyro Args, read from its source (importing every script per line would be slow)."""
    tree = ast.parse((ROOT / script).read_text())
    args = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Args")
    names = [n.target.id.replace("_", "-") for n in args.body if isinstance(n, ast.AnnAssign)]
    # tyro spells a bool field both --x and --no-x
    return {f"--{n}" for n in names} | {f"--no-{n}" for n in names}


def check_line(line):
    """A list line is `python -u <script> --flag value ...`; every flag must be one of the script's options."""
    words = shlex.split(line)
    assert words[:2] == ["python", "-u"], line
    script = words[2]
    assert script in SCRIPTS.values(), line
    flags = {w for w in words[3:] if w.startswith("--")}
    unknown = flags - script_flags(script)
    assert not unknown, f"{line}: unknown flags {unknown}"
    return script, dict(zip(words[3::2], words[4::2]))


def test_paper_dry_run_lists_the_seed_papers_grid():
    lines = bench("paper", "--dry-run")
    parsed = [check_line(line) for line in lines]
    seeds = {args["--seed"] for _, args in parsed}
    assert seeds == {"1", "2", "3", "4", "5"}
    continuous = [args for script, args in parsed if script == "icq_continuous.py"]
    ma = [args for script, args in parsed if script == "icq_ma_smac.py"]
    # 9 locomotion + 6 AntMaze + 8 Adroit datasets, 8 SMAC maps; 5 seeds each
    assert len(continuous) == 5 * 23 and len(ma) == 5 * 8 and len(lines) == 5 * 31
    assert len({a["--run-name"] for _, a in parsed}) == len(lines), "run names must be unique"
    locomotion = [a for a in continuous if "--dataset-path" in a]
    assert len(locomotion) == 45 and all(a["--dataset-path"].startswith("datasets/d4rl/") for a in locomotion)
    antmaze = {a["--dataset-id"] for a in continuous if "antmaze" in a.get("--dataset-id", "")}
    assert len(antmaze) == 6
    assert all(a["--env-backend"] == "smac" and a["--dataset-path"] == f"datasets/smac/{a['--map']}.h5" for a in ma)
    assert (
        "python -u icq_continuous.py --dataset-path datasets/d4rl/hopper-medium-replay-v2.hdf5 --env-id Hopper-v5 "
        "--seed 3 --run-name paper__continuous__hopper-medium-replay-v2__icq__3"
    ) in lines
    assert (
        "python -u icq_continuous.py --dataset-id D4RL/antmaze/large-diverse-v1 --seed 5 "
        "--run-name paper__continuous__antmaze-large-diverse-v1__icq__5"
    ) in lines
    assert (
        "python -u icq_ma_smac.py --env-backend smac --map 6h_vs_8z --dataset-path datasets/smac/6h_vs_8z.h5 --seed 1 "
        "--run-name paper__ma__6h_vs_8z__icq__1"
    ) in lines


def test_learn_and_sweep_lists_follow_the_naming_convention():
    lines = bench("learn", "--dry-run")
    assert all(check_line(line) for line in lines)
    runs = [line for line in lines if "--run-name learn__" in line]
    assert len(runs) == (2 + 2 + 4) * 2 * 3  # datasets x {icq, bc} x 3 seeds
    assert len(lines) - len(runs) == 8, "one preparation run per dataset"
    extra = bench("learn", "--dry-run", "--some-flag", "a b")
    assert all(shlex.split(line)[-4:-1] == ["--some-flag", "a b", "--run-name"] for line in extra), (
        "extra args reach every run"
    )
    names = [line.split("--run-name ")[1].split("__") for line in runs]
    assert all(len(n) == 5 and n[3] in ("icq", "bc") for n in names)
    assert all(("--alpha inf" in line) == ("__bc__" in line) for line in runs)
    sweep = [line for line in bench("learn", "--sweep", "--dry-run") if "--run-name sweep__" in line]
    assert all(check_line(line) for line in sweep)
    assert {line.split("__")[2] for line in sweep} == {
        "LunarLanderContinuous-v3-mixed",
        "LunarLanderContinuous-v3-mixed-td",
        "LunarLander-v3-mixed",
        "3m-mixed",
    }
    assert all(line.split("--alpha ")[1].split()[0] == line.split("__alpha")[1].split("__")[0] for line in sweep)
    headline = [line for line in bench("learn", "--headline", "--dry-run") if "--run-name headline__" in line]
    assert all(check_line(line) and "--map 3s_vs_5z" in line for line in headline)
    assert all(("--critic-updates batched" in line) == ("__bc__" in line) for line in headline), (
        "BC's actor ignores the critic"
    )
    assert sorted({line.split("__")[2] for line in headline}) == ["3s_vs_5z-medium", "3s_vs_5z-mixed"]
    assert len(headline) == 2 * 2 * 3 and sum("--alpha inf" in line for line in headline) == 6


def write_run(cwd, name, values, metric="score", dataset_return=5.0):
    os.makedirs(cwd / "runs" / name, exist_ok=True)
    evaluations = [{"step": 10 * (i + 1), metric: v, "return": v} for i, v in enumerate(values)]
    (cwd / "runs" / name / "summary.json").write_text(
        json.dumps({"run_name": name, "evaluations": evaluations, "dataset_return": dataset_return})
    )


def test_aggregate_learn_means_of_last_three_evaluations(tmp_path):
    curves = {
        ("icq", "1"): [0, 1, 2, 3],
        ("icq", "2"): [0, 3, 4, 5],
        ("bc", "1"): [9, 1, 1, 1],
        ("bc", "2"): [0, 0, 0, 0],
    }
    names = [f"learn__discrete__toy__{m}__{s}" for m, s in curves]
    for (m, s), name in zip(curves, names):
        write_run(tmp_path, name, curves[m, s])
    (tmp_path / "list.txt").write_text(
        "".join(f"python -u icq_discrete.py --run-name {n}\n" for n in names + ["learn__discrete__toy__bc__3"])
    )
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/aggregate.py"), "learn", "list.txt", "--out-dir", "out"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    table = (tmp_path / "out/learn.md").read_text()
    icq = [2.0, 4.0]  # last-3 means per seed
    assert f"| discrete | toy | icq | score | {np.mean(icq):.3g} ± {np.std(icq, ddof=1):.2g} | 2 | 5 |" in table
    assert f"| discrete | toy | bc | score | 0.5 ± {np.std([1, 0], ddof=1):.2g} | 2 | 5 |" in table
    spread = np.hypot(np.std(icq, ddof=1), np.std([1, 0], ddof=1))
    assert f"| discrete | toy | +{3 - 0.5:.3g} | {spread:.2g} | ICQ better |" in table
    assert "learn__discrete__toy__bc__3" in table.split("Missing")[1]
    assert (tmp_path / "out/learn_toy.png").stat().st_size > 0


def test_aggregate_sweep_orders_alphas_with_bc_last(tmp_path):
    names = [f"sweep__ma__3m-mixed__alpha{a}__1" for a in ("inf", "10", "0.1")]
    for i, name in enumerate(names):
        write_run(tmp_path, name, [i, i, i], metric="win_rate")
    (tmp_path / "list.txt").write_text("".join(f"python -u x --run-name {n}\n" for n in names))
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/aggregate.py"), "sweep", "list.txt", "--out-dir", "out"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    rows = [
        line
        for line in (tmp_path / "out/sweep.md").read_text().splitlines()
        if line.startswith("| 0.1") or line.startswith("| 10") or line.startswith("| inf")
    ]
    assert rows == ["| 0.1 | 2 ± 0 | 1 |", "| 10 | 1 ± 0 | 1 |", "| inf | 0 ± 0 | 1 |"]


def test_aggregate_curves_plots_labelled_groups_and_names_missing_runs(tmp_path):
    for name, values in (("a1", [0, 1]), ("a2", [1, 1]), ("b1", [0, 0])):
        write_run(tmp_path, name, values, metric="win_rate")
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks/aggregate.py"),
        "curves",
        "out.png",
        "title",
        "ICQ-MA alpha 1=a1,a2",
        "BC=b1",
    ]
    subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True)
    assert (tmp_path / "out.png").stat().st_size > 0
    proc = subprocess.run(cmd[:-1] + ["BC=b1,b9"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode != 0 and "b9" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------------------------------
# SLURM, for real: a one-node cluster on this machine (Debian's slurm-wlm and munge; .ci/run installs them).
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def slurm_cluster(tmp_path):
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch", "sinfo") if shutil.which(b) is None]
    if missing:
        pytest.skip(
            f"SLURM test needs Debian's slurm-wlm and munge (apt-get install -y slurm-wlm munge); missing {missing}"
        )
    if os.geteuid() != 0:
        pytest.skip("the one-node SLURM cluster runs its daemons as root (SlurmUser=root)")
    d = tmp_path / "slurm"
    for sub in ("state", "spool", "munge"):
        (d / sub).mkdir(parents=True)
    os.chmod(d / "munge", 0o700)
    key = d / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    socket_path = d / "munge" / "munge.socket"
    host = socket.gethostname().split(".")[0]
    conf = d / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=icqbench",
                f"SlurmctldHost={host}(127.0.0.1)",
                "SlurmUser=root",
                "SlurmdUser=root",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                f"AuthInfo=socket={socket_path},cred_expire=10",
                f"SlurmctldPort={free_port()}",
                f"SlurmdPort={free_port()}",
                f"StateSaveLocation={d}/state",
                f"SlurmdSpoolDir={d}/spool",
                f"SlurmctldPidFile={d}/slurmctld.pid",
                f"SlurmdPidFile={d}/slurmd.pid",
                f"SlurmctldLogFile={d}/slurmctld.log",
                f"SlurmdLogFile={d}/slurmd.log",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_CPU",
                "SchedulerType=sched/backfill",
                "MpiDefault=none",
                "ReturnToService=2",
                "SlurmdTimeout=30",
                "MinJobAge=300",
                f"NodeName={host} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN",
                f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for var in [v for v in env if v.startswith(("SBATCH_", "SLURM_")) and v != "SLURM_CONF"]:
        del env[var]  # a test run inside a SLURM job must not leak that job's settings
    procs = []
    try:
        procs.append(
            subprocess.Popen(
                [
                    "munged",
                    "--foreground",
                    "--force",
                    f"--key-file={key}",
                    f"--socket={socket_path}",
                    f"--pid-file={d}/munge/munged.pid",
                    f"--log-file={d}/munge/munged.log",
                    f"--seed-file={d}/munge/munged.seed",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
            )
        )
        wait_for(socket_path.exists, 20, "munged's socket")
        procs.append(
            subprocess.Popen(
                ["slurmctld", "-D", "-i", "-f", str(conf)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
            )
        )
        procs.append(
            subprocess.Popen(
                ["slurmd", "-D", "-f", str(conf), "-N", host],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
            )
        )

        def node_idle():
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout
            return "idle" in out

        try:
            wait_for(node_idle, 60, "the SLURM node to become idle")
        except AssertionError:
            logs = "\n".join(
                f"--- {p.name}\n{p.read_text()[-2000:]}" for p in (d / "slurmctld.log", d / "slurmd.log") if p.exists()
            )
            raise AssertionError(f"SLURM did not start\n{logs}")
        yield env
    finally:
        for proc in reversed(procs):  # only the daemons this test started, by pid
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def repo_copy(tmp_path):
    """A copy of the scripts with their harness and data module, benchmark.sh and benchmarks/*.py: the runs and tables
    stay out of the real repository."""
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("benchmark.sh", "icq_harness.py", "icq_data.py", *SCRIPTS.values()):
        shutil.copy(ROOT / name, work / name)
    (work / "benchmarks").mkdir()
    for module in (ROOT / "benchmarks").glob("*.py"):  # aggregate.py and the modules behind it
        shutil.copy(module, work / "benchmarks" / module.name)
    return work


def slurm_logs(work):
    logs = sorted((work / "runs").glob("**/*.log")) + sorted((work / "runs").glob("slurm/*.out"))
    return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in logs)


def git_commit_all(work):
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for cmd in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "copy"]):
        subprocess.run(git + cmd, cwd=work, check=True, capture_output=True)
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=work, check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.mark.xdist_group("slurm")  # one one-node cluster at a time
def test_learn_runs_as_a_slurm_array_and_aggregates(slurm_cluster, tmp_path):
    work = repo_copy(tmp_path)
    head = git_commit_all(work)
    proc = subprocess.run(
        ["bash", "benchmark.sh", "learn", "--launcher", "slurm", "--tiny"],
        cwd=work,
        env=slurm_cluster,
        capture_output=True,
        text=True,
        timeout=240,
    )
    logs = slurm_logs(work)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{logs}"
    assert "submitted array job" in proc.stdout
    table = (work / "runs/tiny/learn.md").read_text()
    assert f"Commit: {head} (the launch's checkout)." in table
    rows = [
        line
        for line in table.splitlines()
        if line.startswith("| discrete | LunarLander-v3-mixed |") and line.count("|") == 9
    ]
    assert {row.split(" | ")[2] for row in rows} == {"icq", "bc"}, f"{table}\n{logs}"
    assert "Missing" not in table
    for method in ("icq", "bc"):  # one array task per run, each with its own unbuffered log
        log = (work / f"runs/logs/learn__discrete__LunarLander-v3-mixed__{method}__1.log").read_text()
        assert "eval step 20" in log
    assert len(list((work / "runs/slurm").glob("icq-learn_*_*.out"))) == 2, "one array task per run"


def tensors_equal(a, b, path="checkpoint"):
    """Every tensor, array and number of two checkpoints (state dicts, optimiser states, RNG states, evaluations)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{path} differs"
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(a)} vs {sorted(b)}"
        for key in a:
            tensors_equal(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            tensors_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


@pytest.mark.xdist_group("slurm")  # one one-node cluster at a time
def test_requeued_slurm_tasks_resume_their_runs_and_end_as_uninterrupted_runs(slurm_cluster, tmp_path):
    """Two ways a SLURM task is stopped mid-run, then run again from its checkpoint: `scontrol requeue` (as preemption:
    SLURM sends SIGTERM and requeues), and the time-limit warning (sbatch --signal B:USR1, sent here with
    `scancel --batch --signal USR1`: the task checkpoints its run and requeues itself). Each run must end with the
    parameters, optimiser and RNG states and evaluations of an uninterrupted run of the same command."""
    work = repo_copy(tmp_path)
    steps = 2000  # the tiny grid, long enough to stop it mid-run (about 15 s of one core per run)
    script = (work / "benchmark.sh").read_text()
    assert "TINY_STEPS=20;" in script
    (work / "benchmark.sh").write_text(script.replace("TINY_STEPS=20;", f"TINY_STEPS={steps};"))
    env = slurm_cluster
    proc = subprocess.run(
        ["bash", "benchmark.sh", "learn", "--launcher", "slurm", "--tiny", "--no-wait", "--save-model"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    array = re.search(r"^submitted array job (\d+)", proc.stdout, re.M).group(1)
    aggregation = re.search(r"^aggregation job (\d+)", proc.stdout, re.M).group(1)
    job = {"icq": f"{array}_1", "bc": f"{array}_2"}  # the list's order: ICQ, then BC
    info = subprocess.run(["scontrol", "show", "job", job["icq"]], env=env, capture_output=True, text=True).stdout
    assert "Requeue=1" in info, info
    name = {m: f"learn__discrete__LunarLander-v3-mixed__{m}__1" for m in job}
    log = {m: work / f"runs/logs/{name[m]}.log" for m in job}

    def training(method):  # a progress line of the run's first life: stopping now stops it mid-run
        return log[method].exists() and re.search(rf"^step \d+/{steps} ", log[method].read_text(), re.M) is not None

    for method, stop in (
        ("icq", ["scontrol", "requeue", job["icq"]]),
        ("bc", ["scancel", "--batch", "--signal", "USR1", job["bc"]]),
    ):
        try:
            wait_for(lambda: training(method), 180, f"the {method} task to train")
        except AssertionError:
            raise AssertionError(slurm_logs(work))
        subprocess.run(stop, env=env, check=True, capture_output=True, timeout=30)

    def finished():
        state = subprocess.run(["scontrol", "show", "job", aggregation], env=env, capture_output=True, text=True).stdout
        return any(f"JobState={s}" in state for s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))

    try:
        wait_for(finished, 240, "the aggregation job")
    except AssertionError:
        jobs = subprocess.run(["scontrol", "show", "job"], env=env, capture_output=True, text=True).stdout
        raise AssertionError(f"aggregation job {aggregation} did not finish\n{jobs}\n{slurm_logs(work)}")
    logs = slurm_logs(work)
    lines = (work / "runs/lists/learn_tiny.txt").read_text().splitlines()
    for method in job:
        text = log[method].read_text()
        stopped = re.search(r"interrupted at step (\d+) \(SIGTERM\)", text)
        assert stopped and int(stopped.group(1)) < steps, f"{method}: not stopped mid-run\n{logs}"
        assert f"resuming {name[method]} from runs/{name[method]}/checkpoint.pt (SLURM restart count 1)" in text, logs
        summary = json.loads((work / f"runs/{name[method]}/summary.json").read_text())
        assert summary["interrupted"] is False and summary["step"] == steps, logs
        # the same command, straight through, outside SLURM
        line = next(line for line in lines if f"--run-name {name[method]}" in line)
        words = shlex.split(line)
        words[words.index("--run-name") + 1] = f"straight__{method}"
        subprocess.run(
            [sys.executable, *words[2:]],
            cwd=work,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            check=True,
            capture_output=True,
            timeout=600,
        )
        straight = json.loads((work / f"runs/straight__{method}/summary.json").read_text())
        assert summary["evaluations"] == straight["evaluations"]
        resumed = torch.load(work / f"runs/{name[method]}/checkpoint.pt", weights_only=False)
        reference = torch.load(work / f"runs/straight__{method}/checkpoint.pt", weights_only=False)
        resumed["args"].pop("run_name"), reference["args"].pop("run_name")
        resumed["args"].pop("resume", None), reference["args"].pop("resume", None)
        # the segments say how the run went (two lives, wall times), not what it computed
        assert [g["ended_by"] for g in resumed.pop("segments")] == ["SIGTERM", "finished"]
        assert [g["ended_by"] for g in reference.pop("segments")] == ["finished"]
        tensors_equal(resumed, reference)
    assert f"requeueing {name['bc']} at its time limit" in log["bc"].read_text(), logs
    for method, index, signal_name in (("icq", 1, "SIGTERM"), ("bc", 2, "SIGUSR1")):  # both lives of each task
        out = (work / f"runs/slurm/icq-learn_{array}_{index}.out").read_text()
        assert f"interrupted ({signal_name}, exit 143) {name[method]}" in out and f"done {name[method]}" in out, out
    table = work / "runs/tiny/learn.md"
    assert "Missing" not in table.read_text(), f"{table.read_text()}\n{logs}"
    summaries = [work / f"runs/{name[m]}/summary.json" for m in job]
    assert all(table.stat().st_mtime > s.stat().st_mtime for s in summaries), "aggregated before the runs ended"
