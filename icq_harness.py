"""The run harness of the ICQ scripts: everything a run needs that is not ICQ, written once.

runs/{run_name}/ with TensorBoard events, the hyperparameter table and (under --track) Weights & Biases; checkpoints
with RNG state, written atomically; --resume with the checkpoint's settings; SIGINT / SIGTERM finishing the current
step and saving; summary.json covering every segment of a resumed run; the progress line with its ETA; one-line
errors. A script hands it its Args and modules and never the other way round: this file imports no script and holds
no ICQ math. Details: docs/runs.md.
"""

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

# Flags a resumed run may change; every other setting comes from the checkpoint (--run-name and --cuda are kept too).
SCHEDULE_FLAGS = ("total_steps", "eval_interval", "log_interval", "eval_episodes", "threads", "track",
                  "wandb_project_name", "wandb_entity", "save_model", "resume")  # fmt: skip
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def fail(msg):
    """End the run with one line saying what is wrong and what to do (exit code 1, no traceback)."""
    raise SystemExit(f"error: {msg}")


def flag(name):
    return "--" + name.replace("_", "-")


def rounded(x):
    """A metric in a progress line: 3 significant digits, whole numbers from 1000 on."""
    return "n/a" if x is None else f"{x:.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def time_left(seconds_so_far, steps_done, steps_left):
    """Time left at the rate so far, evaluations included: 1h02m or 3m12s."""
    seconds = int(seconds_so_far / max(steps_done, 1) * steps_left)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def last3_mean(evaluations, metrics):
    """The README's metric: (mean of the last three evaluations' first metric they all have, its name)."""
    last = evaluations[-3:]
    for metric in metrics:
        if last and all(e.get(metric) is not None for e in last):
            return float(np.mean([e[metric] for e in last])), metric
    return None, None


def default_run_name(args, data_name):
    method = "bc" if args.alpha == float("inf") else f"alpha{args.alpha:g}"
    return f"{data_name.replace('/', '-')}__{args.exp_name}__{method}__{args.seed}__{int(time.time())}"


_loaded = {}


def load_checkpoint(path, script):
    """The checkpoint dict at `path`, written by `script`, or one line saying why it is not one."""
    if path in _loaded:
        return _loaded[path]
    if not os.path.isfile(path):
        fail(f"--resume {path}: no such checkpoint; pass the runs/<run_name>/checkpoint.pt of a run")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated zip, a data file, random bytes: torch raises many types
        fail(f"--resume {path} is not a readable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:80]}); "
             "it may be truncated: resume from another run's runs/<run_name>/checkpoint.pt")  # fmt: skip
    if not isinstance(checkpoint, dict) or not {"script", "args", "step", "modules"} <= checkpoint.keys():
        fail(f"--resume {path} is not a checkpoint of {script} (a torch file without a run's state)")
    if checkpoint["script"] != script:
        fail(f"--resume {path} is a checkpoint of {checkpoint['script']}: continue it with "
             f"python {checkpoint['script']} --resume {path}")  # fmt: skip
    _loaded[path] = checkpoint
    return checkpoint


def given_flags(args_class, args):
    """Fields set on the command line: those that differ from the defaults, and those named on sys.argv."""
    named = {arg[2:].split("=")[0].replace("-", "_") for arg in sys.argv[1:] if arg.startswith("--")}
    named |= {name[3:] for name in named if name.startswith("no_")}
    defaults = args_class()
    fields = dataclasses.fields(args_class)
    return {f.name for f in fields if f.name in named or getattr(args, f.name) != getattr(defaults, f.name)}


def restore_args(args_class, args, script, resolved=()):
    """--resume: the checkpoint's settings, and of the command line only SCHEDULE_FLAGS, --run-name and --cuda.

    A given flag that would change the algorithm or the data is refused, naming both values. `resolved` names fields
    whose default ("auto") the checkpoint holds resolved; giving that default again is not a change.
    """
    checkpoint = load_checkpoint(args.resume, script)
    saved, kept, given = checkpoint["args"], SCHEDULE_FLAGS + ("run_name", "cuda"), given_flags(args_class, args)
    for name in sorted(given - set(kept)):
        if name in resolved and getattr(args, name) == getattr(args_class(), name):
            continue
        if name in saved and getattr(args, name) != saved[name]:
            fail(f"--resume {args.resume}: {flag(name)} {getattr(args, name)} given, the checkpoint was trained with "
                 f"{flag(name)} {saved[name]}; a resumed run keeps its algorithm and data flags (only "
                 f"{', '.join(flag(k) for k in SCHEDULE_FLAGS[:-1])} may change)")  # fmt: skip
    fields = {f.name for f in dataclasses.fields(args_class)}
    restored = args_class(**{k: v for k, v in saved.items() if k in fields})
    for name in kept:
        if name in given or name == "resume":
            setattr(restored, name, getattr(args, name))
    restored.run_name = restored.run_name or os.path.basename(os.path.dirname(os.path.abspath(args.resume)))
    if restored.total_steps <= checkpoint["step"]:
        fail(f"--resume {args.resume}: the run is at step {checkpoint['step']} of --total-steps {restored.total_steps}; "
             f"pass --total-steps N with N > {checkpoint['step']} to train on")  # fmt: skip
    return restored


