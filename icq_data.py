"""Built-in datasets of the ICQ scripts: the generators, not ICQ.

The scripts import this module only in the branch that records a missing built-in file, and it imports no script:
a generator that needs an environment adapter is handed the script's. Its command line records a dataset ahead of a
run (for a cluster without network, or to inspect the data):

    python icq_data.py lunar-discrete --quality mixed --dataset-size 100000
    python icq_data.py lunar-continuous --quality mixed --dataset-size 100000
    python icq_data.py smax --map 3s_vs_5z --quality medium --dataset-size 1000
"""

import os

import numpy as np

# =====================================================================================================================
# LunarLander-v3, discrete actions (icq_discrete.py)
# (section filled by the icq_discrete.py restructure)

# =====================================================================================================================
# LunarLanderContinuous-v3 (icq_continuous.py)
# (section filled by the icq_continuous.py restructure)

# =====================================================================================================================
# SMAX (icq_ma_smac.py): scripted controllers and the recorder of their episodes
# (section filled by the icq_ma_smac.py restructure)

# =====================================================================================================================
# Command line: one subcommand per generator (each section adds its own to COMMANDS)
COMMANDS = {}


def atomic_path(path):
    """Write to `path + ".tmp"` first and os.replace it after, so a concurrent run never reads half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path + ".tmp"


if __name__ == "__main__":
    import tyro

    tyro.extras.subcommand_cli_from_dict(COMMANDS, description=__doc__.split("\n\n")[0])
