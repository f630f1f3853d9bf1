#!/usr/bin/env bash
# Proves the SLURM profile path against a real SLURM: starts a throw-away single-node cluster on this
# machine (Debian's slurm-wlm, munge, slurmdbd backed by a private MariaDB; no systemd needed), runs a
# few jobs of configs/test.yaml with `snakemake --executor slurm` and the same targets locally, then
# checks that the jobs went through sbatch (sacct lists them COMPLETED) and that the outputs match.
#
#   sudo tests/slurm/run_slurm_test.sh   # as root; ~3 minutes on 2 cores once the packages are installed
#
# Needs: root, Debian/Ubuntu with apt (the packages are installed when missing), the project's .venv with
# the SLURM plugin (`make slurm-setup`; or PYTHON=/path/to/python with snakemake and
# snakemake-executor-plugin-slurm).
# Everything it starts (mariadbd, munged unless one already answers, slurmdbd, slurmctld, slurmd) is
# stopped on exit, and its temporary directory removed (SLURM_TEST_KEEP=1 keeps it for debugging).
# Ports: SLURM_TEST_CTLD_PORT (6817), SLURM_TEST_SLURMD_PORT (6818), SLURM_TEST_DBD_PORT (6819),
# SLURM_TEST_DB_PORT (13306); it refuses to start when one of them is taken.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
PROFILE=$REPO/tests/slurm/profile
# Five jobs: build_model and prepare_behaviors (local rules), extract_activations x2 and
# compute_steering_vectors (through sbatch).
TARGETS=(data/activations/llama-tiny/smoke.parquet data/steering/llama-tiny/optimism/vectors.safetensors)
PROJECT_PARTS=(Snakefile rules workflow_scripts envs configs config.yaml profiles data/inputs)

CLUSTER=snaketest
ACCOUNT=snaketest
PARTITION=cpu  # what tests/slurm/profile/config.yaml asks for
CTLD_PORT=${SLURM_TEST_CTLD_PORT:-6817}
SLURMD_PORT=${SLURM_TEST_SLURMD_PORT:-6818}
DBD_PORT=${SLURM_TEST_DBD_PORT:-6819}
DB_PORT=${SLURM_TEST_DB_PORT:-13306}

