#!/usr/bin/env bash
# make test-cluster: start a one-node SLURM and a PostgreSQL server (cluster.sh), run the cluster
# checks against them (cluster_checks.py), and stop both, whatever the checks did.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
trap 'tests/cluster/cluster.sh stop' EXIT
started=$(tests/cluster/cluster.sh start)  # a failed start ends here (and stops what it started)
eval "$(tail -n 1 <<<"$started")"
# its own temporary folder: pytest runs started meanwhile rotate away the shared one's old entries
"$PYTHON" -m pytest -q -p no:cacheprovider -s --basetemp="${CLUSTER_DIR:-/tmp/genlab-cluster}/pytest" \
  tests/cluster/cluster_checks.py "$@"
