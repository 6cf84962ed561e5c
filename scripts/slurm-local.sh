#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, to try cluster sweeps (hydra/launcher=slurm) without a cluster.
#
#   bash scripts/slurm-local.sh up      # install what is missing, start munge, MariaDB, slurmdbd, slurmctld, slurmd
#   bash scripts/slurm-local.sh status  # which daemons run, and sinfo
#   bash scripts/slurm-local.sh down    # stop every daemon this script started (by its pid file)
#
# Needs root and apt (Debian/Ubuntu); no systemd: the daemons are started here and stopped by pid file.
# Everything (config, state, spool, logs, pid files, the accounting database) lives under one folder,
# SLURM_LOCAL_DIR (default /tmp/modnets-slurm). Accounting (slurmdbd on a local MariaDB) is included:
# without it submitit never learns that a job was cancelled. `up` and `down` are idempotent.
# Clients find the cluster through SLURM_CONF=$SLURM_LOCAL_DIR/etc/slurm.conf, also linked from
# /etc/slurm/slurm.conf when no other config is there.
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/modnets-slurm}
CLUSTER=modnets
PACKAGES=(munge mariadb-server slurmctld slurmd slurmdbd slurm-client)
export SLURM_CONF=$DIR/etc/slurm.conf

die() { echo "slurm-local.sh: $*" >&2; exit 2; }
say() { echo "slurm-local.sh: $*"; }

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_missing() {
  local missing=() cmd
  for cmd in munged mariadbd slurmctld slurmd slurmdbd sinfo; do
    command -v "$cmd" >/dev/null || missing+=("$cmd")
  done
  [ ${#missing[@]} -eq 0 ] && return
  say "installing ${PACKAGES[*]} (missing: ${missing[*]})"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
}

write_config() {
  local node cpus mem
  node=$(hostname -s)
  cpus=$(nproc)
  mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  mem=$((mem * 9 / 10))  # below what slurmd measures, or the node is drained
  mkdir -p "$DIR"/{etc,state,spool,log,run}
  cat >"$DIR/etc/slurm.conf" <<EOF
# written by modnets scripts/slurm-local.sh
ClusterName=$CLUSTER
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10  # also the wait before a requeued job starts again (default 120 s)
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=60
KillWait=2  # seconds between SIGTERM and SIGKILL for a cancelled job (submitit ignores SIGTERM)
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$DIR/etc/slurmdbd.conf" <<EOF
# written by modnets scripts/slurm-local.sh
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$DIR/etc/slurmdbd.conf"
  if [ ! -e /etc/slurm/slurm.conf ] || [ "$(readlink /etc/slurm/slurm.conf)" = "$DIR/etc/slurm.conf" ]; then
    mkdir -p /etc/slurm && ln -sfn "$DIR/etc/slurm.conf" /etc/slurm/slurm.conf
  fi
}

# wait_for SECONDS WHAT COMMAND...: poll COMMAND every half second until it succeeds
wait_for() {
  local seconds=$1 what=$2
  shift 2
  for _ in $(seq $((seconds * 2))); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  die "$what did not come up within ${seconds}s (logs in $DIR/log, $DIR/mysql/mariadb.log)"
}

start_munge() {
  alive "$DIR/munge/munged.pid" && return
  if [ -S /run/munge/munge.socket.2 ] && munge -n </dev/null >/dev/null 2>&1; then
    return  # a munged started elsewhere answers: use it, and leave it alone on `down`
  fi
  mkdir -p /run/munge "$DIR/munge"
  chown munge:munge /run/munge "$DIR/munge"
  [ -s /etc/munge/munge.key ] || { mungekey --create --force && chown munge:munge /etc/munge/munge.key; }
  runuser -u munge -- munged --force --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
    --seed-file="$DIR/munge/munged.seed" </dev/null >/dev/null 2>&1
  wait_for 10 munged munge -n
}

start_mariadb() {
  local data=$DIR/mysql
  alive "$data/mariadb.pid" && return
  if [ ! -d "$data/mysql" ]; then
    mkdir -p "$data" && chown mysql:mysql "$data"
    mariadb-install-db --user=mysql --datadir="$data" --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1 \
      || die "mariadb-install-db failed (see $DIR/log/mariadb-install.log)"
  fi
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
  setsid mariadbd --user=mysql --datadir="$data" --skip-networking --socket=/run/mysqld/mysqld.sock \
    --pid-file="$data/mariadb.pid" --log-error="$data/mariadb.log" </dev/null >/dev/null 2>&1 &
  wait_for 30 MariaDB mariadb --socket=/run/mysqld/mysqld.sock -e "SELECT 1"
  mariadb --socket=/run/mysqld/mysqld.sock -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
}

start_slurm() {
  if ! alive "$DIR/run/slurmdbd.pid"; then
    slurmdbd </dev/null >>"$DIR/log/daemons.log" 2>&1
  fi
  wait_for 30 slurmdbd sacctmgr -n list cluster
  sacctmgr -n list cluster format=cluster | grep -qw "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
  alive "$DIR/run/slurmctld.pid" || slurmctld </dev/null >>"$DIR/log/daemons.log" 2>&1
  alive "$DIR/run/slurmd.pid" || slurmd </dev/null >>"$DIR/log/daemons.log" 2>&1
  wait_for 60 "the node (idle in sinfo)" node_ready
}

node_ready() { sinfo -h -N -o %t | grep -Eqx 'idle|mix|alloc|comp'; }  # idle, or already running jobs

stop() {  # stop NAME PIDFILE: TERM, then KILL after 20 s
  local name=$1 pidfile=$2 pid
  alive "$pidfile" || { rm -f "$pidfile"; return 0; }
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -0 "$pid" 2>/dev/null && { say "$name ($pid) did not stop: killing it"; kill -9 "$pid" 2>/dev/null || true; }
  rm -f "$pidfile"
  say "stopped $name"
}

status() {
  local name pidfile state=0
  for name in munged:munge/munged.pid mariadbd:mysql/mariadb.pid slurmdbd:run/slurmdbd.pid \
    slurmctld:run/slurmctld.pid slurmd:run/slurmd.pid; do
    pidfile=$DIR/${name#*:}
    if alive "$pidfile"; then echo "${name%%:*}: running (pid $(cat "$pidfile"))"; else echo "${name%%:*}: stopped"; state=1; fi
  done
  [ $state -eq 0 ] && sinfo
  echo "export SLURM_CONF=$SLURM_CONF"
  return $state
}

case ${1:-} in
  up)
    [ "$(id -u)" -eq 0 ] || die "needs root (it installs packages and starts daemons); run it with sudo"
    command -v apt-get >/dev/null || die "needs apt-get (Debian or Ubuntu) to install slurm, munge and MariaDB"
    install_missing
    write_config
    start_munge
    start_mariadb
    start_slurm
    say "cluster '$CLUSTER' is up: $(sinfo -h -N -o '%N %t, %c CPUs') (state, logs: $DIR); clients: export SLURM_CONF=$SLURM_CONF"
    ;;
  down)
    [ "$(id -u)" -eq 0 ] || die "needs root to stop the daemons it started"
    stop slurmd "$DIR/run/slurmd.pid"
    stop slurmctld "$DIR/run/slurmctld.pid"
    stop slurmdbd "$DIR/run/slurmdbd.pid"
    stop mariadbd "$DIR/mysql/mariadb.pid"
    stop munged "$DIR/munge/munged.pid"
    ;;
  status) status ;;
  *) echo "usage: bash scripts/slurm-local.sh up|down|status  (folder: SLURM_LOCAL_DIR=$DIR)" >&2; exit 2 ;;
esac
