#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying the SLURM profile without a real cluster.
#
#   scripts/slurm_local.sh up     [--dir DIR]   install if needed, configure, start, wait for the node
#   scripts/slurm_local.sh status [--dir DIR]   daemons, node and jobs
#   scripts/slurm_local.sh down   [--dir DIR]   cancels jobs, stops the daemons by their pid files
#
# Everything lives in DIR (default $SLURM_LOCAL_DIR, else /tmp/slurm-local): slurm.conf, a private
# munge key and socket, state, spool, logs and pid files. The one thing outside it is a symlink
# /etc/slurm/slurm.conf -> DIR/slurm.conf, removed by `down`: inside a job, snakemake's jobstep
# plugin (0.6.1) drops SLURM_CONF before it calls srun, so srun only finds SLURM's default path.
# A slurm.conf already there that is not such a link (a real installation) is never replaced: `up`
# stops with exit status 3. Ports: $SLURM_LOCAL_PORT (slurmctld, default 6817) and the next one.
#
# Installing needs root and apt-get (Debian's slurm-wlm and munge); starting needs root, as slurmd
# runs jobs as their submitter. Exit status 3: SLURM is missing or cannot run here (the reason on
# stderr); 1: it is installed but did not come up (log tails on stderr). Rerunning `up` on a running
# cluster only waits for the node; `down` on a stopped one does nothing.
set -euo pipefail
PATH=$PATH:/usr/sbin:/sbin  # the daemons live in sbin, which a non-root PATH may lack

say() { echo "slurm_local: $*" >&2; }
unavailable() { say "unavailable: $*"; exit 3; }
usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

CMD=${1:-}
case $CMD in up | down | status) shift ;; *) usage ;; esac
DIR=${SLURM_LOCAL_DIR:-/tmp/slurm-local}
while (($#)); do
    case $1 in
        --dir) DIR=${2:?--dir needs a folder}; shift 2 ;;
        *) usage ;;
    esac
done
if [[ $CMD == up ]]; then
    mkdir -p "$DIR"
elif [[ ! -d $DIR ]]; then
    say "no cluster in $DIR"
    [[ $CMD == down ]] && exit 0 || exit 1
fi
DIR=$(cd "$DIR" && pwd)
PORT=${SLURM_LOCAL_PORT:-6817}
CONF=$DIR/slurm.conf
ETC_CONF=/etc/slurm/slurm.conf
MARK="# Written by scripts/slurm_local.sh"
MUNGE=$DIR/munge
SOCKET=$MUNGE/munge.socket.2
export SLURM_CONF=$CONF  # our clients (sinfo, squeue, scancel) talk to this cluster

# pid of a daemon we started, if it is still that daemon (a stale pid file may name a reused pid)
running_pid() {
    local name=$1 pidfile=$2 pid
    [[ -r $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ -r /proc/$pid/comm && $(</proc/"$pid"/comm) == "$name" ]] || return 1
    echo "$pid"
}

