#!/usr/bin/env bash
# A two-node SLURM cluster with accounting, and a PostgreSQL server, on this one machine, for
# `make test-cluster` (root; Debian's slurm-wlm, slurmdbd, mariadb-server, munge, postgresql and
# iproute2, installed when missing).
#
# Three network namespaces on a bridge of their own are three hosts: gl-ctl (slurmctld, slurmdbd),
# gl-node1 and gl-node2 (a slurmd each), each with its own address, hostname (a UTS namespace) and
# /etc/hosts (a mount namespace). This machine reaches them through the
# bridge's first address, so sbatch, squeue and sacct run here as on a login node. MariaDB
# (slurmdbd's database), munged and PostgreSQL (Optuna's studies) listen on Unix sockets only.
#
# Safe to run as root on a shared machine: everything it writes is in a fresh private folder
# (mktemp -d, mode 0700; PostgreSQL's in a second one owned by postgres), with a new munge key and a
# new PostgreSQL password each start; the daemons' ports are inside the namespaces, so none is
# opened on this machine's addresses. Every process it starts is recorded with its start time
# (/proc/<pid>/stat), and `stop` ends only a process whose pid and start time both match, and the
# processes left inside its own namespaces.
#   cluster.sh start           install if missing, start everything, wait until both nodes are idle;
#                              the last line printed is the `export ...` line to eval
#   cluster.sh stop [folder]   cancel the jobs, stop what `start` started, remove the namespaces, the
#                              bridge and the folders (default folder: $GENLAB_CLUSTER_DIR)
#   cluster.sh on NODE CMD...  run CMD on gl-node1 or gl-node2 (its namespace and hostname)
set -euo pipefail
cmd=${1:-}
MARK="genlab test cluster"
NODES="gl-node1 gl-node2"

die() { echo "cluster.sh: $*" >&2; exit 1; }

# a process's start time (clock ticks after boot): with its pid, what names it; none once it ended
# (a zombie waiting for init to reap it has ended)
start_time() {
  local stat; stat=$(cat "/proc/$1/stat" 2>/dev/null) && stat=${stat##*) } && [ "${stat%% *}" != Z ] && cut -d' ' -f20 <<<"$stat"
}

# a folder this script made: root's, mode 0700, with its mark (anything else is not touched)
checked_dir() {
  local d=$1
  [ -d "$d" ] && [ ! -L "$d" ] && [ "$(stat -c '%u %a' "$d")" = "0 700" ] && [ "$(head -n1 "$d/state" 2>/dev/null)" = "$MARK" ] \
    || die "$d is not a folder that cluster.sh start made (root's, mode 0700, with its state file)"
  echo "$d"
}

state() { sed -n "s/^$1=//p" "$dir/state"; }

# starts a daemon that stays in the foreground and records its pid ($!: setsid and the namespace
# wrappers exec it in place) with its start time
spawn() {
  local name=$1; shift
  setsid "$@" >"$dir/log/$name.out" 2>&1 </dev/null &
  local pid=$!
  sleep 0.2
  local started; started=$(start_time "$pid") || die "$name ended at once: $(tail -n 5 "$dir/log/$name.out")"
  echo "$name $pid $started" >>"$dir/pids"
}

# "${in_ns[@]//@NS@/<namespace>}" HOSTNAME CMD...: CMD in that network namespace, under that hostname
# (a UTS namespace), with the cluster's hosts file as /etc/hosts (a mount namespace; ip netns exec
# would also remount /sys without the cgroup file systems slurmd needs). Each wrapper execs the
# next, so CMD keeps the first one's pid.
in_ns=(nsenter --net=/run/netns/@NS@ unshare --uts --mount --propagation slave
       sh -c 'hostname "$0" && mount --bind "$GENLAB_CLUSTER_HOSTS" /etc/hosts && exec "$@"')

stop() {
  [ -f "$dir/state" ] || return 0
  export SLURM_CONF=$dir/slurm.conf
  if [ -S "$dir/munge/munge.socket" ] && timeout 10 squeue -h >/dev/null 2>&1; then
    jobs=$(timeout 10 squeue -h -o %A 2>/dev/null | sort -u) || true
    if [ -n "$jobs" ]; then
      timeout 10 scancel $jobs 2>/dev/null || true
      for _ in $(seq 30); do [ -z "$(timeout 10 squeue -h -o %A 2>/dev/null)" ] && break; sleep 1; done
    fi
  fi
  local ns
  if [ -f "$dir/pids" ]; then
    while read -r name pid started; do
      if [ "$(start_time "$pid")" = "$started" ]; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do [ "$(start_time "$pid")" = "$started" ] || break; sleep 0.2; done
        [ "$(start_time "$pid")" = "$started" ] && kill -9 "$pid" 2>/dev/null || true
      fi
    done < <(tac "$dir/pids")
  fi
  for ns in $(state namespaces); do
    # what is left in our own namespaces (job steps, torchrun agents) was started by us
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
  [ -n "$(state bridge)" ] && ip link del "$(state bridge)" 2>/dev/null || true
  local pg; pg=$(state pg_dir)
  [ -n "$pg" ] && [ -d "$pg" ] && [ ! -L "$pg" ] && [ "$(stat -c %U "$pg")" = postgres ] && rm -rf "$pg"
  rm -rf "$dir"
}

case "$cmd" in
  stop)
    dir=$(checked_dir "${2:-${GENLAB_CLUSTER_DIR:-}}")
    stop
    exit 0 ;;
  on)
    [ $# -ge 3 ] || die "usage: cluster.sh on gl-node1|gl-node2 CMD..."
    dir=$(checked_dir "${GENLAB_CLUSTER_DIR:-}")
    ns=$(state "ns_$2"); [ -n "$ns" ] || die "no node $2 (the nodes: $NODES)"
    node=$2; shift 2
    export GENLAB_CLUSTER_HOSTS=$dir/hosts
    exec "${in_ns[@]//@NS@/$ns}" "$node" "$@" ;;
  start) ;;
  *) die "usage: cluster.sh start | stop [folder] | on NODE CMD..." ;;
