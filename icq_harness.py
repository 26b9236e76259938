"""The run harness of the ICQ scripts: what a run needs that is not ICQ (no ICQ math here; it imports no script).

runs/{run_name}/ (TensorBoard, the hyperparameter table, wandb under --track), atomic checkpoints with RNG state,
--resume with the checkpoint's settings, SIGINT / SIGTERM, summary.json over every segment of a run, the progress
line with its ETA, one-line errors. Details: docs/runs.md."""

import contextlib
import dataclasses
import json
import os
import random
import resource
import signal
import sys
import time

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

# Flags a resumed run may change; every other setting comes from the checkpoint (--run-name and --cuda are kept too).
SCHEDULE_FLAGS = ("total_steps", "eval_interval", "log_interval", "eval_episodes", "threads", "track",
                  "wandb_project_name", "wandb_entity", "save_model", "resume")  # fmt: skip
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
EVAL_TAGS = {"return": "episodic_return", "score": "normalized_score"}  # TensorBoard eval/* names of CleanRL


def fail(msg):  # one line saying what is wrong and what to do: exit code 1, no traceback
    raise SystemExit(f"error: {msg}")


def flag(name):
    return "--" + name.replace("_", "-")


def rounded(x):  # a metric in a progress line: 3 significant digits, whole numbers from 1000 on
    return "n/a" if x is None else f"{x:.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def time_left(seconds_so_far, steps_done, steps_left):
    """Time left at the rate so far, evaluations included: 1h02m or 3m12s."""
    s = int(seconds_so_far / max(steps_done, 1) * steps_left)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def last3_mean(evaluations, metrics):
    """The README's metric: (mean of the last three evaluations' first metric they all have, its name)."""
    last = evaluations[-3:]
    for metric in metrics:
        if last and all(e.get(metric) is not None for e in last):
            return float(np.mean([e[metric] for e in last])), metric
    return None, None


def load_checkpoint(path, script):
    """The checkpoint dict at `path`, written by `script`, or one line saying why it is not one."""
    if not os.path.isfile(path):
        fail(f"--resume {path}: no such checkpoint; pass the runs/<run_name>/checkpoint.pt of a run")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated zip, a data file, random bytes: torch raises many types
        fail(f"--resume {path} is not a readable checkpoint ({type(exc).__name__}: {' '.join(str(exc).split())[:80]}); "
             "it may be truncated: resume from another run's runs/<run_name>/checkpoint.pt")  # fmt: skip
    if not isinstance(checkpoint, dict) or not {"script", "args", "step", "modules"} <= checkpoint.keys():
        fail(f"--resume {path} is not a checkpoint of {script} (a torch file without a run's state)")
    if checkpoint["script"] != script:
        fail(f"--resume {path} is a checkpoint of {checkpoint['script']}: continue it with "
             f"python {checkpoint['script']} --resume {path}")  # fmt: skip
    return checkpoint


def restore_args(args_class, args, script, resolved=()):
    """--resume: the checkpoint's settings; of the command line only SCHEDULE_FLAGS, --run-name and --cuda. Another
    flag that changes a setting is refused; `resolved` fields (e.g. an "auto" preset) may be given at their default."""
    named = {arg[2:].split("=")[0].replace("-", "_") for arg in sys.argv[1:] if arg.startswith("--")}
    named |= {name[3:] for name in named if name.startswith("no_")}
    default, fields = args_class(), {f.name for f in dataclasses.fields(args_class)}
    given = {name for name in fields if name in named or getattr(args, name) != getattr(default, name)}
    checkpoint = load_checkpoint(args.resume, script)
    saved, kept = checkpoint["args"], SCHEDULE_FLAGS + ("run_name", "cuda")
    for name in sorted(given - set(kept)):
        if name in resolved and getattr(args, name) == getattr(default, name):
            continue
        if name in saved and getattr(args, name) != saved[name]:
            fail(f"--resume {args.resume}: {flag(name)} {getattr(args, name)} given, the checkpoint was trained with "
                 f"{flag(name)} {saved[name]}; a resumed run keeps its algorithm and data flags (only "
                 f"{', '.join(flag(k) for k in SCHEDULE_FLAGS[:-1])} may change)")  # fmt: skip
    restored = args_class(**{k: v for k, v in saved.items() if k in fields})
    for name in kept:
        if name in given or name == "resume":
            setattr(restored, name, getattr(args, name))
    restored.run_name = restored.run_name or os.path.basename(os.path.dirname(os.path.abspath(args.resume)))
    if restored.total_steps <= checkpoint["step"]:
        step = checkpoint["step"]
        fail(f"--resume {args.resume}: the run is at step {step} of --total-steps {restored.total_steps}; pass "
             f"--total-steps N with N > {step} to train on")  # fmt: skip
    return restored