class Run:
    """One run of a script: its directory, checkpoints, signals, evaluations, summary and progress lines.

    Create it after resolve_args and before loading data (a data error then leaves no directory behind); call begin()
    once the modules exist, then per step log(), evaluated(), and stopped / interrupt(); finish() at the end.
    """

    def __init__(self, args, script, data_name):
        if hasattr(sys.stdout, "reconfigure"):
            sys.stdout.reconfigure(line_buffering=True)  # progress lines reach nohup / SLURM logs as they happen
        self.args, self.script = args, script
        self.checkpoint = load_checkpoint(args.resume, script) if args.resume is not None else None
        args.run_name = args.run_name or default_run_name(args, data_name)  # kept by the checkpoint: same directory
        self.dir = f"runs/{args.run_name}"
        self.checkpoint_path = f"{self.dir}/checkpoint.pt"
        # SIGINT / SIGTERM only set a flag: the loop finishes its step, then saves the run and exits.
        self.stop_signal = None
        self.previous_handlers = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}

    def _on_signal(self, signum, frame):
        self.stop_signal = signum

    def begin(self, modules, device, state=None, info=None, metrics=("return",)):
        """Restore `modules` (nn.Modules and optimisers by name), the RNG streams and `state` (the script's counters,
        a dict it keeps updating) from --resume's checkpoint; open the run directory. `info` goes into summary.json,
        `metrics` name the evaluation keys the last-three mean uses, first that is present. Returns the start step."""
        self.modules, self.device, self.state, self.info, self.metrics = modules, device, state or {}, info, metrics
        self.start_step, self.evaluations, self.segments = 0, [], []
        if self.checkpoint is not None:
            ckpt = self.checkpoint
            for key, module in modules.items():
                try:
                    module.load_state_dict(ckpt["modules"][key])
                except (KeyError, RuntimeError, ValueError) as exc:
                    fail(f"--resume {self.args.resume}: its {key} does not fit this run "
                         f"({str(exc).splitlines()[0][:80]}); resume with the code version that wrote it")  # fmt: skip
            random.setstate(ckpt["rng"]["python"])
            np.random.set_state(ckpt["rng"]["numpy"])
            torch.set_rng_state(ckpt["rng"]["torch"])
            if device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
                torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
            self.state.update(ckpt["state"])
            self.start_step, self.evaluations, self.segments = ckpt["step"], ckpt["evaluations"], ckpt["segments"]
            print(f"resumed from {self.args.resume} at step {self.start_step}")
        print(f"run directory: {self.dir}/")
        from torch.utils.tensorboard import SummaryWriter

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
            kept = (f"the last checkpoint {self.checkpoint_path} is unchanged; continue with --resume "
                    f"{self.checkpoint_path}" if os.path.exists(self.checkpoint_path) else "no checkpoint was written")
            fail(f"non-finite loss (NaN or inf) at step {int(nonfinite_step)}; training stopped, {kept}")

    def log(self, step, scalars):
        """TensorBoard losses/{key} and charts/SPS, and the progress line. Reads the tensors: the step's only host syncs."""
        scalars = {key: float(value) for key, value in scalars.items()}
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
        tags = {"return": "episodic_return", "score": "normalized_score"}
        for key, value in results.items():
            if value is not None:
                self.writer.add_scalar(f"eval/{tags.get(key, key)}", value, step)
        text = ", ".join(f"{key.replace('_', ' ')} {rounded(v)}" for key, v in results.items() if v is not None)
        print(f"eval step {step}: {text} | ETA {self._eta(step)}")
        if self.args.save_model:
            self.save(step, ended_by="killed")
        self.write_summary(step, ended_by=None)

    @property
    def stopped(self):
        return self.stop_signal is not None

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
        """Every segment of the run; this one ends at `step`. A checkpoint records it as "killed": that is how it ended
        if the run is resumed from there (the process died before it saved again)."""
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
                   "last3_mean": mean3, "last3_metric": metric}  # fmt: skip
        for key in {k for e in self.evaluations for k in e if k != "step"}:
            values = [e[key] for e in self.evaluations if e.get(key) is not None]
            summary[f"final_{key}"] = self.evaluations[-1].get(key)
            summary[f"best_{key}"] = max(values) if values else None
        summary.update(
            steps_per_second=sum(s["end_step"] - s["start_step"] for s in segments) / max(train_seconds, 1e-9),
            wall_seconds=sum(s["wall_seconds"] for s in segments), train_seconds=train_seconds,
            peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **(self.info or {}),
            **{k: float(v) if torch.is_tensor(v) else v for k, v in self.state.items()},
            segments=segments, evaluations=self.evaluations,
        )  # fmt: skip
        with open(f"{self.dir}/summary.json.tmp", "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(f"{self.dir}/summary.json.tmp", f"{self.dir}/summary.json")
        return summary
