"""One self-contained HTML page from a set of runs: ``python scripts/report.py <folder> [--out FILE]``.

The folder is any sweep (a grid, an Optuna study, ``make reproduce``'s), a run folder or outputs/;
the page (default ``<folder>/report.html``) holds the results table, curves, samples and settings,
with its pictures inlined, so it opens from disk or an e-mail (docs/sweeps.md)."""

import argparse
import sys

from genlab.errors import GenlabError
from genlab.results.report import write_report

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a multirun or Optuna sweep folder, make reproduce's folder, a run folder, or outputs/")
    parser.add_argument("--out", help="the HTML file to write (default: <folder>/report.html)")
    args = parser.parse_args()
    try:
        print(f"wrote {write_report(args.folder, args.out)}")
    except GenlabError as err:
        sys.exit(f"error: {err}")