class Run:
    """One run: create it before loading data (a data error leaves no directory), begin() once the modules exist,
    then log(), evaluated() and, when stopped, interrupt(); finish() at the end."""

    def __init__(self, args, script, data_name):
        if hasattr(sys.stdout, "reconfigure"):
            sys.stdout.reconfigure(line_buffering=True)  # progress lines reach nohup / SLURM logs as they happen
        self.args, self.script = args, script
        self.checkpoint = load_checkpoint(args.resume, script) if args.resume is not None else None
        method = "bc" if args.alpha == float("inf") else f"alpha{args.alpha:g}"
        name = f"{data_name.replace('/', '-')}__{args.exp_name}__{method}__{args.seed}__{int(time.time())}"
        args.run_name = args.run_name or name  # kept by the checkpoint: a resumed run continues in its directory
        self.dir = f"runs/{args.run_name}"
        self.checkpoint_path = f"{self.dir}/checkpoint.pt"
        self.stop_signal = None  # SIGINT / SIGTERM set it; the loop finishes its step, then saves and exits
        on_signal = lambda signum, frame: setattr(self, "stop_signal", signum)  # noqa: E731
        self.previous_handlers = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}

    def begin(self, modules, device, state=None, info=None, metrics=("return",)):
        """Restore `modules` (networks, optimisers), RNG and `state` (the script's counters) from --resume's checkpoint
        and open the run directory; `info` goes to summary.json; `metrics`: the last-three mean's keys, in order."""
        self.modules, self.device, self.state, self.info, self.metrics = modules, device, state or {}, info, metrics
        self.start_step, self.evaluations, self.segments = 0, [], []
        if self.checkpoint is not None:
            ckpt = self.checkpoint
            for key, module in modules.items():
                try:
                    module.load_state_dict(ckpt["modules"][key])
                except (KeyError, RuntimeError, ValueError) as exc:
                    fail(f"--resume {self.args.resume}: its {key} does not fit this run ("
                         f"{' '.join(str(exc).split())[:80]}); resume with the code version that wrote it")  # fmt: skip
            random.setstate(ckpt["rng"]["python"])
            np.random.set_state(ckpt["rng"]["numpy"])
            torch.set_rng_state(ckpt["rng"]["torch"])
            if device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
                torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
            self.state.update({k: v.to(device) if torch.is_tensor(v) else v for k, v in ckpt["state"].items()})
            self.start_step, self.evaluations, self.segments = ckpt["step"], ckpt["evaluations"], ckpt["segments"]
            print(f"resumed from {self.args.resume} at step {self.start_step}")
        print(f"run directory: {self.dir}/")
        if self.args.track:
            import wandb

            wandb.init(project=self.args.wandb_project_name, entity=self.args.wandb_entity, sync_tensorboard=True,
                       config=vars(self.args), name=self.args.run_name, save_code=True)  # fmt: skip
        self.writer = SummaryWriter(self.dir)
        table = "\n".join(f"|{k}|{v}|" for k, v in vars(self.args).items())
        self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
        self.start_time, self.eval_seconds = time.time(), 0.0
        return self.start_step

    def check_finite(self, nonfinite_step):
        """Stop at a NaN or inf loss (`nonfinite_step` >= 0 is the first step that had one), keeping the checkpoint."""
        if int(nonfinite_step) >= 0:
            path = self.checkpoint_path
            kept = f"{path} is unchanged; continue with --resume {path}" if os.path.exists(path) else "no checkpoint"
            fail(f"non-finite loss (NaN or inf) at step {int(nonfinite_step)}; training stopped, {kept}")

    def log(self, step, scalars):
        """losses/{key} and charts/SPS in TensorBoard, and the progress line (reading the tensors: a host sync)."""
        scalars = {key: float(v.detach()) if torch.is_tensor(v) else float(v) for key, v in scalars.items()}
        for key, value in scalars.items():
            self.writer.add_scalar(f"losses/{key}", value, step)
        sps = (step - self.start_step) / max(time.time() - self.start_time - self.eval_seconds, 1e-9)
        self.writer.add_scalar("charts/SPS", sps, step)
        text = " | ".join(f"{key} {rounded(value)}" for key, value in scalars.items())
        print(f"step {step}/{self.args.total_steps} | {text} | {rounded(sps)} steps/s | ETA {self._eta(step)}")

    @contextlib.contextmanager
    def timing_evaluation(self):
        start = time.time()
        yield
        self.eval_seconds += time.time() - start

    def evaluated(self, step, results):
        """Record an evaluation (eval/* in TensorBoard, summary.json) and, unless --no-save-model, the checkpoint."""
        self.evaluations.append({"step": step, **results})
        for key, value in results.items():
            if value is not None:
                self.writer.add_scalar(f"eval/{EVAL_TAGS.get(key, key)}", value, step)
        text = ", ".join(f"{key.replace('_', ' ')} {rounded(v)}" for key, v in results.items() if v is not None)
        print(f"eval step {step}: {text} | ETA {self._eta(step)}")
        if self.args.save_model:
            self.save(step, ended_by="killed")
        self.write_summary(step, ended_by=None)

    stopped = property(lambda self: self.stop_signal is not None)

    def interrupt(self, step):
        """After SIGINT / SIGTERM: save the checkpoint (always) and the summary, say how to continue, exit."""
        name = signal.Signals(self.stop_signal).name
        self.save(step, ended_by=name)
        self.write_summary(step, ended_by=name)
        self.close()
        print(f"interrupted at step {step} ({name}): checkpoint {self.checkpoint_path}; continue with: "
              f"python {self.script} --resume {self.checkpoint_path}", file=sys.stderr, flush=True)  # fmt: skip
        sys.exit(128 + self.stop_signal)

    def finish(self, step):
        if self.args.save_model:
            self.save(step, ended_by="finished")
        summary = self.write_summary(step, ended_by="finished")
        self.close()
        mean3, metric = summary["last3_mean"], summary["last3_metric"]
        print(f"done: last-3 eval mean {rounded(mean3)} ({metric}), summary in {self.dir}/summary.json")
        return summary

    def close(self):
        self.writer.close()
        for s, handler in self.previous_handlers.items():
            signal.signal(s, handler)

    def _eta(self, step):
        return time_left(time.time() - self.start_time, step - self.start_step, self.args.total_steps - step)

    def _segments(self, step, ended_by):
        """The segments so far, this one ending at `step` ("killed" in an evaluation's checkpoint: if resumed)."""
        wall = time.time() - self.start_time
        this = {"start_step": self.start_step, "end_step": step, "ended_by": ended_by, "wall_seconds": wall,
                "train_seconds": wall - self.eval_seconds}  # fmt: skip
        return self.segments + [this]

    def save(self, step, ended_by):
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None}  # fmt: skip
        state = {"script": self.script, "args": vars(self.args), "step": step, "rng": rng, "state": self.state,
                 "modules": {key: module.state_dict() for key, module in self.modules.items()},
                 "evaluations": self.evaluations, "segments": self._segments(step, ended_by)}  # fmt: skip
        torch.save(state, self.checkpoint_path + ".tmp")
        os.replace(self.checkpoint_path + ".tmp", self.checkpoint_path)  # atomic: a crash mid-save keeps the last one

    def write_summary(self, step, ended_by):
        segments = self._segments(step, ended_by)
        train_seconds = sum(s["train_seconds"] for s in segments)
        mean3, metric = last3_mean(self.evaluations, self.metrics)
        summary = {"args": vars(self.args), "script": self.script, "run_name": self.args.run_name, "step": step,
                   "finished": ended_by == "finished", "interrupted": ended_by in ("SIGINT", "SIGTERM"),
                   "last3_mean": mean3, "last3_metric": metric,
                   "steps_per_second": step / max(train_seconds, 1e-9),
                   "wall_seconds": sum(s["wall_seconds"] for s in segments), "train_seconds": train_seconds,
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **(self.info or {}),
                   **{k: float(v) if torch.is_tensor(v) else v for k, v in self.state.items()}}  # fmt: skip
        for key in dict.fromkeys(k for e in self.evaluations for k in e if k != "step"):
            values = [e[key] for e in self.evaluations if e.get(key) is not None]
            summary[f"final_{key}"] = self.evaluations[-1].get(key)
            summary[f"best_{key}"] = max(values) if values else None
        summary.update(segments=segments, evaluations=self.evaluations)
        with open(f"{self.dir}/summary.json.tmp", "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(f"{self.dir}/summary.json.tmp", f"{self.dir}/summary.json")
        return summary
