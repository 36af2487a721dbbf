#!/usr/bin/env bash
# up.sh - a throw-away Slurm cluster on this one machine, to try the batch scripts in slurm/.
#
# Starts Debian's munged, slurmctld and one slurmd per node, with every file they use (munge
# key and socket, slurm.conf, state, spool, logs, pid files) under $SLURM_TEST_ROOT. Nothing
# outside it is touched except /etc/hosts, which gets one line marked with $ROOT when node names
# do not resolve (the emulated nodes n1..nN); down.sh removes that line only. Two testbeds under
# two roots, with their own ports and first job ids, run side by side without touching each
# other (the test suite gives each of its sessions its own). Installs the packages with apt-get
# when they are missing (root). Idempotent: a healthy cluster with the same settings is left
# as it is; a stale, partial or differently configured one is torn down and started afresh
# (new state: job ids start again at 1).
#
#   slurm/testbed/up.sh                      # one node, named after this host
#   SLURM_TEST_NODES=2 slurm/testbed/up.sh   # two emulated nodes n1, n2 (one slurmd each)
#   export SLURM_CONF=/tmp/lenet-slurm/etc/slurm.conf   # what up.sh prints; clients need it
#   sbatch --nodes=1 slurm/ddp_srun.sbatch configs/cpu.yaml train.epochs=1
#   slurm/testbed/down.sh
#
# Settings (environment):
#   SLURM_TEST_ROOT        where everything lives (default /tmp/lenet-slurm)
#   SLURM_TEST_NODES       number of nodes (default 1). 1: this host under its own name;
#                          N > 1: emulated nodes n1..nN on this host, each declaring the whole
#                          machine's CPUs (Debian builds slurmd with multiple-slurmd support)
#   SLURM_TEST_CPUS        CPUs each node declares (default: this machine's, as slurmd -C finds
#                          them); more than the machine has lets more test jobs run at once
#   SLURM_TEST_GPUS        fake GPUs per node (default 2): gres.conf entries backed by character
#                          devices under $ROOT/dev, so --gpus-per-node jobs schedule and get
#                          CUDA_VISIBLE_DEVICES; torch still sees no CUDA and trains on CPU (gloo)
#   SLURM_TEST_PARTITIONS  partition names over all nodes, the first is the default
#                          (default "debug gpu cpu": the names the batch scripts ask for)
#   SLURM_TEST_CTLD_PORT   slurmctld port (default 6817)
#   SLURM_TEST_SLURMD_PORT port of the first slurmd (default 6818; node i uses +i-1)
#   SLURM_TEST_FIRST_JOB_ID the first job id (default 1). The batch scripts' default rendezvous
#                          port is 20000 + job id % 10000: testbeds running at once on one
#                          machine need job ids far apart, or their jobs meet on one port
#   SLURM_TEST_INSTALL     1 (default): apt-get install missing packages; 0: fail instead
#
# Prints "export SLURM_CONF=..." on stdout (also written to $ROOT/env.sh); logs go to stderr.
# The cluster has no accounting daemon: sacct does not work; use `scontrol show job ID` (jobs
# stay visible for 5 minutes after they end) or $ROOT/log/jobcomp.log.
set -euo pipefail

ROOT=${SLURM_TEST_ROOT:-/tmp/lenet-slurm}
NODES=${SLURM_TEST_NODES:-1}
CPUS=${SLURM_TEST_CPUS:-}
GPUS=${SLURM_TEST_GPUS:-2}
PARTITIONS=${SLURM_TEST_PARTITIONS:-debug gpu cpu}
CTLD_PORT=${SLURM_TEST_CTLD_PORT:-6817}
SLURMD_PORT=${SLURM_TEST_SLURMD_PORT:-6818}
FIRST_JOB_ID=${SLURM_TEST_FIRST_JOB_ID:-1}
INSTALL=${SLURM_TEST_INSTALL:-1}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HOST=$(hostname -s)
CONF=$ROOT/etc/slurm.conf
MUNGE_SOCKET=$ROOT/munge/run/munge.socket.2
# ends with a colon: the mark of /tmp/x must not match a line of /tmp/x-2 (grep -F)
HOSTS_MARK="# lenet-slurm-testbed:$ROOT:"
SETTINGS="nodes=$NODES cpus=${CPUS:-auto} gpus=$GPUS partitions=$PARTITIONS"
SETTINGS+=" ports=$CTLD_PORT,$SLURMD_PORT first_job_id=$FIRST_JOB_ID"
export SLURM_CONF=$CONF

