#!/usr/bin/env bash
# down.sh - stop the test cluster that up.sh started under $SLURM_TEST_ROOT.
#
# Cancels the cluster's jobs, then stops its slurmd(s), slurmctld, any slurmstepd they left
# behind and munged. Processes are stopped by PID only: each comes from a pid file under $ROOT
# and must be a live process of the expected name with $ROOT in its command line (slurmstepd:
# with a file under $ROOT open); nothing is ever killed by name, so other people's daemons and
# jobs on this machine, and a testbed under another root, are safe. Removes the /etc/hosts line
# up.sh added for $ROOT, and no other testbed's. Safe to run when nothing is up.
#
#   slurm/testbed/down.sh           # logs and job completion records stay under $ROOT/log
#   slurm/testbed/down.sh --purge   # also delete everything up.sh wrote under $ROOT
#
# Settings (environment): SLURM_TEST_ROOT (default /tmp/lenet-slurm), as for up.sh.
set -euo pipefail

ROOT=${SLURM_TEST_ROOT:-/tmp/lenet-slurm}
HOSTS_MARK="# lenet-slurm-testbed:$ROOT:" # as up.sh writes it
PURGE=0
case "${1:-}" in
  --purge) PURGE=1 ;;
  "") ;;
  *)
    echo "usage: $0 [--purge]" >&2
    exit 2
    ;;
esac
export SLURM_CONF=$ROOT/etc/slurm.conf

log() { echo "[testbed down $(date +%T)] $*" >&2; }

ours() { # ours PIDFILE COMM: the pid in PIDFILE if it is our live COMM process (see up.sh)
  local pid cmd
  [ -s "$1" ] || return 1
  pid=$(tr -dc '0-9' <"$1")
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
  cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  [[ $cmd == *"$ROOT/"* ]] || return 1
  echo "$pid"
}

alive() { # a process that exists and is not a zombie (PID 1 may reap orphans late)
  [ -r "/proc/$1/stat" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]
}

stop() { # stop PID LABEL: SIGTERM, up to 10 s to exit, then SIGKILL
  local _
  kill -TERM "$1" 2>/dev/null || return 0
  for _ in $(seq 100); do
    alive "$1" || {
      log "stopped $2 (pid $1)"
      return 0
    }
    sleep 0.1
  done
  log "$2 (pid $1) did not stop on SIGTERM; sending SIGKILL"
  kill -KILL "$1" 2>/dev/null || true
}

stepds() { # slurmstepd processes of this cluster: they hold sockets in its spool directory
  local d fds
  for d in /proc/[0-9]*; do
    [ "$(cat "$d/comm" 2>/dev/null)" = slurmstepd ] || continue
    fds=$(ls -l "$d/fd" 2>/dev/null) || continue
    if [[ $fds == *"$ROOT/"* ]]; then echo "${d#/proc/}"; fi
  done
}

# 1. Cancel this cluster's jobs and give them a moment to end.
if ours "$ROOT/run/slurmctld.pid" slurmctld >/dev/null &&
  timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; then
  jobs=$(timeout 5 squeue -h -o %i 2>/dev/null | tr '\n' ' ' || true)
  if [ -n "${jobs// /}" ]; then
    log "cancelling jobs $jobs"
    # shellcheck disable=SC2086 # one argument per job id
    timeout 10 scancel $jobs 2>/dev/null || true
    for _ in $(seq 150); do
      [ -z "$(timeout 5 squeue -h -t R,CG,PD,S,CF -o %i 2>/dev/null || true)" ] && break
      sleep 0.2
    done
  fi
fi

# 2. Daemons: slurmd(s), slurmctld, leftover slurmstepd, munged.
for f in "$ROOT"/run/slurmd-*.pid; do
  [ -e "$f" ] || continue
  node=$(basename "$f" .pid)
  if pid=$(ours "$f" slurmd); then stop "$pid" "slurmd ${node#slurmd-}"; fi
  rm -f "$f"
done
if pid=$(ours "$ROOT/run/slurmctld.pid" slurmctld); then stop "$pid" slurmctld; fi
rm -f "$ROOT/run/slurmctld.pid"
for pid in $(stepds); do
  log "killing leftover slurmstepd (pid $pid)"
  kill -KILL "$pid" 2>/dev/null || true
done
if pid=$(ours "$ROOT/munge/run/munged.pid" munged); then stop "$pid" munged; fi
rm -f "$ROOT/munge/run/munged.pid"

# 3. Our /etc/hosts line for emulated node names (under up.sh's lock on the file).
exec 9</etc/hosts
flock 9
if grep -qF "$HOSTS_MARK" /etc/hosts 2>/dev/null; then
  tmp=$(mktemp)
  grep -vF "$HOSTS_MARK" /etc/hosts >"$tmp" || true
  cat "$tmp" >/etc/hosts # rewrite in place: /etc/hosts may be a bind mount
  rm -f "$tmp"
  log "removed the /etc/hosts line for the emulated nodes"
fi
exec 9<&-

rm -f "$ROOT/settings" "$ROOT/env.sh"
if [ "$PURGE" = 1 ]; then
  # only a directory up.sh wrote: its slurm.conf starts with up.sh's header
  if head -n1 "$ROOT/etc/slurm.conf" 2>/dev/null | grep -q '^# Written by slurm/testbed/up.sh'; then
    rm -rf "${ROOT:?}/etc" "$ROOT/state" "$ROOT/spool" "$ROOT/log" "$ROOT/run" "$ROOT/munge" \
      "${ROOT:?}/dev"
    rmdir "$ROOT" 2>/dev/null || true
    log "removed the test cluster's files under $ROOT"
  else
    log "not purging $ROOT: it does not hold a slurm.conf written by up.sh"
  fi
fi
log "down"