esac

[ "$(id -u)" = 0 ] || die "needs root (it starts SLURM's daemons and makes network namespaces)"
missing=no
for tool in slurmctld slurmd slurmdbd munged mariadbd mariadb-install-db ip setpriv unshare; do
  command -v "$tool" >/dev/null || missing=yes
done
if [ $missing = yes ] || [ -z "$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null)" ]; then
  # Debian's packages start their services on install (munge, mariadb, slurmd, postgresql, with
  # the machine's own configs): policy-rc.d tells them not to, unless the machine has one already
  policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    trap 'rm -f "$policy"' EXIT
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy"
  fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    slurm-wlm slurmdbd mariadb-server munge postgresql iproute2 util-linux >/dev/null
  [ -z "$policy" ] || { rm -f "$policy"; trap - EXIT; }
fi
pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)

dir=$(mktemp -d -t genlab-cluster.XXXXXXXX)  # fresh: mktemp makes it, mode 0700
chmod 700 "$dir"
echo "$MARK" >"$dir/state"
trap 'status=$?; [ $status = 0 ] || { echo "cluster.sh: start failed; the logs: $(tail -n 20 "$dir"/log/* 2>/dev/null)" >&2; stop; }' EXIT
mkdir -m 700 "$dir"/{munge,log,ctld,mysql,spool}

# the network: a bridge with this machine's address, a namespace per host; names and a 10.x.y.0/24
# that nothing on this machine uses yet
id=$(head -c3 /dev/urandom | od -An -tx1 | tr -d ' \n')
for _ in $(seq 50); do
  net="10.$(( 100 + RANDOM % 150 )).$(( RANDOM % 256 ))"
  ip -4 -o addr | grep -qF " $net." || ip -4 route | grep -qF "$net." || break