log() { echo "[testbed up $(date +%T)] $*" >&2; }
die() {
  log "error: $*"
  local f
  for f in "$ROOT"/log/*.log "$ROOT"/munge/log/munged.log; do
    [ -f "$f" ] && { echo "--- last lines of $f" >&2; tail -n 15 "$f" >&2; }
  done
  exit 1
}

[[ $ROOT == /?* && $ROOT != *[[:space:]]* ]] ||
  die "SLURM_TEST_ROOT=$ROOT: use an absolute path without spaces"
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "SLURM_TEST_NODES=$NODES: use a number >= 1"
[[ $CPUS =~ ^([1-9][0-9]*)?$ ]] || die "SLURM_TEST_CPUS=$CPUS: use a number >= 1"
[[ $GPUS =~ ^[0-9]+$ ]] || die "SLURM_TEST_GPUS=$GPUS: use a number >= 0"
[[ $FIRST_JOB_ID =~ ^[1-9][0-9]*$ ]] ||
  die "SLURM_TEST_FIRST_JOB_ID=$FIRST_JOB_ID: use a number >= 1"
[ -n "${PARTITIONS// /}" ] || die "SLURM_TEST_PARTITIONS is empty: name at least one partition"
if [ "$NODES" = 1 ]; then
  NODE_NAMES=("$HOST")
else
  NODE_NAMES=()
  for i in $(seq "$NODES"); do NODE_NAMES+=("n$i"); done
fi

# -- packages -----------------------------------------------------------------------------
# The daemons (munged, slurmctld, slurmd) live in /usr/sbin, which many a PATH leaves out.
export PATH="$PATH:/usr/sbin:/sbin"
missing=()
for cmd in munged mungekey munge slurmctld slurmd sbatch srun scontrol; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
PACKAGES="slurmctld slurmd slurm-client munge"
if [ "${#missing[@]}" -gt 0 ]; then
  [ "$INSTALL" = 1 ] || die "missing ${missing[*]} and SLURM_TEST_INSTALL=0; install $PACKAGES"
  [ "$(id -u)" = 0 ] || die "missing ${missing[*]}; install $PACKAGES (or run this as root)"
  command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
  log "installing $PACKAGES (apt-get, no recommends)"
  apt-get update -qq >/dev/null || die "apt-get update failed"
  # shellcheck disable=SC2086 # one argument per package
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $PACKAGES \
    >/dev/null || die "apt-get install failed"
fi

# -- helpers ------------------------------------------------------------------------------
# ours PIDFILE COMM: print the pid in PIDFILE if it is a live COMM process started with $ROOT
# in its command line (so a recycled pid, someone else's daemon or the daemon of a testbed
# under another root is never mistaken for ours).
ours() {
  local pid cmd
  [ -s "$1" ] || return 1
  pid=$(tr -dc '0-9' <"$1")
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
  cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  [[ $cmd == *"$ROOT/"* ]] || return 1
  echo "$pid"
}

healthy() {
  local n bad
  [ "$(cat "$ROOT/settings" 2>/dev/null)" = "$SETTINGS" ] || return 1
  ours "$ROOT/munge/run/munged.pid" munged >/dev/null || return 1
  ours "$ROOT/run/slurmctld.pid" slurmctld >/dev/null || return 1
  for n in "${NODE_NAMES[@]}"; do ours "$ROOT/run/slurmd-$n.pid" slurmd >/dev/null || return 1; done
  timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP' || return 1
  # every node registered and schedulable (not down, drained or unknown)
  bad=$(timeout 5 sinfo -h -N -o '%N %t' 2>/dev/null | sort -u |
    awk '$2 !~ /^(idle|mix|alloc)$/ {b++} END {print b + 0}') || return 1
  [ "$bad" = 0 ] && [ "$(timeout 5 sinfo -h -N -o '%N' | sort -u | wc -l)" = "$NODES" ]
}

if healthy; then
  log "already up under $ROOT ($SETTINGS)"
  echo "export SLURM_CONF=$CONF"
  exit 0
fi
if compgen -G "$ROOT/run/*.pid" >/dev/null || [ -e "$ROOT/munge/run/munged.pid" ]; then
  log "a stale, partial or differently configured cluster is under $ROOT: stopping it first"
  SLURM_TEST_ROOT=$ROOT "$HERE/down.sh" >&2 || true
fi
for port in "$CTLD_PORT" $(seq "$SLURMD_PORT" $((SLURMD_PORT + NODES - 1))); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "port $port is in use (another Slurm?); choose SLURM_TEST_CTLD_PORT/SLURM_TEST_SLURMD_PORT"
  fi
done
started=$(date +%s.%N)

# -- layout: fresh state ------------------------------------------------------------------
rm -rf "${ROOT:?}/etc" "$ROOT/state" "$ROOT/spool" "$ROOT/log" "$ROOT/run" "$ROOT/munge" \
  "${ROOT:?}/dev" "$ROOT/settings" "$ROOT/env.sh"
mkdir -p "$ROOT/etc" "$ROOT/state" "$ROOT/log" "$ROOT/run" \
  "$ROOT/munge/etc" "$ROOT/munge/run" "$ROOT/munge/log"
for n in "${NODE_NAMES[@]}"; do mkdir -p "$ROOT/spool/slurmd-$n"; done # slurmd needs it first
chmod 755 "$ROOT" "$ROOT/munge" "$ROOT/munge/run" # munged refuses a socket dir without o+x
chmod 700 "$ROOT/munge/etc"                       # the key stays private

# -- munge: a private key and socket --------------------------------------------------------
mungekey -c -k "$ROOT/munge/etc/munge.key"
munged -S "$MUNGE_SOCKET" --key-file="$ROOT/munge/etc/munge.key" \
  --log-file="$ROOT/munge/log/munged.log" --pid-file="$ROOT/munge/run/munged.pid" \
  --seed-file="$ROOT/munge/etc/munged.seed" </dev/null >/dev/null 2>&1 ||
  die "munged did not start"
for _ in $(seq 50); do
  munge -n -S "$MUNGE_SOCKET" 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1 && break
  sleep 0.1
done
munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET" >/dev/null || die "munge does not answer"

# -- slurm.conf ---------------------------------------------------------------------------
HARDWARE=$(slurmd -C | head -n1 | sed 's/^NodeName=[^ ]* //') # CPUs=.. ... RealMemory=..
if [ -n "$CPUS" ]; then
  # declared, not detected: slurmd must take the configuration's word for it (config_overrides)
  HARDWARE="CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1"
  HARDWARE+=" $(slurmd -C | head -n1 | grep -o 'RealMemory=[0-9]*')"
fi
{
  cat <<EOF
# Written by slurm/testbed/up.sh: a single-host test cluster under $ROOT.
ClusterName=lenet-testbed
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also the delay before a requeued job may start again (default 120 s; min 5)
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool/slurmd-%n
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd-%n.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups: processes are tracked through their parents, tasks are not bound to cores
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
# look at pending jobs (a requeued one whose begin time has come) every second
SchedulerParameters=sched_interval=1,bf_interval=1
# no slurmdbd, so no sacct: one line per finished job goes to the jobcomp file instead
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$ROOT/log/jobcomp.log
JobRequeue=1
FirstJobId=$FIRST_JOB_ID
MailProg=/bin/true
# refuse at submission what can never run here (it would pend forever otherwise)
EnforcePartLimits=ALL
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
EOF
  if [ -n "$CPUS" ]; then echo "SlurmdParameters=config_overrides"; fi
  gres=""
  if [ "$GPUS" -gt 0 ]; then
    echo "GresTypes=gpu"
    gres=" Gres=gpu:$GPUS"
  fi
  if [ "$NODES" = 1 ]; then
    echo "NodeName=$HOST NodeAddr=127.0.0.1 $HARDWARE$gres State=UNKNOWN"
  else
    for i in "${!NODE_NAMES[@]}"; do
      echo "NodeName=${NODE_NAMES[$i]} NodeHostname=$HOST NodeAddr=127.0.0.1" \
        "Port=$((SLURMD_PORT + i)) $HARDWARE$gres State=UNKNOWN"
    done
  fi
  default=YES
  for p in $PARTITIONS; do
    echo "PartitionName=$p Nodes=ALL Default=$default MaxTime=INFINITE State=UP"
    default=NO
  done
} >"$CONF"

if [ "$GPUS" -gt 0 ]; then
  # Slurm wants a device file per GPU and derives CUDA_VISIBLE_DEVICES from its number; a
  # character device like /dev/null (1,3) will do (a plain file leaves it empty).
  : >"$ROOT/etc/gres.conf"
  for n in "${NODE_NAMES[@]}"; do
    mkdir -p "$ROOT/dev/$n"
    for g in $(seq 0 $((GPUS - 1))); do
      mknod "$ROOT/dev/$n/nvidia$g" c 1 3 ||
        die "mknod failed: fake GPUs need root; or set SLURM_TEST_GPUS=0"
    done
    echo "NodeName=$n Name=gpu File=$ROOT/dev/$n/nvidia[0-$((GPUS - 1))]" >>"$ROOT/etc/gres.conf"
  done
fi

# Jobs take MASTER_ADDR from the first node name, so node names must resolve. A name that
# resolves only through another testbed's line gets a line of ours too: that one goes with the
# other testbed's down.sh. The lock keeps testbeds starting or stopping at once from writing
# /etc/hosts over each other.
exec 9</etc/hosts
flock 9
testbed_names=" $({ grep -F '# lenet-slurm-testbed:' /etc/hosts || true; } | sed 's/#.*//' |
  tr -s ' \t\n' ' ') "
