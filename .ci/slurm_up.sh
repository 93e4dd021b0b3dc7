#!/usr/bin/env bash
# Start a single-node SLURM cluster on localhost (munged, slurmctld, slurmd -N localhost).
#
# Contract (used by .ci/run and by tests/test_hpc.py):
#   bash .ci/slurm_up.sh [--record DIR]
#     - must run as root on Debian/Ubuntu; installs slurm-wlm + munge with apt-get if absent;
#     - idempotent: a daemon that already answers is left alone;
#     - writes DIR/<daemon>.pid ONLY for the daemons THIS call started
#       (default DIR: $MMFUSION_SLURM_STATE/started), so that
#       `bash .ci/slurm_down.sh --record DIR` stops exactly those, by PID;
#     - waits at most $MMFUSION_SLURM_UP_TIMEOUT seconds (default 60) for the node to be idle;
#     - exit 0: the cluster accepts jobs (sbatch works); non-zero with one line on stderr otherwise.
# Config: ProctrackType=proctrack/linuxproc, TaskPlugin=task/none, no accounting (works in
# containers/VMs without systemd or cgroup delegation). CPUs and RealMemory come from `slurmd -C`.
set -euo pipefail

STATE=${MMFUSION_SLURM_STATE:-/var/lib/mmfusion-slurm}
RECORD="$STATE/started"
TIMEOUT=${MMFUSION_SLURM_UP_TIMEOUT:-60}
CONF=/etc/slurm/slurm.conf
MARKER="# written by mmfusion .ci/slurm_up.sh"

while [ $# -gt 0 ]; do
    case "$1" in
        --record) RECORD=$2; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "slurm_up.sh: unknown option $1 (use --record DIR)" >&2; exit 64 ;;
    esac
done

die() { echo "slurm_up.sh: $*" >&2; exit 1; }
log() { echo "slurm_up.sh: $*" >&2; }

[ "$(id -u)" -eq 0 ] || die "must run as root (it starts munged, slurmctld and slurmd)"

# Wait until "$@" succeeds, at most $1 seconds (polls every 0.5 s).
wait_for() {
    local limit=$1; shift
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.5
    done
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
        return
    fi
    command -v apt-get >/dev/null || die "slurm-wlm/munge missing and no apt-get to install them"
    log "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=300 update -qq >/dev/null
    apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

record_pid() {  # record_pid NAME PIDFILE : remember that this call started NAME
    local pid
    wait_for 10 test -s "$2" || die "$1 started but wrote no PID file $2"
    pid=$(cat "$2")
    mkdir -p "$RECORD"
    echo "$pid" > "$RECORD/$1.pid"
    log "started $1 (pid $pid)"
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_ok; then log "munged already running"; return; fi
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        fi
    fi
    chown -R munge:munge /etc/munge
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 755 /run/munge
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged
    record_pid munged /run/munge/munged.pid
    wait_for 10 munge_ok || die "munged does not answer (see /var/log/munge/munged.log)"
}

write_conf() {
    local cpus mem tmp
    cpus=$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' | head -1)
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)
    [ -n "$cpus" ] && [ -n "$mem" ] || die "cannot read CPUs/RealMemory from 'slurmd -C'"
    mkdir -p /etc/slurm "$STATE/ctld" "$STATE/spool" "$STATE/log"
    tmp=$(mktemp)
    cat > "$tmp" <<EOF
$MARKER
ClusterName=mmfusion-ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MinJobAge=600
KillWait=10
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    if [ -f "$CONF" ] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
        return
    fi
    if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
        cp "$CONF" "$CONF.before-mmfusion"
        log "saved the existing $CONF as $CONF.before-mmfusion"
    fi
    install -m 644 "$tmp" "$CONF"
    rm -f "$tmp"
    log "wrote $CONF (CPUs=$cpus RealMemory=$mem)"
}

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
ctld_ok() { scontrol ping 2>/dev/null | grep -q 'is UP'; }
node_idle() { sinfo -h -n localhost -o '%T' 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'; }

start_slurmctld() {
    if ctld_ok; then log "slurmctld already running"; return; fi
    rm -f "$STATE/slurmctld.pid"
    slurmctld -f "$CONF"
    record_pid slurmctld "$STATE/slurmctld.pid"
    wait_for "$TIMEOUT" ctld_ok || die "slurmctld not UP after ${TIMEOUT}s (see $STATE/log/slurmctld.log)"
}

start_slurmd() {
    if alive "$STATE/slurmd.pid"; then log "slurmd already running"; return; fi
    rm -f "$STATE/slurmd.pid"
    slurmd -N localhost -f "$CONF"
    record_pid slurmd "$STATE/slurmd.pid"
}

install_packages
start_munge
write_conf
start_slurmctld
start_slurmd
if ! wait_for "$TIMEOUT" node_idle; then
    # A node left DOWN/DRAIN by an earlier run: bring it back once, then wait again.
    scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true
    wait_for "$TIMEOUT" node_idle || die "node localhost not idle after ${TIMEOUT}s: $(sinfo -h -N -o '%N %T %E' 2>&1)"
fi
log "cluster up: $(sinfo -h -N -o '%N %T cpus=%c mem=%mMB')"
