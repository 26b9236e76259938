"""benchmark.sh and benchmarks/aggregate.py: the run lists, the aggregation's numbers, and a real one-node SLURM cluster."""
import ast
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT

SCRIPTS = {"continuous": "icq_continuous.py", "discrete": "icq_discrete.py", "ma": "icq_ma_smac.py"}


def bench(*args, cwd=ROOT, timeout=120):
    proc = subprocess.run(["bash", "benchmark.sh", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"benchmark.sh {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
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
    assert all(a["--env-backend"] == "smac" and a["--dataset"] == f"datasets/smac/{a['--map']}.h5" for a in ma)
    assert ("python -u icq_continuous.py --dataset-path datasets/d4rl/hopper-medium-replay-v2.hdf5 --env-id Hopper-v5 "
            "--seed 3 --run-name paper__continuous__hopper-medium-replay-v2__icq__3") in lines
    assert "python -u icq_continuous.py --dataset-id D4RL/antmaze/large-diverse-v1 --seed 5 --run-name paper__continuous__antmaze-large-diverse-v1__icq__5" in lines
    assert "python -u icq_ma_smac.py --env-backend smac --map 6h_vs_8z --dataset datasets/smac/6h_vs_8z.h5 --seed 1 --run-name paper__ma__6h_vs_8z__icq__1" in lines


def test_learn_and_sweep_lists_follow_the_naming_convention():
    lines = bench("learn", "--dry-run")
    assert all(check_line(line) for line in lines)
    runs = [line for line in lines if "--run-name learn__" in line]
    assert len(runs) == (2 + 2 + 4) * 2 * 3  # datasets x {icq, bc} x 3 seeds
    assert len(lines) - len(runs) == 8, "one preparation run per dataset"
    extra = bench("learn", "--dry-run", "--some-flag", "a b")
    assert all(shlex.split(line)[-4:-1] == ["--some-flag", "a b", "--run-name"] for line in extra), "extra args reach every run"
    names = [line.split("--run-name ")[1].split("__") for line in runs]
    assert all(len(n) == 5 and n[3] in ("icq", "bc") for n in names)
    assert all(("--alpha inf" in line) == ("__bc__" in line) for line in runs)
    sweep = [line for line in bench("learn", "--sweep", "--dry-run") if "--run-name sweep__" in line]
    assert all(check_line(line) for line in sweep)
    assert {line.split("__")[2] for line in sweep} == {"LunarLanderContinuous-v3-mixed", "LunarLanderContinuous-v3-mixed-td", "LunarLander-v3-mixed", "3m-mixed"}
    assert all(line.split("--alpha ")[1].split()[0] == line.split("__alpha")[1].split("__")[0] for line in sweep)
    headline = [line for line in bench("learn", "--headline", "--dry-run") if "--run-name headline__" in line]
    assert all(check_line(line) and "--map 3s_vs_5z" in line for line in headline)
    assert all(("--critic-updates batched" in line) == ("__bc__" in line) for line in headline), "BC's actor ignores the critic"
    assert sorted({line.split("__")[2] for line in headline}) == ["3s_vs_5z-medium", "3s_vs_5z-mixed"]
    assert len(headline) == 2 * 2 * 3 and sum("--alpha inf" in line for line in headline) == 6


def write_run(cwd, name, values, metric="score", dataset_return=5.0):
    os.makedirs(cwd / "runs" / name, exist_ok=True)
    evaluations = [{"step": 10 * (i + 1), metric: v, "return": v} for i, v in enumerate(values)]
    (cwd / "runs" / name / "summary.json").write_text(json.dumps({"run_name": name, "evaluations": evaluations, "dataset_return": dataset_return}))


def test_aggregate_learn_means_of_last_three_evaluations(tmp_path):
    curves = {("icq", "1"): [0, 1, 2, 3], ("icq", "2"): [0, 3, 4, 5], ("bc", "1"): [9, 1, 1, 1], ("bc", "2"): [0, 0, 0, 0]}
    names = [f"learn__discrete__toy__{m}__{s}" for m, s in curves]
    for (m, s), name in zip(curves, names):
        write_run(tmp_path, name, curves[m, s])
    (tmp_path / "list.txt").write_text("".join(f"python -u icq_discrete.py --run-name {n}\n" for n in names + ["learn__discrete__toy__bc__3"]))
    subprocess.run([sys.executable, str(ROOT / "benchmarks/aggregate.py"), "learn", "list.txt", "--out-dir", "out"], cwd=tmp_path, check=True, capture_output=True)
    table = (tmp_path / "out/learn.md").read_text()
    icq = [2.0, 4.0]  # last-3 means per seed
    assert f"| discrete | toy | icq | score | {np.mean(icq):.3g} ± {np.std(icq, ddof=1):.2g} | 2 | 5 |" in table
    assert f"| discrete | toy | bc | score | 0.5 ± {np.std([1, 0], ddof=1):.2g} | 2 | 5 |" in table
    assert f"| discrete | toy | +{3 - 0.5:.3g} | {np.hypot(np.std(icq, ddof=1), np.std([1, 0], ddof=1)):.2g} | ICQ better |" in table
    assert "learn__discrete__toy__bc__3" in table.split("Missing")[1]
    assert (tmp_path / "out/learn_toy.png").stat().st_size > 0


def test_aggregate_sweep_orders_alphas_with_bc_last(tmp_path):
    names = [f"sweep__ma__3m-mixed__alpha{a}__1" for a in ("inf", "10", "0.1")]
    for i, name in enumerate(names):
        write_run(tmp_path, name, [i, i, i], metric="win_rate")
    (tmp_path / "list.txt").write_text("".join(f"python -u x --run-name {n}\n" for n in names))
    subprocess.run([sys.executable, str(ROOT / "benchmarks/aggregate.py"), "sweep", "list.txt", "--out-dir", "out"], cwd=tmp_path, check=True, capture_output=True)
    rows = [line for line in (tmp_path / "out/sweep.md").read_text().splitlines() if line.startswith("| 0.1") or line.startswith("| 10") or line.startswith("| inf")]
    assert rows == ["| 0.1 | 2 ± 0 | 1 |", "| 10 | 1 ± 0 | 1 |", "| inf | 0 ± 0 | 1 |"]


def test_aggregate_curves_plots_labelled_groups_and_names_missing_runs(tmp_path):
    for name, values in (("a1", [0, 1]), ("a2", [1, 1]), ("b1", [0, 0])):
        write_run(tmp_path, name, values, metric="win_rate")
    cmd = [sys.executable, str(ROOT / "benchmarks/aggregate.py"), "curves", "out.png", "title", "ICQ-MA alpha 1=a1,a2", "BC=b1"]
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
        pytest.skip(f"SLURM test needs Debian's slurm-wlm and munge (apt-get install -y slurm-wlm munge); missing {missing}")
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
    conf.write_text("\n".join([
        "ClusterName=icqbench", f"SlurmctldHost={host}(127.0.0.1)", "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={socket_path}",
        f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
        f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={d}/spool",
        f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmdPidFile={d}/slurmd.pid",
        f"SlurmctldLogFile={d}/slurmctld.log", f"SlurmdLogFile={d}/slurmd.log",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/backfill", "MpiDefault=none", "ReturnToService=2", "SlurmdTimeout=30", "MinJobAge=300",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""]))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for var in [v for v in env if v.startswith(("SBATCH_", "SLURM_")) and v != "SLURM_CONF"]:
        del env[var]  # a test run inside a SLURM job must not leak that job's settings
    procs = []
    try:
        procs.append(subprocess.Popen(
            ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={socket_path}", f"--pid-file={d}/munge/munged.pid",
             f"--log-file={d}/munge/munged.log", f"--seed-file={d}/munge/munged.seed"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        wait_for(socket_path.exists, 20, "munged's socket")
        procs.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(conf)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        procs.append(subprocess.Popen(["slurmd", "-D", "-f", str(conf), "-N", host], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))

        def node_idle():
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout
            return "idle" in out

        try:
            wait_for(node_idle, 60, "the SLURM node to become idle")
        except AssertionError:
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in (d / "slurmctld.log", d / "slurmd.log") if p.exists())
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


def test_learn_runs_as_a_slurm_array_and_aggregates(slurm_cluster, tmp_path):
    work = tmp_path / "repo"  # a copy of the repository, so the runs and tables stay out of the real one
    work.mkdir()
    for name in ("benchmark.sh", *SCRIPTS.values()):
        shutil.copy(ROOT / name, work / name)
    (work / "benchmarks").mkdir()
    for module in (ROOT / "benchmarks").glob("*.py"):  # aggregate.py and the modules behind it
        shutil.copy(module, work / "benchmarks" / module.name)
    proc = subprocess.run(["bash", "benchmark.sh", "learn", "--launcher", "slurm", "--tiny"], cwd=work, env=slurm_cluster,
                          capture_output=True, text=True, timeout=240)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((work / "runs").glob("**/*.log")) + sorted((work / "runs").glob("slurm/*.out")))
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{logs}"
    assert "submitted array job" in proc.stdout
    table = (work / "runs/tiny/learn.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| discrete | LunarLander-v3-mixed |") and line.count("|") == 9]
    assert {row.split(" | ")[2] for row in rows} == {"icq", "bc"}, f"{table}\n{logs}"
    assert "Missing" not in table
    for method in ("icq", "bc"):  # one array task per run, each with its own unbuffered log
        log = (work / f"runs/logs/learn__discrete__LunarLander-v3-mixed__{method}__1.log").read_text()
        assert "eval step 20" in log
    assert len(list((work / "runs/slurm").glob("icq-learn_*_*.out"))) == 2, "one array task per run"