unresolved=()
for n in "${NODE_NAMES[@]}"; do
  if ! getent hosts "$n" >/dev/null || [[ $testbed_names == *" $n "* ]]; then unresolved+=("$n"); fi
done
if [ "${#unresolved[@]}" -gt 0 ]; then
  { grep -vF "$HOSTS_MARK" /etc/hosts || true; echo "127.0.0.1 ${unresolved[*]} $HOSTS_MARK"; } \
    >"$ROOT/hosts.new"
  cat "$ROOT/hosts.new" >/etc/hosts # rewrite in place: /etc/hosts may be a bind mount
  rm -f "$ROOT/hosts.new"
  log "added to /etc/hosts: 127.0.0.1 ${unresolved[*]}"
fi
exec 9<&-
echo "$SETTINGS" >"$ROOT/settings"

# -- daemons (each forks into the background and writes its pid file) -----------------------
slurmctld -f "$CONF" </dev/null >/dev/null 2>&1 || die "slurmctld did not start"
for _ in $(seq 100); do
  scontrol ping 2>/dev/null | grep -q 'is UP' && break
  sleep 0.1
done
scontrol ping 2>/dev/null | grep -q 'is UP' || die "slurmctld does not answer"
for n in "${NODE_NAMES[@]}"; do
  slurmd -f "$CONF" -N "$n" </dev/null >/dev/null 2>&1 || die "slurmd for node $n did not start"
done
for _ in $(seq 300); do
  healthy && break
  sleep 0.1
done
healthy || {
  sinfo -N >&2 || true
  die "the nodes did not become idle"
}

echo "export SLURM_CONF=$CONF" >"$ROOT/env.sh"
log "up in $(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}') s:" \
  "nodes ${NODE_NAMES[*]}, ${CPUS:-all} CPUs and $GPUS fake GPU(s) each, partitions $PARTITIONS"
echo "export SLURM_CONF=$CONF"