done
bridge=glb$id
echo "bridge=$bridge" >>"$dir/state"
ip link add "$bridge" type bridge
ip addr add "$net.1/24" dev "$bridge"
ip link set "$bridge" up
hosts="127.0.0.1 localhost
$net.2 gl-ctl
$net.11 gl-node1
$net.12 gl-node2"
namespaces=""
i=0
for host in gl-ctl $NODES; do
  i=$((i + 1))
  ns=genlab-$id-${host#gl-}
  ip netns add "$ns"  # fails if the name is taken
  namespaces="$namespaces $ns"
  sed -i "/^namespaces=/d" "$dir/state"; echo "namespaces=$namespaces" >>"$dir/state"
  echo "ns_$host=$ns" >>"$dir/state"
  ip link add "gl$id$i" type veth peer name eth0 netns "$ns"
  ip link set "gl$id$i" master "$bridge" up
  addr=$(awk -v h="$host" '$2 == h {print $1}' <<<"$hosts")
  ip -n "$ns" addr add "$addr/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
done
echo "$hosts" >"$dir/hosts"
export GENLAB_CLUSTER_HOSTS=$dir/hosts

# munge: a new key for this cluster alone
dd if=/dev/urandom bs=1 count=1024 of="$dir/munge.key" 2>/dev/null
chmod 400 "$dir/munge.key"
spawn munged /usr/sbin/munged -F --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge.key" \
  --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed"

# MariaDB for slurmdbd: root's, on a socket in the folder, no network, no option file of this machine
mariadb-install-db --no-defaults --user=root --datadir="$dir/mysql" --auth-root-authentication-method=socket \
  --skip-test-db >"$dir/log/mariadb-install.out" 2>&1
export MYSQL_UNIX_PORT=$dir/mysqld.sock  # the client library's socket: slurmdbd's, and mariadb's below
spawn mariadbd /usr/sbin/mariadbd --no-defaults --user=root --datadir="$dir/mysql" --socket="$MYSQL_UNIX_PORT" \
  --skip-networking --pid-file="$dir/mysqld.pid" --log-error="$dir/log/mariadb.log" \
  --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900
for _ in $(seq 60); do mariadb --no-defaults -uroot -e 'SELECT 1' >/dev/null 2>&1 && break; sleep 0.5; done

cpus=$(nproc); mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 - 1024 ))
cat >"$dir/slurmdbd.conf" <<CONF
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
DbdHost=gl-ctl
DbdAddr=$net.2
SlurmUser=root
LogFile=$dir/log/slurmdbd.log
PidFile=$dir/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
CONF
chmod 600 "$dir/slurmdbd.conf"
# Each node offers four times the machine's cores (config_overrides: slurmd takes the configured
# count), so that the checks' small jobs run side by side; they take a core each, mostly waiting.
cat >"$dir/slurm.conf" <<CONF
ClusterName=genlab
SlurmctldHost=gl-ctl($net.2)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/spool/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$net.2
# for slurmdbd connections, the munge socket to use (the default one is not ours)
AccountingStoragePass=$dir/munge/munge.socket
SchedulerType=sched/backfill
KillWait=10
NodeName=gl-node1 NodeAddr=$net.11 CPUs=$(( 4 * cpus )) RealMemory=$mem State=UNKNOWN
NodeName=gl-node2 NodeAddr=$net.12 CPUs=$(( 4 * cpus )) RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
export SLURM_CONF=$dir/slurm.conf  # slurmdbd reads the slurmdbd.conf beside it
ctl_ns=$(state ns_gl-ctl)
spawn slurmdbd "${in_ns[@]//@NS@/$ctl_ns}" gl-ctl /usr/sbin/slurmdbd -D
for _ in $(seq 60); do timeout 5 sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.5; done
timeout 30 sacctmgr -i add cluster genlab >/dev/null
spawn slurmctld "${in_ns[@]//@NS@/$ctl_ns}" gl-ctl /usr/sbin/slurmctld -D -f "$SLURM_CONF"
for node in $NODES; do
  mkdir -m 700 "$dir/spool/$node"
  ns=$(state "ns_$node")
  spawn "slurmd-$node" "${in_ns[@]//@NS@/$ns}" "$node" /usr/sbin/slurmd -D -f "$SLURM_CONF"
done

# PostgreSQL: its own private folder (postgres must own it), a socket there and a password
pg_dir=$(setpriv --reuid=postgres --regid=postgres --clear-groups mktemp -d -t genlab-pg.XXXXXXXX)
echo "pg_dir=$pg_dir" >>"$dir/state"
password=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
(umask 077; echo "$password" | setpriv --reuid=postgres --regid=postgres --clear-groups tee "$pg_dir/password" >/dev/null)
setpriv --reuid=postgres --regid=postgres --clear-groups "$pg_bin/initdb" -D "$pg_dir/data" -U postgres \
  --auth=scram-sha-256 --pwfile="$pg_dir/password" >"$dir/log/initdb.out" 2>&1
spawn postgres setpriv --reuid=postgres --regid=postgres --clear-groups "$pg_bin/postgres" -D "$pg_dir/data" \
  -c listen_addresses= -c unix_socket_directories="$pg_dir" -c unix_socket_permissions=0700 -p 5432
export PGPASSWORD=$password
for _ in $(seq 60); do "$pg_bin/pg_isready" -q -h "$pg_dir" -p 5432 && break; sleep 0.5; done
"$pg_bin/psql" -h "$pg_dir" -p 5432 -U postgres -qtc "CREATE DATABASE optuna" >/dev/null

for _ in $(seq 90); do
  if [ "$(sinfo -h -N -o '%N %t' 2>/dev/null | grep -c ' idle')" = 2 ]; then
    trap - EXIT
    echo "export GENLAB_CLUSTER_DIR=$dir SLURM_CONF=$SLURM_CONF MYSQL_UNIX_PORT=$MYSQL_UNIX_PORT" \
      "GENLAB_OPTUNA_DB='postgresql://postgres:$password@/optuna?host=$pg_dir&port=5432'"
    exit 0
  fi
  sleep 1
done
die "SLURM's two nodes did not come up: $(sinfo -N 2>&1)"
