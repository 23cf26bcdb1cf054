"""Every experiment of the course, then its report: ``python scripts/reproduce.py [quick=true]
[dir=FOLDER] [gpu=auto|true|false] [train.py overrides ...]`` (``make reproduce ARGS=...``).

quick=true: a few updates of each, to check a machine end to end. The runs go to
outputs/reproduce/<commit>[-quick]/ (dir= another); the same command again continues there. Any
other argument goes to every train.py multirun (hydra/launcher=slurm, hydra/launcher=parallel, ...)."""

import sys

from genlab.errors import GenlabError
from genlab.cli.reproduce import reproduce

if __name__ == "__main__":
    try:
        sys.exit(reproduce(sys.argv[1:]))
    except GenlabError as err:
        sys.exit(f"error: {err}")
