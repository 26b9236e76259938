"""ICQ-MA's iteration time eager against --compile, measured inside the real training loop (issue 25).

    python benchmarks/compile_speed.py eager|compiled|cudagraphs [icq_ma_smac.py args] --run-name NAME

Runs icq_ma_smac.main() in this process with --log-interval 1 and one evaluation at the end, and times each iteration
(from one progress line to the next) and its phases (batch cut and TD targets, the critic's steps, the actor's and
behaviour model's steps, the evaluation) by wrapping the script's own functions. Compilation happens in the first
iterations: the steady rate is the median of the iterations after --warmup, the compile time is what the first
iterations took beyond it. cudagraphs: --compile with inductor's CUDA graphs (torch._inductor.config.triton.cudagraphs)
on a GPU. Writes runs/NAME/summary.json (the script's summary plus these numbers); benchmark.sh speed tabulates it.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root


def table(rows):
    """A markdown table of compile_speed summaries (runs/NAME/summary.json dicts)."""
    lines = ["| mode | device | s/iteration | compile s | graphs | recompiles | 40,000 iterations (h) | GPU MB | "
             + " | ".join(rows[0]["phases_per_iteration"]) + " | other |",
             "|---" * (8 + len(rows[0]["phases_per_iteration"])) + "|"]  # fmt: skip
    for r in rows:
        gpu = "-" if r["gpu_peak_memory_mb"] is None else f"{r['gpu_peak_memory_mb']:.0f}"
        lines.append(f"| {r['mode']} | {r['device']} | {r['seconds_per_iteration']:.3f} | {r['compile_seconds']:.1f} | "
                     f"{r['graphs']} | {r['recompiles']} | {r['projection_40k_hours']:.1f} | {gpu} | "
                     + " | ".join(f"{r['phases_per_iteration'].get(k, 0):.3f}" for k in rows[0]["phases_per_iteration"])
                     + f" | {r['other_per_iteration']:.3f} |")  # fmt: skip
    return lines


def main(argv):
    if argv[:1] == ["table"]:
        return print("\n".join(table([json.load(open(path)) for path in argv[1:]])))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("eager", "compiled", "cudagraphs"))
    parser.add_argument("--iterations", type=int, default=20, help="steady iterations timed after the warmup")
    parser.add_argument("--warmup", type=int, default=3, help="iterations that may compile (not in the steady rate)")
    opts, script_args = parser.parse_known_args(argv)

    import torch
    import torch._dynamo
    import tyro

    import icq_ma_smac as ma
    from icq_harness import Run

    total = opts.warmup + opts.iterations
    schedule = ["--total-steps", str(total), "--eval-interval", str(total), "--log-interval", "1", "--no-save-model"]
    args = tyro.cli(ma.Args, args=script_args + schedule + ["--compile"] * (opts.mode != "eager"))
    if opts.mode == "cudagraphs":  # inductor's CUDA graphs need the mutated state at fixed addresses, on the GPU
        torch._inductor.config.triton.cudagraphs = True
        compiled_step = ma.compiled_step

        def static_state_step(loss_fn, modules, optimizer, max_norm):
            for p in (q for m in modules for q in m.parameters()):
                state = optimizer.state[p] = optimizer.state[p] or {"square_avg": torch.zeros_like(p)}
                state["step"] = state.get("step", torch.zeros(())).to(p.device)
                for tensor in state.values():
                    torch._dynamo.mark_static_address(tensor)
            return compiled_step(loss_fn, modules, optimizer, max_norm)

        ma.compiled_step = static_state_step
    cuda = torch.cuda.is_available() and args.cuda
    phases, stamps = {}, []

    def timed(name, fn):  # wrap a function of the script; synchronise first on a GPU so the time is its own
        def wrapper(*a, **kw):
            torch.cuda.synchronize() if cuda else None
            start = time.perf_counter()
            out = fn(*a, **kw)
            torch.cuda.synchronize() if cuda else None
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - start
            return out

        return wrapper

    eager_step = ma.clipped_step
    ma.critic_phase = timed("critic steps", ma.critic_phase)
    ma.clipped_step = timed("actor and behaviour backward + optimiser steps", eager_step)
    critic_phase = ma.critic_phase

    def critic_phase_untimed_steps(*a, **kw):  # inside the critic phase, its own clipped_step calls are not the actor's
        ma.clipped_step = eager_step
        try:
            return critic_phase(*a, **kw)
        finally:
            ma.clipped_step = actor_steps

    actor_steps, ma.critic_phase = ma.clipped_step, critic_phase_untimed_steps
    ma.on_valid_rows = timed("target critic, mixer and Q forwards", ma.on_valid_rows)
    ma.critic_targets = timed("TD targets", ma.critic_targets)
    ma.Actor.forward = timed("actor and behaviour GRU forwards", ma.Actor.forward)
    ma.actor_loss = timed("actor losses", ma.actor_loss)
    ma.evaluate = timed("evaluation", ma.evaluate)
    begin, log, phases_at = Run.begin, Run.log, []

    def stamped_begin(self, *a, **kw):  # the loop starts when begin() returns
        out = begin(self, *a, **kw)
        stamps.append(time.perf_counter())
        phases_at.append(dict(phases))
        return out

    def stamped_log(self, step, scalars):  # called after every iteration (--log-interval 1)
        torch.cuda.synchronize() if cuda else None
        stamps.append(time.perf_counter())
        phases_at.append(dict(phases))
        return log(self, step, scalars)

    Run.begin, Run.log = stamped_begin, stamped_log
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    summary = ma.main(args)
    steps = [b - a for a, b in zip(stamps, stamps[1:])]  # each iteration's seconds (the last one's log: its eval)
    steady = steps[opts.warmup : total - 1]  # the last iteration also evaluates
    per_iteration = statistics.median(steady)
    since_warmup = {k: (phases_at[total - 1].get(k, 0.0) - phases_at[opts.warmup].get(k, 0.0)) / len(steady)
                    for k in phases_at[total - 1] if k != "evaluation"}  # fmt: skip
    counters = torch._dynamo.utils.counters
    result = {
        "mode": opts.mode,
        "seconds_per_iteration": per_iteration,
        "steps_per_second": 1.0 / per_iteration,
        "warmup_seconds": sum(steps[: opts.warmup]),
        "compile_seconds": sum(steps[: opts.warmup]) - opts.warmup * per_iteration,  # beyond steady iterations
        "graphs": int(counters["stats"]["unique_graphs"]),
        "recompiles": sum(counters["recompiles"].values()),
        "cudagraph_skips": sum(v for k, v in counters["inductor"].items() if "cudagraph" in k and "skip" in k),
        "phases_per_iteration": since_warmup,
        "other_per_iteration": per_iteration - sum(since_warmup.values()),
        "evaluation_seconds": phases.get("evaluation", 0.0),
        "gpu_peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "projection_40k_hours": 40_000 * per_iteration / 3600,
    }
    summary.update(result, steps_per_second_with_compile=summary["steps_per_second"])
    summary["steps_per_second"] = result["steps_per_second"]
    with open(f"runs/{args.run_name}/summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
