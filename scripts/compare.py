"""Compare runs: ``python scripts/compare.py <sweep folder | outputs folder> [--out FOLDER]``.

Prints the runs sorted by validation loss with the parameters that differ between them, and
writes comparison.csv and comparison.png into the folder (or --out)."""

import argparse
import sys

from genlab.results.compare import compare
from genlab.errors import GenlabError

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a multirun or Optuna sweep folder, a run folder, or outputs/")
    parser.add_argument("--out", help="where to write comparison.csv and comparison.png (default: the folder)")
    args = parser.parse_args()
    try:
        compare(args.folder, args.out)
    except GenlabError as err:
        sys.exit(f"error: {err}")
