#!/usr/bin/env bash
# Stop, by PID, the SLURM/munge daemons that .ci/slurm_up.sh recorded as started by it.
#
#   bash .ci/slurm_down.sh [--record DIR]     (default DIR: $MMFUSION_SLURM_STATE/started)
#
# Order: slurmd, slurmctld, munged. Each gets SIGTERM, then SIGKILL after 15 s. A recorded
# PID whose process is gone, or now belongs to another program, is skipped. Daemons this
# script did not see recorded are never touched. Exit 0 unless a process survived SIGKILL.
set -uo pipefail

STATE=${MMFUSION_SLURM_STATE:-/var/lib/mmfusion-slurm}
RECORD="$STATE/started"
while [ $# -gt 0 ]; do
    case "$1" in
        --record) RECORD=$2; shift 2 ;;
        -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
        *) echo "slurm_down.sh: unknown option $1 (use --record DIR)" >&2; exit 64 ;;
    esac
done

status=0
stop_one() {  # stop_one NAME
    local file="$RECORD/$1.pid" pid comm
    [ -s "$file" ] || return 0
    pid=$(cat "$file")
    comm=$(ps -p "$pid" -o comm= 2>/dev/null || true)
    if [ "$comm" != "$1" ]; then
        echo "slurm_down.sh: $1 (pid $pid) not running" >&2
        rm -f "$file"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 30); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null
        sleep 0.5
        if kill -0 "$pid" 2>/dev/null; then
            echo "slurm_down.sh: $1 (pid $pid) survived SIGKILL" >&2
            status=1
            return
        fi
    fi
    echo "slurm_down.sh: stopped $1 (pid $pid)" >&2
    rm -f "$file"
}

for daemon in slurmd slurmctld munged; do
    stop_one "$daemon"
done
exit $status