install_if_missing() {
    local missing=() b
    for b in munged munge slurmctld slurmd sbatch squeue sinfo scontrol; do
        command -v "$b" >/dev/null || missing+=("$b")
    done
    ((${#missing[@]} == 0)) && return 0
    [[ $(id -u) == 0 ]] || unavailable "${missing[*]} not installed, and installing needs root"
    command -v apt-get >/dev/null || unavailable "${missing[*]} not installed, and there is no apt-get"
    say "installing slurm-wlm and munge (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    # the package lists may be absent or stale on a fresh machine: update once, then retry
    apt-get install -y -q slurm-wlm munge >"$DIR/apt.log" 2>&1 \
        || { apt-get update -q >>"$DIR/apt.log" 2>&1 && apt-get install -y -q slurm-wlm munge >>"$DIR/apt.log" 2>&1; } \
        || { tail -5 "$DIR/apt.log" >&2; unavailable "apt-get install slurm-wlm munge failed (log: $DIR/apt.log)"; }
}

write_conf() {
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    # a little under what is free now, so the node never advertises memory it lacks
    mem=$(awk '/^MemAvailable:/ {m = int($2 / 1024 * 0.9); print (m > 500 ? m : 500)}' /proc/meminfo)
    mkdir -p "$DIR"/{state,spool,log,run}
    cat >"$CONF" <<EOF
$MARK: one node on this machine ($host), partition debug.
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a private munged (socket under this folder), not the system's
AuthInfo=socket=$SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# containers here have no usable cgroups: track processes by parent pid, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# no slurmdbd: sacct has nothing to report. Finished jobs stay visible to squeue for an hour,
# which is what snakemake's SLURM plugin polls instead (--slurm-status-command squeue).
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=3600
ReturnToService=2
InactiveLimit=0
KillWait=10
# trust the CPUs and memory below over what slurmd detects (a container may see the host's)
SlurmdParameters=config_overrides
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    running_pid munged "$MUNGE/munged.pid" >/dev/null && return 0
    mkdir -p "$MUNGE"
    chmod 700 "$MUNGE"
    if [[ ! -s $MUNGE/munge.key ]]; then
        (umask 077 && head -c 1024 /dev/urandom >"$MUNGE/munge.key")
    fi
    chmod 400 "$MUNGE/munge.key"
    # --force: munged would rather not run as root; it is our private instance
    munged --force --key-file="$MUNGE/munge.key" --socket="$SOCKET" --pid-file="$MUNGE/munged.pid" \
        --log-file="$MUNGE/munged.log" --seed-file="$MUNGE/munged.seed" 2>>"$MUNGE/munged.stderr" \
        || { tail -5 "$MUNGE/munged.log" "$MUNGE/munged.stderr" >&2 2>/dev/null; say "munged did not start"; exit 1; }
    munge -S "$SOCKET" -n | unmunge -S "$SOCKET" >/dev/null \
        || { say "munge credentials do not round-trip on $SOCKET"; exit 1; }
}

# /etc/slurm/slurm.conf -> ours, unless it is a real config or another running local cluster's
link_conf() {
    local target
    if [[ -L $ETC_CONF ]]; then
        target=$(readlink "$ETC_CONF")
        [[ $target == "$CONF" ]] && return 0
        if [[ -r $target ]] && head -1 "$target" | grep -qF "$MARK" \
            && running_pid slurmctld "$(dirname "$target")/run/slurmctld.pid" >/dev/null; then
            unavailable "$ETC_CONF belongs to another local cluster, still running ($(dirname "$target"))"
        fi
    elif [[ -e $ETC_CONF ]]; then
        unavailable "$ETC_CONF exists and is not ours: a SLURM is configured here already"
    fi
    mkdir -p "$(dirname "$ETC_CONF")"
    ln -sfn "$CONF" "$ETC_CONF"
}

unlink_conf() {
    [[ -L $ETC_CONF && $(readlink "$ETC_CONF") == "$CONF" ]] && rm -f "$ETC_CONF"
    return 0
}

node_state() { sinfo -h -N -o %t 2>/dev/null | head -1; }

wait_for_idle() {
    local state="" i
    for i in $(seq 60); do
        state=$(node_state)
        [[ $state == idle* || $state == mix* || $state == alloc* ]] && { say "node $state ($CONF)"; return 0; }
        sleep 1
    done
    say "node not idle after 60 s (state: ${state:-none})"
    sinfo -R >&2 2>/dev/null || true
    tail -15 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 2>/dev/null || true
    exit 1
}

up() {
    install_if_missing
    [[ $(id -u) == 0 ]] || unavailable "starting slurmd needs root"
    if running_pid slurmctld "$DIR/run/slurmctld.pid" >/dev/null && running_pid slurmd "$DIR/run/slurmd.pid" >/dev/null; then
        say "already running in $DIR"
        link_conf
        wait_for_idle
        return 0
    fi
    down quietly  # a half-started cluster: stop what is left, then start clean
    write_conf
    link_conf
    start_munge
    # -c: a fresh cluster every time, no jobs recovered from an earlier run's state
    slurmctld -c -f "$CONF" || { tail -15 "$DIR/log/slurmctld.log" >&2 2>/dev/null; say "slurmctld did not start"; exit 1; }
    slurmd -f "$CONF" || { tail -15 "$DIR/log/slurmd.log" >&2 2>/dev/null; say "slurmd did not start"; exit 1; }
    wait_for_idle
}

stop() {
    local name=$1 pidfile=$2 pid i
    pid=$(running_pid "$name" "$pidfile") || { rm -f "$pidfile"; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    rm -f "$pidfile"
    [[ ${QUIET:-} ]] || say "stopped $name ($pid)"
}

down() {
    [[ ${1:-} == quietly ]] && local QUIET=1
    if running_pid slurmctld "$DIR/run/slurmctld.pid" >/dev/null; then
        # jobs first, so no job step outlives its daemons
        local jobs
        jobs=$(squeue -h -o %i 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            sleep 2
        fi
    fi
    stop slurmd "$DIR/run/slurmd.pid"
    stop slurmctld "$DIR/run/slurmctld.pid"
    stop munged "$MUNGE/munged.pid"
    unlink_conf
}

status() {
    local name pidfile pid rc=0
    for name in munged slurmctld slurmd; do
        case $name in
            munged) pidfile=$MUNGE/munged.pid ;;
            *) pidfile=$DIR/run/$name.pid ;;
        esac
        if pid=$(running_pid "$name" "$pidfile"); then
            echo "$name: running ($pid)"
        else
            echo "$name: stopped"
            rc=1
        fi
    done
    if ((rc == 0)); then
        sinfo
        squeue --states=all
    fi
    return $rc
}

case $CMD in
    up) up ;;
    down) down ;;
    status) status ;;
    *) usage ;;
esac
