"""The speed table: each script's update rate beside its floor (benchmarks/floor.py), peak memory, dataset memory."""

import os
import platform
import statistics
import time

from benchmarks.compile_speed import table as compile_table
from benchmarks.runs import collect, commit_line, fmt, missing_note

SCRIPTS = {"continuous": "icq_continuous.py", "discrete": "icq_discrete.py", "ma": "icq_ma_smac.py"}


def machine_lines():
    import numpy as np
    import torch

    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    note = [f"- note: {os.environ['BENCH_MACHINE_NOTE']}"] if os.environ.get("BENCH_MACHINE_NOTE") else []
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    return [
        f"- machine: {cpu}, {os.cpu_count()} CPUs visible, GPU: {gpu}; {platform.system()} {platform.release()}",
        f"- versions: Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}",
        f"- aggregated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; runs with OMP_NUM_THREADS={threads}",
        *note,
    ]


def speed_table(list_path):
    groups, missing = collect(list_path)
    lines = [
        "# speed: each script's update rate beside its floor",
        "",
        "The floor is the same networks' forward, backward and optimiser steps on one fixed batch of the same size, "
        "with no ICQ weights, no sampling, no NaN checks and no logging "
        "(`python benchmarks/aggregate.py floor`, code in `benchmarks/floor.py`). "
        "Rates exclude dataset loading and evaluation; each number is the median over repeats (separate processes). "
        f"Made by `bash benchmark.sh speed` from `{list_path}`.",
        "",
        f"- {commit_line(list_path)}",
        *machine_lines(),
        "",
        "| script | config | steps/s | floor steps/s | cost / floor (target ≤ 1.15) | peak RSS MB | repeats |",
        "|---|---|---|---|---|---|---|",
    ]
    memory = []
    for (script, config), methods in sorted(groups.items()):
        runs, floors = methods.get("icq", []), methods.get("floor", [])
        rate = statistics.median([r["steps_per_second"] for _, r in runs]) if runs else None
        floor = statistics.median([r["steps_per_second"] for _, r in floors]) if floors else None
        ratio = f"{floor / rate:.2f}" if rate and floor else "-"
        rss = statistics.median([r["peak_rss_mb"] for _, r in runs]) if runs else None
        unit = " (iterations)" if script == "ma" else ""
        lines.append(
            f"| {SCRIPTS[script]} | {config}{unit} | {fmt(rate, digits=4)} | {fmt(floor, digits=4)} | {ratio} | "
            f"{fmt(rss, digits=4)} | {len(runs)}/{len(floors)} |"
        )
        if floors and floors[0][1].get("raw_bytes"):
            f = floors[0][1]
            memory.append(
                f"| {SCRIPTS[script]} | {config} | {f['raw_bytes'] / 2**20:.1f} | {f['dataset_bytes'] / 2**20:.1f} | "
                f"{f['dataset_bytes'] / f['raw_bytes']:.2f} | {f.get('dataset_note', '')} |"
            )
    if memory:
        lines += [
            "",
            "Dataset memory: the bytes of the tensors a script holds for training against the raw arrays of the file "
            "(target ≤ 1.2x).",
            "",
            "| script | data | raw MB | held MB | held / raw | held tensors |",
            "|---|---|---|---|---|---|",
            *memory,
        ]
    rss = {
        config: statistics.median([r["peak_rss_mb"] for _, r in methods["icq"]])
        for (script, config), methods in groups.items()
        if script == "continuous" and methods.get("icq")
    }
    if {"hopper-1k", "hopper-1M"} <= rss.keys():
        raw = 1_000_000 * (11 + 3 + 1) * 4 + 2 * 1_000_000
        grown = rss["hopper-1M"] - rss["hopper-1k"]
        lines += [
            "",
            f"Peak RSS of icq_continuous.py, 1M minus 1k transitions: {grown:.0f} MB for {raw / 2**20:.0f} MB of raw "
            f"arrays ({grown * 2**20 / raw:.2f}x; includes the loader's temporary copies).",
        ]
    steady = []  # compile_speed.py's runs: the repeat with the median seconds per iteration
    for _, methods in sorted(groups.items()):
        timed = [r for _, r in methods.get("icq", []) if "seconds_per_iteration" in r]
        if timed:
            steady.append(sorted(timed, key=lambda r: r["seconds_per_iteration"])[len(timed) // 2])
    if steady:
        lines += ["", "icq_ma_smac.py eager against --compile, side by side in this grid (benchmarks/compile_speed.py, "
                  "timed inside the training loop): seconds per iteration after the warmup (the repeat with the "
                  "median), compile time (what the warmup iterations took beyond steady ones), compiled graphs, "
                  "recompilations, and each phase's seconds per iteration.", "", *compile_table(steady)]  # fmt: skip
    return lines + missing_note(missing)
