"""benchmark.sh's Python side. `benchmarks/aggregate.py` is the one command line; the modules behind it:

    runs.py     reading a grid's runs: the run list, each run's summary.json, the last-3 evaluation mean
    tables.py   the learn / headline / paper and sweep tables (markdown)
    curves.py   evaluation-curve plots
    speed.py    the speed table
    floor.py    the speed floor (each script's networks and optimiser steps alone) and the synthetic Hopper data

diagnostics/ holds one-off analysis scripts behind the docs' diagnostics; benchmark.sh does not run them.
"""