T0=$(date +%s)
log() { printf '[%s +%4ss] %s\n' "$(date +%H:%M:%S)" "$(($(date +%s) - T0))" "$*"; }
die() { log "FAIL: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (it installs packages and starts the SLURM daemons)"
[[ -x $PY ]] || die "no Python at $PY (run 'make .venv' or set PYTHON)"
"$PY" -c 'import snakemake, snakemake_executor_plugin_slurm' 2>/dev/null \
    || die "$PY lacks snakemake or snakemake-executor-plugin-slurm (make slurm-setup installs it)"

# ----- state for the cleanup -------------------------------------------------------------------------
WORK=""
POLICY_CREATED=0
ETC_CONF=/etc/slurm/slurm.conf
ETC_LINKED=0
CHILD=""                   # the snakemake run in progress (leader of its own process group)
declare -A PIDS=()          # daemon name -> pid, for the ones this script started
STOP_ORDER=(slurmd slurmctld slurmdbd mariadbd munged)

stop_daemon() {
    local name=$1 pid=${PIDS[$1]:-}
    [[ -n $pid ]] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        if kill -0 "$pid" 2>/dev/null; then
            log "  $name ($pid) ignored SIGTERM for 30 s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
    log "  stopped $name ($pid)"
    unset "PIDS[$name]"
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [[ $POLICY_CREATED -eq 1 ]]; then rm -f /usr/sbin/policy-rc.d; fi
    local child=$CHILD
    if [[ -n $child ]] && kill -0 "$child" 2>/dev/null; then
        log "stopping snakemake ($child) and its process group"
        kill -TERM -- "-$child" 2>/dev/null
    fi
    if [[ -n ${PIDS[slurmctld]:-} ]] && kill -0 "${PIDS[slurmctld]}" 2>/dev/null; then
        # Nothing should be left; if the run was interrupted, cancel its jobs before slurmd goes.
        local jobs
        jobs=$(squeue -h -o %i 2>/dev/null)
        if [[ -n $jobs ]]; then
            log "cancelling SLURM jobs: $(echo $jobs)"
            scancel $jobs 2>/dev/null
            for _ in $(seq 1 30); do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 1; done
        fi
    fi
    if [[ -n $child ]]; then
        for _ in $(seq 1 30); do group_alive "$child" || break; sleep 1; done
        kill -KILL -- "-$child" 2>/dev/null
        wait "$child" 2>/dev/null
    fi
    if ((${#PIDS[@]})); then
        log "stopping the daemons this script started"
        for name in "${STOP_ORDER[@]}"; do stop_daemon "$name"; done
    fi
    # proctrack/linuxproc finds a job's processes through their parents: one whose parent died first
    # (the in-job snakemake once its batch shell is cancelled) is reparented to init and survives
    # scancel. Anything still running inside this script's directory is ours: stop it by pid.
    if [[ -n $WORK && -d $WORK ]]; then
        local strays
        strays=$(stray_pids)
        if [[ -n $strays ]]; then
            log "stopping leftover processes in $WORK: $(echo $strays)"
            kill -TERM $strays 2>/dev/null
            for _ in $(seq 1 10); do [[ -z $(stray_pids) ]] && break; sleep 1; done
            strays=$(stray_pids)
            if [[ -n $strays ]]; then kill -KILL $strays 2>/dev/null; fi
        fi
    fi
    if [[ $ETC_LINKED -eq 1 ]]; then rm -f "$ETC_CONF"; fi
    if [[ -n $WORK && -d $WORK ]]; then
        if [[ ${SLURM_TEST_KEEP:-0} == 1 ]]; then
            log "kept $WORK"
        else
            rm -rf "$WORK"
        fi
    fi
    log "total time $(($(date +%s) - T0)) s"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

group_alive() { ps -o stat= -s "$1" 2>/dev/null | grep -qv '^Z'; }  # session = group (setsid)

stray_pids() {  # processes whose working directory lies in $WORK (job leftovers)
    local p
    for p in /proc/[0-9]*; do
        case $(readlink "$p/cwd" 2>/dev/null) in "$WORK"/*) echo "${p#/proc/}" ;; esac
    done
}

port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local limit=$1 what=$2; shift 2
    for _ in $(seq 1 "$limit"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 1
    done
    die "$what did not come up within $limit s"
}

# run_step LOGFILE SHOW DIR COMMAND...: run COMMAND in DIR as the leader of a new process group (so the
# cleanup can stop it and whatever it started), output to LOGFILE, echoed live when SHOW is 1. Waiting
# with `wait` keeps the script responsive to signals while it runs.
run_step() {
    local logfile=$1 show=$2 dir=$3 rc=0 tailpid=""
    shift 3
    (cd "$dir" && exec setsid "$@") </dev/null >"$logfile" 2>&1 &
    CHILD=$!
    if [[ $show == 1 ]]; then
        tail -n +1 -f --pid="$CHILD" "$logfile" | sed -u 's/^/  | /' &
        tailpid=$!
    fi
    wait "$CHILD" || rc=$?
    CHILD=""
    if [[ -n $tailpid ]]; then wait "$tailpid" 2>/dev/null || true; fi
    return "$rc"
}

show_logs() { for f in "$WORK"/log/*.log; do echo "----- $f (tail)"; tail -n 30 "$f"; done; }

# ----- 1. packages -----------------------------------------------------------------------------------
PACKAGES=(slurm-wlm munge slurmdbd mariadb-server)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    # Keep apt from starting the services through init scripts: this script starts its own daemons.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        POLICY_CREATED=1
    fi
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    if [[ $POLICY_CREATED -eq 1 ]]; then rm -f /usr/sbin/policy-rc.d; POLICY_CREATED=0; fi
else
    log "packages present: ${PACKAGES[*]}"
fi

for port in "$CTLD_PORT" "$SLURMD_PORT" "$DBD_PORT" "$DB_PORT"; do
    port_taken "$port" && die "port $port is in use (another SLURM or database running?); set SLURM_TEST_*_PORT"
done

# ----- 2. configuration ------------------------------------------------------------------------------
WORK=$(mktemp -d /tmp/slurm-test.XXXXXX)
chmod 755 "$WORK"
mkdir -p "$WORK"/{etc,log,run,spool/slurmctld,spool/slurmd,mysql}
NODE=$(hostname -s)
CPUS=$(nproc)
MEM_TOTAL=$(free -m | awk '/^Mem:/ {print $2}')
MARGIN=$((MEM_TOTAL / 10 > 1024 ? MEM_TOTAL / 10 : 1024))
REAL_MEMORY=$((MEM_TOTAL - MARGIN))
DB_PASS=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
export SLURM_CONF=$WORK/etc/slurm.conf  # clients, daemons and the jobs (sbatch --export=ALL) read it

cat >"$SLURM_CONF" <<EOF
# Single-node test cluster written by tests/slurm/run_slurm_test.sh
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$WORK/spool/slurmctld
SlurmdSpoolDir=$WORK/spool/slurmd
SlurmctldPidFile=$WORK/run/slurmctld.pid
SlurmdPidFile=$WORK/run/slurmd.pid
SlurmctldLogFile=$WORK/log/slurmctld.log
SlurmdLogFile=$WORK/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
InactiveLimit=0
KillWait=10
MinJobAge=300
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$REAL_MEMORY State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

cat >"$WORK/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$WORK/run/slurmdbd.pid
LogFile=$WORK/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
chmod 600 "$WORK/etc/slurmdbd.conf"

# Not used by proctrack/linuxproc + task/none; written so slurmd does not go looking elsewhere.
cat >"$WORK/etc/cgroup.conf" <<EOF
CgroupPlugin=autodetect
IgnoreSystemd=yes
EOF

# The job step plugin (snakemake-executor-plugin-slurm-jobstep) drops every SLURM_* variable but a few
# before its nested `srun`, SLURM_CONF included, so srun only finds the default path: link it there.
# An existing file is left alone (the script stops) unless it is a link left by an earlier run.
if [[ -e $ETC_CONF || -L $ETC_CONF ]]; then
    if [[ -L $ETC_CONF && $(readlink "$ETC_CONF") == /tmp/slurm-test.*/etc/slurm.conf ]]; then
        rm -f "$ETC_CONF"
    else
        die "$ETC_CONF exists (a real SLURM installation?): refusing to replace it"
    fi
fi
mkdir -p "$(dirname "$ETC_CONF")"
ln -s "$SLURM_CONF" "$ETC_CONF"
ETC_LINKED=1

log "node $NODE: CPUs=$CPUS RealMemory=$REAL_MEMORY (of ${MEM_TOTAL} MB), partition $PARTITION; config in $WORK/etc"

# ----- 3. daemons ------------------------------------------------------------------------------------
# MariaDB: a private instance (own data directory, socket and port), not the system's.
log "starting mariadbd"
mariadb-install-db --no-defaults --user=root --datadir="$WORK/mysql/data" \
    --auth-root-authentication-method=socket --skip-test-db >"$WORK/log/mariadb-install.log" 2>&1 \
    || { tail -n 30 "$WORK/log/mariadb-install.log"; die "mariadb-install-db failed"; }
mariadbd --no-defaults --user=root --datadir="$WORK/mysql/data" --socket="$WORK/mysql/mysqld.sock" \
    --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$WORK/run/mariadbd.pid" \
    --log-error="$WORK/log/mariadb.log" --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 \
    --skip-name-resolve </dev/null >/dev/null 2>&1 &
PIDS[mariadbd]=$!
wait_for 60 mariadbd mariadb-admin --no-defaults --socket="$WORK/mysql/mysqld.sock" -u root ping
mariadb --no-defaults --socket="$WORK/mysql/mysqld.sock" -u root <<EOF
CREATE DATABASE slurm_acct_db;
CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF

# munge: reuse a munged that already answers (and leave it running), otherwise start one.
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "munged already running: using it"
else
    log "starting munged"
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 600 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 755 /run/munge
    setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground \
        </dev/null >"$WORK/log/munged.log" 2>&1 &
    PIDS[munged]=$!
    wait_for 30 munged sh -c 'munge -n | unmunge'
fi

log "starting slurmdbd"
slurmdbd -D </dev/null >"$WORK/log/slurmdbd.out" 2>&1 &
PIDS[slurmdbd]=$!
wait_for 60 slurmdbd sacctmgr -n list cluster
sacctmgr -i add cluster "$CLUSTER" >/dev/null
sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" Description="snakemake test" Organization=test >/dev/null
sacctmgr -i add user root Account="$ACCOUNT" Cluster="$CLUSTER" >/dev/null
sacctmgr -n -P list associations cluster="$CLUSTER" format=Cluster,Account,User | sed 's/^/  association: /'

log "starting slurmctld and slurmd"
slurmctld -D </dev/null >"$WORK/log/slurmctld.out" 2>&1 &
PIDS[slurmctld]=$!
wait_for 60 slurmctld scontrol ping
slurmd -D </dev/null >"$WORK/log/slurmd.out" 2>&1 &
PIDS[slurmd]=$!
node_idle() { [[ $(sinfo -h -n "$NODE" -o %T 2>/dev/null) == idle ]]; }
if ! (for _ in $(seq 1 90); do node_idle && exit 0; sleep 1; done; exit 1); then
    sinfo -N -l; scontrol show node "$NODE"; show_logs
    die "node $NODE not idle after 90 s"
fi
sinfo -N -o '%N %P %T cpus=%c mem=%m' | sed 's/^/  /'

# ----- 4. the same targets locally and through SLURM -------------------------------------------------
copy_project() {
    local target=$1 part
    mkdir -p "$target"
    for part in "${PROJECT_PARTS[@]}"; do
        mkdir -p "$target/$(dirname "$part")"
        cp -a "$REPO/$part" "$target/$part"
    done
    find "$target" -name __pycache__ -type d -prune -exec rm -rf {} +
}
LOCAL=$WORK/local/main
CLUSTER_RUN=$WORK/slurm/main
copy_project "$LOCAL"
copy_project "$CLUSTER_RUN"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# The jobs the targets need (from a dry run), to check sacct against. Targets go first: --configfile
# takes several values and would swallow them.
DRY=$(cd "$CLUSTER_RUN" && "$PY" -m snakemake "${TARGETS[@]}" --dry-run --quiet rules --workflow-profile none \
    --configfile configs/test.yaml 2>&1) || { echo "$DRY"; die "dry run failed"; }
# The Snakefile's localrules (they download) run on the submitting machine, not through sbatch.
LOCAL_RULES=$(awk '/^localrules:/ {on = 1; next} on && /^[^ ]/ {on = 0} on {gsub(/[ ,]/, ""); if ($0 != "") print}' \
    "$REPO/Snakefile" | sort -u)
EXPECTED=$(echo "$DRY" | awk -v local_rules="$LOCAL_RULES" '
    BEGIN {split(local_rules, names, "\n"); for (i in names) is_local[names[i]] = 1}
    $1 == "total" {exit}  # the job table is printed twice: count the first
    $2 ~ /^[0-9]+$/ && !($1 in is_local) {n += $2} END {print n + 0}')
RULES=$(echo "$DRY" | awk '$2 ~ /^[0-9]+$/ && $1 != "total" {print $1}' | sort -u | grep -vxF "$LOCAL_RULES")
[[ $EXPECTED =~ ^[0-9]+$ && $EXPECTED -gt 0 && -n $RULES ]] || { echo "$DRY"; die "could not count the jobs of the dry run"; }
log "targets: ${TARGETS[*]} ($EXPECTED SLURM jobs; local rules: $(echo $LOCAL_RULES))"

log "local run (--cores 2)"
if ! run_step "$WORK/log/local-run.log" 0 "$LOCAL" "$PY" -m snakemake "${TARGETS[@]}" --cores 2 \
    --workflow-profile none --configfile configs/test.yaml; then
    tail -n 60 "$WORK/log/local-run.log"
    die "local run failed"
fi
log "local run done"

log "SLURM run (--executor slurm --workflow-profile tests/slurm/profile)"
SACCT_START=$(date +%Y-%m-%dT%H:%M:%S -d '-1 minute')
if ! run_step "$WORK/log/slurm-run.log" 1 "$CLUSTER_RUN" "$PY" -m snakemake "${TARGETS[@]}" --executor slurm \
    --workflow-profile "$PROFILE" --configfile configs/test.yaml; then
    find "$CLUSTER_RUN/.snakemake/slurm_logs" -name '*.log' -type f 2>/dev/null | while read -r f; do
        echo "----- $f"; tail -n 25 "$f"
    done
    show_logs
    die "SLURM run failed"
fi
log "SLURM run done"

# ----- 5. checks -------------------------------------------------------------------------------------
status=0
# (a) the jobs went through sbatch: sacct (slurmdbd) lists them, COMPLETED, one per expected job.
SACCT=$(sacct -X -n -P -a -S "$SACCT_START" -o JobID,JobName,State,ExitCode,Elapsed,Comment)
echo "$SACCT" | awk -F'|' '{printf "  sacct: %-6s %-10s %-8s %-9s %s\n", $1, $3, $4, $5, $6}'
n_completed=$(echo "$SACCT" | awk -F'|' '$3 == "COMPLETED"' | grep -c . || true)
n_other=$(echo "$SACCT" | awk -F'|' 'NF && $3 != "COMPLETED"' | grep -c . || true)
n_submitted=$(grep -c 'Job [0-9]* has been submitted with SLURM jobid' "$WORK/log/slurm-run.log" || true)
if [[ $n_completed -ge $EXPECTED && $n_other -eq 0 ]]; then
    echo "PASS sacct: $n_completed jobs COMPLETED (expected $EXPECTED; snakemake logged $n_submitted submissions)"
else
    echo "FAIL sacct: $n_completed COMPLETED, $n_other in another state (expected $EXPECTED COMPLETED)"
    status=1
fi
for rule in $LOCAL_RULES; do
    if echo "$SACCT" | awk -F'|' -v r="rule_$rule" '$6 == r || index($6, r "_wildcards_") == 1' | grep -q .; then
        echo "FAIL sacct: local rule $rule was submitted to SLURM"
        status=1
    else
        echo "PASS sacct: local rule $rule ran on the submitting machine"
    fi
done
for rule in $RULES; do
    if echo "$SACCT" | awk -F'|' -v r="rule_$rule" '$3 == "COMPLETED" && ($6 == r || index($6, r "_wildcards_") == 1)' | grep -q .; then
        echo "PASS sacct: rule $rule ran as a SLURM job"
    else
        echo "FAIL sacct: no COMPLETED SLURM job for rule $rule"
        status=1
    fi
done

# (b) the outputs match the local run.
if ! "$PY" - "$LOCAL" "$CLUSTER_RUN" <<'PYEOF'; then status=1; fi
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import torch
from safetensors import safe_open

local, cluster = map(Path, sys.argv[1:3])


def outputs(root):
    return {
        str(p.relative_to(root)): p
        for p in (root / "data").rglob("*")
        if p.is_file() and p.relative_to(root / "data").parts[0] != "inputs"
    }


a, b = outputs(local), outputs(cluster)
failed = False
if set(a) != set(b):
    print(f"FAIL outputs: only local {sorted(set(a) - set(b))}, only SLURM {sorted(set(b) - set(a))}")
    failed = True
if not a:
    print("FAIL outputs: the local run wrote nothing under data/")
    failed = True
for rel in sorted(set(a) & set(b)):
    pa, pb = a[rel], b[rel]
    same_bytes = pa.read_bytes() == pb.read_bytes()
    if rel.endswith(".parquet"):
        ta, tb = pq.read_table(pa), pq.read_table(pb)
        data_ok = ta.num_rows > 0 and ta.equals(tb)  # columns, types and values
        meta_a, meta_b = ta.schema.metadata or {}, tb.schema.metadata or {}
        meta_ok = meta_a == meta_b
        ok = data_ok and meta_ok
        detail = f"{ta.num_rows} rows x {ta.num_columns} columns, data {'equal' if data_ok else 'DIFFERENT'}, "
        detail += f"metadata {'equal' if meta_ok else 'DIFFERENT'}"
        if not meta_ok:
            for key in sorted(set(meta_a) | set(meta_b)):
                if meta_a.get(key) != meta_b.get(key):
                    detail += f"\n    {key!r}: local {meta_a.get(key)!r}\n    {' ' * len(repr(key))}  SLURM {meta_b.get(key)!r}"
    elif rel.endswith(".safetensors"):
        with safe_open(pa, "pt") as fa, safe_open(pb, "pt") as fb:
            keys_ok = sorted(fa.keys()) == sorted(fb.keys())
            tensors_ok = keys_ok and all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())
            meta_ok = fa.metadata() == fb.metadata()
            n = len(list(fa.keys()))
        ok = keys_ok and tensors_ok and meta_ok
        detail = f"{n} tensors {'equal' if tensors_ok else 'DIFFERENT'}, metadata {'equal' if meta_ok else 'DIFFERENT'}"
    elif rel.endswith(".json"):
        ok = json.loads(pa.read_text()) == json.loads(pb.read_text())
        detail = "JSON equal" if ok else "JSON DIFFERENT"
    else:
        ok = same_bytes
        detail = "bytes equal" if ok else "bytes DIFFERENT"
    detail += "" if same_bytes else " (files not byte-identical)"
    print(f"{'PASS' if ok else 'FAIL'} output {rel}: {detail}")
    failed |= not ok
sys.exit(1 if failed else 0)
PYEOF

if [[ $status -eq 0 ]]; then
    log "PASS: $EXPECTED jobs ran through sbatch on a single-node SLURM and their outputs match a local run"
else
    log "FAIL: see the FAIL lines above"
fi
exit "$status"
