#!/usr/bin/env bash
# make test-cluster: start a two-node SLURM with accounting and a PostgreSQL server (cluster.sh), run
# the cluster checks against them (cluster_checks.py), and stop everything, whatever the checks did;
# when a check fails, the daemons' last log lines are printed first.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
started=$(tests/cluster/cluster.sh start)  # a failed start ends here (and stops what it started)
eval "$(tail -n 1 <<<"$started")"
finish() {
  status=$?
  if [ $status != 0 ]; then tail -n 15 "$GENLAB_CLUSTER_DIR"/log/*.log >&2 || true; fi
  tests/cluster/cluster.sh stop "$GENLAB_CLUSTER_DIR"
  exit $status
}
trap finish EXIT
trap 'exit 130' INT TERM
# pytest's folder inside the cluster's: pytest runs started meanwhile rotate away the shared one's entries
"$PYTHON" -m pytest -q -p no:cacheprovider -s --basetemp="$GENLAB_CLUSTER_DIR/pytest" \
  tests/cluster/cluster_checks.py "$@"
