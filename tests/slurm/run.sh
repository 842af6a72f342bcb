#!/usr/bin/env bash
# The Slurm batch script of docs/slurm.md (examples/slurm/stasis-job.sbatch, used verbatim)
# against a real slurmctld and slurmd (Debian's slurm-wlm) on this machine. Root only: it
# starts munged, slurmctld and slurmd with a configuration of its own in a temporary
# directory (its own munge key and socket, state, spool and logs; nothing under /etc is
# read or changed) and always stops them on exit.
#
# Two jobs run tests/programs/counter.c (a self-checking counter printing "tick N" every
# 20 ms) under the script, side by side:
#   - "preempt" is sent SIGUSR1 the way a preempting scheduler warns a job
#     (scancel --signal=USR1 --batch);
#   - "timelimit" has a one-minute time limit and gets Slurm's own warning signal
#     (--time=1 --signal=B:USR1@10), as often as it needs to reach the end of its work; it
#     runs as the unprivileged user nobody (sbatch --uid), as a user's job would.
# Each must: checkpoint on the signal (supervisor exits 75, generation "signal SIGUSR1",
# the newest), be requeued by the script, be started again by Slurm (SLURM_RESTART_COUNT
# > 0), restart from that generation, print every tick exactly once and in order, pass the
# counter's own checks (memory, pid, CLOCK_MONOTONIC continuity) and end COMPLETED with
# exit code 0.
#
# Usage: tests/slurm/run.sh
#   STASIS_BIN        the stasis binary (default target/debug/stasis, built if missing)
#   STASIS_SLURM_KEEP=1  keep the temporary directory (logs, images, outputs)
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$(pwd)

fail() {
    echo "slurm test: FAIL: $*" >&2
    exit 1
}

[ "$(id -u)" = 0 ] || fail "must run as root (it starts munged, slurmctld and slurmd)"
for cmd in munged mungekey slurmctld slurmd sbatch scontrol scancel squeue sinfo gcc python3 setpriv; do
    command -v "$cmd" >/dev/null ||
        fail "$cmd not found (apt-get install slurm-wlm munge gcc python3 util-linux)"
done
echo "slurm test: $(slurmctld -V)"

stasis_bin=${STASIS_BIN:-$repo/target/debug/stasis}
if [ -z "${STASIS_BIN:-}" ] && [ ! -x "$stasis_bin" ]; then
    cargo build -p stasis
fi
[ -x "$stasis_bin" ] || fail "no stasis binary at $stasis_bin (set STASIS_BIN)"

# Slurm's default ports: a daemon already there would be talked to instead of ours.
for port in 6817 6818; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        fail "port $port is in use (another slurmctld/slurmd?); stop it first"
    fi
done

tmp=$(mktemp -d /tmp/stasis-slurm-XXXXXX)
# munged wants every directory above its socket searchable by all.
chmod 755 "$tmp"
mkdir -p "$tmp"/{munge,msock,state,spool,log,bin,images,run,out,images-nobody,run-nobody}
chmod 700 "$tmp/munge" "$tmp/run" "$tmp/run-nobody"
chmod 1777 "$tmp/out"
chown 65534:65534 "$tmp/images-nobody" "$tmp/run-nobody"
node=$(hostname -s)
started=()
jobs_submitted=()

