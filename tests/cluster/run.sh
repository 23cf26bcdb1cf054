#!/usr/bin/env bash
# make test-cluster: start a one-node SLURM and a PostgreSQL server (cluster.sh), run the cluster
# checks against them (cluster_checks.py), and stop both, whatever the checks did.
set -eu
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
trap 'tests/cluster/cluster.sh stop' EXIT
eval "$(tests/cluster/cluster.sh start | tail -n 1)"
# its own temporary folder: pytest runs started meanwhile rotate away the shared one's old entries
"$PYTHON" -m pytest -q -p no:cacheprovider -s --basetemp="${CLUSTER_DIR:-/tmp/genlab-cluster}/pytest" \
  tests/cluster/cluster_checks.py "$@"
