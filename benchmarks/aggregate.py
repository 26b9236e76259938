"""benchmark.sh's helper, one command line: tables and plots of a grid's runs, the speed floor, any runs' curves.

    python benchmarks/aggregate.py learn|sweep|headline|speed|paper LIST --out-dir DIR   tables of LIST's runs
    python benchmarks/aggregate.py curves OUT.png TITLE LABEL=RUN[,RUN...] ...   evaluation curves of any runs
    python benchmarks/aggregate.py floor continuous|discrete|ma [script args] --run-name NAME
    python benchmarks/aggregate.py make-hopper-data PATH N

LIST is a run list written by benchmark.sh (one command line per run, each with --run-name); every run's result is
runs/<run_name>/summary.json. Run names follow the learn-grid convention <grid>__<script>__<dataset>__<method>__<seed>.
The code is split by concern: runs.py (reading runs), tables.py, curves.py, speed.py, floor.py.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from benchmarks.curves import curves_command  # noqa: E402
from benchmarks.floor import floor_command, make_hopper_data  # noqa: E402
from benchmarks.speed import speed_table  # noqa: E402
from benchmarks.tables import learn_table, sweep_table  # noqa: E402


def tables_command(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("learn", "sweep", "headline", "speed", "paper"))
    parser.add_argument("list", help="a run list written by benchmark.sh (runs/lists/<kind>.txt)")
    parser.add_argument("--out-dir", default="benchmarks")
    opts = parser.parse_args(argv)
    if not os.path.exists(opts.list):
        raise SystemExit(f"error: no run list {opts.list}")
    os.makedirs(opts.out_dir, exist_ok=True)
    if opts.kind == "sweep":
        lines = sweep_table(opts.list)
    elif opts.kind == "speed":
        lines = speed_table(opts.list)
    else:
        lines = learn_table(opts.list, opts.out_dir, opts.kind)
    out = os.path.join(opts.out_dir, f"{opts.kind}.md")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")


def main(argv):
    command = argv[0] if argv else None
    if command == "floor":
        return floor_command(argv[1:])
    if command == "make-hopper-data":
        return make_hopper_data(argv[1], int(argv[2]))
    if command == "curves":
        if len(argv) < 4:
            raise SystemExit("usage: aggregate.py curves OUT.png TITLE LABEL=RUN[,RUN...] ...")
        return curves_command(argv[1], argv[2], argv[3:])
    return tables_command(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