show_logs() {
    for f in "$tmp"/log/* "$tmp"/out/*; do
        [ -f "$f" ] || continue
        echo "----- $f (last 60 lines)"
        tail -n 60 "$f"
    done
    echo "----- squeue"
    squeue 2>&1 || true
    for j in "${jobs_submitted[@]}"; do
        scontrol show job "$j" 2>&1 || true
    done
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [ "$status" != 0 ]; then
        echo "slurm test: failed (status $status); daemon logs and job outputs:" >&2
        show_logs >&2 || true
    fi
    # Jobs first (their slurmstepd outlive slurmd), then the daemons we started.
    if [ ${#jobs_submitted[@]} -gt 0 ]; then
        scancel "${jobs_submitted[@]}" 2>/dev/null || true
        for _ in $(seq 1 60); do
            [ -z "$(squeue -h -o %i -j "$(IFS=,; echo "${jobs_submitted[*]}")" -t PD,R,CG,CF,S 2>/dev/null)" ] && break
            sleep 0.25
        done
    fi
    # Each job step's slurmstepd (a daemon, not our child) keeps a socket in the spool
    # directory until it is done: let them finish before slurmd and slurmctld go.
    for _ in $(seq 1 60); do
        compgen -G "$tmp/spool/${node}_*" >/dev/null || break
        sleep 0.25
    done
    if compgen -G "$tmp/spool/${node}_*" >/dev/null; then
        echo "slurm test: job steps still there: $(echo "$tmp/spool/${node}"_*)" >&2
    fi
    local pid
    for pid in "${started[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${started[@]}"; do
        for _ in $(seq 1 40); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.25
        done
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [ "${STASIS_SLURM_KEEP:-0}" = 1 ] || [ "$status" != 0 ]; then
        echo "slurm test: files kept in $tmp"
    else
        rm -rf "$tmp"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# wait_for SECONDS WHAT COMMAND...: runs COMMAND every 0.25 s until it succeeds.
wait_for() {
    local seconds=$1 what=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@"; do
        [ "$SECONDS" -lt "$deadline" ] || fail "timed out after ${seconds}s waiting for $what"
        sleep 0.25
    done
}

# ---------------------------------------------------------------- the cluster
mungekey --create --keyfile="$tmp/munge/munge.key"
munged --foreground --socket="$tmp/msock/munge.sock" --key-file="$tmp/munge/munge.key" \
    --pid-file="$tmp/msock/munged.pid" --seed-file="$tmp/munge/seed" \
    >"$tmp/log/munged.log" 2>&1 &
started+=($!)
wait_for 10 "munged's socket" test -S "$tmp/msock/munge.sock"

export SLURM_CONF=$tmp/slurm.conf
cat >"$SLURM_CONF" <<EOF
ClusterName=stasis-test
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's next start (default 120 s)
AuthInfo=socket=$tmp/msock/munge.sock,cred_expire=5
StateSaveLocation=$tmp/state
SlurmdSpoolDir=$tmp/spool
SlurmctldPidFile=$tmp/slurmctld.pid
SlurmdPidFile=$tmp/slurmd.pid
SlurmctldLogFile=$tmp/log/slurmctld.log
SlurmdLogFile=$tmp/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# No cgroups: plain process tracking by parentage, no task containment.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$tmp/log/jobcomp.log
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=5
NodeName=$node NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=test Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF

slurmctld -D -f "$SLURM_CONF" >"$tmp/log/slurmctld.stderr" 2>&1 &
started+=($!)
wait_for 30 "slurmctld to answer" bash -c 'scontrol ping 2>/dev/null | grep -q UP'
slurmd -D -f "$SLURM_CONF" >"$tmp/log/slurmd.stderr" 2>&1 &
started+=($!)
node_idle() { [ "$(sinfo -h -n "$node" -o %t 2>/dev/null)" = idle ]; }
wait_for 30 "node $node to be idle" node_idle
echo "slurm test: slurmctld, slurmd and munged up in $tmp (node $node)"

# ------------------------------------------------------- what the jobs run
cp "$stasis_bin" "$tmp/bin/stasis"
gcc -O2 -Wall -o "$tmp/bin/counter" tests/programs/counter.c
chmod -R a+rX "$tmp/bin"
# sbatch passes this environment on to the jobs (--export=ALL).
export PATH="$tmp/bin:$PATH"
export STASIS_IMAGES=$tmp/images XDG_RUNTIME_DIR=$tmp/run
export STASIS_INTERVAL=2s STASIS_KEEP=3
script=$repo/examples/slurm/stasis-job.sbatch

submit() { # NAME TICKS [SBATCH OPTIONS...]
    local name=$1 ticks=$2
    shift 2
    sbatch --parsable --job-name="$name" --chdir="$tmp" --output="$tmp/out/$name-%j.out" \
        "$@" "$script" counter "$tmp" "$ticks"
}
as_nobody() {
    setpriv --reuid=65534 --regid=65534 --clear-groups \
        env STASIS_IMAGES="$tmp/images-nobody" XDG_RUNTIME_DIR="$tmp/run-nobody" "$@"
}
state() { scontrol show job "$1" | grep -o 'JobState=[A-Z_]*' | cut -d= -f2; }
restarts() { scontrol show job "$1" | grep -o 'Restarts=[0-9]*' | cut -d= -f2; }
ticks() { grep -c '^tick ' "$1" || true; }
newest() { # NAME: "N REASON" of the newest generation
    stasis --json history "$1" | python3 -c 'import json, sys
g = json.load(sys.stdin)[-1]
print(g["generation"], g["reason"])'
}
count() { python3 -c 'import json, sys; print(len(json.load(sys.stdin)))'; }
# Generations as "N:REASON" lines, oldest first.
listing() {
    python3 -c 'import json, sys
for g in json.load(sys.stdin):
    print(g["generation"], g["reason"], sep=":")'
}

t0=$SECONDS
a=$(submit preempt 1500)
jobs_submitted+=("$a")
b=$(submit timelimit 3000 --time=1 --signal=B:USR1@10 --uid=65534 --gid=65534 \
    --export=ALL,STASIS_IMAGES="$tmp/images-nobody",XDG_RUNTIME_DIR="$tmp/run-nobody")
jobs_submitted+=("$b")
out_a=$tmp/out/preempt-$a.out
out_b=$tmp/out/timelimit-$b.out
echo "slurm test: submitted job $a (root, preempted by scancel) and job $b (nobody, time limit 1 min)"

# ------------------------------------- job a: preempted by scancel --signal=USR1 --batch
has_generation() { compgen -G "$STASIS_IMAGES/slurm-$a/gen-*" >/dev/null; }
wait_for 60 "job $a to run and checkpoint once (--interval)" has_generation
ticks_at_least() { [ "$(ticks "$1")" -ge "$2" ]; }
wait_for 30 "job $a to print 100 ticks" ticks_at_least "$out_a" 100
before=$(ticks "$out_a")
scancel --signal=USR1 --batch "$a"
echo "slurm test: job $a sent SIGUSR1 after $before ticks"
requeued_a() { grep -q "requeueing Slurm job $a" "$out_a"; }
wait_for 30 "job $a to checkpoint and requeue itself" requeued_a
# The newest generation now is the one the signal took (the requeued job starts again only
# after cred_expire, 5 s).
read -r gen reason < <(newest "slurm-$a")
[ "$reason" = "signal SIGUSR1" ] || fail "job $a: newest generation $gen was taken by '$reason'"
grep -q "SIGUSR1 received, generation $gen written" "$out_a" ||
    fail "job $a: the supervisor did not report generation $gen"
grep -q "checkpointed (stasis exited 75)" "$out_a" || fail "job $a: stasis did not exit 75"
echo "slurm test: job $a checkpointed (generation $gen, signal SIGUSR1) and requeued itself"

finished() {
    # No state at all: scontrol failed for a moment (the controller busy), not an end.
    case "$(state "$1")" in
    "" | PENDING | RUNNING | CONFIGURING | COMPLETING | REQUEUED | REQUEUE_HOLD | REQUEUE_FED | SUSPENDED) return 1 ;;
    *) return 0 ;;
    esac
}
wait_for 90 "job $a to be started again and finish" finished "$a"

# Every job's output: ticks 1..N, each once, in order; the counter's own checks passed.
check_output() { # JOB OUTPUT TICKS
    local job=$1 out=$2 n=$3
    [ "$(state "$job")" = COMPLETED ] || fail "job $job ended $(state "$job"), not COMPLETED"
    scontrol show job "$job" | grep -q 'ExitCode=0:0' || fail "job $job: exit code not 0:0"
    grep '^tick ' "$out" | awk -v n="$n" '
        $2 != NR { printf "line %d of the ticks is \"%s\": expected tick %d\n", NR, $0, NR; bad = 1; exit }
        END { if (!bad && NR != n) { printf "%d ticks, expected %d\n", NR, n; bad = 1 } exit bad }' ||
        fail "job $job: output $out does not continue without gap or duplicate"
    grep -q '^PASS clock continuous' "$out" || fail "job $job: CLOCK_MONOTONIC jumped ($out)"
    grep -q '^DONE 0$' "$out" || fail "job $job: the counter's checks failed ($out)"
    if grep -q '^FAIL' "$out"; then fail "job $job: $(grep '^FAIL' "$out")"; fi
    local r
    r=$(restarts "$job")
    [ "$r" -ge 1 ] || fail "job $job was never restarted"
    # One signalled checkpoint, one requeue and one restart (SLURM_RESTART_COUNT) per run.
    local k
    for k in $(seq 1 "$r"); do
        grep -q "^stasis-job: restart $k of slurm-$job, from its newest generation" "$out" ||
            fail "job $job: run $((k + 1)) did not see SLURM_RESTART_COUNT=$k and restart"
    done
    [ "$(grep -c 'SIGUSR1 received, generation' "$out")" = "$r" ] ||
        fail "job $job: $(grep -c 'SIGUSR1 received' "$out") signalled checkpoints for $r restarts"
    [ "$(grep -c 'checkpointed (stasis exited 75); requeueing' "$out")" = "$r" ] ||
        fail "job $job: not one requeue per restart"
    grep -q "JobId=$job .*JobState=COMPLETED" "$tmp/log/jobcomp.log" ||
        fail "job $job: no COMPLETED record in Slurm's job completion log"
    echo "slurm test: job $job COMPLETED after $r restart(s): $n ticks, each once, in order"
}
check_output "$a" "$out_a" 1500
# The restarted job went on taking periodic checkpoints after the signal's generation, and
# --keep 3 pruned the older ones.
kept=$(stasis --json history "slurm-$a" | listing)
[ "$(echo "$kept" | wc -l)" -le 3 ] || fail "job $a: more than 3 generations kept: $kept"
while IFS=: read -r n why; do
    [ "$n" -gt "$gen" ] && [ "$why" = interval ] ||
        fail "job $a: generation $n ($why) kept at the end, not a later periodic one"
done <<<"$kept"

# ------------------------------------- job b: Slurm's warning signal before the time limit
wait_for 180 "job $b to finish" finished "$b"
check_output "$b" "$out_b" 3000
if grep -q 'DUE TO TIME LIMIT' "$out_b"; then fail "job $b reached its time limit"; fi
grep -q 'UserId=nobody(65534)' <(scontrol show job "$b") || fail "job $b did not run as nobody"
[ "$(stat -c %u "$tmp/images-nobody/slurm-$b")" = 65534 ] || fail "job $b: images not nobody's"
[ "$(as_nobody stasis --json history "slurm-$b" | count)" -le 3 ] ||
    fail "job $b: more than 3 generations kept"
as_nobody stasis history "slurm-$b"

echo "slurm test: both jobs done in $((SECONDS - t0)) s"
echo "slurm: 2 passed, 0 failed"
