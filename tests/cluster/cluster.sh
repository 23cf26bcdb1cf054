#!/usr/bin/env bash
# A one-node SLURM cluster and a PostgreSQL server on this machine, for `make test-cluster`
# (root; Debian's slurm-wlm, munge and postgresql packages, installed when missing). Everything
# lives in $CLUSTER_DIR (default /tmp/genlab-cluster): configs, state, logs, sockets, pid files;
# nothing under /etc is changed, and the daemons use their own ports (SLURM 6917-6918, PostgreSQL
# 5499), so a SLURM or PostgreSQL already on the machine is left alone.
#   cluster.sh start   install if missing, write the configs, start munged, slurmctld, slurmd and
#                      postgres; wait until the node is idle; print the lines to source (SLURM_CONF, ...)
#   cluster.sh stop    stop the daemons started by `start` (their pid files), and nothing else
# Accounting is off (no slurmdbd): `sacct` fails, which the sweep's console does not show.
set -eu
dir=${CLUSTER_DIR:-/tmp/genlab-cluster}
cmd=${1:-start}
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)

stop() {
  for name in slurmd slurmctld munged; do
    pid_file=$dir/$name.pid
    if [ -s "$pid_file" ]; then
      pid=$(cat "$pid_file")
      # a pid file left by a daemon that died may name a process that reused its number: only the daemon
      if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      fi
    fi
    rm -f "$pid_file"
  done
  if [ -f "$dir/pg/postmaster.pid" ]; then runuser -u postgres -- "$pg_bin/pg_ctl" -D "$dir/pg" -m fast -w stop >/dev/null || true; fi
}

if [ "$cmd" = stop ]; then stop; exit 0; fi
[ "$(id -u)" = 0 ] || { echo "cluster.sh: needs root (it starts SLURM's daemons)"; exit 1; }
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || [ -z "$pg_bin" ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge postgresql >/dev/null
  pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
fi
stop  # a start after a start that was not stopped
trap 'stop' ERR  # a start that fails leaves nothing running
mkdir -p "$dir"/{munge,slurmctld,slurmd,log,pg-socket,pg-log}; chown root "$dir/log"; chmod 700 "$dir/log"
host=$(hostname -s); cpus=$(nproc); mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048 ))
[ -s "$dir/munge.key" ] || dd if=/dev/urandom bs=1 count=1024 of="$dir/munge.key" 2>/dev/null
chmod 400 "$dir/munge.key"; chmod 700 "$dir/munge"
cat > "$dir/slurm.conf" <<CONF
ClusterName=genlab
SlurmctldHost=$host
SlurmctldPort=6917
SlurmdPort=6918
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/slurmctld
SlurmdSpoolDir=$dir/slurmd
SlurmctldPidFile=$dir/slurmctld/slurmctld.pid
SlurmdPidFile=$dir/slurmd/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
KillWait=10
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
export SLURM_CONF=$dir/slurm.conf
/usr/sbin/munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge.key" \
  --pid-file="$dir/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed"
setsid /usr/sbin/slurmctld -D -f "$SLURM_CONF" >"$dir/log/slurmctld.out" 2>&1 < /dev/null &
echo $! > "$dir/slurmctld.pid"
sleep 2
setsid /usr/sbin/slurmd -D -f "$SLURM_CONF" >"$dir/log/slurmd.out" 2>&1 < /dev/null &
echo $! > "$dir/slurmd.pid"
if [ ! -d "$dir/pg" ]; then
  mkdir -p "$dir/pg"; chown postgres "$dir/pg"
  runuser -u postgres -- "$pg_bin/initdb" -D "$dir/pg" -A trust -U postgres >/dev/null
fi
chown postgres "$dir/pg-socket" "$dir/pg-log"
runuser -u postgres -- "$pg_bin/pg_ctl" -D "$dir/pg" -l "$dir/pg-log/postgres.log" -w \
  -o "-p 5499 -k $dir/pg-socket -c listen_addresses=127.0.0.1" start >/dev/null
runuser -u postgres -- "$pg_bin/psql" -h 127.0.0.1 -p 5499 -U postgres -qtc "DROP DATABASE IF EXISTS optuna" >/dev/null
runuser -u postgres -- "$pg_bin/psql" -h 127.0.0.1 -p 5499 -U postgres -qtc "CREATE DATABASE optuna" >/dev/null
for _ in $(seq 60); do
  if sinfo -h -o %t 2>/dev/null | grep -qE '^idle'; then
    echo "export SLURM_CONF=$SLURM_CONF GENLAB_OPTUNA_DB=postgresql://postgres@127.0.0.1:5499/optuna"
    exit 0
  fi
  sleep 1
done
echo "cluster.sh: SLURM did not come up: see $dir/log/" >&2; stop; exit 1
